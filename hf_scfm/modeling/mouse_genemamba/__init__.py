"""Mouse-GeneMamba (seed paper 000): a Mamba-1 gene language model for mouse single-cell data.

Importing this subpackage registers the config and models with the transformers Auto classes
(``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM``, ``AutoModelForMaskedLM``,
``AutoModelForSequenceClassification``) under ``model_type="mouse_genemamba"``.

Five lines from real mouse cells to next-gene logits and cell embeddings::

    import hf_scfm
    adata = hf_scfm.load_example("baron_mouse")
    tok = hf_scfm.GeneTokenizer.from_species("mouse", encoding="rank"); tok.fit_medians(adata)
    config = hf_scfm.MouseGeneMambaConfig.from_preset("tiny", vocab_checksum=tok.vocab_checksum)
    out = hf_scfm.MouseGeneMambaForCausalLM(config)(**tok(adata[:8], max_length=128, return_tensors="pt"))

``out.logits`` ``[8, 128, 78323]`` are the next-gene logits and ``out.cell_embedding`` ``[8, 64]`` the cells.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from .configuration_mouse_genemamba import MouseGeneMambaConfig
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
    "MouseGeneMambaCache",
    "MouseGeneMambaConfig",
    "MouseGeneMambaForCausalLM",
    "MouseGeneMambaForMaskedLM",
    "MouseGeneMambaForSequenceClassification",
    "MouseGeneMambaModel",
    "MouseGeneMambaPreTrainedModel",
]
