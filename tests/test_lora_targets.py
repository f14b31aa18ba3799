"""Default LoRA targets: for every model family, peft wraps exactly the backbone's linear maps and only the
adapters train."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoModelForSequenceClassification
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import hf_scfm  # noqa: F401  (registers the families with the Auto classes)
from hf_scfm.modeling.lora import DEFAULT_LORA_TARGETS, default_lora_targets
from hf_scfm.tokenization.special_tokens import BOS_TOKEN_ID, CLS_TOKEN_ID

FAMILIES = sorted(DEFAULT_LORA_TARGETS)
VOCAB = 300


def tiny_config(model_type, **overrides):
    return CONFIG_MAPPING[model_type].from_preset("tiny", vocab_size=VOCAB, **overrides)


def batch_for(model_type):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, VOCAB, (2, 12), generator=g)
    ids[:, 0] = BOS_TOKEN_ID if model_type == "mouse_genemamba" else CLS_TOKEN_ID
    values = torch.randint(1, 5, (2, 12), generator=g).float()
    values[:, 0] = 0.0
    return dict(input_ids=ids, values=values, attention_mask=torch.ones_like(ids))


def matched(model, targets):
    """Names of modules peft's suffix rule selects (``name == t`` or ``name.endswith('.' + t)``)."""
    return {
        name: module
        for name, module in model.named_modules()
        if any(name == t or name.endswith("." + t) for t in targets)
    }


def test_families_listed():
    assert set(FAMILIES) == {"cellfm", "mouse_genemamba", "scmamba2"}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_default_lora_targets_accepts_model_config_or_name(model_type):
    config = tiny_config(model_type)
    model = AutoModel.from_config(config)
    expected = DEFAULT_LORA_TARGETS[model_type]
    assert default_lora_targets(model) == default_lora_targets(config) == default_lora_targets(model_type) == expected
    targets = default_lora_targets(model)
    targets.append("x")
    assert DEFAULT_LORA_TARGETS[model_type] == expected  # a copy, not the table itself


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_target_hits_backbone_linears_only(model_type):
    config = tiny_config(model_type, num_labels=3)
    model = AutoModelForSequenceClassification.from_config(config)
    targets = default_lora_targets(model)
    hits = matched(model, targets)
    for t in targets:
        assert any(n == t or n.endswith("." + t) for n in hits), f"{model_type}: target {t!r} matches nothing"
    assert all(isinstance(m, torch.nn.Linear) for m in hits.values())
    assert all(".layers." in n for n in hits), sorted(hits)  # never a head or an embedding
    assert len(hits) == len(targets) * config.num_hidden_layers


@pytest.mark.parametrize("model_type", FAMILIES)
def test_peft_wraps_the_family_and_only_adapters_train(model_type):
    torch.manual_seed(0)
    config = tiny_config(model_type, num_labels=3)
    model = AutoModelForSequenceClassification.from_config(config)
    n_hits = len(matched(model, default_lora_targets(model)))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=default_lora_targets(model)))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * n_hits  # lora_A and lora_B per wrapped linear
    out = peft_model(**batch_for(model_type), labels=torch.tensor([0, 2]))
    out.loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in peft_model.parameters() if not p.requires_grad)


def test_unknown_family_raises():
    with pytest.raises(ValueError, match="No default LoRA targets"):
        default_lora_targets("bert")
    with pytest.raises(TypeError, match="model, a config or a model_type"):
        default_lora_targets(3)
