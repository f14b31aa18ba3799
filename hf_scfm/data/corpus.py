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

Files: this module plans a build and runs it; :mod:`.corpus_inputs` reads the inputs, :mod:`.shards` writes the
shards of one source, :mod:`.corpus_card` writes the dataset card. ``hf-scfm tokenize`` is :func:`tokenize`
(:class:`TokenizeArguments`: the keyword arguments of :func:`build_corpus`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from .corpus_card import write_card
from .corpus_inputs import expand_inputs, scan_sources, source_names
from .loading import BUILD_FILE, DATA_DIR, CorpusFormatError, read_shard_metadata
from .shards import (
    TMP_PREFIX,
    arrow_schema,
    build_source,
    expected_meta,
    load_tokenizer,
    shard_name,
    shard_status,
    worker,
)
from .shards import features as corpus_features

__all__ = ["build_corpus", "CorpusBuildReport", "tokenizer_settings", "TokenizeArguments", "tokenize"]

TOKENIZER_DIR = "tokenizer"


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
    #: cells whose counts all fall in genes outside the vocabulary (special tokens only; a warning says so)
    n_cells_without_genes: int = 0
    #: CPU seconds of the shard builds, summed over this process and every worker process (``num_proc > 1``)
    cpu_seconds: float = 0.0
    #: of which in the tokenizer calls (the tokenizing threads' CPU time; its optional pool threads not counted)
    tokenize_cpu_seconds: float = 0.0


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
    medians_checksum = dict(getattr(tokenizer, "encoding_settings", None) or {}).get("medians_checksum")
    if settings.get("encoding") == "rank" and medians_checksum:
        settings["medians_checksum"] = medians_checksum
    return settings


_SETTINGS_IGNORED = {
    "name_or_path", "vocab_file", "tokenizer_file", "medians_file", "special_tokens_map_file",
    "added_tokens_decoder", "chunk_size", "vocab", "tokenizer_object",
}


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
    layer: str | None = None,
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
        layer: read the counts from ``adata.layers[layer]`` of every input instead of ``X`` (e.g. ``"counts"``).

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

    expanded = expand_inputs(inputs)
    names = source_names(expanded)
    sources, obs_kinds = scan_sources(expanded, names, obs_columns, layer)
    obs_kinds = {c: obs_kinds[c] for c in obs_columns}

    data_dir = os.path.join(out_dir, DATA_DIR)
    tok_dir = os.path.join(out_dir, TOKENIZER_DIR)
    os.makedirs(data_dir, exist_ok=True)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(os.fspath(tokenizer))
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
        if f.startswith(TMP_PREFIX):
            os.remove(os.path.join(data_dir, f))

    features = corpus_features(obs_kinds)
    features_json = json.dumps({"info": {"features": features.to_dict()}}, sort_keys=True)
    schema = arrow_schema(features_json, obs_kinds)

    # Plan, and what is already done.
    planned, jobs, skipped, to_build_cells = set(), [], 0, 0
    for source in sources:
        todo = []
        for shard, start in enumerate(range(0, source.n_cells, shard_size)):
            stop = min(start + shard_size, source.n_cells)
            name = shard_name(source.index, shard)
            planned.add(name)
            expected = expected_meta(source, shard, start, stop, settings, obs_kinds, chunk_size)
            status = shard_status(os.path.join(data_dir, name), expected)
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
                "tokenizer_dir": tok_dir, "layer": layer,
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

    build_file = os.path.join(out_dir, BUILD_FILE)
    with open(build_file, "w", encoding="utf-8") as fh:  # load_corpus refuses the corpus until this says complete
        json.dump({"complete": False, "shards": sorted(planned)}, fh, indent=2)

    from tqdm.auto import tqdm

    bar = tqdm(total=to_build_cells, unit="cell", desc="tokenizing", disable=not progress)
    try:
        in_process = [j for j in jobs if j["source"].adata is not None or num_proc <= 1]
        parallel = _split_jobs([j for j in jobs if j not in in_process], num_proc)
        results = _run_parallel(parallel, num_proc, bar, mp_context) if parallel else []
        for job in in_process:
            job["tokenizer"] = tokenizer
            results.append(build_source(job, progress=bar.update))
    finally:
        bar.close()

    files = [os.path.join(data_dir, f) for f in sorted(planned)]
    infos = [read_shard_metadata(f)[0] for f in files]
    n_without_genes = _cells_without_genes(files, tokenizer)
    if n_without_genes:
        warnings.warn(f"{n_without_genes:,} cells of the corpus have counts only in genes outside the tokenizer's "
                      "vocabulary: their sentences hold special tokens only (CorpusBuildReport.n_cells_without_genes). "
                      "Check the gene names, or filter those cells (tokenizer.cells_without_genes(adata)).",
                      stacklevel=2)
    total_bytes = sum(os.path.getsize(f) for f in files)
    per_source, labels = write_card(
        out_dir, features, settings, infos, total_bytes, dataset_name or os.path.basename(os.path.abspath(out_dir)), obs_kinds
    )
    report = CorpusBuildReport(
        out_dir=out_dir, n_cells=sum(i["n_cells"] for i in infos), n_shards=len(files),
        shards_written=sum(len(j["shards"]) for j in jobs), shards_skipped=skipped,
        cells_per_source=per_source, label_counts=labels, n_cells_without_genes=n_without_genes,
        cpu_seconds=sum(r["cpu_seconds"] for r in results),
        tokenize_cpu_seconds=sum(r["tokenize_cpu_seconds"] for r in results),
    )
    with open(build_file, "w", encoding="utf-8") as fh:
        json.dump({"complete": True, "shards": sorted(planned)}, fh, indent=2)
    return report


def _cells_without_genes(files, tokenizer) -> int:
    """Cells whose sentence holds special tokens only (no vocabulary gene expressed), from the shards' lengths.
    Zero for a tokenizer writing every gene (binned with include_zero_genes), whose sentences are never empty."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if getattr(tokenizer, "include_zero_genes", False) and getattr(tokenizer, "encoding", None) == "binned":
        return 0
    n_special = len(getattr(tokenizer, "prefix_tokens", [])) + len(getattr(tokenizer, "suffix_tokens", []))
    return sum(int(pc.sum(pc.less_equal(pq.read_table(f, columns=["length"])["length"], n_special)).as_py() or 0)
               for f in files)


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


def _run_parallel(jobs, num_proc, bar, mp_context) -> list[dict]:
    """Run ``jobs`` on ``num_proc`` worker processes; their :func:`build_source` results (CPU time included)."""
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context(mp_context)
    with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=min(num_proc, len(jobs)), mp_context=ctx) as pool:
        q = manager.Queue()
        pending = {pool.submit(worker, {k: v for k, v in job.items() if k != "tokenizer"}, q) for job in jobs}
        results = []
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            while True:
                try:
                    bar.update(q.get_nowait())
                except queue_mod.Empty:
                    break
            for fut in done:
                results.append(fut.result())  # re-raises a worker's error here
    return results


# --------------------------------------------------------------------------- command line
@dataclass
class TokenizeArguments:
    """``hf-scfm tokenize INPUTS... --tokenizer DIR --out DIR``: the keyword arguments of :func:`build_corpus`."""

    cli_positional: ClassVar[str] = "inputs"

    inputs: list[str] = field(metadata={"help": ".h5ad files or folders of them (also as the first, bare words: "
                                                "hf-scfm tokenize a.h5ad b.h5ad --tokenizer ...)"})
    tokenizer: str = field(metadata={"help": "folder of a saved GeneTokenizer"})
    out_dir: str = field(metadata={"aliases": ["--out"], "help": "corpus folder to write (a Hub dataset repo layout)"})
    shard_size: int = field(default=10_000, metadata={"help": "cells per Parquet shard"})
    chunk_size: int = field(default=1_000, metadata={"help": "cells read and tokenized at once"})
    obs_columns: list[str] = field(default_factory=list, metadata={"help": "obs columns to keep (labels, donors, ...)"})
    max_length: int | None = field(default=None, metadata={"help": "tokens per cell (default: the tokenizer's)"})
    num_proc: int = field(default=1, metadata={"help": "processes building files (or row ranges of one) in parallel"})
    overwrite: bool = field(default=False, metadata={"help": "rebuild shards made from other inputs or settings"})
    layer: str | None = field(default=None, metadata={"help": "read counts from adata.layers[LAYER] instead of X "
                                                              "(e.g. counts)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (--no-progress: none)"})


def tokenize(args: TokenizeArguments) -> CorpusBuildReport:
    """``hf-scfm tokenize``: :func:`build_corpus` with ``args``; prints a one-line summary."""
    report = build_corpus(**asdict(args))
    print(f"{report.n_cells:,} cells in {report.n_shards} shards at {report.out_dir} "
          f"({report.shards_written} written, {report.shards_skipped} already done)")
    return report
