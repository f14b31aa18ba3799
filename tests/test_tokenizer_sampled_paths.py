"""The compiled ``binned`` / ``continuous`` path (``encode_sampled_csr``: numba kernel, straight from the CSR
chunk) gives exactly the sentences of the NumPy path (``encode_binned`` / ``encode_continuous`` over
``gather_entries``), which tests/test_tokenizer.py pins to a slow per-cell reference: with explicit zeros,
shuffled input columns, non-integer and huge counts (the kernel's sort fallback), ties, sampling active,
odd chunk sizes, several threads and blocks. Also: ``encode_flat`` is ``__call__`` without the padding."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from hf_scfm import GeneTokenizer, load_example
from hf_scfm.tokenization import encodings as enc

pytestmark = pytest.mark.skipif(enc._sampled_kernel() is None, reason="numba not installed or HF_SCFM_NUMBA=0")


@pytest.fixture(scope="module")
def cells():
    """151 real cells: the first ones and the ones with the most genes (sampling active at 2048 too)."""
    adata = load_example("baron_human")
    nnz = np.diff(adata.X.indptr)
    pick = np.unique(np.concatenate([np.arange(120), np.argsort(-nnz, kind="stable")[:31]]))
    return adata[pick].copy()


@pytest.fixture(scope="module")
def tokenizer():
    return GeneTokenizer.from_species("human", encoding="binned")


def _variants(counts):
    """The counts as stored, with explicit zeros, with non-integer values in some cells and huge counts
    (>= 2**16) in others, and with every value tied within a cell for a few cells."""
    zeros = counts.copy()
    zeros.data[::7] = 0.0
    odd = counts.copy()
    rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    odd.data[rows % 5 == 1] *= np.float32(0.5)  # non-integer counts
    odd.data[(rows % 5 == 2) & (np.arange(counts.nnz) % 11 == 0)] += np.float32(70_000)  # beyond the histogram
    tied = counts.copy()
    tied.data[rows % 4 == 3] = 2.0
    return {"stored": counts, "explicit_zeros": zeros, "odd_values": odd, "ties": tied}


def _same(fast, slow):
    assert fast is not None
    np.testing.assert_array_equal(fast.lengths, slow.lengths)
    np.testing.assert_array_equal(fast.token, slow.token)
    np.testing.assert_array_equal(fast.value, slow.value)


@pytest.mark.parametrize("threads", ["1", "3"])
def test_compiled_path_equals_numpy_path(cells, tokenizer, monkeypatch, threads):
    monkeypatch.setenv("HF_SCFM_TOKENIZER_THREADS", threads)
    counts = sp.csr_matrix(cells.X, dtype=np.float32)
    perm = np.random.default_rng(0).permutation(cells.n_vars)
    for names, matrix_cols in ((list(cells.var_names), None), (list(cells.var_names[perm]), perm)):
        colmap, _ = tokenizer._column_map(names)
        assert not colmap.monotone  # symbols in input order are not in token (Ensembl ID) order
        variants = _variants(counts)
        if threads != "1" or matrix_cols is not None:  # the value variants once, on one thread, input order
            variants = {k: variants[k] for k in ("stored", "explicit_zeros")}
        for label, matrix in variants.items():
            if matrix_cols is not None:
                matrix = matrix[:, matrix_cols].tocsr()
            lib = np.asarray(matrix.sum(1)).ravel()
            entries = enc.gather_entries(matrix, colmap, lib)
            for n_genes, n_bins, seed in ((2047, 51, 0), (300, 11, 7), (33, 3, 1)):
                fast = enc.encode_sampled_csr(matrix, colmap, n_genes, seed, n_bins)
                _same(fast, enc.encode_binned(entries, n_genes, seed, n_bins))
                fast = enc.encode_sampled_csr(matrix, colmap, n_genes, seed, None, n_counts=lib)
                _same(fast, enc.encode_continuous(entries, n_genes, seed))
            assert (np.diff(entries.indptr) > 300).sum() > 20, label  # sampling is exercised


def test_tokenizer_output_is_the_same_with_and_without_numba(cells, tokenizer, monkeypatch):
    """Whole tokenizer calls, several odd-sized chunks, both encodings: the compiled path is the default."""
    cont = GeneTokenizer(vocab=tokenizer._tokens, encoding="continuous", species="human")
    runs = {}
    for use_numba in (True, False):
        if not use_numba:
            monkeypatch.setattr(enc, "_NB", {"sampled": None})
            monkeypatch.setattr(enc, "SAMPLED_BLOCK_ENTRIES", 5000)  # the NumPy path in blocks of a few rows
        runs[use_numba] = [t(cells, max_length=257, chunk_size=37, return_tensors="np", seed=5) for t in (tokenizer, cont)]
    for fast, slow in zip(runs[True], runs[False]):
        for key in ("input_ids", "values", "attention_mask"):
            np.testing.assert_array_equal(fast[key], slow[key])


def test_duplicate_columns_take_the_numpy_path(cells, tokenizer):
    names = list(cells.var_names)
    names[1] = names[0]  # two input columns, one gene: summed by gather_entries
    with pytest.warns(UserWarning, match="summed"):
        colmap, _ = tokenizer._column_map(names)
    assert enc.encode_sampled_csr(sp.csr_matrix(cells.X), colmap, 300, 0, 51) is None


def test_encode_flat_is_call_without_padding(cells, tokenizer):
    rank = GeneTokenizer(vocab=tokenizer._tokens, encoding="rank", species="human")
    rank.use_unit_medians()
    for tok in (tokenizer, rank):  # rank: <bos> ... <eos>, a suffix token too
        flat = tok.encode_flat(cells, max_length=301, chunk_size=64)
        padded = tok(cells, max_length=301, chunk_size=64, return_tensors="np", return_length=True)
        assert flat["input_ids"].dtype == np.int32 and flat["values"].dtype == np.float32
        np.testing.assert_array_equal(flat["length"], padded["length"])
        np.testing.assert_array_equal(np.diff(flat["offsets"]), flat["length"])
        real = padded["attention_mask"].astype(bool)
        np.testing.assert_array_equal(flat["input_ids"], padded["input_ids"][real])
        np.testing.assert_array_equal(flat["values"], padded["values"][real])


def test_a_forked_child_tokenizes_with_its_own_thread_pool(cells, tokenizer, monkeypatch):
    """A child forked after the pool started (e.g. a ``num_proc`` build with ``mp_context="fork"``) has
    the pool object but not its threads: it must make its own instead of waiting on them forever."""
    import os
    import time

    monkeypatch.setenv("HF_SCFM_TOKENIZER_THREADS", "2")
    counts = sp.csr_matrix(cells.X, dtype=np.float32)
    colmap, _ = tokenizer._column_map(list(cells.var_names))
    ref = enc.encode_sampled_csr(counts, colmap, 300, 0, 51)
    assert enc._POOL is not None  # the blocks ran on the pool
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            out = enc.encode_sampled_csr(counts, colmap, 300, 0, 51)
            code = 0 if np.array_equal(out.token, ref.token) and np.array_equal(out.value, ref.value) else 1
        finally:
            os._exit(code)
    deadline = time.time() + 60
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on the parent's thread pool")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
