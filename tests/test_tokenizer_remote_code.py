"""The tokenizer travels as remote code (issue 18, item 2), and a folder that cannot be a GeneTokenizer is refused.

A GeneTokenizer of each encoding (gene medians for ``rank``, a gene subset for all three; whole-species and custom
vocabularies) is saved with plain ``save_pretrained`` and pushed with plain ``push_to_hub`` to the local Hub
(``tests/hub_server.py``). A subprocess in which ``hf_scfm`` cannot be imported -- and numba neither, so the NumPy
fallback runs where the original used the compiled kernel -- loads each with ``AutoTokenizer.from_pretrained(repo,
trust_remote_code=True)`` and encodes AnnData objects (gene symbols, and versioned Ensembl IDs): ids, values and
masks must be exactly the original's. :func:`tokenizer_cases` and :func:`remote_encode_code` are meant to be reused
by the joint model + tokenizer test.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import hf_scfm
from hf_scfm.tokenization import GeneTokenizer
from hf_scfm.tokenization.gene_tables import GENE_TABLE_FILE, canonical_gene_ids

N_CELLS = 24
KEYS = ("input_ids", "values", "attention_mask")


@pytest.fixture(scope="module")
def cells():
    """Cells of Baron human / mouse (symbols), and the same cells with versioned Ensembl IDs as var_names."""
    out = {}
    for name, species in (("baron_human", "human"), ("baron_mouse", "mouse")):
        adata = hf_scfm.load_example(name)[:N_CELLS].copy()
        adata.obs["n_counts"] = np.asarray(adata.X.sum(1)).ravel()  # the library size of all genes, for both
        tok = GeneTokenizer.from_species(species, encoding="continuous")
        ids, _, _, _ = canonical_gene_ids(list(adata.var_names), tok.gene_table)
        keep = [i for i, g in enumerate(ids) if g is not None]
        by_id = adata[:, keep].copy()
        by_id.var_names = [f"{ids[i]}.{1 + i % 9}" for i in keep]  # any version maps
        out[name] = adata
        out[name + "_ids"] = by_id
    return out


def tokenizer_cases(cells) -> dict:
    """``{name: (tokenizer, dataset)}``: one tokenizer per encoding, each with a gene subset."""
    human, mouse = cells["baron_human"], cells["baron_mouse"]

    def mapped(tok, adata):
        unmatched = tok.mapping_report(adata).unmatched
        return [g for g in adata.var_names if g not in unmatched]

    # rank: the whole mouse vocabulary (the whole GENCODE table travels), fitted medians
    rank = GeneTokenizer.from_species("mouse", encoding="rank", model_max_length=64, seed=3)
    rank.fit_medians(mouse)
    rank.select_genes(mapped(rank, mouse)[::3])
    # binned: a custom human vocabulary of the Baron genes (only their GENCODE rows travel), ambiguity kept
    full = GeneTokenizer.from_species("human", encoding="binned")
    vocabulary = mapped(full, human)[::2]
    binned = GeneTokenizer.from_species("human", genes=vocabulary, encoding="binned", n_bins=11,
                                        model_max_length=48)
    binned.select_genes(vocabulary[::3])
    # continuous: the whole human vocabulary, a subset of symbols
    continuous = GeneTokenizer.from_species("human", encoding="continuous", model_max_length=40, seed=7)
    continuous.select_genes(mapped(continuous, human)[::4])
    return {"rank": (rank, "baron_mouse"), "binned": (binned, "baron_human"), "continuous": (continuous, "baron_human")}


_HIDE_NUMBA = """
sys.modules["numba"] = None  # `import numba` now raises ImportError: the encodings take their NumPy path
"""


def remote_encode_code(repos: dict, h5ad: dict) -> str:
    """Python source for the hidden-package subprocess: load each repo with AutoTokenizer + trust_remote_code and
    print ``RESULT{json}`` with, per repo, the class's module, a few attributes and the encodings of each file."""
    return _HIDE_NUMBA + f'''
import json
import anndata
from transformers import AutoTokenizer
result = {{}}
for name, repo in {repos!r}.items():
    tok = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
    entry = {{"module": type(tok).__module__, "class": type(tok).__name__, "len": len(tok),
              "checksum": tok.vocab_checksum, "subset": tok.gene_subset, "medians": tok.gene_medians,
              "encoding": tok.encoding, "encoded": {{}}}}
    for key, path in {h5ad!r}[name].items():
        out = tok(anndata.read_h5ad(path), return_tensors="np")
        entry["encoded"][key] = {{k: out[k].tolist() for k in ("input_ids", "values", "attention_mask")}}
    result[name] = entry
result["numba_imported"] = sys.modules.get("numba") is not None
print("RESULT" + json.dumps(result))
'''


def test_tokenizer_of_each_encoding_loads_and_encodes_identically_without_hf_scfm(
        cells, hub_server, tmp_path, python_without_hf_scfm):
    from hf_scfm.tokenization import encodings

    cases = tokenizer_cases(cells)
    expected, repos, h5ad = {}, {}, {}
    for name, (tok, dataset) in cases.items():
        folder = tmp_path / name
        tok.save_pretrained(folder)  # plain transformers API
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert config["auto_map"] == {"AutoTokenizer": ["tokenization_gene.GeneTokenizer", None]}
        for code in ("tokenization_gene.py", "encodings.py", "gene_tables.py", "anndata_io.py", "special_tokens.py"):
            assert (folder / code).is_file(), code
        assert (folder / GENE_TABLE_FILE).is_file() and ((folder / "gene_medians.json").is_file() == (name == "rank"))
        tok.push_to_hub(f"hf-scfm/tokenizer-{name}")  # plain transformers API
        repos[name] = f"hf-scfm/tokenizer-{name}"
        h5ad[name] = {}
        expected[name] = {}
        for key in (dataset, dataset + "_ids"):
            path = tmp_path / f"{key}.h5ad"
            if not path.exists():
                cells[key].write_h5ad(path)
            h5ad[name][key] = str(path)
            expected[name][key] = tok(cells[key], return_tensors="np")
    # the whole-species table travels whole; the custom vocabulary's is a closed subset of it
    sizes = {name: len(json.loads((tmp_path / name / GENE_TABLE_FILE).read_text())["ids"]) for name in cases}
    assert sizes["rank"] == len(hf_scfm.tokenization.load_gene_table("mouse"))
    assert len(cases["binned"][0].genes) <= sizes["binned"] < sizes["continuous"] // 5
    assert encodings._sampled_kernel() is not None, "numba is a dev dependency: the original used the kernel"

    proc = python_without_hf_scfm(remote_encode_code(repos, h5ad), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result.pop("numba_imported") is False
    assert not hub_server.unhandled
    for name, (tok, _) in cases.items():
        got = result[name]
        assert got["module"].startswith("transformers_modules.") and got["class"] == "GeneTokenizer", got["module"]
        assert (got["len"], got["checksum"], got["encoding"]) == (len(tok), tok.vocab_checksum, tok.encoding)
        assert got["subset"] == tok.gene_subset and got["medians"] == tok.gene_medians
        for key, enc in expected[name].items():
            for k in KEYS:
                remote = np.asarray(got["encoded"][key][k], dtype=enc[k].dtype)
                np.testing.assert_array_equal(remote, enc[k], err_msg=f"{name} {key} {k}")
            assert (enc["attention_mask"].sum(1) > 10).all()  # real sentences, not just specials
        # symbols and versioned Ensembl IDs give the same sentences
        a, b = expected[name].values()
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_without_trust_remote_code_the_hidden_package_run_refuses_clearly(tmp_path, python_without_hf_scfm):
    tok = GeneTokenizer.from_genes(["ENSG00000141510", "ENSG00000111640"], encoding="binned")
    tok.save_pretrained(tmp_path / "tok")
    proc = python_without_hf_scfm(f"""
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained({str(tmp_path / "tok")!r})
""", timeout=300)
    assert proc.returncode != 0 and "trust_remote_code=True" in proc.stderr


def test_installed_class_wins_over_the_copied_code(tmp_path):
    from transformers import AutoTokenizer

    tok = GeneTokenizer.from_genes(["ENSG00000141510", "ENSG00000111640"], encoding="binned")
    tok.save_pretrained(tmp_path)
    for kwargs in ({}, {"trust_remote_code": True}):
        assert type(AutoTokenizer.from_pretrained(tmp_path, **kwargs)) is GeneTokenizer


# ----------------------------------------------------------------------------- folders that are not ours / broken
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    tok = GeneTokenizer.from_species("human", genes=["TP53", "ACTB", "GAPDH", "INS"], encoding="rank")
    tok.set_medians({g: 2.0 for g in tok.genes})
    tok.save_pretrained(folder)
    return folder


def _copy(saved, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(saved, target)
    return target


def test_a_foreign_tokenizer_folder_is_refused(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
                            ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a TokenizersBackend tokenizer, not an hf-scfm GeneTokenizer"):
        GeneTokenizer.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("damage, message", [
    ("no_vocab", "has no tokenizer.json"),
    ("garbled_vocab", "is not a GeneTokenizer vocabulary"),
    ("swapped_vocab", "does not match the vocab_checksum"),
    ("no_table", "gene_table.json is missing"),
    ("garbled_table", "is not a readable gene table"),
    ("edited_table", "do not match the checksum saved with them"),
    ("no_medians", "gene_medians.json is missing"),
    ("garbled_medians", "is not a readable gene medians file"),
    ("garbled_config", "tokenizer_config.json is not valid JSON"),
])
def test_missing_or_garbled_files_fail_with_the_file_named(saved, tmp_path, damage, message):
    folder = _copy(saved, tmp_path)
    if damage == "no_vocab":
        (folder / "tokenizer.json").unlink()
    elif damage == "garbled_vocab":
        (folder / "tokenizer.json").write_text("{not json")
    elif damage == "swapped_vocab":
        data = json.loads((folder / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        a, b = list(vocab)[6:8]
        vocab[a], vocab[b] = vocab[b], vocab[a]
        (folder / "tokenizer.json").write_text(json.dumps(data))
    elif damage == "no_table":
        (folder / GENE_TABLE_FILE).unlink()
    elif damage == "garbled_table":
        (folder / GENE_TABLE_FILE).write_text(json.dumps({"species": "human"}))
    elif damage == "edited_table":
        table = json.loads((folder / GENE_TABLE_FILE).read_text())
        table["symbols"][0] = "SOMETHING_ELSE"
        (folder / GENE_TABLE_FILE).write_text(json.dumps(table))
    elif damage == "no_medians":
        (folder / "gene_medians.json").unlink()
    elif damage == "garbled_medians":
        (folder / "gene_medians.json").write_text("[1, 2]")
    elif damage == "garbled_config":
        (folder / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match=message):
        GeneTokenizer.from_pretrained(str(folder))


def test_the_saved_table_maps_like_the_full_table_and_is_used_when_loading(saved, cells):
    """Every name maps to the token the full table gives (symbols, ambiguous ones included); loading uses the saved
    table (pinned to the release it was saved with), not the installed one."""
    from hf_scfm.tokenization.gene_tables import load_gene_table, map_genes, read_gene_table

    loaded = GeneTokenizer.from_pretrained(str(saved))
    table = read_gene_table(saved / GENE_TABLE_FILE)
    assert loaded.gene_table.checksum == table.checksum and len(table) < 20
    full = load_gene_table("human")
    vocab = loaded.get_vocab()
    names = list(cells["baron_human"].var_names) + ["WASH7P", "tp53", "ENSG00000141510.3", "NOPE"]
    got, _ = map_genes(names, vocab, table)
    want, _ = map_genes(names, vocab, full)
    np.testing.assert_array_equal(got, want)
    assert (got >= 0).sum() >= 4
