"""Cell-type annotation benchmark: each family, pretrained and from random init, against logistic regression on the
model's own genes, on all genes and on a PCA of the same genes; held-out donors / folds, several seeds.

    python benchmarks/annotation.py                  # the README table (test splits, 3 seeds, 2 processes)
    python benchmarks/annotation.py --splits validation --seeds 1      # the validation donor the recipe was chosen on
    python benchmarks/annotation.py --families cellfm --datasets baron_human --seeds 1 --max-splits 1   # a smoke run
    python benchmarks/annotation.py --datasets baron_human --max-splits 1 --no-random-init \
        --gene-selection seurat pearson_residuals --tag _selection    # issue 23: the gene selection's effect alone

Splits (``common.TEST_SPLITS``): Baron human, held-out donors human4, human1, human3 (human2 is the validation
donor the recipes were chosen on, reported apart with ``--splits validation``); Baron mouse, both directions;
pbmc68k (one donor), 3 of 5 stratified folds.

Per split and family: the family's recipe (:data:`hf_scfm.quickstart.RECIPES`): a tokenizer reading the most
variable genes of the **training cells** (Pearson residuals, per donor; they are also the vocabulary) and a tiny
model pretrained on the training cells only (:func:`common.pretrain_run`, shared with ``benchmarks/pretraining.py``
and ``benchmarks/embeddings.py``: a run made there is reused here). Then, per seed, full fine-tuning
(``hf-scfm finetune --no-lora`` with the family's options) from the pretrained weights and, at the same budget,
from a random initialisation of the same architecture, and :func:`hf_scfm.tasks.annotation.annotate` of the test
cells. Baselines on the same split: L2 logistic regression (C=1) on log1p(CP10k) of **the same genes** the models
read, of all genes, and of a 50-component PCA of the same genes. Test cells whose label is absent from training are
not scored by any method.

``--gene-selection seurat pearson_residuals`` runs every arm once per flavour of the recipe's variable-gene
ranking (``seurat``: the earlier recipe's dispersion genes, per donor; ``pearson_residuals``: the current one),
everything else identical (vocabulary size, steps, seeds; each flavour pretrains its own run); the methods of a
non-default flavour are named ``... [seurat genes]`` and a side-by-side table (mean +- sd over seeds) is added.

Writes ``benchmarks/results/annotation<tag>.csv`` (one row per split x method x seed), ``annotation<tag>.md``
(mean +- sd over splits of the per-split seed means; the seed sd beside it; the issue's targets met or not) and
``annotation<tag>.png`` (macro-F1 bars), and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FAMILIES = ("cellfm", "scmamba2", "mouse_genemamba")
DATASETS = ("baron_human", "baron_mouse", "pbmc68k")
NAMES = {"cellfm": "CellFM", "scmamba2": "SC-MAMBA2", "mouse_genemamba": "Mouse-GeneMamba"}
LR_SAME, LR_ALL, PCA_LR = "LR, same genes", "LR, all genes", "PCA(50) + LR, same genes"


def selected_genes(tokenizer, adata) -> list[str]:
    """The columns of ``adata`` the tokenizer reads (its selected genes, as the dataset names them)."""
    unmatched = tokenizer.mapping_report(adata).unmatched
    return [g for g in adata.var_names if g not in unmatched]


def own_genes(family: str) -> str:
    """The same-genes baseline of a family whose recipe reads other genes than the first family's."""
    return f"LR, {NAMES[family]}'s genes"


def tagged(method: str, gene_selection: str, pool: str = common.POOL) -> str:
    """A method's name under a gene selection other than the recipes' (``annotation.py --gene-selection``) or a
    pooled pretraining corpus (``--pool``)."""
    tags = ([] if gene_selection == common.GENE_SELECTION else [f"{gene_selection} genes"]) + \
        ([] if pool == common.POOL else [f"pool {pool}"])
    return method + "".join(f" [{t}]" for t in tags)


def untagged(method: str) -> str:
    return method.split(" [")[0]


def baselines_job(dataset: str, split: str, pretrained: dict[str, str],
                  gene_selection: str = common.GENE_SELECTION) -> list[dict]:
    """Logistic regression on the models' genes, on all genes, and on PCA(50) of the models' genes: ``LR_SAME`` /
    ``PCA_LR`` on the genes of the first family of ``pretrained`` (family -> checkpoint), and ``own_genes(f)`` for
    each family whose recipe reads other genes (SC-MAMBA2: 128)."""
    from hf_scfm.tasks.baseline import logistic_regression_baseline
    from hf_scfm.tokenization import GeneTokenizer

    _, train, test = common.load_split(dataset, split)
    gene_sets = {f: selected_genes(GeneTokenizer.from_pretrained(path), train) for f, path in pretrained.items()}
    first = next(iter(gene_sets.values()))
    todo = [(LR_SAME, first, {}), (LR_ALL, None, {}), (PCA_LR, first, {"pca_components": 50})]
    todo += [(own_genes(f), genes, {}) for f, genes in gene_sets.items() if genes != first]
    rows = []
    for name, genes, kwargs in todo:
        m = logistic_regression_baseline(train, test, common.LABEL_KEY, warn=False, genes=genes, **kwargs)["metrics"]
        rows.append({"method": name, "n_genes": len(genes) if genes else train.n_vars, **_metrics(m)})
    return [{"dataset": dataset, "split": split, "seed": 0, "gene_selection": gene_selection, **r,
             "method": tagged(r["method"], gene_selection)} for r in rows]


def method_order() -> list[str]:
    return [LR_SAME] + [own_genes(f) for f in FAMILIES] + [LR_ALL, PCA_LR] + \
        [f"{NAMES[f]} {i}" for f in FAMILIES for i in ("pretrained", "random")]


def tagged_order() -> list[str]:
    """Every method name the tables may hold, tagged by gene selection and pool, in table order."""
    return [tagged(m, g, p) for m in method_order() for g in common.GENE_SELECTIONS for p in common.POOLS]


def _metrics(m: dict) -> dict:
    return {"accuracy": round(m["accuracy"], 4), "f1_macro": round(m["f1_macro"], 4), "n_scored": m["n_scored"]}


def pretrain_job(family: str, dataset: str, split: str, force: bool = False,
                 gene_selection: str = common.GENE_SELECTION, pool: str = common.POOL) -> dict:
    run = common.pretrain_run(family, dataset, split, force=force, gene_selection=gene_selection, pool=pool)
    return {"pretrained": str(run["pretrained"]), "cpu_s": run["cpu_s"], "reused": run["reused"],
            "final": run["curve"][-1], "corpus": run["corpus"]}


def objective_line(family: str, dataset: str, split: str, pool: str, result: dict) -> dict:
    """The run's final held-out pretraining objective against its best trivial predictor (one row of the table)."""
    last = {k: float(v) for k, v in result["final"].items()}
    if "gene_mean" in last:
        best = min(last["gene_mean"], last["global_mean"])
        figure = f"{last['model'] / best:.3f} of the per-gene mean"
    else:
        best = min(last["unigram"], last["unigram_unseen"])
        figure = f"{best - last['model']:.2f} nats below the unigram"
    return {"dataset": dataset, "split": split, "family": NAMES[family], "pool": pool,
            "corpus": " + ".join(f"{k} {v:,}" for k, v in result["corpus"].items()), "model": round(last["model"], 4),
            "best_trivial": round(best, 4), "figure": figure}


def objective_table(lines: list[dict]) -> str:
    out = ["| dataset (split) | family | pool | corpus cells | held-out model | best trivial | result |",
           "|---|---|---|---|---|---|---|"]
    for r in lines:
        out.append(f"| {r['dataset']} ({r['split']}) | {r['family']} | {r['pool']} | {r['corpus']} | {r['model']:.4g} | "
                   f"{r['best_trivial']:.4g} | {r['figure']} |")
    return "\n".join(out)


def pool_table(rows: list[dict]) -> str:
    """Per split and family, fine-tuned macro-F1 from each pool's pretrained weights next to random init (mean +- sd
    over seeds) and the differences; empty unless rows of several pools are present."""
    import numpy as np

    pools = [p for p in common.POOLS if any(r.get("pool", common.POOL) == p and r.get("init") == "pretrained"
                                          for r in rows)]
    if len(pools) < 2 and not (pools and pools[0] != common.POOL):
        return ""
    head = "| dataset (split) | family | seeds | random init | " + " | ".join(f"pretrained, pool {p}" for p in pools) + \
        " | " + " | ".join(f"pool {p} - random" for p in pools) + \
        "".join(f" | pool {p} - pool {pools[0]}" for p in pools[1:]) + " |"
    lines = [head, "|" + "---|" * (4 + 2 * len(pools) + len(pools) - 1)]
    for dataset, split in sorted({(r["dataset"], r["split"]) for r in rows}):
        for family in FAMILIES:
            def sel(init, pool=None):
                return [float(r["f1_macro"]) for r in rows if r["dataset"] == dataset and r["split"] == split and
                        r.get("family") == family and r.get("init") == init and
                        (pool is None or r.get("pool", common.POOL) == pool) and
                        r.get("gene_selection", common.GENE_SELECTION) == common.GENE_SELECTION]
            rnd, pre = sel("random"), [sel("pretrained", p) for p in pools]
            if not all(pre):
                continue
            means = [np.mean(v) for v in pre]
            rmean = np.mean(rnd) if rnd else float("nan")
            lines.append(f"| {dataset} ({split}) | {NAMES[family]} | {max(len(v) for v in pre)} | "
                         f"{common.mean_sd(rnd) if rnd else '-'} | " + " | ".join(common.mean_sd(v) for v in pre) +
                         " | " + " | ".join(f"{m - rmean:+.3f}" for m in means) +
                         "".join(f" | {m - means[0]:+.3f}" for m in means[1:]) + " |")
    return "\n".join(lines)


def finetune_job(family: str, dataset: str, split: str, pretrained: str, init: str, seed: int,
                 gene_selection: str = common.GENE_SELECTION, finetune_lr: float | None = None,
                 warmup_steps: float = 0.0, pool: str = common.POOL) -> dict:
    """Fine-tune (from ``pretrained`` or a random init of its architecture) on the training cells; score the test."""
    import warnings

    from hf_scfm.quickstart import FINETUNE_OPTIONS, RECIPES, finetune_classifier
    from hf_scfm.tasks.annotation import METRICS_KEY, annotate
    from hf_scfm.tasks.inference import load_model_and_tokenizer

    recipe = RECIPES[family]
    _, train, test = common.load_split(dataset, split)
    work = Path(tempfile.mkdtemp(prefix="hf-scfm-annot-"))
    try:
        start = Path(pretrained)
        if init == "random":
            start = common.random_init_checkpoint(start, work / "random", family, seed)
        train.write_h5ad(work / "train.h5ad")
        finetune_classifier(start, work / "train.h5ad", work / "classifier", steps=recipe["finetune_steps"],
                            batch_size=recipe["batch_size"], learning_rate=finetune_lr or recipe["finetune_lr"],
                            seed=seed, max_length=recipe["max_length"], options=FINETUNE_OPTIONS.get(family, {}),
                            training_options={"warmup_steps": warmup_steps} if warmup_steps else None)
        loaded = load_model_and_tokenizer(work / "classifier", kind="classifier")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            annotated = annotate(loaded, test, label_key=common.LABEL_KEY, progress=False, copy=True)
        m = annotated.uns[METRICS_KEY]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pool = pool if init == "pretrained" else common.POOL  # a random init does not depend on the corpus
    return {"dataset": dataset, "split": split, "method": tagged(f"{NAMES[family]} {init}", gene_selection, pool),
            "family": family, "init": init, "seed": seed, "gene_selection": gene_selection, "pool": pool,
            "finetune_lr": finetune_lr or recipe["finetune_lr"], "warmup_steps": warmup_steps, **_metrics(m)}


def aggregate(rows: list[dict], datasets) -> str:
    """Per dataset and method: mean +- sd over splits of the per-split seed means; the mean seed sd."""
    import numpy as np

    lines = ["| dataset | method | splits x seeds | accuracy | macro-F1 | macro-F1 seed sd |", "|---|---|---|---|---|---|"]
    order = tagged_order()
    for dataset in datasets:
        for method in order:
            sel = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
            if not sel:
                continue
            splits = sorted({r["split"] for r in sel})
            per = {s: [r for r in sel if r["split"] == s] for s in splits}
            acc = [np.mean([float(r["accuracy"]) for r in v]) for v in per.values()]
            f1 = [np.mean([float(r["f1_macro"]) for r in v]) for v in per.values()]
            seed_sd = [np.std([float(r["f1_macro"]) for r in v], ddof=1) for v in per.values() if len(v) > 1]
            n_seeds = max(len(v) for v in per.values())
            bold = "**" if method == LR_SAME or method.endswith("'s genes") else ""  # the default selection's
            lines.append(f"| {dataset} | {bold}{method}{bold} | {len(splits)} x {n_seeds} | {common.mean_sd(acc)} | "
                         f"{common.mean_sd(f1)} | {np.mean(seed_sd):.3f} |" if seed_sd else
                         f"| {dataset} | {bold}{method}{bold} | {len(splits)} x {n_seeds} | {common.mean_sd(acc)} | "
                         f"{common.mean_sd(f1)} | - |")
    return "\n".join(lines)


def selection_table(rows: list[dict]) -> str:
    """Per split and method, the gene selections side by side (mean +- sd over seeds) and the difference of the
    mean macro-F1 (the recipes' flavour - the earlier one); empty unless rows of several selections are present."""
    import numpy as np

    present = [g for g in reversed(common.GENE_SELECTIONS) if any(r.get("gene_selection", common.GENE_SELECTION) == g
                                                        for r in rows)]
    if len(present) < 2:
        return ""
    head = "| dataset (split) | method | seeds | " + " | ".join(f"{g}: accuracy | {g}: macro-F1" for g in present) + \
        f" | macro-F1, {present[-1]} - {present[0]} |"
    lines = [head, "|" + "---|" * (3 + 2 * len(present) + 1)]
    for dataset, split in sorted({(r["dataset"], r["split"]) for r in rows}):
        for method in method_order():
            cells, means, n = [], [], 0
            for g in present:
                sel = [r for r in rows if r["dataset"] == dataset and r["split"] == split and
                       r["method"] == tagged(method, g)]
                if not sel:
                    break
                n = max(n, len(sel))
                cells += [common.mean_sd([r["accuracy"] for r in sel]), common.mean_sd([r["f1_macro"] for r in sel])]
                means.append(np.mean([float(r["f1_macro"]) for r in sel]))
            if len(means) == len(present):
                lines.append(f"| {dataset} ({split}) | {method} | {n} | " + " | ".join(cells) +
                             f" | {means[-1] - means[0]:+.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], datasets, png: Path) -> None:
    """Macro-F1 per dataset and method: mean over splits of the seed means, bars +- sd over splits."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in tagged_order() if any(r["method"] == m for r in rows)]
    colours = {LR_SAME: "0.2", LR_ALL: "0.5", PCA_LR: "0.75", **{own_genes(f): "0.35" for f in FAMILIES}}
    for k, family in enumerate(FAMILIES):
        colours[f"{NAMES[family]} pretrained"] = f"C{k}"
        colours[f"{NAMES[family]} random"] = matplotlib.colors.to_rgba(f"C{k}", 0.4)
    fig, ax = plt.subplots(figsize=(2.2 + 2.6 * len(datasets), 3.6), dpi=100)
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        means, sds = [], []
        for dataset in datasets:
            sel = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
            per = [np.mean([float(r["f1_macro"]) for r in sel if r["split"] == s]) for s in sorted({r["split"] for r in sel})]
            means.append(np.mean(per) if per else np.nan)
            sds.append(np.std(per, ddof=1) if len(per) > 1 else 0.0)
        ax.bar(np.arange(len(datasets)) + (j - (len(methods) - 1) / 2) * width, means, width, yerr=sds, capsize=2,
               color=colours[untagged(method)], hatch="//" if method != untagged(method) else None, label=method)
    ax.set_xticks(np.arange(len(datasets)), datasets)
    ax.set_ylabel("macro-F1 (held-out donors / folds)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def targets(rows: list[dict], datasets) -> str:
    """The issue's annotation targets, met or not, with the figures."""
    import numpy as np

    def f1(dataset, method):
        sel = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
        splits = sorted({r["split"] for r in sel})
        return float(np.mean([np.mean([float(r["f1_macro"]) for r in sel if r["split"] == s]) for s in splits])) \
            if sel else float("nan")

    def split_f1(dataset, split, method):
        sel = [float(r["f1_macro"]) for r in rows if r["dataset"] == dataset and r["split"] == split and
               r["method"] == method]
        return float(np.mean(sel)) if sel else float("nan")

    out = []
    for family in FAMILIES:
        pre, rnd = f"{NAMES[family]} pretrained", f"{NAMES[family]} random"
        deltas = [split_f1(r["dataset"], r["split"], pre) - split_f1(r["dataset"], r["split"], rnd)
                  for r in {(r["dataset"], r["split"]): r for r in rows if r["method"] == pre}.values()]
        deltas = [d for d in deltas if d == d]
        if deltas:
            mean = float(np.mean(deltas))
            out.append(f"- {NAMES[family]}: pretrained - random init = {mean:+.3f} macro-F1 (mean over {len(deltas)} "
                       f"held-out splits; {sum(d > 0 for d in deltas)} of them positive; target >= +0.03: "
                       f"{'met' if mean >= 0.03 else 'not met'})")
    for dataset in datasets:
        for family in FAMILIES:  # the headline: each model against a linear model reading the very same genes
            model = f1(dataset, f"{NAMES[family]} pretrained")
            ref = own_genes(family) if any(r["method"] == own_genes(family) for r in rows) else LR_SAME
            lr = f1(dataset, ref)
            if model == model and lr == lr:
                out.append(f"- {dataset}: {NAMES[family]} pretrained {model:.3f} vs {ref} {lr:.3f} ({model - lr:+.3f})")
        scored = [(f1(dataset, f"{NAMES[f]} pretrained"), NAMES[f]) for f in FAMILIES]
        best = max([b for b in scored if b[0] == b[0]], default=(float("nan"), "-"))
        for ref in (LR_SAME, LR_ALL):
            lr = f1(dataset, ref)
            if best[0] == best[0] and lr == lr:
                out.append(f"- {dataset}: best family ({best[1]}, pretrained) {best[0]:.3f} vs {ref} {lr:.3f} "
                           f"({best[0] - lr:+.3f}: {'met' if best[0] >= lr else 'not met'})")
    mouse = f1("baron_mouse", "Mouse-GeneMamba pretrained")
    if mouse == mouse:
        out.append(f"- Mouse-GeneMamba on Baron mouse: {mouse:.3f} macro-F1 (target >= 0.7: "
                   f"{'met' if mouse >= 0.7 else 'not met'})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--splits", default="test", choices=("test", "validation"))
    parser.add_argument("--max-splits", type=int, default=None, help="only the first N splits of each dataset")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per split and init")
    parser.add_argument("--workers", type=int, default=2, help="processes (one thread each); 0 = this process")
    parser.add_argument("--no-random-init", action="store_true", help="skip the random-init arm")
    parser.add_argument("--gene-selection", nargs="+", default=[common.GENE_SELECTION], choices=common.GENE_SELECTIONS,
                        help="flavour(s) ranking the recipes' variable genes: each one runs every arm (default: "
                             "pearson_residuals, the recipes'; seurat: the earlier recipe's dispersion genes)")
    parser.add_argument("--pool", nargs="+", default=[common.POOL], choices=common.POOLS,
                        help="pretraining corpus: the split's training cells (none), plus every cell of the other "
                             "species' bundled data through the 1:1 ortholog table (orthologs), plus the other "
                             "bundled data of the same species too (all); each one pretrains its own run, compared "
                             "side by side (the random-init arm is run once: it does not depend on the corpus)")
    parser.add_argument("--no-pretrained", action="store_true", help="skip the pretrained arm")
    parser.add_argument("--finetune-lr", type=float, default=None, help="fine-tuning lr (default: the recipe's)")
    parser.add_argument("--warmup-steps", type=float, default=0.0,
                        help="fine-tuning warm-up: steps, or a fraction of them if < 1 (default 0: the recipe's)")
    parser.add_argument("--force-pretrain", action="store_true", help="pretrain again even if a matching run exists")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--aggregate", metavar="CSV", default=None, help="only rebuild the tables from a CSV")
    args = parser.parse_args(argv)
    out = common.RESULTS
    if args.aggregate:
        rows = list(csv.DictReader(open(args.aggregate, newline="")))
        datasets = [d for d in DATASETS if any(r["dataset"] == d for r in rows)]
        print(aggregate(rows, datasets) + "\n\n" + targets(rows, datasets) + "\n\n" + selection_table(rows) +
              "\n\n" + pool_table(rows))
        plot(rows, datasets, Path(args.aggregate).with_suffix(".png"))
        return 0

    if args.splits == "validation":
        splits = {d: [common.VALIDATION[d]] for d in args.datasets if d in common.VALIDATION}
    else:
        splits = {d: common.TEST_SPLITS[d][: args.max_splits] for d in args.datasets}
    started, cpu = time.time(), 0.0
    rows: list[dict] = []
    csv_path, md_path = out / f"annotation{args.tag}.csv", out / f"annotation{args.tag}.md"

    selections = list(dict.fromkeys(args.gene_selection))
    pools = list(dict.fromkeys(args.pool))
    pre_jobs = [(pretrain_job, {"family": f, "dataset": d, "split": s, "force": args.force_pretrain,
                                "gene_selection": g, "pool": p}) for d in splits for s in splits[d] for g in selections
                for p in pools for f in args.families]
    pretrained, objectives = {}, []
    for i, result, cpu_s, wall in common.run_jobs(pre_jobs, args.workers):
        kw = pre_jobs[i][1]
        pretrained[kw["family"], kw["dataset"], kw["split"], kw["gene_selection"], kw["pool"]] = result["pretrained"]
        cpu += cpu_s
        line = objective_line(kw["family"], kw["dataset"], kw["split"], kw["pool"], result)
        if kw["gene_selection"] == common.GENE_SELECTION:
            objectives.append(line)
        print(f"[{time.time() - started:6.0f} s] pretrained {kw['family']} on {kw['dataset']} {kw['split']} "
              f"({kw['gene_selection']} genes, pool {kw['pool']}: {line['corpus']} cells; held-out objective "
              f"{line['figure']}; {'reused' if result['reused'] else f'{cpu_s:.0f} CPU-s'})", flush=True)
    objectives.sort(key=lambda r: (r["dataset"], r["split"], r["family"], pools.index(r["pool"])))
    jobs = []
    for d in splits:
        for s in splits[d]:
            for g in selections:
                jobs.append((baselines_job, {"dataset": d, "split": s, "gene_selection": g,
                                             "pretrained": {f: pretrained[f, d, s, g, pools[0]]
                                                            for f in args.families}}))
                for f in args.families:
                    arms = ([] if args.no_pretrained else [("pretrained", p) for p in pools]) + \
                        ([] if args.no_random_init else [("random", pools[0])])  # same config and tokenizer
                    for init, p in arms:
                        for seed in range(args.seeds):
                            jobs.append((finetune_job, {"family": f, "dataset": d, "split": s, "gene_selection": g,
                                                        "pretrained": pretrained[f, d, s, g, p], "init": init,
                                                        "seed": seed, "finetune_lr": args.finetune_lr,
                                                        "warmup_steps": args.warmup_steps, "pool": p}))
    for i, result, cpu_s, wall in common.run_jobs(jobs, args.workers):
        cpu += cpu_s
        for row in (result if isinstance(result, list) else [result]):
            row["cpu_s"] = round(cpu_s / (len(result) if isinstance(result, list) else 1), 1)
            rows.append(row)
            print(f"[{time.time() - started:6.0f} s] {row['dataset']} {row['split']} {row['method']} seed "
                  f"{row['seed']}: accuracy {row['accuracy']:.3f} macro-F1 {row['f1_macro']:.3f} ({cpu_s:.0f} CPU-s)",
                  flush=True)
        common.write_csv(csv_path, rows)
    table = aggregate(rows, list(splits))
    summary = targets(rows, list(splits))
    by_selection = selection_table(rows)
    summary += f"\n\nGene selection alone (one pretraining run per flavour, seeds as above):\n\n{by_selection}" \
        if by_selection else ""
    by_pool = pool_table(rows)
    summary += f"\n\nPooled pretraining corpus, fine-tuned macro-F1 (seeds as above):\n\n{by_pool}" if by_pool else ""
    summary += f"\n\nHeld-out pretraining objective of each run:\n\n{objective_table(objectives)}"
    plot(rows, list(splits), out / f"annotation{args.tag}.png")
    settings = common.provenance("annotation.py", argv, started, cpu, args.workers,
                                 f"{args.seeds} fine-tuning seed(s) per split and init; ")
    md_path.write_text(f"# Cell-type annotation benchmark\n\n{settings}\n\n{table}\n\n{summary}\n")
    print(f"\n{table}\n\n{summary}\n\n{settings}\nWrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
