"""The three cell encodings of SPEC.md ("Common ground"), vectorised over a sparse chunk of cells.

No Python loop over cells: every step is a NumPy operation over all non-zero entries of a chunk (or of a
block of whole rows). Each per-row ordering is **one** ``np.sort`` of packed ``uint64`` keys ``(row |
32-bit sort key | entry index)`` instead of a ``lexsort``/``argsort``: sorting unique integers is several
times faster than an indirect sort (NumPy's SIMD sort), and the low bits give the entry back (and break
ties by token id, because entries are kept in token order within each row). Row blocks are sized so the
fields fit in 64 bits, and sorts run on blocks of ~16k keys (whole rows; L2-sized, ~40 % faster than one
sort of millions of keys, same result because the row is the key's top field).

``rank`` skips the canonical (token-ordered) entries altogether (:func:`encode_rank_csr`): one sort per
block of the CSR chunk in input column order, with the token rank inside the key for the tie-break; the
``rank`` blocks run on a few threads (NumPy releases the GIL). ``binned`` and ``continuous`` run through a
compiled per-cell kernel when numba is installed (:func:`encode_sampled_flat`, the ``fast`` extra;
several times faster than the NumPy path, which stays as the fallback and the reference:
``HF_SCFM_NUMBA=0``); otherwise, and ``rank`` when input columns must be summed, they go through
:func:`gather_entries`.

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

import os
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
        return self.count.astype(np.float64) / np.repeat(self.n_counts, np.diff(self.indptr)) * TARGET_SUM


#: Entries per block of rows for the NumPy ``binned`` / ``continuous`` encodings (:func:`row_blocks`): their ~60
#: element-wise passes then run on L2-sized arrays (about 2x faster than over a whole 2,048-cell chunk).
SAMPLED_BLOCK_ENTRIES = 1 << 17


def row_blocks(entries: "CellEntries", block_entries: int | None = None):
    """``entries`` as consecutive blocks of whole rows with about ``block_entries`` entries each (views, no copy).
    Every encoding is defined cell by cell, so encoding the blocks one by one gives the chunk's sentences."""
    block_entries = block_entries or SAMPLED_BLOCK_ENTRIES
    indptr = entries.indptr
    n = int(indptr[-1])
    if n <= block_entries:
        yield entries
        return
    edges = np.unique(np.concatenate(([0, entries.n_cells], np.searchsorted(indptr, np.arange(block_entries, n, block_entries)))))
    for r0, r1 in zip(edges[:-1].tolist(), edges[1:].tolist()):  # a loop over blocks of rows, not over cells
        a, b = int(indptr[r0]), int(indptr[r1])
        yield CellEntries(indptr=indptr[r0:r1 + 1] - a, token=entries.token[a:b], count=entries.count[a:b],
                          n_counts=entries.n_counts[r0:r1])


@dataclass
class ColumnMap:
    """How input columns map to tokens: ``rank[col]`` indexes ``tokens`` (sorted unique), -1 if unmatched."""

    rank: np.ndarray  # int64 [n_input]
    tokens: np.ndarray  # int64 [K], ascending
    monotone: bool  # matched columns already appear in ascending token order, no duplicates
    has_duplicates: bool

    @classmethod
    def from_token_ids(cls, token_ids: np.ndarray) -> "ColumnMap":
        token_ids = np.asarray(token_ids, dtype=np.int64)
        matched = token_ids[token_ids >= 0]
        tokens = np.unique(matched)
        rank = np.full(token_ids.shape, -1, dtype=np.int64)
        rank[token_ids >= 0] = np.searchsorted(tokens, matched)
        return cls(rank=rank, tokens=tokens, monotone=bool(np.all(np.diff(matched) > 0)),
                   has_duplicates=len(tokens) < len(matched))

    @property
    def matched(self) -> np.ndarray:
        if not hasattr(self, "_matched"):
            self._matched = self.rank >= 0
        return self._matched

    @property
    def rank_key(self) -> np.ndarray:
        """``rank << 32`` as uint64 per input column (0 for unmatched columns, which are filtered anyway)."""
        if not hasattr(self, "_rank_key"):
            self._rank_key = np.where(self.rank >= 0, self.rank, 0).astype(np.uint64) << np.uint64(32)
        return self._rank_key

    def rank_tables(self, medians: np.ndarray):
        """Per input column: ``(token rank as uint64, K if unmatched; median as float64, inf if unmatched)``.

        Cached for the last ``medians`` seen (compared by content: a cheap pass over the vocabulary).
        """
        medians = np.asarray(medians, dtype=np.float64)
        cached = getattr(self, "_rank_tables", None)
        if cached is not None and (cached[0] is medians or np.array_equal(cached[0], medians)):
            return cached[1]
        k = len(self.tokens)
        rank = np.where(self.rank >= 0, self.rank, k).astype(np.uint64)
        med = np.append(np.asarray(medians, dtype=np.float64)[self.tokens], np.inf)[np.where(self.rank >= 0, self.rank, k)]
        self._rank_tables = (medians.copy(), (rank, med))
        return rank, med

    @property
    def max_rows_per_chunk(self) -> int:
        """Rows that fit the canonicalisation key ``row | token rank | count bits`` (64 bits)."""
        return 1 << (32 - _bits(len(self.tokens)))


#: Entries per sort block. Sorting a few million keys as blocks of ~16k (whole rows each) keeps every block in
#: the L2 cache: about 40 % less time than one ``np.sort`` of them all, same result when keys start with the row.
SORT_BLOCK_ENTRIES = 1 << 14


def sort_row_blocks(key: np.ndarray, indptr: np.ndarray, block_entries: int = SORT_BLOCK_ENTRIES) -> None:
    """Sort ``key`` in place, where row ``r`` owns ``key[indptr[r]:indptr[r+1]]`` and the row is the key's
    most significant field: sorting blocks of whole rows one by one equals one global sort."""
    indptr = np.asarray(indptr, dtype=np.int64)
    n = int(indptr[-1])
    if n <= 2 * block_entries:
        key.sort()
        return
    cuts = np.unique(indptr[np.searchsorted(indptr, np.arange(0, n, block_entries))]).tolist() + [n]
    for a, b in zip(cuts[:-1], cuts[1:]):  # a loop over blocks of rows (~16k entries), not over cells
        key[a:b].sort()


def gather_entries(counts, colmap: ColumnMap, n_counts: np.ndarray) -> CellEntries:
    """Canonical :class:`CellEntries` of a CSR chunk: unmatched genes dropped, duplicates summed, zeros dropped.

    When the matched input columns are not already in token order, one ``np.sort`` of keys
    ``row | token rank | float32 count bits`` puts every row in token order (and brings duplicates together).
    """
    counts = counts.tocsr()
    n_cells = counts.shape[0]
    nnz_row = np.diff(counts.indptr)
    data = counts.data.astype(np.float32, copy=False)
    indices = counts.indices.astype(np.intp, copy=False)  # intp: NumPy's fast gather path
    keep = colmap.matched[indices]
    if not data.all():
        keep &= data != 0
    if colmap.monotone and counts.has_sorted_indices:
        kept_before = np.concatenate(([0], np.cumsum(keep)))
        return CellEntries(indptr=kept_before[counts.indptr].astype(np.int64),
                           token=colmap.tokens[colmap.rank[indices[keep]]],
                           count=data[keep], n_counts=np.asarray(n_counts, dtype=np.float64))
    kb = _bits(len(colmap.tokens))
    if n_cells > colmap.max_rows_per_chunk:  # key would overflow 64 bits: two halves
        half = n_cells // 2
        a = gather_entries(counts[:half], colmap, n_counts[:half])
        b = gather_entries(counts[half:], colmap, n_counts[half:])
        return CellEntries(indptr=np.concatenate([a.indptr, b.indptr[1:] + a.indptr[-1]]),
                           token=np.concatenate([a.token, b.token]), count=np.concatenate([a.count, b.count]),
                           n_counts=np.asarray(n_counts, dtype=np.float64))
    shift = np.uint64(32 + kb)
    key = np.repeat(np.arange(n_cells, dtype=np.uint64) << shift, nnz_row)
    key |= colmap.rank_key[indices]
    key |= data.view(np.uint32)
    key = key[keep]
    # rows are contiguous and ascending before the sort too (the row is the top field): boundaries first
    indptr = np.searchsorted(key, np.arange(n_cells + 1, dtype=np.uint64) << shift).astype(np.int64)
    sort_row_blocks(key, indptr)
    rank = ((key >> np.uint64(32)) & np.uint64((1 << kb) - 1)).astype(np.int64)
    data = key.astype(np.uint32).view(np.float32)
    if colmap.has_duplicates and len(key) > 1:  # two input columns, one token: adjacent equal (row, rank) -> sum
        row_rank = key >> np.uint64(32)
        starts = np.flatnonzero(np.concatenate(([True], row_rank[1:] != row_rank[:-1])))
        if len(starts) < len(key):
            data = np.add.reduceat(data.astype(np.float64), starts).astype(np.float32)
            rank = rank[starts]
            indptr = np.searchsorted(starts, indptr).astype(np.int64)
    return CellEntries(indptr=indptr, token=colmap.tokens[rank], count=data,
                       n_counts=np.asarray(n_counts, dtype=np.float64))


@dataclass
class GeneSentences:
    """Gene part of a chunk's sentences, row-major: row ``r`` has ``lengths[r]`` (token, value) pairs in order."""

    token: np.ndarray
    value: np.ndarray
    lengths: np.ndarray  # int64 [B]


def _row_blocks(indptr: np.ndarray, r0: int, r1: int, budget: int):
    """Split rows ``[r0, r1)`` into consecutive blocks with at most ``budget`` entries whose
    ``row | 32 bits | entry`` key fits 64 bits (a single row is always its own valid block)."""
    n = int(indptr[r1] - indptr[r0])
    if r1 - r0 <= 1 or (n <= budget and _bits(n) + _bits(r1 - r0) <= 32):
        yield r0, r1
        return
    mid = int(np.searchsorted(indptr, (indptr[r0] + indptr[r1]) // 2, side="right")) - 1
    mid = min(max(mid, r0 + 1), r1 - 1)
    yield from _row_blocks(indptr, r0, mid, budget)
    yield from _row_blocks(indptr, mid, r1, budget)


def order_within_rows(indptr: np.ndarray, key32: np.ndarray, max_block_entries: int = 1 << 16) -> np.ndarray:
    """Entry indices sorted by (row, ``key32`` ascending, entry index): one ``np.sort`` per block of rows.

    ``indptr`` delimits rows over the entries of ``key32`` (uint32). Blocks hold whole rows and about
    ``max_block_entries`` entries (cache-friendly, and ``row | key32 | entry`` fits 64 bits).
    """
    n_rows, n = len(indptr) - 1, len(key32)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    out = []
    for r0, r1 in _row_blocks(indptr, 0, n_rows, max_block_entries):  # a few blocks per chunk, not per cell
        e0, e1 = int(indptr[r0]), int(indptr[r1])
        if e1 == e0:
            continue
        eb = _bits(e1 - e0)
        key = np.repeat(np.arange(r1 - r0, dtype=np.uint64) << np.uint64(32 + eb), np.diff(indptr[r0:r1 + 1]))
        key |= key32[e0:e1].astype(np.uint64) << np.uint64(eb)
        key |= np.arange(e1 - e0, dtype=np.uint64)
        key.sort()
        out.append((key & np.uint64((1 << eb) - 1)).astype(np.int64) + e0)
    return out[0] if len(out) == 1 else np.concatenate(out)


def _first_per_row(indptr: np.ndarray, n_take: int):
    """Mask over row-major entries keeping the first ``n_take`` of each row, and the kept lengths."""
    nnz = np.diff(indptr)
    lengths = np.minimum(nnz, n_take)
    if (nnz <= n_take).all():
        return None, lengths
    pos = np.arange(indptr[-1], dtype=np.int64) - np.repeat(indptr[:-1], nnz)
    return pos < n_take, lengths


def encode_rank(entries: CellEntries, medians: np.ndarray, n_genes: int) -> GeneSentences:
    """Rank encoding: top ``n_genes`` expressed genes by ``x_norm / median`` (desc, ties by token id)."""
    xn = entries.x_norm()
    score = (xn / medians[entries.token]).astype(np.float32)
    entry = order_within_rows(entries.indptr, ~score.view(np.uint32))  # positive floats: complement -> descending
    keep, lengths = _first_per_row(entries.indptr, n_genes)
    if keep is not None:
        entry = entry[keep]
    return GeneSentences(token=entries.token[entry], value=np.log1p(xn[entry]).astype(np.float32), lengths=lengths)


#: Entries per block of rows in :func:`encode_rank_csr`: a block's working arrays (about 60 bytes per entry)
#: stay in the L2 cache, so the ~25 element-wise passes and the sorts run from cache rather than memory.
RANK_BLOCK_ENTRIES = 1 << 15
#: Entries per ``np.sort`` call inside a block (whole rows; sorting ~16k keys at a time is cache-friendly).
RANK_SORT_ENTRIES = 1 << 14


#: Worker threads for the blocks of :func:`encode_rank_csr` (NumPy releases the GIL in its loops and sorts).
#: ``HF_SCFM_TOKENIZER_THREADS`` overrides; 1 runs the blocks in the calling thread.
_POOL = None
_POOL_PID = [os.getpid()]


def _n_threads() -> int:
    env = os.environ.get("HF_SCFM_TOKENIZER_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _map_blocks(fn, spans):
    """``[fn(*span) for span in spans]``, on a small thread pool when there are several blocks and cores.

    Results come back in span order, so the output does not depend on the number of threads.
    """
    global _POOL
    n = _n_threads()
    if n == 1 or len(spans) < 2:
        return [fn(*span) for span in spans]
    if _POOL is None or _POOL._max_workers != n or _POOL_PID[0] != os.getpid():
        # a forked child inherits the pool object but not its threads: it makes its own
        _POOL_PID[0] = os.getpid()
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="hf_scfm_tokenize")
    return list(_POOL.map(lambda span: fn(*span), spans))


def encode_rank_csr(counts, colmap: ColumnMap, n_counts: np.ndarray, medians: np.ndarray, n_genes: int,
                    block_entries: int = RANK_BLOCK_ENTRIES) -> GeneSentences | None:
    """:func:`encode_rank_flat` as :class:`GeneSentences` (no special tokens), or None (see there)."""
    flat = encode_rank_flat(counts, colmap, n_counts, medians, n_genes, block_entries=block_entries)
    if flat is None:
        return None
    _, token, value, lengths = flat
    return GeneSentences(token=token, value=value, lengths=lengths)


def encode_rank_flat(counts, colmap: ColumnMap, n_counts: np.ndarray, medians: np.ndarray, n_genes: int,
                     prefix=(), suffix=(), ids_dtype=np.int64, block_entries: int = RANK_BLOCK_ENTRIES):
    """Rank encoding straight from a CSR chunk (input column order), one ``np.sort`` per group of rows.

    Same sentences as ``encode_rank(gather_entries(...))`` without building the canonical (token-ordered)
    entries first. Rows are processed in blocks of about ``block_entries`` entries (whole rows; a loop over
    blocks of cells, not over cells), so every array of a block stays in the L2 cache. Each entry gets the
    key ``row in sort group | 31 bits descending score | token | position in row``: the score is a positive
    float32 (sign bit 0, so 31 bits keep its order); the token field (the token id itself when it fits, else
    the token's rank among the matched tokens) breaks ties by token id, so the input's column order does not
    matter, and gives the token back; the position gives the entry (count) back. Unmatched columns and
    explicit zeros get score 0 and a token field past every token: they sort last in their row, and one
    ``searchsorted`` per group counts the valid entries of each row. One ``np.sort`` per group of whole rows
    (about :data:`RANK_SORT_ENTRIES` entries, at most as many rows as the row field holds) orders every row
    of it. Returns the flat sentences ``(offsets int64 [B+1], ids, values float32, lengths int64)`` with the
    ``prefix`` / ``suffix`` special tokens in place (what :func:`flatten_sentences` makes of the canonical
    path's sentences: the same arrays), each block's genes written straight to their place. Returns None
    when the fast path does not apply (input columns mapping to the same token, which must be summed first;
    or a key wider than 64 bits): the caller then uses the canonical path.
    """
    if colmap.has_duplicates:
        return None
    n_cells = counts.shape[0]
    indptr = np.asarray(counts.indptr, dtype=np.int64)
    nnz_row = np.diff(indptr)
    n_tok = len(colmap.tokens)
    pb = _bits(int(nnz_row.max(initial=1)))
    tables = colmap.rank_tables(medians)
    med_col = tables[1]  # per input column: median (inf if unmatched: score 0)
    top_id = int(colmap.tokens[-1]) + 1 if n_tok else 1
    if 64 - 31 - pb - _bits(top_id + 1) >= 3:  # the token id itself (no gather of the tokens at the end)
        kb, sentinel = _bits(top_id + 1), top_id
        tok_col = np.where(colmap.rank >= 0, colmap.tokens[np.maximum(colmap.rank, 0)] if n_tok else 0,
                           sentinel).astype(np.uint64)
        token_of = None
    else:  # the token's rank among the matched tokens
        kb, sentinel = _bits(n_tok + 1), n_tok
        tok_col, token_of = tables[0], colmap.tokens
    rb_max = 64 - 31 - kb - pb  # bits left for the row within a sort group
    if rb_max < 0:
        return None
    tok_shifted = tok_col << np.uint64(pb)  # per input column: token field << pb (sentinel if unmatched)
    k_field = np.uint64(sentinel) << np.uint64(pb)
    nnz = int(indptr[-1])
    data = counts.data[:nnz]
    if data.dtype != np.float32:
        data = data.astype(np.float32)
    indices = counts.indices[:nnz]
    lib = np.asarray(n_counts, dtype=np.float64)
    s_score, s_pos, s_row = np.uint64(kb + pb), np.uint64(pb), 31 + kb + pb
    zeros = not data.all()
    tok_mask, pos_mask = np.uint64((1 << kb) - 1), np.uint64((1 << pb) - 1)
    top = np.uint32(0x7FFFFFFF)
    max_rows = 1 << min(rb_max, 30)
    invalid_from = (np.uint64(0x7FFFFFFF) << s_score) | k_field  # keys at or past this (in a row) are invalid
    n_pre, n_suf = len(prefix), len(suffix)
    n_spec = n_pre + n_suf
    # blocks of whole rows with about block_entries entries each (a long row is a block of its own)
    edges = np.unique(np.concatenate(([0, n_cells], np.searchsorted(indptr, np.arange(block_entries, nnz, block_entries)))))
    edges = edges.astype(np.int64)
    spans = [(r0, r1) for r0, r1 in zip(edges[:-1].tolist(), edges[1:].tolist()) if r1 > r0]
    # 0, 1, 2, ... shared by the blocks: as long as a block's output (entries, rows, special tokens)
    ramp = np.arange(int(np.max(np.diff(indptr[edges]) + (n_spec + 1) * np.diff(edges), initial=0)) + 1,
                     dtype=np.int64)

    def block(r0: int, r1: int):
        e0, e1 = int(indptr[r0]), int(indptr[r1])
        n, n_rows = e1 - e0, r1 - r0
        ix = indices[e0:e1].astype(np.intp)  # intp indices: NumPy's fast gather path (3x over int32)
        cnt = data[e0:e1]
        nr = nnz_row[r0:r1]
        row_start = indptr[r0:r1] - e0
        xn = cnt.astype(np.float64)
        np.divide(xn, np.repeat(lib[r0:r1], nr), out=xn)
        np.multiply(xn, TARGET_SUM, out=xn)  # x_norm = counts / n_counts * 10_000, as in the definition
        desc = np.empty(n, dtype=np.float32)
        np.divide(xn, med_col[ix], out=desc, casting="unsafe")  # float32(x_norm / median)
        desc = desc.view(np.uint32)
        np.subtract(top, desc, out=desc)  # larger score -> smaller key (positive floats: bits are monotone)
        # sort groups: whole rows, about RANK_SORT_ENTRIES entries, at most max_rows rows (the key's row field)
        if n <= RANK_SORT_ENTRIES and n_rows <= max_rows:
            cuts = np.array([0, n_rows], dtype=np.int64)
            rel_row = ramp[:n_rows]
        else:
            cuts = np.unique(np.concatenate(([0, n_rows], np.arange(max_rows, n_rows, max_rows),
                                             np.searchsorted(row_start, ramp[1:(n - 1) // RANK_SORT_ENTRIES + 1]
                                                             * RANK_SORT_ENTRIES))))
            rel_row = ramp[:n_rows] - np.repeat(cuts[:-1], np.diff(cuts))
        # row field and position in row in one pass: entry e of row r -> (rel_row << s_row) + e - row_start
        key = np.repeat(((rel_row << s_row) - row_start).view(np.uint64), nr)
        key += ramp[:n].view(np.uint64)
        tmp = desc.astype(np.uint64)
        tmp <<= s_score
        key |= tmp
        tmp = tok_shifted[ix]
        if zeros:
            tmp[cnt == 0] = k_field
        key |= tmp
        bounds = row_start[cuts[:-1]].tolist() + [n]
        cut_rows = cuts.tolist()
        n_valid = np.empty(n_rows, dtype=np.int64)
        for g, (c0, c1) in enumerate(zip(bounds[:-1], bounds[1:])):  # cache-sized sorts (a group of rows each)
            part = key[c0:c1]
            part.sort()
            g0, g1 = cut_rows[g], cut_rows[g + 1]
            # valid entries per row: keys below the row's first possible invalid key (one binary search per row)
            ends = np.searchsorted(part, (ramp[:g1 - g0].view(np.uint64) << np.uint64(s_row)) | invalid_from)
            n_valid[g0:g1] = ends + c0 - row_start[g0:g1]
        lengths = np.minimum(n_valid, n_genes)
        # one gather puts the block in its final layout: each row's first lengths[r] keys with n_pre slots before
        # and n_suf after them (the special tokens' slots read a neighbouring key and are overwritten later)
        total = lengths + n_spec
        out_start = np.zeros(n_rows, dtype=np.int64)
        np.cumsum(total[:-1], out=out_start[1:])
        take = np.repeat(row_start - out_start - n_pre, total)
        take += ramp[:len(take)]
        start = np.repeat(row_start, total)
        if n_spec or not (lengths == nr).all():
            key = np.take(key, take, mode="clip")
        entry = key & pos_mask
        entry = entry.view(np.int64)
        entry += start
        key >>= s_pos
        key &= tok_mask
        value = np.take(xn, entry, mode="clip")
        np.log1p(value, out=value)  # in place: a fresh temporary per block costs more than the log
        token = key.view(np.int64) if token_of is None else np.take(token_of, key.view(np.int64), mode="clip")
        return token, value, lengths

    parts = _map_blocks(block, spans)
    gene_len = np.concatenate([p[2] for p in parts]) if parts else np.zeros(n_cells, np.int64)
    lengths = gene_len + n_spec
    offsets = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if not parts:
        return offsets, np.zeros(0, ids_dtype), np.zeros(0, np.float32), lengths
    ids = np.concatenate([p[0] for p in parts], dtype=ids_dtype, casting="unsafe")
    values = np.concatenate([p[1] for p in parts], dtype=np.float32, casting="unsafe")
    for j, tid in enumerate(prefix):
        ids[offsets[:-1] + j] = tid
        values[offsets[:-1] + j] = 0.0
    for j, tid in enumerate(suffix):
        ids[offsets[1:] - n_suf + j] = tid
        values[offsets[1:] - n_suf + j] = 0.0
    return offsets, ids, values, lengths


def cell_hashes(entries: CellEntries, seed: int, rows: np.ndarray | None = None) -> np.ndarray:
    """uint64 per cell from the seed and the cell's content (its expressed token ids and float32 counts).

    ``rows`` (bool mask) limits the work to those cells; the others get 0.
    """
    nnz_row = np.diff(entries.indptr)
    if rows is None:
        rows = np.ones(entries.n_cells, dtype=bool)
    sub_indptr, idx = _row_ranges(entries.indptr, rows)
    count = entries.count[idx]
    with np.errstate(over="ignore"):
        h = splitmix64(entries.token[idx].astype(np.uint64) * _GOLDEN ^ count.view(np.uint32).astype(np.uint64))
    h[count == 0] = 0  # zero entries (include_zero_genes) do not change a cell's identity
    sums = np.zeros(entries.n_cells, dtype=np.uint64)
    nonempty = np.diff(sub_indptr) > 0
    if nonempty.any():
        with np.errstate(over="ignore"):
            sums[nonempty] = np.add.reduceat(h, sub_indptr[:-1][nonempty])
    out = splitmix64(sums ^ splitmix64(np.uint64(seed % (1 << 64)) + _GOLDEN))
    out[~rows] = 0
    return out


def entry_hash32(cell_hash: np.ndarray, token: np.ndarray) -> np.ndarray:
    """32-bit sampling key of (cell, token)."""
    with np.errstate(over="ignore"):
        z = cell_hash + (token.astype(np.uint64) + np.uint64(1)) * _GOLDEN
    return (splitmix64(z) >> np.uint64(32)).astype(np.uint32)


def _row_ranges(indptr: np.ndarray, rows: np.ndarray):
    """Like :func:`_sub_rows` for whole rows (``rows``: bool per row), in time proportional to their entries."""
    indptr = np.asarray(indptr, dtype=np.int64)
    nnz_row = np.diff(indptr)
    if rows.all():
        return indptr, np.arange(indptr[-1], dtype=np.int64)
    n_sel = np.where(rows, nnz_row, 0)
    sub_indptr = np.zeros(len(indptr), dtype=np.int64)
    np.cumsum(n_sel, out=sub_indptr[1:])
    idx = np.repeat(indptr[:-1] - sub_indptr[:-1], n_sel)
    idx += np.arange(sub_indptr[-1], dtype=np.int64)
    return sub_indptr, idx


def _sub_rows(indptr: np.ndarray, select: np.ndarray):
    """indptr of the selected entries (row structure kept) and their indices in the full arrays."""
    cum = np.concatenate(([0], np.cumsum(select)))
    return cum[indptr].astype(np.int64), np.flatnonzero(select)


def sample_mask(entries: CellEntries, n_genes: int, hashes: np.ndarray) -> np.ndarray | None:
    """Bool mask over entries: all of a row when it has <= ``n_genes`` entries, else the ``n_genes`` entries
    with the smallest ``entry_hash32(hashes[row], token)`` (ties by token id). None when nothing is dropped."""
    nnz_row = np.diff(entries.indptr)
    long_rows = nnz_row > n_genes
    if not long_rows.any():
        return None
    sub_indptr, idx = _row_ranges(entries.indptr, long_rows)
    h = entry_hash32(np.repeat(hashes[long_rows], nnz_row[long_rows]), entries.token[idx])
    order = order_within_rows(sub_indptr, h)
    first, _ = _first_per_row(sub_indptr, n_genes)
    keep = np.repeat(~long_rows, nnz_row)
    keep[idx[order[first]]] = True
    return keep


def quantile_bins(entries: CellEntries, n_bins: int) -> np.ndarray:
    """Per-entry bin (int64) of non-zero counts, ``1 + floor((n_bins-1) * r / n)`` (see module docstring)."""
    nz = entries.count > 0
    bins = np.zeros(len(entries.token), dtype=np.int64)
    if not nz.any():
        return bins
    if nz.all():
        sub_indptr, idx = entries.indptr, None
        counts = entries.count
    else:
        sub_indptr, idx = _sub_rows(entries.indptr, nz)
        counts = entries.count[idx]
    order = order_within_rows(sub_indptr, counts.view(np.uint32))  # positive floats: bits are monotone
    sval = counts[order]
    n_per_row = np.diff(sub_indptr)
    row_start = np.repeat(sub_indptr[:-1], n_per_row)
    i = np.arange(len(order), dtype=np.int64)
    new = np.ones(len(order), dtype=bool)
    new[1:] = sval[1:] != sval[:-1]
    new[sub_indptr[:-1][n_per_row > 0]] = True  # a row's first entry starts a group
    r = np.maximum.accumulate(np.where(new, i, 0)) - row_start
    b = 1 + ((n_bins - 1) * r) // np.repeat(n_per_row, n_per_row)
    target = order if idx is None else idx[order]
    bins[target] = b
    return bins


def _compact(entries: CellEntries, keep: np.ndarray | None, values: np.ndarray, n_genes: int) -> GeneSentences:
    """Kept entries; ``keep`` comes from :func:`sample_mask`, so row lengths are ``min(entries, n_genes)``."""
    nnz_row = np.diff(entries.indptr)
    if keep is None:
        return GeneSentences(token=entries.token, value=values, lengths=nnz_row)
    return GeneSentences(token=entries.token[keep], value=values[keep], lengths=np.minimum(nnz_row, n_genes))


def encode_continuous(entries: CellEntries, n_genes: int, seed: int) -> GeneSentences:
    """Continuous encoding: expressed genes (seeded sample beyond ``n_genes``), vocabulary order, log1p(x_norm)."""
    nnz_row = np.diff(entries.indptr)
    keep = sample_mask(entries, n_genes, cell_hashes(entries, seed, nnz_row > n_genes))
    if keep is None:
        token, count, lengths = entries.token, entries.count, nnz_row
    else:
        token, count, lengths = entries.token[keep], entries.count[keep], np.minimum(nnz_row, n_genes)
    x_norm = count.astype(np.float64) / np.repeat(entries.n_counts, lengths) * TARGET_SUM  # kept entries only
    return GeneSentences(token=token, value=np.log1p(x_norm).astype(np.float32), lengths=lengths)


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
    if include_zero_genes:
        hashes = cell_hashes(entries, seed, np.full(entries.n_cells, len(all_tokens) > n_genes))
        entries = with_zero_genes(entries, all_tokens)
    else:
        hashes = cell_hashes(entries, seed, np.diff(entries.indptr) > n_genes)
    bins = quantile_bins(entries, n_bins)
    keep = sample_mask(entries, n_genes, hashes)
    return _compact(entries, keep, bins.astype(np.float32), n_genes)


def join_flat(parts, ids_dtype=np.int64):
    """One ``(offsets, ids, values, lengths)`` from per-chunk flat sentences (see :func:`flatten_sentences`)."""
    if len(parts) == 1 and parts[0][1].dtype == ids_dtype:
        return parts[0]
    lengths = np.concatenate([p[3] for p in parts]) if parts else np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate([p[1] for p in parts]).astype(ids_dtype, copy=False) if parts else np.zeros(0, ids_dtype)
    values = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.float32)
    return offsets, ids, values, lengths


def split_flat(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """``[flat[offsets[i]:offsets[i+1]] for each cell]``: views into ``flat`` (no copy)."""
    bounds = offsets.tolist()
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def pad_sentences(parts, width: int):
    """Right-padded ``(input_ids int64 [B, width], values float32, attention_mask int64)`` of flat sentences
    (``parts``: per chunk ``(offsets, ids, values, lengths)``, see :func:`flatten_sentences`).

    Padding is id 0 (``<pad>``), value 0.0, mask 0; ``width`` must be at least the longest sentence. Each
    sentence is one contiguous copy into its row (a memcpy per cell: about 3x faster than one fancy-index
    scatter of every token into the padded array, which writes an index array as large as the output).
    """
    lengths = np.concatenate([p[3] for p in parts]) if parts else np.zeros(0, np.int64)
    n_cells = len(lengths)
    out_ids = np.zeros((n_cells, width), dtype=np.int64)
    out_val = np.zeros((n_cells, width), dtype=np.float32)
    row = 0
    for offsets, ids, values, part_len in parts:  # chunks
        rows = len(part_len)
        if rows and (part_len == width).all():
            out_ids[row:row + rows] = ids.reshape(rows, width)
            out_val[row:row + rows] = values.reshape(rows, width)
        else:
            bounds = offsets.tolist()
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]), start=row):  # copies, no per-token Python work
                out_ids[i, :b - a] = ids[a:b]
                out_val[i, :b - a] = values[a:b]
        row += rows
    mask = np.empty((n_cells, width), dtype=np.int64)
    np.less(np.arange(width), lengths[:, None], out=mask)
    return out_ids, out_val, mask, lengths


def flatten_sentences(sentences: list[GeneSentences], prefix: list[int], suffix: list[int],
                      ids_dtype=np.int64) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unpadded sentences ``(offsets int64 [B+1], ids, values float32, lengths int64)``, specials included.

    Cell ``i`` is ``ids[offsets[i]:offsets[i+1]]``: what the corpus builder stores as Arrow list columns,
    without the padded ``[B, L]`` round trip of :func:`assemble` (same tokens and values, minus padding).
    """
    if len(sentences) == 1:
        token, value, glen = sentences[0].token, sentences[0].value, sentences[0].lengths
    elif sentences:
        token = np.concatenate([s.token for s in sentences])
        value = np.concatenate([s.value for s in sentences])
        glen = np.concatenate([s.lengths for s in sentences])
    else:
        token, value, glen = np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
    n_pre, n_suf = len(prefix), len(suffix)
    lengths = glen.astype(np.int64) + (n_pre + n_suf)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.empty(int(offsets[-1]), dtype=ids_dtype)
    values = np.zeros(int(offsets[-1]), dtype=np.float32)
    if n_pre + n_suf == 0:
        ids[:] = token
        values[:] = value
        return offsets, ids, values, lengths
    gene = np.ones(len(ids), dtype=bool)  # one boolean-mask write per column (row-major = sentence order)
    for j, tid in enumerate(prefix):
        gene[offsets[:-1] + j] = False
        ids[offsets[:-1] + j] = tid
    for j, tid in enumerate(suffix):
        at = offsets[1:] - n_suf + j
        gene[at] = False
        ids[at] = tid
    ids[gene] = token
    values[gene] = value
    return offsets, ids, values, lengths


# ----------------------------------------------------------------------------------------------------------
# Optional compiled path (numba, the ``fast`` extra; a dependency of scanpy) for ``binned`` and
# ``continuous``: one pass per chunk puts every row's matched, non-zero entries in token order (a counting
# sort by token rank over the whole chunk, then a stable scatter back to the rows: O(nnz + vocabulary),
# no per-row comparison sort), then one pass per cell computes the quantile bins (a histogram of the
# integer counts; a sort only for cells holding non-integer or huge counts), the content hash and the
# seeded sample (a 256-bucket histogram of the 32-bit keys, then the boundary bucket sorted), and writes
# the kept genes in token order. Bit-identical to ``encode_binned`` / ``encode_continuous`` over
# ``gather_entries`` (the NumPy path, kept as the fallback and the reference; tests pin the two together).
# ``HF_SCFM_NUMBA=0`` turns it off. Inputs whose columns must be summed (duplicate genes) and
# ``include_zero_genes`` take the NumPy path.
# ----------------------------------------------------------------------------------------------------------
_NB: dict = {}
_S24, _S27, _S30, _S31, _S32 = (np.uint64(s) for s in (24, 27, 30, 31, 32))
#: Integer counts below this are ranked through a histogram (one table entry per count value).
_HIST_SIZE = 1 << 16


def _mix_scalar(z):
    """:func:`splitmix64` on one uint64 (compiled by numba)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def _row_counts_py(indptr, indices, data, col_rank):
    """Matched non-zero entries per row of a CSR chunk (the sentence lengths before sampling). Compiled;
    branch-free over per-row slices (no negative-index checks), so it vectorises."""
    n_rows = indptr.shape[0] - 1
    out = np.zeros(n_rows, dtype=np.int64)
    for r in range(n_rows):
        a, b = indptr[r], indptr[r + 1]
        row_idx, row_val = indices[a:b], data[a:b]
        c = 0
        for e in range(b - a):
            c += (col_rank[row_idx[e]] >= 0) & (row_val[e] != 0)
        out[r] = c
    return out


def _sampled_rows_py(indptr, indices, data, col_rank, tokens, r0, r1, n_genes, seed_mix, n_bins, do_bins,
                     out_start, out_tok, out_val):
    """Rows ``[r0, r1)`` of a CSR chunk: row ``r``'s gene part (matched non-zero entries in token order,
    sampled to ``n_genes``, seeded by content) is written to ``out_tok`` / ``out_val`` from ``out_start[r]``;
    the value is the quantile bin (``do_bins``) or the float32 count. Compiled by numba; see above.

    Every loop runs over per-row slices and row-long scratch (numba then drops its negative-index checks
    and the simple loops vectorise); the steps are the same as the NumPy path's, so are the outputs."""
    n_tok = tokens.shape[0]
    n_pass = 1  # LSD radix passes of 8 bits over the token rank
    while (1 << (8 * n_pass)) < n_tok:
        n_pass += 1
    max_n = 1
    for r in range(r0, r1):
        max_n = max(max_n, indptr[r + 1] - indptr[r])
    key_a = np.empty(max_n, dtype=np.int64)
    cnt_a = np.empty(max_n, dtype=np.float32)
    key_b = np.empty(max_n, dtype=np.int64)
    cnt_b = np.empty(max_n, dtype=np.float32)
    c_tok = np.empty(max_n, dtype=np.int64)
    radix = np.zeros(n_pass * 257, dtype=np.int64)
    hist = np.zeros(_HIST_SIZE, dtype=np.int64)
    distinct = np.empty(max_n, dtype=np.int64)
    value = np.empty(max_n, dtype=np.float32)
    h32 = np.empty(max_n, dtype=np.uint64)
    cand = np.empty(max_n, dtype=np.uint64)
    buckets = np.zeros(256, dtype=np.int64)
    for r in range(r1 - r0):
        a, b = indptr[r0 + r], indptr[r0 + r + 1]
        row_idx, row_val = indices[a:b], data[a:b]
        # 1. the row's matched non-zero entries (in input order), and whether that is token order already
        n = 0
        ordered = True
        last = -1
        for e in range(b - a):
            k = col_rank[row_idx[e]]
            v = row_val[e]
            if k >= 0 and v != 0:
                key_a[n] = k
                cnt_a[n] = v
                ordered = ordered and k >= last
                last = k
                n += 1
        if n == 0:
            continue
        keys, cnts = key_a[:n], cnt_a[:n]
        # 2. histogram of the integer counts (for the bins); the branches taken are predictable
        nd, general = 0, False
        if do_bins:
            for j in range(n):
                v = cnts[j]
                iv = np.int64(v)
                if iv == v and iv < _HIST_SIZE:
                    if hist[iv] == 0:
                        distinct[nd] = iv
                        nd += 1
                    hist[iv] += 1
                else:
                    general = True
        # 3. token order: an LSD radix sort by token rank when the input columns are not in token order
        if not ordered:
            radix[:] = 0
            for j in range(n):  # every digit's histogram in one read of the keys
                kj = keys[j]
                for ps in range(n_pass):
                    radix[ps * 257 + ((kj >> (8 * ps)) & 255) + 1] += 1
            src_k, src_c, dst_k, dst_c = key_a, cnt_a, key_b, cnt_b
            for ps in range(n_pass):
                shift = 8 * ps
                hist_ps = radix[ps * 257:(ps + 1) * 257]
                for i in range(256):
                    hist_ps[i + 1] += hist_ps[i]
                s_k, s_c = src_k[:n], src_c[:n]
                for j in range(n):
                    kj = s_k[j]
                    d = (kj >> shift) & 255
                    q = hist_ps[d]
                    hist_ps[d] = q + 1
                    dst_k[q] = kj
                    dst_c[q] = s_c[j]
                src_k, src_c, dst_k, dst_c = dst_k, dst_c, src_k, src_c
            keys, cnts = src_k[:n], src_c[:n]
        toks = c_tok[:n]
        for j in range(n):
            toks[j] = tokens[keys[j]]
        vals = value[:n]
        if do_bins:  # bin = 1 + (n_bins - 1) * (number of entries with a smaller count) // n
            if general:  # non-integer or huge counts: rank by a sort of the cell's counts
                srt = np.sort(cnts)
                for j in range(n):
                    below = np.searchsorted(srt, cnts[j])
                    vals[j] = np.float32(1 + ((n_bins - 1) * below) // n)
                for i in range(nd):
                    hist[distinct[i]] = 0
            else:  # one division per distinct count: the table maps a count to its bin
                order = np.sort(distinct[:nd])
                below = 0
                for i in range(nd):
                    c = hist[order[i]]
                    hist[order[i]] = 1 + ((n_bins - 1) * below) // n
                    below += c
                for j in range(n):
                    vals[j] = np.float32(hist[np.int64(cnts[j])])
                for i in range(nd):
                    hist[order[i]] = 0
        else:
            for j in range(n):
                vals[j] = cnts[j]
        o = out_start[r0 + r]
        if n <= n_genes:
            o_tok, o_val = out_tok[o:o + n], out_val[o:o + n]
            for j in range(n):
                o_tok[j] = toks[j]
                o_val[j] = vals[j]
            continue
        # 4. sample: the n_genes entries with the smallest (entry_hash32, token)
        c_bits = cnts.view(np.uint32)
        acc = np.uint64(0)
        for j in range(n):
            acc += _mix_nb((np.uint64(toks[j]) * _GOLDEN) ^ np.uint64(c_bits[j]))
        cell = _mix_nb(acc ^ seed_mix)
        hh = h32[:n]
        for j in range(n):
            hh[j] = _mix_nb(cell + (np.uint64(toks[j]) + np.uint64(1)) * _GOLDEN) >> _S32
        buckets[:] = 0
        for j in range(n):
            buckets[np.int64(hh[j] >> _S24)] += 1
        t, below = 0, 0
        while below + buckets[t] < n_genes:  # bucket t holds the n_genes-th smallest key
            below += buckets[t]
            t += 1
        tb = np.uint64(t)
        nc = 0
        for j in range(n):
            if (hh[j] >> _S24) == tb:
                cand[nc] = (hh[j] << _S32) | np.uint64(toks[j])
                nc += 1
        threshold = np.sort(cand[:nc])[n_genes - below - 1]
        o_tok, o_val = out_tok[o:o + n_genes], out_val[o:o + n_genes]
        w = 0
        for j in range(n):
            hb = hh[j] >> _S24
            if hb < tb or (hb == tb and ((hh[j] << _S32) | np.uint64(toks[j])) <= threshold):
                o_tok[w] = toks[j]
                o_val[w] = vals[j]
                w += 1


_mix_nb = None


def _sampled_kernel():
    """The compiled :func:`_sampled_rows_py`, or None when numba is missing or ``HF_SCFM_NUMBA=0``
    (built once per process; numba caches the machine code on disk, so only the first process compiles)."""
    if "sampled" not in _NB:
        _NB["sampled"] = None
        if os.environ.get("HF_SCFM_NUMBA", "1") != "0":
            try:
                import numba
            except ImportError:
                return None
            global _mix_nb
            _mix_nb = numba.njit(cache=True, nogil=True, inline="always")(_mix_scalar)
            _NB["sampled"] = numba.njit(cache=True, nogil=True)(_sampled_rows_py)
            _NB["row_counts"] = numba.njit(cache=True, nogil=True)(_row_counts_py)
    return _NB["sampled"]


def encode_sampled_flat(counts, colmap: ColumnMap, n_genes: int, seed: int, n_bins: int | None,
                        n_counts: np.ndarray | None = None, prefix=(), suffix=(), ids_dtype=np.int64):
    """``binned`` (``n_bins`` given) or ``continuous`` (``n_bins`` None, needs ``n_counts``) sentences of a
    CSR chunk through the compiled kernel, as flat arrays ``(offsets int64 [B+1], ids, values float32,
    lengths int64)`` with the ``prefix`` / ``suffix`` special tokens in place (what :func:`flatten_sentences`
    makes of the NumPy path's sentences: the same arrays). Returns None when the kernel is unavailable
    (numba missing or ``HF_SCFM_NUMBA=0``) or the input has columns to sum (duplicate genes): the caller
    then takes the NumPy path.

    A first compiled pass counts each row's genes, so every row's place in the output is known and the
    kernel writes there directly (no per-block pieces to concatenate, no padded array). Blocks of rows,
    one per thread of the tokenizer's pool (the kernel releases the GIL), write disjoint parts of the
    output, so the thread count never changes the result.
    """
    kernel = _sampled_kernel()
    if kernel is None or colmap.has_duplicates:
        return None
    counts = counts.tocsr()
    n_cells = counts.shape[0]
    indptr = np.asarray(counts.indptr, dtype=np.int64)
    data = counts.data if counts.data.dtype == np.float32 else counts.data.astype(np.float32)
    indices = counts.indices
    with np.errstate(over="ignore"):
        seed_mix = splitmix64(np.uint64(seed % (1 << 64)) + _GOLDEN)[()]
    do_bins = n_bins is not None
    n_pre, n_suf = len(prefix), len(suffix)
    lengths = np.minimum(_NB["row_counts"](indptr, indices, data, colmap.rank), n_genes) + (n_pre + n_suf)
    offsets = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.empty(int(offsets[-1]), dtype=ids_dtype)
    values = np.zeros(int(offsets[-1]), dtype=np.float32)
    for j, tid in enumerate(prefix):
        ids[offsets[:-1] + j] = tid
    for j, tid in enumerate(suffix):
        ids[offsets[1:] - n_suf + j] = tid
    start = offsets[:-1] + n_pre
    n_spans = _n_threads() if int(indptr[-1]) > 4 * SORT_BLOCK_ENTRIES else 1
    edges = np.unique(np.concatenate(([0, n_cells], np.searchsorted(indptr, np.linspace(0, indptr[-1], n_spans + 1)[1:-1]))))
    edges = edges.astype(np.int64).tolist()
    spans = [(r0, r1) for r0, r1 in zip(edges[:-1], edges[1:]) if r1 > r0]
    _map_blocks(lambda r0, r1: kernel(indptr, indices, data, colmap.rank, colmap.tokens, r0, r1, int(n_genes),
                                     seed_mix, int(n_bins) if do_bins else 2, do_bins, start, ids, values), spans)
    if not do_bins:  # continuous: log1p(x_norm) of the kept counts, as encode_continuous computes it (specials: 0)
        x_norm = values.astype(np.float64)
        x_norm /= np.repeat(np.asarray(n_counts, dtype=np.float64), lengths)
        x_norm *= TARGET_SUM
        values = np.log1p(x_norm).astype(np.float32)
    return offsets, ids, values, lengths


def encode_sampled_csr(counts, colmap: ColumnMap, n_genes: int, seed: int, n_bins: int | None,
                       n_counts: np.ndarray | None = None) -> GeneSentences | None:
    """:func:`encode_sampled_flat` as :class:`GeneSentences` (no special tokens): the same sentences as
    ``encode_binned`` / ``encode_continuous`` over ``gather_entries``, or None (see there)."""
    flat = encode_sampled_flat(counts, colmap, n_genes, seed, n_bins, n_counts)
    if flat is None:
        return None
    _, token, value, lengths = flat
    return GeneSentences(token=token, value=value, lengths=lengths)
