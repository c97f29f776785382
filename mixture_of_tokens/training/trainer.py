"""`MoTTrainer`: Hugging Face `Trainer` with routing telemetry, crash-safe checkpoints and optimizer-state
continuation (transition tuning), used by `mot train` and `mot transition` (train.py).

Apart from train.py because importing `Trainer` takes seconds: `mot train --help` needs only the arguments.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints
from transformers.utils import logging

from ..folders.model_folder import TRAINER_STATE_FILE
from ..utils import UserError, apply_umask
from .telemetry import RoutingTelemetryCallback

logger = logging.get_logger(__name__)

STAGING_CHECKPOINTS = ".checkpoint-staging"  # Trainer writes a checkpoint here, then it is renamed into place


def find_optimizer_checkpoint(path: str | os.PathLike) -> Path | None:
    """The Trainer checkpoint holding `optimizer.pt` at `path`: the folder itself or, for a run folder, its last
    `checkpoint-N`. None if there is none (then a transition starts a fresh optimizer)."""
    path = Path(path)
    if (path / "optimizer.pt").is_file():
        return path
    last = get_last_checkpoint(str(path)) if path.is_dir() else None
    return Path(last) if last and (Path(last) / "optimizer.pt").is_file() else None


def checkpoint_global_step(checkpoint: str | os.PathLike) -> int:
    with open(Path(checkpoint) / TRAINER_STATE_FILE, encoding="utf-8") as handle:
        return int(json.load(handle)["global_step"])


class MoTTrainer(Trainer):
    """`Trainer` plus:

    - routing telemetry (`RoutingTelemetryCallback`, first among the callbacks so every logger sees it);
    - crash-safe checkpoints: each `checkpoint-N` is written into a staging folder and renamed into place only
      when complete, so an interrupted save never shadows the last good checkpoint;
    - `init_optimizer_from`: start from another run's AdamW moments and continue its learning-rate schedule
      (transition tuning; the authors keep the optimizer state and do not restart the schedule). The schedule
      is built for `source_step + max_steps` steps and starts at `source_step`; hyper-parameters (peak LR,
      betas, weight decay) are this run's.
    """

    def __init__(self, *args, init_optimizer_from: str | os.PathLike | None = None, plots_at_end: bool = True,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.telemetry = RoutingTelemetryCallback(write_plots_at_end=plots_at_end)
        self.callback_handler.callbacks.insert(0, self.telemetry)
        self.init_optimizer_from = None
        if init_optimizer_from is not None:
            self.init_optimizer_from = find_optimizer_checkpoint(init_optimizer_from)
            if self.init_optimizer_from is None:
                raise UserError(f"--init_optimizer_from {str(init_optimizer_from)!r}: no Trainer checkpoint with "
                                "optimizer.pt there")
        self._staging_run_dir: str | None = None

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        return self._staging_run_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        staging_root = os.path.join(run_dir, STAGING_CHECKPOINTS)
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)  # leftovers of a crashed save
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = staging_root
        try:
            super()._save_checkpoint(model, trial)  # every process writes its part (RNG state) into staging
        finally:
            self._staging_run_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
            apply_umask(staged)  # transformers writes the weights private (0600)
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging_root):
                self.state.best_model_checkpoint = self.state.best_model_checkpoint.replace(staging_root, run_dir, 1)
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_FILE))
            if os.path.exists(final):  # re-saving a step (e.g. after a resume): retire the old copy first
                retired = os.path.join(staging_root, f"{name}.old")
                shutil.rmtree(retired, ignore_errors=True)
                os.replace(final, retired)
                os.replace(staged, final)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.replace(staged, final)  # the one atomic step that publishes the checkpoint
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
            with contextlib.suppress(OSError):
                os.rmdir(staging_root)  # only when empty
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # FSDP2 swaps the model's class for a generated subclass (FSDPMoTForCausalLM, defined in torch's modules);
        # saved as such, the folder's auto_map and code files would name torch's class. Save under our own class.
        model = self.accelerator.unwrap_model(self.model)
        wrapped = type(model)
        own = next((cls for cls in wrapped.__mro__ if not cls.__module__.startswith("torch.")
                    and not cls.__name__.startswith("FSDP")), wrapped)
        model.__class__ = own
        try:
            super()._save(output_dir, state_dict)
        finally:
            model.__class__ = wrapped

    # -- continuing another run's optimizer ---------------------------------------------------------------------
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is not None or self.init_optimizer_from is None:
            return super().create_scheduler(num_training_steps, optimizer)
        source_step = checkpoint_global_step(self.init_optimizer_from)
        scheduler = super().create_scheduler(num_training_steps + source_step, optimizer)
        continue_optimizer(optimizer or self.optimizer, scheduler, self.init_optimizer_from, source_step)
        return scheduler


def continue_optimizer(optimizer, scheduler, checkpoint: Path, source_step: int) -> None:
    """Load the optimizer state (moments, step counts) of `checkpoint` and move `scheduler` to `source_step`."""
    state = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    own_hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as error:
        raise UserError(f"the optimizer state in {checkpoint} does not fit this model ({error}); it must come "
                        "from a run of the same architecture (same parameters in the same order)") from error
    for group, hyperparameters in zip(optimizer.param_groups, own_hyperparameters, strict=True):
        group.update(hyperparameters)
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        logger.warning(f"{type(scheduler).__name__} cannot be moved to step {source_step}; it starts from 0")
        return
    scheduler.last_epoch = source_step
    learning_rates = [base * schedule(source_step) for base, schedule in zip(scheduler.base_lrs, lambdas, strict=True)]
    for group, learning_rate in zip(optimizer.param_groups, learning_rates, strict=True):
        group["lr"] = learning_rate
    scheduler._last_lr = learning_rates
    logger.info(f"continuing optimizer state and LR schedule of {checkpoint} from step {source_step}")
