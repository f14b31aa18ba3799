"""The main job, ``hf-scfm quickstart``: from bundled raw counts to an annotated AnnData, on CPU, in minutes.

``quickstart(QuickstartArguments())`` (``hf-scfm quickstart``; the default family is CellFM) runs every stage of
the package once, on real bundled data:

1. load a bundled dataset (default: the family's species: ``baron_human`` for SC-MAMBA2 / CellFM,
   ``baron_mouse`` for Mouse-GeneMamba) and split it by donor: the training donors are the reference, the
   held-out donor is the query (``pbmc68k`` has one donor: a stratified 20 % of its cells is held out);
2. build a tokenizer over the dataset's genes in the family's encoding (rank medians fitted on the training
   cells) and a Parquet corpus of the training cells (:func:`hf_scfm.data.build_corpus`);
3. pretrain a tiny model of the family on it (:func:`hf_scfm.training.pretrain.pretrain`, unsupervised: no label
   is read), writing ``loss_curve.png`` and a model card;
4. fine-tune it for cell-type annotation on the training donors (:func:`hf_scfm.training.finetune.finetune`);
5. annotate the held-out donor (:func:`hf_scfm.tasks.annotation.annotate`) and score it, next to logistic
   regression on log-normalised counts of the same split, on the genes the model reads and on all genes
   (:func:`hf_scfm.tasks.baseline.logistic_regression_baseline`);
6. write the annotated h5ad, the plots, the model cards and ``metrics.json`` into the output folder and print
   where everything is.

Choices, and why:

* **The held-out donor** is ``human4`` for Baron human (every type of it occurs in the other three donors; it
  is the donor of the published 0.94 / 0.79 LR reference) and ``mouse1`` for Baron mouse (training on the
  larger donor ``mouse2``, which has all 12 types). Labels that occur only in the query would be reported as
  unseen and not scored.
* **The genes read are the 1,000 most variable genes of the training donors, and they are the vocabulary**
  (:data:`RECIPES`; :meth:`~hf_scfm.tokenization.GeneTokenizer.select_highly_variable_genes`: scanpy's Pearson
  residuals on the raw counts, per donor). The subset is saved with the tokenizer, so pretraining, fine-tuning
  and the query read the same genes. Why these genes: the sentences of SC-MAMBA2 and CellFM hold a seeded random
  sample of a cell's expressed genes when it has more than ``max_length``, and over all ~20k genes 126 random
  expressed genes rarely include the markers (SC-MAMBA2 predicted mostly the majority types, 0.36 / 0.09 on
  human4). The dispersion flavour (``seurat``) used before dropped INS, GCG and SST, the markers of B, A and D
  cells; Pearson residuals keep them (logistic regression on the 1,000 genes: 0.954 / 0.898 on human4, against
  0.951 / 0.895 with ``seurat`` genes and 0.944 / 0.793 on all genes). Why a vocabulary of only those genes: a
  tiny model then has an embedding of 1,006 rows instead of ~18k, every row of which is trained, and
  Mouse-GeneMamba's next-gene softmax is 18x smaller (its pretraining step 2.3x faster on CPU).
* **The recipes** (:data:`RECIPES`, chosen on the validation donor human2, never on a test donor; README,
  "Pretraining"): 1,000 pretraining steps at peak lr 2e-3 (5% warm-up, cosine decay, dynamic masking), where
  every family's held-out objective beats its trivial predictor; SC-MAMBA2 reads its genes with zeros included
  (bin 0), as the SC-MAMBA2 paper's fine-tuning and whole-transcriptome pretraining do: over expressed genes
  only, per-cell quantile bins are close to unpredictable (even each gene's mean bin *within the cell's type*
  explains 11% of the per-gene-mean error), so masked-expression pretraining had nothing to learn.
* **SC-MAMBA2 pools the mean** of its last hidden states for the classifier (``--pooling mean``), not ``<cls>``:
  masked-expression pretraining never reads ``<cls>``, so its state after pretraining carries little of the
  cell (0.90 / 0.71 with the mean against 0.88 / 0.58 with ``<cls>``, same run otherwise).
* **Class-balanced cross-entropy** (``--class-weight balanced``): the training donors hold 3 T cells and 495 A
  cells; weighting each type by ``n / (K * n_type)`` lets the rare types count in the loss as they count in
  macro-F1 (SC-MAMBA2 on human4 0.92 / 0.75 with it, 0.92 / 0.74 without, one seed: within noise here, and
  what a user annotating rare types wants). Not for Mouse-GeneMamba: under the earlier recipe (a vocabulary of
  all ~18k genes, ``seurat`` genes, 150 pretraining steps) it made fine-tuning collapse to one or two types
  (human2: 0.20 / 0.03 with, 0.76 / 0.34 without; lr 1e-3 did not help); with :data:`RECIPES` it no longer
  collapses (human2, trained on human1 + human3: 0.92 / 0.64 with, 0.94 / 0.65 without, one seed) but does not
  help either, so it stays off.
* **Full fine-tuning** (``--no-lora``): a model pretrained for a minute has little to keep frozen; training all
  weights is what makes it competitive. The classifier is saved as a plain model (loads without peft).
* The stages call the package's own Python functions with the argument objects their commands parse
  (``pretrain(PretrainArguments(...))``, ``finetune(FinetuneArguments(...), FinetuneTrainingArguments(...))``), so
  the quickstart is exactly what a user would type.

:func:`prepare_split`, :func:`build_tokenizer`, :func:`pretrain_tiny` and :func:`finetune_classifier` are
reused by ``benchmarks/annotation.py``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .training.families import FAMILIES

__all__ = ["QuickstartArguments", "quickstart", "DEFAULT_MODEL", "DEFAULT_DATASET", "HELD_OUT_DONOR", "N_TOP_GENES",
           "FINETUNE_OPTIONS", "RECIPES", "prepare_split", "build_tokenizer", "pretrain_tiny", "finetune_classifier"]

#: The family the quickstart trains by default: the best annotator of ``benchmarks/annotation.py`` (README).
DEFAULT_MODEL = "cellfm"
#: Default bundled dataset per species of a family.
DEFAULT_DATASET = {"human": "baron_human", "mouse": "baron_mouse"}
#: The query donor of each bundled multi-donor dataset (see the module docstring).
HELD_OUT_DONOR = {"baron_human": "human4", "baron_mouse": "mouse1"}
#: Genes read per cell: the most variable genes of the training cells (see the module docstring).
N_TOP_GENES = 1000
#: :class:`~hf_scfm.training.finetune.FinetuneArguments` fields per family (see the module docstring).
FINETUNE_OPTIONS = {
    "scmamba2": {"class_weight": "balanced", "pooling": "mean"},
    "cellfm": {"class_weight": "balanced"},
    "mouse_genemamba": {},
}
LABEL_KEY = "cell_type"
#: Per family, the recipe the quickstart and ``benchmarks/`` use: genes read (most variable of the training cells,
#: which are also the vocabulary), tokens per cell, SC-MAMBA2's zero genes, batch, pretraining steps / peak lr,
#: fine-tuning steps / lr (chosen on the validation donor human2 of Baron human; see the module docstring).
RECIPES = {
    "scmamba2": dict(n_top_genes=128, max_length=129, include_zero_genes=True, batch_size=16, pretrain_steps=1000,
                     pretrain_lr=2e-3, finetune_steps=300, finetune_lr=3e-3),
    "cellfm": dict(n_top_genes=1000, max_length=512, include_zero_genes=False, batch_size=16, pretrain_steps=1000,
                   pretrain_lr=2e-3, finetune_steps=600, finetune_lr=3e-3),
    "mouse_genemamba": dict(n_top_genes=1000, max_length=128, include_zero_genes=False, batch_size=16,
                            pretrain_steps=1000, pretrain_lr=2e-3, finetune_steps=300, finetune_lr=3e-3),
}


def prepare_split(adata, dataset: str, *, test_fraction: float = 0.2, seed: int = 0):
    """``(train, test, description)``: the held-out donor of :data:`HELD_OUT_DONOR`, or a stratified random
    ``test_fraction`` of the cells for a dataset with one donor (or one not listed there)."""
    import numpy as np

    donor = HELD_OUT_DONOR.get(dataset)
    if donor is not None and "batch" in adata.obs and donor in set(adata.obs["batch"].astype(str)):
        is_test = (adata.obs["batch"].astype(str) == donor).to_numpy()
        others = sorted(set(adata.obs["batch"].astype(str)) - {donor})
        description = f"train on donor(s) {', '.join(others)}, test on held-out donor {donor}"
    else:
        rng = np.random.default_rng(seed)
        is_test = np.zeros(adata.n_obs, dtype=bool)
        for label in adata.obs[LABEL_KEY].astype(str).unique():
            rows = np.flatnonzero((adata.obs[LABEL_KEY].astype(str) == label).to_numpy())
            rng.shuffle(rows)
            is_test[rows[: int(round(test_fraction * len(rows)))]] = True
        description = f"train on {1 - test_fraction:.0%} of the cells, test on a stratified {test_fraction:.0%}"
    return adata[~is_test].copy(), adata[is_test].copy(), description


def build_tokenizer(adata, family, *, max_length: int, fit_on=None, n_top_genes: int | None = None,
                    batch_key: str | None = None, include_zero_genes: bool = False,
                    flavor: str = "pearson_residuals"):
    """A tokenizer of ``family``'s encoding over the genes of ``adata`` that map to the species' GENCODE IDs
    (uniquely: genes sharing an ID are dropped from the vocabulary list, their counts are still summed by the
    tokenizer); rank medians are fitted on ``fit_on`` (default ``adata``).

    With ``n_top_genes`` it reads only the most variable genes of ``fit_on`` (per ``batch_key`` batch if given, see
    :meth:`~hf_scfm.tokenization.GeneTokenizer.select_highly_variable_genes`), and **the vocabulary is those
    genes**: a model built for it has an embedding (and, for Mouse-GeneMamba, a next-gene softmax) of
    ``n_top_genes + 6`` rows instead of ~15-18k, of which every row is trained; the subset is also selected, so a
    query with all its genes passes the match check. ``include_zero_genes`` (binned encoding) puts every selected
    gene in every sentence, zeros as bin 0 (SC-MAMBA2's whole-panel input). ``flavor``: how the variable genes are
    ranked (:meth:`~hf_scfm.tokenization.GeneTokenizer.select_highly_variable_genes`; ``"seurat"`` is the
    dispersion flavour of the earlier recipe, which ``benchmarks/annotation.py --gene-selection`` compares)."""
    from .tokenization import GeneTokenizer

    species = adata.uns.get("species", family.species)
    full = GeneTokenizer.from_species(species, encoding=family.encoding)
    report = full.mapping_report(adata)
    genes = [g for g in adata.var_names if g not in report.unmatched and g not in report.duplicates]
    if not genes:
        raise ValueError(f"None of the dataset's genes map to the {species} vocabulary: {report.summary()}")
    fit_on = fit_on if fit_on is not None else adata
    settings = dict(model_max_length=max_length, include_zero_genes=include_zero_genes)
    tokenizer = GeneTokenizer.from_species(species, encoding=family.encoding, genes=genes, **settings)
    if n_top_genes:
        selected = tokenizer.select_highly_variable_genes(fit_on, n_top_genes, batch_key=batch_key, flavor=flavor)
        tokenizer = GeneTokenizer.from_species(species, encoding=family.encoding, genes=selected, **settings)
        tokenizer.select_genes(selected)
    if family.encoding == "rank":
        tokenizer.fit_medians(fit_on)
    return tokenizer


def pretrain_tiny(family_name: str, train, tokenizer, work: Path, *, steps: int, batch_size: int = 16,
                  max_length: int, learning_rate: float = 2e-3, seed: int = 0, progress: bool = True) -> dict:
    """Corpus of ``train`` (``work/corpus``) and a ``tiny`` model pretrained on it (``work/pretrained``)."""
    from .data import build_corpus
    from .training.pretrain import PretrainArguments, pretrain

    corpus = work / "corpus"
    build_corpus(train, tokenizer, corpus, max_length=max_length, shard_size=max(train.n_obs, 1),
                 obs_columns=[LABEL_KEY], progress=False, overwrite=True)
    return pretrain(PretrainArguments(
        model=family_name, preset="tiny", corpus=str(corpus), out=str(work / "pretrained"), max_steps=steps,
        batch_size=batch_size, learning_rate=learning_rate, eval_fraction=0.05, eval_steps=0, eval_batches=4,
        logging_steps=max(1, min(10, steps // 10)), save_steps=steps + 1, shuffle_buffer=2000, seed=seed,
        progress=progress))


def finetune_classifier(pretrained: Path, train_h5ad: Path, out: Path, *, steps: int, batch_size: int = 16,
                        learning_rate: float = 3e-3, lora: bool = False, seed: int = 0,
                        max_length: int | None = None, options: dict | None = None,
                        training_options: dict | None = None) -> dict:
    """Fine-tune ``pretrained`` on ``train_h5ad`` into ``out`` (full fine-tuning unless ``lora``, then merged);
    ``options``: more :class:`~hf_scfm.training.finetune.FinetuneArguments` fields (e.g. :data:`FINETUNE_OPTIONS`
    of the family); ``training_options``: more Trainer arguments (e.g. ``warmup_steps``)."""
    from .training.finetune import FinetuneArguments, FinetuneTrainingArguments, finetune

    args = FinetuneArguments(model=str(pretrained), train=str(train_h5ad), label_key=LABEL_KEY, lora=lora, merge=lora,
                             max_length=max_length, **(options or {}))
    training = FinetuneTrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch_size,
                                         learning_rate=learning_rate, seed=seed, **(training_options or {}))
    return finetune(args, training)


def _print_table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| method | accuracy | macro-F1 | macro precision | macro recall |", "|---|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | {m['accuracy']:.3f} | {m['f1_macro']:.3f} | {m['precision_macro']:.3f} | "
                     f"{m['recall_macro']:.3f} |")
    return "\n".join(lines)


@dataclass
class QuickstartArguments:
    """What ``hf-scfm quickstart`` takes (every field has a default: ``hf-scfm quickstart`` alone is the main job)."""

    model: str = field(default=DEFAULT_MODEL, metadata={
        "choices": sorted(FAMILIES),
        "help": f"model family (default {DEFAULT_MODEL}: the family that annotates best in the benchmark)"})
    out: str = field(default="quickstart_out", metadata={"help": "output folder (files of a previous run are "
                                                                 "overwritten)"})
    dataset: str | None = field(default=None, metadata={
        "help": "bundled dataset: baron_human, baron_mouse or pbmc68k (default: the family's species)"})
    max_length: int | None = field(default=None, metadata={"help": "tokens per cell, specials included (default: "
                                                                   "the family's recipe, quickstart.RECIPES)"})
    n_top_genes: int | None = field(default=-1, metadata={
        "help": "genes read per cell: the N most variable of the training cells (0 = all; default -1: the family's "
                "recipe, quickstart.RECIPES)"})
    pretrain_steps: int | None = field(default=None, metadata={"help": "pretraining steps (default: the recipe's)"})
    finetune_steps: int | None = field(default=None, metadata={"help": "fine-tuning steps (default: the recipe's)"})
    batch_size: int | None = field(default=None, metadata={"help": "cells per batch (pretraining and fine-tuning; "
                                                                   "default: the recipe's)"})
    max_cells: int | None = field(default=None, metadata={
        "help": "use at most this many cells (a random subsample; for tests and smoke runs)"})
    seed: int = field(default=0, metadata={"help": "seed of the split, subsample and training"})
    progress: bool = field(default=True, metadata={"help": "show progress bars (--no-progress: none)"})

    def __post_init__(self):
        if self.model not in FAMILIES:
            raise ValueError(f"--model {self.model!r} is not a model family ({', '.join(sorted(FAMILIES))}).")


def quickstart(args: QuickstartArguments) -> dict:
    """Run the main job (see the module docstring); return a summary dict (paths, metrics, seconds). The default
    budget takes ~3-5 min on 2 CPU cores."""
    import numpy as np

    from .data import load_example
    from .tasks.annotation import METRICS_KEY, annotate
    from .tasks.baseline import logistic_regression_baseline
    from .training.families import get_family

    started = time.time()
    model, seed, progress = args.model, args.seed, args.progress
    family = get_family(model)
    dataset = args.dataset or DEFAULT_DATASET[family.species]
    recipe = RECIPES[model]
    max_length = args.max_length or recipe["max_length"]
    pretrain_steps = args.pretrain_steps or recipe["pretrain_steps"]
    finetune_steps = args.finetune_steps or recipe["finetune_steps"]
    batch_size = args.batch_size or recipe["batch_size"]
    n_top_genes = recipe["n_top_genes"] if args.n_top_genes == -1 else args.n_top_genes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"

    adata = load_example(dataset)
    if args.max_cells is not None and args.max_cells < adata.n_obs:
        rng = np.random.default_rng(seed)
        adata = adata[np.sort(rng.choice(adata.n_obs, size=args.max_cells, replace=False))].copy()
    train, test, split = prepare_split(adata, dataset, seed=seed)
    print(f"[1/6] {dataset}: {adata.n_obs:,} cells x {adata.n_vars:,} genes ({adata.uns['species']}), "
          f"{adata.obs[LABEL_KEY].nunique()} cell types; {split}: {train.n_obs:,} train / {test.n_obs:,} query cells")

    t0 = time.time()
    batches = train.obs["batch"].astype(str).nunique() if "batch" in train.obs else 1
    tokenizer = build_tokenizer(adata, family, max_length=max_length, fit_on=train, n_top_genes=n_top_genes,
                                batch_key="batch" if batches > 1 else None,
                                include_zero_genes=recipe["include_zero_genes"])
    genes_read = f"reads the {len(tokenizer.gene_subset):,} most variable genes" if tokenizer.gene_subset else \
        "reads all genes"
    print(f"[2/6] tokenizer: {family.encoding} encoding, {len(tokenizer):,} tokens, {genes_read}, max_length "
          f"{max_length}")
    summary = pretrain_tiny(model, train, tokenizer, work, steps=pretrain_steps, batch_size=batch_size,
                            max_length=max_length, learning_rate=recipe["pretrain_lr"], seed=seed,
                            progress=progress)
    loss_png = out / "pretrain_loss_curve.png"
    if summary.get("loss_curve"):
        shutil.copyfile(summary["loss_curve"], loss_png)
    print(f"[3/6] pretrained a tiny {model} for {pretrain_steps} steps on {train.n_obs:,} cells in "
          f"{time.time() - t0:.0f} s (final loss {summary['final_loss']:.4f})")

    t0 = time.time()
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train_h5ad, query_h5ad = data_dir / "train.h5ad", data_dir / "query.h5ad"
    train.write_h5ad(train_h5ad)
    test.write_h5ad(query_h5ad)
    classifier = out / "classifier"
    from .training.finetune import quiet_load_report

    with quiet_load_report():  # the load report (new head, dropped pretraining head) is expected here
        finetune_classifier(work / "pretrained", train_h5ad, classifier, steps=finetune_steps,
                            batch_size=batch_size, learning_rate=recipe["finetune_lr"], seed=seed,
                            max_length=max_length, options=FINETUNE_OPTIONS.get(model, {}))
    print(f"[4/6] fine-tuned for annotation ({finetune_steps} steps, all weights) in {time.time() - t0:.0f} s")

    t0 = time.time()
    confusion = out / "confusion_matrix.png"
    annotated = annotate(classifier, query_h5ad, label_key=LABEL_KEY, out_png=confusion, progress=progress)
    annotated_path = out / f"{dataset}_query_annotated.h5ad"
    annotated.write_h5ad(annotated_path)
    metrics = dict(annotated.uns[METRICS_KEY])
    print(f"[5/6] annotated {annotated.n_obs:,} query cells in {time.time() - t0:.0f} s")

    t0 = time.time()
    baseline = logistic_regression_baseline(train, test, LABEL_KEY, seed=seed, warn=False)
    same_genes = None
    if tokenizer.gene_subset:  # the fair comparison: a linear model reading exactly the genes the model reads
        unmatched = tokenizer.mapping_report(train).unmatched
        read = [g for g in train.var_names if g not in unmatched]
        same_genes = logistic_regression_baseline(train, test, LABEL_KEY, seed=seed, warn=False, genes=read)
    print(f"[6/6] logistic-regression baselines fitted in {time.time() - t0:.0f} s")

    card = out / "model_card.md"
    shutil.copyfile(classifier / "README.md", card)
    rows = [(f"{model} (tiny, pretrained + fine-tuned)", metrics)]
    if same_genes is not None:
        rows.append((f"logistic regression, the model's {len(tokenizer.gene_subset):,} genes", same_genes["metrics"]))
    rows.append(("logistic regression (log-normalised counts)", baseline["metrics"]))
    table = _print_table(rows)
    result = {
        "model": model, "dataset": dataset, "split": split, "n_train": int(train.n_obs), "n_query": int(test.n_obs),
        "max_length": max_length, "n_top_genes": len(tokenizer.gene_subset or []) or None,
        "finetune_options": dict(FINETUNE_OPTIONS.get(model, {})), "pretrain_steps": pretrain_steps,
        "finetune_steps": finetune_steps,
        "metrics": {k: v for k, v in metrics.items()},
        "baseline_metrics": {k: v for k, v in baseline["metrics"].items()},
        "baseline_same_genes_metrics": dict(same_genes["metrics"]) if same_genes is not None else None,
        "paths": {"annotated": str(annotated_path), "confusion_matrix": str(confusion),
                  "loss_curve": str(loss_png) if loss_png.exists() else None, "model_card": str(card),
                  "classifier": str(classifier), "pretrained": str(work / "pretrained")},
        "seconds": round(time.time() - started, 1),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    print(f"\nHeld-out cells ({split}; {metrics['n_scored']} scored"
          + (f", {metrics['n_excluded']} with labels unseen in training not scored" if metrics["n_excluded"] else "")
          + "):\n" + table)
    print(f"\nDone in {result['seconds']:.0f} s. Outputs in {out}/:")
    for name, path in [("annotated query", annotated_path), ("confusion matrix", confusion),
                       ("pretraining loss curve", result["paths"]["loss_curve"]), ("model card", card),
                       ("fine-tuned classifier", classifier), ("metrics", out / "metrics.json")]:
        if path:
            print(f"  {name:<24} {path}")
    print(f"Annotate your own h5ad of raw counts: hf-scfm annotate --model {classifier} --query YOUR.h5ad "
          "--out YOUR_annotated.h5ad")
    return result


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
