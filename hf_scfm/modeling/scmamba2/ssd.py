"""Mamba-2 state-space duality (SSD) scan (Dao & Gu 2024), with the shapes of mamba_ssm's
``mamba_chunk_scan_combined``.

Per head ``h`` (scalar ``A_h``, usually ``-exp(A_log)``), head channel ``p`` and state index ``n``::

    dt_t = softplus(dt_t + dt_bias)                       (bias/softplus optional)
    S_t  = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T      (state [P, N] per head)
    y_t  = S_t C_t + D * x_t ;   out_t = y_t * silu(z_t)    (D, z optional)

Shapes: ``x``, ``z``: ``[batch, L, H, P]``; ``dt``: ``[batch, L, H]``; ``A``, ``dt_bias``: ``[H]``;
``B``, ``C``: ``[batch, L, G, N]`` (head ``h`` reads group ``h // (H // G)``); ``D``: ``[H]`` or
``[H, P]``; ``initial_states`` and the final state: ``[batch, H, P, N]``.

* :func:`ssd_reference`: the recurrence above, one time step at a time (the ground truth).
* :func:`ssd_scan`: the chunked SSD algorithm. Inside a chunk of ``min(chunk_size, 64)`` steps
  (the PyTorch path's tiling, see ``TORCH_MAX_CHUNK``; CUDA kernels use ``chunk_size``) the output is
  the quadratic "attention-like" form ``(C B^T ∘ L) X`` with the decay matrix
  ``L[t, s] = exp(sum_{s<k<=t} dt_k A)``, built from a masked cumulative sum (a *segment sum*, not a
  difference of cumulative sums, so every exponent is <= 0 and no precision is lost for long
  chunks); chunk-end states are passed between chunks by a short recurrence (one step per chunk, so
  memory stays linear in L: nothing is ``n_chunks x n_chunks``). CUDA tensors use mamba_ssm's
  Triton kernel when it imports.
* :func:`ssd_step`: one generation step against a cached state (updated in place).

Padding: zero ``x`` at padded positions and they add nothing to the state (see ``selective_scan``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import compute_dtype, resolve_kernel


# The PyTorch path tiles time in chunks of at most this many steps, whatever ``chunk_size`` says.
# The result does not depend on the tiling (beyond rounding); on CPU the quadratic in-chunk part
# dominates at mamba_ssm's usual 256, and 64 measured ~3x faster at L=2048, 8 heads x 64, N=64.
TORCH_MAX_CHUNK = 64


def _check_shapes(x, dt, A, B, C, D, z, dt_bias, initial_states) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, length, heads, head_dim], got {tuple(x.shape)}.")
    batch, length, heads, head_dim = x.shape
    if dt.shape != (batch, length, heads):
        raise ValueError(f"dt must be [batch, length, heads] = {(batch, length, heads)}, got {tuple(dt.shape)}.")
    if A.shape != (heads,):
        raise ValueError(f"A must be [heads] = [{heads}] (one scalar per head), got {tuple(A.shape)}.")
    if B.dim() != 4 or B.shape[:2] != (batch, length) or heads % B.shape[2] != 0:
        raise ValueError(
            f"B must be [batch, length, groups, d_state] with groups dividing heads={heads}, got {tuple(B.shape)}."
        )
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}.")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}.")
    if D is not None and D.shape not in ((heads,), (heads, head_dim)):
        raise ValueError(f"D must be [heads] or [heads, head_dim], got {tuple(D.shape)}.")
    if dt_bias is not None and dt_bias.shape != (heads,):
        raise ValueError(f"dt_bias must be [heads] = [{heads}], got {tuple(dt_bias.shape)}.")
    if initial_states is not None and initial_states.shape != (batch, heads, head_dim, B.shape[-1]):
        raise ValueError(
            f"initial_states must be [batch, heads, head_dim, d_state] = "
            f"{(batch, heads, head_dim, B.shape[-1])}, got {tuple(initial_states.shape)}."
        )


def _discretise_dt(dt, dt_bias, dt_softplus, dtype):
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    return dt


def _skip_and_gate(y, x, D, z, out_dtype):
    """y, x, z: [..., H, P]; D: [H] or [H, P]."""
    if D is not None:
        D = D.to(y.dtype)
        y = y + (D.unsqueeze(-1) if D.dim() == 1 else D) * x
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def ssd_reference(
    x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None, initial_states=None,
    dt_softplus=False, return_final_states=False,
):
    """Sequential recurrence (``chunk_size`` is accepted for signature parity and ignored)."""
    _check_shapes(x, dt, A, B, C, D, z, dt_bias, initial_states)
    dtype = compute_dtype(x.dtype)
    batch, length, heads, head_dim = x.shape
    rep = heads // B.shape[2]
    dt = _discretise_dt(dt, dt_bias, dt_softplus, dtype)
    xc = x.to(dtype)
    Bh = B.to(dtype).repeat_interleave(rep, dim=2)  # [b, L, H, N]
    Ch = C.to(dtype).repeat_interleave(rep, dim=2)
    decay = torch.exp(dt * A.to(dtype))  # [b, L, H]
    if initial_states is not None:
        state = initial_states.to(dtype)
    else:
        state = xc.new_zeros(batch, heads, head_dim, B.shape[-1])
    ys = []
    inputs = ((dt.unsqueeze(-1) * xc).unsqueeze(-1) * Bh.unsqueeze(3)).unbind(1)  # L x [b, H, P, N]
    for decay_t, inp_t, C_t in zip(decay.unbind(1), inputs, Ch.unbind(1)):
        state = decay_t[..., None, None] * state + inp_t
        ys.append((state * C_t.unsqueeze(2)).sum(-1))
    y = torch.stack(ys, dim=1) if ys else xc.new_zeros(batch, 0, heads, head_dim)
    out = _skip_and_gate(y, xc, D, z, x.dtype)
    return (out, state) if return_final_states else out


def segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., t, s] = sum_{s<k<=t} a[..., k]`` for ``s <= t`` and ``-inf`` above the diagonal.

    Built as a masked cumulative sum of ``a`` repeated along a new axis, so each entry is a sum of
    the relevant terms only (a difference ``cumsum[t] - cumsum[s]`` would lose precision when the
    cumulative sums are large)."""
    T = a.shape[-1]
    rep = a.unsqueeze(-1).expand(*a.shape, T)  # rep[..., k, s] = a[k]
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    out = torch.cumsum(rep.masked_fill(~strict, 0), dim=-2)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))
    return out.masked_fill(~causal, float("-inf"))


def ssd_scan(
    x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
    dt_softplus=False, return_final_states=False, *, backend: str = "auto",
):
    """Chunked SSD with :func:`ssd_reference`'s semantics (see the module docstring)."""
    _check_shapes(x, dt, A, B, C, D, z, dt_bias, initial_states)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    kernel = resolve_kernel("ssd_scan", backend, x, dt, A, B, C)
    if kernel is not None:
        return kernel(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
            dt_softplus=dt_softplus, return_final_states=return_final_states,
        )
    dtype = compute_dtype(x.dtype)
    batch, length, heads, head_dim = x.shape
    groups, n_state = B.shape[2], B.shape[3]
    hpg = heads // groups
    T = min(chunk_size, TORCH_MAX_CHUNK)
    n_chunks = max(1, math.ceil(length / T))
    pad = n_chunks * T - length

    dt = _discretise_dt(dt, dt_bias, dt_softplus, dtype)
    xc = x.to(dtype)
    X = xc * dt.unsqueeze(-1)  # [b, L, H, P]
    a = dt * A.to(dtype)  # [b, L, H]
    Bc, Cc = B.to(dtype), C.to(dtype)
    if pad:  # padded steps: decay 1, input 0 -> the state passes through unchanged
        X = F.pad(X, (0, 0, 0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad))
        Bc = F.pad(Bc, (0, 0, 0, 0, 0, pad))
        Cc = F.pad(Cc, (0, 0, 0, 0, 0, pad))
    X = X.reshape(batch, n_chunks, T, groups, hpg, head_dim)
    Bc = Bc.reshape(batch, n_chunks, T, groups, n_state)
    Cc = Cc.reshape(batch, n_chunks, T, groups, n_state)
    a = a.reshape(batch, n_chunks, T, groups, hpg).permute(0, 3, 4, 1, 2)  # [b, g, j, c, T]

    seg = segsum(a)  # [b, g, j, c, T, T]
    Lmat = torch.exp(seg)
    a_cum = seg[..., :, 0] + a[..., :1]  # sum_{k<=t} a_k, [b, g, j, c, T]

    # 1. inside each chunk: (C B^T ∘ L) X
    CB = torch.einsum("bctgn,bcsgn->bgcts", Cc, Bc)
    Y = torch.einsum("bgjcts,bcsgjp->bctgjp", CB.unsqueeze(2) * Lmat, X)

    # 2. each chunk's end state from its own inputs: sum_s exp(sum_{s<k<=T-1} a_k) X_s B_s^T
    decay_to_end = Lmat[..., -1, :]  # [b, g, j, c, T]
    states = torch.einsum("bcsgn,bgjcs,bcsgjp->bcgjpn", Bc, decay_to_end, X)

    # 3. pass states between chunks
    chunk_decay = torch.exp(a_cum[..., -1])  # [b, g, j, c]
    if initial_states is not None:
        state = initial_states.to(dtype).reshape(batch, groups, hpg, head_dim, n_state)
    else:
        state = X.new_zeros(batch, groups, hpg, head_dim, n_state)
    entering = []
    # unbind, not indexing: each index's backward would allocate a zero tensor of the full size
    for decay_c, state_c in zip(chunk_decay.unbind(-1), states.unbind(1)):
        entering.append(state)
        state = torch.addcmul(state_c, decay_c[..., None, None], state)
    entering = torch.stack(entering, dim=1)  # [b, c, g, j, P, N]

    # 4. contribution of the entering state to every position of the chunk
    Y = Y + torch.einsum("bctgn,bcgjpn,bgjct->bctgjp", Cc, entering, torch.exp(a_cum))
    Y = Y.reshape(batch, n_chunks * T, heads, head_dim)[:, :length]
    out = _skip_and_gate(Y, xc, D, z, x.dtype)
    if return_final_states:
        return out, state.reshape(batch, heads, head_dim, n_state)
    return out


def ssd_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, *, backend: str = "auto"):
    """One recurrent step for generation: ``state`` ``[batch, H, P, N]`` (updated in place), ``x``
    and ``z`` ``[batch, H, P]``, ``dt`` ``[batch, H]``, ``B``/``C`` ``[batch, G, N]``. Returns ``y``
    ``[batch, H, P]``. Looping it over time reproduces :func:`ssd_scan` and its final state."""
    if state.dim() != 4 or x.shape != state.shape[:3] or dt.shape != state.shape[:2]:
        raise ValueError(
            f"expected state [batch, H, P, N], x [batch, H, P], dt [batch, H]; got state "
            f"{tuple(state.shape)}, x {tuple(x.shape)}, dt {tuple(dt.shape)}."
        )
    batch, heads, head_dim, n_state = state.shape
    if B.dim() != 3 or B.shape[0] != batch or B.shape[2] != n_state or heads % B.shape[1] != 0 or C.shape != B.shape:
        raise ValueError(
            f"B and C must be [batch, groups, d_state] with groups dividing heads={heads}; got "
            f"{tuple(B.shape)} and {tuple(C.shape)}."
        )
    kernel = resolve_kernel("selective_state_update", backend, state, x, dt, A, B, C)
    if kernel is not None:  # mamba_ssm's kernel takes per-(head, channel) tensors; tie the strides
        A_k = A[:, None, None].expand(heads, head_dim, n_state)
        dt_k = dt[:, :, None].expand(batch, heads, head_dim)
        bias_k = None if dt_bias is None else dt_bias[:, None].expand(heads, head_dim)
        D_k = None if D is None else (D[:, None].expand(heads, head_dim) if D.dim() == 1 else D)
        return kernel(state, x, dt_k, A_k, B, C, D=D_k, z=z, dt_bias=bias_k, dt_softplus=dt_softplus)
    dtype = compute_dtype(x.dtype)
    dt = _discretise_dt(dt, dt_bias, dt_softplus, dtype)  # [b, H]
    rep = heads // B.shape[1]
    Bh = B.to(dtype).repeat_interleave(rep, dim=1)  # [b, H, N]
    Ch = C.to(dtype).repeat_interleave(rep, dim=1)
    xc = x.to(dtype)
    decay = torch.exp(dt * A.to(dtype))[..., None, None]
    new_state = decay * state.to(dtype) + (dt.unsqueeze(-1) * xc).unsqueeze(-1) * Bh.unsqueeze(2)
    with torch.no_grad():
        state.copy_(new_state)
    y = (new_state * Ch.unsqueeze(2)).sum(-1)
    return _skip_and_gate(y, xc, D, z, x.dtype)
