"""`mot serve DIR`: the real server, in a process of its own, answered by the real `openai` client. Greedy text
equals `generate()`'s for dense and Token Choice models of both blocks, with and without continuous batching; MoT
and Expert Choice models and bad folders are refused in one line; and `transformers serve` itself serves a `mot
convert --to qwen2_moe` export."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import require  # noqa: E402

from mixture_of_tokens.cli import main as mot

openai = require("openai", reason="mot serve needs transformers' serving extras (openai, fastapi, uvicorn)")
require("fastapi")
require("uvicorn")


def _serving_available() -> bool:
    import transformers
    from packaging.version import Version

    from mixture_of_tokens.serve import MIN_TRANSFORMERS

    return Version(transformers.__version__) >= Version(MIN_TRANSFORMERS)


pytestmark = pytest.mark.skipif(not _serving_available(), reason="mot serve builds on transformers >= 5.25's serving")

TOKEN_CHOICE = ["dense", "token_choice", "dense", "token_choice"]
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPT = "It was the best of times, it was"
MESSAGES = [{"role": "user", "content": "Were there 2 kings?"}]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def chat_tokenizer(small_tokenizer, tmp_path_factory):
    """The paragraph tokenizer with a plain chat template."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat_tokenizer")
    small_tokenizer.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@contextlib.contextmanager
def running(command: list[str], port: int, log: Path, timeout: float = 240):
    """Start a server (`command`), wait until its /health answers, yield its OpenAI client, stop it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, f"the server stopped (exit code {process.returncode}):\n" + log.read_text()
            assert time.monotonic() < deadline, f"no answer on port {port} after {timeout} s:\n" + log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        client.server_pid = process.pid
        yield client
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def mot_serve(folder: Path, port: int, *options: str) -> list[str]:
    return [sys.executable, "-m", "mixture_of_tokens.cli", "serve", str(folder), "--host", "127.0.0.1", "--port",
            str(port), "--log_level", "warning", *options]


def resident_bytes(pid: int) -> int:
    """The resident memory of a process and all its children (the server and the model's process)."""
    import psutil

    server = psutil.Process(pid)
    return sum(process.memory_info().rss for process in [server, *server.children(recursive=True)])


def greedy(model, inputs) -> list[int]:
    """`generate()`'s greedy tokens after the prompt."""
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def expected_texts(folder: Path) -> dict[str, str]:
    """What `generate()` answers, greedily, to PROMPT and, where the tokenizer has a chat template, to MESSAGES."""
    from mixture_of_tokens.folders.model_folder import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(folder, device="cpu")
    texts = {"completion": tokenizer.decode(greedy(model, tokenizer(PROMPT, return_tensors="pt")),
                                            skip_special_tokens=True)}
    if tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True,
                                               return_tensors="pt")
        texts["chat"] = tokenizer.decode(greedy(model, inputs), skip_special_tokens=True)
    return texts


def token_choice_by_conversion(tiny_model_folder, tokenizer, tmp_path, preset: str) -> Path:
    """A Token Choice folder made as users make one from a MoT model: `mot convert SRC DST --to token_choice`."""
    src = tiny_model_folder("mot", preset=preset, tokenizer=tokenizer)
    assert mot(["convert", str(src), str(tmp_path / "tc"), "--to", "token_choice"]) == 0
    return tmp_path / "tc"


MODELS = {  # name -> how its folder is made: preset, and mlp_types or "convert" (from the preset's MoT)
    "paper-dense": ("tiny-dense", None),
    "paper-token_choice": ("tiny-dense", TOKEN_CHOICE),
    "modern-dense": ("tiny-modern-dense", None),
    "modern-token_choice": ("tiny-modern-mot", "convert"),
}


@pytest.mark.parametrize("continuous_batching", [
    False, pytest.param(True, marks=pytest.mark.slow, id="continuous_batching")])
@pytest.mark.parametrize("name", MODELS)
def test_greedy_answers_equal_generate(name, continuous_batching, tiny_model_folder, chat_tokenizer, tmp_path,
                                       free_port):
    preset, mlp_types = MODELS[name]
    if mlp_types == "convert":
        folder = token_choice_by_conversion(tiny_model_folder, chat_tokenizer, tmp_path, preset)
    else:
        folder = tiny_model_folder(name, preset=preset, tokenizer=chat_tokenizer,
                                   **({"mlp_types": mlp_types} if mlp_types else {}))
    expected = expected_texts(folder)
    port = free_port()
    # A cache of 16 blocks: by default continuous batching takes 60-90% of the free memory (of the RAM, on a CPU).
    # The page size and batch budget change how the cache is laid out and filled, not the greedy answers.
    options = ["--continuous_batching", "--cb_num_blocks", "16", "--cb_page_size", "64", "--cb_max_batch_tokens",
               "128"] if continuous_batching else []
    with running(mot_serve(folder, port, *options), port, tmp_path / "server.log") as client:
        assert [model.id for model in client.models.list().data] == [str(folder)]
        completion = client.completions.create(model=str(folder), prompt=PROMPT, max_tokens=NEW_TOKENS,
                                               temperature=0)
        assert completion.choices[0].text == expected["completion"]
        assert completion.usage.completion_tokens <= NEW_TOKENS
        stream = client.completions.create(model=str(folder), prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0,
                                           stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected["completion"]
        chat = client.chat.completions.create(model=str(folder), messages=MESSAGES, max_tokens=NEW_TOKENS,
                                              temperature=0)
        assert chat.choices[0].message.content == expected["chat"]
        if continuous_batching:  # the default cache took 14 GiB of this 24 GiB machine for this tiny model
            assert resident_bytes(client.server_pid) < 4 * 2**30
    started = [line for line in (tmp_path / "server.log").read_text().splitlines() if line.startswith("mot serve:")]
    assert ("continuous batching" if continuous_batching else "generate()") in started[0]


def test_without_a_chat_template_chat_is_one_clear_error_and_long_answers_stop_at_the_context(
        tiny_model_folder, small_tokenizer, tmp_path, free_port):
    folder = tiny_model_folder("paper-dense-no-chat", preset="tiny-dense", tokenizer=small_tokenizer,
                               max_position_embeddings=32)
    port = free_port()
    with running(mot_serve(folder, port), port, tmp_path / "server.log") as client:
        with pytest.raises(openai.BadRequestError, match="has no chat template.*/v1/completions"):
            client.chat.completions.create(model=str(folder), messages=MESSAGES, max_tokens=NEW_TOKENS)
        # No max_tokens: transformers asks for 1024 new tokens; the learned positions end at 32, and so does the answer
        completion = client.completions.create(model=str(folder), prompt=PROMPT)
        total = completion.usage.total_tokens
        assert total <= 32 and completion.choices[0].finish_reason == ("length" if total == 32 else "stop")
    assert "no chat template" in (tmp_path / "server.log").read_text()


@pytest.mark.parametrize("mlp_types", [["dense", "dense", "mot", "mot"], ["dense", "expert_choice", "dense", "dense"],
                                       ["dense", "mot", "token_choice", "expert_choice"]])
def test_mot_and_expert_choice_are_refused_in_one_line(mlp_types, tiny_model_folder, small_tokenizer, capsys):
    folder = tiny_model_folder("grouped", tokenizer=small_tokenizer, mlp_types=mlp_types)
    capsys.readouterr()
    assert mot(["serve", str(folder), "--port", "1"]) == 2  # refused before it would bind anything
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mot serve: error: ")
    grouped = " and ".join(kind for kind in ("mot", "expert_choice") if kind in mlp_types)
    assert f"{grouped} layers (mlp_types {mlp_types})" in err
    assert "`mot transition" in err and "--to token_choice" in err


def test_bad_folders_are_one_line(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    cases = {tmp_path / "missing": "does not exist", tmp_path / "notes": "has no config.json"}
    for folder, words in cases.items():
        assert mot(["serve", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mot serve: error: ") and words in err, err


def test_bad_continuous_batching_settings_are_one_line(tmp_path, capsys):
    cases = {
        ("--cb_num_blocks", "16"): "--cb_num_blocks is a continuous batching setting: give --continuous_batching too",
        ("--continuous_batching", "--cb_num_blocks", "0"): "--cb_num_blocks must be a positive integer, got 0",
        ("--continuous_batching", "--cb_max_memory_percent", "1.5"): "--cb_max_memory_percent must be in (0, 1], got 1.5",
    }
    for options, words in cases.items():
        assert mot(["serve", str(tmp_path), *options]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mot serve: error: ") and words in err, err


def test_a_busy_port_is_one_line_before_the_model_loads(tiny_model_folder, small_tokenizer, capsys):
    import socket

    folder = tiny_model_folder("paper-dense-no-chat", preset="tiny-dense", tokenizer=small_tokenizer,
                               max_position_embeddings=32)
    capsys.readouterr()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert mot(["serve", str(folder), "--host", "127.0.0.1", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mot serve: error: cannot listen on 127.0.0.1:{port}"), err


def test_transformers_serve_serves_a_qwen2_moe_export(tiny_model_folder, small_tokenizer, tmp_path, free_port):
    """The stock route: `mot convert --to qwen2_moe`, then `transformers serve` itself, no code of ours."""
    src = tiny_model_folder("modern-token_choice", preset="tiny-modern-dense", tokenizer=small_tokenizer,
                            mlp_types=TOKEN_CHOICE)
    out = tmp_path / "qwen2moe"
    assert mot(["convert", str(src), str(out), "--to", "qwen2_moe"]) == 0
    expected = expected_texts(src)["completion"]
    port = free_port()
    command = [str(Path(sys.executable).parent / "transformers"), "serve", str(out), "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning"]
    with running(command, port, tmp_path / "server.log") as client:
        assert [model.id for model in client.models.list().data] == [str(out)]
        completion = client.completions.create(model=str(out), prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
        assert completion.choices[0].text == expected
