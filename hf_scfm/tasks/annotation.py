"""Cell-type annotation: ``hf-scfm annotate --model DIR --query q.h5ad --out q_annotated.h5ad [--label-key KEY]``.

A classifier written by ``hf-scfm finetune`` (adapter, merged or full) is run over the query cells with
:func:`hf_scfm.tasks.inference.iter_model_outputs`; the result is the query AnnData with

* ``obs["predicted_cell_type"]``: the arg-max class (categorical, categories = every class of the model, in the
  model's id order, so two annotated files share one category list);
* ``obs["predicted_cell_type_confidence"]``: the largest softmax probability of the cell;
* ``obsm["predicted_cell_type_probabilities"]``: the full softmax, float32 ``[n_cells, n_classes]``, its columns
  named by ``uns["predicted_cell_type_classes"]``;
* with a label key, ``uns["predicted_cell_type_metrics"]``: accuracy, macro-F1, macro precision and macro recall
  (:func:`hf_scfm.training.finetune.classification_metrics`), the number of cells scored and the unseen labels.

Choices, and why:

* **Query labels unseen in training are warned about and excluded from scoring** (not an error). A held-out donor
  routinely has a rare type the reference lacks (Baron: a Schwann or epsilon cell in one donor only); refusing
  to score the whole query for that would make held-out evaluation impossible, and scoring those cells against
  classes the model cannot output would silently lower every metric. So the cells are still annotated (they
  get the nearest known type, as any user would see), but the metrics are computed on the other cells only and
  the warning, the returned metrics (``unseen_labels``: label -> cells, ``n_excluded``) and the confusion plot's
  title all say so. Only when *no* query cell has a known label is it an error. Missing (NaN) labels are
  excluded the same way.
* **Gene-vocabulary mismatch is checked before any model call** with the tokenizer's own check
  (:meth:`~hf_scfm.tokenization.GeneTokenizer.check_genes`: its thresholds, and its gene subset when the model
  was fine-tuned on selected genes), so the error names the species of the model and the usual fixes (gene
  symbols vs Ensembl IDs, other species) instead of failing inside a batch.
* **Non-count input** (log-normalised, scaled, negative, NaN, empty cells) is refused by the tokenizer with
  the message of :func:`hf_scfm.tokenization.anndata_io.validate_counts`; nothing is re-implemented here.
* **scanpy's convention**, as every task here: :func:`annotate` writes into the AnnData it is given and returns
  ``None``, or with ``copy=True`` writes into a copy and returns it (an ``.h5ad`` path is read into a new
  AnnData, which is returned). ``hf-scfm annotate`` (:func:`annotate_h5ad`, :class:`AnnotateArguments`) writes the
  query plus the new fields to ``--out``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "annotate", "score_predictions", "confusion_counts", "plot_confusion_matrix", "check_label_key",
    "AnnotateArguments", "annotate_h5ad", "PREDICTION_KEY", "CONFIDENCE_KEY", "PROBABILITIES_KEY", "CLASSES_KEY",
    "METRICS_KEY",
]

PREDICTION_KEY = "predicted_cell_type"
CONFIDENCE_KEY = "predicted_cell_type_confidence"
PROBABILITIES_KEY = "predicted_cell_type_probabilities"
CLASSES_KEY = "predicted_cell_type_classes"
METRICS_KEY = "predicted_cell_type_metrics"


def check_label_key(adata, label_key: str, source: str = "the query") -> None:
    """``ValueError`` naming the missing column and listing the ones there are."""
    if label_key not in adata.obs.columns:
        raise ValueError(f"{source} has no obs column {label_key!r} (obs columns: {list(adata.obs.columns)}). "
                         "Pass --label-key with one of those, or leave it out to annotate without scoring.")


def score_predictions(predictions: Sequence, labels: Sequence, known_classes: Sequence[str], *,
                      source: str = "the query", warn: bool = True) -> dict[str, Any]:
    """Metrics of ``predictions`` against ``labels`` over the cells whose label is one of ``known_classes``.

    Cells with a label outside ``known_classes`` (unseen in training) or a missing label are excluded, counted
    in ``unseen_labels`` / ``n_excluded`` and (``warn``) reported with a warning; an error when none is left.
    Returns accuracy, f1_macro, precision_macro, recall_macro, n_cells, n_scored, n_excluded, unseen_labels.
    """
    import numpy as np
    import pandas as pd

    from ..training.finetune import classification_metrics

    labels = pd.Series(list(labels), dtype=object)
    predictions = np.asarray([str(p) for p in predictions], dtype=object)
    missing = labels.isna().to_numpy()
    labels = labels.astype(str).to_numpy(dtype=object)
    known = set(map(str, known_classes))
    scored = ~missing & np.isin(labels, list(known))
    unseen = pd.Series(labels[~scored & ~missing]).value_counts()
    unseen_labels = {str(k): int(v) for k, v in unseen.items()}
    if warn and (unseen_labels or missing.any()):
        parts = []
        if unseen_labels:
            parts.append(f"{int(unseen.sum())} cell(s) with label(s) unseen in training "
                         f"({', '.join(f'{k}: {v}' for k, v in unseen_labels.items())})")
        if missing.any():
            parts.append(f"{int(missing.sum())} cell(s) with a missing label")
        warnings.warn(f"{source}: {' and '.join(parts)} are annotated but excluded from the metrics: a classifier "
                      "over the training labels cannot predict those labels.", stacklevel=2)
    if not scored.any():
        raise ValueError(f"{source}: none of its {len(labels)} cells has a label the model was trained on "
                         f"(query labels: {sorted(unseen_labels)[:10]}; model classes: {sorted(known)[:10]}). Check "
                         "--label-key and that the model was fine-tuned on the same cell-type vocabulary.")
    metrics = classification_metrics(predictions[scored], labels[scored])
    metrics.update(n_cells=int(len(labels)), n_scored=int(scored.sum()), n_excluded=int((~scored).sum()),
                   unseen_labels=unseen_labels)
    return metrics


def annotate(model, query, *, label_key: str | None = None, batch_size: int = 64, max_length: int | None = None,
             out_png: str | Path | None = None, device: str | None = None, layer: str | None = None,
             progress: bool = True, copy: bool = False):
    """Annotate the cells of ``query`` with a fine-tuned classifier, scanpy-style: the results go into the AnnData
    under the keys of the module docstring and ``None`` is returned, or with ``copy=True`` into a copy, which is
    returned (``query`` untouched). An ``.h5ad`` path is read into a new AnnData, which is returned.

    Args:
        model: a folder / Hub repo written by ``hf-scfm finetune`` (adapter, merged or full), or an already
            loaded ``(model, tokenizer)`` pair (as :func:`~hf_scfm.tasks.inference.load_model_and_tokenizer`
            returns with ``kind="classifier"``).
        query: an AnnData of raw counts or an ``.h5ad`` path.
        label_key: obs column with true labels: adds ``uns["predicted_cell_type_metrics"]`` (see the module
            docstring for how labels unseen in training are handled).
        batch_size: cells per forward pass.
        max_length: tokens per cell (default: the tokenizer's, as in fine-tuning).
        out_png: with ``label_key``, where to write the row-normalised confusion matrix (PNG).
        device: ``"cpu"``/``"cuda"`` (default: CUDA when available).
        layer: read the counts from ``adata.layers[layer]`` instead of ``X``.
        progress: show a tqdm bar.
        copy: write into a copy of ``query`` and return it.
    """
    import numpy as np
    import pandas as pd

    from .inference import iter_model_outputs, load_model_and_tokenizer, result_target

    adata, returned = result_target(query, copy)
    if label_key is not None:
        check_label_key(adata, label_key)
    if isinstance(model, (tuple, list)):
        net, tokenizer = model
    else:
        net, tokenizer = load_model_and_tokenizer(model, kind="classifier", device=device)
    id2label = {int(k): str(v) for k, v in net.config.id2label.items()}
    classes = [id2label[i] for i in range(len(id2label))]
    tokenizer.check_genes(adata)

    chunks = []
    for _, _, outputs in iter_model_outputs(net, tokenizer, adata, batch_size=batch_size, max_length=max_length,
                                            layer=layer, progress=progress, desc="annotate"):
        chunks.append(outputs.logits.detach().double().softmax(-1).cpu().numpy())
    probs = np.concatenate(chunks)
    if probs.shape[1] != len(classes):
        raise ValueError(f"The model outputs {probs.shape[1]} classes but its config names {len(classes)}.")
    best = probs.argmax(1)
    adata.obs[PREDICTION_KEY] = pd.Categorical.from_codes(best, categories=classes)
    adata.obs[CONFIDENCE_KEY] = probs.max(1).astype(np.float32)
    adata.obsm[PROBABILITIES_KEY] = probs.astype(np.float32)
    adata.uns[CLASSES_KEY] = np.asarray(classes, dtype=object)
    if label_key is not None:
        metrics = score_predictions(adata.obs[PREDICTION_KEY], adata.obs[label_key], classes, source="the query")
        adata.uns[METRICS_KEY] = metrics
        if out_png is not None:
            plot_confusion_matrix(adata.obs[PREDICTION_KEY], adata.obs[label_key], classes, out_png,
                                  title=_plot_title(metrics))
    return adata if returned else None


def _plot_title(metrics: dict) -> str:
    title = f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['f1_macro']:.3f} (n={metrics['n_scored']})"
    if metrics.get("n_excluded"):
        title += f"\n{metrics['n_excluded']} cells with labels unseen in training not scored"
    return title


def confusion_counts(predictions, labels, classes: Sequence[str]):
    """``(rows, counts)``: the true labels that are model classes (in class order) and the ``[rows, classes]``
    matrix of cell counts (true label x predicted class); cells with unseen or missing labels are left out."""
    import numpy as np
    import pandas as pd

    classes = [str(c) for c in classes]
    labels = pd.Series(list(labels), dtype=object)
    keep = labels.notna().to_numpy() & labels.astype(str).isin(classes).to_numpy()
    truth = labels.astype(str).to_numpy()[keep]
    pred = np.asarray([str(p) for p in predictions], dtype=object)[keep]
    rows = [c for c in classes if c in set(truth)]
    row_of, col_of = {c: i for i, c in enumerate(rows)}, {c: i for i, c in enumerate(classes)}
    counts = np.zeros((len(rows), len(classes)), dtype=np.int64)
    np.add.at(counts, ([row_of[t] for t in truth], [col_of[p] for p in pred]), 1)
    return rows, counts


def plot_confusion_matrix(predictions, labels, classes: Sequence[str], png_path: str | Path, *,
                          title: str = "") -> Path:
    """Row-normalised confusion matrix (rows: true labels known to the model, columns: every model class) as a
    PNG; each cell shows the fraction of that row, each row label its number of cells."""
    import numpy as np

    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - matplotlib is in the dev/plots extras
        raise ImportError('The confusion-matrix plot needs matplotlib: pip install -e ".[plots]"') from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [str(c) for c in classes]
    rows, counts = confusion_counts(predictions, labels, classes)
    frac = counts / np.maximum(counts.sum(1, keepdims=True), 1)

    width = max(5.0, 0.5 * len(classes) + 3)
    fig, ax = plt.subplots(figsize=(width, max(4.0, 0.45 * len(rows) + 2.5)), dpi=100)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{r} ({int(counts[i].sum())})" for i, r in enumerate(rows)], fontsize=8)
    for r in range(len(rows)):
        for c in range(len(classes)):
            if counts[r, c]:
                ax.text(c, r, f"{frac[r, c]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if frac[r, c] > 0.5 else "black")
    ax.set_xlabel("predicted cell type")
    ax.set_ylabel("true cell type (cells)")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, label="fraction of the row")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------


def confusion_png_path(out: str | Path) -> Path:
    """``q_annotated.h5ad`` -> ``q_annotated_confusion.png`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}_confusion.png")


@dataclass
class AnnotateArguments:
    """What ``hf-scfm annotate`` takes: an h5ad in, an annotated h5ad (and with labels a confusion PNG) out."""

    model: str = field(metadata={"metavar": "DIR_OR_REPO", "help": "classifier from hf-scfm finetune"})
    query: str = field(metadata={"metavar": "H5AD", "help": "cells to annotate (raw counts)"})
    out: str = field(metadata={"metavar": "H5AD", "help": "annotated copy of the query (.h5ad)"})
    label_key: str | None = field(default=None, metadata={
        "metavar": "KEY", "help": "obs column with true labels: print metrics and write <out stem>_confusion.png"})
    batch_size: int = field(default=64, metadata={"help": "cells per forward pass"})
    max_length: int | None = field(default=None, metadata={"help": "tokens per cell (default: the tokenizer's)"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)"})
    layer: str | None = field(default=None, metadata={"help": "read counts from adata.layers[LAYER] instead of X "
                                                              "(e.g. counts)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (--no-progress: none)"})

    def __post_init__(self):
        if Path(self.out).suffix != ".h5ad":
            raise ValueError(f"--out {self.out} must end in .h5ad")


def annotate_h5ad(args: AnnotateArguments):
    """``hf-scfm annotate``: annotate ``args.query`` (an .h5ad), write ``args.out`` (and the confusion PNG with a
    label key), print a summary; returns the annotated AnnData."""
    out = Path(args.out)
    png = confusion_png_path(out) if args.label_key else None
    result = annotate(args.model, args.query, label_key=args.label_key, batch_size=args.batch_size,
                      max_length=args.max_length, out_png=png, device=args.device, layer=args.layer,
                      progress=args.progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.write_h5ad(out)
    counts = result.obs[PREDICTION_KEY].value_counts()
    print(f"Annotated {result.n_obs:,} cells -> {out}")
    print("predicted: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    if args.label_key:
        m = result.uns[METRICS_KEY]
        print(f"accuracy {m['accuracy']:.4f}  macro-F1 {m['f1_macro']:.4f}  macro precision "
              f"{m['precision_macro']:.4f}  macro recall {m['recall_macro']:.4f}  ({m['n_scored']} cells scored)")
        if m["unseen_labels"]:
            print(f"not scored (labels unseen in training): {json.dumps(m['unseen_labels'])}")
        print(f"confusion matrix: {png}")
    return result
