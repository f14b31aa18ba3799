"""Issue 22, "nothing silently wrong": each bad input a careful user tried goes through the public API or the
command line and gets a clear error naming the problem and the fix, or a deliberate, documented handling (the
README's "Reliability" section lists them). Tiny inputs only: slices of the bundled Baron sets, tiny presets."""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import hf_scfm
from hf_scfm import GeneTokenizer
from hf_scfm import cli


@pytest.fixture(scope="module")
def baron():
    """20 cells of each bundled Baron set (mouse and human)."""
    return {name: hf_scfm.load_example(f"baron_{name}")[:20].copy() for name in ("mouse", "human")}


# ---------------------------------------------------------------------------------------------------- 1. species
@pytest.mark.parametrize("declared", [True, False])
def test_other_species_is_refused_naming_species_and_fix(baron, declared):
    mouse = baron["mouse"].copy()
    if not declared:
        del mouse.uns["species"]  # the case pattern of the symbols (Ins1, 0610007P14Rik) is evidence enough
    tok = GeneTokenizer.from_species("human", encoding="binned")
    with pytest.raises(ValueError, match=r"look like mouse genes.*vocabulary is human.*map_orthologs") as err:
        tok(mouse[:4])
    assert ("uns['species'] is 'mouse'" in str(err.value)) == declared
    assert "written like mouse symbols" in str(err.value)
    with pytest.raises(ValueError, match=r"look like human genes.*vocabulary is mouse"):
        GeneTokenizer.from_species("mouse", encoding="rank").check_genes(baron["human"])


def test_other_species_refused_by_ensembl_prefix_and_by_match_rates(baron):
    human_tok = GeneTokenizer.from_species("human")
    mouse_table = hf_scfm.tokenization.load_gene_table("mouse")
    mouse_ids = list(mouse_table.ids[:60])
    with pytest.raises(ValueError, match=r"look like mouse genes.*Ensembl IDs are mouse \(ENSMUSG"):
        human_tok.check_genes(mouse_ids)
    # upper-cased mouse symbols with no declared species: only the match rates against both tables tell
    upper = [str(g).upper() for g in baron["mouse"].var_names[:3000]]
    with pytest.raises(ValueError, match=r"look like mouse genes.*match the mouse gene table"):
        human_tok.check_genes(upper)


def test_bundled_examples_pass_their_own_species_check(baron):
    assert GeneTokenizer.from_species("human").check_genes(baron["human"]).match_rate > 0.85
    assert GeneTokenizer.from_species("mouse").check_genes(baron["mouse"]).match_rate > 0.85
    assert GeneTokenizer.from_species("human").check_genes(hf_scfm.load_example("pbmc68k")[:5]).n_tokens > 500


def test_map_orthologs_reads_mouse_cells_into_a_human_tokenizer_on_purpose(baron):
    mouse = baron["mouse"]
    human_like = hf_scfm.map_orthologs(mouse, source="mouse", target="human")
    record = human_like.uns["ortholog_mapping"]
    assert human_like.uns["species"] == "human"
    assert record["n_input_genes"] == mouse.n_vars and record["n_mapped_genes"] + record["n_without_ortholog"] == mouse.n_vars
    assert 0.7 < human_like.n_vars / mouse.n_vars < 0.9
    # a gene's counts move to its ortholog's column unchanged; library sizes stay those of all the cell's genes
    j = list(human_like.var["source_gene"]).index("Gcg")
    assert human_like.var_names[j] == "GCG"
    np.testing.assert_array_equal(np.asarray(human_like.X[:, j].todense()).ravel(),
                                  np.asarray(mouse[:, "Gcg"].X.todense()).ravel())
    np.testing.assert_allclose(human_like.obs["n_counts"], np.asarray(mouse.X.sum(axis=1)).ravel())
    assert human_like.obs["n_counts"].iloc[0] > np.asarray(human_like.X[0].sum())  # genes without ortholog count
    enc = GeneTokenizer.from_species("human", encoding="binned")(human_like[:3])
    assert len(enc["input_ids"]) == 3
    with pytest.raises(ValueError, match=r"declares uns\['species'\] = 'mouse'"):
        hf_scfm.map_orthologs(mouse, source="human", target="mouse")


def test_map_orthologs_sums_a_symbol_and_its_ensembl_id():
    table = hf_scfm.tokenization.load_gene_table("mouse")
    gcg_id = table.ids[table.symbols.index("Gcg")]
    x = sp.csr_matrix(np.array([[1.0, 2.0, 5.0], [0.0, 3.0, 7.0]], dtype=np.float32))
    adata = ad.AnnData(x, var=pd.DataFrame(index=["Gcg", gcg_id, "NotAGene1"]))
    out = hf_scfm.map_orthologs(adata, source="mouse", target="human")
    assert list(out.var_names) == ["GCG"] and out.var["source_gene"].iloc[0] == f"Gcg|{gcg_id}"
    np.testing.assert_array_equal(out.X.toarray().ravel(), [3.0, 3.0])
    np.testing.assert_array_equal(out.obs["n_counts"], [8.0, 10.0])
    assert out.uns["ortholog_mapping"]["n_summed"] == 1 and out.uns["ortholog_mapping"]["n_without_ortholog"] == 1


# ---------------------------------------------------------------------------------------------------- 6. float16
def test_float16_counts_are_upcast_in_memory_and_on_disk(baron, tmp_path):
    import h5py

    human = baron["human"][:6].copy()
    tok = GeneTokenizer.from_species("human", encoding="binned")
    expected = tok(human, return_tensors="np")
    dense16 = ad.AnnData(human.X.toarray().astype(np.float16), obs=human.obs, var=human.var, uns=human.uns)
    np.testing.assert_array_equal(tok(dense16, return_tensors="np")["input_ids"], expected["input_ids"])
    path = tmp_path / "half.h5ad"
    human.write_h5ad(path)
    with h5py.File(path, "r+") as f:  # what a tool writing half floats leaves: scipy.sparse cannot hold float16
        data = f["X/data"][...]
        del f["X/data"]
        f["X/data"] = data.astype(np.float16)
    got = tok(str(path), return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(got["values"], expected["values"])
    big = human.copy()
    big.X = big.X.toarray().astype(np.float16)
    big.X[0, 0] = 4000
    with pytest.warns(UserWarning, match="float16, which holds integers exactly only up to 2,048"):
        tok(big)


# ------------------------------------------------------------------------------ a tiny classifier for the tasks
@pytest.fixture(scope="module")
def classifier(tmp_path_factory, one_thread):
    """``(folder, query)``: a randomly initialised tiny Mouse-GeneMamba classifier over 100 Baron human genes,
    saved as ``hf-scfm finetune --no-lora`` saves one, and 12 query cells."""
    import torch

    from hf_scfm.modeling.configuration_utils import check_tokenizer_matches
    from hf_scfm.training.families import get_family
    from hf_scfm.training.hub import write_weights_manifest

    from test_pretrain import small_adata, small_tokenizer

    root = tmp_path_factory.mktemp("reliability")
    adata = small_adata("human", n_cells=40, n_genes=100)
    tok = small_tokenizer(adata, "human", "rank")
    family = get_family("mouse_genemamba")
    torch.manual_seed(0)
    config = family.config_cls.from_preset("tiny", vocab_size=len(tok), hidden_size=32, num_labels=3,
                                           id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    assert config.vocab_checksum is None and getattr(config, "tokenizer_settings", None) is None
    check_tokenizer_matches(config, tok)  # the first pairing records the vocabulary and the encoding settings
    assert config.vocab_checksum == tok.vocab_checksum and config.tokenizer_settings["encoding"] == "rank"
    folder = root / "clf"
    family.classification_cls(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    write_weights_manifest(folder)
    return folder, adata[:12].copy()


# ---------------------------------------------------------------------------------- 7. cells without vocab genes
def test_cells_without_vocabulary_genes_are_warned_about_and_not_annotated(classifier):
    from hf_scfm.tasks.annotation import CONFIDENCE_KEY, PREDICTION_KEY, annotate
    from hf_scfm.tokenization import EmptyCellWarning

    folder, query = classifier
    query = ad.concat([query, ad.AnnData(sp.csr_matrix(np.ones((2, 2), np.float32)),
                                         var=pd.DataFrame(index=["NOTAGENE1", "NOTAGENE2"]),
                                         obs=pd.DataFrame(index=["lost1", "lost2"]))], join="outer")
    query.X = sp.csr_matrix(np.nan_to_num(query.X.toarray()))
    tok = GeneTokenizer.from_pretrained(str(folder))
    np.testing.assert_array_equal(tok.cells_without_genes(query), [False] * 12 + [True, True])
    with pytest.warns(EmptyCellWarning, match=r"2 of 14 cells have counts only in genes outside.*lost1, lost2"):
        tok(query)
    with pytest.warns(UserWarning, match=r"2 of 14 query cells .*lost1, lost2.*not annotated"):
        out = annotate(str(folder), query, progress=False, copy=True)
    assert out.obs[PREDICTION_KEY].isna().tolist() == [False] * 12 + [True, True]
    assert np.isnan(out.obs[CONFIDENCE_KEY].to_numpy()[12:]).all() and np.isfinite(out.obs[CONFIDENCE_KEY][:12]).all()


# ------------------------------------------------------------------------------------ 3. corrupted weights, NaN
def test_corrupted_weights_are_refused_naming_the_file(classifier, tmp_path):
    import shutil

    from hf_scfm.tasks.annotation import annotate

    folder, query = classifier
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-4000:] = b"\xff" * 4000  # same size, header intact: only the checksum tells
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"model.safetensors is corrupt: its sha256 differs.*hf_scfm_weights.json"):
        annotate(str(broken), query, progress=False, copy=True)
    out = tmp_path / "annotated.h5ad"
    query.write_h5ad(tmp_path / "q.h5ad")
    assert cli.main(["annotate", "--model", str(broken), "--query", str(tmp_path / "q.h5ad"), "--out", str(out),
                     "--no-progress"]) == 2
    assert not out.exists()


def test_a_nan_prediction_is_never_written_as_a_label(classifier):
    import torch

    from hf_scfm.tasks.annotation import PREDICTION_KEY, annotate
    from hf_scfm.tasks.inference import load_model_and_tokenizer

    folder, query = classifier
    net, tok = load_model_and_tokenizer(str(folder), kind="classifier", device="cpu")
    with torch.no_grad():
        net.get_input_embeddings().weight[tok.convert_tokens_to_ids(tok.genes[:30])] = float("nan")
    with pytest.raises(ValueError, match=r"output is NaN or infinite for \d+ of 12 cells \(e.g. .*corrupted or diverged"):
        annotate((net, tok), query, progress=False)
    assert PREDICTION_KEY not in query.obs

    from hf_scfm.tasks.embedding import embed

    with pytest.raises(ValueError, match=r"cell embedding is NaN or infinite for \d+ of 12 cells"):
        embed(getattr(net, net.base_model_prefix), query, tokenizer=tok, progress=False)
    assert not query.obsm


# ------------------------------------------------------------------------ 5. adapters: base beside, checksummed
def test_adapter_base_resolves_beside_the_adapter_and_must_match(tmp_path, monkeypatch, one_thread):
    import json
    import shutil

    import torch

    from hf_scfm.tasks.annotation import PREDICTION_KEY, annotate
    from hf_scfm.training.families import get_family
    from hf_scfm.training.finetune import finetune

    from test_pretrain import small_adata, small_tokenizer

    adata = small_adata("human", n_cells=24, n_genes=60)
    tok = small_tokenizer(adata, "human", "rank")
    family = get_family("mouse_genemamba")
    work, other = tmp_path / "work", tmp_path / "other"
    for seed, where in ((0, work), (1, other)):  # the real base, and a different model of the same name elsewhere
        torch.manual_seed(seed)
        config = family.config_cls.from_preset("tiny", vocab_size=len(tok), vocab_checksum=tok.vocab_checksum,
                                               hidden_size=32)
        family.pretraining_cls()(config).save_pretrained(where / "ptU")
        tok.save_pretrained(where / "ptU")
    adata.write_h5ad(work / "train.h5ad")
    monkeypatch.chdir(work)
    finetune(*cli.parse(["finetune", "--model", "ptU", "--train", "train.h5ad", "--label-key", "cell_type",
                         "--out", "../clf", "--max-steps", "2", "--batch-size", "8", "--max-length", "16"])[1])
    label_map = json.loads((tmp_path / "clf" / "label_map.json").read_text())
    assert label_map["base_model"] == "../work/ptU" and len(label_map["base_model_checksum"]) == 64

    monkeypatch.chdir(other)  # holds another ./ptU: the adapter must not pick it up
    out = annotate("../clf", adata[:4].copy(), progress=False, copy=True)
    assert out.obs[PREDICTION_KEY].notna().all()

    shutil.rmtree(work / "ptU")
    shutil.copytree(other / "ptU", work / "ptU")  # another model where the base was
    with pytest.raises(ValueError, match=r"trained on another base model than .*checksum differs"):
        annotate("../clf", adata[:4].copy(), progress=False, copy=True)
    shutil.rmtree(work / "ptU")
    with pytest.raises(FileNotFoundError, match=r"names its base model '../work/ptU', relative to the adapter"):
        annotate("../clf", adata[:4].copy(), progress=False, copy=True)

    # 8. a pickled adapter (adapter_model.bin) is refused, with the fix
    (tmp_path / "clf" / "adapter_model.safetensors").rename(tmp_path / "clf" / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model.bin, a pickle.*safe_serialization=True"):
        annotate("../clf", adata[:4].copy(), progress=False, copy=True)


def test_capitalised_names_of_neither_species_are_left_to_the_match_check(baron):
    odd = baron["human"][:, :100].copy()
    odd.var_names = [f"Gene{i}" for i in range(100)]
    with pytest.raises(ValueError, match=r"Only 0 of 100 input genes \(0.0%\) match this tokenizer's human"):
        GeneTokenizer.from_species("human").check_genes(odd)


# ------------------------------------------------------------------------------- 2. edited tokenizer settings
def test_edited_tokenizer_settings_are_refused_by_every_entry_point(classifier, tmp_path, capsys):
    import json
    import shutil

    from hf_scfm.modeling.configuration_utils import check_tokenizer_matches
    from hf_scfm.tasks.annotation import annotate
    from hf_scfm.tasks.embedding import embed

    folder, query = classifier
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    path = edited / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "encoding": "continuous"}))
    with pytest.raises(ValueError, match=r"encodes cells otherwise than model.*encoding 'continuous' \(model: 'rank'\)"):
        annotate(str(edited), query, progress=False, copy=True)
    with pytest.raises(ValueError, match=r"encoding 'continuous' \(model: 'rank'\)"):
        embed(str(edited), query, progress=False, copy=True)
    query.write_h5ad(tmp_path / "q.h5ad")
    assert cli.main(["finetune", "--model", str(edited), "--train", str(tmp_path / "q.h5ad"), "--label-key",
                     "cell_type", "--out", str(tmp_path / "ft"), "--max-steps", "1"]) == 2
    assert "encodes cells otherwise" in capsys.readouterr().err

    from hf_scfm import ScMamba2Config

    binned = GeneTokenizer.from_genes(list(query.var_names[:30]), species="human", encoding="binned")
    config = ScMamba2Config.from_preset("tiny", vocab_size=len(binned))
    check_tokenizer_matches(config, binned)
    binned.n_bins = 11
    with pytest.raises(ValueError, match=r"n_bins 11 \(model: 51\)"):
        check_tokenizer_matches(config, binned)
    subset = GeneTokenizer.from_genes(list(query.var_names[:30]), species="human", encoding="binned",
                                      gene_subset=list(query.var_names[:10]))
    with pytest.raises(ValueError, match=r"gene_subset_checksum"):
        check_tokenizer_matches(config, subset)


# ---------------------------------------------------------------------------------------- 4. corpora, 8. resume
@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two tiny CellFM corpora of other vocabularies (100 and 80 genes), in 16-cell shards."""
    from hf_scfm.data import build_corpus

    from test_pretrain import small_adata, small_tokenizer

    root = tmp_path_factory.mktemp("corpora")
    adata = small_adata("human", n_cells=48, n_genes=100)
    for name, genes in (("a", 100), ("b", 80)):
        build_corpus(adata, small_tokenizer(adata[:, :genes], "human", "continuous"), root / name, shard_size=16,
                     max_length=32, progress=False)
    return root


def _corrupt_data_pages(path):
    """Overwrite bytes of a Parquet file's data pages, leaving the header magic and the footer intact."""
    raw = bytearray(path.read_bytes())
    footer = int.from_bytes(raw[-8:-4], "little") + 8
    end = len(raw) - footer
    raw[4:end] = bytes((b ^ 0x5A) for b in raw[4:end])
    path.write_bytes(bytes(raw))


def test_a_shard_with_corrupt_data_is_named_with_the_fix(corpora, tmp_path, capsys):
    import shutil

    from hf_scfm.data import load_corpus

    corpus = tmp_path / "c"
    shutil.copytree(corpora / "a", corpus)
    shard = sorted((corpus / "data").glob("*.parquet"))[1]
    _corrupt_data_pages(shard)
    with pytest.raises(ValueError, match=rf"(?s)Shard '.*{shard.name}' is corrupt: its footer reads.*re-run build_corpus"):
        load_corpus(corpus, cache_dir=str(tmp_path / "cache"))
    code = cli.main(["pretrain", "--model", "cellfm", "--corpus", str(corpus), "--out", str(tmp_path / "run"),
                     "--max-steps", "2", "--batch-size", "4", "--no-progress", "--shuffle-buffer", "8"])
    err = capsys.readouterr().err
    assert code == 2 and shard.name in err and "is corrupt" in err and "Traceback" not in err


def test_an_incomplete_build_is_refused_unless_asked_for(corpora, tmp_path):
    import json
    import shutil

    from hf_scfm.data import load_corpus

    corpus = tmp_path / "c"
    shutil.copytree(corpora / "a", corpus)
    assert json.loads((corpus / "hf_scfm_build.json").read_text())["complete"] is True
    assert load_corpus(corpus, cache_dir=str(tmp_path / "cache")).num_rows == 48
    # what a build killed after its first shard leaves
    build = json.loads((corpus / "hf_scfm_build.json").read_text())
    (corpus / "hf_scfm_build.json").write_text(json.dumps({**build, "complete": False}))
    for shard in sorted((corpus / "data").glob("*.parquet"))[1:]:
        shard.unlink()
    with pytest.raises(ValueError, match=r"is incomplete: its build did not finish \(1 of 3 shards, missing .*allow_partial"):
        load_corpus(corpus, streaming=True)
    assert load_corpus(corpus, allow_partial=True, cache_dir=str(tmp_path / "cache")).num_rows == 16


def test_cells_without_vocabulary_genes_are_counted_in_the_build_report(tmp_path):
    from hf_scfm.data import build_corpus

    x = sp.csr_matrix(np.array([[3, 0, 1], [0, 2, 0], [0, 5, 0]], dtype=np.float32))  # cells 2, 3: outside only
    adata = ad.AnnData(x, var=pd.DataFrame(index=["GCG", "NOTAGENE1", "INS"]), uns={"species": "human"})
    tok = GeneTokenizer.from_genes(["GCG", "INS", "TTR"], species="human", encoding="continuous")
    with pytest.warns(UserWarning, match=r"2 cells of the corpus have counts only in genes outside"):
        report = build_corpus(adata, tok, tmp_path / "c", progress=False)
    assert report.n_cells == 3 and report.n_cells_without_genes == 2


def test_resuming_with_a_corpus_of_another_vocabulary_is_refused(corpora, tmp_path, capsys):
    from test_pretrain import run_args

    out = tmp_path / "run"
    assert cli.main(["pretrain", *run_args("cellfm", corpora / "a", out, "--stop-after-steps", "3")]) == 0
    assert cli.main(["pretrain", *run_args("cellfm", corpora / "b", out, "--resume")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"was trained on a vocabulary of \d+ tokens .*tokenized with another one \(86 tokens", err)
    assert "Resume with the corpus of that run" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------ 8. a garbage tokenizer.json
def test_a_garbage_tokenizer_json_is_named(classifier, tmp_path):
    import shutil

    folder, _ = classifier
    broken = tmp_path / "tok"
    shutil.copytree(folder, broken)
    (broken / "tokenizer.json").write_text("<html>not found</html>")
    with pytest.raises(ValueError, match=r"tok/tokenizer.json is not a GeneTokenizer vocabulary \(JSONDecodeError"):
        GeneTokenizer.from_pretrained(str(broken))


def test_tokenize_refuses_another_species_on_the_command_line(baron, tmp_path, capsys):
    mouse = baron["mouse"].copy()
    mouse.var_names = [g.upper() for g in mouse.var_names]  # the letter case gone: uns["species"] still tells
    mouse.write_h5ad(tmp_path / "mouse.h5ad")
    GeneTokenizer.from_species("human", encoding="binned").save_pretrained(tmp_path / "tok")
    code = cli.main(["tokenize", str(tmp_path / "mouse.h5ad"), "--tokenizer", str(tmp_path / "tok"), "--out",
                     str(tmp_path / "corpus"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "look like mouse genes" in err and "uns['species'] is 'mouse'" in err
    assert "map_orthologs" in err and "Traceback" not in err
