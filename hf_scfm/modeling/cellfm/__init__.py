"""CellFM (seed paper 003): a value-projection single-cell foundation model on the ERetNet backbone.

Importing this subpackage registers the config and models with the transformers Auto classes under
``model_type="cellfm"``: ``AutoConfig``, ``AutoModel`` (:class:`CellFMModel`), ``AutoModelForPreTraining``
(:class:`CellFMForMaskedRegression`, the pretraining head) and ``AutoModelForSequenceClassification``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoModelForSequenceClassification

from .configuration_cellfm import CELLFM_PAPER_VOCAB_SIZE, CellFMConfig
from .modeling_cellfm import (
    CellFMForMaskedRegression,
    CellFMForSequenceClassification,
    CellFMMaskedRegressionOutput,
    CellFMModel,
    CellFMModelOutput,
    CellFMPreTrainedModel,
    CellFMSequenceClassifierOutput,
)

AutoConfig.register(CellFMConfig.model_type, CellFMConfig, exist_ok=True)
AutoModel.register(CellFMConfig, CellFMModel, exist_ok=True)
AutoModelForPreTraining.register(CellFMConfig, CellFMForMaskedRegression, exist_ok=True)
AutoModelForSequenceClassification.register(CellFMConfig, CellFMForSequenceClassification, exist_ok=True)

__all__ = [
    "CELLFM_PAPER_VOCAB_SIZE",
    "CellFMConfig",
    "CellFMForMaskedRegression",
    "CellFMForSequenceClassification",
    "CellFMMaskedRegressionOutput",
    "CellFMModel",
    "CellFMModelOutput",
    "CellFMPreTrainedModel",
    "CellFMSequenceClassifierOutput",
]
