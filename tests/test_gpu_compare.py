"""bench/gpu/run.sh, the GPU comparison, run at toy size on the CPU in the situation of the GPU machine, so that it
cannot rot before a GPU comes: only `python3` on PATH (no `python`), no package registry, the package not installed
(importable only through the PYTHONPATH run.sh sets), the corpus in the git-ignored bench/gpu/data/."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS = ["transformer-medium", "mot-medium-32e", "mot-medium-32e-16"]
# What run.sh and prepare.sh call besides bash's builtins, for a PATH built of symlinks where /usr/bin has a python.
TOOLS = ("bash", "dirname", "cp", "mkdir", "du", "cut")
# Dependencies of this package that the GPU machine's image does not have (its package list has torch, transformers,
# tokenizers, accelerate, peft, matplotlib, but no datasets and no lm-eval): the toy run must not need them.
ABSENT_ON_THE_GPU_MACHINE = ("datasets", "lm_eval")


def gpu_like_tree(tmp_path: Path, shared_data: Path | None) -> Path:
    """What the device call copies to the GPU machine (the parts run.sh uses), with the corpus prepared in
    bench/gpu/data/ by bench/gpu/prepare.sh when `shared_data` is given."""
    root = tmp_path / "repo"
    caches = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "bench", root / "bench", ignore=shutil.ignore_patterns("__pycache__", "data", "results"))
    shutil.copytree(REPO / "mixture_of_tokens", root / "mixture_of_tokens", ignore=caches)
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    if shared_data is not None:
        subprocess.run(["bash", str(root / "bench" / "gpu" / "prepare.sh")], check=True, capture_output=True,
                       env={**os.environ, "MOT_SHARED_DATA": str(shared_data)}, timeout=120)
    return root


def gpu_like_env(tmp_path: Path) -> dict[str, str]:
    """The environment of the GPU machine: PATH holds `python3` (an interpreter that has torch, transformers and
    tokenizers but not this package, datasets or lm-eval) and the system tools, and no `python`; pip has no index to
    reach.

    The interpreter is a virtualenv of its own whose site-packages links every entry of this one's except this
    package (its editable finder, its .pth files and any installed copy) and `ABSENT_ON_THE_GPU_MACHINE`, so
    `import mixture_of_tokens` works only through PYTHONPATH."""
    env_dir = tmp_path / "gpu-python"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_packages = env_dir / "lib" / version / "site-packages"
    site_packages.mkdir(parents=True)
    (env_dir / "bin").mkdir()
    base = Path(getattr(sys, "_base_executable", "") or os.path.realpath(sys.executable))
    (env_dir / "bin" / "python3").symlink_to(base)
    (env_dir / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\n"
                                        f"version = {sys.version.split()[0]}\n")
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    for folder in sorted(ours):
        for entry in sorted(Path(folder).iterdir()):
            name = entry.name.lower()
            if name.endswith(".pth") or name.startswith(("mixture_of_tokens", "mixture-of-tokens", "__editable__")):
                continue
            if name.split("-")[0] in ABSENT_ON_THE_GPU_MACHINE:  # the package or its .dist-info
                continue
            if not (site_packages / entry.name).exists():
                (site_packages / entry.name).symlink_to(entry)
    path = [str(env_dir / "bin"), "/usr/bin", "/bin"]
    if shutil.which("python", path=os.pathsep.join(path[1:])):  # build the system part from symlinks instead
        tools = tmp_path / "tools"
        tools.mkdir()
        for tool in TOOLS:
            (tools / tool).symlink_to(shutil.which(tool))
        path[1:] = [str(tools)]
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(PATH=os.pathsep.join(path), PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/nowhere",
               PIP_FIND_LINKS="", PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1",
               # The GPU machine runs MoT on CUDA, never the CPU mixing kernels; here, on a CPU that runs them, this
               # PATH may have no C++ compiler to build them with (tests/test_cpu_kernels.py tests them).
               MOT_CPU_KERNELS="0")
    assert shutil.which("python", path=env["PATH"]) is None
    assert shutil.which("python3", path=env["PATH"]) == str(env_dir / "bin" / "python3")
    absent = ("mixture_of_tokens", *ABSENT_ON_THE_GPU_MACHINE)
    probe = subprocess.run(["python3", "-c", "import importlib.util, torch, transformers, tokenizers; "
                            f"print([name for name in {absent!r} if importlib.util.find_spec(name)])"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0 and probe.stdout.split() == ["[]"], probe.stdout + probe.stderr[-2000:]
    return env


def run_sh(root: Path, env: dict[str, str], *arguments: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("bash"), "bench/gpu/run.sh", *arguments], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if ": error: " in line]


@pytest.mark.slow
def test_run_sh_on_a_gpu_like_machine_at_toy_size(shared_data, tmp_path):
    root, env = gpu_like_tree(tmp_path, shared_data), gpu_like_env(tmp_path)
    out = tmp_path / "gpu"
    result = run_sh(root, env, str(out), "--toy", "--device", "cpu")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert not error_lines(result), result.stderr[-4000:]
    assert f"mixture_of_tokens from {root}" in result.stdout
    results = json.loads((out / "gpu_results.json").read_text())
    assert results["complete"] is True and results["errors"] == {}
    assert list(results["runs"]) == MODELS
    runs = list(results["runs"].values())
    for run in runs:
        assert run["stopped"] is None and run["tokens"] == results["steps"] * results["batch"] * results["seq_len"]
        assert math.isfinite(run["final_eval_loss"]) and run["tokens_per_second"] > 0
        assert run["tokens_per_second_over"] == f"steps 3-{results['steps']}"  # warm-up steps left out
        assert [p["step"] for p in run["curve"]][0] == 0 and run["curve"][-1]["step"] == results["steps"]
        assert run["curve"][-1]["eval_loss"] < run["curve"][0]["eval_loss"]  # it learns
    # /16 splits each expert in 16: the same expert parameters, only the controller grows.
    dense, mot, mot16 = runs
    assert dense["parameters"] < mot["parameters"] < mot16["parameters"]
    assert mot16["config"]["num_experts"] == 16 * mot["config"]["num_experts"]
    assert results["epochs"] <= 2
    layer = results["layer"]
    assert set(layer["seconds"]) == {"bf16", "bf16_autocast"}
    granular = {"mot", "mot_32e_8", "mot_32e_16"}
    for precision, seconds in layer["seconds"].items():
        assert set(seconds) >= {"dense"} | granular | {f"{key}_{kind}" for key in granular
                                                        for kind in ("recompute", "views", "expert_major")}
        assert all(value > 0 for value in seconds.values())
        saved = layer["saved_bytes"][precision]
        for key in granular:  # recomputation saves less than keeping the merged and processed tokens
            assert saved[f"{key}_recompute"] < saved[key]
    assert [round(layer["rows"][key]["flop_floor"], 3) for key in ("mot", "mot_32e_8", "mot_32e_16")] == \
        [1.023, 1.188, 1.375]
    # Both layouts of the merged and processed tokens are timed, so the GPU says which it reads faster.
    assert layer["auto_layout"] == {"bf16": "expert_major", "bf16_autocast": "expert_major"}  # on this CPU
    assert {layer["rows"][f"mot_32e_16_{layout}"]["layout"] for layout in ("views", "expert_major")} == \
        {"views", "expert_major"}
    # The training step of dense and every granular variant, with and without recomputation, beside dense.
    steps = results["step_timing"]
    assert list(steps["rows"]) == ["transformer-medium"] + [f"mot-medium-32e{suffix}{recompute}"
                                                            for suffix in ("", "-8", "-16")
                                                            for recompute in ("", " recompute")]
    assert not steps["skipped"]
    for row in steps["rows"].values():
        assert row["seconds_per_step"] > 0 and row["step_over_dense"] > 0 and row["step_flop_floor"] >= 1
        assert len(row["step_seconds"]) == steps["warmup_steps"] + steps["timed_steps"]
    assert "warm-up" in results["tokens_per_second_note"]
    text = (out / "gpu_results.md").read_text()
    for run in runs:
        assert f"| {run['preset']} | " in text
    assert "x dense" in text and "Missing figures" not in text and "so far" not in text
    assert "| mot-medium-32e-16 recompute | " in text and "| MoT/32E/16 recompute | " in text
    assert "| MoT/32E/16 views | " in text and "| MoT/32E/16 expert-major | " in text
    assert not [path.name for path in out.iterdir() if path.name.endswith(".tmp")]  # written atomically


def test_a_missing_figure_fails_the_command_and_says_why(shared_data, tmp_path):
    """bench/layer.py failing: one line names the figure and the reason, the rest is still measured and written."""
    root, env = gpu_like_tree(tmp_path, shared_data), gpu_like_env(tmp_path)
    (root / "bench" / "layer.py").write_text('raise RuntimeError("broken on purpose by the test")\n')
    out = tmp_path / "gpu"
    result = run_sh(root, env, str(out), "--toy", "--device", "cpu", "--models", "transformer-medium",
                    "--steps", "3")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-4000:]
    lines = error_lines(result)
    assert len(lines) == 1 and "missing figure layer" in lines[0], result.stderr[-4000:]
    assert "RuntimeError: broken on purpose by the test" in lines[0]
    results = json.loads((out / "gpu_results.json").read_text())
    assert results["layer"] is None and list(results["errors"]) == ["layer"]
    assert "broken on purpose" in results["layer_stderr_tail"]
    run = results["runs"]["transformer-medium"]
    assert run["tokens"] == 3 * results["batch"] * results["seq_len"] and run["tokens_per_second"] > 0
    assert "Missing figures" in (out / "gpu_results.md").read_text()


def test_run_sh_refuses_in_one_line_what_it_cannot_run_with(shared_data, tmp_path):
    root, env = gpu_like_tree(tmp_path, None), gpu_like_env(tmp_path)

    def refusal(*arguments: str, **extra_env: str) -> str:
        result = run_sh(root, {**env, **extra_env}, str(tmp_path / "out"), *arguments, timeout=300)
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bench/gpu/run.sh: error: "), result.stderr[-2000:]
        return lines[0]

    assert "bench/gpu/prepare.sh" in refusal("--toy")  # no corpus in bench/gpu/data/
    data = root / "bench" / "gpu" / "data"
    data.mkdir()
    (data / "eltec_eng_level1_body.txt.gz").symlink_to(shared_data / "eltec_eng" / "eltec_eng_level1_body.txt.gz")
    assert "no python3.99 on PATH" in refusal("--toy", PYTHON="python3.99")
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    for name in ("torch", "transformers"):
        assert re.search(rf'"{name}>=[0-9]', text)
        pyproject.write_text(re.sub(rf'"{name}>=[0-9.]+', f'"{name}>=99.0', text))
        assert re.search(rf"{name} \S+ is older than 99.0, the lower bound in pyproject.toml", refusal("--toy"))
    pyproject.write_text(text)
    (root / "mixture_of_tokens" / "__init__.py").write_text("raise ImportError('broken on purpose by the test')\n")
    assert "mixture_of_tokens does not import" in refusal("--toy")


def test_compare_refuses_a_missing_corpus(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu" / "compare.py"), "--toy", "--corpus",
                             str(tmp_path / "none.txt.gz"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "does not exist" in result.stderr
