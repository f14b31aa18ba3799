"""Gene vocabulary (GENCODE human v48 / mouse M37), gene-ID mapping, and the :class:`GeneTokenizer`.

Importing this package registers ``GeneTokenizer`` with ``AutoTokenizer``, so a saved tokenizer loads
with ``AutoTokenizer.from_pretrained(dir)`` by the ``tokenizer_class`` name in its
``tokenizer_config.json`` (no model ``config.json`` needed).
"""

from .gene_tables import GeneTable, MappingReport, load_gene_table, map_genes
from .special_tokens import SPECIAL_TOKENS
from .tokenization_gene import ENCODINGS, GeneTokenizer


def _register_with_auto_tokenizer() -> None:
    # AutoTokenizer.register() needs a model config class; model families register their configs with
    # GeneTokenizer themselves. Registering the class by name is what lets a tokenizer-only folder load.
    from transformers.models.auto import tokenization_auto

    tokenization_auto.REGISTERED_TOKENIZER_CLASSES.setdefault("GeneTokenizer", GeneTokenizer)


_register_with_auto_tokenizer()

__all__ = ["ENCODINGS", "GeneTable", "GeneTokenizer", "MappingReport", "SPECIAL_TOKENS", "load_gene_table", "map_genes"]
