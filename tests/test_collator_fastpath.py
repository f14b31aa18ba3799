"""The masking rule's one compiled fast path (numba) against its plain reference (hf_scfm.data.masking), and
iter_batches / read-ahead / output blocks (hf_scfm.data.batching, hf_scfm.data.streaming)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_scfm.data import batching as B
from hf_scfm.data import masking as M
from hf_scfm.data.collators import DataCollatorForGeneMLM, DataCollatorForMaskedExpression
from hf_scfm.data.streaming import iter_batches
from hf_scfm.tokenization.encodings import splitmix64


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


def prepadded(records):
    """The same cells with a record padded by the tokenizer (its own attention mask, junk under the zeros)."""
    records = list(records)
    records[0] = dict(records[0], attention_mask=np.array([1] * 30 + [0] * 7))
    records[7] = dict(records[7], attention_mask=np.array([1] * 100 + [0] * 29))
    return records


def _pad(records, multiple=None):
    return B.pad_flat(B.flatten(records, need_values=True), multiple)


@pytest.fixture
def compiled():
    if M.compiled_kernels() is None:
        pytest.skip("numba not installed: there is no compiled path")


@pytest.mark.parametrize("seed,epoch,fraction", [(0, 0, (0.4, 0.4)), (7, 3, (0.15, 0.4)), (123456789, 1, (0.05, 0.95)),
                                                 (2**63 + 5, 2, (1.0, 1.0))])
def test_compiled_choice_and_keys_equal_the_reference(seed, epoch, fraction, compiled):
    """The one fast path against the plain definition: same keys, same chosen positions, on odd lengths, an empty
    cell, a one-token cell, cells without genes, twin cells (tied keys), with and without a given mask, values or
    not, padded to a multiple."""
    for records in (ragged_batch(seed % 1000), prepadded(ragged_batch(seed % 1000 + 1))):
        for strip_values in (False, True):
            recs = [{k: v for k, v in r.items() if k != "values"} for r in records] if strip_values else records
            flat = B.flatten(recs, need_values=False)
            batch = B.pad_flat(flat, 8)
            ref_chosen, ref_keys = M.choose_reference(batch["input_ids"], batch.get("values"), batch["attention_mask"],
                                                      fraction, seed, epoch)
            chosen, keys = M.choose_compiled(flat, fraction, seed, epoch)
            assert np.array_equal(keys, ref_keys)
            assert np.array_equal(flat.scatter(chosen, batch["input_ids"].shape[1], False, bool), ref_chosen)
            assert ref_keys[4] == ref_keys[8] and len(set(ref_keys.tolist())) == len(recs) - 1


def test_reference_is_the_definition():
    """choose_reference spelled out by hand for one cell: key, uniforms, k smallest, ties by position."""
    records = ragged_batch(4)
    batch = _pad(records)
    chosen, keys = M.choose_reference(batch["input_ids"], batch["values"], batch["attention_mask"], (0.3, 0.3), 9, 1)
    b = 4  # 301 tokens, <cls> first
    ids, vals = records[b]["input_ids"], records[b]["values"]
    weights, vweights = M._position_weights(len(ids))
    key_ids = sum(int(i) * int(w) % 2**32 for i, w in zip(ids, weights)) % 2**64  # 32-bit products
    key_vals = sum(int(x) * int(w) % 2**32 for x, w in zip(vals.view(np.uint32), vweights)) % 2**64
    mix = lambda x: int(splitmix64(np.uint64(x % 2**64)))
    key = mix(mix(key_ids) ^ ((key_vals << 20) % 2**64))
    assert keys[b] == key
    start = mix(key ^ int(M.stream_base(9, 1, 0)))
    u = [mix(start + (j + 1) * 0x9E3779B97F4A7C15) >> 11 for j in range(len(ids))]
    genes = [j for j in range(len(ids)) if ids[j] >= M.FIRST_GENE_ID]
    k = max(1, int(np.floor(0.3 * len(genes) + 0.5)))
    expect = sorted(sorted(genes, key=lambda j: (u[j], j))[:k])
    assert np.flatnonzero(chosen[b]).tolist() == expect


def test_uniforms_at_any_positions_equal_the_padded_ones():
    keys = np.array([3, 2**64 - 1, 12345], dtype=np.uint64)
    grid = M.uniforms(keys[:, None], np.arange(50)[None, :], 5, 2, 1)
    cell, pos = np.array([0, 2, 1, 1]), np.array([0, 49, 7, 8])
    assert np.array_equal(M.uniforms(keys[cell], pos, 5, 2, 1), grid[cell, pos])
    assert np.array_equal(M.cell_fractions(keys, (0.1, 0.3), 5, 2), 0.1 + (0.3 - 0.1) * M.uniforms(keys, 0, 5, 2, 3))
    assert np.array_equal(M.cell_fractions(keys, (0.2, 0.2), 5, 2), np.full(3, 0.2))


def test_compiled_and_reference_collators_give_identical_batches(compiled, monkeypatch):
    plain = ragged_batch(5)
    makers = [lambda: DataCollatorForMaskedExpression(seed=3, mask_fraction=(0.15, 0.4), pad_to_multiple_of=8),
              lambda: DataCollatorForMaskedExpression(seed=1),
              lambda: DataCollatorForGeneMLM(vocab_size=900, seed=2)]
    inputs = (plain, prepadded(plain))
    fast = [make()(recs) for make in makers for recs in inputs]
    monkeypatch.setattr(M, "compiled_kernels", lambda: None)
    slow = [make()(recs) for make in makers for recs in inputs]
    for a, b in zip(fast, slow):
        assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


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
    from hf_scfm.data.streaming import _read_ahead

    assert list(_read_ahead(iter(range(50)), 3)) == list(range(50))

    def failing():
        yield 1
        raise OSError("shard vanished")

    got = _read_ahead(failing(), 2)
    assert next(got) == 1
    with pytest.raises(OSError, match="shard vanished"):
        next(got)


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_arrow_int32_batch_through_the_compiled_path_equals_the_reference_on_records(pad_to_multiple_of, compiled,
                                                                                     monkeypatch):
    """A corpus batch as read (Arrow list<int32> ids, list<float32> values) takes the compiled path with its ids
    uncopied and its outputs carved out of one block; it must equal the reference on the same cells given as int64
    records: odd lengths, an empty cell, tied cells, batch > 1, two seeds."""
    pa = pytest.importorskip("pyarrow")
    records = ragged_batch(7)
    table = pa.table({"input_ids": pa.array([r["input_ids"].astype(np.int32) for r in records], pa.list_(pa.int32())),
                      "values": pa.array([r["values"] for r in records], pa.list_(pa.float32()))})
    makers = [lambda: DataCollatorForMaskedExpression(seed=11, pad_to_multiple_of=pad_to_multiple_of),
              lambda: DataCollatorForMaskedExpression(seed=2, mask_fraction=(0.15, 0.4),
                                                      pad_to_multiple_of=pad_to_multiple_of)]
    assert B.flatten(table, need_values=True).ids.dtype == np.int32  # no int64 copy of the ids
    fast = [make()(table) for make in makers]
    monkeypatch.setattr(M, "compiled_kernels", lambda: None)
    slow = [make()(records) for make in makers]
    for a, b in zip(fast, slow):
        assert set(a) == {"input_ids", "attention_mask", "values", "labels"} == set(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].is_contiguous() and torch.equal(a[k], b[k]), k
        assert (a["labels"] != -100).sum() > 0 and (a["attention_mask"] == 0).sum() > 0  # masks and padding present


def test_outputs_carved_from_one_block_are_aligned_and_disjoint():
    dtypes = {"input_ids": np.int64, "attention_mask": np.int64, "values": np.float32, "labels": np.float32}
    for n, length in [(1, 1), (3, 7), (64, 2048)]:
        out = B.empty_outputs(n, length, dtypes)
        assert list(out) == list(dtypes)
        for i, (key, arr) in enumerate(out.items()):
            assert arr.shape == (n, length) and arr.dtype == dtypes[key] and arr.flags.c_contiguous
            assert arr.ctypes.data % 64 == 0
            arr[...] = i + 1
        assert all((arr == i + 1).all() for i, arr in enumerate(out.values()))  # no two views overlap
