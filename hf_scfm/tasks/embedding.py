"""Cell and gene embeddings of a model: ``hf-scfm embed`` (AnnData in, AnnData out).

* :func:`embed`: every cell's ``cell_embedding`` (the family's own readout: ``<cls>`` state for SC-MAMBA2 and
  CellFM, mean over real tokens or last token for Mouse-GeneMamba as its config says) in
  ``adata.obsm[f"X_{model_type}"]`` (float32), e.g. ``X_scmamba2``.
* :func:`gene_embeddings`: a ``pandas.DataFrame`` indexed by gene ID (unversioned Ensembl ID), with a ``symbol``
  column when the tokenizer knows its species, then ``dim_0 .. dim_{d-1}``:

  - ``kind="input"``: the rows of the input (gene) embedding table, one per vocabulary gene. The raw table rows,
    before any normalisation a family applies on lookup (SC-MAMBA2's LayerNorm), since that is the learned
    parameter itself.
  - ``kind="context"``: each gene's final hidden state (``last_hidden_state``) averaged over every cell of
    ``adata`` whose sentence holds the gene, with a ``count`` column (cells averaged); only genes seen. This is
    the contextual gene embedding of Geneformer/scGPT: it depends on the cells given.

* :func:`plot_umap`: scanpy neighbors + UMAP on the embedding, coloured by an obs column, saved as PNG.

Cells are run with :func:`hf_scfm.tasks.inference.iter_model_outputs` (the one batched, no-grad path), in batches
of cells of similar length (:func:`length_order`; results come back in the AnnData's order). One pass
gives both the cell embeddings and the context gene embeddings (:func:`embed` with ``gene_embeddings="context"``
writes both). Tokenization is deterministic (the tokenizer's seed), so repeated runs give identical embeddings.

:func:`embed` follows scanpy's convention, as every task here: it writes into the AnnData it is given and returns
``None``, or with ``copy=True`` writes into a copy and returns it. ``hf-scfm embed`` is :func:`embed_h5ad`
(:class:`EmbedArguments`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["EmbedArguments", "embed", "embed_h5ad", "embedding_key", "gene_embeddings", "length_order", "plot_umap"]

GENE_KINDS = ("input", "context")


def embedding_key(model) -> str:
    """``obsm`` key of a model's cell embeddings: ``X_<model_type>``."""
    return f"X_{model.config.model_type}"


def _resolve(model, tokenizer, device=None):
    """``(model, tokenizer)`` from a path/Hub id (loaded as the backbone) or an already loaded pair."""
    from .inference import load_model_and_tokenizer

    if isinstance(model, (str, Path)):
        if tokenizer is not None:
            raise ValueError("Pass tokenizer=... only with a loaded model; a folder brings its own tokenizer.")
        return load_model_and_tokenizer(model, kind="base", device=device)
    if tokenizer is None:
        raise ValueError("A loaded model needs its tokenizer: pass tokenizer=... (or pass the model folder).")
    from ..modeling.configuration_utils import check_tokenizer_matches

    check_tokenizer_matches(model.config, tokenizer)
    return model.eval(), tokenizer


def _gene_frame(tokenizer, token_ids: np.ndarray, vectors: np.ndarray, extra: dict | None = None):
    """DataFrame indexed by the gene IDs of ``token_ids`` (symbol column when the species is known)."""
    import pandas as pd

    from ..tokenization import load_gene_table
    from ..tokenization.special_tokens import SPECIAL_TOKENS

    genes = tokenizer.genes
    ids = [genes[int(t) - len(SPECIAL_TOKENS)] for t in token_ids]
    columns = {}
    if getattr(tokenizer, "species", None):
        table = load_gene_table(tokenizer.species)
        columns["symbol"] = [table.symbols[table.id_index[g]] if g in table.id_index else "" for g in ids]
    columns.update(extra or {})
    frame = pd.DataFrame(columns, index=pd.Index(ids, name="gene_id"))
    dims = pd.DataFrame(vectors, index=frame.index, columns=[f"dim_{i}" for i in range(vectors.shape[1])])
    return pd.concat([frame, dims], axis=1)


def _input_gene_embeddings(model, tokenizer):
    from ..tokenization.special_tokens import SPECIAL_TOKENS

    weight = model.get_input_embeddings().weight.detach().float().cpu().numpy()
    token_ids = np.arange(len(SPECIAL_TOKENS), len(tokenizer))
    return _gene_frame(tokenizer, token_ids, weight[token_ids])


def length_order(adata, layer: str | None = None) -> np.ndarray:
    """Row indices of ``adata`` from the most to the fewest expressed genes (a stable sort): batches cut from this
    order hold cells of similar sentence length, so they are padded little (the sentence of a cell is its
    expressed genes, up to ``max_length``)."""
    import scipy.sparse as sp

    X = adata.X if layer is None else adata.layers[layer]
    if sp.issparse(X):
        nnz = np.diff(sp.csr_matrix(X).indptr)  # no copy for CSR input
    else:
        nnz = np.count_nonzero(np.asarray(X), axis=1)
    return np.argsort(-np.asarray(nnz).ravel(), kind="stable")


def _run(model, tokenizer, adata, *, context: bool, batch_size: int, max_length: int | None, progress: bool,
         layer: str | None = None, group_by_length: bool = True):
    """One pass over the cells: ``(cell_embeddings [N, d] float32, context gene frame or None)``.

    With ``group_by_length`` the cells are run in :func:`length_order` (results written back in ``adata``'s
    order): each batch is padded to its longest cell only, and the models mask padding exactly, so every cell's
    embedding is what it gets alone."""
    import torch

    from ..tokenization.special_tokens import SPECIAL_TOKENS
    from .inference import iter_model_outputs

    order = length_order(adata, layer) if group_by_length and adata.n_obs > batch_size else None
    source = adata if order is None else adata[order]
    cells = None
    sums = counts = None
    for rows, inputs, out in iter_model_outputs(model, tokenizer, source, batch_size=batch_size,
                                                max_length=max_length, layer=layer, progress=progress,
                                                desc="embedding"):
        if order is not None:
            rows = order[rows]
        emb = getattr(out, "cell_embedding", None)
        if emb is None:
            raise ValueError(f"{type(model).__name__} returns no cell_embedding; pass a model folder (loaded as "
                             "the family's backbone) or the backbone itself.")
        if cells is None:
            cells = np.zeros((adata.n_obs, emb.shape[-1]), dtype=np.float32)
        cells[rows] = emb.float().cpu().numpy()
        if context:
            hidden = getattr(out, "last_hidden_state", None)
            if hidden is None:
                raise ValueError(f"{type(model).__name__} returns no last_hidden_state; context gene embeddings "
                                 "need the backbone (pass the model folder).")
            if sums is None:
                sums = torch.zeros(len(tokenizer), hidden.shape[-1], dtype=torch.float64)
                counts = torch.zeros(len(tokenizer), dtype=torch.int64)
            ids = inputs["input_ids"].cpu()
            keep = (inputs["attention_mask"].cpu() == 1) & (ids >= len(SPECIAL_TOKENS))
            sums.index_add_(0, ids[keep], hidden.cpu()[keep].double())
            counts.index_add_(0, ids[keep], torch.ones(int(keep.sum()), dtype=torch.int64))
    genes = None
    if context:
        seen = torch.nonzero(counts).squeeze(-1)
        mean = (sums[seen] / counts[seen, None]).float().numpy()
        genes = _gene_frame(tokenizer, seen.numpy(), mean, {"count": counts[seen].numpy()})
    return cells, genes


def embed(model, query, *, tokenizer=None, batch_size: int = 64, max_length: int | None = None,
          gene_embeddings: str | None = None, layer: str | None = None, progress: bool = True,
          device: str | None = None, copy: bool = False, group_by_length: bool = True):
    """Cell embeddings of ``query`` in ``obsm["X_<model_type>"]``, scanpy-style: written into the AnnData and
    ``None`` returned, or with ``copy=True`` into a copy, which is returned (an ``.h5ad`` path is read into a new
    AnnData, which is returned).

    Also written: ``uns["X_<model_type>_params"]`` (model type, batch size, max length) and, with
    ``gene_embeddings``, ``uns["X_<model_type>_gene_embeddings"]``: the :func:`gene_embeddings` DataFrame of that
    kind (``"context"`` is computed in the same pass over the cells).

    Args:
        model: a model folder / Hub id (loaded with ``load_model_and_tokenizer(kind="base")``), or a loaded
            hf-scfm model whose outputs carry ``cell_embedding`` (then pass ``tokenizer``).
        query: AnnData of raw counts or an ``.h5ad`` path.
        gene_embeddings: ``None``, ``"input"`` or ``"context"``.
        max_length: tokens per cell (default: the tokenizer's).
        layer: read the counts from ``adata.layers[layer]`` instead of ``X``.
        copy: write into a copy of ``query`` and return it.
        group_by_length: run the cells in batches of similar length (:func:`length_order`; less padding, the
            same embeddings); ``False`` runs them in ``query``'s order.
    """
    from .inference import check_finite_outputs, result_target

    if gene_embeddings not in (None, *GENE_KINDS):
        raise ValueError(f"gene_embeddings={gene_embeddings!r}: choose None, 'input' or 'context'.")
    model, tokenizer = _resolve(model, tokenizer, device)
    adata, returned = result_target(query, copy)
    cells, genes = _run(model, tokenizer, adata, context=gene_embeddings == "context", batch_size=batch_size,
                        max_length=max_length, layer=layer, progress=progress, group_by_length=group_by_length)
    check_finite_outputs(cells, adata.obs_names, "cell embedding")
    key = embedding_key(model)
    adata.obsm[key] = cells
    adata.uns[f"{key}_params"] = {"model_type": model.config.model_type, "batch_size": int(batch_size),
                                  "max_length": int(max_length or tokenizer.model_max_length)}
    if gene_embeddings == "input":
        genes = _input_gene_embeddings(model, tokenizer)
    if genes is not None:
        adata.uns[f"{key}_gene_embeddings"] = genes
    return adata if returned else None


def gene_embeddings(model, *, tokenizer=None, kind: str = "input", adata=None, batch_size: int = 64,
                    max_length: int | None = None, progress: bool = True, device: str | None = None):
    """Gene embeddings as a DataFrame indexed by gene ID (see the module docstring for the two kinds).

    ``kind="context"`` needs ``adata`` (the cells to average over); ``"input"`` needs no cells.
    """
    if kind not in GENE_KINDS:
        raise ValueError(f"kind={kind!r}: choose 'input' (embedding table) or 'context' (mean hidden state).")
    model, tokenizer = _resolve(model, tokenizer, device)
    if kind == "input":
        return _input_gene_embeddings(model, tokenizer)
    if adata is None:
        raise ValueError("kind='context' averages each gene's hidden state over cells: pass adata=... .")
    from .inference import read_cells

    return _run(model, tokenizer, read_cells(adata), context=True, batch_size=batch_size, max_length=max_length,
                progress=progress)[1]


def plot_umap(adata, key: str, path: str | Path, *, color: str | None = None, seed: int = 0) -> Path:
    """scanpy ``neighbors`` (on ``obsm[key]``) + ``umap``, coloured by ``obs[color]``, saved as a PNG.

    The UMAP coordinates are stored in ``adata.obsm[f"{key}_umap"]``; the neighbour graph is computed on a
    scratch copy so the AnnData does not grow a graph per model.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import scanpy as sc
    except ImportError as err:
        raise ImportError("The UMAP plot needs scanpy and matplotlib: pip install 'hf-scfm[plots]' "
                          "(or skip the plot with --no-umap).") from err
    import anndata as ad

    if key not in adata.obsm:
        raise ValueError(f"No embedding {key!r} in obsm (keys: {list(adata.obsm.keys())}); run embed first.")
    if color is not None and color not in adata.obs.columns:
        raise ValueError(f"No obs column {color!r} to colour the UMAP by (columns: {list(adata.obs.columns)}).")
    if adata.n_obs < 4:
        raise ValueError(f"A UMAP needs >= 4 cells, got {adata.n_obs}.")
    scratch = ad.AnnData(np.zeros((adata.n_obs, 0), dtype=np.float32), obs=adata.obs[[color]] if color else None,
                         obsm={key: np.asarray(adata.obsm[key])})
    scratch.obs_names = adata.obs_names
    sc.pp.neighbors(scratch, use_rep=key, n_neighbors=min(15, adata.n_obs - 1), random_state=seed)
    sc.tl.umap(scratch, random_state=seed)
    adata.obsm[f"{key}_umap"] = scratch.obsm["X_umap"]
    fig = sc.pl.umap(scratch, color=color, show=False, return_fig=True, title=f"{key} ({color or 'cells'})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_gene_embeddings(frame, path_stem: Path) -> Path:
    """Parquet (``pyarrow``, a ``datasets`` dependency) or CSV when pyarrow is missing; never pickle."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        path = path_stem.with_suffix(".csv")
        frame.to_csv(path)
        return path
    path = path_stem.with_suffix(".parquet")
    frame.to_parquet(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class EmbedArguments:
    """What ``hf-scfm embed`` takes: an h5ad in; the h5ad with embeddings, a UMAP PNG and gene embeddings out."""

    model: str = field(metadata={"metavar": "DIR_OR_REPO", "help": "a checkpoint of any hf-scfm family"})
    query: str = field(metadata={"metavar": "H5AD", "help": "cells to embed (raw counts)"})
    out: str = field(metadata={"metavar": "H5AD", "help": "output .h5ad (embeddings in obsm)"})
    color: str | None = field(default=None, metadata={"metavar": "OBS_KEY", "help": "obs column colouring the UMAP"})
    umap: bool = field(default=True, metadata={"help": "write <out stem>_umap.png (default) or --no-umap"})
    gene_embeddings: str | None = field(default=None, metadata={
        "choices": list(GENE_KINDS), "help": "also write gene embeddings (Parquet): the input table or "
                                             "context-averaged over the query"})
    batch_size: int = field(default=64, metadata={"help": "cells per forward pass"})
    max_length: int | None = field(default=None, metadata={"help": "tokens per cell (default: the tokenizer's)"})
    layer: str | None = field(default=None, metadata={"help": "read counts from adata.layers[LAYER] instead of X"})
    seed: int = field(default=0, metadata={"help": "UMAP seed"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (--no-progress: none)"})

    def __post_init__(self):
        if Path(self.out).suffix != ".h5ad":
            raise ValueError(f"--out {self.out} must end in .h5ad")


def embed_h5ad(args: EmbedArguments):
    """``hf-scfm embed``: embed ``args.query`` (an .h5ad) and write ``args.out``, the UMAP PNG and the gene
    embeddings (Parquet, taken out of ``uns``); prints what it wrote and returns the AnnData."""
    out = Path(args.out)
    model, tokenizer = _resolve(args.model, None)
    adata = embed(model, args.query, tokenizer=tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                  gene_embeddings=args.gene_embeddings, layer=args.layer, progress=args.progress)
    key = embedding_key(model)
    written = []
    if args.umap:
        written.append(plot_umap(adata, key, out.with_name(f"{out.stem}_umap.png"), color=args.color, seed=args.seed))
    genes = adata.uns.pop(f"{key}_gene_embeddings", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out)
    written.insert(0, out)
    if genes is not None:
        written.append(write_gene_embeddings(genes, out.with_name(f"{out.stem}_gene_embeddings_{args.gene_embeddings}")))
    print(f"Embedded {adata.n_obs} cells into obsm[{key!r}] ({adata.obsm[key].shape[1]} dims). Wrote:")
    for path in written:
        print(f"  {path}")
    return adata
