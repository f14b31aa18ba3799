"""Mamba-1 selective scan (Gu & Dao 2023, Algorithm 2), with the shapes of mamba_ssm's
``selective_scan_fn``.

For every channel ``d`` and state index ``n`` (``A`` is diagonal, usually ``-exp(A_log)``)::

    delta_t = softplus(delta_t + delta_bias)            (bias/softplus optional)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t     = <C_t, h_t> + D * u_t ;   out_t = y_t * silu(z_t)   (D, z optional)

Shapes: ``u``, ``delta``, ``z``: ``[batch, D, L]``; ``A``: ``[D, N]``; ``B``, ``C``: ``[batch, N, L]``
or ``[batch, G, N, L]`` (channel ``d`` reads group ``d // (D // G)``); ``D``, ``delta_bias``: ``[D]``.
Returns ``out`` ``[batch, D, L]`` in ``u``'s dtype, and with ``return_last_state=True`` also the final
state ``[batch, D, N]``.

* :func:`selective_scan_reference`: the recurrence as written, one step at a time (any dtype;
  float16/bfloat16 are computed in float32). The ground truth for the tests.
* :func:`selective_scan`: the same numbers, fast: a time-major recurrence in cache-sized time
  blocks with a hand-written backward on CPU (or any device without kernels; see
  :class:`_SelectiveScanFn`, also for why not a chunked closed form), or mamba_ssm's CUDA kernel for
  CUDA tensors (see ``dispatch``). Its output is a ``[batch, D, L]`` view of a time-major buffer, the
  layout the mixers' ``[batch, L, D]`` projections read without a copy.
* :func:`selective_state_update`: one generation step against a cached state (updated in place).

Padding: zero ``u`` at padded positions (models multiply by ``attention_mask``). Then padded steps
add nothing to the state, so right padding never changes real positions, and with left padding the
state stays exactly zero until the first real token. With right padding, the *final* state decays
through the padded steps unless ``delta`` is zeroed there too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import autocast_off, compute_dtype, resolve_kernel


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be [batch, channels, length], got {tuple(u.shape)}.")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}.")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}.")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be [channels, d_state] = [{dim}, N], got {tuple(A.shape)}.")
    n_state = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        if M.dim() == 3:
            ok = M.shape == (batch, n_state, length)
        elif M.dim() == 4:
            ok = M.shape[0] == batch and M.shape[2:] == (n_state, length) and dim % M.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} must be [batch, d_state, length] = [{batch}, {n_state}, {length}] or "
                f"[batch, groups, d_state, length] with groups dividing {dim}; got {tuple(M.shape)}. "
                "(Input-independent B/C are not supported: expand them over batch and length.)"
            )
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and v.shape != (dim,):
            raise ValueError(f"{name} must be [channels] = [{dim}], got {tuple(v.shape)}.")


def _per_channel(M: torch.Tensor, dim: int) -> torch.Tensor:
    """[b, N, L] -> [b, 1, N, L] (broadcast); [b, G, N, L] -> [b, D, N, L] (group per channel)."""
    if M.dim() == 3:
        return M.unsqueeze(1)
    groups = M.shape[1]
    return M if groups == 1 else M.repeat_interleave(dim // groups, dim=1)


def _discretise(u, delta, delta_bias, delta_softplus, dtype):
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype).unsqueeze(-1)
    if delta_softplus:
        delta = F.softplus(delta)
    return u.to(dtype), delta


def _finish(y, u, D, z, out_dtype):
    if D is not None:
        y = y + D.to(y.dtype).unsqueeze(-1) * u
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def selective_scan_reference(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Sequential recurrence, one time step per iteration. Slow; the ground truth."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype = compute_dtype(u.dtype)
    batch, dim, length = u.shape
    u_c, delta = _discretise(u, delta, delta_bias, delta_softplus, dtype)
    A = A.to(dtype)
    B = _per_channel(B.to(dtype), dim)  # [b, D|1, N, L]
    C = _per_channel(C.to(dtype), dim)
    decay = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(1))  # [b, D, L, N]
    inp = (delta * u_c).unsqueeze(-1) * B.transpose(-1, -2)  # [b, D, L, N]
    h = u_c.new_zeros(batch, dim, A.shape[1])
    ys = []
    for decay_t, inp_t, C_t in zip(decay.unbind(2), inp.unbind(2), C.unbind(-1)):
        h = decay_t * h + inp_t
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u_c.new_zeros(batch, dim, 0)
    out = _finish(y, u_c, D, z, u.dtype)
    return (out, h) if return_last_state else out


class _SelectiveScanFn(torch.autograd.Function):
    """The scan proper, ``y_t = <C_t, h_t>`` with ``h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t``,
    in time blocks that stay in cache, with a hand-written backward.

    Layout: time-major (``[L, batch, groups, D/groups]`` for delta and u, ``[L, batch, groups, N]`` for
    B and C). Time is cut into blocks of ``T`` steps (:func:`_block_length`, a ``[T, batch, D, N]``
    block is about ``BLOCK_ELEMENTS`` numbers, so it stays in the core's L2 cache). Per block the
    decay ``exp(delta A)`` and the input ``delta u B`` are formed in two reused buffers, the
    recurrence is ``T`` in-place ``addcmul`` calls on one row each, and ``y`` is one batched matmul
    with ``C``; only the state entering each block is kept (``[L / T, batch, D, N]``, for the
    backward), never a full ``[L, D, N]`` buffer. The backward walks the blocks in reverse: it
    recomputes the block's states from the saved entering state, runs the adjoint recurrence
    ``g_t = C_t gy_t + exp(delta_{t+1} A) g_{t+1}`` over the block (the carry between blocks is
    ``exp(delta_{t+1} A) g_{t+1}`` of the next block's first step) and forms every gradient from the
    block. Memory is O(batch D L) plus the entering states, like mamba_ssm's kernel (which keeps the
    state in registers and recomputes it in the backward the same way).

    Why not a closed form per chunk (cumulated decays and a cumulative sum): every such pass over a
    ``[T, D, N]`` block costs about as much as the ``T`` recurrence steps themselves, and it needs an
    ``exp`` of the (possibly huge) cumulated decay. Inputs arrive in the compute dtype, delta already
    biased/softplus-ed, B/C grouped ``[b, G, N, L]``.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        batch, dim, length = u.shape
        groups, n_state = B.shape[1], A.shape[1]
        dl, ul, Bt, Ct = _time_major(u, delta, B, C)
        A_g = A.reshape(groups, dim // groups, n_state)
        needs_grad = any(ctx.needs_input_grad)
        y, h, entering, T = _scan_blocks(dl, ul, A_g, Bt, Ct, keep_entering=needs_grad)
        if needs_grad:
            ctx.save_for_backward(dl, ul, A_g, Bt, Ct, *entering)
            ctx.block = T
        # y stays time-major in memory ([b, D, L] view): the mixers feed it on in [b, L, D] layout
        return y.reshape(length, batch, dim).permute(1, 2, 0), h.reshape(batch, dim, n_state)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_last):
        dl, ul, A_g, Bt, Ct, *entering = ctx.saved_tensors
        T = ctx.block
        length, batch, groups, dim_g = dl.shape
        n_state = A_g.shape[-1]
        if grad_y is None:
            gy = dl.new_zeros(dl.shape)
        else:
            gy = grad_y.to(dl.dtype).permute(2, 0, 1).reshape(length, batch, groups, dim_g)
        carry = dl.new_zeros(batch, groups, dim_g, n_state)  # dLoss/dh_t from step t+1 on
        if grad_last is not None:
            carry += grad_last.to(dl.dtype).reshape(carry.shape)
        g_delta, g_u = torch.empty_like(dl), torch.empty_like(dl)
        g_B, g_C = torch.empty_like(Bt), torch.empty_like(Ct)
        a_buf = dl.new_empty((T,) + carry.shape)
        h_buf, g_buf, gA_acc = torch.empty_like(a_buf), torch.empty_like(a_buf), torch.zeros_like(a_buf)
        starts = list(range(0, length, T))
        for k in range(len(starts) - 1, -1, -1):
            blk = slice(starts[k], min(starts[k] + T, length))
            n = blk.stop - blk.start
            h_prev = entering[k]
            d_b, u_b, gy_b = dl[blk], ul[blk], gy[blk]
            a, H = _block_states(d_b, u_b, A_g, Bt[blk], h_prev, a_buf, h_buf)
            G = torch.mul(gy_b.unsqueeze(-1), Ct[blk].unsqueeze(3), out=g_buf[:n])  # C_t gy_t
            G[-1] += carry
            Gv, av = G.unbind(0), a.unbind(0)
            for t in range(n - 2, -1, -1):
                Gv[t].addcmul_(av[t + 1], Gv[t + 1])
            # g_C_t = sum_d h_t gy_t ;  g_B_t = sum_d g_t delta_t u_t ;  (g B)_t = sum_n g_t B_t
            torch.matmul(gy_b.unsqueeze(-2), H, out=g_C[blk].unsqueeze(-2))
            torch.matmul((d_b * u_b).unsqueeze(-2), G, out=g_B[blk].unsqueeze(-2))
            GB = torch.matmul(G, Bt[blk].unsqueeze(-1)).squeeze(-1)
            # d/d(delta_t A) = g_t * exp(delta_t A) * h_{t-1}, in a's buffer
            W = a.mul_(G)
            carry = W[0].clone()
            W[1:].mul_(H[:-1])
            W[0].mul_(h_prev)
            gA_acc[:n].addcmul_(W, d_b.unsqueeze(-1))
            torch.add(W.mul_(A_g).sum(-1), GB * u_b, out=g_delta[blk])
            torch.mul(GB, d_b, out=g_u[blk])
        g_A = gA_acc.sum((0, 1)).reshape(groups * dim_g, n_state)

        def to_bdl(g):
            return g.reshape(length, batch, groups * dim_g).permute(1, 2, 0)

        return to_bdl(g_u), to_bdl(g_delta), g_A, g_B.permute(1, 2, 3, 0), g_C.permute(1, 2, 3, 0)


# One [T, batch, D, N] block of the scan holds about this many numbers (~512 KiB in float32, so the
# few block buffers of the backward stay in a 2 MiB L2 cache).
BLOCK_ELEMENTS = 1 << 17


def _block_length(step_elements: int, length: int) -> int:
    """Time steps per block: ``BLOCK_ELEMENTS // (batch D N)``, at least 1, at most ``length``."""
    return max(1, min(length, BLOCK_ELEMENTS // max(step_elements, 1)))


def _time_major(u, delta, B, C):
    """delta and u as contiguous ``[L, b, G, D/G]``, B and C as ``[L, b, G, N]``."""
    batch, dim, length = u.shape
    groups = B.shape[1]
    # contiguous first: elementwise results inherit their inputs' memory layout
    dl = delta.permute(2, 0, 1).contiguous().reshape(length, batch, groups, dim // groups)
    ul = u.permute(2, 0, 1).contiguous().reshape(length, batch, groups, dim // groups)
    return dl, ul, B.permute(3, 0, 1, 2).contiguous(), C.permute(3, 0, 1, 2).contiguous()


def _scan_blocks(dl, ul, A_g, Bt, Ct, keep_entering: bool):
    """The forward scan over time-major inputs (``dl``, ``ul`` ``[L, b, G, D/G]``, ``Bt``, ``Ct`` ``[L, b, G, N]``):
    ``(y [L, b, G, D/G], last state [b, G, D/G, N], states entering each block (if kept), block length)``."""
    length, batch, groups, dim_g = dl.shape
    n_state = A_g.shape[-1]
    T = _block_length(batch * groups * dim_g * n_state, length)
    y = dl.new_empty(dl.shape)
    entering = []
    h = dl.new_zeros(batch, groups, dim_g, n_state)
    a_buf = dl.new_empty((T,) + h.shape)
    h_buf = torch.empty_like(a_buf)
    for start in range(0, length, T):
        blk = slice(start, min(start + T, length))
        if keep_entering:
            entering.append(h)
        a, H = _block_states(dl[blk], ul[blk], A_g, Bt[blk], h, a_buf, h_buf)
        torch.matmul(H, Ct[blk].unsqueeze(-1), out=y[blk].unsqueeze(-1))
        h = H[-1].clone()
    return y, h, entering, T


# Exponents ``delta A`` are clamped at this floor before ``exp``: exp(-60) ~ 1e-26 is far below any dtype's
# rounding of what it weighs, while exp of a far more negative number lands in the subnormal range or
# underflows, which x86 CPUs compute 10-200x slower than normal numbers.
EXP_FLOOR = -60.0


def _block_states(d_b, u_b, A_g, B_b, h_prev, a_buf, h_buf):
    """One block: decays ``a_t = exp(delta_t A)`` and states ``h_t = a_t h_{t-1} + delta_t u_t B_t`` of its
    ``n`` steps, in the first ``n`` rows of the two buffers (``[T, b, G, D/G, N]``), from ``h_prev``."""
    n = d_b.shape[0]
    a = torch.mul(d_b.unsqueeze(-1), A_g, out=a_buf[:n]).clamp_min_(EXP_FLOOR).exp_()
    H = torch.mul((d_b * u_b).unsqueeze(-1), B_b.unsqueeze(3), out=h_buf[:n])
    Hv, av = H.unbind(0), a.unbind(0)
    Hv[0].addcmul_(av[0], h_prev)
    for t in range(1, n):
        Hv[t].addcmul_(av[t], Hv[t - 1])
    return a, H


@autocast_off
def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    *,
    backend: str = "auto",
):
    """Selective scan with :func:`selective_scan_reference`'s semantics, fast.

    CUDA tensors use ``mamba_ssm``'s kernel when it imports (``backend`` = "auto"/"cuda"); otherwise
    :class:`_SelectiveScanFn` (time-major recurrence in cache-sized blocks, hand-written backward).
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    kernel = resolve_kernel("selective_scan", backend, u, delta, A, B, C)
    if kernel is not None:
        return kernel(
            u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
            D=D, z=None if z is None else z.contiguous(), delta_bias=delta_bias,
            delta_softplus=delta_softplus, return_last_state=return_last_state,
        )
    dtype = compute_dtype(u.dtype)
    u_c, delta = _discretise(u, delta, delta_bias, delta_softplus, dtype)
    B = B.to(dtype) if B.dim() == 4 else B.to(dtype).unsqueeze(1)
    C = C.to(dtype) if C.dim() == 4 else C.to(dtype).unsqueeze(1)
    if B.shape[1] != C.shape[1]:  # different group counts: give both one group per channel
        B = B.repeat_interleave(u.shape[1] // B.shape[1], dim=1)
        C = C.repeat_interleave(u.shape[1] // C.shape[1], dim=1)
    y, last = _SelectiveScanFn.apply(u_c, delta, A.to(dtype), B, C)
    out = _finish(y, u_c, D, z, u.dtype)
    return (out, last) if return_last_state else out


@autocast_off
def selective_scan_time_major(u, delta, A, B, C, D=None, z=None, delta_softplus=False):
    """:func:`selective_scan` without gradients, on time-major tensors: ``u``, ``delta``, ``z`` ``[L, batch, D]``;
    ``B``, ``C`` ``[L, batch, N]`` or ``[L, batch, G, N]``; returns ``out`` ``[L, batch, D]``.

    The layout a mixer has when it runs its projections on ``[L, batch, d]`` hidden states: the scan reads its
    inputs where they lie and its output feeds ``out_proj`` as is, with none of the ``[batch, D, L]`` transposes
    (for batch 1 the two layouts are the same memory). CPU/PyTorch only; under autograd (or for CUDA kernels)
    use :func:`selective_scan`."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z)):
        raise RuntimeError("selective_scan_time_major is forward-only: call it under torch.no_grad(), or use "
                           "selective_scan (which has a backward).")
    if u.dim() != 3 or delta.shape != u.shape or (z is not None and z.shape != u.shape):
        raise ValueError(f"u, delta (and z) must be [length, batch, channels], got {tuple(u.shape)}, "
                         f"{tuple(delta.shape)}{'' if z is None else ', ' + str(tuple(z.shape))}.")
    length, batch, dim = u.shape
    Bg = B if B.dim() == 4 else B.unsqueeze(2)
    Cg = C if C.dim() == 4 else C.unsqueeze(2)
    n_state = A.shape[-1]
    if (A.shape != (dim, n_state) or Bg.shape[:2] != (length, batch) or Bg.shape[-1] != n_state
            or Cg.shape != Bg.shape or dim % Bg.shape[2] != 0):
        raise ValueError(f"expected A [{dim}, N], B and C [{length}, {batch}, (G,) N] with G dividing {dim}; got "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}.")
    dtype = compute_dtype(u.dtype)
    groups = Bg.shape[2]
    u_c, dl = u.to(dtype), delta.to(dtype)
    if delta_softplus:
        dl = F.softplus(dl)
    y, _, _, _ = _scan_blocks(
        dl.reshape(length, batch, groups, dim // groups), u_c.reshape(length, batch, groups, dim // groups),
        A.to(dtype).reshape(groups, dim // groups, n_state), Bg.to(dtype).contiguous(), Cg.to(dtype).contiguous(),
        keep_entering=False,
    )
    y = y.view(length, batch, dim)
    if D is not None:
        y.addcmul_(u_c, D.to(dtype))
    if z is not None:
        y.mul_(F.silu(z.to(dtype)))
    return y.to(u.dtype)


@autocast_off
def selective_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, *, backend: str = "auto"
):
    """One recurrent step for generation.

    ``state`` ``[batch, D, N]`` is updated in place; ``x``, ``dt``, ``z``: ``[batch, D]``; ``A``
    ``[D, N]``; ``B``, ``C``: ``[batch, N]`` or ``[batch, G, N]``. Returns ``y`` ``[batch, D]``.
    Looping this over time reproduces :func:`selective_scan` (and its last state).
    """
    if state.dim() != 3 or x.dim() != 2 or state.shape[:2] != x.shape or dt.shape != x.shape:
        raise ValueError(
            f"expected state [batch, D, N], x and dt [batch, D]; got state {tuple(state.shape)}, "
            f"x {tuple(x.shape)}, dt {tuple(dt.shape)}."
        )
    batch, dim, n_state = state.shape
    if A.shape != (dim, n_state):
        raise ValueError(f"A must be [D, N] = [{dim}, {n_state}], got {tuple(A.shape)}.")
    if (
        B.dim() not in (2, 3) or C.shape != B.shape or B.shape[0] != batch or B.shape[-1] != n_state
        or (B.dim() == 3 and dim % B.shape[1] != 0)
    ):
        raise ValueError(
            f"B and C must both be [batch, N] = [{batch}, {n_state}] or [batch, groups, N] with groups "
            f"dividing {dim}; got {tuple(B.shape)} and {tuple(C.shape)}."
        )
    kernel = resolve_kernel("selective_state_update", backend, state, x, dt, A, B, C)
    if kernel is not None:
        if B.dim() == 2:
            return kernel(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
        # grouped B/C: the kernel wants [batch, groups, D/groups, ...] views of everything else
        g = B.shape[1]

        def grouped(t):  # [batch, D] -> [batch, groups, D/groups]
            return None if t is None else t.reshape(batch, g, dim // g)

        y = kernel(
            state.view(batch, g, dim // g, n_state), grouped(x), grouped(dt), A.view(g, dim // g, n_state), B, C,
            D=None if D is None else D.view(g, dim // g), z=grouped(z),
            dt_bias=None if dt_bias is None else dt_bias.view(g, dim // g), dt_softplus=dt_softplus,
        )
        return y.reshape(batch, dim)
    dtype = compute_dtype(x.dtype)
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    x_c = x.to(dtype)
    B = B.to(dtype)
    C = C.to(dtype)
    if B.dim() == 3:  # [b, G, N] -> per channel
        B = B.repeat_interleave(dim // B.shape[1], dim=1)
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    else:
        B = B.unsqueeze(1)
        C = C.unsqueeze(1)
    new_state = torch.exp(dt.unsqueeze(-1) * A.to(dtype)) * state.to(dtype) + (dt * x_c).unsqueeze(-1) * B
    with torch.no_grad():
        state.copy_(new_state)
    y = (new_state * C).sum(-1)
    if D is not None:
        y = y + D.to(dtype) * x_c
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(x.dtype)
