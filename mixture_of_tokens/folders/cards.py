"""Model cards: `mot card MODEL` renders (or refreshes) `README.md` in a model folder.

A card is rendered from what the folder holds (read by model_records.py), so it can be refreshed after every step
that changes the model:
- `config.json`: the architecture, parameter counts and FLOPs per token (accounting.py, from the config alone);
- `training_args.json` (and `trainer_state.json`, or the last `checkpoint-N`'s): the training recipe. `mot
  convert` carries the source's file over (the weights' recipe), `mot transition` writes its own;
- `eval_results.json`: lm-evaluation-harness results, shown as a table and written to the `model-index` metadata so
  the Hub displays them;
- `conversion.json` (written by `mot convert` and `mot transition`): which model this one was converted from. A
  public card names it only by a Hub repo id, never by a local path ("converted from a local model").

The templates live in `mixture_of_tokens/folders/model_cards/` (one per model family plus shared `_*.md` sections).
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import Any

from ..utils import UserError, atomic_write_text
from .accounting import model_size
from .model_folder import CARD_FILE, CONFIG_FILE, EVAL_RESULTS_FILE, TRAINING_ARGS_FILE, check_config
from .model_records import EvalRow, read_conversion, read_eval_results, read_trainer_state, read_training_arguments

TAGS = ["mixture-of-tokens", "mixture-of-experts", "custom_code", "text-generation"]

# lm-eval task name -> (Hub dataset id, dataset config, split, display name), for the model-index metadata.
KNOWN_TASKS = {
    "piqa": ("baber/piqa", None, "validation", "PIQA"),  # the dataset lm-eval's stock task reads
    "hellaswag": ("Rowan/hellaswag", None, "validation", "HellaSwag"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", "ARC-Easy"),
}
METRIC_NAMES = {"acc": "accuracy", "acc_norm": "normalized accuracy", "perplexity": "perplexity"}

# Training arguments shown in the card, in this order, under their `mot train` flag names (so a reader can rerun
# the recipe). `dataset_name`, `train_file`, `data` and `seq_len` are other names a hand-written, flat file may use.
# "precision" is not a flag: it sums up bf16, fp16 and bf16_weights (see _precision).
RECIPE_KEYS = (
    "dataset", "dataset_name", "dataset_config", "train_file", "data", "block_size", "seq_len", "max_train_blocks",
    "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "weight_decay",
    "adam_beta1", "adam_beta2", "max_grad_norm", "optim", "precision", "seed",
)
PRECISION_FLAGS = ("bf16", "fp16", "bf16_weights")
DATASET_KEYS = ("dataset", "dataset_name", "train_file", "data")


def _human(number: float, unit: str = "") -> str:
    for threshold, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K")):
        if abs(number) >= threshold:
            return f"{number / threshold:.2f}{suffix}{unit}"
    return f"{number:.0f}{unit}"


def _block_list(indices: list[int]) -> str:
    """[4, 5, 6, 7] -> "5–8" (1-based, as the paper numbers blocks)."""
    ranges, start = [], None
    for position, index in enumerate(indices):
        if start is None:
            start = index
        if position + 1 == len(indices) or indices[position + 1] != index + 1:
            ranges.append(f"{start + 1}" if start == index else f"{start + 1}–{index + 1}")
            start = None
    return ", ".join(ranges)


def block_description(config) -> str:
    """The block type in words: the paper's (GPT-2-style) or which modern options it has."""
    norm = "RMSNorm" if config.norm_type == "rmsnorm" else "LayerNorm"
    positions = ("rotary position embeddings (RoPE, " + config.rope_parameters.get("rope_type", "default") + ")"
                 if config.position_embedding_type == "rope" else "learned absolute position embeddings")
    heads = (f"grouped-query attention ({config.num_key_value_heads} key/value heads)"
             if config.num_key_value_heads != config.num_attention_heads else "multi-head attention")
    bias = "with biases" if config.attention_bias else "bias-free"
    ffn = f"gated feed-forward ({config.hidden_act}, SwiGLU-style)" if config.gated_mlp else \
        f"{config.hidden_act} feed-forward"
    style = "Llama-style blocks" if config.gated_mlp and config.position_embedding_type == "rope" else \
        "the paper's (GPT-2-style) blocks" if not config.gated_mlp and config.position_embedding_type == "learned" \
        and config.norm_type == "layernorm" else "mixed blocks"
    return f"{style}: pre-{norm}, {positions}, {bias} {heads}, {ffn}{' with biases' if config.mlp_bias else ''}"


def architecture_summary(config) -> dict[str, Any]:
    types = list(config.mlp_types)
    size = model_size(config)
    routed = [i for i, t in enumerate(types) if t in config.routed_layer_types]
    counts = {t: types.count(t) for t in dict.fromkeys(types)}
    if "mot" in types:
        active_rule = f"a MoT layer's experts count 1/G = 1/{config.group_size}"
    elif routed:
        active_rule = f"a routed layer's experts count k/E = {config.num_experts_per_tok}/{config.num_experts}"
    else:
        active_rule = "a dense model uses all its parameters for every token"
    return {
        "block": block_description(config),
        "num_layers": config.num_hidden_layers,
        "block_types": ", ".join(f"{n} × {t}" for t, n in counts.items()),
        "hidden_size": config.hidden_size,
        "num_heads": config.num_attention_heads,
        "context": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "routed_blocks": _block_list(routed) if routed else "",
        "dense_blocks": len(types) - len(routed),
        # G only means something to layers that group the rows of a batch (MoT, Expert Choice); Token Choice
        # and dense layers ignore it, so their cards must not show it.
        "grouped": bool(config.grouped_layer_types),
        "group_size": config.group_size,
        "top_k_used": bool(set(types) & {"token_choice", "expert_choice"}),
        "num_experts": config.num_experts,
        "expert_size": config.expert_size,
        "intermediate_size": config.intermediate_size,
        "top_k": config.num_experts_per_tok,
        "capacity_factor": config.capacity_factor,
        "total_params": _human(size.total_params),
        "active_params": _human(size.active_params),
        "flops": _human(size.flops_per_token, "FLOPs"),
        "attention_flops": _human(size.attention_flops_per_token, "FLOPs"),
        "active_rule": active_rule,
    }


# --------------------------------------------------------------------------------------------------------------
# The recipe, the evaluation and the lineage as the card shows them (a missing or odd record leaves its section out)
# --------------------------------------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{k}={_format_value(v)}" for k, v in value.items())
    return str(value)


def _precision(values: dict[str, Any]) -> str:
    """One phrase for three flags (ModelArguments.bf16_weights, TrainingArguments.bf16 and fp16)."""
    if values.get("bf16_weights"):
        return "bf16 weights and optimizer state (bf16_weights)"
    if values.get("bf16"):
        return "bf16 autocast, fp32 weights (bf16)"
    if values.get("fp16"):
        return "fp16 mixed precision, fp32 weights (fp16)"
    return "fp32"


def _recipe_rows(args: dict[str, Any], complete: bool, default_block_size: int) -> list[tuple[str, str]]:
    from ..data import public_source  # data.py imports torch, which `mot card --help` does without

    values = dict(args)
    for key in DATASET_KEYS:
        if isinstance(values.get(key), str):
            values[key] = public_source(values[key])
    if complete:  # `mot train`'s record: an argument left at None took the default, which the card spells out
        if values.get("dataset") is None:
            values["dataset"] = public_source(None)
        if values.get("block_size") is None:
            values["block_size"] = default_block_size  # train.resolve_block_size: the model's context
    if isinstance(values.get("max_steps"), int) and values["max_steps"] > 0:
        values.pop("num_train_epochs", None)  # Trainer ignores the epoch count when max_steps is set
    else:
        values.pop("max_steps", None)  # -1: "not set"
    if any(flag in values for flag in PRECISION_FLAGS):
        values["precision"] = _precision(values)
    rows = []
    for key in RECIPE_KEYS:
        value = values.get(key)
        if value is None or value in ("", [], {}):
            continue
        text = _format_value(value)
        if key == "warmup_steps" and isinstance(value, float) and 0 < value < 1:
            text += " (a fraction of the steps)"  # TrainingArguments reads warmup_steps < 1 as a ratio
        rows.append((key, text))
    return rows


def training_section(model_dir: Path, default_block_size: int) -> dict[str, Any] | None:
    arguments = read_training_arguments(model_dir)
    rows = _recipe_rows(*arguments, default_block_size) if arguments else []
    state = read_trainer_state(model_dir)
    if isinstance(state, dict):
        if isinstance(state.get("global_step"), int):
            rows.append(("steps trained", str(state["global_step"])))
        losses = [entry["loss"] for entry in state.get("log_history", []) if isinstance(entry, dict)
                  and isinstance(entry.get("loss"), (int, float))]
        if losses:
            rows.append(("last logged training loss", _format_value(float(losses[-1]))))
    if not rows:
        return None
    return {"source": TRAINING_ARGS_FILE, "rows": rows}


def eval_results_metadata(rows: list[EvalRow], model_name: str):
    """The rows as huggingface_hub `EvalResult`s (the card's `model-index`)."""
    from huggingface_hub import EvalResult

    results = []
    for row in rows:
        dataset_id, dataset_config, split, display = KNOWN_TASKS.get(row.task, (row.task, None, None, row.task))
        results.append(EvalResult(
            task_type="text-generation", task_name="Text Generation", dataset_type=dataset_id,
            dataset_name=display, dataset_config=dataset_config, dataset_split=split, metric_type=row.metric,
            metric_name=METRIC_NAMES.get(row.metric, row.metric), metric_value=round(row.value, 6),
            metric_config="zero-shot",
        ))
    return results


def _is_hub_repo_id(name: str) -> bool:
    """A base model in the metadata must be a Hub repo id ("org/name"), not a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1 or name.startswith((".", "~")) or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def public_base_model(name: Any) -> str | None:
    """The base model as a public card may name it: a Hub repo id, or None for a local folder (whose path
    would leak the author's file system; `mot push` strips it from conversion.json for the same reason)."""
    return name if isinstance(name, str) and _is_hub_repo_id(name) else None


def _trained_as(conversion: dict[str, Any]) -> str | None:
    """The model whose training a converted model's carried `training_args.json` records: `mot convert` only
    changes the config, so walk back through plain conversions to the last model that was trained."""
    record = conversion
    while isinstance(record.get("base_model_lineage"), dict) and record["base_model_lineage"].get("method") == "convert":
        record = record["base_model_lineage"]
    return public_base_model(record.get("base_model"))


def training_provenance(conversion: dict[str, Any], has_arguments: bool) -> str | None:
    """Whose training the recipe describes, for a folder written by `mot convert` or `mot transition`."""
    method = conversion.get("method")
    if method == "convert":
        trained_as = _trained_as(conversion)
        converted = (f"Trained as `{trained_as}`, then converted" if trained_as
                     else "Trained as its source, then converted from a local model")
        text = f"{converted} by `mot convert` (a change of configuration only: no training since)"
        if has_arguments:
            return text + ". The recipe below is that training's, carried over with its `training_args.json`."
        return text + ". The source folder saved no training arguments, so the recipe is not recorded here."
    if method == "transition":
        base_model = public_base_model(conversion.get("base_model"))
        source = f"`{base_model}`" if base_model else "a local model"
        steps = conversion.get("transition_steps")
        continued = ""
        if conversion.get("source_steps") is not None:
            continued = (f", continuing the optimizer state and learning-rate schedule of its training at step "
                         f"{conversion['source_steps']}")
        more = f" {steps} more steps" if isinstance(steps, int) else " further"
        return (f"Converted from {source} and trained{more} (transition tuning{continued}). The recipe below is "
                "that continued training's; its data, batch and optimizer settings are the source run's unless "
                "given on the command line.")
    return None


def conversion_summary(conversion: dict[str, Any]) -> str | None:
    """The conversion record's scalar entries as one line, minus anything that names a local folder."""
    if not conversion:
        return None
    items = []
    for key, value in conversion.items():
        if key.endswith("_path") or not isinstance(value, (str, int, float, bool)):
            continue
        if key == "base_model":
            value = public_base_model(value) or "a local model"
        items.append(f"{key}: {_format_value(value)}")
    return ", ".join(items) or None


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------


def template_name(config, conversion: dict[str, Any] | None = None) -> str:
    types = set(config.mlp_types)
    if config.grouped_layer_types:
        return "mot.md"
    if "token_choice" in types:
        return "token_choice.md"
    return "dense.md"


def _load_template(name: str) -> str:
    return resources.files(__package__).joinpath("model_cards", name).read_text(encoding="utf-8")


def render_card(model_dir: str | Path, *, repo_id: str | None = None, model_name: str | None = None,
                license: str | None = None):
    """Build the `huggingface_hub.ModelCard` of a model folder (without writing it)."""
    import jinja2
    from huggingface_hub import ModelCard, ModelCardData

    from ..modeling.configuration_mot import MoTConfig

    model_dir = Path(model_dir)
    if not (model_dir / CONFIG_FILE).is_file():
        raise UserError(f"{model_dir} is not a model folder: it has no config.json")
    check_config(model_dir)  # one line for a config that is not JSON or holds an invalid value
    try:
        config = MoTConfig.from_pretrained(model_dir)
    except (ValueError, OSError) as error:
        raise UserError(f"{model_dir / 'config.json'} is not a valid Mixture of Tokens config: {error}") from error

    previous = _existing_card_data(model_dir)
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else model_dir.resolve().name)
    conversion, base_model = read_conversion(model_dir, config)
    rows, settings = read_eval_results(model_dir)
    card_data = ModelCardData(
        model_name=model_name,
        license=license or previous.get("license"),
        language=previous.get("language", "en"),
        datasets=previous.get("datasets"),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=TAGS + (["batch-dependent"] if config.grouped_layer_types else []),
        base_model=public_base_model(base_model),
        eval_results=eval_results_metadata(rows, model_name) or None,
    )
    name = template_name(config, conversion)
    # `mot convert` records the source's feed-forward types: a Token Choice model whose source had MoT layers
    # was transition-tuned from a Mixture of Tokens model.
    from_mot = "mot" in (conversion.get("base_model_mlp_types") or [])
    tuned = conversion.get("method") != "convert"  # `mot convert` alone changes only the config
    training = training_section(model_dir, config.max_position_embeddings)
    environment = jinja2.Environment(loader=jinja2.FunctionLoader(_load_template), keep_trailing_newline=True,
                                     undefined=jinja2.StrictUndefined)
    content = environment.get_template(name).render(
        card_data=card_data.to_yaml(),
        model_name=model_name,
        repo_id=repo_id or f"YOUR_NAMESPACE/{model_name}",
        arch=architecture_summary(config),
        batch_dependent=bool(config.grouped_layer_types),
        group_size=config.group_size,
        training=training,
        provenance=training_provenance(conversion, (model_dir / TRAINING_ARGS_FILE).is_file()),
        conversion=conversion_summary(conversion),
        from_mot=from_mot,
        tuned=tuned,
        base_model=public_base_model(base_model),  # the text names a Hub repo id or no base model at all
        evaluation={"rows": [{"task": KNOWN_TASKS.get(r.task, (0, 0, 0, r.task))[3], "metric": r.metric,
                              "value": f"{r.value:.4f}"} for r in rows],
                    "settings": [(key, _format_value(value)) for key, value in settings],
                    "source": EVAL_RESULTS_FILE} if rows else None,
    )
    return ModelCard(content, ignore_metadata_errors=False)


def _existing_card_data(model_dir: Path) -> dict[str, Any]:
    """Metadata a user may have edited by hand (license, language, datasets) survives a refresh."""
    from huggingface_hub import ModelCard

    path = model_dir / CARD_FILE
    if not path.is_file():
        return {}
    try:
        return ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # noqa: BLE001 - an unreadable old card is simply replaced
        return {}


def refresh_card(model_dir: str | Path, *, repo_id: str | None = None, license: str | None = None) -> Path:
    """Render the model card of `model_dir` from what the folder holds and write it to `README.md`.

    Called by `mot train`, `mot convert` and `mot eval --update_card` after they write a model folder.
    Returns the path of the card.
    """
    card = render_card(model_dir, repo_id=repo_id, license=license)
    return atomic_write_text(Path(model_dir) / CARD_FILE, str(card))  # a reader never sees half a card


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mot card", description="Render or refresh README.md in a model folder.")
    parser.add_argument("model", help="model folder (with config.json)")
    parser.add_argument("--repo_id", help="Hub repo id used in the loading snippet (default: a placeholder)")
    parser.add_argument("--license", help="license identifier for the metadata, e.g. apache-2.0")
    args = parser.parse_args(argv)
    path = refresh_card(args.model, repo_id=args.repo_id, license=args.license)
    print(f"wrote {path}")
    return 0
