"""Loading a tokenized corpus (a folder or Hub dataset repo of Parquet shards) with ``datasets``.

:func:`load_corpus` is a thin, checked layer over ``datasets.load_dataset("parquet", ...)``: it finds
the shards, reads every shard's Parquet footer (cheap: no data pages) to check that it is a readable
hf-scfm shard written with the same tokenizer settings as the others, then hands the files to
``load_dataset``. Everything ``datasets`` offers afterwards (map, filter, set_format, push_to_hub)
works as usual. Helpers here add what pretraining needs on top: holding out cells by a column
(:func:`split_by_column`), one part of the data per process (:func:`split_by_node`), and batches of
similar length (:class:`LengthGroupedBatchSampler`, :func:`length_grouping_arguments`). Collated batches straight
from the Arrow data are :func:`hf_scfm.data.streaming.iter_batches`.

A Hub dataset repo id resolves to ``hf://datasets/<repo>/data/*.parquet`` through ``huggingface_hub``'s
file system; from there the code path is the same as for a local folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CorpusFormatError",
    "load_corpus",
    "corpus_files",
    "read_shard_metadata",
    "split_by_column",
    "split_by_node",
    "LengthGroupedBatchSampler",
    "length_grouping_arguments",
]

#: Key of the JSON document each shard keeps in its Parquet key-value metadata.
METADATA_KEY = b"hf_scfm"
#: Columns every shard holds, whatever obs columns were chosen.
REQUIRED_COLUMNS = ("input_ids", "values", "length")
DATA_DIR = "data"
SHARD_GLOB = "train-*.parquet"


class CorpusFormatError(ValueError):
    """A shard is unreadable, not an hf-scfm shard, or inconsistent with the rest of the corpus."""


def _is_remote(path: str) -> bool:
    return "://" in path


def corpus_files(path_or_repo_id: str | os.PathLike, *, revision: str | None = None) -> list[str]:
    """The shard files of a corpus, sorted: ``<dir>/data/train-*.parquet`` of a local folder (or the
    ``.parquet`` files of a folder that holds shards directly), or the same in a Hub dataset repo."""
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        for folder in (os.path.join(path, DATA_DIR), path):
            if os.path.isdir(folder):
                files = sorted(
                    os.path.join(folder, f)
                    for f in os.listdir(folder)
                    if f.endswith(".parquet") and not f.startswith(".")
                )
                if files:
                    return files
        raise FileNotFoundError(
            f"No Parquet shards in {path!r} (looked in {os.path.join(path, DATA_DIR)!r} and {path!r}). "
            "Build a corpus first: hf_scfm.data.build_corpus(inputs, tokenizer, out_dir)."
        )
    if os.path.isfile(path) and path.endswith(".parquet"):
        return [path]
    looks_like_repo = path.count("/") == 1 and not path.startswith((".", "/", "~")) and "\\" not in path
    if os.path.exists(path) or not looks_like_repo:
        raise FileNotFoundError(
            f"{path!r} is neither a corpus folder, a Parquet shard, nor a Hub dataset repo id ('user/name')."
        )
    # A Hub dataset repo id ("user/name"), through huggingface_hub's fsspec file system.
    from huggingface_hub import HfFileSystem

    fs = HfFileSystem()
    root = f"datasets/{path}" + (f"@{revision}" if revision else "")
    files = sorted(fs.glob(f"{root}/{DATA_DIR}/{SHARD_GLOB}"))
    if not files:
        raise FileNotFoundError(f"No shards {DATA_DIR}/{SHARD_GLOB} in the Hub dataset repo {path!r}.")
    return [f"hf://{f}" for f in files]


def _open(path: str):
    if _is_remote(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def read_shard_metadata(path: str) -> tuple[dict[str, Any], Any]:
    """``(hf-scfm metadata dict, Arrow schema)`` of one shard, from its Parquet footer only.

    Raises :class:`CorpusFormatError` naming the file when it is not a readable Parquet file (a
    truncated or corrupt shard, e.g. from a copy that did not finish) or carries no hf-scfm metadata.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with _open(path) as fh:
            meta = pq.read_metadata(fh)
            schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as err:
        raise CorpusFormatError(
            f"Shard {path!r} is not a readable Parquet file ({type(err).__name__}: {err}). It is truncated or "
            "corrupt: delete it and re-run build_corpus with the same arguments (finished shards are kept), "
            "or re-download it."
        ) from err
    raw = (meta.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise CorpusFormatError(
            f"Shard {path!r} has no hf-scfm metadata: it was not written by hf_scfm.data.build_corpus. "
            "Load plain Parquet files with datasets.load_dataset('parquet', ...) instead."
        )
    info = json.loads(raw)
    if info.get("n_cells") is not None and info["n_cells"] != meta.num_rows:
        raise CorpusFormatError(f"Shard {path!r} holds {meta.num_rows} rows but its metadata says {info['n_cells']}.")
    return info, schema


def _diff(a: Mapping, b: Mapping) -> str:
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k))


def validate_corpus(files: Sequence[str], tokenizer=None) -> dict[str, Any]:
    """Check every shard's footer; return the corpus's tokenizer settings.

    Every shard must be readable, hold the columns ``input_ids``, ``values``, ``length``, have the
    same schema as the first shard, and record the same tokenizer settings. When ``tokenizer`` is
    given, its vocabulary checksum must match the corpus's. Errors name the offending file.
    """
    first_info, first_schema, first_file = None, None, None
    for path in files:
        info, schema = read_shard_metadata(path)
        missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
        if missing:
            raise CorpusFormatError(f"Shard {path!r} lacks the column(s) {missing}; every shard needs {list(REQUIRED_COLUMNS)}.")
        if first_info is None:
            first_info, first_schema, first_file = info, schema, path
            continue
        if info.get("tokenizer") != first_info.get("tokenizer"):
            raise CorpusFormatError(
                f"Shard {path!r} was tokenized with different settings than {first_file!r} "
                f"({_diff(info.get('tokenizer') or {}, first_info.get('tokenizer') or {})}). A corpus must use one "
                "tokenizer: rebuild the odd shards with the same tokenizer or keep them in separate corpora."
            )
        if not schema.equals(first_schema, check_metadata=False):
            raise CorpusFormatError(
                f"Shard {path!r} has columns {schema} but {first_file!r} has {first_schema}. All shards of a corpus need "
                "the same columns and types (build them with the same obs_columns)."
            )
    settings = dict(first_info.get("tokenizer") or {})
    if tokenizer is not None:
        expected = getattr(tokenizer, "vocab_checksum", None)
        if settings.get("vocab_checksum") is not None and expected is not None and settings["vocab_checksum"] != expected:
            raise CorpusFormatError(
                f"The corpus was built with vocabulary checksum {settings['vocab_checksum']} but the tokenizer has "
                f"{expected}: token ids would map to the wrong genes. Use the tokenizer the corpus was built with "
                "(saved in the corpus card) or rebuild the corpus."
            )
    return settings


def load_corpus(
    path_or_repo_id: str | os.PathLike,
    *,
    streaming: bool = False,
    columns: Sequence[str] | None = None,
    shuffle: bool = False,
    seed: int = 0,
    buffer_size: int = 10_000,
    tokenizer=None,
    validate: bool = True,
    revision: str | None = None,
    cache_dir: str | None = None,
    num_proc: int | None = None,
):
    """Load a corpus built by :func:`hf_scfm.data.build_corpus` as a ``datasets`` dataset.

    Args:
        path_or_repo_id: the corpus folder (holding ``data/train-*.parquet`` and ``README.md``), a folder
            of shards, or a Hub dataset repo id (``"user/my-corpus"``).
        streaming: ``True`` returns an ``IterableDataset`` that reads the shards lazily (nothing is
            copied into the cache; memory stays flat); ``False`` a map-style ``Dataset`` (the shards are
            converted once into the ``datasets`` Arrow cache, then memory-mapped).
        columns: load only these columns (e.g. ``["input_ids", "values", "length"]``); faster.
        shuffle: shuffle the cells. Map-style: a full permutation. Streaming: the shard order is
            shuffled and cells go through a shuffle buffer of ``buffer_size`` cells (call
            ``ds.set_epoch(epoch)`` each epoch for a new order).
        seed: seed of the shuffle.
        buffer_size: size of the streaming shuffle buffer, in cells.
        tokenizer: when given, the corpus's vocabulary checksum must match it.
        validate: read every shard's footer first and check the corpus is consistent (see
            :func:`validate_corpus`); errors name the offending file.
        revision: branch, tag or commit of a Hub repo.
        cache_dir, num_proc: passed to ``load_dataset`` (map-style only for ``num_proc``).

    Returns:
        ``datasets.Dataset`` or ``datasets.IterableDataset`` with one row per cell. The tokenizer
        settings the corpus was built with are in ``ds.info.description`` (JSON) when validated.
    """
    import datasets

    files = corpus_files(path_or_repo_id, revision=revision)
    settings = validate_corpus(files, tokenizer=tokenizer) if validate else None
    if columns is not None:
        columns = list(columns)
        available = read_shard_metadata(files[0])[1].names
        missing = [c for c in columns if c not in available]
        if missing:
            raise ValueError(f"Column(s) {missing} are not in the corpus (its columns: {available}).")
    kwargs: dict[str, Any] = {"data_files": {"train": files}, "split": "train", "streaming": streaming}
    if columns is not None:
        kwargs["columns"] = columns
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    if num_proc is not None and not streaming:
        kwargs["num_proc"] = num_proc
    ds = datasets.load_dataset("parquet", **kwargs)
    if settings is not None:
        ds.info.description = json.dumps({"hf_scfm_tokenizer": settings}, sort_keys=True)
    if shuffle:
        ds = ds.shuffle(seed=seed, buffer_size=buffer_size) if streaming else ds.shuffle(seed=seed)
    return ds


def _check_column(dataset, column: str) -> None:
    names = dataset.column_names
    if names is not None and column not in names:
        raise ValueError(
            f"Column {column!r} is not in the dataset (columns: {names}). Choose one of those, or rebuild the corpus "
            f"with obs_columns including {column!r}."
        )


def split_by_column(dataset, column: str, held_out: Iterable[Any] | Any):
    """Hold out whole groups of cells: ``(kept, held)`` where ``held`` has the cells whose ``column``
    value is in ``held_out`` (e.g. a donor, a study, a source file) and ``kept`` all others.

    Works on map-style and streaming datasets (lazily for streaming); the two parts never share a
    cell. Errors name a missing column, and values of ``held_out`` not present in a map-style dataset.
    """
    _check_column(dataset, column)
    if isinstance(held_out, (str, bytes)) or not isinstance(held_out, Iterable):
        held_out = [held_out]
    held = set(held_out)
    if not held:
        raise ValueError("held_out is empty: name at least one value of the column to hold out.")
    import datasets

    if isinstance(dataset, datasets.Dataset):
        present = set(dataset.unique(column))
        absent = held - present
        if absent:
            raise ValueError(f"Value(s) {sorted(map(str, absent))} do not occur in column {column!r} (values: {sorted(map(str, present))}).")
        flags = np.isin(np.asarray(dataset[column], dtype=object), list(held))
        return dataset.select(np.flatnonzero(~flags)), dataset.select(np.flatnonzero(flags))
    kept = dataset.filter(lambda v: v not in held, input_columns=[column])
    heldout = dataset.filter(lambda v: v in held, input_columns=[column])
    return kept, heldout


def split_by_node(dataset, rank: int, world_size: int):
    """This process's part of ``dataset`` for multi-GPU training (``datasets.distributed.split_dataset_by_node``).

    Streaming: when the number of shards is a multiple of ``world_size`` each rank reads its own
    shards (the efficient case); otherwise every rank reads all shards and keeps one cell in
    ``world_size``, which is correct but reads ``world_size`` times the data, so a warning says so.
    Map-style: each rank gets a contiguous block of rows. In both cases no cell goes to two ranks.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}.")
    import warnings

    import datasets
    from datasets.distributed import split_dataset_by_node

    if isinstance(dataset, datasets.IterableDataset) and dataset.num_shards % world_size:
        warnings.warn(
            f"The streaming corpus has {dataset.num_shards} shards, not a multiple of world_size={world_size}: every "
            "rank will read all shards and skip the other ranks' cells. Build the corpus with a shard count that "
            "divides evenly for each rank to read only its own shards.",
            stacklevel=2,
        )
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


class LengthGroupedBatchSampler:
    """Batches of cells of similar length, for a map-style corpus (use as ``DataLoader(batch_sampler=...)``).

    Shuffles the cells (seeded), cuts the order into mega-batches of ``mega_batch_size`` batches,
    sorts each mega-batch by the ``length`` column and cuts it into batches, then shuffles the
    batches. Padding then stays small while batches remain random draws from the corpus. The
    longest batch comes first, so an out-of-memory error shows up at step 1, not hours in.

    Args:
        lengths: the ``length`` column (``dataset["length"]``) or any sequence of ints.
        batch_size: cells per batch.
        mega_batch_size: batches per sorting window (larger: less padding, less randomness).
        seed: shuffle seed; :meth:`set_epoch` changes the order per epoch.
        drop_last: drop the last, smaller batch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, mega_batch_size: int = 50, seed: int = 0,
                 drop_last: bool = False):
        if batch_size < 1 or mega_batch_size < 1:
            raise ValueError(f"batch_size and mega_batch_size must be positive, got {batch_size}, {mega_batch_size}.")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise ValueError("lengths must be a non-empty 1-D sequence (the corpus's 'length' column).")
        self.batch_size, self.mega_batch_size = batch_size, mega_batch_size
        self.seed, self.epoch, self.drop_last = seed, 0, drop_last

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        window = self.batch_size * self.mega_batch_size
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches = [b for b in batches if len(b) == self.batch_size]
        perm = rng.permutation(len(batches))
        longest = int(np.argmax([self.lengths[b].max() for b in batches]))
        first = int(np.flatnonzero(perm == longest)[0])
        perm[0], perm[first] = perm[first], perm[0]
        for i in perm:
            yield batches[i].tolist()


def length_grouping_arguments(length_column: str = "length") -> dict[str, Any]:
    """Keyword arguments for ``transformers.TrainingArguments`` that make the Trainer batch cells of
    similar length, reading the corpus's precomputed ``length`` column (no pass over the data).

    transformers 5 spells it ``train_sampling_strategy="group_by_length"``; 4.x ``group_by_length=True``.
    Only map-style datasets are grouped (the Trainer ignores it for streaming ones).
    """
    from transformers import TrainingArguments

    fields = getattr(TrainingArguments, "__dataclass_fields__", {})
    if "train_sampling_strategy" in fields:
        return {"train_sampling_strategy": "group_by_length", "length_column_name": length_column}
    return {"group_by_length": True, "length_column_name": length_column}
