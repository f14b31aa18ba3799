"""benchmarks/common.py: the trivial predictors and the held-out objectives they are scored against.

The script folder is not part of the package; ``common`` is loaded from its path. Tiny hand-made sentences and stub
models whose outputs are known make every figure checkable by hand.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import import_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"


@pytest.fixture(scope="module")
def common():
    yield from import_script(SCRIPT, "benchmark_common")


V = 10  # ids 0..5 special, 6..9 genes
RECORDS = [{"input_ids": [5, 6, 7, 3], "values": [0.0, 1.0, 3.0, 0.0]},
           {"input_ids": [5, 7, 8, 3], "values": [0.0, 5.0, 2.0, 0.0]},
           {"input_ids": [5, 6, 9, 8, 3], "values": [0.0, 3.0, 1.0, 4.0, 0.0]}]


def test_baselines_fit_gene_means_unigram_and_rank_order(common):
    base = common.Baselines(RECORDS, ["a", "a", "b"], V)
    assert base.global_mean == pytest.approx(19 / 7)
    np.testing.assert_allclose(base.gene_mean[6:], [2.0, 4.0, 3.0, 1.0])
    np.testing.assert_allclose(base.type_mean["a"][6:], base.gene_mean[6:])  # < 3 cells per type: the gene mean
    # targets: every token after <bos>: 6 x2, 7 x2, 8 x2, 9 x1, <eos> x3; add-half, specials never targeted get 0
    expected = np.array([0, 0, 0, 3.5, 0, 0, 2.5, 2.5, 2.5, 1.5]) / 12.5
    np.testing.assert_allclose(base.unigram, expected)
    # median relative position: gene 6 at 1/3 and 1/4 -> 1/4 (lower middle), 7 at 2/3 and 1/3, 9 at 2/4, 8 at 2/3, 3/4
    assert base.rank_order == [6, 7, 9, 8]


class Stub(torch.nn.Module):
    def __init__(self, **outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, **batch):
        return SimpleNamespace(**{k: v(batch) for k, v in self.outputs.items()})


def test_masked_value_scores_a_gene_mean_model_as_the_gene_mean(common):
    base = common.Baselines(RECORDS, ["a", "a", "b"], V)
    ids = torch.tensor([[2, 6, 7, 9]])
    labels = torch.tensor([[-100.0, 4.0, 1.0, -100.0]])
    batch = {"input_ids": ids, "values": torch.tensor([[0.0, -1.0, -1.0, 2.0]]), "labels": labels}
    gene_mean = torch.tensor(base.gene_mean, dtype=torch.float32)
    model = Stub(predictions=lambda b: gene_mean[b["input_ids"]])
    got = common.evaluate_objective(model, [(batch, np.array(["a"]))], base, "masked_value")
    assert got["model"] == pytest.approx(got["gene_mean"]) == pytest.approx(((2 - 4) ** 2 + (4 - 1) ** 2) / 2)
    assert got["global_mean"] == pytest.approx(((19 / 7 - 4) ** 2 + (19 / 7 - 1) ** 2) / 2)


def test_next_gene_scores_a_unigram_model_as_the_unigram(common):
    base = common.Baselines(RECORDS, ["a", "a", "b"], V)
    ids = torch.tensor([[5, 6, 7, 3, 0]])
    batch = {"input_ids": ids, "labels": torch.where(ids == 0, -100, ids), "attention_mask": (ids != 0).long()}
    log_uni = torch.log(torch.tensor(base.unigram, dtype=torch.float32).clamp(min=1e-30))
    model = Stub(logits=lambda b: log_uni.expand(*b["input_ids"].shape, V).clone())
    got = common.evaluate_objective(model, [(batch, np.array(["a"]))], base, "next_gene")
    u = base.unigram
    assert got["model"] == pytest.approx(got["unigram"], rel=1e-5)
    assert got["unigram"] == pytest.approx(-np.log(u[[6, 7, 3]]).mean())
    # without replacement: 7 after 6 is drawn from the mass left once 6 is out, <eos> after 6 and 7
    unseen = -(np.log(u[6]) + np.log(u[7] / (1 - u[6])) + np.log(u[3] / (1 - u[6] - u[7]))) / 3
    assert got["unigram_unseen"] == pytest.approx(unseen)
    assert got["rank_order_top1"] == pytest.approx(2 / 3)  # predicts 6, then 7, then 9 (the target is <eos>)
    assert got["model_top1"] == pytest.approx(got["unigram_top1"]) == pytest.approx(1 / 3)  # argmax: <eos>


def test_masked_gene_unseen_unigram_leaves_out_the_visible_genes(common):
    base = common.Baselines(RECORDS, ["a", "a", "b"], V)
    ids = torch.tensor([[5, 1, 7, 8, 3]])  # gene 6 masked (<mask> = 1), 7 and 8 visible
    batch = {"input_ids": ids, "labels": torch.tensor([[-100, 6, -100, -100, -100]])}
    log_uni = torch.log(torch.tensor(base.unigram, dtype=torch.float32).clamp(min=1e-30))
    model = Stub(logits=lambda b: log_uni.expand(*b["input_ids"].shape, V).clone())
    got = common.evaluate_objective(model, [(batch, np.array(["a"]))], base, "masked_gene")
    u = base.unigram
    assert got["model"] == pytest.approx(got["unigram"], rel=1e-5) == pytest.approx(-np.log(u[6]), rel=1e-5)
    assert got["unigram_unseen"] == pytest.approx(-np.log(u[6] / (1 - u[7] - u[8])))


def test_pooled_corpus_adds_the_other_species_mapped_and_never_the_held_out_donor(common):
    assert common.pool_parts("baron_human", "none") == []
    assert common.pool_parts("baron_human", "orthologs") == ["baron_mouse"]
    assert common.pool_parts("baron_mouse", "orthologs") == ["baron_human"]
    assert sorted(common.pool_parts("baron_human", "all")) == ["baron_mouse", "pbmc68k"]
    with pytest.raises(ValueError, match="Unknown pool 'mouse'.*none, orthologs, all"):
        common.pool_parts("baron_human", "mouse")
    # the unpooled run keeps its folder (and so its cached runs); a pooled one gets its own
    assert common.run_dir("baron_human", "test human2", "cellfm", "masked_regression").name == "cellfm-masked_regression"
    assert common.run_dir("baron_human", "test human2", "cellfm", "masked_regression", pool="orthologs").name == \
        "cellfm-masked_regression-pool_orthologs"

    adata, train, test = common.load_split("baron_human", "test human2")
    assert common.pretraining_cells("baron_human", train, "none") is train
    cells = common.pretraining_cells("baron_human", train, "all")
    held_out = {f"baron_human:{c}" for c in test.obs_names}
    assert not held_out & set(cells.obs_names)  # no held-out cell enters the corpus
    assert set(cells.obs.loc[cells.obs["pool_source"] == "baron_human", "batch"].astype(str)) == {"human1", "human3", "human4"}
    counts = cells.obs["pool_source"].value_counts()
    assert counts["baron_human"] == train.n_obs == adata.n_obs - test.n_obs
    assert counts["baron_mouse"] == 1886 and counts["pbmc68k"] == 700
    assert cells.uns["species"] == "human" and cells.uns["pool"]["baron_mouse"]["mapped_by_orthologs"]
    mouse = cells[cells.obs["pool_source"] == "baron_mouse"]
    assert "GCG" in mouse.var_names and "Gcg" not in mouse.var_names  # human symbols, not mouse ones
    assert float(np.asarray(mouse[:, "GCG"].X.sum())) > 0  # mouse Gcg counts read as human GCG
