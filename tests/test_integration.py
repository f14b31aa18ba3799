"""Integration metrics (hf_scfm.tasks.integration) and adversarial batch removal (hf_scfm.training.adversarial):
metric values on hand-built embeddings, the gradient-reversal layer's exact gradient, and batch removal during
fine-tuning on real cells."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from hf_scfm.tasks.integration import batch_asw, integration_metrics, nmi_ari
from hf_scfm.training.adversarial import AdversarialBatchClassifier, grad_reverse


def blobs(offset_batch: float, seed: int = 0, n: int = 40):
    """3 cell types far apart in 2-D, 2 batches per type; batch 'b' shifted by ``offset_batch`` along y."""
    rng = np.random.default_rng(seed)
    xs, types, batches = [], [], []
    for t, centre in enumerate([(0, 0), (100, 0), (0, 100)]):
        for b in ("a", "b"):
            shift = np.array(centre, dtype=float) + (0, offset_batch if b == "b" else 0)
            xs.append(shift + rng.normal(scale=1.0, size=(n, 2)))
            types += [f"type{t}"] * n
            batches += [b] * n
    obs = pd.DataFrame({"cell_type": types, "batch": batches}, index=[f"c{i}" for i in range(len(types))])
    return ad.AnnData(np.zeros((len(types), 1), dtype=np.float32), obs=obs, obsm={"X_emb": np.vstack(xs)})


def test_separated_clusters_score_one_and_batches_mixed_vs_separated():
    mixed = blobs(offset_batch=0.0)
    m = integration_metrics(mixed, "X_emb", "cell_type", "batch")
    assert m["nmi"] == pytest.approx(1.0) and m["ari"] == pytest.approx(1.0)
    assert 0.98 < m["asw_celltype"] <= 1.0
    assert m["avg_bio"] == pytest.approx((m["nmi"] + m["ari"] + m["asw_celltype"]) / 3)
    assert m["asw_batch"] > 0.85  # same distribution in both batches: silhouettes near 0 (0.5 = halfway)
    assert len(set(mixed.obs["X_emb_clusters"])) == 3  # the sweep picked k = 3 (best NMI)

    separated = integration_metrics(blobs(offset_batch=20.0), "X_emb", "cell_type", "batch")
    assert separated["asw_batch"] < 0.15  # batches form their own clusters inside every cell type
    # the batch split inside a type is far smaller than between types: cell types are still well conserved
    assert separated["asw_celltype"] > 0.85


def silhouette_by_hand(x, labels):
    d = np.abs(x[:, None] - x[None, :])  # 1-D points
    s = []
    for i in range(len(x)):
        own = (labels == labels[i]) & (np.arange(len(x)) != i)
        if not own.any():  # a cell alone in its label: silhouette 0 (sklearn's convention)
            s.append(0.0)
            continue
        a = d[i, own].mean()
        b = min(d[i, labels == other].mean() for other in set(labels) - {labels[i]})
        s.append((b - a) / max(a, b))
    return np.array(s)


def test_batch_asw_is_scib_per_type_mean_of_one_minus_abs_silhouette():
    # type A: 4 cells, batches split; type B: 3 cells, one batch out of place; type C: one batch only (skipped)
    x = np.array([0.0, 1.0, 10.0, 11.0, 50.0, 52.0, 51.0, 90.0, 91.0])
    types = np.array(["A"] * 4 + ["B"] * 3 + ["C"] * 2)
    batches = np.array(["1", "1", "2", "2", "1", "1", "2", "1", "1"])
    expected = np.mean([np.mean(1 - np.abs(silhouette_by_hand(x[types == t], batches[types == t])))
                        for t in ("A", "B")])
    assert batch_asw(x[:, None], types, batches) == pytest.approx(expected, abs=1e-12)
    assert expected < 0.5  # A is separated (low), B mixed-ish: the per-type mean, not the per-cell mean
    per_cell = np.mean(np.concatenate([1 - np.abs(silhouette_by_hand(x[types == t], batches[types == t]))
                                       for t in ("A", "B")]))
    assert abs(per_cell - expected) > 1e-3


def test_nmi_ari_sweep_and_errors():
    mixed = blobs(0.0, n=10)
    x, labels = mixed.obsm["X_emb"], mixed.obs["cell_type"].to_numpy()
    fixed = nmi_ari(x, labels, n_clusters=[2])  # forced to merge two types
    assert fixed["best_param"] == 2 and fixed["nmi"] < 0.8 and fixed["ari"] < 0.7
    assert nmi_ari(x, labels)["best_param"] == 3
    with pytest.raises(ValueError, match="No embedding 'X_scmamba2' in obsm"):
        integration_metrics(mixed, "X_scmamba2", "cell_type")
    with pytest.raises(ValueError, match="No obs column 'donor'"):
        integration_metrics(mixed, "X_emb", "cell_type", "donor")
    with pytest.raises(ValueError, match="choose 'kmeans' or 'leiden'"):
        nmi_ari(x, labels, method="louvain")


def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward():
    torch.manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 7, dtype=torch.float64)
    y = grad_reverse(x, 0.37)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.equal(x.grad, -0.37 * w)
    # through the discriminator: the encoder's gradient is exactly -lambda x the plain gradient
    from hf_scfm.training.adversarial import BatchDiscriminator

    disc = BatchDiscriminator(7, 3, lambd=2.5).double()
    labels = torch.tensor([0, 1, 2, 1, 0])
    e1 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(disc(e1), labels).backward()
    e2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(disc.net(e2), labels).backward()
    assert torch.equal(e1.grad, -2.5 * e2.grad)


from dataclasses import dataclass  # noqa: E402

from transformers.utils import ModelOutput  # noqa: E402


@dataclass
class _ToyOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cell_embedding: torch.Tensor | None = None


class _Toy(torch.nn.Module):
    """Minimal classifier with the hf-scfm output fields the wrapper reads."""

    def __init__(self):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(hidden_size=4)
        self.encoder = torch.nn.Linear(3, 4)

    def forward(self, input_ids=None, values=None, attention_mask=None, labels=None, return_dict=True):
        emb = self.encoder(values)
        return _ToyOutput(loss=emb.pow(2).mean(), logits=emb, cell_embedding=emb)


def test_adversarial_loss_added_in_training_only():
    torch.manual_seed(0)
    wrapper = AdversarialBatchClassifier(_Toy(), n_batches=2, weight=0.5)
    values = torch.randn(6, 3)
    batch = torch.tensor([0, 1, 0, 1, -100, 1])
    wrapper.eval()
    plain = wrapper(values=values, batch_labels=batch).loss
    wrapper.train()
    total = wrapper(values=values, batch_labels=batch).loss
    emb = wrapper.model.encoder(values)
    adv = torch.nn.functional.cross_entropy(wrapper.discriminator.net(emb), batch, ignore_index=-100)
    torch.testing.assert_close(total, plain + 0.5 * adv)
    with pytest.raises(ValueError, match="must be >= 0"):
        AdversarialBatchClassifier(_Toy(), n_batches=2, weight=-1.0)


# ---------------------------------------------------------------------------------------------------------------
# adversarial batch removal during fine-tuning, on real cells
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def donors(tmp_path_factory):
    """baron_human: 20 cells of each of 3 cell types from each of the 4 donors (240 cells, 300 genes), and a
    tiny random-init Mouse-GeneMamba over a human rank tokenizer. Its mean-pooled embedding carries the donor
    (a linear probe finds it in ~0.68 of held-out cells, chance 0.25); the tiny <cls>-readout SC-MAMBA2 and
    CellFM carry none at init (probe at chance), so there would be nothing to remove."""
    from hf_scfm.data import load_example
    from hf_scfm.tokenization import GeneTokenizer
    from hf_scfm.training.families import FAMILIES

    root = tmp_path_factory.mktemp("adversarial")
    full = load_example("baron_human")
    rng = np.random.default_rng(0)
    keep = []
    for cell_type in ("pancreatic A cell", "type B pancreatic cell", "pancreatic ductal cell"):
        for donor in ("human1", "human2", "human3", "human4"):
            rows = np.nonzero(((full.obs["cell_type"] == cell_type) & (full.obs["batch"] == donor)).to_numpy())[0]
            keep += rng.choice(rows, 20, replace=False).tolist()
    adata = full[sorted(keep)].copy()
    report = GeneTokenizer.from_species("human").mapping_report(adata)
    total = np.asarray(adata.X.sum(0)).ravel()
    genes = [i for i in np.argsort(-total, kind="stable")
             if adata.var_names[i] not in report.unmatched and adata.var_names[i] not in report.duplicates][:300]
    adata = adata[:, sorted(genes)].copy()
    tok = GeneTokenizer.from_genes(list(adata.var_names), species="human", encoding="rank")
    tok.fit_medians(adata)
    family = FAMILIES["mouse_genemamba"]
    torch.manual_seed(0)
    config = family.config_cls.from_preset("tiny", vocab_size=len(tok), vocab_checksum=tok.vocab_checksum)
    family.pretraining_cls()(config).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    adata.write_h5ad(root / "cells.h5ad")
    return root


def _finetune(root, out, *extra):
    from hf_scfm.cli import parse
    from hf_scfm.training.finetune import finetune

    _, args = parse([
        "finetune", "--model", str(root / "base"), "--train", str(root / "cells.h5ad"), "--label-key", "cell_type",
        "--out", str(out), "--max-steps", "60", "--batch-size", "16", "--max-length", "64", "--no-lora",
        "--learning-rate", "3e-4", "--seed", "0", *extra])
    return finetune(*args)


def _batch_predictability(folder, h5ad):
    """Donor accuracy of a 4-fold cross-validated logistic regression on the cell embeddings, and batch ASW."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from hf_scfm.tasks.embedding import embed

    adata = embed(folder, h5ad, max_length=64, progress=False)
    x = adata.obsm["X_mouse_genemamba"]
    donors_, types = adata.obs["batch"].astype(str).to_numpy(), adata.obs["cell_type"].astype(str).to_numpy()
    probe = cross_val_score(LogisticRegression(max_iter=2000), x, donors_, cv=4).mean()
    return probe, batch_asw(x, types, donors_)


def test_adversarial_training_removes_the_donor_from_the_embedding(donors, tmp_path, one_thread):
    from safetensors.torch import load_file

    _finetune(donors, tmp_path / "plain")
    _finetune(donors, tmp_path / "adversarial", "--adversarial-batch-key", "batch", "--adversarial-weight", "1")
    saved = load_file(tmp_path / "adversarial" / "model.safetensors")
    assert not any("discriminator" in k for k in saved)  # the adversary is training-only
    import json

    config = json.loads((tmp_path / "adversarial" / "config.json").read_text())
    assert config["architectures"] == ["MouseGeneMambaForSequenceClassification"]

    plain_probe, plain_asw = _batch_predictability(tmp_path / "plain", donors / "cells.h5ad")
    adv_probe, adv_asw = _batch_predictability(tmp_path / "adversarial", donors / "cells.h5ad")
    # measured (seeds 0 and 1): probe 0.67 -> 0.26-0.28 (chance 0.25); batch ASW 0.88-0.92 -> 0.97
    assert plain_probe > 0.55 and adv_probe < plain_probe - 0.25, (plain_probe, adv_probe)
    assert adv_asw > plain_asw + 0.03, (plain_asw, adv_asw)


def test_adversarial_batch_key_errors(donors, tmp_path):
    with pytest.raises(ValueError, match="no obs column 'donor' for --adversarial-batch-key"):
        _finetune(donors, tmp_path / "o", "--adversarial-batch-key", "donor")
