"""Perturb-seq-like data simulated from a known gene-regulatory network (GRN), in the GEARS/Norman layout.

No real Perturb-seq data is reachable from this project, so the perturbation task is tested on cells drawn from
a network whose every edge is known. :func:`simulate_perturb_seq` returns an AnnData laid out like the files
GEARS ships for Norman et al. (2019), so the same code reads both:

* ``X``: raw integer UMI counts (CSR, float32 holding integers);
* ``var_names``: real unversioned Ensembl IDs of protein-coding genes of the shipped GENCODE table (a seeded
  choice), so :class:`~hf_scfm.GeneTokenizer` maps them; ``var["gene_name"]``: their symbols;
* ``obs["condition"]``: ``"ctrl"``, ``"A+ctrl"`` (one perturbed gene) or ``"A+B"`` (two), gene symbols;
* ``uns["grn"]``: the ground truth, JSON-safe (lists and arrays): ``weights`` ``[G, G]`` (``weights[i, j]`` is
  the effect of gene ``i`` on gene ``j``; zero = no edge), ``bias``, ``max_expression``, ``topological_order``
  and the settings; ``uns["true_expression"]``: the noise-free mean count per condition and gene at size
  factor 1 (``conditions`` and ``values`` ``[C, G]``), so tests can compare against the truth directly.

The model, and why:

* **A random sparse DAG.** Genes get a random topological order; each gene draws ``n_parents ~ Poisson``
  regulators among the genes before it (only among the first ``n_regulators`` genes of the order, so some
  genes are regulators and most are targets, as in a real network). Edge weights are ``±U(w_min, w_max)``
  with a random sign. A DAG has a unique steady state and its descendants are well defined, so "a knockdown
  changes only the descendants of the gene" is an exact, testable property.
* **Linear-nonlinear steady state.** Activity ``h_j = sigmoid(b_j + sum_i W_ij h_i)`` in ``(0, 1)``, expression
  ``x_j = max_expression_j * h_j``. It is solved by fixed-point iteration ``h <- f(W^T h + b)`` for all
  conditions at once; on a DAG the iteration is exact after (depth + 1) sweeps. The sigmoid makes double
  perturbations non-additive (saturation), which is what models of combinatorial perturbations are tested on.
* **Perturbation clamps the gene.** ``mode="knockdown"`` (CRISPRi) sets the activity of each perturbed gene to
  ``level`` times its control activity (default 0.05); ``"overexpression"`` (CRISPRa, what Norman et al. did)
  to ``level`` times it (default 4.0). Clamped genes ignore their regulators; everything downstream follows.
* **Counts.** Cell ``c`` of a condition gets mean ``s_c * x_j * exp(eps_cj)``: ``s_c`` a log-normal size factor
  (capture efficiency, independent of the condition, so genes outside the descendants keep their mean raw
  count exactly) and ``eps`` per-cell biological noise; counts are negative-binomial (Gamma-Poisson with
  inverse dispersion ``theta``). Everything is drawn from one seeded ``numpy`` generator.

A few thousand cells x ~150 genes take well under a second (0.4 s for 4,200 x 150 here), once the GENCODE table
has been read (about 2 s, first call in a process).
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations

import numpy as np

__all__ = ["simulate_perturb_seq", "descendants", "CONTROL"]

CONTROL = "ctrl"
_MODES = {"knockdown": 0.05, "overexpression": 4.0}


@lru_cache(maxsize=None)
def _candidate_rows(species: str) -> np.ndarray:
    """Rows of the GENCODE table holding protein-coding genes with a unique symbol (not an Ensembl ID, no ``+``)."""
    from ..tokenization.gene_tables import load_gene_table

    table = load_gene_table(species)
    return np.asarray([i for i, (sym, bio) in enumerate(zip(table.symbols, table.biotypes))
                       if bio == "protein_coding" and sym and "+" not in sym and not sym.upper().startswith("ENS")
                       and len(table.symbol_index[sym.upper()]) == 1])


def _pick_genes(species: str, n_genes: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """A seeded choice of protein-coding genes with a unique, plain symbol (IDs, symbols)."""
    from ..tokenization.gene_tables import load_gene_table, normalize_species

    species = normalize_species(species)
    table = load_gene_table(species)
    rows = _candidate_rows(species)
    if n_genes > len(rows):
        raise ValueError(f"n_genes={n_genes}: only {len(rows)} protein-coding genes of {species} are available.")
    chosen = np.sort(rng.choice(rows, size=n_genes, replace=False))
    return [table.ids[i] for i in chosen], [table.symbols[i] for i in chosen]


def _steady_state(weights, bias, clamp_mask, clamp_value, max_iter: int) -> np.ndarray:
    """Activities ``[C, G]`` solving ``h = sigmoid(h @ W + b)`` with the clamped entries fixed."""
    h = np.where(clamp_mask, clamp_value, 0.5)
    for _ in range(max_iter):
        new = 1.0 / (1.0 + np.exp(-(h @ weights + bias)))
        new = np.where(clamp_mask, clamp_value, new)
        if np.array_equal(new, h):
            break
        h = new
    return h


def descendants(weights: np.ndarray, gene: int) -> np.ndarray:
    """Indices of every gene reachable from ``gene`` through edges ``weights[i, j] != 0`` (``gene`` excluded)."""
    adjacency = np.asarray(weights) != 0
    seen = np.zeros(adjacency.shape[0], dtype=bool)
    frontier = adjacency[gene].copy()
    while frontier.any():
        seen |= frontier
        frontier = adjacency[frontier].any(axis=0) & ~seen
    return np.flatnonzero(seen)


def simulate_perturb_seq(
    n_genes: int = 120,
    n_perturbed_genes: int = 12,
    n_doubles: int = 20,
    cells_per_condition: int = 50,
    n_control_cells: int = 500,
    *,
    species: str = "human",
    n_regulators: int | None = None,
    mean_parents: float = 2.0,
    weight_range: tuple[float, float] = (1.5, 3.0),
    mode: str = "knockdown",
    level: float | None = None,
    mean_count: float = 4.0,
    size_factor_sd: float = 0.25,
    noise_sd: float = 0.15,
    theta: float = 10.0,
    seed: int = 0,
):
    """Simulate a Perturb-seq experiment on a random GRN; returns an AnnData (layout: module docstring).

    Args:
        n_genes: genes measured (and in the network).
        n_perturbed_genes: genes perturbed singly; chosen among the regulators with the most descendants (a
            perturbation of a gene without targets only changes itself).
        n_doubles: random pairs of the perturbed genes perturbed together (capped at all pairs).
        cells_per_condition: cells per perturbed condition; ``n_control_cells`` unperturbed cells.
        species: ``"human"`` or ``"mouse"``: whose gene IDs name the genes.
        n_regulators: genes (first in the topological order) that may regulate others (default ``n_genes // 4``).
        mean_parents: mean number of regulators per gene (Poisson).
        weight_range: ``|W_ij| ~ U(weight_range)``, sign random.
        mode: ``"knockdown"`` or ``"overexpression"``; ``level``: factor on the control activity of a perturbed
            gene (default 0.05 / 4.0).
        mean_count: median over genes of the mean UMI count at full activity and size factor 1 (log-normal
            spread over genes).
        size_factor_sd, noise_sd: log-scale sd of the per-cell size factor and of the per-cell, per-gene noise.
        theta: negative-binomial inverse dispersion (larger = closer to Poisson).
        seed: everything is drawn from ``numpy.random.default_rng(seed)``.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    if mode not in _MODES:
        raise ValueError(f"mode={mode!r}: choose 'knockdown' or 'overexpression'.")
    level = _MODES[mode] if level is None else float(level)
    n_regulators = max(2, n_genes // 4) if n_regulators is None else int(n_regulators)
    if not 2 <= n_regulators <= n_genes:
        raise ValueError(f"n_regulators={n_regulators} must lie in [2, n_genes={n_genes}].")
    if not 1 <= n_perturbed_genes <= n_regulators:
        raise ValueError(f"n_perturbed_genes={n_perturbed_genes} must lie in [1, n_regulators={n_regulators}].")
    from ..tokenization.gene_tables import normalize_species

    species = normalize_species(species)
    rng = np.random.default_rng(seed)
    gene_ids, symbols = _pick_genes(species, n_genes, rng)

    # the network: a random topological order, parents among earlier regulators
    order = rng.permutation(n_genes)
    weights = np.zeros((n_genes, n_genes))
    for pos in range(1, n_genes):
        pool = order[: min(pos, n_regulators)]
        k = min(len(pool), rng.poisson(mean_parents))
        if k:
            parents = rng.choice(pool, size=k, replace=False)
            signs = rng.choice([-1.0, 1.0], size=k)
            weights[parents, order[pos]] = signs * rng.uniform(*weight_range, size=k)
    # biases centre each gene's input so control activities spread around 0.5
    bias = rng.normal(0.0, 1.0, n_genes)
    no_clamp = np.zeros((1, n_genes), dtype=bool)
    h_ctrl = _steady_state(weights, bias, no_clamp, 0.0, n_genes + 1)[0]
    bias = bias - (h_ctrl @ weights)  # inputs at the control state now average to N(0, 1)
    h_ctrl = _steady_state(weights, bias, no_clamp, 0.0, n_genes + 1)[0]
    max_expression = mean_count * np.exp(rng.normal(0.0, 0.8, n_genes))

    # conditions: singles on the regulators with most descendants, random doubles among them
    regulators = order[:n_regulators]
    n_desc = np.array([len(descendants(weights, g)) for g in regulators])
    perturbed = regulators[np.argsort(-n_desc, kind="stable")[:n_perturbed_genes]]
    perturbed = np.sort(perturbed)
    pairs = list(combinations(perturbed.tolist(), 2))
    chosen_pairs = [pairs[i] for i in np.sort(rng.choice(len(pairs), size=min(n_doubles, len(pairs)), replace=False))]
    conditions = [CONTROL] + [f"{symbols[g]}+{CONTROL}" for g in perturbed] + [
        f"{symbols[a]}+{symbols[b]}" for a, b in chosen_pairs]
    genes_of = [()] + [(g,) for g in perturbed] + chosen_pairs
    clamp = np.zeros((len(conditions), n_genes), dtype=bool)
    for c, genes in enumerate(genes_of):
        clamp[c, list(genes)] = True
    h = _steady_state(weights, bias, clamp, level * h_ctrl[None, :], n_genes + 1)
    true_expression = max_expression[None, :] * h  # [C, G] mean count at size factor 1

    # cells
    n_cells = np.array([n_control_cells] + [cells_per_condition] * (len(conditions) - 1))
    cell_condition = np.repeat(np.arange(len(conditions)), n_cells)
    size = np.exp(rng.normal(0.0, size_factor_sd, len(cell_condition)))
    noise = np.exp(rng.normal(0.0, noise_sd, (len(cell_condition), n_genes)))
    mean = size[:, None] * true_expression[cell_condition] * noise
    counts = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)
    empty = counts.sum(1) == 0
    counts[empty, int(np.argmax(true_expression[0]))] = 1.0  # no cell without counts (the tokenizer rejects them)

    obs = pd.DataFrame({
        "condition": pd.Categorical(np.asarray(conditions, dtype=object)[cell_condition], categories=conditions),
        "n_perturbed": np.asarray([len(g) for g in genes_of])[cell_condition],
        "size_factor": size,
    }, index=[f"cell{i}" for i in range(len(cell_condition))])
    var = pd.DataFrame({"gene_name": symbols}, index=pd.Index(gene_ids, name="gene_id"))
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    adata.uns["species"] = species
    adata.uns["grn"] = {
        "weights": weights,
        "bias": bias,
        "max_expression": max_expression,
        "control_activity": h_ctrl,
        "topological_order": order,
        "regulators": np.sort(regulators),
        "mode": mode,
        "level": level,
        "seed": int(seed),
    }
    adata.uns["true_expression"] = {"conditions": np.asarray(conditions, dtype=object).astype(str),
                                    "values": true_expression}
    return adata
