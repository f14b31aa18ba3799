"""Cross-species use on purpose: :func:`map_orthologs` renames a mouse AnnData's genes to their human one-to-one
orthologs (or a human one's to mouse), so a model and tokenizer of the other species can read it.

A tokenizer refuses another species' genes (:meth:`hf_scfm.GeneTokenizer.check_genes`): symbols of human and mouse
often agree up to case, so without that check a mouse cell would be read into a human model with most genes
"matched" and nothing said. Reading it anyway is a modelling decision, and this is the step that makes it explicit.

The table is ``ortholog_tables/orthologs_1v1_mouse_human.csv.gz``: 16,597 mouse / human symbol pairs, each symbol
once (CAME's ``gene_matches_1v1_mouse2human.csv``, from Ensembl BioMart, MIT; see ``ortholog_tables/ATTRIBUTION.md``).

Choices, written down:

* Input genes are symbols (any letter case) or Ensembl IDs of the source species (mapped to their GENCODE symbol
  first). Genes without a one-to-one ortholog are dropped, and counted in ``uns["ortholog_mapping"]``.
* Two input columns with the same ortholog (a symbol listed twice, or a symbol and its Ensembl ID) are summed.
* The result is a new AnnData: ``var_names`` are the target species' symbols, ``var["source_gene"]`` the input
  names (joined by ``|`` when summed), ``X`` and every layer restricted to the mapped genes, ``obs``/``obsm``/
  ``uns`` kept, ``uns["species"]`` set to the target species (so the tokenizer's species check passes) and
  ``uns["ortholog_mapping"]`` recording what was done.
* ``obs["n_counts"]`` is the library size over *all* the cell's genes (the input's, or its row sums when it has
  none), which is what normalisation divides by: dropping the genes without an ortholog does not change a cell's
  normalised values.
"""

from __future__ import annotations

import csv
import gzip
from functools import lru_cache
from importlib import resources

import numpy as np

from .gene_tables import canonical_gene_ids, load_gene_table, normalize_species

__all__ = ["map_orthologs", "ortholog_table", "ORTHOLOG_TABLE"]

ORTHOLOG_TABLE = "orthologs_1v1_mouse_human.csv.gz"
_TABLE_SOURCE = ("one-to-one mouse/human orthologs (Ensembl BioMart), gene_matches_1v1_mouse2human.csv of the came==0.1.13 "
                 "wheel's sample_data.zip (MIT)")


@lru_cache(maxsize=None)
def ortholog_table(source: str, target: str) -> dict[str, str]:
    """``{upper-cased source symbol: target symbol}`` of the shipped one-to-one table (cached)."""
    source, target = normalize_species(source), normalize_species(target)
    if source == target:
        raise ValueError(f"map_orthologs maps between species; source and target are both {source!r}.")
    path = resources.files(__package__) / "ortholog_tables" / ORTHOLOG_TABLE
    if not path.is_file():
        raise FileNotFoundError(f"The ortholog table {ORTHOLOG_TABLE} is not installed beside {__name__}: install "
                                "hf-scfm to map orthologs.")
    with resources.as_file(path) as p, gzip.open(p, "rt", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    pairs = {(row["mouse_symbol"], row["human_symbol"]) for row in rows}
    if source == "mouse":
        return {m.upper(): h for m, h in pairs}
    return {h.upper(): m for m, h in pairs}


def map_orthologs(adata, source: str = "mouse", target: str = "human"):
    """A new AnnData whose genes are ``target``-species one-to-one orthologs of ``adata``'s ``source`` genes.

    ``adata`` (an AnnData, in memory or backed) holds raw counts with gene symbols or Ensembl IDs of ``source`` as
    ``var_names``; what the result holds is listed in the module docstring. Raises when ``adata`` declares another
    species than ``source`` (``uns["species"]``) or when none of its genes has an ortholog in the table.

    >>> human_like = hf_scfm.map_orthologs(hf_scfm.load_example("baron_mouse"), source="mouse", target="human")
    >>> GeneTokenizer.from_species("human", encoding="binned")(human_like[:8])   # read by a human model, on purpose
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from .anndata_io import declared_species

    source, target = normalize_species(source), normalize_species(target)
    table = ortholog_table(source, target)
    declared = declared_species(adata)
    if declared is not None:
        try:
            declared_norm = normalize_species(declared)
        except ValueError:
            declared_norm = declared
        if declared_norm != source:
            raise ValueError(f"map_orthologs(source={source!r}): the AnnData declares uns['species'] = {declared!r}. "
                             f"Pass source={declared!r}, or correct uns['species'] if the genes are {source}.")
    if adata.isbacked:
        adata = adata.to_memory()
    gencode = load_gene_table(source)
    names = [str(v).strip() for v in adata.var_names]
    gene_ids = canonical_gene_ids(names, gencode)[0]  # Ensembl IDs (and symbols GENCODE knows) -> GENCODE symbol
    target_of: list[str | None] = []
    for name, gene_id in zip(names, gene_ids):
        found = table.get(name.upper())
        if found is None and gene_id is not None:
            found = table.get(gencode.symbols[gencode.id_index[gene_id]].upper())
        target_of.append(found)
    mapped = [i for i, t in enumerate(target_of) if t is not None]
    if not mapped:
        raise ValueError(f"None of the {len(names):,} genes (e.g. {', '.join(names[:5])}) has a one-to-one {target} "
                         f"ortholog in the table: check that the genes are {source} symbols or Ensembl IDs.")
    genes = sorted({target_of[i] for i in mapped})
    column = {g: j for j, g in enumerate(genes)}
    rows, cols = np.asarray(mapped), np.asarray([column[target_of[i]] for i in mapped])
    merge = sp.csr_matrix((np.ones(len(mapped)), (rows, cols)), shape=(len(names), len(genes)))

    def project(matrix):
        if matrix is None:
            return None
        dense = not sp.issparse(matrix)
        matrix = sp.csr_matrix(matrix)
        if matrix.dtype.kind != "f" or matrix.dtype.itemsize < 4:
            matrix = matrix.astype(np.float32)
        out = (matrix @ merge.astype(matrix.dtype)).tocsr()
        return out.toarray() if dense else out

    sources: dict[str, list[str]] = {}
    for i in mapped:
        sources.setdefault(target_of[i], []).append(names[i])
    var = pd.DataFrame({"source_gene": ["|".join(sources[g]) for g in genes]}, index=pd.Index(genes, dtype=str))
    uns = dict(adata.uns)
    uns["species"] = target
    uns["ortholog_mapping"] = {
        "source_species": source, "target_species": target, "table": _TABLE_SOURCE,
        "n_input_genes": len(names), "n_mapped_genes": len(mapped), "n_output_genes": len(genes),
        "n_summed": len(mapped) - len(genes), "n_without_ortholog": len(names) - len(mapped),
    }
    obs = adata.obs.copy()
    if "n_counts" not in obs.columns and adata.X is not None:
        obs["n_counts"] = np.asarray(sp.csr_matrix(adata.X, dtype=np.float64).sum(axis=1)).ravel()
    return ad.AnnData(X=project(adata.X), obs=obs, var=var, uns=uns,
                      obsm={k: v for k, v in adata.obsm.items()},
                      layers={k: project(v) for k, v in adata.layers.items()})
