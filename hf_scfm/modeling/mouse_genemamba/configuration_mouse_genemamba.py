"""Configuration of Mouse-GeneMamba (seed paper 000): a Mamba-1 language model over rank-ordered
mouse cell sentences."""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .special_tokens import (
    BOS_TOKEN_ID,
    CLS_TOKEN_ID,
    EOS_TOKEN_ID,
    MASK_TOKEN_ID,
    MOUSE_VOCAB_SIZE,
    PAD_TOKEN_ID,
    SPECIAL_VALUE,
)

#: The family's Auto classes, as ``config.json``'s ``auto_map`` holds them (``"<file>.<Class>"``): every
#: ``save_pretrained`` writes this map (so the checkpoint loads with ``trust_remote_code=True`` without hf_scfm), and
#: ``import hf_scfm`` registers it with transformers' Auto classes (lazily). ``AutoModelForPerturbationPrediction``
#: is hf_scfm's own Auto class (``hf_scfm.AutoModelForPerturbationPrediction``).
MOUSE_GENEMAMBA_AUTO_MAP = {
    "AutoConfig": "configuration_mouse_genemamba.MouseGeneMambaConfig",
    "AutoModel": "modeling_mouse_genemamba.MouseGeneMambaModel",
    "AutoModelForCausalLM": "modeling_mouse_genemamba.MouseGeneMambaForCausalLM",
    "AutoModelForPreTraining": "modeling_mouse_genemamba.MouseGeneMambaForCausalLM",
    "AutoModelForMaskedLM": "modeling_mouse_genemamba.MouseGeneMambaForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_mouse_genemamba.MouseGeneMambaForSequenceClassification",
    "AutoModelForPerturbationPrediction": "modeling_mouse_genemamba.MouseGeneMambaForPerturbationPrediction",
}


_POOLINGS = ("mean", "last")
_BACKENDS = ("auto", "torch", "cuda")


# Copied from hf_scfm.modeling.configuration_utils.PresetMixin
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


@strict(accept_kwargs=True)
class MouseGeneMambaConfig(PresetMixin, PreTrainedConfig):
    r"""Configuration of :class:`MouseGeneMambaModel` and its heads.

    Mouse-GeneMamba (Japanese seed paper 000) replaces Mouse-Geneformer's BERT encoder with a stack of
    unidirectional Mamba-1 (selective state space) blocks and pretrains it by next-gene prediction on
    Geneformer-style rank-ordered cell sentences (``GeneTokenizer.from_species("mouse", encoding="rank")``:
    ``<bos>``, genes in descending order of normalised expression / gene median, ``<eos>``).

    Defaults are the ``"mouse-geneformer"`` preset (see :attr:`PRESETS`).

    Args:
        vocab_size: rows of the gene embedding (and of the LM head). Default: the mouse vocabulary
            (6 special tokens + 78,317 GENCODE M37 genes = 78,323).
        hidden_size: model width ``d``.
        num_hidden_layers: number of Mamba blocks.
        state_size: SSM state size ``N`` per channel (Mamba's ``d_state``).
        conv_kernel: width of the depthwise causal convolution (Mamba's ``d_conv``).
        expand: inner width factor: ``intermediate_size = expand * hidden_size``.
        time_step_rank: rank of the Δ projection; ``"auto"`` means ``ceil(hidden_size / 16)`` (Mamba's default).
        time_step_min, time_step_max: Δ is initialised log-uniformly in ``[time_step_min, time_step_max]``
            through the bias of ``dt_proj`` (so that ``softplus(bias)`` lies in that range).
        time_step_floor: lower clamp of the initial Δ.
        time_step_scale: scale of the uniform init of ``dt_proj.weight`` (``± scale * rank**-0.5``).
        use_bias: bias in ``in_proj`` / ``out_proj``.
        use_conv_bias: bias in the depthwise convolution.
        layer_norm_epsilon: epsilon of every RMSNorm.
        initializer_range: std of the normal init of embeddings and linear maps.
        rescale_prenorm_residual: divide the init std of each block's ``out_proj`` by ``sqrt(num_hidden_layers)``
            (GPT-2 / Mamba scheme for pre-norm residual stacks).
        use_expression: add the expression-value embedding to the gene embedding. ``False`` is the paper's
            "without expression" ablation: ``values`` are then ignored entirely and the model is a plain gene LM.
        pooling: how the cell embedding is read from the last hidden states: ``"mean"`` over real tokens
            (``attention_mask == 1``; ``<bos>``/``<eos>`` included) or ``"last"`` (the last real token, which for
            a causal model is the only position that has read the whole sentence).
        generated_value: expression value given to positions produced by :meth:`generate` when
            ``use_expression=True`` (the model predicts genes, not values). Default ``0.0`` = the value the
            tokenizer gives special tokens: in a rank sentence every gene is expressed (value > 0), so 0 reads as
            "no measured value".
        classifier_dropout: dropout inside the sequence-classification head.
        perturbation_value_scale: :class:`MouseGeneMambaForPerturbationPrediction` divides its head's output by it
            (``1 / ceil(max log1p value)`` of the data puts the targets on about ``[0, 1]`` in the head's units;
            ``hf_scfm.tasks.perturbation`` sets it from the data).
        ssm_backend: ``"auto"`` | ``"torch"`` | ``"cuda"``, passed as ``backend=`` to the selective-scan and
            causal-conv ops beside the modeling file (``selective_scan.py``, ``conv.py``).
        vocab_checksum: checksum of the tokenizer vocabulary the model was built for (``tokenizer.vocab_checksum``);
            :func:`hf_scfm.modeling.configuration_utils.check_tokenizer_matches` compares it.
        max_input_length: sentence length (tokens, specials included) the model is meant for. Informational:
            Mamba has no position table, so longer inputs run; the tokenizer's ``max_length`` is what cuts.
        pad_token_id, bos_token_id, eos_token_id, mask_token_id: special-token ids (fixed by
            :mod:`hf_scfm.tokenization.special_tokens`).
        tie_word_embeddings: share the LM head weight with the gene embedding (causal and masked LM heads).
    """

    model_type = "mouse_genemamba"

    #: Named presets for :meth:`from_preset`.
    #: - ``tiny``: for CPU tests and demos.
    #: - ``mouse-geneformer``: sized like Mouse-Geneformer. The paper (seed 000, section 2) builds Mouse-Geneformer
    #:   on Geneformer's architecture with 2,048-gene input sentences (Mouse-Genecorpus-20M keeps each cell's top
    #:   2,048 genes) and swaps its Transformer encoder for Mamba blocks (section 3). Geneformer (Theodoris et al.,
    #:   Nature 2023) uses 6 layers of width 256. We keep depth 6 and width 256, with Mamba's standard inner
    #:   settings (expand 2, state 16, conv 4, Δ rank 16): about 0.43 M parameters per block versus about 0.52 M per
    #:   Geneformer layer (4·256² attention + 2·256·512 feed-forward), i.e. a like-for-like backbone.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            hidden_size=64,
            num_hidden_layers=2,
            state_size=8,
            conv_kernel=4,
            expand=2,
            max_input_length=128,
        ),
        "mouse-geneformer": dict(
            hidden_size=256,
            num_hidden_layers=6,
            state_size=16,
            conv_kernel=4,
            expand=2,
            max_input_length=2048,
        ),
    }

    vocab_size: int = MOUSE_VOCAB_SIZE
    hidden_size: int = 256
    num_hidden_layers: int = 6
    state_size: int = 16
    conv_kernel: int = 4
    expand: int = 2
    time_step_rank: int | str = "auto"
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_scale: float = 1.0
    use_bias: bool = False
    use_conv_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    use_expression: bool = True
    pooling: str = "mean"
    generated_value: float = SPECIAL_VALUE
    classifier_dropout: float = 0.1
    perturbation_value_scale: float = 1.0
    ssm_backend: str = "auto"
    vocab_checksum: str | None = None
    max_input_length: int = 2048
    pad_token_id: int | None = PAD_TOKEN_ID
    bos_token_id: int | None = BOS_TOKEN_ID
    eos_token_id: int | list[int] | None = EOS_TOKEN_ID
    mask_token_id: int | None = MASK_TOKEN_ID
    cls_token_id: int | None = CLS_TOKEN_ID
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        elif isinstance(self.time_step_rank, str):
            raise ValueError(
                f"time_step_rank must be a positive int or 'auto', got {self.time_step_rank!r}."
            )
        if self.pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {self.pooling!r}.")
        if self.ssm_backend not in _BACKENDS:
            raise ValueError(f"ssm_backend must be one of {_BACKENDS}, got {self.ssm_backend!r}.")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "state_size", "conv_kernel", "expand"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.time_step_rank < 1:
            raise ValueError(f"time_step_rank must be >= 1, got {self.time_step_rank}.")
        if not 0 < self.time_step_min <= self.time_step_max:
            raise ValueError(
                f"Need 0 < time_step_min <= time_step_max, got {self.time_step_min} and {self.time_step_max}."
            )
        if not self.perturbation_value_scale > 0:
            raise ValueError(f"perturbation_value_scale must be positive, got {self.perturbation_value_scale}.")
        super().__post_init__(**kwargs)
        self.auto_map = {**MOUSE_GENEMAMBA_AUTO_MAP, **(getattr(self, "auto_map", None) or {})}

    @property
    def intermediate_size(self) -> int:
        """Inner width of each Mamba block (``expand * hidden_size``)."""
        return self.expand * self.hidden_size


# Remote code: ``save_pretrained`` copies this file (and the files it imports) next to ``config.json``; see
# MOUSE_GENEMAMBA_AUTO_MAP. (``register_for_auto_class()`` sets the same attribute, but imports transformers' Auto
# modules to validate the name.)
MouseGeneMambaConfig._auto_class = "AutoConfig"

__all__ = ["MOUSE_GENEMAMBA_AUTO_MAP", "MouseGeneMambaConfig"]
