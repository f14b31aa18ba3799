"""Batch integration: scib-style metrics of a cell embedding, and adversarial batch removal for fine-tuning.

Metrics (:func:`integration_metrics`), following scib (Luecken et al. 2022), which SC-MAMBA2 uses (§4.4):

* **NMI / ARI** compare a clustering of the embedding with the cell types. scib clusters with Leiden over a
  resolution sweep and keeps the clustering with the best NMI; ARI is computed on that same clustering. Leiden
  needs ``leidenalg``/``igraph``, which are not dependencies here, so the default is **KMeans over a sweep of k**
  (``k = 2 .. 2 x n_cell_types``, capped at 50 and at the number of cells - 1), keeping the k with the best NMI:
  the same "best clustering for the labels" idea with a deterministic, dependency-free clusterer (sklearn).
  ``method="leiden"`` uses scanpy's Leiden over resolutions 0.1 .. 2.0 (scib's grid) when ``leidenalg`` is
  installed.
* **cell-type ASW** = (silhouette(embedding, cell type) + 1) / 2, in [0, 1] (scib ``silhouette``, scaled).
* **AvgBIO** = mean(ARI, NMI, cell-type ASW) (SC-MAMBA2's and scGPT's summary of biology conservation).
* **batch ASW** (scib ``silhouette_batch``): within each cell type seen in >= 2 batches (and not one batch per
  cell), the per-cell silhouette of the *batch* labels, mapped to 1 - |s|; averaged per cell type, then over
  cell types. 1 = batches perfectly mixed inside every cell type, 0 = separated.

All silhouettes are Euclidean on the embedding as given (no PCA), as scib does for embeddings.

Adversarial batch removal while fine-tuning (a gradient-reversal batch discriminator) is a training
component: :mod:`hf_scfm.training.adversarial`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["batch_asw", "celltype_asw", "integration_metrics", "nmi_ari"]


def _sklearn_metrics():
    try:
        from sklearn import metrics
    except ImportError as err:  # pragma: no cover - sklearn is in the dev/plots extras
        raise ImportError("Integration metrics need scikit-learn: pip install 'hf-scfm[plots]' "
                          "(or pip install scikit-learn).") from err
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------


def _embedding(adata, embedding_key: str) -> np.ndarray:
    if embedding_key == "X":
        x = adata.X
    elif embedding_key in adata.obsm:
        x = adata.obsm[embedding_key]
    else:
        raise ValueError(f"No embedding {embedding_key!r} in obsm (keys: {list(adata.obsm.keys())}); run "
                         "`hf-scfm embed` (or hf_scfm.tasks.embedding.embed) first, or pass embedding_key=...")
    if hasattr(x, "toarray"):
        x = x.toarray()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"Embedding {embedding_key!r} must be a finite [cells, dims] matrix, got shape {x.shape}.")
    return x


def _labels(adata, key: str, what: str) -> np.ndarray:
    if key not in adata.obs.columns:
        raise ValueError(f"No obs column {key!r} ({what}); columns: {list(adata.obs.columns)}.")
    labels = adata.obs[key]
    if labels.isna().any():
        raise ValueError(f"obs[{key!r}] has {int(labels.isna().sum())} missing values; drop those cells first.")
    return labels.astype(str).to_numpy()


def nmi_ari(x: np.ndarray, labels: np.ndarray, *, method: str = "kmeans", n_clusters=None,
            seed: int = 0) -> dict[str, Any]:
    """Best-NMI clustering of ``x`` over a sweep (see the module docstring); returns NMI, ARI and the clustering.

    ``n_clusters``: the k values (KMeans) or resolutions (Leiden) to try; default the sweep described above.
    """
    metrics = _sklearn_metrics()
    n_types = len(np.unique(labels))
    if method == "kmeans":
        from sklearn.cluster import KMeans

        grid = n_clusters or range(2, min(2 * n_types, 50, len(x) - 1) + 1)

        def cluster(k):
            return KMeans(n_clusters=int(k), n_init=3, random_state=seed).fit_predict(x)
    elif method == "leiden":
        import anndata as ad

        try:
            import leidenalg  # noqa: F401
            import scanpy as sc
        except ImportError as err:
            raise ImportError("method='leiden' needs scanpy and leidenalg (pip install leidenalg); "
                              "or use method='kmeans'.") from err
        tmp = ad.AnnData(np.zeros((len(x), 0), dtype=np.float32), obsm={"X_emb": x})
        sc.pp.neighbors(tmp, use_rep="X_emb", random_state=seed)
        grid = n_clusters or [round(0.1 * i, 1) for i in range(1, 21)]

        def cluster(res):
            sc.tl.leiden(tmp, resolution=float(res), key_added="c", random_state=seed, flavor="igraph",
                         n_iterations=2)
            return tmp.obs["c"].to_numpy()
    else:
        raise ValueError(f"method={method!r}: choose 'kmeans' or 'leiden'.")
    best = None
    for param in grid:
        clusters = cluster(param)
        nmi = metrics.normalized_mutual_info_score(labels, clusters)
        if best is None or nmi > best[0]:
            best = (nmi, param, clusters)
    if best is None:
        raise ValueError("Too few cells to cluster (need >= 3).")
    nmi, param, clusters = best
    return {"nmi": float(nmi), "ari": float(metrics.adjusted_rand_score(labels, clusters)),
            "clusters": clusters, "best_param": param}


def celltype_asw(x: np.ndarray, labels: np.ndarray) -> float:
    """(mean silhouette of the cell-type labels + 1) / 2 (scib ``silhouette``, scaled)."""
    if len(np.unique(labels)) < 2:
        raise ValueError("Cell-type ASW needs >= 2 cell types.")
    return float((_sklearn_metrics().silhouette_score(x, labels) + 1) / 2)


def batch_asw(x: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> float:
    """scib ``silhouette_batch``: mean over cell types of the mean of 1 - |silhouette of batch| in that type."""
    metrics = _sklearn_metrics()
    per_type = []
    for label in np.unique(labels):
        rows = labels == label
        n_batches = len(np.unique(batches[rows]))
        if n_batches < 2 or n_batches == rows.sum():
            continue  # silhouette undefined (one batch) or meaningless (every cell its own batch): scib skips
        per_type.append(float(np.mean(1 - np.abs(metrics.silhouette_samples(x[rows], batches[rows])))))
    if not per_type:
        raise ValueError("Batch ASW needs a cell type present in >= 2 batches; none is.")
    return float(np.mean(per_type))


def integration_metrics(adata, embedding_key: str, label_key: str, batch_key: str | None = None, *,
                        method: str = "kmeans", n_clusters=None, seed: int = 0) -> dict[str, float]:
    """scib-style integration metrics of ``adata.obsm[embedding_key]`` (see the module docstring).

    Returns ``{"nmi", "ari", "asw_celltype", "avg_bio"}`` plus ``"asw_batch"`` when ``batch_key`` is given. The
    best clustering is stored in ``adata.obs[f"{embedding_key}_clusters"]``.
    """
    x = _embedding(adata, embedding_key)
    labels = _labels(adata, label_key, "the cell types")
    clustering = nmi_ari(x, labels, method=method, n_clusters=n_clusters, seed=seed)
    adata.obs[f"{embedding_key}_clusters"] = np.asarray(clustering["clusters"]).astype(str)
    result = {"nmi": clustering["nmi"], "ari": clustering["ari"], "asw_celltype": celltype_asw(x, labels)}
    result["avg_bio"] = float(np.mean([result["ari"], result["nmi"], result["asw_celltype"]]))
    if batch_key is not None:
        result["asw_batch"] = batch_asw(x, labels, _labels(adata, batch_key, "the batches"))
    return result
