"""Collators: padding, exact masking fractions and positions, seeding, label maps, perturbation flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_scfm.data.collators import (
    DataCollatorForCellClassification,
    DataCollatorForGeneMLM,
    DataCollatorForMaskedExpression,
    DataCollatorForMaskedRegression,
    DataCollatorForNextGene,
    DataCollatorForPerturbation,
)
from hf_scfm.data.masking import FIRST_GENE_ID, choose_exact, uniforms
from hf_scfm.tokenization.special_tokens import (
    BOS_TOKEN_ID,
    CLS_TOKEN_ID,
    EOS_TOKEN_ID,
    IGNORE_INDEX,
    MASK_TOKEN_ID,
    MASK_VALUE,
    PAD_TOKEN_ID,
)

VOCAB = 500


def synthetic_records(n_cells=7, seed=0, first=CLS_TOKEN_ID, last=None, binned=True, lengths=None):
    """Cells shaped like tokenizer output: a special token first (and last), genes, values."""
    rng = np.random.default_rng(seed)
    lengths = lengths if lengths is not None else rng.integers(3, 60, size=n_cells)
    records = []
    for n in lengths:
        genes = rng.choice(np.arange(FIRST_GENE_ID, VOCAB), size=n, replace=False)
        vals = rng.integers(1, 51, size=n).astype(np.float32) if binned else rng.gamma(2.0, 1.0, size=n).astype(np.float32)
        ids = [first, *genes.tolist()] + ([last] if last is not None else [])
        values = [0.0, *vals.tolist()] + ([0.0] if last is not None else [])
        records.append({"input_ids": ids, "values": values, "length": len(ids)})
    return records


@pytest.fixture(scope="module")
def real_records():
    """Records of real Baron human cells through the package tokenizer (binned), when it exists."""
    tokenization = pytest.importorskip("hf_scfm.tokenization")
    if not hasattr(tokenization, "GeneTokenizer"):
        pytest.skip("GeneTokenizer not available yet")
    from hf_scfm.data import load_example

    adata = load_example("baron_human")[:48].copy()
    tok = tokenization.GeneTokenizer.from_species("human", encoding="binned")
    enc = tok(adata, max_length=256, truncation=True, padding=False)
    records = [{"input_ids": list(i), "values": list(v), "cell_type": c}
               for i, v, c in zip(enc["input_ids"], enc["values"], adata.obs["cell_type"].astype(str))]
    return records, len(tok)


def expected_k(n, fraction):
    return max(1, int(np.floor(fraction * n + 0.5))) if n else 0


# --------------------------------------------------------------------------- padding
def test_padding_is_right_padding_to_longest_and_multiple():
    recs = synthetic_records(lengths=[3, 10, 6], last=EOS_TOKEN_ID)
    batch = DataCollatorForNextGene()(recs)
    assert set(batch) == {"input_ids", "values", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (3, 12) and batch["input_ids"].dtype == torch.int64
    assert batch["values"].dtype == torch.float32 and batch["attention_mask"].dtype == torch.int64
    for b, rec in enumerate(recs):
        n = len(rec["input_ids"])
        assert batch["input_ids"][b, :n].tolist() == rec["input_ids"]
        assert torch.equal(batch["values"][b, :n], torch.tensor(rec["values"]))
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (12 - n)
        assert (batch["input_ids"][b, n:] == PAD_TOKEN_ID).all() and (batch["values"][b, n:] == 0).all()
    padded = DataCollatorForNextGene(pad_to_multiple_of=8)(recs)
    assert padded["input_ids"].shape == (3, 16)
    assert torch.equal(padded["input_ids"][:, :12], batch["input_ids"])


def test_padding_accepts_numpy_and_prepadded_records():
    recs = synthetic_records(lengths=[4, 9])
    as_np = [{k: np.asarray(v) for k, v in r.items()} for r in recs]
    a, b = DataCollatorForNextGene()(recs), DataCollatorForNextGene()(as_np)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a record padded by the tokenizer: its own attention mask is honoured
    pre = dict(recs[0], input_ids=recs[0]["input_ids"] + [0, 0], values=recs[0]["values"] + [0.0, 0.0],
               attention_mask=[1] * 5 + [0, 0])
    c = DataCollatorForNextGene()([pre, recs[1]])
    assert c["attention_mask"][0].tolist() == [1] * 5 + [0] * 5
    assert torch.equal(c["labels"], a["labels"])


def test_columnar_batches_equal_record_batches():
    """A dict of columns or an Arrow table (Dataset.iter / Arrow format) collates exactly like records."""
    import pyarrow as pa

    recs = synthetic_records(n_cells=9, seed=11)
    for i, rec in enumerate(recs):
        rec["cell_type"] = "ab"[i % 2]
        rec["target_values"] = [v + 1.0 for v in rec["values"]]
        rec["perturbed_gene_ids"] = rec["input_ids"][1:2]
    columns = {k: [r[k] for r in recs] for k in recs[0]}
    table = pa.table(columns)
    collators = [
        DataCollatorForMaskedExpression(seed=2, pad_to_multiple_of=8),
        DataCollatorForGeneMLM(vocab_size=VOCAB, seed=2),
        DataCollatorForCellClassification(label2id={"a": 0, "b": 1}),
        DataCollatorForPerturbation(),
    ]
    for col in collators:
        ref = col(recs)
        for other in (col(columns), col(table)):
            assert set(other) == set(ref) and all(torch.equal(other[k], ref[k]) for k in ref), type(col).__name__
    sliced = table.slice(3, 4)  # an Arrow slice: offsets do not start at 0
    assert torch.equal(DataCollatorForNextGene()(sliced)["input_ids"], DataCollatorForNextGene()(recs[3:7])["input_ids"])


def test_bad_records_raise_clear_errors():
    recs = synthetic_records(lengths=[4, 5])
    with pytest.raises(ValueError, match="'values' has 3 entries but 'input_ids' has 6"):
        DataCollatorForMaskedExpression()([recs[0], dict(recs[1], values=[1.0, 2.0, 3.0])])
    with pytest.raises(ValueError, match="needs"):
        DataCollatorForMaskedRegression()([{"input_ids": [2, 7, 8]}])
    with pytest.raises(ValueError, match="no 'input_ids'"):
        DataCollatorForNextGene()([{"values": [0.0]}])
    with pytest.raises(ValueError, match="1-D"):
        DataCollatorForNextGene()([{"input_ids": [[2, 7], [2, 8]]}])
    with pytest.raises(ValueError, match="non-empty batch"):
        DataCollatorForNextGene()([])
    with pytest.raises(ValueError, match="fraction"):
        DataCollatorForMaskedExpression(mask_fraction=1.5)


# --------------------------------------------------------------------------- next gene
def test_next_gene_labels_are_ids_with_padding_ignored():
    recs = synthetic_records(lengths=[5, 2, 8], first=BOS_TOKEN_ID, last=EOS_TOKEN_ID)
    batch = DataCollatorForNextGene()(recs)
    real = batch["attention_mask"] == 1
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])
    assert (batch["labels"][~real] == IGNORE_INDEX).all()
    no_values = DataCollatorForNextGene()([{"input_ids": r["input_ids"]} for r in recs])
    assert "values" not in no_values and torch.equal(no_values["labels"], batch["labels"])


# --------------------------------------------------------------------------- gene MLM
def test_gene_mlm_exact_counts_only_genes_and_80_10_10():
    recs = synthetic_records(n_cells=600, seed=1, first=BOS_TOKEN_ID, last=EOS_TOKEN_ID)
    col = DataCollatorForGeneMLM(vocab_size=VOCAB, seed=3)
    batch = col(recs)
    orig = DataCollatorForNextGene()(recs)["input_ids"]
    labels, ids = batch["labels"], batch["input_ids"]
    chosen = labels != IGNORE_INDEX
    genes = (orig >= FIRST_GENE_ID) & (orig_mask := DataCollatorForNextGene()(recs)["attention_mask"] == 1)
    # exactly floor(0.15 n + 0.5) (at least one) gene tokens per cell, never a special or padding
    for b in range(len(recs)):
        assert int(chosen[b].sum()) == expected_k(int(genes[b].sum()), 0.15)
    assert not (chosen & ~genes).any()
    assert torch.equal(labels[chosen], orig[chosen])
    # untouched outside the chosen positions, specials included
    assert torch.equal(ids[~chosen], orig[~chosen])
    assert (ids[orig == BOS_TOKEN_ID] == BOS_TOKEN_ID).all() and (ids[orig == EOS_TOKEN_ID] == EOS_TOKEN_ID).all()
    assert (ids[~orig_mask] == PAD_TOKEN_ID).all()
    # 80 % <mask>, 10 % random gene, 10 % unchanged (over ~2,900 chosen tokens: +-2.5 points is > 3 sigma)
    n = int(chosen.sum())
    masked = (ids[chosen] == MASK_TOKEN_ID).float().mean().item()
    kept = (ids[chosen] == orig[chosen]).float().mean().item()
    assert n > 2500
    assert abs(masked - 0.8) < 0.025 and abs(kept - 0.1) < 0.025 and abs(1 - masked - kept - 0.1) < 0.025 + 0.004
    replaced = ids[chosen & (ids != MASK_TOKEN_ID) & (ids != orig)]
    assert replaced.min() >= FIRST_GENE_ID and replaced.max() < VOCAB
    assert torch.equal(batch["values"], DataCollatorForNextGene()(recs)["values"])  # values pass through


def test_gene_mlm_needs_vocab_size_and_checks_ids():
    with pytest.raises(ValueError, match="vocabulary size"):
        DataCollatorForGeneMLM()
    with pytest.raises(ValueError, match="token id 499 but vocab_size is 100"):
        DataCollatorForGeneMLM(vocab_size=100)([{"input_ids": [2, 499, 7]}])


# --------------------------------------------------------------------------- masked values
@pytest.mark.parametrize("cls, fraction", [(DataCollatorForMaskedExpression, 0.4), (DataCollatorForMaskedRegression, 0.2)])
def test_masked_value_collators_default_fractions_and_targets(cls, fraction):
    recs = synthetic_records(n_cells=50, seed=2, binned=cls is DataCollatorForMaskedExpression)
    recs.append({"input_ids": [CLS_TOKEN_ID], "values": [0.0]})  # a cell without genes: nothing to mask
    col = cls(seed=0)
    assert col.mask_fraction == fraction
    batch = col(recs)
    ref = DataCollatorForNextGene()(recs)
    labels, values = batch["labels"], batch["values"]
    assert labels.dtype == torch.float32
    masked = labels != IGNORE_INDEX
    genes = (ref["input_ids"] >= FIRST_GENE_ID) & (ref["attention_mask"] == 1)
    for b in range(len(recs)):
        assert int(masked[b].sum()) == expected_k(int(genes[b].sum()), fraction)
    assert not (masked & ~genes).any()
    assert torch.equal(masked, values == MASK_VALUE)
    assert torch.equal(labels[masked], ref["values"][masked])
    assert torch.equal(values[~masked], ref["values"][~masked])  # <cls>, padding and unmasked genes intact
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert (labels[~masked] == IGNORE_INDEX).all()


def test_masked_expression_fraction_range_per_cell():
    recs = synthetic_records(n_cells=300, seed=4, lengths=[201] * 300)
    batch = DataCollatorForMaskedExpression(mask_fraction=(0.15, 0.4), seed=1)(recs)
    per_cell = (batch["labels"] != IGNORE_INDEX).sum(1).float() / 200
    assert per_cell.min() >= 0.15 - 0.003 and per_cell.max() <= 0.4 + 0.003
    assert per_cell.std() > 0.05  # spread over the range, not one value
    assert abs(per_cell.mean().item() - 0.275) < 0.015


def test_selection_matches_argsort_reference():
    """The O(L) selection equals the plain 'k smallest uniforms by a stable argsort' definition."""
    rng = np.random.default_rng(0)
    eligible = rng.random((9, 37)) < 0.7
    eligible[3] = False
    eligible[5, :] = False
    eligible[5, 11] = True
    u = rng.random((9, 37))
    fraction = rng.uniform(0.05, 0.9, size=9)
    got = choose_exact(eligible, u, fraction)
    for b in range(9):
        n = int(eligible[b].sum())
        k = expected_k(n, fraction[b])
        order = np.argsort(np.where(eligible[b], u[b], 2.0), kind="stable")
        ref = np.zeros(37, bool)
        ref[order[:k]] = True
        assert np.array_equal(got[b], ref)
    # ties (equal uniforms) still give exactly k positions
    tied = choose_exact(np.ones((1, 10), bool), np.full((1, 10), 0.5), np.array([0.3]))
    assert tied.sum() == 3


# --------------------------------------------------------------------------- seeding
def test_random_stream_is_pinned():
    """The counter-based generator is part of the reproducibility promise: its output must not drift."""
    positions = np.arange(3)[None, :]
    u = uniforms(np.array([[0], [12345]], dtype=np.uint64), positions, seed=7, epoch=0, stream=0)
    again = uniforms(np.array([[12345]], dtype=np.uint64), positions, seed=7, epoch=0, stream=0)
    assert np.array_equal(u[1], again[0])
    assert u.min() >= 0 and u.max() < 1
    np.testing.assert_allclose(u, PINNED_UNIFORMS, rtol=0, atol=1e-15)


PINNED_UNIFORMS = [[0.798495738252738, 0.12555467099407136, 0.8796372674694966],
                   [0.704475329014121, 0.4335342281122989, 0.14607228104292935]]


@pytest.mark.parametrize("make", [
    lambda: DataCollatorForMaskedExpression(seed=5),
    lambda: DataCollatorForMaskedRegression(seed=5),
    lambda: DataCollatorForGeneMLM(vocab_size=VOCAB, seed=5),
])
def test_masks_depend_on_seed_epoch_and_cell_only(make):
    recs = synthetic_records(n_cells=12, seed=6)
    a, b = make()(recs), make()(recs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same cell, in another batch with other companions and another padded length
    cell = recs[3]
    other = make()([synthetic_records(n_cells=1, seed=9, lengths=[90])[0], cell])
    n = len(cell["input_ids"])
    assert torch.equal(other["labels"][1, :n], a["labels"][3, :n])
    assert torch.equal(other["input_ids"][1, :n], a["input_ids"][3, :n])
    # another seed or another epoch: other masks
    c = make()
    c.seed = 6
    assert not torch.equal(c(recs)["labels"], a["labels"])
    d = make()
    d.set_epoch(1)
    assert not torch.equal(d(recs)["labels"], a["labels"])


# --------------------------------------------------------------------------- classification
def test_classification_label_map_fit_save_load_and_errors(tmp_path):
    recs = synthetic_records(lengths=[4, 6, 5])
    for rec, label in zip(recs, ["beta", "alpha", "beta"]):
        rec["cell_type"] = label
    col = DataCollatorForCellClassification().fit(recs)
    assert col.label2id == {"alpha": 0, "beta": 1}
    batch = col(recs)
    assert batch["labels"].tolist() == [1, 0, 1] and batch["labels"].dtype == torch.int64
    assert batch["input_ids"].shape == (3, 7)

    path = tmp_path / "label_map.json"
    col.save_label_map(path)
    assert json.loads(path.read_text())["label2id"] == {"alpha": 0, "beta": 1}
    assert torch.equal(DataCollatorForCellClassification.load_label_map(path)(recs)["labels"], batch["labels"])

    from transformers import PretrainedConfig

    config = PretrainedConfig()
    col.update_config(config)
    assert config.num_labels == 2 and config.id2label == {0: "alpha", 1: "beta"}
    reloaded = PretrainedConfig.from_dict(config.to_dict())
    assert DataCollatorForCellClassification.from_config(reloaded).label2id == {"alpha": 0, "beta": 1}

    unseen = dict(recs[0], cell_type="delta")
    with pytest.raises(ValueError, match=r"Label 'delta' \(record 1\) in column 'cell_type' was not seen"):
        col([recs[0], unseen])
    with pytest.raises(ValueError, match="no label column 'donor'"):
        DataCollatorForCellClassification("donor", {"a": 0})(recs)
    with pytest.raises(ValueError, match="not an integer id and there is no label map"):
        DataCollatorForCellClassification()(recs)
    ints = [dict(r, cell_type=i) for i, r in enumerate(recs)]
    assert DataCollatorForCellClassification()(ints)["labels"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="0..1 exactly once"):
        DataCollatorForCellClassification(label2id={"a": 0, "b": 2})


# --------------------------------------------------------------------------- perturbation
def test_perturbation_flags_and_targets():
    recs = synthetic_records(lengths=[5, 3], binned=False)
    rng = np.random.default_rng(0)
    recs[0]["target_values"] = [0.0, *rng.random(5).tolist()]
    recs[0]["perturbed_gene_ids"] = [recs[0]["input_ids"][2], 499 if 499 not in recs[0]["input_ids"] else 498]
    recs[1]["target_values"] = [0.0, *rng.random(3).tolist()]
    recs[1]["perturbed_gene_ids"] = []
    batch = DataCollatorForPerturbation()(recs)
    assert set(batch) == {"input_ids", "values", "attention_mask", "perturbation_flags", "labels"}
    assert batch["perturbation_flags"].tolist() == [[0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert batch["perturbation_flags"].dtype == torch.int64
    labels = batch["labels"]
    assert labels[0, 0] == IGNORE_INDEX and (labels[1, 4:] == IGNORE_INDEX).all()  # <cls> and padding
    assert torch.allclose(labels[0, 1:], torch.tensor(recs[0]["target_values"][1:], dtype=torch.float32))
    assert torch.equal(batch["values"][0], torch.tensor(recs[0]["values"], dtype=torch.float32))
    # precomputed flags are used as given
    flags = [dict(r, perturbation_flags=[0] * len(r["input_ids"])) for r in recs]
    flags[1]["perturbation_flags"][2] = 1
    assert DataCollatorForPerturbation()(flags)["perturbation_flags"].tolist()[1] == [0, 0, 1, 0, 0, 0]
    flags[1]["perturbation_flags"][0] = 1
    with pytest.raises(ValueError, match="special-token or padding"):
        DataCollatorForPerturbation()(flags)
    with pytest.raises(ValueError, match="has no 'target_values'"):
        DataCollatorForPerturbation()([{"input_ids": [2, 7], "values": [0.0, 1.0]}])


# --------------------------------------------------------------------------- real data
def test_collators_on_real_tokenized_cells(real_records):
    records, vocab_size = real_records
    lengths = [len(r["input_ids"]) for r in records]
    for col, frac in [(DataCollatorForMaskedExpression(seed=0), 0.4), (DataCollatorForGeneMLM(vocab_size=vocab_size), 0.15)]:
        batch = col(records[:16])
        assert batch["input_ids"].shape == (16, max(lengths[:16]))
        real = batch["attention_mask"] == 1
        assert real.sum(1).tolist() == lengths[:16]
        chosen = batch["labels"] != IGNORE_INDEX
        genes = real & (DataCollatorForNextGene()(records[:16])["input_ids"] >= FIRST_GENE_ID)
        assert [int(x) for x in chosen.sum(1)] == [expected_k(int(n), frac) for n in genes.sum(1)]
        assert not (chosen & ~genes).any()
    cls = DataCollatorForCellClassification("cell_type").fit(records)
    batch = cls(records[:8])
    assert [cls.id2label[i] for i in batch["labels"].tolist()] == [r["cell_type"] for r in records[:8]]
