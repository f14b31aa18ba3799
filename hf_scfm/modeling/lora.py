"""Default LoRA target modules for each model family, for ``peft.LoraConfig(target_modules=...)``.

peft matches a target name against the *end* of each module's dotted name (``key == t`` or
``key.endswith("." + t)``), so a dotted target such as ``"mixer.out_proj"`` selects the Mamba mixers' output
projection and leaves a head layer that happens to be called ``out_proj`` alone. Every list below selects the
backbone's linear maps only (never an embedding, a norm or a task head): the heads are trained in full or
listed in ``LoraConfig(modules_to_save=[...])`` by the caller.

- ``cellfm``: the gated retention's ``q/k/v/g/o`` projections and the SGLU's ``up/gate/down`` maps of every
  ERetNet layer (the paper applies LoRA to the ERetNet layers).
- ``mouse_genemamba``: each Mamba-1 mixer's ``in_proj``, ``x_proj``, ``dt_proj`` and ``out_proj``.
- ``scmamba2``: each Mamba-2 mixer's ``in_proj`` and ``out_proj``.
"""

from __future__ import annotations

from typing import Any

#: model_type -> default ``target_modules`` for ``peft.LoraConfig``.
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "cellfm": ["q_proj", "k_proj", "v_proj", "g_proj", "o_proj", "up_proj", "gate_proj", "down_proj"],
    "mouse_genemamba": ["mixer.in_proj", "mixer.x_proj", "mixer.dt_proj", "mixer.out_proj"],
    "scmamba2": ["mixer.in_proj", "mixer.out_proj"],
}


def _model_type(model_or_config: Any) -> str:
    if isinstance(model_or_config, str):
        return model_or_config
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise TypeError(
            "default_lora_targets expects a model, a config or a model_type string, got "
            f"{type(model_or_config).__name__}."
        )
    return model_type


def default_lora_targets(model_or_config: Any) -> list[str]:
    """Return the default LoRA ``target_modules`` for a model, its config, or its ``model_type``.

    >>> from peft import LoraConfig, get_peft_model
    >>> lora = LoraConfig(r=8, target_modules=default_lora_targets(model))  # doctest: +SKIP
    >>> model = get_peft_model(model, lora)  # doctest: +SKIP

    Returns a fresh list (safe to edit). Raises ``ValueError`` for a family without defaults.
    """
    model_type = _model_type(model_or_config)
    if model_type not in DEFAULT_LORA_TARGETS:
        raise ValueError(
            f"No default LoRA targets for model_type {model_type!r}; known: {sorted(DEFAULT_LORA_TARGETS)}. "
            "Pass target_modules to peft.LoraConfig yourself."
        )
    return list(DEFAULT_LORA_TARGETS[model_type])


__all__ = ["DEFAULT_LORA_TARGETS", "default_lora_targets"]
