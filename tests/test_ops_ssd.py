"""Mamba-2 SSD: the chunked scan and the one-step update pinned to the sequential reference in
float64 (odd lengths, lengths not a multiple of the chunk, groups, initial states, padding)."""

import pytest
import torch

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
