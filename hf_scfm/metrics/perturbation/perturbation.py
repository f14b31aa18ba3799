"""Perturbation-response metric (an ``evaluate`` module): Pearson delta over all genes, the top-20 DE genes and the
downstream genes, and the MSEs, computed with SciPy / scikit-learn.

Load it offline from the installed package (``hf_scfm.metrics.load("perturbation")``, or
``evaluate.load(path_of_this_folder)``) or from a Hub metric Space it was pushed to
(``hf_scfm.training.hub.push_metric``). It imports nothing of hf_scfm; :func:`condition_scores` is the one home
of this math (``hf_scfm.tasks.perturbation`` scores each condition through it).
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr
from sklearn.metrics import mean_squared_error

_DESCRIPTION = """
Scores predicted mean expression profiles of perturbed cells against the measured ones, per condition, as GEARS
and scGPT do: the **Pearson delta** is the Pearson correlation of the predicted change (predicted - control) with
the measured change (measured - control), over

* all genes (`pearson_delta`),
* the `n_de` genes of largest measured |change| (`pearson_delta_de`; 20 by default, "top-20 DE"),
* all genes except the perturbed ones (`pearson_delta_downstream`): a knocked-down gene's own drop is the largest
  change of its condition and easy to predict from the perturbation flag alone; this figure shows whether the
  model knows the gene's targets;

and the mean squared error of the profiles over all genes (`mse`) and the DE genes (`mse_de`). A Pearson
correlation with a constant vector is undefined and counted as 0.0 (e.g. the "no change" baseline).
Returned values are means over the conditions; `average=False` returns one list entry per condition.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): predicted mean profile per condition (genes in a fixed order).
    references (`list` of `list` of `float`): measured mean profile per condition, same genes.
    control (`list` of `float`): mean profile of the control cells.
    perturbed (`list` of `list` of `int`, optional): the perturbed genes' positions, per condition.
    n_de (`int`, default 20): number of DE genes.
    average (`bool`, default True): mean over conditions, or one value per condition.
Returns:
    pearson_delta, pearson_delta_de, pearson_delta_downstream, mse, mse_de.
"""

_CITATION = """
@article{roohani2024gears,
  title   = {Predicting transcriptional outcomes of novel multigene perturbations with GEARS},
  author  = {Roohani, Yusuf and Huang, Kexin and Leskovec, Jure},
  journal = {Nature Biotechnology},
  volume  = {42},
  pages   = {927--935},
  year    = {2024}
}
"""

METRICS = ("pearson_delta", "pearson_delta_de", "pearson_delta_downstream", "mse", "mse_de")


def pearson_delta(predicted_delta, measured_delta):
    """Pearson correlation of two change vectors (``scipy.stats.pearsonr``); 0.0 when either is constant."""
    a, b = np.asarray(predicted_delta, dtype=np.float64), np.asarray(measured_delta, dtype=np.float64)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(pearsonr(a, b)[0])


def condition_scores(predicted, measured, control, n_de=20, perturbed=()):
    """The metrics of one condition (see the description) from its predicted, measured and control profiles."""
    predicted, measured, control = (np.asarray(v, dtype=np.float64) for v in (predicted, measured, control))
    if not predicted.shape == measured.shape == control.shape or predicted.ndim != 1:
        raise ValueError(f"predicted, measured and control must be profiles over the same genes; got shapes "
                         f"{predicted.shape}, {measured.shape}, {control.shape}.")
    de = np.argsort(-np.abs(measured - control), kind="stable")[:n_de]
    rest = np.setdiff1d(np.arange(len(measured)), np.asarray(perturbed, dtype=np.int64))
    return {
        "pearson_delta": pearson_delta(predicted - control, measured - control),
        "pearson_delta_de": pearson_delta(predicted[de] - control[de], measured[de] - control[de]),
        "pearson_delta_downstream": pearson_delta(predicted[rest] - control[rest], measured[rest] - control[rest]),
        "mse": float(mean_squared_error(measured, predicted)),
        "mse_de": float(mean_squared_error(measured[de], predicted[de])),
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perturbation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, predictions, references, control=None, perturbed=None, n_de=20, average=True):
        if control is None:
            raise ValueError("control (the mean profile of the control cells) is required: the deltas are "
                             "measured from it.")
        if perturbed is None:
            perturbed = [()] * len(predictions)
        if len(perturbed) != len(predictions):
            raise ValueError(f"perturbed has {len(perturbed)} entries for {len(predictions)} conditions.")
        rows = [condition_scores(p, m, control, n_de, g) for p, m, g in zip(predictions, references, perturbed)]
        if not average:
            return {k: [r[k] for r in rows] for k in METRICS}
        return {k: float(np.mean([r[k] for r in rows])) for k in METRICS}
