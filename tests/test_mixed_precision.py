"""Mixed precision (``--mixed-precision bf16``, Accelerate's ``torch.autocast``): the scans accumulate in float32.

Under autocast a model's linear layers run in bfloat16, so the ops receive bfloat16 activations (or float32
ones, e.g. ``A = -exp(A_log)`` from a float32 parameter) while autocast is still on. Every op then computes in
float32 with autocast off (its matmuls and einsums would otherwise run in bfloat16 again) and returns its output
in the inputs' dtype. Pinned here against the float64 reference on the same bfloat16-representable inputs, with
an odd length, padding and batch 2:

* float32 inputs under autocast give the float32 result (within float32 rounding): nothing ran in bfloat16;
* bfloat16 inputs give that result rounded once to bfloat16 (relative error <= 2^-8 of the output's scale).

Measured: 1-2e-7 relative for float32 inputs with or without autocast, ~2e-3 for bfloat16 inputs; with autocast
left on inside the ops, float32 inputs come out 3-4e-3 off (their matmuls ran in bfloat16), which the test catches.

The 50-step bf16 vs fp32 training runs on real data are in ``test_bf16_pretraining_tracks_fp32``.
"""

from __future__ import annotations

import json

import pytest
import torch

from hf_scfm.modeling.cellfm.retention import linear_retention, linear_retention_reference
from hf_scfm.modeling.mouse_genemamba.selective_scan import selective_scan, selective_scan_reference
from hf_scfm.modeling.scmamba2.ssd import ssd_reference, ssd_scan

LENGTH = 333
BF16_ROUNDING = 2.0 ** -8  # one bfloat16 ulp relative to the output's largest magnitude


def _inputs(shapes: dict, seed: int = 0) -> dict:
    """float32 tensors whose values are bfloat16 numbers (so bf16 inputs lose nothing against the reference)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, scale, shift) in shapes.items():
        out[name] = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).bfloat16().float()
    return out


def selective_scan_case():
    b, d, n = 2, 8, 4
    x = _inputs({"u": ((b, d, LENGTH), 1.0, 0.0), "delta": ((b, d, LENGTH), 0.5, 0.0),
                 "B": ((b, n, LENGTH), 1.0, 0.0), "C": ((b, n, LENGTH), 1.0, 0.0), "D": ((d,), 1.0, 0.0),
                 "z": ((b, d, LENGTH), 1.0, 0.0), "delta_bias": ((d,), 0.5, 0.0)})
    x["A"] = -(torch.rand(d, n, generator=torch.Generator().manual_seed(1)) * 0.2 + 0.01).bfloat16().float()
    return (lambda **t: selective_scan(**t, delta_softplus=True),
            lambda **t: selective_scan_reference(**t, delta_softplus=True), x)


def ssd_case():
    b, h, p, g, n = 2, 4, 3, 2, 5
    x = _inputs({"x": ((b, LENGTH, h, p), 1.0, 0.0), "dt": ((b, LENGTH, h), 0.5, 0.0),
                 "B": ((b, LENGTH, g, n), 1.0, 0.0), "C": ((b, LENGTH, g, n), 1.0, 0.0), "D": ((h,), 1.0, 0.0),
                 "z": ((b, LENGTH, h, p), 1.0, 0.0), "dt_bias": ((h,), 0.5, 0.0)})
    x["A"] = -(torch.rand(h, generator=torch.Generator().manual_seed(1)) * 0.2 + 0.01).bfloat16().float()
    return (lambda **t: ssd_scan(**t, chunk_size=64, dt_softplus=True),
            lambda **t: ssd_reference(**t, dt_softplus=True), x)


def retention_case():
    b, h, dk, dv = 2, 2, 8, 8
    # positive features (the model's feature map) and a sum over the whole cell: the case bf16 sums lose
    x = _inputs({"q": ((b, h, LENGTH, dk), 0.3, 1.0), "k": ((b, h, LENGTH, dk), 0.3, 1.0),
                 "v": ((b, h, LENGTH, dv), 1.0, 0.5)})
    mask = torch.ones(b, LENGTH)
    mask[1, 250:] = 0  # right padding in the second cell

    def op(**t):
        return linear_retention(**t, attention_mask=mask)

    def ref(**t):
        return linear_retention_reference(**t, attention_mask=mask.double())

    return op, ref, x


@pytest.fixture(autouse=True)
def no_stream_shutdown_sleep(monkeypatch):
    """``datasets`` sleeps 5 s after every pass over a shuffled parquet stream (apache/arrow#45214)."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)


CASES = {"selective_scan": selective_scan_case, "ssd_scan": ssd_case, "linear_retention": retention_case}


@pytest.mark.parametrize("name", list(CASES))
def test_ops_under_bf16_autocast_compute_in_float32(name):
    op, reference, x = CASES[name]()
    ref = reference(**{k: v.double() for k, v in x.items()})
    fp32 = op(**x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = op(**x)
        bf16 = op(**{k: v.bfloat16() for k, v in x.items()})
    assert under_autocast.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    scale = ref.abs().max().item()
    fp32_err = (fp32.double() - ref).abs().max().item() / scale
    autocast_err = (under_autocast.double() - ref).abs().max().item() / scale
    bf16_err = (bf16.double() - ref).abs().max().item() / scale
    print(f"\n{name}: max relative error vs float64: fp32 {fp32_err:.1e}, fp32 under autocast {autocast_err:.1e}, "
          f"bf16 inputs under autocast {bf16_err:.1e}")
    assert fp32_err < 1e-5
    assert autocast_err < 1e-5  # computed in float32, not in bfloat16
    assert bf16_err <= BF16_ROUNDING  # the float32 result, rounded once
    assert torch.isfinite(bf16.float()).all()


@pytest.mark.slow  # ~35 s: 6 runs of 50 steps; the fast op tests above pin the float32 accumulation
def test_bf16_pretraining_tracks_fp32(tmp_path):
    """Every family, 50 steps on real cells (Baron mouse / human), ``--mixed-precision bf16`` vs ``no``: no NaN,
    and the mean loss of the last 10 steps within 2% of the fp32 run's (same seed, same batches). Measured gaps:
    mouse_genemamba 0.005%, scmamba2 0.05%, cellfm 0.02% (last step alone 0.001%, 0.22%, 0.014%)."""
    from accelerate.state import AcceleratorState

    from hf_scfm.cli import main
    from hf_scfm.training.families import FAMILIES

    from test_pretrain import small_corpus

    gaps, last = {}, {}
    for family in FAMILIES:
        corpus = small_corpus(tmp_path / "corpus" / family, family)
        losses = {}
        for precision in ("no", "bf16"):
            out = tmp_path / precision / family
            argv = ["pretrain", "--model", family, "--corpus", str(corpus), "--out", str(out), "--max-steps", "50",
                    "--batch-size", "4", "--save-steps", "1000", "--eval-steps", "0", "--eval-batches", "1",
                    "--logging-steps", "1", "--eval-fraction", "0.05", "--shuffle-buffer", "32",
                    "--learning-rate", "3e-3", "--mixed-precision", precision, "--no-progress"]
            AcceleratorState._reset_state(reset_partial_state=True)  # a new mixed precision in this process
            try:
                assert main(["--debug", *argv]) == 0
            finally:
                AcceleratorState._reset_state(reset_partial_state=True)
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            losses[precision] = [r["loss"] for r in records if "loss" in r]
        assert len(losses["bf16"]) == 50 and all(map(torch.isfinite, torch.tensor(losses["bf16"])))
        assert losses["bf16"] != losses["no"]  # bf16 autocast was on
        fp32_end, bf16_end = (sum(losses[p][-10:]) / 10 for p in ("no", "bf16"))
        gaps[family] = abs(bf16_end - fp32_end) / fp32_end
        last[family] = abs(losses["bf16"][-1] - losses["no"][-1]) / losses["no"][-1]
        assert losses["no"][-1] < 0.95 * losses["no"][0]  # the runs learned something
    print("\nbf16 vs fp32 loss gap (mean of the last 10 of 50 steps): "
          + ", ".join(f"{f} {100 * g:.3f}%" for f, g in gaps.items()) + "; last step: "
          + ", ".join(f"{f} {100 * g:.3f}%" for f, g in last.items()))
    assert max(gaps.values()) < 0.02, gaps
