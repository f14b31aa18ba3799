"""Perturbation data: the GEARS/Norman AnnData layout read into model-ready form, the GEARS-style split, and the
control -> perturbed training pairs. (The models, training and metrics are in :mod:`hf_scfm.tasks.perturbation`.)

Layout: raw counts, ``obs["condition"]`` = ``"ctrl"`` (control cells), ``"A+ctrl"`` (gene ``A`` perturbed) or
``"A+B"`` (both); genes named by ``var_names`` or ``var["gene_name"]``.
:func:`hf_scfm.tasks.grn_simulation.simulate_perturb_seq` writes such data from a known network.

* :func:`read_perturbation_data` validates the layout and builds a :class:`PerturbationData`: per cell the
  ``log1p(x_norm)`` value of **every** gene of the data that the vocabulary knows (zeros included: a perturbed gene
  absent from a control cell still needs a position to carry its flag), the gene's token id, and the perturbed
  genes of each condition.
* :func:`split_conditions`: GEARS-style split. A fraction of the singly perturbed genes is held out: their singles
  are test conditions (*unseen single*), doubles with one or two of them are test conditions (*double seen 1* /
  *seen 0*), and part of the doubles of two seen genes too (*double seen 2*).
* :func:`perturbation_sentences` and :class:`PerturbationPairs`: the sentences the models read. **Order**: the
  perturbed genes come first (after ``<cls>`` / ``<bos>``), then the other genes in vocabulary order. For the causal
  Mouse-GeneMamba this is what makes the task learnable at all: a causal backbone's position ``j`` reads tokens
  ``<= j`` only, so a perturbed gene late in the sentence could not inform the genes before it. For the
  bidirectional families the order carries no meaning, and one rule for all keeps the data path single.
  Predictions are mapped back to genes by position, so the order never leaks out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .grn_simulation import CONTROL

__all__ = [
    "CONTROL",
    "PerturbationData",
    "PerturbationPairs",
    "SPLIT_GROUPS",
    "condition_name",
    "parse_condition",
    "perturbation_sentences",
    "read_perturbation_data",
    "split_conditions",
]

SPLIT_GROUPS = ("single_seen", "single_unseen", "double_seen2", "double_seen1", "double_seen0")


# ---------------------------------------------------------------------------------------------------------------
# conditions
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


# ---------------------------------------------------------------------------------------------------------------
# the data
# ---------------------------------------------------------------------------------------------------------------


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

    def geneset(self, condition: str) -> tuple[int, ...]:
        """Gene positions perturbed by ``condition``, which need not occur in the data (any genes it measures)."""
        genes = parse_condition(condition, self.control)
        key = condition_name(genes, self.control)
        if key in self.genes_of:
            return self.genes_of[key]
        index = {n.upper(): i for i, n in enumerate(self.gene_names)}
        index |= {g.upper(): i for i, g in enumerate(self.gene_ids)}
        missing = [g for g in genes if g.upper() not in index]
        if missing:
            raise ValueError(f"Condition {condition!r}: genes {missing} are not among the data's genes known to the "
                             "vocabulary.")
        return tuple(sorted(index[g.upper()] for g in genes))


def _conditions_of(adata, condition_key: str, control: str) -> tuple[np.ndarray, dict[str, tuple[str, ...]]]:
    """Every cell's condition label and the parsed genes of each label, or an error naming what is missing."""
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
    return labels, parsed


def _counts(adata, check_counts: bool):
    """``(X as CSR float64, library sizes)``, checked to be counts of cells that have any."""
    import scipy.sparse as sp

    counts = sp.csr_matrix(adata.X, dtype=np.float64)
    if counts.nnz and counts.data.min() < 0:
        raise ValueError("The perturbation data has negative values in X; it needs raw counts.")
    if check_counts and counts.nnz and not np.all(counts.data == np.round(counts.data)):
        raise ValueError("X holds non-integer values; perturbation data must be raw counts (set check_counts=False "
                         "for normalised, non-log data).")
    if "n_counts" in adata.obs.columns:
        n_counts = adata.obs["n_counts"].to_numpy(dtype=np.float64)
    else:
        n_counts = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    if np.any(n_counts <= 0):
        raise ValueError(f"{int(np.sum(n_counts <= 0))} cells have no counts; drop them first.")
    return counts, n_counts


def _vocabulary_columns(adata, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """``(columns of var the vocabulary knows, in token-id order; token id of every column, -1 if unknown)``."""
    from ..tokenization.gene_tables import load_gene_table, map_genes

    table = load_gene_table(tokenizer.species) if tokenizer.species is not None else None
    token_of_column, report = map_genes(list(map(str, adata.var_names)), tokenizer.get_vocab(), table,
                                        tokenizer.ambiguous)
    if report.duplicates:
        raise ValueError(f"{len(report.duplicates)} genes of the data map to a token another gene already maps to "
                         f"(e.g. {list(report.duplicates)[:3]}); keep one column per gene.")
    matched = np.flatnonzero(token_of_column >= 0)
    if not len(matched):
        raise ValueError("No gene of the perturbation data is in the tokenizer's vocabulary: " + report.summary())
    return matched[np.argsort(token_of_column[matched], kind="stable")], token_of_column


def _perturbed_positions(parsed, names, adata, matched, tokenizer, control, gene_name_key) -> dict:
    """Canonical condition -> sorted positions (in ``matched``) of its genes; errors list the genes not found."""
    lookup: dict[str, int] = {}
    for col, name in enumerate(map(str, adata.var_names)):
        lookup.setdefault(name.upper(), col)
    for col, name in enumerate(names):
        lookup[str(name).upper()] = col  # gene_name wins over var_names
    position = np.full(adata.n_vars, -1, dtype=np.int64)
    position[matched] = np.arange(len(matched))
    missing, unknown, genes_of = {}, {}, {}
    for cond, genes in parsed.items():
        cols = []
        for gene in genes:
            col = lookup.get(gene.upper())
            if col is None:
                missing.setdefault(gene, cond)
            elif position[col] < 0:
                unknown.setdefault(gene, cond)
            else:
                cols.append(int(position[col]))
        genes_of[condition_name(genes, control)] = tuple(sorted(cols))
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
    return dict(sorted(genes_of.items(), key=lambda kv: (len(kv[1]), kv[0])))


def read_perturbation_data(adata, tokenizer, *, condition_key: str = "condition", control: str = CONTROL,
                           gene_name_key: str = "gene_name", check_counts: bool = True) -> PerturbationData:
    """Validate a GEARS-layout AnnData (or ``.h5ad`` path) and build its :class:`PerturbationData`.

    Condition genes are looked up in ``var[gene_name_key]`` (when the column exists), then in ``var_names``,
    case-insensitively. Errors name the problem and the fix: a missing condition column, no control cells,
    condition genes not in ``var`` or not in the tokenizer's vocabulary, non-integer or negative counts, cells
    without counts. The AnnData is not modified.
    """
    import scipy.sparse as sp

    from .inference import read_cells

    adata = read_cells(adata, source="the perturbation data")
    labels, parsed = _conditions_of(adata, condition_key, control)
    counts, n_counts = _counts(adata, check_counts)
    matched, token_of_column = _vocabulary_columns(adata, tokenizer)
    names = (adata.var[gene_name_key].astype(str).to_numpy() if gene_name_key in adata.var.columns
             else np.asarray(adata.var_names, dtype=str))
    genes_of = _perturbed_positions(parsed, names, adata, matched, tokenizer, control, gene_name_key)
    values = sp.diags(1e4 / n_counts) @ counts[:, matched].tocsr()
    values.data = np.log1p(values.data)
    return PerturbationData(
        adata=adata, values=values.astype(np.float32).tocsr(), token_ids=token_of_column[matched].astype(np.int64),
        gene_ids=[str(adata.var_names[c]) for c in matched], gene_names=[str(names[c]) for c in matched],
        cell_conditions=np.asarray([condition_name(parsed[c], control) for c in labels], dtype=object),
        genes_of=genes_of, control=control,
    )


# ---------------------------------------------------------------------------------------------------------------
# the split
# ---------------------------------------------------------------------------------------------------------------


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


def perturbation_sentences(data: PerturbationData, tokenizer, rows: np.ndarray, perturbed: tuple[int, ...]):
    """``(input_ids, values, flags, order)`` for cells ``rows`` under one perturbation: ``[B, L]`` arrays (the
    tokenizer's prefix and suffix tokens around every gene of the data, perturbed genes first) and ``order``, the
    gene position (``0..G-1``) at each gene slot, to map predictions back."""
    prefix, suffix = _special_ids(tokenizer)
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
    ``include_control`` every control cell is also a target, paired with another random control cell (the model
    must also learn "no perturbation, no change"). Each record: ``input_ids``, ``values`` (control),
    ``target_values`` (perturbed cell, same genes in the same order), ``perturbed_gene_ids`` (token ids); what
    :class:`hf_scfm.data.DataCollatorForPerturbation` reads. Targets are absolute values (the SC-MAMBA2 paper's
    set-up), not a residual on the control cell: with random pairing the best prediction is the condition mean,
    which does not depend on the individual control cell's noise.
    """

    def __init__(self, data: PerturbationData, tokenizer, conditions, *, include_control: bool = True, seed: int = 0):
        unknown = [c for c in conditions if c not in data.genes_of]
        if unknown:
            raise ValueError(f"Conditions not in the data: {unknown[:5]}.")
        self.data = data
        self.tokenizer = tokenizer
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
        ids, values, _, _ = perturbation_sentences(self.data, self.tokenizer,
                                                   np.asarray([self.sources[i], self.targets[i]]), perturbed)
        return {"input_ids": ids[0].copy(), "values": values[0], "target_values": values[1],
                "perturbed_gene_ids": self.data.token_ids[list(perturbed)], "condition": cond}
