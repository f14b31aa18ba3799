"""Perturbation prediction and reverse perturbation (SC-MAMBA2 section 4.5), for every model family.

Data: the GEARS/Norman AnnData layout: raw counts, ``obs["condition"]`` = ``"ctrl"`` (control cells),
``"A+ctrl"`` (gene ``A`` perturbed) or ``"A+B"`` (both); genes named by ``var_names`` or ``var["gene_name"]``.
:func:`hf_scfm.tasks.grn_simulation.simulate_perturb_seq` writes such data from a known network.

The pieces, in the order a run uses them:

* :func:`read_perturbation_data` validates the layout and builds a :class:`PerturbationData`: per cell the
  ``log1p(x_norm)`` value of **every** gene of the data that the vocabulary knows (zeros included: a perturbed
  gene absent from a control cell still needs a position to carry its flag), the gene's token id, and the
  perturbed genes of each condition.
* :func:`split_conditions`: GEARS-style split. A fraction of the singly perturbed genes is held out: their
  singles are test conditions (*unseen single*), doubles with one or two of them are test conditions
  (*double seen 1* / *seen 0*), and part of the doubles of two seen genes too (*double seen 2*).
* :class:`PerturbationPairs`: training records for :class:`hf_scfm.data.DataCollatorForPerturbation`: each
  perturbed cell is paired with a random control cell (seeded), input = the control cell's values, target =
  the perturbed cell's values, ``perturbed_gene_ids`` = the condition's genes. Control cells are paired with
  other control cells too (the model must also learn "no perturbation, no change").
* Models. SC-MAMBA2 keeps its native :class:`~hf_scfm.ScMamba2ForPerturbationPrediction` (flag embedding,
  regression head; its ``value_scale`` set from the data so log1p values span about ``[0, 1]``, as bins do in
  pretraining; its flag embedding re-initialised at the unit scale of the token embedding it is added to).
  Every other family gets :class:`PerturbationModel`, a shared head over the family's backbone:
  a learned flag embedding added to the output of ``backbone.get_input_embeddings()`` (a forward hook: no
  family code changes) and a per-position MLP regressing the perturbed ``log1p`` value from the last hidden
  state. :func:`build_perturbation_model` picks the right one; :func:`finetune_perturbation` trains it with
  ``transformers.Trainer``; :func:`save_perturbation_model` / :func:`load_perturbation_model` keep it as
  safetensors + JSON with its tokenizer.
* :func:`predict_perturbation`: mean predicted profile per condition, from a seeded sample of control cells.
* :func:`evaluate_perturbation`: Pearson correlation of predicted vs measured mean change from control
  ("Pearson delta"), over all genes and over the 20 most changed genes of each condition (by
  ``|mean perturbed - mean control|`` of the measured data), and over all genes but the perturbed ones
  ("downstream": the perturbed gene's own change dominates the others and is the easy part), per condition and
  per split group, next to three
  baselines: *no change* (the control mean), *training mean* (control + the mean change of the training
  conditions) and, for doubles, *additive* (control + the sum of the two measured single changes when both
  singles were trained on; the training mean otherwise).
* :func:`reverse_perturbation`: given target states, rank every 1- and 2-gene combination of a candidate list
  by the distance between its predicted change and the target's change; report each target's true rank and
  the top-k hit rate.

Choices, and why:

* **Sentence order.** The perturbed genes come first (after ``<cls>`` / ``<bos>``), then the other genes in
  vocabulary order. For the causal Mouse-GeneMamba this is what makes the task learnable at all: a causal
  backbone's position ``j`` reads tokens ``<= j`` only, so a perturbed gene late in the sentence could not
  inform the genes before it. For the bidirectional families the order carries no meaning, and one rule for all
  keeps the data path single. Predictions are mapped back to genes by token id, so the order never leaks out.
* **Absolute targets.** The heads predict the perturbed value itself (the SC-MAMBA2 paper's set-up), not a
  residual on the control cell: with random control->perturbed pairing the best prediction of the target is the
  condition mean, which does not depend on the individual control cell's noise.
* **Pearson of a constant.** The "no change" baseline predicts a zero change, whose correlation is undefined;
  it is reported as 0.0 (no information about the direction of change) and its MSE is reported as well.
* :func:`hf_scfm.tasks.inference.iter_model_outputs` is not used here: it runs the tokenizer's own encoding
  (expressed genes only, bins for SC-MAMBA2) and one set of forward arguments for every batch, while a
  perturbation sentence holds every gene with its log1p value and per-condition flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import ModelOutput

from .grn_simulation import CONTROL

__all__ = [
    "CONTROL",
    "parse_condition",
    "condition_name",
    "PerturbationData",
    "read_perturbation_data",
    "split_conditions",
    "PerturbationPairs",
    "PerturbationModel",
    "PerturbationOutput",
    "build_perturbation_model",
    "value_scale_for",
    "save_perturbation_model",
    "load_perturbation_model",
    "finetune_perturbation",
    "predict_perturbation",
    "pearson_delta",
    "perturbation_metrics",
    "evaluate_perturbation",
    "reverse_perturbation",
    "ReversePerturbationResult",
    "add_perturb_parser",
    "main",
]

PERTURBATION_CONFIG = "perturbation_config.json"
HEAD_WEIGHTS = "perturbation_head.safetensors"
SPLIT_GROUPS = ("single_seen", "single_unseen", "double_seen2", "double_seen1", "double_seen0")


# ---------------------------------------------------------------------------------------------------------------
# the data layout
# ---------------------------------------------------------------------------------------------------------------


def parse_condition(condition: str, control: str = CONTROL) -> tuple[str, ...]:
    """The perturbed genes of a GEARS condition: ``"ctrl"`` -> ``()``, ``"A+ctrl"`` / ``"ctrl+A"`` -> ``("A",)``,
    ``"A+B"`` -> ``("A", "B")``."""
    parts = [p.strip() for p in str(condition).split("+")]
    if any(not p for p in parts):
        raise ValueError(f"Condition {condition!r} has an empty part; expected {control!r}, 'A+{control}' or 'A+B'.")
    genes = tuple(p for p in parts if p != control)
    if len(set(genes)) != len(genes):
        raise ValueError(f"Condition {condition!r} names a gene twice.")
    return genes


def condition_name(genes, control: str = CONTROL) -> str:
    """The canonical condition of a gene set: sorted, ``"A+ctrl"`` for one gene, ``"ctrl"`` for none."""
    genes = sorted(genes)
    if not genes:
        return control
    return f"{genes[0]}+{control}" if len(genes) == 1 else "+".join(genes)


@dataclass
class PerturbationData:
    """A validated perturbation dataset (see :func:`read_perturbation_data`).

    Attributes:
        adata: the AnnData it was read from.
        values: CSR ``[n_cells, G]`` float32 ``log1p(x_norm)`` over the ``G`` genes the vocabulary knows, in
            vocabulary (token id) order.
        token_ids: int64 ``[G]`` token id of each of those genes.
        gene_ids: ``[G]`` their ``var_names``; ``gene_names``: the names conditions use for them.
        cell_conditions: canonical condition of every cell.
        genes_of: canonical condition -> positions (in ``0..G-1``) of its perturbed genes.
        control: the control label.
    """

    adata: Any
    values: Any
    token_ids: np.ndarray
    gene_ids: list[str]
    gene_names: list[str]
    cell_conditions: np.ndarray
    genes_of: dict[str, tuple[int, ...]]
    control: str = CONTROL
    _rows: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def conditions(self) -> list[str]:
        """Perturbed conditions (control excluded), in order of first appearance."""
        return [c for c in self.genes_of if c != self.control]

    def rows(self, condition: str) -> np.ndarray:
        """Cell indices of a condition."""
        if condition not in self._rows:
            self._rows[condition] = np.flatnonzero(self.cell_conditions == condition)
        return self._rows[condition]

    @property
    def control_rows(self) -> np.ndarray:
        return self.rows(self.control)

    def mean_profile(self, condition: str) -> np.ndarray:
        """Measured mean ``log1p(x_norm)`` of a condition's cells, ``[G]`` float64."""
        rows = self.rows(condition)
        if not len(rows):
            raise ValueError(f"No cells of condition {condition!r}.")
        return np.asarray(self.values[rows].mean(axis=0), dtype=np.float64).ravel()

    def gene_labels(self, condition: str) -> tuple[str, ...]:
        return tuple(self.gene_names[i] for i in self.genes_of[condition])


def _library_sizes(adata, counts) -> np.ndarray:
    if "n_counts" in adata.obs.columns:
        return adata.obs["n_counts"].to_numpy(dtype=np.float64)
    return np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()


def read_perturbation_data(adata, tokenizer, *, condition_key: str = "condition", control: str = CONTROL,
                           gene_name_key: str = "gene_name", check_counts: bool = True) -> PerturbationData:
    """Validate a GEARS-layout AnnData (or ``.h5ad`` path) and build its :class:`PerturbationData`.

    Condition genes are looked up in ``var[gene_name_key]`` (when the column exists), then in ``var_names``,
    case-insensitively. Errors name the problem and the fix: a missing condition column, no control cells,
    condition genes not in ``var`` or not in the tokenizer's vocabulary, non-integer or negative counts, cells
    without counts.
    """
    import scipy.sparse as sp

    from ..tokenization.gene_tables import load_gene_table, map_genes
    from .inference import read_cells

    adata = read_cells(adata, source="the perturbation data")
    if condition_key not in adata.obs.columns:
        raise ValueError(f"The perturbation data has no obs column {condition_key!r} (columns: "
                         f"{list(adata.obs.columns)}). It needs the GEARS layout: obs[{condition_key!r}] = "
                         f"{control!r}, 'A+{control}' or 'A+B'; pass condition_key=... naming the right column.")
    labels = adata.obs[condition_key].astype(str).to_numpy()
    parsed = {c: parse_condition(c, control) for c in dict.fromkeys(labels)}
    if not any(len(g) == 0 for g in parsed.values()):
        raise ValueError(f"No control cells: no obs[{condition_key!r}] equals {control!r} (values e.g. "
                         f"{list(parsed)[:5]}). Perturbation prediction starts from control cells; pass "
                         "control=... if they carry another label.")
    if all(len(g) == 0 for g in parsed.values()):
        raise ValueError(f"Only control cells: obs[{condition_key!r}] holds no perturbed condition ('A+{control}').")

    counts = sp.csr_matrix(adata.X, dtype=np.float64)
    if counts.nnz and counts.data.min() < 0:
        raise ValueError("The perturbation data has negative values in X; it needs raw counts.")
    if check_counts and counts.nnz and not np.all(counts.data == np.round(counts.data)):
        raise ValueError("X holds non-integer values; perturbation data must be raw counts (set check_counts=False "
                         "for normalised, non-log data).")
    n_counts = _library_sizes(adata, counts)
    if np.any(n_counts <= 0):
        raise ValueError(f"{int(np.sum(n_counts <= 0))} cells have no counts; drop them first.")

    table = load_gene_table(tokenizer.species) if tokenizer.species is not None else None
    token_of_column, report = map_genes(list(map(str, adata.var_names)), tokenizer.get_vocab(), table,
                                        tokenizer.ambiguous)
    if report.duplicates:
        raise ValueError(f"{len(report.duplicates)} genes of the data map to a token another gene already maps to "
                         f"(e.g. {list(report.duplicates)[:3]}); keep one column per gene.")
    matched = np.flatnonzero(token_of_column >= 0)
    if not len(matched):
        raise ValueError("No gene of the perturbation data is in the tokenizer's vocabulary: " + report.summary())
    matched = matched[np.argsort(token_of_column[matched], kind="stable")]
    names = (adata.var[gene_name_key].astype(str).to_numpy() if gene_name_key in adata.var.columns
             else np.asarray(adata.var_names, dtype=str))
    lookup: dict[str, int] = {}
    for col, name in enumerate(map(str, adata.var_names)):
        lookup.setdefault(name.upper(), col)
    for col, name in enumerate(names):
        lookup[str(name).upper()] = col  # gene_name wins over var_names
    position = np.full(adata.n_vars, -1, dtype=np.int64)
    position[matched] = np.arange(len(matched))

    missing, unknown, genes_of = {}, {}, {}
    for cond, genes in parsed.items():
        key = condition_name(genes, control)
        cols = []
        for gene in genes:
            col = lookup.get(gene.upper())
            if col is None:
                missing.setdefault(gene, cond)
            elif position[col] < 0:
                unknown.setdefault(gene, cond)
            else:
                cols.append(int(position[col]))
        genes_of[key] = tuple(sorted(cols))
    if missing:
        ex = ", ".join(f"{g} (in {c!r})" for g, c in list(missing.items())[:5])
        raise ValueError(f"{len(missing)} perturbed genes are not in var (looked up in var[{gene_name_key!r}] and "
                         f"var_names): {ex}. The model predicts genes it measures: keep those genes in the data, "
                         "or drop the conditions that perturb them.")
    if unknown:
        ex = ", ".join(f"{g} (in {c!r})" for g, c in list(unknown.items())[:5])
        raise ValueError(f"{len(unknown)} perturbed genes are not in the tokenizer's {tokenizer.species or 'custom'} "
                         f"vocabulary: {ex}. Use var_names the vocabulary maps (Ensembl IDs or symbols of the "
                         "right species), or drop those conditions.")

    sub = counts[:, matched].tocsr()
    sub = sp.diags(1e4 / n_counts) @ sub
    sub.data = np.log1p(sub.data)
    cell_conditions = np.asarray([condition_name(parsed[c], control) for c in labels], dtype=object)
    return PerturbationData(
        adata=adata, values=sub.astype(np.float32).tocsr(), token_ids=token_of_column[matched].astype(np.int64),
        gene_ids=[str(adata.var_names[c]) for c in matched], gene_names=[str(names[c]) for c in matched],
        cell_conditions=cell_conditions, genes_of=dict(sorted(genes_of.items(), key=lambda kv: (len(kv[1]), kv[0]))),
        control=control,
    )


def split_conditions(conditions, *, test_gene_fraction: float = 0.25, double_test_fraction: float = 0.5,
                     seed: int = 0, control: str = CONTROL) -> dict[str, Any]:
    """GEARS-style train/test split of perturbation conditions.

    A seeded ``test_gene_fraction`` of the genes perturbed singly (at least one) is held out. Singles of held-out
    genes go to test (``single_unseen``), the other singles to train (``single_seen``). Doubles with one held-out
    gene are ``double_seen1``, with two ``double_seen0`` (both test); doubles of two seen genes are
    ``double_seen2``, a seeded ``double_test_fraction`` of them in test and the rest in train.

    Returns ``{"train": [...], "test": [...], "group": {condition: group}, "test_genes": [...]}``.
    """
    parsed = {c: parse_condition(c, control) for c in conditions if parse_condition(c, control)}
    singles = sorted({g[0] for g in parsed.values() if len(g) == 1})
    if len(singles) < 2:
        raise ValueError(f"Splitting needs >= 2 singly perturbed genes (got {len(singles)}): one to hold out, one "
                         "to train on.")
    rng = np.random.default_rng(seed)
    n_test = min(len(singles) - 1, max(1, int(round(test_gene_fraction * len(singles)))))
    test_genes = set(rng.choice(singles, size=n_test, replace=False).tolist())
    group, train, test = {}, [], []
    seen2 = sorted(c for c, g in parsed.items() if len(g) == 2 and not (set(g) & test_genes))
    seen2_test = set(rng.choice(seen2, size=int(round(double_test_fraction * len(seen2))), replace=False).tolist()) \
        if seen2 else set()
    for cond, genes in parsed.items():
        unseen = len(set(genes) & test_genes)
        if len(genes) == 1:
            group[cond] = "single_unseen" if unseen else "single_seen"
            (test if unseen else train).append(cond)
        elif len(genes) == 2:
            group[cond] = f"double_seen{2 - unseen}"
            (test if unseen or cond in seen2_test else train).append(cond)
        else:
            raise ValueError(f"Condition {cond!r} perturbs {len(genes)} genes; only singles and doubles are supported.")
    return {"train": train, "test": test, "group": group, "test_genes": sorted(test_genes)}


# ---------------------------------------------------------------------------------------------------------------
# sentences and training pairs
# ---------------------------------------------------------------------------------------------------------------


def _special_ids(tokenizer) -> tuple[list[int], list[int]]:
    return ([int(tokenizer.convert_tokens_to_ids(t)) for t in tokenizer.prefix_tokens],
            [int(tokenizer.convert_tokens_to_ids(t)) for t in tokenizer.suffix_tokens])


def _gene_order(n_genes: int, perturbed: tuple[int, ...]) -> np.ndarray:
    """Sentence order of the gene positions: perturbed genes first, then the rest (module docstring)."""
    if not perturbed:
        return np.arange(n_genes)
    rest = np.ones(n_genes, dtype=bool)
    rest[list(perturbed)] = False
    return np.concatenate([np.asarray(perturbed, dtype=np.int64), np.flatnonzero(rest)])


def _sentences(data: PerturbationData, rows: np.ndarray, perturbed: tuple[int, ...], prefix, suffix):
    """``(input_ids, values, flags, order)`` ``[B, L]`` for cells ``rows`` of ``data`` under one perturbation."""
    order = _gene_order(len(data.token_ids), perturbed)
    n_pre, n_suf = len(prefix), len(suffix)
    width = n_pre + len(order) + n_suf
    ids = np.empty(width, dtype=np.int64)
    ids[:n_pre], ids[n_pre:n_pre + len(order)] = prefix, data.token_ids[order]
    ids[n_pre + len(order):] = suffix
    values = np.zeros((len(rows), width), dtype=np.float32)
    values[:, n_pre:n_pre + len(order)] = data.values[rows].toarray()[:, order]
    flags = np.zeros(width, dtype=np.int64)
    flags[n_pre:n_pre + len(perturbed)] = 1
    return np.broadcast_to(ids, values.shape), values, np.broadcast_to(flags, values.shape), order


class PerturbationPairs:
    """Training records (a map-style dataset) of control -> perturbed cell pairs.

    Every cell of ``conditions`` is a target; its input is a control cell drawn uniformly (seeded). With
    ``include_control`` every control cell is also a target, paired with another random control cell. Each
    record: ``input_ids``, ``values`` (control), ``target_values`` (perturbed cell, same genes in the same
    order), ``perturbed_gene_ids`` (token ids); what :class:`hf_scfm.data.DataCollatorForPerturbation` reads.
    """

    def __init__(self, data: PerturbationData, tokenizer, conditions, *, include_control: bool = True, seed: int = 0):
        unknown = [c for c in conditions if c not in data.genes_of]
        if unknown:
            raise ValueError(f"Conditions not in the data: {unknown[:5]}.")
        self.data = data
        self.prefix, self.suffix = _special_ids(tokenizer)
        rng = np.random.default_rng(seed)
        controls = data.control_rows
        targets, keys = [], []
        for cond in conditions:
            if cond == data.control:
                continue
            targets.append(data.rows(cond))
            keys += [cond] * len(data.rows(cond))
        if include_control:
            targets.append(controls)
            keys += [data.control] * len(controls)
        self.targets = np.concatenate(targets) if targets else np.zeros(0, dtype=np.int64)
        self.sources = controls[rng.integers(0, len(controls), size=len(self.targets))]
        self.conditions = np.asarray(keys, dtype=object)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        cond = self.conditions[i]
        perturbed = self.data.genes_of[cond]
        ids, values, _, order = _sentences(self.data, np.asarray([self.sources[i], self.targets[i]]), perturbed,
                                           self.prefix, self.suffix)
        return {"input_ids": ids[0].copy(), "values": values[0], "target_values": values[1],
                "perturbed_gene_ids": self.data.token_ids[list(perturbed)], "condition": cond}


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PerturbationOutput(ModelOutput):
    """Output of :class:`PerturbationModel`: ``loss`` (with labels), ``predictions`` ``[B, L]`` (perturbed log1p
    value per position, 0 at specials and padding), the backbone's ``cell_embedding`` and ``last_hidden_state``."""

    loss: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


class PerturbationModel(nn.Module):
    """Shared perturbation head over any family's backbone (``...Model``).

    * ``flag_embedding`` (2 rows, ``d``): added, through a forward hook, to the output of
      ``backbone.get_input_embeddings()`` (the gene embedding every family sums with its value embedding), so
      the family code stays untouched. Row 0 (not perturbed) starts at zero, row 1 at the gene embedding's scale.
    * ``head``: ``Linear(d, d) -> GELU -> Linear(d, 1)`` per position on the last hidden state; the output is
      divided by ``value_scale`` (log1p values of a cell span about ``[0, 1/value_scale]``) so a unit-scale
      head output covers the data's range.
    * loss: MSE over real gene positions (ids >= 6, attention 1) where ``labels != -100``.
    """

    def __init__(self, backbone, value_scale: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        d = backbone.config.hidden_size
        self.value_scale = float(value_scale)
        self.flag_embedding = nn.Embedding(2, d)
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        _init_flag_rows(self.flag_embedding, float(backbone.get_input_embeddings().weight.detach().std()))
        self._flags = None
        self._hook = backbone.get_input_embeddings().register_forward_hook(self._add_flags)

    def _add_flags(self, module, inputs, output):
        if self._flags is None:
            return output
        if self._flags.shape != output.shape[:-1]:
            raise RuntimeError(f"perturbation flags {tuple(self._flags.shape)} do not match the embedded tokens "
                               f"{tuple(output.shape[:-1])}.")
        return output + self.flag_embedding(self._flags).to(output.dtype)

    def forward(self, input_ids=None, values=None, attention_mask=None, perturbation_flags=None, labels=None,
                **kwargs):
        from ..tokenization.special_tokens import IGNORE_INDEX, SPECIAL_TOKENS

        if perturbation_flags is None:
            perturbation_flags = torch.zeros_like(input_ids)
        if perturbation_flags.shape != input_ids.shape:
            raise ValueError(f"perturbation_flags has shape {tuple(perturbation_flags.shape)}, expected "
                             f"{tuple(input_ids.shape)} (one 0/1 flag per token).")
        flags = perturbation_flags.long()
        if attention_mask is not None:
            flags = flags.masked_fill(attention_mask == 0, 0)
        if flags.numel() and (int(flags.min()) < 0 or int(flags.max()) > 1):
            raise ValueError("perturbation_flags must be 0 (not perturbed) or 1 (perturbed).")
        self._flags = flags
        try:
            out = self.backbone(input_ids=input_ids, values=values, attention_mask=attention_mask, return_dict=True)
        finally:
            self._flags = None
        predictions = self.head(out.last_hidden_state).squeeze(-1) / self.value_scale
        real = input_ids >= len(SPECIAL_TOKENS)
        if attention_mask is not None:
            real = real & attention_mask.bool()
        predictions = predictions * real.to(predictions.dtype)
        loss = None
        if labels is not None:
            keep = real & (labels != IGNORE_INDEX)
            loss = (torch.nn.functional.mse_loss(predictions[keep].float(), labels[keep].float())
                    if bool(keep.any()) else predictions.sum() * 0.0)
        return PerturbationOutput(loss=loss, predictions=predictions, cell_embedding=out.cell_embedding,
                                  last_hidden_state=out.last_hidden_state)


def value_scale_for(data: PerturbationData) -> float:
    """``1 / ceil(max log1p value)``: the data's values then span ``[0, 1]`` (at least a scale of 1)."""
    top = float(data.values.max()) if data.values.nnz else 1.0
    return 1.0 / max(1.0, float(np.ceil(top)))


def _init_flag_rows(embedding: nn.Embedding, scale: float) -> None:
    """Row 0 (not perturbed) = 0, row 1 (perturbed) ~ N(0, scale^2): the flag starts at the scale of what it is
    added to. (SC-MAMBA2 adds its flag to the unit-scale token embedding; at the default 0.02 init the flag was
    a 2 % signal and fine-tuning spent most of its steps growing it.)"""
    with torch.no_grad():
        embedding.weight.zero_()
        embedding.weight[1].normal_(0.0, scale)


def build_perturbation_model(source, *, value_scale: float = 0.2):
    """A perturbation model from a pretrained checkpoint folder / Hub id or an in-memory hf-scfm model.

    SC-MAMBA2 -> :class:`~hf_scfm.ScMamba2ForPerturbationPrediction` (backbone weights kept, flag embedding and
    head new, ``config.value_scale = value_scale``); any other family -> :class:`PerturbationModel` over its
    backbone with that ``value_scale``. Use :func:`value_scale_for` of the data (``1 / ceil(max log1p value)``;
    :func:`finetune_perturbation` does when given a checkpoint path).
    """
    from ..training.families import family_of_config

    if isinstance(source, (str, Path)):
        from ..training.finetune import quiet_load_report, resolve_checkpoint

        path, _, family = resolve_checkpoint(str(source))
        with quiet_load_report():  # new heads / dropped pretraining heads are expected here
            if family.name == "scmamba2":
                model = family.get("ScMamba2ForPerturbationPrediction").from_pretrained(path, value_scale=value_scale)
                _init_flag_rows(model.perturbation_embedding, 1.0)
                return model
            backbone = family.get(family.model_class).from_pretrained(path)
        return PerturbationModel(backbone, value_scale)
    family = family_of_config(source.config, source=type(source).__name__)
    backbone = source if type(source).__name__ == family.model_class else getattr(source, source.base_model_prefix)
    if family.name == "scmamba2":
        import copy

        config = copy.deepcopy(backbone.config)
        config.value_scale = value_scale
        model = family.get("ScMamba2ForPerturbationPrediction")(config)
        model.scmamba2.load_state_dict(backbone.state_dict())
        _init_flag_rows(model.perturbation_embedding, 1.0)
        return model
    return PerturbationModel(backbone, value_scale)


def save_perturbation_model(model, tokenizer, out) -> Path:
    """Write a perturbation model and its tokenizer to ``out`` (safetensors + JSON only)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PerturbationModel):
        model.backbone.save_pretrained(out)
        state = {f"flag_embedding.{k}": v for k, v in model.flag_embedding.state_dict().items()}
        state.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / HEAD_WEIGHTS))
        meta = {"head": "PerturbationModel", "value_scale": model.value_scale}
    else:
        model.save_pretrained(out)
        meta = {"head": type(model).__name__}
    tokenizer.save_pretrained(out)
    meta.update({"model_type": model.config.model_type, "order": "perturbed_first"})
    (out / PERTURBATION_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def load_perturbation_model(path, device: str | None = None):
    """``(model, tokenizer)`` saved by :func:`save_perturbation_model`, in eval mode."""
    from safetensors.torch import load_file

    from ..modeling.configuration_utils import check_tokenizer_matches
    from ..tokenization import GeneTokenizer
    from ..training.families import get_family

    path = Path(path)
    if not (path / PERTURBATION_CONFIG).exists():
        raise FileNotFoundError(f"{path} has no {PERTURBATION_CONFIG}: it was not saved by hf-scfm perturb / "
                                "save_perturbation_model.")
    meta = json.loads((path / PERTURBATION_CONFIG).read_text(encoding="utf-8"))
    family = get_family(meta["model_type"])
    if meta["head"] == "PerturbationModel":
        model = PerturbationModel(family.get(family.model_class).from_pretrained(path), meta["value_scale"])
        state = load_file(str(path / HEAD_WEIGHTS))
        model.flag_embedding.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()
                                              if k.startswith("flag_embedding.")})
        model.head.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("head.")})
    else:
        model = family.get(meta["head"]).from_pretrained(path)
    tokenizer = GeneTokenizer.from_pretrained(str(path))
    check_tokenizer_matches(model.config, tokenizer)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def finetune_perturbation(model, tokenizer, data: PerturbationData, conditions, *, max_steps: int = 200,
                          batch_size: int = 16, learning_rate: float = 1e-3, weight_decay: float = 0.0,
                          include_control: bool = True, seed: int = 0, output_dir=None, logging_steps: int = 50):
    """Train ``model`` (from :func:`build_perturbation_model`, or a checkpoint path) on control -> perturbed
    pairs of ``conditions`` with ``transformers.Trainer`` and :class:`~hf_scfm.data.DataCollatorForPerturbation`.

    Returns ``(model, log_history)``; the model is left in eval mode.
    """
    import tempfile

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
# prediction and metrics
# ---------------------------------------------------------------------------------------------------------------


def _control_sample(data: PerturbationData, n_control_cells: int | None, seed: int) -> np.ndarray:
    rows = data.control_rows
    if n_control_cells is not None and len(rows) > n_control_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=n_control_cells, replace=False))
    return rows


def _predict_genesets(model, tokenizer, data: PerturbationData, genesets, *, n_control_cells: int | None = 128,
                      batch_size: int = 64, seed: int = 0) -> np.ndarray:
    """Mean predicted profile ``[len(genesets), G]`` for gene-position tuples, from the same control cells."""
    prefix, suffix = _special_ids(tokenizer)
    rows = _control_sample(data, n_control_cells, seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.zeros((len(genesets), len(data.token_ids)))
    try:
        for k, perturbed in enumerate(genesets):
            total = np.zeros(len(data.token_ids))
            for start in range(0, len(rows), batch_size):
                ids, values, flags, order = _sentences(data, rows[start:start + batch_size], tuple(perturbed),
                                                       prefix, suffix)
                with torch.no_grad():
                    pred = model(input_ids=torch.as_tensor(np.ascontiguousarray(ids), device=device),
                                 values=torch.as_tensor(values, device=device),
                                 attention_mask=torch.ones(ids.shape, dtype=torch.long, device=device),
                                 perturbation_flags=torch.as_tensor(np.ascontiguousarray(flags), device=device),
                                 return_dict=True).predictions
                genes = pred[:, len(prefix):len(prefix) + len(order)].double().sum(0).cpu().numpy()
                total[order] += genes
            out[k] = total / len(rows)
    finally:
        model.train(was_training)
    return out


def predict_perturbation(model, tokenizer, data, conditions, *, n_control_cells: int | None = 128,
                         batch_size: int = 64, seed: int = 0):
    """Mean predicted ``log1p(x_norm)`` profile per condition: a DataFrame ``[conditions x genes]``
    (columns = ``data.gene_ids``), each row the average over the same seeded sample of control cells.

    ``data``: a :class:`PerturbationData` or an AnnData / h5ad (read with :func:`read_perturbation_data`).
    ``conditions``: GEARS condition strings; they need not occur in the data (any genes the data measures).
    """
    import pandas as pd

    if not isinstance(data, PerturbationData):
        data = read_perturbation_data(data, tokenizer)
    genesets = [_geneset(data, c) for c in conditions]
    profiles = _predict_genesets(model, tokenizer, data, genesets, n_control_cells=n_control_cells,
                                 batch_size=batch_size, seed=seed)
    return pd.DataFrame(profiles, index=list(conditions), columns=data.gene_ids)


def _geneset(data: PerturbationData, condition: str) -> tuple[int, ...]:
    genes = parse_condition(condition, data.control)
    key = condition_name(genes, data.control)
    if key in data.genes_of:
        return data.genes_of[key]
    index = {n.upper(): i for i, n in enumerate(data.gene_names)} | {g.upper(): i for i, g in enumerate(data.gene_ids)}
    missing = [g for g in genes if g.upper() not in index]
    if missing:
        raise ValueError(f"Condition {condition!r}: genes {missing} are not among the data's genes known to the "
                         "vocabulary.")
    return tuple(sorted(index[g.upper()] for g in genes))


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
                                     batch_size=batch_size, seed=seed)
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
                         **perturbation_metrics(profile, measured[cond], control, n_de, _geneset(data, cond))})
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
# reverse perturbation
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ReversePerturbationResult:
    """``ranking``: one row per (target, candidate) with ``rank`` (1 = closest) and ``distance``;
    ``true_rank``: target -> rank of its true perturbation (``None`` when not among the candidates);
    ``hit_rate``: k -> fraction of targets whose true perturbation ranks ``<= k``."""

    ranking: Any
    true_rank: dict[str, int | None]
    hit_rate: dict[int, float]


def reverse_perturbation(model, tokenizer, data: PerturbationData, candidates, targets, *, top_k=(1, 5, 10),
                         metric: str = "euclidean", max_genes: int = 2, n_control_cells: int | None = 64,
                         batch_size: int = 64, seed: int = 0) -> ReversePerturbationResult:
    """Rank every combination of 1..``max_genes`` genes of ``candidates`` by how close its predicted change
    from control is to each target's measured change.

    ``targets``: condition names of the data (their measured mean profile is the target state and the condition
    itself the true answer), or a mapping ``name -> profile [G]`` (log1p means; no true answer unless the name
    is a condition). Changes are taken from the model's own predicted control profile for candidates (so a
    systematic offset of the model cancels) and from the measured control mean for targets.
    ``metric``: ``"euclidean"`` on the change vectors, or ``"correlation"`` (1 - Pearson).
    """
    import pandas as pd

    if metric not in ("euclidean", "correlation"):
        raise ValueError(f"metric={metric!r}: choose 'euclidean' or 'correlation'.")
    candidates = list(dict.fromkeys(candidates))
    combos = [c for n in range(1, max_genes + 1) for c in combinations(sorted(candidates), n)]
    names = [condition_name(c, data.control) for c in combos]
    genesets = [_geneset(data, n) for n in names]
    profiles = _predict_genesets(model, tokenizer, data, [()] + genesets, n_control_cells=n_control_cells,
                                 batch_size=batch_size, seed=seed)
    predicted_delta = profiles[1:] - profiles[0]
    control = data.mean_profile(data.control)
    if isinstance(targets, dict):
        target_profiles = {str(k): np.asarray(v, dtype=np.float64) for k, v in targets.items()}
    else:
        target_profiles = {str(t): data.mean_profile(condition_name(parse_condition(t, data.control), data.control))
                           for t in targets}
    rows, true_rank = [], {}
    for name, profile in target_profiles.items():
        delta = profile - control
        if metric == "euclidean":
            dist = np.sqrt(((predicted_delta - delta) ** 2).sum(1))
        else:
            dist = np.asarray([1.0 - pearson_delta(p, delta) for p in predicted_delta])
        order = np.argsort(dist, kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(1, len(order) + 1)
        truth = None
        try:
            truth = condition_name(parse_condition(name, data.control), data.control)
        except ValueError:
            pass
        true_rank[name] = int(rank[names.index(truth)]) if truth in names else None
        rows += [{"target": name, "candidate": names[i], "rank": int(rank[i]), "distance": float(dist[i])}
                 for i in order]
    scored = [r for r in true_rank.values() if r is not None]
    hit_rate = {int(k): (float(np.mean([r <= k for r in scored])) if scored else float("nan")) for k in top_k}
    return ReversePerturbationResult(ranking=pd.DataFrame(rows), true_rank=true_rank, hit_rate=hit_rate)


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------


def add_perturb_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, metavar="DIR_OR_REPO", help="pretrained hf-scfm checkpoint")
    parser.add_argument("--data", required=True, metavar="H5AD", help="GEARS-layout perturbation data (raw counts)")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--condition-key", default="condition")
    parser.add_argument("--control", default=CONTROL, help="label of the control cells")
    parser.add_argument("--test-gene-fraction", type=float, default=0.25)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--n-control-cells", type=int, default=128, help="control cells averaged per prediction")
    parser.add_argument("--reverse-candidates", type=int, default=0, metavar="N",
                        help="also run reverse perturbation over N perturbed genes (all their 1- and 2-gene "
                             "combinations) against the test conditions; 0 = skip")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def add_perturb_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``perturb`` to an ``argparse`` subparsers object (handler: :func:`perturb_command`)."""
    parser = subparsers.add_parser(
        "perturb", help="fine-tune and evaluate perturbation prediction (GEARS/Norman layout)",
        description="Fine-tune a pretrained hf-scfm checkpoint on control->perturbed pairs, predict held-out "
                    "single and double perturbations, write metrics (Pearson delta) and a plot.",
    )
    add_perturb_arguments(parser)
    parser.set_defaults(func=perturb_command)
    return parser


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


def perturb(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``hf-scfm perturb``; returns ``{"out", "summary", "split", "reverse"}``."""
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
    save_perturbation_model(model, tokenizer, out / "model")
    evaluation["per_condition"].to_csv(out / "per_condition.csv", index=False)
    evaluation["predicted"].to_csv(out / "predicted_profiles.csv")
    _plot(evaluation, data.mean_profile(data.control), out / "predicted_vs_measured_delta.png")
    reverse = None
    if args.reverse_candidates:
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
    return {"out": str(out), "summary": evaluation["summary"], "split": split, "reverse": reverse}


def perturb_command(args: argparse.Namespace) -> int:
    """Handler of ``hf-scfm perturb``: one-line errors for bad inputs, 0 on success."""
    from ..training.hub import CheckpointError

    try:
        result = perturb(args)
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"hf-scfm perturb: error: {err}", file=sys.stderr)
        return 2
    s = result["summary"]
    for method in ("model", "train_mean", "additive", "no_change"):
        row = s.get(method, {}).get("all", {})
        print(f"{method:>10}: Pearson delta {row.get('pearson_delta', float('nan')):.3f}, top-20 DE "
              f"{row.get('pearson_delta_de', float('nan')):.3f}, MSE {row.get('mse', float('nan')):.4f}")
    if result["reverse"]:
        print(f"reverse perturbation hit rate: {result['reverse']['hit_rate']}")
    print(f"Wrote {result['out']}/metrics.json, per_condition.csv, predicted_vs_measured_delta.png and model/")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-scfm perturb")
    add_perturb_arguments(parser)
    return perturb_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
