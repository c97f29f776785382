"""`mot train` (also `python -m mixture_of_tokens.training.train`): pretrain a MoT, dense, Token Choice or Expert Choice
model with `HfArgumentParser` + `TrainingArguments` + `Trainer`.

Every `TrainingArguments` flag works (`--max_steps` or `--max-steps`); the defaults are the paper's recipe
(docs/design.md, "The model"): AdamW (0.9, 0.999), weight decay 0.1, gradient clipping 0.5, cosine schedule with warm-up down to
0.1x the peak learning rate, bf16 autocast where the GPU supports it.

Other modules reuse `run_training(model_args, data_args, training_args, model=..., init_optimizer_from=...)`;
`mot transition` passes a converted model and the SRC checkpoint whose optimizer state and learning-rate
schedule position it continues (see `MoTTrainer`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

# Only what the argument parser needs is imported here; Trainer (seconds to import) is imported when training
# starts, so `mot train --help` answers quickly.
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import IntervalStrategy, get_last_checkpoint
from transformers.utils import logging

from ..data import DataArguments, collate_blocks, limit_blocks, load_raw_text, pack_blocks, require_blocks
from ..folders.cards import refresh_card
from ..folders.model_folder import TRAIN_RESULTS_FILE, TRAINER_STATE_FILE, TRAINING_ARGS_FILE
from ..modeling.configuration_mot import EMBEDDING_INITS, NORM_TYPES, POSITION_EMBEDDING_TYPES, PRESETS, MoTConfig
from ..utils import UserError, apply_umask
from .cpu_memory import retain_freed_cpu_memory

if TYPE_CHECKING:
    from .trainer import MoTTrainer

logger = logging.get_logger(__name__)

DEFAULT_PRESET = "tiny-mot"
PAPER_WARMUP_FRACTION = 2_500 / 150_000  # 2.5K warm-up steps of 150K


def _values_help(name: str, values: tuple[str, ...]) -> str:
    """The allowed values of config field `name` and its default, as MoTConfig states them."""
    return f"{' or '.join(values)} (config default: {MoTConfig.__dataclass_fields__[name].default})"


# Fields of MoTConfig that `mot train` takes as flags (`--group_size 16`), with their help where the name alone says
# too little. Each becomes a ModelArguments field of the same name, typed from MoTConfig: a new config field is
# a flag by one line here.
CONFIG_FLAGS = {
    "vocab_size": "Override (default: the tokenizer's size).",
    "hidden_size": None,
    "num_hidden_layers": None,
    "num_attention_heads": None,
    "intermediate_size": None,
    "max_position_embeddings": None,
    "mlp_types": "Comma-separated, e.g. dense,dense,mot,mot.",
    "group_size": None,
    "num_experts": None,
    "expert_size": None,
    "mot_temperature": None,
    "learnable_temperature": None,
    "mot_routing": None,
    "num_experts_per_tok": None,
    "capacity_factor": None,
    "router_aux_loss_coef": None,
    "router_z_loss_coef": None,
    "hidden_act": None,
    "chunked_lm_loss": ("Compute the training loss without the full logits (config default: true); false if a "
                        "callback needs outputs.logits in training."),
    "mot_recompute": ("Recompute MoT's merged and processed tokens in backward instead of saving them: less "
                      "activation memory for one more expert forward (docs/performance.md)."),
    "embedding_init": _values_help("embedding_init", EMBEDDING_INITS) + "; unit_fan_in is the authors' initialisation.",
    "final_norm": "LayerNorm before the output head (config default: true; the authors' code has none).",
    # The modern (Llama-style) block options; the tiny-modern-* and modern-* presets set them all.
    "position_embedding_type": _values_help("position_embedding_type", POSITION_EMBEDDING_TYPES),
    "norm_type": _values_help("norm_type", NORM_TYPES),
    "gated_mlp": "SwiGLU-style gated dense layers and experts",
    "num_key_value_heads": "grouped-query attention",
    "attention_bias": None,
    "mlp_bias": None,
    "tie_word_embeddings": None,
}


def _flag_type(name: str) -> type:
    """The command-line type of config field `name`: its MoTConfig annotation without None (mlp_types: a string)."""
    if name == "mlp_types":
        return str
    annotation = str(MoTConfig.__dataclass_fields__[name].type)  # e.g. "int", "float", "int | None"
    return {"int": int, "float": float, "bool": bool, "str": str}[annotation.split("|")[0].strip()]


FINAL_STAGING = ".final.partial"  # the finished folder is assembled here, then moved into place


def _bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class ModelArguments:
    """Which model to train, and its tokenizer."""

    preset: str | None = field(default=None, metadata={"help": (
        f"Model preset: {', '.join(PRESETS)}. Default {DEFAULT_PRESET} unless --config or --init_from is given."
    )})
    config: str | None = field(default=None, metadata={"help": "config.json file or model folder to take the "
                                                               "architecture from (weights start fresh)."})
    init_from: str | None = field(default=None, metadata={"help": "Saved model folder to start from (weights too)."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer folder or Hub id."})
    train_tokenizer: int | None = field(default=None, metadata={"help": (
        "Train a byte-level BPE with this vocabulary size on the training text (saved with the model). Without "
        "--tokenizer/--train_tokenizer (and no tokenizer in --init_from) one is trained with the preset's vocab."
    )})
    bf16_weights: bool = field(default=False, metadata={"help": (
        "Keep the weights (and optimizer state) in bf16, the paper's bf16-only setting; default: fp32 weights "
        "with bf16 autocast (--bf16)."
    )})
    init_optimizer_from: str | None = field(default=None, metadata={"help": (
        "Trainer checkpoint (or run folder: its last checkpoint) whose AdamW state and learning-rate schedule "
        "position this run continues, for models converted from it (transition tuning)."
    )})
    def config_overrides(self) -> dict:
        overrides = {name: getattr(self, name) for name in CONFIG_FLAGS if getattr(self, name) is not None}
        if "mlp_types" in overrides:
            overrides["mlp_types"] = [t.strip() for t in overrides["mlp_types"].split(",") if t.strip()]
        return overrides


# ModelArguments plus one optional field per config flag (None: the preset's or config's value).
ModelArguments = make_dataclass(
    "ModelArguments",
    [(name, _flag_type(name) | None, field(default=None, metadata={"help": help} if help else {}))
     for name, help in CONFIG_FLAGS.items()],
    bases=(ModelArguments,),
)
ModelArguments.__doc__ = "Which model to train, its tokenizer, and overrides of its configuration."


@dataclass
class MoTTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the paper's recipe as defaults and a few choices made for pretraining."""

    output_dir: str | None = field(default=None, metadata={"help": (
        "Folder of the trained model (required). Trainer's checkpoint-N folders are written inside it."
    )})
    overwrite_output_dir: bool = field(default=False, metadata={"help": (
        "Replace a non-empty --output_dir (deleted once every input has been checked)."
    )})
    learning_rate: float = field(default=7e-4, metadata={"help": "Peak learning rate (paper: MoT-Medium 7e-4)."})
    weight_decay: float = 0.1
    max_grad_norm: float = 0.5
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata={"help": "Learning-rate schedule."})
    lr_scheduler_kwargs: dict | str | None = field(default_factory=lambda: {"min_lr_rate": 0.1}, metadata={
        "help": "Schedule options (JSON); default cosine down to 0.1x the peak."})
    warmup_steps: float = field(default=PAPER_WARMUP_FRACTION, metadata={
        "help": "Warm-up steps; < 1 means a fraction of the run (default 2.5K/150K, the paper's)."})
    bf16: bool = field(default=_bf16_supported(), metadata={
        "help": "bf16 autocast; default on where the GPU supports bf16, off on CPU (slower there)."})
    per_device_train_batch_size: int = field(default=32, metadata={
        "help": "Sequences per device per micro-batch; must be a multiple of group_size for MoT/Expert Choice."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Same rule as the training batch."})
    dataloader_pin_memory: bool = field(default=torch.cuda.is_available(), metadata={"help": "Pin memory (GPU only)."})
    dataloader_drop_last: bool = field(default=True, metadata={"help": "Never form a partial (smaller) group."})
    logging_steps: float = 10
    eval_strategy: IntervalStrategy | str = "steps"
    eval_steps: float | None = 500
    save_steps: float = 500
    save_total_limit: int | None = 2
    prediction_loss_only: bool = True
    retain_freed_cpu_memory: bool = field(default=True, metadata={"help": (
        "On CPU, keep freed memory in the process instead of page-faulting large tensors afresh every step "
        "(glibc malloc only; ~20%% faster MoT steps; the process keeps its peak memory). See cpu_memory.py."
    )})


@dataclass
class TrainingOutcome:
    """What `run_training` returns."""

    output_dir: Path
    metrics: dict
    trainer: MoTTrainer

    @property
    def eval_loss(self) -> float | None:
        return self.metrics.get("eval_loss")


# ----------------------------------------------------------------------------------------------------------------
# Building the pieces (everything here only reads; nothing is written before all inputs are checked)
# ----------------------------------------------------------------------------------------------------------------


def build_config(model_args: ModelArguments) -> MoTConfig:
    given = [name for name in ("preset", "config", "init_from") if getattr(model_args, name)]
    if len(given) > 1:
        raise UserError(f"give only one of --preset, --config, --init_from (got {', '.join('--' + g for g in given)})")
    overrides = model_args.config_overrides()
    try:
        if model_args.init_from or model_args.config:
            location = Path(model_args.init_from or model_args.config)
            if not location.exists():
                flag = "--init_from" if model_args.init_from else "--config"
                raise UserError(f"{flag} {str(location)!r} does not exist")
            config = (MoTConfig.from_json_file(str(location)) if location.is_file()
                      else MoTConfig.from_pretrained(str(location)))
            for name, value in overrides.items():
                setattr(config, name, value)
            config.validate_mot()
        else:
            config = MoTConfig.from_preset(model_args.preset or DEFAULT_PRESET, **overrides)
    except (OSError, ValueError) as error:
        if isinstance(error, UserError):
            raise
        raise UserError(str(error)) from error
    return config


def check_group_contract(config: MoTConfig, training_args: TrainingArguments) -> None:
    """MoT and Expert Choice group `group_size` rows of each per-device micro-batch: the batch must divide."""
    grouped = config.grouped_layer_types
    if not grouped:
        return
    group = config.group_size
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        batch = getattr(training_args, flag)
        if batch % group:
            nearest = sorted({max(group, batch // group * group), (batch // group + 1) * group})
            raise UserError(
                f"--{flag} {batch} is not a multiple of group_size {group}: {'/'.join(grouped)} layers mix the "
                f"tokens of {group} sequences of each per-device micro-batch; use "
                f"{' or '.join(map(str, nearest))} (or another multiple of {group})"
            )


def resolve_block_size(config: MoTConfig, data_args: DataArguments) -> int:
    block_size = data_args.block_size or config.max_position_embeddings
    if block_size > config.max_position_embeddings:
        raise UserError(f"--block_size {block_size} exceeds the model's max_position_embeddings "
                        f"{config.max_position_embeddings}; use at most {config.max_position_embeddings} (or "
                        f"--max_position_embeddings {block_size} for a freshly initialised model)")
    if block_size < 2:
        raise UserError(f"--block_size must be at least 2, got {block_size}")
    return block_size


def load_tokenizer(model_args: ModelArguments, config: MoTConfig, raw, data_args: DataArguments):
    """The tokenizer named by --tokenizer, the one saved with --init_from, or one trained on the training text."""
    from transformers import AutoTokenizer

    from ..data import iter_texts
    from .tokenization import train_bpe_tokenizer

    if model_args.tokenizer and model_args.train_tokenizer:
        raise UserError("give either --tokenizer or --train_tokenizer, not both")
    name = model_args.tokenizer
    if name is None and model_args.train_tokenizer is None and model_args.init_from:
        if any(Path(model_args.init_from, f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            name = model_args.init_from
    if name is not None:
        try:
            return AutoTokenizer.from_pretrained(name)
        except Exception as error:  # missing folder, offline Hub, broken files: one message for the user
            raise UserError(f"could not load tokenizer {name!r}: {error}") from error
    vocab_size = model_args.train_tokenizer or config.vocab_size
    logger.warning(f"training a {vocab_size}-token byte-level BPE tokenizer on the training text")
    try:
        return train_bpe_tokenizer(iter_texts(raw.train, data_args.text_column, data_args.tokenizer_training_chars),
                                   vocab_size=vocab_size, show_progress=True)
    except ValueError as error:
        raise UserError(f"--train_tokenizer: {error}") from error


def build_model(model_args: ModelArguments, config: MoTConfig, tokenizer):
    from transformers import set_seed

    from ..modeling.modeling_mot import MoTForCausalLM

    if model_args.init_from:
        if len(tokenizer) > config.vocab_size:
            raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model in {model_args.init_from} only "
                            f"{config.vocab_size}; use the tokenizer it was trained with")
        try:
            model = MoTForCausalLM.from_pretrained(model_args.init_from, config=config)
        except (OSError, ValueError, RuntimeError) as error:
            raise UserError(f"could not load the model in {model_args.init_from!r}: {error}") from error
    else:
        if model_args.vocab_size is None:
            config.vocab_size = len(tokenizer)
        elif config.vocab_size < len(tokenizer):
            raise UserError(f"--vocab_size {config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        set_seed(0)  # fixed init, identical on every process; the training seed is --seed
        model = MoTForCausalLM(config)
    if model_args.bf16_weights:
        model = model.to(torch.bfloat16)
    return model


def argument_parser() -> HfArgumentParser:
    """`mot train`'s command line: one flag per field of its three argument dataclasses."""
    return HfArgumentParser((ModelArguments, DataArguments, MoTTrainingArguments), prog="mot train",
                            description="Pretrain a Mixture of Tokens model with Hugging Face Trainer.")


def parse_args(argv: list[str] | None) -> tuple[ModelArguments, DataArguments, MoTTrainingArguments]:
    """`mot train`'s command line as its three argument dataclasses."""
    try:
        model_args, data_args, training_args = argument_parser().parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # TrainingArguments.__post_init__ rejects inconsistent flags
        raise UserError(str(error)) from error
    return model_args, data_args, training_args


def setting_names() -> set[str]:
    """The names of `mot train`'s settings (its flags without the dashes)."""
    return {item.name for kind in (ModelArguments, DataArguments, MoTTrainingArguments) for item in fields(kind)}


def given_settings(argv: list[str]) -> dict:
    """The `mot train` flags given in `argv`, as their parsed values (flags left out are not in the dict)."""
    unset = object()
    # argparse fills in a default only where the namespace has no value yet: what is still `unset` was not given.
    namespace = argument_parser().parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(setting_names(), unset)))
    return {name: value for name, value in vars(namespace).items() if value is not unset}


def training_arguments(**settings) -> tuple[ModelArguments, DataArguments, MoTTrainingArguments]:
    """The same three dataclasses from keyword settings named like `mot train`'s flags, as Python values:
    `training_arguments(output_dir="out", preset="tiny-mot", max_steps=100, mlp_types="dense,mot")`."""
    unknown = sorted(set(settings) - setting_names())
    if unknown:
        raise UserError(f"unknown training setting {unknown[0]!r}; the settings are `mot train`'s flags (mot train "
                        "--help)")
    try:
        model_args, data_args, training_args = argument_parser().parse_dict(settings)
    except ValueError as error:  # TrainingArguments.__post_init__ rejects inconsistent settings
        raise UserError(str(error)) from error
    return model_args, data_args, training_args


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint PATH` or `last`/`true` (the last checkpoint in --output_dir)."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "no", ""):
        return None
    if str(value).lower() in ("last", "true", "yes", "1"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise UserError(f"--resume_from_checkpoint {value}: no checkpoint-N folder in {training_args.output_dir}")
        return last
    if not (Path(value) / TRAINER_STATE_FILE).is_file():
        raise UserError(f"--resume_from_checkpoint {value!r} is not a Trainer checkpoint (no trainer_state.json)")
    return str(value)


def check_output_dir(training_args: MoTTrainingArguments, resume: str | None) -> None:
    if not training_args.output_dir:
        raise UserError("--output_dir is required: the folder that will hold the trained model")
    out = Path(training_args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {str(out)!r} exists and is a file")
    if out.is_dir() and any(out.iterdir()) and resume is None and not training_args.overwrite_output_dir:
        raise UserError(f"--output_dir {str(out)!r} already exists and is not empty; pass --overwrite_output_dir to "
                        "replace it or --resume_from_checkpoint last to continue its run")


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: MoTTrainingArguments,
    model=None,
    tokenizer=None,
    init_optimizer_from: str | os.PathLike | None = None,
    callbacks: list | None = None,
    write_extra_files=None,
) -> TrainingOutcome:
    """Train and write a complete model folder to `training_args.output_dir`. Reusable by other commands.

    `model`/`tokenizer`: use these instead of building them from `model_args` (e.g. a converted model).
    `init_optimizer_from`: a Trainer checkpoint (or run folder) whose optimizer state and LR-schedule position
    this run continues (overrides `model_args.init_optimizer_from`); see `MoTTrainer`.
    `callbacks`: extra `TrainerCallback`s.
    `write_extra_files(folder)`: writes more files into the output folder before it is complete (e.g. lineage).
    Raises `UserError` for bad input, before anything is written.
    """
    from .trainer import MoTTrainer, find_optimizer_checkpoint

    resume = resolve_resume(training_args)
    check_output_dir(training_args, resume)
    if training_args.retain_freed_cpu_memory and training_args.device.type == "cpu":
        retain_freed_cpu_memory()
    config = model.config if model is not None else build_config(model_args)
    check_group_contract(config, training_args)
    block_size = resolve_block_size(config, data_args)
    if data_args.streaming and training_args.max_steps <= 0:
        raise UserError("--streaming needs --max_steps (a stream has no known length)")
    optimizer_source = init_optimizer_from or model_args.init_optimizer_from
    if optimizer_source is not None and find_optimizer_checkpoint(optimizer_source) is None:
        raise UserError(f"--init_optimizer_from {str(optimizer_source)!r}: no Trainer checkpoint with optimizer.pt "
                        "there")

    raw = load_raw_text(data_args)
    if tokenizer is None and resume is not None and (Path(resume) / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resume)  # the run's own tokenizer: never retrained on resume
    if tokenizer is None:
        tokenizer = load_tokenizer(model_args, config, raw, data_args)
    if model is None:
        model = build_model(model_args, config, tokenizer)
    with training_args.main_process_first(desc="tokenising and packing"):
        train_blocks = limit_blocks(pack_blocks(raw.train, tokenizer, data_args, block_size, raw.rows_are_lines,
                                                "training text"), data_args.max_train_blocks)
        eval_blocks = None if raw.validation is None else limit_blocks(
            pack_blocks(raw.validation, tokenizer, data_args, block_size, raw.rows_are_lines, "validation text"),
            data_args.max_eval_blocks)
    num_train_blocks = require_blocks(train_blocks, raw.source, block_size, "training")
    if eval_blocks is not None:
        num_eval_blocks = require_blocks(eval_blocks, raw.source, block_size, "validation")
        eval_batch = training_args.per_device_eval_batch_size * training_args.world_size
        if training_args.dataloader_drop_last and 0 <= num_eval_blocks < eval_batch:
            raise UserError(f"the validation text gives {num_eval_blocks} blocks of {block_size} tokens, fewer than "
                            f"one evaluation batch ({eval_batch}), so nothing would be evaluated; raise "
                            "--validation_split_percentage, give a longer --validation_file or lower "
                            "--per_device_eval_batch_size")
    else:
        training_args.eval_strategy = IntervalStrategy.NO

    if training_args.ddp_find_unused_parameters is None:
        # Every parameter takes part in every step, except a uniform-routing MoT's frozen controller; telling DDP
        # saves it a traversal of the autograd graph per step.
        training_args.ddp_find_unused_parameters = "mot" in config.mlp_types and config.mot_routing == "uniform"

    out = Path(training_args.output_dir)
    if out.exists() and resume is None and training_args.overwrite_output_dir and training_args.should_save:
        shutil.rmtree(out)
    created_output = not out.exists()
    trainer = MoTTrainer(
        model=model, args=training_args, train_dataset=train_blocks, eval_dataset=eval_blocks,
        data_collator=collate_blocks, processing_class=tokenizer, init_optimizer_from=optimizer_source,
        plots_at_end=False,  # drawn by finalize_output_folder, after the final evaluation
        callbacks=callbacks,
    )
    try:
        train_result = trainer.train(resume_from_checkpoint=resume)
        metrics = dict(train_result.metrics)
        if eval_blocks is not None:
            metrics.update(trainer.evaluate())
    except BaseException:
        # Keep checkpoints (they are what --resume_from_checkpoint needs); drop a folder holding nothing useful.
        if created_output and training_args.should_save and out.is_dir() and get_last_checkpoint(str(out)) is None:
            shutil.rmtree(out, ignore_errors=True)
        raise
    metrics.update(train_blocks=num_train_blocks, block_size=block_size, data_source=raw.source,
                   num_parameters=sum(p.numel() for p in model.parameters()), world_size=training_args.world_size,
                   tokens_per_step=block_size * training_args.per_device_train_batch_size
                   * training_args.gradient_accumulation_steps * training_args.world_size)
    finalize_output_folder(trainer, out, metrics, write_extra_files, {
            "model_args": asdict(model_args), "data_args": asdict(data_args),
            "training_args": json.loads(training_args.to_json_string()),
            "init_optimizer_from": None if trainer.init_optimizer_from is None else str(trainer.init_optimizer_from),
        })
    trainer.accelerator.wait_for_everyone()
    return TrainingOutcome(output_dir=out, metrics=metrics, trainer=trainer)


def finalize_output_folder(trainer: MoTTrainer, out: Path, metrics: dict, write_extra_files, arguments: dict) -> None:
    """Write the finished model folder: weights, config (with auto_map), generation config, tokenizer, the code
    files (`trust_remote_code`), training arguments, results and plots. Everything is written into a staging folder
    first and then moved into `out` file by file, config.json last, so a folder with a config.json is a complete
    model.

    This is the single place where the output folder is finalised: anything else that belongs in the published
    folder (e.g. the model card) is added to `staging` below.
    """
    from .telemetry import write_training_plots

    main_process = trainer.args.should_save
    staging = out / FINAL_STAGING
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of a crashed run
        staging.mkdir()
    trainer.accelerator.wait_for_everyone()
    try:
        # Every process takes part (FSDP gathers the weights from all of them); the main process writes.
        trainer.save_model(str(staging))  # model.safetensors, config, generation config, code, tokenizer, args
        if not main_process:
            return
        write_training_plots(trainer.state.log_history, staging)
        (staging / TRAIN_RESULTS_FILE).write_text(json.dumps(metrics, indent=2, default=str) + "\n", encoding="utf-8")
        (staging / TRAINING_ARGS_FILE).write_text(json.dumps(arguments, indent=2, default=str) + "\n", encoding="utf-8")
        if write_extra_files is not None:
            write_extra_files(staging)
        apply_umask(staging)  # transformers writes model.safetensors private (0600)
        names = sorted(p.name for p in staging.iterdir())
        for name in sorted(names, key=lambda n: n == "config.json"):  # config.json last: marks completion
            os.replace(staging / name, out / name)
    finally:
        if main_process:
            shutil.rmtree(staging, ignore_errors=True)
    # The card is titled after the folder, so it is rendered in place; it only reads the files moved in above.
    refresh_card(out)


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, training_args = parse_args(list(sys.argv[1:] if argv is None else argv))
    outcome = run_training(model_args, data_args, training_args)
    if training_args.should_log:
        loss = outcome.eval_loss
        summary = "no validation set" if loss is None else f"final eval loss {loss:.4f}"
        print(f"\nmot train: {summary}; model saved to {outcome.output_dir.resolve()}", flush=True)
    return 0


def _console_entry() -> int:
    try:
        return main()
    except UserError as error:
        print(f"mot train: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_console_entry())
