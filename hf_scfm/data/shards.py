"""Writing one source's cells into Parquet shards: read, tokenize, convert to Arrow, write, rename when whole.

:func:`build_source` builds the listed shards of one source (in the calling process or a worker): a background
thread reads and tokenizes chunk ``i + 1`` while the calling thread writes chunk ``i`` (:class:`ShardWriter`: a
hidden temporary file renamed into place when complete, its footer holding the hf-scfm metadata). The schema, the
Parquet options and the footer every shard carries are defined here; :func:`shard_status` reads a footer back to
decide whether a shard of an earlier run can be kept.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Mapping

import numpy as np

from .loading import METADATA_KEY, CorpusFormatError, read_shard_metadata

__all__ = ["FORMAT_VERSION", "TMP_PREFIX", "PIPELINE_DEPTH", "load_tokenizer", "tokenize_chunk", "features",
           "arrow_schema", "shard_name", "expected_meta", "shard_status", "ShardWriter", "build_source", "worker"]

FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"


def load_tokenizer(path: str):
    from ..tokenization import GeneTokenizer

    return GeneTokenizer.from_pretrained(path)


def tokenize_chunk(tokenizer, counts, gene_ids, n_counts, max_length: int | None, cell_names=None, species=None):
    """Tokenize one chunk of counts; return (offsets int32 [n+1], flat ids int32, flat values float32, lengths int32).

    ``GeneTokenizer.encode_flat`` gives the unpadded sentences as flat arrays, which become Arrow list
    columns without a Python loop and without a padded ``[B, L]`` array. A tokenizer without it is
    called as usual (right padding, as its contract says) and the real tokens are taken out. ``cell_names``
    (the chunk's obs names) name the cells in the tokenizer's errors (an empty cell, say); ``species`` (what the
    source declares in ``uns["species"]``) goes to the tokenizer's species check.
    """
    if not hasattr(tokenizer, "encode_flat"):
        return tokenize_chunk_padded(tokenizer, counts, gene_ids, n_counts, max_length, cell_names, species)
    import pandas as pd

    from ..tokenization.anndata_io import CountSource

    # a CountSource: the gene names (a tuple, the same object for every chunk of a source) are not copied
    # or re-checked per chunk, and the tokenizer finds their column map by identity
    obs = None if cell_names is None else pd.DataFrame(index=pd.Index(cell_names).astype(str))
    chunk = CountSource(matrix=counts, var_names=gene_ids, obs=obs, n_obs=counts.shape[0],
                        library_sizes=None if n_counts is None else np.asarray(n_counts, dtype=np.float64),
                        species=species)
    flat = tokenizer.encode_flat(chunk, max_length=max_length, truncation=True)
    return (flat["offsets"].astype(np.int32), flat["input_ids"].astype(np.int32, copy=False),
            flat["values"], flat["length"].astype(np.int32))


def tokenize_chunk_padded(tokenizer, counts, gene_ids, n_counts, max_length: int | None, cell_names=None,
                          species=None):
    """:func:`tokenize_chunk` through the tokenizer's padded ``__call__`` (any tokenizer; the path before
    ``encode_flat``, kept for tokenizers without it and as the benchmark's baseline). ``species`` is not passed on:
    a plain ``__call__`` takes no declared species (the species check then reads the gene names alone)."""
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


_ARROW_KIND = {"string": "string", "int64": "int64", "float64": "float64", "bool": "bool"}


def features(obs_kinds: Mapping[str, str]):
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


def arrow_schema(features_json: str, obs_kinds: Mapping[str, str]):
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


def shard_name(source: int, shard: int) -> str:
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


def expected_meta(source, shard: int, start: int, stop: int, settings, obs_kinds, chunk_size) -> dict:
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


def shard_status(path: str, expected: dict) -> str:
    """``"missing"``, ``"done"`` (footer matches), ``"corrupt"`` (unreadable) or ``"different"``."""
    if not os.path.exists(path):
        return "missing"
    try:
        info, _ = read_shard_metadata(path)
    except CorpusFormatError:
        return "corrupt"
    same = all(info.get(k) == expected[k] for k in _IDENTITY_KEYS)
    return "done" if same else "different"


def _encoded_chunks(src, source, shards, *, tokenizer, max_length, chunk_size, schema, obs_kinds, cpu=None):
    """``(shard, lo, hi, Arrow table, label counts, n_tokens)`` for every chunk of the listed shards, in order:
    the read (h5ad), tokenize and Arrow-conversion half of the build. ``cpu`` (a one-element list) gets the CPU
    seconds of the tokenizer calls added (this thread's CPU time: the tokenizer's pool threads are not in it)."""
    import time

    import pyarrow as pa

    gene_names = tuple(src.var_names)
    for shard, start, stop in shards:
        for lo in range(start, stop, chunk_size):
            hi = min(lo + chunk_size, stop)
            counts = src.rows(lo, hi)
            lib = None if src.library_sizes is None else src.library_sizes[lo:hi]
            obs = src.obs.iloc[lo:hi]
            t0 = time.thread_time()
            try:
                offsets, ids, values, lengths = tokenize_chunk(tokenizer, counts, gene_names, lib, max_length,
                                                               obs.index, species=src.species)
            except ValueError as err:
                raise ValueError(f"{source.path or source.name} (cells {lo}:{hi}): {err}") from err
            finally:
                if cpu is not None:
                    cpu[0] += time.thread_time() - t0
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


class ShardWriter:
    """One shard being written: a hidden temporary file, renamed into place (atomically) when complete."""

    def __init__(self, source, shard, start, stop, *, schema, settings, obs_kinds, chunk_size, data_dir):
        import pyarrow.parquet as pq

        self.final = os.path.join(data_dir, shard_name(source.index, shard))
        self.tmp = os.path.join(data_dir, f"{TMP_PREFIX}{os.getpid()}-{shard_name(source.index, shard)}.partial")
        self.meta = expected_meta(source, shard, start, stop, settings, obs_kinds, chunk_size)
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


def build_source(job: dict, progress=None) -> dict:
    """Build the listed shards of one source (runs in the main process or a worker); returns
    ``{"shards": shards written, "cpu_seconds": CPU of this process during the build, "tokenize_cpu_seconds":
    CPU of the tokenizer calls}``, which :func:`hf_scfm.data.build_corpus` sums over its workers.

    Two stages overlap: a background thread reads and tokenizes chunk ``i + 1`` (h5py, the tokenizer's
    compiled kernel and NumPy) while this thread writes chunk ``i`` to Parquet (Arrow's encoder and zstd
    release the GIL), ``PIPELINE_DEPTH`` chunks at most in flight, so memory stays a few chunks. Chunks are
    written in order, one row group each: the shards are byte-identical to a one-thread build.
    """
    from ..tokenization.anndata_io import open_count_source
    from .streaming import _read_ahead

    tokenizer = job["tokenizer"] if job.get("tokenizer") is not None else load_tokenizer(job["tokenizer_dir"])
    source = job["source"]
    src = open_count_source(source.adata if source.adata is not None else source.path, layer=job.get("layer"))
    bounds = {shard: (start, stop) for shard, start, stop in job["shards"]}
    current: ShardWriter | None = None
    tokenize_cpu = [0.0]
    cpu0 = time.process_time()
    chunks = _encoded_chunks(src, source, job["shards"], tokenizer=tokenizer, max_length=job["max_length"],
                             chunk_size=job["chunk_size"], schema=job["schema"], obs_kinds=job["obs_kinds"],
                             cpu=tokenize_cpu)
    stream = _read_ahead(chunks, PIPELINE_DEPTH) if PIPELINE_DEPTH else chunks
    try:
        for shard, lo, hi, table, label_chunk, n_tokens in stream:
            if current is None or current.meta["shard"] != shard:
                if current is not None:
                    current.finish()
                current = ShardWriter(source, shard, *bounds[shard], schema=job["schema"], settings=job["settings"],
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
    return {"shards": len(job["shards"]), "cpu_seconds": time.process_time() - cpu0,
            "tokenize_cpu_seconds": tokenize_cpu[0]}


def worker(job: dict, queue) -> dict:
    return build_source(job, progress=queue.put)
