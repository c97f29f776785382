"""`mot eval`: zero-shot lm-evaluation-harness tasks (stock PIQA, HellaSwag, ARC-Easy) and perplexity on a text file.

    mot eval MODEL --tasks piqa,hellaswag,arc_easy [--limit N] [--batch_size B] [--data_dir DIR] [--output FILE.json]
    mot eval MODEL --perplexity FILE [--block_size N]

Scores of a Mixture of Tokens model depend on which sequences share a group (docs/design.md, "Batch dependence"); `mixture_of_tokens.
lm_eval_model.MoTLM` fixes and records that composition. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..folders.model_folder import EVAL_RESULTS_FILE, check_mot_routing, load_model_and_tokenizer
from ..utils import UserError, atomic_write_text

# torch, transformers and lm-eval are imported where they are used, so that `mot eval --help` answers at once.
from . import eval_data

DEFAULT_TASKS = ("piqa", "hellaswag", "arc_easy")


# --------------------------------------------------------------------------------------------------- tasks
def parse_tasks(text: str) -> list[str]:
    tasks = [name.strip() for name in text.split(",") if name.strip()]
    if not tasks:
        raise UserError(f"--tasks must name at least one task, got {text!r}")
    return tasks


# Folder of each paper task inside lm_eval/tasks: indexing only these takes a fraction of a second, where scanning
# every task lm-eval ships takes many seconds.
STOCK_TASK_FOLDERS = {"piqa": "piqa", "hellaswag": "hellaswag", "arc_easy": "arc"}


@dataclass
class PreparedTasks:
    """Validated tasks, ready for `simple_evaluate`; built before the model loads so bad input fails fast."""

    names: list[str]
    task_manager: object  # lm_eval.tasks.TaskManager
    specs: list  # task names (Hub data) or stock task configs pointing at local files
    sources: dict  # task -> where its documents come from


def make_task_manager(tasks: list[str]):
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    if set(tasks) <= set(STOCK_TASK_FOLDERS):
        root = Path(lm_eval.tasks.__file__).parent
        return TaskManager(include_defaults=False, include_path=[str(root / STOCK_TASK_FOLDERS[t]) for t in tasks])
    return TaskManager()


def prepare_tasks(tasks: list[str], data_dir: str | None = None, cache_dir: Path | None = None) -> PreparedTasks:
    """Check the task names (and data files), and build the specs.

    Online, a spec is the stock task's name. With `data_dir`, it is the stock task's own YAML (prompt, process_docs,
    metrics) with only the dataset location replaced by the converted local file.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    if data_dir is not None:
        for task in tasks:
            if task not in eval_data.LOCAL_TASKS:
                raise UserError(f"unknown task {task!r} for --data_dir; local tasks are: {', '.join(eval_data.LOCAL_TASKS)}")
        data_dir = eval_data.check_data_dir(data_dir, tasks)
    task_manager = make_task_manager(tasks)
    if data_dir is None:
        known = set(task_manager.all_tasks)
        for task in tasks:
            if task not in known:
                raise UserError(f"unknown task {task!r}; the paper's tasks are {', '.join(DEFAULT_TASKS)} "
                                "(any lm-eval task name works online; `lm-eval ls tasks` lists them)")
        check_hub_datasets(tasks, task_manager)
        return PreparedTasks(list(tasks), task_manager, list(tasks),
                             {task: "hub (the stock task's dataset_path)" for task in tasks})
    specs, sources = [], {}
    for task in tasks:
        data_file = eval_data.prepare_local_file(task, data_dir, cache_dir)
        config = load_yaml(task_manager.task_index[task].yaml_path, resolve_func=True)
        config.update(eval_data.local_task_overrides(task, data_file))
        specs.append(config)
        sources[task] = {"converted_file": str(data_file),
                         "release_files": [str(data_dir / f) for f in eval_data.LOCAL_TASKS[task].files]}
    return PreparedTasks(list(tasks), task_manager, specs, sources)


HUB_PROBE_SECONDS = 5.0


def check_hub_datasets(tasks: list[str], task_manager) -> None:
    """Stop at once, in one line, when the tasks' Hub datasets cannot be reached (offline machine, HF_HUB_OFFLINE=1),
    instead of lm-eval's retries and traceback; the line names the dataset and the offline way."""
    from huggingface_hub import HfApi
    from lm_eval.tasks._yaml_loader import load_yaml

    for task in tasks:
        dataset = load_yaml(task_manager.task_index[task].yaml_path, resolve_func=False).get("dataset_path")
        if not isinstance(dataset, str) or Path(dataset).exists():
            continue
        try:
            HfApi().dataset_info(dataset, timeout=HUB_PROBE_SECONDS)
        except Exception as error:  # offline mode, no route, DNS, timeout: all mean "use the local files"
            reason = type(error).__name__
            raise UserError(
                f"task {task!r} needs the Hub dataset {dataset!r}, which cannot be fetched here ({reason}); evaluate "
                f"offline with --data_dir DIR or {eval_data.DATA_ENV}=DIR (a folder with the original releases: "
                "piqa/valid.jsonl and valid-labels.lst, hellaswag/hellaswag_val.jsonl, arc_easy/ARC-Easy-Test.jsonl)"
            ) from error


def make_lm(model, tokenizer, backend: str, batch_size: int | None):
    """`mot` (our MoTLM: masked, fixed groups for MoT) or `hf` (lm-eval's stock HFLM, for comparison)."""
    from .lm_eval_model import MoTLM, preloaded_model_quietly

    if backend == "hf":
        from lm_eval.models.huggingface import HFLM

        # backend="causal": left to detect it, HFLM warns that `mot` is not one of transformers' own CausalLM types.
        with preloaded_model_quietly():
            return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size or 1, backend="causal")

    return MoTLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_tasks(model, tokenizer, tasks: list[str] | PreparedTasks, *, limit: int | None = None,
              batch_size: int | None = None, data_dir: str | None = None, backend: str = "mot",
              cache_dir: Path | None = None) -> dict:
    """Run lm-eval's `simple_evaluate`; return its results dict plus our metadata under `mot_eval`."""
    from lm_eval import evaluator

    from .lm_eval_model import git_commit_recorded_quietly

    prepared = tasks if isinstance(tasks, PreparedTasks) else prepare_tasks(tasks, data_dir, cache_dir)
    lm = make_lm(model, tokenizer, backend, batch_size)
    started = time.perf_counter()
    with git_commit_recorded_quietly():
        results = evaluator.simple_evaluate(model=lm, tasks=prepared.specs, limit=limit,
                                            task_manager=prepared.task_manager, log_samples=False)
    results["mot_eval"] = {
        "backend": backend,
        "data_sources": prepared.sources,
        "wall_time_s": round(time.perf_counter() - started, 2),
        **(lm.mot_metadata() if hasattr(lm, "mot_metadata") else {"batch_size": lm.batch_size}),
    }
    return results


def evaluate(model: str | Path, *, tasks: list[str] | tuple[str, ...] | PreparedTasks = DEFAULT_TASKS,
             data_dir: str | Path | None = None, limit: int | None = None, batch_size: int | None = None,
             backend: str = "mot", mot_routing: str | None = None, device: str | None = None,
             cache_dir: Path | None = None, output: str | Path | None = None) -> dict:
    """`mot eval MODEL --tasks ...` as a function: score the model folder zero-shot (offline with `data_dir`, default
    $MOT_EVAL_DATA), write the results to `output` (JSON) if given, and return lm-eval's results dict plus our
    metadata under `mot_eval`."""
    if data_dir is None:
        data_dir = os.environ.get(eval_data.DATA_ENV) or None  # as `mot eval` reads it
    prepared = tasks if isinstance(tasks, PreparedTasks) else prepare_tasks(
        list(tasks), None if data_dir is None else str(data_dir), cache_dir)
    loaded, tokenizer = load_model_and_tokenizer(model, mot_routing=mot_routing, device=device)
    results = run_tasks(loaded, tokenizer, prepared, limit=limit, batch_size=batch_size, backend=backend)
    results["mot_eval"]["model"] = str(model)
    if output is not None:
        write_json_atomically(results, output)
    return results


# --------------------------------------------------------------------------------------------------- perplexity
def perplexity(model, tokenizer, text_file, *, block_size: int | None = None, batch_size: int | None = None) -> dict:
    """Mean next-token loss over every block of `text_file` packed exactly as `mot train` packs training text
    (`mixture_of_tokens.data`: documents joined by EOS, cut into `block_size` blocks), and its exponential.

    Blocks are full, so nothing is padded; for a MoT model, consecutive blocks share batches of `batch_size`
    (default `group_size`), which the result records. Any format `mot train` reads works (.txt[.gz], .jsonl, ...).
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from ..data import DataArguments, load_raw_text, pack_blocks, require_blocks
    from .lm_eval_model import is_batch_dependent

    config = model.config
    block_size = block_size or config.max_position_embeddings
    if not 2 <= block_size <= config.max_position_embeddings:
        raise UserError(f"--block_size must be between 2 and max_position_embeddings={config.max_position_embeddings}, "
                        f"got {block_size}")
    group_size = getattr(config, "group_size", None)
    batch_size = batch_size or group_size or 8
    data_args = DataArguments(dataset=str(text_file), validation_split_percentage=0, block_size=block_size)
    raw = load_raw_text(data_args)
    blocks = pack_blocks(raw.train, tokenizer, data_args, block_size, raw.rows_are_lines, "the perplexity text")
    require_blocks(blocks, str(text_file), block_size, "perplexity")
    blocks = blocks.with_format("torch")["input_ids"]
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in tqdm(range(0, len(blocks), batch_size), desc="Perplexity", unit="batch"):
            batch = blocks[start : start + batch_size].to(model.device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            total_loss += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                reduction="sum"))
            total_tokens += targets.numel()
    mean_loss = total_loss / total_tokens
    return {
        "file": str(text_file), "loss": mean_loss, "perplexity": math.exp(mean_loss), "predicted_tokens": total_tokens,
        "blocks": len(blocks), "block_size": block_size, "batch_size": batch_size,
        "group_size": group_size if is_batch_dependent(config) else None,
    }


# --------------------------------------------------------------------------------------------------- outputs
def _to_json(data) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(data, indent=2, default=handle_non_serializable, ensure_ascii=False)


def write_json_atomically(data, destination) -> None:
    """Write the whole file under a temporary name, then rename: a crash never leaves half a JSON file."""
    atomic_write_text(destination, _to_json(data) + "\n")


# The settings a score depends on: scores from runs that differ in any of them are never mixed in one file.
CARD_SETTINGS = ("backend", "batch_dependent", "batch_size", "group_size", "mot_routing", "limit", "data")


def card_record(results: dict | None, ppl: dict | None) -> dict:
    """What `eval_results.json` holds, in the lm-eval style the card module reads: `results` (task -> lm-eval
    metrics, unchanged) and flat `metadata` (settings shown next to the table)."""
    metadata: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    task_results: dict = {}
    if results is not None:
        meta = results["mot_eval"]
        metadata.update({key: meta.get(key) for key in CARD_SETTINGS if key in meta})
        metadata["limit"] = results.get("config", {}).get("limit")
        metadata["data"] = "local release files" if any(isinstance(s, dict) for s in meta["data_sources"].values()) \
            else "Hugging Face Hub"
        task_results = {task: dict(metrics) for task, metrics in results["results"].items()}
    if ppl is not None:
        metadata.update({"perplexity": round(ppl["perplexity"], 4), "perplexity_loss": round(ppl["loss"], 4),
                         "perplexity_file": Path(ppl["file"]).name, "perplexity_block_size": ppl["block_size"]})
    return {"results": task_results, "metadata": metadata}


def store_for_card(model_dir, record: dict) -> Path:
    """Merge `record` into MODEL/eval_results.json and refresh the model card.

    Tasks evaluated again replace their old scores; when the settings differ from the stored ones (another batch
    size, routing, limit, ...), the old scores are dropped instead, so every number in the file shares the settings
    written beside it.
    """
    path = Path(model_dir) / EVAL_RESULTS_FILE
    stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    old_meta = stored.get("metadata", {})
    new_meta = record["metadata"]
    same_settings = record["results"] == {} or all(old_meta.get(k) == new_meta.get(k) for k in CARD_SETTINGS)
    merged_results = {**stored.get("results", {}), **record["results"]} if same_settings else dict(record["results"])
    merged_meta = {**old_meta, **new_meta} if same_settings else new_meta
    write_json_atomically({"results": merged_results, "metadata": merged_meta}, path)
    from ..folders.cards import refresh_card  # the card reads eval_results.json into its table and model-index

    print(f"refreshed the model card {refresh_card(model_dir)}")
    return path


# --------------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mot eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Batch dependence of MoT scores: see docs/evaluation.md.")
    parser.add_argument("model", help="model folder (config.json, *.safetensors, tokenizer)")
    parser.add_argument("--tasks", help=f"comma-separated lm-eval tasks (default {','.join(DEFAULT_TASKS)} unless "
                                        "only --perplexity is given)")
    parser.add_argument("--limit", type=int, help="first N documents of each task (for quick checks)")
    parser.add_argument("--batch_size", type=int,
                        help="sequences per forward; MoT scores depend on it (default: the model's group_size)")
    parser.add_argument("--data_dir", default=os.environ.get(eval_data.DATA_ENV) or None,
                        help=f"offline: folder with piqa/, hellaswag/, arc_easy/ in their release formats (default: "
                             f"${eval_data.DATA_ENV} if set, else the Hub)")
    parser.add_argument("--output", help="write lm-eval's results dict plus our metadata (`mot_eval`) to this JSON")
    parser.add_argument("--perplexity", metavar="FILE", help="also (or only) report loss/perplexity on a .txt[.gz]")
    parser.add_argument("--block_size", type=int, help="perplexity block length (default max_position_embeddings)")
    parser.add_argument("--mot_routing", help="override the saved MoT routing (a value of MoTConfig.mot_routing); "
                                              "`discrete` is the temperature -> 0 limit")
    parser.add_argument("--backend", choices=("mot", "hf"), default="mot",
                        help="mot: masked fixed-group batches (default); hf: lm-eval's stock model, for comparison")
    parser.add_argument("--update_card", action="store_true",
                        help=f"store the scores in MODEL/{EVAL_RESULTS_FILE} and render the model card (README.md) anew")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--cache_dir", type=Path, help="where converted --data_dir files are cached "
                                                       "(default ~/.cache/mixture_of_tokens/eval_data or $MOT_CACHE)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_mot_routing(args.mot_routing)
    for name in ("limit", "batch_size", "block_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be a positive integer, got {value}")
    tasks = parse_tasks(args.tasks) if args.tasks is not None else ([] if args.perplexity else list(DEFAULT_TASKS))
    # Everything that can be wrong with the input is checked before the model loads.
    prepared = prepare_tasks(tasks, args.data_dir, args.cache_dir) if tasks else None
    if args.perplexity is not None and not Path(args.perplexity).is_file():
        raise UserError(f"--perplexity file {args.perplexity} does not exist")
    model, tokenizer = load_model_and_tokenizer(args.model, mot_routing=args.mot_routing, device=args.device)

    results = None
    if prepared is not None:
        results = run_tasks(model, tokenizer, prepared, limit=args.limit, batch_size=args.batch_size,
                            backend=args.backend)
        results["mot_eval"]["model"] = str(args.model)
        from lm_eval.utils import make_table

        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
        meta = results["mot_eval"]
        if meta.get("batch_dependent"):
            print(f"MoT scores: batch_size={meta['batch_size']}, group_size={meta['group_size']}, "
                  f"routing={meta['mot_routing']} (batch-dependent; see docs/evaluation.md)")
    ppl = None
    if args.perplexity is not None:
        ppl = perplexity(model, tokenizer, args.perplexity, block_size=args.block_size, batch_size=args.batch_size)
        print(f"perplexity {ppl['perplexity']:.3f} (loss {ppl['loss']:.4f}) over {ppl['predicted_tokens']} tokens "
              f"in {ppl['blocks']} blocks of {ppl['block_size']}")

    if args.output is not None:
        payload = dict(results) if results is not None else {"mot_eval": {"model": str(args.model)}}
        if ppl is not None:
            payload["mot_eval"]["perplexity"] = ppl
        write_json_atomically(payload, args.output)
        print(f"wrote {args.output}")
    if args.update_card:
        path = store_for_card(args.model, card_record(results, ppl))
        print(f"stored scores in {path}")
    return 0


__all__ = ["main", "evaluate", "load_model_and_tokenizer", "run_tasks", "perplexity", "prepare_tasks", "DEFAULT_TASKS"]
