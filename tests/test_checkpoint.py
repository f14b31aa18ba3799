"""Training state without pickle (hf_scfm.training.checkpoint): reversible encoding, bit-exact round trip of a
tiny model + AdamW + cosine schedule (with dropout and python/numpy randomness in the loop), no pickle on load."""

from __future__ import annotations

import json
import math
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from hf_scfm.training.checkpoint import (
    MANIFEST,
    TrainingStateError,
    decode_state,
    encode_state,
    load_training_state,
    read_rank_extras,
    save_training_state,
)


def forbid_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling was attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def assert_no_pickled_files(folder):
    names = sorted(p.name for p in folder.rglob("*"))
    assert not [n for n in names if n.endswith((".bin", ".pkl", ".pt", ".pth", ".pickle"))], names
    return names


def test_encoding_round_trips_tuples_int_keys_non_finite_floats_and_arrays():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(4.0)}, 7: {}},
             "param_groups": [{"betas": (0.9, 0.95), "lr": float("inf"), "nan": float("nan"), "fused": None,
                               "params": [0, 7]}],
             "rng": ("MT19937", np.arange(5, dtype=np.uint32), np.int64(2), 0.5),
             "__tensor__": "a string key that looks like a marker"}
    tensors = {}
    encoded = encode_state(state, tensors)
    assert sorted(tensors) == ["state.0.exp_avg", "state.0.step"]
    text = json.dumps(encoded, allow_nan=False)  # strict JSON
    back = decode_state(json.loads(text), tensors)
    assert list(back["state"]) == [0, 7] and back["state"][7] == {}
    assert torch.equal(back["state"][0]["exp_avg"], torch.arange(4.0))
    group = back["param_groups"][0]
    assert group["betas"] == (0.9, 0.95) and isinstance(group["betas"], tuple)
    assert group["lr"] == math.inf and math.isnan(group["nan"]) and group["fused"] is None
    assert back["rng"][1].dtype == np.uint32 and back["rng"][1].tolist() == [0, 1, 2, 3, 4] and back["rng"][2] == 2
    assert back["__tensor__"] == state["__tensor__"]
    with pytest.raises(TypeError, match=r"'param_groups\.0\.fn'.*never pickle"):
        encode_state({"param_groups": [{"fn": lambda x: x}]}, {})


class Tiny(nn.Module):
    """Tied input/output weights (safetensors stores the shared tensor once), a norm, dropout and a buffer."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 6, bias=False)
        self.mid = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(6, 6, bias=False)
        self.out.weight = self.inp.weight
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen += 1
        return self.out(self.drop(torch.tanh(self.norm(self.mid(self.inp(x))))))


def make(seed):
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    model = Tiny()
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95))
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=8)
    return model, opt, sched


def train(model, opt, sched, steps):
    for _ in range(steps):
        x = torch.randn(3, 6) * (1 + random.random()) + float(np.random.rand())  # all three RNGs matter
        loss = (model(x) - x).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def test_save_load_round_trip_continues_bit_identically_without_pickle(tmp_path, monkeypatch):
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    accelerator = Accelerator(cpu=True)
    model, opt, _ = make(0)
    model, opt = accelerator.prepare(model, opt)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=8)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    train(model, opt, sched, 3)
    folder = tmp_path / "ckpt"
    save_training_state(folder, accelerator, model, opt, sched, extra={"epoch": 1, "consumed_batches": 5})
    train(model, opt, sched, 4)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    reference_lr = sched.get_last_lr()

    names = assert_no_pickled_files(folder)
    assert {"model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
            "rng_state_rank0.safetensors", "rng_state_rank0.json", "extra_state_rank0.json", MANIFEST} == set(names)
    from safetensors.torch import load_file

    # the optimizer state is keyed by parameter name (the same under DDP, FSDP and any number of processes)
    assert {"state.inp.weight.exp_avg", "state.inp.weight.exp_avg_sq", "state.mid.bias.step"} <= set(
        load_file(folder / "optimizer.safetensors"))
    assert len(load_file(folder / "model.safetensors")) == len(reference) - 1  # tied weight stored once

    # a fresh run (other init, other RNG position, fresh optimizer/scheduler) restored from the folder
    model2, opt2, _ = make(123)
    model2, opt2 = accelerator.prepare(model2, opt2)
    sched2 = get_cosine_schedule_with_warmup(opt2, num_warmup_steps=2, num_training_steps=8)
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    forbid_pickle(monkeypatch)
    extra = load_training_state(folder, accelerator, model2, opt2, sched2)
    assert extra == {"epoch": 1, "consumed_batches": 5}
    # (torch.distributed.checkpoint hands tuples in param_groups back as lists: AdamW reads either)
    assert sched2.last_epoch == 3 and tuple(opt2.param_groups[0]["betas"]) == (0.9, 0.95)
    train(model2, opt2, sched2, 4)
    assert sched2.get_last_lr() == reference_lr
    got = model2.state_dict()
    assert got.keys() == reference.keys()
    for name in reference:
        assert torch.equal(got[name], reference[name]), name


def test_load_takes_another_process_count_refuses_pickled_folders_and_mismatched_models(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, opt, sched = make(0)
    folder = tmp_path / "ckpt"
    save_training_state(folder, accelerator, model, opt, sched, extra={"rank": 0})

    other = tmp_path / "wrong-model"
    linear = nn.Linear(2, 2)
    save_training_state(other, accelerator, linear, torch.optim.AdamW(linear.parameters()), None, extra={})
    with pytest.raises(TrainingStateError, match="does not match the model"):
        load_training_state(other, accelerator, model, opt, sched)

    # written by 2 processes (rank 1's files present), read by 1: the shared state and rank 0's files are used,
    # and every rank's extra is there for the caller to hand over
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "num_processes": 2}))
    (folder / "extra_state_rank1.json").write_text(json.dumps({"state": {"rank": 1}}))
    model2, opt2, sched2 = make(5)
    assert load_training_state(folder, accelerator, model2, opt2, sched2) == {"rank": 0}
    assert read_rank_extras(folder) == [{"rank": 0}, {"rank": 1}]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))

    (folder / MANIFEST).unlink()
    (folder / "optimizer.bin").write_bytes(b"not read")
    with pytest.raises(TrainingStateError, match=r"pickled training state \['optimizer.bin'\]"):
        load_training_state(folder, accelerator, model, opt, sched)
