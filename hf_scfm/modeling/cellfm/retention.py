"""Non-causal linear attention ("retention without decay") for CellFM's MHA blocks.

    out = (Q Kᵀ) V        (no softmax, no normaliser; feature maps and scaling live in the model)

``q``, ``k``: ``[batch, heads, L, d_k]``; ``v``: ``[batch, heads, L, d_v]``; ``attention_mask``:
``[batch, L]`` with 1 for real tokens and 0 for padding.

* :func:`linear_retention_reference`: the quadratic form ``(Q Kᵀ) V``, padded keys masked out of the
  ``L x L`` score matrix. O(L²) time and memory; the ground truth.
* :func:`linear_retention`: the same numbers as ``Q (Kᵀ V)``: padded rows of K and V are zeroed, the
  ``d_k x d_v`` summary ``Kᵀ V`` is formed once per head, and every query reads it. O(L d_k d_v)
  time, O(L) memory.

Both return zeros at padded query positions, so padding never carries values forward.
"""

from __future__ import annotations

import torch


def _check(q, k, v, attention_mask):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [batch, heads, length, dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    if q.shape[:3] != k.shape[:3] or q.shape[3] != k.shape[3] or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"q and k must share [batch, heads, length, d_k] and v must share [batch, heads, length]; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}."
        )
    if attention_mask is not None and attention_mask.shape != (q.shape[0], q.shape[2]):
        raise ValueError(
            f"attention_mask must be [batch, length] = {(q.shape[0], q.shape[2])}, got {tuple(attention_mask.shape)}."
        )


def _mask(attention_mask, like):
    return attention_mask.to(like.dtype)[:, None, :, None]  # [b, 1, L, 1]


def linear_retention_reference(q, k, v, attention_mask=None):
    """Quadratic form ``(Q Kᵀ) V`` with padded keys masked; O(L²)."""
    _check(q, k, v, attention_mask)
    scores = q @ k.transpose(-1, -2)  # [b, h, L, L]
    if attention_mask is not None:
        m = _mask(attention_mask, scores)
        scores = scores * m.transpose(-1, -2)  # mask keys (columns)
        return (scores @ v) * m
    return scores @ v


def linear_retention(q, k, v, attention_mask=None, *, backend: str = "auto"):
    """Linear-time ``Q (Kᵀ V)`` with padding zeroed out of K and V; O(L). ``backend`` is accepted
    for API symmetry (plain matmuls are already the fast path on every device)."""
    _check(q, k, v, attention_mask)
    if backend not in ("auto", "torch", "cuda"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'cuda', got {backend!r}.")
    if attention_mask is None:
        return q @ (k.transpose(-1, -2) @ v)
    m = _mask(attention_mask, k)
    kv = (k * m).transpose(-1, -2) @ (v * m)  # [b, h, d_k, d_v]
    return (q @ kv) * m.to(q.dtype)
