"""Distributed runs on two CPU processes (gloo): `mot train --fsdp "full_shard auto_wrap"` and the full, unsharded
model it saves; transformers' expert parallelism on the Token Choice experts at inference.

accelerate (1.16) turns `--fsdp` into FSDP only on accelerators (MULTI_GPU, MULTI_XPU, ...): on CPU workers it
silently trains with DDP. To exercise the real FSDP2 path on CPU, the launcher below lets accelerate's FSDP plugin
apply to MULTI_CPU (gloo) too and then runs `mot train` unchanged; the test checks FSDP really ran (Trainer wrote
its FSDP checkpoint files) so it cannot pass on a silent DDP fallback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

# Run as `torchrun ... launcher.py train ARGS`: `mot train ARGS` with FSDP allowed on CPU workers.
LAUNCHER = """\
import sys

import accelerate.state
from accelerate.utils import DistributedType

_accelerator_state_init = accelerate.state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

from mixture_of_tokens.cli import main  # noqa: E402

sys.exit(main())
"""

# A small model (2 dense + 2 routed blocks) and a few steps: seconds per process on a shared 2-core CPU.
SMALL_MODEL = [
    "--preset", "tiny-mot", "--hidden_size", "64", "--intermediate_size", "128", "--num_experts", "4",
    "--expert_size", "128", "--group_size", "4", "--max_position_embeddings", "64",
]
MODELS = {
    "mot": [],
    "token_choice": ["--mlp_types", "dense,token_choice,dense,token_choice", "--num_experts_per_tok", "2",
                     "--capacity_factor", "2.0"],
}
STEPS = 3


RUN_TIMEOUT = 150  # s; a run takes 15-40 s on a shared 2-core CPU


def run_and_reap(command: list[str], *, cwd: Path, env: dict, timeout: float) -> tuple[int | None, str, float]:
    """Run `command` with its output in a file; returns (exit status, or None if it ran past `timeout`, output,
    seconds). Whatever it leaves running is killed by process id: torchrun starts each worker in a session of its
    own, so neither killing torchrun nor its process group reaches a hung worker."""
    import psutil  # an accelerate dependency

    log = cwd / "run.log"
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as handle:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            if process.poll() is None:  # not reaped yet, so these ids are still its own and its workers'
                launcher = psutil.Process(process.pid)
                for leftover in [*launcher.children(recursive=True), launcher]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        leftover.kill()
                process.wait()
    output = log.read_text(encoding="utf-8", errors="replace")
    if returncode is None:
        output += f"\n[still running after {timeout} s: killed]"
    return returncode, output, time.monotonic() - started


@pytest.mark.slow  # 20-40 s a variant
@pytest.mark.parametrize("variant", list(MODELS))
def test_fsdp_full_shard_auto_wrap_two_cpu_processes(tmp_path, variant, free_port):
    from transformers import AutoModelForCausalLM

    import mixture_of_tokens  # noqa: F401  (registers the model type with the Auto classes)
    from mixture_of_tokens import MoTForCausalLM

    launcher = tmp_path / "fsdp_cpu_launcher.py"
    launcher.write_text(LAUNCHER, encoding="utf-8")
    out = tmp_path / "out"
    train_args = [
        "train", "--output_dir", str(out), *SMALL_MODEL, *MODELS[variant], "--train_tokenizer", "300",
        "--block_size", "32", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--max_steps", str(STEPS), "--eval_steps", str(STEPS), "--save_steps", str(STEPS), "--max_eval_blocks", "16",
        "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--dataloader_num_workers", "0",
        "--use_cpu", "true", "--fsdp", "full_shard auto_wrap",
    ]
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(launcher), *train_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO),
           "TOKENIZERS_PARALLELISM": "false"}
    returncode, output, seconds = run_and_reap(command, cwd=tmp_path, env=env, timeout=RUN_TIMEOUT)
    assert returncode == 0, f"exit {returncode} after {seconds:.0f} s\n{output[-6000:]}"

    # FSDP really ran: Trainer's FSDP path writes the gathered model and the FSDP optimizer state into checkpoints.
    checkpoint = out / f"checkpoint-{STEPS}"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file(), sorted(p.name for p in checkpoint.iterdir())
    assert (checkpoint / "optimizer.bin").is_file()
    results = json.loads((out / "train_results.json").read_text())
    assert results["world_size"] == 2 and math.isfinite(results["eval_loss"])

    # The output folder and the checkpoint are ordinary model folders: the model's own class in auto_map and its
    # code files, not FSDP2's `FSDPMoTForCausalLM` and torch's `_fsdp_*.py` (which `trust_remote_code` cannot load).
    for folder in (out, checkpoint):
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mot.MoTForCausalLM", (folder, config["auto_map"])
        assert not list(folder.glob("_fsdp*.py")), sorted(p.name for p in folder.glob("*.py"))

    # A full, unsharded save: every parameter whole, equal to what FSDP gathered for the same step's checkpoint.
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model) is MoTForCausalLM
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    saved = load_file(out / "model.safetensors")
    gathered = torch.load(checkpoint / "pytorch_model_fsdp.bin", map_location="cpu", weights_only=True)
    state = model.state_dict()
    assert {name for name, _ in model.named_parameters()} <= saved.keys()
    assert saved.keys() <= state.keys() and saved.keys() <= gathered.keys()
    reference = MoTForCausalLM(model.config).state_dict()  # fresh weights: only the shapes matter
    for name, tensor in saved.items():
        assert tensor.shape == reference[name].shape, name
        assert torch.equal(state[name], tensor), name
        assert torch.equal(gathered[name].to(tensor.dtype), tensor), name

    model.eval()
    group = model.config.group_size
    input_ids = torch.randint(0, model.config.vocab_size, (group, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (group, 16, model.config.vocab_size)
    assert torch.isfinite(logits).all()


# Run as `torchrun ... EP_SCRIPT FOLDER PLAN_JSON`: the saved model with its experts split over the processes.
EP_SCRIPT = """\
import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import mixture_of_tokens  # noqa: F401

folder, plan = sys.argv[1], json.loads(sys.argv[2])
config = DistributedConfig(ep_size=2, tp_plan={}, ep_plan=plan)
model = AutoModelForCausalLM.from_pretrained(folder, distributed_config=config).eval()
experts = {name: tuple(p.to_local().shape) for name, p in model.named_parameters() if ".mlp.experts." in name}
with torch.no_grad():
    logits = model(torch.load(f"{folder}/input_ids.pt")).logits
torch.save({"logits": logits, "experts": experts}, f"{folder}/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
"""
# What `DistributedConfig` needs for our experts (MoTConfig has no `base_model_ep_plan` of its own).
EP_PLAN = {
    "model.layers.*.mlp.experts.up_proj": "grouped_gemm",
    "model.layers.*.mlp.experts.down_proj": "grouped_gemm",
    "model.layers.*.mlp.experts": "ep_dispatch_experts",
}


def test_expert_parallel_token_choice_inference_two_cpu_processes(tmp_path, free_port):
    """Each process holds half of every Token Choice layer's experts (`ep_size=2`) and the dropless eval forward,
    which goes through the experts' `forward`, gives the single-process logits."""
    from mixture_of_tokens import MoTConfig, MoTForCausalLM

    torch.manual_seed(0)
    config = MoTConfig.from_preset("tiny-mot", vocab_size=128, hidden_size=32, intermediate_size=64, num_experts=4,
                                   expert_size=32, num_experts_per_tok=2, max_position_embeddings=32,
                                   mlp_types=["dense", "token_choice", "dense", "token_choice"])
    model = MoTForCausalLM(config).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.save(input_ids, folder / "input_ids.pt")
    with torch.no_grad():
        expected = model(input_ids).logits
    script = tmp_path / "ep_inference.py"
    script.write_text(EP_SCRIPT, encoding="utf-8")

    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), str(folder), json.dumps(EP_PLAN)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    returncode, output, seconds = run_and_reap(command, cwd=tmp_path, env=env, timeout=RUN_TIMEOUT)
    assert returncode == 0, f"exit {returncode} after {seconds:.0f} s\n{output[-6000:]}"

    for rank in range(2):
        result = torch.load(folder / f"rank{rank}.pt", weights_only=True)
        assert result["experts"] == {
            f"model.layers.{layer}.mlp.experts.{name}": (2, *model.get_parameter(
                f"model.layers.{layer}.mlp.experts.{name}").shape[1:])
            for layer in (1, 3) for name in ("up_proj", "down_proj")
        }
        torch.testing.assert_close(result["logits"], expected, rtol=1e-5, atol=1e-5)
