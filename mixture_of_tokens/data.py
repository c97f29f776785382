"""Training data for `mot train`: load text (Hub dataset or local files), tokenise it and pack it into blocks.

Sources, in the order they are recognised:
- nothing (`--dataset` not given): the Python documentation topics shipped with the standard library
  (`pydoc_data.topics`, ~0.5 MB of English text), so a first run needs no download and no data path;
- a local file or folder: `.txt`, `.txt.gz` (one row per line; an empty line separates documents), `.jsonl`,
  `.jsonl.gz`, `.json`, `.parquet` (one row per document, text in `--text_column`);
- anything else is a Hub dataset id (e.g. `allenai/c4` with `--dataset_config en --streaming`).

Packing concatenates the tokens of consecutive documents, separated by the EOS token, and cuts the stream into
`block_size` tokens (the remainder of each `datasets.map` batch is dropped, as in transformers' run_clm).
Mapping is done with `datasets.map`, so the result of local files is cached and `num_proc` parallelises it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .utils import UserError

# file suffix -> datasets builder; longest suffixes first so ".txt.gz" wins over ".gz"
LOCAL_FORMATS = {
    ".txt.gz": "text", ".txt": "text",
    ".jsonl.gz": "json", ".jsonl": "json", ".json.gz": "json", ".json": "json",
    ".parquet": "parquet",
}
DEFAULT_SOURCE = "pydoc_data.topics (Python documentation bundled with the standard library)"
MAP_BATCH_SIZE = 1000  # rows per datasets.map call; packing drops < block_size tokens of each
# The novels corpus (ELTeC English, one gzipped text of novels separated by blank lines): its last novels are validation text, never trained on.
HELD_OUT_NOVELS = 3


def split_novels(corpus: Path) -> tuple[list[str], list[str]]:
    """The novels corpus (gzipped text, novels separated by blank lines) as (training novels, held-out novels): the
    one split of it that the reproduction and the GPU comparison use."""
    import gzip

    with gzip.open(corpus, "rt", encoding="utf-8") as handle:
        novels = [text.strip("\n") for text in handle.read().split("\n\n") if text.strip()]
    if len(novels) <= HELD_OUT_NOVELS:
        raise UserError(f"{corpus} holds {len(novels)} documents; need more than {HELD_OUT_NOVELS}")
    return novels[:-HELD_OUT_NOVELS], novels[-HELD_OUT_NOVELS:]


@dataclass
class DataArguments:
    """Where the training text comes from and how it becomes fixed-length blocks."""

    dataset: str | None = field(default=None, metadata={"help": (
        "Hub dataset id, or a local file/folder (.txt, .txt.gz, .jsonl, .jsonl.gz, .json, .parquet). "
        "Default: the Python docs text bundled with the standard library (pydoc_data.topics)."
    )})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration (e.g. 'en')."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text (json/parquet/Hub)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local file/folder used for evaluation."})
    validation_split_percentage: float = field(default=5.0, metadata={"help": (
        "Without --validation_file or a 'validation' split: the last N%% of the training rows (a contiguous "
        "slice, so whole documents are held out) become the validation set. 0 = no evaluation."
    )})
    block_size: int | None = field(default=None, metadata={"help": (
        "Tokens per training sequence; default and maximum: the model's max_position_embeddings."
    )})
    streaming: bool = field(default=False, metadata={"help": (
        "Stream the dataset instead of downloading/preparing it whole (large Hub datasets). Needs --max_steps."
    )})
    streaming_validation_rows: int = field(default=1000, metadata={"help": (
        "With --streaming and no validation split: the first N rows are held out for evaluation."
    )})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "num_proc of datasets.map."})
    max_train_blocks: int | None = field(default=None, metadata={"help": "Keep at most N training blocks."})
    max_eval_blocks: int | None = field(default=None, metadata={"help": "Keep at most N validation blocks."})
    tokenizer_training_chars: int = field(default=50_000_000, metadata={"help": (
        "With --train_tokenizer: train it on at most this many characters of the training text."
    )})


@dataclass
class RawText:
    """Training (and validation) rows before tokenisation, and how to read them."""

    train: object  # datasets.Dataset or datasets.IterableDataset
    validation: object | None
    source: str
    rows_are_lines: bool  # True for .txt: rows are lines, an empty line ends a document


def pydoc_topics_lines() -> list[str]:
    """The Python documentation topics that ship with CPython (`pydoc_data.topics`) as the rows of a .txt file
    would be: one row per line (keeping its "\n"), an empty row between two topics. Line rows let the held-out
    validation slice be a fixed share of the text rather than of the 79 very unequal topics."""
    from pydoc_data.topics import topics

    rows: list[str] = []
    for name in sorted(topics):
        rows.extend(line for line in topics[name].strip("\n").splitlines(keepends=True) if line.strip())
        rows.append("")
    return rows


def _local_format(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, builder in LOCAL_FORMATS.items():
        if name.endswith(suffix):
            return builder
    return None


def looks_local(spec: str) -> bool:
    """A path the user meant as local (so "not found" must not fall through to the Hub). A Hub dataset id is `name`
    or `owner/name`: one slash alone does not make a path."""
    path = Path(spec).expanduser()
    return (path.is_absolute() or spec.startswith((".", "~")) or spec.count("/") > 1 or "\\" in spec
            or spec.lower().endswith(tuple(LOCAL_FORMATS)) or path.exists())


def public_source(spec: str | None) -> str:
    """A training source as a public model card names it: a Hub dataset id as is, local data by its file name only
    (its path would show the author's file system), no `--dataset` as the bundled text."""
    if spec is None:
        return DEFAULT_SOURCE
    return f"local data `{Path(spec).expanduser().name}`" if looks_local(spec) else spec


def resolve_local_files(spec: str) -> tuple[str, list[str]]:
    """`(builder, files)` for a local file or folder; one clear error if missing, unsupported or mixed."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"data path {spec!r} does not exist (expected a file or folder with "
                        f"{', '.join(LOCAL_FORMATS)} files, or a Hub dataset id)")
    files = sorted(p for p in path.rglob("*") if p.is_file() and _local_format(p)) if path.is_dir() else [path]
    if not files:
        raise UserError(f"folder {spec!r} holds no data file; supported: {', '.join(LOCAL_FORMATS)}")
    builders = {_local_format(p) for p in files}
    if None in builders:
        raise UserError(f"unsupported data file {str(path)!r}; supported suffixes: {', '.join(LOCAL_FORMATS)}")
    if len(builders) > 1:
        raise UserError(f"folder {spec!r} mixes formats ({', '.join(sorted(builders))}); use one kind of file")
    if all(p.stat().st_size == 0 for p in files):
        raise UserError(f"dataset {spec!r} is empty: it has no rows of text")
    return builders.pop(), [str(p) for p in files]


def _load_local(spec: str, streaming: bool):
    from datasets import load_dataset

    builder, files = resolve_local_files(spec)
    kwargs = {"keep_linebreaks": True} if builder == "text" else {}
    try:
        dataset = load_dataset(builder, data_files=files, split="train", streaming=streaming, **kwargs)
    except Exception as error:  # datasets raises many types for unreadable files; report one clear message
        raise UserError(f"could not read {spec!r} as {builder}: {error}") from error
    return dataset, builder == "text"


def _load_hub(args: DataArguments):
    from datasets import load_dataset

    try:
        return load_dataset(args.dataset, args.dataset_config, streaming=args.streaming)
    except Exception as error:  # offline, unknown id, missing config...: all the same to the user
        raise UserError(
            f"could not load Hub dataset {args.dataset!r}"
            + (f" (config {args.dataset_config!r})" if args.dataset_config else "")
            + f": {error}. For local data pass a path to an existing file or folder."
        ) from error


def column_names(dataset) -> list[str]:
    """Column names, also for streamed datasets whose features are only known after reading a row."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    return [] if first is None else list(first)


def load_raw_text(args: DataArguments) -> RawText:
    """Training/validation rows as described by `args`; raises UserError for missing/empty/ill-formed data."""
    from datasets import Dataset

    if args.dataset is None:
        if args.streaming:
            raise UserError("--streaming needs --dataset (the bundled default text is tiny)")
        train, source, rows_are_lines = Dataset.from_dict({args.text_column: pydoc_topics_lines()}), DEFAULT_SOURCE, True
        validation = None
    elif looks_local(args.dataset):
        train, rows_are_lines = _load_local(args.dataset, args.streaming)
        source, validation = args.dataset, None
    else:
        loaded = _load_hub(args)
        if "train" not in loaded:
            raise UserError(f"Hub dataset {args.dataset!r} has no 'train' split; splits: {', '.join(loaded)}")
        train, source, rows_are_lines = loaded["train"], args.dataset, False
        validation = loaded.get("validation")

    check_text_column(train, args.text_column, source)
    if args.validation_file is not None:
        validation, _ = _load_local(args.validation_file, args.streaming)
        check_text_column(validation, args.text_column, args.validation_file)
    elif validation is None and args.validation_split_percentage > 0:
        train, validation = split_off_validation(train, args, source)
    return RawText(train=train, validation=validation, source=source, rows_are_lines=rows_are_lines)


def check_text_column(dataset, text_column: str, source: str) -> None:
    if not is_streaming(dataset) and len(dataset) == 0:
        raise UserError(f"dataset {source!r} is empty: it has no rows of text")
    columns = column_names(dataset)
    if not columns:
        raise UserError(f"dataset {source!r} is empty: it has no rows of text")
    if text_column not in columns:
        raise UserError(f"text column {text_column!r} not found in {source!r}; its columns are "
                        f"{', '.join(columns)}. Pass --text_column NAME")


def is_streaming(dataset) -> bool:
    from datasets import IterableDataset

    return isinstance(dataset, IterableDataset)


def split_off_validation(train, args: DataArguments, source: str):
    """Hold out the end of the training rows (contiguous, so documents are not shared between the two)."""
    if not 0 < args.validation_split_percentage < 100:
        raise UserError(f"--validation_split_percentage must be in [0, 100), got {args.validation_split_percentage}")
    if is_streaming(train):
        held_out = args.streaming_validation_rows
        return train.skip(held_out), train.take(held_out)
    num_validation = max(1, round(len(train) * args.validation_split_percentage / 100))
    if num_validation >= len(train):
        raise UserError(f"dataset {source!r} has only {len(train)} rows: too few to hold out "
                        f"{args.validation_split_percentage}% for validation; pass --validation_split_percentage 0 "
                        "or --validation_file")
    cut = len(train) - num_validation
    return train.select(range(cut)), train.select(range(cut, len(train)))


def iter_texts(dataset, text_column: str, max_chars: int) -> Iterator[str]:
    """Texts of `dataset` until `max_chars` characters have been yielded (for tokenizer training)."""
    total = 0
    for row in dataset:
        text = row[text_column]
        if not text:
            continue
        yield text
        total += len(text)
        if total >= max_chars:
            return


class BlockPacker:
    """`datasets.map` function: tokenise a batch of rows and pack the tokens into `block_size` blocks.

    A class rather than a closure so that datasets can fingerprint it (and reuse its cache) deterministically.
    """

    def __init__(self, tokenizer, text_column: str, block_size: int, rows_are_lines: bool):
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.block_size = block_size
        self.rows_are_lines = rows_are_lines
        self.separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def __call__(self, batch: dict[str, list]) -> dict[str, list[list[int]]]:
        texts = [text or "" for text in batch[self.text_column]]
        token_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        stream: list[int] = []
        for text, ids in zip(texts, token_ids, strict=True):
            if self.rows_are_lines:
                # Lines keep their "\n"; an empty line is the boundary between two documents.
                stream.extend(ids if text.strip() else self.separator)
            else:
                stream.extend(ids)
                stream.extend(self.separator)
        usable = len(stream) // self.block_size * self.block_size
        return {"input_ids": [stream[i : i + self.block_size] for i in range(0, usable, self.block_size)]}


def pack_blocks(dataset, tokenizer, args: DataArguments, block_size: int, rows_are_lines: bool, description: str):
    """Tokenised, packed blocks (`input_ids` only; labels are made by `collate_blocks`)."""
    packer = BlockPacker(tokenizer, args.text_column, block_size, rows_are_lines)
    remove = column_names(dataset)
    if is_streaming(dataset):
        return dataset.map(packer, batched=True, batch_size=MAP_BATCH_SIZE, remove_columns=remove)
    return dataset.map(
        packer, batched=True, batch_size=MAP_BATCH_SIZE, remove_columns=remove,
        num_proc=args.preprocessing_num_workers, desc=f"Tokenising and packing {description} into {block_size}-token blocks",
    )


def limit_blocks(dataset, limit: int | None):
    if limit is None:
        return dataset
    if is_streaming(dataset):
        return dataset.take(limit)
    return dataset.select(range(min(limit, len(dataset))))


def require_blocks(blocks, source: str, block_size: int, what: str) -> int:
    """Number of blocks; one clear error if the text is too short for even one block."""
    if is_streaming(blocks):
        if next(iter(blocks), None) is None:
            raise UserError(f"{what} text of {source!r} yields no block of {block_size} tokens")
        return -1  # unknown for a stream
    if len(blocks) == 0:
        raise UserError(f"{what} text of {source!r} is shorter than one block of {block_size} tokens; "
                        "give more text or a smaller --block_size")
    return len(blocks)


def collate_blocks(features: list[dict]) -> dict[str, torch.Tensor]:
    """Stack equal-length blocks; labels are the inputs (the model shifts them). No padding, so no mask."""
    input_ids = torch.tensor([feature["input_ids"] for feature in features], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}
