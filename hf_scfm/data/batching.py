"""A batch of cells in any form, as flat arrays, and padded back out: what every collator starts and ends with.

A collator takes a *list of records* (one mapping per cell: what a ``DataLoader`` over a dataset passes) or a
*columnar* batch (a mapping of per-cell lists, or a ``pyarrow.Table`` / ``RecordBatch`` as yielded by
``ds.with_format("arrow").iter(batch_size)``). :func:`flatten` reads either into a :class:`FlatBatch`: every
per-cell sequence column concatenated into one array, plus per-cell lengths, zero-copy from Arrow where the dtype
allows (a corpus's int32 ids stay int32), so no Python object is made per cell. :func:`pad_flat` writes the
padded ``[B, L]`` outputs, padded on the RIGHT with ``<pad>`` (id 0) and value 0.0 to the longest cell (rounded up
to ``pad_to_multiple_of``); :func:`empty_outputs` carves uninitialised outputs out of one allocation for the
compiled masked-value pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..tokenization.special_tokens import IGNORE_INDEX, PAD_TOKEN_ID, SPECIAL_VALUE

__all__ = ["Cells", "FlatBatch", "flatten", "pad_flat", "empty_outputs", "to_torch"]


class Cells:
    """Uniform access to a batch of cells given as records or as columns (see the module docstring). List
    columns of an Arrow batch are read as one flat array plus lengths."""

    def __init__(self, cells):
        self.table = None
        self.columns = None
        self.records = None
        if hasattr(cells, "column_names") and hasattr(cells, "num_rows"):  # pyarrow Table / RecordBatch
            if "input_ids" not in cells.column_names:
                raise ValueError(f"A columnar batch needs an 'input_ids' column (got {list(cells.column_names)}).")
            self.table, self.n = cells, cells.num_rows
        elif isinstance(cells, Mapping):
            if "input_ids" not in cells:
                raise ValueError(f"A columnar batch needs an 'input_ids' column (got {sorted(cells)}).")
            self.columns, self.n = cells, len(cells["input_ids"])
        elif isinstance(cells, Sequence) and not isinstance(cells, (str, bytes)):
            self.records, self.n = cells, len(cells)
            for i, rec in enumerate(cells):
                if not isinstance(rec, Mapping) or "input_ids" not in rec:
                    keys = sorted(rec) if isinstance(rec, Mapping) else type(rec).__name__
                    raise ValueError(
                        f"Record {i} has no 'input_ids' (got {keys}). Records come from the tokenizer or a corpus shard."
                    )
        else:
            raise ValueError(f"A collator takes a list of records or a columnar batch, got {type(cells).__name__}.")
        if self.n == 0:
            raise ValueError("A collator takes a non-empty batch (a list of records, one mapping per cell).")

    def has(self, key: str) -> bool:
        """True when every cell has a non-null ``key``."""
        if self.table is not None:
            return key in self.table.column_names and self.table.column(key).null_count == 0
        if self.columns is not None:
            return key in self.columns and all(v is not None for v in self.columns[key])
        return all(rec.get(key) is not None for rec in self.records)

    def any(self, key: str) -> bool:
        """True when at least one cell has a non-null ``key``."""
        if self.records is None:
            return self.has(key)
        return any(rec.get(key) is not None for rec in self.records)

    def first_without(self, key: str) -> int:
        if self.records is None:
            return 0
        return next(i for i, rec in enumerate(self.records) if rec.get(key) is None)

    def keys_of(self, index: int) -> list[str]:
        if self.table is not None:
            return list(self.table.column_names)
        if self.columns is not None:
            return sorted(self.columns)
        return sorted(self.records[index])

    def column(self, key: str) -> list:
        """One Python value per cell (labels, gene lists)."""
        if self.table is not None:
            return self.table.column(key).to_pylist()
        if self.columns is not None:
            return list(self.columns[key])
        return [rec[key] for rec in self.records]

    def ragged(self, key: str, dtype, default_lengths=None, default=None, keep=()) -> tuple[np.ndarray, np.ndarray]:
        """``(flat values, lengths)`` of a per-cell sequence column; records lacking ``key`` get ``default`` repeated
        ``default_lengths[i]`` times when given. An Arrow column whose values are already of a dtype in ``keep``
        stays as is (zero-copy) instead of being converted to ``dtype``."""
        if self.table is not None:
            import pyarrow as pa

            arr = self.table.column(key)
            arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
            if not pa.types.is_list(arr.type) and not pa.types.is_large_list(arr.type):
                raise ValueError(f"Column {key!r} must hold one sequence per cell, got Arrow type {arr.type}.")
            flat = arr.flatten().to_numpy(zero_copy_only=False)
            flat = flat if flat.dtype in keep else flat.astype(dtype, copy=False)
            return flat, arr.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
        if self.columns is not None:
            rows = self.columns[key]
        elif default_lengths is None:
            rows = [rec[key] for rec in self.records]
        else:
            rows = [rec[key] if rec.get(key) is not None else np.full(n, default) for rec, n in zip(self.records, default_lengths)]
        arrays = []
        for i, row in enumerate(rows):
            arr = np.asarray(row, dtype=dtype)
            if arr.ndim != 1:
                raise ValueError(
                    f"Record {i}: {key!r} must be a 1-D sequence (one cell), got shape {arr.shape}. "
                    "Pass one record per cell (e.g. the rows of a corpus shard), not a batch."
                )
            arrays.append(arr)
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        return np.concatenate(arrays), lengths


class FlatBatch:
    """A batch as flat arrays: ``ids`` int64 [N] (int32 as read from a corpus's Arrow columns, uncopied),
    ``values`` float32 [N] or None, ``mask`` (the given attention mask) int64 [N] or None, ``extras``
    {key: float32 [N]}, ``lengths`` int64 [B] and ``starts`` (each cell's first flat index). Positions a given
    attention mask marks as padding already hold ``<pad>`` and 0.0, as in the padded output."""

    def __init__(self, ids, values, mask, extras, lengths):
        self.ids, self.values, self.mask, self.extras, self.lengths = ids, values, mask, extras, lengths
        self.n = len(lengths)
        self.starts = np.cumsum(lengths) - lengths

    def padded_length(self, pad_to_multiple_of: int | None) -> int:
        length = int(self.lengths.max())
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        return length

    def scatter(self, flat: np.ndarray, length: int, fill, dtype) -> np.ndarray:
        """Padded [B, length] array holding ``flat`` cell by cell from the left (right padding)."""
        out = np.full((self.n, length), fill, dtype=dtype)
        if self.n <= 512:  # one memcpy per cell beats a boolean-mask scatter for usual batch sizes
            for b, (s, n) in enumerate(zip(self.starts.tolist(), self.lengths.tolist())):
                out[b, :n] = flat[s : s + n]
        else:
            out[np.arange(length)[None, :] < self.lengths[:, None]] = flat
        return out


def flatten(records, *, need_values: bool, extra_float_keys: Sequence[str] = ()) -> FlatBatch:
    """A batch (records, columns, Arrow, or :class:`Cells`) as a checked :class:`FlatBatch`."""
    cells = records if isinstance(records, Cells) else Cells(records)
    ids, lengths = cells.ragged("input_ids", np.int64, keep=(np.dtype(np.int32),))  # a corpus's int32 ids: no copy
    has_values = cells.has("values")
    if not has_values and need_values:
        i = cells.first_without("values")
        raise ValueError(
            f"Record {i} has no 'values', which this objective needs. Build the corpus with the "
            "tokenizer's values kept (every hf-scfm encoding writes them)."
        )

    def ragged_matching(key, dtype, default=None):
        flat, n = cells.ragged(key, dtype, None if default is None else lengths, default)
        if not np.array_equal(n, lengths):
            i = int(np.flatnonzero(n != lengths)[0])
            raise ValueError(f"Record {i}: {key!r} has {n[i]} entries but 'input_ids' has {lengths[i]}; they must match.")
        return np.ascontiguousarray(flat)

    mask = ragged_matching("attention_mask", np.int64, 1) if cells.any("attention_mask") else None
    values = ragged_matching("values", np.float32) if has_values else None
    extras = {}
    for key in extra_float_keys:
        if not cells.has(key):
            i = cells.first_without(key)
            raise ValueError(f"Record {i} has no {key!r} column (record keys: {cells.keys_of(i)}).")
        extras[key] = ragged_matching(key, np.float32)
    if mask is not None:  # padding inside a record (padded by the tokenizer) follows the contract too
        pad = mask == 0
        if pad.any():
            ids = np.where(pad, PAD_TOKEN_ID, ids)
            if values is not None:
                values = np.where(pad, np.float32(SPECIAL_VALUE), values)
    return FlatBatch(ids, values, mask, extras, lengths)


def pad_flat(flat: FlatBatch, pad_to_multiple_of: int | None, **replaced: np.ndarray) -> dict[str, np.ndarray]:
    """Right-pad ``input_ids`` (with ``<pad>``), ``values`` (with 0.0), ``attention_mask`` (with 0) and the extra
    float columns (with 0.0) to the longest cell, as NumPy arrays. ``replaced`` gives flat arrays to pad instead of
    the batch's own (e.g. masked ``values``), or new columns (``labels``, padded with -100)."""
    length = flat.padded_length(pad_to_multiple_of)
    columns = {"input_ids": (flat.ids, PAD_TOKEN_ID, np.int64)}
    if flat.mask is not None:
        columns["attention_mask"] = (flat.mask, 0, np.int64)
    if flat.values is not None:
        columns["values"] = (flat.values, SPECIAL_VALUE, np.float32)
    for key, arr in flat.extras.items():
        columns[key] = (arr, 0.0, np.float32)
    for key, arr in replaced.items():
        fill, dtype = columns[key][1:] if key in columns else (IGNORE_INDEX, arr.dtype)
        columns[key] = (arr, fill, dtype)
    out = {}
    for key, (arr, fill, dtype) in columns.items():
        out[key] = flat.scatter(arr, length, fill, dtype)
        if key == "input_ids" and flat.mask is None:
            out["attention_mask"] = (np.arange(length)[None, :] < flat.lengths[:, None]).astype(np.int64)
    return out


def empty_outputs(n: int, length: int, dtypes: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Uninitialised ``[n, length]`` arrays of the given dtypes, carved out of ONE allocation.

    A batch's padded outputs are a few MB. Allocated one by one, each is above glibc's mmap threshold at first and
    freeing them returns the pages to the kernel, so every batch pays a page fault per 4 KiB written (measured
    here: ~14 us per cell of a 64 x 2,048 batch, more than the masking). One block per batch raises malloc's
    dynamic threshold to its size after the first free, so later batches reuse heap memory that is already mapped
    (~3 us per cell). The tensors made from the views keep the block alive.
    """
    align = 64  # every array starts on a cache line (as a fresh large allocation would)
    sizes = [-(-n * length * np.dtype(d).itemsize // align) * align for d in dtypes.values()]
    block = np.empty(sum(sizes) + align, dtype=np.uint8)
    at = -block.ctypes.data % align
    out = {}
    for (key, dtype), size in zip(dtypes.items(), sizes):
        out[key] = block[at:at + n * length * np.dtype(dtype).itemsize].view(dtype).reshape(n, length)
        at += size
    return out


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
