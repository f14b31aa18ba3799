"""Several processes train exactly what one process trains (CPU processes over gloo, as on GPUs over NCCL).

``hf-scfm pretrain`` and ``hf-scfm finetune`` of every family run in 2 processes (``accelerate launch --multi_gpu
--num_processes 2``; pretraining also with FSDP2, ``ACCELERATE_USE_FSDP``/``FSDP_VERSION=2`` as ``accelerate launch
--use_fsdp --fsdp_version 2`` sets them) with 4 cells per process, against 1 process with 8: the weights after 4
steps agree within 1e-5, and so do the logged losses. A checkpoint written by 2 processes continues in 2 and in 1
with the weights of the uninterrupted runs, an FSDP checkpoint also without FSDP; a SIGKILL of one process in the
middle of a step leaves the last complete checkpoint loadable and resumable.

Why within 1e-5 and not bit for bit: the two runs add the same numbers in another order. With 2 processes each
gradient is the sum of two half-batch gradients (each a float32 sum over 4 cells) added by the all-reduce, the
step's loss normaliser is summed over processes, and a forward pass over 4 padded cells runs matmuls of another
shape than over 8 (other blocking). Every difference is a float32 rounding (~1e-7 relative), carried through 4
AdamW steps. Dropout would be a real difference (each process draws its own masks): the fine-tuning base here has
``classifier_dropout`` 0 (the pretraining models have no dropout).

The multi-process jobs run in one launch (``tests/distributed_runs.py``): the launch and imports are paid once.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_scfm.training.families import FAMILIES

from test_pretrain import ENCODING, small_adata, small_tokenizer

TOLERANCE = 1e-5
RUNNER = Path(__file__).with_name("distributed_runs.py")
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
SPECIES = {"mouse": "baron_mouse", "human": "baron_human"}


@pytest.fixture(autouse=True)
def no_stream_shutdown_sleep(monkeypatch):
    """``datasets`` sleeps 5 s after every pass over a shuffled parquet stream (apache/arrow#45214)."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)


def pretrain_argv(family: str, corpus: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    return ["pretrain", "--model", family, "--corpus", str(corpus), "--out", str(out), "--max-steps", "4",
            "--batch-size", str(batch_size), "--save-steps", "2", "--eval-steps", "2", "--eval-batches", "2",
            "--logging-steps", "1", "--eval-fraction", "0.1", "--shuffle-buffer", "32", "--learning-rate", "3e-3",
            "--no-progress", *extra]


def finetune_argv(base: Path, h5ad: Path, out: Path, batch_size: int) -> list[str]:
    return ["finetune", "--model", str(base), "--train", str(h5ad), "--label-key", "cell_type", "--out", str(out),
            "--max-steps", "4", "--batch-size", str(batch_size), "--max-length", "64", "--merge", "--report-to",
            "none", "--logging-steps", "1"]


def run_here(argv: list[str]) -> None:
    from hf_scfm.cli import main

    assert main(["--debug", *argv]) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(*args: str) -> list[str]:
    """The ``accelerate launch`` line of the README's "Scaling out" section for 2 CPU processes."""
    return [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), *args]


def max_weight_difference(a: Path, b: Path, file: str = "model.safetensors") -> float:
    wa, wb = load_file(a / file), load_file(b / file)
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def logged(out: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """Corpora (70 cells in 5 uneven shards, 4 data parts), the 1-process runs, then one launch of 2 processes."""
    import datasets.config

    from hf_scfm.data import build_corpus

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # module scope: the autouse fixture is per test
    root = tmp_path_factory.mktemp("distributed")
    corpora, h5ads = {}, {}
    for family in FAMILIES:
        species, encoding = ENCODING[family]
        adata = small_adata(species, n_cells=70)
        corpora[family] = root / "corpus" / family
        build_corpus(adata, small_tokenizer(adata, species, encoding), corpora[family], shard_size=16,
                     max_length=64, progress=False)
        h5ads[family] = root / f"{family}.h5ad"
        adata[:48].write_h5ad(h5ads[family])

    jobs = []
    for family in FAMILIES:
        run_here(pretrain_argv(family, corpora[family], root / "one" / family, 8))
        # the fine-tuning base: the 1-process pretrained model with classifier dropout 0 (see the docstring)
        base = root / "base" / family
        shutil.copytree(root / "one" / family, base, ignore=shutil.ignore_patterns("checkpoint-*"))
        config = json.loads((base / "config.json").read_text())
        (base / "config.json").write_text(json.dumps({**config, "classifier_dropout": 0.0}))
        run_here(finetune_argv(base, h5ads[family], root / "ft-one" / family, 8))
        jobs += [
            {"argv": pretrain_argv(family, corpora[family], root / "two" / family, 4)},
            {"argv": pretrain_argv(family, corpora[family], root / "fsdp" / family, 4), "env": FSDP_ENV},
            {"argv": finetune_argv(base, h5ads[family], root / "ft-two" / family, 4)},
            {"argv": pretrain_argv(family, corpora[family], root / "two-resumed" / family, 4, "--resume",
                                   str(root / "two" / family / "checkpoint-2"))},
        ]
    jobs.append({"argv": pretrain_argv("cellfm", corpora["cellfm"], root / "fsdp-resumed" / "cellfm", 4, "--resume",
                                       str(root / "fsdp" / "cellfm" / "checkpoint-2")), "env": FSDP_ENV})
    (root / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run(accelerate_launch(str(RUNNER), str(root / "jobs.json")), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return {"root": root, "corpora": corpora}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_processes_pretrain_what_one_process_pretrains(runs, family):
    root = runs["root"]
    one, two, fsdp = root / "one" / family, root / "two" / family, root / "fsdp" / family
    ddp_diff, fsdp_diff = max_weight_difference(one, two), max_weight_difference(one, fsdp)
    print(f"\n{family}: max |weights 1 process - 2 processes| after 4 steps: DDP {ddp_diff:.2e}, FSDP2 {fsdp_diff:.2e}")
    assert ddp_diff <= TOLERANCE and fsdp_diff <= TOLERANCE
    start, end = load_file(one / "checkpoint-2" / "model.safetensors"), load_file(one / "model.safetensors")
    assert max((start[k] - end[k]).abs().max().item() for k in start) > 100 * TOLERANCE  # training moved them
    for other in (two, fsdp):
        assert logged(other, "loss") == pytest.approx(logged(one, "loss"), rel=1e-5)
        assert logged(other, "eval_loss") == pytest.approx(logged(one, "eval_loss"), rel=1e-5)
        assert json.loads((other / "checkpoint-2" / "hf_scfm_training_state.json").read_text())["world_size"] == 2
    # saved with the model's own class, not torch's FSDP<Class>: our modeling code and auto_map, no torch files
    for folder in (fsdp, fsdp / "checkpoint-2"):
        assert sorted(p.name for p in folder.glob("*.py")) == sorted(p.name for p in one.glob("*.py")), folder
        assert json.loads((folder / "config.json").read_text())["auto_map"] == \
            json.loads((one / "config.json").read_text())["auto_map"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_processes_finetune_what_one_process_finetunes(runs, family):
    root = runs["root"]
    diff = max_weight_difference(root / "ft-one" / family, root / "ft-two" / family)
    print(f"\n{family}: max |weights 1 process - 2 processes| after 4 fine-tuning steps: {diff:.2e}")
    assert diff <= TOLERANCE
    base = load_file(root / "base" / family / "model.safetensors")
    tuned = load_file(root / "ft-two" / family / "model.safetensors")
    moved = [k for k in base if k in tuned and not torch.equal(base[k], tuned[k])]
    assert moved  # the LoRA adapters, merged, changed the backbone


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_two_process_checkpoint_resumes_in_two_and_in_one_process(runs, family):
    root = runs["root"]
    two, resumed = root / "two" / family, root / "two-resumed" / family
    assert max_weight_difference(two, resumed) == 0.0  # same processes, same sums: bit for bit
    assert logged(resumed, "loss") == logged(two, "loss")[2:]
    alone = root / "one-resumed" / family
    run_here(pretrain_argv(family, runs["corpora"][family], alone, 8, "--resume", str(two / "checkpoint-2")))
    diff = max_weight_difference(root / "one" / family, alone)
    print(f"\n{family}: 2 -> 1 process resume vs the uninterrupted 1-process run: {diff:.2e}")
    assert diff <= TOLERANCE and max_weight_difference(two, alone) <= TOLERANCE


def test_fsdp_checkpoints_are_full_pickle_free_and_resume_with_and_without_fsdp(runs):
    from transformers import AutoModel

    root = runs["root"]
    ckpt = root / "fsdp" / "cellfm" / "checkpoint-2"
    names = sorted(p.name for p in ckpt.iterdir())
    assert not [n for n in names if n.endswith((".bin", ".pkl", ".pt", ".pth", ".pickle"))], names
    manifest = json.loads((ckpt / "training_state_manifest.json").read_text())
    assert manifest["fsdp"] is True and manifest["num_processes"] == 2
    # the sharded optimizer state, gathered: every trained parameter's moments, under its name, full size
    weights = load_file(ckpt / "model.safetensors")
    optimizer = load_file(ckpt / "optimizer.safetensors")
    for name, value in weights.items():
        assert optimizer[f"state.{name}.exp_avg"].shape == value.shape, name
    loaded = AutoModel.from_pretrained(root / "fsdp" / "cellfm")  # the final model: a full state dict
    backbone = {k.removeprefix("cellfm."): v for k, v in load_file(root / "fsdp" / "cellfm" / "model.safetensors").items()
                if k.startswith("cellfm.")}
    assert backbone and all(torch.equal(loaded.state_dict()[k], v) for k, v in backbone.items())
    # FSDP 2 -> FSDP 2 is bit for bit; FSDP 2 -> 1 process without FSDP agrees within the tolerance
    assert max_weight_difference(root / "fsdp" / "cellfm", root / "fsdp-resumed" / "cellfm") == 0.0
    alone = root / "fsdp-one-resumed"
    run_here(pretrain_argv("cellfm", runs["corpora"]["cellfm"], alone, 8, "--resume", str(ckpt)))
    assert max_weight_difference(root / "one" / "cellfm", alone) <= TOLERANCE


def test_sigkill_of_one_process_mid_step_leaves_the_last_checkpoint_loadable(runs, tmp_path):
    """Mouse-GeneMamba in 2 processes (the real ``hf-scfm`` command under ``accelerate launch``): in step 3 the
    last process stops after its forward pass, the other waits in the gradient all-reduce; the last process is
    SIGKILLed there. checkpoint-2 is whole: it loads with ``from_pretrained`` and resumes (in 1 process) to the
    uninterrupted run's weights."""
    from transformers import AutoModelForCausalLM

    family, corpus = "mouse_genemamba", runs["corpora"]["mouse_genemamba"]
    out = tmp_path / "killed"
    argv = pretrain_argv(family, corpus, out, 4, "--hang-in-step", "3")
    proc = subprocess.Popen(accelerate_launch("-m", "hf_scfm.cli", *argv), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    marker = out / "hanging-in-step-3-rank-1"
    try:
        deadline = time.time() + 300
        while not marker.exists() or not marker.read_text().strip():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "the training processes did not reach step 3"
            time.sleep(0.2)
        time.sleep(1.0)  # let rank 0 enter the all-reduce of step 3
        import os

        os.kill(int(marker.read_text()), signal.SIGKILL)
        assert proc.wait(timeout=120) != 0  # the launcher reports the failure and stops the other process
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [p.name for p in out.iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-2"]
    assert not (out / "model.safetensors").exists() and not list(out.glob(".checkpoint-*"))
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")
    assert type(model).__name__ == "MouseGeneMambaForCausalLM"
    marker.unlink()
    run_here(pretrain_argv(family, corpus, out, 8, "--resume"))
    assert max_weight_difference(runs["root"] / "one" / family, out) <= TOLERANCE


def test_readme_scaling_out_lines_parse():
    """Every ``accelerate launch`` line of the README's "Scaling out" section parses with accelerate's launcher and
    (pretraining) with ``hf-scfm pretrain``'s parser; its CPU line is the one the tests above launch."""
    import re
    import shlex

    from accelerate.commands.launch import launch_command_parser

    from hf_scfm.cli import parse

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Scaling out"):]
    section = section[: section.index("\n## ", 3)]
    lines = [line for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S) for line in block.splitlines()
             if line.startswith("accelerate launch")]
    assert len(lines) >= 6
    import accelerate
    from packaging.version import Version

    for line in lines:
        argv = shlex.split(line)[2:]
        if "--fsdp_version" in argv and Version(accelerate.__version__) < Version("1.6"):
            continue  # FSDP2 flags came with Accelerate 1.6 (the README says so)
        launch = launch_command_parser().parse_args(argv)
        assert launch.module and launch.training_script == "hf_scfm.cli", line
        if launch.training_script_args[0] == "pretrain":
            parse(launch.training_script_args)
    cpu = next(line for line in lines if "--mixed_precision no" in line)
    expected = accelerate_launch()[2:]
    port = expected.index("--main_process_port")
    assert shlex.split(cpu)[2:2 + port] == expected[:port]


@pytest.mark.parametrize("env, expected", [({}, (1, True)), ({"FSDP_VERSION": "2"}, (2, True)),
                                           ({"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}, (2, False))])
def test_fsdp_launch_settings_are_read_from_the_launch(monkeypatch, env, expected):
    """What ``accelerate launch --use_fsdp --fsdp_version 2 --fsdp_reshard_after_forward false`` sets (on any
    supported Accelerate: the plugin has these fields from 1.6, older ones leave them to the environment)."""
    from hf_scfm.training.distributed import _fsdp_launch_settings

    for key in ("FSDP_VERSION", "FSDP_RESHARD_AFTER_FORWARD", "FSDP_SHARDING_STRATEGY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _fsdp_launch_settings() == expected
