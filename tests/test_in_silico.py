"""In silico perturbation (hf_scfm.tasks.in_silico): deletion and overexpression equal runs on hand-edited
sentences; cells without the gene are skipped and counted; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_scfm.tasks.in_silico import in_silico_perturb, perturb_sentence
from hf_scfm.training.families import FAMILIES

from test_pretrain import small_adata, small_tokenizer

MAX_LEN = 40


@pytest.fixture(scope="module")
def rank_model():
    adata = small_adata("mouse", n_cells=16)[:12].copy()
    tok = small_tokenizer(adata, "mouse", "rank")
    family = FAMILIES["mouse_genemamba"]
    torch.manual_seed(0)
    config = family.config_cls.from_preset("tiny", vocab_size=len(tok), vocab_checksum=tok.vocab_checksum)
    model = family.get(family.model_class)(config).eval()
    return model, tok, adata


def run(model, ids, vals):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), values=torch.tensor([vals], dtype=torch.float32),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out.cell_embedding[0].double(), out.last_hidden_state[0].double()


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1))


def partly_expressed_gene(tok, adata):
    """A gene in some but not all of the cells' sentences (token id, Ensembl ID, cells holding it)."""
    enc = tok(adata, max_length=MAX_LEN, padding=False)
    for t in range(6, len(tok)):
        holders = [i for i, ids in enumerate(enc["input_ids"]) if t in ids]
        if 2 <= len(holders) <= len(enc["input_ids"]) - 2:
            return t, tok.genes[t - 6], holders, enc
    raise AssertionError("no partly expressed gene")


def test_delete_equals_hand_edited_sentence(rank_model):
    model, tok, adata = rank_model
    t, gene, holders, enc = partly_expressed_gene(tok, adata)
    result = in_silico_perturb(model, adata, gene, tokenizer=tok, max_length=MAX_LEN, batch_size=5)
    summary = result.summary.iloc[0]
    assert summary["n_cells"] == len(holders) and summary["n_skipped"] == adata.n_obs - len(holders)
    assert list(result.cells["cell"]) == [adata.obs_names[i] for i in holders]

    sums, counts = {}, {}
    for row, i in enumerate(holders):
        ids, vals = enc["input_ids"][i].tolist(), enc["values"][i].tolist()
        pos = ids.index(t)
        new_ids, new_vals = ids[:pos] + ids[pos + 1:], vals[:pos] + vals[pos + 1:]  # by hand
        emb_o, hid_o = run(model, ids, vals)
        emb_p, hid_p = run(model, new_ids, new_vals)
        assert result.cells["cosine_similarity"].iloc[row] == pytest.approx(cos(emb_o, emb_p), abs=1e-6)
        assert result.cells["shift"].iloc[row] == pytest.approx(1 - cos(emb_o, emb_p), abs=1e-6)
        for p_new, g in enumerate(new_ids):
            if g >= 6:
                c = cos(hid_o[ids.index(g)], hid_p[p_new])
                sums[g] = sums.get(g, 0.0) + c
                counts[g] = counts.get(g, 0) + 1
                if p_new < pos:  # a causal model: genes ranked above the deleted one do not move
                    assert c == pytest.approx(1.0, abs=1e-6)
    genes = result.genes.set_index("gene_id")
    assert len(genes) == len(sums)
    for g, total in sums.items():
        row = genes.loc[tok.genes[g - 6]]
        assert row["n_cells"] == counts[g]
        assert row["cosine_similarity"] == pytest.approx(total / counts[g], abs=1e-6)
    assert (np.diff(result.genes["shift"].to_numpy()) <= 1e-12).all()  # largest shift first
    assert result.genes["shift"].iloc[0] > 1e-4


def test_overexpress_moves_to_front_and_inserts(rank_model):
    model, tok, adata = rank_model
    t, gene, holders, enc = partly_expressed_gene(tok, adata)
    result = in_silico_perturb(model, adata, gene, tokenizer=tok, mode="overexpress", max_length=MAX_LEN)
    assert result.summary.iloc[0]["n_cells"] == adata.n_obs and result.summary.iloc[0]["n_skipped"] == 0
    absent = next(i for i in range(adata.n_obs) if i not in holders)
    ids, vals = enc["input_ids"][absent].tolist(), enc["values"][absent].tolist()
    new_ids = [ids[0], t] + ids[1:]
    new_vals = [vals[0], vals[1]] + vals[1:]
    if len(new_ids) > MAX_LEN:  # the last gene makes room; <eos> stays
        new_ids, new_vals = new_ids[:-2] + new_ids[-1:], new_vals[:-2] + new_vals[-1:]
    assert (new_ids, new_vals) == perturb_sentence(ids, vals, t, "overexpress", n_prefix=1, n_suffix=1,
                                                  max_length=MAX_LEN)
    emb_o, _ = run(model, ids, vals)
    emb_p, _ = run(model, new_ids, new_vals)
    row = result.cells.set_index("cell").loc[adata.obs_names[absent]]
    assert not row["in_sentence"] and row["cosine_similarity"] == pytest.approx(cos(emb_o, emb_p), abs=1e-6)


def test_perturb_sentence_rules():
    ids, vals = [5, 10, 11, 12, 3], [0.0, 3.0, 2.0, 1.0, 0.0]
    assert perturb_sentence(ids, vals, 11, "delete", n_prefix=1, n_suffix=1) == ([5, 10, 12, 3], [0.0, 3.0, 1.0, 0.0])
    assert perturb_sentence(ids, vals, 99, "delete", n_prefix=1, n_suffix=1) is None
    assert perturb_sentence(ids, vals, 12, "overexpress", n_prefix=1, n_suffix=1) == (
        [5, 12, 10, 11, 3], [0.0, 1.0, 3.0, 2.0, 0.0])
    assert perturb_sentence(ids, vals, 99, "overexpress", n_prefix=1, n_suffix=1, max_length=5) == (
        [5, 99, 10, 11, 3], [0.0, 3.0, 3.0, 2.0, 0.0])


def test_errors_and_symbols(rank_model):
    model, tok, adata = rank_model
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        in_silico_perturb(model, adata, ["Nonexistentgene1"], tokenizer=tok, max_length=MAX_LEN)
    enc = tok(adata, max_length=MAX_LEN, padding=False)
    seen = {t for ids in enc["input_ids"] for t in ids}
    unseen = next(g for i, g in enumerate(tok.genes) if i + 6 not in seen)
    with pytest.raises(ValueError, match="in none of the 12 cells' sentences"):
        in_silico_perturb(model, adata, [unseen], tokenizer=tok, max_length=MAX_LEN)
    with pytest.raises(ValueError, match="choose one of"):
        in_silico_perturb(model, adata, ["Ins2"], tokenizer=tok, mode="knockdown")
    # a symbol works as well as the Ensembl ID
    by_symbol = in_silico_perturb(model, adata[:4], "Ins2", tokenizer=tok, max_length=MAX_LEN)
    assert by_symbol.summary.iloc[0]["symbol"] == "Ins2" and by_symbol.summary.iloc[0]["n_cells"] >= 1
    binned = small_tokenizer(adata, "mouse", "binned")
    with pytest.raises(ValueError, match="encodes cells otherwise than model.*encoding 'binned' \\(model: 'rank'\\)"):
        in_silico_perturb(model, adata, ["Ins2"], tokenizer=binned, mode="overexpress")
