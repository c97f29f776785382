"""TRL's trainers on our models, with the real library and its defaults: SFTTrainer on every feed-forward type of
both blocks, DPOTrainer on MoT and Token Choice, padding-free packing refused where groups need whole rows, and the
Token Choice load-balancing loss added exactly once."""

from __future__ import annotations

import pytest
import torch
from conftest import require

trl = require("trl")

from datasets import Dataset  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

from mixture_of_tokens import MoTConfig, MoTForCausalLM  # noqa: E402

BLOCKS = {
    "paper": {},
    "modern": dict(position_embedding_type="rope", norm_type="rmsnorm", gated_mlp=True, hidden_act="silu",
                   num_key_value_heads=2),
}
SENTENCES = [
    "It was the best of times, it was the worst of times.",
    "It was the age of wisdom, it was the age of foolishness.",
    "It was the epoch of belief, it was the epoch of incredulity.",
    "It was the season of Light, it was the season of Darkness.",
    "It was the spring of hope, it was the winter of despair.",
    "We had everything before us, we had nothing before us.",
    "There were 2 kings and 1,775 years.",
    "We were all going direct to Heaven, she had said.",
]


def make_model(mlp_type: str, block: str, tokenizer, **overrides) -> MoTForCausalLM:
    config = MoTConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, group_size=4, num_experts=4, expert_size=24, mlp_types=["dense", mlp_type],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **{**BLOCKS[block], **overrides},
    )
    torch.manual_seed(0)
    return MoTForCausalLM(config)


def sft_config(tmp_path, **settings):
    settings = {"max_length": 64, **settings}
    return trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, learning_rate=1e-3,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                         **settings)


def text_dataset() -> Dataset:
    return Dataset.from_dict({"text": SENTENCES * 2})


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("mlp_type", ["dense", "mot", "expert_choice", "token_choice"])
def test_sft_trainer_with_its_defaults_trains(mlp_type, block, small_tokenizer, tmp_path):
    """SFTTrainer's defaults: TRL adds Mixtral's load-balancing loss when the config has `output_router_logits` and
    a non-zero `router_aux_loss_coef` — only Token Choice models have one; the others train without it."""
    model = make_model(mlp_type, block, small_tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = trl.SFTTrainer(model=model, args=sft_config(tmp_path), train_dataset=text_dataset(),
                             processing_class=small_tokenizer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert ("aux_loss" in logs[-1]) == (mlp_type == "token_choice"), logs[-1]
    routed = [name for name in before if ".mlp.experts." in name or ".mlp.gate." in name]
    assert all(not torch.equal(before[name], model.get_parameter(name)) for name in routed), "routed layer not trained"


@pytest.mark.parametrize("mlp_type", ["mot", "token_choice"])
def test_dpo_trainer_runs(mlp_type, small_tokenizer, tmp_path):
    """DPOTrainer loads its reference model from the policy's folder, as from any saved model."""
    make_model(mlp_type, "paper", small_tokenizer).save_pretrained(tmp_path / "policy")
    model = MoTForCausalLM.from_pretrained(tmp_path / "policy")
    pairs = Dataset.from_dict({
        "prompt": [sentence[:20] for sentence in SENTENCES],
        "chosen": [sentence[20:] for sentence in SENTENCES],
        "rejected": [sentence[20:][::-1] for sentence in SENTENCES],
    })
    args = trl.DPOConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                         max_length=64)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=small_tokenizer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert ("aux_loss" in logs[-1]) == (mlp_type == "token_choice")


@pytest.mark.parametrize("mlp_type", ["mot", "expert_choice"])
def test_padding_free_packing_of_a_grouped_model_is_one_clear_error(mlp_type, small_tokenizer, tmp_path):
    model = make_model(mlp_type, "paper", small_tokenizer)
    trainer = trl.SFTTrainer(model=model, args=sft_config(tmp_path, packing=True), train_dataset=text_dataset(),
                             processing_class=small_tokenizer)
    with pytest.raises(ValueError, match=r"packing=False.*packing_strategy=\"wrapped\""):
        trainer.train()


def test_packing_that_keeps_whole_rows_trains_mot(small_tokenizer, tmp_path):
    model = make_model("mot", "paper", small_tokenizer)
    args = sft_config(tmp_path, packing=True, packing_strategy="wrapped", max_length=16)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=text_dataset(), processing_class=small_tokenizer)
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


def test_padding_free_packing_trains_token_choice_and_keeps_sequences_apart(small_tokenizer, tmp_path):
    """Token Choice routes each token on its own, so padding-free packing is fine: a packed row gives each sequence
    the logits it has alone (attention stays within a sequence)."""
    model = make_model("token_choice", "modern", small_tokenizer).eval()
    first, second = (torch.tensor([small_tokenizer(text)["input_ids"]]) for text in SENTENCES[:2])
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(first.shape[1]), torch.arange(second.shape[1])]).unsqueeze(0)
    with torch.no_grad():
        # use_cache=False, as in training: transformers reads packed rows from position_ids only without a cache
        together = model(packed, position_ids=positions, use_cache=False).logits
        torch.testing.assert_close(together[:, : first.shape[1]], model(first).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(together[:, first.shape[1]:], model(second).logits, rtol=1e-4, atol=1e-4)

    trainer = trl.SFTTrainer(model=model.train(), args=sft_config(tmp_path, packing=True),
                             train_dataset=text_dataset(), processing_class=small_tokenizer)
    trainer.train()
    assert "aux_loss" in trainer.state.log_history[0]


def test_token_choice_aux_loss_is_added_once_whoever_computes_it(small_tokenizer):
    """Our head adds our router losses while training; TRL's fused head (what its trainers call) adds Mixtral's
    load-balancing loss from `router_logits` instead, never both. For top-k routing Mixtral's formula is k times
    ours (it sums the k choices' dispatch fractions; ours averages them), and it has no z-loss."""
    from trl.trainer.utils import add_fused_lm_head

    model = make_model("token_choice", "paper", small_tokenizer, num_experts_per_tok=2, router_z_loss_coef=1e-3,
                       chunked_lm_loss=False).train()
    ids = torch.tensor([small_tokenizer(text)["input_ids"][:10] for text in SENTENCES])
    coefficient = model.config.router_aux_loss_coef
    assert coefficient == 0.01

    ours = model(ids, labels=ids, output_router_logits=True, output_routing_stats=True)
    lm_loss = model.loss_function(ours.logits, ids, model.config.vocab_size)
    stats = ours.routing_stats[-1]
    torch.testing.assert_close(ours.loss, lm_loss + coefficient * stats["balance_loss"] + 1e-3 * stats["z_loss"])
    (router_logits,) = ours.router_logits
    assert router_logits.shape == (ids.numel(), model.config.num_experts)
    mixtral = load_balancing_loss_func(ours.router_logits, model.config.num_experts, 2)
    torch.testing.assert_close(mixtral, 2 * stats["balance_loss"])

    add_fused_lm_head(model)
    fused = model(ids, labels=ids, fused_lm_head=True, output_router_logits=True)
    torch.testing.assert_close(fused.aux_loss, mixtral)
    nll = -fused.log_probs.sum() / fused.label_mask.sum()
    torch.testing.assert_close(nll, lm_loss)
    torch.testing.assert_close(fused.loss, nll + coefficient * mixtral)


@pytest.mark.parametrize("mlp_type", ["dense", "mot", "expert_choice"])
def test_router_logits_follow_transformers_convention(mlp_type, small_tokenizer):
    """No token-routed layer: `router_logits` is None (not an empty tuple, which Mixtral's loss cannot read) and the
    load-balancing coefficient is 0 (so is `controller_logits` without controllers); MoT's and Expert Choice's controller logits come under their own name."""
    model = make_model(mlp_type, "paper", small_tokenizer).eval()
    assert model.config.router_aux_loss_coef == 0.0
    ids = torch.tensor([small_tokenizer(text)["input_ids"][:6] for text in SENTENCES])
    with torch.no_grad():
        out = model(ids, output_router_logits=True, output_controller_logits=True)
        backbone = model.model(ids, output_router_logits=True)
    assert out.router_logits is None and backbone.router_logits is None
    assert load_balancing_loss_func(out.router_logits, 4, 1) == 0
    if mlp_type == "dense":
        assert out.controller_logits is None
    else:
        (controller,) = out.controller_logits
        assert controller.shape[-1] == model.config.num_experts
        assert controller.numel() == ids.numel() * model.config.num_experts
