"""An lm-evaluation-harness model for Mixture of Tokens checkpoints, registered as `mot`.

Why not the stock `hf` model: a MoT layer mixes the tokens of `group_size` sequences of a batch (docs/design.md, "Batch dependence").
lm-eval's `hf` model sorts requests by length, right-pads with token 0 and passes no attention mask, so a MoT
model's scores would depend on padding tokens and on a length-sorted batch composition nobody can reproduce.

`MoTLM` differs from `HFLM` only for batch-dependent models (any `mot` or `expert_choice` block):

* Batches are built in a fixed, documented order: requests are split by task, sorted by (document, choice), and
  cut into consecutive batches of `batch_size` rows; within a batch, rows `j*G .. j*G+G-1` form MoT group `j`.
  So the groups of a task never depend on sequence lengths or on which other tasks run in the same call, and a
  `--limit N` run reproduces the first batches of the full run exactly. The last batch of a task may be short
  (its last group is then smaller; the model warns).
* Every row is right-padded with an attention mask, so padding takes no part in any mixture and real tokens keep
  their positions.
* The batch size, group size and batching rule are written into lm-eval's results (`config.mot`).

Dense and Token Choice models (dropless and batch-independent in eval) go through `HFLM`'s code unchanged, so their
scores equal the stock `hf` model's.

From lm-eval's command line: `mot lm-eval --model mot --model_args pretrained=DIR [--batch_size B] --tasks ...`
(`mixture_of_tokens.evaluation.lm_eval_cli`), which registers this model and leaves the batch size, when none is given, to the
model's `group_size` instead of lm-eval's default of 1.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging as std_logging
import os
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm
from transformers.utils import logging

from ..utils import UserError

logger = logging.get_logger(__name__)
# Under lm-eval's logger, so its command line shows these lines (at INFO) with its own, and `mot eval` does not.
eval_logger = std_logging.getLogger("lm_eval.models.mot")

BATCHING_RULE = (
    "per task; requests sorted by (document, choice); consecutive batches of batch_size rows; "
    "MoT group j = rows j*group_size..j*group_size+group_size-1 of a batch; right padding masked"
)


def is_batch_dependent(config) -> bool:
    """Whether a model's output for one sequence depends on the other sequences of its batch."""
    return bool(getattr(config, "grouped_layer_types", None))


# --------------------------------------------------------------------------------------------------- quiet lm-eval
class _DropMessages(std_logging.Filter):
    """Drop the records of one logger whose message starts with one of `prefixes`; let everything else through."""

    def __init__(self, prefixes: Iterable[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# What HFLM logs whenever it is handed a loaded model rather than a name: other loading arguments may be ignored, and
# no accelerate launch is possible. Both are by design here (MoTLM refuses the loading arguments it would ignore), so
# the user could do nothing about them.
PRELOADED_MODEL_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)


@contextlib.contextmanager
def dropping_log_messages(logger_name: str, prefixes: Iterable[str]):
    """While the block runs, the logger `logger_name` drops the messages starting with `prefixes`, and only them."""
    log = std_logging.getLogger(logger_name)
    drop = _DropMessages(prefixes)
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def preloaded_model_quietly():
    """Build an `HFLM` from a loaded model without its two warnings about loaded models (see above)."""
    return dropping_log_messages("lm_eval.models.huggingface", PRELOADED_MODEL_WARNINGS)


def git_commit_quietly() -> str | None:
    """The commit lm-eval records with its results (`git describe --always` in the working folder, else the folder's
    .git/HEAD), asked without letting git print `fatal: not a git repository` when run outside a repository."""
    try:
        described = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=60)
        if described.returncode == 0:
            return described.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from lm_eval.loggers.utils import get_commit_from_path
    except ImportError:
        return None
    return get_commit_from_path(os.getcwd())


@contextlib.contextmanager
def git_commit_recorded_quietly():
    """While the block runs, `simple_evaluate` records the commit through `git_commit_quietly`."""
    import lm_eval.evaluator

    original = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = git_commit_quietly
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = original


# --------------------------------------------------------------------------------------------------- the model
# HFLM arguments that only act when HFLM loads a model from a name itself. MoTLM always hands HFLM a loaded model, so
# it refuses them rather than ignore them silently.
HFLM_LOADING_ARGUMENTS = ("revision", "subfolder", "parallelize", "max_memory_per_gpu", "max_cpu_memory",
                          "offload_folder", "tp_plan", "peft", "delta", "autogptq", "gptqmodel", "gguf_file")


def _torch_dtype(name) -> torch.dtype | None:
    """`dtype` as lm-eval's `hf` model takes it: None or "auto" (keep the saved one), a torch dtype or its name."""
    if name is None or name == "auto":
        return None
    value = name if isinstance(name, torch.dtype) else getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise UserError(f"dtype must be auto or a torch dtype such as float32, bfloat16 or float16, got {name!r}")
    return value


@register_model("mot")
class MoTLM(HFLM):
    """`HFLM` with masked, fixed-composition batches for MoT models.

    `pretrained` is a loaded `MoTForCausalLM` or a model folder (loaded from safetensors; `mot_routing` then
    overrides the saved routing, e.g. `discrete`, and `dtype` converts the weights). `batch_size` defaults to the
    model's `group_size`. From the command line: `mot lm-eval --model mot --model_args pretrained=DIR --tasks piqa`.
    """

    # Set by `mot lm-eval` when its command line names no batch size: lm-eval then passes its own default (1), which
    # for a MoT model would put every sequence in a group of its own; the model's group size applies instead.
    cli_batch_size_is_default: bool = False

    def __init__(self, pretrained, tokenizer=None, batch_size: int | str | None = None, mot_routing: str | None = None,
                 device: str | None = None, dtype=None, **kwargs):
        self._check_arguments(kwargs)
        torch_dtype = _torch_dtype(dtype)
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda:0 unless told otherwise; like its `hf` model, use the CPU then.
            device = "cpu"
        if isinstance(pretrained, (str, Path)):
            from ..folders.model_folder import load_model_and_tokenizer

            pretrained, loaded_tokenizer = load_model_and_tokenizer(pretrained, mot_routing=mot_routing, device=device)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        elif mot_routing is not None:
            raise ValueError("mot_routing applies when loading from a folder; set config.mot_routing before loading")
        elif device is not None:
            pretrained = pretrained.to(device)
        if torch_dtype is not None:
            pretrained = pretrained.to(torch_dtype)
        if batch_size in (None, "auto"):
            # A full group is what the model was trained with; "auto" would make the groups depend on memory.
            batch_size = pretrained.config.group_size
        with preloaded_model_quietly():
            # The backend is known (a causal LM); left to HFLM, it would warn that the type is not a stock CausalLM.
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, batch_size=int(batch_size), backend="causal",
                             **kwargs)
        self._model.eval()
        self.batch_dependent = is_batch_dependent(self._model.config)
        # Where lm-eval records the batch sizes it used (its summary line prints them after --batch_size, which may
        # be its default rather than ours). HFLM reads this dict only for batch_size="auto", never the case here.
        self.batch_sizes = {0: self.batch_size}
        if self.batch_dependent:
            eval_logger.info("MoT model: batch size %d, group size %d; the scores depend on both (docs/evaluation.md)",
                             self.batch_size, self._model.config.group_size)

    @staticmethod
    def _check_arguments(kwargs: dict) -> None:
        if kwargs.get("backend", "causal") not in ("causal", "default"):
            raise UserError(f"the mot model is a causal LM; backend must be causal, got {kwargs['backend']!r}")
        kwargs.pop("backend", None)
        accepted = set(inspect.signature(HFLM.__init__).parameters) - set(HFLM_LOADING_ARGUMENTS) - {"self", "kwargs"}
        refused = sorted(set(kwargs) - accepted)
        if refused:
            raise UserError(f"the mot model does not take {', '.join(refused)} (it loads model folders itself); it "
                            f"takes pretrained, mot_routing, dtype, device, batch_size and {', '.join(sorted(accepted - {'pretrained', 'dtype', 'device', 'batch_size'}))}")

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        # lm-eval's command line adds its own batch size and device to --model_args; an argument given in
        # --model_args wins (lm-eval would stop with "got multiple values"), and so does the group size over lm-eval's
        # default batch size (see cli_batch_size_is_default).
        additional = {key: value for key, value in (additional_config or {}).items()
                      if value is not None and key not in arg_dict}
        if cls.cli_batch_size_is_default:
            additional.pop("batch_size", None)
        return cls(**arg_dict, **additional)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ----------------------------------------------------------------------------------------------- metadata
    def mot_metadata(self) -> dict:
        """What the scores depend on; written into lm-eval's results under `config.mot`."""
        config = self._model.config
        return {
            "batch_dependent": self.batch_dependent,
            "batch_size": self.batch_size,
            "group_size": config.group_size if self.batch_dependent else None,
            "batching": BATCHING_RULE if self.batch_dependent else "lm-eval hf default (batch-independent model)",
            "mlp_types": list(config.mlp_types),
            "mot_routing": config.mot_routing if "mot" in config.mlp_types else None,
        }

    def get_model_info(self) -> dict:
        # HFLM's version asks the Hub for a commit hash, which hangs or fails offline; a local folder has none.
        return {
            "model_num_parameters": sum(p.numel() for p in self._model.parameters()),
            "model_dtype": str(self._model.dtype),
            "mot": self.mot_metadata(),
        }

    # ----------------------------------------------------------------------------------------------- scoring
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if not self.batch_dependent:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        # Each task is batched on its own, in (document, choice) order: see the module docstring.
        order = sorted(range(len(requests)), key=lambda i: (requests[i].task_name or "", requests[i].doc_id, requests[i].idx))
        results: list = [None] * len(requests)
        for _, positions in itertools.groupby(order, key=lambda i: requests[i].task_name or ""):
            positions = list(positions)
            scores = super().loglikelihood([requests[i] for i in positions], disable_tqdm=disable_tqdm)
            for position, score in zip(positions, scores, strict=True):
                results[position] = score
        return results

    def _loglikelihood_tokens(self, requests: Sequence, disable_tqdm: bool = False, override_bs: int | None = None):
        requests = [self._fit_window(request) for request in requests]
        if not self.batch_dependent:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        batch_size = override_bs or self.batch_size
        answers = []
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                  desc="Running loglikelihood requests (MoT, fixed groups)") as progress:
            for start in range(0, len(requests), batch_size):
                batch = requests[start : start + batch_size]
                answers.extend(self._score_batch(batch))
                progress.update(len(batch))
        for (request, _, _), answer in zip(requests, answers, strict=True):
            if request is not None:  # rolling-loglikelihood windows have no cache key
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return answers

    def _fit_window(self, request):
        """A continuation longer than the context window cannot be scored whole (HFLM stops with an assertion);
        score its last `max_length` tokens, each with the full window before it, and say so."""
        text, context, continuation = request
        if len(continuation) <= self.max_length:
            return request
        logger.warning_once(f"Some continuations exceed the model's context of {self.max_length} tokens; only their "
                            f"last {self.max_length} tokens are scored.")
        cut = len(continuation) - self.max_length
        return text, context + continuation[:cut], continuation[cut:]

    def _score_batch(self, batch: Sequence) -> list[tuple[float, bool]]:
        """Log-probability and greedy match of each continuation, one right-padded, masked forward pass."""
        rows = []
        for _, context, continuation in batch:
            if not context or not continuation:
                raise ValueError("a loglikelihood request needs a non-empty context and continuation")
            # As HFLM: truncate from the left to max_length + 1 tokens, feed all but the last.
            rows.append((context + continuation)[-(self.max_length + 1):][:-1])
        width = max(map(len, rows))
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)  # the pad id is irrelevant: it is masked
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, tokens in enumerate(rows):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            attention_mask[row, : len(tokens)] = 1
        with torch.no_grad():
            logits = self._model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                 use_cache=False).logits
        log_probs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        answers = []
        for row, (tokens, (_, _, continuation)) in enumerate(zip(rows, batch, strict=True)):
            # The continuation is predicted at the last len(continuation) real positions of the row.
            predicted = log_probs[row, len(tokens) - len(continuation) : len(tokens)]
            target = torch.tensor(continuation, device=predicted.device)
            log_prob = predicted.gather(-1, target.unsqueeze(-1)).sum()
            answers.append((float(log_prob), bool((predicted.argmax(-1) == target).all())))
        return answers


__all__ = ["MoTLM", "is_batch_dependent", "BATCHING_RULE", "preloaded_model_quietly", "git_commit_recorded_quietly",
           "dropping_log_messages"]
