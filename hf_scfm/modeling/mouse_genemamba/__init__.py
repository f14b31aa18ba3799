"""Mouse-GeneMamba (seed paper 000): a Mamba-1 gene language model for mouse single-cell data.

``model_type="mouse_genemamba"``. Auto classes (registered by ``import hf_scfm``, and written into every
``config.json``'s ``auto_map`` for ``trust_remote_code`` loading): ``AutoConfig``, ``AutoModel``
(:class:`MouseGeneMambaModel`), ``AutoModelForCausalLM`` and ``AutoModelForPreTraining``
(:class:`MouseGeneMambaForCausalLM`), ``AutoModelForMaskedLM`` (:class:`MouseGeneMambaForMaskedLM`),
``AutoModelForSequenceClassification`` and ``hf_scfm.AutoModelForPerturbationPrediction``
(:class:`MouseGeneMambaForPerturbationPrediction`). Importing this package imports nothing heavy: classes load on
first access.

Five lines from real mouse cells to next-gene logits and cell embeddings::

    import hf_scfm
    adata = hf_scfm.load_example("baron_mouse")
    tok = hf_scfm.GeneTokenizer.from_species("mouse", encoding="rank"); tok.fit_medians(adata)
    config = hf_scfm.MouseGeneMambaConfig.from_preset("tiny", vocab_checksum=tok.vocab_checksum)
    out = hf_scfm.MouseGeneMambaForCausalLM(config)(**tok(adata[:8], max_length=128, return_tensors="pt"))

``out.logits`` ``[8, 128, 78323]`` are the next-gene logits and ``out.cell_embedding`` ``[8, 64]`` the cells.
"""

from typing import TYPE_CHECKING

from .. import lazy_exports

if TYPE_CHECKING:
    from .configuration_mouse_genemamba import *  # noqa: F401,F403
    from .modeling_mouse_genemamba import *  # noqa: F401,F403

__getattr__, __dir__ = lazy_exports(__name__, __file__, ("configuration_mouse_genemamba", "modeling_mouse_genemamba"))
