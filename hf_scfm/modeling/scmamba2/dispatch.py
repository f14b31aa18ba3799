"""Choosing between our PyTorch ops and the optional CUDA kernels.

The CUDA kernels (``mamba_ssm``, ``causal_conv1d``) are optional extras (``pip install
hf-scfm[cuda]``). They are imported lazily, the first time a CUDA tensor asks for them, and never at
package import, so ``import hf_scfm`` works on any machine. ``backend`` selects the path:

* ``"auto"`` (default): the kernel when the tensors are on CUDA and the kernel imports, else ours.
* ``"torch"``: always our PyTorch implementation (any device, any dtype).
* ``"cuda"``: the kernel, or a ``RuntimeError`` that says what is missing and how to fix it.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any, Callable

import torch

BACKENDS = ("auto", "torch", "cuda")

# op name -> (module, attribute, pip package)
_KERNELS: dict[str, tuple[str, str, str]] = {
    "selective_scan": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn", "mamba-ssm"),
    "selective_state_update": (
        "mamba_ssm.ops.triton.selective_state_update",
        "selective_state_update",
        "mamba-ssm",
    ),
    "ssd_scan": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined", "mamba-ssm"),
    "causal_conv1d": ("causal_conv1d", "causal_conv1d_fn", "causal-conv1d"),
    "causal_conv1d_update": ("causal_conv1d", "causal_conv1d_update", "causal-conv1d"),
}


@lru_cache(maxsize=None)
def _load(op: str) -> Callable[..., Any] | None:
    module_name, attr, _ = _KERNELS[op]
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except Exception:  # ImportError, or a broken CUDA build raising at import time
        return None


def kernel_available(op: str) -> bool:
    """True when the CUDA kernel for ``op`` can be imported (imports it on first call)."""
    return _load(op) is not None


def resolve_kernel(op: str, backend: str, *tensors: torch.Tensor | None) -> Callable[..., Any] | None:
    """Return the CUDA kernel to call for ``op``, or ``None`` to use the PyTorch path.

    Raises ``ValueError`` for an unknown backend and ``RuntimeError`` when ``backend="cuda"`` cannot
    be honoured (kernel not installed, or tensors not on a CUDA device).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "torch":
        return None
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if backend == "auto":
        return _load(op) if on_cuda else None
    # backend == "cuda"
    if not on_cuda:
        raise RuntimeError(
            f"backend='cuda' was requested for {op}, but the inputs are not all on a CUDA device. "
            "Move the model and inputs to the GPU (model.to('cuda')), or use ssm_backend='auto' "
            "or 'torch'."
        )
    kernel = _load(op)
    if kernel is None:
        module_name, attr, package = _KERNELS[op]
        raise RuntimeError(
            f"backend='cuda' was requested for {op}, but {module_name}.{attr} could not be imported. "
            f"Install the kernels with `pip install hf-scfm[cuda]` (package {package!r}), "
            "or set ssm_backend='auto' or 'torch' to use the PyTorch implementation."
        )
    return kernel


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
