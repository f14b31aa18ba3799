"""Rebuild the example datasets shipped in ``hf_scfm/data/examples/`` (run once by maintainers).

Sources (both MIT / BSD licensed, see hf_scfm/data/examples/ATTRIBUTION.md):
- ``came==0.1.13`` wheel, ``came/sample_data.zip``: Baron et al. 2016 pancreas, raw UMI counts.
  Get it with ``pip download --no-deps came==0.1.13`` and pass the wheel's path.
- scanpy's ``pbmc68k_reduced``: counts rebuilt as round(expm1(raw.X) * n_counts / 1e4).

Usage: python scripts/build_examples.py path/to/came-0.1.13-py3-none-any.whl
"""

import io
import sys
import zipfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

OUT = Path(__file__).resolve().parents[1] / "hf_scfm" / "data" / "examples"


def _write(adata: ad.AnnData, name: str) -> None:
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.X.sort_indices()
    path = OUT / f"{name}.h5ad"
    adata.write_h5ad(path, compression="gzip", compression_opts=9)
    print(f"{path}: {adata.n_obs} cells x {adata.n_vars} genes, {path.stat().st_size / 1e6:.1f} MB")


def baron(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as whl:
        inner = zipfile.ZipFile(io.BytesIO(whl.read("came/sample_data.zip")))
    for species, member in [("human", "raw-Baron_human.h5ad"), ("mouse", "raw-Baron_mouse.h5ad")]:
        src = ad.read_h5ad(io.BytesIO(inner.read(member)))
        obs = pd.DataFrame(index=src.obs_names.astype(str))
        obs["cell_type"] = src.obs["cell_ontology_class"].astype(str).astype("category").values
        obs["cell_ontology_id"] = src.obs["cell_ontology_id"].astype(str).astype("category").values
        obs["cell_type_fine"] = src.obs["cell_type1"].astype(str).astype("category").values
        obs["batch"] = src.obs["donor"].astype(str).astype("category").values
        obs["library"] = src.obs["library"].astype(str).astype("category").values
        var = pd.DataFrame(index=src.var_names.astype(str))
        var.index.name = "gene_symbol"
        adata = ad.AnnData(X=src.X, obs=obs, var=var)
        adata.uns["species"] = species
        adata.uns["gene_id_type"] = "symbol"
        adata.uns["source"] = "Baron et al. 2016 (GSE84133), via the came==0.1.13 wheel sample_data.zip (MIT)"
        _write(adata, f"baron_{species}")


def pbmc68k() -> None:
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    n_counts = src.obs["n_counts"].to_numpy(dtype=np.float64)[:, None]
    counts = np.rint(np.expm1(src.raw.X.toarray().astype(np.float64)) * n_counts / 1e4)
    obs = pd.DataFrame(index=src.obs_names.astype(str))
    obs["cell_type"] = src.obs["bulk_labels"].astype(str).astype("category").values
    obs["batch"] = pd.Categorical(["pbmc68k"] * src.n_obs)
    # Library size over the full transcriptome: only 765 genes are kept, so the per-cell total over
    # these genes is not the library size. The tokenizer uses obs["n_counts"] when present.
    obs["n_counts"] = src.obs["n_counts"].to_numpy(dtype=np.float32)
    var = pd.DataFrame(index=src.raw.var_names.astype(str))
    var.index.name = "gene_symbol"
    adata = ad.AnnData(X=counts.astype(np.float32), obs=obs, var=var)
    adata.uns["species"] = "human"
    adata.uns["gene_id_type"] = "symbol"
    adata.uns["source"] = (
        "Zheng et al. 2017 68k PBMCs, 700-cell subset shipped with scanpy as pbmc68k_reduced (BSD-3); "
        "counts rebuilt as round(expm1(raw.X) * n_counts / 1e4)"
    )
    _write(adata, "pbmc68k")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    baron(sys.argv[1])
    pbmc68k()
