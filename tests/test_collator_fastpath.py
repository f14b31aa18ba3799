"""The collators' flat fast paths (NumPy, and the optional numba kernel) against the padded reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_scfm.data import collators as C
from hf_scfm.data.collators import DataCollatorForGeneMLM, DataCollatorForMaskedExpression
from hf_scfm.data.loading import iter_batches


def ragged_batch(seed=0):
    """Odd lengths, an empty cell, a one-token cell, a cell with no gene, two identical cells (tied keys)."""
    rng = np.random.default_rng(seed)
    lengths = [37, 0, 1, 2, 301, 64, 5, 129]
    records = []
    for n in lengths:
        ids = rng.integers(6, 900, size=n)
        if n:
            ids[0] = 2
        records.append({"input_ids": ids, "values": rng.integers(0, 51, size=n).astype(np.float32)})
    records.append({k: v.copy() for k, v in records[4].items()})
    return records


def padded_reference(records, fraction, seed, epoch):
    """Chosen mask and keys by the [B, L] reference functions (_cell_keys, _uniforms, _choose_exact)."""
    batch = C._pad_records(records, need_values=True, pad_to_multiple_of=None)
    keys = C._cell_keys(batch["input_ids"], batch["values"])
    u = C._uniforms(keys, batch["input_ids"].shape[1], seed, epoch, 0)
    eligible = (batch["attention_mask"] == 1) & (batch["input_ids"] >= C.FIRST_GENE_ID)
    return C._choose_exact(eligible, u, fraction), keys, batch["attention_mask"] == 1


@pytest.mark.parametrize("use_kernel", [False, True])
@pytest.mark.parametrize("seed,epoch", [(0, 0), (7, 3)])
def test_flat_selection_and_keys_equal_padded_reference(use_kernel, seed, epoch, monkeypatch):
    if use_kernel and C._choose_kernel() is None:
        pytest.skip("numba not installed")
    if not use_kernel:
        monkeypatch.setattr(C, "_KERNEL", [None])
    records = ragged_batch(seed)
    fraction = np.random.default_rng(1).uniform(0.05, 0.95, size=len(records))
    ref_chosen, ref_keys, real = padded_reference(records, fraction, seed, epoch)
    col = DataCollatorForMaskedExpression(seed=seed)
    col.set_epoch(epoch)
    flat = C._flatten(records, need_values=True)
    chosen = col._choose(flat, fraction)
    assert np.array_equal(flat.keys(), ref_keys)
    assert np.array_equal(flat.scatter(chosen, real.shape[1], False, bool), ref_chosen)
    assert ref_chosen[4].sum() == np.floor(fraction[4] * 300 + 0.5)  # 301 tokens, <cls> excluded
    assert ref_keys[4] == ref_keys[8] and len(set(ref_keys.tolist())) == len(records) - 1  # same content, same key


def test_flat_uniforms_equal_reference_everywhere():
    records = ragged_batch(3)
    flat = C._flatten(records, need_values=True)
    batch = C._pad_records(records, need_values=True, pad_to_multiple_of=None)
    ref = C._uniforms(C._cell_keys(batch["input_ids"], batch["values"]), batch["input_ids"].shape[1], 5, 2, 1)
    real = batch["attention_mask"] == 1
    assert np.array_equal(flat.draw(5, 2, 1), ref[real])
    where = np.array([0, 3, 40, len(flat.ids) - 1])
    assert np.array_equal(flat.draw(5, 2, 1, where), ref[real][where])
    assert np.array_equal(flat.draw_first(5, 2, 1), C._uniforms(flat.keys(), 1, 5, 2, 1)[:, 0])  # empty cell too


def test_kernel_and_numpy_paths_give_identical_batches(monkeypatch):
    if C._choose_kernel() is None:
        pytest.skip("numba not installed")
    plain = ragged_batch(5)
    prepadded = list(plain)
    prepadded[0] = dict(plain[0], attention_mask=[1] * 30 + [0] * 7)  # a record padded by the tokenizer
    makers = [lambda: DataCollatorForMaskedExpression(seed=3, mask_fraction=(0.15, 0.4), pad_to_multiple_of=8),
              lambda: DataCollatorForGeneMLM(vocab_size=900, seed=2)]
    fast = [make()(recs) for make in makers for recs in (plain, prepadded)]
    monkeypatch.setattr(C, "_KERNEL", [None])
    slow = [make()(recs) for make in makers for recs in (plain, prepadded)]
    for a, b in zip(fast, slow):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_iter_batches_equals_collating_records():
    datasets = pytest.importorskip("datasets")
    records = [r for r in ragged_batch(2) if len(r["input_ids"])]
    ds = datasets.Dataset.from_dict({"input_ids": [r["input_ids"].tolist() for r in records],
                                     "values": [r["values"].tolist() for r in records]})
    col = DataCollatorForMaskedExpression(seed=4)
    got = list(iter_batches(ds.to_iterable_dataset(), 3, col, prefetch=2))
    assert [len(b["input_ids"]) for b in got] == [3, 3, 2]
    unthreaded = list(iter_batches(ds, 3, col, prefetch=0))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(got, unthreaded) for k in a) and len(unthreaded) == 3
    for i, batch in enumerate(got):
        ref = col(records[3 * i : 3 * i + 3])
        assert all(torch.equal(batch[k], ref[k]) for k in ref)
    assert len(list(iter_batches(ds, 3, col, drop_last=True))) == 2
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_batches(ds, 0, col))
    it = iter_batches(ds, 1, col, prefetch=1)  # stopping early is fine
    next(it)
    it.close()
    bad = datasets.Dataset.from_dict({"values": [[1.0]] * 4})
    with pytest.raises(ValueError, match="needs an 'input_ids' column"):
        list(iter_batches(bad, 2, col))


def test_read_ahead_keeps_order_and_passes_errors_on():
    from hf_scfm.data.loading import _read_ahead

    assert list(_read_ahead(iter(range(50)), 3)) == list(range(50))

    def failing():
        yield 1
        raise OSError("shard vanished")

    got = _read_ahead(failing(), 2)
    assert next(got) == 1
    with pytest.raises(OSError, match="shard vanished"):
        next(got)


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_arrow_int32_batch_through_kernels_equals_numpy_path_on_records(pad_to_multiple_of, monkeypatch):
    """A corpus batch as read (Arrow list<int32> ids, list<float32> values) takes the compiled path with
    its ids uncopied and its outputs carved out of one block; it must equal the NumPy path on the same
    cells given as int64 records: odd lengths, an empty cell, tied cells, batch > 1, two seeds."""
    pa = pytest.importorskip("pyarrow")
    if C._choose_kernel() is None:
        pytest.skip("numba not installed")
    records = ragged_batch(7)
    table = pa.table({"input_ids": pa.array([r["input_ids"].astype(np.int32) for r in records], pa.list_(pa.int32())),
                      "values": pa.array([r["values"] for r in records], pa.list_(pa.float32()))})
    makers = [lambda: DataCollatorForMaskedExpression(seed=11, pad_to_multiple_of=pad_to_multiple_of),
              lambda: DataCollatorForMaskedExpression(seed=2, mask_fraction=(0.15, 0.4),
                                                      pad_to_multiple_of=pad_to_multiple_of)]
    flat = C._flatten(table, need_values=True)
    assert flat.ids.dtype == np.int32  # no int64 copy of the ids
    fast = [make()(table) for make in makers]
    monkeypatch.setattr(C, "_KERNEL", [None])
    slow = [make()(records) for make in makers]
    for a, b in zip(fast, slow):
        assert set(a) == {"input_ids", "attention_mask", "values", "labels"} == set(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].is_contiguous() and torch.equal(a[k], b[k]), k
        assert (a["labels"] != -100).sum() > 0 and (a["attention_mask"] == 0).sum() > 0  # masks and padding present


def test_outputs_carved_from_one_block_are_aligned_and_disjoint():
    dtypes = {"input_ids": np.int64, "attention_mask": np.int64, "values": np.float32, "labels": np.float32}
    for n, length in [(1, 1), (3, 7), (64, 2048)]:
        out = C._empty_outputs(n, length, dtypes)
        assert list(out) == list(dtypes)
        for i, (key, arr) in enumerate(out.items()):
            assert arr.shape == (n, length) and arr.dtype == dtypes[key] and arr.flags.c_contiguous
            assert arr.ctypes.data % 64 == 0
            arr[...] = i + 1
        assert all((arr == i + 1).all() for i, arr in enumerate(out.values()))  # no two views overlap
