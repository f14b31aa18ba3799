"""CellFM (seed paper 003): a value-projection single-cell foundation model on the ERetNet backbone.

``model_type="cellfm"``. Auto classes (registered by ``import hf_scfm``, and written into every ``config.json``'s
``auto_map`` for ``trust_remote_code`` loading): ``AutoConfig``, ``AutoModel`` (:class:`CellFMModel`),
``AutoModelForPreTraining`` and ``hf_scfm.AutoModelForMaskedExpression`` (:class:`CellFMForMaskedRegression`, the
pretraining head: one regressed value per token), ``AutoModelForSequenceClassification`` and
``hf_scfm.AutoModelForPerturbationPrediction`` (:class:`CellFMForPerturbationPrediction`). Importing this package
imports nothing heavy: classes load on first access.
"""

from typing import TYPE_CHECKING

from .. import lazy_exports

if TYPE_CHECKING:
    from .configuration_cellfm import *  # noqa: F401,F403
    from .modeling_cellfm import *  # noqa: F401,F403

__getattr__, __dir__ = lazy_exports(__name__, __file__, ("configuration_cellfm", "modeling_cellfm"))
