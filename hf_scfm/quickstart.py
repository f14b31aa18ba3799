"""The main job, ``hf-scfm quickstart``: what a new user runs first, on bundled real data, on CPU.

Today it loads a bundled dataset of raw counts, maps its genes to the species' GENCODE vocabulary,
tokenizes every cell in the three encodings (``rank`` for Mouse-GeneMamba, ``binned`` for SC-MAMBA2,
``continuous`` for CellFM), saves each tokenizer, and prints a summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def run_quickstart(dataset: str = "baron_human", out_dir: str | Path = "quickstart_out", max_length: int = 2048) -> dict:
    from .data import load_example
    from .tokenization import ENCODINGS, GeneTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adata = load_example(dataset)
    species = adata.uns["species"]
    print(f"[1/2] {dataset}: {adata.n_obs:,} cells x {adata.n_vars:,} genes ({species}), "
          f"{adata.obs['cell_type'].nunique()} cell types, {adata.obs['batch'].nunique()} batches")

    results = {"dataset": dataset, "n_cells": int(adata.n_obs), "encodings": {}}
    print(f"[2/2] tokenizing with max_length={max_length}")
    for encoding in ENCODINGS:
        tok = GeneTokenizer.from_species(species, encoding=encoding, max_length=max_length)
        if encoding == "rank":
            tok.fit_medians(adata)
        start = time.perf_counter()
        enc = tok(adata, return_tensors="np", return_length=True)
        seconds = time.perf_counter() - start
        tok.save_pretrained(out / f"tokenizer_{encoding}")
        report = tok.mapping_report(adata)
        results["encodings"][encoding] = {
            "shape": list(enc["input_ids"].shape),
            "mean_length": float(enc["length"].mean()),
            "cells_per_s": adata.n_obs / seconds,
            "genes_matched": report.n_matched,
            "genes_input": report.n_input,
        }
        print(f"\n--- {encoding} ---")
        print(tok.summary(adata))
        print(f"tokenized {adata.n_obs:,} cells in {seconds:.2f} s ({adata.n_obs / seconds:,.0f} cells/s); "
              f"tokenizer saved to {out / f'tokenizer_{encoding}'}")
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    print(f"\nSummary written to {out / 'summary.json'}")
    return results
