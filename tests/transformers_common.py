"""transformers' own common model tests, taken from the source distribution of the *installed* transformers.

The sdist on the package index ships `tests/test_modeling_common.py` (`ModelTesterMixin`) and
`tests/test_configuration_common.py` (`ConfigTester`), but not the three modules they import relatively:
`tests/generation/test_utils.py`, `tests/exporters/test_export.py` and `tests/utils/test_configuration_utils.py`.
`load_common_tests()` downloads the sdist once (`pip download`, honouring the user's index settings), copies the two
files into a package under the cache (`$MOT_CACHE_DIR`, else `~/.cache/mixture-of-tokens`), fills the three missing
modules with ours, and imports it:
- `generation/test_utils.py` -> `GenerationTesterMixin` of `tests/generation_conformance.py`, our own generation
  conformance tests (greedy, sampling, beam search, assisted decoding with and without the cache, continuing from a
  cache or from `inputs_embeds`, left padding, static cache);
- `utils/test_configuration_utils.py` -> `CONFIG_COMMON_KWARGS` below;
- `exporters/test_export.py` -> an empty `ExportTesterMixin`: the `torch.export` tests are not in the sdist and are
  not run.

`MOT_TRANSFORMERS_SDIST=/path/to/transformers-X.tar.gz` uses a local copy instead of downloading it.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "transformers_common_tests"
COMMON_FILES = ("test_modeling_common.py", "test_configuration_common.py")

# General PreTrainedConfig attributes, each set to a value other than its default: `ConfigTester` checks that the
# config keeps every one of them.
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["MoTForCausalLM"],
    "id2label": {0: "label_0", 1: "label_1"},
    "label2id": {"label_0": 0, "label_1": 1},
    "problem_type": "regression",
    "bos_token_id": 7,
    "pad_token_id": 8,
    "eos_token_id": 9,
}

STAND_INS = {
    "generation/test_utils.py": "from generation_conformance import GenerationTesterMixin  # noqa: F401\n",
    "utils/test_configuration_utils.py": (
        "from transformers_common import CONFIG_COMMON_KWARGS as config_common_kwargs  # noqa: F401\n"
    ),
    "exporters/test_export.py": (
        "class ExportTesterMixin:\n"
        '    """Stand-in: the torch.export tests are not in the transformers sdist and are not run."""\n'
    ),
}


class CommonTestsUnavailable(RuntimeError):
    """The sdist of the installed transformers could not be fetched or read."""


def cache_dir() -> Path:
    return Path(os.environ.get("MOT_CACHE_DIR", Path.home() / ".cache" / "mixture-of-tokens"))


def _download_sdist(version: str, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"transformers=={version}", "--dest", str(into)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as error:
        raise CommonTestsUnavailable(f"pip download of the transformers {version} sdist timed out") from error
    archives = sorted(into.glob(f"transformers-{version}.tar.gz"))
    if result.returncode or not archives:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CommonTestsUnavailable(f"could not download the transformers {version} sdist: {last_line}")
    return archives[0]


def _build_package(version: str, target: Path) -> None:
    """Write the harness package for `version` to `target` (a folder holding `PACKAGE`), atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        scratch = Path(scratch)
        local = os.environ.get("MOT_TRANSFORMERS_SDIST")
        archive = Path(local) if local else _download_sdist(version, scratch)
        package = scratch / "build" / PACKAGE
        package.mkdir(parents=True)
        try:
            with tarfile.open(archive) as tar:
                for name in COMMON_FILES:
                    member = tar.extractfile(f"transformers-{version}/tests/{name}")
                    (package / name).write_bytes(member.read())
        except (OSError, KeyError, tarfile.TarError) as error:
            raise CommonTestsUnavailable(f"{archive} has no readable tests/{name} of transformers {version}: "
                                         f"{error}") from error
        (package / "__init__.py").write_text(f'"""Common tests of transformers {version} (from its sdist)."""\n')
        for relative, text in STAND_INS.items():
            path = package / relative
            path.parent.mkdir(exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(text)
        try:
            (scratch / "build").rename(target)
        except OSError:
            if not (target / PACKAGE / COMMON_FILES[0]).exists():  # a concurrent build that won is fine
                raise


def load_common_tests():
    """Import and return (`test_modeling_common`, `test_configuration_common`) of the installed transformers."""
    version = transformers.__version__
    root = cache_dir() / "transformers-tests" / version
    if not all((root / PACKAGE / name).exists() for name in COMMON_FILES):
        shutil.rmtree(root, ignore_errors=True)
        _build_package(version, root)
    here = str(Path(__file__).resolve().parent)  # for the stand-ins' imports of our modules
    for path in (str(root), here):
        if path not in sys.path:
            sys.path.insert(0, path)
    return (importlib.import_module(f"{PACKAGE}.test_modeling_common"),
            importlib.import_module(f"{PACKAGE}.test_configuration_common"))
