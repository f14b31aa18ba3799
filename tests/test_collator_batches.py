"""The collated batches are pinned: the same records and seed give the same bytes, release after release.

``tests/data/collator_batches.json`` holds, per case, the dtype, shape and SHA-256 of every output tensor and the
number of masked positions per cell. It was written by the collators of commit a872356 (before the masking rule
was reduced to one reference and one compiled fast path) and must not change unless the masking rule is changed
on purpose, in which case say why and rewrite it with ``python tests/test_collator_batches.py --write``.

The inputs come from a fixed 64-bit LCG (not NumPy's generators, whose streams are not promised across versions):
odd lengths, an empty cell, a one-token cell, special tokens inside sentences, two cells with the same content,
cells padded by the tokenizer (their own attention mask), Arrow int32 columns, and a benchmark-sized batch
(64 cells of up to 2,048 tokens). Every case runs on both paths (the compiled kernel when numba is installed,
and the NumPy reference), which must agree with the fixture bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "data" / "collator_batches.json"


def _lcg(seed: int):
    x = (seed * 0x9E3779B97F4A7C15 + 1) % 2**64
    while True:
        x = (6364136223846793005 * x + 1442695040888963407) % 2**64
        yield x >> 33  # 31 random bits


def _records(seed: int, lengths, *, continuous: bool = False, vocab: int = 900):
    """Cells shaped like tokenizer output: ``<cls>`` (id 2) first, gene ids in [6, vocab), a few special tokens
    (``<eos>`` 3, ``<unk>`` 4) inside the longer sentences; binned (0..50) or continuous values, 0.0 at specials."""
    draw = _lcg(seed)
    records = []
    for n in lengths:
        ids = [6 + next(draw) % (vocab - 6) for _ in range(n)]
        vals = [float(next(draw) % 51) if not continuous else (next(draw) % 100_000) / 12_345.0 for _ in range(n)]
        if n:
            ids[0], vals[0] = 2, 0.0
        for j in range(17, n, 97):
            ids[j], vals[j] = 3 + j % 2, 0.0
        records.append({"input_ids": np.asarray(ids, dtype=np.int64), "values": np.asarray(vals, dtype=np.float32)})
    return records


RAGGED = [37, 0, 1, 2, 301, 64, 5, 129, 700, 3]


def _ragged(seed: int, continuous: bool = False):
    records = _records(seed, RAGGED, continuous=continuous)
    records.append({k: v.copy() for k, v in records[4].items()})  # same content as cell 4: the same key and mask
    return records


def _prepadded(seed: int):
    """Records padded by the tokenizer: an attention mask with trailing zeros (and junk under them)."""
    records = _ragged(seed)
    for i in (0, 4, 6):
        rec = records[i]
        n = len(rec["input_ids"])
        real = max(1, n - 4)
        rec["attention_mask"] = np.asarray([1] * real + [0] * (n - real), dtype=np.int64)
    return records


def _arrow(records):
    pa = pytest.importorskip("pyarrow")
    return pa.table({"input_ids": pa.array([r["input_ids"].astype(np.int32) for r in records], pa.list_(pa.int32())),
                     "values": pa.array([r["values"] for r in records], pa.list_(pa.float32()))})


def _big():
    draw = _lcg(99)
    lengths = [1 + next(draw) % 2048 for _ in range(63)] + [2048]
    return _records(123, lengths)


def _cases():
    """name -> (make collator, epoch, records)."""
    from hf_scfm.data.collators import (
        DataCollatorForGeneMLM,
        DataCollatorForMaskedExpression,
        DataCollatorForMaskedRegression,
        DataCollatorForNextGene,
    )

    return {
        "masked_expression_default": (lambda: DataCollatorForMaskedExpression(seed=0), 0, _ragged(1)),
        "masked_expression_range_epoch2_pad8": (
            lambda: DataCollatorForMaskedExpression(seed=3, mask_fraction=(0.15, 0.4), pad_to_multiple_of=8), 2,
            _ragged(2)),
        "masked_regression_continuous": (lambda: DataCollatorForMaskedRegression(seed=5), 0, _ragged(3, True)),
        "masked_regression_fraction_0.9": (lambda: DataCollatorForMaskedRegression(seed=8, mask_fraction=0.9), 1,
                                           _ragged(4, True)),
        "gene_mlm_epoch1": (lambda: DataCollatorForGeneMLM(vocab_size=900, seed=2), 1, _ragged(5)),
        "gene_mlm_prepadded_p0.3": (lambda: DataCollatorForGeneMLM(vocab_size=900, seed=7, mlm_probability=0.3), 0,
                                    _prepadded(6)),
        "masked_expression_prepadded": (lambda: DataCollatorForMaskedExpression(seed=11), 0, _prepadded(7)),
        "masked_expression_arrow_int32_range": (
            lambda: DataCollatorForMaskedExpression(seed=4, mask_fraction=(0.2, 0.3)), 3, "arrow"),
        "masked_expression_64x2048": (lambda: DataCollatorForMaskedExpression(seed=0), 0, _big()),
        "gene_mlm_64x2048": (lambda: DataCollatorForGeneMLM(vocab_size=900, seed=1), 0, _big()),
        "next_gene": (lambda: DataCollatorForNextGene(pad_to_multiple_of=16), 0, _ragged(9)),
    }


def _digest(batch) -> dict:
    out = {}
    for key in sorted(batch):
        arr = np.ascontiguousarray(batch[key].numpy())
        out[key] = {"dtype": str(arr.dtype), "shape": list(arr.shape), "sha256": hashlib.sha256(arr.tobytes()).hexdigest()}
    if "labels" in batch and batch["labels"].ndim == 2:
        out["masked_per_cell"] = (batch["labels"] != -100).sum(1).tolist()
    return out


def _collate(name):
    make, epoch, records = _cases()[name]
    if isinstance(records, str):
        records = _arrow(_ragged(8))
    collator = make()
    collator.set_epoch(epoch)
    return collator(records)


def _paths():
    from hf_scfm.data import masking

    paths = ["reference"]
    if masking.compiled_kernels() is not None:
        paths.append("compiled")
    return paths


@pytest.fixture(params=["compiled", "reference"])
def path(request, monkeypatch):
    from hf_scfm.data import masking

    if request.param == "compiled":
        if masking.compiled_kernels() is None:
            pytest.skip("numba not installed: the compiled path is off")
    else:
        monkeypatch.setattr(masking, "compiled_kernels", lambda: None)
    return request.param


@pytest.mark.parametrize("name", sorted(json.loads(FIXTURE.read_text())) if FIXTURE.exists() else [])
def test_batches_equal_the_pinned_ones(name, path):
    expected = json.loads(FIXTURE.read_text())[name]
    got = _digest(_collate(name))
    assert got == expected, f"{name} ({path} path) differs from the pinned batch"


def test_fixture_covers_every_case():
    assert FIXTURE.exists() and sorted(json.loads(FIXTURE.read_text())) == sorted(_cases())
    masked = json.loads(FIXTURE.read_text())["masked_expression_default"]["masked_per_cell"]
    assert masked[1] == 0 and masked[2] == 0 and masked[4] == masked[10] > 0  # empty / <cls>-only / twin cells


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({name: _digest(_collate(name)) for name in _cases()}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
