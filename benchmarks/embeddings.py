"""Frozen-embedding benchmark: cell embeddings of each pretrained family (no fine-tuning) against PCA(50) of the
log-normalised variable genes the models read, by kNN and logistic regression on held-out donors, and scib-style
bio-conservation (AvgBIO) and batch mixing (ASW batch) over Baron human's four donors.

    python benchmarks/embeddings.py

The models are the pretraining runs of ``benchmarks/pretraining.py`` (reused from ``benchmarks/results/runs/``,
pretrained here if missing): Baron human held-out donor human4, Baron mouse held-out donor mouse1; trained on the
other donors only. Cell embeddings (:func:`hf_scfm.tasks.embedding.embed`) of the training and held-out cells:
SC-MAMBA2 and Mouse-GeneMamba the mean of the last hidden states over real tokens (SC-MAMBA2's ``<cls>`` is never
trained by masked-expression pretraining), CellFM its ``<cls>`` state (trained by the cell-level loss term). The
same models with random weights are embedded too (what the architecture gives without pretraining). The baseline is
PCA(50) of log1p(CP10k) of the 1,000 most variable genes of the training cells (the genes the models
read), fitted on the training cells. Classifiers fitted on the training cells'
embeddings: 15-nearest-neighbour (Euclidean, on standardised features) and L2 logistic regression (C=1, on
standardised features); scored on the held-out donor (accuracy, macro-F1). Integration metrics
(:func:`hf_scfm.tasks.integration.integration_metrics`: KMeans-sweep NMI/ARI, cell-type ASW -> AvgBIO; batch ASW)
over all 2,142 Baron human cells, donors as batches.

Writes ``benchmarks/results/embeddings.csv`` / ``.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SPLITS = {"baron_human": "test human4", "baron_mouse": "test mouse1"}
FAMILIES = ("cellfm", "scmamba2", "mouse_genemamba")
NAMES = {"scmamba2": "SC-MAMBA2", "cellfm": "CellFM", "mouse_genemamba": "Mouse-GeneMamba"}


def _probe(x_train, y_train, x_test, y_test) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    from hf_scfm.tasks.annotation import score_predictions

    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    out = {}
    for name, clf in (("knn", KNeighborsClassifier(n_neighbors=15)),
                      ("lr", LogisticRegression(C=1.0, max_iter=2000, random_state=0))):
        clf.fit(x_train, y_train)
        m = score_predictions(clf.predict(x_test), y_test, list(clf.classes_), source="held-out cells", warn=False)
        out[f"{name}_accuracy"], out[f"{name}_f1"] = round(m["accuracy"], 4), round(m["f1_macro"], 4)
    return out


def _embed(path: Path, family: str, adata, random_seed: int | None = None):
    import warnings

    import torch

    from hf_scfm.tasks.embedding import embed, embedding_key
    from hf_scfm.tokenization import GeneTokenizer
    from hf_scfm.training.families import get_family

    fam = get_family(family)
    overrides = {"pooling": "mean"} if family == "scmamba2" else {}
    tokenizer = GeneTokenizer.from_pretrained(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if random_seed is None:
            model = fam.get(fam.model_class).from_pretrained(path, **overrides)
        else:
            torch.manual_seed(random_seed)
            config = fam.config_cls.from_pretrained(path, **overrides)
            model = fam.get(fam.model_class)(config)
    model.eval()
    out = embed(model, adata, tokenizer=tokenizer, progress=False, copy=True)
    return out.obsm[embedding_key(model)]


def embedding_job(dataset: str, family: str | None) -> list[dict]:
    """Probe and integration rows of one family's pretrained and random-init embeddings (``family=None``: PCA)."""
    import anndata
    import numpy as np

    from hf_scfm.tasks.baseline import log_normalize
    from hf_scfm.tasks.integration import integration_metrics
    from hf_scfm.tokenization import GeneTokenizer

    split = SPLITS[dataset]
    adata, train, test = common.load_split(dataset, split)
    y_train = train.obs[common.LABEL_KEY].astype(str).to_numpy()
    rows = []
    if family is None:
        from sklearn.decomposition import PCA

        from annotation import selected_genes
        from hf_scfm.quickstart import N_TOP_GENES

        tokenizer = GeneTokenizer.from_species(adata.uns["species"])
        tokenizer.select_highly_variable_genes(train, N_TOP_GENES, batch_key=common.batch_key_of(train))
        genes = selected_genes(tokenizer, train)
        x_all = log_normalize(adata)[:, adata.var_names.get_indexer(genes)].toarray()
        is_train = adata.obs_names.isin(train.obs_names)
        pca = PCA(n_components=50, random_state=0).fit(x_all[is_train])
        variants = {"PCA(50), same genes": pca.transform(x_all)}
    else:
        run = common.pretrain_run(family, dataset, split)  # made (or checked) by main before this job
        variants = {f"{NAMES[family]} pretrained": _embed(run["pretrained"], family, adata),
                    f"{NAMES[family]} random init": _embed(run["pretrained"], family, adata, random_seed=0)}
    is_train = adata.obs_names.isin(train.obs_names)
    is_test = adata.obs_names.isin(test.obs_names)
    for name, x in variants.items():
        x = np.asarray(x, dtype=np.float64)
        row = {"dataset": dataset, "split": split, "method": name,
               **_probe(x[is_train], y_train, x[is_test], test.obs[common.LABEL_KEY].astype(str).to_numpy())}
        if dataset == "baron_human":
            view = anndata.AnnData(obs=adata.obs[[common.LABEL_KEY, "batch"]].copy())
            view.obsm["X_emb"] = x.astype(np.float32)
            scores = integration_metrics(view, "X_emb", common.LABEL_KEY, "batch", seed=0)
            row.update({k: round(float(scores[k]), 4) for k in ("nmi", "ari", "asw_celltype", "avg_bio", "asw_batch")})
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--datasets", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    started, cpu = time.time(), 0.0
    from annotation import pretrain_job

    pre = [(pretrain_job, {"family": f, "dataset": d, "split": SPLITS[d]}) for d in args.datasets for f in args.families]
    for i, result, cpu_s, wall in common.run_jobs(pre, args.workers):
        cpu += cpu_s
        print(f"[{time.time() - started:6.0f} s] pretrained {pre[i][1]['family']} on {pre[i][1]['dataset']} "
              f"({'reused' if result['reused'] else f'{cpu_s:.0f} CPU-s'})", flush=True)
    jobs = [(embedding_job, {"dataset": d, "family": f}) for d in args.datasets for f in [None, *args.families]]
    rows = []
    for i, result, cpu_s, wall in common.run_jobs(jobs, args.workers):
        rows += result
        cpu += cpu_s
        for r in result:
            print(f"[{time.time() - started:6.0f} s] {r['dataset']} {r['method']}: kNN macro-F1 {r['knn_f1']:.3f}, "
                  f"LR macro-F1 {r['lr_f1']:.3f}" + (f", AvgBIO {r['avg_bio']:.3f}" if "avg_bio" in r else ""),
                  flush=True)
    order = ["PCA(50), same genes"] + [f"{NAMES[f]} {v}" for f in FAMILIES for v in ("pretrained", "random init")]
    rows.sort(key=lambda r: (args.datasets.index(r["dataset"]), order.index(r["method"])))
    common.write_csv(common.RESULTS / "embeddings.csv", rows)
    lines = ["| dataset (held-out donor) | embedding | kNN acc / macro-F1 | LR acc / macro-F1 | AvgBIO | ASW batch |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        avg = f"{r['avg_bio']:.3f}" if "avg_bio" in r else "-"
        asw = f"{r['asw_batch']:.3f}" if "asw_batch" in r else "-"
        lines.append(f"| {r['dataset']} ({r['split'].split()[-1]}) | {r['method']} | {r['knn_accuracy']:.3f} / "
                     f"{r['knn_f1']:.3f} | {r['lr_accuracy']:.3f} / {r['lr_f1']:.3f} | {avg} | {asw} |")
    table = "\n".join(lines)
    settings = common.provenance("embeddings.py", argv, started, cpu, args.workers)
    (common.RESULTS / "embeddings.md").write_text(f"# Frozen-embedding benchmark\n\n{settings}\n\n{table}\n")
    print(f"\n{table}\n\n{settings}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
