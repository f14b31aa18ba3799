"""Running a saved model over an AnnData: the one path every task (annotate, embed, perturb, in silico) uses.

* :func:`load_model_and_tokenizer` resolves a folder or Hub repo written by ``hf-scfm pretrain`` / ``finetune``
  (a full model, a merged model, or a PEFT adapter over a base model) and returns the model in eval mode with
  the tokenizer saved beside it, checked to match (a mismatched pair would map genes to the wrong rows).
* :func:`iter_model_outputs` tokenizes the cells ``batch_size`` at a time (so memory does not grow with the
  number of cells), runs the model without gradients and yields each batch's slice, inputs and outputs, with a
  tqdm bar. Sentences are padded per batch only (to the longest cell of the batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["load_model_and_tokenizer", "read_cells", "result_target", "iter_model_outputs"]

#: What :func:`load_model_and_tokenizer` may return: the backbone, the classifier, or whatever class was saved.
KINDS = ("base", "classifier", "saved")


def load_model_and_tokenizer(model: str | Path, kind: str = "saved", device: str | None = None):
    """Load ``(model, tokenizer)`` from a folder or Hub repo id.

    Args:
        model: a folder written by ``save_pretrained`` / ``hf-scfm pretrain`` / ``hf-scfm finetune`` (a full
            model, a merged model or a PEFT adapter folder), or a Hub repo id.
        kind: ``"saved"`` the class recorded in ``config.json`` (``architectures``); ``"classifier"`` the
            family's ``...ForSequenceClassification`` (adapters are loaded onto their base and merged);
            ``"base"`` the family's backbone (``...Model``: hidden states and ``cell_embedding``), from any
            checkpoint of the family, heads dropped.
        device: where to put the model (default: CUDA when available, else CPU).
    """
    import torch

    from ..modeling.configuration_utils import check_tokenizer_matches
    from ..tokenization import GeneTokenizer
    from ..training.families import family_of_config
    from ..training.finetune import LABEL_MAP_FILE, load_finetuned, resolve_checkpoint

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {KINDS}.")
    path = Path(model)
    if path.is_dir() and not (path / "config.json").exists():
        if not (path / "adapter_config.json").exists():
            raise FileNotFoundError(f"{path} has neither config.json (a model) nor adapter_config.json (a PEFT "
                                    "adapter). Pass the folder written by hf-scfm pretrain/finetune.")
        if not (path / LABEL_MAP_FILE).exists():
            raise FileNotFoundError(f"{path} is a PEFT adapter without {LABEL_MAP_FILE}; it was not written by "
                                    "hf-scfm finetune.")
        peft_model = load_finetuned(path)
        net = peft_model.merge_and_unload()
        tokenizer = GeneTokenizer.from_pretrained(str(path))
        if kind == "base":
            net = net.base_model
    else:
        from transformers import AutoConfig

        from ..training.finetune import quiet_load_report

        path, _, family = resolve_checkpoint(str(model))
        tokenizer = GeneTokenizer.from_pretrained(str(path))
        saved = (AutoConfig.from_pretrained(path).architectures or [family.model_class])[0]
        if kind == "base":
            with quiet_load_report():  # the heads a backbone drops are expected
                net = family.get(family.model_class).from_pretrained(path)
        elif kind == "classifier":
            if saved != family.classification_class:
                raise ValueError(f"{model} holds a {saved}, not a fine-tuned {family.classification_class}; "
                                 "train one with `hf-scfm finetune --model ... --label-key ...`.")
            net = load_finetuned(path)
        else:
            net = family.get(saved).from_pretrained(path)
    family_of_config(net.config, source=str(model))
    check_tokenizer_matches(net.config, tokenizer)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return net.to(device).eval(), tokenizer


def read_cells(cells, *, source: str = "the query"):
    """An in-memory AnnData from an AnnData or an ``.h5ad`` path, with a clear error for anything else."""
    import anndata as ad

    if isinstance(cells, ad.AnnData):
        return cells.to_memory() if cells.isbacked else cells
    if isinstance(cells, (str, Path)):
        from ..tokenization.anndata_io import read_h5ad

        return read_h5ad(cells, backed=False)
    raise TypeError(f"{source}: expected an AnnData or an .h5ad path, got {type(cells).__name__}.")


def result_target(query, copy: bool, *, source: str = "the query"):
    """``(adata, return it)``: where a task writes its results, scanpy's way. An AnnData is written in place (and
    the task returns None), or with ``copy`` a copy of it is (and returned); an ``.h5ad`` path is read into a new
    AnnData, which is returned. A backed AnnData cannot take results in place: pass ``copy=True``."""
    import anndata as ad

    if isinstance(query, ad.AnnData):
        if query.isbacked and not copy:
            raise ValueError(f"{source} is a backed AnnData, which cannot take results in place: pass copy=True (the "
                             "results go into an in-memory copy, returned), or load it with adata.to_memory().")
        return (query.to_memory() if query.isbacked else query.copy()) if copy else query, copy
    return read_cells(query, source=source), True


def iter_model_outputs(model, tokenizer, adata, *, batch_size: int = 64, max_length: int | None = None,
                       layer: str | None = None, progress: bool = True, desc: str = "cells",
                       **forward_kwargs: Any) -> Iterator[tuple]:
    """Yield ``(cell_slice, inputs, outputs)`` per batch of cells, in order, under ``torch.no_grad()``.

    ``inputs`` is the tokenized batch (tensors on the model's device); ``outputs`` the model's ``ModelOutput``.
    ``layer``: read the counts from ``adata.layers[layer]`` instead of ``X``. Extra keyword arguments go to
    ``model.forward`` (e.g. ``output_hidden_states=True``).
    """
    import torch
    from tqdm.auto import tqdm

    if adata.n_obs == 0:
        raise ValueError("The query has no cells.")
    device = next(model.parameters()).device
    bar = tqdm(total=adata.n_obs, desc=desc, unit="cell", disable=not progress)
    try:
        for start in range(0, adata.n_obs, batch_size):
            rows = slice(start, min(start + batch_size, adata.n_obs))
            enc = tokenizer(adata[rows], max_length=max_length, padding=True, truncation=True, return_tensors="pt",
                            layer=layer)
            inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "values", "attention_mask")}
            with torch.no_grad():
                outputs = model(**inputs, **forward_kwargs)
            bar.update(rows.stop - rows.start)
            yield rows, inputs, outputs
    finally:
        bar.close()
