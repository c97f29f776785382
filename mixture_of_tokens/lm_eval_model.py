"""An lm-evaluation-harness model for Mixture of Tokens checkpoints, registered as `mot`.

Why not the stock `hf` model: a MoT layer mixes the tokens of `group_size` sequences of a batch (DESIGN.md §4).
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
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm
from transformers.utils import logging

logger = logging.get_logger(__name__)

BATCH_DEPENDENT_MLP_TYPES = ("mot", "expert_choice")

BATCHING_RULE = (
    "per task; requests sorted by (document, choice); consecutive batches of batch_size rows; "
    "MoT group j = rows j*group_size..j*group_size+group_size-1 of a batch; right padding masked"
)


def is_batch_dependent(config) -> bool:
    """Whether a model's output for one sequence depends on the other sequences of its batch."""
    return any(kind in BATCH_DEPENDENT_MLP_TYPES for kind in getattr(config, "mlp_types", None) or ())


@register_model("mot")
class MoTLM(HFLM):
    """`HFLM` with masked, fixed-composition batches for MoT models.

    `pretrained` is a loaded `MoTForCausalLM` or a model folder (loaded from safetensors; `mot_routing` then
    overrides the saved routing, e.g. `discrete`). From the lm-eval command line:
    `lm_eval --model mot --model_args pretrained=DIR,batch_size=8 --tasks piqa` (after `import mixture_of_tokens`).
    """

    def __init__(self, pretrained, tokenizer=None, batch_size: int | str | None = None, mot_routing: str | None = None,
                 device: str | None = None, **kwargs):
        if isinstance(pretrained, (str, Path)):
            from .evaluation import load_model_and_tokenizer

            pretrained, loaded_tokenizer = load_model_and_tokenizer(pretrained, mot_routing=mot_routing)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        elif mot_routing is not None:
            raise ValueError("mot_routing applies when loading from a folder; set config.mot_routing before loading")
        if device is not None:
            pretrained = pretrained.to(device)
        if batch_size in (None, "auto"):
            # A full group is what the model was trained with; "auto" would make the groups depend on memory.
            batch_size = pretrained.config.group_size
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, batch_size=int(batch_size), **kwargs)
        self._model.eval()
        self.batch_dependent = is_batch_dependent(self._model.config)

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


__all__ = ["MoTLM", "is_batch_dependent", "BATCHING_RULE"]
