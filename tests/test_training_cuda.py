"""One pretraining run per family on a CUDA GPU (bf16 autocast, the mamba-ssm kernels when installed).

Skipped without a CUDA device: on CPU the same loop is covered by ``test_pretrain.py``, ``test_distributed.py`` and
``test_mixed_precision.py``. Kernel parity against the float64 references is ``test_ops_cuda.py``."""

from __future__ import annotations

import json

import pytest
import torch

from hf_scfm.training.families import FAMILIES

from test_pretrain import small_corpus

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pretraining_steps_on_cuda(tmp_path, family):
    from hf_scfm.cli import main

    corpus = small_corpus(tmp_path / "corpus", family)
    out = tmp_path / "out"
    argv = ["pretrain", "--model", family, "--corpus", str(corpus), "--out", str(out), "--max-steps", "3",
            "--batch-size", "4", "--save-steps", "2", "--eval-steps", "0", "--eval-batches", "1", "--logging-steps",
            "1", "--mixed-precision", "bf16", "--no-progress"]
    torch.cuda.reset_peak_memory_stats()
    assert main(["--debug", *argv]) == 0
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
    assert torch.cuda.max_memory_allocated() > 0  # the steps ran on the GPU
    assert (out / "checkpoint-2" / "model.safetensors").exists()
