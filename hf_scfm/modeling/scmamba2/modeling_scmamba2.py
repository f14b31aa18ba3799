"""SC-MAMBA2 (seed papers 001/002): a bidirectional Mamba-2 encoder for whole-transcriptome cells.

Read top to bottom:

1. :class:`ScMamba2Embeddings` - gene embedding + continuous expression encoder, learned mask vector.
2. :class:`ScMamba2Mixer` - one Mamba-2 block (SSD with a scalar decay per head), written from the
   Mamba-2 paper: ``in_proj -> [z, x, B, C, dt]``, depthwise causal conv + SiLU over (x, B, C),
   chunked SSD scan (``ssd_scan``, ``ssd.py`` beside this file) with a ``D`` skip, gated RMSNorm ``norm(y * silu(z))``, ``out_proj``.
3. :class:`ScMamba2Layer` - BiMamba-2: the *same* mixer over the sequence and over its "smart padding"
   reversal (only real tokens are reversed per row), reversed back and summed; pre-norm residual.
4. :class:`ScMamba2Model` and the heads: masked expression (pretraining), sequence classification,
   perturbation prediction.

Auto classes (registered by ``import hf_scfm``; written into ``config.json``'s ``auto_map`` by ``save_pretrained``, so
a checkpoint also loads with ``trust_remote_code=True`` where hf_scfm is not installed): ``AutoConfig``,
``AutoModel`` -> :class:`ScMamba2Model`, ``AutoModelForPreTraining`` and ``hf_scfm.AutoModelForMaskedExpression`` ->
:class:`ScMamba2ForMaskedExpression` (one value per token: ``AutoModelForMaskedLM`` means vocabulary logits, so it
is deliberately not used), ``AutoModelForSequenceClassification`` -> :class:`ScMamba2ForSequenceClassification`,
``hf_scfm.AutoModelForPerturbationPrediction`` -> :class:`ScMamba2ForPerturbationPrediction` (without hf_scfm:
``get_class_from_dynamic_module("modeling_scmamba2.ScMamba2ForPerturbationPrediction", repo)``). The mapping is
:data:`~.configuration_scmamba2.SCMAMBA2_AUTO_MAP`.

Padding is always on the right (the tokenizer's contract). Right padding plus smart reversal means
padding sits *after* the real tokens in both scan directions, so a causal scan never carries padding
into a real position; the model also zeroes padded positions before the conv and the scan (the ops
contract), so the outputs at real positions do not depend on how much padding a row has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_scmamba2 import SCMAMBA2_AUTO_MAP, ScMamba2Config
from .conv import causal_conv1d, causal_conv1d_channels_last
from .dispatch import resolve_kernel
from .special_tokens import IGNORE_INDEX, SPECIAL_TOKENS
from .ssd import ssd_scan

_ACT = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


@dataclass
class ScMamba2ModelOutput(ModelOutput):
    """Backbone output.

    Args:
        last_hidden_state: ``[B, L, d]`` after the final norm; zero at padded positions.
        cell_embedding: ``[B, d]``, the final hidden state at ``<cls>`` (position 0), as in the paper, or with
            ``config.pooling="mean"`` the mean over real tokens.
        hidden_states: with ``output_hidden_states=True``, the embedding output and every layer's output
            (``num_hidden_layers + 1`` tensors of ``[B, L, d]``; the last one before the final norm).
    """

    last_hidden_state: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ScMamba2MaskedExpressionOutput(ModelOutput):
    """Output of :class:`ScMamba2ForMaskedExpression`.

    Args:
        loss: MSE over the positions the labels mark (``labels != -100``), when labels are given.
        predictions: ``[B, L]`` predicted value per position (a bin, in the units of ``values``); zero at padded
            positions.
        hidden_states: as in :class:`ScMamba2ModelOutput`, with ``output_hidden_states=True``.
        cell_embedding: ``[B, d]`` cell embedding (``config.pooling``: ``<cls>`` or mean).
        last_hidden_state: ``[B, L, d]`` final hidden states.
    """

    loss: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    cell_embedding: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


@dataclass
class ScMamba2SequenceClassifierOutput(ModelOutput):
    """Output of :class:`ScMamba2ForSequenceClassification` (``logits`` ``[B, num_labels]``)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    cell_embedding: torch.FloatTensor | None = None


# Copied from hf_scfm.modeling.mouse_genemamba.modeling_mouse_genemamba.MouseGeneMambaPerturbationOutput with MouseGeneMamba->ScMamba2
@dataclass
class ScMamba2PerturbationOutput(ModelOutput):
    """Output of :class:`ScMamba2ForPerturbationPrediction`.

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


# --------------------------------------------------------------------------------------------------
# Pieces every family shares (originals in modeling_mouse_genemamba.py; utils/check_copies.py)
# --------------------------------------------------------------------------------------------------


# Copied from hf_scfm.modeling.mouse_genemamba.modeling_mouse_genemamba.pool_cell_embedding
def pool_cell_embedding(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str
) -> torch.Tensor:
    """The cell embedding ``[B, d]`` read from last hidden states ``[B, L, d]``: ``"cls"`` the first position,
    ``"mean"`` the mean over real tokens (``attention_mask == 1``; every token when the mask is ``None``), ``"last"``
    the last real token."""
    if pooling == "cls":
        return hidden_states[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(hidden_states.shape[:2], device=hidden_states.device)
    mask = attention_mask.to(hidden_states.dtype)
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * (mask > 0)).amax(dim=1)
        return hidden_states[torch.arange(mask.shape[0], device=mask.device), last]
    if pooling == "mean":
        summed = (hidden_states * mask.unsqueeze(-1)).sum(dim=1)
        return summed / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    raise ValueError(f"pooling must be 'cls', 'mean' or 'last', got {pooling!r}.")


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


# --------------------------------------------------------------------------------------------------
# Padding helpers
# --------------------------------------------------------------------------------------------------


def smart_reverse_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-row index that reverses the real tokens and leaves right padding in place.

    For a row with ``n`` real tokens, position ``i < n`` maps to ``n - 1 - i`` and ``i >= n`` to itself.
    The map is its own inverse, so the same index reverses the scan output back. Vectorised over rows.

    Args:
        attention_mask: ``[B, L]``, 1 for real tokens, 0 for padding, right-padded.

    Returns:
        int64 ``[B, L]`` gather index.
    """
    length = attention_mask.shape[1]
    n = attention_mask.sum(dim=1, keepdim=True).to(torch.long)
    pos = torch.arange(length, device=attention_mask.device).unsqueeze(0)
    return torch.where(pos < n, n - 1 - pos, pos)


def _gather_positions(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``hidden[b, index[b, i], :]`` for every row ``b`` and position ``i``."""
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def _check_inputs(config: ScMamba2Config, input_ids, values, attention_mask):
    if input_ids is None or input_ids.dim() != 2:
        raise ValueError(
            "SC-MAMBA2 needs `input_ids` of shape [batch, length] as returned by "
            "GeneTokenizer.from_species(..., encoding='binned')(adata, return_tensors='pt')."
        )
    if values is None:
        raise ValueError(
            "SC-MAMBA2 needs `values` (the expression value of every token) next to `input_ids`: tokenize "
            "with encoding='binned' (or log1p values for perturbation) and pass enc['values']."
        )
    if values.shape != input_ids.shape:
        raise ValueError(
            f"`values` has shape {tuple(values.shape)} but `input_ids` has shape {tuple(input_ids.shape)}; "
            "pass both from the same tokenizer output."
        )
    if input_ids.numel() and (int(input_ids.max()) >= config.vocab_size or int(input_ids.min()) < 0):
        raise ValueError(
            f"input_ids contain ids outside [0, {config.vocab_size}) (max {int(input_ids.max())}): the tokenizer "
            "does not match this model's vocabulary. Use the tokenizer saved with the model, or build the "
            "config with vocab_size=len(tokenizer)."
        )
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` has shape {tuple(attention_mask.shape)} but `input_ids` has shape "
                f"{tuple(input_ids.shape)}."
            )
        n = attention_mask.sum(dim=1, keepdim=True)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        if not torch.equal(attention_mask.bool(), pos < n):
            raise ValueError(
                "attention_mask must be right-padded (each row: ones, then zeros). SC-MAMBA2's smart-padding "
                "reversal relies on it; tokenize with padding_side='right' (the GeneTokenizer default)."
            )
    if config.cls_token_id is not None and input_ids.numel() and not bool(
        (input_ids[:, 0] == config.cls_token_id).all()
    ):
        raise ValueError(
            f"SC-MAMBA2 reads the cell embedding at <cls> (id {config.cls_token_id}), which must be the first "
            "token of every row. Tokenize with GeneTokenizer.from_species(..., encoding='binned'), which puts "
            "<cls> first."
        )


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


# Copied from hf_scfm.modeling.mouse_genemamba.modeling_mouse_genemamba.MouseGeneMambaRMSNorm with MouseGeneMamba->ScMamba2
class ScMamba2RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): ``x / sqrt(mean(x²) + eps) * weight``, computed in at least float32 (half
    precision is normalised in float32, float64 stays float64); the weight multiplies the result in the input's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.promote_types(dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class ScMamba2GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: ``RMSNorm(y * silu(z))``, normalised per B/C group of channels.

    Gating before the norm (Mamba-2's ``norm_before_gate=False``) and normalising each group separately
    keep the layer equivalent under tensor-parallel splits of the groups, as in the Mamba-2 paper.
    Computed in at least float32, like :class:`ScMamba2RMSNorm` (a float64 model stays float64 throughout).
    """

    def __init__(self, hidden_size: int, n_groups: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.n_groups = n_groups
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        compute = torch.promote_types(dtype, torch.float32)  # half precision in float32, float64 stays float64
        h = hidden_states.to(compute) * F.silu(gate.to(compute))
        *lead, width = h.shape
        h = h.view(*lead, self.n_groups, width // self.n_groups)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h.view(*lead, width)).to(dtype)


class ScMamba2ExpressionEncoder(nn.Module):
    """Continuous value encoder ``E_j = LayerNorm(W2 act(W1 e_j))`` (paper, "Expression Value Encoding").

    A map of the scalar rather than a lookup table, so nearby bins get nearby embeddings and the same
    encoder accepts log1p values when fine-tuning for perturbation.
    """

    def __init__(self, config: ScMamba2Config):
        super().__init__()
        self.linear1 = nn.Linear(1, config.hidden_size)
        self.activation = _ACT[config.expression_activation]()
        self.linear2 = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear2(self.activation(self.linear1(values.unsqueeze(-1)))))


class ScMamba2Embeddings(nn.Module):
    """Token embedding ``C_j = G_j + E_j``: gene embedding plus expression embedding.

    ``G_j = LayerNorm(Embedding(gene))`` (scGPT's gene encoder, which SC-MAMBA2's embedding follows): both
    terms then start at the same unit scale; without the norm the 0.02-std gene rows would be drowned by
    the LayerNorm-ed expression term, and in our tests the ``<cls>`` classifier then failed to train.
    Values are multiplied by ``config.expression_scale`` (bins -> ``[0, 1]`` by default) before the encoder.
    Where ``values == config.mask_value`` the expression embedding is replaced by a learned vector
    (``mask_embedding``, initialised at unit scale like the encoder's output): the gene stays visible, its
    value is hidden, as in the paper's masking of ``E_j``.
    """

    def __init__(self, config: ScMamba2Config):
        super().__init__()
        self.gene_embedding = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.gene_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.expression_encoder = ScMamba2ExpressionEncoder(config)
        self.mask_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.mask_value = config.mask_value
        self.value_scale = config.expression_scale

    def forward(self, input_ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        genes = self.gene_norm(self.gene_embedding(input_ids))
        masked = values == self.mask_value
        values = values.to(genes.dtype).masked_fill(masked, 0.0) * self.value_scale
        expression = self.expression_encoder(values)
        expression = torch.where(masked.unsqueeze(-1), self.mask_embedding.to(expression.dtype), expression)
        return genes + expression


# Without gradients on CPU the mixer runs its rows in passes of about this many tokens, so each pass's buffers stay
# in cache (tiny preset, 2,048 tokens, one thread: batch 32 went from 18 to 32 cells per CPU-second).
INFER_TOKENS_PER_PASS = 8192


class ScMamba2Mixer(nn.Module):
    """One Mamba-2 (SSD) block, unidirectional; the BiMamba layer runs it in both directions.

    Shapes (``di = expand * d``, ``H = di / head_dim`` heads of ``P = head_dim`` channels, ``G`` groups,
    ``N = state_size``):

    - ``in_proj``: ``d -> [z (di), x (di), B (G*N), C (G*N), dt (H)]`` (one matmul, as in Mamba-2).
    - depthwise causal conv of width ``conv_kernel`` over ``[x, B, C]``, then SiLU.
    - SSD: ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t + D x_t`` with a scalar
      ``A = -exp(A_log)`` per head, ``dt = softplus(dt_raw + dt_bias)``; ``ops.ssd_scan`` does the chunked scan.
    - ``out_proj(GatedRMSNorm(y, z))``.
    """

    def __init__(self, config: ScMamba2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.n_groups = config.n_groups
        self.state_size = config.state_size
        self.chunk_size = config.chunk_size
        self.backend = config.ssm_backend
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.state_size

        self.in_proj = nn.Linear(
            self.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, bias=config.use_bias
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=config.conv_kernel,
            groups=self.conv_dim,
            padding=config.conv_kernel - 1,
            bias=config.use_conv_bias,
        )
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = ScMamba2GatedRMSNorm(self.intermediate_size, self.n_groups, eps=config.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.use_bias)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden_states`` ``[B, L, d]``; ``mask`` ``[B, L]`` (1 real, 0 padding) or ``None``."""
        rows = max(1, INFER_TOKENS_PER_PASS // max(hidden_states.shape[1], 1))
        if torch.is_grad_enabled() or hidden_states.shape[0] <= rows or hidden_states.is_cuda:
            return self._forward_rows(hidden_states, mask)
        # inference on CPU: rows in passes of about INFER_TOKENS_PER_PASS tokens, whose buffers stay in cache
        masks = [None] * hidden_states.shape[0] if mask is None else mask.split(rows)
        return torch.cat([self._forward_rows(h, m) for h, m in zip(hidden_states.split(rows), masks)])

    def _forward_rows(self, hidden_states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        if mask is not None:
            mask = mask.to(hidden_states.dtype).unsqueeze(-1)
            hidden_states = hidden_states * mask
        z, xbc, dt = self.in_proj(hidden_states).split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1
        )
        if not torch.is_grad_enabled() and resolve_kernel("causal_conv1d", self.backend, xbc) is None:
            # inference on the PyTorch path: convolve in place in [B, L, channels], no transposes or copies
            xbc = causal_conv1d_channels_last(
                xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu", time_dim=1
            )
        else:
            xbc = causal_conv1d(
                xbc.transpose(1, 2),
                self.conv1d.weight.squeeze(1),
                self.conv1d.bias,
                activation="silu",
                backend=self.backend,
            ).transpose(1, 2)
        if mask is not None:
            # the conv bias makes padded positions non-zero again; the scan must see zeros there
            xbc = xbc * mask
            dt = dt * mask
        x, b, c = xbc.split(
            [self.intermediate_size, self.n_groups * self.state_size, self.n_groups * self.state_size], dim=-1
        )
        y = ssd_scan(
            x.reshape(batch, length, self.num_heads, self.head_dim),
            dt,
            -torch.exp(self.A_log.float()),
            b.reshape(batch, length, self.n_groups, self.state_size),
            c.reshape(batch, length, self.n_groups, self.state_size),
            self.chunk_size,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            backend=self.backend,
        )
        y = self.norm(y.reshape(batch, length, self.intermediate_size), z)
        return self.out_proj(y)


class ScMamba2Layer(GradientCheckpointingLayer):
    """BiMamba-2 layer: ``h + Mixer(RMSNorm(h)) + rev(Mixer(rev(RMSNorm(h))))``.

    ``rev`` is the smart-padding reversal (:func:`smart_reverse_index`): only ``<cls>`` and gene tokens are
    reversed, padding stays at the end of the row, so the reverse scan never reads padding before a real
    token. Both directions share the mixer's weights (paper, "Training": "weight-shared unidirectional
    Mamba modules"); they run as one batch of ``2B`` rows.
    """

    def __init__(self, config: ScMamba2Config, layer_idx: int):
        super().__init__()
        self.norm = ScMamba2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = ScMamba2Mixer(config, layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        reverse_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        normed = self.norm(hidden_states)
        flipped = normed.flip(1) if reverse_index is None else _gather_positions(normed, reverse_index)
        both_mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=0)
        forward_out, backward_out = self.mixer(torch.cat([normed, flipped], dim=0), both_mask).chunk(2, dim=0)
        backward_out = backward_out.flip(1) if reverse_index is None else _gather_positions(backward_out, reverse_index)
        out = forward_out + backward_out
        if attention_mask is not None:
            out = out * attention_mask.to(out.dtype).unsqueeze(-1)
        return hidden_states + out


# --------------------------------------------------------------------------------------------------
# Pretrained base and backbone
# --------------------------------------------------------------------------------------------------


class ScMamba2PreTrainedModel(PreTrainedModel):
    """Weight init, gradient checkpointing and loading for every SC-MAMBA2 class."""

    config_class = ScMamba2Config
    config: ScMamba2Config
    base_model_prefix = "scmamba2"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ScMamba2Layer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """Normal(0, initializer_range) for linear maps and embeddings (the transformers default), then the
        Mamba-2 specifics on each mixer (its children are initialised first, so these win):

        - ``A_log = log(U(A_init_range))``, ``D = 1``;
        - ``dt_bias = softplus^-1(dt)`` with ``dt`` log-uniform in ``[time_step_min, time_step_max]``;
        - the depthwise conv: PyTorch's default (Kaiming-uniform), not the normal init;
        - ``out_proj``: std ``initializer_range / sqrt(num_hidden_layers)`` when ``rescale_prenorm_residual``.
        """
        super()._init_weights(module)
        cfg = self.config
        if isinstance(module, ScMamba2Mixer):
            lo, hi = cfg.A_init_range
            a = torch.empty(module.num_heads, device=module.A_log.device, dtype=torch.float32).uniform_(lo, hi)
            init.copy_(module.A_log, torch.log(a))
            init.ones_(module.D)
            dt = torch.exp(
                torch.rand(module.num_heads, device=module.dt_bias.device, dtype=torch.float32)
                * (math.log(cfg.time_step_max) - math.log(cfg.time_step_min))
                + math.log(cfg.time_step_min)
            ).clamp(min=cfg.time_step_floor)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                init.zeros_(module.conv1d.bias)
            if cfg.rescale_prenorm_residual:
                init.normal_(
                    module.out_proj.weight, mean=0.0, std=cfg.initializer_range / math.sqrt(cfg.num_hidden_layers)
                )
        elif isinstance(module, ScMamba2PerturbationEmbedding):
            # row 0 (not perturbed) zero, row 1 at the unit scale of the layer-normalised token embedding
            if not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight)
                init.normal_(module.weight[1], mean=0.0, std=1.0)
        elif isinstance(module, ScMamba2Embeddings):
            init.normal_(module.mask_embedding, mean=0.0, std=1.0)
            # The expression encoder gets PyTorch's default Linear init (uniform weight and bias,
            # +-1/sqrt(fan_in)). The biases matter: with zero biases, LayerNorm(W2 relu(w1 * v)) is
            # scale-invariant in v, so every non-zero bin would get the same embedding. A bias spread of
            # +-1 switches units on at different values (a quarter of them inside the scaled bin range
            # [0, 1]), so the encoding moves with the bin from the start. (Done here, on the parent that owns
            # a parameter: transformers skips modules without direct parameters in non-library models.)
            for linear in (module.expression_encoder.linear1, module.expression_encoder.linear2):
                bound = 1.0 / math.sqrt(linear.in_features)
                init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
                init.uniform_(linear.bias, -bound, bound)


class ScMamba2Model(ScMamba2PreTrainedModel):
    """SC-MAMBA2 backbone: embeddings, ``num_hidden_layers`` BiMamba-2 layers, final RMSNorm.

    Returns the final hidden states and the cell embedding (``config.pooling``: the hidden state at ``<cls>``,
    or the mean over real tokens).
    """

    def __init__(self, config: ScMamba2Config):
        super().__init__(config)
        self.embeddings = ScMamba2Embeddings(config)
        self.layers = nn.ModuleList([ScMamba2Layer(config, i) for i in range(config.num_hidden_layers)])
        self.norm_f = ScMamba2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.gene_embedding

    def set_input_embeddings(self, value: nn.Embedding):
        self.embeddings.gene_embedding = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        values: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        extra_embeddings: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ScMamba2ModelOutput | tuple:
        r"""
        Args:
            input_ids: ``[B, L]`` token ids, ``<cls>`` first (tokenizer ``encoding="binned"``).
            values: ``[B, L]`` expression value per token (bin index; ``config.mask_value`` = masked).
            attention_mask: ``[B, L]``, 1 real / 0 padding, right-padded. ``None`` = no padding.
            extra_embeddings: optional ``[B, L, d]`` added to the token embeddings before the first layer
                (the perturbation head adds its perturbed-gene flag embedding this way).
            output_hidden_states: also return the output of the embeddings and of every layer.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        _check_inputs(self.config, input_ids, values, attention_mask)

        hidden = self.embeddings(input_ids, values)
        if extra_embeddings is not None:
            hidden = hidden + extra_embeddings
        reverse_index = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(hidden.dtype)
            if bool((attention_mask == 0).any()):
                reverse_index = smart_reverse_index(attention_mask)
                hidden = hidden * attention_mask.unsqueeze(-1)
            else:
                attention_mask = None  # no padding: a plain flip is the smart reversal

        all_hidden = (hidden,) if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, attention_mask, reverse_index)
            if output_hidden_states:
                all_hidden += (hidden,)
        hidden = self.norm_f(hidden)
        if attention_mask is not None:
            hidden = hidden * attention_mask.unsqueeze(-1)
        cell_embedding = pool_cell_embedding(hidden, attention_mask, self.config.pooling)
        if not return_dict:
            return tuple(v for v in (hidden, cell_embedding, all_hidden) if v is not None)
        return ScMamba2ModelOutput(last_hidden_state=hidden, cell_embedding=cell_embedding, hidden_states=all_hidden)


# --------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------


class ScMamba2RegressionHead(nn.Module):
    """Per-position MLP ``d -> d -> 1`` (the paper's "gene expression prediction module").

    The MLP predicts in the encoder's normalised units; dividing by ``config.expression_scale`` returns
    values in the units of ``values`` (bins, or log1p for perturbation).
    """

    def __init__(self, config: ScMamba2Config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = _ACT[config.expression_activation]()
        self.out_proj = nn.Linear(config.hidden_size, 1)
        self.output_scale = 1.0 / config.expression_scale

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.activation(self.dense(hidden_states))).squeeze(-1) * self.output_scale


class ScMamba2ForMaskedExpression(ScMamba2PreTrainedModel):
    """SC-MAMBA2 pretraining: predict the binned expression of masked positions (MSE).

    Masked positions are marked in ``values`` by ``config.mask_value`` (the collator's job);
    ``labels`` hold the true bin there and -100 elsewhere. The loss is the MSE over ``labels != -100``.

    Auto classes: ``AutoModelForPreTraining`` and ``hf_scfm.AutoModelForMaskedExpression`` (the Auto class for heads
    that regress one value per token). Not ``AutoModelForMaskedLM``: that class means "token logits over the
    vocabulary" (``fill-mask`` pipelines rely on it).
    """

    def __init__(self, config: ScMamba2Config):
        super().__init__(config)
        self.scmamba2 = ScMamba2Model(config)
        self.expression_head = ScMamba2RegressionHead(config)
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
    ) -> ScMamba2MaskedExpressionOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.scmamba2(
            input_ids, values, attention_mask, output_hidden_states=output_hidden_states, return_dict=True
        )
        predictions = self.expression_head(out.last_hidden_state)
        if attention_mask is not None:
            predictions = predictions * attention_mask.to(predictions.dtype)
        loss = None
        if labels is not None:
            if labels.shape != predictions.shape:
                raise ValueError(
                    f"labels have shape {tuple(labels.shape)}, expected {tuple(predictions.shape)} (one float per "
                    "token, -100 where not masked)."
                )
            keep = labels != IGNORE_INDEX
            if attention_mask is not None:
                keep = keep & attention_mask.bool()
            loss = _masked_mse(predictions, labels, keep)
        if not return_dict:
            rest = (predictions, out.hidden_states, out.cell_embedding, out.last_hidden_state)
            return tuple(v for v in ((loss,) if loss is not None else ()) + rest if v is not None)
        return ScMamba2MaskedExpressionOutput(
            loss=loss,
            predictions=predictions,
            hidden_states=out.hidden_states,
            cell_embedding=out.cell_embedding,
            last_hidden_state=out.last_hidden_state,
        )


class ScMamba2ForSequenceClassification(ScMamba2PreTrainedModel):
    """Cell-level classifier (cell-type annotation) on the cell embedding (``<cls>``, or the mean with
    ``config.pooling="mean"``).

    Head: dropout -> Linear(d, d) -> activation -> LayerNorm -> dropout -> Linear(d, num_labels) (scGPT's
    cell-type decoder; the LayerNorm brings the small hidden activations of a freshly initialised head
    to unit scale, so the last layer learns at a useful speed). Loss follows the
    transformers ``problem_type`` conventions: ``regression`` (MSE) when ``num_labels == 1``,
    ``single_label_classification`` (cross-entropy) for integer labels, ``multi_label_classification``
    (BCE with logits) for float multi-hot labels; an unset ``problem_type`` is inferred and stored.
    """

    def __init__(self, config: ScMamba2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.scmamba2 = ScMamba2Model(config)
        self.classifier = nn.Sequential(
            nn.Dropout(config.classifier_dropout),
            nn.Linear(config.hidden_size, config.hidden_size),
            _ACT[config.expression_activation](),
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
            nn.Dropout(config.classifier_dropout),
            nn.Linear(config.hidden_size, config.num_labels),
        )
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        values: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ScMamba2SequenceClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.scmamba2(
            input_ids, values, attention_mask, output_hidden_states=output_hidden_states, return_dict=True
        )
        logits = self.classifier(out.cell_embedding)
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(self.config, logits, labels)
        if not return_dict:
            rest = (logits, out.hidden_states, out.cell_embedding)
            return tuple(v for v in ((loss,) if loss is not None else ()) + rest if v is not None)
        return ScMamba2SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, cell_embedding=out.cell_embedding
        )


# Copied from hf_scfm.modeling.mouse_genemamba.modeling_mouse_genemamba.MouseGeneMambaPerturbationEmbedding with MouseGeneMamba->ScMamba2
class ScMamba2PerturbationEmbedding(nn.Embedding):
    """The perturbed-gene flag embedding: 2 rows of width ``d`` (0 = not perturbed, 1 = perturbed) added to every
    token's embedding. Row 0 starts at zero, so an unflagged sentence is the backbone's own input; row 1 starts at the
    scale of the token embedding it is added to (``_init_weights``): a flag far smaller than the tokens would spend
    the first fine-tuning steps growing."""

    def __init__(self, config: ScMamba2Config):
        super().__init__(2, config.hidden_size)


class ScMamba2ForPerturbationPrediction(ScMamba2PreTrainedModel):
    """Predict a perturbed cell's log1p profile from a control cell and the perturbed genes (paper 4.5).

    Inputs: ``values`` = the control cell's log1p values (not bins; set ``config.value_scale`` for them, e.g.
    ``1 / ceil(max value)``), ``perturbation_flags`` ``[B, L]`` int (1 = this gene is perturbed, 0 = not; ignored at
    padding; ``None`` = nothing perturbed). :class:`ScMamba2PerturbationEmbedding` of the flags is added to every
    token's embedding; the flag starts at the unit scale of the (layer-normalised) token embedding. Output: the
    predicted perturbed log1p value per position from the same regression head as pretraining
    (``expression_head``, so a pretrained checkpoint brings it along). Loss: MSE over real gene positions (ids >= 6,
    attention 1) where ``labels != -100``.
    """

    def __init__(self, config: ScMamba2Config):
        super().__init__(config)
        self.scmamba2 = ScMamba2Model(config)
        self.perturbation_embedding = ScMamba2PerturbationEmbedding(config)
        self.expression_head = ScMamba2RegressionHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        values: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        perturbation_flags: torch.LongTensor | None = None,
        labels: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ScMamba2PerturbationOutput | tuple:
        """``labels``: ``[B, L]`` float, the perturbed cell's value per token, -100 where ignored."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        flags = _perturbation_flags(perturbation_flags, input_ids, attention_mask)
        out = self.scmamba2(
            input_ids,
            values=values,
            attention_mask=attention_mask,
            extra_embeddings=self.perturbation_embedding(flags),
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        predictions = self.expression_head(out.last_hidden_state)
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
        return ScMamba2PerturbationOutput(
            loss=loss,
            predictions=predictions,
            hidden_states=out.hidden_states,
            cell_embedding=out.cell_embedding,
            last_hidden_state=out.last_hidden_state,
        )


# Remote code: see the note at the end of modeling_mouse_genemamba.py.
for _auto_class, _reference in SCMAMBA2_AUTO_MAP.items():
    _class = globals()[_reference.rsplit(".", 1)[1]]
    if "_auto_class" not in vars(_class):
        _class._auto_class = _auto_class
del _auto_class, _reference, _class

__all__ = [
    "ScMamba2PreTrainedModel",
    "ScMamba2Model",
    "ScMamba2ForMaskedExpression",
    "ScMamba2ForSequenceClassification",
    "ScMamba2ForPerturbationPrediction",
    "ScMamba2ModelOutput",
    "ScMamba2MaskedExpressionOutput",
    "ScMamba2PerturbationOutput",
    "ScMamba2SequenceClassifierOutput",
    "smart_reverse_index",
]
