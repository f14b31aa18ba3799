"""Cell and gene embeddings (hf_scfm.tasks.embedding): order, determinism, equality with direct model calls,
hand-computed context averages, and the ``hf-scfm embed`` command (h5ad, UMAP PNG, Parquet)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_scfm.cli import main
from hf_scfm.tasks.embedding import embed, gene_embeddings
from hf_scfm.training.families import FAMILIES

from test_pretrain import ENCODING, small_adata, small_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per family: a tiny random-init pretraining checkpoint (folder), its backbone, tokenizer and 20 real cells."""
    root = tmp_path_factory.mktemp("embed")
    out = {}
    for name in ("scmamba2", "mouse_genemamba"):
        species, encoding = ENCODING[name]
        adata = small_adata(species, n_cells=24)[:20].copy()
        tok = small_tokenizer(adata, species, encoding)
        family = FAMILIES[name]
        torch.manual_seed(0)
        config = family.config_cls.from_preset("tiny", vocab_size=len(tok), vocab_checksum=tok.vocab_checksum)
        family.pretraining_cls()(config).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        adata.write_h5ad(root / f"{name}.h5ad")
        backbone = family.get(family.model_class).from_pretrained(root / name).eval()
        out[name] = {"dir": root / name, "h5ad": root / f"{name}.h5ad", "adata": adata, "tok": tok,
                     "model": backbone}
    return out


@pytest.mark.parametrize("name", ["scmamba2", "mouse_genemamba"])
def test_cell_embeddings_match_direct_model_call(saved, name):
    s = saved[name]
    adata = s["adata"].copy()
    assert embed(s["dir"], adata, batch_size=7, max_length=48, progress=False) is None  # 3 batches, last one short
    x = adata.obsm[f"X_{name}"]
    assert x.shape == (20, s["model"].config.hidden_size) and x.dtype == np.float32
    # same cells, one direct call (different padding: right padding must not change a cell's embedding)
    enc = s["tok"](adata, max_length=48, padding=True, return_tensors="pt")
    with torch.no_grad():
        direct = s["model"](**enc).cell_embedding.numpy()
    np.testing.assert_allclose(x, direct, rtol=0, atol=2e-5)
    assert np.abs(x[0] - x[1]).max() > 1e-3  # different cells, different embeddings (order kept)
    # deterministic, and independent of the batch size
    again = embed(s["model"], s["adata"], tokenizer=s["tok"], batch_size=20, max_length=48, progress=False, copy=True)
    np.testing.assert_allclose(again.obsm[f"X_{name}"], x, rtol=0, atol=2e-5)
    assert f"X_{name}" not in s["adata"].obsm and again is not s["adata"]  # copy=True leaves the input alone
    assert adata.uns[f"X_{name}_params"]["max_length"] == 48
    # one pass gives the context gene embeddings too, under a documented key
    embed(s["model"], adata, tokenizer=s["tok"], batch_size=20, max_length=48, progress=False,
          gene_embeddings="context")
    genes = adata.uns[f"X_{name}_gene_embeddings"]
    alone = gene_embeddings(s["model"], tokenizer=s["tok"], kind="context", adata=adata, batch_size=20, max_length=48,
                            progress=False)
    assert genes.equals(alone) and genes.index.name == "gene_id"


@pytest.mark.parametrize("name", ["scmamba2", "mouse_genemamba"])
def test_length_grouped_batches_give_each_cell_its_own_embedding(saved, name):
    """Cells of different lengths (max_length 2,048: nothing truncated), batches of 6 cut from the length order,
    padded per batch: every cell's embedding equals the one it gets alone (batch 1), in the AnnData's order."""
    from hf_scfm.tasks.embedding import length_order

    s = saved[name]
    model = s["model"].double()
    try:
        adata = s["adata"]
        order = length_order(adata)
        nnz = np.diff(adata.X.tocsr().indptr)
        assert len(set(nnz)) > 5 and list(nnz[order]) == sorted(nnz, reverse=True)
        assert not np.array_equal(order, np.arange(adata.n_obs))  # the order is not the input's
        kw = dict(tokenizer=s["tok"], max_length=2048, progress=False, copy=True)
        grouped = embed(model, adata, batch_size=6, **kw).obsm[f"X_{name}"]
        ungrouped = embed(model, adata, batch_size=6, group_by_length=False, **kw).obsm[f"X_{name}"]
        alone = embed(model, adata, batch_size=1, **kw).obsm[f"X_{name}"]
    finally:
        model.float()
    np.testing.assert_allclose(grouped, alone, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ungrouped, alone, rtol=0, atol=1e-6)
    assert np.abs(alone[0] - alone[1]).max() > 1e-3


def test_input_gene_embeddings_are_the_table_rows(saved):
    s = saved["scmamba2"]
    frame = gene_embeddings(s["dir"], kind="input")
    table = s["model"].get_input_embeddings().weight.detach().numpy()
    assert list(frame.index) == s["tok"].genes and frame.index.name == "gene_id"
    assert frame.index[0].startswith("ENSG") and set(frame["symbol"]) >= {"INS", "GCG"}
    dims = frame[[c for c in frame.columns if c.startswith("dim_")]].to_numpy()
    np.testing.assert_array_equal(dims, table[6:])
    assert dims.shape == (len(s["tok"]) - 6, s["model"].config.hidden_size)


@pytest.mark.parametrize("name", ["scmamba2", "mouse_genemamba"])
def test_context_gene_embeddings_equal_hand_average(saved, name):
    s = saved[name]
    cells = s["adata"][:3].copy()
    frame = gene_embeddings(s["model"], tokenizer=s["tok"], kind="context", adata=cells, batch_size=2,
                            max_length=40, progress=False)
    enc = s["tok"](cells, max_length=40, padding=False, truncation=True)
    sums, counts = {}, {}
    for ids, vals in zip(enc["input_ids"], enc["values"]):  # each cell alone: no padding at all
        with torch.no_grad():
            hidden = s["model"](input_ids=torch.tensor([ids]), values=torch.tensor([vals]),
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long)).last_hidden_state[0]
        for pos, t in enumerate(ids):
            if t >= 6:
                sums[t] = sums.get(t, 0) + hidden[pos].double().numpy()
                counts[t] = counts.get(t, 0) + 1
    genes = s["tok"].genes
    expected = {genes[t - 6]: (sums[t] / counts[t], counts[t]) for t in sums}
    assert set(frame.index) == set(expected)
    assert frame["count"].max() >= 2 and frame["count"].min() == 1  # shared and private genes both covered
    dims = [c for c in frame.columns if c.startswith("dim_")]
    for gene, (mean, count) in expected.items():
        assert frame.at[gene, "count"] == count
        np.testing.assert_allclose(frame.loc[gene, dims].to_numpy(dtype=np.float64), mean, rtol=0, atol=3e-5)


def test_embed_command_writes_h5ad_umap_and_parquet(saved, tmp_path, capsys):
    import anndata
    import pandas as pd

    s = saved["mouse_genemamba"]
    out = tmp_path / "res" / "cells.h5ad"
    rc = main(["embed", "--model", str(s["dir"]), "--query", str(s["h5ad"]), "--out", str(out), "--color", "cell_type",
               "--gene-embeddings", "context", "--max-length", "48", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    written = anndata.read_h5ad(out)
    assert "X_mouse_genemamba_gene_embeddings" not in written.uns  # written to Parquet instead
    assert written.obsm["X_mouse_genemamba"].shape == (20, s["model"].config.hidden_size)
    assert written.obsm["X_mouse_genemamba_umap"].shape == (20, 2)
    png = out.with_name("cells_umap.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    genes = pd.read_parquet(out.with_name("cells_gene_embeddings_context.parquet"))
    assert genes.index.name == "gene_id" and (genes["count"] >= 1).all()
    assert "cells_umap.png" in capsys.readouterr().out

    rc = main(["embed", "--model", str(s["dir"]), "--query", str(s["h5ad"]), "--out", str(tmp_path / "x.h5ad"),
               "--color", "donor", "--no-progress"])
    assert rc == 2 and "No obs column 'donor'" in capsys.readouterr().err


def test_embed_errors_are_clear(saved, tmp_path):
    s = saved["scmamba2"]
    unnamed = s["adata"].copy()
    unnamed.var_names = [f"feature{i}" for i in range(unnamed.n_vars)]  # e.g. var_names left as row numbers
    with pytest.raises(ValueError, match="Only 0 of 300 input genes .* match this tokenizer's human vocabulary"):
        embed(s["dir"], unnamed, progress=False)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        embed(s["model"], s["adata"], progress=False)
    with pytest.raises(ValueError, match="kind='context' averages"):
        gene_embeddings(s["dir"], kind="context")
    with pytest.raises(ValueError, match="choose 'input'"):
        gene_embeddings(s["dir"], kind="output")
