"""Routing telemetry for Trainer: per-layer MoT / Token Choice / Expert Choice statistics in the logs, and plots.

`RoutingTelemetryCallback` reads the routing statistics that every routed layer records while training (forward
hooks on the layers' `routing_stats` modules; nothing in the model or its config is switched), averages them over the logging window (like Trainer's loss) and adds them to every training log
as `routing/layer_{i}/{statistic}`: mixing-weight entropy, max weight and (if learned) temperature of MoT
layers; expert load, dropped fraction, router entropy and aux loss of Token Choice layers; the fraction of
tokens no expert picked for Expert Choice. The callback puts itself first among the callbacks, so the
reporting integrations (TensorBoard, W&B, ...) and `trainer.state.log_history` see these values.

`write_training_plots` draws the loss curves and the routing statistics of a `log_history` into PNG files.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict

from transformers import TrainerCallback

PREFIX = "routing/layer_"
# Statistics worth a log line; the rest of the model's stats (vectors such as expert_load) stay out of the logs.
LOGGED_STATS = {
    "mot": ("mixing_entropy", "max_weight", "temperature"),
    "token_choice": ("expert_load_max", "dropped_fraction", "router_entropy", "aux_loss"),
    "expert_choice": ("unprocessed_fraction",),
}
PLOT_FILES = ("loss.png", "routing.png")


class RoutingTelemetryCallback(TrainerCallback):
    """Logs per-layer routing statistics of a `MoTForCausalLM` (no-op for a dense model)."""

    def __init__(self, write_plots_at_end: bool = True):
        self.write_plots_at_end = write_plots_at_end
        self._hooks = []
        self._sums: dict = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)
        self._config = None

    # -- wiring ------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.remove_hooks()
        self._config = getattr(model, "config", None)
        layers = getattr(getattr(model, "model", None), "layers", None)
        if self._config is None or layers is None:
            return
        for index, block in enumerate(layers):
            mlp_type = self._config.mlp_types[index]
            if mlp_type in LOGGED_STATS:
                self._hooks.append(block.mlp.routing_stats.register_forward_hook(self._make_hook(index, mlp_type)))

    def on_train_end(self, args, state, control, **kwargs):
        self.remove_hooks()
        if self.write_plots_at_end and state.is_world_process_zero:
            write_training_plots(state.log_history, args.output_dir)

    def remove_hooks(self):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _make_hook(self, index: int, mlp_type: str):
        def hook(module, inputs, stats):
            # A routed layer hands its statistics to its `routing_stats` module on every training step.
            if not module.training:
                return
            values = {name: value for name, value in stats.items() if getattr(value, "numel", lambda: 0)() == 1}
            if mlp_type == "mot" and self._config.learnable_temperature == "off":
                values.pop("temperature", None)  # a constant is not worth a log line
            for name in LOGGED_STATS[mlp_type]:
                if name in values:
                    key = f"{PREFIX}{index}/{name}"
                    # Kept as tensors until the log, so collecting never forces a device synchronisation.
                    self._sums[key] = self._sums[key] + values[name].detach().float()
                    self._counts[key] += 1

        return hook

    # -- logging -----------------------------------------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self._sums or "loss" not in logs:
            return  # evaluation logs, or nothing collected since the last training log
        means = {key: float(self._sums[key]) / self._counts[key] for key in self._sums}
        self._sums.clear()
        self._counts.clear()
        logs.update(means)
        # Trainer appended a copy of `logs` to the history just before calling us; keep the history complete
        # (it is saved in checkpoints, so the plots of a resumed run still cover the whole run).
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(means)


def _series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in log_history
              if key in entry and "step" in entry and math.isfinite(float(entry[key]))]
    return [p[0] for p in points], [float(p[1]) for p in points]


def _save_figure(figure, path: str) -> None:
    # Write beside the target and rename, so a crash never leaves a truncated PNG.
    temporary = f"{path}.partial-{os.getpid()}.png"
    figure.savefig(temporary, dpi=110, bbox_inches="tight")
    os.replace(temporary, path)


def write_training_plots(log_history: list[dict], folder: str | os.PathLike) -> list[str]:
    """`loss.png` (train and eval loss vs step) and, for routed models, `routing.png` (one panel per statistic,
    one line per layer). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    written = []
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        steps, values = _series(log_history, key)
        if steps:
            axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy (nats/token)")
    axis.set_title("Loss")
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:  # a run too short to log a loss has nothing to label
        axis.legend()
    path = os.path.join(folder, "loss.png")
    _save_figure(figure, path)
    plt.close(figure)
    written.append(path)

    keys = sorted({key for entry in log_history for key in entry if key.startswith(PREFIX)})
    statistics = sorted({key.split("/")[-1] for key in keys})
    if statistics:
        figure, axes = plt.subplots(len(statistics), 1, figsize=(6.5, 2.6 * len(statistics)), squeeze=False)
        for axis, statistic in zip(axes[:, 0], statistics, strict=True):
            for key in (k for k in keys if k.endswith("/" + statistic)):
                steps, values = _series(log_history, key)
                axis.plot(steps, values, label=key[len("routing/"):].rsplit("/", 1)[0].replace("_", " "))
            axis.set_title(statistic.replace("_", " "))
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
            axis.legend(fontsize="small")
        figure.tight_layout()
        path = os.path.join(folder, "routing.png")
        _save_figure(figure, path)
        plt.close(figure)
        written.append(path)
    return written
