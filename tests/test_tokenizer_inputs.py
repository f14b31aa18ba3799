"""Bad input to GeneTokenizer and the chunked AnnData reader: a clear error, never a silently wrong sentence."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from hf_scfm.tokenization.anndata_io import iter_count_chunks, read_h5ad, validate_counts
from hf_scfm.tokenization import GeneTokenizer

GENES = ["ENSG00000141510", "ENSG00000111640", "ENSG00000075624", "ENSG00000000003", "ENSG00000000005"]


@pytest.fixture(scope="module")
def tok():
    return GeneTokenizer.from_genes(GENES, encoding="continuous")


def _counts():
    return np.array([[3, 0, 1, 2, 0], [0, 5, 5, 0, 1], [1, 1, 0, 0, 7]], dtype=np.float32)


def test_no_or_too_few_genes_match(tok):
    with pytest.raises(ValueError, match=r"Only 0 of 3 input genes \(0.0%\) match.*Unmatched e.g.: FOO, BAR"):
        tok(np.ones((2, 3)), gene_ids=["FOO", "BAR", "BAZ"])
    genes = GENES[:1] + [f"NOPE{i}" for i in range(4)]
    with pytest.raises(ValueError, match=r"Only 1 of 5 input genes \(20.0%\).*min_match_rate"):
        tok(_counts(), gene_ids=genes)
    lenient = GeneTokenizer.from_genes(GENES, encoding="continuous", min_match_rate=0.1)
    assert lenient(_counts(), gene_ids=genes, return_tensors="np")["input_ids"].shape == (3, 2)
    strict = GeneTokenizer.from_genes(GENES, encoding="continuous", min_genes=6)
    with pytest.raises(ValueError, match=r">= 6 genes"):
        strict(_counts(), gene_ids=GENES)


def test_non_integer_and_log_normalised_values(tok):
    x = _counts()
    x[0, 0], x[2, 4] = 2.5, 70
    with pytest.raises(ValueError, match=r"Expected raw counts.*not integers \(e.g. 2.5\).*look normalised.*check_counts=False"):
        tok(x, gene_ids=GENES)
    with pytest.raises(ValueError, match="look log-normalised"):
        tok(np.log1p(_counts()), gene_ids=GENES)
    # normalised (non-log) data on purpose: re-normalising to 10,000 per cell leaves the result unchanged
    raw = tok(_counts(), gene_ids=GENES, return_tensors="np")
    cp10k = _counts() / _counts().sum(1, keepdims=True) * 10_000
    on_purpose = tok(cp10k, gene_ids=GENES, return_tensors="np", check_counts=False)
    np.testing.assert_array_equal(on_purpose["input_ids"], raw["input_ids"])
    np.testing.assert_allclose(on_purpose["values"], raw["values"], rtol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (-1.0, r"1 negative values \(min -1\).*raw UMI counts"),
    (np.nan, r"1 NaN and 0 infinite values"),
    (np.inf, r"0 NaN and 1 infinite values"),
])
def test_negative_nan_inf(tok, bad, message):
    for make in (np.asarray, sp.csr_matrix):
        x = _counts()
        x[1, 3] = bad
        with pytest.raises(ValueError, match=message):
            tok(make(x), gene_ids=GENES)


def test_cells_without_counts_are_an_error(tok):
    x = _counts()
    x[1] = 0
    with pytest.raises(ValueError, match=r"1 cell\(s\) have no counts.*e.g. 1\b.*drop them first"):
        tok(x, gene_ids=GENES)
    import anndata as ad

    adata = ad.AnnData(X=sp.csr_matrix(x))
    adata.obs_names = ["a", "b", "c"]
    adata.var_names = GENES
    with pytest.raises(ValueError, match=r"1 cell\(s\) have no counts.*e.g. b"):
        tok(adata)


def test_cell_whose_genes_do_not_match_gets_an_empty_sentence(tok):
    x = np.zeros((2, 6), dtype=np.float32)
    x[0, :5] = 1
    x[1, 5] = 4  # counts only on the unmatched gene
    enc = tok(x, gene_ids=GENES + ["UNKNOWN"], return_tensors="np")
    assert enc["input_ids"][1].tolist() == [2, 0, 0, 0, 0, 0] and enc["attention_mask"][1].sum() == 1
    # the unmatched gene still counts towards the library size (SPEC: sum over all the cell's genes)
    np.testing.assert_allclose(enc["values"][0, 1], np.log1p(10_000 / 5), rtol=1e-6)


def test_duplicate_genes_are_summed_with_a_warning(tok):
    x = _counts()
    genes = [GENES[0], GENES[1], "ENSG00000141510.3", GENES[3], GENES[4]]  # column 2 duplicates column 0
    with pytest.warns(UserWarning, match=r"1 input genes map to a token.*summed"):
        enc = tok(x, gene_ids=genes, return_tensors="np")
    report = tok.mapping_report(genes)
    assert report.duplicates == {"ENSG00000141510.3": "ENSG00000141510"} and report.n_tokens == 4
    merged = np.stack([x[:, 0] + x[:, 2], x[:, 1], x[:, 3], x[:, 4]], axis=1)
    expected = tok(merged, gene_ids=[genes[0], genes[1], genes[3], genes[4]], return_tensors="np")
    np.testing.assert_array_equal(enc["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(enc["values"], expected["values"])


def test_missing_or_non_h5ad_paths(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No such h5ad file: '.*missing.h5ad'"):
        tok(str(tmp_path / "missing.h5ad"))
    text = tmp_path / "cells.h5ad"
    text.write_text("gene,count\nTP53,1\n")
    with pytest.raises(ValueError, match=r"is not an .h5ad file \(not HDF5\)"):
        tok(str(text))
    import h5py

    with h5py.File(tmp_path / "other.h5ad", "w") as fh:
        fh["x"] = np.arange(3)
    with pytest.raises(ValueError, match="HDF5 file but not a readable AnnData"):
        read_h5ad(tmp_path / "other.h5ad")
    with pytest.raises(ValueError, match="is a directory"):
        tok.fit_medians(str(tmp_path))


def test_rank_without_medians_is_an_error():
    rank = GeneTokenizer.from_genes(GENES, encoding="rank")
    with pytest.raises(ValueError, match=r"needs per-gene medians.*fit_medians.*use_unit_medians"):
        rank(_counts(), gene_ids=GENES)
    rank.use_unit_medians()
    enc = rank(_counts(), gene_ids=GENES, return_tensors="np")
    # unit medians: ordered by count, ties by token id
    t = {g: rank._token_to_id[g] for g in GENES}
    assert enc["input_ids"][1, 1:4].tolist() == sorted([t[GENES[1]], t[GENES[2]]]) + [t[GENES[4]]]


def test_matrix_without_gene_ids_and_shape_errors(tok):
    with pytest.raises(ValueError, match=r"needs its gene names: call tokenizer\(matrix, gene_ids="):
        tok(_counts())
    with pytest.raises(ValueError, match="gene_ids has 4 names but the matrix has 5 columns"):
        tok(_counts(), gene_ids=GENES[:4])
    with pytest.raises(TypeError, match="Unexpected arguments"):
        tok(_counts(), gene_ids=GENES, stride=3)
    with pytest.raises(ValueError, match="Unknown encoding 'bpe'"):
        GeneTokenizer.from_genes(GENES, encoding="bpe")


def test_iter_count_chunks_for_the_corpus_builder(tmp_path):
    import anndata as ad

    x = sp.csr_matrix(_counts())
    adata = ad.AnnData(X=x)
    adata.var_names = GENES
    adata.obs["n_counts"] = [100.0, 200.0, 300.0]
    adata.obs["cell_type"] = ["a", "b", "c"]
    path = tmp_path / "c.h5ad"
    adata.write_h5ad(path)
    chunks = list(iter_count_chunks(str(path), chunk_size=2))
    assert [c.shape for c, _ in chunks] == [(2, 5), (1, 5)]
    assert all(sp.isspmatrix_csr(c) for c, _ in chunks)
    assert chunks[1][1]["cell_type"].tolist() == ["c"] and chunks[0][1]["n_counts"].tolist() == [100.0, 200.0]
    np.testing.assert_array_equal(sp.vstack([c for c, _ in chunks]).toarray(), _counts())
    # without obs["n_counts"] the library size is the row sum
    del adata.obs["n_counts"]
    (_, obs), = iter_count_chunks(adata, chunk_size=10)
    np.testing.assert_array_equal(obs["n_counts"].to_numpy(), _counts().sum(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_counts(x)  # good counts: silent
