"""`mot train`: end-to-end training on real text, resume, crash-safe checkpoints, gradient accumulation with the
Token Choice aux loss, optimizer continuation, multi-process runs and bad inputs."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from mixture_of_tokens import MoTConfig, MoTForCausalLM
from mixture_of_tokens.cli import main as mot
from mixture_of_tokens.data import DataArguments, collate_blocks, load_raw_text, pack_blocks
from mixture_of_tokens.training.train import MoTTrainingArguments, parse_args, run_training
from mixture_of_tokens.training.trainer import MoTTrainer

REPO = Path(__file__).resolve().parents[1]
# A small MoT (2 dense + 2 MoT blocks, G = 4) that trains in seconds on a shared 2-core CPU.
SMALL_MODEL = [
    "--preset", "tiny-mot", "--hidden_size", "64", "--intermediate_size", "128", "--num_experts", "4",
    "--expert_size", "128", "--group_size", "4", "--max_position_embeddings", "64",
]
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--dataloader_num_workers", "0"]


def small_run(output_dir, data, *extra) -> list[str]:
    """Arguments of a small run; `data=None` trains on the bundled default text."""
    dataset = [] if data is None else ["--dataset", str(data)]
    return [
        "--output_dir", str(output_dir), *dataset, *SMALL_MODEL, *QUIET, "--block_size", "32",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", *extra,
    ]


@pytest.fixture(scope="module")
def novels_file(tmp_path_factory, novels_text) -> Path:
    """~150 KB of the novels as a .txt.gz (exercises the gzip text path)."""
    path = tmp_path_factory.mktemp("novels") / "novels.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(novels_text[:150_000])
    return path


@pytest.fixture(scope="module")
def novels_tokenizer_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer.save_pretrained(folder)
    return folder


def log_losses(output_dir_or_state: Path) -> dict[int, float]:
    state = json.loads(Path(output_dir_or_state).read_text()) if Path(output_dir_or_state).is_file() else None
    history = state["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


# ----------------------------------------------------------------------------------------------------------------


def test_end_to_end_on_novels_eval_loss_drops_and_folder_is_hub_ready(tmp_path, novels_file, capsys):
    out = tmp_path / "run"
    argv = small_run(out, novels_file, "--train_tokenizer", "512", "--max_steps", "40", "--learning_rate", "3e-3",
                     "--logging_steps", "5", "--eval_steps", "10", "--save_steps", "20", "--max-eval-blocks", "32",
                     "--eval_on_start", "true")
    assert mot(["train", *argv]) == 0
    assert f"model saved to {out.resolve()}" in capsys.readouterr().out

    results = json.loads((out / "train_results.json").read_text())
    evals = [entry["eval_loss"] for entry in
             json.loads((out / "checkpoint-40" / "trainer_state.json").read_text())["log_history"] if "eval_loss" in entry]
    # untrained (step 0) -> step 40: well down, and still falling after step 10
    assert len(evals) == 5 and evals[-1] < evals[0] - 0.5 and evals[-1] < evals[1], evals
    assert abs(evals[0] - math.log(512)) < 0.2  # the untrained model is near-uniform over the vocabulary
    assert results["eval_loss"] == pytest.approx(evals[-1], abs=1e-6)

    # A complete model folder: weights, config with auto_map, generation config, tokenizer, code, args, plots.
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "modeling_mot.py",
                 "configuration_mot.py", "training_args.json", "train_results.json", "loss.png", "routing.png"):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "staging folders left behind"
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mot.MoTForCausalLM"
    assert config["output_routing_stats"] is False  # the telemetry reads the layers, never the config
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, MoTForCausalLM) and model.config.vocab_size == 512

    # The trained tokenizer round-trips real text and is the one saved with the model.
    tokenizer = AutoTokenizer.from_pretrained(out)
    sample = "It was a dark and stormy night; the rain fell in torrents — except at occasional intervals."
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample
    assert len(tokenizer) == 512

    # Routing telemetry reached the logs: MoT blocks 2 and 3, entropy within [0, log G].
    history = json.loads((out / "checkpoint-40" / "trainer_state.json").read_text())["log_history"]
    entropies = [entry["routing/layer_3/mixing_entropy"] for entry in history if "loss" in entry]
    assert entropies and all(0 <= value <= math.log(4) + 1e-6 for value in entropies)
    assert not any("routing/layer_0/mixing_entropy" in entry for entry in history)  # dense block

    # The model card was rendered from the finished folder and says the model depends on the batch.
    card = (out / "README.md").read_text()
    assert "batch" in card.lower() and "mot" in card.lower()


class StopAtStep(TrainerCallback):
    """Simulates a crash (an exception) right after optimizer step `step`, before that step's checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash at step {state.global_step}")


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, novels_file, novels_tokenizer_dir):
    common = ["--tokenizer", str(novels_tokenizer_dir), "--max_steps", "8", "--logging_steps", "1",
              "--save_steps", "3", "--eval_strategy", "no", "--learning_rate", "3e-3", "--max_train_blocks", "96"]
    reference = tmp_path / "reference"
    run_training(*parse_args(small_run(reference, novels_file, *common)))
    expected = log_losses(reference / "checkpoint-8" / "trainer_state.json")

    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_training(*parse_args(small_run(interrupted, novels_file, *common)), callbacks=[StopAtStep(5)])
    assert get_last_checkpoint(str(interrupted)).endswith("checkpoint-3")
    assert not (interrupted / "config.json").exists()  # no final model from a crashed run

    run_training(*parse_args(small_run(interrupted, novels_file, *common, "--resume_from_checkpoint", "last")))
    resumed = log_losses(interrupted / "checkpoint-8" / "trainer_state.json")
    assert sorted(resumed) == sorted(expected) == list(range(1, 9))
    for step in range(4, 9):
        assert abs(resumed[step] - expected[step]) < 1e-5, (step, resumed[step], expected[step])


def tiny_blocks(vocab: int, rows: int, length: int = 16, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, length), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist()})


def tiny_config(**overrides) -> MoTConfig:
    return MoTConfig.from_preset("tiny-mot", vocab_size=64, hidden_size=32, num_attention_heads=2,
                                 intermediate_size=64, num_experts=4, expert_size=32, group_size=4,
                                 max_position_embeddings=32, **overrides)


def trainer_args(output_dir, **overrides) -> MoTTrainingArguments:
    values = dict(output_dir=str(output_dir), report_to="none", disable_tqdm=True, seed=0, use_cpu=True,
                  eval_strategy="no", save_strategy="no", logging_steps=1, bf16=False, dataloader_num_workers=0)
    return MoTTrainingArguments(**{**values, **overrides})


class FailingSave(MoTTrainer):
    """A trainer whose checkpoint save dies half-way (after the weights, before the optimizer) at one step."""

    fail_at_step = 4

    def _save_optimizer_and_scheduler(self, output_dir):
        if self.state.global_step == self.fail_at_step:
            raise OSError("simulated crash while saving")
        super()._save_optimizer_and_scheduler(output_dir)


def test_crash_while_saving_keeps_last_complete_checkpoint(tmp_path):
    torch.manual_seed(0)
    data = tiny_blocks(64, 48)
    args = trainer_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, per_device_train_batch_size=8)
    with pytest.raises(OSError, match="simulated crash"):
        FailingSave(model=MoTForCausalLM(tiny_config()), args=args, train_dataset=data,
                    data_collator=collate_blocks).train()
    # checkpoint-4 was never published; the last complete one is what a resume finds.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert get_last_checkpoint(str(tmp_path)).endswith("checkpoint-2")
    MoTTrainer(model=MoTForCausalLM(tiny_config()), args=args, train_dataset=data,
               data_collator=collate_blocks).train(resume_from_checkpoint=get_last_checkpoint(str(tmp_path)))
    assert (tmp_path / "checkpoint-6" / "optimizer.pt").is_file()
    assert not (tmp_path / ".checkpoint-staging").exists()


def one_sgd_step(model, data, output_dir, batch: int, accumulation: int):
    """Train one step with plain SGD (lr 1, no clipping, no decay): the parameter change is minus the gradient."""
    args = trainer_args(output_dir, max_steps=1, per_device_train_batch_size=batch,
                        gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0,
                        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # Keep the row order: the full batch and the two micro-batches then hold exactly the same groups.
    trainer = MoTTrainer(model=model, args=args, train_dataset=data, data_collator=collate_blocks)
    trainer._get_train_sampler = lambda *unused: torch.utils.data.SequentialSampler(data)
    trainer.train()
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    gradient = {name: before[name] - p.detach() for name, p in model.named_parameters()}
    return loss, gradient


def assert_same_gradients(first, second, atol=1e-6):
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=atol, rtol=1e-4, msg=name)


# The modern (Llama-style) block: RoPE, RMSNorm, SwiGLU dense layers and experts, grouped-query attention, biases.
MODERN_BLOCK = dict(position_embedding_type="rope", norm_type="rmsnorm", gated_mlp=True, hidden_act="silu",
                    num_key_value_heads=1, attention_bias=True, mlp_bias=True)


@pytest.mark.parametrize("block", [{}, MODERN_BLOCK], ids=["paper", "modern"])
def test_mot_gradient_accumulation_matches_full_batch(tmp_path, block):
    data = tiny_blocks(64, 8)
    config = tiny_config(**block)
    torch.manual_seed(0)
    state = MoTForCausalLM(config).state_dict()
    results = []
    for accumulation in (1, 2):
        model = MoTForCausalLM(config)
        model.load_state_dict(state)
        results.append(one_sgd_step(model, data, tmp_path / str(accumulation), 8 // accumulation, accumulation))
    (full_loss, full_grad), (accumulated_loss, accumulated_grad) = results
    assert abs(full_loss - accumulated_loss) < 1e-5
    assert_same_gradients(full_grad, accumulated_grad)


@pytest.mark.parametrize("block", [{}, MODERN_BLOCK], ids=["paper", "modern"])
def test_token_choice_aux_loss_is_not_over_counted_under_accumulation(tmp_path, block):
    """With accumulation 2 the objective is LM loss of the full batch + the *mean* of the micro-batches' aux
    losses (each micro-batch weighted by its share of label tokens), not their sum.

    Capacity is large enough that no token is dropped, so Token Choice's LM loss is per-token and equals the full
    batch's exactly; the balancing loss itself is a batch statistic (fractions of the micro-batch), so the
    comparison is with the mean of the two micro-batch values, computed here by hand."""
    config = tiny_config(mlp_types=["dense", "token_choice", "dense", "token_choice"], capacity_factor=4.0,
                         router_aux_loss_coef=1.0, **block)
    data = tiny_blocks(64, 8)
    torch.manual_seed(0)
    model = MoTForCausalLM(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    model.train()
    batch = collate_blocks(list(data))
    full = model(**batch)
    lm_loss = full.loss - full.aux_loss  # no num_items_in_batch here: aux is added with weight 1
    halves = [model(**collate_blocks(list(data.select(range(i, i + 4))))) for i in (0, 4)]
    aux_mean = (halves[0].aux_loss + halves[1].aux_loss) / 2
    expected = lm_loss + aux_mean
    model.zero_grad()
    expected.backward()
    expected_grad = {name: p.grad.detach().clone() for name, p in model.named_parameters()}

    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    loss, grad = one_sgd_step(model, data, tmp_path, batch=4, accumulation=2)
    assert abs(loss - expected.item()) < 1e-5
    doubled = lm_loss + halves[0].aux_loss + halves[1].aux_loss
    assert abs(loss - doubled.item()) > 0.5  # would be the over-counted objective
    assert_same_gradients(expected_grad, grad)


def test_init_optimizer_from_continues_adam_state_and_schedule(tmp_path):
    data = tiny_blocks(64, 32)
    torch.manual_seed(0)
    model = MoTForCausalLM(tiny_config())
    source = trainer_args(tmp_path / "source", max_steps=4, save_strategy="steps", save_steps=4,
                          per_device_train_batch_size=8, learning_rate=1e-2, warmup_steps=0)
    MoTTrainer(model=model, args=source, train_dataset=data, data_collator=collate_blocks).train()

    continued = trainer_args(tmp_path / "continued", max_steps=2, per_device_train_batch_size=8,
                             learning_rate=1e-2, warmup_steps=0)
    trainer = MoTTrainer(model=model, args=continued, train_dataset=data, data_collator=collate_blocks,
                         init_optimizer_from=tmp_path / "source")  # a run folder: its last checkpoint
    trainer.train()
    adam_steps = {int(state["step"]) for state in trainer.optimizer.state_dict()["state"].values()}
    assert adam_steps == {6}  # 4 steps of the source + 2 here
    # The schedule (cosine to 0.1x over 4 + 2 steps) resumes at step 4: LR of this run's first step.
    first_lr = next(entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry)
    progress = 4 / 6
    expected = 1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert abs(first_lr - expected) < 1e-9


# ----------------------------------------------------------------------------------------------------------------
# data formats


def test_a_hub_dataset_id_is_no_local_path_and_a_card_names_local_data_by_its_file(tmp_path):
    from mixture_of_tokens.data import looks_local, public_source

    assert not looks_local("allenai/c4") and public_source("allenai/c4") == "allenai/c4"
    (tmp_path / "org").mkdir()
    assert looks_local(str(tmp_path / "org")) and looks_local("corpus/part/train.txt")
    assert public_source(str(tmp_path / "novels.txt.gz")) == "local data `novels.txt.gz`"


def test_data_formats_folders_and_streaming(tmp_path, tiny_tokenizer, novels_text):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paragraphs = [p for p in novels_text[:300_000].split("\n") if p]
    assert len(paragraphs) > 400
    (tmp_path / "docs").mkdir()
    with open(tmp_path / "docs" / "a.jsonl", "w", encoding="utf-8") as handle:
        for text in paragraphs[:200]:
            handle.write(json.dumps({"body": text}) + "\n")
    pq.write_table(pa.table({"body": paragraphs[200:400]}), tmp_path / "b.parquet")
    (tmp_path / "lines.txt").write_text("\n".join(paragraphs[:200]) + "\n\n" + "\n".join(paragraphs[200:400]))

    sizes = {}
    for spec, column in ((tmp_path / "docs", "body"), (tmp_path / "b.parquet", "body"),
                         (tmp_path / "lines.txt", "text"), (None, "text")):
        args = DataArguments(dataset=None if spec is None else str(spec), text_column=column, block_size=32)
        raw = load_raw_text(args)
        assert len(raw.validation) >= 1 and len(raw.train) > len(raw.validation)
        blocks = pack_blocks(raw.train, tiny_tokenizer, args, 32, raw.rows_are_lines, "test")
        assert len(blocks) > 10 and all(len(row) == 32 for row in blocks["input_ids"][:20])
        sizes[str(spec)] = len(blocks)
    assert sizes["None"] > 500  # the bundled pydoc text

    streamed = DataArguments(dataset=str(tmp_path / "lines.txt"), streaming=True, streaming_validation_rows=10)
    raw = load_raw_text(streamed)
    rows = list(pack_blocks(raw.train, tiny_tokenizer, streamed, 32, raw.rows_are_lines, "test").take(5))
    assert len(rows) == 5 and all(len(row["input_ids"]) == 32 for row in rows)


# ----------------------------------------------------------------------------------------------------------------
# bad inputs: one clear error, exit status 2, no output folder


@pytest.mark.parametrize("case", ["missing_file", "empty_dataset", "missing_column", "micro_batch",
                                  "micro_batch_below_group", "block_size", "unknown_preset"])
def test_bad_inputs_give_one_clear_error_and_no_output(tmp_path, capsys, case):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    records = tmp_path / "records.jsonl"
    records.write_text('{"content": "some text"}\n' * 20)
    out = tmp_path / "out"
    argv = {
        "missing_file": small_run(out, tmp_path / "nope.txt"),
        "empty_dataset": small_run(out, empty),
        "missing_column": small_run(out, records),
        "micro_batch": small_run(out, records, "--per_device_train_batch_size", "6"),
        "micro_batch_below_group": small_run(out, records, "--per_device_train_batch_size", "3"),
        "block_size": small_run(out, records, "--block_size", "128"),
        "unknown_preset": [*small_run(out, records)[:4], "--preset", "mot-gigantic", *QUIET],
    }[case]
    expected = {
        "missing_file": "nope.txt' does not exist",
        "empty_dataset": "is empty",
        "missing_column": "text column 'text' not found",
        "micro_batch": "--per_device_train_batch_size 6 is not a multiple of group_size 4",
        # the nearest valid size below and above are the same: named once
        "micro_batch_below_group": "micro-batch; use 4 (or another multiple of 4)",
        "block_size": "--block_size 128 exceeds the model's max_position_embeddings 64",
        "unknown_preset": "unknown preset 'mot-gigantic'",
    }[case]
    assert mot(["train", *argv]) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("mot train: error:") and expected in errors[0], stderr
    assert "Traceback" not in stderr
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# multi-process (gloo on CPU)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_process_cpu_run(tmp_path, launcher, free_port):
    out = tmp_path / "ddp"
    train = ["-m", "mixture_of_tokens.training.train", *small_run(out, None, "--max_steps", "3", "--use_cpu", "true",
                                                         "--train_tokenizer", "300", "--eval_steps", "3",
                                                         "--save_steps", "3", "--max_eval_blocks", "16")]
    bin_dir = Path(sys.executable).parent
    if launcher == "torchrun":
        command = [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *train]
    else:
        # accelerate's --cpu launches one process; its torch.distributed launcher (--multi_gpu) runs CPU workers
        # too when the script itself is told --use_cpu.
        command = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                   "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *train]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "train_results.json").read_text())
    assert results["world_size"] == 2 and math.isfinite(results["eval_loss"])
    assert sorted(p.name for p in out.glob("rng_state*")) == []  # RNG states live in the checkpoint
    assert {p.name for p in (out / "checkpoint-3").glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert (out / "model.safetensors").is_file()


def test_speed_switches_parse_and_reach_the_config(tmp_path):
    """`--chunked_lm_loss false` reaches the model config; `--retain_freed_cpu_memory` is a training argument."""
    model_args, _, training_args = parse_args(small_run(tmp_path / "out", None, "--chunked_lm_loss", "false",
                                                        "--retain_freed_cpu_memory", "false"))
    assert model_args.config_overrides()["chunked_lm_loss"] is False
    assert training_args.retain_freed_cpu_memory is False
    model_args, _, training_args = parse_args(small_run(tmp_path / "out", None))
    assert "chunked_lm_loss" not in model_args.config_overrides()
    assert training_args.retain_freed_cpu_memory is True


def test_every_config_flag_is_a_config_field_typed_like_it():
    """`mot train`'s configuration flags come from MoTConfig: each is a field, parsed to the field's type."""
    from mixture_of_tokens.training.train import CONFIG_FLAGS

    fields = MoTConfig.__dataclass_fields__
    assert set(CONFIG_FLAGS) <= set(fields)
    model_args, _, _ = parse_args(["--output_dir", "unused", "--num_experts", "6", "--capacity_factor", "1.5",
                                   "--mlp_bias", "true", "--mot_routing", "uniform"])
    assert model_args.config_overrides() == {"num_experts": 6, "capacity_factor": 1.5, "mlp_bias": True,
                                             "mot_routing": "uniform"}


def test_keyword_settings_give_the_command_lines_arguments(tmp_path):
    """`training_arguments(**settings)` (the Python API the reproduction uses) equals parsing the same flags."""
    from mixture_of_tokens.training.train import training_arguments
    from mixture_of_tokens.utils import UserError

    settings = {"output_dir": str(tmp_path / "out"), "preset": "tiny-mot", "mlp_types": "dense,mot", "max_steps": 7,
                "learning_rate": 1e-3, "bf16_weights": True, "report_to": "none", "block_size": 32}
    argv = [item for name, value in settings.items() for item in (f"--{name}", str(value))]
    from_keywords, from_argv = training_arguments(**settings), parse_args(argv)
    for keywords, parsed in zip(from_keywords, from_argv, strict=True):
        assert repr(keywords) == repr(parsed)  # every field (TrainingArguments also holds objects without ==)
    with pytest.raises(UserError, match="unknown training setting 'max_step'"):
        training_arguments(output_dir=str(tmp_path), max_step=3)
