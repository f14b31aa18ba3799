"""Depthwise causal 1-D convolution (the short convolution in front of every Mamba scan).

Shapes follow the ``causal_conv1d`` package: ``x`` is ``[batch, channels, length]``, ``weight`` is
``[channels, width]``, ``bias`` is ``[channels]``. Output position ``t`` sees inputs ``t-width+1..t``
(zeros before the start), so right padding never leaks into real positions. ``activation`` is
``None`` or ``"silu"``/``"swish"``.

``causal_conv1d_update`` is the one-step form for generation: ``conv_state`` holds the last inputs
(``[batch, channels, S]`` with ``S >= width - 1``; transformers' Mamba caches use ``S = width``), is
shifted left in place and receives the new input at its end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import resolve_kernel

_ACTIVATIONS = (None, "silu", "swish")


def _check_activation(activation: str | None) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}.")


def _check_weight(x_channels: int, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dim() != 2 or weight.shape[0] != x_channels:
        raise ValueError(
            f"weight must be [channels, width] = [{x_channels}, W], got {tuple(weight.shape)}. "
            "For an nn.Conv1d(groups=channels) layer pass conv.weight.squeeze(1)."
        )
    if bias is not None and bias.shape != (x_channels,):
        raise ValueError(f"bias must be [channels] = [{x_channels}], got {tuple(bias.shape)}.")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Depthwise causal convolution of ``x`` [B, D, L] with ``weight`` [D, W]; returns [B, D, L]."""
    _check_activation(activation)
    if x.dim() != 3:
        raise ValueError(f"x must be [batch, channels, length], got shape {tuple(x.shape)}.")
    _check_weight(x.shape[1], weight, bias)
    kernel = resolve_kernel("causal_conv1d", backend, x, weight)
    if kernel is not None:
        return kernel(x, weight, bias, activation=activation)
    width = weight.shape[1]
    out = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if activation is not None else out


def causal_conv1d_channels_last(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    time_dim: int = 0,
) -> torch.Tensor:
    """:func:`causal_conv1d` on a channels-last ``x`` (PyTorch only): ``[length, batch, channels]`` with
    ``time_dim=0`` (time-major), ``[batch, length, channels]`` with ``time_dim=1``; returns the same layout.
    ``width`` shifted multiply-adds over time slices, so a mixer whose projections give ``[..., channels]``
    needs no transpose around the convolution (and no contiguous copy of a strided projection slice)."""
    _check_activation(activation)
    if x.dim() != 3 or time_dim not in (0, 1):
        raise ValueError(f"x must be [length, batch, channels] (time_dim=0) or [batch, length, channels] "
                         f"(time_dim=1), got shape {tuple(x.shape)} with time_dim={time_dim}.")
    _check_weight(x.shape[2], weight, bias)
    length, width = x.shape[time_dim], weight.shape[1]
    pad = (0, 0, width - 1, 0) if time_dim == 1 else (0, 0, 0, 0, width - 1, 0)
    padded = F.pad(x, pad)  # zeros before the start
    w = weight.to(x.dtype)
    out = torch.mul(padded.narrow(time_dim, width - 1, length), w[:, width - 1])
    for k in range(width - 1):
        out.addcmul_(padded.narrow(time_dim, k, length), w[:, k])
    if bias is not None:
        out += bias.to(x.dtype)
    return F.silu(out, inplace=True) if activation is not None else out


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """One decoding step. ``x`` is [B, D] (or [B, D, T] for T steps in a row); ``conv_state``
    [B, D, S] (S >= W - 1) is updated in place. Returns the output with ``x``'s shape."""
    _check_activation(activation)
    _check_weight(x.shape[1], weight, bias)
    width = weight.shape[1]
    if conv_state.dim() != 3 or conv_state.shape[:2] != x.shape[:2] or conv_state.shape[2] < width - 1:
        raise ValueError(
            f"conv_state must be [batch, channels, S] with S >= width-1 = {width - 1}, matching x "
            f"{tuple(x.shape)}; got {tuple(conv_state.shape)}."
        )
    kernel = resolve_kernel("causal_conv1d_update", backend, x, conv_state, weight)
    if kernel is not None:
        return kernel(x, conv_state, weight, bias, activation)
    if x.dim() == 3:
        steps = [
            causal_conv1d_update(x[:, :, t], conv_state, weight, bias, activation, backend="torch")
            for t in range(x.shape[2])
        ]
        return torch.stack(steps, dim=2)
    if x.dim() != 2:
        raise ValueError(f"x must be [batch, channels] or [batch, channels, T], got {tuple(x.shape)}.")
    window = torch.cat([conv_state[:, :, conv_state.shape[2] - (width - 1) :], x.unsqueeze(2)], dim=2)
    out = (window * weight).sum(-1)
    if bias is not None:
        out = out + bias
    with torch.no_grad():
        conv_state.copy_(torch.cat([conv_state[:, :, 1:], x.unsqueeze(2).to(conv_state.dtype)], dim=2))
    return F.silu(out) if activation is not None else out
