"""Batch integration: scib-style metrics of a cell embedding, and adversarial batch removal for fine-tuning.

Metrics (:func:`integration_metrics`): NMI / ARI of the best-NMI clustering over a sweep, cell-type ASW, AvgBIO and
batch ASW, following scib (Luecken et al. 2022), which SC-MAMBA2 uses (§4.4). They are computed by the
``batch_integration`` ``evaluate`` module (``hf_scfm/metrics/batch_integration/``, whose description states
every definition and choice); this module reads them from an AnnData and writes the best clustering back.
``nmi_ari``, ``celltype_asw`` and ``batch_asw`` are that module's functions, re-exported here.

Adversarial batch removal while fine-tuning (a gradient-reversal batch discriminator) is a training
component: :mod:`hf_scfm.training.adversarial`.
"""

from __future__ import annotations

import numpy as np

from ..metrics.batch_integration.batch_integration import batch_asw, celltype_asw, nmi_ari

__all__ = ["batch_asw", "celltype_asw", "integration_metrics", "nmi_ari"]


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


def integration_metrics(adata, embedding_key: str, label_key: str, batch_key: str | None = None, *,
                        method: str = "kmeans", n_clusters=None, seed: int = 0) -> dict[str, float]:
    """scib-style integration metrics of ``adata.obsm[embedding_key]`` (the ``batch_integration`` metric).

    Returns ``{"nmi", "ari", "asw_celltype", "avg_bio"}`` plus ``"asw_batch"`` when ``batch_key`` is given. The
    best clustering is stored in ``adata.obs[f"{embedding_key}_clusters"]``.
    """
    from ..metrics import load

    x = _embedding(adata, embedding_key)
    labels = _labels(adata, label_key, "the cell types")
    batches = _labels(adata, batch_key, "the batches") if batch_key is not None else None
    result = load("batch_integration").compute(embeddings=x, labels=labels, batches=batches, method=method,
                                               n_clusters=n_clusters, seed=seed, return_clusters=True)
    adata.obs[f"{embedding_key}_clusters"] = np.asarray(result.pop("clusters")).astype(str)
    result.pop("best_param")
    return result
