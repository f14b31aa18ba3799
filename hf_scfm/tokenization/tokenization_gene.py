"""``GeneTokenizer``: cells (AnnData or count matrix) -> cell sentences, as a transformers tokenizer.

The vocabulary is a ``tokenizers`` WordLevel model: the six special tokens of
:mod:`hf_scfm.tokenization.special_tokens` (ids 0..5) followed by the genes, as unversioned Ensembl IDs
sorted alphabetically. ``save_pretrained`` / ``push_to_hub`` write, all as JSON, ``tokenizer.json`` (the
vocabulary), ``tokenizer_config.json`` (the encoding settings, the gene subset, checksums and ``auto_map``),
``gene_table.json`` (the GENCODE rows the vocabulary's genes need to map symbols, see
:mod:`hf_scfm.tokenization.gene_tables`) and, once fitted, ``gene_medians.json``.

**Remote code.** The tokenizer travels as code too: ``GeneTokenizer`` is registered for ``AutoTokenizer``
(``register_for_auto_class``), so saving also copies this file and the same-folder modules it imports
(``encodings.py``, ``gene_tables.py``, ``anndata_io.py``, ``special_tokens.py``; this folder imports nothing else
of hf_scfm) and writes ``auto_map``. ``AutoTokenizer.from_pretrained(dir_or_repo)`` then returns a GeneTokenizer
after ``import hf_scfm`` (the installed class wins), and, where hf_scfm is not installed, with
``trust_remote_code=True`` (it needs numpy, scipy, pandas, anndata, h5py and tokenizers; numba is optional and
changes no result). Both encode cells to exactly the ids and values of the tokenizer that was saved.
A folder that cannot be a GeneTokenizer fails with an error naming the file: another tokenizer class, a
missing or garbled ``tokenizer.json``/``gene_table.json``/``gene_medians.json``, or checksums that disagree.

Calling the tokenizer on cells returns a :class:`~transformers.BatchEncoding` of ``input_ids`` (int64),
``values`` (float32) and ``attention_mask`` (int64), right-padded with ``<pad>`` (id 0, value 0.0). The
encodings (``rank``, ``binned``, ``continuous``) are defined in :mod:`hf_scfm.tokenization.encodings`.
Calling it on a string (or a list of strings) of gene IDs tokenizes text like any transformers tokenizer.

**Matrix in, arrays out.** With ``return_tensors=None`` (the default) and cells as input (AnnData, ``.h5ad``,
scipy sparse, ndarray, DataFrame), each key holds a list with **one NumPy array per cell** (int64 ids and mask,
float32 values), views into one padded ``[B, L]`` buffer (with ``padding=False``: into one flat buffer per
chunk of ``chunk_size`` cells), the way transformers' image processors and feature extractors answer
``return_tensors=None``; ``length`` stays a list of ints. Text input keeps Python lists. ``tokenizer.pad``,
``DataCollatorWithPadding``, the collators of :mod:`hf_scfm.data` and ``datasets.Dataset.from_dict`` /
``.map(batched=True)`` take the arrays as they take lists (``arr.tolist()`` gives the list); making millions
of Python numbers instead cost ~20x the encoding itself. ``return_tensors="np"`` / ``"pt"`` give the
stacked ``[B, L]`` arrays / tensors; :meth:`GeneTokenizer.encode_flat` the unpadded flat arrays.

Choices, written down:

* **Special tokens**: ``rank`` puts ``<bos>`` first and ``<eos>`` last; ``binned`` and ``continuous`` put
  ``<cls>`` first and nothing last. Configurable with ``prefix_tokens`` / ``suffix_tokens``.
  ``max_length`` counts every token, specials included.
* **Rank without medians** raises: ranking needs each gene's non-zero median over a corpus
  (:meth:`GeneTokenizer.fit_medians`). ``use_unit_medians()`` ranks by ``x_norm`` alone on purpose. Genes
  without a fitted median (never expressed in the fitting corpus) use a median of 1.0.
* **Duplicate genes after mapping** are summed, with a warning (see :mod:`gene_tables`).
* **Cells with no counts** are an error (see :mod:`hf_scfm.tokenization.anndata_io`).
* **Too few matching genes**: an error when under ``min_match_rate`` (default 0.5) of the input genes
  match or when fewer than ``min_genes`` (default 1) do.
* **A gene subset** (:meth:`GeneTokenizer.select_genes`, e.g. the highly variable genes of a reference via
  :meth:`GeneTokenizer.select_highly_variable_genes`) restricts which vocabulary genes are read, without
  changing the vocabulary (token ids, hence the model's embedding table, stay the same). It is saved in
  ``tokenizer_config.json``, so a fine-tuned model reads a query through the same genes it was trained on.
  With a subset, the match check asks for ``min_match_rate`` of the *selected* genes in the input (a query
  carries all its genes, most of them outside the subset).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import OrderedDict

import numpy as np
from transformers import BatchEncoding
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from .anndata_io import CountSource, declared_species, iter_count_chunks, log_normalize_counts, open_count_source
from .encodings import (
    ColumnMap,
    encode_binned,
    encode_continuous,
    encode_rank,
    encode_rank_flat,
    encode_sampled_flat,
    flatten_sentences,
    gather_entries,
    join_flat,
    pad_sentences,
    row_blocks,
    split_flat,
)
from .gene_tables import (
    GENE_TABLE_FILE,
    GeneTable,
    canonical_gene_ids,
    judge_species,
    load_gene_table,
    map_genes,
    normalize_species,
    read_gene_table,
    species_of_ids,
    write_gene_table,
)
from .special_tokens import (
    BOS_TOKEN,
    CLS_TOKEN,
    EOS_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    UNK_TOKEN,
)

ENCODINGS = ("rank", "binned", "continuous")
DEFAULT_SPECIALS = {"rank": ([BOS_TOKEN], [EOS_TOKEN]), "binned": ([CLS_TOKEN], []), "continuous": ([CLS_TOKEN], [])}
MEDIANS_FILE = "gene_medians.json"
_UNIT_MEDIAN = 1.0


def _checksum(tokens) -> str:
    return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()


class GeneTokenizer(TokenizersBackend):
    """Gene tokenizer of hf-scfm (see the module docstring for the format and the choices).

    Args:
        vocab: gene IDs (the special tokens are prepended if missing) or a ``{token: id}`` dict.
        medians_file: path of a ``gene_medians.json`` (set by ``from_pretrained``).
        gene_table_file: path of a ``gene_table.json`` (set by ``from_pretrained``): the table names are mapped
            through. Without it, the shipped GENCODE table of ``species``.
        encoding: ``"rank"`` (Mouse-GeneMamba), ``"binned"`` (SC-MAMBA2) or ``"continuous"`` (CellFM).
        species: ``"human"`` / ``"mouse"``: which GENCODE table maps symbols. None: guessed from the IDs.
        model_max_length: default ``max_length`` (all tokens, specials included). Default 2048.
        n_bins: bins of the ``binned`` encoding (values 0..n_bins-1, 0 = not expressed). Default 51.
        include_zero_genes: ``binned`` only: zero-expressed matched genes are candidates too (bin 0).
        seed: default seed of the per-cell sampling.
        prefix_tokens, suffix_tokens: special tokens before / after the genes (defaults per encoding).
        min_match_rate, min_genes: thresholds of the "too few genes match the vocabulary" error.
        ambiguous: ``"protein_coding"`` or ``"drop"``, see :mod:`hf_scfm.tokenization.gene_tables`.
        check_counts: require integer counts (default True); False accepts normalised non-log values.
        chunk_size: cells per processing chunk (bounds memory, does not change results).
        gene_subset: only these vocabulary genes (Ensembl IDs) are read from the input; None reads all.
            See :meth:`select_genes`.
        vocab_checksum, gene_table_checksum, has_medians: written to ``tokenizer_config.json`` by
            ``save_pretrained`` and checked when loading (a vocabulary, gene table or medians file that does
            not match raises).
    """

    vocab_files_names = {"tokenizer_file": "tokenizer.json", "medians_file": MEDIANS_FILE,
                         "gene_table_file": GENE_TABLE_FILE}
    model_input_names = ["input_ids", "values", "attention_mask"]
    padding_side = "right"
    model = None

    def __init__(
        self,
        vocab=None,
        medians_file: str | None = None,
        encoding: str = "rank",
        species: str | None = None,
        model_max_length: int = 2048,
        n_bins: int = 51,
        include_zero_genes: bool = False,
        seed: int = 0,
        prefix_tokens: list[str] | None = None,
        suffix_tokens: list[str] | None = None,
        min_match_rate: float = 0.5,
        min_genes: int = 1,
        ambiguous: str = "protein_coding",
        check_counts: bool = True,
        chunk_size: int = 2048,
        gene_subset: list[str] | None = None,
        gene_table_file: str | None = None,
        vocab_checksum: str | None = None,
        gene_table_checksum: str | None = None,
        has_medians: bool = False,
        **kwargs,
    ):
        from tokenizers import Tokenizer, models, pre_tokenizers

        if vocab is None:
            raise ValueError("GeneTokenizer needs a vocabulary: use GeneTokenizer.from_species('human'|'mouse'), "
                             "GeneTokenizer.from_genes(ids) or AutoTokenizer.from_pretrained(dir).")
        if isinstance(vocab, dict):
            tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
            if [vocab[t] for t in tokens] != list(range(len(tokens))):
                raise ValueError("The vocabulary ids are not contiguous 0..n-1.")
        else:
            tokens = [str(t) for t in vocab]
            if tokens[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
                tokens = SPECIAL_TOKENS + tokens
        if tokens[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise ValueError(f"The vocabulary must start with the special tokens {SPECIAL_TOKENS}.")
        if len(set(tokens)) != len(tokens):
            raise ValueError("The vocabulary has duplicate tokens.")
        if encoding not in ENCODINGS:
            raise ValueError(f"Unknown encoding {encoding!r}; choose one of {ENCODINGS}.")
        if n_bins < 2:
            raise ValueError(f"n_bins must be >= 2 (bin 0 = not expressed), got {n_bins}.")
        self._tokens = tokens
        self._token_to_id = {t: i for i, t in enumerate(tokens)}
        source = kwargs.get("name_or_path") or "the saved tokenizer"
        if vocab_checksum is not None and vocab_checksum != self.vocab_checksum:
            raise ValueError(f"The vocabulary of {source} (tokenizer.json) does not match the vocab_checksum of its "
                             "tokenizer_config.json: one of the two files was changed or replaced. Save the tokenizer "
                             "again (tokenizer.save_pretrained) or download both files again.")
        genes = tokens[len(SPECIAL_TOKENS):]
        if species is None:
            species = species_of_ids(genes)
        self.species = normalize_species(species) if species is not None else None
        self._gene_table = self._saved_gene_table(gene_table_file, gene_table_checksum, source)
        self.encoding = encoding
        self.n_bins = int(n_bins)
        self.include_zero_genes = bool(include_zero_genes)
        self.seed = int(seed)
        default_prefix, default_suffix = DEFAULT_SPECIALS[encoding]
        self.prefix_tokens = list(default_prefix if prefix_tokens is None else prefix_tokens)
        self.suffix_tokens = list(default_suffix if suffix_tokens is None else suffix_tokens)
        for t in self.prefix_tokens + self.suffix_tokens:
            if t not in SPECIAL_TOKENS:
                raise ValueError(f"prefix/suffix tokens must be special tokens {SPECIAL_TOKENS}, got {t!r}.")
        self.min_match_rate = float(min_match_rate)
        self.min_genes = int(min_genes)
        self.ambiguous = ambiguous
        self.check_counts = bool(check_counts)
        self.chunk_size = int(chunk_size)
        self._medians = np.full(len(tokens), np.nan)
        self.medians_fitted = False
        self._medians_info: dict = {}
        self._column_cache: OrderedDict = OrderedDict()
        self.gene_subset, self._selected = self._checked_subset(gene_subset)
        if medians_file is not None and os.path.isfile(medians_file):
            self._load_medians(medians_file)
        elif has_medians:
            raise ValueError(f"The tokenizer_config.json of {source} says the tokenizer has fitted gene medians, but "
                             f"{MEDIANS_FILE} is missing beside it. Copy or download {MEDIANS_FILE} too, or fit the "
                             "medians again (tokenizer.fit_medians(...)).")

        backend = Tokenizer(models.WordLevel(self._token_to_id, unk_token=UNK_TOKEN))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        kwargs.pop("tokenizer_file", None)
        for key, tok in (("pad_token", PAD_TOKEN), ("mask_token", MASK_TOKEN), ("cls_token", CLS_TOKEN),
                         ("eos_token", EOS_TOKEN), ("unk_token", UNK_TOKEN), ("bos_token", BOS_TOKEN)):
            kwargs.setdefault(key, tok)
        super().__init__(
            tokenizer_object=backend,
            encoding=encoding,
            species=self.species,
            model_max_length=model_max_length,
            n_bins=self.n_bins,
            include_zero_genes=self.include_zero_genes,
            seed=self.seed,
            prefix_tokens=self.prefix_tokens,
            suffix_tokens=self.suffix_tokens,
            min_match_rate=self.min_match_rate,
            min_genes=self.min_genes,
            ambiguous=ambiguous,
            check_counts=self.check_counts,
            chunk_size=self.chunk_size,
            gene_subset=self.gene_subset,
            **kwargs,
        )

    # ------------------------------------------------------------------ construction, saving, loading
    @classmethod
    def from_species(cls, species: str, encoding: str = "rank", genes=None, **settings) -> "GeneTokenizer":
        """The default tokenizer of ``species`` ("human": GENCODE v48, "mouse": GENCODE M37).

        ``genes`` restricts the vocabulary to those genes (IDs or symbols), see :meth:`from_genes`.
        ``settings`` are the constructor's keyword arguments (``model_max_length``, ``n_bins``, ...).
        """
        species = normalize_species(species)
        if genes is not None:
            return cls.from_genes(genes, species=species, encoding=encoding, **settings)
        return cls(vocab=list(load_gene_table(species).ids), encoding=encoding, species=species, **settings)

    @classmethod
    def from_genes(cls, genes, species: str | None = None, encoding: str = "rank", **settings) -> "GeneTokenizer":
        """A tokenizer over a custom gene list (e.g. a smaller vocabulary for a small model).

        ``genes``: Ensembl IDs (versioned or not) or, with ``species``, symbols. They are mapped to
        unversioned IDs and sorted; unknown or ambiguous names raise.
        """
        genes = [str(g) for g in genes]
        if species is None:
            species = species_of_ids(genes)
        table = load_gene_table(species) if species is not None else None
        ids, reasons, _, _ = canonical_gene_ids(genes, table)
        bad = [(g, r) for g, i, r in zip(genes, ids, reasons) if i is None]
        if bad:
            raise ValueError(f"{len(bad)} of {len(genes)} genes cannot be mapped to Ensembl IDs"
                             f"{' of ' + species if species else ''}: "
                             + ", ".join(f"{g} ({r})" for g, r in bad[:5])
                             + ". Pass Ensembl IDs, or symbols with species='human'|'mouse'.")
        return cls(vocab=sorted(set(ids)), encoding=encoding, species=species, **settings)

    @classmethod
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        """Loading: read the WordLevel vocabulary from ``tokenizer.json`` (the rest comes from the config)."""
        path = kwargs.pop("tokenizer_file", None)
        if kwargs.get("vocab") is None and path is not None and os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                kwargs["vocab"] = json.load(fh)["model"]["vocab"]
        return kwargs

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``transformers``' ``save_pretrained`` (``push_to_hub`` calls it too), with the checksums and the medians
        flag added to ``tokenizer_config.json`` for the checks on loading. They are added for the save only: the
        init kwargs (what the corpus builder compares as the tokenizer's settings) stay as they were."""
        init_kwargs = self.init_kwargs
        self.init_kwargs = {**init_kwargs, "vocab_checksum": self.vocab_checksum,
                            "gene_table_checksum": self.gene_table_checksum, "has_medians": self.medians_fitted}
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.init_kwargs = init_kwargs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *init_inputs, **kwargs):
        """``transformers``' ``from_pretrained``; a garbled ``tokenizer_config.json`` (which it parses first) is
        named in the error. Every other check is in :meth:`_from_pretrained` and ``__init__``."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *init_inputs, **kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(f"{pretrained_model_name_or_path}: tokenizer_config.json is not valid JSON ({err}). Save "
                             "the tokenizer again (tokenizer.save_pretrained) or download the file again.") from err

    @classmethod
    def _from_pretrained(cls, resolved_vocab_files, pretrained_model_name_or_path, init_configuration, *init_inputs,
                         **kwargs):
        """Refuse, with the reason, a folder that does not hold a GeneTokenizer (before transformers reads it)."""
        _check_saved_tokenizer(resolved_vocab_files, pretrained_model_name_or_path)
        return super()._from_pretrained(resolved_vocab_files, pretrained_model_name_or_path, init_configuration,
                                        *init_inputs, **kwargs)

    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        file_names = super()._save_pretrained(save_directory, file_names, legacy_format, filename_prefix)
        prefix = filename_prefix + "-" if filename_prefix else ""
        if self._vocabulary_table is not None:
            path = os.path.join(str(save_directory), prefix + GENE_TABLE_FILE)
            write_gene_table(self._vocabulary_table, path)
            file_names = file_names + (path,)
        if self.medians_fitted:
            path = os.path.join(str(save_directory), prefix + MEDIANS_FILE)
            fitted = np.flatnonzero(np.isfinite(self._medians))
            payload = {
                "description": "Per-gene median of the non-zero x_norm = counts / n_counts * 10000 (rank encoding).",
                "vocab_checksum": self.vocab_checksum,
                **self._medians_info,
                "medians": {self._tokens[i]: float(self._medians[i]) for i in fitted},
            }
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, indent=0)
            file_names = file_names + (path,)
        return file_names

    def _load_medians(self, path: str) -> None:
        fix = "Save the tokenizer again (tokenizer.save_pretrained) or download the file again."
        try:
            with open(path, encoding="utf-8") as fh:
                payload = json.load(fh)
            medians = payload["medians"]
            if not isinstance(medians, dict):
                raise TypeError("'medians' is not a {gene: median} object")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a readable gene medians file ({type(err).__name__}: {err}). "
                             f"{fix}") from err
        if payload.get("vocab_checksum", self.vocab_checksum) != self.vocab_checksum:
            raise ValueError(f"{path} was fitted for another vocabulary (its vocab_checksum differs from this "
                             f"tokenizer's). {fix}")
        self.set_medians(medians, info={k: v for k, v in payload.items()
                                        if k not in ("medians", "vocab_checksum", "description")})

    # ------------------------------------------------------------------ gene table
    def _saved_gene_table(self, path, checksum, source) -> GeneTable | None:
        """The ``gene_table.json`` a folder was saved with (checked), or None (use the shipped table lazily)."""
        if path is None or not os.path.isfile(path):
            if checksum is not None:
                raise ValueError(f"The tokenizer_config.json of {source} names a gene table (gene_table_checksum) but "
                                 f"{GENE_TABLE_FILE} is missing beside it. Copy or download {GENE_TABLE_FILE} too.")
            return None
        table = read_gene_table(path)
        if checksum is not None and table.checksum != checksum:
            raise ValueError(f"{path} is not the gene table this tokenizer was saved with (its checksum differs from "
                             "gene_table_checksum in tokenizer_config.json). Download both files again.")
        if self.species is not None and table.species != self.species:
            raise ValueError(f"{path} is the {table.species} gene table but the tokenizer is {self.species}.")
        return table

    @property
    def gene_table(self) -> GeneTable | None:
        """The table input gene names are mapped through: the one saved with the tokenizer, else the shipped
        GENCODE table of ``species``; None for a tokenizer without species (Ensembl IDs only)."""
        if self._gene_table is None and self.species is not None:
            self._gene_table = load_gene_table(self.species)
        return self._gene_table

    @property
    def _vocabulary_table(self) -> GeneTable | None:
        """The rows of :attr:`gene_table` this vocabulary needs (what ``save_pretrained`` writes), computed once."""
        if not hasattr(self, "_vocabulary_table_cache"):
            table = self.gene_table
            self._vocabulary_table_cache = table.for_vocabulary(self.genes) if table is not None else None
        return self._vocabulary_table_cache

    @property
    def gene_table_checksum(self) -> str | None:
        """Checksum of the gene table ``save_pretrained`` writes (None without species)."""
        table = self._vocabulary_table
        return table.checksum if table is not None else None

    @property
    def has_medians(self) -> bool:
        """Whether medians are fitted (saved in ``tokenizer_config.json``: loading checks the medians file is there)."""
        return self.medians_fitted

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_checksum(self) -> str:
        """sha256 (hex) of the tokens in id order, joined by newlines: identifies the vocabulary."""
        if not hasattr(self, "_checksum_cache"):
            self._checksum_cache = _checksum(self._tokens)
        return self._checksum_cache

    @property
    def genes(self) -> list[str]:
        """The gene tokens (unversioned Ensembl IDs) in id order."""
        return self._tokens[len(SPECIAL_TOKENS):]

    def __len__(self) -> int:
        return len(self._tokens)

    def _checked_subset(self, genes):
        """``(sorted unique Ensembl IDs, frozenset of their token ids)`` of a gene subset (``(None, None)`` for
        None); symbols are mapped with the species table; genes outside the vocabulary raise."""
        if genes is None:
            return None, None
        genes = [str(g) for g in genes]
        ids, reasons, _, _ = canonical_gene_ids(genes, self.gene_table, self.ambiguous)
        bad = [f"{g} ({r if i is None else 'not in vocabulary'})" for g, i, r in zip(genes, ids, reasons)
               if i is None or i not in self._token_to_id]
        if bad:
            raise ValueError(f"{len(bad)} of the {len(genes)} selected genes are not genes of this tokenizer's "
                             f"vocabulary: {', '.join(bad[:5])}. Select among tokenizer.genes.")
        ids = sorted(set(ids))
        if not ids:
            raise ValueError("The gene subset is empty; pass at least one gene, or None to read all genes.")
        return ids, frozenset(self._token_to_id[i] for i in ids)

    def select_genes(self, genes) -> None:
        """Read only ``genes`` (Ensembl IDs or symbols of the vocabulary) from now on; None reads all again.

        The vocabulary and the token ids do not change, so a model keeps its embedding table; the subset
        is saved by ``save_pretrained`` (``tokenizer_config.json``) and applies to every later call, the
        corpus builder and fine-tuning included.
        """
        self.gene_subset, self._selected = self._checked_subset(genes)
        self.init_kwargs["gene_subset"] = self.gene_subset
        self._column_cache.clear()
        self._last_column_map = None

    #: ``flavor`` values of :meth:`select_highly_variable_genes` (scanpy's): on raw counts, or on log1p(CP10k).
    HVG_FLAVORS = ("pearson_residuals", "seurat_v3", "seurat", "cell_ranger")

    def select_highly_variable_genes(self, data, n_top_genes: int, batch_key: str | None = None,
                                     layer: str | None = None, flavor: str = "pearson_residuals") -> list[str]:
        """Select the ``n_top_genes`` most variable genes of ``data`` (raw counts) among those that map to the
        vocabulary, and return their Ensembl IDs (see :meth:`select_genes`).

        ``flavor`` is one of scanpy's: ``"pearson_residuals"`` (default; ``scanpy.experimental.pp.
        highly_variable_genes``: genes ranked by the variance of their analytic Pearson residuals under a
        negative-binomial null, theta 100, on the raw counts), ``"seurat_v3"`` (variance of the standardised raw
        counts; needs ``scikit-misc``), or on ``log1p(counts / n_counts * 1e4)`` the dispersion-based ``"seurat"``
        and ``"cell_ranger"``. With ``batch_key`` genes are ranked per batch and combined (scanpy's way). ``data``:
        an AnnData or an ``.h5ad`` path, read in chunks into one sparse matrix of the mapped genes (the counts are
        checked as for encoding).

        Why Pearson residuals by default: the dispersion flavours normalise each gene's dispersion within bins of
        mean expression, so a gene that is very highly expressed in one cell type and ambient elsewhere (INS,
        GCG, SST in pancreas: the markers of B, A and D cells) looks ordinary among the top-mean genes and is
        dropped; residual variance grows with how far the counts stray from a common expression level across
        cells, so those markers rank first. On Baron human (train donors human1-3, 1,000 genes) ``seurat`` per
        donor drops INS, GCG and SST; Pearson residuals keep them and PPY, PRSS1, KRT19 (a test pins it).
        """
        try:
            import anndata
            import scanpy as sc
        except ImportError as err:
            raise ImportError("select_highly_variable_genes needs scanpy: pip install -e \".[plots]\"") from err
        import pandas as pd
        import scipy.sparse as sp

        if n_top_genes < 1:
            raise ValueError(f"n_top_genes must be >= 1, got {n_top_genes}.")
        if flavor not in self.HVG_FLAVORS:
            raise ValueError(f"Unknown flavor {flavor!r} for select_highly_variable_genes; choose one of "
                             f"{self.HVG_FLAVORS}.")
        on_counts = flavor in ("pearson_residuals", "seurat_v3")
        previous = self.gene_subset
        self.select_genes(None)  # rank among all vocabulary genes of the input
        try:
            src = open_count_source(data, layer=layer)
            colmap, report = self._column_map(src.var_names)
            self._check_match(report, src.species)
            columns = np.flatnonzero(colmap.matched)
            blocks, obs = [], []
            for counts, chunk_obs in iter_count_chunks(src, self.chunk_size, check_counts=self.check_counts):
                block = counts[:, columns]
                blocks.append(sp.csr_matrix(block, dtype=np.float32) if on_counts
                              else log_normalize_counts(block, chunk_obs["n_counts"].to_numpy()))
                obs.append(chunk_obs)
            obs = pd.concat(obs)
            if batch_key is not None and batch_key not in obs.columns:
                raise ValueError(f"batch_key {batch_key!r} is not an obs column (columns: {list(obs.columns)}).")
        except BaseException:
            self.select_genes(previous)  # a failed selection leaves the tokenizer as it was
            raise
        names = [str(src.var_names[c]) for c in columns]
        adata = anndata.AnnData(sp.vstack(blocks).tocsr(), obs=obs.set_axis(np.arange(len(obs)).astype(str)),
                                var=pd.DataFrame(index=pd.Index(names).astype(str)))
        adata.var_names_make_unique()
        n_top = min(int(n_top_genes), adata.n_vars)
        if flavor == "pearson_residuals":
            sc.experimental.pp.highly_variable_genes(adata, n_top_genes=n_top, flavor=flavor, batch_key=batch_key)
        else:
            sc.pp.highly_variable_genes(adata, n_top_genes=n_top, flavor=flavor, batch_key=batch_key)
        chosen = [names[i] for i in np.flatnonzero(adata.var["highly_variable"].to_numpy())]
        self.select_genes(chosen)
        return list(self.gene_subset)

    @property
    def encoding_settings(self) -> dict:
        """The settings that decide what a model reads from this tokenizer besides the vocabulary: ``encoding``,
        ``n_bins`` (binned), ``include_zero_genes``, the checksum of the ``gene_subset`` (None: all genes) and of
        the fitted medians (rank). A model's config records them when first paired with a tokenizer
        (:func:`hf_scfm.modeling.configuration_utils.check_tokenizer_matches`) and every later pairing compares."""
        settings = {"encoding": self.encoding}
        if self.encoding == "binned":
            settings.update(n_bins=self.n_bins, include_zero_genes=self.include_zero_genes)
        settings["gene_subset_checksum"] = None if self.gene_subset is None else _checksum(self.gene_subset)
        if self.encoding == "rank":
            medians = self.gene_medians
            settings["medians_checksum"] = (hashlib.sha256(json.dumps(sorted(medians.items())).encode()).hexdigest()
                                            if medians else None)
        return settings

    # ------------------------------------------------------------------ medians
    @property
    def gene_medians(self) -> dict[str, float]:
        """Fitted non-zero medians of x_norm per gene token (empty until fitted)."""
        return {self._tokens[i]: float(self._medians[i]) for i in np.flatnonzero(np.isfinite(self._medians))}

    def set_medians(self, medians: dict[str, float], info: dict | None = None) -> None:
        """Set the rank-encoding medians from ``{gene ID: median}`` (genes absent from the vocabulary ignored)."""
        arr = np.full(len(self._tokens), np.nan)
        for gene, value in medians.items():
            i = self._token_to_id.get(gene)
            if i is not None:
                if not (value > 0 and np.isfinite(value)):
                    raise ValueError(f"Median of {gene} must be positive and finite, got {value}.")
                arr[i] = value
        self._medians = arr
        self.medians_fitted = True
        self._medians_info = dict(info or {})

    def use_unit_medians(self) -> None:
        """Rank by ``x_norm`` alone (every median 1.0): a deliberate choice when no corpus is at hand."""
        self.set_medians({}, info={"unit_medians": True})

    def _median_array(self) -> np.ndarray:
        if not self.medians_fitted:
            raise ValueError(
                "The rank encoding needs per-gene medians and this tokenizer has none. Call "
                "tokenizer.fit_medians(adata_or_h5ad_paths) on your (pretraining) cells, load a tokenizer saved "
                "with medians, or call tokenizer.use_unit_medians() to rank by normalised expression alone."
            )
        return np.where(np.isfinite(self._medians), self._medians, _UNIT_MEDIAN)

    def fit_medians(self, data, chunk_size: int | None = None, layer: str | None = None,
                    check_counts: bool | None = None) -> dict[str, float]:
        """Fit the per-gene median of non-zero ``x_norm`` over one or many datasets, in chunks.

        ``data``: an AnnData (in memory or backed), an ``.h5ad`` path, or a list of them. Each file is read
        ``chunk_size`` cells at a time (never densified). Medians are exact (of the float32 ``x_norm``
        values; an even count averages the two middle values): every non-zero value is kept as one packed
        8-byte key (gene, value) and one ``np.sort`` yields all medians. Memory therefore grows as 8 bytes
        (16 at the final concatenation) per non-zero entry of the whole input, about 16-32 MB per 1,000
        cells of 2,000 expressed genes: fine for the bundled data and corpora up to ~10^8 non-zeros; for
        larger corpora fit on a random sample of cells (the medians of a large sample are stable).
        Genes never expressed in ``data`` get no median (1.0 is used for them when encoding).
        Returns the medians and sets them on the tokenizer.
        """
        sources = data if isinstance(data, (list, tuple)) else [data]
        check = self.check_counts if check_counts is None else check_counts
        keys, n_cells = [], 0
        for source in sources:
            src = open_count_source(source, layer=layer)
            colmap, report = self._column_map(src.var_names)
            self._check_species(report, src.species)
            for counts, obs in iter_count_chunks(src, chunk_size or self.chunk_size, check_counts=check):
                entries = gather_entries(counts, colmap, obs["n_counts"].to_numpy())
                xn = entries.x_norm().astype(np.float32)
                keys.append((entries.token.astype(np.uint64) << np.uint64(32)) | xn.view(np.uint32).astype(np.uint64))
                n_cells += counts.shape[0]
        key = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        key.sort()
        token = (key >> np.uint64(32)).astype(np.int64)
        value = (key & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32).astype(np.float64)
        starts = np.flatnonzero(np.concatenate(([True], token[1:] != token[:-1]))) if len(key) else np.zeros(0, int)
        n = np.diff(np.append(starts, len(key)))
        lo, hi = starts + (n - 1) // 2, starts + n // 2
        medians = (value[lo] + value[hi]) / 2.0
        result = {self._tokens[t]: float(m) for t, m in zip(token[starts], medians)}
        self.set_medians(result, info={"n_cells": int(n_cells), "n_sources": len(sources)})
        return result

    # ------------------------------------------------------------------ gene mapping
    def _column_map(self, var_names):
        """``(ColumnMap, MappingReport)`` for these input genes; cached per distinct ``var_names`` (and by
        identity for a tuple passed again, chunk after chunk: no pass over the names)."""
        last = getattr(self, "_last_column_map", None)
        if last is not None and last[0] is var_names:
            return last[1]
        key = tuple(var_names)
        if set(map(type, key)) != {str}:  # usually already str (open_count_source): no per-name str() then
            key = tuple(str(v) for v in key)
        cached = self._column_cache.get(key)
        if cached is not None:
            self._column_cache.move_to_end(key)
            self._remember_names(var_names, cached)
            return cached
        token_ids, report = map_genes(key, self._token_to_id, self.gene_table, self.ambiguous, self._selected)
        if report.duplicates:
            ex = ", ".join(f"{g}->{t}" for g, t in list(report.duplicates.items())[:3])
            warnings.warn(f"{len(report.duplicates)} input genes map to a token another input gene already maps to "
                          f"(e.g. {ex}); their counts are summed into that token.", stacklevel=3)
        result = (ColumnMap.from_token_ids(token_ids), report)
        self._remember_names(var_names, result)
        self._column_cache[key] = result
        while len(self._column_cache) > 8:
            self._column_cache.popitem(last=False)
        return result

    def _remember_names(self, var_names, result) -> None:
        """Identity cache of :meth:`_column_map` for a tuple of names (immutable: the same object is the same
        genes), e.g. the corpus builder passing one source's names with every chunk."""
        self._last_column_map = (var_names, result) if isinstance(var_names, tuple) else None

    def _names_and_species(self, data, gene_ids=None):
        """``(gene names, declared species or None)`` of ``data`` (AnnData, h5ad path, or a list of gene names)."""
        if isinstance(data, (list, tuple)) and gene_ids is None:
            return data, None
        if gene_ids is not None:
            return gene_ids, declared_species(data)
        src = open_count_source(data)
        return src.var_names, src.species

    def mapping_report(self, data, gene_ids=None):
        """The :class:`MappingReport` of ``data``'s genes (AnnData, h5ad path, or a list of gene names)."""
        return self._column_map(self._names_and_species(data, gene_ids)[0])[1]

    def check_genes(self, data, gene_ids=None):
        """The :class:`MappingReport` of ``data``'s genes; ``ValueError`` naming the problem and the fix when they
        are another species' genes or too few of them match (the checks every encoding call makes, available
        before any work is done)."""
        names, species = self._names_and_species(data, gene_ids)
        report = self._column_map(names)[1]
        self._check_match(report, species)
        return report

    def _check_species(self, report, declared: str | None = None) -> None:
        """``ValueError`` when the input's genes are another species' than this tokenizer's vocabulary.

        Decided by evidence (:func:`~hf_scfm.tokenization.gene_tables.judge_species`): the species the data
        declares (``uns["species"]``), Ensembl ID prefixes, the letter case of the symbols and, when those do not
        decide, how many names each species' GENCODE table matches. Symbols of the two species often agree up to
        case (``INS`` / ``Ins``), so matching alone would read a mouse cell into a human model without a word.
        """
        evidence = report.species_evidence
        if self.species is None or evidence is None:
            return
        evidence = evidence.with_declared(declared)
        found, clues = judge_species(evidence, self.species, self._species_table)
        if found is None:
            return
        fixes = []
        if found in ("human", "mouse"):
            fixes.append(f"use a {found} model and tokenizer (GeneTokenizer.from_species({found!r}, ...))")
            fixes.append(f"map the genes to their one-to-one {self.species} orthologs on purpose: adata = "
                         f"hf_scfm.map_orthologs(adata, source={found!r}, target={self.species!r})")
        else:
            fixes.append("build a tokenizer of that species' Ensembl IDs (GeneTokenizer.from_genes(ids)) and a model "
                         "for it")
        if evidence.declared is not None:
            fixes.append(f"if the genes are {self.species} after all, set adata.uns['species'] = {self.species!r}")
        raise ValueError(
            f"The input's genes look like {found} genes, but this tokenizer's vocabulary is {self.species} "
            f"({len(self.genes):,} genes): {'; '.join(clues)}. Gene symbols of human and mouse often agree up to "
            f"case, so the genes would match and the cells be read wrongly. Fix: {'; or '.join(fixes)}."
        )

    def _species_table(self, species: str) -> GeneTable:
        """The full GENCODE table of ``species``; for this tokenizer's own species, where hf_scfm's tables are not
        installed (remote code), the table saved with it."""
        try:
            return load_gene_table(species)
        except FileNotFoundError:
            if species == self.species and self.gene_table is not None:
                return self.gene_table
            raise

    def _check_match(self, report, declared_species: str | None = None) -> None:
        self._check_species(report, declared_species)
        rate = report.match_rate if self.gene_subset is None else report.n_tokens / len(self.gene_subset)
        if report.n_tokens >= self.min_genes and rate >= self.min_match_rate and report.n_tokens > 0:
            return
        if self.gene_subset is not None:
            examples = ", ".join(self.gene_subset[:5])
            raise ValueError(
                f"Only {report.n_tokens:,} of this tokenizer's {len(self.gene_subset):,} selected genes "
                f"({rate:.1%}) are in the input's {report.n_input:,} genes (needs >= {self.min_match_rate:.0%}). "
                f"Selected e.g.: {examples}. Check the species and that var_names hold gene symbols or Ensembl IDs "
                "(adata.var_names = adata.var['gene_ids']); the query must measure the genes the model was "
                "trained on."
            )
        examples = ", ".join(report.examples(n=5))
        raise ValueError(
            f"Only {report.n_matched:,} of {report.n_input:,} input genes ({report.match_rate:.1%}) match this "
            f"tokenizer's {self.species or 'custom'} vocabulary (needs >= {self.min_match_rate:.0%} and >= "
            f"{self.min_genes} genes). Unmatched e.g.: {examples}. Check the species (for another species use a "
            "model and tokenizer of it), and that var_names hold gene symbols or Ensembl IDs (if the IDs are in a "
            "var column: adata.var_names = adata.var['gene_ids']); lower the threshold with min_match_rate=... if "
            "intended."
        )

    # ------------------------------------------------------------------ encoding cells
    def __call__(self, cells=None, gene_ids=None, *, max_length: int | None = None, padding=True,
                 truncation=True, return_tensors=None, seed: int | None = None, layer: str | None = None,
                 n_counts=None, check_counts: bool | None = None, chunk_size: int | None = None,
                 return_length: bool = False, **kwargs) -> BatchEncoding:
        """Encode cells into sentences (see the class docstring); strings are tokenized as text.

        Args:
            cells: AnnData (dense / CSR / CSC, in memory or backed), ``.h5ad`` path, count matrix
                (numpy or scipy sparse, cells x genes, with ``gene_ids``), or pandas DataFrame.
            gene_ids: gene names of the matrix columns (Ensembl IDs or symbols).
            max_length: tokens per sentence, specials included (default ``model_max_length``).
            padding: True / "longest" pads to the longest sentence, "max_length" to ``max_length``,
                False returns one unpadded array per cell.
            truncation: True cuts each cell to ``max_length`` as its encoding says (top-ranked genes for
                ``rank``, a seeded sample otherwise); False keeps every expressed gene.
            return_tensors: "pt", "np" or None (a list with one NumPy array per cell: see the module docstring).
            seed: sampling seed (default: the tokenizer's ``seed``).
            layer: AnnData layer holding the counts (default ``X``).
            n_counts: library sizes (default ``obs["n_counts"]`` if present, else row sums).
            check_counts: override the tokenizer's integer-count check.
            return_length: also return ``length`` (tokens per cell, specials included).
        """
        if isinstance(cells, str) and not (cells.endswith(".h5ad") or os.path.exists(cells)) or (
            isinstance(cells, (list, tuple)) and cells and isinstance(cells[0], str)
        ):
            return super().__call__(cells, max_length=max_length, padding=padding, truncation=truncation,
                                    return_tensors=return_tensors, **kwargs)
        if kwargs:
            raise TypeError(f"Unexpected arguments for encoding cells: {sorted(kwargs)}.")
        max_length = int(max_length or self.model_max_length)
        unpadded = padding is False or padding == "do_not_pad"
        if unpadded and return_tensors is not None:
            raise ValueError("padding=False gives sentences of different lengths, which cannot be stacked into "
                             "tensors; use padding=True or return_tensors=None.")
        parts, _, _ = self._encode_sentences(cells, gene_ids, max_length=max_length, truncation=truncation, seed=seed,
                                             layer=layer, n_counts=n_counts, check_counts=check_counts,
                                             chunk_size=chunk_size, ids_dtype=np.int64)
        if unpadded:  # one array per cell, views into the flat buffers of each chunk (no padded array is made)
            data = {"input_ids": [], "values": [], "attention_mask": []}
            for offsets, ids, values, _ in parts:
                data["input_ids"] += split_flat(ids, offsets)
                data["values"] += split_flat(values, offsets)
                data["attention_mask"] += split_flat(np.ones(len(ids), dtype=np.int64), offsets)
            if return_length:
                data["length"] = np.concatenate([p[3] for p in parts]).tolist() if parts else []
            return BatchEncoding(data)
        width = max((int(p[3].max(initial=0)) for p in parts), default=0)
        if padding == "max_length":
            width = max(width, max_length)  # max_length counts specials; a longer sentence (truncation=False) wins
        ids, values, mask, total = pad_sentences(parts, width)
        data = {"input_ids": ids, "values": values, "attention_mask": mask}
        if return_length:
            data["length"] = total
        if return_tensors is None:  # matrix in, arrays out: one row view per cell, as image processors answer
            data = {k: (list(v) if k != "length" else v.tolist()) for k, v in data.items()}
            return BatchEncoding(data)
        return BatchEncoding(data, tensor_type=return_tensors)

    def _encode_sentences(self, cells, gene_ids=None, *, max_length: int, truncation=True, seed=None, layer=None,
                          n_counts=None, check_counts=None, chunk_size=None, ids_dtype=np.int32):
        """``(sentences per chunk, prefix ids, suffix ids)`` of ``cells`` (see :meth:`__call__`): per chunk the flat
        arrays of :func:`encodings.flatten_sentences` (specials included, ``ids_dtype`` ids)."""
        prefix = [self._token_to_id[t] for t in self.prefix_tokens]
        suffix = [self._token_to_id[t] for t in self.suffix_tokens]
        n_genes = max_length - len(prefix) - len(suffix) if truncation else np.iinfo(np.int32).max
        if n_genes < 1:
            raise ValueError(f"max_length={max_length} leaves no room for genes after {len(prefix) + len(suffix)} "
                             "special tokens.")
        seed = self.seed if seed is None else int(seed)
        check = self.check_counts if check_counts is None else check_counts
        medians = self._median_array() if self.encoding == "rank" else None

        src = cells if isinstance(cells, CountSource) else open_count_source(cells, gene_ids, layer, n_counts)
        colmap, report = self._column_map(src.var_names)
        self._check_match(report, src.species)
        rows_per_chunk = int(chunk_size or self.chunk_size)
        if self.encoding == "binned" and self.include_zero_genes:
            rows_per_chunk = max(1, min(rows_per_chunk, (1 << 23) // max(1, len(colmap.tokens))))
        sentences, empty = [], []
        for counts, obs in iter_count_chunks(src, rows_per_chunk, check_counts=check):
            lib = obs["n_counts"].to_numpy()
            sampled = self.encoding == "continuous" or (self.encoding == "binned" and not self.include_zero_genes)
            part = None
            if sampled:  # compiled, straight into the flat output (None: numba missing or disabled)
                part = encode_sampled_flat(counts, colmap, n_genes, seed,
                                               self.n_bins if self.encoding == "binned" else None, n_counts=lib,
                                               prefix=prefix, suffix=suffix, ids_dtype=ids_dtype)
            if part is None:
                part = self._encode_chunk(counts, colmap, lib, medians, n_genes, seed, prefix, suffix, ids_dtype)
            sentences.append(part)
            # cells without a matched count: no genes in the sentence (with zero genes included: count them)
            if self.encoding == "binned" and self.include_zero_genes:
                no_genes = _rows_without_matched_counts(counts, colmap)
            else:
                no_genes = part[3] == len(prefix) + len(suffix)
            if no_genes.any():
                empty.extend(obs.index[no_genes])
        if empty:
            warnings.warn(_empty_cells_message(len(empty), src.n_obs, empty), EmptyCellWarning, stacklevel=3)
        return sentences, prefix, suffix

    def _encode_chunk(self, counts, colmap, lib, medians, n_genes, seed, prefix, suffix, ids_dtype):
        """Flat sentences of one CSR chunk through the NumPy paths (see :meth:`_encode_sentences`): ``rank`` straight
        from the CSR chunk (:func:`encodings.encode_rank_csr`), the rest (and ``rank`` when input columns must be
        summed) over the canonical entries of :func:`encodings.gather_entries`."""
        if self.encoding == "rank":
            flat = encode_rank_flat(counts, colmap, lib, medians, n_genes, prefix, suffix, ids_dtype)
            if flat is not None:
                return flat
        entries = gather_entries(counts, colmap, lib)
        if self.encoding == "rank":
            fast = [encode_rank(entries, medians, n_genes)]
        elif self.encoding == "continuous":  # in L2-sized blocks of rows (same sentences, about 2x faster)
            fast = [encode_continuous(block, n_genes, seed) for block in row_blocks(entries)]
        elif not self.include_zero_genes:
            fast = [encode_binned(block, n_genes, seed, self.n_bins) for block in row_blocks(entries)]
        else:
            fast = [encode_binned(entries, n_genes, seed, self.n_bins, True, colmap.tokens)]
        return flatten_sentences(fast, prefix, suffix, ids_dtype=ids_dtype)

    def cells_without_genes(self, data, gene_ids=None, layer: str | None = None) -> np.ndarray:
        """Boolean mask of the cells of ``data`` whose counts all fall in genes outside this tokenizer's vocabulary
        (or gene subset): their sentences hold special tokens only, so a model reading them sees no cell.
        Encoding such cells warns (:class:`EmptyCellWarning`); ``annotate`` leaves them not annotated."""
        src = data if isinstance(data, CountSource) else open_count_source(data, gene_ids, layer)
        colmap, _ = self._column_map(src.var_names)
        masks = [_rows_without_matched_counts(counts, colmap)
                 for counts, _ in iter_count_chunks(src, self.chunk_size, check_counts=False)]
        return np.concatenate(masks) if masks else np.zeros(0, dtype=bool)

    def encode_flat(self, cells, gene_ids=None, *, max_length: int | None = None, truncation=True,
                    seed: int | None = None, layer: str | None = None, n_counts=None,
                    check_counts: bool | None = None, chunk_size: int | None = None) -> dict[str, np.ndarray]:
        """Unpadded sentences as flat arrays: ``{"offsets": int64 [B+1], "input_ids": int32 [N],
        "values": float32 [N], "length": int64 [B]}``, cell ``i`` being ``input_ids[offsets[i]:offsets[i+1]]``.

        The same tokens and values as ``self(cells, ...)`` (arguments as there) without padding: what the
        corpus builder writes as Arrow list columns, with no padded ``[B, L]`` array made and taken apart.
        """
        max_length = int(max_length or self.model_max_length)
        parts, _, _ = self._encode_sentences(cells, gene_ids, max_length=max_length, truncation=truncation, seed=seed,
                                             layer=layer, n_counts=n_counts, check_counts=check_counts,
                                             chunk_size=chunk_size)
        offsets, ids, values, lengths = join_flat(parts, np.int32)
        return {"offsets": offsets, "input_ids": ids, "values": values, "length": lengths}

    # ------------------------------------------------------------------ summaries
    def summary(self, cells, **call_kwargs) -> str:
        """A short human-readable summary: the gene mapping report and sentence-length statistics."""
        enc_out = self(cells, return_tensors="np", return_length=True, **call_kwargs)
        lengths = enc_out["length"]
        n_special = len(self.prefix_tokens) + len(self.suffix_tokens)
        lines = [
            f"GeneTokenizer: {self.species or 'custom'} vocabulary of {len(self):,} tokens "
            f"(checksum {self.vocab_checksum[:12]}), encoding={self.encoding!r}",
            self.mapping_report(cells, call_kwargs.get("gene_ids")).summary(),
            f"{len(lengths):,} cells -> input_ids {tuple(enc_out['input_ids'].shape)}; genes per cell: "
            f"mean {np.mean(lengths - n_special):.0f}, min {np.min(lengths - n_special)}, "
            f"max {np.max(lengths - n_special)}",
        ]
        return "\n".join(lines)


# What ``register_for_auto_class("AutoTokenizer")`` sets, without importing transformers' Auto modules (and torch
# with them) at import: ``save_pretrained``/``push_to_hub`` then write ``auto_map`` and copy this folder's code.
# tests/test_tokenizer_remote_code.py pins that this still writes a loadable auto_map.
GeneTokenizer._auto_class = "AutoTokenizer"


class EmptyCellWarning(UserWarning):
    """Cells whose counts all fall in genes outside the vocabulary: encoded as special tokens only."""


def _rows_without_matched_counts(counts, colmap: ColumnMap) -> np.ndarray:
    """Boolean mask of the rows of a CSR chunk with no non-zero count in a matched (vocabulary) column."""
    hit = colmap.matched[counts.indices] & (counts.data != 0)
    per_row = np.concatenate(([0], np.cumsum(hit, dtype=np.int64)))[counts.indptr]
    return np.diff(per_row) == 0


def _empty_cells_message(n_empty: int, n_cells: int, names) -> str:
    examples = ", ".join(map(str, list(names)[:5]))
    return (f"{n_empty:,} of {n_cells:,} cells have counts only in genes outside this tokenizer's vocabulary (e.g. "
            f"{examples}): their sentences hold special tokens only, so a model sees nothing of them. Check that the "
            "genes are named as the vocabulary's (symbols or Ensembl IDs of its species), or filter those cells "
            "(tokenizer.cells_without_genes(adata) gives them).")


def _check_saved_tokenizer(files: dict, name) -> None:
    """ValueError naming the problem when the resolved files of ``name`` are not a saved GeneTokenizer."""
    config_path, vocab_path = files.get("tokenizer_config_file"), files.get("tokenizer_file")
    hint = ("Pass a folder or repo saved by GeneTokenizer.save_pretrained (hf-scfm), or load another tokenizer "
            "with its own class (AutoTokenizer.from_pretrained).")
    if config_path is None:
        raise ValueError(f"{name} has no tokenizer_config.json, so it is not a saved GeneTokenizer. {hint}")
    try:
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}). Save the tokenizer again.") from err
    found = config.get("tokenizer_class") if isinstance(config, dict) else None
    if found != "GeneTokenizer" or "encoding" not in config:
        raise ValueError(f"{name} holds a {found or 'unnamed'} tokenizer, not an hf-scfm GeneTokenizer "
                         f"(tokenizer_config.json: tokenizer_class={found!r}). {hint}")
    if vocab_path is None:
        raise ValueError(f"{name} has no tokenizer.json (the gene vocabulary). Save the tokenizer again, or copy or "
                         "download tokenizer.json too.")
    try:
        with open(vocab_path, encoding="utf-8") as fh:
            model = json.load(fh)["model"]
        if model.get("type") != "WordLevel" or not isinstance(model.get("vocab"), dict):
            raise TypeError(f"a {model.get('type')} model, not a WordLevel vocabulary")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{vocab_path} is not a GeneTokenizer vocabulary ({type(err).__name__}: {err}). Save the "
                         "tokenizer again, or download tokenizer.json again.") from err
