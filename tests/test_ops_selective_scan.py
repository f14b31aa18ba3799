"""Mamba-1 ops: the fast selective scan, the one-step update and the causal conv, each pinned to a
plain reference in float64 (odd lengths, groups, D/z/delta_bias, padding, batch > 1)."""

import importlib
import importlib.abc
import sys

import pytest
import torch
import torch.nn.functional as F

from hf_scfm.modeling.mouse_genemamba import selective_scan as scan_module
from hf_scfm.modeling.mouse_genemamba.conv import causal_conv1d, causal_conv1d_channels_last, causal_conv1d_update
from hf_scfm.modeling.mouse_genemamba.selective_scan import (
    selective_scan,
    selective_scan_reference,
    selective_scan_time_major,
    selective_state_update,
)

F64 = torch.float64


def make_inputs(batch=2, dim=6, length=13, n_state=4, groups=None, dtype=F64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(grad)

    bc_shape = (batch, n_state, length) if groups is None else (batch, groups, n_state, length)
    return dict(
        u=rnd(batch, dim, length),
        delta=rnd(batch, dim, length, scale=0.5),
        A=(-torch.rand(dim, n_state, generator=g, dtype=dtype) * 2 - 0.1).requires_grad_(grad),
        B=rnd(*bc_shape),
        C=rnd(*bc_shape),
        D=rnd(dim),
        z=rnd(batch, dim, length),
        delta_bias=rnd(dim, scale=0.5),
    )


@pytest.mark.parametrize("length", [1, 2, 13, 40])
@pytest.mark.parametrize("groups", [None, 1, 3])
def test_fast_scan_matches_reference_float64(length, groups):
    x = make_inputs(length=length, groups=groups)
    ref, ref_state = selective_scan_reference(**x, delta_softplus=True, return_last_state=True)
    out, state = selective_scan(**x, delta_softplus=True, return_last_state=True, backend="torch")
    assert out.shape == (2, 6, length) and state.shape == (2, 6, 4)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, ref_state, rtol=1e-12, atol=1e-12)


def test_optional_arguments_each_change_the_output():
    x = make_inputs()
    full = selective_scan(**x, delta_softplus=True)
    for drop in ("D", "z", "delta_bias"):
        partial = dict(x, **{drop: None})
        out = selective_scan(**partial, delta_softplus=True)
        torch.testing.assert_close(out, selective_scan_reference(**partial, delta_softplus=True), rtol=1e-12, atol=1e-12)
        assert (out - full).abs().max() > 1e-3, drop
    no_softplus = selective_scan(**x)
    torch.testing.assert_close(no_softplus, selective_scan_reference(**x), rtol=1e-10, atol=1e-10)


def test_float32_against_float64_reference():
    x64 = make_inputs(batch=2, dim=16, length=300, n_state=8, groups=2)
    ref = selective_scan_reference(**x64, delta_softplus=True)
    x32 = {k: v.float() for k, v in x64.items()}
    out = selective_scan(**x32, delta_softplus=True)
    assert out.dtype == torch.float32
    # stated tolerance: float32 accumulation over 300 steps
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_bfloat16_input_is_computed_in_float32_and_returned_in_bfloat16():
    x = {k: v.float() for k, v in make_inputs().items()}
    ref = selective_scan_reference(**x, delta_softplus=True)
    out = selective_scan(**{k: v.bfloat16() for k, v in x.items()}, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("groups", [None, 2])
def test_gradcheck(groups):
    x = make_inputs(batch=2, dim=4, length=5, n_state=3, groups=groups, grad=True)
    names = list(x)

    def fn(*args):
        out, state = selective_scan(**dict(zip(names, args)), delta_softplus=True, return_last_state=True)
        return out, state

    assert torch.autograd.gradcheck(fn, tuple(x.values()))


def test_gradients_match_reference_autograd():
    x = make_inputs(length=17, groups=3, grad=True)
    w = torch.randn(2, 6, 17, dtype=F64)
    ws = torch.randn(2, 6, 4, dtype=F64)
    grads = []
    for fn in (selective_scan_reference, selective_scan):
        out, state = fn(**x, delta_softplus=True, return_last_state=True)
        grads.append(torch.autograd.grad((out * w).sum() + (state * ws).sum(), list(x.values())))
    for name, g_ref, g in zip(x, *grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("block_steps", [1, 3, 17])
@pytest.mark.parametrize("groups", [None, 3])
def test_time_blocks_match_reference_values_and_gradients(monkeypatch, block_steps, groups):
    # blocks of 1, 3 (the last one short: 17 = 5 * 3 + 2) or all 17 steps
    monkeypatch.setattr(scan_module, "BLOCK_ELEMENTS", block_steps * 2 * 6 * 4)  # batch * D * N per step
    x = make_inputs(length=17, groups=groups, grad=True)
    g = torch.Generator().manual_seed(5)
    w, ws = torch.randn(2, 6, 17, generator=g, dtype=F64), torch.randn(2, 6, 4, generator=g, dtype=F64)
    res = []
    for fn in (selective_scan_reference, selective_scan):
        out, state = fn(**x, delta_softplus=True, return_last_state=True)
        res.append((out, state) + torch.autograd.grad((out * w).sum() + (state * ws).sum(), list(x.values())))
    for name, ref, got in zip(["out", "state", *x], *res):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10, msg=name)


def test_no_gradient_needed_keeps_no_block_states(monkeypatch):
    monkeypatch.setattr(scan_module, "BLOCK_ELEMENTS", 2 * 6 * 4)
    x = make_inputs(length=9)
    with torch.no_grad():
        out = selective_scan(**x)
    torch.testing.assert_close(out, selective_scan_reference(**x), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("groups", [None, 3])
def test_step_by_step_decoding_equals_full_scan(groups):
    x = make_inputs(length=9, groups=groups)
    full, last = selective_scan(**x, delta_softplus=True, return_last_state=True)
    state = torch.zeros(2, 6, 4, dtype=F64)
    steps = []
    for t in range(9):
        B_t = x["B"][..., t]
        C_t = x["C"][..., t]
        steps.append(
            selective_state_update(
                state, x["u"][..., t], x["delta"][..., t], x["A"], B_t, C_t, D=x["D"], z=x["z"][..., t],
                dt_bias=x["delta_bias"], dt_softplus=True,
            )
        )
    torch.testing.assert_close(torch.stack(steps, -1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, last, rtol=1e-12, atol=1e-12)


def test_right_padding_does_not_change_real_positions():
    x = make_inputs(batch=2, length=11)
    lengths = [11, 6]
    mask = (torch.arange(11)[None] < torch.tensor(lengths)[:, None]).to(F64)  # [b, L]
    padded = dict(x, u=x["u"] * mask[:, None], z=x["z"])  # models zero padded inputs
    out = selective_scan(**padded, delta_softplus=True)
    for i, n in enumerate(lengths):
        alone = {k: (v[i : i + 1, ..., :n] if v.dim() >= 3 else v) for k, v in padded.items()}
        torch.testing.assert_close(out[i : i + 1, :, :n], selective_scan(**alone, delta_softplus=True), rtol=1e-12, atol=1e-12)
    # the padded tail of the shorter sequence is garbage-free but not part of the contract; changing
    # what sits in the padded slots of u (after zeroing) must not move the real outputs
    noisy = dict(padded, B=x["B"] + 5 * (1 - mask)[:, None], delta=x["delta"] + 3 * (1 - mask)[:, None])
    torch.testing.assert_close(selective_scan(**noisy, delta_softplus=True)[1, :, :6], out[1, :, :6])


def test_left_padding_with_zero_input_and_delta_keeps_state_zero():
    x = make_inputs(batch=1, length=10)
    pad = 4
    mask = (torch.arange(10) >= pad).to(F64)[None, None]
    left = dict(x, u=x["u"] * mask, delta=x["delta"] * mask)
    del left["delta_bias"]  # a bias would make delta non-zero at padded steps
    _, state_after_pad = selective_scan(**{k: (v[..., :pad] if v.dim() == 3 else v) for k, v in left.items()}, return_last_state=True)
    assert torch.count_nonzero(state_after_pad) == 0
    out = selective_scan(**left)
    real = {k: (v[..., pad:] if v.dim() == 3 else v) for k, v in left.items()}
    torch.testing.assert_close(out[..., pad:], selective_scan(**real), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[..., :pad], torch.zeros_like(out[..., :pad]))


@pytest.mark.parametrize("length", [1, 13, 40])
@pytest.mark.parametrize("groups", [None, 1, 3])
def test_time_major_scan_matches_reference_float64(monkeypatch, length, groups):
    # time-major layout [L, b, D] / [L, b, (G,) N], blocks of 4 steps, right padding in row 1
    monkeypatch.setattr(scan_module, "BLOCK_ELEMENTS", 4 * 2 * 6 * 4)
    x = make_inputs(length=length, groups=groups)
    x["u"] = x["u"] * (torch.arange(length) < max(1, length - 5)).to(F64)
    ref = selective_scan_reference(**x, delta_softplus=True)
    tm = {k: x[k].permute(2, 0, 1) for k in ("u", "delta", "z")}
    for k in ("B", "C"):
        tm[k] = x[k].permute(-1, *range(x[k].dim() - 1))
    delta = tm["delta"] + x["delta_bias"]
    out = selective_scan_time_major(tm["u"], delta, x["A"], tm["B"], tm["C"], D=x["D"], z=tm["z"], delta_softplus=True)
    torch.testing.assert_close(out.permute(1, 2, 0), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="forward-only"):
        selective_scan_time_major(tm["u"].requires_grad_(), delta, x["A"], tm["B"], tm["C"])


def test_exp_floor_keeps_strong_decays_exact():
    # delta * A far below EXP_FLOOR (-60): exp(-60) ~ 1e-26 in place of ~0, invisible even in float64
    x = make_inputs(length=20)
    x["A"] = torch.full_like(x["A"], -500.0)
    ref = selective_scan_reference(**x, delta_softplus=True)
    torch.testing.assert_close(selective_scan(**x, delta_softplus=True), ref, rtol=1e-12, atol=1e-12)


def test_channels_last_conv_matches_causal_conv1d():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 11, generator=g, dtype=F64)
    w, b = torch.randn(5, 4, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    for bias, act in ((b, "silu"), (None, None)):
        expected = causal_conv1d(x, w, bias, act)
        got = causal_conv1d_channels_last(x.permute(2, 0, 1), w, bias, act, time_dim=0)
        torch.testing.assert_close(got.permute(1, 2, 0), expected, rtol=1e-14, atol=1e-14)
        got = causal_conv1d_channels_last(x.transpose(1, 2), w, bias, act, time_dim=1)  # a strided view in
        torch.testing.assert_close(got.transpose(1, 2), expected, rtol=1e-14, atol=1e-14)


def test_causal_conv1d_matches_explicit_sum_and_update_loop():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 9, generator=g, dtype=F64)
    w = torch.randn(5, 4, generator=g, dtype=F64)
    b = torch.randn(5, generator=g, dtype=F64)
    xp = F.pad(x, (3, 0))
    expected = sum(w[:, k, None] * xp[:, :, k : k + 9] for k in range(4)) + b[:, None]
    torch.testing.assert_close(causal_conv1d(x, w, b), expected)
    torch.testing.assert_close(causal_conv1d(x, w, b, activation="silu"), F.silu(expected))
    for state_len in (3, 4):  # causal_conv1d keeps W-1, transformers' Mamba cache keeps W
        state = torch.zeros(2, 5, state_len, dtype=F64)
        steps = [causal_conv1d_update(x[:, :, t], state, w, b, "silu") for t in range(9)]
        torch.testing.assert_close(torch.stack(steps, -1), F.silu(expected))
        torch.testing.assert_close(state[..., -3:], x[..., -3:])
    state = torch.zeros(2, 5, 3, dtype=F64)
    torch.testing.assert_close(causal_conv1d_update(x, state, w, b), expected)


def test_bad_inputs_raise_clear_errors():
    x = make_inputs()
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**dict(x, A=x["A"][:, :2].T))
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(**dict(x, B=x["B"][..., :5]))
    with pytest.raises(ValueError, match="groups dividing"):
        selective_scan(**dict(x, B=torch.randn(2, 4, 4, 13, dtype=F64)))
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_scan(**x, backend="triton")
    with pytest.raises(RuntimeError, match="not all on a CUDA device"):
        selective_scan(**x, backend="cuda")
    state = torch.zeros(2, 6, 4, dtype=F64)
    with pytest.raises(ValueError, match="B and C must both be"):
        selective_state_update(state, x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][:, :3, 0], x["C"][:, :3, 0])
    with pytest.raises(ValueError, match="expected state"):
        selective_state_update(state[0], x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0])
    with pytest.raises(ValueError, match="weight must be"):
        causal_conv1d(x["u"], torch.randn(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x["u"], torch.randn(6, 4, dtype=F64), activation="gelu")


class _RecordKernelImports(importlib.abc.MetaPathFinder):
    """Records (and blocks) every attempt to import the optional CUDA kernel packages."""

    def __init__(self):
        self.attempts = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mamba_ssm", "causal_conv1d"):
            self.attempts.append(name)
            raise ImportError(f"blocked in test: {name}")
        return None


def test_kernels_are_never_imported_at_import_or_for_cpu_tensors():
    names = ["mouse_genemamba.dispatch", "mouse_genemamba.conv", "mouse_genemamba.selective_scan",
             "scmamba2.dispatch", "scmamba2.conv", "scmamba2.ssd", "cellfm.retention"]
    modules = [importlib.import_module(f"hf_scfm.modeling.{name}") for name in names]

    finder = _RecordKernelImports()
    sys.meta_path.insert(0, finder)
    try:
        for module in modules:
            importlib.reload(module)
        assert finder.attempts == []
        dispatch, conv, scan_module = modules[:3]
        x = make_inputs()
        scan_module.selective_scan(**x)  # backend="auto" with CPU tensors: no kernel lookup
        conv.causal_conv1d(x["u"], torch.randn(6, 4, dtype=F64))
        assert finder.attempts == []
        assert not dispatch.kernel_available("selective_scan")  # a lookup, blocked -> False, no crash
        assert finder.attempts == ["mamba_ssm"]
    finally:
        sys.meta_path.remove(finder)
        for module in modules:
            if hasattr(module, "_load"):
                module._load.cache_clear()
