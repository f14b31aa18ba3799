"""SC-MAMBA2: bidirectional Mamba-2 over binned whole-transcriptome cells (seed papers 001/002).

``model_type="scmamba2"``. Auto classes (registered by ``import hf_scfm``, and written into every ``config.json``'s
``auto_map`` for ``trust_remote_code`` loading): ``AutoConfig``, ``AutoModel`` (:class:`ScMamba2Model`),
``AutoModelForPreTraining`` and ``hf_scfm.AutoModelForMaskedExpression`` (:class:`ScMamba2ForMaskedExpression`: one
regressed value per token, so deliberately not ``AutoModelForMaskedLM``, which means vocabulary logits),
``AutoModelForSequenceClassification`` and ``hf_scfm.AutoModelForPerturbationPrediction``
(:class:`ScMamba2ForPerturbationPrediction`). Importing this package imports nothing heavy: classes load on first
access.
"""

from typing import TYPE_CHECKING

from .. import lazy_exports

if TYPE_CHECKING:
    from .configuration_scmamba2 import *  # noqa: F401,F403
    from .modeling_scmamba2 import *  # noqa: F401,F403

__getattr__, __dir__ = lazy_exports(__name__, __file__, ("configuration_scmamba2", "modeling_scmamba2"))
