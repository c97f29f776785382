"""PEFT's LoRA on our models, with the real library: on the stacked experts (`target_parameters`, PEFT's way for MoE
experts) and on attention (`target_modules`), for every routed type and both blocks. The adapters must reach the
experts whichever way a layer calls them (MoT's mixed tokens, Expert Choice's picks, Token Choice's capacity slots
while training and its token-routed interface in eval), train, merge and survive a save and load."""

from __future__ import annotations

import pytest
import torch
from conftest import require

peft = require("peft")

from mixture_of_tokens import MoTConfig, MoTForCausalLM  # noqa: E402

VOCAB = 61
ROUTED = ("mot", "token_choice", "expert_choice")
BLOCKS = {
    "paper": {},
    "modern": dict(position_embedding_type="rope", norm_type="rmsnorm", gated_mlp=True, hidden_act="silu",
                   num_key_value_heads=2, mlp_bias=True),
}


def make_model(mlp_type: str, block: str) -> MoTForCausalLM:
    config = MoTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, group_size=4, num_experts=4, expert_size=24, mlp_types=["dense", mlp_type],
        bos_token_id=0, eos_token_id=0, pad_token_id=0, **BLOCKS[block],
    )
    torch.manual_seed(0)
    return MoTForCausalLM(config)


def expert_parameters(model: MoTForCausalLM) -> list[str]:
    up = "gate_up_proj" if model.config.gated_mlp else "up_proj"
    return [f"mlp.experts.{up}", "mlp.experts.down_proj"]


def random_ids(batch=8, length=10, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mlp_type", ROUTED)
def test_every_routed_layer_calls_its_experts_through_call(mlp_type):
    """What wraps a module sees only its `__call__`: a forward hook on the experts fires in training and in eval."""
    model = make_model(mlp_type, "paper")
    calls = []
    model.model.layers[1].mlp.experts.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    ids = random_ids()
    model.train()(ids, labels=ids)
    with torch.no_grad():
        model.eval()(ids)
    assert len(calls) == 2, calls


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("mlp_type", ROUTED)
def test_lora_on_the_experts_reaches_every_call(mlp_type, block):
    """Adapters on the experts alone change the loss in training (Token Choice: the capacity path) and the logits
    in eval (Token Choice: transformers' experts interface), and only the routed layer's experts get gradients."""
    model = make_model(mlp_type, block)
    config = peft.LoraConfig(r=4, target_parameters=expert_parameters(model), init_lora_weights=False)
    adapted = peft.get_peft_model(model, config)
    ids = random_ids()

    adapted.train()
    loss = adapted(ids, labels=ids).loss
    with adapted.disable_adapter():
        base_loss = adapted(ids, labels=ids).loss
    assert abs(loss.item() - base_loss.item()) > 1e-4
    loss.backward()
    lora = {name: p.grad for name, p in adapted.named_parameters() if "lora_" in name}
    assert lora and all(name.startswith("base_model.model.model.layers.1.mlp.experts") for name in lora), list(lora)
    assert all(grad is not None and grad.abs().sum() > 0 for grad in lora.values()), \
        [name for name, grad in lora.items() if grad is None or not grad.abs().sum() > 0]

    adapted.eval()
    with torch.no_grad():
        logits = adapted(ids).logits
        with adapted.disable_adapter():
            base_logits = adapted(ids).logits
    assert (logits - base_logits).abs().max() > 1e-3


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("mlp_type", ROUTED)
def test_lora_trains_merges_saves_and_loads(mlp_type, block, tmp_path):
    """LoRA on attention and on the experts: a few optimiser steps lower the loss; `merge_and_unload()` gives the
    adapted model's logits; the saved adapter, loaded onto a fresh copy of the base model, gives them too."""
    model = make_model(mlp_type, block)
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             target_parameters=expert_parameters(model))
    adapted = peft.get_peft_model(model, config)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert trainable and all(not p.requires_grad for n, p in adapted.named_parameters() if "lora_" not in n)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = random_ids()
    adapted.train()
    losses = []
    for _ in range(4):
        loss = adapted(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses

    adapted.eval()
    with torch.no_grad():
        expected = adapted(ids).logits
    adapted.save_pretrained(tmp_path / "adapter")

    merged = adapted.merge_and_unload()
    assert type(merged) is MoTForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)

    fresh = make_model(mlp_type, block)
    fresh.load_state_dict(base_state)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_lora_on_the_experts_trains_through_the_compiled_cpu_kernels():
    """In CPU bf16 on a CPU that runs the package's kernels (cpu_kernels.py), MoT's experts multiply through them:
    the weight they are handed is PEFT's adapted one, so the adapters' gradients are those of plain bmm."""
    from mixture_of_tokens import cpu_kernels
    from mixture_of_tokens.modeling.modeling_mot import MoTExperts

    if not cpu_kernels.cpu_runs_kernels() or cpu_kernels.load_kernels() is None:
        pytest.skip("this CPU does not run the compiled kernels (tests/test_cpu_kernels.py says why)")
    config = MoTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=32, group_size=16, num_experts=32,
                       expert_size=64, mlp_types=["mot"], bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = MoTForCausalLM(config).bfloat16()
    lora = peft.LoraConfig(r=4, target_parameters=expert_parameters(model), init_lora_weights=False)
    adapted = peft.get_peft_model(model, lora).train()
    (experts,) = [module for module in adapted.modules() if isinstance(module, MoTExperts)]  # inside PEFT's wrappers
    ids = random_ids(batch=16, length=4)
    grads, seen = {}, []
    experts.register_forward_hook(lambda module, args, output: seen.append(type(output.grad_fn).__name__))
    for kernels_on in (True, False):
        experts.product_kernels = MoTExperts.product_kernels if kernels_on else None
        adapted.zero_grad()
        adapted(ids, labels=ids).loss.backward()
        assert (seen[-1] == "ExpertProductsWithKernelsBackward") == kernels_on, seen
        grads[kernels_on] = {name: p.grad.float() for name, p in adapted.named_parameters() if "lora_" in name}
    assert grads[True] and grads[True].keys() == grads[False].keys()
    for name, grad in grads[True].items():
        assert grad.abs().sum() > 0, name
        assert (grad - grads[False][name]).norm() <= 2e-2 * grads[False][name].norm(), name
