"""Building a tokenized corpus: h5ad files / folders / AnnData -> Parquet shards + a dataset card.

Layout of a corpus folder (a valid Hub dataset repo, loadable with ``load_dataset(<folder>)``,
``load_dataset("parquet", data_dir=<folder>)`` or :func:`hf_scfm.data.load_corpus`)::

    README.md                                   dataset card: dataset_info features, tokenizer
                                                settings, cells per source and per label
    tokenizer/                                  the tokenizer the corpus was built with
    data/train-<source:05d>-<shard:05d>.parquet one row per cell

Each row: ``input_ids`` (list of int32), ``values`` (list of float32), ``length`` (int32: tokens
including special tokens, what the Trainer's length grouping reads), ``cell_id`` (the obs name),
the chosen obs columns, and ``source_file``. Unpadded: collators pad per batch.

Choices, and why:

* **Streaming reads.** Each file is opened in backed mode and read ``chunk_size`` cells at a time,
  so memory depends on the chunk, not the file or corpus size. Each chunk becomes one Parquet row
  group; ``shard_size`` cells make one shard file.
* **Deterministic shards.** Shard ``k`` of source ``i`` always holds cells ``[k * shard_size,
  (k + 1) * shard_size)`` of that source, cut into the same chunks, and every encoding is seeded per
  cell, so re-running gives byte-identical files.
* **Resumable and atomic.** A shard is written to a hidden temporary file in ``data/`` and renamed
  into place once complete (``os.replace`` is atomic), so a loader never sees half a shard. A re-run
  keeps every finished shard whose footer says it was built from the same source, cell range and
  tokenizer settings, and rebuilds the rest. Leftover temporary files are removed.
* **Metadata in the footer.** Each shard's Parquet key-value metadata holds (key ``hf_scfm``) the
  tokenizer settings, its source and cell range and label counts. The loader validates a corpus and
  the card is written from the footers alone, without reading cell data.
* **Pipelined.** Within one process a background thread reads and tokenizes the next chunk while the
  calling thread writes the previous one to Parquet (h5py + the tokenizer's compiled kernel on one
  core, Arrow's encoder and zstd on another); chunks are written in order, so the files do not depend on
  it. ``GeneTokenizer.encode_flat`` hands over unpadded flat arrays, which become Arrow list columns as is.
* **Parallel by file, or by row range.** ``num_proc > 1`` builds several sources at once in spawned
  processes (safe with torch and threads, unlike fork); each loads the tokenizer saved in
  ``out_dir/tokenizer``. With fewer sources than processes, a source's shards are split into runs of
  consecutive shards (row ranges) over the processes. Every shard is written whole by one process, so
  the result is byte-identical to a serial build whatever ``num_proc``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .loading import DATA_DIR, METADATA_KEY, CorpusFormatError, read_shard_metadata

__all__ = ["build_corpus", "CorpusBuildReport", "tokenizer_settings", "add_tokenize_arguments", "run_tokenize"]

FORMAT_VERSION = 1
TOKENIZER_DIR = "tokenizer"
_TMP_PREFIX = ".tmp-"
#: Label columns with more distinct values than this are not tabulated in the card.
MAX_LABELS_IN_CARD = 200


@dataclass
class CorpusBuildReport:
    """What :func:`build_corpus` did."""

    out_dir: str
    n_cells: int
    n_shards: int
    shards_written: int
    shards_skipped: int
    cells_per_source: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)


# --------------------------------------------------------------------------- tokenizer handling
def tokenizer_settings(tokenizer) -> dict[str, Any]:
    """The JSON-able settings that decide what a tokenizer writes (compared across shards and on resume).

    The tokenizer's init kwargs (encoding, n_bins, seed, prefix/suffix tokens, ...), its vocabulary
    size and checksum, and for the rank encoding a checksum of the fitted gene medians. Settings that
    do not change the output (``chunk_size``, file names) are left out.
    """
    settings: dict[str, Any] = {"tokenizer_class": type(tokenizer).__name__, "vocab_size": len(tokenizer)}
    for key, value in dict(getattr(tokenizer, "init_kwargs", {}) or {}).items():
        if key.startswith("_") or key in _SETTINGS_IGNORED:
            continue
        try:
            json.dumps(value)
        except TypeError:
            continue
        settings[key] = value
    settings["vocab_checksum"] = getattr(tokenizer, "vocab_checksum", None)
    medians = getattr(tokenizer, "gene_medians", None)
    if settings.get("encoding") == "rank" and medians:
        blob = json.dumps(sorted(medians.items())).encode()
        settings["medians_checksum"] = hashlib.sha256(blob).hexdigest()
    return settings


_SETTINGS_IGNORED = {
    "name_or_path", "vocab_file", "tokenizer_file", "medians_file", "special_tokens_map_file",
    "added_tokens_decoder", "chunk_size", "vocab", "tokenizer_object",
}


def _load_tokenizer(path: str):
    from ..tokenization import GeneTokenizer

    return GeneTokenizer.from_pretrained(path)


def _tokenize_chunk(tokenizer, counts, gene_ids, n_counts, max_length: int | None):
    """Tokenize one chunk of counts; return (offsets int32 [n+1], flat ids int32, flat values float32, lengths int32).

    ``GeneTokenizer.encode_flat`` gives the unpadded sentences as flat arrays, which become Arrow list
    columns without a Python loop and without a padded ``[B, L]`` array. A tokenizer without it is
    called as usual (right padding, as its contract says) and the real tokens are taken out.
    """
    if not hasattr(tokenizer, "encode_flat"):
        return _tokenize_chunk_padded(tokenizer, counts, gene_ids, n_counts, max_length)
    from ..tokenization.anndata_io import CountSource

    # a CountSource: the gene names (a tuple, the same object for every chunk of a source) are not copied
    # or re-checked per chunk, and the tokenizer finds their column map by identity
    chunk = CountSource(matrix=counts, var_names=gene_ids, obs=None, n_obs=counts.shape[0],
                        library_sizes=None if n_counts is None else np.asarray(n_counts, dtype=np.float64))
    flat = tokenizer.encode_flat(chunk, max_length=max_length, truncation=True)
    return (flat["offsets"].astype(np.int32), flat["input_ids"].astype(np.int32, copy=False),
            flat["values"], flat["length"].astype(np.int32))


def _tokenize_chunk_padded(tokenizer, counts, gene_ids, n_counts, max_length: int | None):
    """:func:`_tokenize_chunk` through the tokenizer's padded ``__call__`` (any tokenizer; the path before
    ``encode_flat``, kept for tokenizers without it and as the benchmark's baseline)."""
    enc = tokenizer(counts, gene_ids=gene_ids, n_counts=n_counts, max_length=max_length, padding=True,
                    truncation=True, return_tensors="np")
    ids, values, mask = (np.asarray(enc[k]) for k in ("input_ids", "values", "attention_mask"))
    real = mask.astype(bool)
    if real.shape[1] > 1 and (real[:, 1:] & ~real[:, :-1]).any():
        raise RuntimeError("The tokenizer returned left padding; the corpus builder expects right padding.")
    lengths = real.sum(axis=1).astype(np.int32)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, ids[real].astype(np.int32), values[real].astype(np.float32), lengths


# --------------------------------------------------------------------------- sources
@dataclass
class _Source:
    index: int
    name: str
    path: str | None
    adata: Any
    n_cells: int
    description: str | None = None  # the AnnData's uns["source"] (dataset and licence), for model cards


def _expand_inputs(inputs) -> list[tuple[str | None, str | None, Any]]:
    """``(name or None, path or None, adata or None)`` per input; folders expand to their sorted .h5ad files."""
    if isinstance(inputs, (str, os.PathLike)) or hasattr(inputs, "obs"):
        inputs = [inputs]
    items = list(inputs.items()) if isinstance(inputs, Mapping) else [(None, x) for x in inputs]
    out = []
    for name, item in items:
        if hasattr(item, "obs") and hasattr(item, "X"):
            out.append((name, None, item))
            continue
        path = os.fspath(item)
        if os.path.isdir(path):
            found = sorted(
                os.path.join(root, f)
                for root, _, files in os.walk(path)
                for f in files
                if f.endswith(".h5ad") and not f.startswith(".")
            )
            if not found:
                raise FileNotFoundError(f"The folder {path!r} holds no .h5ad files.")
            out.extend((None, f, None) for f in found)
        elif os.path.isfile(path):
            if not path.endswith(".h5ad"):
                raise ValueError(f"Input {path!r} is not an .h5ad file; inputs are .h5ad files, folders of them, or AnnData.")
            out.append((name, path, None))
        else:
            raise FileNotFoundError(f"Input {path!r} does not exist.")
    if not out:
        raise ValueError("build_corpus got no inputs.")
    return out


def _source_names(expanded) -> list[str]:
    """File names; relative paths where two files share a name; ``adata-<i>`` for unnamed AnnData."""
    paths = [os.path.abspath(p) for _, p, _ in expanded if p is not None]
    base = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    basenames = Counter(os.path.basename(p) for p in paths)
    names = []
    for i, (name, path, _) in enumerate(expanded):
        if name is None:
            if path is None:
                name = f"adata-{i}"
            else:
                name = os.path.basename(path)
                if basenames[name] > 1:
                    name = os.path.relpath(os.path.abspath(path), base).replace(os.sep, "/")
        names.append(str(name))
    dupes = [n for n, c in Counter(names).items() if c > 1]
    if dupes:
        raise ValueError(f"Two inputs share the source name(s) {dupes}; give them distinct names.")
    return names


def _open_backed(path: str):
    from ..tokenization.anndata_io import read_h5ad

    return read_h5ad(path, backed=True)


def _column_kind(series) -> str:
    import pandas as pd

    if isinstance(series.dtype, pd.CategoricalDtype):
        return _column_kind(pd.Series(series.cat.categories)) if len(series.cat.categories) else "string"
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_integer_dtype(series):
        return "int64"
    if pd.api.types.is_float_dtype(series):
        return "float64"
    return "string"


def _scan_sources(expanded, names, obs_columns) -> tuple[list[_Source], dict[str, str]]:
    """Cell counts and obs column kinds of every source; errors for missing or conflicting columns."""
    sources, kinds, kind_from = [], {}, {}
    for i, ((_, path, adata), name) in enumerate(zip(expanded, names)):
        obj = adata if adata is not None else _open_backed(path)
        try:
            missing = [c for c in obs_columns if c not in obj.obs.columns]
            if missing:
                raise ValueError(
                    f"Label/obs column(s) {missing} not found in {path or name!r} (its obs columns: "
                    f"{list(obj.obs.columns)}). Pass obs_columns that every input has, or add the column."
                )
            for col in obs_columns:
                kind = _column_kind(obj.obs[col])
                if kinds.setdefault(col, kind) != kind:
                    raise ValueError(
                        f"obs column {col!r} is {kind} in {path or name!r} but {kinds[col]} in {kind_from[col]!r}; "
                        "a column needs one type across the corpus (convert it in the inputs)."
                    )
                kind_from.setdefault(col, path or name)
            described = obj.uns.get("source") if hasattr(obj, "uns") else None
            sources.append(_Source(i, name, path, adata, int(obj.n_obs), str(described) if described else None))
        finally:
            if adata is None and getattr(obj, "file", None) is not None:
                obj.file.close()
    return sources, kinds


# --------------------------------------------------------------------------- schema and shards
_ARROW_KIND = {"string": "string", "int64": "int64", "float64": "float64", "bool": "bool"}


def _features(obs_kinds: Mapping[str, str]):
    import datasets

    feats = {
        "input_ids": datasets.List(datasets.Value("int32")),
        "values": datasets.List(datasets.Value("float32")),
        "length": datasets.Value("int32"),
        "cell_id": datasets.Value("string"),
    }
    for col, kind in obs_kinds.items():
        feats[col] = datasets.Value(_ARROW_KIND[kind])
    feats["source_file"] = datasets.Value("string")
    return datasets.Features(feats)


def _arrow_schema(features_json: str, obs_kinds: Mapping[str, str]):
    import pyarrow as pa

    fields = [
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("values", pa.list_(pa.float32())),
        pa.field("length", pa.int32()),
        pa.field("cell_id", pa.string()),
    ]
    fields += [pa.field(col, getattr(pa, _ARROW_KIND[kind])()) for col, kind in obs_kinds.items()]
    fields.append(pa.field("source_file", pa.string()))
    return pa.schema(fields, metadata={b"huggingface": features_json.encode()})


#: Parquet options: zstd; ids as deltas (gene ids ascend within a binned / continuous sentence) and
#: float values split by byte (the bytes of similar floats compress well); statistics of list
#: columns are useless for filtering, so none are written. Halves the size and speeds up reading.
_PARQUET_OPTIONS = {
    "compression": "zstd",
    "write_statistics": False,
    "column_encoding": {"input_ids.list.element": "DELTA_BINARY_PACKED", "values.list.element": "BYTE_STREAM_SPLIT"},
}


def _shard_name(source: int, shard: int) -> str:
    return f"train-{source:05d}-{shard:05d}.parquet"


def _obs_arrays(obs, obs_kinds):
    import pyarrow as pa

    arrays, counts = [], {}
    for col, kind in obs_kinds.items():
        series = obs[col]
        if kind == "string":
            values = series.astype(object).where(series.notna(), None)
            values = [None if v is None else str(v) for v in values]
            counts[col] = {str(k): int(v) for k, v in Counter(v for v in values if v is not None).items()}
            arrays.append(pa.array(values, type=pa.string()))
        else:
            arrays.append(pa.array(series.to_numpy(), type=getattr(pa, _ARROW_KIND[kind])(), from_pandas=True))
    return arrays, counts


def _expected_meta(source: _Source, shard: int, start: int, stop: int, settings, obs_kinds, chunk_size) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": settings,
        "source_file": source.name,
        "source_index": source.index,
        "source_description": source.description,
        "shard": shard,
        "cell_range": [start, stop],
        "obs_columns": dict(obs_kinds),
        "chunk_size": chunk_size,
    }


_IDENTITY_KEYS = ("format_version", "tokenizer", "source_file", "source_index", "shard", "cell_range", "obs_columns", "chunk_size")


def _shard_status(path: str, expected: dict) -> str:
    """``"missing"``, ``"done"`` (footer matches), ``"corrupt"`` (unreadable) or ``"different"``."""
    if not os.path.exists(path):
        return "missing"
    try:
        info, _ = read_shard_metadata(path)
    except CorpusFormatError:
        return "corrupt"
    same = all(info.get(k) == expected[k] for k in _IDENTITY_KEYS)
    return "done" if same else "different"


def _encoded_chunks(src, source, shards, *, tokenizer, max_length, chunk_size, schema, obs_kinds):
    """``(shard, lo, hi, Arrow table, label counts, n_tokens)`` for every chunk of the listed shards, in order:
    the read (h5ad), tokenize and Arrow-conversion half of the build."""
    import pyarrow as pa

    gene_names = tuple(src.var_names)
    for shard, start, stop in shards:
        for lo in range(start, stop, chunk_size):
            hi = min(lo + chunk_size, stop)
            counts = src.rows(lo, hi)
            lib = None if src.library_sizes is None else src.library_sizes[lo:hi]
            try:
                offsets, ids, values, lengths = _tokenize_chunk(tokenizer, counts, gene_names, lib, max_length)
            except ValueError as err:
                raise ValueError(f"{source.path or source.name} (cells {lo}:{hi}): {err}") from err
            obs = src.obs.iloc[lo:hi]
            obs_arrays, label_chunk = _obs_arrays(obs, obs_kinds)
            offsets = pa.array(offsets)
            columns = [
                pa.ListArray.from_arrays(offsets, pa.array(ids)),
                pa.ListArray.from_arrays(offsets, pa.array(values)),
                pa.array(lengths),
                pa.array([str(x) for x in obs.index], type=pa.string()),
                *obs_arrays,
                pa.array([source.name] * (hi - lo), type=pa.string()),
            ]
            yield shard, lo, hi, pa.Table.from_arrays(columns, schema=schema), label_chunk, int(lengths.sum())


class _ShardWriter:
    """One shard being written: a hidden temporary file, renamed into place (atomically) when complete."""

    def __init__(self, source, shard, start, stop, *, schema, settings, obs_kinds, chunk_size, data_dir):
        import pyarrow.parquet as pq

        self.final = os.path.join(data_dir, _shard_name(source.index, shard))
        self.tmp = os.path.join(data_dir, f"{_TMP_PREFIX}{os.getpid()}-{_shard_name(source.index, shard)}.partial")
        self.meta = _expected_meta(source, shard, start, stop, settings, obs_kinds, chunk_size)
        self.n_cells = stop - start
        self.label_counts: dict[str, Counter] = {c: Counter() for c, k in obs_kinds.items() if k == "string"}
        self.n_tokens = 0
        self.writer = pq.ParquetWriter(self.tmp, schema, **_PARQUET_OPTIONS,
                                       use_dictionary=[c for c, k in obs_kinds.items() if k == "string"] + ["source_file"])

    def write(self, table, label_chunk, n_tokens) -> None:
        self.writer.write_table(table, row_group_size=table.num_rows)  # one row group per chunk
        for col, c in label_chunk.items():
            self.label_counts[col].update(c)
        self.n_tokens += n_tokens

    def finish(self) -> None:
        self.meta["n_cells"] = self.n_cells
        self.meta["n_tokens"] = self.n_tokens
        self.meta["label_counts"] = {c: dict(sorted(v.items())) for c, v in self.label_counts.items()}
        self.writer.add_key_value_metadata({METADATA_KEY.decode(): json.dumps(self.meta, sort_keys=True)})
        self.writer.close()
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        """Close the file, leaving the temporary file (removed by the next run; loaders never read it)."""
        self.writer.close()


#: Chunks the read+tokenize thread may run ahead of the Parquet writer (each about chunk_size cells);
#: 0 runs both stages in the calling thread, one after the other (same files).
PIPELINE_DEPTH = 2


def _build_source(job: dict, progress=None) -> int:
    """Build the listed shards of one source (runs in the main process or a worker).

    Two stages overlap: a background thread reads and tokenizes chunk ``i + 1`` (h5py, the tokenizer's
    compiled kernel and NumPy) while this thread writes chunk ``i`` to Parquet (Arrow's encoder and zstd
    release the GIL), ``PIPELINE_DEPTH`` chunks at most in flight, so memory stays a few chunks. Chunks are
    written in order, one row group each: the shards are byte-identical to a one-thread build.
    """
    from ..tokenization.anndata_io import open_count_source
    from .loading import _read_ahead

    tokenizer = job["tokenizer"] if job.get("tokenizer") is not None else _load_tokenizer(job["tokenizer_dir"])
    source: _Source = job["source"]
    src = open_count_source(source.adata if source.adata is not None else source.path)
    bounds = {shard: (start, stop) for shard, start, stop in job["shards"]}
    current: _ShardWriter | None = None
    chunks = _encoded_chunks(src, source, job["shards"], tokenizer=tokenizer, max_length=job["max_length"],
                             chunk_size=job["chunk_size"], schema=job["schema"], obs_kinds=job["obs_kinds"])
    stream = _read_ahead(chunks, PIPELINE_DEPTH) if PIPELINE_DEPTH else chunks
    try:
        for shard, lo, hi, table, label_chunk, n_tokens in stream:
            if current is None or current.meta["shard"] != shard:
                if current is not None:
                    current.finish()
                current = _ShardWriter(source, shard, *bounds[shard], schema=job["schema"], settings=job["settings"],
                                       obs_kinds=job["obs_kinds"], chunk_size=job["chunk_size"], data_dir=job["data_dir"])
            current.write(table, label_chunk, n_tokens)
            del table
            if progress is not None:
                progress(hi - lo)
        if current is not None:
            current.finish()
            current = None
    finally:
        stream.close()  # stops (and waits for) the reading thread before the file is closed
        if current is not None:
            current.abort()
        handle = getattr(src.matrix, "group", None)
        handle = getattr(handle, "file", None)
        if source.adata is None and handle is not None:
            handle.close()
    return len(job["shards"])


def _worker(job: dict, queue) -> int:
    return _build_source(job, progress=queue.put)


# --------------------------------------------------------------------------- the card
def _write_card(out_dir: str, features, settings, shard_infos, total_bytes, dataset_name, obs_kinds):
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    n_cells = sum(i["n_cells"] for i in shard_infos)
    per_source: dict[str, int] = {}
    labels: dict[str, Counter] = {}
    for info in shard_infos:
        per_source[info["source_file"]] = per_source.get(info["source_file"], 0) + info["n_cells"]
        for col, counts in info.get("label_counts", {}).items():
            labels.setdefault(col, Counter()).update(counts)
    splits = SplitDict()
    splits.add(SplitInfo(name="train", num_bytes=total_bytes, num_examples=n_cells))
    info = DatasetInfo(features=features, splits=splits)
    card_data = DatasetCardData(
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": f"{DATA_DIR}/train-*.parquet"}]}],
        tags=["single-cell", "scRNA-seq", "hf-scfm", "tokenized"],
    )
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    yaml = card_data.to_yaml()

    lines = [
        "---", yaml, "---", "",
        f"# {dataset_name}", "",
        f"A tokenized single-cell corpus built with `hf_scfm.data.build_corpus`: {n_cells:,} cells from "
        f"{len(per_source)} source(s) in {len(shard_infos)} Parquet shard(s). One row per cell: `input_ids` and "
        "`values` (unpadded), `length` (tokens including special tokens), `cell_id` (obs name), "
        + (", ".join(f"`{c}`" for c in obs_kinds) + ", " if obs_kinds else "")
        + "`source_file`.",
        "",
        "## Loading",
        "",
        "```python",
        "from hf_scfm.data import load_corpus, DataCollatorForMaskedExpression",
        "ds = load_corpus(\"<this folder or repo id>\", streaming=True, shuffle=True)",
        "# or, with datasets alone:",
        "from datasets import load_dataset",
        "ds = load_dataset(\"<this folder or repo id>\", split=\"train\", streaming=True)",
        "```",
        "",
        "The tokenizer is saved in `tokenizer/` (`GeneTokenizer.from_pretrained(\"<folder>/tokenizer\")`).",
        "",
        "## Tokenizer settings",
        "",
        "```json",
        json.dumps(settings, indent=2, sort_keys=True),
        "```",
        "",
        "## Cells per source",
        "",
        "| source | cells |",
        "|---|---:|",
        *(f"| {name} | {count:,} |" for name, count in per_source.items()),
        "",
    ]
    for col, counts in labels.items():
        lines += [f"## Cells per `{col}`", ""]
        if len(counts) > MAX_LABELS_IN_CARD:
            lines += [f"{len(counts):,} distinct values (not tabulated).", ""]
            continue
        lines += [f"| {col} | cells |", "|---|---:|"]
        lines += [f"| {label} | {count:,} |" for label, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        lines.append("")
    text = "\n".join(lines)
    tmp = os.path.join(out_dir, f"{_TMP_PREFIX}README.md")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, os.path.join(out_dir, "README.md"))
    return per_source, {c: dict(v) for c, v in labels.items()}


# --------------------------------------------------------------------------- the builder
def build_corpus(
    inputs,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 10_000,
    chunk_size: int = 1_000,
    obs_columns: Sequence[str] = (),
    max_length: int | None = None,
    num_proc: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    dataset_name: str | None = None,
    mp_context: str = "spawn",
) -> CorpusBuildReport:
    """Tokenize single-cell data into a corpus of Parquet shards with a dataset card.

    Args:
        inputs: an ``.h5ad`` path, a folder (searched recursively for ``.h5ad`` files, sorted), an
            in-memory ``AnnData``, a list mixing those, or a ``{source name: path or AnnData}`` dict.
            Files are read in backed mode, ``chunk_size`` cells at a time.
        tokenizer: a ``GeneTokenizer`` or the folder it was saved to; its settings are recorded.
        out_dir: the corpus folder (created).
        shard_size: cells per shard (the last shard of each source is smaller). Shards never mix sources.
        chunk_size: cells read and tokenized at once (also the Parquet row-group size); bounds memory.
        obs_columns: obs columns copied into every row (labels, donors, batches); every input must
            have them, with one type across inputs.
        max_length: tokens per cell including special tokens; ``None`` uses the tokenizer's default.
        num_proc: processes building at once: sources in parallel, and runs of shards (row ranges) of one
            source when there are fewer sources than processes. Same files as ``num_proc=1``.
        overwrite: rebuild shards whose footer says they come from other inputs or settings (and
            drop shards that are not part of this build) instead of raising.
        progress: show a tqdm progress bar over cells.
        dataset_name: title of the dataset card (default: the folder name).
        mp_context: how ``num_proc`` workers start: ``"spawn"`` (default: a fresh interpreter, safe
            whatever threads the caller runs; costs one package import per worker), ``"forkserver"``
            or ``"fork"`` (instant start; fine from a plain script).

    Returns:
        A :class:`CorpusBuildReport` (cells, shards written and skipped, per-source and label counts).

    Re-running with the same arguments after an interruption skips finished shards and rebuilds the
    others; the result is byte-identical to an uninterrupted run.
    """
    if shard_size < 1 or chunk_size < 1:
        raise ValueError(f"shard_size and chunk_size must be positive, got {shard_size} and {chunk_size}.")
    chunk_size = min(chunk_size, shard_size)
    out_dir = os.fspath(out_dir)
    obs_columns = [obs_columns] if isinstance(obs_columns, str) else list(obs_columns)
    reserved = {"input_ids", "values", "length", "cell_id", "source_file"} & set(obs_columns)
    if reserved:
        raise ValueError(f"obs column name(s) {sorted(reserved)} clash with the corpus's own columns; rename them.")

    expanded = _expand_inputs(inputs)
    names = _source_names(expanded)
    sources, obs_kinds = _scan_sources(expanded, names, obs_columns)
    obs_kinds = {c: obs_kinds[c] for c in obs_columns}

    data_dir = os.path.join(out_dir, DATA_DIR)
    tok_dir = os.path.join(out_dir, TOKENIZER_DIR)
    os.makedirs(data_dir, exist_ok=True)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _load_tokenizer(os.fspath(tokenizer))
    settings = tokenizer_settings(tokenizer)
    settings["max_length"] = int(max_length or getattr(tokenizer, "model_max_length", 0)) or None
    saved = os.path.join(tok_dir, "hf_scfm_tokenizer_settings.json")
    if os.path.exists(saved) and not overwrite:
        with open(saved, encoding="utf-8") as fh:
            previous = json.load(fh)
        if previous != settings:
            raise CorpusFormatError(
                f"{out_dir!r} holds a corpus built with other tokenizer settings ({previous}). Use a new out_dir, "
                "the same tokenizer, or overwrite=True."
            )
    tokenizer.save_pretrained(tok_dir)
    with open(saved, "w", encoding="utf-8") as fh:
        json.dump(settings, fh, indent=2, sort_keys=True)

    for f in os.listdir(data_dir):  # leftovers of an interrupted run
        if f.startswith(_TMP_PREFIX):
            os.remove(os.path.join(data_dir, f))

    features = _features(obs_kinds)
    features_json = json.dumps({"info": {"features": features.to_dict()}}, sort_keys=True)
    schema = _arrow_schema(features_json, obs_kinds)

    # Plan, and what is already done.
    planned, jobs, skipped, to_build_cells = set(), [], 0, 0
    for source in sources:
        todo = []
        for shard, start in enumerate(range(0, source.n_cells, shard_size)):
            stop = min(start + shard_size, source.n_cells)
            name = _shard_name(source.index, shard)
            planned.add(name)
            expected = _expected_meta(source, shard, start, stop, settings, obs_kinds, chunk_size)
            status = _shard_status(os.path.join(data_dir, name), expected)
            if status == "corrupt":
                warnings.warn(f"Rebuilding the unreadable shard {os.path.join(data_dir, name)!r}.", stacklevel=2)
            if status == "done":
                skipped += 1
                continue
            if status == "different" and not overwrite:
                raise CorpusFormatError(
                    f"{os.path.join(data_dir, name)!r} was built from other inputs or settings (expected source "
                    f"{source.name!r}, cells {start}:{stop}, this tokenizer, obs_columns {obs_columns}, chunk_size "
                    f"{chunk_size}). Use a new out_dir, or overwrite=True to rebuild."
                )
            todo.append((shard, start, stop))
            to_build_cells += stop - start
        if todo:
            jobs.append({
                "source": source, "shards": todo, "max_length": max_length, "chunk_size": chunk_size,
                "schema": schema, "settings": settings, "obs_kinds": obs_kinds, "data_dir": data_dir,
                "tokenizer_dir": tok_dir,
            })
    stray = sorted(f for f in os.listdir(data_dir) if f.endswith(".parquet") and f not in planned)
    if stray:
        if not overwrite:
            raise CorpusFormatError(
                f"{data_dir!r} holds shards that are not part of this build: {stray[:5]}{'...' if len(stray) > 5 else ''}. "
                "Use a new out_dir, or overwrite=True to delete them."
            )
        for f in stray:
            os.remove(os.path.join(data_dir, f))

    from tqdm.auto import tqdm

    bar = tqdm(total=to_build_cells, unit="cell", desc="tokenizing", disable=not progress)
    try:
        in_process = [j for j in jobs if j["source"].adata is not None or num_proc <= 1]
        parallel = _split_jobs([j for j in jobs if j not in in_process], num_proc)
        if parallel:
            _run_parallel(parallel, num_proc, bar, mp_context)
        for job in in_process:
            job["tokenizer"] = tokenizer
            _build_source(job, progress=bar.update)
    finally:
        bar.close()

    files = [os.path.join(data_dir, f) for f in sorted(planned)]
    infos = [read_shard_metadata(f)[0] for f in files]
    total_bytes = sum(os.path.getsize(f) for f in files)
    per_source, labels = _write_card(
        out_dir, features, settings, infos, total_bytes, dataset_name or os.path.basename(os.path.abspath(out_dir)), obs_kinds
    )
    return CorpusBuildReport(
        out_dir=out_dir, n_cells=sum(i["n_cells"] for i in infos), n_shards=len(files),
        shards_written=sum(len(j["shards"]) for j in jobs), shards_skipped=skipped,
        cells_per_source=per_source, label_counts=labels,
    )


def _split_jobs(jobs: list[dict], num_proc: int) -> list[dict]:
    """With fewer sources than processes, cut the largest jobs into runs of consecutive shards (row ranges
    of one file) until every process has one: one big file then uses every core. Each shard is still
    written whole by one process, so the files are the same as a serial build's."""
    jobs = list(jobs)
    while jobs and len(jobs) < num_proc:
        i = max(range(len(jobs)), key=lambda k: len(jobs[k]["shards"]))
        shards = jobs[i]["shards"]
        if len(shards) < 2:
            break
        half = len(shards) // 2
        jobs[i:i + 1] = [dict(jobs[i], shards=shards[:half]), dict(jobs[i], shards=shards[half:])]
    return jobs


def _run_parallel(jobs, num_proc, bar, mp_context) -> None:
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context(mp_context)
    with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=min(num_proc, len(jobs)), mp_context=ctx) as pool:
        q = manager.Queue()
        pending = {pool.submit(_worker, {k: v for k, v in job.items() if k != "tokenizer"}, q) for job in jobs}
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            while True:
                try:
                    bar.update(q.get_nowait())
                except queue_mod.Empty:
                    break
            for fut in done:
                fut.result()  # re-raise a worker's error here


# --------------------------------------------------------------------------- command line
def add_tokenize_arguments(parser) -> None:
    """Arguments of ``hf-scfm tokenize INPUTS... --tokenizer DIR --out DIR`` (for ``hf_scfm/cli.py``)."""
    parser.add_argument("inputs", nargs="+", help=".h5ad files or folders of them")
    parser.add_argument("--tokenizer", required=True, help="folder of a saved GeneTokenizer")
    parser.add_argument("--out", required=True, help="corpus folder to write (a Hub dataset repo layout)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="cells per Parquet shard")
    parser.add_argument("--chunk-size", type=int, default=1_000, help="cells read and tokenized at once")
    parser.add_argument("--obs-columns", nargs="*", default=[], help="obs columns to keep (labels, donors, ...)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per cell (default: the tokenizer's)")
    parser.add_argument("--num-proc", type=int, default=1, help="files built in parallel processes")
    parser.add_argument("--overwrite", action="store_true", help="rebuild shards made from other inputs/settings")


def run_tokenize(args) -> int:
    """Run ``hf-scfm tokenize`` from parsed arguments; prints a one-line summary."""
    report = build_corpus(
        args.inputs, args.tokenizer, args.out, shard_size=args.shard_size, chunk_size=args.chunk_size,
        obs_columns=args.obs_columns, max_length=args.max_length, num_proc=args.num_proc, overwrite=args.overwrite,
    )
    print(f"{report.n_cells:,} cells in {report.n_shards} shards at {report.out_dir} "
          f"({report.shards_written} written, {report.shards_skipped} already done)")
    return 0
