"""The main job (hf_scfm.quickstart): every stage once on a small budget, the split choices, the arguments.

The full-size run (``hf-scfm quickstart``, ~3-5 min on 2 CPU cores) is CI's separate job; here 300 bundled cells,
a few steps and 32 tokens per cell exercise the same code path end to end.
"""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def no_stream_shutdown_sleep(monkeypatch):
    """``datasets`` sleeps 5 s when an abandoned parquet stream shuts down (see tests/test_pretrain.py)."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)


def test_quickstart_small_budget_writes_everything(tmp_path, one_thread, capsys):
    import anndata

    from hf_scfm.quickstart import QuickstartArguments, quickstart
    from hf_scfm.tasks.annotation import PREDICTION_KEY, PROBABILITIES_KEY

    out = tmp_path / "qs"
    result = quickstart(QuickstartArguments(out=str(out), max_cells=300, pretrain_steps=3, finetune_steps=6,
                                            max_length=32, batch_size=8, progress=False))
    printed = capsys.readouterr().out
    assert result["model"] == "cellfm" and result["dataset"] == "baron_human"
    assert "held-out donor human4" in result["split"]

    paths = result["paths"]
    for key in ("annotated", "confusion_matrix", "loss_curve", "model_card", "classifier"):
        assert paths[key] and (tmp_path / "qs").exists() and __import__("pathlib").Path(paths[key]).exists(), key
        assert str(paths[key]) in printed  # "prints where everything is"
    for png in (paths["confusion_matrix"], paths["loss_curve"]):
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    card = open(paths["model_card"]).read()
    assert "cellfm" in card.lower() and "annotat" in card.lower()

    annotated = anndata.read_h5ad(paths["annotated"])
    assert annotated.n_obs == result["n_query"] > 0 and set(annotated.obs["batch"]) == {"human4"}
    assert annotated.obs[PREDICTION_KEY].notna().all()
    np.testing.assert_allclose(annotated.obsm[PROBABILITIES_KEY].sum(1), 1.0, atol=1e-5)

    m, lr, same = result["metrics"], result["baseline_metrics"], result["baseline_same_genes_metrics"]
    for metrics in (m, lr, same):
        assert all(0.0 <= metrics[k] <= 1.0 for k in ("accuracy", "f1_macro", "precision_macro", "recall_macro"))
        assert metrics["n_scored"] + metrics["n_excluded"] == result["n_query"]
    assert lr["accuracy"] > 0.7  # the baseline on real cells: a sanity check of the split and the labels
    assert "| logistic regression (log-normalised counts) |" in printed and "| cellfm" in printed
    assert f"| logistic regression, the model's {saved_genes(out):,} genes |" in printed
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["accuracy"] == pytest.approx(m["accuracy"])
    # the classifier reads the training cells' most variable genes (the recipe's number; also the vocabulary)
    from hf_scfm.quickstart import RECIPES
    from hf_scfm.tokenization import GeneTokenizer

    n_top = RECIPES["cellfm"]["n_top_genes"]
    tok = GeneTokenizer.from_pretrained(paths["classifier"])
    assert len(tok.gene_subset) == saved["n_top_genes"] == n_top and len(tok) == n_top + 6
    assert f"reads the {n_top:,} most variable genes" in printed


def saved_genes(out) -> int:
    return json.loads((out / "metrics.json").read_text())["n_top_genes"]


def test_splits_hold_out_a_donor_or_a_stratified_fraction():
    from hf_scfm.data import load_example
    from hf_scfm.quickstart import DEFAULT_DATASET, prepare_split
    from hf_scfm.training.families import get_family

    assert DEFAULT_DATASET[get_family("mouse_genemamba").species] == "baron_mouse"
    mouse = load_example("baron_mouse")
    train, test, text = prepare_split(mouse, "baron_mouse")
    assert set(test.obs["batch"]) == {"mouse1"} and set(train.obs["batch"]) == {"mouse2"} and "mouse1" in text
    assert set(test.obs["cell_type"]) <= set(train.obs["cell_type"])  # every query type is known to the model

    pbmc = load_example("pbmc68k")
    train, test, _ = prepare_split(pbmc, "pbmc68k", test_fraction=0.2)
    assert train.n_obs + test.n_obs == pbmc.n_obs and not set(train.obs_names) & set(test.obs_names)
    per_type = test.obs["cell_type"].value_counts() / pbmc.obs["cell_type"].value_counts()
    assert np.allclose(per_type.to_numpy(), 0.2, atol=0.07)


def test_quickstart_arguments():
    from hf_scfm.cli import parse
    from hf_scfm.quickstart import QuickstartArguments, quickstart

    function, (args,) = parse(["quickstart"])
    assert function is quickstart and args == QuickstartArguments()
    assert (args.model, args.out, args.dataset, args.max_length) == ("cellfm", "quickstart_out", None, None)
    assert (args.pretrain_steps, args.finetune_steps, args.n_top_genes) == (None, None, -1)  # the recipe's
    _, (args,) = parse(["quickstart", "--model", "mouse_genemamba", "--out", "x", "--dataset", "pbmc68k"])
    assert (args.model, args.out, args.dataset) == ("mouse_genemamba", "x", "pbmc68k")
    with pytest.raises(SystemExit):
        parse(["quickstart", "--model", "bert"])
    with pytest.raises(ValueError, match="'bert' is not a model family"):
        QuickstartArguments(model="bert")


def test_build_tokenizer_vocabulary_is_the_selected_genes():
    """With n_top_genes the vocabulary is the training cells' most variable genes (rank medians fitted on them),
    the subset is selected (a query with all its genes passes the match check), and include_zero_genes puts every
    selected gene in every binned sentence."""
    from hf_scfm.data import load_example
    from hf_scfm.quickstart import build_tokenizer
    from hf_scfm.tokenization import GeneTokenizer
    from hf_scfm.training.families import get_family

    adata = load_example("baron_human")
    train = adata[adata.obs["batch"].astype(str) != "human4"].copy()
    expected = GeneTokenizer.from_species("human", encoding="rank")
    genes = expected.select_highly_variable_genes(train, 200, batch_key="batch")
    tok = build_tokenizer(adata, get_family("mouse_genemamba"), max_length=64, fit_on=train, n_top_genes=200,
                          batch_key="batch")
    assert tok.genes == genes and tok.gene_subset == genes and len(tok) == 206
    assert tok.medians_fitted and set(tok.gene_medians) <= set(genes)
    ids = np.asarray(tok(adata[-20:], return_tensors="np")["input_ids"])  # a query of all 20k genes
    assert ids.max() < 206
    binned = build_tokenizer(adata, get_family("scmamba2"), max_length=201, fit_on=train, n_top_genes=200,
                             batch_key="batch", include_zero_genes=True)
    enc = binned(adata[:5], return_tensors="np")
    assert enc["input_ids"].shape == (5, 201) and (enc["values"][:, 1:] == 0).mean() > 0.5
    # flavor: the earlier recipe's dispersion genes (benchmarks/annotation.py --gene-selection seurat)
    old = build_tokenizer(adata, get_family("mouse_genemamba"), max_length=64, fit_on=train, n_top_genes=200,
                          batch_key="batch", flavor="seurat")
    assert old.genes == expected.select_highly_variable_genes(train, 200, batch_key="batch", flavor="seurat")
    assert old.genes != genes and len(old) == 206


def test_finetune_classifier_passes_training_options(monkeypatch, tmp_path):
    """training_options reach the Trainer's arguments (the benchmarks' fine-tuning warm-up), beside the recipe's."""
    import hf_scfm.training.finetune as ft
    from hf_scfm.quickstart import finetune_classifier

    seen = {}
    monkeypatch.setattr(ft, "finetune", lambda args, training: seen.update(args=args, training=training) or {})
    finetune_classifier(tmp_path / "m", tmp_path / "t.h5ad", tmp_path / "o", steps=7, learning_rate=1e-4,
                        options={"pooling": "mean"}, training_options={"warmup_steps": 0.1})
    assert seen["training"].warmup_steps == 0.1 and seen["training"].max_steps == 7
    assert seen["training"].learning_rate == 1e-4 and seen["args"].pooling == "mean"
