"""Which positions a collator masks: the rule, its plain reference, and its one compiled fast path.

**The rule.** In each cell, a position is *eligible* when it is real (attention mask 1) and holds a gene id
(>= :data:`FIRST_GENE_ID`, after the six special tokens). Of a cell's ``n`` eligible positions exactly
``k = max(1, floor(fraction * n + 0.5))`` are chosen (none when ``n == 0``): those with the smallest uniforms of
random stream 0, ties broken by position. Exact counts, not coin flips, so every cell is in the loss and the
fraction is testable.

**The randomness is per cell.** A cell's 64-bit *key* (:func:`cell_keys`) hashes its ids, values and their
positions; the uniform of position ``j`` in stream ``s`` (:func:`uniform_bits`) is the splitmix64 output of
``splitmix64(key ^ stream_base(seed, epoch, s)) + (j + 1) * golden``. So a cell gets the same mask whatever
batch, padding, worker process or machine it lands in, and the same seed always reproduces the same batches.
Streams: 0 chooses the positions, 1 and 2 are the gene-MLM's action and random gene, 3 a cell's own fraction
when a ``(low, high)`` range is given (:func:`cell_fractions`, position 0). The hash is
:func:`hf_scfm.tokenization.encodings.splitmix64`, the one the tokenizer's seeded sampling uses.

**Reference and fast path.** :func:`choose_reference` computes the rule on padded ``[B, L]`` NumPy arrays, in a
few lines per step; it is the definition and runs when numba is missing (or ``HF_SCFM_NUMBA=0``). When numba
imports (it comes with scanpy and the ``fast`` extra), :func:`choose_compiled` does the same per cell in one
compiled pass over the flat (unpadded) tokens: key, fraction, uniforms, and the exact-k choice by a 256-bucket
selection instead of a sort; and :func:`pad_masked_compiled` writes a masked-value batch's four padded outputs in
one more pass. ``tests/test_collator_fastpath.py`` pins the fast path to the reference bit for bit (odd lengths,
empty cells, tied cells, padding, several seeds), and ``tests/test_collator_batches.py`` pins both to stored
batches.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from ..tokenization import encodings
from ..tokenization.encodings import splitmix64
from ..tokenization.special_tokens import SPECIAL_TOKENS

__all__ = ["FIRST_GENE_ID", "cell_keys", "uniform_bits", "uniforms", "cell_fractions", "choose_exact",
           "choose_reference", "compiled_kernels", "choose_compiled", "pad_masked_compiled"]

#: The first id of a gene token; every id below it is a special token.
FIRST_GENE_ID = len(SPECIAL_TOKENS)
#: Random streams (see the module docstring).
CHOICE_STREAM, MLM_ACTION_STREAM, MLM_RANDOM_GENE_STREAM, FRACTION_STREAM = 0, 1, 2, 3

_U64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_STREAM_STEP = 0xD1B54A32D192ED03
_VALUE_WEIGHT_MASK = 0x9E3779B9


def _mix(x: int) -> int:
    return int(splitmix64(np.uint64(x & _U64)))


@lru_cache(maxsize=4096)
def stream_base(seed: int, epoch: int, stream: int) -> np.uint64:
    """The 64-bit constant of one random stream of one epoch of one seed (cached: computed once per batch
    otherwise, which costs more than it looks, ~0.4 us per cell of a 64-cell batch)."""
    return np.uint64(_mix(_mix(_mix(seed) ^ (epoch * _GOLDEN)) ^ (stream + 1) * _STREAM_STEP))


def _position_weights(length: int) -> tuple[np.ndarray, np.ndarray]:
    """Odd 32-bit weights of positions ``0 .. length - 1`` for the ids and for the value bits."""
    weights, value_weights, _ = _position_tables(length)
    return weights[:length], value_weights[:length]


_TABLES: dict[str, np.ndarray] = {}


def _position_tables(length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-position constants for positions ``0 .. >= length - 1``, cached and grown on demand: the id and value
    weights of :func:`cell_keys` (uint32) and the splitmix counter ``(j + 1) * golden`` (uint64)."""
    have = _TABLES.get("counters")
    if have is None or len(have) < length:
        size = max(length, 1 << 12, 0 if have is None else 2 * len(have))
        counters = np.arange(1, size + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
        weights = (counters >> np.uint64(32)).astype(np.uint32) | np.uint32(1)
        _TABLES.update(counters=counters, weights=weights, value_weights=weights ^ np.uint32(_VALUE_WEIGHT_MASK))
    return _TABLES["weights"], _TABLES["value_weights"], _TABLES["counters"]


# ---------------------------------------------------------------------------------------------------------------
# the reference, on padded [B, L] arrays
# ---------------------------------------------------------------------------------------------------------------


def cell_keys(ids: np.ndarray, values: np.ndarray | None) -> np.ndarray:
    """A 64-bit key per row of ``ids`` [B, L] (and float32 ``values`` [B, L]).

    Position-weighted sums of the ids and of the values' bits (odd 32-bit weights, 32-bit products summed in 64
    bits: exact and the same on every machine) keep the sentence order in the key, since the rank encoding's order
    carries information; splitmix64 spreads the sums over all 64 bits. Padding (id 0, value 0.0) adds nothing, so
    the key does not depend on how far a row is padded.
    """
    weights, value_weights = _position_weights(ids.shape[1])
    with np.errstate(over="ignore"):
        key = (ids.astype(np.uint32) * weights[None, :]).sum(axis=1, dtype=np.uint64)
        if values is not None:
            bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
            value_sum = (bits * value_weights[None, :]).sum(axis=1, dtype=np.uint64)
            key = splitmix64(key) ^ (value_sum << np.uint64(20))
    return splitmix64(key)


def uniform_bits(keys: np.ndarray, positions: np.ndarray, seed: int, epoch: int, stream: int) -> np.ndarray:
    """The 53-bit integers behind the uniforms of (cell key, position) pairs (broadcast together); the uniform is
    this times ``2**-53``, so these order the uniforms exactly."""
    start = splitmix64(np.asarray(keys, dtype=np.uint64) ^ stream_base(seed, epoch, stream))
    with np.errstate(over="ignore"):
        counter = start + (np.asarray(positions).astype(np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN)
    return splitmix64(counter) >> np.uint64(11)


def uniforms(keys: np.ndarray, positions: np.ndarray, seed: int, epoch: int, stream: int) -> np.ndarray:
    """Uniform floats in [0, 1) of (cell key, position) pairs: :func:`uniform_bits` times ``2**-53``."""
    return uniform_bits(keys, positions, seed, epoch, stream).astype(np.float64) * (1.0 / (1 << 53))


def cell_fractions(keys: np.ndarray, fraction: tuple[float, float], seed: int, epoch: int) -> np.ndarray:
    """float64 [B]: ``low`` for every cell, or with ``low < high`` each cell's own draw from [low, high)
    (stream 3 at position 0)."""
    lo, hi = fraction
    if hi <= lo:
        return np.full(len(keys), lo)
    return lo + (hi - lo) * uniforms(keys, np.zeros(len(keys), dtype=np.int64), seed, epoch, FRACTION_STREAM)


def choose_exact(eligible: np.ndarray, u: np.ndarray, fraction: np.ndarray) -> np.ndarray:
    """Boolean [B, L]: in each row exactly ``max(1, floor(fraction * n + 0.5))`` of the ``n`` eligible positions
    (none when ``n == 0``): those with the smallest ``u``, ties broken by position."""
    n = eligible.sum(axis=1)
    k = np.floor(np.asarray(fraction) * n + 0.5).astype(np.int64)
    k = np.where(n > 0, np.clip(k, 1, np.maximum(n, 1)), 0)
    scores = np.where(eligible, u, 2.0)
    # The k-th smallest score of each row by selection (O(L) per row; a full argsort is O(L log L)).
    kth = np.array([np.partition(row, kb - 1)[kb - 1] if kb else -1.0 for row, kb in zip(scores, k)])
    chosen = scores <= kth[:, None]
    for b in np.flatnonzero(chosen.sum(axis=1) != k):  # tied uniforms (chance ~L^2 / 2^54): position order
        chosen[b] = False
        chosen[b, np.argsort(scores[b], kind="stable")[: k[b]]] = True
    return chosen


def choose_reference(ids: np.ndarray, values: np.ndarray | None, attention_mask: np.ndarray,
                     fraction: tuple[float, float], seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The rule on a padded batch: ``(chosen bool [B, L], keys uint64 [B])``."""
    keys = cell_keys(ids, values)
    eligible = (attention_mask == 1) & (ids >= FIRST_GENE_ID)
    u = uniforms(keys[:, None], np.arange(ids.shape[1])[None, :], seed, epoch, CHOICE_STREAM)
    return choose_exact(eligible, u, cell_fractions(keys, fraction, seed, epoch)), keys


# ---------------------------------------------------------------------------------------------------------------
# the compiled fast path (numba), on flat arrays: one pass per cell
# ---------------------------------------------------------------------------------------------------------------
_KERNELS: list = []
_mix_nb = None
_C20, _C11, _C45 = np.uint64(20), np.uint64(11), np.uint64(45)
_LOW32, _G = np.uint64(0xFFFFFFFF), np.uint64(_GOLDEN)
_NONE = np.uint64(_U64)  # marks an ineligible position (real uniforms have 53 bits)
_TO_UNIT = 1.0 / (1 << 53)


def compiled_kernels() -> tuple[Any, Any] | None:
    """``(choose, pad_masked)`` compiled by numba, or None when numba is missing or ``HF_SCFM_NUMBA=0``. Built once
    per process; numba caches the machine code on disk, so only the first process on a machine compiles."""
    if not _KERNELS:
        _KERNELS.append(None)
        if encodings._sampled_kernel() is not None:  # the tokenizer's rule: numba imports and HF_SCFM_NUMBA != 0
            import numba

            global _mix_nb
            _mix_nb = encodings._mix_nb  # the tokenizer's compiled splitmix64: one hash, compiled once
            _KERNELS[0] = (numba.njit(cache=True, nogil=True)(_choose_cells),
                           numba.njit(cache=True, nogil=True)(_pad_masked_cells))
    return _KERNELS[0]


def _choose_cells(ids, vbits, has_values, mask, has_mask, starts, lengths, weights, value_weights, counters, base,
                  fraction_base, lo, hi):
    """Per cell: its :func:`cell_keys` key, its fraction (:func:`cell_fractions`), its stream-0 uniforms (as
    53-bit integers) and the exact-k choice of :func:`choose_exact`. Returns ``(chosen bool [N], keys uint64 [B])``.

    The k-th smallest uniform is found by buckets instead of a sort: the top 8 of the 53 bits give one of 256
    buckets; counting them locates the bucket holding the k-th smallest; everything below it is chosen, and only
    that bucket's few members (about n / 256) are compared. Scratch is one cell long (big fresh arrays cost a page
    fault per 4 KiB), and the loops run over per-cell slices so they vectorise."""
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
            acc = _mix_nb(acc) ^ (accv << _C20)
        else:
            for j in range(n):
                acc += ((np.uint64(c_ids[j]) & _LOW32) * np.uint64(weights[j])) & _LOW32
        key = _mix_nb(acc)
        keys[b] = key
        fraction = lo
        if hi > lo:
            fraction = lo + (hi - lo) * (np.float64(_mix_nb(_mix_nb(key ^ fraction_base) + _G) >> _C11) * _TO_UNIT)
        start = _mix_nb(key ^ base)
        for j in range(n):  # every position's uniform (vectorised); ineligible ones are overwritten next
            c_bits[j] = _mix_nb(start + counters[j]) >> _C11
        m = 0
        counts[:] = 0
        if has_mask:
            c_mask = mask[s:s + n]
            for j in range(n):
                if c_ids[j] >= FIRST_GENE_ID and c_mask[j] == 1:
                    counts[c_bits[j] >> _C45] += 1
                    m += 1
                else:
                    c_bits[j] = _NONE
        else:
            for j in range(n):
                if c_ids[j] >= FIRST_GENE_ID:
                    counts[c_bits[j] >> _C45] += 1
                    m += 1
                else:
                    c_bits[j] = _NONE
        if m == 0:
            c_ch[:] = False
            continue
        k = np.int64(np.floor(fraction * m + 0.5))
        k = min(max(k, 1), m)
        t, below = 0, 0
        while below + counts[t] < k:  # bucket t holds the k-th smallest
            below += counts[t]
            t += 1
        tb = np.uint64(t)
        for j in range(n):  # everything below bucket t is chosen (ineligible: bucket 2**19 - 1, never)
            c_ch[j] = (c_bits[j] >> _C45) < tb
        c = 0
        for j in range(n):  # bucket t's members in position order
            if (c_bits[j] >> _C45) == tb:
                cand[c] = c_bits[j]
                cand_at[c] = j
                c += 1
        for _ in range(k - below):  # the smallest remaining candidate, the first in position order on ties
            best = 0
            for q in range(1, c):
                if cand[q] < cand[best]:
                    best = q
            c_ch[cand_at[best]] = True
            cand[best] = _NONE
    return chosen, keys


def _pad_masked_cells(ids, values, chosen, starts, lengths, mask_value, pad_id, pad_value, ignore,
                      ids_out, attn_out, values_out, labels_out):
    """Right-pad a masked-value batch in one pass over the uninitialised outputs: row ``b`` gets its ids, 1, the
    value (``mask_value`` where chosen) and the original value where chosen (else ``ignore``), then ``pad_id``, 0,
    ``pad_value``, ``ignore`` to the end."""
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


def choose_compiled(flat, fraction: tuple[float, float], seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The rule on a :class:`~hf_scfm.data.batching.FlatBatch` through the compiled kernel: ``(chosen bool [N],
    keys uint64 [B])``, equal to :func:`choose_reference` on the padded batch. Needs :func:`compiled_kernels`."""
    choose, _ = compiled_kernels()
    empty = np.zeros(0, dtype=np.int64)
    vbits = empty.view(np.uint32) if flat.values is None else flat.values.view(np.uint32)
    weights, value_weights, counters = _position_tables(int(flat.lengths.max()) if flat.n else 1)
    return choose(flat.ids, vbits, flat.values is not None, empty if flat.mask is None else flat.mask,
                  flat.mask is not None, flat.starts, flat.lengths, weights, value_weights, counters,
                  stream_base(seed, epoch, CHOICE_STREAM),
                  stream_base(seed, epoch, FRACTION_STREAM), np.float64(fraction[0]), np.float64(fraction[1]))


def pad_masked_compiled(flat, chosen: np.ndarray, out: dict[str, np.ndarray], *, mask_value: float, pad_id: int,
                        pad_value: float, ignore: float) -> dict[str, np.ndarray]:
    """Fill ``out`` (``input_ids``, ``attention_mask``, ``values``, ``labels``: uninitialised ``[B, L]``) from a flat
    batch and its chosen positions. Needs :func:`compiled_kernels`."""
    _, pad = compiled_kernels()
    pad(flat.ids, flat.values, chosen, flat.starts, flat.lengths, np.float32(mask_value), np.int64(pad_id),
        np.float32(pad_value), np.float32(ignore), out["input_ids"], out["attention_mask"], out["values"],
        out["labels"])
    return out
