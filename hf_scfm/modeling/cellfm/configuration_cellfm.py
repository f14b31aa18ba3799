"""Configuration of CellFM (seed paper 003): a value-projection foundation model on an ERetNet backbone
(gated linear-attention "retention" without decay, SGLU feed-forward, DeepNorm post-norm residuals)."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .special_tokens import CLS_TOKEN_ID, HUMAN_VOCAB_SIZE, MASK_TOKEN_ID, MASK_VALUE, PAD_TOKEN_ID


#: Vocabulary of the paper's presets: CellFM's gene-ID embedding is "24,079 x 1,536" (seed 003, Methods,
#: "Gene ID embedding"), plus our 6 special tokens. Used only to size ``cellfm-80m`` / ``cellfm-800m`` like the
#: paper; to run them on ``GeneTokenizer.from_species("human")`` pass ``vocab_size=HUMAN_VOCAB_SIZE`` (that adds
#: 54,820 x d embedding parameters, about 84 M at d = 1,536).
CELLFM_PAPER_VOCAB_SIZE = 24_079 + 6

_BACKENDS = ("auto", "torch", "cuda")
_RETENTION_FORMS = ("linear", "quadratic")


#: The family's Auto classes, as ``config.json``'s ``auto_map`` holds them (``"<file>.<Class>"``): every
#: ``save_pretrained`` writes this map (so the checkpoint loads with ``trust_remote_code=True`` without hf_scfm), and
#: ``import hf_scfm`` registers it with transformers' Auto classes (lazily). ``AutoModelForMaskedExpression`` and
#: ``AutoModelForPerturbationPrediction`` are hf_scfm's own Auto classes (``hf_scfm.AutoModelFor...``).
CELLFM_AUTO_MAP = {
    "AutoConfig": "configuration_cellfm.CellFMConfig",
    "AutoModel": "modeling_cellfm.CellFMModel",
    "AutoModelForPreTraining": "modeling_cellfm.CellFMForMaskedRegression",
    "AutoModelForMaskedExpression": "modeling_cellfm.CellFMForMaskedRegression",
    "AutoModelForSequenceClassification": "modeling_cellfm.CellFMForSequenceClassification",
    "AutoModelForPerturbationPrediction": "modeling_cellfm.CellFMForPerturbationPrediction",
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
class CellFMConfig(PresetMixin, PreTrainedConfig):
    r"""Configuration of :class:`CellFMModel` and its heads.

    CellFM (seed paper 003) embeds each expressed gene as *gene-ID embedding + value embedding* (no position
    embedding: the genes form a set), prepends a learned ``<cls>`` vector, and runs ``num_hidden_layers``
    ERetNet layers. It is pretrained by masked regression: 20 % of the real genes have their value replaced by
    :data:`MASK_VALUE` and the model regresses them back (MSE), plus a cell-level term that predicts the same
    masked values from the ``<cls>`` embedding alone. Inputs come from
    ``GeneTokenizer.from_species("human", encoding="continuous")`` (``<cls>`` first, values ``log1p(x_norm)``).

    Defaults are the ``cellfm-80m`` architecture with the human vocabulary of this package.

    Args:
        vocab_size: rows of the gene-ID embedding (special tokens included). Default: the human vocabulary
            (6 specials + 78,894 GENCODE genes = 78,900).
        hidden_size: model width ``d`` (1,536 in the paper).
        num_hidden_layers: number of ERetNet layers ``N`` (2 for CellFM-80M, 40 for CellFM-800M).
        num_attention_heads: heads ``h`` of the gated multi-head retention (48 in the paper); must divide ``d``.
        intermediate_size: inner width of the SGLU feed-forward. ``None`` means ``hidden_size``: with it the
            paper presets land on 80 M and 800 M parameters (a 2·d width would give about 1.04 B for 40 layers).
        value_embedding_size: width ``b`` of the value embedding's softmax (256 in the paper).
        value_embedding_negative_slope: slope of the LeakyReLU in the value embedding (PyTorch's default 0.01).
        value_embedding_alpha_init: initial value of the learned residual coefficient ``α`` of the value embedding.
        deepnorm_lambda: residual scale ``λ`` of the DeepNorm post-norm, ``LN(f(x) + λ x)``. ``None`` derives it
            from depth as DeepNet does for encoder-only stacks (Wang et al. 2022, "DeepNet: Scaling Transformers to
            1,000 Layers", Table 1): ``λ = (2N)^{1/4}``.
        deepnorm_beta: gain of the Xavier-normal init of the value, output and SGLU projections (DeepNet's ``β``).
            ``None`` derives ``β = (8N)^{-1/4}`` (same table). The query, key and gate projections use gain 1.
        retention_norm_eps: epsilon of the per-head RMS normalisation of the retention output (applied to the
            output times ``d³``, which undoes the paper's ``/d`` scaling of ``Q``, ``K`` and ``V``).
        layer_norm_eps: epsilon of the DeepNorm LayerNorms.
        initializer_range: std of the normal init of embeddings and head layers.
        mask_ratio: fraction of real genes the masked-regression collator masks (20 % in the paper). Stored here
            so training code reads one place; the model itself masks nothing.
        mask_value: the value that marks a masked gene in ``values`` (:data:`MASK_VALUE`, -1.0). Those genes get the
            learned, zero-initialised mask vector instead of their value embedding.
        cls_loss_weight: weight of the cell-level term in the pretraining loss ``L = L_MSE + w · L_cls`` (1.0 =
            the paper's plain sum).
        regression_head_hidden_size: hidden width of the masked-regression MLP head (``None`` = ``hidden_size``).
        classifier_num_layers: layers of the sequence-classification MLP head on the ``<cls>`` embedding, 1 to 3
            (the paper found 1 to 3 layers perform about the same).
        classifier_hidden_size: hidden width of that head (``None`` = ``hidden_size``).
        classifier_dropout: dropout inside that head.
        perturbation_value_scale: :class:`CellFMForPerturbationPrediction` divides its head's output by it
            (``1 / ceil(max log1p value)`` of the data puts the targets on about ``[0, 1]`` in the head's units;
            ``hf_scfm.tasks.perturbation`` sets it from the data).
        freeze_backbone: for :class:`CellFMForSequenceClassification`: do not train the backbone, only the head
            (the paper's cell-annotation protocol).
        retention_form: ``"linear"`` computes each head as ``Q (Kᵀ V)`` (cost linear in length, the default);
            ``"quadratic"`` as ``(Q Kᵀ) V`` with :func:`~.retention.linear_retention_reference` (``retention.py``) (for checks).
        ssm_backend: ``"auto"`` | ``"torch"`` | ``"cuda"``, passed as ``backend=`` to
            :func:`~.retention.linear_retention`.
        vocab_checksum: checksum of the tokenizer vocabulary the model was built for (``tokenizer.vocab_checksum``);
            :func:`hf_scfm.modeling.configuration_utils.check_tokenizer_matches` compares it.
        max_input_length: genes per cell the model is meant for (2,048 in the paper, ``<cls>`` included here).
            Informational: there is no position table, longer inputs run.
        pad_token_id, cls_token_id, mask_token_id: special-token ids (:mod:`hf_scfm.tokenization.special_tokens`).
        num_special_tokens: ids below this are special tokens; they get no value embedding.
    """

    model_type = "cellfm"

    #: Named presets for :meth:`from_preset`.
    #:
    #: - ``tiny``: CPU tests and demos, human vocabulary.
    #: - ``cellfm-80m`` / ``cellfm-800m``: the paper's models (d = 1,536, 48 heads, b = 256; 2 and 40 layers), with
    #:   the paper's 24,079-gene ID embedding (+ 6 specials) and SGLU width d. Parameter counts
    #:   (:class:`CellFMForMaskedRegression`): 82.3 M and 799.8 M
    #:   (backbone alone: 75.2 M and 792.7 M).
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            vocab_size=HUMAN_VOCAB_SIZE,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            value_embedding_size=32,
            max_input_length=256,
        ),
        "cellfm-80m": dict(
            vocab_size=CELLFM_PAPER_VOCAB_SIZE,
            hidden_size=1536,
            num_hidden_layers=2,
            num_attention_heads=48,
            value_embedding_size=256,
            max_input_length=2049,
        ),
        "cellfm-800m": dict(
            vocab_size=CELLFM_PAPER_VOCAB_SIZE,
            hidden_size=1536,
            num_hidden_layers=40,
            num_attention_heads=48,
            value_embedding_size=256,
            max_input_length=2049,
        ),
    }

    vocab_size: int = HUMAN_VOCAB_SIZE
    hidden_size: int = 1536
    num_hidden_layers: int = 2
    num_attention_heads: int = 48
    intermediate_size: int | None = None
    value_embedding_size: int = 256
    value_embedding_negative_slope: float = 0.01
    value_embedding_alpha_init: float = 1.0
    deepnorm_lambda: float | None = None
    deepnorm_beta: float | None = None
    retention_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    mask_ratio: float = 0.2
    mask_value: float = MASK_VALUE
    cls_loss_weight: float = 1.0
    regression_head_hidden_size: int | None = None
    classifier_num_layers: int = 1
    classifier_hidden_size: int | None = None
    classifier_dropout: float = 0.1
    perturbation_value_scale: float = 1.0
    freeze_backbone: bool = False
    retention_form: str = "linear"
    ssm_backend: str = "auto"
    vocab_checksum: str | None = None
    max_input_length: int = 2049
    pad_token_id: int | None = PAD_TOKEN_ID
    cls_token_id: int | None = CLS_TOKEN_ID
    mask_token_id: int | None = MASK_TOKEN_ID
    num_special_tokens: int = 6

    def __post_init__(self, **kwargs):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "value_embedding_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size ({self.hidden_size}); "
                "pick a head count that is a divisor of the width."
            )
        if self.intermediate_size is None:
            self.intermediate_size = self.hidden_size
        if self.regression_head_hidden_size is None:
            self.regression_head_hidden_size = self.hidden_size
        if self.classifier_hidden_size is None:
            self.classifier_hidden_size = self.hidden_size
        if self.deepnorm_lambda is None:
            self.deepnorm_lambda = (2.0 * self.num_hidden_layers) ** 0.25
        if self.deepnorm_beta is None:
            self.deepnorm_beta = (8.0 * self.num_hidden_layers) ** -0.25
        if self.classifier_num_layers not in (1, 2, 3):
            raise ValueError(
                f"classifier_num_layers must be 1, 2 or 3 (the paper's MLP head), got {self.classifier_num_layers}."
            )
        if not self.perturbation_value_scale > 0:
            raise ValueError(f"perturbation_value_scale must be positive, got {self.perturbation_value_scale}.")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {self.mask_ratio}.")
        if self.retention_form not in _RETENTION_FORMS:
            raise ValueError(f"retention_form must be one of {_RETENTION_FORMS}, got {self.retention_form!r}.")
        if self.ssm_backend not in _BACKENDS:
            raise ValueError(f"ssm_backend must be one of {_BACKENDS}, got {self.ssm_backend!r}.")
        super().__post_init__(**kwargs)
        self.auto_map = {**CELLFM_AUTO_MAP, **(getattr(self, "auto_map", None) or {})}

    @property
    def head_dim(self) -> int:
        """Width of one retention head (``hidden_size // num_attention_heads``)."""
        return self.hidden_size // self.num_attention_heads


# Remote code: ``save_pretrained`` copies this file (and the files it imports) next to ``config.json``; see
# CELLFM_AUTO_MAP and the note at the end of configuration_mouse_genemamba.py.
CellFMConfig._auto_class = "AutoConfig"

__all__ = ["CELLFM_AUTO_MAP", "CellFMConfig", "CELLFM_PAPER_VOCAB_SIZE"]
