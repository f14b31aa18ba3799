"""Perturbation benchmark on simulated Perturb-seq data: every family, fine-tuned from random initialisation.

    .venv/bin/python benchmarks/perturbation.py                        # the README figures
    .venv/bin/python benchmarks/perturbation.py --steps 100 --genes 80 # quicker

Data: :func:`hf_scfm.tasks.grn_simulation.simulate_perturb_seq` (``--genes`` genes, ``--perturbed`` singly
perturbed regulators, ``--doubles`` random pairs, 80 cells per condition, 1,000 control cells, knockdown),
split GEARS-style (25 % of the perturbed genes held out: unseen singles, doubles with 0/1/2 seen genes).
mouse_genemamba runs on the same simulation with mouse gene IDs (its vocabulary), which draws a different
network, so each family's rows of baselines are its own. Each family's ``tiny`` preset (random initialisation:
no pretraining, so this measures the heads and the backbones' inductive bias, not transfer), as its
``<Family>ForPerturbationPrediction``, is fine-tuned with :func:`finetune_perturbation` and scored with
:func:`evaluate_perturbation` on the held-out conditions, next to the no-change, training-mean and additive
baselines. Reverse perturbation: all 1- and 2-gene combinations of the perturbed genes ranked against every
held-out condition; top-1/5/10 hit rates. Prints one Markdown table and writes it (and a JSON) to
``benchmarks/results/perturbation.{md,json}``. Numbers depend on the seed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from hf_scfm.tasks import perturbation as P
from hf_scfm.tasks.grn_simulation import simulate_perturb_seq
from hf_scfm.tasks.reverse_perturbation import reverse_perturbation
from hf_scfm.tokenization import GeneTokenizer
from hf_scfm.training.families import FAMILIES

SPECIES = {"scmamba2": "human", "cellfm": "human", "mouse_genemamba": "mouse"}
GROUPS = ("single_unseen", "double_seen2", "double_seen1", "double_seen0", "all")


def run_family(family: str, args) -> dict:
    species = SPECIES[family]
    adata = simulate_perturb_seq(n_genes=args.genes, n_perturbed_genes=args.perturbed, n_doubles=args.doubles,
                                 cells_per_condition=80, n_control_cells=1000, species=species, seed=args.seed)
    tok = GeneTokenizer.from_genes(list(adata.var_names), species=species, encoding=FAMILIES[family].encoding)
    data = P.read_perturbation_data(adata, tok)
    split = P.split_conditions(data.conditions, seed=args.seed)
    torch.manual_seed(args.seed)
    config = FAMILIES[family].config_cls.from_preset("tiny", vocab_size=len(tok), vocab_checksum=tok.vocab_checksum)
    model = P.build_perturbation_model(FAMILIES[family].pretraining_cls()(config), value_scale=P.value_scale_for(data))
    n_params = sum(p.numel() for p in model.parameters())
    start = time.time()
    model, history = P.finetune_perturbation(model, tok, data, split["train"], max_steps=args.steps, batch_size=16,
                                             learning_rate=args.lr, seed=args.seed, logging_steps=args.steps // 5)
    train_s = time.time() - start
    ev = P.evaluate_perturbation(model, tok, data, split, n_control_cells=128, seed=args.seed)
    candidates = [data.gene_labels(c)[0] for c in data.conditions if len(data.genes_of[c]) == 1]
    reverse = reverse_perturbation(model, tok, data, candidates, split["test"], top_k=(1, 5, 10), n_control_cells=64)
    return {"family": family, "params": n_params, "train_s": train_s, "summary": ev["summary"],
            "reverse_hit_rate": reverse.hit_rate, "n_candidates": len(candidates),
            "n_combinations": len(candidates) * (len(candidates) + 1) // 2, "n_targets": len(split["test"]),
            "groups": {g: sum(1 for c in split["test"] if split["group"][c] == g) for g in GROUPS},
            "train_loss": [h["loss"] for h in history if "loss" in h]}


def table(results: list[dict]) -> str:
    cols = [g for g in GROUPS if any(g in r["summary"]["model"] for r in results)]
    n = results[0]["groups"]
    head = "| method | " + " | ".join(f"{g} (n={n.get(g, '')})" if g != "all" else "all held-out" for g in cols) + \
        " | reverse top-1 / 5 / 10 |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]

    def cell(summary, g):
        s = summary.get(g)
        return (f"{s['pearson_delta']:.2f} / {s['pearson_delta_de']:.2f} / {s['pearson_delta_downstream']:.2f}"
                if s else "-")

    for r in results:
        hit = r["reverse_hit_rate"]
        lines.append(f"| {r['family']} (tiny, {r['params'] / 1e3:.0f}k params) | "
                     + " | ".join(cell(r["summary"]["model"], g) for g in cols)
                     + f" | {hit[1]:.2f} / {hit[5]:.2f} / {hit[10]:.2f} |")
    for r in results:
        for base in ("additive", "train_mean"):
            lines.append(f"| &nbsp; baseline {base.replace('_', ' ')} ({r['family']}'s data) | "
                         + " | ".join(cell(r["summary"][base], g) for g in cols) + " | - |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(SPECIES))
    parser.add_argument("--genes", type=int, default=150)
    parser.add_argument("--perturbed", type=int, default=16)
    parser.add_argument("--doubles", type=int, default=40)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "perturbation"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for family in args.families:
        r = run_family(family, args)
        print(f"{family}: trained {args.steps} steps in {r['train_s']:.0f} s; loss {r['train_loss'][0]:.2f} -> "
              f"{r['train_loss'][-1]:.2f}", flush=True)
        results.append(r)
    md = (f"Pearson delta, all genes / top-20 DE genes / downstream genes (all but the perturbed ones), mean over "
          f"held-out conditions (the no-change baseline scores 0 by definition); {args.genes} genes, "
          f"{args.perturbed} perturbed genes, {args.doubles} doubles, seed {args.seed}, {args.steps} steps "
          f"(batch 16, lr {args.lr}).\nReverse perturbation: {results[0]['n_combinations']} candidate 1- and 2-gene "
          f"combinations, {results[0]['n_targets']} held-out targets; hit rate = true perturbation ranked in the "
          f"top k.\n\n" + table(results))
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md + "\n", encoding="utf-8")
    payload = json.dumps({"args": vars(args), "results": results}, indent=2,
                         default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))
    out.with_suffix(".json").write_text(payload + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
