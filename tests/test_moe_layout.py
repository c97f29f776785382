"""transformers' MoE shape: parameter names, checkpoints with the earlier names, the experts interface, host
synchronisations, padding under every mask form, compilation and continuous batching."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import mixture_of_tokens  # noqa: F401  (registers the Auto classes)
from mixture_of_tokens import MoTConfig, MoTForCausalLM
from mixture_of_tokens.modeling.modeling_mot import CACHE_NAME

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
MODERN = dict(position_embedding_type="rope", norm_type="rmsnorm", gated_mlp=True, hidden_act="silu",
              num_key_value_heads=2)
ALL_TYPES = ["dense", "mot", "token_choice", "expert_choice"]


def tiny(mlp_types=ALL_TYPES, seed=0, **overrides) -> MoTForCausalLM:
    fields = dict(vocab_size=64, hidden_size=32, num_hidden_layers=len(mlp_types), num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=64, group_size=2, num_experts=4, expert_size=24,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0, mlp_types=list(mlp_types))
    torch.manual_seed(seed)
    return MoTForCausalLM(MoTConfig(**{**fields, **overrides})).eval()


def left_padded(batch=4, length=8, seed=1):
    ids = torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[3, :5] = 0
    return ids, mask


def test_parameters_have_transformers_moe_names():
    names = dict(tiny(**MODERN, mlp_bias=True).named_parameters())
    block = "model.layers.{}."
    for part in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                 "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"):
        assert all(block.format(i) + part in names for i in range(4)), part
    assert {block.format(0) + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")} <= names.keys()
    for i in (1, 2, 3):
        assert names[block.format(i) + "mlp.gate.weight"].shape == (4, 32)  # router [E, d]
        assert names[block.format(i) + "mlp.experts.gate_up_proj"].shape == (4, 32, 48)  # [E, d, 2f]
        assert names[block.format(i) + "mlp.experts.down_proj"].shape == (4, 24, 32)  # [E, f, d]
        assert names[block.format(i) + "mlp.experts.gate_up_proj_bias"].shape == (4, 48)
    assert names[block.format(1) + "mlp.experts.down_proj_bias"].shape == (4, 32)
    paper = dict(tiny().named_parameters())
    assert paper[block.format(2) + "mlp.experts.up_proj"].shape == (4, 32, 24)  # not gated: [E, d, f]


@pytest.mark.parametrize("name", ["paper", "paper-bias-tied", "modern", "modern-bias-tied"])
def test_checkpoints_with_the_earlier_names_load_unchanged(name, tmp_path):
    """Folders written before the rename (fused qkv_proj, attn_norm/mlp_norm, router [d, E], experts w1/w2/w_gate
    and b1/b2/b_gate; every layer type, both blocks, biases, tied or not) give the logits they gave then, and are
    saved again with today's names."""
    folder = LEGACY / name
    expected = load_file(folder / "expected.safetensors")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    real = expected["attention_mask"].bool()  # what padded positions give depends on the transformers release
    torch.testing.assert_close(logits[real], expected["logits"][real], rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        names = list(saved.keys())
    assert not [n for n in names if any(old in n for old in ("qkv_proj", "attn_norm", "mlp_norm", ".w1", ".router"))]
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(expected["input_ids"], attention_mask=expected["attention_mask"]).logits,
                                   logits, rtol=0, atol=0)


@pytest.mark.parametrize("mlp_bias", [False, True])
@pytest.mark.parametrize("block", ["paper", "modern"])
def test_token_choice_runs_every_experts_implementation(block, mlp_bias, tmp_path):
    """`from_pretrained(..., experts_implementation=...)` and `set_experts_implementation` select the function the
    Token Choice layers really call: eager, batched_mm, grouped_mm or one registered in ALL_EXPERTS_FUNCTIONS; each of
    the four weight layouts (gated or not, biases or not) has its own experts class with transformers' flags."""
    extra = MODERN if block == "modern" else {}
    tiny(["dense", "token_choice", "token_choice"], **extra, mlp_bias=mlp_bias, num_experts_per_tok=2).save_pretrained(
        tmp_path)
    ids, mask = left_padded()
    results = {}
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=implementation).eval()
        assert model.config._experts_implementation == implementation
        experts = model.model.layers[1].mlp.experts
        assert (experts.has_gate, experts.has_bias) == (block == "modern", mlp_bias)
        with torch.no_grad():
            results[implementation] = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(results["batched_mm"], results["eager"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["grouped_mm"], results["eager"], rtol=1e-5, atol=1e-5)

    calls = []

    def counting(module, hidden_states, top_k_index, top_k_weights):
        calls.append(hidden_states.shape[0])
        return ALL_EXPERTS_FUNCTIONS["batched_mm"](module, hidden_states, top_k_index, top_k_weights)

    ALL_EXPERTS_FUNCTIONS.register("counting_for_test", counting)
    model.set_experts_implementation("counting_for_test")
    with torch.no_grad():
        counted = model(ids, attention_mask=mask).logits
    assert calls == [ids.numel(), ids.numel()]  # both Token Choice layers, every token
    torch.testing.assert_close(counted, results["eager"], rtol=1e-5, atol=1e-5)


class CountHostSyncs(TorchDispatchMode):
    """Counts the operators that make the host wait for a device's result: reading a value (`.item()`, `bool()`,
    `.tolist()`, `int()`), and those whose output size depends on the data."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique", "repeat_interleave")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_token_choice_decodes_without_host_syncs_and_trains_with_at_most_one(implementation):
    """Counted inside the Token Choice layer (transformers' own mask creation is not ours to count)."""
    model = tiny(["dense", "token_choice"])
    model.set_experts_implementation(implementation)
    layer = model.model.layers[1].mlp
    hidden = torch.randn(4, 8, 32, requires_grad=True)
    _, mask = left_padded()
    with torch.no_grad(), CountHostSyncs() as counter:
        layer(hidden, mask.bool())
    assert counter.count == 0
    layer.train()
    with CountHostSyncs() as counter:
        layer(hidden).square().mean().backward()
    assert counter.count == 0  # no padding: the capacity comes from the shape
    with CountHostSyncs() as counter:
        layer(hidden, mask.bool()).square().mean().backward()
    assert counter.count == 1  # the capacity counts the real tokens


@pytest.mark.parametrize("block", ["paper", "modern"])
def test_padding_stays_out_of_groups_under_every_mask_form(block):
    """MoT and Expert Choice groups leave padding out whether transformers hands the model a 2-D mask, a 4-D one, or
    a static cache's 4-D mask (generate() then passes `padding_mask`), for every attention implementation."""
    extra = MODERN if block == "modern" else {}
    model = tiny(**extra)
    ids, mask = left_padded()
    settings = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_scores=True,
                    return_dict_in_generate=True)
    model.set_attn_implementation("eager")
    reference = model.generate(ids, **settings)
    # Flex attention is checked on a forward below: torch 2.13's CPU code generation for flex attention while
    # decoding fails to compile (an inductor C++ error), whatever the model.
    runs = [("eager", "static"), ("sdpa", "dynamic"), ("sdpa", "static")]
    for attention, cache in runs:
        model.set_attn_implementation(attention)
        generated = model.generate(ids, cache_implementation=cache, **settings)
        assert torch.equal(generated.sequences, reference.sequences), (attention, cache)
        for ours, theirs in zip(generated.scores, reference.scores, strict=True):
            finite = torch.isfinite(theirs)
            torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-4, atol=1e-4)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        from_2d = model(ids, attention_mask=mask).logits
        causal = torch.tril(torch.ones(8, 8, dtype=torch.bool))
        four_d = (causal & mask.bool()[:, None, None, :])
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # what a 2-D mask gives; a 4-D one says nothing of them
        additive = torch.where(four_d, 0.0, torch.finfo(torch.float32).min)
        from_4d = model(ids, attention_mask=additive, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(from_4d[real], from_2d[real], rtol=1e-5, atol=1e-5)
    model.set_attn_implementation("flex_attention")  # a BlockMask in the layers, the 2-D mask for the groups
    with torch.no_grad():
        from_flex = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(from_flex[real], from_2d[real], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(CACHE_NAME != "cache", reason="before transformers 5.24 continuous batching hands the paged cache "
                    "to the attention functions under the name that is the KV cache's from 5.24 (`cache`)")
def test_continuous_batching_gives_generate_tokens_for_token_choice_and_refuses_mot():
    from transformers import ContinuousBatchingConfig

    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]
    settings = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    # A cache of 16 blocks: by default its size is 60-90% of the free memory, on a CPU of the RAM (14 GiB here).
    cache = ContinuousBatchingConfig(num_blocks=16)
    for mlp_types in (["dense", "dense"], ["dense", "token_choice"]):
        model = tiny(mlp_types, **MODERN)
        expected = [model.generate(torch.tensor([p]), generation_config=settings)[0, len(p):].tolist()
                    for p in prompts]
        outputs = model.generate_batch(inputs=prompts, generation_config=settings, continuous_batching_config=cache)
        got = [outputs[key].generated_tokens for key in sorted(outputs, key=lambda k: int(k.rsplit("_", 1)[-1]))]
        assert got == expected, mlp_types
    with pytest.raises(ValueError, match="continuous batching cannot run mot layers"):
        tiny(["dense", "mot"], **MODERN).generate_batch(inputs=prompts, generation_config=settings,
                                                        continuous_batching_config=cache)


@pytest.mark.slow
def test_compiled_training_step_with_recomputed_mixtures_matches_eager():
    """`mot_recompute` (MoT's merged and processed tokens recomputed in backward) compiles with fullgraph=True and
    gives the loss and gradients of the eager step that saves them."""
    model = tiny().train()
    ids, _ = left_padded()
    eager_loss = model(ids, labels=ids).loss
    eager_loss.backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.config.mot_recompute = True
    compiled_loss = torch.compile(model, fullgraph=True)(ids, labels=ids).loss
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("block", ["paper", "modern"])
def test_compiled_training_step_and_static_cache_generation_match_eager(block):
    """`torch.compile(fullgraph=True)` with every layer type: a training step gives eager's loss and gradients, and
    static-cache generate() gives eager's tokens."""
    extra = MODERN if block == "modern" else {}
    model = tiny(**extra)
    ids, mask = left_padded()
    model.train()
    eager_loss = model(ids, labels=ids).loss
    eager_loss.backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled_loss = torch.compile(model, fullgraph=True)(ids, labels=ids).loss
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-3, atol=1e-5)
    model.eval()
    settings = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, cache_implementation="static")
    eager_tokens = model.generate(ids, **settings)
    model.forward = torch.compile(model.forward, fullgraph=True)
    assert torch.equal(model.generate(ids, **settings), eager_tokens)
    assert math.isfinite(eager_loss.item())
