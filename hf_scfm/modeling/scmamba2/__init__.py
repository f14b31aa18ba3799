"""SC-MAMBA2: bidirectional Mamba-2 over binned whole-transcriptome cells (seed papers 001/002).

Importing this subpackage registers the family with the transformers Auto classes:
``AutoConfig`` (``model_type="scmamba2"``), ``AutoModel`` -> :class:`ScMamba2Model` and
``AutoModelForSequenceClassification`` -> :class:`ScMamba2ForSequenceClassification`.
:class:`ScMamba2ForMaskedExpression` and :class:`ScMamba2ForPerturbationPrediction` load with their own
``from_pretrained`` (no Auto class means "regress one value per token"; ``AutoModelForMaskedLM`` means
vocabulary logits, so it is deliberately not used).
"""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .configuration_scmamba2 import PAPER_NUM_GENES, PAPER_VOCAB_SIZE, ScMamba2Config
from .modeling_scmamba2 import (
    ScMamba2ForMaskedExpression,
    ScMamba2ForPerturbationPrediction,
    ScMamba2ForSequenceClassification,
    ScMamba2MaskedExpressionOutput,
    ScMamba2Model,
    ScMamba2ModelOutput,
    ScMamba2PreTrainedModel,
    ScMamba2SequenceClassifierOutput,
)

AutoConfig.register(ScMamba2Config.model_type, ScMamba2Config, exist_ok=True)
AutoModel.register(ScMamba2Config, ScMamba2Model, exist_ok=True)
AutoModelForSequenceClassification.register(ScMamba2Config, ScMamba2ForSequenceClassification, exist_ok=True)

__all__ = [
    "ScMamba2Config",
    "ScMamba2PreTrainedModel",
    "ScMamba2Model",
    "ScMamba2ForMaskedExpression",
    "ScMamba2ForSequenceClassification",
    "ScMamba2ForPerturbationPrediction",
    "ScMamba2ModelOutput",
    "ScMamba2MaskedExpressionOutput",
    "ScMamba2SequenceClassifierOutput",
]
