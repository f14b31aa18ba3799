"""The metrics are ``evaluate`` modules (issue 18, item 4): each loads with ``evaluate.load(path)`` offline
(``HF_HUB_OFFLINE=1``) in a Python where hf_scfm cannot be imported, and matches scikit-learn / SciPy on random
inputs; one pushed to the local Hub loads with ``evaluate.load("<org>/<name>")``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hf_scfm.metrics import METRICS, metric_path

RNG = np.random.default_rng(0)
# random labels: 7 classes, one never predicted, one only predicted
INT_REFS = RNG.integers(0, 6, 300)
INT_PREDS = np.where(RNG.random(300) < 0.4, INT_REFS, RNG.integers(1, 7, 300))
INT_PREDS[INT_PREDS == 0] = 1  # class 0 is never predicted, class 6 never true
STR_REFS = np.array(list("abcdef"))[INT_REFS]
STR_PREDS = np.array(list("abcdefg"))[INT_PREDS]
EMB = RNG.normal(size=(150, 6)) + np.repeat(np.eye(6)[:3] * 3.0, 50, axis=0)
TYPES = np.repeat(np.array(["alpha", "beta", "gamma"]), 50)
BATCHES = RNG.choice(["d1", "d2", "d3"], 150)
CONTROL = RNG.normal(size=40)
PRED = CONTROL + RNG.normal(size=(5, 40))
MEAS = CONTROL + RNG.normal(size=(5, 40))
PRED[4] = CONTROL  # "no change": correlation undefined -> 0.0
PERTURBED = [[0], [1, 2], [], [39], [5]]

_CODE = """
import json, sys
import evaluate
import numpy as np
paths = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {paths!r}
inputs = {inputs!r}
out = {{}}
ann = evaluate.load(paths["cell_type_annotation"])
out["ann_int"] = ann.compute(predictions=inputs["int_preds"], references=inputs["int_refs"], per_class=True)
out["ann_str"] = ann.compute(predictions=inputs["str_preds"], references=inputs["str_refs"])
integ = evaluate.load(paths["batch_integration"])
out["integ"] = integ.compute(embeddings=inputs["emb"], labels=inputs["types"], batches=inputs["batches"],
                             return_clusters=True)
pert = evaluate.load(paths["perturbation"])
out["pert"] = pert.compute(predictions=inputs["pred"], references=inputs["meas"], control=inputs["control"],
                           perturbed=inputs["perturbed"], n_de=10, average=False)
out["modules"] = sorted(m for m in sys.modules if m.startswith("hf_scfm"))
print("RESULT" + json.dumps(out, default=str))
"""


def _pearson(a, b):
    from scipy.stats import pearsonr

    return 0.0 if np.ptp(a) == 0 or np.ptp(b) == 0 else pearsonr(a, b)[0]


def test_each_metric_loads_offline_without_hf_scfm_and_matches_sklearn(python_without_hf_scfm, monkeypatch,
                                                                        tmp_path):
    from sklearn import metrics as skm
    from sklearn.cluster import KMeans

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache: nothing is found there
    inputs = {"int_preds": INT_PREDS.tolist(), "int_refs": INT_REFS.tolist(), "str_preds": STR_PREDS.tolist(),
              "str_refs": STR_REFS.tolist(), "emb": EMB.tolist(), "types": TYPES.tolist(),
              "batches": BATCHES.tolist(), "control": CONTROL.tolist(), "pred": PRED.tolist(),
              "meas": MEAS.tolist(), "perturbed": PERTURBED}
    proc = python_without_hf_scfm(_CODE.format(paths={m: metric_path(m) for m in METRICS}, inputs=inputs),
                                  timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["modules"] == []

    for key, (preds, refs) in {"ann_int": (INT_PREDS, INT_REFS), "ann_str": (STR_PREDS, STR_REFS)}.items():
        got = out[key]
        assert got["accuracy"] == pytest.approx(skm.accuracy_score(refs, preds), abs=1e-12)
        for name, fn in (("f1_macro", skm.f1_score), ("precision_macro", skm.precision_score),
                         ("recall_macro", skm.recall_score)):
            assert got[name] == pytest.approx(fn(refs, preds, average="macro", zero_division=0), abs=1e-12), name
    report = skm.classification_report(INT_REFS, INT_PREDS, output_dict=True, zero_division=0)
    per_class = out["ann_int"]["per_class"]
    assert sorted(per_class) == sorted(str(c) for c in np.union1d(INT_REFS, INT_PREDS))
    for label, row in per_class.items():
        assert row == pytest.approx(report[label], abs=1e-12)
    assert per_class["0"]["precision"] == 0.0 and per_class["6"]["recall"] == 0.0  # zero_division=0

    got = out["integ"]
    grid = range(2, min(2 * 3, 50, len(EMB) - 1) + 1)
    nmis = {k: skm.normalized_mutual_info_score(TYPES, KMeans(k, n_init=3, random_state=0).fit_predict(EMB))
            for k in grid}
    best = max(nmis, key=nmis.get)
    clusters = KMeans(best, n_init=3, random_state=0).fit_predict(EMB)
    assert got["best_param"] == best and got["nmi"] == pytest.approx(nmis[best], abs=1e-12)
    assert got["ari"] == pytest.approx(skm.adjusted_rand_score(TYPES, clusters), abs=1e-12)
    assert got["clusters"] == clusters.tolist()
    assert got["asw_celltype"] == pytest.approx((skm.silhouette_score(EMB, TYPES) + 1) / 2, abs=1e-12)
    assert got["avg_bio"] == pytest.approx(np.mean([got["nmi"], got["ari"], got["asw_celltype"]]), abs=1e-12)
    per_type = [np.mean(1 - np.abs(skm.silhouette_samples(EMB[TYPES == t], BATCHES[TYPES == t])))
                for t in np.unique(TYPES)]
    assert got["asw_batch"] == pytest.approx(np.mean(per_type), abs=1e-12)

    got = out["pert"]
    for i in range(len(PRED)):
        dp, dm = PRED[i] - CONTROL, MEAS[i] - CONTROL
        de = np.argsort(-np.abs(dm), kind="stable")[:10]
        rest = np.setdiff1d(np.arange(40), PERTURBED[i])
        assert got["pearson_delta"][i] == pytest.approx(_pearson(dp, dm), abs=1e-12)
        assert got["pearson_delta_de"][i] == pytest.approx(_pearson(dp[de], dm[de]), abs=1e-12)
        assert got["pearson_delta_downstream"][i] == pytest.approx(_pearson(dp[rest], dm[rest]), abs=1e-12)
        assert got["mse"][i] == pytest.approx(skm.mean_squared_error(MEAS[i], PRED[i]), abs=1e-12)
        assert got["mse_de"][i] == pytest.approx(skm.mean_squared_error(MEAS[i][de], PRED[i][de]), abs=1e-12)
    assert got["pearson_delta"][4] == 0.0 and got["pearson_delta"][0] == pytest.approx(np.corrcoef(
        PRED[0] - CONTROL, MEAS[0] - CONTROL)[0, 1], abs=1e-12)


def test_package_callers_use_the_metrics():
    """The fine-tuning metrics and the integration metrics are the evaluate modules' results."""
    import anndata as ad
    import pandas as pd

    from hf_scfm.metrics import load
    from hf_scfm.tasks.integration import integration_metrics
    from hf_scfm.training.finetune import classification_metrics

    expected = load("cell_type_annotation").compute(predictions=STR_PREDS.tolist(), references=STR_REFS.tolist())
    assert classification_metrics(STR_PREDS, STR_REFS) == expected
    assert classification_metrics(INT_PREDS, INT_REFS) == expected  # the same partition of the cells
    adata = ad.AnnData(np.zeros((len(EMB), 1), np.float32),
                       obs=pd.DataFrame({"t": TYPES, "b": BATCHES}, index=[str(i) for i in range(len(EMB))]))
    adata.obsm["X_emb"] = EMB
    got = integration_metrics(adata, "X_emb", "t", "b")
    want = load("batch_integration").compute(embeddings=EMB, labels=TYPES, batches=BATCHES)
    assert got == want and adata.obs["X_emb_clusters"].nunique() >= 2


def test_metric_errors_name_the_problem():
    from hf_scfm.metrics import load

    with pytest.raises(ValueError, match="Unknown hf-scfm metric 'f2'"):
        metric_path("f2")
    with pytest.raises(ValueError, match="control .* is required"):
        load("perturbation").compute(predictions=PRED.tolist(), references=MEAS.tolist())
    with pytest.raises(ValueError, match="perturbed has 1 entries for 5 conditions"):
        load("perturbation").compute(predictions=PRED.tolist(), references=MEAS.tolist(), control=CONTROL.tolist(),
                                     perturbed=[[0]])


def test_push_metric_then_evaluate_load_from_the_hub(hub_server, monkeypatch, python_without_hf_scfm):
    from huggingface_hub import HfApi

    from hf_scfm.training.hub import push_metric

    push_metric("cell_type_annotation", "hf-scfm/cell_type_annotation")
    files = set(HfApi().list_repo_files("hf-scfm/cell_type_annotation", repo_type="space"))
    assert files >= {"cell_type_annotation.py", "README.md", "app.py", "requirements.txt"}
    with pytest.raises(ValueError, match="must be a Python identifier"):
        push_metric("perturbation", "hf-scfm/perturbation-metric")
    proc = python_without_hf_scfm("""
import json, evaluate
m = evaluate.load("hf-scfm/cell_type_annotation")
print("RESULT" + json.dumps(m.compute(predictions=["a", "b", "b"], references=["a", "b", "c"])))
""", timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert got["accuracy"] == pytest.approx(2 / 3) and got["f1_macro"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert not hub_server.unhandled
