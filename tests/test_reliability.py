"""Issue 22, "nothing silently wrong": each bad input a careful user tried goes through the public API or the
command line and gets a clear error naming the problem and the fix, or a deliberate, documented handling (the
README's "Reliability" section lists them). Tiny inputs only: slices of the bundled Baron sets, tiny presets."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import hf_scfm
from hf_scfm import GeneTokenizer
from hf_scfm import cli


@pytest.fixture(scope="module")
def baron():
    """20 cells of each bundled Baron set (mouse and human)."""
    return {name: hf_scfm.load_example(f"baron_{name}")[:20].copy() for name in ("mouse", "human")}


# ---------------------------------------------------------------------------------------------------- 1. species
@pytest.mark.parametrize("declared", [True, False])
def test_other_species_is_refused_naming_species_and_fix(baron, declared):
    mouse = baron["mouse"].copy()
    if not declared:
        del mouse.uns["species"]  # the case pattern of the symbols (Ins1, 0610007P14Rik) is evidence enough
    tok = GeneTokenizer.from_species("human", encoding="binned")
    with pytest.raises(ValueError, match=r"look like mouse genes.*vocabulary is human.*map_orthologs") as err:
        tok(mouse[:4])
    assert ("uns['species'] is 'mouse'" in str(err.value)) == declared
    assert "written like mouse symbols" in str(err.value)
    with pytest.raises(ValueError, match=r"look like human genes.*vocabulary is mouse"):
        GeneTokenizer.from_species("mouse", encoding="rank").check_genes(baron["human"])


def test_other_species_refused_by_ensembl_prefix_and_by_match_rates(baron):
    human_tok = GeneTokenizer.from_species("human")
    mouse_table = hf_scfm.tokenization.load_gene_table("mouse")
    mouse_ids = list(mouse_table.ids[:60])
    with pytest.raises(ValueError, match=r"look like mouse genes.*Ensembl IDs are mouse \(ENSMUSG"):
        human_tok.check_genes(mouse_ids)
    # upper-cased mouse symbols with no declared species: only the match rates against both tables tell
    upper = [str(g).upper() for g in baron["mouse"].var_names[:3000]]
    with pytest.raises(ValueError, match=r"look like mouse genes.*match the mouse gene table"):
        human_tok.check_genes(upper)


def test_bundled_examples_pass_their_own_species_check(baron):
    assert GeneTokenizer.from_species("human").check_genes(baron["human"]).match_rate > 0.85
    assert GeneTokenizer.from_species("mouse").check_genes(baron["mouse"]).match_rate > 0.85
    assert GeneTokenizer.from_species("human").check_genes(hf_scfm.load_example("pbmc68k")[:5]).n_tokens > 500


def test_map_orthologs_reads_mouse_cells_into_a_human_tokenizer_on_purpose(baron):
    mouse = baron["mouse"]
    human_like = hf_scfm.map_orthologs(mouse, source="mouse", target="human")
    record = human_like.uns["ortholog_mapping"]
    assert human_like.uns["species"] == "human"
    assert record["n_input_genes"] == mouse.n_vars and record["n_mapped_genes"] + record["n_without_ortholog"] == mouse.n_vars
    assert 0.7 < human_like.n_vars / mouse.n_vars < 0.9
    # a gene's counts move to its ortholog's column unchanged; library sizes stay those of all the cell's genes
    j = list(human_like.var["source_gene"]).index("Gcg")
    assert human_like.var_names[j] == "GCG"
    np.testing.assert_array_equal(np.asarray(human_like.X[:, j].todense()).ravel(),
                                  np.asarray(mouse[:, "Gcg"].X.todense()).ravel())
    np.testing.assert_allclose(human_like.obs["n_counts"], np.asarray(mouse.X.sum(axis=1)).ravel())
    assert human_like.obs["n_counts"].iloc[0] > np.asarray(human_like.X[0].sum())  # genes without ortholog count
    enc = GeneTokenizer.from_species("human", encoding="binned")(human_like[:3])
    assert len(enc["input_ids"]) == 3
    with pytest.raises(ValueError, match=r"declares uns\['species'\] = 'mouse'"):
        hf_scfm.map_orthologs(mouse, source="human", target="mouse")


def test_map_orthologs_sums_a_symbol_and_its_ensembl_id():
    table = hf_scfm.tokenization.load_gene_table("mouse")
    gcg_id = table.ids[table.symbols.index("Gcg")]
    x = sp.csr_matrix(np.array([[1.0, 2.0, 5.0], [0.0, 3.0, 7.0]], dtype=np.float32))
    adata = ad.AnnData(x, var=pd.DataFrame(index=["Gcg", gcg_id, "NotAGene1"]))
    out = hf_scfm.map_orthologs(adata, source="mouse", target="human")
    assert list(out.var_names) == ["GCG"] and out.var["source_gene"].iloc[0] == f"Gcg|{gcg_id}"
    np.testing.assert_array_equal(out.X.toarray().ravel(), [3.0, 3.0])
    np.testing.assert_array_equal(out.obs["n_counts"], [8.0, 10.0])
    assert out.uns["ortholog_mapping"]["n_summed"] == 1 and out.uns["ortholog_mapping"]["n_without_ortholog"] == 1


# ---------------------------------------------------------------------------------------------------- 6. float16
def test_float16_counts_are_upcast_in_memory_and_on_disk(baron, tmp_path):
    import h5py

    human = baron["human"][:6].copy()
    tok = GeneTokenizer.from_species("human", encoding="binned")
    expected = tok(human)
    dense16 = ad.AnnData(human.X.toarray().astype(np.float16), obs=human.obs, var=human.var, uns=human.uns)
    assert tok(dense16)["input_ids"] == expected["input_ids"]
    path = tmp_path / "half.h5ad"
    human.write_h5ad(path)
    with h5py.File(path, "r+") as f:  # what a tool writing half floats leaves: scipy.sparse cannot hold float16
        data = f["X/data"][...]
        del f["X/data"]
        f["X/data"] = data.astype(np.float16)
    got = tok(str(path))
    assert got["input_ids"] == expected["input_ids"] and got["values"] == expected["values"]
    big = human.copy()
    big.X = big.X.toarray().astype(np.float16)
    big.X[0, 0] = 4000
    with pytest.warns(UserWarning, match="float16, which holds integers exactly only up to 2,048"):
        tok(big)
