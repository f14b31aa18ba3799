"""Pooling real cells of several datasets, and of both species, into one pretraining corpus.

:func:`pool_cells` stacks AnnDatas of raw counts into one AnnData of one species: a part of the other species is
first renamed to its one-to-one orthologs (:func:`hf_scfm.map_orthologs`, never by symbol), so a tokenizer of the
target species reads every cell over its own genes. Choices, written down:

* Library sizes are each part's own: ``obs["n_counts"]`` is kept when a part has it (``map_orthologs`` sets it to
  the sum over *all* the cell's genes, those without an ortholog included), else the row sums over all the part's
  genes. Normalisation therefore divides by the same number as for the part alone: pooling and gene restriction
  never change a cell's normalised values.
* Genes are the union of the parts' genes (outer join); a gene a part does not measure (no ortholog, not on its
  panel) is a zero in its cells. With ``genes`` only those columns are kept (missing ones as zeros), which is
  what a tokenizer with a selected panel reads anyway, and keeps the result small.
* ``obs`` keeps the columns the parts share; ``obs["pool_source"]`` names each cell's part and ``obs_names`` are
  prefixed with it (``"<source>:<cell>"``), so cells of different datasets never collide.
  ``uns["species"]`` is the target species, ``uns["pool"]`` records the parts (cells, species, mapped or not).
"""

from __future__ import annotations

__all__ = ["pool_cells"]


def pool_cells(parts: dict, species: str, genes=None):
    """One AnnData of ``species`` holding the cells of every AnnData of ``parts`` (``{source name: AnnData}``, raw
    counts, ``uns["species"]`` declared), the other species' parts mapped through the one-to-one ortholog table.

    ``genes``: keep only these ``species`` gene names (zeros where a part lacks one); default the union of all.

    >>> pooled = pool_cells({"human": train, "mouse": load_example("baron_mouse")}, species="human")
    """
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from ..tokenization.anndata_io import declared_species
    from ..tokenization.gene_tables import normalize_species
    from ..tokenization.orthologs import map_orthologs

    species = normalize_species(species)
    if not parts:
        raise ValueError("pool_cells needs at least one AnnData in parts ({source name: AnnData}).")
    prepared, record = [], {}
    for name, adata in parts.items():
        declared = declared_species(adata)
        if declared is None:
            raise ValueError(f"pool_cells: part {name!r} declares no species; set its uns['species'] to 'human' or "
                             "'mouse' so it is mapped to the right genes.")
        source = normalize_species(declared)
        if adata.isbacked:
            adata = adata.to_memory()
        if source != species:
            adata = map_orthologs(adata, source=source, target=species)
        else:
            adata = adata.copy()
            if "n_counts" not in adata.obs.columns:
                adata.obs["n_counts"] = np.asarray(sp.csr_matrix(adata.X, dtype=np.float64).sum(axis=1)).ravel()
        if genes is not None:
            keep = list(dict.fromkeys(str(g) for g in genes))
            present = pd.Index(adata.var_names).get_indexer(keep)
            hit = np.flatnonzero(present >= 0)
            pick = sp.csr_matrix((np.ones(hit.size, dtype=np.float32), (present[hit], hit)),
                                 shape=(adata.n_vars, len(keep)))  # column j of the input -> column k of the output
            adata = ad.AnnData(X=sp.csr_matrix(sp.csr_matrix(adata.X, dtype=np.float32) @ pick), obs=adata.obs,
                               var=pd.DataFrame(index=pd.Index(keep, dtype=str)))
        adata.obs["pool_source"] = name
        adata.obs_names = [f"{name}:{c}" for c in adata.obs_names]
        record[name] = {"n_cells": int(adata.n_obs), "species": source, "mapped_by_orthologs": source != species,
                        "n_genes": int(adata.n_vars)}
        prepared.append(ad.AnnData(X=sp.csr_matrix(adata.X, dtype=np.float32), obs=adata.obs,
                                   var=pd.DataFrame(index=adata.var_names)))
    pooled = ad.concat(prepared, join="outer", fill_value=0, merge=None)
    shared = [c for c in prepared[0].obs.columns if all(c in p.obs.columns for p in prepared)]
    pooled.obs = pooled.obs[shared].copy()
    if genes is not None:
        pooled = pooled[:, keep].copy()
    pooled.X = sp.csr_matrix(pooled.X)
    pooled.uns["species"] = species
    pooled.uns["pool"] = record
    return pooled
