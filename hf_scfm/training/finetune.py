"""Fine-tuning for cell-type annotation: ``hf-scfm finetune --task annotate`` on ``transformers.Trainer``.

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
* **Metrics.** accuracy, macro-F1, macro precision and macro recall (:func:`classification_metrics`). The issue
  asks for ``evaluate``, but ``evaluate.load("accuracy")`` downloads the metric script from the Hub and fails
  offline (checked: ``FileNotFoundError ... doesn't exist on the Hugging Face Hub either``). ``evaluate``'s
  accuracy/f1/precision/recall scripts call ``sklearn.metrics``, which is not a dependency of hf-scfm, so the
  same definitions (``average="macro"``, ``zero_division=0``) are computed with NumPy; a test pins them to
  sklearn.
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

import argparse
import json
import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TASKS = ("annotate",)
LABEL_MAP_FILE = "label_map.json"
LABEL_COLUMN = "cell_label"


def add_finetune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--task", default="annotate", choices=TASKS)
    parser.add_argument("--model", required=True, metavar="DIR_OR_REPO", help="pretrained checkpoint")
    parser.add_argument("--train", required=True, metavar="H5AD", help="labelled reference cells (.h5ad)")
    parser.add_argument("--eval", default=None, metavar="H5AD", help="held-out labelled cells (.h5ad)")
    parser.add_argument("--label-key", required=True, metavar="KEY", help="obs column with the labels")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True,
                        help="LoRA adapters (default) or --no-lora for full fine-tuning")
    parser.add_argument("--merge", action="store_true", help="save the model with the adapters merged in")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (default: --epochs)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-ratio", type=float, default=0.0, metavar="R",
                        help="linear warm-up over this fraction (in [0, 1)) of the steps, then linear decay (Trainer's "
                             "schedule)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per cell (default: tokenizer's)")
    parser.add_argument("--n-top-genes", type=int, default=None, metavar="N",
                        help="read only the N most variable genes of --train (--hvg-flavor, per --hvg-batch-key "
                             "batch if given); saved with the tokenizer, so annotate reads queries the same way "
                             "(default: the checkpoint tokenizer's genes)")
    parser.add_argument("--hvg-flavor", default="pearson_residuals", metavar="FLAVOR",
                        help="scanpy flavour of --n-top-genes: pearson_residuals (default, on raw counts), "
                             "seurat_v3, seurat or cell_ranger (see GeneTokenizer.select_highly_variable_genes)")
    parser.add_argument("--hvg-batch-key", default=None, metavar="KEY",
                        help="obs column of batches for --n-top-genes (genes variable within batches)")
    parser.add_argument("--class-weight", default="none", choices=("none", "balanced"),
                        help="balanced: weight the cross-entropy of class c by n / (K * n_c) (sklearn's "
                             "'balanced'), so rare cell types count as much as common ones (macro-F1)")
    parser.add_argument("--pooling", default=None, metavar="HOW",
                        help="how the classifier reads the cell embedding, for families with a config.pooling "
                             "(SC-MAMBA2: cls | mean; Mouse-GeneMamba: mean | last); default: the checkpoint's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adversarial-batch-key", default=None, metavar="KEY",
                        help="obs column of batches to remove from the cell embedding by adversarial training "
                             "(gradient-reversal discriminator, SC-MAMBA2 4.4; training only)")
    parser.add_argument("--adversarial-weight", type=float, default=1.0, metavar="W",
                        help="weight of the adversarial batch loss (with --adversarial-batch-key)")
    return parser


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``finetune`` to an ``argparse`` subparsers object (handler: :func:`finetune_command`)."""
    parser = subparsers.add_parser(
        "finetune", help="fine-tune a pretrained model (cell-type annotation, LoRA by default)",
        description="Fine-tune a pretrained hf-scfm checkpoint on labelled cells with transformers.Trainer.",
    )
    add_finetune_arguments(parser)
    parser.set_defaults(func=finetune_command)
    return parser


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
    from .hub import validate_checkpoint

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


def cell_records(adata, tokenizer, label_key: str, max_length: int | None, source: str) -> list[dict]:
    """One record per cell (``input_ids``, ``values``, label) from an AnnData, tokenized without padding."""
    if label_key not in adata.obs.columns:
        raise ValueError(
            f"{source} has no obs column {label_key!r} (columns: {list(adata.obs.columns)}). Pass --label-key KEY."
        )
    labels = adata.obs[label_key]
    if labels.isna().any():
        raise ValueError(f"{source}: obs[{label_key!r}] has {int(labels.isna().sum())} missing labels; drop those cells.")
    enc = tokenizer(adata, max_length=max_length, padding=False, truncation=True)
    return [
        {"input_ids": ids, "values": vals, LABEL_COLUMN: str(label)}
        for ids, vals, label in zip(enc["input_ids"], enc["values"], labels.astype(str))
    ]


def classification_metrics(predictions, labels) -> dict[str, float]:
    """accuracy and macro-averaged F1, precision and recall over the classes present in ``labels`` or
    ``predictions`` (sklearn's ``average="macro"`` with ``zero_division=0``; NumPy only, pinned to sklearn in
    the tests)."""
    import numpy as np

    predictions, labels = np.asarray(predictions).ravel(), np.asarray(labels).ravel()
    classes = np.union1d(predictions, labels)
    tp = np.array([np.sum((predictions == c) & (labels == c)) for c in classes], dtype=np.float64)
    predicted = np.array([np.sum(predictions == c) for c in classes], dtype=np.float64)
    actual = np.array([np.sum(labels == c) for c in classes], dtype=np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "accuracy": float(np.mean(predictions == labels)) if labels.size else 0.0,
        "f1_macro": float(f1.mean()) if classes.size else 0.0,
        "precision_macro": float(precision.mean()) if classes.size else 0.0,
        "recall_macro": float(recall.mean()) if classes.size else 0.0,
    }


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
    adversarial batch loss), which is kept."""

    def __init__(self, weights):
        self.weights = weights

    def __call__(self, outputs, labels, num_items_in_batch=None):
        import torch.nn.functional as F

        logits = outputs["logits"].float()
        loss = F.cross_entropy(logits, labels.to(logits.device).view(-1), weight=self.weights.to(logits.device))
        extra = outputs.get("loss") if hasattr(outputs, "get") else None
        return loss if extra is None else loss + extra


def lora_config(model, family, r: int = 8, alpha: int = 16, dropout: float = 0.0):
    """The ``peft.LoraConfig`` used by ``finetune``: default backbone targets, the head trained in full."""
    from peft import LoraConfig

    from ..modeling.lora import default_lora_targets

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=default_lora_targets(model),
                      modules_to_save=list(family.classifier_modules), bias="none")


def load_finetuned(path: str | Any):
    """Load what ``hf-scfm finetune`` saved: a full/merged model, or a base model + adapter (label map applied)."""
    from .families import family_of_config

    path = Path(path)
    if (path / "config.json").exists():
        from transformers import AutoConfig

        family = family_of_config(AutoConfig.from_pretrained(path), source=str(path))
        return family.classification_cls.from_pretrained(path)
    from peft import PeftConfig, PeftModel

    label_map = json.loads((path / LABEL_MAP_FILE).read_text(encoding="utf-8"))
    base = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
    base_path, _, family = resolve_checkpoint(base)
    id2label = {int(k): v for k, v in label_map["id2label"].items()}
    model = family.classification_cls.from_pretrained(
        base_path, num_labels=len(id2label), id2label=id2label, label2id=label_map["label2id"],
        ignore_mismatched_sizes=True,
    )
    return PeftModel.from_pretrained(model, str(path))


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------


def finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Run fine-tuning from parsed ``args``; returns ``{"out", "metrics", "num_labels", "trainable_params"}``."""
    import anndata
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    from ..data import DataCollatorForCellClassification
    from ..modeling.configuration_utils import check_tokenizer_matches
    from ..tokenization import GeneTokenizer

    if args.merge and not args.lora:
        raise ValueError("--merge folds LoRA adapters into the model; it needs --lora (the default).")
    model_path, config_dict, family = resolve_checkpoint(args.model)
    tokenizer = GeneTokenizer.from_pretrained(str(model_path))

    train_adata = anndata.read_h5ad(args.train)
    if getattr(args, "n_top_genes", None):
        tokenizer.select_highly_variable_genes(train_adata, args.n_top_genes, batch_key=args.hvg_batch_key,
                                               flavor=getattr(args, "hvg_flavor", "pearson_residuals"))
    train_records = cell_records(train_adata, tokenizer, args.label_key, args.max_length, args.train)
    label_names = sorted({r[LABEL_COLUMN] for r in train_records})
    if len(label_names) < 2:
        raise ValueError(f"{args.train}: obs[{args.label_key!r}] has {len(label_names)} distinct label(s); need >= 2.")
    label2id = {name: i for i, name in enumerate(label_names)}
    id2label = {i: name for name, i in label2id.items()}
    eval_records = None
    if args.eval:
        eval_records = cell_records(anndata.read_h5ad(args.eval), tokenizer, args.label_key, args.max_length, args.eval)
        unseen = [r for r in eval_records if r[LABEL_COLUMN] not in label2id]
        if unseen:
            warnings.warn(f"{len(unseen)} cells of {args.eval} have labels absent from {args.train} "
                          f"({sorted({r[LABEL_COLUMN] for r in unseen})}); they are not scored.", stacklevel=2)
            eval_records = [r for r in eval_records if r[LABEL_COLUMN] in label2id]

    overrides = {}
    if getattr(args, "pooling", None):
        if not hasattr(family.config_cls(), "pooling"):
            raise ValueError(f"--pooling {args.pooling}: {family.name} has no pooling option (its cell embedding is "
                             "fixed by the architecture); drop --pooling.")
        overrides["pooling"] = args.pooling
    set_seed(args.seed)
    model = family.classification_cls.from_pretrained(
        model_path, num_labels=len(label_names), id2label=id2label, label2id=label2id,
        ignore_mismatched_sizes=True, **overrides,
    )
    check_tokenizer_matches(model.config, tokenizer)
    if args.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(model, family, args.lora_r, args.lora_alpha, args.lora_dropout))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    out = Path(args.out)
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.max_steps, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_steps=float(getattr(args, "warmup_ratio", 0.0)), seed=args.seed,
        data_seed=args.seed,
        eval_strategy="epoch" if eval_records and args.max_steps < 0 else "no",
        save_strategy="no", logging_steps=10, report_to=[], remove_unused_columns=False, label_names=["labels"],
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
    )
    collator = DataCollatorForCellClassification(label_column=LABEL_COLUMN, label2id=label2id)
    trained = model  # the adversary (training only) wraps it; `model` is what gets saved
    if getattr(args, "adversarial_batch_key", None):
        from ..tasks.integration import with_adversarial_batch

        trained, collator = with_adversarial_batch(model, collator, train_adata, train_records,
                                                   args.adversarial_batch_key, weight=args.adversarial_weight,
                                                   source=args.train)
    loss_func = None
    if getattr(args, "class_weight", "none") == "balanced":
        loss_func = WeightedClassificationLoss(balanced_class_weights([r[LABEL_COLUMN] for r in train_records],
                                                                      label2id))
    trainer = Trainer(model=trained, args=training_args, train_dataset=train_records, eval_dataset=eval_records,
                      data_collator=collator, compute_metrics=compute_metrics, compute_loss_func=loss_func)
    trainer.train()
    metrics = trainer.evaluate() if eval_records else {}

    out.mkdir(parents=True, exist_ok=True)
    (out / LABEL_MAP_FILE).write_text(json.dumps({"id2label": {str(k): v for k, v in id2label.items()},
                                                  "label2id": label2id}, indent=2) + "\n", encoding="utf-8")
    if args.lora and args.merge:
        model = model.merge_and_unload()
    model.save_pretrained(out)
    if args.max_length:  # the saved tokenizer's default length is the training one: annotate then reads cells alike
        tokenizer.model_max_length = args.max_length
    tokenizer.save_pretrained(out)
    if not args.lora or args.merge:
        from .remote_code import export_remote_code

        export_remote_code(out, family)
        _write_card(out, model.config, tokenizer, args, label_names, metrics)
    return {"out": str(out), "metrics": metrics, "num_labels": len(label_names), "trainable_params": trainable}


def _write_card(out: Path, config, tokenizer, args, label_names, metrics) -> None:
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
                            "learning_rate": args.learning_rate, "batch_size": args.batch_size,
                            "max_steps": args.max_steps, "epochs": args.epochs, "seed": args.seed,
                            "class_weight": getattr(args, "class_weight", "none"),
                            "genes_read": len(tokenizer.gene_subset) if tokenizer.gene_subset else "all"},
        "eval_results": results or None,
    }
    render_model_card(config, tokenizer=tokenizer, **kwargs).save(out / "README.md")
    write_card_metadata(out, **kwargs)


def finetune_command(args: argparse.Namespace) -> int:
    """Handler of ``hf-scfm finetune``: one-line errors for bad inputs, 0 on success."""
    from .hub import CheckpointError

    try:
        result = finetune(args)
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"hf-scfm finetune: error: {err}", file=sys.stderr)
        return 2
    print(f"Saved to {result['out']}; metrics: {json.dumps(result['metrics'], sort_keys=True)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-scfm finetune")
    add_finetune_arguments(parser)
    return finetune_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
