"""Shared fixtures. Tests that need ../shared/data use `shared_data`: they fail (not skip) under CI=true when the
data is missing, so a broken checkout layout can never pass silently."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MOT_SHARED_DATA", REPO.parent / "shared" / "data"))


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(module: str, reason: str | None = None):
    """`pytest.importorskip` that fails under CI=true: the dev extra installs the libraries the tests run our models
    with, so a missing one there is a broken install, not a reason to skip."""
    if on_ci():
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(module, reason=reason)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").exists():
        message = f"../shared/data not found at {SHARED_DATA}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (required under CI=true)")
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def read_novels(shared_data: Path, max_chars: int) -> str:
    """The first `max_chars` characters of the ELTeC novels corpus."""
    import gzip

    with gzip.open(shared_data / "eltec_eng" / "eltec_eng_level1_body.txt.gz", "rt", encoding="utf-8") as handle:
        return handle.read(max_chars)


@pytest.fixture(scope="session")
def novels_text(shared_data) -> str:
    """About 2 MB of real English text."""
    return read_novels(shared_data, 2_000_000)


@pytest.fixture(scope="session")
def tiny_tokenizer(novels_text):
    """A 2048-token byte-level BPE trained on the novels (seconds)."""
    from mixture_of_tokens.training.tokenization import train_bpe_tokenizer

    lines = novels_text.splitlines()
    return train_bpe_tokenizer((line for line in lines[:20000]), vocab_size=2048)


# A paragraph with digits, contractions, punctuation runs and a quotation: a small tokenizer's training text.
PARAGRAPH = """It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of
foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the
season of Darkness, it was the spring of hope, it was the winter of despair. There were 2 kings and 1,775 years;
we had everything before us, we had nothing before us -- "we were all going direct to Heaven," she'd said.
"""


@pytest.fixture(scope="session")
def small_tokenizer():
    """A byte-level BPE trained on a paragraph (300 ids: the 256 bytes, <|endoftext|>, 43 merges)."""
    from mixture_of_tokens.training.tokenization import train_bpe_tokenizer

    return train_bpe_tokenizer(PARAGRAPH.splitlines() * 20, vocab_size=300)


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory, small_tokenizer):
    """`make(name, **args) -> Path`: an untrained MoT + tokenizer folder, made once per args (copy to change it)."""
    from mixture_of_tokens import MoTConfig, MoTForCausalLM

    made: dict[str, Path] = {}

    def make(name: str, *, preset: str | None = "tiny-mot", tokenizer=small_tokenizer, seed: int = 0,
             **config) -> Path:
        key = repr((name, preset, id(tokenizer), seed, sorted(config.items())))
        if key not in made:
            if "vocab_size" not in config and tokenizer is not None:
                config["vocab_size"] = len(tokenizer)
            torch.manual_seed(seed)
            model = MoTForCausalLM(MoTConfig.from_preset(preset, **config) if preset else MoTConfig(**config))
            made[key] = tmp_path_factory.mktemp("tiny_model") / name
            model.save_pretrained(made[key])
            if tokenizer is not None:
                tokenizer.save_pretrained(made[key])
        return made[key]

    return make


@pytest.fixture(scope="session")
def trained_tiny_mot(tmp_path_factory, novels_text, tiny_tokenizer) -> Path:
    """A `tiny-mot` model trained briefly on the novels with Trainer, saved with its tokenizer.

    Session-scoped: many tests share it. Returns the folder.
    """
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from mixture_of_tokens import MoTConfig, MoTForCausalLM

    block = 64
    ids = tiny_tokenizer(novels_text[:600_000])["input_ids"]
    blocks = [ids[i : i + block] for i in range(0, len(ids) - block, block)]
    dataset = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    config = MoTConfig.from_preset(
        "tiny-mot", vocab_size=len(tiny_tokenizer), max_position_embeddings=128,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = MoTForCausalLM(config)
    out = tmp_path_factory.mktemp("trained_tiny_mot")
    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=120, per_device_train_batch_size=16, learning_rate=3e-3,
        warmup_steps=10, lr_scheduler_type="cosine", weight_decay=0.1, max_grad_norm=0.5, logging_steps=20,
        save_strategy="no", report_to=[], disable_tqdm=True, seed=0, use_cpu=True,
    )
    Trainer(model=model, args=args, train_dataset=dataset).train()
    model.save_pretrained(out / "model")
    tiny_tokenizer.save_pretrained(out / "model")
    return out / "model"


@pytest.fixture
def free_port():
    """A function returning a TCP port free right now, for the multi-process tests (no fixed ports: parallel runs
    and other programs could hold them)."""
    import socket

    def pick() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    return pick


# Files whose tests train models, start processes or serve a local Hub: with the tests marked slow one by one, the
# slow tier (`-m slow`). `-m "not slow"` is the fast tier of the inner loop (README, "Development").
SLOW_FILES = {
    "test_bench_reproduce_time.py", "test_cli.py", "test_convert.py", "test_distributed.py", "test_eval.py",
    "test_gpu_compare.py", "test_hub.py", "test_lm_eval_cli.py", "test_modern_block.py", "test_no_deprecations.py",
    "test_quickstart.py", "test_reproduce.py", "test_serve.py", "test_train.py", "test_trl.py",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
