"""Push -> load round trips through the real ``huggingface_hub`` client and ``transformers`` loaders.

The Hub is ``tests/hub_server.py`` (fixture ``hub_server`` in ``conftest.py``): an in-memory HTTP server on
127.0.0.1 implementing the calls the client makes for ``create_repo``, ``preupload`` (regular vs LFS), the NDJSON
``commit`` (inline base64 files, ``lfsFile``, deletions), the LFS batch API with ``basic`` PUT upload and verify,
``create_branch``, ``model_info``/``repo_info``, ``list_repo_tree``/``list_repo_refs``, ``validate-yaml``, and
``HEAD``/``GET`` ``resolve/<revision>/<path>`` with ``ETag``, ``X-Repo-Commit`` and ``Content-Length`` (see that
module's docstring for the exact list). Every test also checks that the client made no call the server does not
implement (``hub_server.unhandled == []``), so a change in the client's protocol shows up here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from hf_scfm.training.hub import (
    CheckpointError,
    CheckpointPusher,
    add_push_parser,
    push_folder,
    push_main,
    validate_checkpoint,
)


def _tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    return BertModel(config).eval()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"g{i}": i for i in range(2, 50)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def _saved_checkpoint(folder: Path, seed: int = 0):
    model, tokenizer = _tiny_bert(seed), _tiny_tokenizer()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def _assert_same_weights(expected, actual):
    expected_state, actual_state = expected.state_dict(), actual.state_dict()
    assert expected_state.keys() == actual_state.keys()
    for name, tensor in expected_state.items():
        assert torch.equal(tensor, actual_state[name]), name


def _lfs_puts(hub) -> list[str]:
    return [path for method, path in hub.requests if method == "PUT" and path.startswith("/lfs/upload/")]


def test_push_folder_then_from_pretrained_gives_identical_model_and_tokenizer(hub_server, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = _saved_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "optimizer.bin").write_bytes(b"pickled optimizer state")  # never leaves the machine

    info = push_folder(tmp_path / "ckpt", "hf-scfm/bert-tiny")

    files = hub_server.files("hf-scfm/bert-tiny")
    assert info.oid == hub_server.repos[("model", "hf-scfm/bert-tiny")].branches["main"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert "optimizer.bin" not in files
    assert files["model.safetensors"].lfs and not files["config.json"].lfs  # .gitattributes rule vs inline
    assert (tmp_path / "ckpt" / "optimizer.bin").exists() and not (tmp_path / "ckpt" / "README.md").exists()

    loaded = AutoModel.from_pretrained("hf-scfm/bert-tiny")
    _assert_same_weights(model, loaded)
    loaded_tok = AutoTokenizer.from_pretrained("hf-scfm/bert-tiny")
    text = "g3 g7 g11 nope"
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"] == [3, 7, 11, 1]
    assert hub_server.unhandled == []


def test_push_to_hub_methods_round_trip(hub_server):
    from huggingface_hub import HfApi
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = _tiny_bert(seed=1), _tiny_tokenizer()
    model.push_to_hub("hf-scfm/pushed")
    tokenizer.push_to_hub("hf-scfm/pushed")

    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(
        HfApi().list_repo_files("hf-scfm/pushed")
    )
    _assert_same_weights(model, AutoModel.from_pretrained("hf-scfm/pushed"))
    assert AutoTokenizer.from_pretrained("hf-scfm/pushed")("g5 g6")["input_ids"] == [5, 6]
    assert hub_server.unhandled == []


def test_revision_branch_private_repo_and_unchanged_files_skipped(hub_server, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError
    from transformers import AutoModel

    model, _ = _saved_checkpoint(tmp_path / "ckpt", seed=2)
    push_folder(tmp_path / "ckpt", "hf-scfm/private", private=True, revision="dev")

    repo = hub_server.repos[("model", "hf-scfm/private")]
    assert repo.private and set(repo.branches) == {"main", "dev"}
    assert "model.safetensors" not in hub_server.files("hf-scfm/private", "main")
    _assert_same_weights(model, AutoModel.from_pretrained("hf-scfm/private", revision="dev"))
    with pytest.raises(RepositoryNotFoundError):  # private: invisible without the token
        hf_hub_download("hf-scfm/private", "config.json", revision="dev", token=False,
                        cache_dir=tmp_path / "anon")

    puts = len(_lfs_puts(hub_server))
    head = repo.branches["dev"]
    push_folder(tmp_path / "ckpt", "hf-scfm/private", revision="dev")  # same bytes: nothing to upload
    assert len(_lfs_puts(hub_server)) == puts and repo.branches["dev"] == head
    assert HfApi().model_info("hf-scfm/private", revision="dev").sha == head

    push_folder(tmp_path / "ckpt", "bare-name")  # no namespace: the token's user, as on the Hub
    assert "model.safetensors" in hub_server.files(f"{hub_server.user}/bare-name")
    assert hub_server.unhandled == []


def test_large_file_goes_through_lfs_and_comes_back_identical(hub_server, tmp_path):
    from huggingface_hub import hf_hub_download

    folder = tmp_path / "ckpt"
    _saved_checkpoint(folder)
    # Text (no NUL byte, no LFS pattern) above the Hub's 10 MiB threshold: LFS by size alone.
    big = (b"ENSG00000141510\t0.731\n" * 500_000)[: hub_server.lfs_threshold + 12_345]
    (folder / "gene_stats.tsv").write_bytes(big)
    (folder / "notes.txt").write_text("small text stays a regular git file\n")

    push_folder(folder, "hf-scfm/big")

    files = hub_server.files("hf-scfm/big")
    assert files["gene_stats.tsv"].lfs and not files["notes.txt"].lfs
    assert f"/lfs/upload/{hashlib.sha256(big).hexdigest()}" in _lfs_puts(hub_server)
    assert ("POST", "/lfs/verify") in hub_server.requests
    assert Path(hf_hub_download("hf-scfm/big", "gene_stats.tsv")).read_bytes() == big
    assert Path(hf_hub_download("hf-scfm/big", "notes.txt")).read_text().startswith("small text")
    assert hub_server.unhandled == []


def test_checkpoint_pusher_does_not_block_and_survives_rotation(hub_server, tmp_path):
    from transformers import AutoModel

    pusher = CheckpointPusher("hf-scfm/run", hub_strategy="every_save")
    first, _ = _saved_checkpoint(tmp_path / "out" / "checkpoint-1", seed=3)
    second, _ = _saved_checkpoint(tmp_path / "out" / "checkpoint-2", seed=7)

    hub_server.hold_commits()
    try:
        start = time.perf_counter()
        future1 = pusher.on_save(tmp_path / "out" / "checkpoint-1", step=1)
        future2 = pusher.on_save(tmp_path / "out" / "checkpoint-2", step=2)
        returned_after = time.perf_counter() - start
        time.sleep(0.2)
        assert not future1.done() and not future2.done()  # commits parked on the server: on_save did not wait
        assert returned_after < 5.0
        shutil.rmtree(tmp_path / "out" / "checkpoint-1")  # rotated away (save_total_limit) while queued
    finally:
        hub_server.release_commits()
    future2.result(timeout=60)

    final, _ = _saved_checkpoint(tmp_path / "out" / "final", seed=4)
    results = pusher.finish(tmp_path / "out" / "final")
    assert len(results) == 3

    files = hub_server.files("hf-scfm/run")
    assert {"checkpoint-1/model.safetensors", "checkpoint-2/config.json", "config.json", "model.safetensors"} <= set(files)
    repo = hub_server.repos[("model", "hf-scfm/run")]
    history, sha = [], repo.branches["main"]
    while sha is not None:
        history.append(repo.commits[sha].summary)
        sha = repo.commits[sha].parent
    assert history[:3] == ["End of training", "Training in progress, step 2", "Training in progress, step 1"]
    _assert_same_weights(first, AutoModel.from_pretrained("hf-scfm/run", subfolder="checkpoint-1"))
    _assert_same_weights(second, AutoModel.from_pretrained("hf-scfm/run", subfolder="checkpoint-2"))
    _assert_same_weights(final, AutoModel.from_pretrained("hf-scfm/run"))
    assert hub_server.unhandled == []


def test_hub_strategy_end_pushes_only_the_final_model(hub_server, tmp_path):
    pusher = CheckpointPusher("hf-scfm/end-only", hub_strategy="end")
    _saved_checkpoint(tmp_path / "checkpoint-5")
    assert pusher.on_save(tmp_path / "checkpoint-5", step=5) is None
    assert hub_server.requests == []
    _saved_checkpoint(tmp_path / "final")
    pusher.finish(tmp_path / "final")
    assert not any(path.startswith("checkpoint-") for path in hub_server.files("hf-scfm/end-only"))
    with pytest.raises(ValueError, match="hub_strategy must be one of"):
        CheckpointPusher("hf-scfm/x", hub_strategy="checkpoint")


def _break(folder: Path, how: str) -> None:
    if how == "no_config":
        (folder / "config.json").unlink()
    elif how == "no_weights":
        (folder / "model.safetensors").unlink()
    elif how == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    elif how == "garbage_header":
        (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    elif how == "no_model_type":
        config = json.loads((folder / "config.json").read_text())
        del config["model_type"]
        (folder / "config.json").write_text(json.dumps(config))
    elif how == "pickle_only":
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(b"pickle")
    elif how == "no_tokenizer":
        (folder / "tokenizer_config.json").unlink()
    elif how == "missing_shard":
        (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
            "embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors",
            "pooler.dense.weight": "model-00002-of-00002.safetensors"}}))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how, message",
    [
        ("no_config", "no config.json"),
        ("no_weights", "no weights"),
        ("truncated", "truncated or corrupt"),
        ("garbage_header", "truncated or corrupt"),
        ("no_model_type", "no 'model_type'"),
        ("pickle_only", "pickled weights"),
        ("no_tokenizer", "tokenizer_config.json"),
        ("missing_shard", "missing"),
    ],
)
def test_partial_or_corrupt_checkpoint_fails_clearly(tmp_path, how, message):
    folder = tmp_path / "ckpt"
    _saved_checkpoint(folder)
    validate_checkpoint(folder)  # complete before we break it
    _break(folder, how)
    with pytest.raises(CheckpointError, match=message) as err:
        validate_checkpoint(folder)
    assert str(folder) in str(err.value)


def test_sharded_checkpoint_validates_and_names_absent_tensors(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "sharded"
    _saved_checkpoint(folder)
    (folder / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in _tiny_bert().state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({n: state[n] for n in shard_names}, str(folder / shard))
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    summary = validate_checkpoint(folder)
    assert summary["weights"] == ["model.safetensors.index.json", *sorted(shards)]

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = summary["weights"][1]
    index["weight_map"]["not.a.real.tensor"] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not.a.real.tensor"):
        validate_checkpoint(folder)


def test_partial_checkpoint_is_refused_before_any_upload(hub_server, tmp_path):
    folder = tmp_path / "checkpoint-3"
    _saved_checkpoint(folder)
    _break(folder, "truncated")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        CheckpointPusher("hf-scfm/run").on_save(folder, step=3)
    with pytest.raises(CheckpointError):
        push_folder(folder, "hf-scfm/run")
    assert hub_server.requests == []


def test_push_command_line(hub_server, tmp_path, capsys, monkeypatch):
    import argparse

    from transformers import AutoModel

    model, _ = _saved_checkpoint(tmp_path / "ckpt", seed=5)
    assert push_main([str(tmp_path / "ckpt"), "--repo-id", "hf-scfm/cli", "--revision", "v1"]) == 0
    assert "Pushed" in capsys.readouterr().out
    _assert_same_weights(model, AutoModel.from_pretrained("hf-scfm/cli", revision="v1"))

    _break(tmp_path / "ckpt", "no_tokenizer")
    assert push_main([str(tmp_path / "ckpt"), "--repo-id", "hf-scfm/cli"]) == 1
    assert "tokenizer_config.json" in capsys.readouterr().out

    _saved_checkpoint(tmp_path / "ckpt2")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token")
    assert push_main([str(tmp_path / "ckpt2"), "--repo-id", "hf-scfm/cli"]) == 1
    assert "the Hub refused the push" in capsys.readouterr().out

    parser = argparse.ArgumentParser(prog="hf-scfm")
    add_push_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["push", "DIR", "--repo-id", "o/n", "--private", "--revision", "r"])
    assert (args.folder, args.repo_id, args.private, args.revision) == ("DIR", "o/n", True, "r")
    assert args.func.__name__ == "push_command"
    assert hub_server.unhandled == []


def test_real_hf_scfm_model_round_trip_with_rendered_card(hub_server, tmp_path):
    """A tiny CellFM + its GeneTokenizer pushed with push_folder load back through the Auto classes after
    ``import hf_scfm``, and the card rendered on the way carries the vocabulary checksum and the metadata the
    Hub (here: the server) parses from README.md."""
    import hf_scfm  # noqa: F401 - registers the families with the Auto classes
    from huggingface_hub import HfApi, ModelCard
    from transformers import AutoModel, AutoTokenizer

    from hf_scfm.modeling.cellfm import CellFMConfig, CellFMForMaskedRegression
    from hf_scfm.tokenization import GeneTokenizer

    tokenizer = GeneTokenizer.from_genes(["TP53", "GAPDH", "ACTB", "CD3E", "MS4A1", "INS", "GCG"],
                                         species="human", encoding="continuous", model_max_length=64)
    torch.manual_seed(0)
    config = CellFMConfig.from_preset("tiny", vocab_size=len(tokenizer), vocab_checksum=tokenizer.vocab_checksum)
    model = CellFMForMaskedRegression(config).eval()
    model.save_pretrained(tmp_path / "cellfm")
    tokenizer.save_pretrained(tmp_path / "cellfm")

    push_folder(tmp_path / "cellfm", "hf-scfm/cellfm-tiny")

    loaded = AutoModel.from_pretrained("hf-scfm/cellfm-tiny")
    assert type(loaded).__name__ == "CellFMModel"
    prefix = model.base_model_prefix + "."
    backbone = {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    assert backbone.keys() == loaded.state_dict().keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, backbone[name]), name
    _assert_same_weights(model, type(model).from_pretrained("hf-scfm/cellfm-tiny"))
    loaded_tok = AutoTokenizer.from_pretrained("hf-scfm/cellfm-tiny")
    assert loaded_tok.vocab_checksum == tokenizer.vocab_checksum and loaded_tok.encoding == "continuous"

    info = HfApi().model_info("hf-scfm/cellfm-tiny")
    assert info.library_name == "transformers" and info.pipeline_tag == "feature-extraction"
    assert {"single-cell", "scRNA-seq", "cellfm", "hf-scfm", "human"} <= set(info.tags)
    card = ModelCard.load("hf-scfm/cellfm-tiny")
    assert "CellFMForMaskedRegression" in card.text and "10.1038/s41467-025-59926-5" in card.text
    assert tokenizer.vocab_checksum in card.text and "| max_length | 64 " in card.text
    assert "| bins |" not in card.text  # n_bins is saved by every GeneTokenizer but means nothing here
    assert card.data.license == "apache-2.0"
    assert hub_server.unhandled == []


def test_subprocess_without_hf_scfm_downloads_from_the_local_hub(hub_server, tmp_path, python_without_hf_scfm):
    """Infrastructure for the trust_remote_code tests: a subprocess that cannot import hf_scfm still reaches the
    local Hub through the inherited environment. (Kept light: huggingface_hub only, no torch import.)"""
    _saved_checkpoint(tmp_path / "ckpt", seed=6)
    push_folder(tmp_path / "ckpt", "hf-scfm/remote")
    expected = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    result = python_without_hf_scfm(
        "import hashlib\n"
        "try:\n"
        "    import hf_scfm\n"
        "    print('HF_SCFM_IMPORTED')\n"
        "except ModuleNotFoundError:\n"
        "    print('HF_SCFM_HIDDEN')\n"
        "from huggingface_hub import hf_hub_download\n"
        "path = hf_hub_download('hf-scfm/remote', 'model.safetensors')\n"
        "print('SHA', hashlib.sha256(open(path, 'rb').read()).hexdigest())\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HF_SCFM_HIDDEN" in result.stdout and "HF_SCFM_IMPORTED" not in result.stdout
    assert f"SHA {hashlib.sha256(expected).hexdigest()}" in result.stdout
    assert hub_server.unhandled == []
