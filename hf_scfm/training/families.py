"""One place that maps a model family to its parts: config, pretraining head, classifier, encoding, collator.

The training loop (:mod:`hf_scfm.training.pretrain`), the fine-tuning command (:mod:`hf_scfm.training.finetune`)
and the remote-code export (:mod:`hf_scfm.training.remote_code`) read a family only through :func:`get_family`,
so adding a family means adding one :class:`Family` entry here. Classes are named, not imported, so importing
this module costs nothing; :meth:`Family.module` imports the family's subpackage (which registers it with the
transformers Auto classes) when a class is first needed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Family", "Objective", "FAMILIES", "get_family", "family_of_config"]


@dataclass(frozen=True)
class Objective:
    """A pretraining objective: the head class that computes its loss and the collator that builds its targets."""

    model_class: str
    collator: str
    #: ``"tokenizer"``: the collator takes the tokenizer (vocabulary size) as first argument; ``"seed"``: a seed.
    collator_args: str = "seed"
    description: str = ""
    #: The loss compares position ``t``'s output with the label at ``t + 1`` (next-gene prediction).
    shifted_labels: bool = False

    def loss_items(self, batch):
        """The number of label positions the head's loss averages over in a collated ``batch`` (labels other
        than -100, on real tokens): the pretraining loop weights each micro-batch's mean loss by it, so a step's
        loss is the mean over all its positions, however its cells are spread over processes and micro-batches."""
        keep = batch["labels"] != -100
        if batch.get("attention_mask") is not None:
            keep = keep & batch["attention_mask"].bool()
        return (keep[:, 1:] if self.shifted_labels else keep).sum()


@dataclass(frozen=True)
class Family:
    """A model family: where its classes live and how its cells are encoded."""

    name: str
    package: str
    config_class: str
    model_class: str
    classification_class: str
    encoding: str
    species: str
    objectives: dict[str, Objective]
    default_objective: str
    #: Names of the classification head's top-level modules (LoRA ``modules_to_save``: trained in full).
    classifier_modules: tuple[str, ...]
    #: transformers Auto class -> class name, written to ``config.json``'s ``auto_map`` for remote code.
    auto_classes: dict[str, str] = field(default_factory=dict)

    def module(self):
        """The family's subpackage (importing it registers the Auto classes)."""
        return importlib.import_module(self.package)

    def get(self, class_name: str):
        return getattr(self.module(), class_name)

    @property
    def config_cls(self):
        return self.get(self.config_class)

    @property
    def classification_cls(self):
        return self.get(self.classification_class)

    def objective(self, name: str | None = None) -> Objective:
        name = name or self.default_objective
        if name not in self.objectives:
            raise ValueError(
                f"Model family {self.name!r} has no objective {name!r}; choose one of {sorted(self.objectives)}."
            )
        return self.objectives[name]

    def pretraining_cls(self, objective: str | None = None):
        return self.get(self.objective(objective).model_class)

    def make_collator(self, tokenizer, *, objective: str | None = None, seed: int = 0):
        from ..data import collators

        spec = self.objective(objective)
        cls = getattr(collators, spec.collator)
        if spec.collator_args == "tokenizer":
            return cls(tokenizer, seed=seed)
        if spec.collator_args == "none":
            return cls()
        return cls(seed=seed)


FAMILIES: dict[str, Family] = {
    "mouse_genemamba": Family(
        name="mouse_genemamba",
        package="hf_scfm.modeling.mouse_genemamba",
        config_class="MouseGeneMambaConfig",
        model_class="MouseGeneMambaModel",
        classification_class="MouseGeneMambaForSequenceClassification",
        encoding="rank",
        species="mouse",
        objectives={
            "causal": Objective("MouseGeneMambaForCausalLM", "DataCollatorForNextGene", "none",
                                "next-gene prediction over rank-ordered cell sentences (the paper's objective)",
                                shifted_labels=True),
            "mlm": Objective("MouseGeneMambaForMaskedLM", "DataCollatorForGeneMLM", "tokenizer",
                             "BERT-style gene masked-language modelling"),
        },
        default_objective="causal",
        classifier_modules=("classifier",),
        auto_classes={
            "AutoModel": "MouseGeneMambaModel",
            "AutoModelForCausalLM": "MouseGeneMambaForCausalLM",
            "AutoModelForMaskedLM": "MouseGeneMambaForMaskedLM",
            "AutoModelForSequenceClassification": "MouseGeneMambaForSequenceClassification",
        },
    ),
    "scmamba2": Family(
        name="scmamba2",
        package="hf_scfm.modeling.scmamba2",
        config_class="ScMamba2Config",
        model_class="ScMamba2Model",
        classification_class="ScMamba2ForSequenceClassification",
        encoding="binned",
        species="human",
        objectives={
            "masked_expression": Objective("ScMamba2ForMaskedExpression", "DataCollatorForMaskedExpression", "seed",
                                           "masked expression modelling on binned values (MSE)"),
        },
        default_objective="masked_expression",
        classifier_modules=("classifier",),
        auto_classes={
            "AutoModel": "ScMamba2Model",
            "AutoModelForSequenceClassification": "ScMamba2ForSequenceClassification",
        },
    ),
    "cellfm": Family(
        name="cellfm",
        package="hf_scfm.modeling.cellfm",
        config_class="CellFMConfig",
        model_class="CellFMModel",
        classification_class="CellFMForSequenceClassification",
        encoding="continuous",
        species="human",
        objectives={
            "masked_regression": Objective("CellFMForMaskedRegression", "DataCollatorForMaskedRegression", "seed",
                                           "masked value regression on log1p values (MSE)"),
        },
        default_objective="masked_regression",
        classifier_modules=("head",),
        auto_classes={
            "AutoModel": "CellFMModel",
            "AutoModelForPreTraining": "CellFMForMaskedRegression",
            "AutoModelForSequenceClassification": "CellFMForSequenceClassification",
        },
    ),
}


def get_family(name: str) -> Family:
    """The :class:`Family` called ``name`` (a ``model_type``); a clear error lists the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}: hf-scfm knows {sorted(FAMILIES)}.")
    return FAMILIES[name]


def family_of_config(config: Any, *, source: str = "the checkpoint") -> Family:
    """The family of a config (object or ``config.json`` dict), or a ``ValueError`` saying what it is instead."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"{source} has model_type {model_type!r}, which is not an hf-scfm model family ({sorted(FAMILIES)}). "
            "Pass a folder or Hub repo saved by `hf-scfm pretrain` (or by save_pretrained of an hf-scfm model)."
        )
    return FAMILIES[model_type]
