"""Real single-cell datasets shipped inside the package, loadable offline."""

from __future__ import annotations

from importlib import resources

EXAMPLES = {
    "baron_human": "Baron 2016 human pancreas: 2,142 cells x 20,125 genes (symbols), 13 cell types, 4 donors",
    "baron_mouse": "Baron 2016 mouse pancreas: 1,886 cells x 14,877 genes (symbols), 12 cell types, 2 donors",
    "pbmc68k": "Zheng 2017 PBMC subset (scanpy pbmc68k_reduced): 700 cells x 765 genes, 10 cell types",
}


def example_path(name: str):
    """Path of the bundled ``.h5ad`` file of example ``name`` (see :data:`EXAMPLES`)."""
    if name not in EXAMPLES:
        raise ValueError(f"Unknown example dataset {name!r}. Available: {', '.join(sorted(EXAMPLES))}.")
    return resources.files("hf_scfm.data") / "examples" / f"{name}.h5ad"


def load_example(name: str, backed: bool = False):
    """Return a bundled example dataset as an AnnData of raw UMI counts.

    ``obs["cell_type"]`` holds the labels, ``obs["batch"]`` the donor (batch), ``uns["species"]`` the
    species ("human" or "mouse"); ``var_names`` are gene symbols. Sources and licences:
    ``hf_scfm/data/examples/ATTRIBUTION.md``.

    Args:
        name: ``"baron_human"``, ``"baron_mouse"`` or ``"pbmc68k"``.
        backed: open the file read-only in backed mode instead of loading it into memory.
    """
    import anndata as ad

    path = example_path(name)
    with resources.as_file(path) as p:
        return ad.read_h5ad(p, backed="r" if backed else None)
