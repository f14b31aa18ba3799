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
  memory stays linear in L: nothing is ``n_chunks x n_chunks``). When nothing needs a gradient
  (inference) a forward-only version runs (:func:`_ssd_forward`: chunks of at most ``INFER_MAX_CHUNK``,
  plain batched matmuls, nothing kept for a backward). Decay exponents are clamped at ``EXP_FLOOR``
  (-60) before ``exp``, which keeps every ``exp`` out of the CPU's slow subnormal/underflow range.
  CUDA tensors use mamba_ssm's Triton kernel when it imports.
* :func:`ssd_step`: one generation step against a cached state (updated in place).

Padding: zero ``x`` at padded positions and they add nothing to the state (see ``selective_scan``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import autocast_off, compute_dtype, resolve_kernel


# The PyTorch path tiles time in chunks of at most this many steps, whatever ``chunk_size`` says.
# The result does not depend on the tiling (beyond rounding); on CPU the quadratic in-chunk part
# dominates at mamba_ssm's usual 256, and 64 measured ~3x faster at L=2048, 8 heads x 64, N=64.
TORCH_MAX_CHUNK = 64
# ... and works through the chunks in blocks of about this many time steps (see ssd_scan).
BLOCK_STEPS = 512
# Without gradients (inference) the forward-only path tiles at most this many steps: it keeps nothing for a
# backward, so the per-chunk state work is cheap and the quadratic in-chunk part is what shorter chunks save
# (SC-MAMBA2 tiny, 2,048 tokens, no grad: 16 measured ~15 % faster than 32, 8 no faster than 16).
INFER_MAX_CHUNK = 16


class _ChunkRecurrence(torch.autograd.Function):
    """``E[0] = initial``, ``E[c + 1] = decay[c] E[c] + states[c]``: the states entering each chunk
    and (last) the final state, ``[c + 1, b, g, j, P, N]`` from ``states`` ``[c, b, g, j, P, N]`` and
    ``decay`` ``[c, b, g, j]``. One in-place step per chunk each way, without an autograd node per
    step (those made the backward's bookkeeping grow faster than the number of chunks)."""

    @staticmethod
    def forward(ctx, states, decay, initial):
        E = states.new_empty((states.shape[0] + 1,) + states.shape[1:])
        E[0] = initial
        for c in range(states.shape[0]):
            torch.addcmul(states[c], decay[c][..., None, None], E[c], out=E[c + 1])
        ctx.save_for_backward(E, decay)
        return E

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gE):
        E, decay = ctx.saved_tensors
        n = decay.shape[0]
        g_states = torch.empty_like(E[1:])  # g_states[c] = dLoss/dE[c + 1], all paths
        if n:
            g_states[n - 1] = gE[n]
        for c in range(n - 1, 0, -1):
            torch.addcmul(gE[c], decay[c][..., None, None], g_states[c], out=g_states[c - 1])
        g_initial = gE[0] + decay[0][..., None, None] * g_states[0] if n else gE[0].clone()
        g_decay = torch.einsum("cbgjpn,cbgjpn->cbgj", g_states, E[:-1])
        return g_states, g_decay, g_initial


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


def _lower_segsum(a: torch.Tensor) -> torch.Tensor:
    """:func:`segsum` with ``0`` instead of ``-inf`` above the diagonal (what :func:`_decay_matrix` masks)."""
    T = a.shape[-1]
    rep = a.unsqueeze(-1).expand(*a.shape, T)  # rep[..., k, s] = a[k]
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    return torch.cumsum(rep.masked_fill(~strict, 0), dim=-2)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., t, s] = sum_{s<k<=t} a[..., k]`` for ``s <= t`` and ``-inf`` above the diagonal.

    Built as a masked cumulative sum of ``a`` repeated along a new axis, so each entry is a sum of
    the relevant terms only (a difference ``cumsum[t] - cumsum[s]`` would lose precision when the
    cumulative sums are large)."""
    T = a.shape[-1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))
    return _lower_segsum(a).masked_fill(~causal, float("-inf"))


# Exponents of decays are clamped at this floor before ``exp``: exp(-60) ~ 1e-26 is far below any dtype's
# rounding of the terms it weighs, while exp of a far more negative number (or of -inf) lands in the
# subnormal range or underflows, which x86 CPUs compute 10-200x slower than normal numbers (measured on
# this machine: 262k exps in 0.02 ms normal, 0.28 ms with -inf, 1.9 ms below -200, 4.6 ms in [-103, -87]).
EXP_FLOOR = -60.0


def _decay(exponent: torch.Tensor) -> torch.Tensor:
    """``exp(exponent)`` for exponents ``<= 0``, clamped at :data:`EXP_FLOOR` (see there)."""
    return torch.exp(exponent.clamp_min(EXP_FLOOR))


def _decay_matrix(a: torch.Tensor) -> torch.Tensor:
    """``exp(segsum(a))``: ``L[..., t, s] = exp(sum_{s<k<=t} a_k)`` for ``s <= t``, 0 above the diagonal.

    The zeros come from multiplying by the causal mask after the ``exp`` (``exp(-inf)`` is slow on CPU)."""
    T = a.shape[-1]
    causal = torch.tril(torch.ones(T, T, dtype=a.dtype, device=a.device))
    return _decay(_lower_segsum(a)) * causal


def _ssd_forward(X, a, Bc, Cc, state):
    """The chunked SSD without gradients: what :func:`ssd_scan` runs when nothing needs a backward.

    ``X`` (``dt``-scaled input) ``[b, n, T, g, j, P]`` (``n`` chunks of ``T`` steps, ``g`` groups of ``j``
    heads), ``a = dt A`` ``[b, n, T, g, j]``, ``Bc``/``Cc`` ``[b, n, T, g, N]``, ``state`` ``[b, g, j, P, N]``.
    Returns ``Y`` like ``X`` and the final state. The same four steps as the training path, as batched
    matmuls in layouts that need no ``einsum`` permutes, one block of chunks at a time (the block's chunk
    recurrence runs right after its chunk states, so nothing of the whole length is kept but ``Y``)."""
    b, n, T, g, j, P = X.shape
    N = Bc.shape[-1]
    Y = torch.empty_like(X)
    E = state.reshape(b, g, j * P, N)  # heads x channels of a group stacked: one matmul per group
    K = max(1, BLOCK_STEPS // T)
    for c0 in range(0, n, K):
        blk = slice(c0, min(c0 + K, n))
        k = blk.stop - blk.start
        a_b = a[:, blk].permute(0, 1, 3, 4, 2)  # [b, k, g, j, T]
        Lmat = _decay_matrix(a_b)  # [b, k, g, j, T, T]
        decay_in = _decay(torch.cumsum(a_b, -1))  # exp(sum_{k<=t} a_k), [b, k, g, j, T]
        C_b, B_b = Cc[:, blk].transpose(2, 3), Bc[:, blk].transpose(2, 3)  # [b, k, g, T, N]
        X_b = X[:, blk].permute(0, 1, 3, 4, 2, 5)  # [b, k, g, j, T, P]
        # 1. inside each chunk: (C B^T ∘ L) X
        Y_diag = (Lmat * (C_b @ B_b.transpose(-1, -2)).unsqueeze(3)) @ X_b  # [b, k, g, j, T, P]
        # 2. each chunk's end state from its own inputs: sum_s exp(sum_{s<k<=T-1} a_k) X_s B_s^T
        weighted = X_b * Lmat[..., -1, :].unsqueeze(-1)
        own = (weighted.transpose(-1, -2) @ B_b.unsqueeze(3)).reshape(b, k, g, j * P, N)
        # 3. pass states between chunks (one step per chunk)
        chunk_decay = decay_in[..., -1, None].expand(b, k, g, j, P).reshape(b, k, g, j * P, 1)
        entering = X.new_empty(b, k, g, j * P, N)
        for i in range(k):
            entering[:, i] = E
            E = torch.addcmul(own[:, i], chunk_decay[:, i], E)
        # 4. contribution of the entering state to every position of the chunk, in Y's own layout
        Y_state = (C_b @ entering.transpose(-1, -2)).view(b, k, g, T, j, P)
        Y_state.mul_(decay_in.permute(0, 1, 2, 4, 3).unsqueeze(-1))
        torch.add(Y_state.permute(0, 1, 3, 2, 4, 5), Y_diag.permute(0, 1, 4, 2, 3, 5), out=Y[:, blk])
    return Y, E.reshape(b, g, j, P, N)


@autocast_off
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
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    forward_only = not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
    T = min(chunk_size, INFER_MAX_CHUNK if forward_only else TORCH_MAX_CHUNK)
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
    if initial_states is not None:
        state = initial_states.to(dtype).reshape(batch, groups, hpg, head_dim, n_state)
    else:
        state = X.new_zeros(batch, groups, hpg, head_dim, n_state)
    if forward_only:
        Y, state = _ssd_forward(X, a.reshape(batch, n_chunks, T, groups, hpg), Bc, Cc, state)
        Y = Y.reshape(batch, n_chunks * T, heads, head_dim)[:, :length]
        out = _skip_and_gate(Y, xc, D, z, x.dtype)
        return (out, state.reshape(batch, heads, head_dim, n_state)) if return_final_states else out
    a = a.reshape(batch, n_chunks, T, groups, hpg).permute(0, 3, 4, 1, 2)  # [b, g, j, c, T]
    # Chunks are processed in blocks of ``K`` (about BLOCK_STEPS time steps), so the [T, T] decay
    # matrices and the in-chunk products of one block stay in cache; full-size [c, T, T] buffers make
    # the time per token grow with length (memory bandwidth), the blocks keep it flat.
    K = max(1, BLOCK_STEPS // T)
    # split, not slicing: each slice's backward would write into a zero tensor of the full size
    # (quadratic in length); one split node concatenates all the blocks' gradients once
    a_s, C_s, B_s, X_s = a.split(K, dim=-2), Cc.split(K, dim=1), Bc.split(K, dim=1), X.split(K, dim=1)
    Y_diag, states, decay_in = [], [], []
    for a_b, C_b, B_b, X_b in zip(a_s, C_s, B_s, X_s):
        Lmat = _decay_matrix(a_b)  # [b, g, j, k, T, T]
        decay_in.append(_decay(torch.cumsum(a_b, -1)))  # exp(sum_{k<=t} a_k), [b, g, j, k, T]
        # 1. inside each chunk: (C B^T ∘ L) X
        CB = torch.einsum("bctgn,bcsgn->bgcts", C_b, B_b)
        Y_diag.append(torch.einsum("bgjcts,bcsgjp->bctgjp", CB.unsqueeze(2) * Lmat, X_b))
        # 2. each chunk's end state from its own inputs: sum_s exp(sum_{s<k<=T-1} a_k) X_s B_s^T
        states.append(torch.einsum("bcsgn,bgjcs,bcsgjp->cbgjpn", B_b, Lmat[..., -1, :], X_b))
    # 3. pass states between chunks (one step per chunk); the chunk's decay is exp(sum of its a)
    chunk_decay = _decay(a.sum(-1)).permute(3, 0, 1, 2)  # [c, b, g, j]
    E = _ChunkRecurrence.apply(torch.cat(states), chunk_decay, state)  # [c + 1, b, g, j, P, N]
    entering, state = E.split([n_chunks, 1])
    state = state[0]
    # 4. contribution of the entering state to every position of the chunk
    Y = torch.cat([
        y_b + torch.einsum("bctgn,cbgjpn,bgjct->bctgjp", C_b, E_b, d_b)
        for C_b, E_b, y_b, d_b in zip(C_s, entering.split(K), Y_diag, decay_in)
    ], dim=1)
    Y = Y.reshape(batch, n_chunks * T, heads, head_dim)[:, :length]
    out = _skip_and_gate(Y, xc, D, z, x.dtype)
    if return_final_states:
        return out, state.reshape(batch, heads, head_dim, n_state)
    return out


@autocast_off
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
