"""Fine-tuning for cell-type annotation on ``transformers.Trainer``: ``finetune(FinetuneArguments(...),
FinetuneTrainingArguments(output_dir=...))`` or ``hf-scfm finetune`` (the same two dataclasses on the command line:
``--model``, ``--train``, ``--label-key``, ... and every ``TrainingArguments`` option, ``--out`` for its
``output_dir``).

``--model`` is a folder or Hub repo written by ``hf-scfm pretrain`` (or any ``save_pretrained`` of an hf-scfm
model with its tokenizer). The cells of ``--train`` (and ``--eval``) are tokenized with the checkpoint's own
tokenizer, the labels of ``obs[--label-key]`` mapped to ids (sorted labels -> 0..K-1, saved as
``config.id2label``/``label2id``), and the family's ``...ForSequenceClassification`` trained with the Trainer and
our :class:`hf_scfm.data.DataCollatorForCellClassification`.

Choices, and why:

* **LoRA by default** (``peft``; ``--no-lora`` trains everything): the adapters go on the family's default
  backbone modules (:func:`hf_scfm.modeling.lora.default_lora_targets`) and the classification head is trained
  in full (``modules_to_save``). The result is saved as a PEFT adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``, with the head), or with ``--merge`` as a plain model (adapters folded into the
  weights: loads without peft). peft's generic ``PeftModel`` is used (no ``task_type``): the task-specific
  wrappers assume text-model forward arguments and would drop our ``values``.
* **Label map.** A merged or fully fine-tuned model keeps it in ``config.json`` (``id2label``/``label2id``). An
  adapter folder has no ``config.json`` (that is how a PEFT adapter is recognised), so the label map also goes to
  ``label_map.json``; :func:`load_finetuned` reads either.
* **Metrics.** accuracy, macro-F1, macro precision and macro recall (:func:`classification_metrics`): the
  ``cell_type_annotation`` ``evaluate`` module shipped in ``hf_scfm/metrics/`` (scikit-learn underneath,
  ``average="macro"``, ``zero_division=0``), loaded offline from its folder.
* **Eval cells with labels unseen in training** cannot be scored by a classifier over the training labels: they
  are dropped, with a warning giving their count.
* **Gene selection** (``--n-top-genes N``): the tokenizer reads only the N most variable genes of the reference
  (:meth:`hf_scfm.tokenization.GeneTokenizer.select_highly_variable_genes`), as scGPT and SC-MAMBA2 fine-tune
  on highly variable genes. With sentences shorter than a cell's expressed genes (the binned and continuous
  encodings then sample genes at random), this decides whether the marker genes are read at all. The subset
  is saved with the classifier's tokenizer, so ``hf-scfm annotate`` reads queries through the same genes.
* **Checkpoints are checked first.** A missing, partial or corrupt checkpoint, or one that is not an hf-scfm
  family, fails before any training with an error naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from .hub import validate_checkpoint, weights_checksum, write_weights_manifest

logger = logging.getLogger(__name__)

TASKS = ("annotate",)
LABEL_MAP_FILE = "label_map.json"
LABEL_COLUMN = "cell_label"


@dataclass
class FinetuneArguments:
    """What ``hf-scfm finetune`` takes besides the Trainer's own arguments (:class:`FinetuneTrainingArguments`)."""

    model: str = field(metadata={"metavar": "DIR_OR_REPO", "help": "pretrained checkpoint (folder or Hub repo id)"})
    train: str = field(metadata={"metavar": "H5AD", "help": "labelled reference cells (.h5ad)"})
    label_key: str = field(metadata={"metavar": "KEY", "help": "obs column with the labels"})
    task: str = field(default="annotate", metadata={"choices": list(TASKS), "help": "the fine-tuning task"})
    eval: str | None = field(default=None, metadata={"metavar": "H5AD", "help": "held-out labelled cells (.h5ad)"})
    lora: bool = field(default=True, metadata={"help": "LoRA adapters (default), or --no-lora for full fine-tuning"})
    merge: bool = field(default=False, metadata={"help": "save the model with the adapters merged in"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    max_length: int | None = field(default=None, metadata={"help": "tokens per cell (default: the tokenizer's)"})
    n_top_genes: int | None = field(default=None, metadata={
        "metavar": "N", "help": "read only the N most variable genes of --train (--hvg-flavor, per --hvg-batch-key "
                                "batch if given); saved with the tokenizer, so annotate reads queries the same way "
                                "(default: the checkpoint tokenizer's genes)"})
    hvg_flavor: str = field(default="pearson_residuals", metadata={
        "metavar": "FLAVOR", "help": "scanpy flavour of --n-top-genes: pearson_residuals (default, on raw counts), "
                                     "seurat_v3, seurat or cell_ranger (see GeneTokenizer.select_highly_variable_genes)"})
    hvg_batch_key: str | None = field(default=None, metadata={
        "metavar": "KEY", "help": "obs column of batches for --n-top-genes (genes variable within batches)"})
    class_weight: str = field(default="none", metadata={
        "choices": ["none", "balanced"], "help": "balanced: weight the cross-entropy of class c by n / (K * n_c) "
                                                 "(sklearn's 'balanced'), so rare cell types count as much as common "
                                                 "ones (macro-F1)"})
    pooling: str | None = field(default=None, metadata={
        "metavar": "HOW", "help": "how the classifier reads the cell embedding, for families with a config.pooling "
                                  "(SC-MAMBA2: cls | mean; Mouse-GeneMamba: mean | last); default: the checkpoint's"})
    layer: str | None = field(default=None, metadata={"help": "read counts from adata.layers[LAYER] instead of X"})
    adversarial_batch_key: str | None = field(default=None, metadata={
        "metavar": "KEY", "help": "obs column of batches to remove from the cell embedding by adversarial training "
                                  "(gradient-reversal discriminator, SC-MAMBA2 4.4; training only)"})
    adversarial_weight: float = field(default=1.0, metadata={
        "metavar": "W", "help": "weight of the adversarial batch loss (with --adversarial-batch-key)"})

    def __post_init__(self):
        if self.merge and not self.lora:
            raise ValueError("--merge folds LoRA adapters into the model; it needs --lora (the default).")
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r}: choose one of {list(TASKS)}.")


@dataclass
class FinetuneTrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` with the defaults of ``hf-scfm finetune``: the output folder is the
    fine-tuned model's (``--out``), learning rate 1e-3, 16 cells per batch (``--batch-size``), a log line every 10
    steps, no intermediate checkpoints, seed 0. Every other Trainer option works as documented by transformers."""

    output_dir: str = field(metadata={"aliases": ["--out"], "help": "folder of the fine-tuned model"})
    per_device_train_batch_size: int = field(default=16, metadata={"aliases": ["--batch-size"],
                                                                   "help": "cells per device per training batch"})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "cells per device per evaluation batch"})
    num_train_epochs: float = field(default=3.0, metadata={"aliases": ["--epochs"],
                                                           "help": "epochs (when --max-steps is not given)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    logging_steps: float = field(default=10, metadata={"help": "log every N steps"})
    save_strategy: str = field(default="no", metadata={"help": "Trainer checkpoints: no (default), steps or epoch"})
    seed: int = field(default=0, metadata={"help": "seed of the head's initialisation and the data order"})
    disable_tqdm: bool | None = field(default=True, metadata={"help": "no Trainer progress bar (default)"})
    label_names: list[str] | None = field(default_factory=lambda: ["labels"], metadata={"help": "label keys"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "must stay False: the collator reads "
                                                                         "the label column"})


# ---------------------------------------------------------------------------------------------------------------
# checkpoint and data
# ---------------------------------------------------------------------------------------------------------------


@contextmanager
def quiet_load_report():
    """Silence transformers' load report inside the block (restoring the verbosity after): loading a pretraining
    checkpoint into another head (a backbone, a classifier, a perturbation model) drops or adds heads by design,
    and the report of those expected MISSING/UNEXPECTED keys would only bury real problems."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def resolve_checkpoint(model: str) -> tuple[Path, dict, Any]:
    """Local folder of ``model`` (downloading a Hub repo), its ``config.json`` and :class:`Family`; validated."""
    from .families import family_of_config

    path = Path(model)
    if not path.exists():
        if model.count("/") != 1 or model.startswith((".", "/")):
            raise FileNotFoundError(f"--model {model}: no such folder, and not a Hub repo id (ORG/NAME).")
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model))
    summary = validate_checkpoint(path, require_tokenizer=True)
    if summary["kind"] != "model":
        raise ValueError(f"--model {model} is a PEFT adapter; pass the full pretrained model it was trained from.")
    family = family_of_config(summary["config"], source=f"--model {model}")
    return path, summary["config"], family


def cell_records(adata, tokenizer, label_key: str, max_length: int | None, source: str,
                 layer: str | None = None) -> list[dict]:
    """One record per cell (``input_ids``, ``values``, label) from an AnnData, tokenized without padding."""
    if label_key not in adata.obs.columns:
        raise ValueError(
            f"{source} has no obs column {label_key!r} (columns: {list(adata.obs.columns)}). Pass --label-key KEY."
        )
    labels = adata.obs[label_key]
    if labels.isna().any():
        raise ValueError(f"{source}: obs[{label_key!r}] has {int(labels.isna().sum())} missing labels; drop those cells.")
    enc = tokenizer(adata, max_length=max_length, padding=False, truncation=True, layer=layer)
    return [
        {"input_ids": ids, "values": vals, LABEL_COLUMN: str(label)}
        for ids, vals, label in zip(enc["input_ids"], enc["values"], labels.astype(str))
    ]


def classification_metrics(predictions, labels) -> dict[str, float]:
    """accuracy and macro-averaged F1, precision and recall over the classes present in ``labels`` or
    ``predictions``: the ``cell_type_annotation`` metric (:mod:`hf_scfm.metrics`)."""
    import numpy as np

    from ..metrics import load

    predictions, labels = np.asarray(predictions).ravel(), np.asarray(labels).ravel()
    if labels.dtype.kind in "iu" and predictions.dtype.kind in "iu":
        predictions, labels = predictions.astype(np.int64), labels.astype(np.int64)
    else:
        predictions, labels = predictions.astype(str), labels.astype(str)
    return load("cell_type_annotation").compute(predictions=predictions.tolist(), references=labels.tolist())


def compute_metrics(eval_pred) -> dict[str, float]:
    """``Trainer`` hook: argmax of the logits, then :func:`classification_metrics`."""
    import numpy as np

    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    return classification_metrics(np.asarray(logits).argmax(-1), eval_pred.label_ids)


def balanced_class_weights(labels, label2id: dict[str, int]):
    """float32 tensor ``[K]``: ``n / (K * n_c)`` per class id (sklearn's ``class_weight="balanced"``)."""
    import numpy as np
    import torch

    counts = np.bincount([label2id[label] for label in labels], minlength=len(label2id)).astype(np.float64)
    return torch.tensor(counts.sum() / (len(label2id) * np.maximum(counts, 1.0)), dtype=torch.float32)


class WeightedClassificationLoss:
    """``Trainer(compute_loss_func=...)``: class-weighted cross-entropy of ``outputs.logits``. The Trainer takes the
    labels out of the batch first, so the model's own loss is None, unless a wrapper adds a term of its own (the
    adversarial batch loss), which is kept.

    With a ``compute_loss_func`` the Trainer counts the step's cells over all micro-batches and processes
    (``num_items_in_batch``), multiplies the returned loss by the number of processes and does not divide it by
    the accumulation steps: so each micro-batch's weighted mean is weighted by its share of the step's cells. One
    process without accumulation gets exactly the weighted mean of its batch; otherwise a step's loss is the
    cell-weighted average of its micro-batches' weighted means (equal to one process's whenever the micro-batches
    hold the same total weight per cell)."""

    def __init__(self, weights):
        self.weights = weights

    def __call__(self, outputs, labels, num_items_in_batch=None):
        import torch.nn.functional as F

        logits = outputs["logits"].float()
        labels = labels.to(logits.device).view(-1)
        loss = F.cross_entropy(logits, labels, weight=self.weights.to(logits.device))
        extra = outputs.get("loss") if hasattr(outputs, "get") else None
        loss = loss if extra is None else loss + extra
        if num_items_in_batch is not None:
            loss = loss * (labels.numel() / float(num_items_in_batch))
        return loss


def lora_config(model, family, r: int = 8, alpha: int = 16, dropout: float = 0.0):
    """The ``peft.LoraConfig`` used by ``finetune``: default backbone targets, the head trained in full."""
    from peft import LoraConfig

    from ..modeling.lora import default_lora_targets

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=default_lora_targets(model),
                      modules_to_save=list(family.classifier_modules), bias="none")


def _base_reference(model: str, model_path: Path, out: Path) -> str:
    """How an adapter saved in ``out`` names its base: a Hub repo id as given, a folder relative to ``out``."""
    if not Path(model).exists():
        return model  # a Hub repo id (resolve_checkpoint downloaded it)
    return os.path.relpath(Path(model_path).resolve(), Path(out).resolve())


def _resolve_base(base: str, adapter: Path) -> str:
    """The base model folder (or Hub repo id) of the adapter in ``adapter``: an absolute path as is, a relative one
    against the adapter folder (never the working directory, where another folder of that name may be)."""
    if os.path.isabs(base):
        return base
    beside = adapter / base
    if beside.exists():
        return str(beside)
    if base.count("/") == 1 and not base.startswith("."):
        return base  # a Hub repo id
    raise FileNotFoundError(
        f"The adapter {adapter} names its base model {base!r}, relative to the adapter folder, and {beside} does not "
        "exist. Put the base model there (or keep the adapter beside it as when it was trained), or set "
        f"'base_model' in {adapter / LABEL_MAP_FILE} to the base model's folder."
    )


def load_finetuned(path: str | Any):
    """Load what ``hf-scfm finetune`` saved: a full/merged model, or a base model + adapter (label map applied)."""
    from .families import family_of_config

    path = Path(path)
    if (path / "config.json").exists():
        from transformers import AutoConfig

        family = family_of_config(AutoConfig.from_pretrained(path), source=str(path))
        return family.classification_cls.from_pretrained(path)
    from peft import PeftConfig, PeftModel

    validate_checkpoint(path, require_tokenizer=False)  # refuses adapter_model.bin (a pickle), checks the weights
    label_map = json.loads((path / LABEL_MAP_FILE).read_text(encoding="utf-8"))
    base = label_map.get("base_model") or PeftConfig.from_pretrained(str(path)).base_model_name_or_path
    base_path, _, family = resolve_checkpoint(_resolve_base(base, path))
    expected = label_map.get("base_model_checksum")
    if expected is not None and weights_checksum(base_path) != expected:
        raise ValueError(
            f"The adapter {path} was trained on another base model than {base_path} (its weights' checksum differs "
            f"from the one recorded in {LABEL_MAP_FILE}): the adapter would be applied to the wrong weights. Put the "
            "base model it was fine-tuned from at that path, or fine-tune again on this one."
        )
    id2label = {int(k): v for k, v in label_map["id2label"].items()}
    model = family.classification_cls.from_pretrained(
        base_path, num_labels=len(id2label), id2label=id2label, label2id=label_map["label2id"],
        ignore_mismatched_sizes=True,
    )
    if label_map.get("tokenizer_settings"):
        model.config.tokenizer_settings = label_map["tokenizer_settings"]
    return PeftModel.from_pretrained(model, str(path))


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------


def finetune(args: FinetuneArguments, training_args: TrainingArguments) -> dict[str, Any]:
    """Fine-tune ``args.model`` on the labelled cells of ``args.train``; the Trainer runs with ``training_args``
    (a :class:`FinetuneTrainingArguments` has this command's defaults; a plain ``TrainingArguments`` works too, its
    ``remove_unused_columns`` and ``label_names`` are set to what the cell records need). The model is saved to
    ``training_args.output_dir``. Returns ``{"out", "metrics", "num_labels", "trainable_params"}``."""
    import anndata
    from transformers import Trainer, set_seed

    from ..data import DataCollatorForCellClassification
    from ..modeling.configuration_utils import check_tokenizer_matches
    from ..tokenization import GeneTokenizer

    if not training_args.output_dir:
        raise ValueError("training_args.output_dir (--out) is the folder of the fine-tuned model; give one.")
    from .distributed import accelerator_kwargs

    # use_cpu on a machine without an accelerator: several CPU processes (accelerate launch / torchrun) then form
    # one data-parallel run over gloo; without it each would train alone on all the cells.
    training_args = dataclasses.replace(training_args, remove_unused_columns=False, label_names=["labels"],
                                        **({"use_cpu": True} if accelerator_kwargs().get("cpu") else {}))
    model_path, config_dict, family = resolve_checkpoint(args.model)
    tokenizer = GeneTokenizer.from_pretrained(str(model_path))
    # the tokenizer as saved with the model (before --n-top-genes selects genes) must be the one it was trained with
    check_tokenizer_matches(family.config_cls.from_dict(config_dict), tokenizer)

    # -- the cells: reference (and held-out) cells tokenized by the checkpoint's tokenizer, labels mapped to ids
    train_adata = anndata.read_h5ad(args.train)
    if args.n_top_genes:
        tokenizer.select_highly_variable_genes(train_adata, args.n_top_genes, batch_key=args.hvg_batch_key,
                                               flavor=args.hvg_flavor, layer=args.layer)
    train_records = cell_records(train_adata, tokenizer, args.label_key, args.max_length, args.train, args.layer)
    label_names = sorted({r[LABEL_COLUMN] for r in train_records})
    if len(label_names) < 2:
        raise ValueError(f"{args.train}: obs[{args.label_key!r}] has {len(label_names)} distinct label(s); need >= 2.")
    label2id = {name: i for i, name in enumerate(label_names)}
    id2label = {i: name for name, i in label2id.items()}
    eval_records = None
    if args.eval:
        eval_records = cell_records(anndata.read_h5ad(args.eval), tokenizer, args.label_key, args.max_length, args.eval,
                                    args.layer)
        unseen = [r for r in eval_records if r[LABEL_COLUMN] not in label2id]
        if unseen:
            warnings.warn(f"{len(unseen)} cells of {args.eval} have labels absent from {args.train} "
                          f"({sorted({r[LABEL_COLUMN] for r in unseen})}); they are not scored.", stacklevel=2)
            eval_records = [r for r in eval_records if r[LABEL_COLUMN] in label2id]

    # -- the model: the family's classifier on the pretrained weights, LoRA adapters unless --no-lora
    overrides = {}
    if args.pooling:
        if not hasattr(family.config_cls(), "pooling"):
            raise ValueError(f"--pooling {args.pooling}: {family.name} has no pooling option (its cell embedding is "
                             "fixed by the architecture); drop --pooling.")
        overrides["pooling"] = args.pooling
    set_seed(training_args.seed)
    model = family.classification_cls.from_pretrained(
        model_path, num_labels=len(label_names), id2label=id2label, label2id=label2id,
        ignore_mismatched_sizes=True, **overrides,
    )
    model.config.tokenizer_settings = tokenizer.encoding_settings  # what the classifier reads: its gene subset
    check_tokenizer_matches(model.config, tokenizer)
    if args.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(model, family, args.lora_r, args.lora_alpha, args.lora_dropout))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # -- training: the Trainer with our collator (and the adversary and class weights when asked)
    collator = DataCollatorForCellClassification(label_column=LABEL_COLUMN, label2id=label2id)
    trained = model  # the adversary (training only) wraps it; `model` is what gets saved
    if args.adversarial_batch_key:
        from .adversarial import with_adversarial_batch

        trained, collator = with_adversarial_batch(model, collator, train_adata, train_records,
                                                   args.adversarial_batch_key, weight=args.adversarial_weight,
                                                   source=args.train)
    loss_func = None
    if args.class_weight == "balanced":
        loss_func = WeightedClassificationLoss(balanced_class_weights([r[LABEL_COLUMN] for r in train_records],
                                                                      label2id))
    trainer = Trainer(model=trained, args=training_args, train_dataset=train_records, eval_dataset=eval_records,
                      data_collator=collator, compute_metrics=compute_metrics, compute_loss_func=loss_func)
    # Our classifiers take **kwargs but ignore num_items_in_batch (their loss is the batch mean): told otherwise,
    # the Trainer would multiply that mean by the number of processes and skip the division by the accumulation
    # steps (a loss and gradient W x accumulation too large, hidden by AdamW's scale invariance but not by clipping).
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    metrics = trainer.evaluate() if eval_records else {}

    # -- saving (the main process only): the label map, the model (adapter, merged or full), its tokenizer and card
    out = Path(training_args.output_dir)
    result = {"out": str(out), "metrics": metrics, "num_labels": len(label_names), "trainable_params": trainable}
    if not trainer.is_world_process_zero():
        trainer.accelerator.wait_for_everyone()  # returns when the main process has written the folder
        return result
    out.mkdir(parents=True, exist_ok=True)
    label_map = {"id2label": {str(k): v for k, v in id2label.items()}, "label2id": label2id}
    if args.lora and not args.merge:  # the adapter names its base relative to its own folder, with its checksum,
        label_map.update(base_model=_base_reference(args.model, model_path, out),  # and what it reads (no config)
                         base_model_checksum=weights_checksum(model_path),
                         tokenizer_settings=tokenizer.encoding_settings)
    (out / LABEL_MAP_FILE).write_text(json.dumps(label_map, indent=2) + "\n", encoding="utf-8")
    if args.lora and args.merge:
        model = model.merge_and_unload()
    model.save_pretrained(out)
    write_weights_manifest(out)
    if args.max_length:  # the saved tokenizer's default length is the training one: annotate then reads cells alike
        tokenizer.model_max_length = args.max_length
    tokenizer.save_pretrained(out)
    if not args.lora or args.merge:
        _write_card(out, model.config, tokenizer, args, training_args, label_names, metrics)
    print(f"Saved to {out}; metrics: {json.dumps(metrics, sort_keys=True)}")
    trainer.accelerator.wait_for_everyone()
    return result


def _write_card(out: Path, config, tokenizer, args: FinetuneArguments, training_args, label_names,
                metrics) -> None:
    from .model_card import render_model_card, write_card_metadata

    results = [
        {"metric": name.removeprefix("eval_"), "value": value, "dataset": Path(args.eval).stem, "split": "eval",
         "task": "annotate"}
        for name, value in metrics.items()
        if name in ("eval_accuracy", "eval_f1_macro", "eval_precision_macro", "eval_recall_macro")
    ]
    kwargs = {
        "task": "annotate", "base_model": str(args.model), "label_names": label_names,
        "training_data": {"reference": str(args.train), "label_key": args.label_key, "cells_labels": len(label_names)},
        "hyperparameters": {"lora": args.lora, "merged": args.merge, "lora_r": args.lora_r,
                            "learning_rate": training_args.learning_rate,
                            "batch_size": training_args.per_device_train_batch_size,
                            "max_steps": training_args.max_steps, "epochs": training_args.num_train_epochs,
                            "seed": training_args.seed, "class_weight": args.class_weight,
                            "genes_read": len(tokenizer.gene_subset) if tokenizer.gene_subset else "all"},
        "eval_results": results or None,
    }
    render_model_card(config, tokenizer=tokenizer, **kwargs).save(out / "README.md")
    write_card_metadata(out, **kwargs)
