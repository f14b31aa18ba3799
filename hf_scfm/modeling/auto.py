"""hf_scfm's own Auto classes, for heads that no transformers Auto class describes.

* :class:`AutoModelForMaskedExpression`: heads that regress the masked expression value of each token
  (``ScMamba2ForMaskedExpression``, ``CellFMForMaskedRegression``). ``AutoModelForMaskedLM`` would be wrong for
  them: it means vocabulary logits (the ``fill-mask`` pipeline relies on that). They are the families' pretraining
  heads, so ``AutoModelForPreTraining`` reaches them too.
* :class:`AutoModelForPerturbationPrediction`: ``<Family>ForPerturbationPrediction`` of every family (a control cell
  + ``perturbation_flags`` -> the perturbed cell's values).

Both are built the way transformers builds its own (``_BaseAutoModelClass``, ``_LazyAutoMapping``,
``auto_class_update``), from the families' Auto maps (``<MODEL_TYPE>_AUTO_MAP`` in each configuration file), and
resolve a model class only when it is first looked up::

    from hf_scfm import AutoModelForMaskedExpression
    model = AutoModelForMaskedExpression.from_pretrained("path/or/repo")

They need hf_scfm; where it is not installed, a checkpoint's ``config.json`` still names the class under the same
key of its ``auto_map`` (``transformers.dynamic_module_utils.get_class_from_dynamic_module`` loads it).
"""

from __future__ import annotations

from collections import OrderedDict

from transformers.models.auto.auto_factory import _BaseAutoModelClass, _LazyAutoMapping, auto_class_update

from . import FAMILIES, add_lazy_model, auto_map


def _family_mapping(auto_class: str) -> _LazyAutoMapping:
    """A ``_LazyAutoMapping`` from each family's config class to its class for ``auto_class`` (lazy)."""
    mapping = _LazyAutoMapping(OrderedDict(), OrderedDict())
    for model_type in FAMILIES:
        names = auto_map(model_type)
        if auto_class in names:
            config_name = names["AutoConfig"].rsplit(".", 1)[1]
            mapping._config_mapping[model_type] = config_name
            add_lazy_model(mapping, model_type, config_name, names[auto_class].rsplit(".", 1)[1])
    return mapping


MODEL_FOR_MASKED_EXPRESSION_MAPPING = _family_mapping("AutoModelForMaskedExpression")
MODEL_FOR_PERTURBATION_PREDICTION_MAPPING = _family_mapping("AutoModelForPerturbationPrediction")


class AutoModelForMaskedExpression(_BaseAutoModelClass):
    _model_mapping = MODEL_FOR_MASKED_EXPRESSION_MAPPING


AutoModelForMaskedExpression = auto_class_update(
    AutoModelForMaskedExpression, head_doc="masked expression regression", checkpoint_for_example="your-org/scmamba2"
)


class AutoModelForPerturbationPrediction(_BaseAutoModelClass):
    _model_mapping = MODEL_FOR_PERTURBATION_PREDICTION_MAPPING


AutoModelForPerturbationPrediction = auto_class_update(
    AutoModelForPerturbationPrediction, head_doc="perturbation prediction", checkpoint_for_example="your-org/cellfm"
)

__all__ = [
    "AutoModelForMaskedExpression",
    "AutoModelForPerturbationPrediction",
    "MODEL_FOR_MASKED_EXPRESSION_MAPPING",
    "MODEL_FOR_PERTURBATION_PREDICTION_MAPPING",
]
