"""Model cards: every template renders, its YAML metadata parses back (``ModelCard.load`` and ``yaml.safe_load``)
with the fields the Hub reads, and the body carries the preprocessing recipe, training summary and citation."""

from __future__ import annotations

import json

import pytest
import yaml
from huggingface_hub import ModelCard

from hf_scfm.training.model_card import (
    CARD_METADATA_FILE,
    FAMILIES,
    card_from_folder,
    render_model_card,
    write_card_metadata,
)

TOKENIZER = {
    "mouse_genemamba": {"encoding": "rank", "species": "mouse", "max_length": 2048, "vocab_checksum": "sha256:m0u5e"},
    "scmamba2": {"encoding": "binned", "species": "human", "max_length": 4096, "n_bins": 51,
                 "vocab_checksum": "sha256:5cma"},
    "cellfm": {"encoding": "continuous", "species": "human", "max_length": 2048, "vocab_checksum": "sha256:ce11"},
}
CITATION_MARK = {"mouse_genemamba": "Mouse-Geneformer", "scmamba2": "10.1101/2024.09.30.615775",
                 "cellfm": "10.1038/s41467-025-59926-5"}


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_card_metadata_and_body(family, tmp_path):
    config = {"model_type": family, "vocab_size": 321, "hidden_size": 64, "num_hidden_layers": 2,
              "architectures": [FAMILIES[family]["pretraining_class"]]}
    card = render_model_card(
        config,
        tokenizer=TOKENIZER[family],
        repo_id=f"hf-scfm/{family}-tiny",
        datasets=["hf-scfm/baron-corpus"],
        training_data={"corpus": "baron_human shards", "cells": 2142},
        hyperparameters={"learning_rate": 3e-4, "max_steps": 200, "batch_size": 16},
        eval_results=[{"metric": "loss", "value": 0.4213, "dataset": "baron_human", "split": "validation"}],
    )
    path = tmp_path / "README.md"
    card.save(path)
    text = path.read_text()

    meta = _front_matter(text)  # plain YAML, as the Hub parses it
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "feature-extraction"
    assert meta["datasets"] == ["hf-scfm/baron-corpus"]
    assert {"single-cell", "scRNA-seq", "hf-scfm", FAMILIES[family]["tag"], TOKENIZER[family]["species"]} <= set(
        meta["tags"]
    )
    (result,) = meta["model-index"][0]["results"]
    assert meta["model-index"][0]["name"] == f"{family}-tiny"
    assert result["metrics"] == [{"type": "loss", "value": 0.4213, "name": "loss"}]
    assert result["dataset"]["split"] == "validation"

    loaded = ModelCard.load(path)  # and as huggingface_hub parses it
    assert loaded.data.library_name == "transformers"
    assert loaded.data.eval_results[0].metric_value == pytest.approx(0.4213)
    assert loaded.data.eval_results[0].dataset_type == "baron_human"

    settings = TOKENIZER[family]
    for needle in (f"`{settings['encoding']}`", f"| max_length | {settings['max_length']}", settings["vocab_checksum"],
                   "| species | " + settings["species"], "| vocabulary size | 321",
                   "baron_human shards", "| learning_rate | 0.0003", "| max_steps | 200",
                   "| `hidden_size` | 64", FAMILIES[family]["pretraining_class"],
                   f'from_pretrained("hf-scfm/{family}-tiny")', CITATION_MARK[family], "Not for** clinical"):
        assert needle in loaded.text, needle
    assert "{{" not in text and "{%" not in text


def test_finetuned_card_labels_metrics_and_base_model():
    config = {"model_type": "scmamba2", "vocab_size": 100, "num_labels": 3,
              "id2label": {"0": "alpha", "1": "beta", "2": "ductal"}}
    card = render_model_card(
        config,
        tokenizer=TOKENIZER["scmamba2"],
        repo_id="hf-scfm/scmamba2-baron-annotate",
        base_model="hf-scfm/scmamba2-tiny",
        task="annotate",
        eval_results=[
            {"metric": "accuracy", "value": 0.951, "dataset": "baron_human", "split": "test"},
            {"metric": "f1", "metric_name": "macro-F1", "value": 0.812, "dataset": "baron_human", "split": "test"},
        ],
    )
    meta = _front_matter(str(card))
    assert meta["base_model"] == "hf-scfm/scmamba2-tiny"
    assert meta["pipeline_tag"] == "tabular-classification"
    assert "annotate" in meta["tags"]
    assert sorted(meta["metrics"]) == ["accuracy", "f1"]
    metrics = {m["type"]: m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    assert metrics == {"accuracy": 0.951, "f1": 0.812}
    assert "3 classes: alpha, beta, ductal" in card.text
    assert "AutoModelForSequenceClassification" in card.text
    assert "| Cell-type annotation | baron_human | test | macro-F1 | 0.8120 |" in card.text


def test_no_results_means_no_model_index_and_local_base_model_stays_out_of_metadata(tmp_path):
    card = render_model_card({"model_type": "cellfm", "vocab_size": 10}, base_model=str(tmp_path), task="annotate")
    meta = _front_matter(str(card))
    assert "model-index" not in meta and "base_model" not in meta and "datasets" not in meta
    assert "none are claimed" in card.text
    assert "not recorded" in card.text  # no checksum known


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="Unknown model family 'bert'"):
        render_model_card({"model_type": "bert"})
    with pytest.raises(ValueError, match=r"lacks \['value'\]"):
        render_model_card({"model_type": "cellfm"}, eval_results=[{"metric": "accuracy", "dataset": "x"}])
    with pytest.raises(ValueError, match="Unknown task"):
        render_model_card({"model_type": "cellfm"}, task="dance")


def test_card_from_folder_uses_saved_config_tokenizer_and_card_metadata(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mouse_genemamba", "vocab_size": 77,
                                                      "vocab_checksum": "sha256:fromconfig"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"encoding": "rank", "species": "mouse",
                                                                "model_max_length": 1024}))
    write_card_metadata(tmp_path, hyperparameters={"max_steps": 7}, license="cc-by-4.0",
                        eval_results=[{"metric": "loss", "value": 1.5, "dataset": "baron_mouse"}])
    assert (tmp_path / CARD_METADATA_FILE).exists()
    card = card_from_folder(tmp_path, repo_id="hf-scfm/mgm")
    meta = _front_matter(str(card))
    assert meta["license"] == "cc-by-4.0"
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 1.5
    assert "sha256:fromconfig" in card.text and "| max_length | 1024" in card.text and "| max_steps | 7 |" in card.text


def test_cards_render_from_real_family_configs():
    """The real configuration classes (not just dicts) render, with their architecture fields listed."""
    from hf_scfm.modeling.cellfm import CellFMConfig
    from hf_scfm.modeling.mouse_genemamba import MouseGeneMambaConfig
    from hf_scfm.modeling.scmamba2 import ScMamba2Config

    for config_class in (MouseGeneMambaConfig, ScMamba2Config, CellFMConfig):
        config = config_class.from_preset("tiny", vocab_size=50)
        card = render_model_card(config)
        assert f"| `hidden_size` | {config.hidden_size} |" in card.text
        assert _front_matter(str(card))["tags"][:4] == ["single-cell", "scRNA-seq", "biology", "hf-scfm"]


# ----------------------------------------------------------------------------- repo ids, URLs, real runs
def test_snippet_repo_ids_are_valid_or_an_explicit_placeholder():
    from huggingface_hub.utils import validate_repo_id

    cfg = {"model_type": "scmamba2", "vocab_size": 10}
    for kwargs, expected in (({}, "your-org/scmamba2"), ({"task": "annotate"}, "your-org/scmamba2-annotate"),
                             ({"repo_id": "lab/scm"}, "lab/scm"), ({"repo_id": "scm"}, "your-org/scm")):
        text = render_model_card(cfg, **kwargs).text
        assert f'from_pretrained("{expected}")' in text, kwargs
        validate_repo_id(expected)
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        render_model_card(cfg, repo_id="SC-MAMBA2 (annotate)")
    remote = render_model_card({**cfg, "auto_map": {"AutoModel": "modeling_scmamba2.ScMamba2Model"}}).text
    assert 'from_pretrained("your-org/scmamba2", trust_remote_code=True)' in remote and "import hf_scfm" not in remote


@pytest.mark.slow
def test_cards_from_real_pretraining_and_finetuning_runs(tmp_path):
    """A tiny pretraining run and a full fine-tuning run on Baron human cells: the cards they write carry the
    measured results in model-index, valid repo ids, no URL, and the training data with its licence."""
    from test_finetune import ft_args
    from test_pretrain import run, small_adata, small_corpus

    from hf_scfm.training.finetune import finetune

    def check(card_path, repo_id):
        text = card_path.read_text()
        assert "://" not in text  # no URL at all: the project has none of its own
        assert f'from_pretrained("{repo_id}"' in text
        assert "Baron et al. 2016 (GSE84133), via the came==0.1.13 wheel sample_data.zip (MIT)" in text
        return _front_matter(text), text

    corpus = small_corpus(tmp_path / "corpus", "cellfm")
    summary = run("cellfm", corpus, tmp_path / "pretrained")
    meta, text = check(tmp_path / "pretrained" / "README.md", "your-org/cellfm")
    (result,) = meta["model-index"][0]["results"]
    assert result["metrics"][0]["value"] == pytest.approx(summary["eval_loss"])
    assert "source and licence" in text and "adata-0: Baron et al. 2016" in text

    h5ad = tmp_path / "train.h5ad"
    small_adata("human", n_cells=48).write_h5ad(h5ad)
    run_result = finetune(*ft_args(tmp_path / "pretrained", h5ad, tmp_path / "clf", "--no-lora"))
    meta, text = check(tmp_path / "clf" / "README.md", "your-org/cellfm-annotate")
    got = {m["type"]: m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    want = {k.removeprefix("eval_"): v for k, v in run_result["metrics"].items()
            if k in ("eval_accuracy", "eval_f1_macro", "eval_precision_macro", "eval_recall_macro")}
    assert got == pytest.approx(want) and len(want) == 4
    assert "train.h5ad: Baron et al. 2016" in text


def test_data_without_a_recorded_source_says_so(tmp_path):
    import anndata as ad
    import numpy as np

    path = tmp_path / "mine.h5ad"
    ad.AnnData(np.ones((2, 2), np.float32)).write_h5ad(path)
    text = render_model_card({"model_type": "cellfm"}, task="annotate", training_data={"reference": str(path)}).text
    assert "mine.h5ad: not recorded in the data (uns['source'])" in text
