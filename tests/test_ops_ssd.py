"""Mamba-2 SSD: the chunked scan and the one-step update pinned to the sequential reference in
float64 (odd lengths, lengths not a multiple of the chunk, groups, initial states, padding)."""

import pytest
import torch

from hf_scfm.modeling.scmamba2 import ssd as ssd_module
from hf_scfm.modeling.scmamba2.ssd import segsum, ssd_reference, ssd_scan, ssd_step

F64 = torch.float64


def make_inputs(batch=2, length=13, heads=4, head_dim=3, groups=2, n_state=5, dtype=F64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(grad)

    return dict(
        x=rnd(batch, length, heads, head_dim),
        dt=rnd(batch, length, heads, scale=0.5),
        A=(-torch.rand(heads, generator=g, dtype=dtype) * 2 - 0.1).requires_grad_(grad),
        B=rnd(batch, length, groups, n_state),
        C=rnd(batch, length, groups, n_state),
        D=rnd(heads),
        z=rnd(batch, length, heads, head_dim),
        dt_bias=rnd(heads, scale=0.5),
        initial_states=rnd(batch, heads, head_dim, n_state),
    )


def test_segsum_is_exact_sum_of_segments():
    a = torch.randn(3, 6, dtype=F64)
    s = segsum(a)
    for t in range(6):
        for j in range(6):
            expected = a[:, j + 1 : t + 1].sum(-1) if j <= t else torch.full((3,), float("-inf"), dtype=F64)
            torch.testing.assert_close(s[:, t, j], expected)


@pytest.mark.parametrize("length,chunk_size", [(1, 4), (13, 4), (13, 13), (16, 8), (29, 64), (37, 1), (150, 256)])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_chunked_matches_reference_float64(length, chunk_size, groups):
    x = make_inputs(length=length, groups=groups)
    ref, ref_state = ssd_reference(**x, chunk_size=chunk_size, dt_softplus=True, return_final_states=True)
    out, state = ssd_scan(**x, chunk_size=chunk_size, dt_softplus=True, return_final_states=True, backend="torch")
    assert out.shape == (2, length, 4, 3) and state.shape == (2, 4, 3, 5)
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(state, ref_state, rtol=1e-11, atol=1e-11)


def test_optional_arguments_each_change_the_output():
    x = make_inputs()
    full = ssd_scan(**x, chunk_size=4, dt_softplus=True)
    for drop in ("D", "z", "dt_bias", "initial_states"):
        partial = dict(x, **{drop: None})
        out = ssd_scan(**partial, chunk_size=4, dt_softplus=True)
        torch.testing.assert_close(out, ssd_reference(**partial, dt_softplus=True), rtol=1e-11, atol=1e-11)
        assert (out - full).abs().max() > 1e-3, drop
    per_channel_D = dict(x, D=torch.randn(4, 3, dtype=F64))
    torch.testing.assert_close(
        ssd_scan(**per_channel_D, chunk_size=4), ssd_reference(**per_channel_D), rtol=1e-11, atol=1e-11
    )


def test_strong_decay_long_chunk_stays_finite_and_exact():
    # cumulative decay inside one chunk far beyond exp's float32 range: segsum keeps exponents <= 0
    x = make_inputs(length=64, groups=1)
    x["A"] = torch.full((4,), -30.0, dtype=F64)
    x32 = {k: v.float() for k, v in x.items()}
    ref = ssd_reference(**x, dt_softplus=True)
    out = ssd_scan(**x32, chunk_size=64, dt_softplus=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_float32_against_float64_reference():
    x64 = make_inputs(length=300, heads=8, head_dim=8, groups=2, n_state=16)
    ref = ssd_reference(**x64, dt_softplus=True)
    out = ssd_scan(**{k: v.float() for k, v in x64.items()}, chunk_size=64, dt_softplus=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)  # stated float32 tolerance


def test_gradcheck():
    x = make_inputs(batch=1, length=5, heads=2, head_dim=1, groups=2, n_state=2, grad=True)
    names = list(x)

    def fn(*args):
        return ssd_scan(**dict(zip(names, args)), chunk_size=2, dt_softplus=True, return_final_states=True)

    assert torch.autograd.gradcheck(fn, tuple(x.values()))


@pytest.mark.parametrize("block_steps", [1, 8, 4096])
def test_blocks_of_chunks_match_reference_values_and_gradients_float64(monkeypatch, block_steps):
    # 37 steps in chunks of 4: 10 chunks (the last one padded); blocks of 1, 2 or all 10 chunks
    monkeypatch.setattr(ssd_module, "BLOCK_STEPS", block_steps)
    x = make_inputs(batch=2, length=37, groups=2, grad=True)
    g = torch.Generator().manual_seed(3)
    wy, ws = torch.randn(2, 37, 4, 3, generator=g, dtype=F64), torch.randn(2, 4, 3, 5, generator=g, dtype=F64)
    grads = []
    for fn, kw in ((ssd_reference, {}), (ssd_scan, {"backend": "torch"})):
        out, state = fn(**x, chunk_size=4, dt_softplus=True, return_final_states=True, **kw)
        grads.append(torch.autograd.grad((out * wy).sum() + (state * ws).sum(), list(x.values())))
        grads[-1] = (out, state) + grads[-1]
    for name, ref, got in zip(["out", "state", *x], *grads):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10, msg=name)


def test_gradcheck_across_blocks(monkeypatch):
    monkeypatch.setattr(ssd_module, "BLOCK_STEPS", 2)  # one chunk of 2 per block, 3 blocks
    x = make_inputs(batch=2, length=5, heads=2, head_dim=1, groups=1, n_state=2, grad=True)
    names = list(x)

    def fn(*args):
        return ssd_scan(**dict(zip(names, args)), chunk_size=2, dt_softplus=True, return_final_states=True)

    assert torch.autograd.gradcheck(fn, tuple(x.values()))


@pytest.mark.parametrize("length,chunk_size,groups,block_steps", [(37, 4, 2, 8), (29, 64, 1, 512), (1, 4, 4, 512)])
def test_forward_only_path_matches_training_path_and_reference(monkeypatch, length, chunk_size, groups, block_steps):
    # without gradients ssd_scan runs _ssd_forward (chunks of <= INFER_MAX_CHUNK); with them the training path
    # (chunks of <= TORCH_MAX_CHUNK): both pinned to the reference, padding and batch 2 included
    monkeypatch.setattr(ssd_module, "BLOCK_STEPS", block_steps)
    calls = []
    monkeypatch.setattr(ssd_module, "_ssd_forward", lambda *a: calls.append(1) or _real_ssd_forward(*a))
    x = make_inputs(batch=2, length=length, groups=groups)
    mask = (torch.arange(length)[None] < torch.tensor([length, max(1, length - 7)])[:, None]).to(F64)
    x["x"] = x["x"] * mask[..., None, None]
    ref, ref_state = ssd_reference(**x, dt_softplus=True, return_final_states=True)
    with torch.no_grad():
        fast, fast_state = ssd_scan(**x, chunk_size=chunk_size, dt_softplus=True, return_final_states=True)
    assert calls == [1]
    grad_x = {k: (v.clone().requires_grad_() if v is not None else v) for k, v in x.items()}
    train, train_state = ssd_scan(**grad_x, chunk_size=chunk_size, dt_softplus=True, return_final_states=True)
    assert calls == [1] and train.requires_grad
    for got in (fast, train):
        torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-11)
    for got in (fast_state, train_state):
        torch.testing.assert_close(got, ref_state, rtol=1e-11, atol=1e-11)


_real_ssd_forward = ssd_module._ssd_forward


def test_decays_below_the_exp_floor_stay_exact_to_rounding():
    # exp's argument is clamped at EXP_FLOOR (-60): far below it the decay is exp(-60) ~ 1e-26 instead of ~0, which
    # no float32 or float64 comparison can see; the output still matches the unclamped reference
    x = make_inputs(length=40, groups=1)
    x["A"] = torch.full((4,), -200.0, dtype=F64)  # every step decays by >= exp(-200 * softplus(dt))
    ref = ssd_reference(**x, dt_softplus=True)
    for grad in (False, True):
        xs = {k: (v.clone().requires_grad_(grad) if v is not None else v) for k, v in x.items()}
        torch.testing.assert_close(ssd_scan(**xs, chunk_size=8, dt_softplus=True), ref, rtol=1e-11, atol=1e-11)


def test_step_by_step_decoding_equals_full_scan():
    x = make_inputs(length=9)
    full, final = ssd_scan(**x, chunk_size=4, dt_softplus=True, return_final_states=True)
    state = x["initial_states"].clone()
    steps = [
        ssd_step(
            state, x["x"][:, t], x["dt"][:, t], x["A"], x["B"][:, t], x["C"][:, t], D=x["D"], z=x["z"][:, t],
            dt_bias=x["dt_bias"], dt_softplus=True,
        )
        for t in range(9)
    ]
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, final, rtol=1e-12, atol=1e-12)


def test_variable_lengths_with_right_and_left_padding():
    x = make_inputs(batch=2, length=11)
    x["initial_states"] = None
    lengths = [11, 6]
    mask = (torch.arange(11)[None] < torch.tensor(lengths)[:, None]).to(F64)
    padded = dict(x, x=x["x"] * mask[..., None, None])
    out = ssd_scan(**padded, chunk_size=4, dt_softplus=True)
    for i, n in enumerate(lengths):
        alone = {k: (v[i : i + 1, :n] if v is not None and v.dim() >= 3 else v) for k, v in padded.items()}
        torch.testing.assert_close(out[i : i + 1, :n], ssd_reference(**alone, dt_softplus=True), rtol=1e-11, atol=1e-11)
    # left padding: zero x and dt before the first real token -> state exactly zero there
    left_mask = torch.flip(mask, [1])
    left = dict(x, x=x["x"] * left_mask[..., None, None], dt=x["dt"] * left_mask[..., None], dt_bias=None)
    _, state = ssd_scan(**{k: (v[1:, :5] if v is not None and v.dim() >= 3 else v) for k, v in left.items()},
                        chunk_size=4, return_final_states=True)
    assert torch.count_nonzero(state) == 0


def test_bad_inputs_raise_clear_errors():
    x = make_inputs()
    with pytest.raises(ValueError, match="A must be"):
        ssd_scan(**dict(x, A=torch.randn(4, 5, dtype=F64)), chunk_size=4)
    with pytest.raises(ValueError, match="groups dividing"):
        ssd_scan(**dict(x, B=torch.randn(2, 13, 3, 5, dtype=F64), C=torch.randn(2, 13, 3, 5, dtype=F64)), chunk_size=4)
    with pytest.raises(ValueError, match="initial_states"):
        ssd_scan(**dict(x, initial_states=torch.zeros(2, 4, 3, 4, dtype=F64)), chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_scan(**x, chunk_size=0)
    with pytest.raises(RuntimeError, match="not all on a CUDA device"):
        ssd_scan(**x, chunk_size=4, backend="cuda")
