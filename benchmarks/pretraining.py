"""Pretraining benchmark: per family, the held-out-donor pretraining objective over steps next to trivial predictors
on the same masked positions / next tokens; and Mouse-GeneMamba's next-gene vs masked-gene pretraining compared on
annotation (the paper's NTP ~ MLM, in miniature).

    python benchmarks/pretraining.py                 # README table + benchmarks/results/pretraining.png
    python benchmarks/pretraining.py --datasets baron_human --families cellfm --steps 40   # a smoke run
    python benchmarks/pretraining.py --no-mlm --pool none orthologs   # issue 17.3: pooled corpus vs one dataset's

``--pool``: what else enters the corpus (:data:`common.POOLS`): ``orthologs`` adds every cell of the other
species' Baron set mapped through the one-to-one ortholog table, ``all`` every other bundled dataset too; the
tokenizer and the trivial predictors stay those of the split's training donors, so the pooled rows are scored on
the same held-out batches against the same baselines as the unpooled ones (the curves plotted are the first pool's).

Each run (:func:`common.pretrain_run`, cached under ``benchmarks/results/runs/`` and reused by
``benchmarks/annotation.py``): the family's recipe (:data:`hf_scfm.quickstart.RECIPES`), pretrained with
``hf-scfm pretrain`` on the training donors of the split only (Baron human: human1-3, held out human4; Baron mouse:
mouse2, held out mouse1), a checkpoint every ``steps / 8`` steps evaluated on fixed batches of the held-out donor
(the objective's own collator, seed 1234). Trivial predictors, fitted on the training sentences and scored on the
same positions:

* masked values (SC-MAMBA2 bins, CellFM log1p values): each gene's mean value (the target: model MSE <= 0.75 of
  it), the global mean, and, for reference, each gene's mean *within the cell's type* (an oracle: it reads the
  labels, which pretraining never does);
* next gene (Mouse-GeneMamba): the unigram frequency of the targets, the unigram over the genes not yet in the
  sentence (cross-entropy in nats; target: model >= 0.5 nats below the unigram), and top-1 accuracy of the corpus
  rank order (genes sorted by their median relative position in the training sentences, the next one not yet seen);
* masked genes (Mouse-GeneMamba's MLM variant): the unigram, and the unigram over the genes not visible in the cell.

Writes ``benchmarks/results/pretraining.csv`` (every evaluation), ``pretraining.md``, ``pretraining.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RUNS = [("scmamba2", "masked_expression"), ("cellfm", "masked_regression"), ("mouse_genemamba", "causal"),
        ("mouse_genemamba", "mlm")]
SPLITS = {"baron_human": "test human4", "baron_mouse": "test mouse1"}
NAMES = {"scmamba2": "SC-MAMBA2", "cellfm": "CellFM", "mouse_genemamba": "Mouse-GeneMamba"}


def run_job(family: str, objective: str, dataset: str, split: str, steps: int | None, force: bool,
            pool: str = common.POOL) -> dict:
    run = common.pretrain_run(family, dataset, split, objective=objective, steps=steps, force=force, pool=pool)
    return {"curve": run["curve"], "pretrained": str(run["pretrained"]), "cpu_s": run["cpu_s"], "reused": run["reused"],
            "corpus": run["corpus"]}


def summarise(family: str, objective: str, curve: list[dict]) -> dict:
    """The final evaluation against the best trivial predictor, and whether the issue's target is met."""
    last = {k: float(v) for k, v in curve[-1].items()}
    if "gene_mean" in last:
        best = min(last["gene_mean"], last["global_mean"])
        ratio = last["model"] / best
        return {"objective": f"{objective} (MSE)", "model": last["model"], "best trivial": best,
                "oracle": last["cell_type_oracle"], "figure": f"{ratio:.3f} of the per-gene mean",
                "met": ratio <= 0.75}
    best = min(last["unigram"], last["unigram_unseen"])
    gap = best - last["model"]
    return {"objective": f"{objective} (CE, nats)", "model": last["model"], "best trivial": best, "oracle": None,
            "figure": f"{gap:.2f} nats below the unigram (top-1 {last['model_top1']:.3f} vs "
                      f"{last.get('rank_order_top1', last['unigram_top1']):.3f})", "met": gap >= 0.5}


def plot(results: dict, png: Path, splits: dict = SPLITS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(f, o) for (_, f, o) in results}, key=lambda k: [r[:2] for r in RUNS].index(k))
    datasets = sorted({d for (d, _, _) in results})
    fig, axes = plt.subplots(len(datasets), len(keys), figsize=(3.3 * len(keys), 2.8 * len(datasets)), dpi=100,
                             squeeze=False)
    for r, dataset in enumerate(datasets):
        for c, (family, objective) in enumerate(keys):
            ax = axes[r][c]
            curve = results.get((dataset, family, objective))
            if not curve:
                ax.axis("off")
                continue
            steps = [int(row["step"]) for row in curve]
            ax.plot(steps, [float(row["model"]) for row in curve], "o-", label="model", color="C0")
            trivial = ("gene_mean", "global_mean", "cell_type_oracle") if "gene_mean" in curve[0] else \
                ("unigram", "unigram_unseen")
            for key, colour in zip(trivial, ("C1", "C2", "C3")):
                ax.axhline(float(curve[-1][key]), ls="--", color=colour, label=key.replace("_", " "))
            finals = [float(curve[-1][k]) for k in trivial] + [float(curve[-1]["model"])]
            ax.set_ylim(min(finals) * 0.85, max(finals) * 1.25)
            ax.set_title(f"{NAMES[family]} {objective}\n{dataset} (held out {splits[dataset].split()[-1]})",
                         fontsize=8)
            ax.set_xlabel("pretraining step", fontsize=8)
            ax.set_ylabel("held-out MSE" if "gene_mean" in curve[0] else "held-out CE (nats)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["scmamba2", "cellfm", "mouse_genemamba"])
    parser.add_argument("--datasets", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the recipe's)")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds of the NTP vs MLM comparison")
    parser.add_argument("--no-mlm", action="store_true", help="skip Mouse-GeneMamba's MLM variant")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="pretrain again even if a matching run exists")
    parser.add_argument("--pool", nargs="+", default=[common.POOL], choices=common.POOLS,
                        help="pretraining corpus: none (the split's training donors), orthologs (plus the other "
                             "species' Baron cells through the 1:1 ortholog table), all (plus every other bundled "
                             "dataset); each one is a run of its own")
    parser.add_argument("--splits", default="test", choices=("test", "validation"),
                        help="the test donors (default) or the validation donor the recipes were chosen on")
    args = parser.parse_args(argv)
    splits = dict(SPLITS) if args.splits == "test" else dict(common.VALIDATION)
    args.datasets = [d for d in args.datasets if d in splits]
    pools = list(dict.fromkeys(args.pool))
    started, cpu = time.time(), 0.0
    todo = [(f, o) for f, o in RUNS if f in args.families and not (o == "mlm" and args.no_mlm)]
    jobs = [(run_job, {"family": f, "objective": o, "dataset": d, "split": splits[d], "steps": args.steps,
                       "force": args.force, "pool": p}) for d in args.datasets for p in pools for f, o in todo]
    results, pretrained, rows, corpora = {}, {}, [], {}
    for i, result, cpu_s, wall in common.run_jobs(jobs, args.workers):
        kw = jobs[i][1]
        key = (kw["dataset"], kw["family"], kw["objective"], kw["pool"])
        results[key], pretrained[key], corpora[key] = result["curve"], result["pretrained"], result["corpus"]
        cpu += cpu_s
        rows += [{"dataset": kw["dataset"], "split": kw["split"], "family": kw["family"], "objective": kw["objective"],
                  "pool": kw["pool"], **row} for row in result["curve"]]
        print(f"[{time.time() - started:6.0f} s] {kw['dataset']} {kw['family']} {kw['objective']} pool {kw['pool']}: "
              f"{summarise(kw['family'], kw['objective'], result['curve'])['figure']} "
              f"({'reused' if result['reused'] else f'{cpu_s:.0f} CPU-s'})", flush=True)
    common.write_csv(common.RESULTS / "pretraining.csv", rows)
    lines = ["| dataset (held out) | family | objective | pool (corpus cells) | steps | held-out model | best trivial | "
             "cell-type oracle | result | target |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (dataset, family, objective, pool), curve in sorted(results.items(), key=lambda kv: (
            kv[0][0], [r[:2] for r in RUNS].index(kv[0][1:3]), pools.index(kv[0][3]))):
        s = summarise(family, objective, curve)
        oracle = f"{s['oracle']:.3f}" if s["oracle"] is not None else "-"
        cells = " + ".join(f"{v:,}" for v in corpora[dataset, family, objective, pool].values())
        lines.append(f"| {dataset} ({splits[dataset].split()[-1]}) | {NAMES[family]} | {s['objective']} | {pool} ({cells}) | "
                     f"{curve[-1]['step']} | {s['model']:.3f} | "
                     f"{s['best trivial']:.3f} | {oracle} | {s['figure']} | {'met' if s['met'] else 'not met'} |")
    table = "\n".join(lines)
    png = common.RESULTS / "pretraining.png"
    plot({k[:3]: v for k, v in results.items() if k[3] == pools[0]}, png, splits)

    comparison = ""
    pretrained = {k[:3]: v for k, v in pretrained.items() if k[3] == pools[0]}
    mgm = [k for k in pretrained if k[1] == "mouse_genemamba"]
    if {o for _, _, o in mgm} >= {"causal", "mlm"}:
        from annotation import finetune_job

        ft = [(finetune_job, {"family": "mouse_genemamba", "dataset": d, "split": splits[d],
                              "pretrained": pretrained[d, "mouse_genemamba", o], "init": "pretrained", "seed": s,
                              "pool": pools[0]})
              for d in args.datasets for o in ("causal", "mlm") for s in range(args.seeds)]
        scores = {}
        for i, result, cpu_s, wall in common.run_jobs(ft, args.workers):
            kw = ft[i][1]
            objective = "causal" if kw["pretrained"] == pretrained[kw["dataset"], "mouse_genemamba", "causal"] else "mlm"
            scores.setdefault((kw["dataset"], objective), []).append(result)
            cpu += cpu_s
        lines = ["| dataset | Mouse-GeneMamba pretraining | accuracy | macro-F1 |", "|---|---|---|---|"]
        for (dataset, objective), res in sorted(scores.items()):
            name = "next-gene (NTP)" if objective == "causal" else "masked-gene (MLM)"
            lines.append(f"| {dataset} | {name} | {common.mean_sd([r['accuracy'] for r in res])} | "
                         f"{common.mean_sd([r['f1_macro'] for r in res])} |")
        comparison = "\n".join(lines)
    settings = common.provenance("pretraining.py", argv, started, cpu, args.workers)
    text = f"# Pretraining benchmark\n\n{settings}\n\n{table}\n\n![curves](pretraining.png)\n"
    if comparison:
        text += f"\nNTP vs MLM (fine-tuned from each, {args.seeds} seeds, mean ± sd):\n\n{comparison}\n"
    (common.RESULTS / "pretraining.md").write_text(text)
    print(f"\n{table}\n\n{comparison}\n\n{settings}\nWrote {common.RESULTS}/pretraining.csv, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
