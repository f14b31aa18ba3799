"""Tokenization speed: the vectorised GeneTokenizer against a per-cell loop, on baron_human.

    .venv/bin/python benchmarks/tokenizer_speed.py [--max-length 2048] [--repeats 3] [--dataset baron_human] [--threads N]

For each encoding it prints cells/s of ``GeneTokenizer.__call__`` (whole dataset, ``return_tensors="np"``),
of the plain call ``tok(adata, max_length=..., truncation=True)`` (one NumPy array per cell), of
``encode_flat`` (the corpus builder's call), the two side by side (A B A B, min / median), of the plain call
with the compiled kernel off (``HF_SCFM_NUMBA=0``: numba is optional), and of a straightforward per-cell loop written the way Geneformer's tokenizer works (slice the row,
normalise, order/sample the genes, map IDs, pad), measured in the same run, and the ratio. The loop
reuses the tokenizer's column -> token mapping, so only per-cell work is compared. Best of ``--repeats``
(wall clock), with the CPU time of that run and the load average, since the machine may be shared: a
vectorised figure far below the CPU-time figure means other processes took the cores. ``--threads`` sets
``HF_SCFM_TOKENIZER_THREADS`` (worker threads of the rank encoding; default: up to 4 of the available cores).
Prints figures; never passes or fails on time.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def per_cell_loop(X, lib, col_tokens, encoding, n_genes, prefix, suffix, medians=None, n_bins=51, seed=0):
    """Geneformer-style: one cell at a time, NumPy per cell."""
    width = len(prefix) + n_genes + len(suffix)
    ids = np.zeros((X.shape[0], width), dtype=np.int64)
    values = np.zeros((X.shape[0], width), dtype=np.float32)
    for i in range(X.shape[0]):
        row = X[i]  # slice the row (scipy CSR)
        tok = col_tokens[row.indices]
        keep = (tok >= 0) & (row.data > 0)
        tok, counts = tok[keep], row.data[keep].astype(np.float64)
        x_norm = counts / lib[i] * 10_000  # normalise
        if encoding == "rank":
            order = np.lexsort((tok, -(x_norm / medians[tok]).astype(np.float32)))[:n_genes]  # rank, ties by id
            tok, vals = tok[order], np.log1p(x_norm[order])
        else:
            order = np.argsort(tok)
            tok, x_norm, counts = tok[order], x_norm[order], counts[order]
            if encoding == "binned":
                r = np.searchsorted(np.sort(counts), counts, side="left")
                vals = (1 + (n_bins - 1) * r // max(len(counts), 1)).astype(np.float64)
            else:
                vals = np.log1p(x_norm)
            if len(tok) > n_genes:  # seeded per-cell sample
                pick = np.sort(np.random.default_rng([seed, i]).choice(len(tok), n_genes, replace=False))
                tok, vals = tok[pick], vals[pick]
        sentence = list(prefix) + tok.tolist() + list(suffix)
        ids[i, : len(sentence)] = sentence
        values[i, len(prefix): len(prefix) + len(tok)] = vals
    return ids, values


def main(argv=None):
    import hf_scfm
    from hf_scfm.tokenization import GeneTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="baron_human")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        os.environ["HF_SCFM_TOKENIZER_THREADS"] = str(args.threads)
    from hf_scfm.tokenization.encodings import _n_threads

    adata = hf_scfm.load_example(args.dataset)
    species = adata.uns["species"]
    base = GeneTokenizer.from_species(species, encoding="rank")
    t0 = time.perf_counter()
    base.fit_medians(adata)
    fit_s = time.perf_counter() - t0
    colmap, report = base._column_map(adata.var_names)
    col_tokens = np.where(colmap.rank >= 0, colmap.tokens[np.maximum(colmap.rank, 0)], -1)
    X = adata.X.tocsr()
    lib = adata.obs["n_counts"].to_numpy() if "n_counts" in adata.obs else np.asarray(X.sum(1)).ravel()
    print(f"{args.dataset}: {adata.n_obs:,} cells x {adata.n_vars:,} genes, {X.nnz / adata.n_obs:.0f} expressed "
          f"genes per cell; {report.n_tokens:,} genes map to tokens; max_length {args.max_length}")
    print(f"fit_medians: {fit_s:.2f} s ({adata.n_obs / fit_s:,.0f} cells/s); {os.cpu_count()} CPUs, "
          f"{_n_threads()} tokenizer threads, load average {_load()}")
    norm_s = min(_timed(lambda: _normalise(X, lib)) for _ in range(max(3, args.repeats)))
    print(f"one NumPy normalisation pass (counts / library * 1e4, log1p) over the CSR matrix: {norm_s * 1e3:.1f} ms "
          f"({adata.n_obs / norm_s:,.0f} cells/s)")
    print(f"{'encoding':<11} {'np cells/s':>11} {'(per CPU-s)':>12} {'per-cell loop':>14} {'speed-up':>9} | "
          f"cells/s min / median (target >= 20,000 on one thread; x normalisation pass, target <= 10): "
          f"plain call tok(adata, max_length, truncation=True) | encode_flat | plain call without numba")
    from hf_scfm.tokenization import encodings

    for encoding in ("rank", "binned", "continuous"):
        tok = GeneTokenizer(vocab=base._tokens, encoding=encoding, species=species)
        if encoding == "rank":
            tok.set_medians(base.gene_medians)
        prefix = [tok._token_to_id[t] for t in tok.prefix_tokens]
        suffix = [tok._token_to_id[t] for t in tok.suffix_tokens]
        n_genes = args.max_length - len(prefix) - len(suffix)
        tok(adata[:50], max_length=args.max_length, return_tensors="np")  # warm-up
        fast, fast_cpu = min(_timed2(lambda: tok(adata, max_length=args.max_length, return_tensors="np"))
                             for _ in range(args.repeats))
        medians = tok._median_array() if encoding == "rank" else None
        slow = min(_timed(lambda: per_cell_loop(X, lib, col_tokens, encoding, n_genes, prefix, suffix, medians,
                                                tok.n_bins)) for _ in range(max(1, args.repeats - 1)))
        calls = {"plain": lambda: tok(adata, max_length=args.max_length, truncation=True),
                 "flat": lambda: tok.encode_flat(adata, max_length=args.max_length)}
        times = {k: [] for k in calls}
        for _ in range(max(3, args.repeats)):  # A B A B: the two calls side by side
            for k, fn in calls.items():
                times[k].append(_timed(fn))
        no_numba = _without_numba(encodings, lambda: sorted(
            _timed(lambda: tok(adata, max_length=args.max_length, truncation=True)) for _ in range(max(3, args.repeats))))
        n = adata.n_obs
        cols = " | ".join(_rate(n, sorted(times[k]), norm_s) for k in calls)
        print(f"{encoding:<11} {n / fast:>11,.0f} {n / fast_cpu:>12,.0f} {n / slow:>14,.0f} {slow / fast:>8.1f}x | "
              f"{cols} | {_rate(n, no_numba, norm_s)}")
    print(f"load average after: {_load()}")


def _rate(n: int, times: list[float], norm_s: float) -> str:
    return f"{n / times[0]:,.0f} / {n / times[len(times) // 2]:,.0f} ({times[0] / norm_s:.0f}x)"


def _without_numba(encodings, fn):
    """``fn()`` with the tokenizer's compiled kernel switched off (``HF_SCFM_NUMBA=0``: the NumPy paths)."""
    saved, env = dict(encodings._NB), os.environ.get("HF_SCFM_NUMBA")
    os.environ["HF_SCFM_NUMBA"] = "0"
    encodings._NB.clear()
    try:
        return fn()
    finally:
        encodings._NB.clear()
        encodings._NB.update(saved)
        if env is None:
            os.environ.pop("HF_SCFM_NUMBA")
        else:
            os.environ["HF_SCFM_NUMBA"] = env


def _normalise(X, lib):
    return np.log1p(X.data / np.repeat(lib, np.diff(X.indptr)) * 1e4)


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _timed2(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
