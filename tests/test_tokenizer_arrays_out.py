"""Matrix in, arrays out: with ``return_tensors=None`` the tokenizer returns, per key, one NumPy array per cell
(int64 ids and mask, float32 values; views into the flat or padded buffers), holding the tokens and values of the
per-cell reference of tests/test_tokenizer.py, and everything downstream takes them as it took Python lists:
``tokenizer.pad``, transformers' ``DataCollatorWithPadding``, our collators, ``datasets`` (``from_dict``,
``map(batched=True)``), save/load. Text input still gives Python lists."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from test_tokenizer import _col_tokens, reference_sentence

import hf_scfm
from hf_scfm.tokenization import GeneTokenizer


@pytest.fixture(scope="module")
def cells():
    adata = hf_scfm.load_example("baron_human")
    nnz = np.diff(adata.X.indptr)
    return adata[np.concatenate([np.arange(5), np.argsort(-nnz)[:3]])].copy()  # with cells past max_length


@pytest.fixture(scope="module", params=["rank", "binned", "continuous"])
def tok(request, cells):
    tok = GeneTokenizer.from_species("human", encoding=request.param)
    if request.param == "rank":
        tok.fit_medians(cells)
    return tok


def _reference(tok, adata, max_length):
    """Per cell ``(ids, values)`` of the slow per-cell reference (specials included)."""
    col_tokens = _col_tokens(tok, adata)
    X = sp.csr_matrix(adata.X).toarray()
    prefix = [tok._token_to_id[t] for t in tok.prefix_tokens]
    suffix = [tok._token_to_id[t] for t in tok.suffix_tokens]
    medians = {t: tok._medians[t] for t in range(len(tok)) if np.isfinite(tok._medians[t])}
    out = []
    for i in range(adata.n_obs):
        ids, vals = reference_sentence(X[i], float(X[i].sum()), col_tokens, tok.encoding,
                                       max_length - len(prefix) - len(suffix), medians, tok.n_bins, tok.seed)
        out.append((prefix + ids + suffix, [0.0] * len(prefix) + vals + [0.0] * len(suffix)))
    return out


@pytest.mark.parametrize("padding", [False, True, "max_length"])
def test_plain_call_returns_one_array_per_cell_equal_to_the_reference(tok, cells, padding):
    max_length = 600
    enc = tok(cells, max_length=max_length, padding=padding, return_length=True)
    ref = _reference(tok, cells, max_length)
    width = max(len(r[0]) for r in ref) if padding is True else max_length
    assert isinstance(enc["input_ids"], list) and len(enc["input_ids"]) == cells.n_obs
    assert enc["length"] == [len(r[0]) for r in ref] and all(isinstance(n, int) for n in enc["length"])
    for i, (ids, vals) in enumerate(ref):
        got_ids, got_vals, got_mask = enc["input_ids"][i], enc["values"][i], enc["attention_mask"][i]
        assert isinstance(got_ids, np.ndarray) and got_ids.dtype == np.int64 and got_mask.dtype == np.int64
        assert got_vals.dtype == np.float32
        n = len(ids)
        assert len(got_ids) == (n if padding is False else width)
        assert got_ids[:n].tolist() == ids and not got_ids[n:].any()
        np.testing.assert_array_equal(got_vals[:n], np.array(vals, dtype=np.float32))
        assert not got_vals[n:].any() and got_mask[:n].all() and not got_mask[n:].any()
    # views into shared buffers, not one allocation per cell
    a, b = enc["input_ids"][0], enc["input_ids"][1]
    assert a.base is not None and a.base is b.base
    # the same numbers as return_tensors="np"
    as_np = tok(cells, max_length=max_length, padding=padding if padding else True, return_tensors="np")
    if padding:
        np.testing.assert_array_equal(np.stack(enc["input_ids"]), as_np["input_ids"])
        np.testing.assert_array_equal(np.stack(enc["values"]), as_np["values"])


def test_downstream_takes_arrays_as_it_took_lists(tok, cells):
    import datasets
    from transformers import DataCollatorWithPadding

    from hf_scfm.data import DataCollatorForMaskedRegression

    enc = tok(cells, max_length=300, padding=False)
    as_lists = {k: [v.tolist() for v in enc[k]] for k in ("input_ids", "values", "attention_mask")}
    records = [dict(zip(enc.keys(), row)) for row in zip(*(enc[k] for k in enc.keys()))]
    list_records = [dict(zip(as_lists.keys(), row)) for row in zip(*as_lists.values())]
    for got, want in ((tok.pad(records, return_tensors="pt"), tok.pad(list_records, return_tensors="pt")),
                      (DataCollatorWithPadding(tok)([{k: r[k] for k in ("input_ids", "attention_mask")} for r in records]),
                       DataCollatorWithPadding(tok)([{k: r[k] for k in ("input_ids", "attention_mask")}
                                                     for r in list_records]))):
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
    ours = DataCollatorForMaskedRegression(seed=0)
    got, want = ours([{k: r[k] for k in ("input_ids", "values")} for r in records]), \
        ours([{k: r[k] for k in ("input_ids", "values")} for r in list_records])
    for k in want:
        assert torch.equal(got[k], want[k]), k
    ds = datasets.Dataset.from_dict({k: enc[k] for k in ("input_ids", "values")})
    assert ds["input_ids"][:] == as_lists["input_ids"]
    np.testing.assert_array_equal(np.concatenate(ds["values"][:]), np.concatenate(as_lists["values"]))
    idx = datasets.Dataset.from_dict({"i": list(range(cells.n_obs))})
    mapped = idx.map(lambda b: dict(tok(cells[b["i"]], max_length=300, padding=False)), batched=True, batch_size=3)
    assert mapped["input_ids"][:] == as_lists["input_ids"]


def test_save_load_and_text_input(tok, cells, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    loaded = GeneTokenizer.from_pretrained(tmp_path / "tok")
    a, b = tok(cells, max_length=128), loaded(cells, max_length=128)
    for k in ("input_ids", "values", "attention_mask"):
        np.testing.assert_array_equal(np.stack(a[k]), np.stack(b[k]))
    text = tok(" ".join(tok.genes[:3]))
    assert isinstance(text["input_ids"], list) and all(isinstance(t, int) for t in text["input_ids"])
