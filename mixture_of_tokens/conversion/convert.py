"""`mot convert` and `mot transition`: the paper's transition tuning (docs/design.md, "Transition tuning").

A trained MoT model's output for one sequence depends on the other sequences of its group, so it cannot serve one
request at a time. Transition tuning reads the *same tensors* as a Token Choice model: expert `e` stays expert
`e` and the MoT controller becomes the router, now a softmax over experts per token. Because the routed layers
share their parameter names, conversion is a change of configuration only; `mot transition` then trains the
converted model ~10% more steps, keeping the optimizer state and the learning-rate schedule of the source run.

Lineage is recorded in `conversion.json` inside the output folder (read by the model card: `base_model`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..folders.model_folder import (
    CONFIG_FILE,
    CONVERSION_FILE,
    TRAINING_ARGS_FILE,
    check_config,
    check_weights,
    copy_tokenizer,
)
from ..utils import UserError, atomic_directory
from .export import EXPORT_TARGETS, export_stock

# Tensors the target architecture has no place for (MoT's learnable temperature in a Token Choice model) are
# kept here, byte for byte, so that converting back restores them and the round trip loses nothing.
SET_ASIDE_FILE = "set_aside_tensors.safetensors"
TARGETS = ("token_choice", "mot")


def _load_source_config(src: str | Path):
    """The MoT config of folder `src`, or a `UserError` saying why it cannot be converted."""
    from transformers import AutoConfig

    from .. import MoTConfig  # registers the "mot" model type
    from ..modeling.configuration_mot import ROUTED_TYPES

    src = Path(src)
    if not src.is_dir():
        raise UserError(f"source model folder {str(src)!r} does not exist")
    model_type = check_config(src).get("model_type")  # one line for a config that is not JSON or is invalid
    if model_type != MoTConfig.model_type:
        raise UserError(
            f"{str(src)!r} is a model of type {model_type!r}; only Mixture of Tokens models "
            f"(model_type {MoTConfig.model_type!r}) can be converted"
        )
    check_weights(src)  # missing, truncated or corrupted weights: one line, before anything is written
    config = AutoConfig.from_pretrained(src)
    if not config.routed_layer_types:
        raise UserError(
            f"{str(src)!r} is a dense model (mlp_types {config.mlp_types}): it has no routed layers to convert; "
            f"conversion needs at least one layer of type {', '.join(ROUTED_TYPES)}"
        )
    return config


def converted_config(config, to: str, top_k: int | None = None, capacity_factor: float | None = None):
    """A copy of `config` whose routed layers are all of type `to`; dense layers stay dense."""
    if to not in TARGETS:
        raise UserError(f"--to {to!r} is not a conversion target; allowed: {', '.join(TARGETS)}")
    if top_k is not None and not (1 <= top_k <= config.num_experts):
        raise UserError(f"--top_k {top_k} is not possible: the model has {config.num_experts} experts per layer, "
                        f"so top_k must be between 1 and {config.num_experts}")
    if capacity_factor is not None and not capacity_factor > 0:
        raise UserError(f"--capacity_factor must be positive, got {capacity_factor}")
    mlp_types = [to if mlp_type in config.routed_layer_types else mlp_type for mlp_type in config.mlp_types]
    settings = {**config.to_dict(), "mlp_types": mlp_types}
    if "token_choice" not in config.mlp_types:
        settings["router_aux_loss_coef"] = None  # the config's default for its new Token Choice layers
    new = config.__class__.from_dict(settings)
    if top_k is not None:
        new.num_experts_per_tok = top_k
    if capacity_factor is not None:
        new.capacity_factor = capacity_factor
    new.validate_mot()
    return new


def _lineage(src_arg: str, src: Path, source_config, target_config, extra: dict | None = None) -> dict:
    """What `conversion.json` records: the card's `base_model` and how the model was derived from it."""
    previous = src / CONVERSION_FILE
    return {
        "base_model": src_arg,  # as the user named it (a Hub id when the folder came from `mot pull`)
        "base_model_path": str(src.resolve()),
        "base_model_mlp_types": list(source_config.mlp_types),
        "mlp_types": list(target_config.mlp_types),
        "num_experts_per_tok": target_config.num_experts_per_tok,
        "capacity_factor": target_config.capacity_factor,
        "base_model_lineage": json.loads(previous.read_text()) if previous.is_file() else None,
        **(extra or {}),
    }


def load_converted_model(src: str | Path, config):
    """The source folder's weights under `config`. Returns (model, tensors_set_aside).

    Tensors that `config` has no place for are returned instead of dropped (see SET_ASIDE_FILE); tensors set aside
    by an earlier conversion are put back when `config` needs them again.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    src = Path(src)
    # transformers' load report would call the keys handled below "MISSING"/"UNEXPECTED" and alarm the user.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(src, config=config, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    restored = load_file(src / SET_ASIDE_FILE) if (src / SET_ASIDE_FILE).is_file() else {}
    own = model.state_dict()
    missing = [name for name in info["missing_keys"] if name not in restored]
    if missing:
        raise UserError(f"{str(src)!r} lacks tensors that a {config.mlp_types} model needs: {', '.join(missing)}")
    for name, tensor in restored.items():
        if name in own:
            own[name].copy_(tensor)
    set_aside = {name: tensor for name, tensor in restored.items() if name not in own}
    unexpected = info["unexpected_keys"]
    if unexpected:
        from safetensors import safe_open

        for path in sorted(src.glob("*.safetensors")):
            if path.name == SET_ASIDE_FILE:
                continue
            with safe_open(path, "pt") as handle:
                for name in handle.keys():
                    if name in unexpected:
                        set_aside[name] = handle.get_tensor(name)
    return model, set_aside


def save_model_folder(model, set_aside: dict, tokenizer_src: Path, dst: Path, lineage: dict) -> None:
    """Write model (safetensors, config, code files), tokenizer, set-aside tensors and `conversion.json`."""
    from safetensors.torch import save_file

    model.save_pretrained(dst)
    copy_tokenizer(tokenizer_src, dst)
    if set_aside:
        save_file({name: tensor.contiguous() for name, tensor in set_aside.items()}, dst / SET_ASIDE_FILE)
    (dst / CONVERSION_FILE).write_text(json.dumps(lineage, indent=2) + "\n")


def _source_training_arguments(src: Path) -> str | None:
    """The text of the source's `training_args.json` (None without one), checked before anything is written.

    A conversion changes only the config, so the converted weights were trained with the source's recipe: the
    file travels with them and the card presents it as the source's training (see cards.training_provenance).
    """
    path = src / TRAINING_ARGS_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); fix or delete it, then convert again") from error
    return text


def write_card(dst: Path) -> None:
    """Render the model card once the folder has its final name (the card is titled after the folder)."""
    from ..folders.cards import refresh_card

    refresh_card(dst)  # reads conversion.json: base_model and how this model was derived


def convert(src: str | Path, dst: str | Path, to: str = "token_choice", top_k: int | None = None,
            capacity_factor: float | None = None, overwrite: bool = False) -> Path:
    """Convert model folder `src` into `dst`; only the config changes, every tensor is copied bit for bit."""
    source_config = _load_source_config(src)
    target_config = converted_config(source_config, to, top_k, capacity_factor)
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} already exists; pass --overwrite to replace it")
    if Path(src).resolve() == dst.resolve():
        raise UserError("SRC and DST are the same folder; write the converted model to a new folder")
    training_arguments = _source_training_arguments(Path(src))
    model, set_aside = load_converted_model(src, target_config)
    with atomic_directory(dst, overwrite=overwrite) as staging:
        save_model_folder(model, set_aside, Path(src), staging,
                          _lineage(str(src), Path(src), source_config, target_config, {"method": "convert"}))
        if training_arguments is not None:
            (staging / TRAINING_ARGS_FILE).write_text(training_arguments, encoding="utf-8")  # staged: atomic
    write_card(dst)
    return dst


def _add_conversion_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="model folder to convert (a MoT model from `mot train`, or for "
                                                   "`mot convert` a Llama model folder)")
    parser.add_argument("dst", metavar="DST", help="output folder (refused if it exists, unless --overwrite)")
    parser.add_argument("--top_k", type=int, default=None,
                        help="experts per token of Token Choice (default: the source config's, 1 as in the paper)")
    parser.add_argument("--capacity_factor", type=float, default=None,
                        help="Token Choice capacity factor while training (default: the source config's, 1.25)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def convert_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mot convert",
        description="Turn a MoT model into Token Choice (or back) by changing only its config; tensors, tokenizer "
                    "and code files are copied unchanged.",
    )
    _add_conversion_arguments(parser)
    parser.add_argument("--to", choices=sorted(set(TARGETS) | {"dense", "gguf"} | set(EXPORT_TARGETS)), default=None,
                        help="feed-forward type of the routed layers after conversion (default token_choice); "
                             "qwen2_moe (a Token Choice model) or llama (a dense model): a stock transformers folder "
                             "for serving, modern block only; gguf: DST is a .gguf file for llama.cpp (its qwen2moe); "
                             "from a Llama folder: dense, mot or token_choice")
    parser.add_argument("--gguf_dtype", choices=("f32", "f16"), default="f32",
                        help="with --to gguf: tensor type of the weight matrices (norms and routers stay f32)")
    llama = parser.add_argument_group("from a Llama folder (model_type llama: a LlamaForCausalLM and its tokenizer)")
    llama.add_argument("--routed_layers", default=None,
                       help="comma-separated block indices that become routed (default: the second half)")
    llama.add_argument("--group_size", type=int, default=8, help="G of the routed layers (default 8)")
    llama.add_argument("--num_experts", type=int, default=None, help="E per routed layer (default: G)")
    llama.add_argument("--expert_size", type=int, default=None,
                       help="f of each expert: the Llama intermediate_size (default: every expert a copy of the "
                            "block's feed-forward) or a divisor of it (expert e takes slice e mod k)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if _model_type(args.src) == "llama":
        from .llama_conversion import convert_llama

        routed = None
        if args.routed_layers is not None:
            try:
                routed = [int(item) for item in args.routed_layers.split(",") if item.strip()]
            except ValueError as error:
                raise UserError(f"--routed_layers {args.routed_layers!r}: give block indices such as 2,3") from error
        dst = convert_llama(args.src, args.dst, args.to or "dense", routed, args.group_size, args.num_experts,
                            args.expert_size, overwrite=args.overwrite)
    elif args.to in EXPORT_TARGETS:
        dst = export_stock(args.src, args.dst, args.to, overwrite=args.overwrite)
    elif args.to == "gguf":
        from .gguf_export import export_gguf

        dst = export_gguf(args.src, args.dst, overwrite=args.overwrite, dtype=args.gguf_dtype)
    else:
        llama_only = [name for name in ("routed_layers", "num_experts", "expert_size") if getattr(args, name)]
        if llama_only or args.to == "dense":
            raise UserError(f"{'--' + llama_only[0] if llama_only else '--to dense'} applies to a Llama source only; "
                            f"{args.src!r} is a MoT model (its routed layers convert to token_choice or mot)")
        dst = convert(args.src, args.dst, to=args.to or "token_choice", top_k=args.top_k,
                      capacity_factor=args.capacity_factor, overwrite=args.overwrite)
    print(f"wrote the converted model to {dst}")
    return 0


def _model_type(src: str) -> str | None:
    """The model_type in SRC's config.json (None when it cannot be read: the MoT path then says why)."""
    try:
        return json.loads((Path(src) / CONFIG_FILE).read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


# Settings of the source run that the transition keeps unless given on the command line: the optimizer and the
# learning-rate schedule it continues, the batch shape, and the training data.
CONTINUED_TRAINING_ARGS = (
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay", "max_grad_norm",
    "adam_beta1", "adam_beta2", "adam_epsilon", "optim", "per_device_train_batch_size",
    "gradient_accumulation_steps", "per_device_eval_batch_size",
)
RESERVED_TRAIN_FLAGS = ("output_dir", "max_steps", "init_from", "init_optimizer_from", "preset", "config",
                        "resume_from_checkpoint", "num_train_epochs", "overwrite_output_dir")


def _inherit_source_settings(src: Path, given: set[str], data_args, training_args) -> list[str]:
    """Copy the source run's optimizer, schedule, batch and data settings that the user did not give."""
    recorded = _source_training_arguments(src)
    if recorded is None:
        return []
    arguments = json.loads(recorded)
    inherited = []
    sources = [(training_args, arguments.get("training_args") or {}, CONTINUED_TRAINING_ARGS),
               (data_args, arguments.get("data_args") or {}, tuple(arguments.get("data_args") or {}))]
    for target, values, names in sources:
        for name in names:
            if name in values and name not in given and hasattr(target, name):
                setattr(target, name, values[name])
                inherited.append(name)
    return inherited


def transition_tune(src: str | Path, dst: str | Path, *, steps: int, top_k: int | None = None,
                    capacity_factor: float | None = None, overwrite: bool = False, **train_settings):
    """Convert the MoT model in `src` to Token Choice and train it `steps` more steps into `dst` (`mot
    transition`). `train_settings` are `mot train` settings by name (`training_arguments`); the source run's
    optimizer, schedule, batch and data settings fill in those not given.

    Returns the `TrainingOutcome` of the training run and the optimizer checkpoint it continued (or None).
    """
    from transformers import AutoTokenizer

    from ..training.train import run_training, training_arguments

    reserved = sorted(set(train_settings) & set(RESERVED_TRAIN_FLAGS))
    if reserved:
        raise UserError(f"--{reserved[0]} is set by mot transition itself (SRC, DST and --steps); remove it")
    if steps <= 0:
        raise UserError(f"--steps must be a positive number of training steps, got {steps}")
    src, dst = Path(src), Path(dst)
    source_config = _load_source_config(src)
    if "mot" not in source_config.mlp_types:
        raise UserError(f"{str(src)!r} has no MoT layers (mlp_types {source_config.mlp_types}); transition tuning "
                        "starts from a Mixture of Tokens model")
    target_config = converted_config(source_config, "token_choice", top_k, capacity_factor)
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} already exists; pass --overwrite to replace it")
    if src.resolve() == dst.resolve():
        raise UserError("SRC and DST are the same folder; write the transition-tuned model to a new folder")

    model_args, data_args, training_args = training_arguments(
        **train_settings, output_dir=str(dst), max_steps=steps, overwrite_output_dir=overwrite)
    inherited = _inherit_source_settings(src, set(train_settings), data_args, training_args)
    from ..training.trainer import (  # after parsing: Trainer is slow to import
        checkpoint_global_step,
        find_optimizer_checkpoint,
    )

    checkpoint = find_optimizer_checkpoint(src)
    if checkpoint is None:
        print(f"mot transition: no Trainer checkpoint with optimizer.pt in {src}: starting a fresh optimizer and "
              "learning-rate schedule", file=sys.stderr)
    else:
        print(f"mot transition: continuing the optimizer state and learning-rate schedule of {checkpoint} "
              f"(step {checkpoint_global_step(checkpoint)})", file=sys.stderr)
    if inherited:
        print(f"mot transition: reusing the source run's {', '.join(inherited)}", file=sys.stderr)

    model, set_aside = load_converted_model(src, target_config)
    tokenizer = AutoTokenizer.from_pretrained(src)
    lineage = _lineage(str(src), src, source_config, target_config, {
        "method": "transition",
        "transition_steps": steps,
        "optimizer_continued_from": None if checkpoint is None else checkpoint.name,
        "source_steps": None if checkpoint is None else checkpoint_global_step(checkpoint),
    })

    def write_lineage(folder: Path) -> None:
        # Into the staging folder, before the output is complete: a finished folder always carries its lineage.
        from safetensors.torch import save_file

        if set_aside:
            save_file({name: tensor.contiguous() for name, tensor in set_aside.items()}, folder / SET_ASIDE_FILE)
        (folder / CONVERSION_FILE).write_text(json.dumps(lineage, indent=2) + "\n")

    outcome = run_training(model_args, data_args, training_args, model=model, tokenizer=tokenizer,
                           init_optimizer_from=checkpoint, write_extra_files=write_lineage)
    return outcome, checkpoint


def transition(argv: list[str]):
    """`mot transition`'s command line: `transition_tune` with any `mot train` flag after its own."""
    parser = argparse.ArgumentParser(
        prog="mot transition",
        description="Transition tuning: convert a MoT model to Token Choice and continue training it, keeping the "
                    "optimizer state and learning-rate schedule of the source run's last Trainer checkpoint. "
                    "Any other `mot train` flag (data, batch size, logging, ...) may follow; by default the "
                    "source run's data, batch and optimizer settings are reused.",
    )
    _add_conversion_arguments(parser)
    parser.add_argument("--steps", type=int, required=True,
                        help="training steps after the switch (the paper: 10%% of the MoT run)")
    args, train_argv = parser.parse_known_args(argv)
    from ..training.train import given_settings

    return transition_tune(args.src, args.dst, steps=args.steps, top_k=args.top_k,
                           capacity_factor=args.capacity_factor, overwrite=args.overwrite,
                           **given_settings(train_argv))


def transition_main(argv: list[str] | None = None) -> int:
    outcome, _ = transition(sys.argv[1:] if argv is None else argv)
    loss = outcome.eval_loss
    summary = "" if loss is None else f"; final eval loss {loss:.4f}"
    print(f"mot transition: Token Choice model saved to {outcome.output_dir}{summary}")
    return 0
