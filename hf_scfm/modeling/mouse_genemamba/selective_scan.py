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
* :func:`selective_scan`: the same numbers, fast: a time-major recurrence with a hand-written
  backward on CPU (or any device without kernels; see :class:`_SelectiveScanFn` for why not a
  chunked closed form), or mamba_ssm's CUDA kernel for CUDA tensors (see ``dispatch``).
* :func:`selective_state_update`: one generation step against a cached state (updated in place).

Padding: zero ``u`` at padded positions (models multiply by ``attention_mask``). Then padded steps
add nothing to the state, so right padding never changes real positions, and with left padding the
state stays exactly zero until the first real token. With right padding, the *final* state decays
through the padded steps unless ``delta`` is zeroed there too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import compute_dtype, resolve_kernel


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
    with a hand-written backward.

    Layout: everything is made *time-major* (``[L, batch, groups, D/groups, N]``, contiguous), so
    one time step is one contiguous block that stays in cache, and the recurrence is ``L`` in-place
    ``addcmul`` calls on it. The backward recomputes the states (only the inputs are saved: memory
    per layer is O(batch·D·L), like mamba_ssm's kernel) and runs the adjoint recurrence
    ``g_t = C_t gy_t + exp(delta_{t+1} A) g_{t+1}`` backwards in the same way; every gradient is then
    one contraction (einsum) over that block.

    Why not a chunked closed form: with cumulative sums inside chunks and a recurrence between
    chunks, every full-size ``[L, D, N]`` pass (cumsum, exp of the cumulated decay, the combine)
    costs about as much as the whole time-major loop. Measured on this project's 2-core CPU at
    L=2048, D=512, N=16 (forward, no grad): chunked (T = sqrt(L)) 0.47 s, time-major loop 0.09 s.
    The loop only loses when batch·D·N is tiny (Python overhead, ~µs per step), where it is cheap
    anyway. Inputs arrive in the compute dtype, delta already biased/softplus-ed, B/C grouped.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        ctx.save_for_backward(u, delta, A, B, C)
        a, H, Bt, Ct, _ = _time_major(u, delta, A, B, C)
        _forward_recurrence(a, H)
        y = torch.einsum("lbgdn,lbgn->lbgd", H, Ct)
        last = H[-1] if H.shape[0] else H.new_zeros(H.shape[1:])
        batch, dim, length = u.shape
        return (
            y.reshape(length, batch, dim).permute(1, 2, 0).contiguous(),
            last.reshape(batch, dim, -1).clone(),
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_last):
        u, delta, A, B, C = ctx.saved_tensors
        batch, dim, length = u.shape
        groups, n_state = B.shape[1], A.shape[1]
        a, H, Bt, Ct, (dl, ul) = _time_major(u, delta, A, B, C)
        _forward_recurrence(a, H)
        if grad_y is None:
            grad_y = u.new_zeros(u.shape)
        gy = grad_y.to(u.dtype).permute(2, 0, 1).reshape(length, batch, groups, dim // groups)
        # adjoint states g_t = dLoss/dh_t, in place: start from C_t gy_t, then run backwards
        Gs = gy.unsqueeze(-1) * Ct.unsqueeze(3)
        if grad_last is not None and length:
            Gs[-1] += grad_last.to(u.dtype).reshape(Gs.shape[1:])
        for t in range(length - 2, -1, -1):
            Gs[t].addcmul_(a[t + 1], Gs[t + 1])
        # d/d(delta_t A) = g_t * exp(delta_t A) * h_{t-1}   (h_{-1} = 0); reuse a's buffer
        g_dA = a.mul_(Gs)
        if length:
            g_dA[1:].mul_(H[:-1])
            g_dA[0].zero_()
        A_g = A.reshape(groups, dim // groups, n_state)
        GB = torch.einsum("lbgdn,lbgn->lbgd", Gs, Bt)
        g_delta = torch.einsum("lbgdn,gdn->lbgd", g_dA, A_g) + GB * ul
        g_u = GB * dl
        g_A = torch.einsum("lbgdn,lbgd->gdn", g_dA, dl).reshape(dim, n_state)
        g_B = torch.einsum("lbgdn,lbgd->lbgn", Gs, dl * ul).permute(1, 2, 3, 0)
        g_C = torch.einsum("lbgdn,lbgd->lbgn", H, gy).permute(1, 2, 3, 0)

        def to_bdl(g):
            return g.reshape(length, batch, dim).permute(1, 2, 0)

        return to_bdl(g_u), to_bdl(g_delta), g_A, g_B, g_C


def _time_major(u, delta, A, B, C):
    """Decay ``a`` and input ``x`` as contiguous ``[L, b, G, D/G, N]`` blocks (x is returned in the
    buffer that will hold the states), B/C as ``[L, b, G, N]``, and delta/u as ``[L, b, G, D/G]``."""
    batch, dim, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    # contiguous first: elementwise results inherit their inputs' memory layout
    dl = delta.permute(2, 0, 1).contiguous().reshape(length, batch, groups, dim // groups)
    ul = u.permute(2, 0, 1).contiguous().reshape(length, batch, groups, dim // groups)
    Bt = B.permute(3, 0, 1, 2).contiguous()
    Ct = C.permute(3, 0, 1, 2).contiguous()
    a = torch.exp(dl.unsqueeze(-1) * A.reshape(groups, dim // groups, n_state))
    x = (dl * ul).unsqueeze(-1) * Bt.unsqueeze(3)
    return a, x, Bt, Ct, (dl, ul)


def _forward_recurrence(a: torch.Tensor, h: torch.Tensor) -> None:
    """In place: on entry ``h[t]`` holds the input x_t; on exit the state h_t = a_t h_{t-1} + x_t."""
    for t in range(1, h.shape[0]):
        h[t].addcmul_(a[t], h[t - 1])


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
    :class:`_SelectiveScanFn` (time-major in-cache recurrence with a hand-written backward).
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
