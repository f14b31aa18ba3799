"""Collators: turn lists of cell records into padded model batches, one class per objective.

A *record* is a mapping with a variable-length ``input_ids`` (ints) and, for every objective that
reads expression, a ``values`` of the same length (floats), as lists or NumPy arrays: exactly what a
corpus shard holds (``{input_ids, values, length, <obs columns>, source_file}``) or what
``GeneTokenizer(..., padding=False)`` returns per cell. A record may also carry an ``attention_mask``
(1 = real token); without one every position is real. Instead of a list of records a collator also
takes a *columnar* batch: a mapping of per-cell lists, or a ``pyarrow.Table`` as yielded by
``ds.with_format("arrow").iter(batch_size)``; Arrow batches skip per-cell Python objects and are
the fastest way from a streamed corpus to tensors: :func:`hf_scfm.data.streaming.iter_batches` does
exactly that (``benchmarks/corpus.py`` measures both ways). Reading and padding a batch in any of
these forms is :mod:`hf_scfm.data.batching`.

Every collator returns a ``dict`` of torch tensors: ``input_ids`` int64 [B, L], ``values`` float32
[B, L], ``attention_mask`` int64 [B, L], padded on the RIGHT with ``<pad>`` (id 0) and value 0.0 to
the longest cell of the batch (rounded up to ``pad_to_multiple_of`` when given), plus the objective's
targets, following the contracts the models consume:

=============================================  ===================================================
:class:`DataCollatorForNextGene`               ``labels`` = ``input_ids``, padding -> -100
:class:`DataCollatorForGeneMLM`                15 % of gene tokens chosen; 80 % ``<mask>``, 10 %
                                               random gene, 10 % kept; ``labels`` -100 elsewhere
:class:`DataCollatorForMaskedExpression`       a fraction of gene values -> ``MASK_VALUE`` in
                                               ``values``; float ``labels`` = original bins there,
                                               -100.0 elsewhere
:class:`DataCollatorForMaskedRegression`       as above on continuous values, 20 % (CellFM)
:class:`DataCollatorForCellClassification`     ``labels`` int64 [B] through a ``label2id`` map
:class:`DataCollatorForPerturbation`           control ``values``, ``perturbation_flags``, float
                                               ``labels`` = perturbed-cell values
=============================================  ===================================================

Which positions are masked is one rule, :mod:`hf_scfm.data.masking`: only gene tokens (never ``<pad>``,
``<mask>``, ``<cls>``, ``<eos>``, ``<unk>``, ``<bos>``), exactly ``floor(fraction * n + 0.5)`` of a cell's ``n``
genes (at least one), drawn from ``(seed, epoch, the cell's content)`` only: the same cell gets the same mask in
any batch, padding, worker or machine, and the same seed reproduces the same batches. For fresh masks each epoch
(dynamic masking) call ``collator.set_epoch(epoch)``, e.g. from a ``TrainerCallback.on_epoch_begin``. The mask
defaults (``default_fraction`` of each masked-value collator, ``mlm_probability``) are the class attributes and
arguments below.

Every collator is a plain picklable object holding no torch generator, so DataLoader workers can use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..tokenization.special_tokens import IGNORE_INDEX, MASK_TOKEN_ID, MASK_VALUE, PAD_TOKEN_ID, SPECIAL_VALUE
from . import masking
from .batching import Cells, FlatBatch, empty_outputs, flatten, pad_flat, to_torch
from .masking import FIRST_GENE_ID

__all__ = [
    "DataCollatorForNextGene",
    "DataCollatorForGeneMLM",
    "DataCollatorForMaskedExpression",
    "DataCollatorForMaskedRegression",
    "DataCollatorForCellClassification",
    "DataCollatorForPerturbation",
]


def _check_fraction(fraction, name: str) -> tuple[float, float]:
    lo, hi = (fraction, fraction) if np.isscalar(fraction) else tuple(fraction)
    if not (0.0 < lo <= hi <= 1.0):
        raise ValueError(f"{name} must be a fraction in (0, 1] or a (low, high) range inside it, got {fraction!r}.")
    return float(lo), float(hi)


class _SeededCollator:
    """Shared seeding and padding: subclasses implement :meth:`_collate` (records -> dict of NumPy arrays)."""

    needs_values = True

    def __init__(self, *, seed: int = 0, pad_to_multiple_of: int | None = None):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of}.")
        self.seed = int(seed)
        self.epoch = 0
        self.pad_to_multiple_of = pad_to_multiple_of

    def set_epoch(self, epoch: int) -> None:
        """Change the masks drawn from now on (the epoch is part of every cell's random stream)."""
        self.epoch = int(epoch)

    def _flatten(self, records, extra_float_keys=()) -> FlatBatch:
        return flatten(records, need_values=self.needs_values, extra_float_keys=extra_float_keys)

    def _pad(self, records, extra_float_keys=()) -> dict[str, np.ndarray]:
        """Padded NumPy arrays of a batch (a list of records, a columnar batch, or a :class:`Cells`)."""
        return pad_flat(self._flatten(records, extra_float_keys), self.pad_to_multiple_of)

    def _choose(self, flat: FlatBatch, fraction: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        """``(chosen bool [N] over the flat tokens, cell keys uint64 [B])``: the masking rule, by the compiled
        kernel when numba is there, else by the reference on the padded batch."""
        if masking.compiled_kernels() is not None:
            return masking.choose_compiled(flat, fraction, self.seed, self.epoch)
        batch = pad_flat(flat, None)
        chosen, keys = masking.choose_reference(batch["input_ids"], batch.get("values"), batch["attention_mask"],
                                                fraction, self.seed, self.epoch)
        return chosen[np.arange(chosen.shape[1])[None, :] < flat.lengths[:, None]], keys

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return to_torch(self._collate(records))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


# ---------------------------------------------------------------------------------------------
# the objectives
# ---------------------------------------------------------------------------------------------
class DataCollatorForNextGene(_SeededCollator):
    """Next-gene prediction (Mouse-GeneMamba): ``labels`` = ``input_ids`` with padding set to -100.

    The causal model shifts the labels inside its forward, as every Hugging Face causal LM does, so
    the ``<bos>`` at position 0 is never a target and ``<eos>`` is (the model learns where a cell
    sentence ends). ``values`` are optional here (the "without expression" ablation needs none);
    when no record has them the batch has no ``values`` key. Nothing is random.
    """

    needs_values = False

    def __init__(self, *, pad_to_multiple_of: int | None = None):
        super().__init__(seed=0, pad_to_multiple_of=pad_to_multiple_of)

    def _collate(self, records):
        batch = self._pad(records)
        batch["labels"] = np.where(batch["attention_mask"] == 1, batch["input_ids"], IGNORE_INDEX)
        return batch


class DataCollatorForGeneMLM(_SeededCollator):
    """Gene masked-language modelling (BERT-style, the Mouse-GeneMamba MLM variant).

    In each cell exactly ``floor(mlm_probability * n_genes + 0.5)`` gene tokens (at least one) are
    chosen. Of the chosen, by a per-position draw: 80 % become ``<mask>``, 10 % a random gene token
    (uniform over ids ``6 .. vocab_size - 1``), 10 % stay unchanged. ``labels`` hold the original id
    at chosen positions and -100 elsewhere. ``values`` pass through untouched (the expression of a
    masked gene is still an input, as in the paper's expression-aware model).

    Args:
        tokenizer: a ``GeneTokenizer`` (only ``len(tokenizer)`` is read), or pass ``vocab_size``.
        vocab_size: size of the vocabulary; random replacements are drawn below it.
        mlm_probability: fraction of gene tokens chosen per cell (default 0.15).
        seed: random seed (see the module docstring: masks depend on seed, epoch and cell).
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    needs_values = False

    def __init__(self, tokenizer=None, *, vocab_size: int | None = None, mlm_probability: float = 0.15,
                 seed: int = 0, pad_to_multiple_of: int | None = None):
        super().__init__(seed=seed, pad_to_multiple_of=pad_to_multiple_of)
        if vocab_size is None:
            if tokenizer is None:
                raise ValueError("DataCollatorForGeneMLM needs the vocabulary size: pass tokenizer=... or vocab_size=....")
            vocab_size = len(tokenizer)
        if vocab_size <= FIRST_GENE_ID:
            raise ValueError(f"vocab_size must exceed the {FIRST_GENE_ID} special tokens, got {vocab_size}.")
        self.vocab_size = int(vocab_size)
        self.mlm_probability = _check_fraction(mlm_probability, "mlm_probability")[0]

    def _collate(self, records):
        flat = self._flatten(records)
        if flat.ids.size and flat.ids.max() >= self.vocab_size:
            raise ValueError(
                f"A record holds token id {int(flat.ids.max())} but vocab_size is {self.vocab_size}: the corpus was "
                "built with a different tokenizer. Use the tokenizer the corpus was built with."
            )
        chosen, keys = self._choose(flat, (self.mlm_probability, self.mlm_probability))
        where = np.flatnonzero(chosen)
        cell = np.searchsorted(flat.starts, where, side="right") - 1
        pos = where - flat.starts[cell]
        action = masking.uniforms(keys[cell], pos, self.seed, self.epoch, masking.MLM_ACTION_STREAM)
        draw = masking.uniforms(keys[cell], pos, self.seed, self.epoch, masking.MLM_RANDOM_GENE_STREAM)
        random_ids = FIRST_GENE_ID + np.floor(draw * (self.vocab_size - FIRST_GENE_ID)).astype(np.int64)
        labels = np.full(flat.ids.shape, IGNORE_INDEX, dtype=np.int64)
        labels[where] = flat.ids[where]
        ids = flat.ids.astype(np.int64)
        ids[where] = np.where(action < 0.8, MASK_TOKEN_ID, np.where(action < 0.9, random_ids, ids[where]))
        return pad_flat(flat, self.pad_to_multiple_of, input_ids=ids, labels=labels)


class _MaskedValueCollator(_SeededCollator):
    """Masks a fraction of gene values with ``MASK_VALUE``; float labels hold the originals."""

    default_fraction: float = 0.15

    def __init__(self, *, mask_fraction=None, seed: int = 0, pad_to_multiple_of: int | None = None):
        super().__init__(seed=seed, pad_to_multiple_of=pad_to_multiple_of)
        self.mask_fraction = self.default_fraction if mask_fraction is None else mask_fraction
        self._range = _check_fraction(self.mask_fraction, "mask_fraction")

    def _collate(self, records):
        flat = self._flatten(records)
        chosen, _ = self._choose(flat, self._range)
        if masking.compiled_kernels() is not None and flat.mask is None:  # one compiled pass writes all four outputs
            out = empty_outputs(flat.n, flat.padded_length(self.pad_to_multiple_of),
                                {"input_ids": np.int64, "attention_mask": np.int64, "values": np.float32,
                                 "labels": np.float32})
            return masking.pad_masked_compiled(flat, chosen, out, mask_value=MASK_VALUE, pad_id=PAD_TOKEN_ID,
                                               pad_value=SPECIAL_VALUE, ignore=IGNORE_INDEX)
        labels = np.where(chosen, flat.values, np.float32(IGNORE_INDEX))
        masked = np.where(chosen, np.float32(MASK_VALUE), flat.values)
        return pad_flat(flat, self.pad_to_multiple_of, values=masked, labels=labels)


class DataCollatorForMaskedExpression(_MaskedValueCollator):
    """Masked expression modelling on binned values (SC-MAMBA2).

    In each cell a fraction of the gene positions (``<cls>``, other specials and padding excluded)
    get ``values = MASK_VALUE`` (-1.0); the model swaps in its mask embedding there. ``labels``
    float32 [B, L] hold the original bin at masked positions and -100.0 elsewhere; the loss is MSE
    over ``labels != -100``. ``input_ids`` are untouched: the model knows which gene it predicts.

    Args:
        mask_fraction: fraction of gene positions masked per cell, or a ``(low, high)`` range from
            which each cell draws its own fraction (seeded, per cell). Default 0.4: the SPEC allows
            15-40 %; SC-MAMBA2 follows scGPT, whose masked-value training uses 0.4. Pass
            ``(0.15, 0.4)`` to spread cells over the whole range.
        seed: random seed (masks depend on seed, epoch and cell content only).
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    default_fraction = 0.4


class DataCollatorForMaskedRegression(_MaskedValueCollator):
    """Masked regression on continuous ``log1p`` values (CellFM): 20 % of real genes by default.

    Same output as :class:`DataCollatorForMaskedExpression`: masked ``values`` set to ``MASK_VALUE``,
    float32 ``labels`` with the original value at masked positions and -100.0 elsewhere.

    Args:
        mask_fraction: fraction of gene positions masked per cell, or a ``(low, high)`` range (default 0.2, as CellFM).
        seed: random seed (masks depend on seed, epoch and cell content only).
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    default_fraction = 0.2


class DataCollatorForCellClassification(_SeededCollator):
    """Cell classification: pads the cells and maps ``record[label_column]`` to ``labels`` int64 [B].

    The label map ``label2id`` is given, fitted with :meth:`fit` (sorted labels -> 0..K-1, so the same
    labels always give the same ids), or loaded with :meth:`from_config` / :meth:`load_label_map`.
    Save it with the model by :meth:`update_config` (sets ``config.label2id``, ``config.id2label``,
    ``config.num_labels``, which ``save_pretrained`` writes into ``config.json``) or as JSON with
    :meth:`save_label_map`. A label missing from the map raises a ``ValueError`` naming the label and
    the column (a cell type never seen in training cannot be scored). Without a map, integer labels
    pass through as ids.

    With the ``transformers.Trainer``, keep the label column in the batches: either set
    ``remove_unused_columns=False`` or name the column ``"label"`` (which the Trainer keeps).

    Args:
        label_column: the record key holding the label (an obs column written by the corpus builder).
        label2id: ``{label: id}``; ids must be 0..K-1.
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    def __init__(self, label_column: str = "cell_type", label2id: Mapping[Any, int] | None = None, *,
                 pad_to_multiple_of: int | None = None):
        super().__init__(seed=0, pad_to_multiple_of=pad_to_multiple_of)
        self.label_column = label_column
        self.label2id = None if label2id is None else self._checked_map(label2id)

    @staticmethod
    def _checked_map(label2id: Mapping[Any, int]) -> dict[Any, int]:
        mapping = {k: int(v) for k, v in label2id.items()}
        if sorted(mapping.values()) != list(range(len(mapping))):
            raise ValueError(f"label2id must map the labels onto 0..{len(mapping) - 1} exactly once each, got {mapping}.")
        return mapping

    @property
    def id2label(self) -> dict[int, Any]:
        if self.label2id is None:
            raise ValueError("No label map yet: pass label2id=..., call fit(labels), or load one (from_config / load_label_map).")
        return {i: label for label, i in self.label2id.items()}

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def fit(self, labels) -> DataCollatorForCellClassification:
        """Build ``label2id`` from the training labels (an iterable of labels, or a dataset/records
        holding ``label_column``): the sorted distinct labels get ids 0..K-1."""
        if hasattr(labels, "column_names"):
            if self.label_column not in labels.column_names:
                raise ValueError(f"Label column {self.label_column!r} not in the dataset (columns: {labels.column_names}).")
            labels = labels[self.label_column]
        labels = [lab[self.label_column] if isinstance(lab, Mapping) else lab for lab in labels]
        distinct = sorted({(x.item() if isinstance(x, np.generic) else x) for x in labels}, key=lambda x: (str(type(x)), x))
        if not distinct:
            raise ValueError("fit() got no labels.")
        self.label2id = {label: i for i, label in enumerate(distinct)}
        return self

    def update_config(self, config) -> None:
        """Write the label map into a model config (``label2id``, ``id2label``, ``num_labels``)."""
        config.num_labels = self.num_labels
        config.id2label = {i: str(label) for i, label in self.id2label.items()}
        config.label2id = {str(label): i for label, i in self.label2id.items()}

    @classmethod
    def from_config(cls, config, label_column: str = "cell_type", **kwargs) -> DataCollatorForCellClassification:
        """The collator for a fine-tuned model: the label map comes from ``config.id2label``."""
        id2label = getattr(config, "id2label", None)
        if not id2label:
            raise ValueError("The config has no id2label; it was not saved by a fine-tuned classifier.")
        return cls(label_column, {label: int(i) for i, label in id2label.items()}, **kwargs)

    def save_label_map(self, path: str | os.PathLike) -> None:
        """Write ``{"label_column": ..., "label2id": {...}}`` as JSON (labels as strings)."""
        if self.label2id is None:
            raise ValueError("No label map to save: pass label2id=... or call fit(labels) first.")
        payload = {"label_column": self.label_column, "label2id": {str(k): v for k, v in self.label2id.items()}}
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True)

    @classmethod
    def load_label_map(cls, path: str | os.PathLike, **kwargs) -> DataCollatorForCellClassification:
        """The collator whose label map was written by :meth:`save_label_map`."""
        with open(path, encoding="utf-8") as fh:
            payload = json.load(fh)
        return cls(payload["label_column"], payload["label2id"], **kwargs)

    def _label_id(self, label, index: int) -> int:
        if isinstance(label, np.generic):
            label = label.item()
        if self.label2id is None:
            if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and label >= 0:
                return int(label)
            raise ValueError(
                f"Label {label!r} in column {self.label_column!r} is not an integer id and there is no label map: "
                "pass label2id=..., or call fit(train_labels) first."
            )
        try:
            return self.label2id[label]
        except KeyError:
            key = str(label)
            if key in self.label2id:  # maps loaded from JSON / config have string keys
                return self.label2id[key]
            raise ValueError(
                f"Label {label!r} (record {index}) in column {self.label_column!r} was not seen in training; the model "
                f"knows {len(self.label2id)} labels: {sorted(map(str, self.label2id))}. Drop those cells or "
                "re-train with them."
            ) from None

    def _collate(self, records):
        cells = Cells(records)
        if not cells.has(self.label_column):
            i = cells.first_without(self.label_column)
            raise ValueError(
                f"Record {i} has no label column {self.label_column!r} (record keys: {cells.keys_of(i)}). Build the "
                "corpus with --obs-columns including it, or pass label_column=... naming the right column. With "
                "the Trainer, set remove_unused_columns=False (or name the column 'label')."
            )
        batch = self._pad(cells)
        labels = cells.column(self.label_column)
        batch["labels"] = np.array([self._label_id(label, i) for i, label in enumerate(labels)], dtype=np.int64)
        return batch


class DataCollatorForPerturbation(_SeededCollator):
    """Perturbation prediction: control-cell input, perturbed-cell target, per-position flags.

    Each record holds ``input_ids`` and ``values`` of a *control* cell, ``target_column`` (default
    ``"target_values"``) with the *perturbed* cell's values at the same genes (same length), and
    either ``perturbation_flags`` (0/1 per position) or ``perturbed_genes_column`` (default
    ``"perturbed_gene_ids"``: the token ids of the perturbed genes; empty for a control). Output:
    ``input_ids``, ``values`` (control), ``attention_mask``, ``perturbation_flags`` int64 [B, L] (1 where
    the position's gene is perturbed), ``labels`` float32 [B, L] = target values at gene positions,
    -100.0 at padding and special tokens. A perturbed gene absent from the control sentence gets no
    flag: build perturbation sentences with ``include_zero_genes`` so every gene has a position.
    """

    def __init__(self, *, target_column: str = "target_values", perturbed_genes_column: str = "perturbed_gene_ids",
                 pad_to_multiple_of: int | None = None):
        super().__init__(seed=0, pad_to_multiple_of=pad_to_multiple_of)
        self.target_column = target_column
        self.perturbed_genes_column = perturbed_genes_column

    def _collate(self, records):
        cells = Cells(records)
        use_flags = cells.has("perturbation_flags")
        extra = [self.target_column] + (["perturbation_flags"] if use_flags else [])
        batch = self._pad(cells, extra_float_keys=extra)
        target = batch.pop(self.target_column)
        if use_flags:
            flags = batch.pop("perturbation_flags").astype(np.int64)
        else:
            if not cells.has(self.perturbed_genes_column):
                i = cells.first_without(self.perturbed_genes_column)
                raise ValueError(
                    f"Record {i} has neither 'perturbation_flags' nor {self.perturbed_genes_column!r} (record keys: "
                    f"{cells.keys_of(i)}). Give the perturbed genes' token ids (empty for a control cell)."
                )
            flags = np.zeros_like(batch["input_ids"])
            for i, genes in enumerate(cells.column(self.perturbed_genes_column)):
                flags[i] = np.isin(batch["input_ids"][i], np.asarray(genes, dtype=np.int64).reshape(-1))
        eligible = (batch["attention_mask"] == 1) & (batch["input_ids"] >= FIRST_GENE_ID)
        if ((flags != 0) & ~eligible).any():
            raise ValueError("perturbation_flags mark a special-token or padding position; only gene positions can be perturbed.")
        batch["perturbation_flags"] = (flags != 0).astype(np.int64) * eligible
        batch["labels"] = np.where(eligible, target, np.float32(IGNORE_INDEX)).astype(np.float32)
        return batch
