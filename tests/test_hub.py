"""Hub round trips, custom-code loading and model cards, all offline.

`mot push` and `mot pull` run as real subprocesses with `HF_ENDPOINT` pointing at `tests/hub_server.py`, a local
HTTP server answering the Hub API calls of the real huggingface_hub client. Remote-code loading runs in a fresh
interpreter where `import mixture_of_tokens` is made impossible, so the classes must come from the downloaded code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_server import TOKEN, LocalHub
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from mixture_of_tokens import MoTConfig, MoTForCausalLM
from mixture_of_tokens.cli import main as mot
from mixture_of_tokens.folders.accounting import model_size
from mixture_of_tokens.folders.cards import refresh_card, render_card
from mixture_of_tokens.folders.hub import plan_upload

EVAL_RESULTS = {
    "results": {
        "piqa": {"alias": "piqa", "acc,none": 0.5511, "acc_stderr,none": 0.0116, "acc_norm,none": 0.5408},
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.3125, "acc_stderr,none": 0.0095},
    },
    "metadata": {"mode": "mot-grouped", "batch_size": 8, "group_size": 8},
}
TRAINING_ARGS = {"learning_rate": 0.003, "max_steps": 120, "per_device_train_batch_size": 16,
                 "lr_scheduler_type": "cosine", "weight_decay": 0.1, "seed": 0}
# The same script computes logits in the parent and in the fresh subprocesses: one thread, fixed input ids.
LOGITS_SNIPPET = """
def fixed_logits(model, vocab_size):
    import torch
    torch.set_num_threads(1)
    ids = torch.randint(1, vocab_size, (8, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits
"""
BLOCK_PACKAGE = """
import importlib.abc, sys
class _BlockPackage(importlib.abc.MetaPathFinder):
    # The package is installed (editable) in this venv: refuse it, as on a machine where it was never installed.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mixture_of_tokens":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, _BlockPackage())
"""
namespace: dict = {}
exec(LOGITS_SNIPPET, namespace)
fixed_logits = namespace["fixed_logits"]


def run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tiny_model_folder, tmp_path_factory) -> Path:
    """A randomly initialised tiny MoT with its tokenizer, eval results and training arguments (on its own copy)."""
    folder = tmp_path_factory.mktemp("hub") / "tiny-mot"
    shutil.copytree(tiny_model_folder("tiny-mot", num_hidden_layers=2, mlp_types=["dense", "mot"],
                                      max_position_embeddings=32), folder)
    (folder / "eval_results.json").write_text(json.dumps(EVAL_RESULTS))
    (folder / "training_args.json").write_text(json.dumps(TRAINING_ARGS))
    (folder / "plots").mkdir()
    (folder / "plots" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n fake plot bytes")
    (folder / "optimizer.pt").write_bytes(b"training state that must stay local")
    return folder


@pytest.fixture(scope="module")
def reference_logits(model_dir) -> torch.Tensor:
    threads = torch.get_num_threads()
    try:
        return fixed_logits(MoTForCausalLM.from_pretrained(model_dir), MoTConfig.from_pretrained(model_dir).vocab_size)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hub():
    with LocalHub() as server:
        yield server


def client_env(hub: LocalHub, hf_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    # Xet storage cannot be emulated locally: the client falls back to the LFS protocol, which the server speaks.
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", **extra)
    return env


@pytest.fixture(scope="module")
def pushed(hub, model_dir, tmp_path_factory) -> str:
    """`mot push` of the tiny model, as a user would run it. Returns the repo id."""
    work = tmp_path_factory.mktemp("push")
    run([sys.executable, "-m", "mixture_of_tokens.cli", "push", str(model_dir), "org/tiny-mot",
         "--commit_message", "first upload"], client_env(hub, work / "hf"), cwd=work)
    return "org/tiny-mot"


def test_push_is_one_commit_and_pull_returns_identical_files(hub, pushed, model_dir, tmp_path):
    uploaded = hub.files(pushed)
    assert hub.commit_count == 1
    expected = {"model.safetensors", "config.json", "configuration_mot.py", "modeling_mot.py", "performance_mot.py",
                "legacy_mot.py", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md", "eval_results.json",
                "training_args.json", "plots/loss.png"}
    assert set(uploaded) == expected  # no optimizer state, no pickles
    local = folder_files(model_dir)
    # README.md was rendered into the folder; training_args.json goes up without the author's local paths
    assert all(uploaded[name] == local[name] for name in expected - {"training_args.json"})
    assert json.loads(uploaded["training_args.json"]) == json.loads(local["training_args.json"])  # no paths in it
    assert json.loads(uploaded["config.json"])["auto_map"]["AutoModelForCausalLM"] == "modeling_mot.MoTForCausalLM"
    # The weights went through the LFS protocol, content-checked by sha256 on the server.
    sha = hashlib.sha256(local["model.safetensors"]).hexdigest()
    assert ("PUT", f"/lfs-objects/{sha}") in hub.requests
    assert not hub.unhandled

    run([sys.executable, "-m", "mixture_of_tokens.cli", "pull", pushed, str(tmp_path / "pulled")],
        client_env(hub, tmp_path / "hf"), cwd=tmp_path)
    assert folder_files(tmp_path / "pulled") == uploaded
    assert not hub.unhandled


def test_remote_code_in_fresh_process_without_the_package(hub, pushed, reference_logits, tmp_path):
    script = BLOCK_PACKAGE + LOGITS_SNIPPET + textwrap.dedent(f"""
        import sys, torch
        try:
            import mixture_of_tokens
        except ModuleNotFoundError:
            pass
        else:
            sys.exit("the package is importable: this would not test remote code")
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({pushed!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert "mixture_of_tokens" not in sys.modules
        # The Hub's code has no compiled kernels: those are the package's (cpu_kernels.py)
        hub_modeling = sys.modules[type(model).__module__]
        assert hub_modeling.MixtureOfTokens.mixing_kernels is None and hub_modeling.MoTExperts.product_kernels is None
        tokenizer = AutoTokenizer.from_pretrained({pushed!r})
        assert tokenizer.decode(tokenizer("the quick fox").input_ids) == "the quick fox"
        torch.save(fixed_logits(model, model.config.vocab_size), "logits.pt")
    """)
    # -I: no PYTHONPATH, no user site, no script or current folder on sys.path; cwd is outside the repository.
    run([sys.executable, "-I", "-c", script], client_env(hub, tmp_path / "hf"), cwd=tmp_path)
    # The same model in another process (thread count and summation order may differ).
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), reference_logits, atol=1e-5, rtol=1e-5)
    assert not hub.unhandled


def place_in_hf_cache(model_dir: Path, hf_home: Path, repo_id: str) -> None:
    """The standard cache layout: blobs by content hash, snapshots/<commit>/ linking to them, refs/main."""
    repo_folder = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo_folder / "snapshots" / commit
    for name in plan_upload(model_dir).paths():
        content = (model_dir / name).read_bytes()
        blob = repo_folder / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(os.path.relpath(blob, (snapshot / name).parent))
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(commit)


def test_offline_cache_resolves_by_repo_id(model_dir, reference_logits, tmp_path, hub):
    place_in_hf_cache(model_dir, tmp_path / "hf", "org/cached-mot")
    script = LOGITS_SNIPPET + textwrap.dedent("""
        import torch
        import mixture_of_tokens
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained("org/cached-mot")
        assert type(model) is mixture_of_tokens.MoTForCausalLM, type(model)  # the package's own classes
        AutoTokenizer.from_pretrained("org/cached-mot")
        torch.save(fixed_logits(model, model.config.vocab_size), "logits.pt")
    """)
    requests_before = len(hub.requests)
    run([sys.executable, "-c", script], client_env(hub, tmp_path / "hf", HF_HUB_OFFLINE="1"), cwd=tmp_path)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), reference_logits)
    assert len(hub.requests) == requests_before  # offline: not a single request


def test_card_has_eval_table_model_index_and_limitations(model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    path = refresh_card(folder, repo_id="org/tiny-mot", license="apache-2.0")
    card = ModelCard.load(path)
    text = card.text

    results = card.data.eval_results
    assert {(r.dataset_type, r.metric_type, r.metric_value) for r in results} == {
        ("baber/piqa", "acc", 0.5511), ("baber/piqa", "acc_norm", 0.5408), ("allenai/ai2_arc", "acc", 0.3125)}
    name, round_trip = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == "tiny-mot" and len(round_trip) == 3
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert "| PIQA | acc | 0.5511 |" in text and "| ARC-Easy | acc | 0.3125 |" in text
    assert "- mode: mot-grouped" in text  # every number says how it was obtained
    assert "| learning_rate | 0.003 |" in text and "| lr_scheduler_type | cosine |" in text

    config = MoTConfig.from_pretrained(folder)
    size = model_size(config)
    assert f"| group size G | {config.group_size} |" in text and f"| experts E | {config.num_experts} |" in text
    assert f"| expert size f | {config.expert_size} |" in text and "| routed blocks | 2 |" in text
    assert size.active_params < size.total_params
    assert "Outputs depend on the batch" in text and "Information flows between the examples" in text
    assert "Unbatched inference needs the Token Choice model" in text
    assert "arXiv:2310.15961" in text and "@inproceedings{antoniak2024mixture" in text
    assert 'from_pretrained("org/tiny-mot", trust_remote_code=True)' in text

    # A refresh keeps the hand-set license and reflects new results.
    results_file = folder / "eval_results.json"
    results_file.write_text(json.dumps({"results": {"hellaswag": {"acc_norm,none": 0.29}}}))
    assert mot(["card", str(folder)]) == 0
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "apache-2.0"
    assert [(r.dataset_type, r.metric_value) for r in card.data.eval_results] == [("Rowan/hellaswag", 0.29)]


def test_card_template_follows_the_model_family(tmp_path):
    dense = tmp_path / "dense"
    MoTConfig.from_preset("tiny-dense").save_pretrained(dense)
    text = render_card(dense).text
    assert "dense Transformer" in text and "do not depend on the batch" in text and "Evaluation" in text
    assert "No training arguments were saved" in text

    token_choice = tmp_path / "token-choice"
    MoTConfig.from_preset("tiny-mot", mlp_types=["dense", "dense", "token_choice", "token_choice"]
                          ).save_pretrained(token_choice)
    (token_choice / "conversion.json").write_text(json.dumps({
        "base_model": "org/tiny-mot", "base_model_path": "/home/someone/private/tiny-mot",
        "base_model_mlp_types": ["dense", "dense", "mot", "mot"], "method": "transition"}))
    card = render_card(token_choice)
    assert "transition tuning" in card.text and "do not depend on the batch" in card.text
    assert card.data.base_model == "org/tiny-mot"
    assert "/home/someone" not in card.text  # local paths stay out of a public card


@pytest.mark.parametrize("overrides", [
    {},
    {"mlp_types": ["dense", "token_choice", "expert_choice", "mot"], "learnable_temperature": "per_expert",
     "num_experts_per_tok": 2},
    {"tie_word_embeddings": True, "mlp_types": ["dense"] * 4},
    {"preset": "tiny-modern-mot", "mlp_types": ["dense", "token_choice", "expert_choice", "mot"]},
    {"preset": "tiny-modern-dense", "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
    {"preset": "tiny-modern-mot", "mlp_bias": True, "num_key_value_heads": 1, "gated_mlp": False},
    {"final_norm": False, "embedding_init": "unit_fan_in"},  # the authors' wrapper: no final norm to count
    {"preset": "tiny-modern-mot", "final_norm": False},
])
def test_parameter_count_from_config_matches_the_model(overrides):
    config = MoTConfig.from_preset(overrides.pop("preset", "tiny-mot"), **overrides)
    model = MoTForCausalLM(config)
    assert model_size(config).total_params == sum(p.numel() for p in model.parameters())


def test_card_states_the_block_type():
    from mixture_of_tokens.folders.cards import block_description

    paper = block_description(MoTConfig.from_preset("tiny-mot"))
    assert paper.startswith("the paper's (GPT-2-style) blocks: pre-LayerNorm, learned absolute position embeddings")
    modern = block_description(MoTConfig.from_preset("tiny-modern-mot"))
    assert modern.startswith("Llama-style blocks: pre-RMSNorm, rotary position embeddings (RoPE, default)")
    assert "grouped-query attention (2 key/value heads)" in modern and "gated feed-forward (silu" in modern


def test_flops_per_token_follow_the_design_formula():
    # docs/design.md, "The MoT layer": a MoT layer costs E·2·d·f/G + 3·d·E multiply-adds; flop-matched tiny-mot vs tiny-dense differ by
    # exactly the controller, merge and emit of its two MoT layers.
    mot_config, dense_config = MoTConfig.from_preset("tiny-mot"), MoTConfig.from_preset("tiny-dense")
    extra = model_size(mot_config).flops_per_token - model_size(dense_config).flops_per_token
    assert extra == 2 * 2 * 3 * mot_config.hidden_size * mot_config.num_experts


@pytest.fixture
def local_client(hub, monkeypatch):
    """In-process client settings pointing at the local Hub (for error cases that must fail before any upload)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return hub


def _without(model_dir: Path, tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    for name in names:
        (folder / name).unlink()
    return folder


def bad_folder(case: str, model_dir: Path, tmp_path: Path) -> Path:
    """A model folder broken in the way `case` names ("valid" leaves it intact)."""
    if case == "valid":
        return model_dir
    if case == "no such folder":
        return tmp_path / "missing"
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    if case == "no weights":
        return _without(model_dir, tmp_path, "model.safetensors")
    if case == "pickled weights":
        folder = _without(model_dir, tmp_path, "model.safetensors")
        (folder / "pytorch_model.bin").write_bytes(b"pickle")
        return folder
    if case == "other model type":
        folder = _without(model_dir, tmp_path)
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
        return folder
    if case == "no tokenizer":
        return _without(model_dir, tmp_path, "tokenizer.json")
    if case == "truncated weights":
        folder = _without(model_dir, tmp_path)
        weights = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
        return folder
    raise AssertionError(case)


@pytest.mark.parametrize("case, repo_id, message", [
    ("empty folder", "org/ok", "is not a model folder: it has no config.json"),
    ("no such folder", "org/ok", "is not a folder"),
    ("no weights", "org/ok", "no model.safetensors"),
    ("pickled weights", "org/ok", "only safetensors are read or pushed"),
    ("truncated weights", "org/ok", "model.safetensors: not a complete safetensors file (incomplete metadata"),
    ("other model type", "org/ok", "has model_type 'gpt2'"),
    ("no tokenizer", "org/ok", "has no tokenizer"),
    ("valid", "no-namespace", "invalid repo id 'no-namespace': expected 'owner/name'"),
    ("valid", "org/bad name!", "invalid repo id 'org/bad name!'"),
    ("valid", "org/sub/name", "invalid repo id 'org/sub/name'"),
])
def test_bad_push_fails_with_one_clear_error_and_uploads_nothing(case, repo_id, message, model_dir, tmp_path,
                                                                   local_client, capsys):
    folder = bad_folder(case, model_dir, tmp_path)
    writes_before, repos_before = len(local_client.write_requests()), set(local_client.repos)

    assert mot(["push", str(folder), repo_id]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mot push: error: ") and message in error and "\n" not in error
    assert len(local_client.write_requests()) == writes_before and set(local_client.repos) == repos_before


def test_push_to_a_branch_of_a_private_repo_and_pull_errors(model_dir, tmp_path, local_client, capsys):
    assert mot(["push", str(model_dir), "org/private-mot", "--private", "--revision", "dev"]) == 0
    repo = local_client.repos["org/private-mot"]
    assert repo.private and "model.safetensors" in local_client.files("org/private-mot", "dev")
    assert local_client.files("org/private-mot", "main") == {}  # main untouched

    assert mot(["pull", "org/does-not-exist", str(tmp_path / "out")]) == 2
    assert "org/does-not-exist" in capsys.readouterr().err
    assert mot(["pull", "not a repo", str(tmp_path / "out")]) == 2
    assert "invalid repo id 'not a repo'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-downloaded


def test_conversion_record_is_uploaded_without_local_paths(model_dir, tmp_path):
    folder = _without(model_dir, tmp_path)
    (folder / "conversion.json").write_text(json.dumps({
        "base_model": "org/tiny-mot", "base_model_path": "/home/someone/tiny-mot",
        "base_model_lineage": {"base_model": "org/older", "base_model_path": "/home/someone/older"}}))
    plan = plan_upload(folder)
    assert json.loads(plan.contents["conversion.json"]) == {
        "base_model": "org/tiny-mot", "base_model_lineage": {"base_model": "org/older"}}
    assert "conversion.json" not in plan.files and "optimizer.pt" not in plan.paths()


def test_training_arguments_are_uploaded_without_local_paths(model_dir, tmp_path):
    folder = _without(model_dir, tmp_path)
    data = tmp_path / "novels.txt.gz"
    data.write_bytes(b"")
    (folder / "training_args.json").write_text(json.dumps({
        "model_args": {"preset": "tiny-mot", "tokenizer": str(folder), "init_from": "/home/someone/base"},
        "data_args": {"dataset": str(data), "validation_file": None, "block_size": 64},
        "training_args": {"output_dir": "/home/someone/run", "logging_dir": "/home/someone/run/logs",
                          "learning_rate": 0.003, "hub_model_id": "org/tiny-mot"},
    }))
    pushed = json.loads(plan_upload(folder).contents["training_args.json"])
    assert pushed == {
        "model_args": {"preset": "tiny-mot"},
        "data_args": {"dataset": "novels.txt.gz", "validation_file": None, "block_size": 64},
        "training_args": {"learning_rate": 0.003, "hub_model_id": "org/tiny-mot"},
    }
    hub_dataset = {"data_args": {"dataset": "allenai/c4"}}
    (folder / "training_args.json").write_text(json.dumps(hub_dataset))
    assert json.loads(plan_upload(folder).contents["training_args.json"]) == hub_dataset


def test_push_and_pull_without_network_fail_in_one_line(model_dir, tmp_path):
    """With HF_HUB_OFFLINE=1 (as on a machine without network) both commands stop at once with one line, exit 2,
    and leave nothing behind."""
    import os
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for args in (["push", str(model_dir), "someone/tiny-mot"], ["pull", "someone/tiny-mot", str(tmp_path / "out")]):
        result = subprocess.run([sys.executable, "-m", "mixture_of_tokens.cli", *args], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
        assert "cannot reach the Hugging Face Hub" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert not (tmp_path / "out").exists()
