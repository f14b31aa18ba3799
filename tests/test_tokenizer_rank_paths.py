"""The one-sort rank path (``encode_rank_csr``, straight from the CSR chunk, threaded over blocks of
rows) gives exactly the sentences of the canonical path (``encode_rank(gather_entries(...))``), which
tests/test_tokenizer.py pins to a slow per-cell reference: with explicit zeros stored in the matrix,
with shuffled input columns, with ties everywhere (unit medians), for any thread count and block size.
Inputs whose columns must be summed (duplicate genes) take the canonical path."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from hf_scfm import GeneTokenizer, load_example
from hf_scfm.tokenization import encodings as enc


@pytest.fixture(scope="module")
def cells():
    adata = load_example("baron_human")[:150].copy()
    return adata


def _both_paths(tok, counts, var_names, n_counts, **kw):
    colmap, _ = tok._column_map(var_names)
    medians = tok._median_array()
    fast = enc.encode_rank_csr(counts, colmap, n_counts, medians, 300, **kw)
    slow = enc.encode_rank(enc.gather_entries(counts, colmap, n_counts), medians, 300)
    return fast, slow


def _assert_same(fast, slow):
    assert fast is not None
    np.testing.assert_array_equal(fast.lengths, slow.lengths)
    np.testing.assert_array_equal(fast.token, slow.token)
    np.testing.assert_array_equal(fast.value, slow.value)


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("unit_medians", [False, True])
def test_fast_rank_path_equals_canonical_path(cells, monkeypatch, threads, unit_medians):
    monkeypatch.setenv("HF_SCFM_TOKENIZER_THREADS", threads)
    tok = GeneTokenizer.from_species("human", encoding="rank")
    tok.use_unit_medians() if unit_medians else tok.fit_medians(cells)
    counts = sp.csr_matrix(cells.X, dtype=np.float32)
    n_counts = np.asarray(counts.sum(1)).ravel()
    # explicit zeros stored in the matrix, and small blocks so many blocks run on the pool
    with_zeros = counts.copy()
    with_zeros.data[::7] = 0.0
    for matrix in (counts, with_zeros):
        fast, slow = _both_paths(tok, matrix, list(cells.var_names), n_counts, block_entries=4096)
        _assert_same(fast, slow)
        assert fast.lengths.max() == 300  # truncation is exercised


def test_fast_rank_path_ignores_input_column_order(cells):
    tok = GeneTokenizer.from_species("human", encoding="rank")
    tok.fit_medians(cells)
    perm = np.random.default_rng(0).permutation(cells.n_vars)
    a = tok(cells, max_length=256, return_tensors="np")
    b = tok(cells[:, perm], max_length=256, return_tensors="np")
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    np.testing.assert_array_equal(a["values"], b["values"])


def test_duplicate_columns_take_the_canonical_path_and_are_summed(cells):
    tok = GeneTokenizer.from_species("human", encoding="rank")
    tok.fit_medians(cells)
    names = list(cells.var_names)
    names[1] = names[0]  # two input columns, one gene
    counts = sp.csr_matrix(cells.X, dtype=np.float32)
    n_counts = np.asarray(counts.sum(1)).ravel()
    with pytest.warns(UserWarning, match="summed"):
        colmap, _ = tok._column_map(names)
    assert enc.encode_rank_csr(counts, colmap, n_counts, tok._median_array(), 300) is None


@pytest.mark.parametrize("block_entries", [64, 1 << 15])
def test_odd_rows_and_the_flat_layout(cells, block_entries):
    """Rows with no entry at all, with only unmatched genes, with one gene, with ties only and with more genes
    than n_genes, runs of hundreds of such rows inside one block: the one-sort path (and its flat output with
    the special tokens in place) equals the canonical path."""
    tok = GeneTokenizer.from_species("human", encoding="rank")
    tok.use_unit_medians()  # ties everywhere
    names = list(cells.var_names)
    colmap, _ = tok._column_map(names)
    matched = np.flatnonzero(colmap.rank >= 0)
    unmatched = np.flatnonzero(colmap.rank < 0)
    rng = np.random.default_rng(0)
    rows = [[], [(unmatched[0], 3.0)], [(matched[5], 1.0)], [(c, 2.0) for c in matched[:40]]]
    rows += [[(c, float(rng.integers(1, 4))) for c in rng.choice(matched, 500, replace=False)]]
    rows += [[] if i % 3 else [(matched[i], 1.0)] for i in range(400)]  # many short or empty rows in a block
    rows += [[(c, float(rng.integers(1, 50))) for c in np.sort(rng.choice(np.arange(len(names)), 900, replace=False))]]
    indptr = np.cumsum([0] + [len(r) for r in rows])
    cols = np.array([c for r in rows for c, _ in r], dtype=np.int32)
    vals = np.array([v for r in rows for _, v in r], dtype=np.float32)
    counts = sp.csr_matrix((vals, cols, indptr), shape=(len(rows), len(names)))
    n_counts = np.maximum(np.asarray(counts.sum(1)).ravel(), 1.0)
    medians = tok._median_array()
    slow = enc.encode_rank(enc.gather_entries(counts, colmap, n_counts), medians, 300)
    fast = enc.encode_rank_csr(counts, colmap, n_counts, medians, 300, block_entries=block_entries)
    _assert_same(fast, slow)
    assert slow.lengths[:4].tolist() == [0, 0, 1, 40] and slow.lengths.max() == 300
    flat = enc.encode_rank_flat(counts, colmap, n_counts, medians, 300, [2], [3], np.int32, block_entries=block_entries)
    for got, want in zip(flat, enc.flatten_sentences([slow], [2], [3], ids_dtype=np.int32)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
