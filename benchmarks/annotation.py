"""Cell-type annotation benchmark: every family against logistic regression, on held-out donors / folds.

    python benchmarks/annotation.py                       # all families x datasets (~60 min on 2 CPU cores)
    python benchmarks/annotation.py --families scmamba2 --datasets pbmc68k --pretrain-steps 10 --finetune-steps 20

Splits (the same for every method):

* ``baron_human``: train on three donors, test on the fourth, all four rotations;
* ``baron_mouse``: train on one donor, test on the other, both directions;
* ``pbmc68k``: 5-fold stratified cross-validation (one donor).

Per dataset and family, a tokenizer over the dataset's genes (rank medians of all its cells) reading its
``--n-top-genes`` most variable genes, and a ``tiny`` model pretrained **once on all cells of the dataset**:
pretraining is unsupervised (no label is read), but the test cells of every split are in that corpus
(transductive, as a user pretraining on their own atlas would be; pretraining per split without the test donor
would cost 11 pretraining runs per family instead of 3, which this CPU budget spends on fine-tuning instead).
Per split: full fine-tuning (``hf-scfm finetune --no-lora``) on the training cells only, with the main job's
choices (:data:`hf_scfm.quickstart.FINETUNE_OPTIONS`) and the genes re-selected on the training cells
(``--n-top-genes``, per donor with ``--hvg-batch-key batch`` when there are several), then
:func:`hf_scfm.tasks.annotation.annotate` on the test cells (read through the same genes). Logistic regression
(:func:`hf_scfm.tasks.baseline.logistic_regression_baseline`: L2, C=1, on log1p(CP10k) of all shared genes) is
fit on the same training cells. Test cells whose label does not occur in training are excluded from every
method's metrics (they are listed in the CSV).

Mouse-GeneMamba is run on the human datasets too: the pretraining loop and the tokenizer only require the
``rank`` encoding, not a species, so a human rank tokenizer (GENCODE human IDs, medians of the dataset's cells)
gives a Mouse-GeneMamba-architecture model of human cells.

Writes ``benchmarks/results/annotation.csv`` (one row per split x method, appended as the run goes, so a partial
run keeps its rows) and ``annotation.md`` (accuracy and macro-F1 mean +- sd over splits), and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path


RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = ("scmamba2", "cellfm", "mouse_genemamba")
DATASETS = ("baron_human", "baron_mouse", "pbmc68k")
LR_NAME = "logistic regression"
#: Tokens per cell and fine-tuning steps per family (specials included): CellFM's linear retention is ~5x cheaper
#: per token on CPU than the two Mamba scans here, so within about the same time per split it reads 4x more genes
#: per cell and trains 2x longer (baron_human: 0.98 / 0.98 on human1 at 512 tokens and 600 steps, 0.96 / 0.94 at
#: 256 and 300).
MAX_LENGTH = {"cellfm": 512, "scmamba2": 128, "mouse_genemamba": 128}
FINETUNE_STEPS = {"cellfm": 600, "scmamba2": 300, "mouse_genemamba": 300}

FIELDS = ["dataset", "split", "method", "accuracy", "f1_macro", "precision_macro", "recall_macro", "n_train",
          "n_test", "n_scored", "unseen_labels", "seconds"]


def splits(adata, dataset: str, n_folds: int = 5, seed: int = 0):
    """``[(name, train_mask, test_mask)]`` of a dataset (see the module docstring)."""
    import numpy as np

    batch = adata.obs["batch"].astype(str).to_numpy()
    donors = sorted(set(batch))
    if len(donors) > 1:
        return [(f"test {d}", batch != d, batch == d) for d in donors]
    from sklearn.model_selection import StratifiedKFold

    labels = adata.obs["cell_type"].astype(str).to_numpy()
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    out = []
    for k, (_, test) in enumerate(folds):
        mask = np.zeros(len(labels), dtype=bool)
        mask[test] = True
        out.append((f"fold {k + 1}/{n_folds}", ~mask, mask))
    return out


def pretrain_family(family_name: str, adata, work: Path, args) -> Path:
    """Tokenizer over ``adata``'s genes (rank medians of all its cells) and a tiny model pretrained on all its cells
    (unsupervised: labels are not read); returns the checkpoint folder."""
    from hf_scfm.quickstart import build_tokenizer, pretrain_tiny
    from hf_scfm.training.families import get_family

    max_length = args.max_length or MAX_LENGTH[family_name]
    tokenizer = build_tokenizer(adata, get_family(family_name), max_length=max_length, n_top_genes=args.n_top_genes)
    pretrain_tiny(family_name, adata, tokenizer, work, steps=args.pretrain_steps, batch_size=args.batch_size,
                  max_length=max_length, learning_rate=args.pretrain_lr, seed=args.seed, progress=False)
    return work / "pretrained"


def finetune_and_annotate(pretrained: Path, family_name: str, train, test, work: Path, args) -> dict:
    """Full (or LoRA) fine-tuning on ``train``, then :func:`annotate` of ``test``; returns the metrics."""
    from hf_scfm.quickstart import finetune_classifier
    from hf_scfm.tasks.annotation import METRICS_KEY, annotate
    from hf_scfm.tasks.inference import load_model_and_tokenizer

    train_h5ad = work / "train.h5ad"
    train.write_h5ad(train_h5ad)
    from hf_scfm.quickstart import FINETUNE_OPTIONS  # the main job's choices, benchmarked here

    options = dict(FINETUNE_OPTIONS.get(family_name, {}))
    if args.n_top_genes:  # re-selected on the training cells of the split (what a user's reference would give)
        options["n_top_genes"] = args.n_top_genes
        if train.obs["batch"].astype(str).nunique() > 1:
            options["hvg_batch_key"] = "batch"
    finetune_classifier(pretrained, train_h5ad, work / "classifier",
                        steps=args.finetune_steps or FINETUNE_STEPS[family_name],
                        batch_size=args.batch_size, learning_rate=args.finetune_lr, lora=args.lora, seed=args.seed,
                        options=options)
    loaded = load_model_and_tokenizer(work / "classifier", kind="classifier")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        annotated = annotate(loaded, test, label_key="cell_type", progress=False, copy=True)
    return dict(annotated.uns[METRICS_KEY])


def aggregate(rows: list[dict]) -> str:
    """Markdown: per dataset, one line per method with accuracy and macro-F1 mean +- sd over the splits."""
    import numpy as np

    lines = ["| dataset | method | splits | accuracy | macro-F1 |", "|---|---|---|---|---|"]
    seen = []
    for row in rows:
        key = (row["dataset"], row["method"])
        if key not in seen:
            seen.append(key)
    for dataset, method in seen:
        sel = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
        acc = np.array([float(r["accuracy"]) for r in sel])
        f1 = np.array([float(r["f1_macro"]) for r in sel])
        sd = (lambda x: x.std(ddof=1) if len(x) > 1 else 0.0)
        lines.append(f"| {dataset} | {method} | {len(sel)} | {acc.mean():.3f} ± {sd(acc):.3f} | "
                     f"{f1.mean():.3f} ± {sd(f1):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--max-splits", type=int, default=None, help="only the first N splits of each dataset")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per cell, specials included, for every family (default: MAX_LENGTH per family)")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--finetune-steps", type=int, default=None,
                        help="fine-tuning steps for every family (default: FINETUNE_STEPS per family)")
    parser.add_argument("--finetune-lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-top-genes", type=int, default=None,
                        help="genes read per cell: the N most variable (0 = all genes of the dataset; default: the "
                             "main job's N_TOP_GENES)")
    parser.add_argument("--lora", action="store_true", help="LoRA fine-tuning instead of full fine-tuning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=str(RESULTS), help="folder for annotation.csv / annotation.md")
    parser.add_argument("--tag", default="", help="suffix of the output file names (annotation<tag>.csv)")
    parser.add_argument("--aggregate", metavar="CSV", default=None,
                        help="only rebuild the Markdown table from a (possibly partial) annotation CSV")
    args = parser.parse_args(argv)
    if args.aggregate:
        with open(args.aggregate, newline="") as fh:
            table = aggregate(list(csv.DictReader(fh)))
        md = Path(args.aggregate).with_suffix(".md")
        md.write_text(f"# Cell-type annotation benchmark\n\n{table}\n")
        print(f"{table}\nWrote {md}")
        return 0

    import torch
    from transformers.utils import logging as hf_logging

    from hf_scfm.data import load_example
    from hf_scfm.quickstart import FINETUNE_OPTIONS, N_TOP_GENES
    from hf_scfm.tasks.baseline import logistic_regression_baseline

    if args.n_top_genes is None:
        args.n_top_genes = N_TOP_GENES
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"annotation{args.tag}.csv", out / f"annotation{args.tag}.md"
    rows: list[dict] = []
    with open(csv_path, "w", newline="") as fh:
        csv.DictWriter(fh, FIELDS).writeheader()

    def record(dataset, split, method, metrics, n_train, n_test, seconds):
        row = {"dataset": dataset, "split": split, "method": method, "n_train": n_train, "n_test": n_test,
               "seconds": round(seconds, 1), "n_scored": metrics["n_scored"],
               "unseen_labels": ";".join(f"{k}:{v}" for k, v in metrics["unseen_labels"].items()),
               **{k: round(metrics[k], 4) for k in ("accuracy", "f1_macro", "precision_macro", "recall_macro")}}
        rows.append(row)
        with open(csv_path, "a", newline="") as fh:
            csv.DictWriter(fh, FIELDS).writerow(row)
        print(f"  {method:<20} accuracy {row['accuracy']:.3f}  macro-F1 {row['f1_macro']:.3f}  "
              f"({seconds:.0f} s)", flush=True)

    started = time.time()
    root = Path(tempfile.mkdtemp(prefix="hf-scfm-bench-"))
    try:
        data, pretrained, todo = {}, {}, {}
        for dataset in args.datasets:
            data[dataset] = adata = load_example(dataset)
            todo[dataset] = splits(adata, dataset, seed=args.seed)[: args.max_splits]
            for family in args.families:
                t0 = time.time()
                pretrained[dataset, family] = pretrain_family(family, adata, root / dataset / family, args)
                print(f"[{time.time() - started:6.0f} s] {dataset}: pretrained {family} on all {adata.n_obs} cells "
                      f"({args.pretrain_steps} steps, {time.time() - t0:.0f} s)", flush=True)
        # round-robin over the datasets (split 1 of each, then split 2, ...): a run cut short still covers them all
        for index in range(max(len(v) for v in todo.values())):
            for dataset in args.datasets:
                if index >= len(todo[dataset]):
                    continue
                split, train_mask, test_mask = todo[dataset][index]
                adata = data[dataset]
                train, test = adata[train_mask].copy(), adata[test_mask].copy()
                print(f"[{time.time() - started:6.0f} s] {dataset} {split}: {train.n_obs} train / {test.n_obs} test",
                      flush=True)
                t0 = time.time()
                lr = logistic_regression_baseline(train, test, "cell_type", seed=args.seed, warn=False)
                record(dataset, split, LR_NAME, lr["metrics"], train.n_obs, test.n_obs, time.time() - t0)
                for family in args.families:
                    t0 = time.time()
                    work = root / dataset / family / "split"
                    work.mkdir(parents=True, exist_ok=True)
                    metrics = finetune_and_annotate(pretrained[dataset, family], family, train, test, work, args)
                    shutil.rmtree(work, ignore_errors=True)
                    name = f"{family}{' (LoRA)' if args.lora else ''}"
                    record(dataset, split, name, metrics, train.n_obs, test.n_obs, time.time() - t0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = aggregate(rows)
    lengths = args.max_length or ", ".join(f"{k} {v}" for k, v in MAX_LENGTH.items() if k in args.families)
    steps = args.finetune_steps or ", ".join(f"{k} {v}" for k, v in FINETUNE_STEPS.items() if k in args.families)
    options = "; ".join(f"{k}: {', '.join(f'{n}={x}' for n, x in v.items())}" for k, v in FINETUNE_OPTIONS.items()
                        if k in args.families and v)
    settings = (f"tiny presets, max_length {lengths}, genes read: "
                f"{args.n_top_genes or 'all'} most variable (per training donor), "
                f"{options or 'no family options'}, pretraining {args.pretrain_steps} "
                f"steps (lr {args.pretrain_lr}) once per dataset on all its cells, {'LoRA' if args.lora else 'full'} "
                f"fine-tuning {steps} steps (lr {args.finetune_lr}), batch {args.batch_size}, seed "
                f"{args.seed}, {args.threads} CPU thread(s); {time.time() - started:.0f} s in total")
    md_path.write_text(f"# Cell-type annotation benchmark\n\n`python benchmarks/annotation.py "
                       f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{settings}\n\n{table}\n")
    print(f"\n{table}\n\n{settings}\nWrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
