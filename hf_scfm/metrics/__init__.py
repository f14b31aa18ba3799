"""hf-scfm's metrics as ``evaluate`` modules, shipped with the package and loadable offline.

One folder per metric, ``hf_scfm/metrics/<name>/<name>.py``, each a self-contained ``evaluate.Metric`` (it imports
nothing of hf_scfm: a leaf of the package's import levels):

* ``cell_type_annotation``: accuracy, macro-F1, macro precision / recall, per-class report;
* ``batch_integration``: scib-style NMI, ARI, cell-type ASW, AvgBIO, batch ASW of an embedding;
* ``perturbation``: Pearson delta on all / top-20 DE / downstream genes, MSE.

``load(name)`` is ``evaluate.load(metric_path(name))``: no network, no Hub. ``hf_scfm.training.hub.push_metric``
uploads one to a Hub metric Space, after which ``evaluate.load("<org>/<name>")`` works anywhere.
"""

from __future__ import annotations

from pathlib import Path

METRICS = ("cell_type_annotation", "batch_integration", "perturbation")


def metric_path(name: str) -> str:
    """The folder of the shipped metric ``name`` (what ``evaluate.load`` takes)."""
    if name not in METRICS:
        raise ValueError(f"Unknown hf-scfm metric {name!r}; choose one of {METRICS}.")
    return str(Path(__file__).resolve().parent / name)


def load(name: str, **kwargs):
    """``evaluate.load`` of the shipped metric ``name`` (offline); ``kwargs`` go to ``evaluate.load``."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


__all__ = ["METRICS", "load", "metric_path"]
