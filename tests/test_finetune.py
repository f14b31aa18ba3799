"""Fine-tuning for annotation (hf_scfm.training.finetune): LoRA changes only adapters and head, merge is exact,
the label map travels with the model, bad checkpoints fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_scfm.training.families import FAMILIES
from hf_scfm import cli
from hf_scfm.training.finetune import finetune, load_finetuned
from hf_scfm.training.hub import CheckpointError

from test_pretrain import ENCODING, small_adata, small_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A pretrained (randomly initialised, tiny) checkpoint per family with its tokenizer, and a labelled h5ad."""
    root = tmp_path_factory.mktemp("finetune")
    out = {}
    for name in ("cellfm", "mouse_genemamba"):
        species, encoding = ENCODING[name]
        adata = small_adata(species, n_cells=48)
        tok = small_tokenizer(adata, species, encoding)
        family = FAMILIES[name]
        torch.manual_seed(0)
        config = family.config_cls.from_preset("tiny", vocab_size=len(tok), vocab_checksum=tok.vocab_checksum)
        model = family.pretraining_cls()(config)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        adata.write_h5ad(root / f"{name}.h5ad")
        out[name] = (root / name, root / f"{name}.h5ad")
    return out


def parse(*argv: str):
    """``(FinetuneArguments, FinetuneTrainingArguments)`` of an ``hf-scfm finetune`` command line."""
    return cli.parse(["finetune", *argv])[1]


def ft_args(model: Path, h5ad: Path, out: Path, *extra: str):
    return parse("--model", str(model), "--train", str(h5ad), "--eval", str(h5ad), "--label-key", "cell_type",
                 "--out", str(out), "--max-steps", "4", "--batch-size", "8", "--max-length", "64", *extra)


@pytest.mark.parametrize("name", ["cellfm", "mouse_genemamba"])
def test_lora_changes_only_adapters_and_head_and_merge_is_exact(setup, tmp_path, name):
    model_dir, h5ad = setup[name]
    family = FAMILIES[name]
    result = finetune(*ft_args(model_dir, h5ad, tmp_path / "adapter"))
    assert set(result["metrics"]) >= {"eval_accuracy", "eval_f1_macro", "eval_precision_macro", "eval_recall_macro"}
    assert 0.0 <= result["metrics"]["eval_accuracy"] <= 1.0

    adapter_dir = tmp_path / "adapter"
    assert (adapter_dir / "adapter_config.json").exists() and not (adapter_dir / "config.json").exists()
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    head = family.classifier_modules[0]
    assert all("lora_" in k or f".{head}." in k for k in saved), sorted(saved)
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero: these were trained

    peft_model = load_finetuned(adapter_dir).eval()
    pretrained = load_file(model_dir / "model.safetensors")
    prefix = f"{peft_model.get_base_model().base_model_prefix}."
    checked = 0
    for key, value in peft_model.get_base_model().state_dict().items():
        plain = key.replace(".base_layer", "")
        if "lora_" in key or f"{head}." in key or plain not in pretrained:
            continue
        assert plain.startswith(prefix) and torch.equal(value, pretrained[plain]), key
        checked += 1
    assert checked > 10  # the whole backbone, frozen

    label_map = json.loads((adapter_dir / "label_map.json").read_text())
    assert peft_model.get_base_model().config.id2label == {int(k): v for k, v in label_map["id2label"].items()}

    # --merge with the same seed trains the same adapters; the merged model gives the adapter model's outputs
    merged_dir = tmp_path / "merged"
    finetune(*ft_args(model_dir, h5ad, merged_dir, "--merge"))
    merged = load_finetuned(merged_dir).eval()
    assert type(merged).__name__ == family.classification_class
    assert json.loads((merged_dir / "config.json").read_text())["label2id"] == label_map["label2id"]
    assert (merged_dir / "README.md").exists() and (merged_dir / f"modeling_{name}.py").exists()
    import anndata

    from hf_scfm.tokenization import GeneTokenizer

    tok = GeneTokenizer.from_pretrained(str(merged_dir))
    batch = tok(anndata.read_h5ad(h5ad)[:6], max_length=64, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = peft_model(**batch).logits
        got = merged(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_gene_selection_class_weights_and_pooling(setup, tmp_path):
    """--n-top-genes: the classifier's tokenizer reads only the reference's N most variable genes, and annotate
    reads a query the same way; --class-weight balanced: sklearn's weights in the loss; --pooling: set on the
    config, and an error for a family without the option."""
    import anndata
    import numpy as np

    from hf_scfm.tokenization import GeneTokenizer
    from hf_scfm.training.finetune import WeightedClassificationLoss, balanced_class_weights

    model_dir, h5ad = setup["mouse_genemamba"]
    out = tmp_path / "clf"
    finetune(*ft_args(model_dir, h5ad, out, "--no-lora", "--n-top-genes", "40", "--class-weight", "balanced",
                     "--pooling", "last"))
    tok = GeneTokenizer.from_pretrained(str(out))
    assert len(tok.gene_subset) == 40
    expected = GeneTokenizer.from_pretrained(str(model_dir))
    assert expected.select_highly_variable_genes(anndata.read_h5ad(h5ad), 40) == tok.gene_subset
    query = anndata.read_h5ad(h5ad)
    ids = np.asarray(tok(query, max_length=64, return_tensors="np")["input_ids"])
    allowed = {tok.convert_tokens_to_ids(g) for g in tok.gene_subset} | {tok.pad_token_id, tok.bos_token_id,
                                                                         tok.eos_token_id}
    assert set(np.unique(ids)) <= allowed
    assert json.loads((out / "config.json").read_text())["pooling"] == "last"
    card = (out / "README.md").read_text()
    assert "balanced" in card and "40" in card

    labels = ["a", "a", "a", "b"]
    weights = balanced_class_weights(labels, {"a": 0, "b": 1})
    torch.testing.assert_close(weights, torch.tensor([4 / 6, 4 / 2]))
    logits, target = torch.randn(4, 2), torch.tensor([0, 0, 0, 1])
    expected_loss = -(weights[target] * torch.log_softmax(logits, -1)[torch.arange(4), target]).sum() / weights[target].sum()
    loss = WeightedClassificationLoss(weights)({"logits": logits}, target)
    torch.testing.assert_close(loss, expected_loss)

    cellfm_dir, cellfm_h5ad = setup["cellfm"]
    with pytest.raises(ValueError, match="--pooling mean: cellfm has no pooling option"):
        finetune(*ft_args(cellfm_dir, cellfm_h5ad, tmp_path / "o", "--pooling", "mean"))


def test_bad_checkpoints_fail_clearly(setup, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    _, h5ad = setup["cellfm"]
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(bert)
    (bert / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="model_type 'bert', which is not an hf-scfm model family"):
        finetune(*ft_args(bert, h5ad, tmp_path / "o"))

    broken = tmp_path / "broken"
    model_dir, _ = setup["cellfm"]
    broken.mkdir()
    for item in model_dir.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        finetune(*ft_args(broken, h5ad, tmp_path / "o"))
    (broken / "model.safetensors").unlink()
    assert cli.main(["finetune", "--model", str(broken), "--train", str(h5ad), "--label-key", "cell_type",
                     "--out", str(tmp_path / "o")]) == 2
    assert "has config.json but no weights" in capsys.readouterr().err

    with pytest.raises(ValueError, match="no obs column 'donor'"):
        finetune(*parse("--model", str(model_dir), "--train", str(h5ad), "--label-key", "donor", "--out",
                       str(tmp_path / "o")))


def test_metrics_match_sklearn():
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    from hf_scfm.training.finetune import classification_metrics

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 97)
    preds = np.where(rng.random(97) < 0.6, labels, rng.integers(0, 6, 97))  # class 5 predicted, never true
    got = classification_metrics(preds, labels)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=1e-12)
    for key, fn in (("f1_macro", f1_score), ("precision_macro", precision_score), ("recall_macro", recall_score)):
        assert got[key] == pytest.approx(fn(labels, preds, average="macro", zero_division=0), abs=1e-12), key


def test_warmup_ratio_and_hvg_flavor_reach_the_trainer_and_the_tokenizer(setup, tmp_path, monkeypatch):
    """--warmup-steps R with R in [0, 1): the Trainer warms the learning rate up over R of the steps (then decays
    it linearly); --hvg-flavor: the flavour of the --n-top-genes selection."""
    import anndata
    import transformers

    from hf_scfm.tokenization import GeneTokenizer

    seen = {}
    original = transformers.Trainer.create_scheduler

    def spy(self, num_training_steps, optimizer=None):
        scheduler = original(self, num_training_steps, optimizer)
        seen["lrs"] = [scheduler.lr_lambdas[0](step) for step in range(num_training_steps)]
        return scheduler

    monkeypatch.setattr(transformers.Trainer, "create_scheduler", spy)
    model_dir, h5ad = setup["cellfm"]
    out = tmp_path / "clf"
    finetune(*parse("--model", str(model_dir), "--train", str(h5ad), "--label-key", "cell_type", "--out", str(out),
                    "--max-steps", "8", "--batch-size", "8", "--max-length", "64", "--no-lora", "--warmup-steps",
                    "0.5", "--n-top-genes", "30", "--hvg-flavor", "seurat"))
    assert seen["lrs"][:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert seen["lrs"][5:] == pytest.approx([0.75, 0.5, 0.25])
    expected = GeneTokenizer.from_pretrained(str(model_dir))
    assert expected.select_highly_variable_genes(anndata.read_h5ad(h5ad), 30, flavor="seurat") == \
        GeneTokenizer.from_pretrained(str(out)).gene_subset
    finetune(*ft_args(model_dir, h5ad, tmp_path / "default", "--no-lora"))
    assert seen["lrs"][0] == pytest.approx(1.0)  # no warm-up by default
