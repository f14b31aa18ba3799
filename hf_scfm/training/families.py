"""How each model family is trained: its encoding, species, pretraining objectives (head + collator), classifier.

The training loop (:mod:`hf_scfm.training.pretrain`), fine-tuning (:mod:`hf_scfm.training.finetune`) and the tasks
read a family only through :func:`get_family`. The family's classes come from its one Auto mapping
(``<MODEL_TYPE>_AUTO_MAP`` in its configuration file, read by :func:`hf_scfm.modeling.auto_map`): the config is
``AutoConfig``'s class, the backbone ``AutoModel``'s, the classifier ``AutoModelForSequenceClassification``'s.
Importing this module costs nothing; a class is imported when first needed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from ..modeling import auto_class_name, family_package

__all__ = ["Family", "Objective", "FAMILIES", "get_family", "family_of_config"]


@dataclass(frozen=True)
class Objective:
    """A pretraining objective: the head class that computes its loss and the collator that builds its targets."""

    model_class: str
    collator: str
    #: ``"tokenizer"``: the collator takes the tokenizer (vocabulary size) as first argument; ``"seed"``: a seed.
    collator_args: str = "seed"
    description: str = ""


@dataclass(frozen=True)
class Family:
    """A model family: where its classes live and how its cells are encoded."""

    name: str
    encoding: str
    species: str
    objectives: dict[str, Objective]
    default_objective: str
    #: Names of the classification head's top-level modules (LoRA ``modules_to_save``: trained in full).
    classifier_modules: tuple[str, ...]
    #: The config field the perturbation head's value scale lives in (SC-MAMBA2's ``value_scale`` also scales the
    #: inputs; the others divide the head's output by ``perturbation_value_scale``).
    perturbation_scale_key: str = "perturbation_value_scale"

    @property
    def package(self) -> str:
        """``"hf_scfm.modeling.<name>"``."""
        return family_package(self.name)

    @property
    def config_class(self) -> str:
        return auto_class_name(self.name, "AutoConfig")

    @property
    def model_class(self) -> str:
        """The backbone (``AutoModel``)."""
        return auto_class_name(self.name, "AutoModel")

    @property
    def classification_class(self) -> str:
        return auto_class_name(self.name, "AutoModelForSequenceClassification")

    @property
    def perturbation_class(self) -> str:
        return auto_class_name(self.name, "AutoModelForPerturbationPrediction")

    def module(self):
        """The family's package (classes load from it on first access)."""
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
        encoding="rank",
        species="mouse",
        objectives={
            "causal": Objective("MouseGeneMambaForCausalLM", "DataCollatorForNextGene", "none",
                                "next-gene prediction over rank-ordered cell sentences (the paper's objective)"),
            "mlm": Objective("MouseGeneMambaForMaskedLM", "DataCollatorForGeneMLM", "tokenizer",
                             "BERT-style gene masked-language modelling"),
        },
        default_objective="causal",
        classifier_modules=("classifier",),
    ),
    "scmamba2": Family(
        name="scmamba2",
        encoding="binned",
        species="human",
        objectives={
            "masked_expression": Objective("ScMamba2ForMaskedExpression", "DataCollatorForMaskedExpression", "seed",
                                           "masked expression modelling on binned values (MSE)"),
        },
        default_objective="masked_expression",
        classifier_modules=("classifier",),
        perturbation_scale_key="value_scale",
    ),
    "cellfm": Family(
        name="cellfm",
        encoding="continuous",
        species="human",
        objectives={
            "masked_regression": Objective("CellFMForMaskedRegression", "DataCollatorForMaskedRegression", "seed",
                                           "masked value regression on log1p values (MSE)"),
        },
        default_objective="masked_regression",
        classifier_modules=("head",),
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
