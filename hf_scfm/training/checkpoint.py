"""Resumable training state in safetensors + JSON (:func:`save_training_state` / :func:`load_training_state`), and
the ``checkpoint-N`` folders of a pretraining run (:func:`find_resume_checkpoint`, :func:`read_run_state`,
:func:`check_resume_compatible`: which checkpoint ``--resume`` means, and whether this run may continue it).

``accelerator.save_state``/``load_state`` write and read ``optimizer.bin``, ``scheduler.bin``,
``random_states_*.pkl``, ``custom_checkpoint_*.pkl`` with ``torch.save``/pickle, and unpickling a file can run
arbitrary code. hf-scfm never unpickles a file, so the state of a training run is stored as:

==================================  ====================================================================
file                                content
==================================  ====================================================================
``model.safetensors``               weights (``save_pretrained``'s file is reused; ``save_model=True`` writes it)
``optimizer.safetensors`` + ``.json``  every tensor of ``optimizer.state_dict()`` under its path
                                    (``state.<param_index>.exp_avg``, ``state.<i>.step``, ...); the rest
                                    (``param_groups`` hyperparameters, python numbers) as JSON
``scheduler.json``                  ``scheduler.state_dict()`` (numbers and lists; ``LambdaLR``'s
                                    ``lr_lambdas`` entries are ``None`` or attribute dicts)
``scaler.json``                     the fp16 ``GradScaler`` state, when there is one
``rng_state_rank<R>.safetensors``   torch CPU RNG state (uint8) and the CUDA RNG state of every device
``rng_state_rank<R>.json``          python ``random`` and numpy RNG states, Accelerate's micro-step counter
``extra_state_rank<R>.json``        the caller's ``extra`` dict (e.g. the data-stream position of that rank)
``training_state_manifest.json``    format, number of processes, distributed type (written last by rank 0)
==================================  ====================================================================

Rank 0 writes the shared files (weights, optimizer, scheduler, scaler: identical on every rank under DDP); each
rank writes its own RNG and ``extra`` files. Python objects are mapped to JSON by a small reversible encoding
(tuples, non-string dict keys, non-finite floats and numpy arrays are tagged; tensors become references to the
safetensors file), so ``optimizer.load_state_dict`` gets back exactly what ``state_dict`` gave and AdamW resumes
bit-exactly. An object the encoding does not know raises ``TypeError`` naming its path: nothing is silently dropped.

**FSDP / DeepSpeed / Megatron-LM.** Their optimizer state is sharded and gathered through Accelerate's own
machinery, which this flat scheme does not reproduce. Under those distributed types the functions fall back to
``accelerator.save_state``/``load_state`` and log a warning: such checkpoints contain pickled files and must only
be resumed from trusted, local folders (they are never pushed to the Hub: see :data:`hub.NEVER_PUSHED`). This is a
deliberate trade: exact resume of sharded runs is worth more than refusing them, and the risk is confined to files
the same user wrote on the same machine. Loading a pickle-format checkpoint in a non-sharded run is refused.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT = "hf_scfm-safetensors"
PICKLE_FORMAT = "accelerate-save-state"
FORMAT_VERSION = 1
MANIFEST = "training_state_manifest.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_WEIGHTS_INDEX = "model.safetensors.index.json"
_SHARDED_TYPES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")
_MARKERS = ("__tensor__", "__tuple__", "__items__", "__float__", "__ndarray__")
_PICKLE_WARNING = (
    "Distributed type %s shards the optimizer state, which hf-scfm's safetensors/JSON training state does not "
    "cover: falling back to accelerator.%s. These checkpoints contain PICKLED files (optimizer, scheduler, RNG "
    "states); resume only from trusted local folders you wrote yourself."
)


class TrainingStateError(ValueError):
    """A training-state folder that cannot be restored into this run."""


# ---------------------------------------------------------------------------------------------------------------
# reversible encoding: python objects <-> JSON + a flat dict of tensors
# ---------------------------------------------------------------------------------------------------------------


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def encode_state(obj: Any, tensors: dict, path: str = "") -> Any:
    """JSON-able form of ``obj``; every tensor is moved into ``tensors`` under its dotted ``path``."""
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        if path in tensors:
            raise ValueError(f"two tensors map to the same name {path!r}")
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, _join(path, i)) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, _join(path, i)) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k in _MARKERS for k in obj):
            return {k: encode_state(v, tensors, _join(path, k)) for k, v in obj.items()}
        return {"__items__": [[encode_state(k, tensors, _join(path, f"key{i}")),
                               encode_state(v, tensors, _join(path, k))] for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(
        f"Cannot store {type(obj).__name__} at {path or '<root>'!r} of a training state: only tensors, numpy "
        "arrays, numbers, strings, None, lists, tuples and dicts are stored (safetensors + JSON, never pickle)."
    )


def decode_state(obj: Any, tensors: dict) -> Any:
    """Inverse of :func:`encode_state`."""
    import numpy as np

    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        name = obj["__tensor__"]
        if name not in tensors:
            raise TrainingStateError(f"the training state refers to tensor {name!r}, which its safetensors file lacks")
        return tensors[name]
    if "__tuple__" in obj:
        return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {decode_state(k, tensors): decode_state(v, tensors) for k, v in obj["__items__"]}
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    return {k: decode_state(v, tensors) for k, v in obj.items()}


def _write_component(folder: Path, stem: str, obj: Any) -> None:
    """``<stem>.json`` and, when ``obj`` holds tensors, ``<stem>.safetensors``."""
    from safetensors.torch import save_file

    tensors: dict = {}
    encoded = encode_state(obj, tensors)
    if tensors:
        save_file(tensors, str(folder / f"{stem}.safetensors"), metadata={"format": FORMAT})
    (folder / f"{stem}.json").write_text(json.dumps({"state": encoded}, allow_nan=False) + "\n", encoding="utf-8")


def _read_component(folder: Path, stem: str) -> Any:
    from safetensors.torch import load_file

    path = folder / f"{stem}.json"
    if not path.is_file():
        raise TrainingStateError(f"{folder} has no {path.name}: the training state is incomplete. Resume from "
                                 "another checkpoint, or start again without resuming.")
    try:
        encoded = json.loads(path.read_text(encoding="utf-8"))["state"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise TrainingStateError(f"{path} is not a training-state file ({err}): the checkpoint is corrupt.") from err
    weights = folder / f"{stem}.safetensors"
    return decode_state(encoded, load_file(str(weights)) if weights.is_file() else {})


# ---------------------------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if not torch.cuda.is_available():
            logger.warning("The checkpoint holds CUDA RNG states but CUDA is not available: they are not restored.")
        elif len(state["cuda"]) != torch.cuda.device_count():
            logger.warning("The checkpoint holds CUDA RNG states of %d devices, this machine has %d: not restored.",
                           len(state["cuda"]), torch.cuda.device_count())
        else:
            torch.cuda.set_rng_state_all(state["cuda"])


def _load_model_weights(folder: Path, model) -> None:
    """Load ``model.safetensors`` (or the shards of its index) into ``model``; only tied copies may be missing."""
    from safetensors.torch import load_file

    if (folder / MODEL_WEIGHTS).is_file():
        state = load_file(str(folder / MODEL_WEIGHTS))
    elif (folder / MODEL_WEIGHTS_INDEX).is_file():
        index = json.loads((folder / MODEL_WEIGHTS_INDEX).read_text(encoding="utf-8"))
        state = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(str(folder / shard)))
    else:
        raise TrainingStateError(f"{folder} has no {MODEL_WEIGHTS}: the checkpoint holds no model weights.")
    current = model.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded_storage = {current[k].data_ptr() for k in state if k in current}
    untied = [k for k in missing if current[k].data_ptr() not in loaded_storage]
    if unexpected or untied:
        raise TrainingStateError(
            f"{folder / MODEL_WEIGHTS} does not match the model: missing {untied[:5]}, unexpected "
            f"{list(unexpected)[:5]}. Resume with the same model family and preset that wrote it."
        )


def _is_sharded(accelerator) -> bool:
    return str(getattr(accelerator.distributed_type, "name", accelerator.distributed_type)).upper() in _SHARDED_TYPES


def _register_scheduler(accelerator, scheduler) -> None:
    """Fallback path only: make ``save_state``/``load_state`` include the (unprepared) scheduler."""
    if scheduler is None:
        return
    known = list(getattr(accelerator, "_custom_objects", [])) + [
        getattr(s, "scheduler", s) for s in getattr(accelerator, "_schedulers", [])]
    if not any(obj is scheduler or getattr(scheduler, "scheduler", None) is obj for obj in known):
        accelerator.register_for_checkpointing(scheduler)


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------


def save_training_state(folder, accelerator, model, optimizer, scheduler, extra: dict, *,
                        save_model: bool = True) -> Path:
    """Write the resumable state of a run into ``folder`` (see the module docstring). Call on every process.

    ``extra`` (JSON-able, per rank) is given back by :func:`load_training_state`. ``save_model=False`` when
    ``save_pretrained`` writes ``model.safetensors`` into the same folder (as ``hf-scfm pretrain`` does).
    ``scheduler`` may be ``None``.
    """
    folder = Path(folder)
    rank = accelerator.process_index
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    sharded = _is_sharded(accelerator)
    if sharded:
        logger.warning(_PICKLE_WARNING, accelerator.distributed_type, "save_state")
        _register_scheduler(accelerator, scheduler)
        accelerator.save_state(str(folder), safe_serialization=True)
    else:
        if save_model:
            from safetensors.torch import save_model as save_model_file

            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_model_file(accelerator.unwrap_model(model), str(folder / MODEL_WEIGHTS))
        if accelerator.is_main_process:
            _write_component(folder, "optimizer", optimizer.state_dict())
            if scheduler is not None:
                _write_component(folder, "scheduler", scheduler.state_dict())
            if getattr(accelerator, "scaler", None) is not None:
                _write_component(folder, "scaler", accelerator.scaler.state_dict())
        _write_component(folder, f"rng_state_rank{rank}", {"rng": _rng_state(), "accelerator_step": accelerator.step})
    _write_component(folder, f"extra_state_rank{rank}", dict(extra))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        manifest = {"format": PICKLE_FORMAT if sharded else FORMAT, "format_version": FORMAT_VERSION,
                    "num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
                    "has_scheduler": scheduler is not None}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    accelerator.wait_for_everyone()
    return folder


def load_training_state(folder, accelerator, model, optimizer, scheduler) -> dict:
    """Restore what :func:`save_training_state` wrote into prepared ``model``/``optimizer`` and ``scheduler``
    (may be ``None``), and this rank's RNG states; return this rank's ``extra`` dict. Call on every process.

    Raises :class:`TrainingStateError` for an incomplete folder, another number of processes, or a
    pickle-format (``save_state``) folder outside FSDP/DeepSpeed: nothing here unpickles a file.
    """
    folder = Path(folder)
    rank = accelerator.process_index
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        pickled = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pkl", ".pt", ".pth"))
        hint = (f" It holds pickled training state {pickled} (accelerate save_state, as older hf-scfm versions "
                "wrote), which hf-scfm does not load." if pickled else "")
        raise TrainingStateError(f"{folder} has no {MANIFEST}, so it holds no resumable training state.{hint} "
                                 "Start again without resuming.")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("num_processes") != accelerator.num_processes:
        raise TrainingStateError(
            f"{folder} was written by {manifest.get('num_processes')} processes, this run has "
            f"{accelerator.num_processes}: the per-process data positions and RNG states cannot be mapped. "
            "Resume with the same number of processes."
        )
    sharded = _is_sharded(accelerator)
    if manifest.get("format") == PICKLE_FORMAT:
        if not sharded:
            raise TrainingStateError(
                f"{folder} holds pickled training state written under {manifest.get('distributed_type')} "
                "(accelerate save_state); outside FSDP/DeepSpeed hf-scfm does not unpickle files. Resume it with "
                "the same distributed setup."
            )
        logger.warning(_PICKLE_WARNING, accelerator.distributed_type, "load_state")
        _register_scheduler(accelerator, scheduler)
        accelerator.load_state(str(folder))
    elif manifest.get("format") == FORMAT:
        if sharded:
            raise TrainingStateError(
                f"{folder} was written without FSDP/DeepSpeed ({manifest.get('distributed_type')}); this run uses "
                f"{accelerator.distributed_type}, whose sharded optimizer state it cannot restore. Resume it with "
                "the same distributed setup."
            )
        if manifest.get("format_version") != FORMAT_VERSION:
            raise TrainingStateError(f"{manifest_path}: unknown format_version {manifest.get('format_version')!r}.")
        _load_model_weights(folder, accelerator.unwrap_model(model))
        optimizer.load_state_dict(_read_component(folder, "optimizer"))
        if scheduler is not None:
            if not manifest.get("has_scheduler"):
                raise TrainingStateError(f"{folder} holds no scheduler state, but a scheduler was passed.")
            scheduler.load_state_dict(_read_component(folder, "scheduler"))
        if getattr(accelerator, "scaler", None) is not None:
            accelerator.scaler.load_state_dict(_read_component(folder, "scaler"))
        per_rank = _read_component(folder, f"rng_state_rank{rank}")
        _set_rng_state(per_rank["rng"])
        accelerator.step = int(per_rank["accelerator_step"])
    else:
        raise TrainingStateError(f"{manifest_path}: unknown format {manifest.get('format')!r}.")
    return _read_component(folder, f"extra_state_rank{rank}")


# ---------------------------------------------------------------------------------------------------------------
# the checkpoint-N folders of a pretraining run
# ---------------------------------------------------------------------------------------------------------------
#: The run description in every ``checkpoint-N`` of ``hf-scfm pretrain`` (written last: its presence marks a whole
#: checkpoint).
STATE_FILE = "hf_scfm_training_state.json"
#: The settings it records (plus ``step``); a resumed run must match the first six and ``world_size``.
RUN_STATE_KEYS = ("model", "preset", "objective", "batch_size", "gradient_accumulation_steps", "seed", "max_steps",
                  "world_size", "corpus")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed (missing, partial, or from another run configuration)."""


def run_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``[(step, folder)]`` of the complete-looking ``checkpoint-N`` folders in ``out``, by step."""
    found = []
    if out.is_dir():
        for child in out.iterdir():
            match = _CHECKPOINT_RE.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
    return sorted(found)


def read_run_state(checkpoint: Path) -> dict[str, Any]:
    """The run description of a complete checkpoint; :class:`ResumeError` if it is partial or corrupt."""
    path = checkpoint / STATE_FILE
    if not checkpoint.is_dir():
        raise ResumeError(f"{checkpoint} is not a folder: pass a checkpoint-N folder written by hf-scfm pretrain.")
    if not path.is_file():
        raise ResumeError(
            f"{checkpoint} has no {STATE_FILE}: the checkpoint is partial (the run stopped while saving it) or was "
            "not written by hf-scfm pretrain. Resume from an earlier checkpoint-N, or start again without --resume."
        )
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ResumeError(f"{path} is not valid JSON ({err}): the checkpoint is corrupt.") from err
    from .hub import CheckpointError, validate_checkpoint

    try:
        validate_checkpoint(checkpoint, require_tokenizer=True)
    except CheckpointError as err:
        raise ResumeError(f"Cannot resume from {checkpoint}: {err}") from err
    return state


def find_resume_checkpoint(resume: str | None, out: str | Path) -> Path | None:
    """The checkpoint ``--resume`` names: None, ``"latest"`` (the last ``checkpoint-N`` in ``out``) or a folder."""
    if resume is None:
        return None
    out = Path(out)
    if resume != "latest":
        return Path(resume)
    found = run_checkpoints(out)
    if not found:
        raise ResumeError(f"--resume: {out} holds no checkpoint-N folder. Start without --resume.")
    return found[-1][1]


def check_resume_compatible(state: dict, run: dict, checkpoint: Path) -> None:
    """:class:`ResumeError` unless ``run`` (this run's :data:`RUN_STATE_KEYS` settings) can continue ``state``."""
    mismatches = [
        f"--{key.replace('_', '-')} {run[key]!r} (checkpoint: {state.get(key)!r})"
        for key in ("model", "preset", "objective", "batch_size", "gradient_accumulation_steps", "seed")
        if state.get(key) != run[key]
    ]
    if mismatches:
        raise ResumeError(
            f"{checkpoint} was written by a run with other settings: {'; '.join(mismatches)}. Resume with the "
            "settings of that run (an exact resume replays its data order), or start a new run in another --out."
        )
    if state.get("world_size") != run["world_size"]:
        raise ResumeError(
            f"{checkpoint} was written with {state.get('world_size')} processes, this run has {run['world_size']}: "
            "each rank's data position cannot be carried over. Launch with the same number of processes."
        )
