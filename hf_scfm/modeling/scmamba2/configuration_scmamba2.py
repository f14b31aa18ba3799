"""Configuration of SC-MAMBA2 (seed papers 001/002): a bidirectional Mamba-2 (SSD) encoder over binned
whole-transcriptome cell sequences, pretrained by masked-expression regression."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .special_tokens import (
    BOS_TOKEN_ID,
    CLS_TOKEN_ID,
    EOS_TOKEN_ID,
    HUMAN_VOCAB_SIZE,
    MASK_TOKEN_ID,
    MASK_VALUE,
    PAD_TOKEN_ID,
    SPECIAL_TOKENS,
)

#: The paper's vocabulary: 60,530 CELLxGENE genes (seed 001/002). Our presets add our 6 special tokens.
PAPER_NUM_GENES = 60_530
PAPER_VOCAB_SIZE = PAPER_NUM_GENES + len(SPECIAL_TOKENS)

_BACKENDS = ("auto", "torch", "cuda")
_POOLINGS = ("cls", "mean")
_ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


def _paper_scale(hidden_size: int, num_hidden_layers: int) -> dict[str, Any]:
    return dict(
        vocab_size=PAPER_VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        expand=2,
        head_dim=64,
        state_size=128,
        n_groups=1,
        conv_kernel=4,
        chunk_size=256,
        n_bins=51,
        max_input_length=PAPER_NUM_GENES + 1,
    )


#: The family's Auto classes, as ``config.json``'s ``auto_map`` holds them (``"<file>.<Class>"``): every
#: ``save_pretrained`` writes this map (so the checkpoint loads with ``trust_remote_code=True`` without hf_scfm), and
#: ``import hf_scfm`` registers it with transformers' Auto classes (lazily). ``AutoModelForMaskedExpression`` and
#: ``AutoModelForPerturbationPrediction`` are hf_scfm's own Auto classes (``hf_scfm.AutoModelFor...``).
SCMAMBA2_AUTO_MAP = {
    "AutoConfig": "configuration_scmamba2.ScMamba2Config",
    "AutoModel": "modeling_scmamba2.ScMamba2Model",
    "AutoModelForPreTraining": "modeling_scmamba2.ScMamba2ForMaskedExpression",
    "AutoModelForMaskedExpression": "modeling_scmamba2.ScMamba2ForMaskedExpression",
    "AutoModelForSequenceClassification": "modeling_scmamba2.ScMamba2ForSequenceClassification",
    "AutoModelForPerturbationPrediction": "modeling_scmamba2.ScMamba2ForPerturbationPrediction",
}

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
class ScMamba2Config(PresetMixin, PreTrainedConfig):
    r"""Configuration of :class:`ScMamba2Model` and its heads.

    SC-MAMBA2 embeds each token as gene embedding + a continuous encoding of its (binned) expression value,
    runs a stack of pre-norm *BiMamba-2* layers (one Mamba-2 mixer with shared weights applied to the
    sequence and to its per-row reversal of the real tokens, outputs summed) and reads the cell embedding
    at ``<cls>`` (position 0). Input comes from ``GeneTokenizer.from_species(..., encoding="binned")``.

    Defaults are the ``"tiny"`` preset's shape family with the shipped human vocabulary; see :attr:`PRESETS`.

    Args:
        vocab_size: rows of the gene embedding. Default: ``len(GeneTokenizer.from_species("human"))`` =
            78,900 (6 specials + 78,894 GENCODE v48 genes).
        hidden_size: model width ``d``.
        num_hidden_layers: number of BiMamba-2 layers.
        expand: inner width factor of the mixer: ``intermediate_size = expand * hidden_size``.
        head_dim: channels per SSD head ``P``; ``num_heads = intermediate_size // head_dim``.
        state_size: SSM state size ``N`` (Mamba-2's ``d_state``).
        n_groups: number of B/C groups ``G`` shared by ``num_heads / G`` heads each (Mamba-2's ``ngroups``).
        conv_kernel: width of the depthwise causal convolution over (x, B, C).
        chunk_size: chunk length of the SSD chunked scan (passed to ``ssd_scan``, ``ssd.py``).
        time_step_min, time_step_max, time_step_floor: Δ is initialised log-uniformly in
            ``[time_step_min, time_step_max]`` (clamped below at the floor) through ``dt_bias``, so
            ``softplus(dt_bias)`` starts in that range.
        A_init_range: the per-head decay rate ``-A = exp(A_log)`` starts uniform in this range (Mamba-2 default).
        use_bias: bias in ``in_proj`` / ``out_proj``.
        use_conv_bias: bias in the depthwise convolution.
        layer_norm_epsilon: epsilon of every RMSNorm / LayerNorm.
        initializer_range: std of the normal init of embeddings and linear maps.
        rescale_prenorm_residual: divide the init of each mixer's ``out_proj`` by ``sqrt(num_hidden_layers)``
            (GPT-2 / Mamba scheme for pre-norm residual stacks).
        n_bins: number of expression bins of the tokenizer's ``binned`` encoding (bins ``0 .. n_bins-1``);
            masked-expression targets lie in that range. Informational for the model (the expression encoder
            is continuous, so it accepts any real value, e.g. log1p values for perturbation fine-tuning).
        value_scale: factor applied to ``values`` before the expression encoder, and whose inverse scales the
            regression heads' outputs (the network works in normalised units at both ends). ``None``
            (default) means ``1 / (n_bins - 1)``, which maps bins onto ``[0, 1]``: the encoder's first layer
            starts with its ReLU thresholds spread over about that range, so every bin gets a distinct
            embedding at init (unscaled bins up to 50 would saturate it: high bins would all look alike),
            and a head output of 1 means the top bin, so training does not spend its first hundred steps
            growing the output to the bins' scale. For perturbation fine-tuning on log1p values (about 0..6)
            pass ``value_scale=1/6`` (``from_pretrained(..., value_scale=1/6)``).
        mask_value: value in ``values`` that marks a masked expression (``MASK_VALUE`` = -1.0); the model
            swaps in its learned mask embedding there instead of encoding the value.
        expression_activation: activation inside the expression encoder and the regression heads.
        classifier_dropout: dropout inside the sequence-classification head.
        pooling: how the cell embedding is read from the last hidden states: ``"cls"`` (the paper's: the
            ``<cls>`` position) or ``"mean"`` over real tokens (``attention_mask == 1``, ``<cls>`` included).
            Masked-expression pretraining never reads ``<cls>``, so after it the ``<cls>`` state carries little
            cell identity; ``"mean"`` fine-tunes to better annotation from such a checkpoint (README,
            Performance).
        ssm_backend: ``"auto"`` | ``"torch"`` | ``"cuda"``, passed as ``backend=`` to ``ssd_scan`` and
            ``causal_conv1d`` (``ssd.py``, ``conv.py`` beside the modeling file).
        vocab_checksum: checksum of the tokenizer vocabulary the model was built for
            (``tokenizer.vocab_checksum``); :func:`~hf_scfm.modeling.configuration_utils.check_tokenizer_matches`
            compares it.
        max_input_length: sequence length (tokens incl. ``<cls>``) the model is meant for. Informational:
            Mamba-2 has no position table, so any length runs; the tokenizer's ``max_length`` is what cuts.
        pad_token_id, cls_token_id, mask_token_id, bos_token_id, eos_token_id: special-token ids (fixed by
            :mod:`hf_scfm.tokenization.special_tokens`).
    """

    model_type = "scmamba2"

    #: Named presets for :meth:`from_preset`.
    #:
    #: - ``tiny``: for CPU tests and demos (d 64, 2 layers, 4 heads of 32, state 16, chunk 32), human vocabulary.
    #:   On CPU the chunked scan's cost is dominated by its ``heads x chunk^2`` intra-chunk part; 4 heads of 32
    #:   with chunk 32 run the 60,531-token whole-transcriptome forward about 1.6x faster than 8 heads of 16
    #:   with chunk 64 (same parameter count).
    #: - ``paper-30m`` / ``paper-150m`` / ``paper-625m``: the three sizes the SC-MAMBA2 preprints quote, over
    #:   the paper's 60,530-gene CELLxGENE vocabulary (+ our 6 specials = 60,536 rows). The papers give *no*
    #:   width or depth, only totals: "30 million parameters to represent 60,531 genes" (seed 002, Results),
    #:   "over 150 million parameters" (seed 002, Abstract and Introduction) and "over 625 million
    #:   parameters" (seed 001, a later abstract). We take Mamba-2's own recipe (expand 2, head_dim 64,
    #:   state 128, 1 group, conv 4, chunk 256; widths of the Mamba-2 family) and choose depth so the
    #:   total lands on the quoted figure (``ScMamba2ForMaskedExpression``, counted by ``num_parameters()``):
    #:   ``paper-30m`` d 256 x 31 layers = 30.06 M; ``paper-150m`` d 768 x 28 layers = 153.1 M;
    #:   ``paper-625m`` d 1536 x 36 layers = 624.9 M. Depth is the only free choice: one layer less or
    #:   more moves the totals by 0.47 M, 3.8 M and 14.6 M. The embedding alone is 60,536 x d
    #:   (15.5 M, 46.5 M, 93.0 M), which is why the 30 M model must be narrow.
    #: - ``paper``: alias of ``paper-150m``, the size the main text of seed 002 names.
    #:
    #: With our shipped human vocabulary (78,900 tokens) pass ``vocab_size=len(tokenizer)``; the embedding
    #: then grows by ``18,364 * hidden_size`` parameters.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            vocab_size=HUMAN_VOCAB_SIZE,
            hidden_size=64,
            num_hidden_layers=2,
            expand=2,
            head_dim=32,
            state_size=16,
            n_groups=1,
            conv_kernel=4,
            chunk_size=32,
            n_bins=51,
            max_input_length=2048,
        ),
        "paper-30m": _paper_scale(256, 31),
        "paper-150m": _paper_scale(768, 28),
        "paper-625m": _paper_scale(1536, 36),
        "paper": _paper_scale(768, 28),
    }

    vocab_size: int = HUMAN_VOCAB_SIZE
    hidden_size: int = 64
    num_hidden_layers: int = 2
    expand: int = 2
    head_dim: int = 32
    state_size: int = 16
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 32
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    A_init_range: tuple[float, float] | list[float] = (1.0, 16.0)
    use_bias: bool = False
    use_conv_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    n_bins: int = 51
    value_scale: float | None = None
    mask_value: float = MASK_VALUE
    expression_activation: str = "relu"
    classifier_dropout: float = 0.1
    pooling: str = "cls"
    ssm_backend: str = "auto"
    vocab_checksum: str | None = None
    max_input_length: int = 2048
    pad_token_id: int | None = PAD_TOKEN_ID
    cls_token_id: int | None = CLS_TOKEN_ID
    mask_token_id: int | None = MASK_TOKEN_ID
    bos_token_id: int | None = BOS_TOKEN_ID
    eos_token_id: int | list[int] | None = EOS_TOKEN_ID
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        for name in (
            "vocab_size", "hidden_size", "num_hidden_layers", "expand", "head_dim", "state_size",
            "n_groups", "conv_kernel", "chunk_size", "n_bins",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ScMamba2Config.{name} must be >= 1, got {getattr(self, name)}.")
        if self.intermediate_size % self.head_dim:
            raise ValueError(
                f"intermediate_size = expand * hidden_size = {self.intermediate_size} is not divisible by "
                f"head_dim = {self.head_dim}; choose head_dim dividing {self.intermediate_size}."
            )
        if self.num_heads % self.n_groups:
            raise ValueError(
                f"num_heads = {self.num_heads} is not divisible by n_groups = {self.n_groups}; every B/C group "
                "must serve the same number of heads. Choose n_groups dividing num_heads."
            )
        if self.ssm_backend not in _BACKENDS:
            raise ValueError(f"ssm_backend must be one of {_BACKENDS}, got {self.ssm_backend!r}.")
        if self.pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {self.pooling!r}.")
        if self.expression_activation not in _ACTIVATIONS:
            raise ValueError(
                f"expression_activation must be one of {_ACTIVATIONS}, got {self.expression_activation!r}."
            )
        if not 0 < self.time_step_min <= self.time_step_max:
            raise ValueError(
                f"Need 0 < time_step_min <= time_step_max, got {self.time_step_min} and {self.time_step_max}."
            )
        lo, hi = self.A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {tuple(self.A_init_range)}.")
        self.A_init_range = [float(lo), float(hi)]
        if self.value_scale is not None and not self.value_scale > 0:
            raise ValueError(f"value_scale must be positive (or None for 1/(n_bins-1)), got {self.value_scale}.")
        if self.mask_value >= 0:
            raise ValueError(
                f"mask_value must be negative (expression values are >= 0, so a non-negative marker would "
                f"collide with real values), got {self.mask_value}."
            )
        super().__post_init__(**kwargs)
        self.auto_map = {**SCMAMBA2_AUTO_MAP, **(getattr(self, "auto_map", None) or {})}

    @property
    def intermediate_size(self) -> int:
        """Inner width of each mixer (``expand * hidden_size``)."""
        return self.expand * self.hidden_size

    @property
    def expression_scale(self) -> float:
        """The factor actually applied to ``values`` (``value_scale`` or ``1 / (n_bins - 1)``)."""
        if self.value_scale is not None:
            return float(self.value_scale)
        return 1.0 / max(self.n_bins - 1, 1)

    @property
    def num_heads(self) -> int:
        """Number of SSD heads (``intermediate_size // head_dim``)."""
        return self.intermediate_size // self.head_dim


# Remote code: ``save_pretrained`` copies this file (and the files it imports) next to ``config.json``; see
# SCMAMBA2_AUTO_MAP and the note at the end of configuration_mouse_genemamba.py.
ScMamba2Config._auto_class = "AutoConfig"

__all__ = ["SCMAMBA2_AUTO_MAP", "ScMamba2Config", "PAPER_VOCAB_SIZE", "PAPER_NUM_GENES"]
