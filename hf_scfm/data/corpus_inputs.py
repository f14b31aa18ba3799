"""The inputs of a corpus build: ``.h5ad`` files, folders of them, in-memory AnnData; their names and obs columns.

:func:`expand_inputs` turns what :func:`hf_scfm.data.build_corpus` was given into one entry per source (folders
are searched recursively, sorted), :func:`source_names` names them (file names, relative paths where two files
share a name), and :func:`scan_sources` opens each once (backed) for its cell count and the kinds of the requested
obs columns, with errors naming the file.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Source", "expand_inputs", "source_names", "open_backed", "scan_sources"]


@dataclass
class Source:
    index: int
    name: str
    path: str | None
    adata: Any
    n_cells: int
    description: str | None = None  # the AnnData's uns["source"] (dataset and licence), for model cards


def expand_inputs(inputs) -> list[tuple[str | None, str | None, Any]]:
    """``(name or None, path or None, adata or None)`` per input; folders expand to their sorted .h5ad files."""
    if isinstance(inputs, (str, os.PathLike)) or hasattr(inputs, "obs"):
        inputs = [inputs]
    items = list(inputs.items()) if isinstance(inputs, Mapping) else [(None, x) for x in inputs]
    out = []
    for name, item in items:
        if hasattr(item, "obs") and hasattr(item, "X"):
            out.append((name, None, item))
            continue
        path = os.fspath(item)
        if os.path.isdir(path):
            found = sorted(
                os.path.join(root, f)
                for root, _, files in os.walk(path)
                for f in files
                if f.endswith(".h5ad") and not f.startswith(".")
            )
            if not found:
                raise FileNotFoundError(f"The folder {path!r} holds no .h5ad files.")
            out.extend((None, f, None) for f in found)
        elif os.path.isfile(path):
            if not path.endswith(".h5ad"):
                raise ValueError(f"Input {path!r} is not an .h5ad file; inputs are .h5ad files, folders of them, or AnnData.")
            out.append((name, path, None))
        else:
            raise FileNotFoundError(f"Input {path!r} does not exist.")
    if not out:
        raise ValueError("build_corpus got no inputs.")
    return out


def source_names(expanded) -> list[str]:
    """File names; relative paths where two files share a name; ``adata-<i>`` for unnamed AnnData."""
    paths = [os.path.abspath(p) for _, p, _ in expanded if p is not None]
    base = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    basenames = Counter(os.path.basename(p) for p in paths)
    names = []
    for i, (name, path, _) in enumerate(expanded):
        if name is None:
            if path is None:
                name = f"adata-{i}"
            else:
                name = os.path.basename(path)
                if basenames[name] > 1:
                    name = os.path.relpath(os.path.abspath(path), base).replace(os.sep, "/")
        names.append(str(name))
    dupes = [n for n, c in Counter(names).items() if c > 1]
    if dupes:
        raise ValueError(f"Two inputs share the source name(s) {dupes}; give them distinct names.")
    return names


def open_backed(path: str):
    from ..tokenization.anndata_io import read_h5ad

    return read_h5ad(path, backed=True)


def _column_kind(series) -> str:
    import pandas as pd

    if isinstance(series.dtype, pd.CategoricalDtype):
        return _column_kind(pd.Series(series.cat.categories)) if len(series.cat.categories) else "string"
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_integer_dtype(series):
        return "int64"
    if pd.api.types.is_float_dtype(series):
        return "float64"
    return "string"


def scan_sources(expanded, names, obs_columns, layer: str | None = None) -> tuple[list[Source], dict[str, str]]:
    """Cell counts and obs column kinds of every source; errors for missing or conflicting columns and for a
    missing count layer."""
    sources, kinds, kind_from = [], {}, {}
    for i, ((_, path, adata), name) in enumerate(zip(expanded, names)):
        obj = adata if adata is not None else open_backed(path)
        try:
            if layer is not None and layer not in obj.layers:
                raise ValueError(f"{path or name!r} has no layer {layer!r} (its layers: {list(obj.layers.keys())}); "
                                 "pass --layer with one of those, or leave it out to read X.")
            missing = [c for c in obs_columns if c not in obj.obs.columns]
            if missing:
                raise ValueError(
                    f"Label/obs column(s) {missing} not found in {path or name!r} (its obs columns: "
                    f"{list(obj.obs.columns)}). Pass obs_columns that every input has, or add the column."
                )
            for col in obs_columns:
                kind = _column_kind(obj.obs[col])
                if kinds.setdefault(col, kind) != kind:
                    raise ValueError(
                        f"obs column {col!r} is {kind} in {path or name!r} but {kinds[col]} in {kind_from[col]!r}; "
                        "a column needs one type across the corpus (convert it in the inputs)."
                    )
                kind_from.setdefault(col, path or name)
            described = obj.uns.get("source") if hasattr(obj, "uns") else None
            sources.append(Source(i, name, path, adata, int(obj.n_obs), str(described) if described else None))
        finally:
            if adata is None and getattr(obj, "file", None) is not None:
                obj.file.close()
    return sources, kinds
