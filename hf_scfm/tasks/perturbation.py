"""Perturbation prediction (SC-MAMBA2 section 4.5) for every model family: build, fine-tune, predict, evaluate.

The model is each family's ``<Family>ForPerturbationPrediction`` (``hf_scfm.AutoModelForPerturbationPrediction``): a
``PreTrainedModel`` that takes the perturbed genes as ``perturbation_flags`` in ``forward``, adds a learned flag
embedding to the token embeddings and regresses every gene's perturbed ``log1p`` value. It saves and loads like every
checkpoint (``save_pretrained``, safetensors, its Auto class, remote code). The data side (GEARS layout, split,
sentences, training pairs) is :mod:`hf_scfm.tasks.perturbation_data`, reverse perturbation
:mod:`hf_scfm.tasks.reverse_perturbation`.

In the order a run uses them:

* :func:`build_perturbation_model`: the perturbation head of a pretrained checkpoint's family, backbone weights
  kept; ``value_scale`` (:func:`value_scale_for` of the data) puts the data's ``log1p`` values on about ``[0, 1]``
  in the head's units (SC-MAMBA2 also scales its inputs by it, as bins are scaled in pretraining).
* :func:`finetune_perturbation`: ``transformers.Trainer`` on control -> perturbed pairs
  (:class:`~hf_scfm.tasks.perturbation_data.PerturbationPairs`, :class:`hf_scfm.data.DataCollatorForPerturbation`).
* :func:`predict_perturbation`: mean predicted profile per condition over a seeded sample of control cells, written
  into the AnnData (scanpy's convention, below) or returned.
* :func:`evaluate_perturbation`: Pearson correlation of predicted vs measured mean change from control ("Pearson
  delta") over all genes, over the 20 most changed genes of each condition (by ``|mean perturbed - mean control|``
  of the measured data) and over all genes but the perturbed ones ("downstream": the perturbed gene's own change
  dominates the others and is the easy part), per condition and per split group, next to three baselines: *no
  change* (the control mean), *training mean* (control + the mean change of the training conditions) and, for
  doubles, *additive* (control + the sum of the two measured single changes when both singles were trained on; the
  training mean otherwise). The "no change" baseline predicts a zero change, whose correlation is undefined: it is
  reported as 0.0, with its MSE.
* ``hf-scfm perturb`` (:func:`perturb` of :class:`PerturbArguments`, the same call in Python) runs all of it and writes the fine-tuned model (``save_pretrained``, with
  its tokenizer: reload it with :func:`hf_scfm.tasks.inference.load_model_and_tokenizer`), metrics and a plot.

AnnData convention (scanpy's): :func:`predict_perturbation` with ``inplace=True`` (default) writes
``adata.varm[key_added]`` (a DataFrame ``var_names x conditions`` of predicted mean ``log1p(x_norm)``; NaN for genes
the vocabulary does not know) and ``adata.uns[key_added]`` (the settings) and returns None; ``copy=True`` returns a
new AnnData with them; ``inplace=False`` returns the DataFrame ``conditions x genes`` and writes nothing.

:func:`hf_scfm.tasks.inference.iter_model_outputs` is not used here: it runs the tokenizer's own encoding (expressed
genes only, bins for SC-MAMBA2) and one set of forward arguments for every batch, while a perturbation sentence holds
every gene with its log1p value and per-condition flags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .perturbation_data import (
    CONTROL,
    SPLIT_GROUPS,
    PerturbationData,
    PerturbationPairs,
    condition_name,
    parse_condition,
    perturbation_sentences,
    read_perturbation_data,
    split_conditions,
)

__all__ = [
    "CONTROL",
    "SPLIT_GROUPS",
    "PerturbationData",
    "PerturbationPairs",
    "condition_name",
    "parse_condition",
    "read_perturbation_data",
    "split_conditions",
    "build_perturbation_model",
    "value_scale_for",
    "finetune_perturbation",
    "predict_perturbation",
    "predict_genesets",
    "pearson_delta",
    "perturbation_metrics",
    "evaluate_perturbation",
    "PerturbArguments",
    "perturb",
]

#: Default key of :func:`predict_perturbation`'s results in ``adata.varm`` / ``adata.uns``.
PREDICTION_KEY = "perturbation_prediction"


# ---------------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------------


def value_scale_for(data: PerturbationData) -> float:
    """``1 / ceil(max log1p value)``: the data's values then span ``[0, 1]`` (at least a scale of 1)."""
    top = float(data.values.max()) if data.values.nnz else 1.0
    return 1.0 / max(1.0, float(np.ceil(top)))


def build_perturbation_model(source, *, value_scale: float = 0.2):
    """The family's ``<Family>ForPerturbationPrediction`` from a pretrained checkpoint (folder or Hub id) or an
    in-memory hf-scfm model of any head: backbone weights kept, flag embedding and head new (SC-MAMBA2 also keeps
    its pretrained expression head, which the perturbation head is), ``value_scale`` set in the config (the key
    :attr:`~hf_scfm.training.families.Family.perturbation_scale_key` names). Pass :func:`value_scale_for` of the
    data (:func:`finetune_perturbation` does when given a checkpoint path)."""
    import copy

    from ..training.families import family_of_config

    if isinstance(source, (str, Path)):
        from ..training.finetune import quiet_load_report, resolve_checkpoint

        path, _, family = resolve_checkpoint(str(source))
        with quiet_load_report():  # new heads / dropped pretraining heads are expected here
            return family.get(family.perturbation_class).from_pretrained(
                path, **{family.perturbation_scale_key: value_scale})
    family = family_of_config(source.config, source=type(source).__name__)
    backbone = source if type(source).__name__ == family.model_class else getattr(source, source.base_model_prefix)
    config = copy.deepcopy(backbone.config)
    setattr(config, family.perturbation_scale_key, value_scale)
    model = family.get(family.perturbation_class)(config)
    getattr(model, model.base_model_prefix).load_state_dict(backbone.state_dict())
    return model


def finetune_perturbation(model, tokenizer, data: PerturbationData, conditions, *, max_steps: int = 200,
                          batch_size: int = 16, learning_rate: float = 1e-3, weight_decay: float = 0.0,
                          include_control: bool = True, seed: int = 0, output_dir=None, logging_steps: int = 50):
    """Train ``model`` (from :func:`build_perturbation_model`, or a checkpoint path) on control -> perturbed
    pairs of ``conditions`` with ``transformers.Trainer`` and :class:`~hf_scfm.data.DataCollatorForPerturbation`.

    Returns ``(model, log_history)``; the model is left in eval mode.
    """
    import tempfile

    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    from ..data import DataCollatorForPerturbation

    set_seed(seed)
    if isinstance(model, (str, Path)):
        model = build_perturbation_model(model, value_scale=value_scale_for(data))
    pairs = PerturbationPairs(data, tokenizer, conditions, include_control=include_control, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=str(output_dir or tmp), max_steps=max_steps, per_device_train_batch_size=batch_size,
            learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=max(1, max_steps // 20),
            lr_scheduler_type="cosine", seed=seed, data_seed=seed, save_strategy="no", logging_steps=logging_steps,
            report_to=[], remove_unused_columns=False, label_names=["labels"], disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=pairs, data_collator=DataCollatorForPerturbation())
        trainer.train()
    return model.eval(), trainer.state.log_history


# ---------------------------------------------------------------------------------------------------------------
# prediction
# ---------------------------------------------------------------------------------------------------------------


def _control_sample(data: PerturbationData, n_control_cells: int | None, seed: int) -> np.ndarray:
    rows = data.control_rows
    if n_control_cells is not None and len(rows) > n_control_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=n_control_cells, replace=False))
    return rows


def predict_genesets(model, tokenizer, data: PerturbationData, genesets, *, n_control_cells: int | None = 128,
                     batch_size: int = 64, seed: int = 0) -> np.ndarray:
    """Mean predicted profile ``[len(genesets), G]`` for gene-position tuples (``()`` = no perturbation), each the
    average over the same seeded sample of control cells."""
    import torch

    rows = _control_sample(data, n_control_cells, seed)
    n_prefix = len(tokenizer.prefix_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.zeros((len(genesets), len(data.token_ids)))
    try:
        for k, perturbed in enumerate(genesets):
            total = np.zeros(len(data.token_ids))
            for start in range(0, len(rows), batch_size):
                ids, values, flags, order = perturbation_sentences(data, tokenizer, rows[start:start + batch_size],
                                                                   tuple(perturbed))
                with torch.no_grad():
                    pred = model(input_ids=torch.as_tensor(np.ascontiguousarray(ids), device=device),
                                 values=torch.as_tensor(values, device=device),
                                 attention_mask=torch.ones(ids.shape, dtype=torch.long, device=device),
                                 perturbation_flags=torch.as_tensor(np.ascontiguousarray(flags), device=device),
                                 return_dict=True).predictions
                total[order] += pred[:, n_prefix:n_prefix + len(order)].double().sum(0).cpu().numpy()
            out[k] = total / len(rows)
    finally:
        model.train(was_training)
    return out


def predict_perturbation(model, tokenizer, adata, conditions, *, n_control_cells: int | None = 128,
                         batch_size: int = 64, seed: int = 0, key_added: str = PREDICTION_KEY,
                         inplace: bool = True, copy: bool = False):
    """Mean predicted ``log1p(x_norm)`` profile of each condition, from the same seeded sample of control cells.

    ``adata``: the GEARS-layout AnnData (or ``.h5ad`` path), or a :class:`PerturbationData` read from it.
    ``conditions``: GEARS condition strings; they need not occur in the data (any genes the data measures).

    Returns (scanpy's convention): with ``inplace=True`` nothing, having written ``adata.varm[key_added]`` (a
    DataFrame ``var_names x conditions``, NaN for genes the vocabulary does not know) and ``adata.uns[key_added]``
    (``conditions``, ``control``, ``n_control_cells``, ``seed``); with ``copy=True`` a new AnnData holding them;
    with ``inplace=False`` the DataFrame ``conditions x genes`` (columns: the genes' ``var_names``).
    """
    import pandas as pd

    data = adata if isinstance(adata, PerturbationData) else read_perturbation_data(adata, tokenizer)
    profiles = predict_genesets(model, tokenizer, data, [data.geneset(c) for c in conditions],
                                n_control_cells=n_control_cells, batch_size=batch_size, seed=seed)
    table = pd.DataFrame(profiles, index=list(conditions), columns=data.gene_ids)
    if not inplace and not copy:
        return table
    target = data.adata.copy() if copy else data.adata
    target.varm[key_added] = table.T.reindex(target.var_names)
    target.uns[key_added] = {"conditions": list(conditions), "control": data.control,
                             "n_control_cells": -1 if n_control_cells is None else int(n_control_cells),
                             "seed": int(seed)}
    return target if copy else None


# ---------------------------------------------------------------------------------------------------------------
# metrics and evaluation
# ---------------------------------------------------------------------------------------------------------------


def pearson_delta(predicted_delta, measured_delta) -> float:
    """Pearson correlation of two change vectors; 0.0 when either is constant (the ``perturbation`` metric's)."""
    from ..metrics.perturbation.perturbation import pearson_delta as metric_pearson_delta

    return metric_pearson_delta(predicted_delta, measured_delta)


def perturbation_metrics(predicted: np.ndarray, measured: np.ndarray, control: np.ndarray, n_de: int = 20,
                         perturbed=()) -> dict:
    """Metrics of one condition: ``pearson_delta`` (all genes), ``pearson_delta_de`` (the ``n_de`` genes of
    largest measured ``|change|``), ``mse`` and ``mse_de`` of the profiles, and ``pearson_delta_downstream``:
    Pearson delta over all genes except the ``perturbed`` positions. A knocked-down gene's own drop is the
    largest change of its condition and easy to predict from the flag alone; the downstream figure shows whether
    the model knows the gene's targets. Computed by the ``perturbation`` metric (``hf_scfm/metrics/perturbation``)."""
    from ..metrics.perturbation.perturbation import condition_scores

    return condition_scores(predicted, measured, control, n_de, perturbed)


def evaluate_perturbation(model, tokenizer, data: PerturbationData, split: dict, *, n_de: int = 20,
                          n_control_cells: int | None = 128, batch_size: int = 64, seed: int = 0,
                          conditions=None) -> dict[str, Any]:
    """Score ``model`` on ``conditions`` (default ``split["test"]``) next to the baselines (module docstring).

    Returns ``{"per_condition": DataFrame, "summary": {method: {group: {metric: mean}}}, "predicted": DataFrame,
    "measured": DataFrame}``; ``method`` in ``model``, ``no_change``, ``train_mean``, ``additive``; ``group`` in
    :data:`SPLIT_GROUPS` plus ``"all"``.
    """
    import pandas as pd

    conditions = list(split["test"] if conditions is None else conditions)
    control = data.mean_profile(data.control)
    measured = {c: data.mean_profile(c) for c in set(conditions) | set(split["train"])}
    train_deltas = {c: measured[c] - control for c in split["train"]}
    train_mean = control + np.mean(list(train_deltas.values()), axis=0) if train_deltas else control
    predicted = predict_perturbation(model, tokenizer, data, conditions, n_control_cells=n_control_cells,
                                     batch_size=batch_size, seed=seed, inplace=False)
    rows = []
    for cond in conditions:
        genes = parse_condition(cond, data.control)
        additive = train_mean
        singles = [condition_name([g], data.control) for g in genes]
        if len(genes) == 2 and all(s in train_deltas for s in singles):
            additive = control + train_deltas[singles[0]] + train_deltas[singles[1]]
        for method, profile in (("model", predicted.loc[cond].to_numpy()), ("no_change", control),
                                ("train_mean", train_mean), ("additive", additive)):
            rows.append({"condition": cond, "group": split["group"].get(cond, "other"), "method": method,
                         **perturbation_metrics(profile, measured[cond], control, n_de, data.geneset(cond))})
    table = pd.DataFrame(rows)
    summary: dict[str, dict] = {}
    metrics = ["pearson_delta", "pearson_delta_de", "pearson_delta_downstream", "mse", "mse_de"]
    for method, part in table.groupby("method", sort=False):
        summary[method] = {"all": {m: float(part[m].mean()) for m in metrics}}
        for grp, sub in part.groupby("group", sort=False):
            summary[method][grp] = {m: float(sub[m].mean()) for m in metrics} | {"n_conditions": int(len(sub))}
    measured_df = pd.DataFrame([measured[c] for c in conditions], index=conditions, columns=data.gene_ids)
    return {"per_condition": table, "summary": summary, "predicted": predicted, "measured": measured_df}


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PerturbArguments:
    """What ``hf-scfm perturb`` takes (``perturb(PerturbArguments(...))`` in Python): a pretrained checkpoint and a
    GEARS-layout h5ad in; the fine-tuned perturbation model, metrics and a plot out."""

    model: str = field(metadata={"metavar": "DIR_OR_REPO", "help": "pretrained hf-scfm checkpoint"})
    data: str = field(metadata={"metavar": "H5AD", "help": "GEARS-layout perturbation data (raw counts)"})
    out: str = field(metadata={"metavar": "DIR", "help": "output folder: model/, metrics.json, CSVs, a PNG"})
    condition_key: str = field(default="condition", metadata={"help": "obs column of the conditions"})
    control: str = field(default=CONTROL, metadata={"help": "label of the control cells"})
    test_gene_fraction: float = field(default=0.25, metadata={"help": "singly perturbed genes held out"})
    max_steps: int = field(default=300, metadata={"help": "fine-tuning steps"})
    batch_size: int = field(default=16, metadata={"help": "control -> perturbed pairs per step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate (cosine schedule)"})
    n_control_cells: int = field(default=128, metadata={"help": "control cells averaged per prediction"})
    reverse_candidates: int = field(default=0, metadata={
        "metavar": "N", "help": "also run reverse perturbation over N perturbed genes (all their 1- and 2-gene "
                                "combinations) against the test conditions; 0 = skip"})
    seed: int = field(default=0, metadata={"help": "split, pairing, initialisation and control-cell sample"})


def _plot(evaluation: dict, control: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted, measured = evaluation["predicted"], evaluation["measured"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    pd_ = predicted.to_numpy() - control
    md_ = measured.to_numpy() - control
    ax.scatter(md_.ravel(), pd_.ravel(), s=3, alpha=0.4)
    lim = float(max(np.abs(md_).max(), np.abs(pd_).max(), 1e-3))
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
    r = evaluation["summary"]["model"]["all"]["pearson_delta"]
    ax.set(xlabel="measured change from control (log1p)", ylabel="predicted change", xlim=(-lim, lim),
           ylim=(-lim, lim), title=f"test conditions, mean Pearson delta {r:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def perturb(args: PerturbArguments) -> dict[str, Any]:
    """``hf-scfm perturb``: read, split, build, fine-tune, evaluate (and optionally reverse-rank), write
    ``args.out`` (``model/`` as a plain checkpoint with its tokenizer, ``metrics.json``, ``per_condition.csv``,
    ``predicted_profiles.csv``, ``predicted_vs_measured_delta.png``), print a summary; returns ``{"out", "summary",
    "split", "reverse"}``. Bad inputs raise ``ValueError`` / ``FileNotFoundError`` naming the fix."""
    from ..tokenization import GeneTokenizer
    from ..training.finetune import resolve_checkpoint

    from transformers import set_seed

    path, _, _ = resolve_checkpoint(args.model)
    tokenizer = GeneTokenizer.from_pretrained(str(path))
    set_seed(args.seed)  # the new heads' initialisation
    data = read_perturbation_data(args.data, tokenizer, condition_key=args.condition_key, control=args.control)
    split = split_conditions(data.conditions, test_gene_fraction=args.test_gene_fraction, seed=args.seed,
                             control=data.control)
    model = build_perturbation_model(path, value_scale=value_scale_for(data))
    model, history = finetune_perturbation(model, tokenizer, data, split["train"], max_steps=args.max_steps,
                                           batch_size=args.batch_size, learning_rate=args.learning_rate,
                                           seed=args.seed, logging_steps=max(1, args.max_steps // 10))
    evaluation = evaluate_perturbation(model, tokenizer, data, split, n_control_cells=args.n_control_cells,
                                       seed=args.seed)
    out = Path(args.out)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    evaluation["per_condition"].to_csv(out / "per_condition.csv", index=False)
    evaluation["predicted"].to_csv(out / "predicted_profiles.csv")
    _plot(evaluation, data.mean_profile(data.control), out / "predicted_vs_measured_delta.png")
    reverse = None
    if args.reverse_candidates:
        from .reverse_perturbation import reverse_perturbation

        singles = [data.gene_labels(c)[0] for c in data.conditions if len(data.genes_of[c]) == 1]
        candidates = singles[: args.reverse_candidates]
        targets = [c for c in split["test"] if set(parse_condition(c, data.control)) <= set(candidates)]
        if targets:
            result = reverse_perturbation(model, tokenizer, data, candidates, targets,
                                          n_control_cells=min(64, args.n_control_cells), seed=args.seed)
            result.ranking.to_csv(out / "reverse_ranking.csv", index=False)
            reverse = {"candidates": candidates, "true_rank": result.true_rank,
                       "hit_rate": {str(k): v for k, v in result.hit_rate.items()}}
    metrics = {"summary": evaluation["summary"], "split": split, "reverse": reverse,
               "train_loss": [h["loss"] for h in history if "loss" in h]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    for method in ("model", "train_mean", "additive", "no_change"):
        row = evaluation["summary"].get(method, {}).get("all", {})
        print(f"{method:>10}: Pearson delta {row.get('pearson_delta', float('nan')):.3f}, top-20 DE "
              f"{row.get('pearson_delta_de', float('nan')):.3f}, MSE {row.get('mse', float('nan')):.4f}")
    if reverse:
        print(f"reverse perturbation hit rate: {reverse['hit_rate']}")
    print(f"Wrote {out}/metrics.json, per_condition.csv, predicted_vs_measured_delta.png and model/")
    return {"out": str(out), "summary": evaluation["summary"], "split": split, "reverse": reverse}
