"""Cell-type annotation (hf_scfm.tasks.annotation) and the logistic-regression baseline (hf_scfm.tasks.baseline).

One classifier is fine-tuned (all weights, a randomly initialised tiny Mouse-GeneMamba: the rank encoding puts
each cell's most specific genes first, so a few dozen steps learn the types) on 300 real Baron human cells of the
four major pancreas types, restricted to their 100 most expressed genes; the tests annotate 120 other cells.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

from hf_scfm.cli import main, parse
from hf_scfm.tasks.annotation import (
    CLASSES_KEY, CONFIDENCE_KEY, METRICS_KEY, PREDICTION_KEY, PROBABILITIES_KEY, annotate, confusion_counts,
    score_predictions,
)
from hf_scfm.training.finetune import classification_metrics, finetune

from test_pretrain import small_adata, small_tokenizer

N_TRAIN, N_QUERY, MAX_LENGTH, N_GENES = 300, 120, 16, 100
TYPES = ["type B pancreatic cell", "pancreatic A cell", "pancreatic ductal cell", "pancreatic acinar cell"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """(classifier folder, query AnnData, train AnnData)."""
    from hf_scfm.training.families import get_family

    root = tmp_path_factory.mktemp("annotation")
    adata = small_adata("human", n_cells=2142, n_genes=N_GENES)
    adata = adata[adata.obs["cell_type"].isin(TYPES)].copy()
    perm = np.random.default_rng(0).permutation(adata.n_obs)
    train, query = adata[np.sort(perm[:N_TRAIN])].copy(), adata[np.sort(perm[N_TRAIN:N_TRAIN + N_QUERY])].copy()
    tok = small_tokenizer(train, "human", "rank")
    family = get_family("mouse_genemamba")
    torch.manual_seed(0)
    config = family.config_cls.from_preset("tiny", vocab_size=len(tok), vocab_checksum=tok.vocab_checksum,
                                           hidden_size=32)
    family.pretraining_cls()(config).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    train.write_h5ad(root / "train.h5ad")
    _, args = parse([
        "finetune", "--model", str(root / "base"), "--train", str(root / "train.h5ad"), "--label-key", "cell_type",
        "--out", str(root / "classifier"), "--no-lora", "--max-steps", "80", "--batch-size", "16",
        "--learning-rate", "3e-3", "--max-length", str(MAX_LENGTH)])
    finetune(*args)
    query.write_h5ad(root / "query.h5ad")
    return root / "classifier", query, train


def test_annotate_predicts_held_out_cells_with_calibrated_outputs(trained, tmp_path):
    model, query, train = trained
    before = query.copy()
    png = tmp_path / "cm.png"
    out = annotate(model, query, label_key="cell_type", batch_size=32, out_png=png, progress=False, copy=True)

    # copy=True: the input is untouched; the output is the same cells, same order
    assert PREDICTION_KEY not in query.obs and list(query.obs_names) == list(before.obs_names)
    assert list(out.obs_names) == list(query.obs_names) and out.n_vars == query.n_vars
    # the default writes the same fields into the AnnData given, and returns None
    inplace = query.copy()
    assert annotate(model, inplace, label_key="cell_type", batch_size=32, progress=False) is None
    np.testing.assert_array_equal(inplace.obsm[PROBABILITIES_KEY], out.obsm[PROBABILITIES_KEY])
    assert inplace.uns[METRICS_KEY]["accuracy"] == out.uns[METRICS_KEY]["accuracy"]
    classes = list(out.uns[CLASSES_KEY])
    assert classes == sorted(train.obs["cell_type"].astype(str).unique())
    probs = out.obsm[PROBABILITIES_KEY]
    assert probs.shape == (N_QUERY, len(classes)) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs >= 0).all()
    np.testing.assert_allclose(out.obs[CONFIDENCE_KEY].to_numpy(), probs.max(1), rtol=0, atol=0)
    assert list(out.obs[PREDICTION_KEY].cat.categories) == classes
    assert list(out.obs[PREDICTION_KEY].astype(str)) == [classes[i] for i in probs.argmax(1)]

    # well above chance (the majority class is ~40 % of these cells)
    metrics = out.uns[METRICS_KEY]
    truth = query.obs["cell_type"].astype(str).to_numpy()
    majority = max(np.mean(truth == c) for c in set(truth))
    assert metrics["accuracy"] > max(0.75, majority + 0.3), metrics
    expected = classification_metrics(out.obs[PREDICTION_KEY].astype(str).to_numpy(), truth)
    for key in ("accuracy", "f1_macro", "precision_macro", "recall_macro"):
        assert metrics[key] == pytest.approx(expected[key])
    assert metrics["n_scored"] == N_QUERY and metrics["n_excluded"] == 0 and metrics["unseen_labels"] == {}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # order of cells is kept: a reversed query gives the reversed annotations (batch composition aside)
    rev = annotate(model, query[::-1], batch_size=7, progress=False, copy=True)
    assert list(rev.obs_names) == list(query.obs_names[::-1])
    np.testing.assert_allclose(rev.obsm[PROBABILITIES_KEY][::-1], probs, atol=1e-4)
    assert METRICS_KEY not in rev.uns  # no label key: no scoring


def test_unseen_query_labels_are_reported_and_excluded(trained):
    model, query, _ = trained
    q = query.copy()
    q.obs["cell_type"] = q.obs["cell_type"].astype(str)
    q.obs.iloc[:10, q.obs.columns.get_loc("cell_type")] = "alien cell"
    with pytest.warns(UserWarning, match=r"10 cell\(s\) with label\(s\) unseen in training \(alien cell: 10\)"):
        out = annotate(model, q, label_key="cell_type", progress=False, copy=True)
    m = out.uns[METRICS_KEY]
    assert m["n_scored"] == N_QUERY - 10 and m["n_excluded"] == 10 and m["unseen_labels"] == {"alien cell": 10}
    pred, truth = out.obs[PREDICTION_KEY].astype(str).to_numpy(), q.obs["cell_type"].to_numpy()
    assert m["f1_macro"] == pytest.approx(classification_metrics(pred[10:], truth[10:])["f1_macro"])
    assert out.obs[PREDICTION_KEY].notna().all()  # the excluded cells are still annotated

    q.obs["cell_type"] = "alien cell"
    with pytest.raises(ValueError, match="none of its 120 cells has a label the model was trained on"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            annotate(model, q, label_key="cell_type", progress=False)


def test_bad_queries_fail_clearly(trained):
    model, query, _ = trained
    with pytest.raises(ValueError, match=r"no obs column 'celltype' \(obs columns: \['cell_type', 'cell_ontology_id'"):
        annotate(model, query, label_key="celltype", progress=False)

    renamed = query.copy()
    renamed.var_names = [f"Gene{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match=r"Only 0 of 100 input genes \(0.0%\) match this tokenizer's human "
                                         r"vocabulary.*species.*Ensembl IDs"):
        annotate(model, renamed, progress=False)

    logged = query.copy()
    logged.X = np.log1p(np.asarray(logged.X.todense() if hasattr(logged.X, "todense") else logged.X) / 3.0)
    with pytest.raises(ValueError, match="Expected raw counts.*log-normalised"):
        annotate(model, logged, progress=False)

    with pytest.raises(TypeError, match="expected an AnnData or an .h5ad path"):
        annotate(model, np.zeros((3, 3)), progress=False)


def test_score_and_confusion_pinned_to_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    rng = np.random.default_rng(1)
    classes = ["a", "b", "c", "d"]
    truth = rng.choice(classes + ["new"], size=200, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    pred = np.where(rng.random(200) < 0.7, truth, rng.choice(classes, size=200))
    pred = np.where(pred == "new", "a", pred)
    with pytest.warns(UserWarning, match="unseen in training"):
        m = score_predictions(pred, truth, classes)
    keep = truth != "new"
    assert m["accuracy"] == pytest.approx(accuracy_score(truth[keep], pred[keep]))
    assert m["f1_macro"] == pytest.approx(f1_score(truth[keep], pred[keep], average="macro", zero_division=0))
    assert m["unseen_labels"] == {"new": int((~keep).sum())}
    rows, counts = confusion_counts(pred, truth, classes)
    assert rows == classes
    np.testing.assert_array_equal(counts, confusion_matrix(truth[keep], pred[keep], labels=classes))


def test_cli_writes_annotated_h5ad_and_confusion_png(trained, tmp_path, capsys):
    import anndata

    model, query, _ = trained
    out = tmp_path / "q_annotated.h5ad"
    query_path = model.parent / "query.h5ad"
    assert main(["annotate", "--model", str(model), "--query", str(query_path), "--out", str(out), "--label-key",
                 "cell_type", "--batch-size", "50"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "macro-F1" in printed and "macro precision" in printed
    back = anndata.read_h5ad(out)
    assert back.obsm[PROBABILITIES_KEY].shape == (N_QUERY, len(back.uns[CLASSES_KEY]))
    assert 0 <= back.uns[METRICS_KEY]["f1_macro"] <= 1
    assert (tmp_path / "q_annotated_confusion.png").stat().st_size > 1000

    assert main(["annotate", "--model", str(model), "--query", str(query_path), "--out", str(out), "--label-key",
                 "nope"]) == 2
    assert "no obs column 'nope'" in capsys.readouterr().err

    # counts in a layer: --layer reads them (X is log-normalised here, which the tokenizer refuses)
    logged = query.copy()
    logged.layers["counts"] = logged.X.copy()
    dense = np.asarray(logged.X.todense() if hasattr(logged.X, "todense") else logged.X, dtype=np.float64)
    logged.X = np.log1p(dense / dense.sum(1, keepdims=True) * 1e4).astype(np.float32)
    logged.write_h5ad(tmp_path / "logged.h5ad")
    args = ["annotate", "--model", str(model), "--query", str(tmp_path / "logged.h5ad"), "--out", str(tmp_path / "l.h5ad"),
            "--batch-size", "50"]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]  # (transformers' "Loading weights" bar aside)
    assert "Traceback" not in err and len(lines) == 1
    assert lines[0].startswith("hf-scfm annotate: error: Expected raw counts") and "layer=" in lines[0]
    assert main([*args, "--layer", "counts", "--no-progress"]) == 0
    np.testing.assert_array_equal(anndata.read_h5ad(tmp_path / "l.h5ad").obsm[PROBABILITIES_KEY],
                                  anndata.read_h5ad(out).obsm[PROBABILITIES_KEY])


def test_logistic_regression_baseline(trained, monkeypatch):
    from hf_scfm.tasks.baseline import log_normalize, logistic_regression_baseline

    _, query, train = trained
    x = log_normalize(query)
    raw = np.asarray(query.X.todense() if hasattr(query.X, "todense") else query.X, dtype=np.float64)
    np.testing.assert_allclose(x.toarray(), np.log1p(raw / raw.sum(1, keepdims=True) * 1e4), rtol=1e-5)
    result = logistic_regression_baseline(train, query, "cell_type")
    assert result["metrics"]["accuracy"] > 0.8 and result["metrics"]["n_scored"] == N_QUERY
    assert result["probabilities"].shape == (N_QUERY, len(result["classes"]))
    assert result["predictions"].shape == (N_QUERY,)

    # genes=: the same fit on those columns of log1p(CP10k) normalised by the library size of *all* genes
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    genes = list(train.var_names[::3][:20])
    cols_tr, cols_q = train.var_names.get_indexer(genes), query.var_names.get_indexer(genes)
    x_tr, x_q = log_normalize(train)[:, cols_tr], log_normalize(query)[:, cols_q]
    y = train.obs["cell_type"].astype(str)
    same = logistic_regression_baseline(train, query, "cell_type", genes=genes)
    assert same["n_genes"] == len(genes) == 20
    expected = LogisticRegression(C=1.0, max_iter=1000, random_state=0).fit(x_tr, y).predict_proba(x_q)
    np.testing.assert_allclose(same["probabilities"], expected, atol=1e-6)
    pca = PCA(n_components=5, random_state=0).fit(x_tr.toarray())
    expected = LogisticRegression(C=1.0, max_iter=1000, random_state=0).fit(pca.transform(x_tr.toarray()), y)
    got = logistic_regression_baseline(train, query, "cell_type", genes=genes, pca_components=5)
    np.testing.assert_allclose(got["probabilities"], expected.predict_proba(pca.transform(x_q.toarray())), atol=1e-6)
    with pytest.raises(ValueError, match="1 of the 2 genes are not var_names.*NOPE"):
        logistic_regression_baseline(train, query, "cell_type", genes=[genes[0], "NOPE"])

    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        logistic_regression_baseline(train, query, "cell_type")
