"""hf_scfm.data.pool_cells: cells of several datasets and of both species stacked into one corpus AnnData."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from hf_scfm.data import pool_cells


def _adata(X, genes, species, cells):
    a = ad.AnnData(X=sp.csr_matrix(np.asarray(X, dtype=np.float32)), obs=pd.DataFrame(index=cells),
                   var=pd.DataFrame(index=genes))
    a.obs["cell_type"] = "beta"
    if species:
        a.uns["species"] = species
    return a


HUMAN = _adata([[1, 2, 0], [0, 1, 3]], ["GCG", "SST", "INS"], "human", ["c0", "c1"])
# Gcg and Sst have one-to-one human orthologs; Ins1 has none (mouse has two insulin genes); Zzz9 is no gene at all
MOUSE = _adata([[5, 0, 7, 4]], ["Gcg", "Sst", "Ins1", "Zzz9"], "mouse", ["c0"])


def test_pool_cells_maps_the_other_species_through_orthologs_and_keeps_each_library_size():
    pooled = pool_cells({"h": HUMAN, "m": MOUSE}, species="human")
    assert pooled.uns["species"] == "human"
    assert list(pooled.obs_names) == ["h:c0", "h:c1", "m:c0"]  # same cell names in two parts never collide
    assert list(pooled.obs["pool_source"]) == ["h", "h", "m"]
    got = pd.DataFrame(pooled.X.toarray(), index=pooled.obs_names, columns=pooled.var_names)
    assert got.loc["m:c0", "GCG"] == 5 and got.loc["m:c0", "SST"] == 0
    assert got.loc["m:c0", "INS"] == 0  # Ins1 has no one-to-one ortholog: never read as INS by its symbol
    assert got.loc["h:c1", "INS"] == 3 and got.loc["h:c0", "GCG"] == 1
    # library sizes over all of each part's genes, those without an ortholog included
    np.testing.assert_allclose(pooled.obs["n_counts"], [3, 4, 16])
    assert pooled.uns["pool"]["m"]["mapped_by_orthologs"] and not pooled.uns["pool"]["h"]["mapped_by_orthologs"]
    assert pooled.obs["cell_type"].tolist() == ["beta"] * 3


def test_pool_cells_restricts_to_genes_in_the_given_order_with_zeros_for_missing_ones():
    pooled = pool_cells({"h": HUMAN, "m": MOUSE}, species="human", genes=["SST", "NEW", "GCG"])
    assert list(pooled.var_names) == ["SST", "NEW", "GCG"]
    np.testing.assert_array_equal(pooled.X.toarray(), [[2, 0, 1], [1, 0, 0], [0, 0, 5]])
    np.testing.assert_allclose(pooled.obs["n_counts"], [3, 4, 16])  # restriction keeps the library sizes


def test_pool_cells_needs_a_declared_species():
    with pytest.raises(ValueError, match=r"part 'x' declares no species.*uns\['species'\]"):
        pool_cells({"h": HUMAN, "x": _adata([[1]], ["GCG"], None, ["c0"])}, species="human")
