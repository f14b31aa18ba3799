"""What the training loops need from the distributed setup beyond Accelerate: CPU processes, FSDP2 on CPU, and
FSDP's full state dicts.

* **CPU processes.** ``Accelerator()`` on a machine without an accelerator device, launched by ``accelerate
  launch --multi_gpu --num_processes N`` or ``torchrun``, does not join the processes into one run (its state
  stays ``NO``: every process would train alone on all the data). :func:`accelerator_kwargs` passes
  ``cpu=True`` there, which makes Accelerate set up ``MULTI_CPU`` over gloo.
* **FSDP on CPU.** Accelerate turns an FSDP launch (``accelerate launch --use_fsdp --fsdp_version 2`` or an FSDP
  ``accelerate config``) into FSDP on accelerator devices only; on CPU (``MULTI_CPU``) it silently replicates
  the model instead (DDP). torch's FSDP2 ``fully_shard`` does run on CPU with gloo, so there
  :func:`shard_model` shards the model itself as Accelerate's FSDP2 path does on GPU: every block named in the
  model's ``_no_split_modules``, then the root (``reshard_after_forward`` from the launch's FSDP settings;
  parameters stay float32, ``--mixed-precision bf16`` is autocast as without FSDP).
* **Full state dicts.** :func:`full_model_state_dict` gathers the whole model (``torch.distributed.checkpoint``'s
  ``get_model_state_dict``, full and offloaded to CPU, on rank 0) for ``save_pretrained``, whether the model was
  sharded here or by Accelerate (FSDP1 or FSDP2); other models go through ``accelerator.get_state_dict``.
* **Saving a sharded model.** ``fully_shard`` changes the model's class to torch's ``FSDP<Class>`` (defined in a
  torch module): ``save_pretrained`` would ship that torch module as the remote code and name it in ``auto_map``.
  :func:`own_class` gives the model its own class back while it is saved.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

logger = logging.getLogger(__name__)

__all__ = ["accelerator_kwargs", "fsdp_requested", "needs_own_fsdp", "shard_model", "is_fsdp_model",
           "full_model_state_dict", "own_class"]


def accelerator_kwargs() -> dict:
    """``{"cpu": True}`` on a machine with no accelerator device (so several CPU processes form one run)."""
    import torch

    return {} if torch.accelerator.is_available() else {"cpu": True}


def fsdp_requested() -> bool:
    """True when the process was launched with FSDP (``accelerate launch --use_fsdp`` / an FSDP config)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def needs_own_fsdp(accelerator) -> bool:
    """FSDP was asked for, but Accelerate runs these processes as ``MULTI_CPU`` (it shards on GPUs only)."""
    return fsdp_requested() and accelerator.num_processes > 1 and accelerator.distributed_type.name == "MULTI_CPU"


def shard_model(model):
    """``fully_shard`` every block of ``model`` (its classes in ``_no_split_modules``), then ``model`` itself;
    returns ``model`` (now an FSDP2 module). Build the optimizer afterwards: it must see the sharded parameters."""
    from torch.distributed.fsdp import fully_shard

    version, reshard = _fsdp_launch_settings()
    if version != 2:
        raise ValueError(
            "FSDP on CPU processes is FSDP2 (torch's fully_shard); this launch asks for FSDP1. Launch with "
            "--fsdp_version 2 (or fsdp_version: 2 in the accelerate config; with an Accelerate older than 1.6, set "
            "FSDP_VERSION=2 in the environment)."
        )
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    sharded = 0
    for module in model.modules():
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, reshard_after_forward=reshard)
            sharded += 1
    fully_shard(model, reshard_after_forward=reshard)
    logger.info("FSDP2 on CPU: %d blocks and the root sharded (reshard_after_forward=%s)", sharded, reshard)
    return model


def _fsdp_launch_settings() -> tuple[int, bool]:
    """``(fsdp_version, reshard_after_forward)`` of the launch: Accelerate's FSDP plugin where it has them
    (Accelerate >= 1.6), else the ``FSDP_VERSION`` / ``FSDP_RESHARD_AFTER_FORWARD`` / ``FSDP_SHARDING_STRATEGY``
    variables ``accelerate launch`` sets (version 1 and resharding by default, as Accelerate)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # the launch's FSDP_* settings
    version = int(getattr(plugin, "fsdp_version", None) or os.environ.get("FSDP_VERSION", "1"))
    reshard = getattr(plugin, "reshard_after_forward", None)
    if reshard is None:
        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", os.environ.get("FSDP_SHARDING_STRATEGY", "true"))
    if not isinstance(reshard, bool):
        reshard = str(reshard).upper() not in ("FALSE", "0", "NO_SHARD", "SHARD_GRAD_OP", "2", "3")
    return version, reshard


def is_fsdp_model(model) -> bool:
    """True for an FSDP2 module (``fully_shard``) or an FSDP1 ``FullyShardedDataParallel`` wrapper."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return isinstance(model, (FSDPModule, FullyShardedDataParallel))


def full_model_state_dict(accelerator, model) -> dict:
    """The whole model's state dict for ``save_pretrained``, each tied weight under its first name only;
    collective (call on every process). Under FSDP the tensors are gathered to rank 0 on CPU (other ranks get
    ``{}``)."""
    if is_fsdp_model(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    tied = ({n for n, _ in unwrapped.named_parameters(remove_duplicate=False)}
            - {n for n, _ in unwrapped.named_parameters()})  # the second names of shared parameters
    return {k: v for k, v in state.items() if k not in tied}


@contextmanager
def own_class(model):
    """While in the block, an FSDP2 module is an instance of its own class (``MouseGeneMambaForCausalLM``, not
    torch's ``FSDPMouseGeneMambaForCausalLM``), so ``save_pretrained`` writes our modeling code and ``auto_map``;
    other models are left alone. Only for saving: forward/backward need the FSDP class."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if not isinstance(model, FSDPModule):
        yield model
        return
    model.__class__ = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    try:
        yield model
    finally:
        model.__class__ = cls
