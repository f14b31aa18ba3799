"""Collators: turn lists of cell records into padded model batches, one class per objective.

A *record* is a mapping with a variable-length ``input_ids`` (ints) and, for every objective that
reads expression, a ``values`` of the same length (floats), as lists or NumPy arrays: exactly what a
corpus shard holds (``{input_ids, values, length, <obs columns>, source_file}``) or what
``GeneTokenizer(..., padding=False)`` returns per cell. A record may also carry an ``attention_mask``
(1 = real token); without one every position is real. Instead of a list of records a collator also
takes a *columnar* batch: a mapping of per-cell lists, or a ``pyarrow.Table`` as yielded by
``ds.with_format("arrow").iter(batch_size)``; Arrow batches skip per-cell Python objects and are
the fastest way from a streamed corpus to tensors: :func:`hf_scfm.data.loading.iter_batches` does
exactly that (``benchmarks/corpus.py`` measures both ways).

Every collator returns a ``dict`` of torch tensors: ``input_ids`` int64 [B, L], ``values`` float32
[B, L], ``attention_mask`` int64 [B, L], padded on the RIGHT with ``<pad>`` (id 0) and value 0.0 to
the longest cell of the batch (rounded up to ``pad_to_multiple_of`` when given), plus the objective's
targets, following the contracts the models consume:

=============================================  ===================================================
:class:`DataCollatorForNextGene`               ``labels`` = ``input_ids``, padding -> -100
:class:`DataCollatorForGeneMLM`                15 % of gene tokens chosen; 80 % ``<mask>``, 10 %
                                               random gene, 10 % kept; ``labels`` -100 elsewhere
:class:`DataCollatorForMaskedExpression`       a fraction of gene values -> ``MASK_VALUE`` in
                                               ``values``; float ``labels`` = original bins there,
                                               -100.0 elsewhere
:class:`DataCollatorForMaskedRegression`       as above on continuous values, 20 % (CellFM)
:class:`DataCollatorForCellClassification`     ``labels`` int64 [B] through a ``label2id`` map
:class:`DataCollatorForPerturbation`           control ``values``, ``perturbation_flags``, float
                                               ``labels`` = perturbed-cell values
=============================================  ===================================================

Choices, and why:

* **Only gene tokens are ever masked.** A position is eligible when it is real (attention mask 1) and
  its id is a gene id (>= 6, after the six special tokens). ``<pad>``, ``<mask>``, ``<cls>``,
  ``<eos>``, ``<unk>`` and ``<bos>`` never are.
* **Exact counts, not coin flips.** Each cell gets exactly ``k = floor(fraction * n + 0.5)`` masked
  genes out of its ``n`` eligible ones, and at least one when ``n >= 1``. Per-position Bernoulli
  draws (BERT's way) let small cells end up with no target at all and make the fraction noisy; an
  exact count keeps every cell in the loss and makes the fraction testable.
* **Randomness is per cell, not per batch.** Which positions a cell gets masked depends only on
  ``(seed, epoch, the cell's content)``: the collator hashes each cell's ``input_ids`` and ``values``
  to a 64-bit key and draws counter-based uniforms (a splitmix64 hash of key and position). So the
  same cell gets the same mask whatever batch, padding length, worker process or machine it lands
  in, and the same seed always reproduces the same batches. Two cells with identical content get
  identical masks. For fresh masks each epoch (dynamic masking) call ``collator.set_epoch(epoch)``,
  e.g. from a ``TrainerCallback.on_epoch_begin``; the epoch is part of the hash.
* Every collator is a plain picklable object holding no torch generator, so DataLoader workers can
  use it.
* **Speed.** The batch is handled as flat arrays of its real tokens (one concatenated array per
  column plus per-cell lengths, zero-copy from Arrow); hashing, uniforms and the exact-k choice are
  segment-wise vectorised passes over them, and padding is one copy per cell into the output. When
  numba is importable (scanpy depends on it) one compiled pass per cell does the hash, the uniforms
  and the choice (cached on disk; ``HF_SCFM_NUMBA=0`` turns it off), and for the masked-value collators a
  second pass writes the four padded outputs, carved out of one allocation (see :func:`_empty_outputs`:
  separate multi-MB arrays cost a page fault per 4 KiB on every batch). The padded [B, L] functions
  ``_cell_keys``, ``_uniforms``, ``_choose_exact`` stay as the reference that defines the masks;
  tests pin both fast paths to them bit for bit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..tokenization.special_tokens import (
    IGNORE_INDEX,
    MASK_TOKEN_ID,
    MASK_VALUE,
    PAD_TOKEN_ID,
    SPECIAL_TOKENS,
    SPECIAL_VALUE,
)

__all__ = [
    "DataCollatorForNextGene",
    "DataCollatorForGeneMLM",
    "DataCollatorForMaskedExpression",
    "DataCollatorForMaskedRegression",
    "DataCollatorForCellClassification",
    "DataCollatorForPerturbation",
]

#: The first id of a gene token; every id below it is a special token.
FIRST_GENE_ID = len(SPECIAL_TOKENS)

# ---------------------------------------------------------------------------------------------
# counter-based randomness (splitmix64): uniforms that depend only on (seed, epoch, cell, position)
# ---------------------------------------------------------------------------------------------
_U64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrap-around arithmetic is intended)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _mix64_int(x: int) -> int:
    """splitmix64 finaliser on a Python int (for scalar stream constants)."""
    x &= _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def _cell_keys(ids: np.ndarray, values: np.ndarray | None) -> np.ndarray:
    """A 64-bit key per row from its tokens' ids, values and positions.

    Padding (id 0, value 0.0) adds nothing, so the key does not depend on how far a row is padded.
    Position-weighted sums (odd 32-bit weights, wrap-around arithmetic: exact and identical on every
    machine) keep the sentence order in the key, since the rank encoding's order carries information;
    the final mix spreads the sums over all 64 bits.
    """
    length = ids.shape[1]
    weights = (np.arange(1, length + 1, dtype=np.uint64) * np.uint64(_GOLDEN) >> np.uint64(32)).astype(np.uint32)
    weights |= np.uint32(1)
    key = (ids.astype(np.uint32) * weights[None, :]).sum(axis=1, dtype=np.uint64)
    if values is not None:
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        key = _mix64(key) ^ ((bits * (weights ^ np.uint32(0x9E3779B9))[None, :]).sum(axis=1, dtype=np.uint64) << np.uint64(20))
    return _mix64(key)


def _uniforms(keys: np.ndarray, length: int, seed: int, epoch: int, stream: int) -> np.ndarray:
    """Uniform floats in [0, 1), shape [B, length]; entry (b, j) depends on (seed, epoch, stream, keys[b], j).

    splitmix64: row b's state starts at a mix of its key with the (seed, epoch, stream) constant and
    advances by the golden-ratio increment per position; each output is the finaliser of the state.
    """
    base = _mix64_int(_mix64_int(_mix64_int(seed) ^ (epoch * _GOLDEN)) ^ (stream + 1) * 0xD1B54A32D192ED03)
    start = _mix64(keys ^ np.uint64(base))
    pos = np.arange(1, length + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
    x = _mix64(start[:, None] + pos[None, :])
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _choose_exact(eligible: np.ndarray, u: np.ndarray, fraction) -> np.ndarray:
    """Boolean [B, L]: in each row exactly ``max(1, floor(fraction * n + 0.5))`` of the ``n`` eligible
    positions (none when ``n == 0``): the ones with the smallest uniforms ``u``."""
    n = eligible.sum(axis=1)
    k = np.floor(np.asarray(fraction) * n + 0.5).astype(np.int64)
    k = np.where(n > 0, np.clip(k, 1, np.maximum(n, 1)), 0)
    scores = np.where(eligible, u, 2.0)
    # The k-th smallest score of each row by selection (O(L) per row; a full argsort is O(L log L)).
    kth = np.array([np.partition(row, kb - 1)[kb - 1] if kb else -1.0 for row, kb in zip(scores, k)])
    chosen = scores <= kth[:, None]
    for b in np.flatnonzero(chosen.sum(axis=1) != k):  # tied uniforms (chance ~L^2 / 2^54): stable order
        chosen[b] = False
        chosen[b, np.argsort(scores[b], kind="stable")[: k[b]]] = True
    return chosen


# ---------------------------------------------------------------------------------------------
# the same arithmetic on flat (concatenated, unpadded) arrays: what the collators run
# ---------------------------------------------------------------------------------------------
# ``_cell_keys``, ``_uniforms`` and ``_choose_exact`` above define the randomness on padded [B, L]
# matrices and stay as the readable reference; the functions below compute bit-identical results
# on the real tokens only (one flat array for the whole batch plus per-cell lengths), so a batch of
# 64 cells of ~1,650 tokens costs a few vectorised passes over ~105k numbers and no per-cell Python.
_TABLES: dict[str, np.ndarray] = {}


def _position_tables(length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-position constants for positions 0..length-1, cached and grown on demand: the id weight
    and value weight of :func:`_cell_keys` (uint32), the splitmix counter ``(j + 1) * golden`` of
    :func:`_uniforms` (uint64), and ``j`` itself (int64)."""
    have = _TABLES.get("step")
    if have is None or len(have) < length:
        size = max(length, 1 << 16, 0 if have is None else 2 * len(have))
        step = np.arange(1, size + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
        weights = (step >> np.uint64(32)).astype(np.uint32) | np.uint32(1)
        _TABLES.update(step=step, weights=weights, value_weights=weights ^ np.uint32(0x9E3779B9),
                       index=np.arange(size, dtype=np.int64))
    return _TABLES["weights"], _TABLES["value_weights"], _TABLES["step"], _TABLES["index"]


def _mix64_(x: np.ndarray) -> np.ndarray:
    """:func:`_mix64` in place on a fresh uint64 array (no temporaries beyond one buffer)."""
    tmp = np.empty_like(x)
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        np.right_shift(x, np.uint64(shift), out=tmp)
        np.bitwise_xor(x, tmp, out=x)
        np.multiply(x, np.uint64(mult), out=x)
    np.right_shift(x, np.uint64(31), out=tmp)
    np.bitwise_xor(x, tmp, out=x)
    return x


def _segment_sums(terms: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """uint64 sum of ``terms`` over each segment (empty segments sum to 0), wrap-around exact."""
    if terms.size == 0:
        return np.zeros(len(lengths), dtype=np.uint64)
    sums = np.add.reduceat(terms, np.minimum(starts, terms.size - 1), dtype=np.uint64)
    sums[lengths == 0] = 0  # reduceat gives terms[start] for an empty segment
    return sums


class _Flat:
    """A batch as flat arrays: ``ids`` int64 [N] (int32 as read from a corpus's Arrow columns, uncopied),
    ``values`` float32 [N] or None, ``mask`` (the given attention mask) int64 [N] or None, ``extras``
    {key: float32 [N]}, ``lengths`` int64 [B] and ``starts`` (each cell's first flat index). Positions a
    given attention mask marks as padding already hold ``<pad>`` and 0.0, as in the padded output."""

    def __init__(self, ids, values, mask, extras, lengths):
        self.ids, self.values, self.mask, self.extras, self.lengths = ids, values, mask, extras, lengths
        self.n = len(lengths)
        self.starts = np.cumsum(lengths) - lengths
        self._keys = self._cell = None

    @property
    def cell(self) -> np.ndarray:
        """The cell index of every flat position."""
        if self._cell is None:
            self._cell = np.repeat(np.arange(self.n, dtype=np.int64), self.lengths)
        return self._cell

    def eligible(self) -> np.ndarray:
        """Boolean [N]: maskable positions, real (mask 1, or no mask) and a gene id."""
        ok = self.ids >= FIRST_GENE_ID
        if self.mask is not None:
            ok &= self.mask == 1
        return ok

    def keys(self) -> np.ndarray:
        """:func:`_cell_keys` of the padded batch, from the flat arrays."""
        if self._keys is None:
            total = len(self.ids)
            weights, value_weights, _, index = _position_tables(max(int(self.lengths.max()) if self.n else 0, total))
            pos = index[:total] - np.repeat(self.starts, self.lengths)
            terms = self.ids.astype(np.uint32)
            terms *= np.take(weights, pos)
            key = _segment_sums(terms, self.starts, self.lengths)
            if self.values is not None:
                bits = self.values.view(np.uint32) * np.take(value_weights, pos)
                key = _mix64_(key) ^ (_segment_sums(bits, self.starts, self.lengths) << np.uint64(20))
            self._keys = _mix64_(key)
        return self._keys

    def _cell_offsets(self, seed: int, epoch: int, stream: int) -> np.ndarray:
        """Per cell: its splitmix start minus ``start * golden``, so that adding the golden-ratio
        counter of the *flat* index (a cached table) gives the counter of the position in the cell."""
        base = _mix64_int(_mix64_int(_mix64_int(seed) ^ (epoch * _GOLDEN)) ^ (stream + 1) * 0xD1B54A32D192ED03)
        start = _mix64_(self.keys() ^ np.uint64(base))
        return start - self.starts.astype(np.uint64) * np.uint64(_GOLDEN)

    def draw_bits(self, seed: int, epoch: int, stream: int, where=None) -> np.ndarray:
        """The 53-bit integers behind :func:`_uniforms` (uint64) at every flat position, or at the
        flat indices ``where``; the uniform is this times 2**-53, so these order the uniforms exactly."""
        offsets = self._cell_offsets(seed, epoch, stream)
        total = len(self.ids)
        _, _, step, _ = _position_tables(total)
        if where is None:
            x = np.repeat(offsets, self.lengths)
            x += step[:total]
        else:
            x = offsets[self.cell[where]]
            x += step[where]
        return _mix64_(x) >> np.uint64(11)

    def draw(self, seed: int, epoch: int, stream: int, where=None) -> np.ndarray:
        """:func:`_uniforms` (float64 in [0, 1)) at every flat position, or at the flat indices ``where``."""
        return self.draw_bits(seed, epoch, stream, where).astype(np.float64) * (1.0 / (1 << 53))

    def draw_first(self, seed: int, epoch: int, stream: int) -> np.ndarray:
        """:func:`_uniforms` at position 0 of every cell (also of an empty one), float64 [B]."""
        offsets = self._cell_offsets(seed, epoch, stream)
        x = offsets + self.starts.astype(np.uint64) * np.uint64(_GOLDEN) + np.uint64(_GOLDEN)
        return (_mix64_(x) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

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


def _choose_exact_flat(flat: _Flat, eligible: np.ndarray, bits: np.ndarray, fraction) -> np.ndarray:
    """:func:`_choose_exact` on a flat batch: ``eligible`` boolean [N], ``bits`` [N] the 53-bit
    uniforms of :meth:`_Flat.draw_bits`. Returns a boolean [N]: in each cell exactly ``k`` of its
    eligible positions, those with the smallest uniforms, ties in position order.

    Selection by buckets instead of a sort: the top 8 bits of each uniform give one of 256 buckets
    (ineligible positions go to an extra bucket 256); per-cell bucket counts (one ``bincount``)
    locate the bucket holding each cell's k-th smallest; everything below it is chosen, and only that
    bucket's few members (about n / 256 per cell) are sorted by (cell, uniform, position) to take the
    rest. Exact, and a handful of linear passes.
    """
    nb, n_cells, lengths = 257, flat.n, flat.lengths
    n = _segment_sums(eligible.view(np.uint8), flat.starts, lengths).astype(np.int64)
    k = np.floor(np.asarray(fraction) * n + 0.5).astype(np.int64)
    k = np.where(n > 0, np.clip(k, 1, np.maximum(n, 1)), 0)
    bucket = np.where(eligible, bits >> np.uint64(45), np.uint64(nb - 1)).view(np.int64)
    comb = np.repeat(np.arange(n_cells, dtype=np.int64) * nb, lengths)
    comb += bucket
    counts = np.bincount(comb, minlength=n_cells * nb).reshape(n_cells, nb)[:, : nb - 1]
    cum = np.cumsum(counts, axis=1)
    t = (cum < k[:, None]).sum(axis=1)  # the bucket holding the k-th smallest (when k >= 1)
    below = np.where(t > 0, cum[np.arange(n_cells), np.maximum(t - 1, 0)], 0)
    t = np.where(k > 0, t, -1)
    t_m = np.repeat(t, lengths)
    chosen = bucket < t_m
    cand = np.flatnonzero(bucket == t_m)
    if cand.size:
        cand_cell = comb[cand] // nb
        order = np.lexsort((cand, bits[cand], cand_cell))
        sorted_cell = cand_cell[order]
        rank = np.arange(cand.size) - np.searchsorted(sorted_cell, sorted_cell, side="left")
        chosen[cand[order[rank < (k - below)[sorted_cell]]]] = True
    return chosen


# ---------------------------------------------------------------------------------------------
# optional compiled kernel (numba, a dependency of scanpy): keys, stream-0 uniforms and the exact-k
# choice in one pass per cell. Bit-identical to the NumPy functions above (tests pin the two
# together); used when numba imports, else the NumPy path runs. HF_SCFM_NUMBA=0 turns it off.
# ---------------------------------------------------------------------------------------------
_KERNEL: list = []


def _choose_kernel():
    """The compiled selection kernel, or None when numba is missing or disabled (built once per process)."""
    if not _KERNEL:
        _KERNEL.append(None)
        if os.environ.get("HF_SCFM_NUMBA", "1") != "0":
            try:
                _KERNEL[0] = _build_choose_kernel()
            except ImportError:
                pass
    return _KERNEL[0]


def _pad_masked_kernel():
    """The compiled padding pass of the masked-value collators, or None (as :func:`_choose_kernel`)."""
    if _choose_kernel() is None:
        return None
    if len(_KERNEL) < 2:
        import numba

        _KERNEL.append(numba.njit(cache=True, nogil=True)(_pad_masked_py))
    return _KERNEL[1]


def _pad_masked_py(ids, values, chosen, starts, lengths, mask_value, pad_id, pad_value, ignore,
                   ids_out, attn_out, values_out, labels_out):
    """Right-pad a masked-value batch in one pass over the uninitialised outputs: row ``b`` gets its
    ids, 1, the value (or ``mask_value`` where chosen) and the original value where chosen (else
    ``ignore``), then ``pad_id``, 0, ``pad_value``, ``ignore`` to the end. Compiled by numba; per-cell
    slices keep the inner loops free of negative-index checks, so they vectorise."""
    width = ids_out.shape[1]
    for b in range(starts.shape[0]):
        s, n = starts[b], lengths[b]
        c_ids, c_val, c_ch = ids[s:s + n], values[s:s + n], chosen[s:s + n]
        o_ids, o_attn, o_val, o_lab = ids_out[b], attn_out[b], values_out[b], labels_out[b]
        for j in range(n):
            v, c = c_val[j], c_ch[j]
            o_ids[j] = c_ids[j]
            o_attn[j] = 1
            o_val[j] = mask_value if c else v
            o_lab[j] = v if c else ignore
        for j in range(n, width):
            o_ids[j] = pad_id
            o_attn[j] = 0
            o_val[j] = pad_value
            o_lab[j] = ignore


def _empty_outputs(n: int, length: int, dtypes: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Uninitialised ``[n, length]`` arrays of the given dtypes, carved out of ONE allocation.

    A batch's padded outputs are a few MB. Allocated one by one, each is above glibc's mmap threshold
    at first and freeing them returns the pages to the kernel, so every batch pays a page fault per 4 KiB
    written (measured here: ~14 us per cell of a 64 x 2,048 batch, more than the masking). One block per
    batch raises malloc's dynamic threshold to its size after the first free, so later batches reuse heap
    memory that is already mapped (~3 us per cell). The tensors made from the views keep the block alive.
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


def _build_choose_kernel():
    """Compile :func:`_mix64_scalar` and :func:`_choose_kernel_py` (cached on disk by numba, so only
    the first process on a machine pays the few seconds of compiling)."""
    import numba

    global _mix64_nb
    _mix64_nb = numba.njit(cache=True, nogil=True, inline="always")(_mix64_scalar)
    return numba.njit(cache=True, nogil=True)(_choose_kernel_py)


_C30, _C27, _C31 = np.uint64(30), np.uint64(27), np.uint64(31)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_LOW32, _S11, _S20, _S45 = np.uint64(0xFFFFFFFF), np.uint64(11), np.uint64(20), np.uint64(45)
_NONE = np.uint64(0xFFFFFFFFFFFFFFFF)  # marks an ineligible position (real uniforms have 53 bits)
_mix64_nb = None


def _mix64_scalar(x):
    """:func:`_mix64` on one uint64 (compiled by numba)."""
    x = x ^ (x >> _C30)
    x = x * _M1
    x = x ^ (x >> _C27)
    x = x * _M2
    return x ^ (x >> _C31)


def _choose_kernel_py(ids, vbits, has_values, mask, has_mask, starts, lengths, weights, value_weights, step, base, fraction):
    """Per cell: its :func:`_cell_keys` key, its stream-0 uniforms (as 53-bit integers) at eligible
    positions, and the exact-k choice of :func:`_choose_exact_flat` (same buckets). Returns
    ``(chosen bool [N], keys uint64 [B])``. Compiled by numba; plain Python would be far too slow.

    Scratch is one cell long (not batch long: big fresh arrays cost a page fault per 4 KiB), and the
    loops run over per-cell slices with no branches where they can, so they vectorise."""
    n_cells = starts.shape[0]
    keys = np.empty(n_cells, dtype=np.uint64)
    chosen = np.empty(ids.shape[0], dtype=np.bool_)
    width = 1
    for b in range(n_cells):
        width = max(width, lengths[b])
    bits = np.empty(width, dtype=np.uint64)
    cand = np.empty(width, dtype=np.uint64)
    cand_at = np.empty(width, dtype=np.int64)
    counts = np.zeros(256, dtype=np.int64)
    for b in range(n_cells):
        s, n = starts[b], lengths[b]
        c_ids, c_ch, c_bits = ids[s:s + n], chosen[s:s + n], bits[:n]
        acc = np.uint64(0)
        if has_values:
            c_v = vbits[s:s + n]
            accv = np.uint64(0)
            for j in range(n):
                acc += ((np.uint64(c_ids[j]) & _LOW32) * np.uint64(weights[j])) & _LOW32
                accv += (np.uint64(c_v[j]) * np.uint64(value_weights[j])) & _LOW32
            acc = _mix64_nb(acc) ^ (accv << _S20)
        else:
            for j in range(n):
                acc += ((np.uint64(c_ids[j]) & _LOW32) * np.uint64(weights[j])) & _LOW32
        key = _mix64_nb(acc)
        keys[b] = key
        start = _mix64_nb(key ^ base)
        for j in range(n):  # every position's uniform (vectorised); ineligible ones are overwritten next
            c_bits[j] = _mix64_nb(start + step[j]) >> _S11
        m = 0
        counts[:] = 0
        if has_mask:
            c_mask = mask[s:s + n]
            for j in range(n):
                if c_ids[j] >= 6 and c_mask[j] == 1:
                    counts[c_bits[j] >> _S45] += 1
                    m += 1
                else:
                    c_bits[j] = _NONE
        else:
            for j in range(n):
                if c_ids[j] >= 6:
                    counts[c_bits[j] >> _S45] += 1
                    m += 1
                else:
                    c_bits[j] = _NONE
        if m == 0:
            c_ch[:] = False
            continue
        k = np.int64(np.floor(fraction[b] * m + 0.5))
        k = min(max(k, 1), m)
        t, below = 0, 0
        while below + counts[t] < k:  # bucket t holds the k-th smallest
            below += counts[t]
            t += 1
        need = k - below
        tb = np.uint64(t)
        for j in range(n):  # everything below bucket t is chosen (ineligible: bucket 2**19 - 1, never)
            c_ch[j] = (c_bits[j] >> _S45) < tb
        c = 0
        for j in range(n):  # bucket t's members in position order
            if (c_bits[j] >> _S45) == tb:
                cand[c] = c_bits[j]
                cand_at[c] = j
                c += 1
        for _ in range(need):  # the smallest remaining candidate, the first in position order on ties
            best = 0
            for q in range(1, c):
                if cand[q] < cand[best]:
                    best = q
            c_ch[cand_at[best]] = True
            cand[best] = _NONE
    return chosen, keys


# ---------------------------------------------------------------------------------------------
# shared padding
# ---------------------------------------------------------------------------------------------
class _Cells:
    """Uniform access to a batch of cells given either as a list of records (mappings, one per cell:
    what a ``DataLoader`` over a dataset passes) or as columns (a mapping of per-cell lists, a
    ``pyarrow.Table`` / ``RecordBatch``: what ``Dataset.iter(batch_size)`` or an Arrow-formatted
    dataset yields). The columnar form skips per-cell Python objects entirely: list columns are read
    as one flat array plus lengths."""

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
        """``(flat values, lengths)`` of a per-cell sequence column; records lacking ``key`` get
        ``default`` repeated ``default_lengths[i]`` times when given. An Arrow column whose values are
        already of a dtype in ``keep`` stays as is (zero-copy) instead of being converted to ``dtype``."""
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


def _flatten(records, *, need_values: bool, extra_float_keys: Sequence[str] = ()) -> _Flat:
    """A batch (records, columns, Arrow, or :class:`_Cells`) as a checked :class:`_Flat`: every column
    one concatenated array plus per-cell lengths (zero-copy from Arrow, where the dtype allows)."""
    cells = records if isinstance(records, _Cells) else _Cells(records)
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
    return _Flat(ids, values, mask, extras, lengths)


def _pad_flat(flat: _Flat, pad_to_multiple_of: int | None, **replaced: np.ndarray) -> dict[str, np.ndarray]:
    """Right-pad ``input_ids`` (with ``<pad>``), ``values`` (with 0.0), ``attention_mask`` (with 0) and
    the extra float columns (with 0.0) to the longest cell, as NumPy arrays. ``replaced`` gives flat
    arrays to pad instead of the batch's own (e.g. masked ``values``), or new float columns
    (``labels``, padded with -100.0)."""
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


def _pad_records(records, *, need_values: bool, pad_to_multiple_of: int | None,
                 extra_float_keys: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """:func:`_flatten` then :func:`_pad_flat`: the padded NumPy arrays of a batch."""
    flat = _flatten(records, need_values=need_values, extra_float_keys=extra_float_keys)
    return _pad_flat(flat, pad_to_multiple_of)


def _to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def _check_fraction(fraction, name: str) -> tuple[float, float]:
    lo, hi = (fraction, fraction) if np.isscalar(fraction) else tuple(fraction)
    if not (0.0 < lo <= hi <= 1.0):
        raise ValueError(f"{name} must be a fraction in (0, 1] or a (low, high) range inside it, got {fraction!r}.")
    return float(lo), float(hi)


class _SeededCollator:
    """Shared seeding and padding: subclasses implement :meth:`_collate` (records -> dict of NumPy arrays)."""

    needs_values = True

    def __init__(self, *, seed: int = 0, pad_to_multiple_of: int | None = None):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of}.")
        self.seed = int(seed)
        self.epoch = 0
        self.pad_to_multiple_of = pad_to_multiple_of

    def set_epoch(self, epoch: int) -> None:
        """Change the masks drawn from now on (the epoch is part of every cell's random stream)."""
        self.epoch = int(epoch)

    def _pad(self, records, extra_float_keys=()) -> dict[str, np.ndarray]:
        """Padded NumPy arrays of a batch (a list of records, a columnar batch, or a :class:`_Cells`)."""
        return _pad_records(
            records,
            need_values=self.needs_values,
            pad_to_multiple_of=self.pad_to_multiple_of,
            extra_float_keys=extra_float_keys,
        )

    def _flatten(self, records) -> _Flat:
        return _flatten(records, need_values=self.needs_values)

    def _eligible(self, batch) -> np.ndarray:
        return (batch["attention_mask"] == 1) & (batch["input_ids"] >= FIRST_GENE_ID)

    def _choose(self, flat: _Flat, fraction) -> np.ndarray:
        """Boolean [N], the flat positions to mask: per cell the exact count of :func:`_choose_exact`
        among the eligible positions, by random stream 0."""
        kernel = _choose_kernel()
        if kernel is None:
            return _choose_exact_flat(flat, flat.eligible(), flat.draw_bits(self.seed, self.epoch, 0), fraction)
        weights, value_weights, step, _ = _position_tables(int(flat.lengths.max()) if flat.n else 1)
        base = _mix64_int(_mix64_int(_mix64_int(self.seed) ^ (self.epoch * _GOLDEN)) ^ 0xD1B54A32D192ED03)
        empty = np.zeros(0, dtype=np.int64)
        vbits = empty.view(np.uint32) if flat.values is None else flat.values.view(np.uint32)
        chosen, flat._keys = kernel(flat.ids, vbits, flat.values is not None, empty if flat.mask is None else flat.mask,
                                    flat.mask is not None, flat.starts, flat.lengths, weights, value_weights, step,
                                    np.uint64(base), np.array(np.broadcast_to(np.asarray(fraction, dtype=np.float64), (flat.n,))))
        return chosen

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return _to_torch(self._collate(records))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


# ---------------------------------------------------------------------------------------------
# the objectives
# ---------------------------------------------------------------------------------------------
class DataCollatorForNextGene(_SeededCollator):
    """Next-gene prediction (Mouse-GeneMamba): ``labels`` = ``input_ids`` with padding set to -100.

    The causal model shifts the labels inside its forward, as every Hugging Face causal LM does, so
    the ``<bos>`` at position 0 is never a target and ``<eos>`` is (the model learns where a cell
    sentence ends). ``values`` are optional here (the "without expression" ablation needs none);
    when no record has them the batch has no ``values`` key. Nothing is random.
    """

    needs_values = False

    def __init__(self, *, pad_to_multiple_of: int | None = None):
        super().__init__(seed=0, pad_to_multiple_of=pad_to_multiple_of)

    def _collate(self, records):
        batch = self._pad(records)
        batch["labels"] = np.where(batch["attention_mask"] == 1, batch["input_ids"], IGNORE_INDEX)
        return batch


class DataCollatorForGeneMLM(_SeededCollator):
    """Gene masked-language modelling (BERT-style, the Mouse-GeneMamba MLM variant).

    In each cell exactly ``floor(mlm_probability * n_genes + 0.5)`` gene tokens (at least one) are
    chosen. Of the chosen, by a per-position draw: 80 % become ``<mask>``, 10 % a random gene token
    (uniform over ids ``6 .. vocab_size - 1``), 10 % stay unchanged. ``labels`` hold the original id
    at chosen positions and -100 elsewhere. ``values`` pass through untouched (the expression of a
    masked gene is still an input, as in the paper's expression-aware model).

    Args:
        tokenizer: a ``GeneTokenizer`` (only ``len(tokenizer)`` is read), or pass ``vocab_size``.
        vocab_size: size of the vocabulary; random replacements are drawn below it.
        mlm_probability: fraction of gene tokens chosen per cell (default 0.15).
        seed: random seed (see the module docstring: masks depend on seed, epoch and cell).
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    needs_values = False

    def __init__(self, tokenizer=None, *, vocab_size: int | None = None, mlm_probability: float = 0.15,
                 seed: int = 0, pad_to_multiple_of: int | None = None):
        super().__init__(seed=seed, pad_to_multiple_of=pad_to_multiple_of)
        if vocab_size is None:
            if tokenizer is None:
                raise ValueError("DataCollatorForGeneMLM needs the vocabulary size: pass tokenizer=... or vocab_size=....")
            vocab_size = len(tokenizer)
        if vocab_size <= FIRST_GENE_ID:
            raise ValueError(f"vocab_size must exceed the {FIRST_GENE_ID} special tokens, got {vocab_size}.")
        self.vocab_size = int(vocab_size)
        self.mlm_probability = _check_fraction(mlm_probability, "mlm_probability")[0]

    def _collate(self, records):
        flat = self._flatten(records)
        ids = flat.ids
        if ids.size and ids.max() >= self.vocab_size:
            raise ValueError(
                f"A record holds token id {int(ids.max())} but vocab_size is {self.vocab_size}: the corpus was "
                "built with a different tokenizer. Use the tokenizer the corpus was built with."
            )
        where = np.flatnonzero(self._choose(flat, np.float64(self.mlm_probability)))
        action = flat.draw(self.seed, self.epoch, 1, where)
        random_ids = FIRST_GENE_ID + np.floor(flat.draw(self.seed, self.epoch, 2, where) * (self.vocab_size - FIRST_GENE_ID)).astype(np.int64)
        labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
        labels[where] = ids[where]
        new_ids = ids.copy()
        new_ids[where] = np.where(action < 0.8, MASK_TOKEN_ID, np.where(action < 0.9, random_ids, ids[where]))
        return _pad_flat(flat, self.pad_to_multiple_of, input_ids=new_ids, labels=labels)


class _MaskedValueCollator(_SeededCollator):
    """Masks a fraction of gene values with ``MASK_VALUE``; float labels hold the originals."""

    default_fraction: float = 0.15

    def __init__(self, *, mask_fraction=None, seed: int = 0, pad_to_multiple_of: int | None = None):
        super().__init__(seed=seed, pad_to_multiple_of=pad_to_multiple_of)
        self.mask_fraction = self.default_fraction if mask_fraction is None else mask_fraction
        self._range = _check_fraction(self.mask_fraction, "mask_fraction")

    def _collate(self, records):
        flat = self._flatten(records)
        lo, hi = self._range
        frac = np.full(flat.n, lo)
        if hi > lo:  # per-cell fraction, drawn from the cell's own stream (its position 0)
            frac = lo + (hi - lo) * flat.draw_first(self.seed, self.epoch, 3)
        chosen = self._choose(flat, frac)
        values = flat.values
        pad_kernel = _pad_masked_kernel()
        if pad_kernel is not None and flat.mask is None:  # one compiled pass writes all four outputs
            length = flat.padded_length(self.pad_to_multiple_of)
            out = _empty_outputs(flat.n, length, {"input_ids": np.int64, "attention_mask": np.int64,
                                                  "values": np.float32, "labels": np.float32})
            pad_kernel(flat.ids, values, chosen, flat.starts, flat.lengths, np.float32(MASK_VALUE),
                       np.int64(PAD_TOKEN_ID), np.float32(SPECIAL_VALUE), np.float32(IGNORE_INDEX),
                       out["input_ids"], out["attention_mask"], out["values"], out["labels"])
            return out
        labels = np.where(chosen, values, np.float32(IGNORE_INDEX))
        masked = np.where(chosen, np.float32(MASK_VALUE), values)
        return _pad_flat(flat, self.pad_to_multiple_of, values=masked, labels=labels)


class DataCollatorForMaskedExpression(_MaskedValueCollator):
    """Masked expression modelling on binned values (SC-MAMBA2).

    In each cell a fraction of the gene positions (``<cls>``, other specials and padding excluded)
    get ``values = MASK_VALUE`` (-1.0); the model swaps in its mask embedding there. ``labels``
    float32 [B, L] hold the original bin at masked positions and -100.0 elsewhere; the loss is MSE
    over ``labels != -100``. ``input_ids`` are untouched: the model knows which gene it predicts.

    Args:
        mask_fraction: fraction of gene positions masked per cell, or a ``(low, high)`` range from
            which each cell draws its own fraction (seeded, per cell). Default 0.4: the SPEC allows
            15-40 %; SC-MAMBA2 follows scGPT, whose masked-value training uses 0.4. Pass
            ``(0.15, 0.4)`` to spread cells over the whole range.
        seed: random seed (masks depend on seed, epoch and cell content only).
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    default_fraction = 0.4


class DataCollatorForMaskedRegression(_MaskedValueCollator):
    """Masked regression on continuous ``log1p`` values (CellFM): 20 % of real genes by default.

    Same output as :class:`DataCollatorForMaskedExpression`: masked ``values`` set to ``MASK_VALUE``,
    float32 ``labels`` with the original value at masked positions and -100.0 elsewhere.

    Args:
        mask_fraction: fraction of gene positions masked per cell, or a ``(low, high)`` range (default 0.2, as CellFM).
        seed: random seed (masks depend on seed, epoch and cell content only).
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    default_fraction = 0.2


class DataCollatorForCellClassification(_SeededCollator):
    """Cell classification: pads the cells and maps ``record[label_column]`` to ``labels`` int64 [B].

    The label map ``label2id`` is given, fitted with :meth:`fit` (sorted labels -> 0..K-1, so the same
    labels always give the same ids), or loaded with :meth:`from_config` / :meth:`load_label_map`.
    Save it with the model by :meth:`update_config` (sets ``config.label2id``, ``config.id2label``,
    ``config.num_labels``, which ``save_pretrained`` writes into ``config.json``) or as JSON with
    :meth:`save_label_map`. A label missing from the map raises a ``ValueError`` naming the label and
    the column (a cell type never seen in training cannot be scored). Without a map, integer labels
    pass through as ids.

    With the ``transformers.Trainer``, keep the label column in the batches: either set
    ``remove_unused_columns=False`` or name the column ``"label"`` (which the Trainer keeps).

    Args:
        label_column: the record key holding the label (an obs column written by the corpus builder).
        label2id: ``{label: id}``; ids must be 0..K-1.
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    def __init__(self, label_column: str = "cell_type", label2id: Mapping[Any, int] | None = None, *,
                 pad_to_multiple_of: int | None = None):
        super().__init__(seed=0, pad_to_multiple_of=pad_to_multiple_of)
        self.label_column = label_column
        self.label2id = None if label2id is None else self._checked_map(label2id)

    @staticmethod
    def _checked_map(label2id: Mapping[Any, int]) -> dict[Any, int]:
        mapping = {k: int(v) for k, v in label2id.items()}
        if sorted(mapping.values()) != list(range(len(mapping))):
            raise ValueError(f"label2id must map the labels onto 0..{len(mapping) - 1} exactly once each, got {mapping}.")
        return mapping

    @property
    def id2label(self) -> dict[int, Any]:
        if self.label2id is None:
            raise ValueError("No label map yet: pass label2id=..., call fit(labels), or load one (from_config / load_label_map).")
        return {i: label for label, i in self.label2id.items()}

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def fit(self, labels) -> DataCollatorForCellClassification:
        """Build ``label2id`` from the training labels (an iterable of labels, or a dataset/records
        holding ``label_column``): the sorted distinct labels get ids 0..K-1."""
        if hasattr(labels, "column_names"):
            if self.label_column not in labels.column_names:
                raise ValueError(f"Label column {self.label_column!r} not in the dataset (columns: {labels.column_names}).")
            labels = labels[self.label_column]
        labels = [lab[self.label_column] if isinstance(lab, Mapping) else lab for lab in labels]
        distinct = sorted({(x.item() if isinstance(x, np.generic) else x) for x in labels}, key=lambda x: (str(type(x)), x))
        if not distinct:
            raise ValueError("fit() got no labels.")
        self.label2id = {label: i for i, label in enumerate(distinct)}
        return self

    def update_config(self, config) -> None:
        """Write the label map into a model config (``label2id``, ``id2label``, ``num_labels``)."""
        config.num_labels = self.num_labels
        config.id2label = {i: str(label) for i, label in self.id2label.items()}
        config.label2id = {str(label): i for label, i in self.label2id.items()}

    @classmethod
    def from_config(cls, config, label_column: str = "cell_type", **kwargs) -> DataCollatorForCellClassification:
        """The collator for a fine-tuned model: the label map comes from ``config.id2label``."""
        id2label = getattr(config, "id2label", None)
        if not id2label:
            raise ValueError("The config has no id2label; it was not saved by a fine-tuned classifier.")
        return cls(label_column, {label: int(i) for i, label in id2label.items()}, **kwargs)

    def save_label_map(self, path: str | os.PathLike) -> None:
        """Write ``{"label_column": ..., "label2id": {...}}`` as JSON (labels as strings)."""
        if self.label2id is None:
            raise ValueError("No label map to save: pass label2id=... or call fit(labels) first.")
        payload = {"label_column": self.label_column, "label2id": {str(k): v for k, v in self.label2id.items()}}
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True)

    @classmethod
    def load_label_map(cls, path: str | os.PathLike, **kwargs) -> DataCollatorForCellClassification:
        """The collator whose label map was written by :meth:`save_label_map`."""
        with open(path, encoding="utf-8") as fh:
            payload = json.load(fh)
        return cls(payload["label_column"], payload["label2id"], **kwargs)

    def _label_id(self, label, index: int) -> int:
        if isinstance(label, np.generic):
            label = label.item()
        if self.label2id is None:
            if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and label >= 0:
                return int(label)
            raise ValueError(
                f"Label {label!r} in column {self.label_column!r} is not an integer id and there is no label map: "
                "pass label2id=..., or call fit(train_labels) first."
            )
        try:
            return self.label2id[label]
        except KeyError:
            key = str(label)
            if key in self.label2id:  # maps loaded from JSON / config have string keys
                return self.label2id[key]
            raise ValueError(
                f"Label {label!r} (record {index}) in column {self.label_column!r} was not seen in training; the model "
                f"knows {len(self.label2id)} labels: {sorted(map(str, self.label2id))}. Drop those cells or "
                "re-train with them."
            ) from None

    def _collate(self, records):
        cells = _Cells(records)
        if not cells.has(self.label_column):
            i = cells.first_without(self.label_column)
            raise ValueError(
                f"Record {i} has no label column {self.label_column!r} (record keys: {cells.keys_of(i)}). Build the "
                "corpus with --obs-columns including it, or pass label_column=... naming the right column. With "
                "the Trainer, set remove_unused_columns=False (or name the column 'label')."
            )
        batch = self._pad(cells)
        labels = cells.column(self.label_column)
        batch["labels"] = np.array([self._label_id(label, i) for i, label in enumerate(labels)], dtype=np.int64)
        return batch


class DataCollatorForPerturbation(_SeededCollator):
    """Perturbation prediction: control-cell input, perturbed-cell target, per-position flags.

    Each record holds ``input_ids`` and ``values`` of a *control* cell, ``target_column`` (default
    ``"target_values"``) with the *perturbed* cell's values at the same genes (same length), and
    either ``perturbation_flags`` (0/1 per position) or ``perturbed_genes_column`` (default
    ``"perturbed_gene_ids"``: the token ids of the perturbed genes; empty for a control). Output:
    ``input_ids``, ``values`` (control), ``attention_mask``, ``perturbation_flags`` int64 [B, L] (1 where
    the position's gene is perturbed), ``labels`` float32 [B, L] = target values at gene positions,
    -100.0 at padding and special tokens. A perturbed gene absent from the control sentence gets no
    flag: build perturbation sentences with ``include_zero_genes`` so every gene has a position.
    """

    def __init__(self, *, target_column: str = "target_values", perturbed_genes_column: str = "perturbed_gene_ids",
                 pad_to_multiple_of: int | None = None):
        super().__init__(seed=0, pad_to_multiple_of=pad_to_multiple_of)
        self.target_column = target_column
        self.perturbed_genes_column = perturbed_genes_column

    def _collate(self, records):
        cells = _Cells(records)
        use_flags = cells.has("perturbation_flags")
        extra = [self.target_column] + (["perturbation_flags"] if use_flags else [])
        batch = self._pad(cells, extra_float_keys=extra)
        target = batch.pop(self.target_column)
        if use_flags:
            flags = batch.pop("perturbation_flags").astype(np.int64)
        else:
            if not cells.has(self.perturbed_genes_column):
                i = cells.first_without(self.perturbed_genes_column)
                raise ValueError(
                    f"Record {i} has neither 'perturbation_flags' nor {self.perturbed_genes_column!r} (record keys: "
                    f"{cells.keys_of(i)}). Give the perturbed genes' token ids (empty for a control cell)."
                )
            flags = np.zeros_like(batch["input_ids"])
            for i, genes in enumerate(cells.column(self.perturbed_genes_column)):
                flags[i] = np.isin(batch["input_ids"][i], np.asarray(genes, dtype=np.int64).reshape(-1))
        eligible = self._eligible(batch)
        if ((flags != 0) & ~eligible).any():
            raise ValueError("perturbation_flags mark a special-token or padding position; only gene positions can be perturbed.")
        batch["perturbation_flags"] = (flags != 0).astype(np.int64) * eligible
        batch["labels"] = np.where(eligible, target, np.float32(IGNORE_INDEX)).astype(np.float32)
        return batch
