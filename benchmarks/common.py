"""What the pretraining, annotation and embedding benchmarks share: splits, the per-family recipe, pretraining runs
(cached on disk, so the three scripts train each model once), held-out objectives next to trivial predictors, a
two-process job pool that counts CPU time.

A *run* is one family pretrained on the training cells of one split, with the recipe of
:data:`hf_scfm.quickstart.RECIPES`; it lives in ``benchmarks/results/runs/<dataset>/<split>/<family>-<objective>/``
(``pretrained/``: the final model and tokenizer; ``curve.csv``: the held-out evaluation of every checkpoint;
``run.json``: the settings it was made with, compared before reuse). Held-out cells are never in the corpus.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path(os.environ.get("HF_SCFM_BENCH_RUNS", RESULTS / "runs"))  # another folder keeps other runs apart
LABEL_KEY = "cell_type"
#: The validation split the recipes were chosen on (never a headline test split; see the README).
VALIDATION = {"baron_human": "test human2"}
#: Test splits of each dataset (held-out donor, or a stratified fold of the one-donor pbmc68k).
TEST_SPLITS = {"baron_human": ["test human4", "test human1", "test human3"],
               "baron_mouse": ["test mouse1", "test mouse2"],
               "pbmc68k": ["fold 1/5", "fold 2/5", "fold 3/5"]}


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------


def split_masks(adata, dataset: str, n_folds: int = 5, seed: int = 0) -> dict:
    """``{name: (train_mask, test_mask)}``: one held-out donor per split, or stratified folds for one donor."""
    import numpy as np

    batch = adata.obs["batch"].astype(str).to_numpy()
    donors = sorted(set(batch))
    if len(donors) > 1:
        return {f"test {d}": (batch != d, batch == d) for d in donors}
    from sklearn.model_selection import StratifiedKFold

    labels = adata.obs[LABEL_KEY].astype(str).to_numpy()
    out = {}
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    for k, (_, test) in enumerate(folds):
        mask = np.zeros(len(labels), dtype=bool)
        mask[test] = True
        out[f"fold {k + 1}/{n_folds}"] = (~mask, mask)
    return out


def load_split(dataset: str, split: str):
    """``(adata, train, test)`` of a named split."""
    from hf_scfm.data import load_example

    adata = load_example(dataset)
    train_mask, test_mask = split_masks(adata, dataset)[split]
    return adata, adata[train_mask].copy(), adata[test_mask].copy()


def batch_key_of(train) -> str | None:
    return "batch" if train.obs["batch"].astype(str).nunique() > 1 else None


def slug(text: str) -> str:
    return text.replace(" ", "_").replace("/", "of")


# ---------------------------------------------------------------------------------------------------------------
# trivial predictors and held-out objectives
# ---------------------------------------------------------------------------------------------------------------


class Baselines:
    """Trivial predictors fitted on the training sentences (no model, no context beyond what each one names)."""

    def __init__(self, records, labels, vocab_size: int):
        import numpy as np

        ids = np.concatenate([np.asarray(r["input_ids"]) for r in records])
        values = np.concatenate([np.asarray(r["values"], dtype=np.float64) for r in records])
        cell = np.repeat(np.arange(len(records)), [len(r["input_ids"]) for r in records])
        gene = ids >= 6
        n = np.bincount(ids[gene], minlength=vocab_size)
        self.global_mean = float(values[gene].mean())
        self.gene_mean = np.where(n > 0, np.bincount(ids[gene], values[gene], vocab_size) / np.maximum(n, 1),
                                  self.global_mean)
        labels = np.asarray(labels).astype(str)
        self.type_mean = {}
        for label in np.unique(labels):
            sel = gene & (labels[cell] == label)
            k = np.bincount(ids[sel], minlength=vocab_size)
            self.type_mean[label] = np.where(k >= 3, np.bincount(ids[sel], values[sel], vocab_size) / np.maximum(k, 1),
                                             self.gene_mean)
        # next-token targets: every token after the first (genes and <eos>), add-half smoothing over the vocabulary
        targets = np.concatenate([np.asarray(r["input_ids"])[1:] for r in records])
        counts = np.bincount(targets, minlength=vocab_size).astype(np.float64) + 0.5
        counts[:6] = np.where(np.bincount(targets, minlength=vocab_size)[:6] > 0, counts[:6], 0.0)
        self.unigram = counts / counts.sum()
        # corpus rank order: genes by the median of their relative position in the training sentences
        rel = np.concatenate([np.arange(len(r["input_ids"])) / max(len(r["input_ids"]) - 1, 1) for r in records])
        order = np.full(vocab_size, np.inf)
        sort = np.lexsort((rel[gene], ids[gene]))
        gid, grel = ids[gene][sort], rel[gene][sort]
        starts = np.flatnonzero(np.r_[True, gid[1:] != gid[:-1]])
        stops = np.r_[starts[1:], len(gid)]
        for a, b in zip(starts, stops):
            order[gid[a]] = grel[(a + b - 1) // 2]
        self.rank_order = [int(t) for t in np.argsort(order, kind="stable") if np.isfinite(order[t])]


def held_out_batches(tokenizer, family, objective: str, test, max_length: int, batch_size: int = 64, seed: int = 1234):
    """Fixed evaluation batches of the held-out cells (the objective's collator, its own seed) and their labels."""
    records = cell_records(tokenizer, test, max_length)
    collator = family.make_collator(tokenizer, objective=objective, seed=seed)
    labels = test.obs[LABEL_KEY].astype(str).to_numpy()
    return [(collator(records[i:i + batch_size]), labels[i:i + batch_size]) for i in range(0, len(records), batch_size)]


def cell_records(tokenizer, adata, max_length: int) -> list[dict]:
    import numpy as np

    enc = tokenizer(adata, max_length=max_length, padding=False)
    return [{"input_ids": np.asarray(i, dtype=np.int64), "values": np.asarray(v, dtype=np.float32)}
            for i, v in zip(enc["input_ids"], enc["values"])]


def evaluate_objective(model, batches, base: Baselines, kind: str) -> dict:
    """Held-out objective of ``model`` next to the trivial predictors, on the same positions.

    ``kind``: ``"masked_value"`` (MSE of the masked values: model, per-gene mean, global mean, and the per cell
    type gene mean, an oracle that reads the labels), ``"next_gene"`` (cross-entropy in nats and top-1 accuracy
    of the next token: model, unigram, unigram over the genes not yet in the sentence; top-1 of the corpus rank
    order) or ``"masked_gene"`` (cross-entropy / top-1 of masked gene ids: model, unigram, unigram over the genes
    not visible in the cell)."""
    import numpy as np
    import torch

    model.eval()
    sums: dict[str, float] = {}

    def add(key, value):
        sums[key] = sums.get(key, 0.0) + float(value)

    with torch.no_grad():
        for batch, labels in batches:
            out = model(**batch)
            if kind == "masked_value":
                keep = batch["labels"] != -100
                y = batch["labels"][keep].double().numpy()
                pred = out.predictions[keep].double().numpy()
                ids = batch["input_ids"][keep].numpy()
                rows = np.nonzero(keep.numpy())[0]
                typed = np.array([base.type_mean.get(labels[r], base.gene_mean)[i] for r, i in zip(rows, ids)])
                add("n", len(y))
                add("model", ((pred - y) ** 2).sum())
                add("gene_mean", ((base.gene_mean[ids] - y) ** 2).sum())
                add("global_mean", ((base.global_mean - y) ** 2).sum())
                add("cell_type_oracle", ((typed - y) ** 2).sum())
                continue
            logp = torch.log_softmax(out.logits.float(), -1)
            if kind == "next_gene":
                logp, y, context = logp[:, :-1], batch["labels"][:, 1:], batch["input_ids"]
            else:
                y, context = batch["labels"], batch["input_ids"]
            keep = y != -100
            yk = y.clamp(min=0)
            add("n", int(keep.sum()))
            add("model", -logp.gather(-1, yk.unsqueeze(-1)).squeeze(-1)[keep].sum().item())
            add("model_top1", (logp.argmax(-1) == y)[keep].sum().item())
            uni = base.unigram
            add("unigram", -np.log(uni[y[keep].numpy()]).sum())
            add("unigram_top1", (y[keep].numpy() == int(np.argmax(uni))).sum())
            ctx = context.numpy()
            for row in range(y.shape[0]):
                targets = y[row][keep[row]].numpy()
                if kind == "next_gene":  # before target t the sentence holds tokens 0..t (genes after <bos>)
                    seen = ctx[row, 1:len(targets) + 1]
                    seen_mass = np.concatenate([[0.0], np.cumsum(np.where(seen >= 6, uni[seen], 0.0))[:-1]])
                    add("unigram_unseen", (-np.log(uni[targets]) + np.log1p(-np.minimum(seen_mass, 1 - 1e-12))).sum())
                    pointer, hits, seen_set = 0, 0, set()
                    order = base.rank_order
                    for t, target in enumerate(targets):
                        while pointer < len(order) and order[pointer] in seen_set:
                            pointer += 1
                        guess = order[pointer] if pointer < len(order) else 3  # <eos> once the order is spent
                        hits += int(guess == target)
                        seen_set.add(int(ctx[row, t + 1]))
                    add("rank_order_top1", hits)
                else:  # masked genes: exclude the genes visible elsewhere in the cell
                    visible = ctx[row][(ctx[row] >= 6) & (y[row].numpy() == -100)]
                    mass = uni[np.unique(visible)].sum()
                    add("unigram_unseen", (-np.log(uni[targets]) + np.log1p(-min(mass, 1 - 1e-12))).sum())
    model.train()
    n = sums.pop("n")
    return {k: v / n for k, v in sums.items()}


OBJECTIVE_KIND = {"DataCollatorForMaskedExpression": "masked_value", "DataCollatorForMaskedRegression": "masked_value",
                  "DataCollatorForNextGene": "next_gene", "DataCollatorForGeneMLM": "masked_gene"}


# ---------------------------------------------------------------------------------------------------------------
# pretraining runs (cached)
# ---------------------------------------------------------------------------------------------------------------


#: How the recipes rank their variable genes; ``seurat`` (dispersion, per donor) is the earlier recipe's, kept for
#: the gene-selection comparison (``annotation.py --gene-selection``).
GENE_SELECTION = "pearson_residuals"
GENE_SELECTIONS = ("pearson_residuals", "seurat")


#: What else enters a run's pretraining corpus beside the split's training cells: ``none``; ``orthologs``: every
#: cell of the other species' Baron pancreas set, mapped to the dataset's genes through the one-to-one ortholog
#: table (:data:`ORTHOLOG_PARTS`); ``all``: every cell of every other bundled dataset, the other species' mapped
#: (e.g. Baron mouse and pbmc68k for Baron human). The tokenizer (its genes, medians) is still fitted on the split's
#: training cells only.
POOL = "none"
POOLS = ("none", "orthologs", "all")
SPECIES = {"baron_human": "human", "baron_mouse": "mouse", "pbmc68k": "human"}
ORTHOLOG_PARTS = {"baron_human": ["baron_mouse"], "baron_mouse": ["baron_human"], "pbmc68k": ["baron_mouse"]}


def pool_parts(dataset: str, pool: str) -> list[str]:
    """The other bundled datasets whose cells (all of them) join ``dataset``'s training cells under ``pool``."""
    if pool not in POOLS:
        raise ValueError(f"Unknown pool {pool!r}: choose one of {', '.join(POOLS)}.")
    if pool == "none":
        return []
    return list(ORTHOLOG_PARTS[dataset]) if pool == "orthologs" else [d for d in SPECIES if d != dataset]


def pretraining_cells(dataset: str, train, pool: str = POOL, genes=None):
    """The cells a run pretrains on: ``train`` (the split's training cells), plus, under ``pool``, every cell of
    :func:`pool_parts` (the other species' through the 1:1 ortholog table, :func:`hf_scfm.data.pool_cells`), over
    ``genes`` (the tokenizer's). The held-out cells of ``dataset`` are never added: only other datasets are."""
    from hf_scfm.data import load_example, pool_cells

    parts = pool_parts(dataset, pool)
    if not parts:
        return train
    return pool_cells({dataset: train, **{d: load_example(d) for d in parts}}, species=SPECIES[dataset], genes=genes)


def run_dir(dataset: str, split: str, family: str, objective: str, gene_selection: str = GENE_SELECTION,
            pool: str = POOL) -> Path:
    suffix = "" if gene_selection == GENE_SELECTION else f"-{gene_selection}"
    suffix += "" if pool == POOL else f"-pool_{pool}"
    return RUNS / dataset / slug(split) / f"{family}-{objective}{suffix}"


def run_settings(family_name: str, objective: str, dataset: str, split: str, steps: int, eval_every: int) -> dict:
    from hf_scfm.quickstart import RECIPES

    recipe = dict(RECIPES[family_name])
    return {"family": family_name, "objective": objective, "dataset": dataset, "split": split, "steps": steps,
            "eval_every": eval_every, "recipe": recipe}


def pretrain_run(family_name: str, dataset: str, split: str, *, objective: str | None = None, steps: int | None = None,
                 eval_every: int | None = None, seed: int = 0, force: bool = False,
                 gene_selection: str = GENE_SELECTION, pool: str = POOL) -> dict:
    """Pretrain ``family_name`` on the training cells of ``split`` (the quickstart recipe), evaluating every
    ``eval_every`` steps on the held-out cells; reuse the run on disk when its settings match. ``gene_selection``:
    the flavour that ranks the recipe's variable genes (everything else is the recipe's). ``pool``: other bundled
    cells added to the corpus (:data:`POOLS`, :func:`pretraining_cells`); the tokenizer and the trivial predictors
    are fitted on the split's training cells in every case, so pooled and unpooled runs are scored on the same
    held-out batches against the same baselines. Returns ``{"dir", "pretrained", "curve" (list of rows), "cpu_s",
    "reused", "corpus" (cells per source)}``."""
    import torch

    from hf_scfm.data import build_corpus
    from hf_scfm.quickstart import RECIPES, build_tokenizer
    from hf_scfm.training.families import get_family
    from hf_scfm.training.pretrain import PretrainArguments, pretrain

    family = get_family(family_name)
    objective = objective or family.default_objective
    recipe = RECIPES[family_name]
    steps = steps or recipe["pretrain_steps"]
    eval_every = eval_every or max(steps // 8, 1)
    folder = run_dir(dataset, split, family_name, objective, gene_selection, pool)
    settings = run_settings(family_name, objective, dataset, split, steps, eval_every)
    settings["seed"] = seed
    if gene_selection != GENE_SELECTION:  # the default's settings stay as before, so its runs are reused
        settings["gene_selection"] = gene_selection
    if pool != POOL:  # likewise: unpooled runs keep their settings
        settings["pool"] = pool
    done = folder / "run.json"
    if not force and done.exists():
        saved = json.loads(done.read_text())
        if saved["settings"] == settings:
            rows = list(csv.DictReader(open(folder / "curve.csv", newline="")))
            return {"dir": folder, "pretrained": folder / "pretrained", "curve": rows, "cpu_s": saved["cpu_s"],
                    "reused": True, "corpus": saved.get("corpus", {dataset: train_cells(dataset, split)})}
    cpu0 = time.process_time()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    adata, train, test = load_split(dataset, split)
    tokenizer = build_tokenizer(adata, family, max_length=recipe["max_length"], fit_on=train,
                                n_top_genes=recipe["n_top_genes"], batch_key=batch_key_of(train),
                                include_zero_genes=recipe.get("include_zero_genes", False), flavor=gene_selection)
    cells = pretraining_cells(dataset, train, pool)  # all genes: the tokenizer reads its own by name or ID
    corpus = dict(cells.obs["pool_source"].value_counts().sort_index()) if pool != POOL else {dataset: train.n_obs}
    corpus = {k: int(v) for k, v in corpus.items()}
    build_corpus(cells, tokenizer, folder / "corpus", max_length=recipe["max_length"], shard_size=max(cells.n_obs, 1),
                 obs_columns=[LABEL_KEY], progress=False, overwrite=True)
    del cells
    out = folder / "pretrained"
    pretrain(PretrainArguments(
        model=family_name, objective=objective, preset="tiny", corpus=str(folder / "corpus"), out=str(out),
        max_steps=steps, batch_size=recipe["batch_size"], learning_rate=recipe["pretrain_lr"], eval_fraction=0.0,
        eval_steps=0, logging_steps=max(1, min(10, steps // 10)), save_steps=eval_every, shuffle_buffer=10000,
        seed=seed, progress=False))

    kind = OBJECTIVE_KIND[family.objective(objective).collator]
    records = cell_records(tokenizer, train, recipe["max_length"])
    base = Baselines(records, train.obs[LABEL_KEY].to_numpy(), len(tokenizer))
    batches = held_out_batches(tokenizer, family, objective, test, recipe["max_length"])
    cls = family.pretraining_cls(objective)
    rows = []
    checkpoints = sorted((int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*"))
    torch.manual_seed(seed)
    untrained = cls(family.config_cls.from_preset("tiny", vocab_size=len(tokenizer),
                                                  vocab_checksum=tokenizer.vocab_checksum))
    for step, path in [(0, None)] + checkpoints + [(steps, out)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = untrained if path is None else cls.from_pretrained(path)
        row = {"step": step, **evaluate_objective(model, batches, base, kind)}
        rows.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    for _, path in checkpoints:
        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(folder / "corpus", ignore_errors=True)
    train_log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    with open(folder / "train_log.json", "w") as fh:
        json.dump(train_log, fh)
    with open(folder / "curve.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cpu = round(time.process_time() - cpu0, 1)
    done.write_text(json.dumps({"settings": settings, "cpu_s": cpu, "kind": kind, "corpus": corpus}, indent=1) + "\n")
    return {"dir": folder, "pretrained": out, "curve": rows, "cpu_s": cpu, "reused": False, "corpus": corpus}


def train_cells(dataset: str, split: str) -> int:
    """How many training cells ``split`` of ``dataset`` has (the corpus of an unpooled run)."""
    from hf_scfm.data import load_example

    return int(split_masks(load_example(dataset, backed=True), dataset)[split][0].sum())


def random_init_checkpoint(pretrained: Path, folder: Path, family_name: str, seed: int) -> Path:
    """A randomly initialised model with the config and tokenizer of ``pretrained`` (the scratch arm of "pretrained
    vs random init at the same fine-tuning budget"; fine-tuning reads only its backbone)."""
    import torch

    from hf_scfm.tokenization import GeneTokenizer
    from hf_scfm.training.families import get_family

    family = get_family(family_name)
    torch.manual_seed(seed)
    family.pretraining_cls()(family.config_cls.from_pretrained(pretrained)).save_pretrained(folder)
    GeneTokenizer.from_pretrained(str(pretrained)).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# a small job pool
# ---------------------------------------------------------------------------------------------------------------


def _worker_init():
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _call(job):
    fn, kwargs = job
    t0, c0 = time.time(), time.process_time()
    result = fn(**kwargs)
    return result, round(time.process_time() - c0, 1), round(time.time() - t0, 1)


def run_jobs(jobs, workers: int):
    """Yield ``(job index, result, cpu_s, wall_s)`` as jobs finish; ``workers`` processes of one thread each (0: in
    this process)."""
    if workers <= 0:
        _worker_init()
        for i, job in enumerate(jobs):
            yield (i, *_call(job))
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
        pending = {i: pool.apply_async(_call, (job,)) for i, job in enumerate(jobs)}
        while pending:
            for i in list(pending):
                if pending[i].ready():
                    yield (i, *pending.pop(i).get())
            time.sleep(0.2)


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        writer.writerows(rows)


def mean_sd(values) -> str:
    import numpy as np

    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0:
        return "-"
    return f"{x.mean():.3f} ± {x.std(ddof=1):.3f}" if x.size > 1 else f"{x.mean():.3f}"


def provenance(script: str, argv, started: float, cpu_s: float, workers: int, detail: str = "") -> str:
    """The line under each table: the command that made it, wall and CPU time, processes (and the machine load)."""
    command = " ".join(argv if argv is not None else sys.argv[1:])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"`python benchmarks/{script} {command}`".replace(" `", "`") + f": {detail}{time.time() - started:.0f} s "
            f"wall, {cpu_s / 60:.1f} CPU-minutes in the jobs (pretraining runs reused from disk count 0), {workers} "
            f"process(es), load average {load} at the end")
