"""The core model: the MoT layer's method (docs/design.md, "The MoT layer"), the baselines, and transformers integration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import mixture_of_tokens  # noqa: F401  (registers the Auto classes)
from mixture_of_tokens import MoTConfig, MoTForCausalLM
from mixture_of_tokens.modeling import modeling_mot, performance_mot
from mixture_of_tokens.modeling.modeling_mot import ExpertChoice, MixtureOfTokens, TokenChoice
from mixture_of_tokens.modeling.reference import mixture_of_tokens_reference

VOCAB = 97
FFN_TYPES = ["mot", "token_choice", "expert_choice", "dense"]
# Every modern option at once (a Llama-style block): RoPE, RMSNorm, SwiGLU dense layers and experts, grouped-query
# attention, biases. Tests parametrized with it run on both blocks.
MODERN = dict(position_embedding_type="rope", norm_type="rmsnorm", gated_mlp=True, hidden_act="silu",
              num_key_value_heads=2, attention_bias=True, mlp_bias=True)
BLOCKS = {"paper": {}, "modern": MODERN}


def small_config(ffn="mot", **overrides) -> MoTConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, group_size=4, num_experts=4, expert_size=64, mlp_types=["dense", ffn],
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    base.update(overrides)
    return MoTConfig(**base)


def small_model(ffn="mot", **overrides) -> MoTForCausalLM:
    torch.manual_seed(0)
    return MoTForCausalLM(small_config(ffn, **overrides)).eval()


def random_ids(batch, length, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the MoT layer itself


def randomize(layer, std=0.3, seed=0):
    """Random values for every weight of a layer (its init is the model's job), biases included."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return layer


@pytest.mark.parametrize("block", BLOCKS)
def test_mot_layer_matches_the_naive_reference_of_the_method(block):
    """Group j = rows j*G..j*G+G-1 at one position; softmax over the group per expert; merge, process, emit: the
    loops of mixture_of_tokens.modeling.reference, with padding, a smaller last group and a learned temperature."""
    config = small_config(group_size=3, num_experts=2, mot_temperature=0.7, learnable_temperature="per_expert",
                          **BLOCKS[block])
    layer = randomize(MixtureOfTokens(config), std=0.4)
    x = torch.randn(8, 5, 32)  # groups of 3, 3 and 2
    mask = torch.ones(8, 5, dtype=torch.bool)
    mask[1, :2] = False
    mask[7, :] = False
    for token_mask in (None, mask):
        output = layer(x, token_mask)
        torch.testing.assert_close(output, mixture_of_tokens_reference(layer, x, token_mask), rtol=1e-5, atol=1e-5)


# The two layouts MoT's merged and processed tokens can take between the merge, the experts and the emit
# (`MixtureOfTokens.expert_major_layout`): transposed views, or explicit expert-major copies (CPU bf16's choice).
LAYOUTS = {"views": False, "expert_major": True}


def assert_close_in_bf16(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Two bf16 computations of one result agree up to rounding: their difference is under 1% of its norm (bf16
    keeps 8 bits, so single elements of different summation orders differ by several units in the last place)."""
    difference = (actual.float() - expected.float()).norm()
    assert difference <= 1e-2 * expected.float().norm(), (difference.item(), expected.float().norm().item())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recomputed"])
@pytest.mark.parametrize("block", BLOCKS)
def test_granular_mot_layer_matches_the_reference_in_outputs_and_gradients(block, recompute, layout):
    """The paper's /16 shape scaled down (E = 16 G experts of size d_ff / 16), with padding: outputs and the
    gradients of the input and of every weight equal the naive reference's, whether the merged and processed
    tokens are saved for backward or recomputed (`mot_recompute`), in either layout."""
    config = small_config(group_size=2, num_experts=32, expert_size=4, mot_recompute=recompute, **BLOCKS[block])
    # float64, so the comparison measures the method and not the rounding of two summation orders
    layer = randomize(MixtureOfTokens(config), std=0.4).double().train()
    layer.expert_major_layout = LAYOUTS[layout]
    x = torch.randn(4, 3, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[3, 1] = False
    output = layer(x, mask)
    expected = mixture_of_tokens_reference(layer, x, mask)
    torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-10)
    probe = torch.randn_like(output)
    grads = torch.autograd.grad((output * probe).sum(), [x, *layer.parameters()])
    expected_grads = torch.autograd.grad((expected * probe).sum(), [x, *layer.parameters()])
    for name, grad, expected_grad in zip(["input", *dict(layer.named_parameters())], grads, expected_grads,
                                         strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9, msg=name)


def test_bf16_mot_layer_on_cpu_takes_the_expert_major_layout_and_agrees_with_the_views():
    """On CPU in bf16 the batched matmuls copy strided operands, so the layer makes the expert-major layout itself;
    its outputs and gradients are those of the transposed views', and its backward also runs where the mixing
    weights need no gradient (uniform routing)."""
    assert modeling_mot.batched_matmul_copies_views(torch.empty(1, dtype=torch.bfloat16))
    assert not modeling_mot.batched_matmul_copies_views(torch.empty(1))
    config = small_config(group_size=2, num_experts=32, expert_size=4)
    layer = randomize(MixtureOfTokens(config), std=0.4).to(torch.bfloat16).train()
    x = torch.randn(4, 3, 32, dtype=torch.bfloat16, requires_grad=True)
    results = {}
    for layout in (None, *LAYOUTS.values()):
        layer.expert_major_layout = layout
        output = layer(x)
        results[layout] = output, torch.autograd.grad(output.float().square().sum(), [x, *layer.parameters()])
    assert torch.equal(results[None][0], results[True][0])  # the default is the expert-major layout
    (views, view_grads), (expert_major, expert_major_grads) = results[False], results[True]
    assert_close_in_bf16(expert_major, views)
    for grad, expected in zip(expert_major_grads, view_grads, strict=True):
        assert_close_in_bf16(grad, expected)
    uniform = randomize(MixtureOfTokens(small_config(mot_routing="uniform")), std=0.4).to(torch.bfloat16).train()
    inputs = torch.randn(4, 3, 32, dtype=torch.bfloat16, requires_grad=True)
    uniform(inputs).float().sum().backward()
    assert inputs.grad is not None and uniform.experts.up_proj.grad is not None


@pytest.mark.slow
def test_bf16_mot_layer_compiles_with_fullgraph_in_either_layout():
    """`torch.compile(fullgraph=True)` of a bf16 MoT layer gives eager's outputs and gradients, with the
    expert-major copies (CPU bf16's layout) and with the views."""
    config = small_config(group_size=2, num_experts=32, expert_size=4)
    layer = randomize(MixtureOfTokens(config), std=0.4).to(torch.bfloat16).train()
    x = torch.randn(4, 3, 32, dtype=torch.bfloat16)
    for expert_major in LAYOUTS.values():
        layer.expert_major_layout = expert_major
        runs = []
        for run in (layer, torch.compile(layer, fullgraph=True)):
            inputs = x.clone().requires_grad_()
            output = run(inputs)
            runs.append((output, torch.autograd.grad(output.float().square().sum(), [inputs, *layer.parameters()])))
        torch._dynamo.reset()
        (eager, eager_grads), (compiled, compiled_grads) = runs
        assert_close_in_bf16(compiled, eager)
        for grad, expected in zip(compiled_grads, eager_grads, strict=True):
            assert_close_in_bf16(grad, expected)


def test_group_size_one_is_a_dense_ffn_of_width_experts_times_expert_size():
    config = small_config(group_size=1, num_experts=4, expert_size=16)
    layer = MixtureOfTokens(config)
    randomize(layer)
    x = torch.randn(3, 7, 32)
    up = layer.experts.up_proj.permute(1, 0, 2).reshape(32, 4 * 16)  # [E, d, f] -> [d, E*f]
    down = layer.experts.down_proj.reshape(4 * 16, 32)  # [E, f, d] -> [E*f, d]
    dense = torch.relu(x @ up) @ down
    output = layer(x)
    torch.testing.assert_close(output, dense, rtol=1e-5, atol=1e-5)


def test_uniform_routing_gives_weights_one_over_group_size():
    layer = MixtureOfTokens(small_config(mot_routing="uniform", group_size=4))
    torch.nn.init.normal_(layer.gate.weight, std=1.0)  # ignored: the controller is frozen at zero
    grouped = torch.randn(2, 4, 3, 32)
    weights = layer.mixing_weights(grouped, None)
    torch.testing.assert_close(weights, torch.full_like(weights, 0.25))


def test_discrete_routing_gives_each_expert_exactly_one_token():
    layer = MixtureOfTokens(small_config(mot_routing="discrete", group_size=4)).eval()
    torch.nn.init.normal_(layer.gate.weight, std=1.0)
    grouped = torch.randn(2, 4, 3, 32)
    weights = layer.mixing_weights(grouped, None)  # [n, G, S, E]
    assert torch.equal((weights > 0).sum(dim=1), torch.ones(2, 3, 4, dtype=torch.long))
    assert torch.equal(weights.sum(dim=1), torch.ones(2, 3, 4))
    # ... and it is the limit of softmax as the temperature goes to zero
    soft = MixtureOfTokens(small_config(mot_temperature=1e-4, group_size=4))
    soft.gate.weight.data.copy_(layer.gate.weight.data)
    torch.testing.assert_close(soft.mixing_weights(grouped, None), weights, atol=1e-4, rtol=0)


def test_discrete_routing_still_trains_the_controller():
    layer = MixtureOfTokens(small_config(mot_routing="discrete")).train()
    randomize(layer)
    output = layer(torch.randn(8, 3, 32))
    output.square().sum().backward()
    assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0


def test_padding_takes_no_part_and_gets_a_zero_update():
    layer = MixtureOfTokens(small_config(group_size=4))
    randomize(layer)
    x = torch.randn(4, 6, 32)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 2:] = False  # row 1 padded after position 1
    mask[:, 5] = False  # a column of padding only
    output = layer(x, mask)
    assert torch.isfinite(output).all()
    assert torch.equal(output[~mask], torch.zeros_like(output[~mask]))
    # a padded token's content cannot change anyone's output
    changed = x.clone()
    changed[1, 3] += 100.0
    torch.testing.assert_close(layer(changed, mask), output)


def test_ragged_last_group_leaves_full_groups_unchanged_and_warns_once(caplog):
    layer = MixtureOfTokens(small_config(group_size=4))
    randomize(layer)
    x = torch.randn(10, 5, 32)  # groups of 4, 4 and 2
    full_only = layer(x[:8])
    ragged = layer(x)
    torch.testing.assert_close(ragged[:8], full_only, rtol=0, atol=1e-6)
    alone = layer(x[8:])  # the small group alone equals the small group inside the batch
    torch.testing.assert_close(ragged[8:], alone, rtol=0, atol=1e-6)
    assert torch.isfinite(ragged).all()


def test_learnable_temperature_gets_gradients_and_stays_positive():
    for mode, shape in (("shared", (1,)), ("per_expert", (4,))):
        layer = MixtureOfTokens(small_config(learnable_temperature=mode, mot_temperature=2.0))
        randomize(layer)
        assert layer.log_temperature.shape == shape
        output = layer(torch.randn(8, 3, 32))
        output.square().sum().backward()
        assert layer.log_temperature.grad.abs().sum() > 0
        with torch.no_grad():
            layer.log_temperature -= 1000.0  # a wild optimizer step
        assert (layer.temperature() > 0).all()


# ---------------------------------------------------------------- whole-model properties


@pytest.mark.parametrize("ffn", FFN_TYPES)
def test_causality(ffn):
    model = small_model(ffn)
    ids = random_ids(8, 12)
    t = 5
    changed = ids.clone()
    changed[:, t + 1 :] = random_ids(8, 12 - t - 1, seed=7)
    with torch.no_grad():
        before = model(ids).logits[:, : t + 1]
        after = model(changed).logits[:, : t + 1]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_group_isolation_and_permutation_equivariance():
    model = small_model("mot", group_size=4)
    ids = random_ids(12, 10)
    with torch.no_grad():
        reference = model(ids).logits
        changed = ids.clone()
        changed[5] = random_ids(1, 10, seed=9)[0]  # a sequence of the middle group
        other = model(changed).logits
        assert torch.equal(other[:4], reference[:4]) and torch.equal(other[8:], reference[8:])
        assert not torch.allclose(other[4], reference[4])  # its group-mates do see the change
        permutation = torch.tensor([0, 1, 2, 3, 7, 4, 6, 5, 8, 9, 10, 11])
        permuted = model(ids[permutation]).logits
    torch.testing.assert_close(permuted, reference[permutation], rtol=1e-5, atol=1e-5)


def test_token_choice_in_eval_is_batch_independent():
    model = small_model("token_choice")
    ids = random_ids(8, 10)
    with torch.no_grad():
        alone = model(ids[:1]).logits
        in_batch = model(ids).logits[:1]
    torch.testing.assert_close(in_batch, alone, rtol=1e-5, atol=1e-5)


def test_token_choice_drops_over_capacity_in_training_and_adds_its_aux_loss():
    model = small_model("token_choice", capacity_factor=0.5, router_aux_loss_coef=0.01, router_z_loss_coef=1e-3)
    ids = random_ids(8, 10)
    model.train()
    out = model(ids, labels=ids, output_routing_stats=True)
    stats = out.routing_stats[0]
    assert stats["dropped_fraction"] >= 0.5 - 1e-6  # half the capacity: at least half the tokens dropped
    model.eval()
    lm_only = model(ids, labels=ids).loss
    assert out.aux_loss > 0
    # training loss = LM loss (same weights, dropless vs capacity differ) -> check the aux term directly
    model.train()
    no_aux = MoTForCausalLM(small_config("token_choice", capacity_factor=0.5, router_aux_loss_coef=0.0))
    no_aux.load_state_dict(model.state_dict())
    no_aux.train()
    difference = model(ids, labels=ids).loss - no_aux(ids, labels=ids).loss
    z_weighted = 1e-3 * out.routing_stats[0]["z_loss"]
    torch.testing.assert_close(difference, 0.01 * stats["balance_loss"] + z_weighted, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(lm_only)


def test_expert_choice_picks_tokens_within_each_group():
    config = small_config("expert_choice", group_size=4, num_experts=2, num_experts_per_tok=1)
    layer = ExpertChoice(config)
    assert layer.tokens_per_expert == 2  # k * G / E
    randomize(layer)
    x = torch.randn(8, 3, 32)
    output = layer(x)
    first_group_alone = layer(x[:4])
    torch.testing.assert_close(output[:4], first_group_alone)


def test_token_choice_dispatch_paths_agree_when_nothing_is_dropped():
    layer = TokenChoice(small_config("token_choice", capacity_factor=100.0, num_experts_per_tok=2))
    randomize(layer)
    x = torch.randn(4, 5, 32)
    layer.eval()
    dropless = layer(x)
    layer.train()
    with_capacity = layer(x)
    torch.testing.assert_close(with_capacity, dropless, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("ffn", FFN_TYPES)
def test_gradient_checkpointing_gives_the_same_gradients(ffn, block):
    model = small_model(ffn, **BLOCKS[block]).train()
    ids = random_ids(8, 10)

    def gradients():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_chunked_training_loss_equals_the_plain_loss(monkeypatch, tie_word_embeddings):
    """Same loss and gradients as transformers' loss on full logits: ignored labels, several chunks with a ragged
    last one, `num_items_in_batch` (gradient accumulation), `shift_labels`, tied embeddings, a frozen head."""
    monkeypatch.setattr(performance_mot, "LM_LOSS_CHUNK_ELEMENTS", 7 * VOCAB)  # 7 tokens per chunk: 80 = 11*7 + 3
    model = small_model(tie_word_embeddings=tie_word_embeddings).train()
    ids = random_ids(8, 10)
    labels = ids.clone()
    labels[2, :4] = -100
    labels[5] = -100

    def run(chunked, **kwargs):
        model.config.chunked_lm_loss = chunked
        model.zero_grad()
        output = model(ids, labels=labels, **kwargs)
        output.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return output, grads

    for kwargs in ({}, {"num_items_in_batch": torch.tensor(300)}, {"shift_labels": labels.roll(-1, dims=1)}):
        plain, plain_grads = run(False, **kwargs)
        chunked, chunked_grads = run(True, **kwargs)
        assert plain.logits is not None and chunked.logits is None
        torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-6, atol=1e-6)
        assert plain_grads.keys() == chunked_grads.keys()
        for name in plain_grads:
            torch.testing.assert_close(chunked_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)

    model.lm_head.weight.requires_grad_(False)
    if not tie_word_embeddings:  # frozen head: no weight gradient is computed, the rest still matches
        plain, plain_grads = run(False)
        chunked, chunked_grads = run(True)
        assert "lm_head.weight" not in chunked_grads
        for name in plain_grads:
            torch.testing.assert_close(chunked_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_logits_are_returned_whenever_the_plain_loss_is_used():
    model = small_model().train()
    ids = random_ids(4, 6)
    assert model(ids, labels=ids).logits is None  # training with labels: chunked loss
    assert model(ids).logits.shape == (4, 6, VOCAB)  # no labels
    with torch.no_grad():
        assert model(ids, labels=ids).logits is not None  # no gradients wanted
    model.eval()
    assert model(ids, labels=ids).logits is not None  # evaluation (Trainer.evaluate, lm-eval)
    model.train()
    model.config.chunked_lm_loss = False
    assert model(ids, labels=ids).logits is not None


def test_chunked_loss_under_bf16_autocast_matches_the_plain_loss():
    model = small_model().train()
    ids = random_ids(8, 10)
    losses = {}
    for chunked in (False, True):
        model.config.chunked_lm_loss = chunked
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses[chunked] = model(ids, labels=ids).loss
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
def test_attention_implementations_agree(attn, block):
    config = small_config("mot", **BLOCKS[block])
    torch.manual_seed(0)
    model = MoTForCausalLM._from_config(config, attn_implementation=attn).eval()
    assert model.config._attn_implementation == attn
    reference = small_model("mot", **BLOCKS[block])  # eager
    model.load_state_dict(reference.state_dict())
    ids = random_ids(4, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    real = mask.bool()  # padded queries attend to nothing; their outputs are undefined in every implementation
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real],
                                   reference(ids, attention_mask=mask).logits[real], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- transformers integration


def test_auto_classes_save_and_load_round_trip(tmp_path):
    model = small_model("mot")
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "configuration_mot.py", "modeling_mot.py", "performance_mot.py",
            "legacy_mot.py"} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MoTConfig)
    assert type(AutoModel.from_pretrained(tmp_path)).__name__ == "MoTModel"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_ids(8, 10)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(bf16(ids).logits.float(), model(ids).logits, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("block", BLOCKS)
def test_remote_code_loads_where_the_package_cannot_be_imported(tmp_path, block):
    model = small_model("mot", **BLOCKS[block])
    model.save_pretrained(tmp_path / "model")
    ids = random_ids(8, 10)
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        torch.save(model(ids).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path = [p for p in sys.path if 'mixture' not in p and p not in ('', '.')]
        # an editable install adds an import hook (a meta path finder) for the package: remove it
        sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]
        try:
            import mixture_of_tokens
        except ImportError:
            pass
        else:
            raise SystemExit('package is importable; the test would prove nothing')
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True).eval()
        assert 'mixture_of_tokens' not in type(model).__module__, type(model).__module__
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        with torch.no_grad():
            logits = model(ids).logits
        assert torch.equal(logits, torch.load({str(tmp_path / 'expected.pt')!r}))
        print('REMOTE-OK', type(model).__module__)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    # -I: isolated mode, no user site, no cwd on sys.path; the editable install's path hook is filtered above
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-OK" in result.stdout


def test_remote_code_stays_remote_where_the_package_is_installed(tmp_path):
    """With the package importable, a model loaded as Hub custom code must not import it (its import registers the
    package's classes with the Auto classes): every load returns the Hub module's class, also after forwards (the
    Hub copy once imported the package there, for optional CPU kernels)."""
    model = small_model("mot", hidden_size=64, group_size=4, num_experts=4)
    model.save_pretrained(tmp_path / "model")
    script = textwrap.dedent(
        f"""
        import sys
        import torch
        from transformers import AutoModelForCausalLM
        import importlib.util
        assert importlib.util.find_spec('mixture_of_tokens') is not None, 'the package must be installed here'
        classes = []
        for _ in range(2):
            model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True)
            with torch.no_grad():
                model(torch.randint(1, {VOCAB}, (8, 5)))
            classes.append(type(model))
        assert classes[0] is classes[1], classes
        assert classes[0].__module__.startswith('transformers_modules'), classes[0].__module__
        assert 'mixture_of_tokens' not in sys.modules, 'the Hub copy imported the package'
        print('REMOTE-STAYS-REMOTE')
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-STAYS-REMOTE" in result.stdout


@pytest.mark.parametrize("ffn", ["mot", "token_choice", "dense"])
def test_greedy_generation_with_cache_equals_without(ffn):
    model = small_model(ffn, group_size=4)
    ids = random_ids(6, 7)  # 6 is not a multiple of group_size=4
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[4, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(step_cached, step_uncached, rtol=1e-4, atol=1e-5)
    # the cached logits also equal a plain forward over the generated batch
    full_mask = torch.cat([mask, torch.ones(6, 5, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        forward = model(cached.sequences[:, :-1], attention_mask=full_mask).logits[:, -6:]
    torch.testing.assert_close(torch.stack(cached.logits, 1), forward, rtol=1e-4, atol=1e-5)


def test_mot_temperature_never_leaks_into_generation_config():
    model = small_model("mot", mot_temperature=3.0)
    assert model.generation_config.temperature in (None, 1.0)


# ---------------------------------------------------------------- presets and errors


def test_presets_match_the_papers_parameter_counts():
    expected = {  # the README's "Configurations" table
        "transformer-medium": 76.8e6, "mot-medium-32e": 336.9e6, "mot-medium-32e-8": 337.4e6,
        "mot-medium-32e-16": 337.9e6, "transformer-base": 162.4e6, "mot-base-32e": 1.04e9,
        # Llama-style counterparts: a gated d_ff of 1408 keeps the feed-forward's parameters (3 x 512 x 1408 ~
        # 2 x 512 x 2048); grouped-query attention with 4 KV heads saves a quarter of the attention weights.
        "modern-transformer-medium": 75.06e6, "modern-mot-medium-32e": 343.3e6,
    }
    for name, count in expected.items():
        with torch.device("meta"):
            model = MoTForCausalLM(MoTConfig.from_preset(name))
        total = sum(p.numel() for p in model.parameters())
        assert abs(total - count) / count < 0.01, (name, total)
    dense, mot = MoTConfig.from_preset("tiny-dense"), MoTConfig.from_preset("tiny-mot")
    assert mot.num_experts * mot.expert_size / mot.group_size == dense.intermediate_size  # flop-matched
    assert mot.mlp_types == ["dense", "dense", "mot", "mot"]
    for dense_name, mot_name in (("tiny-modern-dense", "tiny-modern-mot"),
                                 ("modern-transformer-medium", "modern-mot-medium-32e")):
        dense, mot = MoTConfig.from_preset(dense_name), MoTConfig.from_preset(mot_name)
        assert mot.num_experts * mot.expert_size / mot.group_size == dense.intermediate_size  # flop-matched
        for config in (dense, mot):
            assert (config.position_embedding_type, config.norm_type, config.gated_mlp) == ("rope", "rmsnorm", True)
            assert config.num_key_value_heads == config.num_attention_heads // 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(hidden_size=30, num_attention_heads=4), "divisible by num_attention_heads"),
        (dict(mlp_types=["dense", "moe"]), "unknown mlp type 'moe'"),
        (dict(mlp_types=["dense"]), "mlp_types has 1 entries"),
        (dict(num_experts_per_tok=5), "num_experts_per_tok (5) cannot exceed num_experts (4)"),
        (dict(mot_temperature=0.0), "mot_temperature must be a positive"),
        (dict(mot_temperature=-1.0), "mot_temperature must be a positive"),
        (dict(group_size=0), "group_size must be a positive integer"),
        (dict(mot_routing="hard"), "mot_routing must be one of"),
        (dict(learnable_temperature="per_token"), "learnable_temperature must be one of"),
        (dict(capacity_factor=0), "capacity_factor must be positive"),
        (dict(hidden_act="nope"), "hidden_act must be one of"),
        (dict(chunked_lm_loss="yes"), "chunked_lm_loss must be true or false"),
        (dict(embedding_init="xavier"), "embedding_init must be one of fan_in_hidden, unit_fan_in"),
        (dict(final_norm="no"), "final_norm must be true or false"),
    ],
)
def test_bad_configurations_raise_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=None) as error:
        small_config(**overrides)
    assert message in str(error.value)


def test_unknown_preset_and_too_long_input():
    with pytest.raises(ValueError, match="unknown preset 'mot-huge'"):
        MoTConfig.from_preset("mot-huge")
    model = small_model("mot")
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=32"):
        model(random_ids(4, 33))


def test_the_authors_embedding_init_and_no_final_norm(tmp_path):
    """`embedding_init="unit_fan_in"` is the authors' (fan-in 1, cut at +-2 * init_scale: std about 0.11 with
    init_scale 0.1); `final_norm=False` feeds the last block's output to the head directly. Both survive a save."""
    ours = small_model(vocab_size=4096)
    theirs = small_model(vocab_size=4096, embedding_init="unit_fan_in", final_norm=False)
    for model in (ours, theirs):
        assert torch.isfinite(model(random_ids(4, 8)).logits).all()
    ours_std = ours.model.embed_tokens.weight.std().item()
    assert ours_std == pytest.approx(0.88 * (0.1 / 32) ** 0.5, rel=0.05)  # two-std cut: 0.88 of the std
    weights = theirs.model.embed_tokens.weight
    assert weights.std().item() == pytest.approx(0.11, abs=0.01) and weights.abs().max().item() <= 0.2
    assert theirs.model.embed_positions.weight.abs().max().item() <= 0.2
    assert isinstance(theirs.model.norm, torch.nn.Identity) and isinstance(ours.model.norm, torch.nn.LayerNorm)
    theirs.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.final_norm is False and loaded.config.embedding_init == "unit_fan_in"
    ids = random_ids(4, 8)
    torch.testing.assert_close(loaded(ids).logits, theirs(ids).logits)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("ffn", ["mot", "token_choice", "expert_choice"])
def test_experts_compute_the_dense_layer_with_their_own_weights(ffn, block):
    """Every expert of every routed type is the dense layer's computation with its own weights, forward and
    backward: ReLU without biases (the paper's), SwiGLU with biases (the modern block)."""
    layer = small_model(ffn, **BLOCKS[block]).model.layers[1].mlp
    dense = small_model("dense", **BLOCKS[block], intermediate_size=64).model.layers[1].mlp
    experts = layer.experts
    gated = "gate_up_proj" in dict(experts.named_parameters())
    with torch.no_grad():
        randomize(experts)  # biases not zero, or a missing bias would pass
        for expert in range(4):
            if gated:
                gate, up = experts.gate_up_proj[expert].chunk(2, dim=1)  # [d, 2f]: gate columns first
                gate_bias, up_bias = experts.gate_up_proj_bias[expert].chunk(2)
                dense.gate_proj.weight.copy_(gate.T)
                dense.gate_proj.bias.copy_(gate_bias)
                dense.up_proj.weight.copy_(up.T)
                dense.up_proj.bias.copy_(up_bias)
                dense.down_proj.bias.copy_(experts.down_proj_bias[expert])
            else:
                assert dense.up_proj.bias is None and experts.up_proj_bias is None
                dense.up_proj.weight.copy_(experts.up_proj[expert].T)
            dense.down_proj.weight.copy_(experts.down_proj[expert].T)
            x = torch.randn(5, 32)
            with torch.enable_grad():
                x_dense, x_expert = x.clone().requires_grad_(), x.clone().requires_grad_()
                expected = dense(x_dense)
                output = experts.process_one(expert, x_expert)
                (expected * x[:, :1]).sum().backward()
                (output * x[:, :1]).sum().backward()
            torch.testing.assert_close(output, expected)
            torch.testing.assert_close(x_expert.grad, x_dense.grad)
            batched = experts.process(x.expand(4, 5, 32).contiguous())[expert]
            # A batched product sums in another order than F.linear: torch 2.9.1's CPU build differed by 6.5e-6 on
            # an AVX512-BF16 EPYC; a wrong expert or weight layout differs by the outputs' own size (~0.1-1).
            torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ffn", FFN_TYPES)
def test_modern_block_caches_and_trains(ffn):
    """Cached greedy generation equals uncached on the modern block (RoPE positions continue across the cache),
    and a training step moves every parameter but the router of a frozen controller."""
    model = small_model(ffn, **MODERN)
    ids = random_ids(4, 6)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    model.train()
    model(ids, labels=ids).loss.backward()
    without_gradient = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert without_gradient == []


def test_rope_type_and_kv_heads_are_checked():
    with pytest.raises(ValueError, match="rope_type 'spiral'"):
        small_config(position_embedding_type="rope", rope_parameters={"rope_type": "spiral", "rope_theta": 1e4})
    with pytest.raises(ValueError, match="must be a multiple of num_key_value_heads"):
        small_config(num_key_value_heads=3)
    scaled = small_model(position_embedding_type="rope", rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert scaled.config.rope_parameters["rope_type"] == "linear"
    long_ids = random_ids(4, 40)  # beyond max_position_embeddings (32): RoPE has no table to run out of
    with torch.no_grad():
        assert torch.isfinite(scaled(long_ids).logits).all()
