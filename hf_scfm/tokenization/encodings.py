"""The three cell encodings of SPEC.md ("Common ground"), vectorised over a sparse chunk of cells.

No Python loop over cells: every step is a NumPy operation over all non-zero entries of a chunk. The
per-row orderings are done by **one** ``np.sort`` of packed ``uint64`` keys ``(row | sort key | offset
in row)`` instead of a ``lexsort``/``argsort`` (a plain sort of unique integers is several times faster and
the packed key carries everything needed to find the entry again).

Definitions (the reference implementation in ``tests/test_tokenizer.py`` follows them cell by cell):

* **Normalisation**: ``x_norm = counts / n_counts * 10_000`` in float64, ``n_counts`` the library size
  (``obs["n_counts"]`` when present, else the sum over all the cell's genes, matched or not).
  Counts are carried as float32 (exact for integers below 2**24).
* **rank**: genes with ``count > 0`` ordered by ``score = float32(x_norm / median[gene])`` descending,
  ties by token id ascending; the first ``n_genes`` kept. ``value = float32(log1p(x_norm))``. (The score is
  rounded to float32 so the sort key fits 64 bits; scores closer than 1 part in 2**24 count as tied.)
* **binned**: per cell, each expressed gene's bin is ``1 + floor((n_bins - 1) * r / n)`` where ``n`` is the
  number of expressed (matched) genes of the cell and ``r`` the number of them with a strictly smaller
  count. That is an equal-frequency (quantile) binning of the non-zero ``log1p(x_norm)`` values into bins
  ``1..n_bins-1`` (``log1p`` and the per-cell scaling are monotone, so ranking counts is ranking values),
  with equal values always in the same bin. Zero-expressed genes (only with ``include_zero_genes``) are bin
  0. Bins are computed over all the cell's expressed genes *before* sampling.
* **continuous**: expressed genes, ``value = float32(log1p(x_norm))``.
* **Sampling** (binned, continuous; cells with more candidate genes than ``n_genes``): keep the ``n_genes``
  genes with the smallest ``h(seed, cell, token)``, a 32-bit SplitMix64 hash (ties by token id); a uniform
  random subset. ``cell`` is a hash of the cell's *content* (its matched token ids and counts), so the same
  cell and seed give the same sentence in any batch, any file, any process, with no name needed. Kept
  genes are written in vocabulary (token id) order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TARGET_SUM = 10_000.0
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _bits(n: int) -> int:
    """Bits needed to store the integers 0..n-1 (at least 1)."""
    return max(1, int(max(n, 1) - 1).bit_length())


def splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, element-wise on uint64 (wrapping arithmetic)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@dataclass
class CellEntries:
    """A chunk of cells in canonical sparse form: per row, matched genes in ascending token id order."""

    indptr: np.ndarray  # int64 [B + 1]
    token: np.ndarray  # int64 [nnz]
    count: np.ndarray  # float32 [nnz] (zeros only when built with zeros)
    n_counts: np.ndarray  # float64 [B]

    @property
    def n_cells(self) -> int:
        return len(self.indptr) - 1

    def rows(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_cells, dtype=np.int64), np.diff(self.indptr))

    def x_norm(self) -> np.ndarray:
        return self.count.astype(np.float64) / self.n_counts[self.rows()] * TARGET_SUM


@dataclass
class ColumnMap:
    """How input columns map to tokens: ``rank[col]`` indexes ``tokens`` (sorted unique), -1 if unmatched."""

    rank: np.ndarray  # int64 [n_input]
    tokens: np.ndarray  # int64 [K], ascending
    monotone: bool  # matched columns already appear in ascending token order, no duplicates

    @classmethod
    def from_token_ids(cls, token_ids: np.ndarray) -> "ColumnMap":
        token_ids = np.asarray(token_ids, dtype=np.int64)
        matched = token_ids[token_ids >= 0]
        tokens = np.unique(matched)
        rank = np.full(token_ids.shape, -1, dtype=np.int64)
        rank[token_ids >= 0] = np.searchsorted(tokens, matched)
        monotone = bool(np.all(np.diff(matched) > 0))
        return cls(rank=rank, tokens=tokens, monotone=monotone)


def gather_entries(counts, colmap: ColumnMap, n_counts: np.ndarray) -> CellEntries:
    """Canonical :class:`CellEntries` of a CSR chunk: unmatched genes dropped, duplicates summed, zeros dropped.

    Sorting within rows is one ``np.sort`` of keys ``row | token rank | float32 count bits``.
    """
    counts = counts.tocsr()
    n_cells = counts.shape[0]
    indptr = counts.indptr.astype(np.int64)
    rank = colmap.rank[counts.indices]
    data = counts.data.astype(np.float32, copy=False)
    keep = (rank >= 0) & (data != 0)
    row = np.repeat(np.arange(n_cells, dtype=np.int64), np.diff(indptr))[keep]
    rank, data = rank[keep], data[keep]
    if not (colmap.monotone and counts.has_sorted_indices):
        rb, kb = _bits(n_cells), _bits(len(colmap.tokens))
        if rb + kb > 32:
            raise ValueError(f"Chunk of {n_cells} cells is too large for a {len(colmap.tokens)}-gene vocabulary; "
                             "use a smaller chunk_size.")
        key = (row.astype(np.uint64) << np.uint64(32 + kb)) | (rank.astype(np.uint64) << np.uint64(32)) \
            | data.view(np.uint32).astype(np.uint64)
        key.sort()
        row = (key >> np.uint64(32 + kb)).astype(np.int64)
        rank = ((key >> np.uint64(32)) & np.uint64((1 << kb) - 1)).astype(np.int64)
        data = (key & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)
        # duplicates (two input columns, one token): adjacent equal (row, rank) -> sum
        if len(key) > 1:
            same = (row[1:] == row[:-1]) & (rank[1:] == rank[:-1])
            if same.any():
                starts = np.flatnonzero(np.concatenate(([True], ~same)))
                data = np.add.reduceat(data.astype(np.float64), starts).astype(np.float32)
                row, rank = row[starts], rank[starts]
    new_indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=n_cells), out=new_indptr[1:])
    return CellEntries(indptr=new_indptr, token=colmap.tokens[rank], count=data,
                       n_counts=np.asarray(n_counts, dtype=np.float64))


@dataclass
class GeneSentences:
    """Flat gene part of the sentences: entry ``i`` puts ``token[i]``/``value[i]`` at (``row[i]``, ``pos[i]``)."""

    row: np.ndarray
    pos: np.ndarray
    token: np.ndarray
    value: np.ndarray
    lengths: np.ndarray  # int64 [B], genes per row


def _sorted_rows(entries: CellEntries, key32: np.ndarray, select: np.ndarray | None = None):
    """Sort entries within rows by ``key32`` (uint32, ascending), ties by token id.

    Returns ``(entry_index, position_in_row)`` in sorted order. ``select`` (bool mask) restricts to a subset
    of entries (their positions are then counted among the selected entries of the row).
    """
    rows = entries.rows()
    offsets = np.arange(len(rows), dtype=np.int64) - entries.indptr[rows]
    if select is not None:
        rows, offsets, key32 = rows[select], offsets[select], key32[select]
    if len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ob = _bits(int(offsets.max()) + 1)
    rb = _bits(entries.n_cells)
    if rb + ob > 32:
        raise ValueError("Chunk too large to sort in one key; use a smaller chunk_size.")
    key = (rows.astype(np.uint64) << np.uint64(32 + ob)) | (key32.astype(np.uint64) << np.uint64(ob)) \
        | offsets.astype(np.uint64)
    key.sort()
    srow = (key >> np.uint64(32 + ob)).astype(np.int64)
    soff = (key & np.uint64((1 << ob) - 1)).astype(np.int64)
    entry = entries.indptr[srow] + soff
    sub_indptr = np.zeros(entries.n_cells + 1, dtype=np.int64)
    np.cumsum(np.bincount(srow, minlength=entries.n_cells), out=sub_indptr[1:])
    pos = np.arange(len(key), dtype=np.int64) - sub_indptr[srow]
    return entry, pos


def encode_rank(entries: CellEntries, medians: np.ndarray, n_genes: int) -> GeneSentences:
    """Rank encoding: top ``n_genes`` expressed genes by ``x_norm / median`` (desc, ties by token id)."""
    xn = entries.x_norm()
    score = (xn / medians[entries.token]).astype(np.float32)
    desc = ~score.view(np.uint32)  # positive floats: bit pattern is monotone; complement -> descending
    entry, pos = _sorted_rows(entries, desc)
    keep = pos < n_genes
    entry, pos = entry[keep], pos[keep]
    row = np.repeat(np.arange(entries.n_cells, dtype=np.int64), np.diff(entries.indptr))[entry]
    lengths = np.minimum(np.diff(entries.indptr), n_genes)
    value = np.log1p(xn[entry]).astype(np.float32)
    return GeneSentences(row=row, pos=pos, token=entries.token[entry], value=value, lengths=lengths)


def cell_hashes(entries: CellEntries, seed: int) -> np.ndarray:
    """uint64 per cell from the seed and the cell's content (matched token ids and float32 counts)."""
    h = splitmix64(entries.token.astype(np.uint64) * _GOLDEN ^ entries.count.view(np.uint32).astype(np.uint64))
    out = np.zeros(entries.n_cells, dtype=np.uint64)
    nonempty = np.diff(entries.indptr) > 0
    if nonempty.any():
        with np.errstate(over="ignore"):
            out[nonempty] = np.add.reduceat(h, entries.indptr[:-1][nonempty])
    return splitmix64(out ^ splitmix64(np.uint64(seed % (1 << 64)) + _GOLDEN))


def entry_hash32(cell_hash: np.ndarray, token: np.ndarray) -> np.ndarray:
    """32-bit sampling key of (cell, token)."""
    with np.errstate(over="ignore"):
        z = cell_hash + (token.astype(np.uint64) + np.uint64(1)) * _GOLDEN
    return (splitmix64(z) >> np.uint64(32)).astype(np.uint32)


def sample_mask(entries: CellEntries, n_genes: int, hashes: np.ndarray) -> np.ndarray:
    """Bool mask over entries: all of a row when it has <= ``n_genes`` entries, else the ``n_genes`` entries
    with the smallest ``entry_hash32(hashes[row], token)`` (ties by token id)."""
    nnz_row = np.diff(entries.indptr)
    keep = np.ones(len(entries.token), dtype=bool)
    long_rows = nnz_row > n_genes
    if not long_rows.any():
        return keep
    rows = entries.rows()
    select = long_rows[rows]
    h = np.zeros(len(rows), dtype=np.uint32)
    h[select] = entry_hash32(hashes[rows[select]], entries.token[select])
    entry, pos = _sorted_rows(entries, h, select)
    keep[select] = False
    keep[entry[pos < n_genes]] = True
    return keep


def quantile_bins(entries: CellEntries, n_bins: int) -> np.ndarray:
    """Per-entry bin (int64) of non-zero counts, ``1 + floor((n_bins-1) * r / n)`` (see module docstring)."""
    nz = entries.count > 0
    entry, _ = _sorted_rows(entries, entries.count.view(np.uint32), nz)  # positive floats: bits are monotone
    bins = np.zeros(len(entries.token), dtype=np.int64)
    if len(entry) == 0:
        return bins
    rows = entries.rows()
    srow, sval = rows[entry], entries.count[entry]
    idx = np.arange(len(entry), dtype=np.int64)
    new = np.ones(len(entry), dtype=bool)
    new[1:] = (srow[1:] != srow[:-1]) | (sval[1:] != sval[:-1])
    group_start = np.maximum.accumulate(np.where(new, idx, 0))
    row_start = np.zeros(entries.n_cells + 1, dtype=np.int64)
    n_per_row = np.bincount(srow, minlength=entries.n_cells)
    np.cumsum(n_per_row, out=row_start[1:])
    r = group_start - row_start[srow]
    bins[entry] = 1 + ((n_bins - 1) * r) // n_per_row[srow]
    return bins


def _compact(entries: CellEntries, keep: np.ndarray, values: np.ndarray) -> GeneSentences:
    rows = entries.rows()[keep]
    lengths = np.bincount(rows, minlength=entries.n_cells).astype(np.int64)
    starts = np.zeros(entries.n_cells + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    pos = np.arange(len(rows), dtype=np.int64) - starts[rows]
    return GeneSentences(row=rows, pos=pos, token=entries.token[keep], value=values[keep], lengths=lengths)


def encode_continuous(entries: CellEntries, n_genes: int, seed: int) -> GeneSentences:
    """Continuous encoding: expressed genes (seeded sample beyond ``n_genes``), vocabulary order, log1p(x_norm)."""
    keep = sample_mask(entries, n_genes, cell_hashes(entries, seed))
    values = np.log1p(entries.x_norm()).astype(np.float32)
    return _compact(entries, keep, values)


def with_zero_genes(entries: CellEntries, all_tokens: np.ndarray) -> CellEntries:
    """Entries over *every* matched token of every cell (zeros included), token order."""
    B, K = entries.n_cells, len(all_tokens)
    dense = np.zeros((B, K), dtype=np.float32)
    dense[entries.rows(), np.searchsorted(all_tokens, entries.token)] = entries.count
    return CellEntries(indptr=np.arange(B + 1, dtype=np.int64) * K, token=np.tile(all_tokens, B),
                       count=dense.ravel(), n_counts=entries.n_counts)


def encode_binned(entries: CellEntries, n_genes: int, seed: int, n_bins: int,
                  include_zero_genes: bool = False, all_tokens: np.ndarray | None = None) -> GeneSentences:
    """Binned encoding: per-cell quantile bins (as float), vocabulary order, seeded sample beyond ``n_genes``.

    With ``include_zero_genes`` every matched gene of the input is a candidate (zeros as bin 0); the sample
    then draws from all of them. The cell hash is taken over the expressed genes either way.
    """
    hashes = cell_hashes(entries, seed)
    if include_zero_genes:
        entries = with_zero_genes(entries, all_tokens)
    bins = quantile_bins(entries, n_bins)
    keep = sample_mask(entries, n_genes, hashes)
    return _compact(entries, keep, bins.astype(np.float32))


def assemble(sentences: list[GeneSentences], prefix: list[int], suffix: list[int], pad_to: int | None):
    """Padded ``(input_ids int64, values float32, attention_mask int64)`` arrays of whole sentences.

    ``pad_to`` None pads to the longest sentence. Specials carry value 0.0; padding is id 0, value 0.0.
    """
    lengths = np.concatenate([s.lengths for s in sentences]) if sentences else np.zeros(0, np.int64)
    n_pre, n_suf = len(prefix), len(suffix)
    total = lengths + n_pre + n_suf
    width = int(total.max()) if pad_to is None and len(total) else (pad_to or 0)
    B = len(lengths)
    ids = np.zeros((B, width), dtype=np.int64)
    values = np.zeros((B, width), dtype=np.float32)
    if n_pre:
        ids[:, :n_pre] = prefix
    offset = 0
    for s in sentences:  # one iteration per chunk, not per cell
        ids[offset + s.row, n_pre + s.pos] = s.token
        values[offset + s.row, n_pre + s.pos] = s.value
        offset += len(s.lengths)
    for j, tid in enumerate(suffix):
        ids[np.arange(B), n_pre + lengths + j] = tid
    mask = (np.arange(width)[None, :] < total[:, None]).astype(np.int64)
    return ids, values, mask, total
