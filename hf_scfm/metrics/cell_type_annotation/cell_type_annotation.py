"""Cell-type annotation metric (an ``evaluate`` module): accuracy, macro-F1, macro precision and recall, and a
per-class report, computed by scikit-learn.

Load it offline from the installed package (``hf_scfm.metrics.load("cell_type_annotation")``, or
``evaluate.load(path_of_this_folder)``) or from a Hub metric Space it was pushed to
(``hf_scfm.training.hub.push_metric``). It imports nothing of hf_scfm, so it runs wherever ``evaluate`` and
``scikit-learn`` are installed.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score, classification_report, precision_recall_fscore_support

_DESCRIPTION = """
Scores predicted cell types against true ones: `accuracy`, and `f1_macro`, `precision_macro`, `recall_macro`:
the unweighted mean over the classes present in the predictions or the references (scikit-learn's
`average="macro"`, with `zero_division=0`: a class never predicted has precision 0). Macro averages weigh a rare
cell type as much as a common one, which is why single-cell annotation papers report macro-F1 next to accuracy.
With `per_class=True` it adds `per_class`: scikit-learn's `classification_report` (precision, recall, f1-score,
support) for each class.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str` or `int`): predicted cell types (labels or class ids).
    references (`list` of `str` or `int`): true cell types, of the same kind as `predictions`.
    per_class (`bool`, default False): also return the per-class report.
Returns:
    accuracy, f1_macro, precision_macro, recall_macro (`float`); with `per_class`, `per_class`: class -> {precision,
    recall, f1-score, support}.
Example:
    >>> metric = evaluate.load("hf_scfm/metrics/cell_type_annotation")
    >>> metric.compute(predictions=["alpha", "beta", "beta"], references=["alpha", "beta", "delta"])["accuracy"]
    0.6666666666666666
"""

_CITATION = """
@article{pedregosa2011scikit,
  title   = {Scikit-learn: Machine Learning in Python},
  author  = {Pedregosa, F. and others},
  journal = {Journal of Machine Learning Research},
  volume  = {12},
  pages   = {2825--2830},
  year    = {2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CellTypeAnnotation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            ],
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html"],
        )

    def _compute(self, predictions, references, per_class=False):
        if len(references) == 0:
            raise ValueError("No cells to score: predictions and references are empty.")
        precision, recall, f1, _ = precision_recall_fscore_support(references, predictions, average="macro",
                                                                   zero_division=0)
        result = {
            "accuracy": float(accuracy_score(references, predictions)),
            "f1_macro": float(f1),
            "precision_macro": float(precision),
            "recall_macro": float(recall),
        }
        if per_class:
            report = classification_report(references, predictions, output_dict=True, zero_division=0)
            result["per_class"] = {str(k): {m: float(v) for m, v in row.items()} for k, row in report.items()
                                   if isinstance(row, dict) and k not in ("macro avg", "weighted avg", "micro avg")}
        return result
