"""Pieces every model family's configuration shares: named presets and the tokenizer check.

:class:`PresetMixin` is the original of the copy each ``configuration_<family>.py`` carries (marked
``# Copied from hf_scfm.modeling.configuration_utils.PresetMixin``, kept equal by ``utils/check_copies.py``): a family
folder ships as remote code and imports nothing outside itself. :func:`check_tokenizer_matches` is used where a
model meets a tokenizer (training, tasks) and does not travel with checkpoints.
"""

from __future__ import annotations

import copy
from typing import Any


class PresetMixin:
    """Adds ``Config.from_preset(name, **overrides)`` to a ``PreTrainedConfig`` subclass.

    A family lists its presets in the class attribute ``PRESETS`` (name -> keyword arguments).
    ``"tiny"`` always exists: a model small enough for CPU tests and demos.
    """

    PRESETS: dict[str, dict[str, Any]] = {}

    @classmethod
    def from_preset(cls, name: str, **overrides):
        if name not in cls.PRESETS:
            raise ValueError(
                f"Unknown {cls.__name__} preset {name!r}. Available presets: {sorted(cls.PRESETS)}. "
                f"Pass one of those names, or build the config directly: {cls.__name__}(**kwargs)."
            )
        kwargs = copy.deepcopy(cls.PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)


def check_tokenizer_matches(config, tokenizer) -> None:
    """Raise if ``tokenizer`` is not the vocabulary ``config`` was built for.

    Compares the vocabulary size and, when the config records one, the vocabulary checksum
    (``config.vocab_checksum`` against ``tokenizer.vocab_checksum``). Call it wherever a model and a
    tokenizer meet (pipelines, training, tasks): a mismatch would silently map genes to the wrong rows
    of the embedding table.
    """
    tok_size = len(tokenizer)
    tok_sum = getattr(tokenizer, "vocab_checksum", None)
    cfg_sum = getattr(config, "vocab_checksum", None)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    model = getattr(config, "_name_or_path", "") or config.model_type
    if cfg_sum is not None and tok_sum is not None and cfg_sum != tok_sum:
        raise ValueError(
            f"Tokenizer {name!r} (vocabulary checksum {tok_sum}, {tok_size} tokens) does not match model "
            f"{model!r} (trained with vocabulary checksum {cfg_sum}, vocab_size {config.vocab_size}). "
            "Load the tokenizer saved with the model: AutoTokenizer.from_pretrained(<model dir or repo>)."
        )
    if tok_size > config.vocab_size:
        raise ValueError(
            f"Tokenizer {name!r} has {tok_size} tokens but model {model!r} has vocab_size {config.vocab_size}: "
            "token ids would index past the embedding table. Load the tokenizer saved with the model."
        )
