"""embed() on 512 Baron human cells (tiny random-init SC-MAMBA2 or Mouse-GeneMamba, full human vocabulary), max_length
2,048, batch 64: length-grouped batches against the input order, side by side (2 rounds), cells per CPU-second, and the
largest difference of the embeddings (the grouping must not change them).

    OMP_NUM_THREADS=1 python benchmarks/embed_grouping.py scmamba2        # or mouse_genemamba; ~1.5 min here
"""
import sys, time, numpy as np, torch
torch.set_num_threads(1)
from hf_scfm.data import load_example
from hf_scfm.tokenization import GeneTokenizer
from hf_scfm.tasks.embedding import embed
from hf_scfm.training.families import FAMILIES
name = sys.argv[1]
species, enc = {"scmamba2": ("human", "binned"), "mouse_genemamba": ("human", "rank")}[name]
adata = load_example("baron_human")[:512].copy()
tok = GeneTokenizer.from_species(species, encoding=enc)
if enc == "rank":
    tok.fit_medians(adata)
fam = FAMILIES[name]
torch.manual_seed(0)
cfg = fam.config_cls.from_preset("tiny", vocab_size=len(tok), vocab_checksum=tok.vocab_checksum)
model = fam.get(fam.model_class)(cfg).eval()
nnz = np.diff(adata.X.tocsr().indptr)
print(name, "expressed genes per cell: median", np.median(nnz), "min", nnz.min(), "max", nnz.max())
res = {True: [], False: []}
outs = {}
for r in range(2):
    for g in (True, False):
        t = time.process_time()
        outs[g] = embed(model, adata, tokenizer=tok, batch_size=64, max_length=2048, progress=False, copy=True, group_by_length=g).obsm[f"X_{cfg.model_type}"]
        res[g].append(time.process_time() - t)
for g in (True, False):
    print(name, "grouped" if g else "input order", "CPU s min/median", [round(x, 2) for x in sorted(res[g])], "cells per CPU-s", round(512 / min(res[g]), 1))
print("max |diff|", np.abs(outs[True] - outs[False]).max())
