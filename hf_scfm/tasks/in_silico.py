"""In silico perturbation (Geneformer-style) for rank-encoded cell sentences (Mouse-GeneMamba).

A rank-encoded cell is a sentence ``<bos> g1 g2 ... gn <eos>`` of its genes from most to least expressed
(relative to each gene's median). Perturbing a gene edits that sentence, the tokenizer's own output, not the
counts:

* ``mode="delete"``: the gene's token (and its value) is removed. Cells whose sentence does not hold the gene
  (not expressed, or ranked beyond ``max_length``) are skipped and counted.
* ``mode="overexpress"``: the gene's token moves to the front, right after the prefix (``<bos>``), keeping its
  value. A cell whose sentence lacks the gene gets it inserted there, with the value of the cell's top gene (it
  is now the top gene); if that makes the sentence longer than ``max_length``, its last gene is dropped, as
  Geneformer re-truncates to the model's input size.

The model runs on the original and the perturbed sentences. Reported:

* per cell: the cosine similarity of the cell embedding before and after, and ``shift = 1 - cosine``;
* per perturbed gene and other gene: the cosine similarity of that other gene's final hidden state (its context
  embedding) before and after, averaged over the perturbed cells whose two sentences both hold it, sorted by
  ``shift`` (largest first): which genes "move" most. (A causal model's states before the edited position do
  not change, so in delete mode genes ranked above the deleted one have shift 0.)

Deletion is defined for any encoding; overexpression ("move to the front") only means something for the rank
encoding, where position is expression order, so it raises for the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["InSilicoResult", "in_silico_perturb", "perturb_sentence"]

MODES = ("delete", "overexpress")


@dataclass
class InSilicoResult:
    """Tables of :func:`in_silico_perturb`.

    ``cells``: one row per (perturbed gene, perturbed cell): ``cell``, ``perturbed_gene``, ``perturbed_symbol``,
    ``in_sentence`` (the gene was in the original sentence), ``cosine_similarity``, ``shift``.
    ``genes``: one row per (perturbed gene, other gene): ``perturbed_gene``, ``gene_id``, ``symbol``,
    ``cosine_similarity`` (mean over cells), ``shift`` (1 - that), ``n_cells``; sorted by shift, largest first.
    ``summary``: one row per perturbed gene: ``n_cells`` perturbed, ``n_skipped`` (delete: cells without the
    gene), ``mean_cell_shift``.
    """

    cells: object
    genes: object
    summary: object


def perturb_sentence(ids, values, token_id: int, mode: str, *, n_prefix: int, n_suffix: int,
                     max_length: int | None = None):
    """The perturbed ``(ids, values)`` lists of one sentence, or ``None`` when ``mode="delete"`` and the gene
    is absent (see the module docstring). ``n_prefix``/``n_suffix``: special tokens at the ends."""
    ids, values = list(ids), list(values)
    present = token_id in ids
    if mode == "delete":
        if not present:
            return None
        pos = ids.index(token_id)
        return ids[:pos] + ids[pos + 1:], values[:pos] + values[pos + 1:]
    if mode != "overexpress":
        raise ValueError(f"mode={mode!r}: choose one of {MODES}.")
    if present:
        pos = ids.index(token_id)
        value = values[pos]
        ids, values = ids[:pos] + ids[pos + 1:], values[:pos] + values[pos + 1:]
    else:
        if len(ids) <= n_prefix + n_suffix:
            return None  # a cell without genes has no top gene to take the place of
        value = values[n_prefix]
    ids = ids[:n_prefix] + [token_id] + ids[n_prefix:]
    values = values[:n_prefix] + [value] + values[n_prefix:]
    if max_length is not None and len(ids) > max_length:
        cut = len(ids) - n_suffix - 1  # the last gene
        ids, values = ids[:cut] + ids[cut + 1:], values[:cut] + values[cut + 1:]
    return ids, values


def _forward(model, sentences, device):
    """``(cell_embedding [B, d], last_hidden_state [B, L, d])`` on CPU for right-padded ``(ids, values)``."""
    import torch

    length = max(len(ids) for ids, _ in sentences)
    input_ids = torch.zeros(len(sentences), length, dtype=torch.long)
    values = torch.zeros(len(sentences), length, dtype=torch.float32)
    mask = torch.zeros(len(sentences), length, dtype=torch.long)
    for i, (ids, vals) in enumerate(sentences):
        input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        values[i, : len(ids)] = torch.as_tensor(vals, dtype=torch.float32)
        mask[i, : len(ids)] = 1
    with torch.no_grad():
        out = model(input_ids=input_ids.to(device), values=values.to(device), attention_mask=mask.to(device),
                    return_dict=True)
    if getattr(out, "cell_embedding", None) is None or getattr(out, "last_hidden_state", None) is None:
        raise ValueError(f"{type(model).__name__} returns no cell_embedding/last_hidden_state; pass the model "
                         "folder (loaded as the backbone) or the backbone itself.")
    return out.cell_embedding.float().cpu(), out.last_hidden_state.float().cpu()


def _gene_tokens(tokenizer, genes) -> tuple[list[int], list[str]]:
    """Token ids of ``genes`` (Ensembl IDs or symbols) with a clear error for any outside the vocabulary."""
    from ..tokenization import load_gene_table, map_genes

    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        raise ValueError("Pass at least one gene to perturb.")
    table = load_gene_table(tokenizer.species) if getattr(tokenizer, "species", None) else None
    token_ids, report = map_genes(genes, tokenizer.get_vocab(), table)
    missing = [g for g, t in zip(genes, token_ids) if t < 0]
    if missing:
        raise ValueError(f"Gene(s) {missing} are not in the model's vocabulary ({len(tokenizer.genes)} genes, "
                         f"{tokenizer.species or 'custom'}): {[report.unmatched.get(g, '') for g in missing]}. "
                         "Pass Ensembl IDs or symbols of genes the model was trained on.")
    return [int(t) for t in token_ids], genes


def in_silico_perturb(model, adata, genes, *, tokenizer=None, mode: str = "delete", batch_size: int = 64,
                      max_length: int | None = None, device: str | None = None, progress: bool = False):
    """Perturb each of ``genes`` in every cell of ``adata`` and measure the embedding shifts.

    Args:
        model: a model folder / Hub id (loaded as the family's backbone), or a loaded backbone (pass ``tokenizer``).
        adata: AnnData of raw counts or an ``.h5ad`` path.
        genes: a gene (Ensembl ID or symbol) or a list of them, each perturbed on its own.
        mode: ``"delete"`` or ``"overexpress"`` (module docstring).
        max_length: tokens per sentence (default: the tokenizer's); overexpression keeps sentences within it.

    Returns an :class:`InSilicoResult`. Raises ``ValueError`` for a gene outside the vocabulary, and in delete
    mode for a gene in none of the cells' sentences.
    """
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    from ..tokenization.special_tokens import SPECIAL_TOKENS
    from .embedding import _resolve
    from .inference import read_cells

    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}.")
    model, tokenizer = _resolve(model, tokenizer, device)
    if mode == "overexpress" and tokenizer.encoding != "rank":
        raise ValueError(f"Overexpression moves the gene to the front of a rank-ordered sentence; this model's "
                         f"tokenizer uses the {tokenizer.encoding!r} encoding, where order is not expression. "
                         "Use mode='delete', or a rank-encoded model (Mouse-GeneMamba).")
    adata = read_cells(adata)
    if adata.n_obs == 0:
        raise ValueError("The query has no cells.")
    token_ids, names = _gene_tokens(tokenizer, genes)
    if len(set(token_ids)) != len(token_ids):
        raise ValueError(f"Genes {names} name the same vocabulary gene more than once; list each gene once.")
    max_length = int(max_length or tokenizer.model_max_length)
    n_prefix, n_suffix = len(tokenizer.prefix_tokens), len(tokenizer.suffix_tokens)
    dev = next(model.parameters()).device
    first_gene = len(SPECIAL_TOKENS)
    symbols = _symbols(tokenizer)

    vocab = len(tokenizer)
    cos_sum = {t: torch.zeros(vocab, dtype=torch.float64) for t in token_ids}
    cos_n = {t: torch.zeros(vocab, dtype=torch.int64) for t in token_ids}
    skipped = dict.fromkeys(token_ids, 0)
    cell_rows = []
    bar = tqdm(total=adata.n_obs, desc=f"in silico {mode}", unit="cell", disable=not progress)
    for start in range(0, adata.n_obs, batch_size):
        rows = range(start, min(start + batch_size, adata.n_obs))
        enc = tokenizer(adata[start: rows.stop], max_length=max_length, padding=False, truncation=True)
        original = list(zip(enc["input_ids"], enc["values"]))
        emb_o, hid_o = _forward(model, original, dev)
        for t, name in zip(token_ids, names):
            cells, sentences = [], []
            for i, (ids, vals) in enumerate(original):
                new = perturb_sentence(ids, vals, t, mode, n_prefix=n_prefix, n_suffix=n_suffix,
                                       max_length=max_length)
                if new is None:
                    skipped[t] += 1
                else:
                    cells.append(i)
                    sentences.append(new)
            if not cells:
                continue
            emb_p, hid_p = _forward(model, sentences, dev)
            cos = torch.nn.functional.cosine_similarity(emb_o[cells].double(), emb_p.double(), dim=-1)
            for j, i in enumerate(cells):
                cell_rows.append((adata.obs_names[rows[i]], name, symbols.get(t, ""),
                                  t in original[i][0], float(cos[j])))
                ids_o = np.asarray(original[i][0])
                ids_p = np.asarray(sentences[j][0])
                pos_p = np.nonzero((ids_p >= first_gene) & (ids_p != t))[0]
                order = np.argsort(ids_o, kind="stable")
                pos_o = order[np.searchsorted(ids_o[order], ids_p[pos_p])]
                gene_cos = torch.nn.functional.cosine_similarity(hid_o[i, pos_o].double(), hid_p[j, pos_p].double(),
                                                                 dim=-1)
                index = torch.as_tensor(ids_p[pos_p], dtype=torch.long)
                cos_sum[t].index_add_(0, index, gene_cos)
                cos_n[t].index_add_(0, index, torch.ones(len(pos_p), dtype=torch.int64))
        bar.update(len(rows))
    bar.close()

    cells_df = pd.DataFrame(cell_rows, columns=["cell", "perturbed_gene", "perturbed_symbol", "in_sentence",
                                                "cosine_similarity"])
    cells_df["shift"] = 1.0 - cells_df["cosine_similarity"]
    if mode == "delete":
        absent = [name for t, name in zip(token_ids, names) if skipped[t] == adata.n_obs]
        if absent:
            raise ValueError(f"Gene(s) {absent} are in none of the {adata.n_obs} cells' sentences (not expressed, "
                             f"or ranked beyond max_length={max_length}); nothing to delete.")
    gene_frames, summary = [], []
    genes_of_vocab = tokenizer.genes
    for t, name in zip(token_ids, names):
        seen = torch.nonzero(cos_n[t]).squeeze(-1)
        mean = (cos_sum[t][seen] / cos_n[t][seen]).numpy()
        frame = pd.DataFrame({
            "perturbed_gene": name,
            "gene_id": [genes_of_vocab[int(s) - first_gene] for s in seen],
            "symbol": [symbols.get(int(s), "") for s in seen],
            "cosine_similarity": mean,
            "shift": 1.0 - mean,
            "n_cells": cos_n[t][seen].numpy(),
        })
        gene_frames.append(frame.sort_values("shift", ascending=False, kind="stable"))
        mine = cells_df[cells_df["perturbed_gene"] == name]
        summary.append({"perturbed_gene": name, "symbol": symbols.get(t, ""), "n_cells": len(mine),
                        "n_skipped": skipped[t], "mean_cell_shift": float(mine["shift"].mean()) if len(mine) else np.nan})
    genes_df = pd.concat(gene_frames, ignore_index=True)
    return InSilicoResult(cells=cells_df, genes=genes_df, summary=pd.DataFrame(summary))


def _symbols(tokenizer) -> dict[int, str]:
    """token id -> gene symbol (empty when the tokenizer has no species)."""
    from ..tokenization import load_gene_table
    from ..tokenization.special_tokens import SPECIAL_TOKENS

    if not getattr(tokenizer, "species", None):
        return {}
    table = load_gene_table(tokenizer.species)
    return {i + len(SPECIAL_TOKENS): table.symbols[table.id_index[g]]
            for i, g in enumerate(tokenizer.genes) if g in table.id_index}

