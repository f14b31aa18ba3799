"""hf-scfm: single-cell foundation models with linear-cost backbones, the Hugging Face way.

``import hf_scfm`` is light: it imports neither torch nor transformers. Its public names (the model families'
configurations and models, ``GeneTokenizer``, ``load_example``, ...) are imported on first access (PEP 562), and
every configuration, model and the tokenizer are registered with transformers' ``AutoConfig``, ``AutoModel*`` and
``AutoTokenizer`` as soon as transformers' Auto modules are imported (:func:`hf_scfm.modeling.register_auto_classes`),
so ``AutoModel.from_pretrained(<an hf-scfm checkpoint>)`` works right after ``import hf_scfm``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from . import modeling as _modeling

__version__ = "0.1.0.dev0"

#: Public names that are not a model family's: name -> module that defines (or re-exports) it.
_EXPORTS = {
    "load_example": "hf_scfm.data",
    "GeneTokenizer": "hf_scfm.tokenization",
    "MappingReport": "hf_scfm.tokenization",
    "DEFAULT_LORA_TARGETS": "hf_scfm.modeling.lora",
    "default_lora_targets": "hf_scfm.modeling.lora",
    "AutoModelForMaskedExpression": "hf_scfm.modeling.auto",
    "AutoModelForPerturbationPrediction": "hf_scfm.modeling.auto",
}

if TYPE_CHECKING:
    from .data import load_example  # noqa: F401
    from .modeling.auto import AutoModelForMaskedExpression, AutoModelForPerturbationPrediction  # noqa: F401
    from .modeling.cellfm import *  # noqa: F401,F403
    from .modeling.lora import DEFAULT_LORA_TARGETS, default_lora_targets  # noqa: F401
    from .modeling.mouse_genemamba import *  # noqa: F401,F403
    from .modeling.scmamba2 import *  # noqa: F401,F403
    from .tokenization import GeneTokenizer, MappingReport  # noqa: F401


def _family_exports() -> dict[str, str]:
    owners: dict[str, str] = {}
    for model_type in _modeling.FAMILIES:
        package = importlib.import_module(_modeling.family_package(model_type))
        for name in package.__getattr__.exports:
            owners.setdefault(name, package.__name__)
    return owners


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name) or _family_exports().get(name)
    if module is None and not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # a subpackage: hf_scfm.tasks, hf_scfm.data, ...
    if module is None:
        raise AttributeError(f"module 'hf_scfm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_family_exports()))


_modeling.register_auto_classes()
