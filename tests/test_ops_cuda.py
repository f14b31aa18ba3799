"""CUDA parity: mamba_ssm / causal_conv1d kernels against our float64 references.

Skipped unless a CUDA device and the kernels are present (``pip install hf-scfm[cuda]``)."""

import pytest
import torch

from hf_scfm.modeling.mouse_genemamba.conv import causal_conv1d
from hf_scfm.modeling.mouse_genemamba.dispatch import kernel_available
from hf_scfm.modeling.mouse_genemamba.selective_scan import (
    selective_scan,
    selective_scan_reference,
    selective_state_update,
)
from hf_scfm.modeling.scmamba2.ssd import ssd_reference, ssd_scan, ssd_step

pytestmark = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rand(*shape, scale=1.0):
    return torch.randn(*shape, device="cuda") * scale


@needs_cuda
def test_selective_scan_kernel_matches_reference():
    if not kernel_available("selective_scan"):
        pytest.skip("mamba_ssm not installed")
    b, d, L, N = 2, 64, 333, 16
    u, delta, z = _rand(b, d, L), _rand(b, d, L, scale=0.5), _rand(b, d, L)
    A = -torch.rand(d, N, device="cuda") - 0.1
    B, C = _rand(b, 2, N, L), _rand(b, 2, N, L)
    D, bias = _rand(d), _rand(d, scale=0.5)
    out, last = selective_scan(u, delta, A, B, C, D, z, bias, True, True, backend="cuda")
    args = [t.double() for t in (u, delta, A, B, C, D, z, bias)]
    ref, ref_last = selective_scan_reference(*args, True, True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(last.double(), ref_last, rtol=1e-3, atol=1e-3)
    ours = selective_scan(u, delta, A, B, C, D, z, bias, True, backend="torch")
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4)
    state = torch.zeros(b, d, N, device="cuda")
    y0 = selective_state_update(
        state, u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0], D, z[..., 0], bias, True, backend="cuda"
    )
    torch.testing.assert_close(y0.double(), ref[..., 0], rtol=1e-3, atol=1e-3)


@needs_cuda
def test_ssd_kernel_matches_reference():
    if not kernel_available("ssd_scan"):
        pytest.skip("mamba_ssm not installed")
    b, L, H, P, G, N = 2, 333, 8, 16, 2, 16
    x, z, dt = _rand(b, L, H, P), _rand(b, L, H, P), _rand(b, L, H, scale=0.5)
    A = -torch.rand(H, device="cuda") - 0.1
    B, C = _rand(b, L, G, N), _rand(b, L, G, N)
    D, bias, h0 = _rand(H), _rand(H, scale=0.5), _rand(b, H, P, N)
    out, final = ssd_scan(x, dt, A, B, C, 64, D, z, bias, h0, True, True, backend="cuda")
    args = [t.double() for t in (x, dt, A, B, C)]
    ref, ref_final = ssd_reference(*args, 64, D.double(), z.double(), bias.double(), h0.double(), True, True)
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(final.double(), ref_final, rtol=2e-3, atol=2e-3)
    state = h0.clone()
    y = ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, z[:, 0], bias, True, backend="cuda")
    torch.testing.assert_close(y.double(), ref[:, 0], rtol=2e-3, atol=2e-3)


@needs_cuda
def test_causal_conv1d_kernel_matches_torch():
    if not kernel_available("causal_conv1d"):
        pytest.skip("causal_conv1d not installed")
    x, w, bias = _rand(2, 64, 333), _rand(64, 4), _rand(64)
    torch.testing.assert_close(
        causal_conv1d(x, w, bias, "silu", backend="cuda"), causal_conv1d(x, w, bias, "silu", backend="torch"),
        rtol=1e-4, atol=1e-4,
    )
