"""Model folders a user hands a `mot` command: the one check every command runs before it reads or writes anything,
and the loader that evaluation (`mot eval`, the lm-eval model) shares.

A missing folder, a `config.json` that is not JSON or holds an invalid value, and weights that are missing,
truncated or corrupted each become one `UserError` line naming the file and what is wrong (the `mot` command
prints it and exits with status 2), instead of a traceback from deep inside transformers or safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..utils import UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# The files `mot` commands add to a model folder, besides what save_pretrained writes.
CARD_FILE = "README.md"
TRAINING_ARGS_FILE = "training_args.json"  # `mot train`'s arguments (the card's recipe)
TRAIN_RESULTS_FILE = "train_results.json"
TRAINER_STATE_FILE = "trainer_state.json"
EVAL_RESULTS_FILE = "eval_results.json"  # `mot eval --update_card`
CONVERSION_FILE = "conversion.json"  # lineage of `mot convert` / `mot transition`


def read_config_dict(folder: Path) -> dict:
    """`folder/config.json` as a dict, or a `UserError` saying why it cannot be read."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{str(folder)!r} has no {CONFIG_FILE}; give a folder written by `mot train` or save_pretrained")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a readable JSON file ({error})") from error
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def check_config(folder: Path) -> dict:
    """Validate a Mixture of Tokens `config.json` the way `MoTConfig` does, as one line naming the file."""
    config = read_config_dict(folder)
    if config.get("model_type") == "mot":
        from ..modeling.configuration_mot import MoTConfig

        try:
            MoTConfig.from_dict(config)
        except (ValueError, TypeError) as error:
            raise UserError(f"{folder / CONFIG_FILE}: {error}") from error
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (one file, or the shards its index names)."""
    index = folder / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise UserError(f"{index}: not a valid safetensors index ({error})") from error
        return [folder / shard for shard in shards]
    if (folder / WEIGHTS_FILE).exists():
        return [folder / WEIGHTS_FILE]
    pickled = [name for name in ("pytorch_model.bin", "model.pt") if (folder / name).exists()]
    if pickled:
        raise UserError(f"{str(folder)!r} holds weights only as {pickled[0]} (a pickle, which can run code when "
                        f"loaded), and only safetensors are read or pushed: save the model as {WEIGHTS_FILE} "
                        "(save_pretrained does by default)")
    raise UserError(f"{str(folder)!r} has no {WEIGHTS_FILE}; give a folder written by `mot train` or save_pretrained")


def check_weights(folder: Path) -> list[Path]:
    """Open every safetensors file's header: a truncated or corrupted file fails here, in one line."""
    from safetensors import SafetensorError, safe_open

    files = weight_files(folder)
    for path in files:
        if not path.is_file():
            raise UserError(f"{path} is missing (named by {WEIGHTS_INDEX_FILE})")
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as error:
            reason = str(error).removeprefix("Error while deserializing header: ")
            raise UserError(f"{path}: not a complete safetensors file ({reason}); the file is truncated or "
                            "corrupted, copy or download it again") from error
    return files


def check_model_folder(folder: str | Path, *, weights: bool = True) -> Path:
    """Check a model folder (its config, and its weights unless `weights=False`); return it as a `Path`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder {str(folder)!r} does not exist")
    check_config(folder)
    if weights:
        check_weights(folder)
    return folder


def check_mot_routing(mot_routing: str | None) -> None:
    """A command's `--mot_routing` judged by `MoTConfig`, which holds the routings, as one line naming the flag.

    Its commands check it after parsing rather than as argparse choices: importing the config imports torch, which
    their `--help` does without."""
    if mot_routing is None:
        return
    from ..modeling.configuration_mot import MoTConfig

    try:
        MoTConfig(mot_routing=mot_routing)
    except ValueError as error:
        raise UserError(f"--mot_routing: {error}") from None


def load_model_and_tokenizer(model_dir, mot_routing: str | None = None, config_overrides: dict | None = None,
                             device: str | None = None):
    """Load a saved model folder (safetensors weights only) and its tokenizer, in eval mode.

    `mot_routing` and `config_overrides` replace saved config fields before the weights load, e.g.
    `mot_routing="discrete"` (temperature -> 0) or `{"mlp_types": ["dense", "dense", "token_choice", ...]}` to read a
    MoT checkpoint as Token Choice (the parameters share names).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import mixture_of_tokens  # noqa: F401  (registers the `mot` model type with the Auto classes)

    model_dir = check_model_folder(model_dir)  # one line for a bad config or missing, truncated, corrupted weights
    overrides = dict(config_overrides or {})
    if mot_routing is not None:
        overrides["mot_routing"] = mot_routing
    try:
        config = AutoConfig.from_pretrained(model_dir, **overrides)
    except ValueError as error:  # MoTConfig validates every field and names the bad one
        raise UserError(f"cannot use the config of {model_dir}: {error}") from None
    if overrides and getattr(config, "model_type", None) != "mot":
        raise UserError(f"--mot_routing and config overrides apply to MoT models; {model_dir} is {config.model_type!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the tokenizer saved in {model_dir}: {error}") from None
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, use_safetensors=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def copy_tokenizer(src: Path, dst: Path) -> bool:
    """Save the tokenizer of model folder `src` into `dst`; False when `src` has none."""
    from transformers import AutoTokenizer

    if not any((src / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return False
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return True
