"""hf-scfm: single-cell foundation models with linear-cost backbones, the Hugging Face way.

Importing this package registers every configuration, model and tokenizer with the transformers
Auto classes. It stays light: scanpy, matplotlib and the CUDA kernels are imported where used.
"""

__version__ = "0.1.0.dev0"

from .data import load_example
from .modeling.mouse_genemamba import *  # noqa: F401,F403
from .modeling.cellfm import *  # noqa: F401,F403
from .modeling.scmamba2 import *  # noqa: F401,F403
from .modeling.lora import DEFAULT_LORA_TARGETS, default_lora_targets  # noqa: F401
from .tokenization import GeneTokenizer, MappingReport


def _register_gene_tokenizer() -> None:
    # Moved from hf_scfm/tokenization/__init__.py (that folder now travels as remote code and stays light). A
    # tokenizer-only folder loads with AutoTokenizer by the tokenizer_class name in its tokenizer_config.json.
    from transformers.models.auto import tokenization_auto

    tokenization_auto.REGISTERED_TOKENIZER_CLASSES.setdefault("GeneTokenizer", GeneTokenizer)


_register_gene_tokenizer()
