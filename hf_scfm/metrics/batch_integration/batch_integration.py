"""Batch-integration metric (an ``evaluate`` module): scib-style NMI, ARI, cell-type ASW, AvgBIO and batch ASW of a
cell embedding, computed with scikit-learn.

Load it offline from the installed package (``hf_scfm.metrics.load("batch_integration")``, or
``evaluate.load(path_of_this_folder)``) or from a Hub metric Space it was pushed to
(``hf_scfm.training.hub.push_metric``). It imports nothing of hf_scfm. The functions below are the one home of
this math: :func:`hf_scfm.tasks.integration.integration_metrics` (AnnData in) calls this module.
"""

import datasets
import evaluate
import numpy as np
from sklearn import metrics as skm
from sklearn.cluster import KMeans

_DESCRIPTION = """
Metrics of a cell embedding, following scib (Luecken et al. 2022), which SC-MAMBA2 uses (its section 4.4):

* **NMI / ARI** compare a clustering of the embedding with the cell types. scib clusters with Leiden over a
  resolution sweep and keeps the clustering with the best NMI; ARI is computed on that same clustering. The default
  here is **KMeans over a sweep of k** (k = 2 .. 2 x n_cell_types, capped at 50 and at the number of cells - 1),
  keeping the k with the best NMI: the same "best clustering for the labels" idea with a deterministic clusterer
  that needs only scikit-learn. `method="leiden"` uses scanpy's Leiden over resolutions 0.1 .. 2.0 (scib's grid)
  when scanpy and leidenalg are installed.
* **asw_celltype** = (silhouette(embedding, cell type) + 1) / 2, in [0, 1] (scib `silhouette`, scaled).
* **avg_bio** = mean(ARI, NMI, asw_celltype) (SC-MAMBA2's and scGPT's summary of biology conservation).
* **asw_batch** (scib `silhouette_batch`, with `batches`): within each cell type seen in >= 2 batches (and not one
  batch per cell), the per-cell silhouette of the batch labels mapped to 1 - |s|, averaged per cell type, then
  over cell types. 1 = batches perfectly mixed inside every cell type, 0 = separated.

All silhouettes are Euclidean on the embedding as given (no PCA), as scib does for embeddings.
"""

_KWARGS_DESCRIPTION = """
Args:
    embeddings (`list` of `list` of `float`): one embedding vector per cell.
    labels (`list` of `str`): the cell types.
    batches (`list` of `str`, optional): the batch (donor, ...) of each cell; adds `asw_batch`.
    method (`str`, default "kmeans"): "kmeans" or "leiden" (the clustering swept for NMI/ARI).
    n_clusters (`list`, optional): the k values (KMeans) or resolutions (Leiden) to sweep; default see above.
    seed (`int`, default 0): seed of the clusterer.
    return_clusters (`bool`, default False): also return `clusters` (the best clustering, one id per cell) and
        `best_param` (its k or resolution).
Returns:
    nmi, ari, asw_celltype, avg_bio and, with `batches`, asw_batch (`float`).
"""

_CITATION = """
@article{luecken2022benchmarking,
  title   = {Benchmarking atlas-level data integration in single-cell genomics},
  author  = {Luecken, Malte D. and B{\"u}ttner, M. and Chaichoompu, K. and others},
  journal = {Nature Methods},
  volume  = {19},
  pages   = {41--50},
  year    = {2022}
}
"""


def nmi_ari(x, labels, *, method="kmeans", n_clusters=None, seed=0):
    """Best-NMI clustering of ``x`` over a sweep (see the description); returns NMI, ARI, the clustering and its
    parameter. ``n_clusters``: the k values (KMeans) or resolutions (Leiden) to try."""
    x, labels = np.asarray(x, dtype=np.float64), np.asarray(labels)
    n_types = len(np.unique(labels))
    if method == "kmeans":
        grid = n_clusters or range(2, min(2 * n_types, 50, len(x) - 1) + 1)

        def cluster(k):
            return KMeans(n_clusters=int(k), n_init=3, random_state=seed).fit_predict(x)
    elif method == "leiden":
        try:
            import anndata as ad
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
        nmi = skm.normalized_mutual_info_score(labels, clusters)
        if best is None or nmi > best[0]:
            best = (nmi, param, clusters)
    if best is None:
        raise ValueError("Too few cells to cluster (need >= 3).")
    nmi, param, clusters = best
    return {"nmi": float(nmi), "ari": float(skm.adjusted_rand_score(labels, clusters)), "clusters": clusters,
            "best_param": param}


def celltype_asw(x, labels):
    """(mean silhouette of the cell-type labels + 1) / 2 (scib ``silhouette``, scaled)."""
    if len(np.unique(labels)) < 2:
        raise ValueError("Cell-type ASW needs >= 2 cell types.")
    return float((skm.silhouette_score(np.asarray(x, dtype=np.float64), labels) + 1) / 2)


def batch_asw(x, labels, batches):
    """scib ``silhouette_batch``: mean over cell types of the mean of 1 - |silhouette of batch| in that type."""
    x, labels, batches = np.asarray(x, dtype=np.float64), np.asarray(labels), np.asarray(batches)
    per_type = []
    for label in np.unique(labels):
        rows = labels == label
        n_batches = len(np.unique(batches[rows]))
        if n_batches < 2 or n_batches == rows.sum():
            continue  # silhouette undefined (one batch) or meaningless (every cell its own batch): scib skips
        per_type.append(float(np.mean(1 - np.abs(skm.silhouette_samples(x[rows], batches[rows])))))
    if not per_type:
        raise ValueError("Batch ASW needs a cell type present in >= 2 batches; none is.")
    return float(np.mean(per_type))


def integration_scores(x, labels, batches=None, *, method="kmeans", n_clusters=None, seed=0,
                       return_clusters=False):
    """Every metric of the description for embedding ``x`` [cells, dims], cell types ``labels`` and (optional)
    ``batches``."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray([str(v) for v in labels])
    if x.ndim != 2 or len(x) != len(labels) or not np.isfinite(x).all():
        raise ValueError(f"embeddings must be a finite [cells, dims] matrix with one row per label; got shape "
                         f"{x.shape} for {len(labels)} labels.")
    clustering = nmi_ari(x, labels, method=method, n_clusters=n_clusters, seed=seed)
    result = {"nmi": clustering["nmi"], "ari": clustering["ari"], "asw_celltype": celltype_asw(x, labels)}
    result["avg_bio"] = float(np.mean([result["ari"], result["nmi"], result["asw_celltype"]]))
    if batches is not None:
        batches = np.asarray([str(v) for v in batches])
        if len(batches) != len(labels):
            raise ValueError(f"batches has {len(batches)} entries for {len(labels)} cells.")
        result["asw_batch"] = batch_asw(x, labels, batches)
    if return_clusters:
        result["clusters"] = np.asarray(clustering["clusters"]).tolist()
        result["best_param"] = clustering["best_param"]
    return result


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BatchIntegration(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"embeddings": datasets.Sequence(datasets.Value("float64")),
                                        "labels": datasets.Value("string")}),
            reference_urls=["https://github.com/theislab/scib"],
        )

    def _compute(self, embeddings, labels, batches=None, method="kmeans", n_clusters=None, seed=0,
                 return_clusters=False):
        return integration_scores(np.asarray([np.asarray(e, dtype=np.float64) for e in embeddings]), labels,
                                  batches, method=method, n_clusters=n_clusters, seed=seed,
                                  return_clusters=return_clusters)
