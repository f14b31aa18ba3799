"""Reading count matrices in row chunks (AnnData in memory or backed, ``.h5ad`` paths, arrays) and checking them.

The package's **io level**: it imports nothing else of hf_scfm, so it travels with the tokenizer as remote code
(``tokenizer.save_pretrained`` copies it beside ``tokenization_gene.py``); data, training and tasks import it
from here. Two public functions the tokenizer and the corpus builder share:

* :func:`iter_count_chunks` yields ``(counts, obs)`` pairs of at most ``chunk_size`` cells, ``counts``
  a float CSR matrix over *all* input genes and ``obs`` a DataFrame with the cells' names, their
  ``obs`` columns and a ``"n_counts"`` column (the library size: ``obs["n_counts"]`` when the input has
  it, else the row sum). A backed ``.h5ad`` is read slice by slice: never the whole matrix in memory,
  never densified (dense inputs are converted chunk by chunk).
* :func:`validate_counts` raises a clear error for NaN / infinite / negative values, non-integer or
  log-normalised values where raw counts are expected, and cells whose library size is zero.

Choices: cells with no counts are an **error** (not silently dropped), because every output row of the
tokenizer must correspond to an input row; filter them first (the message says how).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

__all__ = ["CountSource", "open_count_source", "iter_count_chunks", "validate_counts", "read_h5ad",
           "log_normalize_counts"]

#: Largest value below which non-integer data with no value above it is called "log-normalised".
_LOG_MAX = 30.0


def read_h5ad(path, backed: bool = True):
    """Open an ``.h5ad`` file (read-only backed by default) with errors that name the problem."""
    import anndata as ad
    import h5py

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such h5ad file: {path!r}. Check the path (relative paths start at {os.getcwd()!r}).")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, not an .h5ad file.")
    if not h5py.is_hdf5(path):
        raise ValueError(
            f"{path!r} is not an .h5ad file (not HDF5). Pass an AnnData .h5ad written by anndata.write_h5ad, "
            "or load other formats yourself (e.g. scanpy.read_10x_h5 / read_csv) and pass the AnnData."
        )
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as err:  # anndata raises various errors for HDF5 files that are not AnnData
        raise ValueError(f"{path!r} is an HDF5 file but not a readable AnnData .h5ad ({err}).") from err


@dataclass
class CountSource:
    """A row-sliceable count matrix with its gene names, cell names and obs table."""

    matrix: object  # scipy sparse, numpy array, or anndata backed dataset
    var_names: list[str]
    obs: object | None  # pandas DataFrame or None
    n_obs: int
    library_sizes: np.ndarray | None = None  # float64, from obs["n_counts"] or given

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        m = self.matrix
        if sp.issparse(m) and m.format == "csr":  # in memory: views of the row range, no copy
            a, b = m.indptr[start], m.indptr[stop]
            block = sp.csr_matrix((m.data[a:b], m.indices[a:b], m.indptr[start:stop + 1] - a),
                                  shape=(stop - start, m.shape[1]))
            block.has_sorted_indices = m.has_sorted_indices
            return block if block.dtype.kind in "fc" and block.dtype.itemsize >= 4 else block.astype(np.float32)
        block = m[start:stop]
        if sp.issparse(block):
            block = block.tocsr()
        elif hasattr(block, "to_memory"):
            block = block.to_memory().tocsr()
        else:
            block = sp.csr_matrix(np.asarray(block))
        if block.dtype.kind not in "fc" or block.dtype.itemsize < 4:
            block = block.astype(np.float32)
        return block


def open_count_source(source, gene_ids=None, layer: str | None = None, n_counts=None) -> CountSource:
    """Wrap ``source`` (AnnData, backed AnnData, ``.h5ad`` path, sparse/dense matrix, DataFrame) for chunked reads.

    Args:
        source: the cells. Matrices need ``gene_ids`` (one name per column); a DataFrame uses its columns.
        gene_ids: gene names/IDs of the matrix columns (ignored for AnnData, which has ``var_names``).
        layer: read ``adata.layers[layer]`` instead of ``adata.X``.
        n_counts: library sizes per cell; default ``obs["n_counts"]`` if present, else the row sums.
    """
    import pandas as pd

    if isinstance(source, (str, os.PathLike)):
        source = read_h5ad(source, backed=True)
    if hasattr(source, "var_names") and hasattr(source, "obs") and hasattr(source, "X"):
        adata = source
        if layer is not None:
            if layer not in adata.layers:
                raise KeyError(f"AnnData has no layer {layer!r}; layers: {list(adata.layers.keys())}.")
            matrix = adata.layers[layer]
        else:
            matrix = adata.X
        if matrix is None:
            raise ValueError("AnnData.X is empty (None). Pass layer=<name> to read counts from adata.layers.")
        obs = adata.obs
        if n_counts is None and "n_counts" in obs.columns:
            n_counts = obs["n_counts"].to_numpy()
        var_names = adata.var_names.tolist()
        if set(map(type, var_names)) - {str}:
            var_names = [str(v) for v in var_names]
        n_obs = adata.n_obs
    elif isinstance(source, pd.DataFrame):
        matrix, var_names, obs, n_obs = source.to_numpy(), [str(c) for c in source.columns], pd.DataFrame(index=source.index.astype(str)), len(source)
    else:
        if gene_ids is None:
            raise ValueError(
                "A count matrix needs its gene names: call tokenizer(matrix, gene_ids=[...]) with one Ensembl ID or "
                "symbol per column, or pass an AnnData."
            )
        matrix = source if sp.issparse(source) else np.asarray(source)
        if matrix.ndim == 1:
            matrix = matrix[None, :]
        if matrix.ndim != 2:
            raise ValueError(f"Expected a 2-D cells x genes matrix, got shape {matrix.shape}.")
        if sp.issparse(matrix):
            matrix = matrix.tocsr()
        var_names, obs, n_obs = [str(g) for g in gene_ids], None, matrix.shape[0]
        if len(var_names) != matrix.shape[1]:
            raise ValueError(f"gene_ids has {len(var_names)} names but the matrix has {matrix.shape[1]} columns.")
    if sp.issparse(matrix) and matrix.format == "csc" and not hasattr(matrix, "to_memory"):
        matrix = matrix.tocsr()  # row slices of CSC are slow; one conversion of the in-memory matrix
    lib = None
    if n_counts is not None:
        lib = np.asarray(n_counts, dtype=np.float64).ravel()
        if lib.shape[0] != n_obs:
            raise ValueError(f"n_counts has {lib.shape[0]} entries for {n_obs} cells.")
    return CountSource(matrix=matrix, var_names=var_names, obs=obs, n_obs=n_obs, library_sizes=lib)


def iter_count_chunks(source, chunk_size: int = 4096, gene_ids=None, layer: str | None = None, n_counts=None,
                      check_counts: bool = True):
    """Yield ``(counts, obs)`` for consecutive blocks of at most ``chunk_size`` cells.

    ``counts`` is a float CSR matrix (cells x all input genes), ``obs`` a DataFrame indexed by cell name
    with the source's obs columns and ``"n_counts"`` (library size, see module docstring). Each chunk is
    checked with :func:`validate_counts` (``check_counts=False`` skips only the integer check).
    Memory is O(chunk_size x genes per cell). Accepts what :func:`open_count_source` accepts, or a
    :class:`CountSource`.
    """
    import pandas as pd

    src = source if isinstance(source, CountSource) else open_count_source(source, gene_ids, layer, n_counts)
    for start in range(0, src.n_obs, chunk_size):
        stop = min(start + chunk_size, src.n_obs)
        counts = src.rows(start, stop)
        if src.obs is not None:
            obs = src.obs.iloc[start:stop].copy()
        else:
            obs = pd.DataFrame(index=[str(i) for i in range(start, stop)])
        if src.library_sizes is not None:
            lib = src.library_sizes[start:stop]
        else:
            lib = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        validate_counts(counts, lib, check_counts=check_counts, cell_names=obs.index, offset=start)
        obs["n_counts"] = lib
        yield counts, obs


def validate_counts(counts, n_counts=None, check_counts: bool = True, cell_names=None, offset: int = 0) -> None:
    """Raise ``ValueError`` if ``counts`` (cells x genes) are not usable raw counts.

    Checks, in order: NaN, infinite, negative values; (if ``check_counts``) non-integer values, with a
    specific message when they look log-normalised (all below 30); cells whose library size
    ``n_counts`` (default: row sums) is zero or not finite. ``offset`` is added to row numbers in messages.
    """
    data = counts.data if sp.issparse(counts) else np.asarray(counts).ravel()
    lo, hi = (data.min(), data.max()) if data.size else (0, 0)  # NaN propagates; one pass each
    if data.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
        n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        raise ValueError(
            f"The count matrix contains {n_nan} NaN and {n_inf} infinite values. Counts must be finite; "
            "fix or drop those cells/genes first (e.g. np.nan_to_num, or subset the AnnData)."
        )
    if lo < 0:
        raise ValueError(
            f"The count matrix contains {int((data < 0).sum())} negative values (min {data.min():g}). Counts cannot "
            "be negative: pass raw UMI counts (not scaled/centred data such as the output of sc.pp.scale)."
        )
    if check_counts and data.size and data.dtype.kind == "f" and not np.array_equal(data, np.rint(data)):
        frac = np.abs(data - np.rint(data)) > 1e-3
        if frac.any():
            top = float(hi)
            kind = "log-normalised (all values below %g, e.g. sc.pp.log1p output)" % _LOG_MAX if top < _LOG_MAX \
                else "normalised (non-integer)"
            raise ValueError(
                f"Expected raw counts but {int(frac.sum())} values are not integers (e.g. {data[frac][0]:g}); the data "
                f"look {kind}. Pass raw counts (often in adata.layers['counts'] -> layer='counts', or adata.raw). "
                "To tokenize normalised, non-log data on purpose pass check_counts=False (each cell is rescaled to "
                "10,000 anyway); log1p data must be undone first (np.expm1)."
            )
    if n_counts is None:
        n_counts = np.asarray(counts.sum(axis=1)).ravel()
    n_counts = np.asarray(n_counts, dtype=np.float64)
    empty = ~(n_counts > 0) | ~np.isfinite(n_counts)
    if empty.any():
        rows = np.flatnonzero(empty)
        names = [str(cell_names[r]) if cell_names is not None else str(r + offset) for r in rows[:5]]
        raise ValueError(
            f"{len(rows)} cell(s) have no counts (library size 0 or missing), e.g. {', '.join(names)}. They cannot be "
            "normalised; drop them first, e.g. adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0] "
            "(or sc.pp.filter_cells(adata, min_counts=1))."
        )


def log_normalize_counts(counts, n_counts, target_sum: float = 1e4) -> sp.csr_matrix:
    """float32 CSR ``log1p(counts / n_counts * target_sum)`` (scanpy's ``normalize_total`` + ``log1p``) of a
    cells x genes count matrix and its library sizes ``n_counts`` (positive: see :func:`validate_counts`)."""
    x = sp.diags(target_sum / np.asarray(n_counts, dtype=np.float64)) @ sp.csr_matrix(counts, dtype=np.float64)
    x.data = np.log1p(x.data)
    return x.astype(np.float32).tocsr()
