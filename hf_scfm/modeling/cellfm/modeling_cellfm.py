"""CellFM (seed paper 003) in PyTorch: value-projection embedding, ERetNet backbone, masked-regression and
sequence-classification heads.

Written from the paper (notes in ``shared/seeds/003``) and ``SPEC.md``; CellFM's own code is not used.

One forward pass, top to bottom:

1. :class:`CellFMEmbeddings`: for each gene token, ``E[gene] + value_embedding(value)`` (the learned mask vector
   instead of the value embedding where ``values == config.mask_value``). Special tokens (``<cls>``) get their
   row of the ID embedding only: **the learned ``<cls>`` vector is row ``cls_token_id`` of the ID embedding**, with
   no value part. No position embedding: genes form a set.
2. ``num_hidden_layers`` × :class:`CellFMLayer` (ERetNet): ``Y = LN(MHA(X) + λX)``, ``X' = LN(SGLU(Y) + λY)``.
3. ``cell_embedding`` = last hidden state of ``<cls>`` (position 0).

Choices where the paper is silent (each explained where it lives):

- the retention output gate is ``SiLU(X Wg)`` and each head's output is RMS-normalised before it, as in RetNet's
  gated retention (:class:`CellFMRetention`); Q, K, V keep the paper's literal ``/d`` scaling;
- DeepNorm ``λ = (2N)^{1/4}`` and init gain ``β = (8N)^{-1/4}`` (DeepNet, encoder-only) by default;
- the cell-level loss term is a bilinear read-out of each masked gene's value from ``<cls>`` and the gene's ID
  embedding (:class:`CellFMCellValueHead`);
- SGLU width = ``d``, which puts the paper presets at 80 M / 800 M parameters.

Auto classes (registered by ``import hf_scfm``; written into ``config.json``'s ``auto_map`` by ``save_pretrained``, so
a checkpoint also loads with ``trust_remote_code=True`` where hf_scfm is not installed): ``AutoConfig``,
``AutoModel`` -> :class:`CellFMModel`, ``AutoModelForPreTraining`` and ``hf_scfm.AutoModelForMaskedExpression`` ->
:class:`CellFMForMaskedRegression` (one value per token, not vocabulary logits, so not ``AutoModelForMaskedLM``),
``AutoModelForSequenceClassification`` -> :class:`CellFMForSequenceClassification`,
``hf_scfm.AutoModelForPerturbationPrediction`` -> :class:`CellFMForPerturbationPrediction` (without hf_scfm:
``get_class_from_dynamic_module("modeling_cellfm.CellFMForPerturbationPrediction", repo)``). The mapping is
:data:`~.configuration_cellfm.CELLFM_AUTO_MAP`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_cellfm import CELLFM_AUTO_MAP, CellFMConfig
from .retention import linear_retention, linear_retention_reference
from .special_tokens import IGNORE_INDEX, SPECIAL_TOKENS


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class CellFMModelOutput(ModelOutput):
    """Output of :class:`CellFMModel`.

    Args:
        last_hidden_state: ``[B, L, d]`` states after the last layer (padding rows carry no meaning).
        cell_embedding: ``[B, d]`` the last hidden state of ``<cls>`` (position 0).
        hidden_states: with ``output_hidden_states=True``, the embeddings and each layer's output.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CellFMMaskedRegressionOutput(ModelOutput):
    """Output of :class:`CellFMForMaskedRegression`.

    Args:
        loss: ``mse_loss + config.cls_loss_weight * cls_loss`` (when ``labels`` are given).
        predictions: ``[B, L]`` value predicted by the MLP head at every position (read it where masked).
        mse_loss: the gene-level term: MSE of ``predictions`` on positions with ``labels != -100``.
        cls_loss: the cell-level term: MSE of ``cls_predictions`` on the same positions.
        cls_predictions: ``[B, L]`` value predicted from the ``<cls>`` embedding and each gene's ID embedding.
        hidden_states: as :class:`CellFMModelOutput`.
        cell_embedding: ``[B, d]``.
    """

    loss: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    mse_loss: torch.FloatTensor | None = None
    cls_loss: torch.FloatTensor | None = None
    cls_predictions: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    cell_embedding: torch.FloatTensor | None = None


@dataclass
class CellFMSequenceClassifierOutput(ModelOutput):
    """Output of :class:`CellFMForSequenceClassification` (``logits`` ``[B, num_labels]``)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    cell_embedding: torch.FloatTensor | None = None


# Copied from hf_scfm.modeling.mouse_genemamba.modeling_mouse_genemamba.MouseGeneMambaPerturbationOutput with MouseGeneMamba->CellFM
@dataclass
class CellFMPerturbationOutput(ModelOutput):
    """Output of :class:`CellFMForPerturbationPrediction`.

    Args:
        loss: MSE over real gene positions where ``labels != -100`` (with labels).
        predictions: ``[B, L]`` predicted perturbed ``log1p`` value per position; 0 at special tokens and padding.
        hidden_states: with ``output_hidden_states=True``, as the backbone returns them.
        cell_embedding: ``[B, d]`` the backbone's cell embedding.
        last_hidden_state: ``[B, L, d]`` the backbone's last hidden states.
    """

    loss: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    cell_embedding: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Pieces every family shares (originals in modeling_mouse_genemamba.py; utils/check_copies.py)
# ----------------------------------------------------------------------------------------------------------------


# Copied from hf_scfm.modeling.mouse_genemamba.modeling_mouse_genemamba.sequence_classification_loss
def sequence_classification_loss(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of a sequence-classification head, by transformers' ``problem_type`` convention: ``regression`` (MSE)
    when ``num_labels == 1``, ``single_label_classification`` (cross-entropy) for integer labels ``[B]``,
    ``multi_label_classification`` (BCE with logits) for float multi-hot labels ``[B, num_labels]``. An unset
    ``config.problem_type`` is inferred and stored. Computed in at least float32."""
    labels = labels.to(logits.device)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).reshape(logits.shape[0]))
    if config.problem_type == "single_label_classification":
        if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
            raise ValueError(f"labels must be [batch] class ids, got shape {tuple(labels.shape)}.")
        if labels.numel() and (labels.min() < 0 or labels.max() >= config.num_labels):
            raise ValueError(
                f"labels hold classes in [{int(labels.min())}, {int(labels.max())}] but num_labels is "
                f"{config.num_labels}; build the config with num_labels (or id2label) covering every class."
            )
        return F.cross_entropy(logits, labels.long())
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


# Copied from hf_scfm.modeling.mouse_genemamba.modeling_mouse_genemamba._masked_mse
def _masked_mse(predictions: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """MSE over the ``keep`` positions, in at least float32; a zero that still carries the graph when nothing is
    kept (no NaN)."""
    if not bool(keep.any()):
        return predictions.sum() * 0.0
    dtype = torch.promote_types(predictions.dtype, torch.float32)
    return F.mse_loss(predictions[keep].to(dtype), labels[keep].to(dtype))


# Copied from hf_scfm.modeling.mouse_genemamba.modeling_mouse_genemamba._perturbation_flags
def _perturbation_flags(
    perturbation_flags: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.LongTensor:
    """Checked 0/1 flags ``[B, L]`` (int64, zero at padding); all zeros when ``perturbation_flags`` is ``None``."""
    if input_ids is None:
        raise ValueError("A perturbation model needs input_ids (the perturbation sentences' token ids).")
    if perturbation_flags is None:
        return torch.zeros_like(input_ids, dtype=torch.long)
    if perturbation_flags.shape != input_ids.shape:
        raise ValueError(
            f"perturbation_flags has shape {tuple(perturbation_flags.shape)}, expected {tuple(input_ids.shape)} "
            "(one 0/1 flag per token)."
        )
    flags = perturbation_flags.long()
    if attention_mask is not None:
        flags = flags.masked_fill(attention_mask == 0, 0)
    if flags.numel() and (int(flags.min()) < 0 or int(flags.max()) > 1):
        raise ValueError(
            "perturbation_flags must be 0 (not perturbed) or 1 (perturbed) at every real token; "
            f"got values in [{int(flags.min())}, {int(flags.max())}]."
        )
    return flags


# ----------------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------------


class CellFMValueEmbedding(nn.Module):
    """The paper's scalar-to-vector value projection (SPEC.md, "CellFM")::

        X1 = LeakyReLU(x W0)          W0 ∈ R^{1×b}   (input_proj)
        X2 = X1 W1 + α X1             W1 ∈ R^{b×b}   (mix_proj), α a learned scalar
        X3 = softmax(X2) W2           W2 ∈ R^{b×d}   (output_proj), softmax over the b axis

    No biases, as in the formulas. The softmax makes X3 a convex mix of ``b`` learned vectors (a soft binning of
    the value). ``mask_embedding`` is the learned, zero-initialised vector ``X_M`` used for masked genes.
    """

    def __init__(self, config: CellFMConfig):
        super().__init__()
        b = config.value_embedding_size
        self.negative_slope = config.value_embedding_negative_slope
        self.input_proj = nn.Linear(1, b, bias=False)
        self.mix_proj = nn.Linear(b, b, bias=False)
        self.alpha = nn.Parameter(torch.full((), float(config.value_embedding_alpha_init)))
        self.output_proj = nn.Linear(b, config.hidden_size, bias=False)
        self.mask_embedding = nn.Parameter(torch.zeros(config.hidden_size))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x1 = F.leaky_relu(self.input_proj(values.unsqueeze(-1)), self.negative_slope)
        x2 = self.mix_proj(x1) + self.alpha * x1
        return self.output_proj(torch.softmax(x2, dim=-1))


class CellFMEmbeddings(nn.Module):
    """Gene-ID embedding + value embedding (mask vector at masked genes); ``<cls>`` = its ID row only."""

    def __init__(self, config: CellFMConfig):
        super().__init__()
        self.config = config
        self.gene_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.value_embedding = CellFMValueEmbedding(config)

    def forward(self, input_ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        gene = self.gene_embeddings(input_ids)
        is_masked = values == self.config.mask_value
        # Masked values are swapped for the mask vector, so feed a harmless 0 through the value MLP there.
        value = self.value_embedding(values.masked_fill(is_masked, 0.0).to(gene.dtype))
        value = torch.where(is_masked.unsqueeze(-1), self.value_embedding.mask_embedding.to(gene.dtype), value)
        is_gene = (input_ids >= self.config.num_special_tokens).unsqueeze(-1)
        return gene + value * is_gene.to(gene.dtype)


# ----------------------------------------------------------------------------------------------------------------
# ERetNet layer
# ----------------------------------------------------------------------------------------------------------------


def _mark_deepnorm_init(gain_one, gain_beta) -> None:
    """Tag linear maps with the Xavier gain :meth:`CellFMPreTrainedModel._init_weights` gives them (1 or DeepNet's
    ``β``). A tag on the ``nn.Linear`` itself, because transformers initialises module by module and skips
    containers without parameters of their own."""
    for proj in gain_one:
        proj._cellfm_xavier_gain = "one"
    for proj in gain_beta:
        proj._cellfm_xavier_gain = "beta"


class CellFMRetention(nn.Module):
    """Gated multi-head retention without decay (non-causal linear attention), as CellFM's "Gated MHA".

    Per head (``Dh = d / h``)::

        Q = ReLU(X Wq) / d,  K = ReLU(X Wk) / d,  V = X Wv / d        (the paper's half-precision scaling)
        O = Q (Kᵀ V)                                                  (Kᵀ V first: O(L · d²/h), linear in L)
        out = (SiLU(X Wg) ⊙ RMSNorm_head(O)) Wo

    Padding is masked out of ``K`` and ``V`` (inside :func:`~.retention.linear_retention`), so padded
    positions never reach real ones. The output gate and the per-head normalisation follow RetNet's gated
    multi-scale retention (Sun et al. 2023, which CellFM modifies): RetNet normalises each head with GroupNorm
    because retention has no softmax denominator. We use a per-head RMS normalisation (GroupNorm without the mean
    subtraction) with a learned per-channel gain. It is invariant to the positive scale of ``O``, which is what
    makes the paper's ``/d`` scaling of Q, K, V harmless; it also makes a head's output independent of the number
    of genes (``Kᵀ V`` is a sum over genes). It is computed in float32 on ``d³ · O`` (``O`` carries the constant
    ``d^{-3}`` of the scaling), so ``config.retention_norm_eps`` has its usual meaning.
    """

    def __init__(self, config: CellFMConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = 1.0 / d
        self.unscale = float(d) ** 3
        self.norm_eps = config.retention_norm_eps
        self.retention_form = config.retention_form
        self.backend = config.ssm_backend
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.g_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.head_norm_weight = nn.Parameter(torch.ones(d))
        _mark_deepnorm_init(gain_one=(self.q_proj, self.k_proj, self.g_proj), gain_beta=(self.v_proj, self.o_proj))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, d = hidden_states.shape
        q = self._heads(F.relu(self.q_proj(hidden_states)) * self.scale)
        k = self._heads(F.relu(self.k_proj(hidden_states)) * self.scale)
        v = self._heads(self.v_proj(hidden_states) * self.scale)
        if self.retention_form == "linear":
            out = linear_retention(q, k, v, attention_mask=attention_mask, backend=self.backend)
        else:
            out = linear_retention_reference(q, k, v, attention_mask=attention_mask)
        # [B, H, L, Dh] -> per-head RMS normalisation in float32 (or float64) -> [B, L, d]
        # Undo the constant 1/d³ first so that the epsilon has its usual meaning (the norm is scale-invariant).
        out32 = out.to(torch.promote_types(out.dtype, torch.float32)) * self.unscale
        out32 = out32 * torch.rsqrt(out32.pow(2).mean(dim=-1, keepdim=True) + self.norm_eps)
        out = out32.to(hidden_states.dtype).transpose(1, 2).reshape(batch, length, d) * self.head_norm_weight
        return self.o_proj(F.silu(self.g_proj(hidden_states)) * out)


class CellFMSGLU(nn.Module):
    """Simple gated linear unit, ``SGLU(X) = (X Wu ⊙ X Wg) Wd``: a GLU without activation (the gate's product is
    the only non-linearity), as in the paper. Distinct names (``up_proj``, ``gate_proj``, ``down_proj``) keep LoRA
    targets unambiguous next to the attention's ``v_proj`` / ``g_proj``."""

    def __init__(self, config: CellFMConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        _mark_deepnorm_init(gain_one=(), gain_beta=(self.up_proj, self.gate_proj, self.down_proj))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.up_proj(hidden_states) * self.gate_proj(hidden_states))


class CellFMLayer(GradientCheckpointingLayer):
    """One ERetNet layer with DeepNorm post-norm residuals (Wang et al. 2022, DeepNet)::

        Y  = LN(MHA(X) + λ X)
        X' = LN(SGLU(Y) + λ Y)

    ``λ = config.deepnorm_lambda`` (default ``(2N)^{1/4}``); the matching ``β``-scaled init of the value, output
    and SGLU projections lives in :meth:`CellFMPreTrainedModel._init_weights`.
    """

    def __init__(self, config: CellFMConfig):
        super().__init__()
        self.deepnorm_lambda = config.deepnorm_lambda
        self.attention = CellFMRetention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = CellFMSGLU(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.attention_norm(
            self.attention(hidden_states, attention_mask) + self.deepnorm_lambda * hidden_states
        )
        return self.ffn_norm(self.ffn(hidden_states) + self.deepnorm_lambda * hidden_states)


# ----------------------------------------------------------------------------------------------------------------
# Pretrained base and backbone
# ----------------------------------------------------------------------------------------------------------------


class CellFMPreTrainedModel(PreTrainedModel):
    """Weights init and the HF plumbing shared by CellFM models.

    Init (DeepNet, "DeepNorm" initialisation for an encoder-only stack): ``q_proj``, ``k_proj``, ``g_proj``
    Xavier-normal with gain 1; ``v_proj``, ``o_proj``, ``ffn.*`` Xavier-normal with gain ``β``; embeddings and head
    layers normal with std ``initializer_range``; LayerNorms and the head-norm gain to 1; the mask vector to 0;
    ``α`` to ``value_embedding_alpha_init``.
    """

    config_class = CellFMConfig
    config: CellFMConfig
    base_model_prefix = "cellfm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CellFMLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        gain = getattr(module, "_cellfm_xavier_gain", None)
        if isinstance(module, nn.Linear) and gain is not None:
            init.xavier_normal_(module.weight, gain=1.0 if gain == "one" else self.config.deepnorm_beta)
        elif isinstance(module, CellFMRetention):
            init.ones_(module.head_norm_weight)
        elif isinstance(module, CellFMCellValueHead):
            init.zeros_(module.bias)
        elif isinstance(module, CellFMPerturbationEmbedding):
            # row 0 (not perturbed) zero, row 1 at the gene-ID embedding's scale; sliced, so check the loaded flag
            if not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight)
                init.normal_(module.weight[1], mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, CellFMValueEmbedding):
            init.zeros_(module.mask_embedding)
            init.constant_(module.alpha, self.config.value_embedding_alpha_init)


def _check_inputs(config: CellFMConfig, input_ids, values, attention_mask):
    if input_ids is None:
        raise ValueError("CellFM needs `input_ids` (gene token ids, [batch, length]).")
    if values is None:
        raise ValueError(
            "CellFM needs `values` (the expression value of every token, [batch, length]); tokenize with "
            "GeneTokenizer.from_species('human', encoding='continuous') which returns them."
        )
    if values.shape != input_ids.shape:
        raise ValueError(f"`values` has shape {tuple(values.shape)} but `input_ids` has {tuple(input_ids.shape)}.")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)} but `input_ids` has {tuple(input_ids.shape)}."
        )
    if input_ids.shape[1] == 0 or not bool((input_ids[:, 0] == config.cls_token_id).all()):
        raise ValueError(
            f"CellFM reads the cell embedding from `<cls>` (id {config.cls_token_id}) at position 0, but some rows "
            "do not start with it. Tokenize with encoding='continuous', which puts `<cls>` first."
        )


class CellFMModel(CellFMPreTrainedModel):
    """The CellFM backbone: embeddings and the ERetNet stack; returns hidden states and the ``<cls>`` embedding."""

    def __init__(self, config: CellFMConfig):
        super().__init__(config)
        self.embeddings = CellFMEmbeddings(config)
        self.layers = nn.ModuleList([CellFMLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.gene_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.gene_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        values: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        extra_embeddings: torch.FloatTensor | None = None,
        **kwargs,
    ) -> CellFMModelOutput | tuple:
        """``extra_embeddings``: optional ``[B, L, d]`` added to the token embeddings before the first layer (the
        perturbation head adds its perturbed-gene flag embedding this way)."""
        _check_inputs(self.config, input_ids, values, attention_mask)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden = self.embeddings(input_ids, values)
        if extra_embeddings is not None:
            hidden = hidden + extra_embeddings
        all_hidden = (hidden,) if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, attention_mask)
            if output_hidden_states:
                all_hidden = all_hidden + (hidden,)
        cell_embedding = hidden[:, 0]
        if not return_dict:
            return tuple(v for v in (hidden, cell_embedding, all_hidden) if v is not None)
        return CellFMModelOutput(last_hidden_state=hidden, cell_embedding=cell_embedding, hidden_states=all_hidden)


# ----------------------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------------------


class CellFMRegressionHead(nn.Module):
    """The paper's MLP ``ŷ_i = MLP(x_i^{(L)})``: Linear → GELU → Linear to one value per position."""

    def __init__(self, config: CellFMConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.regression_head_hidden_size)
        self.decoder = nn.Linear(config.regression_head_hidden_size, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(F.gelu(self.dense(hidden_states))).squeeze(-1)


class CellFMCellValueHead(nn.Module):
    """The cell-level term's predictor: the value of gene ``j`` from the cell embedding alone,
    ``ŷ_j = <W_c c + b_c, W_e LN(E[g_j])> + b``, with ``c`` the ``<cls>`` embedding and ``E[g_j]`` gene ``j``'s ID
    embedding (layer-normalised, so the read-out does not depend on the scale the ID table is initialised at).

    The paper states the cell-level term (``L = L_cls + L_MSE``; removing ``L_cls`` costs 0.4 %) but not its form.
    We use this bilinear read-out (the masked-value-for-cell-embedding form of scGPT, which CellFM follows for
    several tasks): it can only succeed if ``<cls>`` summarises the cell, and uses the *input* ID embedding of the
    gene (not its contextual state), so the term cannot be solved by the gene-level path.
    """

    def __init__(self, config: CellFMConfig):
        super().__init__()
        self.gene_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cell_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.gene_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, cell_embedding: torch.Tensor, gene_embeddings: torch.Tensor) -> torch.Tensor:
        genes = self.gene_proj(self.gene_norm(gene_embeddings))
        return torch.einsum("bd,bld->bl", self.cell_proj(cell_embedding), genes) + self.bias


class CellFMForMaskedRegression(CellFMPreTrainedModel):
    """CellFM pretraining: regress masked genes' values.

    Masked genes are marked in ``values`` with ``config.mask_value`` (-1.0); ``labels`` (float ``[B, L]``) hold
    their true value and -100 elsewhere (the masked-regression collator builds both). Loss:

    - ``mse_loss``: MSE of the MLP head's prediction on masked genes;
    - ``cls_loss``: MSE of :class:`CellFMCellValueHead`'s prediction (from ``<cls>``) on the same genes;
    - ``loss = mse_loss + config.cls_loss_weight * cls_loss``.

    A labelled position whose value is not masked raises: the model would see the answer.
    """

    def __init__(self, config: CellFMConfig):
        super().__init__(config)
        self.cellfm = CellFMModel(config)
        self.regression_head = CellFMRegressionHead(config)
        self.cell_value_head = CellFMCellValueHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        values: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        labels: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CellFMMaskedRegressionOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.cellfm(
            input_ids, values, attention_mask, output_hidden_states=output_hidden_states, return_dict=True
        )
        predictions = self.regression_head(out.last_hidden_state)
        gene_embeddings = self.cellfm.embeddings.gene_embeddings(input_ids)
        cls_predictions = self.cell_value_head(out.cell_embedding, gene_embeddings)

        loss = mse_loss = cls_loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"`labels` has shape {tuple(labels.shape)} but `input_ids` has {tuple(input_ids.shape)}: "
                    "masked regression wants one float label per token (-100 where not masked)."
                )
            selected = labels != IGNORE_INDEX
            if attention_mask is not None:
                selected = selected & attention_mask.bool()
            if bool((selected & (values != self.config.mask_value)).any()):
                raise ValueError(
                    "Some positions have a label but their value is not masked (values != config.mask_value = "
                    f"{self.config.mask_value}): the model would see the value it must predict. Mask them in "
                    "`values` (the masked-regression collator does) or set their label to -100."
                )
            mse_loss = _masked_mse(predictions, labels, selected)
            cls_loss = _masked_mse(cls_predictions, labels, selected)
            loss = mse_loss + self.config.cls_loss_weight * cls_loss

        if not return_dict:
            fields = (loss, predictions, mse_loss, cls_loss, cls_predictions, out.hidden_states, out.cell_embedding)
            return tuple(v for v in fields if v is not None)
        return CellFMMaskedRegressionOutput(
            loss=loss,
            predictions=predictions,
            mse_loss=mse_loss,
            cls_loss=cls_loss,
            cls_predictions=cls_predictions,
            hidden_states=out.hidden_states,
            cell_embedding=out.cell_embedding,
        )


class CellFMClassificationHead(nn.Module):
    """MLP on the ``<cls>`` embedding: ``classifier_num_layers - 1`` blocks of Linear → GELU → Dropout, then a
    Linear to ``num_labels`` (1 layer = a linear probe)."""

    def __init__(self, config: CellFMConfig):
        super().__init__()
        blocks: list[nn.Module] = []
        width = config.hidden_size
        for _ in range(config.classifier_num_layers - 1):
            blocks += [
                nn.Linear(width, config.classifier_hidden_size),
                nn.GELU(),
                nn.Dropout(config.classifier_dropout),
            ]
            width = config.classifier_hidden_size
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.hidden = nn.Sequential(*blocks)
        self.classifier = nn.Linear(width, config.num_labels)

    def forward(self, cell_embedding: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(self.dropout(cell_embedding)))


class CellFMForSequenceClassification(CellFMPreTrainedModel):
    """Cell-level classification (e.g. cell-type annotation) from the ``<cls>`` embedding.

    ``labels``: int64 ``[B]`` (cross-entropy), or float ``[B]`` when ``num_labels == 1`` (MSE). With
    ``config.freeze_backbone`` the backbone's parameters get ``requires_grad=False`` at construction: only the MLP
    head trains, the paper's cell-annotation protocol. Whenever no backbone parameter requires a gradient the
    backbone runs without building a graph (LoRA adapters inside the backbone do require one, so they train).
    """

    def __init__(self, config: CellFMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.cellfm = CellFMModel(config)
        self.head = CellFMClassificationHead(config)
        self.post_init()
        if config.freeze_backbone:
            self.cellfm.requires_grad_(False)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        values: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CellFMSequenceClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        backbone_trains = any(p.requires_grad for p in self.cellfm.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and backbone_trains):
            out = self.cellfm(
                input_ids, values, attention_mask, output_hidden_states=output_hidden_states, return_dict=True
            )
        logits = self.head(out.cell_embedding)
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(self.config, logits, labels)
        if not return_dict:
            return tuple(v for v in (loss, logits, out.hidden_states, out.cell_embedding) if v is not None)
        return CellFMSequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, cell_embedding=out.cell_embedding
        )



# Copied from hf_scfm.modeling.mouse_genemamba.modeling_mouse_genemamba.MouseGeneMambaPerturbationEmbedding with MouseGeneMamba->CellFM
class CellFMPerturbationEmbedding(nn.Embedding):
    """The perturbed-gene flag embedding: 2 rows of width ``d`` (0 = not perturbed, 1 = perturbed) added to every
    token's embedding. Row 0 starts at zero, so an unflagged sentence is the backbone's own input; row 1 starts at the
    scale of the token embedding it is added to (``_init_weights``): a flag far smaller than the tokens would spend
    the first fine-tuning steps growing."""

    def __init__(self, config: CellFMConfig):
        super().__init__(2, config.hidden_size)


# Copied from hf_scfm.modeling.mouse_genemamba.modeling_mouse_genemamba.MouseGeneMambaPerturbationHead with MouseGeneMamba->CellFM
class CellFMPerturbationHead(nn.Module):
    """Per-position MLP ``Linear(d, d) -> GELU -> Linear(d, 1)`` regressing the perturbed ``log1p`` value, divided by
    ``config.perturbation_value_scale``: the data's values span about ``[0, 1 / scale]``, so a unit-scale output
    covers their range."""

    def __init__(self, config: CellFMConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, 1)
        self.value_scale = config.perturbation_value_scale

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.out_proj(F.gelu(self.dense(hidden_states))).squeeze(-1) / self.value_scale


# Copied from hf_scfm.modeling.mouse_genemamba.modeling_mouse_genemamba.MouseGeneMambaForPerturbationPrediction with MouseGeneMamba->CellFM, self.backbone->self.cellfm
class CellFMForPerturbationPrediction(CellFMPreTrainedModel):
    """Predict a perturbed cell's ``log1p`` profile from a control cell and the perturbed genes (the SC-MAMBA2
    paper's set-up, its section 4.5, on this family's backbone).

    Inputs: ``values`` = the control cell's ``log1p(x_norm)`` values (every gene of the panel, zeros included, so a
    perturbed gene has a position), ``perturbation_flags`` ``[B, L]`` int (1 = this gene is perturbed, 0 = not;
    ignored at padding; ``None`` = nothing perturbed). :class:`CellFMPerturbationEmbedding` of the flags is
    added to every token's embedding (``extra_embeddings`` of the backbone), and
    :class:`CellFMPerturbationHead` regresses the perturbed value at every position from the last hidden
    state. ``predictions`` are 0 at special tokens (ids < 6) and padding. Loss: MSE over real gene positions where
    ``labels != -100``.

    ``from_pretrained`` of a pretraining checkpoint keeps the backbone and initialises the flag embedding and the
    head; ``hf_scfm.tasks.perturbation`` builds, fine-tunes and evaluates it on GEARS-layout data.
    """

    def __init__(self, config: CellFMConfig):
        super().__init__(config)
        self.cellfm = CellFMModel(config)
        self.perturbation_embedding = CellFMPerturbationEmbedding(config)
        self.perturbation_head = CellFMPerturbationHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        perturbation_flags: torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CellFMPerturbationOutput | tuple:
        """``labels``: ``[B, L]`` float, the perturbed cell's value per token, -100 where ignored."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        flags = _perturbation_flags(perturbation_flags, input_ids, attention_mask)
        out = self.cellfm(
            input_ids,
            values=values,
            attention_mask=attention_mask,
            extra_embeddings=self.perturbation_embedding(flags),
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        predictions = self.perturbation_head(out.last_hidden_state)
        real = input_ids >= len(SPECIAL_TOKENS)
        if attention_mask is not None:
            real = real & attention_mask.bool()
        predictions = predictions * real.to(predictions.dtype)
        loss = None
        if labels is not None:
            if labels.shape != predictions.shape:
                raise ValueError(
                    f"labels have shape {tuple(labels.shape)}, expected {tuple(predictions.shape)} (the perturbed "
                    "log1p value per token, -100 at specials and padding)."
                )
            loss = _masked_mse(predictions, labels, real & (labels != IGNORE_INDEX))
        if not return_dict:
            rest = (predictions, out.hidden_states, out.cell_embedding, out.last_hidden_state)
            return tuple(v for v in ((loss,) if loss is not None else ()) + rest if v is not None)
        return CellFMPerturbationOutput(
            loss=loss,
            predictions=predictions,
            hidden_states=out.hidden_states,
            cell_embedding=out.cell_embedding,
            last_hidden_state=out.last_hidden_state,
        )


# Remote code: see the note at the end of modeling_mouse_genemamba.py.
for _auto_class, _reference in CELLFM_AUTO_MAP.items():
    _class = globals()[_reference.rsplit(".", 1)[1]]
    if "_auto_class" not in vars(_class):
        _class._auto_class = _auto_class
del _auto_class, _reference, _class

__all__ = [
    "CellFMPreTrainedModel",
    "CellFMModel",
    "CellFMForMaskedRegression",
    "CellFMForSequenceClassification",
    "CellFMForPerturbationPrediction",
    "CellFMModelOutput",
    "CellFMPerturbationOutput",
    "CellFMMaskedRegressionOutput",
    "CellFMSequenceClassifierOutput",
]
