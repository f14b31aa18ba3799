"""The logistic-regression baseline of cell-type annotation, on the same split as the foundation model.

Each cell is library-size normalised to 10,000 counts and log1p-transformed (scanpy's ``normalize_total(1e4)``
+ ``log1p``, computed directly on the sparse matrix by :func:`hf_scfm.tokenization.anndata_io.log_normalize_counts`, the
same normalisation the tokenizer's gene selection uses; scanpy is not needed), on the genes the train and
test cells share, and a multinomial ``sklearn.linear_model.LogisticRegression`` (L2, ``C=1``, lbfgs) is fit on
the train cells. This is the baseline of the scGPT / CellFM / SC-MAMBA2 annotation comparisons (the issue's
reference points: about 0.94 / 0.79 accuracy / macro-F1 on a held-out Baron human donor). Test cells with
labels unseen in training are excluded from the metrics exactly as :func:`hf_scfm.tasks.annotation.annotate`
does (:func:`~hf_scfm.tasks.annotation.score_predictions`), so the two rows of a comparison score the same cells.

scikit-learn is in the ``plots``/``dev`` extras, not a core dependency: it is imported inside the function.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["log_normalize", "logistic_regression_baseline"]


def _require_sklearn():
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as err:
        raise ImportError("The logistic-regression baseline needs scikit-learn (a dependency of hf-scfm): "
                          "pip install scikit-learn") from err
    return LogisticRegression


def log_normalize(adata, target_sum: float = 1e4):
    """CSR ``log1p(x / library_size * target_sum)`` of an AnnData of raw counts (float32)."""
    import numpy as np

    from ..tokenization.anndata_io import log_normalize_counts

    lib = np.asarray(adata.X.sum(1), dtype=np.float64).ravel()
    if (lib <= 0).any():
        raise ValueError(f"{int((lib <= 0).sum())} cell(s) have no counts; drop them before the baseline.")
    return log_normalize_counts(adata.X, lib, target_sum)


def logistic_regression_baseline(train, test, label_key: str = "cell_type", *, C: float = 1.0, max_iter: int = 1000,
                                 class_weight: str | None = None, seed: int = 0, warn: bool = True,
                                 genes=None, pca_components: int | None = None) -> dict[str, Any]:
    """Fit on ``train``, predict ``test`` (AnnData of raw counts, labels in ``obs[label_key]``).

    ``genes``: fit on these var_names only (e.g. the genes a model's tokenizer reads: the fair comparison for a
    model that never sees the others); each cell is still normalised by the library size of all its genes, as the
    tokenizer does. ``pca_components``: fit on that many principal components of the (centred) log-normalised
    genes, the PCA fitted on ``train`` (sklearn ``PCA``, seeded).

    Returns ``{"predictions": array of str, "probabilities": [n_test, n_classes], "classes": [...],
    "metrics": {...}, "fit_seconds": float, "n_genes": int}``; ``metrics`` as
    :func:`hf_scfm.tasks.annotation.score_predictions` (accuracy, macro F1/precision/recall, unseen labels).
    """
    import numpy as np

    from .annotation import check_label_key, score_predictions

    LogisticRegression = _require_sklearn()
    check_label_key(train, label_key, "the training cells")
    check_label_key(test, label_key, "the test cells")
    shared = train.var_names.intersection(test.var_names, sort=False)
    if genes is not None:
        measured = set(shared)
        missing = [g for g in genes if g not in measured]
        if missing:
            raise ValueError(f"{len(missing)} of the {len(genes)} genes are not var_names of both the train and the "
                             f"test cells (e.g. {', '.join(map(str, missing[:5]))}); pass genes both measure.")
        shared = type(shared)(list(genes))
    if len(shared) == 0:
        raise ValueError("The train and test cells share no gene (var_names); use the same gene identifiers.")
    # normalise on all genes of each cell (library size), then keep the shared ones
    x_train = log_normalize(train)[:, train.var_names.get_indexer(shared)]
    x_test = log_normalize(test)[:, test.var_names.get_indexer(shared)]
    if pca_components:
        from sklearn.decomposition import PCA

        x_train, x_test = x_train.toarray(), x_test.toarray()
        pca = PCA(n_components=min(int(pca_components), *x_train.shape), random_state=seed).fit(x_train)
        x_train, x_test = pca.transform(x_train), pca.transform(x_test)
    y_train = train.obs[label_key].astype(str).to_numpy()
    if len(np.unique(y_train)) < 2:
        raise ValueError(f"The training cells have {len(np.unique(y_train))} distinct label(s); need >= 2.")
    clf = LogisticRegression(C=C, max_iter=max_iter, class_weight=class_weight, random_state=seed)
    start = time.perf_counter()
    clf.fit(x_train, y_train)
    seconds = time.perf_counter() - start
    probabilities = clf.predict_proba(x_test)
    predictions = clf.classes_[probabilities.argmax(1)]
    metrics = score_predictions(predictions, test.obs[label_key], list(clf.classes_), source="the test cells",
                                warn=warn)
    return {"predictions": predictions, "probabilities": probabilities, "classes": list(clf.classes_),
            "metrics": metrics, "fit_seconds": seconds, "n_genes": int(len(shared))}
