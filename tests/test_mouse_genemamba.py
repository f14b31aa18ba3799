"""Mouse-GeneMamba: config, backbone, heads, cache/generation, save/load, and learning on real mouse cells.

Synthetic tests use a 64-token vocabulary so they run in milliseconds; the real-data tests tokenize 64
``baron_mouse`` cells with the mouse rank tokenizer.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

import hf_scfm
from hf_scfm.modeling.configuration_utils import check_tokenizer_matches
from hf_scfm.modeling.mouse_genemamba import (
    MouseGeneMambaCache,
    MouseGeneMambaConfig,
    MouseGeneMambaForCausalLM,
    MouseGeneMambaForMaskedLM,
    MouseGeneMambaForSequenceClassification,
    MouseGeneMambaModel,
)
from hf_scfm.tokenization.special_tokens import BOS_TOKEN_ID, EOS_TOKEN_ID, MASK_TOKEN_ID, MOUSE_VOCAB_SIZE, PAD_TOKEN_ID

V = 64  # synthetic vocabulary: 6 specials + 58 "genes"


def tiny(**overrides) -> MouseGeneMambaConfig:
    kw = dict(vocab_size=V)
    kw.update(overrides)
    return MouseGeneMambaConfig.from_preset("tiny", **kw)


def sentences(lengths, seed=0, vocab=V):
    """Right-padded rank-style batch: <bos> genes... <eos>, values log1p-like and 0 at specials/padding."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.full((len(lengths), L), PAD_TOKEN_ID, dtype=torch.long)
    vals = torch.zeros(len(lengths), L)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 0] = BOS_TOKEN_ID
        ids[i, 1 : n - 1] = torch.randperm(vocab - 6, generator=g)[: n - 2] + 6
        ids[i, n - 1] = EOS_TOKEN_ID
        vals[i, 1 : n - 1] = torch.rand(n - 2, generator=g) * 3 + 0.5
        mask[i, :n] = 1
    return ids, vals, mask


def model_of(cls, seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    return cls(tiny(**overrides)).to(dtype).eval()


# ---------------------------------------------------------------------------------------------------- config


def test_presets_and_config_validation():
    cfg = MouseGeneMambaConfig.from_preset("tiny")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.state_size) == (64, 2, 8)
    assert cfg.time_step_rank == 4 and cfg.intermediate_size == 128
    assert cfg.vocab_size == MOUSE_VOCAB_SIZE == 78_323
    big = MouseGeneMambaConfig.from_preset("mouse-geneformer")
    assert (big.hidden_size, big.num_hidden_layers, big.max_input_length) == (256, 6, 2048)
    assert MouseGeneMambaConfig.from_preset("tiny", num_hidden_layers=3).num_hidden_layers == 3
    with pytest.raises(ValueError, match="Available presets"):
        MouseGeneMambaConfig.from_preset("huge")
    with pytest.raises(ValueError, match="pooling"):
        MouseGeneMambaConfig(pooling="max")
    with pytest.raises(ValueError, match="ssm_backend"):
        MouseGeneMambaConfig(ssm_backend="triton")
    # the mouse-geneformer backbone has roughly Geneformer's 6 x 0.52 M block parameters
    torch.manual_seed(0)
    n_block = sum(p.numel() for p in MouseGeneMambaModel(MouseGeneMambaConfig(vocab_size=V)).layers.parameters())
    assert 2.2e6 < n_block < 3.2e6


def test_public_api_and_auto_classes():
    for name in (
        "MouseGeneMambaConfig",
        "MouseGeneMambaModel",
        "MouseGeneMambaForCausalLM",
        "MouseGeneMambaForMaskedLM",
        "MouseGeneMambaForSequenceClassification",
        "MouseGeneMambaForPerturbationPrediction",
    ):
        assert hasattr(hf_scfm, name), name
    cfg = tiny()
    assert type(AutoConfig.for_model("mouse_genemamba", vocab_size=V)) is MouseGeneMambaConfig
    assert type(AutoModel.from_config(cfg)) is MouseGeneMambaModel
    assert type(AutoModelForCausalLM.from_config(cfg)) is MouseGeneMambaForCausalLM
    assert type(AutoModelForMaskedLM.from_config(cfg)) is MouseGeneMambaForMaskedLM
    assert type(AutoModelForSequenceClassification.from_config(cfg)) is MouseGeneMambaForSequenceClassification


def test_init_follows_mamba():
    m = model_of(MouseGeneMambaModel, dtype=torch.float32, time_step_min=0.01, time_step_max=0.05)
    mixer = m.layers[0].mixer
    n = m.config.state_size
    assert torch.equal(mixer.A_log[3], torch.log(torch.arange(1, n + 1, dtype=torch.float32)))
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 0.01 * 0.999 and dt.max() <= 0.05 * 1.001
    assert torch.all(m.embeddings.gene_embeddings.weight[PAD_TOKEN_ID] == 0)


# ---------------------------------------------------------------------------------------------------- forward


def _mixer_by_the_equations(mixer, h, mask):
    """Mamba-1 mixer written out token by token from the paper's equations (float64, no ops)."""
    F = torch.nn.functional
    x, z = mixer.in_proj(h).chunk(2, dim=-1)  # [B, L, Di]
    x = x * mask[..., None]
    W = mixer.conv1d.weight[:, 0]  # [Di, K]
    K = W.shape[1]
    B_, L, Di = x.shape
    state = torch.zeros(B_, Di, mixer.A_log.shape[1], dtype=h.dtype)
    A = -torch.exp(mixer.A_log)
    ys = []
    for t in range(L):
        past = [x[:, s] if s >= 0 else torch.zeros_like(x[:, 0]) for s in range(t - K + 1, t + 1)]
        window = torch.stack(past, -1)  # [B, Di, K], oldest first
        xc = F.silu((window * W).sum(-1) + mixer.conv1d.bias) * mask[:, t, None]
        dt_r, Bt, Ct = torch.split(mixer.x_proj(xc), [mixer.time_step_rank, mixer.state_size, mixer.state_size], -1)
        dt = F.softplus(mixer.dt_proj(dt_r))  # [B, Di]
        state = torch.exp(dt[..., None] * A) * state + (dt * xc)[..., None] * Bt[:, None, :]
        y = (state * Ct[:, None, :]).sum(-1) + mixer.D * xc
        ys.append(y * F.silu(z[:, t]))
    return mixer.out_proj(torch.stack(ys, 1))


def test_mixer_implements_the_mamba_equations():
    m = model_of(MouseGeneMambaModel, initializer_range=0.3)
    mixer = m.layers[1].mixer
    _, _, mask = sentences([13, 6, 9], seed=14)
    h = torch.randn(3, 13, m.config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        got = mixer(h, mask.double())
        expect = _mixer_by_the_equations(mixer, h, mask.double())
    real = mask.bool()
    assert torch.allclose(got[real], expect[real], atol=1e-12, rtol=1e-10)


def test_no_grad_time_major_path_matches_training_path_and_equations(monkeypatch):
    """Without gradients the mixer runs time-major (``_forward_time_major``); with them the [B, d_inner, L] path
    with the scan's backward. Both give the equations' numbers (float64, odd lengths, padding, batch 3), and so does
    the whole model, padded in a batch or alone."""
    m = model_of(MouseGeneMambaModel, initializer_range=0.3)
    mixer = m.layers[0].mixer
    _, _, mask = sentences([13, 6, 9], seed=15)
    h = torch.randn(3, 13, m.config.hidden_size, dtype=torch.float64)
    calls = []
    real_forward = type(mixer)._forward_time_major
    monkeypatch.setattr(type(mixer), "_forward_time_major", lambda self, *a: calls.append(1) or real_forward(self, *a))
    expect = _mixer_by_the_equations(mixer, h, mask.double()).detach()
    with torch.no_grad():
        fast = mixer(h, mask.double())
    assert len(calls) == 1
    train = mixer(h, mask.double())
    assert len(calls) == 1 and train.requires_grad
    real = mask.bool()
    for got in (fast, train.detach()):
        torch.testing.assert_close(got[real], expect[real], atol=1e-12, rtol=1e-10)
    ids, vals, mask = sentences([11, 6, 9], seed=16)
    import hf_scfm.modeling.mouse_genemamba.modeling_mouse_genemamba as modeling

    monkeypatch.setattr(modeling, "INFER_TOKENS_PER_PASS", 22)  # 2 rows of 11 tokens per pass: passes of 2 and 1
    calls.clear()
    with torch.no_grad():
        batch = m(ids, values=vals, attention_mask=mask)
    assert len(calls) == 2 * m.config.num_hidden_layers
    with torch.no_grad():
        for r, n in enumerate((11, 6, 9)):
            alone = m(ids[r : r + 1, :n], values=vals[r : r + 1, :n], attention_mask=mask[r : r + 1, :n])
            torch.testing.assert_close(batch.cell_embedding[r], alone.cell_embedding[0], atol=1e-12, rtol=1e-10)
    with_grad = m(ids, values=vals, attention_mask=mask)
    torch.testing.assert_close(with_grad.cell_embedding.detach(), batch.cell_embedding, atol=1e-12, rtol=1e-10)


def test_causal_lm_loss_is_shifted_cross_entropy_ignoring_padding():
    m = model_of(MouseGeneMambaForCausalLM)
    ids, vals, mask = sentences([9, 6])
    labels = ids.masked_fill(mask == 0, -100)
    out = m(ids, values=vals, attention_mask=mask, labels=labels)
    assert list(out.keys())[:2] == ["loss", "logits"]
    logp = out.logits.log_softmax(-1)
    terms = [-logp[b, t, ids[b, t + 1]] for b in range(2) for t in range(ids.shape[1] - 1) if mask[b, t + 1]]
    assert torch.allclose(out.loss, torch.stack(terms).mean(), atol=1e-12)
    summed = m(ids, values=vals, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(5))
    assert torch.allclose(summed.loss, torch.stack(terms).sum() / 5, atol=1e-12)
    tup = m(ids, values=vals, attention_mask=mask, labels=labels, return_dict=False)
    assert torch.equal(tup[0], out.loss) and torch.equal(tup[1], out.logits)


def test_masked_lm_loss_only_at_masked_positions_and_hides_masked_values():
    m = model_of(MouseGeneMambaForMaskedLM)
    ids, vals, mask = sentences([10, 10])
    masked = ids.clone()
    masked[:, [2, 5]] = MASK_TOKEN_ID
    labels = torch.full_like(ids, -100)
    labels[:, [2, 5]] = ids[:, [2, 5]]
    out = m(masked, values=vals, attention_mask=mask, labels=labels)
    logp = out.logits.log_softmax(-1)
    manual = -torch.stack([logp[b, t, ids[b, t]] for b in range(2) for t in (2, 5)]).mean()
    assert torch.allclose(out.loss, manual, atol=1e-12)
    # the value left at a <mask> position does not reach the model
    vals2 = vals.clone()
    vals2[:, [2, 5]] = 123.0
    assert torch.equal(m(masked, values=vals2, attention_mask=mask).logits, out.logits)


def test_padding_invariance_right_and_left():
    for pooling in ("mean", "last"):
        m = model_of(MouseGeneMambaForCausalLM, pooling=pooling)
        ids, vals, mask = sentences([7, 12], seed=1)
        batch = m(ids, values=vals, attention_mask=mask)
        alone = m(ids[:1, :7], values=vals[:1, :7], attention_mask=mask[:1, :7])
        assert torch.allclose(batch.logits[0, :7], alone.logits[0], atol=1e-10)
        assert torch.allclose(batch.cell_embedding[0], alone.cell_embedding[0], atol=1e-10)
        # left padding (generate's layout) leaves the SSM state at exactly zero before the first real token
        left = m(
            torch.cat([ids.new_zeros(1, 5), ids[:1, :7]], 1),
            values=torch.cat([vals.new_zeros(1, 5), vals[:1, :7]], 1),
            attention_mask=torch.cat([mask.new_zeros(1, 5), mask[:1, :7]], 1),
        )
        assert torch.allclose(left.logits[0, 5:], alone.logits[0], atol=1e-10)
        assert torch.allclose(left.cell_embedding[0], alone.cell_embedding[0], atol=1e-10)


def test_cell_embedding_pooling_definitions():
    ids, vals, mask = sentences([5, 8], seed=2)
    mean = model_of(MouseGeneMambaModel)(ids, values=vals, attention_mask=mask)
    assert torch.allclose(mean.cell_embedding[0], mean.last_hidden_state[0, :5].mean(0), atol=1e-12)
    last = model_of(MouseGeneMambaModel, pooling="last")(ids, values=vals, attention_mask=mask)
    assert torch.equal(last.cell_embedding[0], last.last_hidden_state[0, 4])
    assert torch.equal(last.cell_embedding[1], last.last_hidden_state[1, 7])
    hs = model_of(MouseGeneMambaModel)(ids, values=vals, attention_mask=mask, output_hidden_states=True)
    assert len(hs.hidden_states) == 3


def test_expression_matters_when_on_and_is_ignored_when_off():
    ids, vals, mask = sentences([9, 9], seed=3)
    other = vals * 2.0 + 0.3
    on = model_of(MouseGeneMambaForCausalLM)
    diff = (on(ids, values=vals).logits - on(ids, values=other).logits).abs().max()
    assert diff > 1e-3
    with pytest.raises(ValueError, match="use_expression=False"):
        on(ids)
    off = model_of(MouseGeneMambaForCausalLM, use_expression=False)
    assert off.backbone.embeddings.expression_embeddings is None
    ref = off(ids).logits
    assert torch.equal(off(ids, values=vals).logits, ref)
    assert torch.equal(off(ids, values=other).logits, ref)


def test_bad_inputs_raise_clear_errors():
    m = model_of(MouseGeneMambaForCausalLM)
    ids, vals, mask = sentences([6])
    with pytest.raises(ValueError, match="vocab_size is 64"):
        m(ids + V, values=vals)
    with pytest.raises(ValueError, match="values has shape"):
        m(ids, values=vals[:, :-1])
    with pytest.raises(ValueError, match="labels shape"):
        m(ids, values=vals, labels=ids[:, :-1])


def test_sequence_classification_head_and_problem_types():
    ids, vals, mask = sentences([6, 9, 7], seed=4)
    m = model_of(MouseGeneMambaForSequenceClassification, num_labels=3)
    out = m(ids, values=vals, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
    assert out.logits.shape == (3, 3) and m.config.problem_type == "single_label_classification"
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2, 1])))
    assert torch.allclose(out.logits, m.classifier(out.cell_embedding))
    with pytest.raises(ValueError, match="num_labels is 3"):
        m(ids, values=vals, attention_mask=mask, labels=torch.tensor([0, 3, 1]))
    reg = model_of(MouseGeneMambaForSequenceClassification, num_labels=1)
    r = reg(ids, values=vals, attention_mask=mask, labels=torch.tensor([0.5, 1.0, 2.0]))
    assert reg.config.problem_type == "regression"
    assert torch.allclose(r.loss, ((r.logits[:, 0] - torch.tensor([0.5, 1.0, 2.0], dtype=r.logits.dtype)) ** 2).mean())
    multi = model_of(MouseGeneMambaForSequenceClassification, num_labels=2)
    mo = multi(ids, values=vals, attention_mask=mask, labels=torch.tensor([[1.0, 0.0], [0, 1], [1, 1]]))
    assert multi.config.problem_type == "multi_label_classification" and mo.loss > 0


# ---------------------------------------------------------------------------------------------------- backends


def test_torch_and_auto_backends_agree_on_cpu():
    ids, vals, mask = sentences([11, 7], seed=5)
    a = model_of(MouseGeneMambaForCausalLM, ssm_backend="torch")
    b = model_of(MouseGeneMambaForCausalLM, ssm_backend="auto")
    b.load_state_dict(a.state_dict())
    oa, ob = a(ids, values=vals, attention_mask=mask), b(ids, values=vals, attention_mask=mask)
    assert torch.allclose(oa.logits, ob.logits, atol=1e-10)
    assert torch.allclose(oa.cell_embedding, ob.cell_embedding, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_backend_agrees_with_torch_reference():
    ids, vals, mask = sentences([37, 21, 30], seed=6)
    ref = model_of(MouseGeneMambaForCausalLM, dtype=torch.float64, ssm_backend="torch")
    expect = ref(ids, values=vals, attention_mask=mask)
    for backend in ("auto", "cuda"):
        m = model_of(MouseGeneMambaForCausalLM, dtype=torch.float32, ssm_backend=backend).cuda()
        m.load_state_dict(ref.state_dict())
        got = m(ids.cuda(), values=vals.cuda(), attention_mask=mask.cuda())
        assert torch.allclose(got.logits.double().cpu(), expect.logits, atol=2e-3, rtol=2e-3)
        assert torch.allclose(got.cell_embedding.double().cpu(), expect.cell_embedding, atol=2e-3, rtol=2e-3)
        gen = m.generate(ids.cuda(), values=vals.cuda(), attention_mask=mask.cuda(), max_new_tokens=5)
        assert gen.shape == (3, 37 + 5)


# ---------------------------------------------------------------------------------------------------- cache / generate


def test_recurrent_cache_matches_parallel_forward():
    m = model_of(MouseGeneMambaForCausalLM, initializer_range=0.5)
    ids, vals, _ = sentences([13], seed=7)
    full = m(ids, values=vals).logits
    pre = m(ids[:, :6], values=vals[:, :6], use_cache=True)
    cache = pre.cache
    assert cache.seqlen_offset == 6 and torch.allclose(pre.logits, full[:, :6], atol=1e-12)
    step_logits = []
    for t in range(6, 13):
        out = m(ids[:, t : t + 1], values=vals[:, t : t + 1], cache=cache, use_cache=True)
        assert out.cell_embedding is None
        step_logits.append(out.logits[:, 0])
    assert torch.allclose(torch.stack(step_logits, 1), full[:, 6:], atol=1e-10)
    # several tokens at once after the prefill go through the same recurrence
    pre = m(ids[:, :6], values=vals[:, :6], use_cache=True)
    chunk = m(ids[:, 6:], values=vals[:, 6:], cache=pre.cache)
    assert torch.allclose(chunk.logits, full[:, 6:], atol=1e-10)


def _argmax_loop(model, ids, vals, n_new):
    """Greedy continuation of one unpadded prompt by full forwards (no cache), stopping like generate at <eos>."""
    ids, vals = ids.clone(), vals.clone()
    done = False
    for _ in range(n_new):
        nxt = PAD_TOKEN_ID if done else int(model(ids, values=vals).logits[0, -1].argmax())
        done = done or nxt == EOS_TOKEN_ID
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        vals = torch.cat([vals, vals.new_full((1, 1), model.config.generated_value)], 1)
    return ids[0]


def test_greedy_generate_with_cache_equals_argmax_over_full_forwards():
    m = model_of(MouseGeneMambaForCausalLM, initializer_range=0.5)
    lengths = [8, 5, 11]
    ids, vals, mask = sentences(lengths, seed=8)
    n_new = 12
    cached = m.generate(ids, values=vals, attention_mask=mask, max_new_tokens=n_new, do_sample=False)
    uncached = m.generate(ids, values=vals, attention_mask=mask, max_new_tokens=n_new, use_cache=False)
    assert torch.equal(cached, uncached)
    # without an attention_mask, the mask is read off the <pad> ids
    assert torch.equal(m.generate(ids, values=vals, max_new_tokens=n_new), cached)
    L = ids.shape[1]
    for b, n in enumerate(lengths):
        expect = _argmax_loop(m, ids[b : b + 1, :n], vals[b : b + 1, :n], n_new)
        row = cached[b]
        assert torch.all(row[: L - n] == PAD_TOKEN_ID)  # prompt padding moved to the left
        assert torch.equal(row[L - n :], expect)
    assert len(set(cached[:, L:].flatten().tolist())) > 5  # a non-degenerate continuation


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_carries_the_recurrent_cache_between_steps(num_beams):
    """After the prefill every step feeds one token: the cache travels through `generate` under the installed
    transformers (its cache keyword has been renamed before: `cache_params` -> `cache` in 5.24). Without the cache
    the steps would grow (8, 9, 10, ...) while the output stays the same, so only the step widths show it."""
    m = model_of(MouseGeneMambaForCausalLM, initializer_range=0.5)
    ids, vals, mask = sentences([7, 4], seed=11)
    widths, caches = [], []

    def record(module, args, kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        caches.append(kwargs.get("cache"))

    handle = m.register_forward_pre_hook(record, with_kwargs=True)
    try:
        m.generate(ids, values=vals, attention_mask=mask, max_new_tokens=5, num_beams=num_beams, do_sample=False)
    finally:
        handle.remove()
    assert widths == [ids.shape[1]] + [1] * 4
    assert caches[0] is None and all(isinstance(c, MouseGeneMambaCache) for c in caches[1:])
    out = m(ids, values=vals, attention_mask=mask, use_cache=True)
    assert isinstance(out.cache, MouseGeneMambaCache) and out.cache.seqlen_offset == ids.shape[1]
    assert "cache" in out.keys() and out.to_tuple()[-1] is out.cache


def test_generate_without_expression_and_sampling_and_beams():
    m = model_of(MouseGeneMambaForCausalLM, use_expression=False, initializer_range=0.5)
    ids, _, _ = sentences([9, 9], seed=9)
    greedy = m.generate(ids, max_new_tokens=6)
    top1 = m.generate(ids, max_new_tokens=6, do_sample=True, top_k=1)
    assert torch.equal(greedy, top1)
    torch.manual_seed(0)
    s1 = m.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5)
    torch.manual_seed(0)
    s2 = m.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5, use_cache=False)
    assert torch.equal(s1, s2) and not torch.equal(s1, m.generate(ids, max_new_tokens=8))
    b1 = m.generate(ids, max_new_tokens=5, num_beams=3)  # the cache follows the beams (reorder_cache)
    b2 = m.generate(ids, max_new_tokens=5, num_beams=3, use_cache=False)
    assert torch.equal(b1, b2)
    with pytest.raises(ValueError, match="pass the prompt's `values`"):
        model_of(MouseGeneMambaForCausalLM).generate(ids, max_new_tokens=2)


# ---------------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize(
    "cls,auto,tie",
    [
        (MouseGeneMambaForCausalLM, AutoModelForCausalLM, True),
        (MouseGeneMambaForCausalLM, AutoModelForCausalLM, False),
        (MouseGeneMambaForMaskedLM, AutoModelForMaskedLM, True),
        (MouseGeneMambaModel, AutoModel, True),
        (MouseGeneMambaForSequenceClassification, AutoModelForSequenceClassification, True),
    ],
)
def test_save_pretrained_round_trip(tmp_path, cls, auto, tie):
    extra = dict(num_labels=3, id2label={0: "alpha", 1: "beta", 2: "delta"}) if "Sequence" in cls.__name__ else {}
    m = model_of(cls, dtype=torch.float32, tie_word_embeddings=tie, **extra)
    if hasattr(m, "lm_head") and not tie:
        assert m.lm_head.weight is not m.backbone.embeddings.gene_embeddings.weight
    m.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mouse_genemamba"
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is cls
    ids, vals, mask = sentences([7, 10], seed=10)
    a, b = m(ids, values=vals, attention_mask=mask), loaded(ids, values=vals, attention_mask=mask)
    main = "last_hidden_state" if cls is MouseGeneMambaModel else "logits"
    assert torch.equal(a[main], b[main]) and torch.equal(a.cell_embedding, b.cell_embedding)
    if hasattr(m, "lm_head"):
        tied = loaded.lm_head.weight is loaded.backbone.embeddings.gene_embeddings.weight
        assert tied == tie
        assert torch.equal(loaded.lm_head.weight, m.lm_head.weight)
    if extra:
        assert loaded.config.id2label == {0: "alpha", 1: "beta", 2: "delta"}


def test_pretrained_backbone_loads_into_classifier_and_base_model(tmp_path):
    """The paper's workflow: pretrain by NTP, then fine-tune a classifier from that checkpoint."""
    lm = model_of(MouseGeneMambaForCausalLM, dtype=torch.float32)
    lm.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "backbone.embeddings.gene_embeddings.weight" in keys and "lm_head.weight" not in keys  # tied: stored once
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=4).eval()
    base = AutoModel.from_pretrained(tmp_path).eval()
    ref = lm.backbone.state_dict()
    for sd in (clf.backbone.state_dict(), base.state_dict()):
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    ids, vals, mask = sentences([7, 10], seed=13)
    emb = lm(ids, values=vals, attention_mask=mask).cell_embedding
    assert torch.equal(clf(ids, values=vals, attention_mask=mask).cell_embedding, emb)
    assert torch.equal(base(ids, values=vals, attention_mask=mask).cell_embedding, emb)


# ---------------------------------------------------------------------------------------------------- training plumbing


def test_gradient_checkpointing_gives_identical_gradients():
    ids, vals, mask = sentences([12, 9], seed=11)
    labels = ids.masked_fill(mask == 0, -100)

    def grads(model):
        model.zero_grad()
        model(ids, values=vals, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    m = model_of(MouseGeneMambaForCausalLM).train()
    calls = []
    # a pre-hook: torch's non-reentrant checkpoint may stop the recomputation before the mixer returns
    m.backbone.layers[0].mixer.register_forward_pre_hook(lambda *a: calls.append(1))
    ref = grads(m)
    assert len(calls) == 1
    m.activation_checkpointing_enable()
    assert m.is_activation_checkpointing
    got = grads(m)
    assert len(calls) == 3  # forward once more, plus the recomputation in backward
    assert ref.keys() == got.keys() and len(ref) > 10
    for n in ref:
        assert torch.allclose(ref[n], got[n], atol=1e-12), n


def test_peft_lora_targets_linear_layers_by_name():
    peft = pytest.importorskip("peft")
    m = model_of(MouseGeneMambaForSequenceClassification, dtype=torch.float32, num_labels=2)
    targets = ["in_proj", "x_proj", "dt_proj", "out_proj"]
    lora = peft.get_peft_model(
        m, peft.LoraConfig(r=4, target_modules=targets, modules_to_save=["classifier"], lora_dropout=0.0)
    )
    wrapped = [n for n, mod in lora.named_modules() if isinstance(mod, peft.tuners.lora.Linear)]
    assert len(wrapped) == len(targets) * m.config.num_hidden_layers
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "classifier" in n for n in trainable)
    ids, vals, mask = sentences([6, 8], seed=12)
    out = lora(input_ids=ids, values=vals.float(), attention_mask=mask, labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_B" in n)


# ---------------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def mouse_batch():
    """64 real baron_mouse cells (the 8 most common cell types, 8 cells each) as rank sentences of 32 tokens."""
    tokenization = pytest.importorskip("hf_scfm.tokenization")
    GeneTokenizer = getattr(tokenization, "GeneTokenizer", None)
    if GeneTokenizer is None:
        pytest.skip("GeneTokenizer not available yet")
    adata = hf_scfm.load_example("baron_mouse")
    tok = GeneTokenizer.from_species("mouse", encoding="rank")
    tok.fit_medians(adata)
    types = list(adata.obs["cell_type"].value_counts().index[:8])
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(adata.obs["cell_type"] == t), 8, replace=False) for t in types])
    sub = adata[idx].copy()
    enc = tok(sub, max_length=32, padding=True, truncation=True, return_tensors="pt")
    codes = sub.obs["cell_type"].map({t: i for i, t in enumerate(types)}).to_numpy().astype(np.int64)
    return tok, enc, torch.as_tensor(codes), types


def test_tokenizer_matches_default_vocab_and_checksum_guard(tmp_path, mouse_batch):
    tok, enc, _, _ = mouse_batch
    assert len(tok) == MOUSE_VOCAB_SIZE
    assert enc["input_ids"].shape == (64, 32) and bool((enc["input_ids"][:, 0] == BOS_TOKEN_ID).all())
    cfg = MouseGeneMambaConfig.from_preset("tiny", vocab_checksum=tok.vocab_checksum)
    check_tokenizer_matches(cfg, tok)
    torch.manual_seed(0)
    MouseGeneMambaForCausalLM(cfg).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.vocab_checksum == tok.vocab_checksum
    check_tokenizer_matches(loaded.config, tok)
    loaded.config.vocab_checksum = "0" * 16
    with pytest.raises(ValueError, match="does not match model") as err:
        check_tokenizer_matches(loaded.config, tok)
    assert tok.vocab_checksum in str(err.value) and "0" * 16 in str(err.value)
    # the real sentences run through the full-vocabulary model: next-gene logits and cell embeddings
    with torch.no_grad():
        out = loaded(**{k: v[:4] for k, v in enc.items()})  # 4 cells: 78k logits per token are large
    assert out.logits.shape == (4, 32, MOUSE_VOCAB_SIZE) and out.cell_embedding.shape == (4, 64)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.cell_embedding).all()


def _compact(ids):
    """Map the token ids of the batch onto 0..n-1 (specials keep their ids) so the embedding and LM head only span
    the ~1,400 genes present in these 64 cells: 78k-row tables would dominate CPU time (optimizer steps over 5 M
    embedding rows) and teach nothing more here. The full-vocabulary path runs in the checksum test above."""
    used = torch.unique(torch.cat([torch.arange(6), ids.flatten()]))
    lookup = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
    lookup[used] = torch.arange(len(used))
    return lookup[ids], len(used)


def test_next_gene_prediction_overfits_64_real_cells(mouse_batch):
    """NTP on 64 real cells (30 genes each): within 15 full-batch AdamW steps the loss falls below 40% of its start
    and below half the unigram entropy of the targets (so the model uses the context, not gene frequencies)."""
    _, enc, _, _ = mouse_batch
    ids, vocab = _compact(enc["input_ids"])
    vals, mask = enc["values"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    targets = labels[:, 1:][labels[:, 1:] != -100]
    p = torch.bincount(targets).double()
    p = p[p > 0] / p.sum()
    unigram_entropy = float(-(p * p.log()).sum())
    torch.manual_seed(0)
    m = MouseGeneMambaForCausalLM(MouseGeneMambaConfig.from_preset("tiny", vocab_size=vocab)).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = m(ids, values=vals, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.9 * np.log(vocab)  # starts near uniform over the genes
    assert losses[-1] < 0.4 * losses[0], losses
    assert losses[-1] < 0.5 * unigram_entropy, (losses[-1], unigram_entropy)


def test_cell_type_classifier_fits_64_real_cells(mouse_batch):
    """The classification head on the cell embedding reaches >= 95% training accuracy on 8 real cell types."""
    _, enc, labels, types = mouse_batch
    ids, vocab = _compact(enc["input_ids"])
    cfg = MouseGeneMambaConfig.from_preset(
        "tiny",
        vocab_size=vocab,
        id2label=dict(enumerate(types)),
        label2id={t: i for i, t in enumerate(types)},
        classifier_dropout=0.0,
    )
    assert cfg.num_labels == 8
    torch.manual_seed(0)
    m = MouseGeneMambaForSequenceClassification(cfg).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    batch = dict(input_ids=ids, values=enc["values"], attention_mask=enc["attention_mask"])
    for _ in range(20):
        loss = m(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        acc = (m(**batch).logits.argmax(-1) == labels).float().mean().item()
    assert acc >= 0.95, acc


def test_rmsnorm_is_the_formula_in_float64_and_one_norm_for_both_mamba_families():
    """float64 stays float64 (was computed in float32: ~1e-7 off), half precision is normalised in float32 and the
    weight multiplies in the input dtype; SC-MAMBA2's RMSNorm is the same code (a checked copy)."""
    from hf_scfm.modeling.mouse_genemamba.modeling_mouse_genemamba import MouseGeneMambaRMSNorm
    from hf_scfm.modeling.scmamba2.modeling_scmamba2 import ScMamba2RMSNorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 17, generator=g, dtype=torch.float64) * 3
    for cls in (MouseGeneMambaRMSNorm, ScMamba2RMSNorm):
        norm = cls(17, eps=1e-5).double()
        with torch.no_grad():
            norm.weight.copy_(torch.rand(17, generator=g, dtype=torch.float64) + 0.5)
        expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
        torch.testing.assert_close(norm(x), expected, rtol=1e-13, atol=1e-13)
        half = cls(17).to(torch.bfloat16)
        out = half(x.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)),
                                   rtol=1e-2, atol=1e-2)
