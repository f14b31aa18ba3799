"""Mouse-GeneMamba (seed paper 000): Mouse-Geneformer with its Transformer encoder swapped for Mamba-1 blocks.

Read top to bottom:

1. :class:`MouseGeneMambaEmbeddings`: gene embedding + expression-value embedding (summed).
2. :class:`MouseGeneMambaMixer`: one Mamba-1 selective SSM (Gu & Dao 2023, Algorithm 2), written from the
   paper's equations on top of the ops beside this file (``selective_scan.py``, ``conv.py``).
3. :class:`MouseGeneMambaBlock`: pre-norm residual block ``h + Mixer(RMSNorm(h))``.
4. :class:`MouseGeneMambaCache`: the recurrent state used by ``generate`` (conv window + SSM state per block).
5. :class:`MouseGeneMambaModel` and the heads: causal LM (the paper's next-gene prediction), masked LM (the
   paper's comparison), sequence classification (cell type from the cell embedding) and perturbation prediction.

Auto classes (registered by ``import hf_scfm``; written into ``config.json``'s ``auto_map`` by ``save_pretrained``, so
a checkpoint also loads with ``trust_remote_code=True`` where hf_scfm is not installed): ``AutoConfig``,
``AutoModel`` -> :class:`MouseGeneMambaModel`, ``AutoModelForCausalLM`` and ``AutoModelForPreTraining`` ->
:class:`MouseGeneMambaForCausalLM`, ``AutoModelForMaskedLM`` -> :class:`MouseGeneMambaForMaskedLM` (vocabulary
logits, as the class means in transformers), ``AutoModelForSequenceClassification`` ->
:class:`MouseGeneMambaForSequenceClassification`, ``hf_scfm.AutoModelForPerturbationPrediction`` ->
:class:`MouseGeneMambaForPerturbationPrediction` (without hf_scfm: ``get_class_from_dynamic_module(
"modeling_mouse_genemamba.MouseGeneMambaForPerturbationPrediction", repo)``). The mapping is
:data:`~.configuration_mouse_genemamba.MOUSE_GENEMAMBA_AUTO_MAP`.

Padding: tokenizers pad on the right with ``<pad>`` and an ``attention_mask``. Every block zeroes padded
positions of its inner stream before the causal convolution and again before the selective scan, so padding
adds nothing to the SSM state: a real token's output is the same whether its cell is batched with longer cells
or not, on the right (causality) and on the left (the state stays exactly zero through leading padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.generation.utils import ALL_CACHE_NAMES
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_mouse_genemamba import MOUSE_GENEMAMBA_AUTO_MAP, MouseGeneMambaConfig
from .conv import causal_conv1d, causal_conv1d_channels_last, causal_conv1d_update
from .dispatch import resolve_kernel
from .selective_scan import selective_scan, selective_scan_time_major, selective_state_update
from .special_tokens import IGNORE_INDEX, SPECIAL_TOKENS

# The keyword under which this transformers' `generate` carries a recurrent cache from step to step (and reorders it
# for beam search): `cache` since transformers 5.24, `cache_params` before. The model's own keyword is `cache`.
_GENERATE_CACHE_KEY = "cache" if "cache" in ALL_CACHE_NAMES else "cache_params"

# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------


@dataclass
class MouseGeneMambaModelOutput(ModelOutput):
    """Output of :class:`MouseGeneMambaModel`.

    Args:
        last_hidden_state: ``[B, L, d]`` after the final RMSNorm.
        hidden_states: with ``output_hidden_states=True``: the embedding output and the output of every block
            (before the final norm), ``num_hidden_layers + 1`` tensors of ``[B, L, d]``.
        cell_embedding: ``[B, d]`` pooled over real tokens as ``config.pooling`` says. ``None`` in cached decoding
            steps (a one-token step has no sentence to pool).
        cache: the recurrent state after this call (with ``use_cache=True``).
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    cell_embedding: torch.Tensor | None = None
    cache: MouseGeneMambaCache | None = None


@dataclass
class MouseGeneMambaCausalLMOutput(ModelOutput):
    """Output of :class:`MouseGeneMambaForCausalLM`: ``loss`` (next-gene cross-entropy, with ``labels``),
    ``logits`` ``[B, L, vocab_size]``, ``hidden_states``, ``cell_embedding``, ``cache``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    cell_embedding: torch.Tensor | None = None
    cache: MouseGeneMambaCache | None = None


@dataclass
class MouseGeneMambaMaskedLMOutput(ModelOutput):
    """Output of :class:`MouseGeneMambaForMaskedLM`: ``loss`` (cross-entropy at masked positions), ``logits``,
    ``hidden_states``, ``cell_embedding``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    cell_embedding: torch.Tensor | None = None


@dataclass
class MouseGeneMambaSequenceClassifierOutput(ModelOutput):
    """Output of :class:`MouseGeneMambaForSequenceClassification`: ``loss``, ``logits`` ``[B, num_labels]``,
    ``hidden_states``, ``cell_embedding``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    cell_embedding: torch.Tensor | None = None


@dataclass
class MouseGeneMambaPerturbationOutput(ModelOutput):
    """Output of :class:`MouseGeneMambaForPerturbationPrediction`.

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


# --------------------------------------------------------------------------------------------------------------
# Pieces every family shares (copied into the others' modeling files, checked by utils/check_copies.py)
# --------------------------------------------------------------------------------------------------------------


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


def _masked_mse(predictions: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """MSE over the ``keep`` positions, in at least float32; a zero that still carries the graph when nothing is
    kept (no NaN)."""
    if not bool(keep.any()):
        return predictions.sum() * 0.0
    dtype = torch.promote_types(predictions.dtype, torch.float32)
    return F.mse_loss(predictions[keep].to(dtype), labels[keep].to(dtype))


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


# --------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------


class MouseGeneMambaRMSNorm(nn.Module):
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


class MouseGeneMambaExpressionEmbedding(nn.Module):
    """Embeds the scalar expression value ``log1p(x_norm)`` of each token: ``fc2(SiLU(fc1(v)))``, ``1 -> d -> d``.

    A two-layer MLP rather than a single ``Linear(1, d)``: a single linear map of a scalar only moves every token
    along one fixed direction, while the MLP can place low and high expression in different directions.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(1, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(values.unsqueeze(-1))))


class MouseGeneMambaEmbeddings(nn.Module):
    """Token embedding of a rank-ordered cell sentence: gene embedding + expression embedding.

    The gene embedding carries gene identity; its position in the sentence carries the rank (Mamba is
    recurrent, so order needs no position table). With ``config.use_expression`` the embedding of the value
    (``log1p(x_norm)``, 0.0 at special tokens) is added, which is how the paper feeds "rank and magnitude"
    together. With ``use_expression=False`` (the paper's ablation) ``values`` are ignored and may be omitted.

    At ``<mask>`` positions (masked-LM inputs) the value is replaced by 0.0 before embedding, so a collator that
    leaves the masked gene's value in ``values`` cannot leak it.
    """

    def __init__(self, config: MouseGeneMambaConfig):
        super().__init__()
        self.use_expression = config.use_expression
        self.mask_token_id = config.mask_token_id
        self.gene_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.expression_embeddings = (
            MouseGeneMambaExpressionEmbedding(config.hidden_size) if config.use_expression else None
        )

    def forward(self, input_ids: torch.LongTensor, values: torch.Tensor | None) -> torch.Tensor:
        embeddings = self.gene_embeddings(input_ids)
        if self.expression_embeddings is None:
            return embeddings
        if values is None:
            raise ValueError(
                "This model was built with use_expression=True, so it needs the `values` the tokenizer returns next to "
                "`input_ids` (model(**tokenizer(adata, ...))). To use genes only, build the config with "
                "use_expression=False."
            )
        values = values.to(embeddings.dtype)
        if self.mask_token_id is not None:
            values = values.masked_fill(input_ids == self.mask_token_id, 0.0)
        return embeddings + self.expression_embeddings(values)


# Without gradients on the PyTorch path the mixer runs its rows in passes of about this many tokens: the buffers of
# one pass stay in cache (tiny preset, 2,048 tokens, one CPU thread: batch 32 went from 35 to 46 cells per CPU-second).
INFER_TOKENS_PER_PASS = 16384


class MouseGeneMambaMixer(nn.Module):
    """One Mamba-1 selective SSM layer (Gu & Dao 2023, section 3 and Algorithm 2).

    With ``d_inner = expand * d``, ``N = state_size``, ``R = time_step_rank``::

        x, z   = in_proj(h)                    # d -> 2 d_inner
        x      = SiLU(conv1d(x))               # depthwise causal conv, width conv_kernel
        Δ, B, C = x_proj(x)                    # d_inner -> R + 2N   (input-dependent: "selective")
        Δ      = softplus(dt_proj(Δ))          # R -> d_inner, bias initialised so softplus(bias) ∈ [dt_min, dt_max]
        A      = -exp(A_log)                   # [d_inner, N], S4D-real init A_log = log(1..N)
        h_t    = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t ;  y_t = C_t h_t + D x_t
        out    = out_proj(y * SiLU(z))         # d_inner -> d

    ``dt_proj`` is applied as an ordinary ``nn.Linear`` (bias included) before the scan, so every linear map is an
    ``nn.Linear`` that peft can wrap; the scan then only applies the softplus.
    """

    def __init__(self, config: MouseGeneMambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.state_size = config.state_size
        self.conv_kernel = config.conv_kernel
        self.time_step_rank = config.time_step_rank
        self.backend = config.ssm_backend

        self.in_proj = nn.Linear(self.hidden_size, 2 * self.intermediate_size, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            self.intermediate_size,
            self.intermediate_size,
            kernel_size=self.conv_kernel,
            groups=self.intermediate_size,
            padding=self.conv_kernel - 1,
            bias=config.use_conv_bias,
        )
        self.x_proj = nn.Linear(self.intermediate_size, self.time_step_rank + 2 * self.state_size, bias=False)
        self.dt_proj = nn.Linear(self.time_step_rank, self.intermediate_size, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.intermediate_size, self.state_size))
        self.D = nn.Parameter(torch.empty(self.intermediate_size))
        self.out_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.use_bias)

    def _A_D(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = -exp(A_log)`` and ``D``, in at least float32 (half-precision models keep the SSM in float32)."""
        dtype = torch.promote_types(self.A_log.dtype, torch.float32)
        return -torch.exp(self.A_log.to(dtype)), self.D.to(dtype)

    def _ssm_params(self, x: torch.Tensor):
        """``x [..., d_inner]`` -> ``Δ [..., d_inner]`` (before softplus), ``B``, ``C`` ``[..., N]``."""
        dt, B, C = torch.split(self.x_proj(x), [self.time_step_rank, self.state_size, self.state_size], dim=-1)
        return self.dt_proj(dt), B, C

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: MouseGeneMambaCache | None = None,
    ) -> torch.Tensor:
        if cache is not None and cache.seqlen_offset > 0:
            return self._step(hidden_states, cache)
        if cache is None and not torch.is_grad_enabled() and resolve_kernel("selective_scan", self.backend,
                                                                              hidden_states) is None:
            # inference: rows in passes of about INFER_TOKENS_PER_PASS tokens, so each pass's buffers stay in cache
            rows = max(1, INFER_TOKENS_PER_PASS // max(hidden_states.shape[1], 1))
            masks = [None] * hidden_states.shape[0] if attention_mask is None else attention_mask.split(rows)
            return torch.cat([self._forward_time_major(h, m) for h, m in zip(hidden_states.split(rows), masks)])

        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # [B, d_inner, L] each
        mask = None if attention_mask is None else attention_mask[:, None, :].to(x.dtype)
        if mask is not None:
            x = x * mask
        if cache is not None:
            cache.store_conv_window(self.layer_idx, x)
        conv_weight = self.conv1d.weight.squeeze(1)  # [d_inner, W]
        x = causal_conv1d(x, conv_weight, self.conv1d.bias, activation="silu", backend=self.backend)
        if mask is not None:
            x = x * mask
        dt, B, C = self._ssm_params(x.transpose(1, 2))
        A, D = self._A_D()
        y = selective_scan(
            x,
            dt.transpose(1, 2),
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=D,
            z=z,
            delta_softplus=True,
            return_last_state=cache is not None,
            backend=self.backend,
        )
        if cache is not None:
            y, last_state = y
            cache.ssm_states[self.layer_idx].copy_(last_state)
        return self.out_proj(y.transpose(1, 2).to(hidden_states.dtype))

    def _forward_time_major(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The same layer without gradients on the PyTorch path (inference), run time-major: ``[L, B, d]`` from
        ``in_proj`` to ``out_proj``, the layout the scan works in, so no ``[B, d_inner, L]`` transpose is ever
        made (for batch 1 the transposes of ``[B, L, d]`` at both ends are free views)."""
        x, z = self.in_proj(hidden_states.transpose(0, 1)).chunk(2, dim=-1)  # [L, B, d_inner] each
        mask = None if attention_mask is None else attention_mask.transpose(0, 1)[..., None].to(x.dtype)
        if mask is not None:
            x = x * mask
        x = causal_conv1d_channels_last(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
                                        time_dim=0)
        if mask is not None:
            x = x * mask
        dt, B, C = self._ssm_params(x)
        A, D = self._A_D()
        y = selective_scan_time_major(x, dt, A, B, C, D=D, z=z, delta_softplus=True)
        return self.out_proj(y.to(hidden_states.dtype)).transpose(0, 1)

    def _step(self, hidden_states: torch.Tensor, cache: MouseGeneMambaCache) -> torch.Tensor:
        """Recurrent mode: consume ``L`` new tokens one at a time from the cached conv window and SSM state."""
        conv_state = cache.conv_states[self.layer_idx]
        ssm_state = cache.ssm_states[self.layer_idx]
        conv_weight = self.conv1d.weight.squeeze(1)
        A, D = self._A_D()
        outputs = []
        for t in range(hidden_states.shape[1]):
            x, z = self.in_proj(hidden_states[:, t]).chunk(2, dim=-1)  # [B, d_inner] each
            x = causal_conv1d_update(
                x, conv_state, conv_weight, self.conv1d.bias, activation="silu", backend=self.backend
            )
            dt, B, C = self._ssm_params(x)
            y = selective_state_update(
                ssm_state, x, dt, A, B, C, D=D, z=z, dt_softplus=True, backend=self.backend
            )
            outputs.append(y)
        y = torch.stack(outputs, dim=1)
        return self.out_proj(y.to(hidden_states.dtype))


class MouseGeneMambaBlock(GradientCheckpointingLayer):
    """Pre-norm residual Mamba block: ``h + Mixer(RMSNorm(h))``."""

    def __init__(self, config: MouseGeneMambaConfig, layer_idx: int):
        super().__init__()
        self.norm = MouseGeneMambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = MouseGeneMambaMixer(config, layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: MouseGeneMambaCache | None = None,
    ) -> torch.Tensor:
        return hidden_states + self.mixer(self.norm(hidden_states), attention_mask, cache)


# --------------------------------------------------------------------------------------------------------------
# Recurrent state cache
# --------------------------------------------------------------------------------------------------------------


class MouseGeneMambaCache:
    """The recurrent state of every block, what a Mamba model carries from one token to the next.

    Per block ``i``: ``conv_states[i]`` ``[B, d_inner, conv_kernel]`` (the last ``conv_kernel`` inputs of the causal
    convolution, oldest first) and ``ssm_states[i]`` ``[B, d_inner, state_size]`` (at least float32). Its size does
    not grow with the sentence: that is the point of a recurrent model. ``seqlen_offset`` counts the tokens consumed.

    The first forward with an empty cache runs the whole prompt in parallel (the scan) and stores the final states;
    later forwards consume tokens recurrently. Continuation assumes each prompt's real tokens end in the last
    column (left padding or none); :meth:`MouseGeneMambaForCausalLM.generate` arranges that.
    """

    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        config: MouseGeneMambaConfig,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        d_inner = config.intermediate_size
        self.conv_states = [
            torch.zeros(batch_size, d_inner, config.conv_kernel, dtype=dtype, device=device)
            for _ in range(config.num_hidden_layers)
        ]
        state_dtype = torch.promote_types(dtype, torch.float32)  # float32 state under half precision
        self.ssm_states = [
            torch.zeros(batch_size, d_inner, config.state_size, dtype=state_dtype, device=device)
            for _ in range(config.num_hidden_layers)
        ]
        self.seqlen_offset = 0

    def store_conv_window(self, layer_idx: int, x: torch.Tensor) -> None:
        """Keep the last ``conv_kernel`` columns of the (masked) convolution input ``x [B, d_inner, L]``."""
        state = self.conv_states[layer_idx]
        width = state.shape[-1]
        window = F.pad(x, (max(width - x.shape[-1], 0), 0))[..., -width:]
        state.copy_(window)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seqlen_offset

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        for states in (self.conv_states, self.ssm_states):
            for i, s in enumerate(states):
                states[i] = s.index_select(0, beam_idx.to(s.device))

    def reset(self) -> None:
        for s in self.conv_states + self.ssm_states:
            s.zero_()
        self.seqlen_offset = 0


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


class MouseGeneMambaPreTrainedModel(PreTrainedModel):
    """Weights init and the pieces every Mouse-GeneMamba model shares."""

    config: MouseGeneMambaConfig
    config_class = MouseGeneMambaConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MouseGeneMambaBlock"]
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) for embeddings and linear maps, ones for norms, and Mamba's own init for the
        mixer: S4D-real ``A_log = log(1..N)``, ``D = 1``, ``dt_proj`` so that ``softplus(bias)`` is log-uniform in
        ``[time_step_min, time_step_max]``, PyTorch's default conv init, and (``rescale_prenorm_residual``)
        ``out_proj`` std divided by ``sqrt(num_hidden_layers)``; the perturbation flag embedding as its class says."""
        cfg = self.config
        std = cfg.initializer_range
        if isinstance(module, MouseGeneMambaMixer):
            n, d_inner = cfg.state_size, cfg.intermediate_size
            A = torch.arange(1, n + 1, dtype=torch.float32).expand(d_inner, n)
            init.copy_(module.A_log, torch.log(A))
            init.ones_(module.D)
            dt_std = cfg.time_step_rank**-0.5 * cfg.time_step_scale
            init.uniform_(module.dt_proj.weight, -dt_std, dt_std)
            log_min, log_max = math.log(cfg.time_step_min), math.log(cfg.time_step_max)
            dt = torch.exp(torch.rand(d_inner) * (log_max - log_min) + log_min).clamp(min=cfg.time_step_floor)
            init.copy_(module.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                bound = 1.0 / math.sqrt(cfg.conv_kernel)
                init.uniform_(module.conv1d.bias, -bound, bound)
            out_std = std / math.sqrt(cfg.num_hidden_layers) if cfg.rescale_prenorm_residual else std
            init.normal_(module.out_proj.weight, mean=0.0, std=out_std)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, MouseGeneMambaPerturbationEmbedding):
            # row 0 (not perturbed) zero, row 1 at the gene embedding's scale; sliced, so check the loaded flag here
            if not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight)
                init.normal_(module.weight[1], mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, MouseGeneMambaRMSNorm):
            init.ones_(module.weight)

    def _check_inputs(self, input_ids: torch.LongTensor, values: torch.Tensor | None, attention_mask) -> None:
        if input_ids is None:
            raise ValueError("input_ids is required (the `input_ids` a GeneTokenizer returns).")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}.")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(
                f"input_ids hold ids in [{int(input_ids.min())}, {int(input_ids.max())}] but the model's vocab_size is "
                f"{self.config.vocab_size}. The tokenizer does not match the model: use the tokenizer saved with the "
                "model, and check with hf_scfm.modeling.configuration_utils.check_tokenizer_matches(config, tokenizer)."
            )
        for name, t in (("values", values), ("attention_mask", attention_mask)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)} but input_ids has shape {tuple(input_ids.shape)}; pass the "
                    "tensors of one tokenizer call together."
                )


class MouseGeneMambaModel(MouseGeneMambaPreTrainedModel):
    """The Mouse-GeneMamba backbone: embeddings, ``num_hidden_layers`` Mamba blocks, final RMSNorm.

    Returns the last hidden states and a cell embedding over real tokens only (:func:`pool_cell_embedding` with
    ``config.pooling``: ``"mean"`` over
    positions with ``attention_mask == 1``, ``<bos>``/``<eos>`` included, since ``<eos>`` has read the whole
    sentence and ``<bos>`` adds the same vector to every cell; or ``"last"``: the last real token).
    """

    def __init__(self, config: MouseGeneMambaConfig):
        super().__init__(config)
        self.embeddings = MouseGeneMambaEmbeddings(config)
        self.layers = nn.ModuleList(MouseGeneMambaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = MouseGeneMambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.gene_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.gene_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: MouseGeneMambaCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        extra_embeddings: torch.Tensor | None = None,
    ) -> MouseGeneMambaModelOutput | tuple:
        """Args:
            input_ids: ``[B, L]`` gene/special token ids (tokenizer output).
            values: ``[B, L]`` float expression values (``log1p(x_norm)``; 0.0 at special tokens and padding).
                Required when ``config.use_expression``; ignored otherwise.
            attention_mask: ``[B, L]``, 1 = real token, 0 = padding.
            cache: a :class:`MouseGeneMambaCache` to continue from (recurrent decoding).
            use_cache: return the recurrent state (a new cache is made if none is passed). Default ``False``;
                ``generate`` turns it on.
            extra_embeddings: optional ``[B, L, d]`` added to the token embeddings before the first block (the
                perturbation head adds its perturbed-gene flag embedding this way).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = bool(use_cache) or cache is not None
        if self.gradient_checkpointing and self.training:
            use_cache, cache = False, None
        self._check_inputs(input_ids, values if self.config.use_expression else None, attention_mask)
        if attention_mask is not None and bool((attention_mask != 0).all()):
            attention_mask = None  # nothing to mask: skip the multiplications
        decoding = cache is not None and cache.seqlen_offset > 0

        hidden_states = self.embeddings(input_ids, values)
        if extra_embeddings is not None:
            hidden_states = hidden_states + extra_embeddings
        if use_cache and cache is None:
            cache = MouseGeneMambaCache(
                self.config, input_ids.shape[0], dtype=hidden_states.dtype, device=hidden_states.device
            )
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for block in self.layers:
            hidden_states = block(hidden_states, attention_mask=attention_mask, cache=cache)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm_f(hidden_states)
        if cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        cell_embedding = None if decoding else pool_cell_embedding(hidden_states, attention_mask, self.config.pooling)

        if not use_cache:
            cache = None
        if not return_dict:
            return tuple(v for v in (hidden_states, all_hidden_states, cell_embedding, cache) if v is not None)
        return MouseGeneMambaModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            cell_embedding=cell_embedding,
            cache=cache,
        )


def _token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy over positions with ``labels != -100`` (mean, or sum / ``num_items_in_batch`` as the HF
    Trainer passes it under gradient accumulation)."""
    logits = logits.reshape(-1, logits.shape[-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision -> float32
    labels = labels.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class _MouseGeneMambaWithGeneHead(MouseGeneMambaPreTrainedModel):
    """Backbone + ``lm_head`` over the gene vocabulary (tied to the gene embedding when
    ``config.tie_word_embeddings``): the shared part of the causal-LM and masked-LM heads."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.gene_embeddings.weight"}

    def __init__(self, config: MouseGeneMambaConfig):
        super().__init__(config)
        self.backbone = MouseGeneMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value


class MouseGeneMambaForCausalLM(_MouseGeneMambaWithGeneHead, GenerationMixin):
    """Next-gene prediction on the rank-ordered cell sentence (the paper's pretraining objective).

    ``labels`` are ``input_ids`` with padding set to -100 (the next-gene collator does that); the model shifts them
    inside, so position ``t`` is scored on token ``t + 1``. The LM head is an ``nn.Linear`` tied to the gene
    embedding when ``config.tie_word_embeddings`` (the default).

    Generation (:meth:`generate`, the standard ``GenerationMixin`` API: greedy, sampling with ``temperature`` /
    ``top_k`` / ``top_p``, beam search) runs the prompt through the parallel scan once and then steps the
    recurrent state (:class:`MouseGeneMambaCache`), so each new gene costs O(1) in the sentence length.
    Generated positions get the expression value ``config.generated_value`` (default 0.0, the value of special
    tokens: the model predicts which gene comes next, not its value). Prompts as the tokenizer returns them
    (right-padded) are accepted: :meth:`generate` moves each prompt's padding to its left before starting, so the
    returned ``sequences`` are left-padded. A tokenized cell ends with ``<eos>``; to continue a cell, cut the
    prompt before its ``<eos>``.
    """

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: MouseGeneMambaCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> MouseGeneMambaCausalLMOutput | tuple:
        """``labels``: ``[B, L]`` int64, -100 where ignored; shifted inside. ``logits_to_keep``: if > 0, only the
        last that many positions get logits (``generate`` uses 1). Other keyword arguments: ``num_items_in_batch``
        from the HF Trainer (loss normalisation under gradient accumulation); the rest are ignored."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.backbone(
            input_ids,
            values=values,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            if labels is not None:
                raise ValueError("logits_to_keep cannot be combined with labels: the loss needs every position.")
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}.")
            loss = _token_cross_entropy(logits[:, :-1], labels[:, 1:], kwargs.get("num_items_in_batch"))

        if not return_dict:
            out = (logits, outputs.hidden_states, outputs.cell_embedding, outputs.cache)
            out = tuple(v for v in out if v is not None)
            return (loss,) + out if loss is not None else out
        return MouseGeneMambaCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            cell_embedding=outputs.cell_embedding,
            cache=outputs.cache,
        )

    # ---- generation -------------------------------------------------------------------------------------------

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs: dict, *args, **kwargs) -> dict:
        # transformers >= 5.24 carries ``outputs.cache`` to the next step itself; older 5.x releases look for
        # ``cache_params`` and would silently decode without the cache (and beam search would not reorder it).
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if outputs.get("cache") is not None:
            model_kwargs[_GENERATE_CACHE_KEY] = outputs["cache"]
        return model_kwargs

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The forward builds its own MouseGeneMambaCache on the first (prefill) call; no KV cache is wanted.
        return False

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: MouseGeneMambaCache | None = None,
        use_cache: bool | None = None,
        next_sequence_length: int | None = None,
        is_first_iteration: bool | None = False,
        logits_to_keep: int | None = None,
        **kwargs,
    ) -> dict:
        """Prefill: the whole prompt (with its ``values`` and ``attention_mask``). Later steps with the cache: only the
        newest token, valued ``config.generated_value``. Without a cache: every token so far, the generated ones
        valued ``config.generated_value``."""
        if cache is None:
            cache = kwargs.get(_GENERATE_CACHE_KEY)
        if values is not None:
            values = values.to(self.device)
        if cache is not None and cache.seqlen_offset > 0:
            n_new = next_sequence_length or 1
            input_ids = input_ids[:, -n_new:]
            if values is not None:
                values = values.new_full(input_ids.shape, self.config.generated_value)
            attention_mask = None  # generated tokens are real tokens
        elif values is not None and values.shape[1] < input_ids.shape[1]:
            n_gen = input_ids.shape[1] - values.shape[1]
            extra = values.new_full((values.shape[0], n_gen), self.config.generated_value)
            values = torch.cat([values, extra], dim=1)
        inputs = {
            "input_ids": input_ids.to(self.device),
            "values": values if self.config.use_expression else None,
            "attention_mask": None if attention_mask is None else attention_mask.to(self.device),
            "cache": cache,
            "use_cache": use_cache,
        }
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """``GenerationMixin.generate`` for cell sentences: ``model.generate(**enc, max_new_tokens=20)`` or
        ``model.generate(input_ids, max_new_tokens=20, do_sample=True, top_k=50)``.

        ``values`` (required when ``config.use_expression``) are the prompt's values; generated positions get
        ``config.generated_value``. Right-padded prompts (the tokenizer's layout) are moved to left padding first,
        so the returned sequences are left-padded: ``[pad…, prompt, generated]``.
        """
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise ValueError("generate needs input_ids (a tokenized prompt).")
        if self.config.use_expression and values is None:
            raise ValueError(
                "This model uses expression values (use_expression=True): pass the prompt's `values` to generate, "
                "e.g. model.generate(**tokenizer(adata, ...), max_new_tokens=...)."
            )
        pad = self.config.pad_token_id
        if attention_mask is None and pad is not None and bool((input_ids == pad).any()):
            attention_mask = (input_ids != pad).long()
        if attention_mask is not None:
            input_ids, values, attention_mask = _left_align(input_ids, values, attention_mask)
        if values is not None:
            kwargs["values"] = values
        return super().generate(input_ids, attention_mask=attention_mask, **kwargs)


def _left_align(input_ids: torch.Tensor, values: torch.Tensor | None, attention_mask: torch.Tensor):
    """Move each row's padding to its left (recurrent decoding continues from the last column).

    Accepts right padding, left padding or none; a mask with holes (0 between real tokens) raises.
    """
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}."
        )
    mask = attention_mask != 0
    n_real = mask.sum(dim=1)
    length = mask.shape[1]
    positions = torch.arange(length, device=mask.device)
    right_padded = mask == (positions[None, :] < n_real[:, None])
    left_padded = mask == (positions[None, :] >= (length - n_real)[:, None])
    if bool(left_padded.all()):
        return input_ids, values, attention_mask
    if not bool(right_padded.all()):
        raise ValueError(
            "attention_mask has padding between real tokens; generate needs each prompt's real tokens to be "
            "contiguous (left or right padding, as the tokenizer returns them)."
        )
    shift = (length - n_real)[:, None]
    index = (positions[None, :] - shift) % length
    aligned = [t.gather(1, index) if t is not None else None for t in (input_ids, values, attention_mask)]
    return tuple(aligned)


class MouseGeneMambaForMaskedLM(_MouseGeneMambaWithGeneHead):
    """Masked gene prediction: the paper's MLM comparison (its Table 1), with the same unidirectional backbone.

    Inputs carry ``<mask>`` (id 1) at masked gene positions (the gene-MLM collator masks 15% of genes); ``labels``
    hold the original ids there and -100 elsewhere. The prediction for position ``t`` reads the hidden state at
    ``t``, which has seen tokens ``≤ t`` only: a Mamba block is causal, and the paper compares NTP and MLM on the
    same Mamba, not a bidirectional variant. No shift. The head is tied to the gene embedding as configured.
    """

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MouseGeneMambaMaskedLMOutput | tuple:
        """``labels``: ``[B, L]`` int64, original ids at masked positions, -100 elsewhere. Keyword
        ``num_items_in_batch`` (HF Trainer) normalises the summed loss; other keywords are ignored."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.backbone(
            input_ids,
            values=values,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}.")
            loss = _token_cross_entropy(logits, labels, kwargs.get("num_items_in_batch"))
        if not return_dict:
            out = tuple(v for v in (logits, outputs.hidden_states, outputs.cell_embedding) if v is not None)
            return (loss,) + out if loss is not None else out
        return MouseGeneMambaMaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, cell_embedding=outputs.cell_embedding
        )


class MouseGeneMambaForSequenceClassification(MouseGeneMambaPreTrainedModel):
    """Cell-type classification (the paper's downstream task) from the cell embedding.

    Head: ``Linear(d, d) -> GELU -> Dropout(classifier_dropout) -> Linear(d, num_labels)`` on the backbone's
    ``cell_embedding``. Loss follows ``config.problem_type`` as in transformers: regression
    (MSE) when ``num_labels == 1``, single-label cross-entropy for integer labels, multi-label BCE for float labels
    of shape ``[B, num_labels]``. Put the label names in ``id2label`` / ``label2id``.
    """

    def __init__(self, config: MouseGeneMambaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.backbone = MouseGeneMambaModel(config)
        self.classifier = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.GELU(),
            nn.Dropout(config.classifier_dropout),
            nn.Linear(config.hidden_size, config.num_labels),
        )
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MouseGeneMambaSequenceClassifierOutput | tuple:
        """``labels``: ``[B]`` int64 class ids (or floats for regression / multi-label)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.backbone(
            input_ids,
            values=values,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(outputs.cell_embedding)
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(self.config, logits, labels)
        if not return_dict:
            out = tuple(v for v in (logits, outputs.hidden_states, outputs.cell_embedding) if v is not None)
            return (loss,) + out if loss is not None else out
        return MouseGeneMambaSequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, cell_embedding=outputs.cell_embedding
        )


class MouseGeneMambaPerturbationEmbedding(nn.Embedding):
    """The perturbed-gene flag embedding: 2 rows of width ``d`` (0 = not perturbed, 1 = perturbed) added to every
    token's embedding. Row 0 starts at zero, so an unflagged sentence is the backbone's own input; row 1 starts at the
    scale of the token embedding it is added to (``_init_weights``): a flag far smaller than the tokens would spend
    the first fine-tuning steps growing."""

    def __init__(self, config: MouseGeneMambaConfig):
        super().__init__(2, config.hidden_size)


class MouseGeneMambaPerturbationHead(nn.Module):
    """Per-position MLP ``Linear(d, d) -> GELU -> Linear(d, 1)`` regressing the perturbed ``log1p`` value, divided by
    ``config.perturbation_value_scale``: the data's values span about ``[0, 1 / scale]``, so a unit-scale output
    covers their range."""

    def __init__(self, config: MouseGeneMambaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, 1)
        self.value_scale = config.perturbation_value_scale

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.out_proj(F.gelu(self.dense(hidden_states))).squeeze(-1) / self.value_scale


class MouseGeneMambaForPerturbationPrediction(MouseGeneMambaPreTrainedModel):
    """Predict a perturbed cell's ``log1p`` profile from a control cell and the perturbed genes (the SC-MAMBA2
    paper's set-up, its section 4.5, on this family's backbone).

    Inputs: ``values`` = the control cell's ``log1p(x_norm)`` values (every gene of the panel, zeros included, so a
    perturbed gene has a position), ``perturbation_flags`` ``[B, L]`` int (1 = this gene is perturbed, 0 = not;
    ignored at padding; ``None`` = nothing perturbed). :class:`MouseGeneMambaPerturbationEmbedding` of the flags is
    added to every token's embedding (``extra_embeddings`` of the backbone), and
    :class:`MouseGeneMambaPerturbationHead` regresses the perturbed value at every position from the last hidden
    state. ``predictions`` are 0 at special tokens (ids < 6) and padding. Loss: MSE over real gene positions where
    ``labels != -100``.

    ``from_pretrained`` of a pretraining checkpoint keeps the backbone and initialises the flag embedding and the
    head; ``hf_scfm.tasks.perturbation`` builds, fine-tunes and evaluates it on GEARS-layout data.
    """

    def __init__(self, config: MouseGeneMambaConfig):
        super().__init__(config)
        self.backbone = MouseGeneMambaModel(config)
        self.perturbation_embedding = MouseGeneMambaPerturbationEmbedding(config)
        self.perturbation_head = MouseGeneMambaPerturbationHead(config)
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
    ) -> MouseGeneMambaPerturbationOutput | tuple:
        """``labels``: ``[B, L]`` float, the perturbed cell's value per token, -100 where ignored."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        flags = _perturbation_flags(perturbation_flags, input_ids, attention_mask)
        out = self.backbone(
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
        return MouseGeneMambaPerturbationOutput(
            loss=loss,
            predictions=predictions,
            hidden_states=out.hidden_states,
            cell_embedding=out.cell_embedding,
            last_hidden_state=out.last_hidden_state,
        )


# Remote code: a model class with an Auto class makes ``save_pretrained`` / ``push_to_hub`` copy this file and the files
# it imports (``from .x import y``) next to the weights, and the config writes MOUSE_GENEMAMBA_AUTO_MAP into
# ``config.json``'s ``auto_map``. ``_auto_class`` is what ``register_for_auto_class`` sets; it is set directly because
# that method accepts transformers' own Auto class names only (tests/test_remote_code.py pins the behaviour).
for _auto_class, _reference in MOUSE_GENEMAMBA_AUTO_MAP.items():
    _class = globals()[_reference.rsplit(".", 1)[1]]
    if "_auto_class" not in vars(_class):
        _class._auto_class = _auto_class
del _auto_class, _reference, _class


__all__ = [
    "MouseGeneMambaCache",
    "MouseGeneMambaCausalLMOutput",
    "MouseGeneMambaForCausalLM",
    "MouseGeneMambaForMaskedLM",
    "MouseGeneMambaForPerturbationPrediction",
    "MouseGeneMambaForSequenceClassification",
    "MouseGeneMambaMaskedLMOutput",
    "MouseGeneMambaModel",
    "MouseGeneMambaModelOutput",
    "MouseGeneMambaPerturbationOutput",
    "MouseGeneMambaPreTrainedModel",
    "MouseGeneMambaSequenceClassifierOutput",
]
