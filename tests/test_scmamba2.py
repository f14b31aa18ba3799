"""SC-MAMBA2: config, BiMamba-2 smart padding, heads, save/load, LoRA, and overfitting real cells.

Everything runs on CPU with tiny configs (about 45 s on one core for the whole file). The 60,530-gene
whole-transcriptome forward runs here (marked ``slow``: deselect with ``-m "not slow"``, which keeps a
4,097-token cell) and is timed in benchmarks/scmamba2_whole_transcriptome.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_scfm.modeling.configuration_utils import check_tokenizer_matches
from hf_scfm.modeling.scmamba2 import (
    ScMamba2Config,
    ScMamba2ForMaskedExpression,
    ScMamba2ForPerturbationPrediction,
    ScMamba2ForSequenceClassification,
    ScMamba2Model,
)
from hf_scfm.modeling.scmamba2.modeling_scmamba2 import smart_reverse_index
from hf_scfm.tokenization.special_tokens import CLS_TOKEN_ID, IGNORE_INDEX, MASK_VALUE, PAD_TOKEN_ID

VOCAB = 300  # small vocabulary for the synthetic tests (save/load stays fast)


def tiny(**overrides) -> ScMamba2Config:
    kwargs = dict(vocab_size=VOCAB, chunk_size=8)  # chunk 8 < lengths below: several chunks per row
    kwargs.update(overrides)
    return ScMamba2Config.from_preset("tiny", **kwargs)


def make_batch(lengths=(37, 20, 9), seed=0, n_bins=51, mask_frac=0.0):
    """Right-padded batch with <cls> first, random genes and bins; odd lengths on purpose."""
    g = torch.Generator().manual_seed(seed)
    length = max(lengths)
    ids = torch.full((len(lengths), length), PAD_TOKEN_ID, dtype=torch.long)
    values = torch.zeros(len(lengths), length)
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, 0] = CLS_TOKEN_ID
        ids[r, 1:n] = torch.randint(6, VOCAB, (n - 1,), generator=g)
        values[r, 1:n] = torch.randint(0, n_bins, (n - 1,), generator=g).float()
        mask[r, :n] = 1
    labels = torch.full_like(values, float(IGNORE_INDEX))
    if mask_frac:
        chosen = (torch.rand(values.shape, generator=g) < mask_frac) & (ids >= 6)
        labels[chosen] = values[chosen]
        values = values.masked_fill(chosen, MASK_VALUE)
    return dict(input_ids=ids, values=values, attention_mask=mask), labels


def row(batch, r, n):
    return {k: v[r : r + 1, :n] for k, v in batch.items()}


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, and one intra-op thread: on a small shared CI machine extra OpenMP threads only spin
    (the training tests ran 3x slower in wall time with two threads under load). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- config


def test_presets_and_parameter_counts_match_the_paper():
    assert ScMamba2Config.from_preset("tiny").vocab_size == 78_900
    counts = {}
    for name, quoted in [("paper-30m", 30e6), ("paper-150m", 150e6), ("paper-625m", 625e6)]:
        cfg = ScMamba2Config.from_preset(name)
        assert cfg.vocab_size == 60_530 + 6
        with torch.device("meta"):
            counts[name] = ScMamba2ForMaskedExpression(cfg).num_parameters()
        assert abs(counts[name] - quoted) / quoted < 0.025, (name, counts[name])
    assert ScMamba2Config.from_preset("paper").to_dict() == ScMamba2Config.from_preset("paper-150m").to_dict()
    with pytest.raises(ValueError, match="Unknown ScMamba2Config preset"):
        ScMamba2Config.from_preset("huge")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(head_dim=7), "not divisible by head_dim"),
        (dict(n_groups=3), "not divisible by n_groups"),
        (dict(ssm_backend="triton"), "ssm_backend"),
        (dict(mask_value=0.0), "mask_value must be negative"),
        (dict(hidden_size=0), "hidden_size must be >= 1"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


# ----------------------------------------------------------------------------------- smart padding


def test_smart_reverse_index_reverses_real_tokens_only():
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    expected = torch.tensor([[3, 2, 1, 0, 4, 5], [5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert torch.equal(smart_reverse_index(mask), expected)


def test_reverse_pass_of_padded_row_equals_unpadded_row():
    """The layer's backward direction on a padded row = the mixer over the flipped unpadded row."""
    model = ScMamba2Model(tiny()).eval()
    layer = model.layers[0]
    n, length = 13, 21
    x = torch.randn(1, length, model.config.hidden_size)
    mask = torch.zeros(1, length)
    mask[0, :n] = 1
    idx = smart_reverse_index(mask)
    with torch.no_grad():
        padded = layer.mixer(x.gather(1, idx[..., None].expand_as(x)), mask)
        unpadded = layer.mixer(x[:, :n].flip(1), None)
    torch.testing.assert_close(padded[:, :n], unpadded, atol=1e-5, rtol=1e-5)
    # and the result does not depend on what the padded positions contain
    x2 = x.clone()
    x2[:, n:] = 100.0
    with torch.no_grad():
        padded2 = layer.mixer(x2.gather(1, idx[..., None].expand_as(x2)), mask)
    torch.testing.assert_close(padded2[:, :n], unpadded, atol=1e-5, rtol=1e-5)


def test_padding_invariance_of_every_real_position():
    model = ScMamba2ForMaskedExpression(tiny()).eval()
    lengths = (37, 20, 9)
    batch, _ = make_batch(lengths, mask_frac=0.2)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        for r, n in enumerate(lengths):
            single = model(**row(batch, r, n), output_hidden_states=True)
            torch.testing.assert_close(out.last_hidden_state[r, :n], single.last_hidden_state[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out.predictions[r, :n], single.predictions[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out.cell_embedding[r], single.cell_embedding[0], atol=1e-5, rtol=1e-4)
            for h_pad, h_single in zip(out.hidden_states, single.hidden_states):
                torch.testing.assert_close(h_pad[r, :n], h_single[0], atol=1e-5, rtol=1e-4)
            assert torch.all(out.last_hidden_state[r, n:] == 0) and torch.all(out.predictions[r, n:] == 0)


def test_mean_pooling_is_the_masked_mean_and_padding_invariant():
    """``pooling="mean"``: the cell embedding is the float64 mean of the real positions' last hidden states (odd
    lengths, padding, batch of 3), equal for a row padded in a batch and alone; ``"cls"`` stays position 0."""
    lengths = (37, 20, 9)
    batch, _ = make_batch(lengths)
    mean_model = ScMamba2Model(tiny(pooling="mean")).double().eval()
    cls_model = ScMamba2Model(tiny()).double().eval()
    cls_model.load_state_dict(mean_model.state_dict())
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}
    with torch.no_grad():
        out = mean_model(**batch)
        assert torch.equal(cls_model(**batch).cell_embedding, out.last_hidden_state[:, 0])
        for r, n in enumerate(lengths):
            expected = out.last_hidden_state[r, :n].sum(0) / n
            torch.testing.assert_close(out.cell_embedding[r], expected, rtol=1e-12, atol=1e-12)
            alone = mean_model(**row(batch, r, n)).cell_embedding[0]
            torch.testing.assert_close(alone, expected, rtol=1e-9, atol=1e-9)
            assert not torch.allclose(expected, out.last_hidden_state[r, 0])
    with pytest.raises(ValueError, match="pooling must be one of"):
        tiny(pooling="max")


def test_bidirectionality_later_gene_changes_earlier_output():
    """Swap the gene of the last token: every earlier position's output moves (float64, so even the
    small long-range effect of a freshly initialised SSM stands far above rounding); a forward-only
    (causal) mixer run on the same inputs leaves every earlier position bit-identical."""
    model = ScMamba2Model(tiny()).double().eval()
    batch, _ = make_batch((25,))
    batch["values"] = batch["values"].double()
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][0, 24] = 6 + (changed["input_ids"][0, 24] - 5) % (VOCAB - 6)
    changed["values"][0, 24] = 50.0 - changed["values"][0, 24]
    with torch.no_grad():
        base = model(**batch).last_hidden_state
        later = model(**changed).last_hidden_state
        layer = model.layers[0]
        causal = [layer.mixer(layer.norm(model.embeddings(b["input_ids"], b["values"]))) for b in (batch, changed)]
    moved = (later[0] - base[0]).abs().amax(-1)
    assert moved[:24].min() > 1e-9, moved
    assert moved[23] > 1e-4  # the neighbour sees it through the convolution as well
    assert torch.equal(causal[0][0, :24], causal[1][0, :24])
    assert not torch.equal(causal[0][0, 24], causal[1][0, 24])


# ----------------------------------------------------------------------------------------- embeddings


def test_mask_value_swaps_in_the_learned_mask_embedding():
    model = ScMamba2Model(tiny()).eval()
    batch, _ = make_batch((12,), mask_frac=0.5)
    masked = batch["values"] == MASK_VALUE
    assert masked.any()
    with torch.no_grad():
        emb = model.embeddings(batch["input_ids"], batch["values"])
        genes = model.embeddings.gene_norm(model.embeddings.gene_embedding(batch["input_ids"]))
        expected = genes[masked] + model.embeddings.mask_embedding
    torch.testing.assert_close(emb[masked], expected)
    # continuous encoder, not a lookup: every bin 0..50 (and 3.5) gets its own unit-scale embedding at init
    with torch.no_grad():
        bins = torch.cat([torch.arange(51.0), torch.tensor([3.5])]) * model.config.expression_scale
        enc = model.embeddings.expression_encoder(bins)
    dist = torch.cdist(enc, enc) + torch.eye(52) * 1e9
    assert dist.min() > 0.02 and torch.allclose(enc.norm(dim=-1), torch.full((52,), 8.0), atol=0.1)
    assert model.embeddings.expression_encoder.linear1.bias.abs().min() > 0  # PyTorch-style init, not zeros


# ------------------------------------------------------------------------------------------- heads


def test_masked_expression_loss_is_mse_over_labelled_positions():
    model = ScMamba2ForMaskedExpression(tiny()).eval()
    batch, labels = make_batch(mask_frac=0.3)
    with torch.no_grad():
        out = model(**batch, labels=labels)
    keep = labels != IGNORE_INDEX
    expected = ((out.predictions[keep] - labels[keep]) ** 2).mean()
    torch.testing.assert_close(out.loss, expected)
    assert list(out.keys())[:2] == ["loss", "predictions"]
    assert out.cell_embedding.shape == (3, 64)
    # no labelled position: zero loss, not NaN, and still differentiable
    empty = model(**batch, labels=torch.full_like(labels, float(IGNORE_INDEX))).loss
    assert empty.item() == 0.0 and empty.requires_grad
    tup = model(**batch, labels=labels, return_dict=False)
    torch.testing.assert_close(tup[0], out.loss)


def test_sequence_classification_problem_types():
    batch, _ = make_batch()
    model = ScMamba2ForSequenceClassification(tiny(num_labels=4)).eval()
    labels = torch.tensor([0, 3, 1])
    with torch.no_grad():
        out = model(**batch, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    assert model.config.problem_type == "single_label_classification" and out.logits.shape == (3, 4)

    multi = ScMamba2ForSequenceClassification(tiny(num_labels=4)).eval()
    hot = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        out = multi(**batch, labels=hot)
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, hot))

    reg = ScMamba2ForSequenceClassification(tiny(num_labels=1)).eval()
    target = torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        out = reg(**batch, labels=target)
    torch.testing.assert_close(out.loss, ((out.logits.squeeze(-1) - target) ** 2).mean())
    assert reg.config.problem_type == "regression"


def test_perturbation_head_flags_and_loss():
    model = ScMamba2ForPerturbationPrediction(tiny()).eval()
    batch, _ = make_batch((15, 10))
    batch["values"] = torch.log1p(batch["values"])  # log1p values in
    flags = torch.zeros_like(batch["input_ids"])
    labels = torch.where(batch["attention_mask"].bool(), batch["values"] + 0.5, torch.tensor(float(IGNORE_INDEX)))
    labels[:, 0] = IGNORE_INDEX  # <cls>
    with torch.no_grad():
        plain = model(**batch, perturbation_flags=flags, labels=labels)
        flags_on = flags.clone()
        flags_on[0, 3] = 1
        perturbed = model(**batch, perturbation_flags=flags_on, labels=labels)
        # flags at padding are ignored, whatever they hold
        flags_pad = flags.clone()
        flags_pad[1, 10:] = -100
        padded_flags = model(**batch, perturbation_flags=flags_pad, labels=labels)
    assert (perturbed.predictions[0] - plain.predictions[0]).abs().max() > 1e-4
    torch.testing.assert_close(perturbed.predictions[1], plain.predictions[1])  # row 1 untouched
    torch.testing.assert_close(padded_flags.predictions, plain.predictions)
    real = (batch["input_ids"] >= 6) & (labels != IGNORE_INDEX)
    expected = ((plain.predictions[real] - labels[real]) ** 2).mean()
    torch.testing.assert_close(plain.loss, expected)
    assert torch.all(plain.predictions[:, 0] == 0)  # <cls> carries no prediction
    with pytest.raises(ValueError, match="perturbation_flags must be 0"):
        model(**batch, perturbation_flags=flags + 2)


# ------------------------------------------------------------------------------------- input errors


def test_bad_inputs_raise_clear_errors():
    model = ScMamba2Model(tiny()).eval()
    batch, _ = make_batch((9, 5))
    with pytest.raises(ValueError, match="needs `values`"):
        model(batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(ValueError, match="`values` has shape"):
        model(batch["input_ids"], batch["values"][:, :4], batch["attention_mask"])
    left = batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        model(batch["input_ids"], batch["values"], left)
    no_cls = batch["input_ids"].clone()
    no_cls[:, 0] = 7
    with pytest.raises(ValueError, match="<cls>"):
        model(no_cls, batch["values"], batch["attention_mask"])
    too_big = batch["input_ids"].clone()
    too_big[0, 3] = VOCAB
    with pytest.raises(ValueError, match="vocab_size=len\\(tokenizer\\)"):
        model(too_big, batch["values"], batch["attention_mask"])


# ------------------------------------------------------------------------ save/load, Auto, checkpointing


def test_save_load_round_trip_and_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    batch, labels = make_batch(mask_frac=0.2)
    for cls in (ScMamba2ForMaskedExpression, ScMamba2ForPerturbationPrediction, ScMamba2ForSequenceClassification):
        model = cls(tiny(num_labels=3)).eval()
        path = tmp_path / cls.__name__
        model.save_pretrained(path)
        files = {p.name for p in path.iterdir()}
        assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
        loaded = cls.from_pretrained(path).eval()
        with torch.no_grad():
            a, b = model(**batch), loaded(**batch)
        key = "logits" if cls is ScMamba2ForSequenceClassification else "predictions"
        assert torch.equal(a[key], b[key]) and torch.equal(a.cell_embedding, b.cell_embedding)

    assert type(AutoConfig.from_pretrained(path)) is ScMamba2Config
    assert type(AutoModelForSequenceClassification.from_pretrained(path)) is ScMamba2ForSequenceClassification
    # backbone of a pretraining checkpoint -> AutoModel, and into a fresh classification head
    pre = ScMamba2ForMaskedExpression(tiny()).eval()
    pre.save_pretrained(tmp_path / "pre")
    backbone = AutoModel.from_pretrained(tmp_path / "pre").eval()
    assert type(backbone) is ScMamba2Model
    with torch.no_grad():
        torch.testing.assert_close(backbone(**batch).cell_embedding, pre(**batch).cell_embedding, atol=0, rtol=0)
    clf = ScMamba2ForSequenceClassification.from_pretrained(tmp_path / "pre", num_labels=5)
    assert torch.equal(clf.scmamba2.layers[1].mixer.in_proj.weight, pre.scmamba2.layers[1].mixer.in_proj.weight)


def test_init_weights_follow_mamba2():
    cfg = tiny()
    mixer = ScMamba2Model(cfg).layers[0].mixer
    a = torch.exp(mixer.A_log)
    assert torch.all((a >= 1) & (a <= 16))
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert torch.all((dt >= cfg.time_step_min * 0.999) & (dt <= cfg.time_step_max * 1.001))
    assert torch.all(mixer.D == 1)
    std = mixer.out_proj.weight.std().item()
    assert abs(std - cfg.initializer_range / math.sqrt(cfg.num_hidden_layers)) < 0.004


def test_gradient_checkpointing_gives_identical_gradients():
    batch, labels = make_batch(mask_frac=0.3)

    def grads(checkpointing: bool):
        torch.manual_seed(1)
        model = ScMamba2ForMaskedExpression(tiny()).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in model.scmamba2.layers)
        model(**batch, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name], atol=1e-7, rtol=1e-6, msg=name)


def test_peft_lora_on_named_linear_layers():
    peft = pytest.importorskip("peft")
    batch, _ = make_batch()
    model = ScMamba2ForSequenceClassification(tiny(num_labels=3)).eval()
    with torch.no_grad():
        before = model(**batch).logits
    from hf_scfm.modeling.lora import default_lora_targets

    targets = default_lora_targets(model)
    assert targets == ["mixer.in_proj", "mixer.out_proj"]
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=["classifier"])
    )
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert any("mixer.in_proj.lora_A" in n for n in trainable) and any("mixer.out_proj.lora_B" in n for n in trainable)
    assert all("lora_" in n or "classifier" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(lora(**batch).logits, before)  # LoRA B starts at zero
    lora.train()
    loss = lora(**batch, labels=torch.tensor([0, 1, 2])).loss
    loss.backward()
    grad = lora.base_model.model.scmamba2.layers[0].mixer.in_proj.lora_B["default"].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert lora.base_model.model.scmamba2.layers[0].mixer.in_proj.base_layer.weight.grad is None
    # the dotted targets leave the masked-expression head's own out_proj alone
    head_model = peft.get_peft_model(
        ScMamba2ForMaskedExpression(tiny()), peft.LoraConfig(r=4, target_modules=default_lora_targets("scmamba2"))
    )
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in head_model.named_parameters() if ".lora_A" in n}
    assert len(wrapped) == 2 * 2 and all(".mixer." in n for n in wrapped)


# ------------------------------------------------------------------------------------------ long input


def _whole_cell(n_genes: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([CLS_TOKEN_ID]), torch.arange(6, 6 + n_genes)]).unsqueeze(0)
    values = torch.where(torch.rand(1, n_genes + 1, generator=g) < 0.1, torch.randint(1, 51, (1, n_genes + 1), generator=g), 0)
    values[0, 0] = 0
    return dict(input_ids=ids, values=values.float(), attention_mask=torch.ones_like(ids))


def test_long_cell_runs():
    """A 4,097-token cell (<cls> + 4,096 genes, mostly zero bins) through the tiny model, no grad."""
    model = ScMamba2ForMaskedExpression(ScMamba2Config.from_preset("tiny")).eval()
    with torch.no_grad():
        out = model(**_whole_cell(4096))
    assert out.predictions.shape == (1, 4097) and torch.isfinite(out.last_hidden_state).all()


@pytest.mark.slow
def test_whole_transcriptome_cell_runs():
    """<cls> + 60,530 genes (the paper's full vocabulary length, zeros included), one no-grad forward of
    the tiny model: about 4 s of CPU on one core, 0.9 GiB peak (benchmarks/scmamba2_whole_transcriptome.py)."""
    model = ScMamba2ForMaskedExpression(ScMamba2Config.from_preset("tiny")).eval()
    with torch.no_grad():
        out = model(**_whole_cell(60_530))
    assert out.predictions.shape == (1, 60_531)
    assert torch.isfinite(out.predictions).all() and torch.isfinite(out.cell_embedding).all()


# ---------------------------------------------------------------------------------- real data (baron)


@pytest.fixture(scope="module")
def baron():
    """64 real baron_human cells, binned (51 bins), 64 tokens each (<cls> + 63 sampled expressed genes)."""
    tokenization = pytest.importorskip("hf_scfm.tokenization")
    from hf_scfm.data import load_example

    tok = tokenization.GeneTokenizer.from_species("human", encoding="binned", n_bins=51)
    adata = load_example("baron_human")[:64]
    enc = tok(adata, max_length=64, padding=True, truncation=True, return_tensors="pt")
    codes = adata.obs["cell_type"].cat.remove_unused_categories()
    return dict(
        tokenizer=tok,
        batch={k: enc[k] for k in ("input_ids", "values", "attention_mask")},
        labels=torch.tensor(codes.cat.codes.to_numpy().copy(), dtype=torch.long),
        names=list(codes.cat.categories),
    )


def test_tokenizer_output_feeds_the_model_and_vocab_matches(baron):
    tok = baron["tokenizer"]
    assert len(tok) == ScMamba2Config.from_preset("tiny").vocab_size
    batch = baron["batch"]
    assert torch.all(batch["input_ids"][:, 0] == CLS_TOKEN_ID) and batch["values"].max() <= 50
    cfg = ScMamba2Config.from_preset("tiny", vocab_checksum=tok.vocab_checksum)
    check_tokenizer_matches(cfg, tok)  # same vocabulary: no error
    with pytest.raises(ValueError, match="does not match model") as err:
        check_tokenizer_matches(ScMamba2Config.from_preset("tiny", vocab_checksum="0" * 64), tok)
    assert tok.vocab_checksum in str(err.value) and "0" * 64 in str(err.value)
    with pytest.raises(ValueError, match="vocab_size 300"):
        check_tokenizer_matches(tiny(), tok)


def test_masked_expression_overfits_real_cells(baron):
    """12 AdamW steps on 64 cells with 30 % of gene values masked (the masks stay fixed): the masked-bin
    MSE must fall below a quarter of the predict-the-mean baseline (the variance of the masked bins,
    about 356 bins^2 here). It reaches about 0.09x the baseline after 12 steps (1.6x before training)."""
    from hf_scfm.data.collators import DataCollatorForMaskedExpression

    b = baron["batch"]
    real = b["attention_mask"].bool()
    records = [{"input_ids": b["input_ids"][i][real[i]], "values": b["values"][i][real[i]]} for i in range(64)]
    batch = DataCollatorForMaskedExpression(mask_fraction=0.3, seed=0)(records)
    labels = batch.pop("labels")
    keep = labels != IGNORE_INDEX
    baseline = ((labels[keep] - labels[keep].mean()) ** 2).mean().item()

    model = ScMamba2ForMaskedExpression(ScMamba2Config.from_preset("tiny", vocab_size=len(baron["tokenizer"])))
    with torch.no_grad():
        start = model(**batch, labels=labels).loss.item()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(12):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final = model(**batch, labels=labels).loss.item()
    assert start > baseline  # an untrained model is worse than the mean
    assert final < 0.25 * baseline, (final, baseline)


def test_classification_overfits_real_cells(baron):
    """Cell-type head on <cls>: 30 AdamW steps (head lr 1e-2, backbone 1e-3, no dropout) reach >= 95 %
    training accuracy on 64 cells of 8 types (the majority class alone is 21/64 = 33 %). To halve the cost
    the cells are cut to their first 32 tokens (<cls> + 31 sampled genes; every cell has all 64 tokens, so
    no row is padded by the cut)."""
    labels = baron["labels"]
    assert bool(baron["batch"]["attention_mask"][:, :32].all())
    batch = {k: v[:, :32] for k, v in baron["batch"].items()}
    cfg = ScMamba2Config.from_preset(
        "tiny", vocab_size=len(baron["tokenizer"]), num_labels=len(baron["names"]), classifier_dropout=0.0,
        id2label=dict(enumerate(baron["names"])),
    )
    model = ScMamba2ForSequenceClassification(cfg)
    opt = torch.optim.AdamW(
        [{"params": model.classifier.parameters(), "lr": 1e-2}, {"params": model.scmamba2.parameters(), "lr": 1e-3}],
        weight_decay=0.0,
    )
    for _ in range(30):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(**batch).logits.argmax(-1) == labels).float().mean().item()
    assert accuracy >= 0.95, accuracy
    assert model.config.id2label[0] == baron["names"][0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_backend_agrees_with_torch_backend():
    batch, labels = make_batch(mask_frac=0.2)
    batch = {k: v.cuda() for k, v in batch.items()}
    torch.manual_seed(0)
    ref = ScMamba2ForMaskedExpression(tiny(ssm_backend="torch")).cuda().eval()
    fast = ScMamba2ForMaskedExpression(tiny(ssm_backend="auto")).cuda().eval()
    fast.load_state_dict(ref.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fast(**batch).predictions, ref(**batch).predictions, atol=1e-3, rtol=1e-3)


def test_no_grad_inference_path_matches_training_path(monkeypatch):
    """Without gradients the mixer runs rows in passes of INFER_TOKENS_PER_PASS tokens, its conv channels-last and
    ssd_scan's forward-only path; with gradients the training path. Same numbers (float64, odd lengths, padding,
    batch 3), and each row equals itself alone."""
    import hf_scfm.modeling.scmamba2.modeling_scmamba2 as modeling
    from hf_scfm.modeling.scmamba2 import ssd

    model = ScMamba2Model(tiny(initializer_range=0.3)).double().eval()
    batch, _ = make_batch((37, 20, 9), seed=4)
    monkeypatch.setattr(modeling, "INFER_TOKENS_PER_PASS", 2 * 37)  # mixer sees 6 rows: passes of 2
    passes, forward_only = [], []
    real_rows, real_fwd = modeling.ScMamba2Mixer._forward_rows, ssd._ssd_forward
    monkeypatch.setattr(modeling.ScMamba2Mixer, "_forward_rows",
                        lambda self, h, m: passes.append(h.shape[0]) or real_rows(self, h, m))
    monkeypatch.setattr(ssd, "_ssd_forward", lambda *a: forward_only.append(1) or real_fwd(*a))
    with torch.no_grad():
        fast = model(**batch).last_hidden_state
    assert passes == [2, 2, 2] * model.config.num_hidden_layers and len(forward_only) == len(passes)
    passes.clear()
    train = model(**batch).last_hidden_state
    assert passes == [6] * model.config.num_hidden_layers and len(forward_only) == 3 * model.config.num_hidden_layers
    torch.testing.assert_close(fast, train.detach(), rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        for r, n in enumerate((37, 20, 9)):
            alone = model(**row(batch, r, n)).last_hidden_state[0]
            torch.testing.assert_close(fast[r, :n], alone, rtol=1e-10, atol=1e-12)
