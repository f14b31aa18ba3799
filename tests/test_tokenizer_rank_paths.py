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
