"""`mot push MODEL REPO_ID` and `mot pull REPO_ID DIR`: Hugging Face Hub upload and download of model folders.

A push checks everything first (a model folder with safetensors weights and a Mixture of Tokens config, a
tokenizer, a valid repo id) and only then talks to the Hub, uploading all files in a single commit, so a failed
push never leaves a half-updated repo. What is uploaded: weights (safetensors), `config.json` with `auto_map`, the
code files (`CODE_FILES`: configuration, modeling, the CPU performance helpers, the loading of earlier weight names),
the tokenizer, the generation config, the model card (`README.md`, rendered first if the folder has none), plots,
and the JSON records the card is built from. Training state (optimizer, pickled `training_args.bin`, checkpoints)
stays local.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..utils import UserError, atomic_directory
from .model_folder import (
    CONFIG_FILE,
    CONVERSION_FILE,
    EVAL_RESULTS_FILE,
    TRAIN_RESULTS_FILE,
    TRAINER_STATE_FILE,
    TRAINING_ARGS_FILE,
    WEIGHTS_INDEX_FILE,
    check_config,
    check_weights,
)

CODE_FILES = ("configuration_mot.py", "modeling_mot.py", "performance_mot.py", "legacy_mot.py")
TOKENIZER_DEFINITIONS = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt",
                    "chat_template.jinja", "chat_template.json")
# Everything else that belongs on the Hub (relative-path glob patterns; `*` does not cross folders).
OTHER_PATTERNS = ("generation_config.json", "README.md", "*.png", "*.svg", "*.pdf", "plots/*", "plots/*/*",
                  TRAINING_ARGS_FILE, TRAINER_STATE_FILE, EVAL_RESULTS_FILE, CONVERSION_FILE, "all_results.json",
                  TRAIN_RESULTS_FILE)


@dataclass
class UploadPlan:
    """What a push sends: repo path -> local file, plus in-memory replacements (a completed config)."""

    files: dict[str, Path]
    contents: dict[str, bytes]

    def paths(self) -> list[str]:
        return sorted({*self.files, *self.contents})


def check_repo_id(repo_id: str) -> str:
    """`owner/name` with the Hub's allowed characters, or a `UserError` saying what is wrong."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1:
        raise UserError(f"invalid repo id {repo_id!r}: expected 'owner/name' (e.g. my-org/mot-medium-32e)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserError(f"invalid repo id {repo_id!r}: {error}") from error
    return repo_id


def _weight_files(model_dir: Path) -> list[str]:
    """The weight files to upload; missing, truncated or corrupted weights fail here, before any network call."""
    shards = [path.name for path in check_weights(model_dir)]
    return [WEIGHTS_INDEX_FILE, *shards] if (model_dir / WEIGHTS_INDEX_FILE).is_file() else shards


def _completed_config(model_dir: Path) -> bytes | None:
    """config.json with every `auto_map` entry we support, or None when the saved one is already complete."""
    from ..modeling.configuration_mot import AUTO_MAP, MoTConfig

    path = model_dir / CONFIG_FILE
    raw = check_config(model_dir)  # one line for a config that is not JSON or holds an invalid value
    if raw.get("model_type") != MoTConfig.model_type:
        raise UserError(f"{path} has model_type {raw.get('model_type')!r}; `mot push` uploads "
                        f"{MoTConfig.model_type!r} models only")
    auto_map = dict(raw.get("auto_map") or {})
    if all(auto_map.get(key) == value for key, value in AUTO_MAP.items()):
        return None
    raw["auto_map"] = {**auto_map, **AUTO_MAP}
    return (json.dumps(raw, indent=2, sort_keys=True) + "\n").encode()


_DROPPED = object()  # marks a value `_without_local_paths` leaves out


def _names_a_local_file(value) -> bool:
    return isinstance(value, str) and bool(value) and (Path(value).is_absolute() or Path(value).exists())


def _without_local_paths(record, key: str = ""):
    """A JSON record without the author's file system (at any depth): `*_path` and `*_dir` entries go, and so does
    any other string that names a local file or folder, except a dataset, which keeps only its file name (the card
    shows it so). A Hub id such as `allenai/c4` names no local file and stays."""
    if isinstance(record, dict):
        kept = {k: _without_local_paths(v, str(k)) for k, v in record.items()
                if not str(k).endswith(("_path", "_dir"))}
        return {k: v for k, v in kept.items() if v is not _DROPPED}
    if isinstance(record, list):
        return [_without_local_paths(v, key) for v in record]
    if _names_a_local_file(record):
        return Path(record).name if key in ("dataset", "validation_file") else _DROPPED
    return record



def plan_upload(model_dir: str | Path) -> UploadPlan:
    """Validate a model folder and list what a push uploads. Raises `UserError` before any network call."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} is not a folder")
    if not (model_dir / CONFIG_FILE).is_file():
        raise UserError(f"{model_dir} is not a model folder: it has no config.json")
    files = {name: model_dir / name for name in _weight_files(model_dir)}
    contents = {}
    completed = _completed_config(model_dir)
    if completed is None:
        files[CONFIG_FILE] = model_dir / CONFIG_FILE
    else:
        contents[CONFIG_FILE] = completed

    tokenizer = [n for n in TOKENIZER_DEFINITIONS if (model_dir / n).is_file()]
    if not tokenizer or not (model_dir / "tokenizer_config.json").is_file():
        raise UserError(f"{model_dir} has no tokenizer (needs tokenizer_config.json and one of "
                        f"{', '.join(TOKENIZER_DEFINITIONS)}); save it with tokenizer.save_pretrained({str(model_dir)!r})")
    files.update({n: model_dir / n for n in (*tokenizer, *TOKENIZER_EXTRAS) if (model_dir / n).is_file()})

    # The folder's own code files match its weights; a folder saved without them gets the installed package's.
    installed_dir = Path(__file__).resolve().parent.parent / "modeling"
    for name in CODE_FILES:
        files[name] = model_dir / name if (model_dir / name).is_file() else installed_dir / name

    for path in sorted(model_dir.rglob("*")):
        relative = path.relative_to(model_dir).as_posix()
        if path.is_file() and any(fnmatch.fnmatchcase(relative, p) and relative.count("/") == p.count("/")
                                  for p in OTHER_PATTERNS):
            files.setdefault(relative, path)
    # `mot convert` records where its source lived; `mot train` its data, output and tokenizer folders.
    for name in (CONVERSION_FILE, TRAINING_ARGS_FILE):
        if name in files:
            try:
                record = json.loads(files.pop(name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as error:
                raise UserError(f"{model_dir / name} is not valid JSON ({error}); fix or delete it") from error
            contents[name] = (json.dumps(_without_local_paths(record), indent=2) + "\n").encode()
    return UploadPlan(files, contents)


# Exceptions (by class name, as huggingface_hub's HTTP client differs across its releases) that mean "the Hub cannot
# be reached from here": no network, DNS, timeouts, HF_HUB_OFFLINE=1.
NETWORK_ERRORS = {"TransportError", "ConnectionError", "TimeoutException", "TimeoutError", "OfflineModeIsEnabled",
                  "LocalEntryNotFoundError"}


def unreachable_hub(error: BaseException, what: str) -> UserError | None:
    """One line for a network failure while doing `what`, or None for any other error."""
    if not NETWORK_ERRORS & {cls.__name__ for cls in type(error).__mro__}:
        return None
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
    return UserError(f"cannot reach the Hugging Face Hub to {what}{offline}: {type(error).__name__}; it needs network "
                     "access (HF_ENDPOINT chooses another endpoint)")


def push(model_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None) -> str:
    """Upload a model folder to `repo_id` in one commit; returns the commit URL.

    Renders the model card first when the folder has none. Uses the endpoint and token of huggingface_hub
    (`HF_ENDPOINT`, `HF_TOKEN` or `hf auth login`).
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_repo_id(repo_id)
    model_dir = Path(model_dir)
    plan = plan_upload(model_dir)  # validation first: nothing is sent for a bad folder
    if "README.md" not in plan.files:
        from .cards import refresh_card

        plan.files["README.md"] = refresh_card(model_dir, repo_id=repo_id)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in plan.files.items()]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in plan.contents.items()]

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        # One commit for everything (not upload_folder, which may split large folders into several commits).
        info = api.create_commit(repo_id, operations, revision=revision,
                                 commit_message=commit_message or f"Upload {model_dir.resolve().name} with mot push")
    except HfHubHTTPError as error:
        raise UserError(f"the Hub refused the upload to {repo_id}: {error}") from error
    except Exception as error:
        raise (unreachable_hub(error, f"upload {repo_id}") or error) from error
    return info.commit_url


def pull(repo_id: str, destination: str | Path, *, revision: str | None = None, overwrite: bool = False,
         token: str | None = None) -> Path:
    """Download `repo_id` into the folder `destination` (written atomically: complete or not at all)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    check_repo_id(repo_id)
    with atomic_directory(destination, overwrite=overwrite) as staging:
        try:
            snapshot_download(repo_id, revision=revision, local_dir=staging, token=token)
        except RepositoryNotFoundError as error:
            raise UserError(f"repository {repo_id} not found (or private and no valid token given)") from error
        except RevisionNotFoundError as error:
            raise UserError(f"revision {revision!r} not found in {repo_id}") from error
        except HfHubHTTPError as error:
            raise UserError(f"download of {repo_id} failed: {error}") from error
        except Exception as error:
            raise (unreachable_hub(error, f"download {repo_id}") or error) from error
        # snapshot_download keeps its bookkeeping in DIR/.cache; the pulled folder should be the model only.
        shutil.rmtree(staging / ".cache", ignore_errors=True)
    return Path(destination)


def push_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mot push", description="Upload a model folder to the Hugging Face Hub.")
    parser.add_argument("model", help="model folder (config.json, model.safetensors, tokenizer)")
    parser.add_argument("repo_id", help="target repository, 'owner/name'")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    parser.add_argument("--commit_message", help="commit message")
    args = parser.parse_args(argv)
    url = push(args.model, args.repo_id, private=args.private, revision=args.revision,
               commit_message=args.commit_message)
    print(f"pushed {args.model} to {args.repo_id}: {url}")
    return 0


def pull_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mot pull", description="Download a model from the Hub into a folder.")
    parser.add_argument("repo_id", help="repository, 'owner/name'")
    parser.add_argument("dir", help="destination folder (must not exist unless --overwrite)")
    parser.add_argument("--revision", help="branch, tag or commit (default main)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    args = parser.parse_args(argv)
    path = pull(args.repo_id, args.dir, revision=args.revision, overwrite=args.overwrite)
    print(f"pulled {args.repo_id} into {path}")
    return 0
