"""Pretraining loop (hf_scfm.training.pretrain): exact resume, checkpoints, errors, card, Hub push.

Every corpus here is built from the first 64 cells of a bundled dataset restricted to its 300 most expressed
(unambiguously named) genes, so the vocabulary (~306 tokens) and the runs stay tiny: 6 steps of batch 4 with
max_length 64.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_scfm.training.families import FAMILIES
from hf_scfm.cli import parse
from hf_scfm.training.pretrain import ResumeError, pretrain

ENCODING = {"mouse_genemamba": ("mouse", "rank"), "scmamba2": ("human", "binned"), "cellfm": ("human", "continuous")}


def small_adata(species: str, n_cells: int = 64, n_genes: int = 300):
    """First ``n_cells`` of baron_mouse/baron_human, restricted to their ``n_genes`` most expressed genes among
    those the species' vocabulary maps one-to-one (so a tokenizer can be built over exactly them)."""
    from hf_scfm.data import load_example
    from hf_scfm.tokenization import GeneTokenizer

    adata = load_example("baron_mouse" if species == "mouse" else "baron_human")[:n_cells].copy()
    report = GeneTokenizer.from_species(species).mapping_report(adata)
    total = np.asarray(adata.X.sum(0)).ravel()
    order = [i for i in np.argsort(-total, kind="stable")
             if adata.var_names[i] not in report.unmatched and adata.var_names[i] not in report.duplicates]
    adata = adata[:, sorted(order[:n_genes])].copy()
    return adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()


def small_tokenizer(adata, species: str, encoding: str):
    from hf_scfm.tokenization import GeneTokenizer

    tok = GeneTokenizer.from_genes(list(adata.var_names), species=species, encoding=encoding)
    if encoding == "rank":
        tok.fit_medians(adata)
    return tok


def small_corpus(folder: Path, family: str) -> Path:
    from hf_scfm.data import build_corpus

    species, encoding = ENCODING[family]
    adata = small_adata(species)
    build_corpus(adata, small_tokenizer(adata, species, encoding), folder, shard_size=16, max_length=64,
                 obs_columns=["cell_type"], progress=False)
    return folder


@pytest.fixture(autouse=True)
def no_stream_shutdown_sleep(monkeypatch):
    """``datasets`` sleeps 5 s whenever a multi-file parquet stream's reader threads shut down (a workaround for
    apache/arrow#45214, a crash at interpreter exit); each run abandons one stream, so tests skip the sleep."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    return {family: small_corpus(root / family, family) for family in FAMILIES}


def run_args(family: str, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", family, "--corpus", str(corpus), "--out", str(out), "--max-steps", "6", "--batch-size", "4",
            "--save-steps", "3", "--eval-steps", "3", "--eval-batches", "2", "--logging-steps", "1",
            "--eval-fraction", "0.1", "--shuffle-buffer", "32", "--learning-rate", "3e-3", "--no-progress", *extra]


def run(family, corpus, out, *extra):
    _, (args,) = parse(["pretrain", *run_args(family, corpus, out, *extra)])
    return pretrain(args)


def assert_same_weights(a: Path, b: Path):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def check_stop_then_resume(corpora, tmp_path, family, full):
    stopped = run(family, corpora[family], tmp_path / "split", "--stop-after-steps", "3")
    assert stopped["stopped"] and stopped["final_step"] == 3
    assert not (tmp_path / "split" / "model.safetensors").exists()
    resumed = run(family, corpora[family], tmp_path / "split", "--resume")

    assert resumed["final_step"] == full["final_step"] == 6
    assert resumed["final_loss"] == full["final_loss"] and resumed["eval_loss"] == full["eval_loss"]
    assert_same_weights(tmp_path / "full", tmp_path / "split")
    # the weights moved: training happened
    start = load_file(tmp_path / "full" / "checkpoint-3" / "model.safetensors")
    end = load_file(tmp_path / "full" / "model.safetensors")
    assert any(not torch.equal(start[k], end[k]) for k in start)
    # the resumed metrics log continues the first one without duplicates
    steps = [r["step"] for r in map(json.loads, (tmp_path / "split" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_stop_then_resume_gives_the_uninterrupted_weights(corpora, tmp_path):
    full = run("scmamba2", corpora["scmamba2"], tmp_path / "full")
    check_stop_then_resume(corpora, tmp_path, "scmamba2", full)


def test_real_kill_then_resume_gives_the_uninterrupted_weights(corpora, tmp_path):
    """Mouse-GeneMamba: a subprocess (``python -m hf_scfm.cli pretrain``) is SIGKILLed after its step-3
    checkpoint, mid-run with no clean shutdown; ``--resume`` must then reproduce the uninterrupted run."""
    family, corpus = "mouse_genemamba", corpora["mouse_genemamba"]
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hf_scfm.cli", "pretrain", *run_args(family, corpus, out, "--hang-after-steps", "3")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 240
        while not (out / "hanging-at-step-3").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "the training subprocess did not reach step 3"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert (out / "checkpoint-3").is_dir() and not (out / "model.safetensors").exists()
    (out / "hanging-at-step-3").unlink()

    resumed = run(family, corpus, out, "--resume")
    full = run(family, corpus, tmp_path / "full")
    assert resumed["final_step"] == 6 and resumed["final_loss"] == full["final_loss"]
    assert_same_weights(tmp_path / "full", out)

    # the final folder: loadable model + tokenizer, a card with valid YAML metadata, a loss curve, metrics
    from transformers import AutoModelForCausalLM

    from hf_scfm.tokenization import GeneTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MouseGeneMambaForCausalLM"
    tok = GeneTokenizer.from_pretrained(str(out))
    assert tok.vocab_checksum == model.config.vocab_checksum and len(tok) == model.config.vocab_size
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert "single-cell" in meta["tags"] and meta["library_name"] == "transformers"
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(resumed["eval_loss"])
    png = (out / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]


def test_resume_refuses_partial_corrupt_and_other_family_checkpoints(corpora, tmp_path):
    out = tmp_path / "run"
    run("cellfm", corpora["cellfm"], out, "--stop-after-steps", "3", "--gradient-checkpointing")
    ckpt = out / "checkpoint-3"

    with pytest.raises(ResumeError, match=r"--model 'scmamba2' \(checkpoint: 'cellfm'\)"):
        run("scmamba2", corpora["scmamba2"], out, "--resume")
    with pytest.raises(ResumeError, match="--batch-size 8"):
        run("cellfm", corpora["cellfm"], out, "--resume", "--batch-size", "8")

    weights = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ResumeError, match="truncated or corrupt"):
        run("cellfm", corpora["cellfm"], out, "--resume")

    (ckpt / "hf_scfm_training_state.json").unlink()
    with pytest.raises(ResumeError, match="partial"):
        run("cellfm", corpora["cellfm"], out, "--resume", str(ckpt))
    with pytest.raises(ResumeError, match="no checkpoint-N"):
        run("cellfm", corpora["cellfm"], tmp_path / "empty", "--resume")


def test_corpus_of_another_encoding_is_refused(corpora, tmp_path):
    with pytest.raises(ValueError, match="'continuous' encoding, but scmamba2 reads the 'binned'"):
        run("scmamba2", corpora["cellfm"], tmp_path / "x")


def test_pretrain_pushes_checkpoints_and_final_model_to_the_hub(corpora, tmp_path, hub_server):
    from huggingface_hub import HfApi
    from transformers import AutoModel

    """A CellFM run pushing to the local Hub (``tests/hub_server.py``) is also the uninterrupted reference for a
    stop-and-resume run, which must end with the same weights."""
    out = tmp_path / "full"
    full = run("cellfm", corpora["cellfm"], out, "--push-to-hub", "--hub-model-id", "hf-scfm/cellfm-tiny")

    files = set(HfApi().list_repo_files("hf-scfm/cellfm-tiny"))
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "README.md", "loss_curve.png",
            "modeling_cellfm.py", "checkpoint-3/model.safetensors", "checkpoint-3/config.json"} <= files
    assert not any(f.endswith((".bin", ".pkl")) for f in files)  # training state never leaves the machine
    assert "metrics.jsonl" not in files and "checkpoint-3/hf_scfm_training_state.json" in files
    loaded = AutoModel.from_pretrained("hf-scfm/cellfm-tiny")
    saved = load_file(out / "model.safetensors")
    state = loaded.state_dict()
    backbone = {k.removeprefix("cellfm."): v for k, v in saved.items() if k.startswith("cellfm.")}
    assert backbone and all(torch.equal(state[k], v) for k, v in backbone.items())
    assert hub_server.unhandled == []

    check_stop_then_resume(corpora, tmp_path, "cellfm", full)


def test_checkpoints_hold_no_pickle_and_resume_never_unpickles(corpora, tmp_path, monkeypatch):
    """Training state is safetensors + JSON (hf_scfm.training.checkpoint): no .bin/.pkl/.pt file in a checkpoint,
    and a resume with every unpickling entry point disabled completes; a pickled (save_state) folder is refused."""
    import pickle

    out = tmp_path / "run"
    run("cellfm", corpora["cellfm"], out, "--stop-after-steps", "3")
    ckpt = out / "checkpoint-3"
    names = {p.name for p in ckpt.iterdir()}
    assert not [n for n in names if n.endswith((".bin", ".pkl", ".pt", ".pth", ".pickle"))], sorted(names)
    assert {"optimizer.safetensors", "optimizer.json", "scheduler.json", "rng_state_rank0.safetensors",
            "rng_state_rank0.json", "extra_state_rank0.json", "training_state_manifest.json"} <= names
    assert json.loads((ckpt / "extra_state_rank0.json").read_text())["state"]["step"] == 3

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling was attempted during --resume")

    with monkeypatch.context() as patch:
        for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
            patch.setattr(module, name, refuse)
        resumed = run("cellfm", corpora["cellfm"], out, "--resume", "--max-steps", "4", "--save-steps", "4")
    assert resumed["final_step"] == 4

    (ckpt / "training_state_manifest.json").unlink()
    (ckpt / "optimizer.bin").write_bytes(b"never read")
    with pytest.raises(ResumeError, match=r"pickled training state \['optimizer.bin'\]"):
        run("cellfm", corpora["cellfm"], out, "--resume", str(ckpt))


def test_each_step_draws_new_masks_and_evaluation_keeps_its_own(corpora):
    """Dynamic masking: the same cells collated at two steps get other masked positions, at the same step the same
    ones (so a resumed run and any number of processes see the same batches), and pretraining's held-out
    evaluation uses a mask epoch no training step uses."""
    from hf_scfm.data import DataCollatorForMaskedRegression, load_corpus
    from hf_scfm.training.pretrain_data import EVAL_MASK_EPOCH, collate_step

    ds = load_corpus(str(corpora["cellfm"]), streaming=True, columns=["input_ids", "values"])
    records = [r for _, r in zip(range(8), ds)]
    collator = DataCollatorForMaskedRegression(seed=0)
    step3 = collate_step(collator, records, 3, 2)
    assert [len(b["labels"]) for b in step3] == [4, 4]
    step4 = collate_step(collator, records, 4, 2)
    again = collate_step(DataCollatorForMaskedRegression(seed=0), records, 3, 2)
    for a, b, c in zip(step3, step4, again):
        assert not torch.equal(a["labels"] != -100, b["labels"] != -100)
        assert torch.equal(a["labels"], c["labels"]) and torch.equal(a["input_ids"], c["input_ids"])
    assert collator.epoch == 5 and EVAL_MASK_EPOCH < 1  # steps use epochs 1, 2, ...: never the evaluation's
