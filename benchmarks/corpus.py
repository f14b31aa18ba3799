"""Corpus benchmark: build a corpus from a large synthetic h5ad and stream it through a collator, the
current paths side by side with the previous ones, in the same run.

    .venv/bin/python benchmarks/corpus.py                  # 200,000 cells (the issue's figure)
    .venv/bin/python benchmarks/corpus.py --cells 50000    # smaller
    .venv/bin/python benchmarks/corpus.py --corpus DIR     # only step 3, on an already built corpus

Steps, each printed with the load average (the machine may be shared):

1. Write a synthetic ``--cells``-cell h5ad by tiling ``baron_human`` (raw counts, CSR), written in
   chunks straight into HDF5, so the writer never holds the file in memory; and a 20,000-cell one.
2. Build corpora in fresh subprocesses (binned encoding, ``--max-length`` tokens), timing each and
   reading its peak RSS: the 20,000-cell file and the big file with the current builder (the numba
   tokenizer kernel, ``encode_flat``, read+tokenize overlapped with the Parquet writer in two threads,
   ``--num-proc`` processes over row ranges), and the previous builder on ``--old-on`` (NumPy
   encodings: ``HF_SCFM_NUMBA=0``; the padded tokenizer output unpadded again; one thread). The shards
   are byte-identical either way (tests/test_corpus.py).
3. Stream the big corpus (``load_corpus(..., streaming=True)``) through ``DataCollatorForMaskedExpression``
   at batch size ``--batch-size``: ``iter_batches`` serially (previous), with ``--workers`` threads
   (current), optionally with worker processes, and a torch ``DataLoader`` over per-cell records (what
   the Trainer does by default, first ``--records-batches`` batches).

Wall-clock cells/s AND cells per CPU-second (all threads and worker processes counted) are printed: on
a busy machine the CPU figure is what a quiet one would approach per core. The streaming loop counts
tokens with NumPy: a torch reduction per batch would use torch's intra-op thread pool, which on a busy
machine costs milliseconds per call (its threads wait for each other) and would dominate the figure.
Targets from the issue (for reference, never asserted): building >= 10,000 cells/s; streaming +
collating >= 20,000 cells/s at batch 64; builder peak RSS < 2 GB and within 20 % of the 20,000-cell
build's.
"""

from __future__ import annotations

import os
import sys


import argparse
import json
import subprocess
import tempfile
import time

import numpy as np

BUILD_SCRIPT = r"""
import json, os, resource, sys, time
args = json.loads(sys.argv[1])
import hf_scfm.data.corpus_inputs as inputs
import hf_scfm.data.shards as shards
from hf_scfm.data import build_corpus
from hf_scfm.tokenization import GeneTokenizer
tok = GeneTokenizer.from_species("human", encoding="binned")
tok(inputs.open_backed(args["input"])[:10].to_memory())  # warm the gene tables and the kernel outside the timing
if args["old"]:  # the previous builder: padded tokenizer output, one thread (HF_SCFM_NUMBA=0 is set by the caller)
    shards.tokenize_chunk = shards.tokenize_chunk_padded
    shards.PIPELINE_DEPTH = 0
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
t, c0 = time.perf_counter(), cpu()
report = build_corpus(args["input"], tok, args["out"], shard_size=args["shard_size"], chunk_size=args["chunk_size"],
                      obs_columns=["cell_type", "batch"], max_length=args["max_length"], progress=False,
                      num_proc=args["num_proc"], mp_context="fork")
seconds, cpu_seconds = time.perf_counter() - t, cpu() - c0
children_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
# the build's own accounting, summed over its worker processes (a counter patched in here would stay 0 in them)
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "build_cpu_seconds": report.cpu_seconds,
                  "tokenize_cpu_seconds": report.tokenize_cpu_seconds,
                  "rss_before_mb": rss_before, "cells": report.n_cells, "shards": report.n_shards,
                  "peak_rss_mb": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, children_rss),
                  "load": os.getloadavg()[0]}))
"""


def write_tiled_h5ad(path: str, n_cells: int, chunk: int = 10_000) -> None:
    """A ``n_cells``-cell h5ad made of copies of baron_human, written chunk by chunk (CSR, float32)."""
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    from hf_scfm.data import load_example

    base = load_example("baron_human")
    X = base.X.tocsr()
    n_base = X.shape[0]
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = (n_cells, X.shape[1])
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype="float32", chunks=(1 << 16,))
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="int32", chunks=(1 << 16,))
        indptr = [np.zeros(1, dtype=np.int64)]
        nnz = 0
        for start in range(0, n_cells, chunk):
            rows = np.arange(start, min(start + chunk, n_cells)) % n_base
            block = X[rows]
            data.resize((nnz + block.nnz,))
            indices.resize((nnz + block.nnz,))
            data[nnz:] = block.data
            indices[nnz:] = block.indices
            indptr.append(block.indptr[1:].astype(np.int64) + nnz)
            nnz += block.nnz
        g.create_dataset("indptr", data=np.concatenate(indptr))
        rows = np.arange(n_cells) % n_base
        obs = pd.DataFrame(
            {"cell_type": base.obs["cell_type"].to_numpy()[rows], "batch": base.obs["batch"].to_numpy()[rows]},
            index=[f"cell{i}" for i in range(n_cells)],
        )
        obs["cell_type"] = obs["cell_type"].astype("category")
        obs["batch"] = obs["batch"].astype("category")
        write_elem(f, "obs", obs)
        write_elem(f, "var", base.var)
        for key in ("layers", "obsm", "varm", "obsp", "varp"):
            write_elem(f, key, {})
        write_elem(f, "uns", dict(base.uns))
    check = ad.read_h5ad(path, backed="r")
    assert check.shape == (n_cells, X.shape[1]), check.shape
    check.file.close()


def build(input_path: str, out: str, args, old: bool = False, num_proc: int | None = None) -> dict:
    payload = json.dumps({"input": input_path, "out": out, "shard_size": args.shard_size, "chunk_size": args.chunk_size,
                          "max_length": args.max_length, "num_proc": num_proc or args.num_proc, "old": old})
    env = dict(os.environ, HF_SCFM_TOKENIZER_THREADS="1")
    if old:
        env["HF_SCFM_NUMBA"] = "0"
    proc = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, payload], capture_output=True, text=True, check=False,
                          env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cpu() -> float:
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def stream(corpus: str, batch_size: int, max_batches: int | None, workers: int, processes: bool,
           records_batches: int) -> dict:
    from hf_scfm.data import DataCollatorForMaskedExpression, load_corpus
    from hf_scfm.data.streaming import iter_batches

    import datasets
    import torch

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # a 5 s pause when a stream closes (old pyarrow workaround)
    collator = DataCollatorForMaskedExpression(seed=0)
    ds = load_corpus(corpus, streaming=True, columns=["input_ids", "values"])
    # Warm-up outside the timings: imports numba and loads (or, on a fresh checkout, compiles: a few
    # seconds) the collator's kernels for Arrow-backed (read-only) and record (writable) arrays.
    collator(next(iter(ds.with_format("arrow").iter(batch_size=2))))
    collator([next(iter(ds))])
    paths = {
        "previous: iter_batches, serial": (lambda: iter_batches(ds, batch_size, collator), max_batches),
        f"current: iter_batches, {workers} threads": (
            lambda: iter_batches(ds, batch_size, collator, num_workers=workers), max_batches),
    }
    if processes:
        paths[f"iter_batches, {workers} processes"] = (
            lambda: iter_batches(ds, batch_size, collator, num_workers=workers, processes=True), max_batches)
    if records_batches:
        paths["torch DataLoader over records"] = (
            lambda: torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collator), records_batches)
    results = {}
    for name, (make, limit) in paths.items():
        n_cells = n_tokens = n_batches = 0
        t, cpu = time.perf_counter(), _cpu()
        for batch in make():
            n_cells += batch["input_ids"].shape[0]
            # NumPy, not torch: torch's intra-op thread pool makes this one sum cost ~3 ms per batch on a
            # busy machine (its threads wait on each other), more than reading and collating the batch
            n_tokens += int(batch["attention_mask"].numpy().sum())
            n_batches += 1
            if limit and n_batches >= limit:
                break
        results[name] = {"seconds": time.perf_counter() - t, "cpu_seconds": _cpu() - cpu, "cells": n_cells,
                         "tokens_per_cell": n_tokens / max(n_cells, 1), "load": os.getloadavg()[0]}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=200_000, help="cells in the big synthetic file")
    parser.add_argument("--reference-cells", type=int, default=20_000, help="cells in the small file (memory baseline)")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per cell sentence")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--chunk-size", type=int, default=1_000)
    parser.add_argument("--num-proc", type=int, default=1, help="builder processes (row ranges of the one file)")
    parser.add_argument("--old-on", choices=["big", "reference", "none"], default="big",
                        help="which file the previous builder runs on (it is ~4x slower)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="threads of the parallel streaming path")
    parser.add_argument("--processes", action="store_true", help="also time worker processes (DataLoader)")
    parser.add_argument("--records-batches", type=int, default=300, help="batches of the per-record DataLoader (0: skip)")
    parser.add_argument("--max-batches", type=int, default=None, help="stop streaming after this many batches")
    parser.add_argument("--workdir", default=None, help="where to write files (default: a temporary folder)")
    parser.add_argument("--corpus", default=None, help="skip writing and building: stream this built corpus folder")
    args = parser.parse_args(argv)
    stream_args = (args.batch_size, args.max_batches, args.workers, args.processes, args.records_batches)
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at the start", flush=True)

    if args.corpus:
        print_stream(stream(args.corpus, *stream_args), args.batch_size)
        return 0

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        big, small = os.path.join(tmp, "big.h5ad"), os.path.join(tmp, "small.h5ad")
        t = time.perf_counter()
        write_tiled_h5ad(big, args.cells)
        write_tiled_h5ad(small, args.reference_cells)
        print(f"wrote synthetic h5ad files ({args.cells:,} and {args.reference_cells:,} cells) in "
              f"{time.perf_counter() - t:.1f} s", flush=True)

        runs = [("current", "reference", build(small, os.path.join(tmp, "corpus_small"), args))]
        print_build(*runs[-1])
        runs.append(("current", "big", build(big, os.path.join(tmp, "corpus_big"), args)))
        print_build(*runs[-1])
        if args.old_on != "none":
            src = big if args.old_on == "big" else small
            runs.append(("previous", args.old_on, build(src, os.path.join(tmp, "corpus_old"), args, old=True)))
            print_build(*runs[-1])
        ref, res = runs[0][2], runs[1][2]
        print(f"peak RSS big / reference: {res['peak_rss_mb'] / ref['peak_rss_mb']:.2f} (target <= 1.20, and < 2,048 MB)")
        if args.old_on != "none":
            old = runs[2][2]
            print(f"build speed-up, current / previous: {res['cells'] / res['seconds'] / (old['cells'] / old['seconds']):.1f}x "
                  f"wall, {res['cells'] / res['cpu_seconds'] / (old['cells'] / old['cpu_seconds']):.1f}x per CPU-second")

        print_stream(stream(os.path.join(tmp, "corpus_big"), *stream_args), args.batch_size)
    return 0


def print_build(path: str, name: str, r: dict) -> None:
    print(f"build {path:8s} {name:9s}: {r['cells']:>9,} cells in {r['seconds']:7.1f} s = {r['cells'] / r['seconds']:8,.0f} "
          f"cells/s wall, {r['cells'] / r['cpu_seconds']:8,.0f} cells per CPU-s (tokenizer "
          f"{r['tokenize_cpu_seconds'] / max(r['build_cpu_seconds'], 1e-9):.0%} of the build's CPU, all processes); "
          f"{r['shards']} shards; peak RSS "
          f"{r['peak_rss_mb']:,.0f} MB ({r['rss_before_mb']:,.0f} MB after imports); load {r['load']:.1f}", flush=True)


def print_stream(results: dict, batch_size: int) -> None:
    for name, s in results.items():
        print(f"stream + DataCollatorForMaskedExpression, batch {batch_size}, {name:32s}: {s['cells']:>7,} cells in "
              f"{s['seconds']:6.1f} s = {s['cells'] / s['seconds']:7,.0f} cells/s wall, "
              f"{s['cells'] / s['cpu_seconds']:7,.0f} cells per CPU-s ({s['tokens_per_cell']:.0f} tokens per cell); "
              f"load {s['load']:.1f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
