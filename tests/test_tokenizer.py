"""GeneTokenizer: encodings against a slow per-cell reference on real cells, saving/loading, input forms.

The reference below follows the definitions of ``hf_scfm/tokenization/encodings.py`` one cell at a time
with plain Python/NumPy (dicts, ``sorted``, Python-int SplitMix64): no code shared with the fast path.
"""

from __future__ import annotations

import bisect
import json
import math
import struct

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import hf_scfm
from hf_scfm.tokenization import GeneTokenizer
from hf_scfm.tokenization.special_tokens import (
    BOS_TOKEN_ID,
    CLS_TOKEN_ID,
    EOS_TOKEN_ID,
    HUMAN_VOCAB_SIZE,
    MOUSE_VOCAB_SIZE,
    PAD_TOKEN_ID,
)

DATASETS = {"baron_human": "human", "baron_mouse": "mouse", "pbmc68k": "human"}
N_CELLS = 12
MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


# ----------------------------------------------------------------------------- reference
def _mix(z: int) -> int:
    z &= MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def reference_sentence(row, n_counts, col_tokens, encoding, n_genes, medians=None, n_bins=51, seed=0,
                       include_zero_genes=False):
    """One cell -> (token ids, values) of the gene part, straight from the definitions."""
    counts = {int(t): 0.0 for t in col_tokens if t >= 0} if include_zero_genes else {}
    for j in np.flatnonzero(row):
        t = int(col_tokens[j])
        if t >= 0:
            counts[t] = counts.get(t, 0.0) + float(np.float32(row[j]))
    counts = {t: float(np.float32(c)) for t, c in counts.items()}
    expressed = sorted(t for t, c in counts.items() if c != 0)
    x_norm = {t: counts[t] / n_counts * 10_000 for t in counts}
    if encoding == "rank":
        score = {t: float(np.float32(x_norm[t] / medians[t])) for t in expressed}
        order = sorted(expressed, key=lambda t: (-score[t], t))[:n_genes]
        return order, [float(np.float32(math.log1p(x_norm[t]))) for t in order]
    # cell hash: sum over expressed genes of mix(token * golden ^ f32 bits of count), then mixed with the seed
    h = sum(_mix(((t * GOLDEN) & MASK64) ^ _f32_bits(counts[t])) for t in expressed) & MASK64
    cell = _mix(h ^ _mix((seed + GOLDEN) & MASK64))
    candidates = sorted(counts) if include_zero_genes else expressed
    if len(candidates) > n_genes:
        key = {t: _mix(cell + (t + 1) * GOLDEN) >> 32 for t in candidates}
        candidates = sorted(sorted(candidates, key=lambda t: (key[t], t))[:n_genes])
    if encoding == "continuous":
        return candidates, [float(np.float32(math.log1p(x_norm[t]))) for t in candidates]
    n = len(expressed)
    ascending = sorted(counts[u] for u in expressed)
    values = []
    for t in candidates:
        if counts[t] == 0:
            values.append(0.0)
        else:
            r = bisect.bisect_left(ascending, counts[t])  # expressed genes with a smaller count
            values.append(float(1 + (n_bins - 1) * r // n))
    return candidates, values


def reference_medians(adata, col_tokens):
    """Per token: median of the non-zero float32 x_norm over all cells (numpy median, float64)."""
    X = sp.csr_matrix(adata.X)
    lib = adata.obs["n_counts"].to_numpy() if "n_counts" in adata.obs else np.asarray(X.sum(1)).ravel()
    vals = {}
    for i in range(X.shape[0]):
        for j, c in zip(X.indices[X.indptr[i]:X.indptr[i + 1]], X.data[X.indptr[i]:X.indptr[i + 1]]):
            if col_tokens[j] >= 0 and c > 0:
                vals.setdefault(int(col_tokens[j]), []).append(np.float32(float(np.float32(c)) / lib[i] * 10_000))
    return {t: float(np.median(np.asarray(v, dtype=np.float64))) for t, v in vals.items()}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizers():
    return {sp_: GeneTokenizer.from_species(sp_, encoding="continuous") for sp_ in ("human", "mouse")}


@pytest.fixture(scope="module")
def cells():
    """First cells of each bundled dataset plus the cells with the most genes (truncation/sampling active)."""
    out = {}
    for name in DATASETS:
        adata = hf_scfm.load_example(name)
        nnz = np.diff(adata.X.indptr)
        pick = np.unique(np.concatenate([np.arange(N_CELLS // 2), np.argsort(-nnz, kind="stable")[: N_CELLS // 2]]))
        out[name] = adata[pick].copy()
    return out


def _col_tokens(tok, adata):
    from hf_scfm.tokenization.gene_tables import load_gene_table, map_genes

    ids, _ = map_genes(list(adata.var_names), {t: i for i, t in enumerate(tok._tokens)}, load_gene_table(tok.species))
    return ids


def _retarget(tok, encoding, **settings):
    """Same vocabulary, another encoding (cheap: reuses the token list)."""
    return GeneTokenizer(vocab=tok._tokens, encoding=encoding, species=tok.species, **settings)


def _check_against_reference(tok, adata, max_length, medians=None, seed=0):
    enc = tok(adata, max_length=max_length, return_tensors="np", seed=seed)
    col_tokens = _col_tokens(tok, adata)
    X = sp.csr_matrix(adata.X).toarray()
    lib = adata.obs["n_counts"].to_numpy() if "n_counts" in adata.obs else X.sum(1)
    prefix = [tok._token_to_id[t] for t in tok.prefix_tokens]
    suffix = [tok._token_to_id[t] for t in tok.suffix_tokens]
    n_genes = max_length - len(prefix) - len(suffix)
    for i in range(adata.n_obs):
        ids, vals = reference_sentence(X[i], float(lib[i]), col_tokens, tok.encoding, n_genes, medians,
                                       tok.n_bins, seed, tok.include_zero_genes)
        full_ids = prefix + ids + suffix
        n = len(full_ids)
        assert enc["input_ids"][i, :n].tolist() == full_ids, f"cell {i}"
        np.testing.assert_array_equal(enc["values"][i, :n], np.array([0.0] * len(prefix) + vals + [0.0] * len(suffix), np.float32))
        assert enc["attention_mask"][i, :n].all() and not enc["attention_mask"][i, n:].any()
        assert not enc["input_ids"][i, n:].any() and not enc["values"][i, n:].any()
    return enc


# ----------------------------------------------------------------------------- encodings vs reference
@pytest.mark.parametrize("name", list(DATASETS))
@pytest.mark.parametrize("encoding", ["rank", "binned", "continuous"])
def test_encodings_match_reference_on_real_cells(tokenizers, cells, name, encoding):
    adata = cells[name]
    tok = _retarget(tokenizers[DATASETS[name]], encoding, n_bins=11 if encoding == "binned" else 51)
    medians = None
    if encoding == "rank":
        fitted = tok.fit_medians(adata)
        col_tokens = _col_tokens(tok, adata)
        ref = reference_medians(adata, col_tokens)
        assert set(fitted) == {tok._tokens[t] for t in ref}
        for t, m in ref.items():
            assert fitted[tok._tokens[t]] == pytest.approx(m, rel=1e-6)
        medians = {t: tok._medians[t] for t in ref}
    # short sentences: truncation (rank) / sampling (binned, continuous) on every cell; long: mostly complete cells
    for max_length in (33, 1500):
        enc = _check_against_reference(tok, adata, max_length, medians)
    assert enc["input_ids"].shape[0] == adata.n_obs


def test_binned_with_zero_genes_matches_reference(tokenizers, cells):
    adata = cells["pbmc68k"][:6]
    tok = _retarget(tokenizers["human"], "binned", include_zero_genes=True, n_bins=5)
    enc = _check_against_reference(tok, adata, 100, seed=3)
    assert (enc["values"][:, 1:100] == 0).any()  # zero-expressed genes are in the sentence with bin 0


def test_special_tokens_and_values_layout(tokenizers, cells):
    adata = cells["baron_mouse"][:5]
    rank = _retarget(tokenizers["mouse"], "rank")
    rank.use_unit_medians()
    enc = rank(adata, max_length=50, return_tensors="pt")
    assert enc["input_ids"].dtype == torch.int64 and enc["values"].dtype == torch.float32
    assert enc["attention_mask"].dtype == torch.int64
    assert (enc["input_ids"][:, 0] == BOS_TOKEN_ID).all() and (enc["input_ids"][:, -1] == EOS_TOKEN_ID).all()
    assert (enc["values"][:, [0, -1]] == 0).all() and (enc["input_ids"][:, 1:-1] >= 6).all()
    binned = _retarget(tokenizers["mouse"], "binned")
    enc = binned(adata, max_length=50, return_tensors="pt")
    assert (enc["input_ids"][:, 0] == CLS_TOKEN_ID).all() and enc["input_ids"].shape == (5, 50)
    v = enc["values"][:, 1:]
    assert v.min() >= 1 and v.max() == 50 and (v == v.round()).all()  # expressed genes only: bins 1..n_bins-1
    custom = _retarget(tokenizers["mouse"], "continuous", prefix_tokens=["<cls>", "<bos>"], suffix_tokens=["<eos>"])
    ids = custom(adata, max_length=20)["input_ids"]
    assert all(r[:2].tolist() == [CLS_TOKEN_ID, BOS_TOKEN_ID] and r[-1] == EOS_TOKEN_ID and len(r) == 20 for r in ids)
    with pytest.raises(ValueError, match="must be special tokens"):
        _retarget(tokenizers["mouse"], "rank", prefix_tokens=["ACTB"])


def test_padding_truncation_and_return_types(tokenizers, cells):
    adata = cells["pbmc68k"][:4]
    tok = _retarget(tokenizers["human"], "continuous")
    n_expr = np.asarray((adata.X > 0).sum(1)).ravel()  # pbmc68k: all genes map (checked below)
    assert tok.mapping_report(adata).n_matched == adata.n_vars - len(tok.mapping_report(adata).unmatched)
    full = tok(adata, max_length=4096, return_tensors="np", return_length=True)
    lengths = full["length"]
    assert full["input_ids"].shape == (4, lengths.max())  # padding=True: to the longest
    ragged = tok(adata, max_length=4096, padding=False)
    assert [len(r) for r in ragged["input_ids"]] == lengths.tolist()
    assert [len(r) for r in ragged["values"]] == lengths.tolist()
    fixed = tok(adata, max_length=300, padding="max_length", return_tensors="pt")
    assert fixed["input_ids"].shape == (4, 300)
    untrunc = tok(adata, max_length=30, truncation=False, return_tensors="np", return_length=True)
    np.testing.assert_array_equal(untrunc["length"], lengths)
    lists = tok(adata, max_length=30)
    assert isinstance(lists["input_ids"], list) and len(lists["input_ids"][0]) == 30
    assert n_expr.max() > 30
    with pytest.raises(ValueError, match="cannot be stacked"):
        tok(adata, padding=False, return_tensors="pt")
    with pytest.raises(ValueError, match="leaves no room for genes"):
        tok(adata, max_length=1)


# ----------------------------------------------------------------------------- determinism and ties
def test_same_cell_same_seed_same_sentence_in_any_batch(tokenizers, cells):
    adata = cells["baron_human"]
    for encoding in ("binned", "continuous"):
        tok = _retarget(tokenizers["human"], encoding)
        whole = tok(adata, max_length=64, return_tensors="np")
        order = np.random.default_rng(1).permutation(adata.n_obs)
        shuffled = tok(adata[order], max_length=64, return_tensors="np", chunk_size=5)
        np.testing.assert_array_equal(shuffled["input_ids"], whole["input_ids"][order])
        np.testing.assert_array_equal(shuffled["values"], whole["values"][order])
        single = tok(adata[[7]], max_length=64, return_tensors="np")
        np.testing.assert_array_equal(single["input_ids"][0], whole["input_ids"][7])
        # the genes of the input in another column order give the same sentences
        perm = np.random.default_rng(2).permutation(adata.n_vars)
        np.testing.assert_array_equal(tok(adata[:, perm], max_length=64, return_tensors="np")["input_ids"],
                                      whole["input_ids"])
        other = tok(adata, max_length=64, return_tensors="np", seed=1)
        assert (other["input_ids"] != whole["input_ids"]).any(axis=1).mean() > 0.9


def test_rank_ties_broken_by_token_id(tokenizers):
    tok = _retarget(tokenizers["human"], "rank")
    tok.use_unit_medians()
    genes = ["ENSG00000141510", "ENSG00000111640", "ENSG00000075624", "ENSG00000000003"]  # TP53 GAPDH ACTB TSPAN6
    ids = [tok._token_to_id[g] for g in genes]
    counts = np.array([[1, 1, 1, 1], [2, 1, 2, 1], [0, 3, 3, 0]], dtype=np.float32)
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        enc = tok(counts[:, order], gene_ids=[genes[o] for o in order], max_length=10, return_tensors="np")
        assert enc["input_ids"][0, 1:5].tolist() == sorted(ids)
        assert enc["input_ids"][1, 1:5].tolist() == sorted(ids[:3:2]) + sorted(ids[1::2])
        assert enc["input_ids"][2, 1:3].tolist() == sorted(ids[1:3]) and enc["input_ids"][2, 3] == EOS_TOKEN_ID


# ----------------------------------------------------------------------------- input forms
def test_all_input_forms_give_the_same_encoding(tokenizers, cells, tmp_path):
    import anndata as ad
    import pandas as pd

    adata = cells["baron_mouse"][:8].copy()
    tok = _retarget(tokenizers["mouse"], "binned")
    ref = tok(adata, max_length=128, return_tensors="np")
    X = adata.X
    variants = {
        "dense": ad.AnnData(X=X.toarray(), obs=adata.obs, var=adata.var),
        "csc": ad.AnnData(X=sp.csc_matrix(X), obs=adata.obs, var=adata.var),
        "int": ad.AnnData(X=X.astype(np.int32), obs=adata.obs, var=adata.var),
    }
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    csc_path = tmp_path / "cells_csc.h5ad"
    variants["csc"].write_h5ad(csc_path)
    for key, data in variants.items():
        np.testing.assert_array_equal(tok(data, max_length=128, return_tensors="np")["input_ids"], ref["input_ids"], err_msg=key)
    for source in (str(path), path, ad.read_h5ad(path, backed="r"), ad.read_h5ad(csc_path, backed="r")):
        out = tok(source, max_length=128, return_tensors="np", chunk_size=3)
        np.testing.assert_array_equal(out["input_ids"], ref["input_ids"])
        np.testing.assert_array_equal(out["values"], ref["values"])
    genes = list(adata.var_names)
    for matrix in (X, X.toarray(), sp.csc_matrix(X)):
        np.testing.assert_array_equal(tok(matrix, gene_ids=genes, max_length=128, return_tensors="np")["values"], ref["values"])
    frame = pd.DataFrame(X.toarray(), columns=genes)
    np.testing.assert_array_equal(tok(frame, max_length=128, return_tensors="np")["input_ids"], ref["input_ids"])
    # Ensembl IDs (versioned) instead of symbols give the same tokens
    report_ids = tok._column_map(genes)[0]
    versioned = [tok._tokens[t] + ".7" if t >= 0 else g for g, t in zip(genes, np.where(report_ids.rank >= 0, report_ids.tokens[report_ids.rank], -1))]
    np.testing.assert_array_equal(tok(X, gene_ids=versioned, max_length=128, return_tensors="np")["input_ids"], ref["input_ids"])
    # matched columns already in token order (the path without the canonicalising sort), unmatched ones dropped
    token_of_col = np.where(report_ids.rank >= 0, report_ids.tokens[np.maximum(report_ids.rank, 0)], -1)
    in_order = np.argsort(np.where(token_of_col >= 0, token_of_col, 1 << 40), kind="stable")[: (token_of_col >= 0).sum()]
    sub = ad.AnnData(X=X[:, in_order], obs=adata.obs.assign(n_counts=np.asarray(X.sum(1)).ravel()))
    sub.var_names = [tok._tokens[t] for t in token_of_col[in_order]]
    assert tok._column_map(sub.var_names)[0].monotone
    np.testing.assert_array_equal(tok(sub, max_length=128, return_tensors="np")["values"], ref["values"])
    dense_path = tmp_path / "dense.h5ad"
    variants["dense"].write_h5ad(dense_path)
    np.testing.assert_array_equal(tok(ad.read_h5ad(dense_path, backed="r"), max_length=128, return_tensors="np")["values"],
                                  ref["values"])


def test_text_input_still_tokenizes_gene_ids(tokenizers):
    tok = tokenizers["human"]
    out = tok("ENSG00000141510 ENSG00000111640 NOTAGENE")
    assert out["input_ids"] == [tok._token_to_id["ENSG00000141510"], tok._token_to_id["ENSG00000111640"], 4]
    assert tok.convert_ids_to_tokens([0, 2, 6]) == ["<pad>", "<cls>", tok.genes[0]]


# ----------------------------------------------------------------------------- saving and loading
@pytest.mark.parametrize("species", ["human", "mouse"])
def test_autotokenizer_round_trip(tokenizers, cells, species, tmp_path):
    from transformers import AutoTokenizer

    name = "baron_human" if species == "human" else "baron_mouse"
    tok = _retarget(tokenizers[species], "rank", n_bins=7, seed=11, model_max_length=512)
    tok.fit_medians(cells[name])
    tok.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GeneTokenizer" and config["encoding"] == "rank" and config["species"] == species
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pkl"))
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is GeneTokenizer
    assert len(loaded) == len(tok) == len(hf_scfm.tokenization.load_gene_table(species)) + 6
    # the model configs' default vocab_size is this constant: it must follow the shipped tables
    assert len(tok) == {"human": HUMAN_VOCAB_SIZE, "mouse": MOUSE_VOCAB_SIZE}[species]
    assert loaded.vocab_checksum == tok.vocab_checksum
    assert (loaded.encoding, loaded.n_bins, loaded.seed, loaded.model_max_length) == ("rank", 7, 11, 512)
    assert loaded.prefix_tokens == tok.prefix_tokens and loaded.suffix_tokens == tok.suffix_tokens
    assert loaded.gene_medians == tok.gene_medians and len(tok.gene_medians) > 1000
    assert loaded.pad_token_id == 0 and loaded.mask_token_id == 1 and loaded.cls_token_id == 2
    assert loaded.eos_token_id == 3 and loaded.unk_token_id == 4 and loaded.bos_token_id == 5
    a, b = tok(cells[name], return_tensors="np"), loaded(cells[name], return_tensors="np")
    assert a["input_ids"].shape[1] == 512
    for key in ("input_ids", "values", "attention_mask"):
        np.testing.assert_array_equal(a[key], b[key])


def test_vocab_checksum_and_custom_gene_list(tokenizers):
    human = tokenizers["human"]
    expected = __import__("hashlib").sha256("\n".join(human._tokens).encode()).hexdigest()
    assert human.vocab_checksum == expected
    small = GeneTokenizer.from_species("human", genes=["TP53", "ENSG00000111640.15", "actb"], encoding="binned")
    assert small.genes == ["ENSG00000075624", "ENSG00000111640", "ENSG00000141510"] and len(small) == 9
    assert small.vocab_checksum != human.vocab_checksum
    assert GeneTokenizer.from_genes(small.genes).species == "human"
    with pytest.raises(ValueError, match="cannot be mapped to Ensembl IDs.*NOPE"):
        GeneTokenizer.from_genes(["TP53", "NOPE"], species="human")


def test_fit_medians_over_several_files_equals_concatenation(tokenizers, cells, tmp_path):
    import anndata as ad

    adata = cells["baron_mouse"]
    half = adata.n_obs // 2
    paths = [tmp_path / "a.h5ad", tmp_path / "b.h5ad"]
    adata[:half].copy().write_h5ad(paths[0])
    adata[half:].copy().write_h5ad(paths[1])
    tok = _retarget(tokenizers["mouse"], "rank")
    together = dict(tok.fit_medians(adata, chunk_size=1000))
    split = tok.fit_medians([str(p) for p in paths], chunk_size=4)
    assert split == together
    assert tok._medians_info["n_cells"] == adata.n_obs
    backed = tok.fit_medians(ad.read_h5ad(paths[0], backed="r"), chunk_size=3)
    assert backed == tok.fit_medians(adata[:half], chunk_size=100)


def test_summary_for_the_command_line(tokenizers, cells):
    tok = _retarget(tokenizers["human"], "binned")
    text = tok.summary(cells["baron_human"], max_length=256)
    lines = text.splitlines()
    assert lines[0].startswith("GeneTokenizer: human vocabulary of 78,900 tokens") and "encoding='binned'" in lines[0]
    assert "18,156 of 20,125 genes matched the vocabulary (90.2%)" in text
    assert "unknown: 1,741" in text and "ambiguous symbol: 228" in text
    n = cells["baron_human"].n_obs
    assert f"{n:,} cells -> input_ids ({n}, 256)" in text and "max 255" in text


# ----------------------------------------------------------------------------- gene subsets
@pytest.mark.parametrize("encoding", ["rank", "binned", "continuous"])
def test_gene_subset_reads_only_those_genes(cells, encoding, tmp_path):
    """A subset tokenizer on all genes == the full tokenizer on the subset's columns (library sizes of all genes),
    for every encoding, with truncation active; the subset survives save/load; None reads all genes again."""
    adata = cells["baron_human"]
    tok = GeneTokenizer.from_species("human", encoding=encoding, model_max_length=40)
    tok.fit_medians(adata) if encoding == "rank" else None
    unmatched = tok.mapping_report(adata).unmatched
    mapped = [g for g in adata.var_names if g not in unmatched]
    chosen = mapped[::7]  # ~2,600 symbols: many cells still have more than 40 of them expressed
    tok.select_genes(chosen)
    assert tok.gene_subset == sorted(set(tok.gene_subset)) and len(tok.gene_subset) <= len(chosen)
    lib = np.asarray(adata.X.sum(1)).ravel()
    got = tok(adata, return_tensors="np")
    full = GeneTokenizer.from_species("human", encoding=encoding, model_max_length=40)
    if encoding == "rank":
        full.set_medians(tok.gene_medians)
    expected = full(adata[:, chosen].copy(), n_counts=lib, return_tensors="np")
    for key in ("input_ids", "values", "attention_mask"):
        np.testing.assert_array_equal(got[key], expected[key])
    assert (got["attention_mask"].sum(1) == 40).any()  # some cells were cut: sampling/ranking over the subset

    report = tok.mapping_report(adata)
    assert report.n_tokens == len(tok.gene_subset) and report.reason_counts()["not selected"] > 1000
    tok.save_pretrained(tmp_path)
    loaded = GeneTokenizer.from_pretrained(str(tmp_path))
    assert loaded.gene_subset == tok.gene_subset
    np.testing.assert_array_equal(loaded(adata, return_tensors="np")["input_ids"], got["input_ids"])
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["gene_subset"] == tok.gene_subset
    tok.select_genes(None)
    assert tok.gene_subset is None and tok.mapping_report(adata).n_tokens > 10_000


def test_gene_subset_errors_name_the_problem(cells):
    adata = cells["baron_human"]
    tok = GeneTokenizer.from_species("human", encoding="binned")
    with pytest.raises(ValueError, match="not genes of this tokenizer's vocabulary: NOPE"):
        tok.select_genes(["INS", "NOPE"])
    with pytest.raises(ValueError, match="empty"):
        tok.select_genes([])
    tok.select_genes(["INS", "GCG", "SST", "PPY"])
    tok(adata[:, ["INS", "GCG", "SST", "A1BG"]].copy())  # 3 of the 4 selected genes: enough
    with pytest.raises(ValueError, match=r"Only 1 of this tokenizer's 4 selected genes .*must measure the genes"):
        tok(adata[:, ["INS", "A1BG", "A2M"]].copy())


def _mapped_reference(adata, tok):
    unmatched = tok.mapping_report(adata).unmatched
    return adata[:, [g for g in adata.var_names if g not in unmatched]].copy()


@pytest.mark.parametrize("flavor", ["pearson_residuals", "seurat"])
def test_highly_variable_gene_selection_matches_scanpy(cells, flavor):
    """select_highly_variable_genes == scanpy's HVGs over the mapped genes: Pearson residuals (the default) on the
    raw counts, the seurat flavour on log1p(CP10k)."""
    import scanpy as sc

    adata = hf_scfm.load_example("pbmc68k")
    tok = GeneTokenizer.from_species("human", encoding="binned")
    kwargs = {} if flavor == "pearson_residuals" else {"flavor": flavor}
    chosen = tok.select_highly_variable_genes(adata, n_top_genes=100, **kwargs)
    assert len(chosen) == 100 and tok.gene_subset == chosen

    ref = _mapped_reference(adata, tok)
    if flavor == "pearson_residuals":
        sc.experimental.pp.highly_variable_genes(ref, n_top_genes=100, flavor=flavor)
    else:
        sc.pp.normalize_total(ref, target_sum=1e4)
        sc.pp.log1p(ref)
        sc.pp.highly_variable_genes(ref, n_top_genes=100, flavor=flavor)
    expected = GeneTokenizer.from_species("human", encoding="binned")
    expected.select_genes(list(ref.var_names[ref.var["highly_variable"]]))
    assert chosen == expected.gene_subset
    with pytest.raises(ValueError, match="batch_key 'donor' is not an obs column"):
        tok.select_highly_variable_genes(adata, 100, batch_key="donor")
    assert tok.gene_subset == chosen  # a failed selection leaves the tokenizer as it was
    with pytest.raises(ValueError, match="Unknown flavor 'variance'.*pearson_residuals"):
        tok.select_highly_variable_genes(adata, 100, flavor="variance")
    assert tok.gene_subset == chosen


def test_highly_variable_genes_keep_the_pancreas_markers():
    """On Baron human's training donors (human1-3, per donor) the default selection keeps the markers of B, A, D,
    PP, acinar and ductal cells; the seurat dispersion flavour drops INS, GCG and SST (why it is not the default)."""
    adata = hf_scfm.load_example("baron_human")
    train = adata[adata.obs["batch"].astype(str) != "human4"].copy()
    tok = GeneTokenizer.from_species("human", encoding="binned")
    probe = GeneTokenizer.from_species("human", encoding="binned")
    probe.select_genes(["INS", "GCG", "SST", "PPY", "PRSS1", "KRT19"])  # symbols -> Ensembl IDs
    marker_ids = set(probe.gene_subset)
    chosen = set(tok.select_highly_variable_genes(train, 1000, batch_key="batch"))
    assert len(chosen) == 1000 and marker_ids <= chosen
    dispersion = set(tok.select_highly_variable_genes(train, 1000, batch_key="batch", flavor="seurat"))
    probe.select_genes(["INS", "GCG", "SST"])
    assert not set(probe.gene_subset) & dispersion
