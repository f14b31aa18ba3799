"""Linear-time sequence ops for the hf-scfm backbones: Mamba-1 selective scan, Mamba-2 SSD,
CellFM's linear retention, and the causal depthwise convolution.

Every op has a plain reference beside a fast PyTorch path, and (for the Mamba ops) dispatches to
the ``mamba_ssm`` / ``causal_conv1d`` CUDA kernels for CUDA tensors when they are installed. The
kernels are imported lazily; importing this package never needs them. Pass ``backend="auto" |
"torch" | "cuda"`` (models forward ``config.ssm_backend``) to force a path.
"""

from .conv import causal_conv1d, causal_conv1d_update
from .dispatch import BACKENDS, kernel_available
from .retention import linear_retention, linear_retention_reference
from .selective_scan import selective_scan, selective_scan_reference, selective_state_update
from .ssd import ssd_reference, ssd_scan, ssd_step

__all__ = [
    "BACKENDS",
    "causal_conv1d",
    "causal_conv1d_update",
    "kernel_available",
    "linear_retention",
    "linear_retention_reference",
    "selective_scan",
    "selective_scan_reference",
    "selective_state_update",
    "ssd_reference",
    "ssd_scan",
    "ssd_step",
]
