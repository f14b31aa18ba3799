"""Reverse perturbation (SC-MAMBA2 section 4.5): which perturbation would move control cells to a target state?

:func:`reverse_perturbation` ranks every 1- and 2-gene combination of a candidate list by the distance between the
change from control a fine-tuned perturbation model predicts for it and the target's measured change, and reports
each target's true rank and the top-k hit rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from .perturbation import pearson_delta, predict_genesets
from .perturbation_data import PerturbationData, condition_name, parse_condition

__all__ = ["ReversePerturbationResult", "reverse_perturbation"]


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
    genesets = [data.geneset(n) for n in names]
    profiles = predict_genesets(model, tokenizer, data, [()] + genesets, n_control_cells=n_control_cells,
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
