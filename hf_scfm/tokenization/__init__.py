"""Gene vocabulary (GENCODE human v48 / mouse M37), gene-ID mapping, and the :class:`GeneTokenizer`.

``import hf_scfm`` registers ``GeneTokenizer`` with ``AutoTokenizer`` (:func:`hf_scfm.modeling.register_auto_classes`),
so a saved tokenizer loads with ``AutoTokenizer.from_pretrained(dir)`` by the ``tokenizer_class`` name in its
``tokenizer_config.json`` (no model ``config.json`` needed).
"""

from .gene_tables import GeneTable, MappingReport, load_gene_table, map_genes
from .special_tokens import SPECIAL_TOKENS
from .tokenization_gene import ENCODINGS, GeneTokenizer


__all__ = ["ENCODINGS", "GeneTable", "GeneTokenizer", "MappingReport", "SPECIAL_TOKENS", "load_gene_table", "map_genes"]
