"""Mouse-GeneMamba (seed paper 000): a Mamba-1 gene language model for mouse single-cell data.

Importing this subpackage registers the config and models with the transformers Auto classes
(``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM``, ``AutoModelForMaskedLM``,
``AutoModelForSequenceClassification``) under ``model_type="mouse_genemamba"``.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from .configuration_mouse_genemamba import MOUSE_VOCAB_SIZE, MouseGeneMambaConfig
from .modeling_mouse_genemamba import (
    MouseGeneMambaCache,
    MouseGeneMambaForCausalLM,
    MouseGeneMambaForMaskedLM,
    MouseGeneMambaForSequenceClassification,
    MouseGeneMambaModel,
    MouseGeneMambaPreTrainedModel,
)

AutoConfig.register(MouseGeneMambaConfig.model_type, MouseGeneMambaConfig, exist_ok=True)
AutoModel.register(MouseGeneMambaConfig, MouseGeneMambaModel, exist_ok=True)
AutoModelForCausalLM.register(MouseGeneMambaConfig, MouseGeneMambaForCausalLM, exist_ok=True)
AutoModelForMaskedLM.register(MouseGeneMambaConfig, MouseGeneMambaForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(
    MouseGeneMambaConfig, MouseGeneMambaForSequenceClassification, exist_ok=True
)

__all__ = [
    "MOUSE_VOCAB_SIZE",
    "MouseGeneMambaCache",
    "MouseGeneMambaConfig",
    "MouseGeneMambaForCausalLM",
    "MouseGeneMambaForMaskedLM",
    "MouseGeneMambaForSequenceClassification",
    "MouseGeneMambaModel",
    "MouseGeneMambaPreTrainedModel",
]
