"""Gene vocabulary (GENCODE human v48 / mouse M37), gene-ID mapping, and the :class:`GeneTokenizer`.

The folder is self-contained: its modules import only each other (same-folder imports) and third-party
packages, so ``GeneTokenizer.save_pretrained`` can ship them as the tokenizer's remote code. Names are
exported lazily (importing this package imports neither transformers nor torch); registering
``GeneTokenizer`` with ``AutoTokenizer`` is done once, lazily, by :func:`hf_scfm.modeling.register_auto_classes`
(which ``import hf_scfm`` sets up).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "ENCODINGS": "tokenization_gene",
    "GeneTokenizer": "tokenization_gene",
    "GeneTable": "gene_tables",
    "MappingReport": "gene_tables",
    "load_gene_table": "gene_tables",
    "map_genes": "gene_tables",
    "SPECIAL_TOKENS": "special_tokens",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .gene_tables import GeneTable, MappingReport, load_gene_table, map_genes
    from .special_tokens import SPECIAL_TOKENS
    from .tokenization_gene import ENCODINGS, GeneTokenizer


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
