"""Corpus builder and loader on real bundled data (Baron human pancreas): shards, card, resume after
kill -9, bad shards, splits by column and by node, length grouping, streaming into a collator."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import pytest

from hf_scfm.data import load_example
from hf_scfm.data.corpus import build_corpus
from hf_scfm.data.loading import (
    CorpusFormatError,
    LengthGroupedBatchSampler,
    corpus_files,
    length_grouping_arguments,
    load_corpus,
    split_by_column,
    split_by_node,
)

GeneTokenizer = pytest.importorskip("hf_scfm.tokenization").GeneTokenizer

MAX_LENGTH = 96
N_A, N_B = 150, 90
BUILD = dict(shard_size=64, chunk_size=32, obs_columns=["cell_type", "batch"], max_length=MAX_LENGTH, progress=False)


@pytest.fixture(autouse=True)
def no_shutdown_sleep(monkeypatch):
    """datasets sleeps 5 s whenever a shuffled Parquet stream closes (a workaround for an old pyarrow
    bug, apache/arrow#45214, fixed in the pyarrow installed here); the tests close many streams."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)


@pytest.fixture(scope="module")
def tokenizer():
    return GeneTokenizer.from_species("human", encoding="binned")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two small h5ad files of real cells (raw counts), and the AnnData they came from."""
    adata = load_example("baron_human")
    folder = tmp_path_factory.mktemp("h5ad")
    a, b = adata[:N_A].copy(), adata[N_A : N_A + N_B].copy()
    paths = [str(folder / "donors_a.h5ad"), str(folder / "donors_b.h5ad")]
    a.write_h5ad(paths[0])
    b.write_h5ad(paths[1])
    return paths, a, b


@pytest.fixture(scope="module")
def corpus(inputs, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "baron"
    report = build_corpus(inputs[0], tokenizer, out, **BUILD)
    return str(out), report


def shard_bytes(out):
    return {os.path.basename(f): open(f, "rb").read() for f in corpus_files(out)}


# --------------------------------------------------------------------------- building
def test_shards_hold_the_tokenizer_output_cell_by_cell(corpus, inputs, tokenizer):
    out, report = corpus
    _, a, b = inputs
    names = sorted(os.listdir(os.path.join(out, "data")))
    assert names == [f"train-0000{i}-0000{k}.parquet" for i, n in ((0, 3), (1, 2)) for k in range(n)]
    assert report.n_cells == N_A + N_B and report.n_shards == 5 and report.shards_written == 5
    assert report.cells_per_source == {"donors_a.h5ad": N_A, "donors_b.h5ad": N_B}

    ds = load_corpus(out, tokenizer=tokenizer)
    assert ds.column_names == ["input_ids", "values", "length", "cell_id", "cell_type", "batch", "source_file"]
    assert len(ds) == N_A + N_B
    rows = ds[:]
    for adata, offset, source in ((a, 0, "donors_a.h5ad"), (b, N_A, "donors_b.h5ad")):
        enc = tokenizer(adata, max_length=MAX_LENGTH, padding=False)
        n = adata.n_obs
        assert rows["input_ids"][offset : offset + n] == [x.tolist() for x in enc["input_ids"]]
        np.testing.assert_array_equal(
            np.concatenate(rows["values"][offset : offset + n]), np.concatenate(enc["values"]).astype(np.float32)
        )
        assert rows["length"][offset : offset + n] == [len(x) for x in enc["input_ids"]]
        assert rows["cell_id"][offset : offset + n] == list(adata.obs_names)
        assert rows["cell_type"][offset : offset + n] == list(adata.obs["cell_type"].astype(str))
        assert rows["batch"][offset : offset + n] == list(adata.obs["batch"].astype(str))
        assert set(rows["source_file"][offset : offset + n]) == {source}
    assert max(rows["length"]) == MAX_LENGTH


def test_dataset_card_has_features_settings_and_counts(corpus, inputs, tokenizer):
    from huggingface_hub import DatasetCard

    out, report = corpus
    _, a, b = inputs
    card = DatasetCard.load(os.path.join(out, "README.md"))
    info = card.data.to_dict()["dataset_info"]
    features = {f["name"]: f for f in info["features"]}
    assert list(features) == ["input_ids", "values", "length", "cell_id", "cell_type", "batch", "source_file"]
    assert features["input_ids"]["list"] == "int32" and features["values"]["list"] == "float32"
    assert info["splits"][0]["num_examples"] == N_A + N_B
    assert card.data.to_dict()["configs"][0]["data_files"][0]["path"] == "data/train-*.parquet"
    text = card.text
    assert "| donors_a.h5ad | 150 |" in text and "| donors_b.h5ad | 90 |" in text
    both = np.concatenate([a.obs["cell_type"].astype(str), b.obs["cell_type"].astype(str)])
    labels, counts = np.unique(both, return_counts=True)
    for label, count in zip(labels, counts):
        assert f"| {label} | {count:,} |" in text
    assert report.label_counts["cell_type"] == dict(zip(labels.tolist(), counts.tolist()))
    assert tokenizer.vocab_checksum in text and '"encoding": "binned"' in text and f'"max_length": {MAX_LENGTH}' in text
    # the tokenizer travels with the corpus
    assert GeneTokenizer.from_pretrained(os.path.join(out, "tokenizer")).vocab_checksum == tokenizer.vocab_checksum


def test_in_memory_anndata_input_and_rerun_skips_everything(corpus, inputs, tokenizer, tmp_path):
    out, _ = corpus
    _, a, b = inputs
    mem = tmp_path / "mem"
    report = build_corpus({"donors_a.h5ad": a, "donors_b.h5ad": b}, tokenizer, mem, **BUILD)
    assert shard_bytes(mem) == shard_bytes(out)  # same cells, same names -> same bytes
    again = build_corpus({"donors_a.h5ad": a, "donors_b.h5ad": b}, tokenizer, mem, **BUILD)
    assert (again.shards_written, again.shards_skipped) == (0, 5)
    assert report.n_cells == again.n_cells == N_A + N_B


def test_resume_after_kill_gives_identical_shards(corpus, inputs, tokenizer, tmp_path, monkeypatch):
    """SIGKILL a builder process in the middle of a shard, re-run: byte-identical to an uninterrupted run.

    The builder runs in a forked child (it inherits the imported package, so it starts at once) whose
    tokenizer step is slowed down so the kill lands mid-build."""
    from hf_scfm.data import shards

    out, _ = corpus
    target = tmp_path / "killed"
    data = target / "data"
    pid = os.fork()
    if pid == 0:  # the child: build slowly until killed
        try:
            slow = shards.tokenize_chunk
            shards.tokenize_chunk = lambda *a, **k: (time.sleep(0.4), slow(*a, **k))[1]
            build_corpus(inputs[0], tokenizer, target, **BUILD)
        finally:
            os._exit(0)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if data.is_dir() and any(f.startswith("train-") for f in os.listdir(data)):
                break
            time.sleep(0.01)
        time.sleep(0.2)  # into the next shard
    finally:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    finished = sorted(f for f in os.listdir(data) if f.startswith("train-"))
    assert 1 <= len(finished) < 5  # killed in the middle
    partial = [f for f in os.listdir(data) if f.startswith(".tmp-")]
    assert len(partial) == 1 and partial[0].endswith(".partial")  # the half-written shard, invisible to loaders
    assert len(corpus_files(target)) == len(finished)
    with pytest.raises(CorpusFormatError, match="is incomplete: its build did not finish"):
        load_corpus(target, streaming=True)  # the builder recorded that it did not finish
    assert len(list(load_corpus(target, streaming=True, allow_partial=True))) == 64 * len(finished)  # valid
    assert not (target / "README.md").exists()

    report = build_corpus(inputs[0], tokenizer, target, **BUILD)
    assert report.shards_skipped == len(finished) and report.shards_written == 5 - len(finished)
    assert not any(f.startswith(".tmp-") for f in os.listdir(data))
    assert shard_bytes(target) == shard_bytes(out)


def test_parallel_build_equals_serial(corpus, inputs, tokenizer, tmp_path):
    out, _ = corpus
    # fork: the workers start at once; the default "spawn" runs the same code after a fresh import
    report = build_corpus(inputs[0], tokenizer, tmp_path / "par", num_proc=2, mp_context="fork", **BUILD)
    assert report.shards_written == 5
    assert shard_bytes(tmp_path / "par") == shard_bytes(out)
    # the CPU accounting counts the workers (the tokenizer ran only there: a counter in the parent stays 0)
    assert 0 < report.tokenize_cpu_seconds <= report.cpu_seconds
    serial = build_corpus(inputs[0], tokenizer, tmp_path / "ser", **BUILD)
    assert 0 < serial.tokenize_cpu_seconds <= serial.cpu_seconds


def test_one_file_split_over_processes_and_the_unpipelined_padded_path_give_the_same_shards(
        corpus, inputs, tokenizer, tmp_path, monkeypatch):
    """num_proc=2 on ONE file cuts its shards into row ranges, one per process; the builder's one-thread,
    padded-tokenizer path (PIPELINE_DEPTH=0, _tokenize_chunk_padded) writes the same bytes as the default
    (pipelined, encode_flat) one."""
    import hf_scfm.data.corpus as corpus_module

    out, _ = corpus
    first_source = {k: v for k, v in shard_bytes(out).items() if k.startswith("train-00000-")}
    assert len(first_source) == 3
    jobs = corpus_module._split_jobs([{"shards": [(k, 64 * k, 64 * k + 64) for k in range(5)]}], 2)
    assert [[s[0] for s in j["shards"]] for j in jobs] == [[0, 1], [2, 3, 4]]
    assert len(corpus_module._split_jobs([{"shards": [(0, 0, 5)]}], 4)) == 1  # one shard: nothing to split

    report = build_corpus(inputs[0][0], tokenizer, tmp_path / "split", num_proc=2, mp_context="fork", **BUILD)
    assert report.shards_written == 3
    assert shard_bytes(tmp_path / "split") == first_source

    from hf_scfm.data import shards

    monkeypatch.setattr(shards, "PIPELINE_DEPTH", 0)
    monkeypatch.setattr(shards, "tokenize_chunk", shards.tokenize_chunk_padded)
    build_corpus(inputs[0][0], tokenizer, tmp_path / "serial", **BUILD)
    assert shard_bytes(tmp_path / "serial") == first_source


def _cells_of(batches):
    """Each cell of collated batches as bytes of its real (unpadded) ids, values and labels, sorted."""
    cells = []
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            real = batch["attention_mask"][i] == 1
            cells.append(b"|".join(batch[k][i][real].numpy().tobytes() for k in ("input_ids", "values", "labels")))
    return sorted(cells)


def _batch_bytes(batch):
    return b"|".join(batch[k].numpy().tobytes() for k in ("input_ids", "values", "attention_mask", "labels"))


def test_parallel_iter_batches_yield_the_serial_cells_and_batches(corpus):
    """Threads and worker processes: the same multiset of cells (masks included) as the serial path; with
    shards holding a multiple of the batch size, the same batches, in a worker-interleaved order that is
    the same for threads and processes."""
    from hf_scfm.data import DataCollatorForMaskedExpression, iter_batches

    out, _ = corpus
    collator = DataCollatorForMaskedExpression(seed=3)
    collator.set_epoch(1)
    stream = load_corpus(out, streaming=True, columns=["input_ids", "values"])
    assert stream.num_shards == 5  # 64, 64, 22 | 64, 26 cells
    serial = list(iter_batches(stream, 16, collator))
    threads = list(iter_batches(stream, 16, collator, num_workers=2))
    procs = list(iter_batches(stream, 16, collator, num_workers=2, processes=True, multiprocessing_context="fork"))
    assert sum(b["input_ids"].shape[0] for b in threads) == N_A + N_B
    assert _cells_of(threads) == _cells_of(procs) == _cells_of(serial)
    # 16 divides 64: batches are cut at the same places except around the short shards
    assert [_batch_bytes(b) for b in threads] == [_batch_bytes(b) for b in procs]
    assert [_batch_bytes(b) for b in threads] != [_batch_bytes(b) for b in serial]  # interleaved, not serial order
    # worker 0 reads shards 0, 2, 4 and worker 1 shards 1, 3; batches alternate between them
    w0 = list(iter_batches(stream.shard(num_shards=2, index=0, contiguous=False), 16, collator))
    w1 = list(iter_batches(stream.shard(num_shards=2, index=1, contiguous=False), 16, collator))
    expected = [b for pair in zip(w0, w1) for b in pair] + w0[len(w1):] + w1[len(w0):]
    assert [_batch_bytes(b) for b in threads] == [_batch_bytes(b) for b in expected]
    # a map-style corpus: contiguous blocks of rows per worker, the same cells again
    mapped = load_corpus(out, columns=["input_ids", "values"])
    assert _cells_of(iter_batches(mapped, 24, collator, num_workers=3)) == _cells_of(serial)
    with pytest.raises(ValueError, match="5 shard\\(s\\) for 6 workers"):
        next(iter_batches(stream, 16, collator, num_workers=6))
    with pytest.raises(ValueError, match="num_workers must be 0 or a positive"):
        next(iter_batches(stream, 16, collator, num_workers=-1))


def test_command_line_arguments_build_the_same_cells(corpus, inputs, tmp_path):
    from hf_scfm.cli import main

    out, _ = corpus
    assert main(["tokenize", inputs[0][1], "--tokenizer", os.path.join(out, "tokenizer"), "--out", str(tmp_path / "cli"),
                 "--shard-size", "64", "--chunk-size", "32", "--max-length", str(MAX_LENGTH),
                 "--obs-columns", "cell_type", "batch", "--no-progress"]) == 0
    built = load_corpus(tmp_path / "cli")
    reference = load_corpus(out)
    assert list(built["cell_id"]) == list(reference["cell_id"])[N_A:]
    assert list(built["input_ids"]) == list(reference["input_ids"])[N_A:]


# --------------------------------------------------------------------------- bad input
def test_missing_label_column_names_column_and_file(inputs, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"\['donor'\] not found in '.*donors_a.h5ad'"):
        build_corpus(inputs[0], tokenizer, tmp_path / "x", **dict(BUILD, obs_columns=["cell_type", "donor"]))


def test_corrupt_or_truncated_shard_is_named(corpus, tmp_path):
    out, _ = corpus
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = copy / "data" / "train-00001-00000.parquet"
    blob = shard.read_bytes()
    shard.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CorpusFormatError, match=r"train-00001-00000\.parquet.*truncated or corrupt"):
        load_corpus(copy)
    shard.write_bytes(b"not parquet at all")
    with pytest.raises(CorpusFormatError, match=r"train-00001-00000\.parquet"):
        load_corpus(copy, streaming=True)


def test_shards_from_another_tokenizer_are_rejected(corpus, inputs, tmp_path):
    out, _ = corpus
    other_tok = GeneTokenizer.from_species("human", encoding="binned", n_bins=11)
    other = tmp_path / "other"
    build_corpus(inputs[0][1], other_tok, other, **BUILD)
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    shutil.copy(other / "data" / "train-00000-00000.parquet", mixed / "data" / "train-00002-00000.parquet")
    with pytest.raises(CorpusFormatError, match=r"train-00002-00000\.parquet.*different settings.*n_bins: 11 vs 51"):
        load_corpus(mixed)
    # building into a corpus folder with another tokenizer is refused too
    with pytest.raises(CorpusFormatError, match="other tokenizer settings"):
        build_corpus(inputs[0], other_tok, tmp_path / "mixed", **BUILD)
    # and a tokenizer given to the loader must match the vocabulary
    other_vocab = types.SimpleNamespace(vocab_checksum="0" * 64)  # all the loader reads of a tokenizer
    with pytest.raises(CorpusFormatError, match="vocabulary checksum"):
        load_corpus(out, tokenizer=other_vocab)


# --------------------------------------------------------------------------- loading
def test_fresh_process_with_only_datasets_streams_the_corpus(corpus):
    out, _ = corpus
    code = textwrap.dedent(
        f"""
        import sys, datasets
        ds = datasets.load_dataset("parquet", data_dir={out!r}, streaming=True, split="train")
        rows = list(ds)
        assert not any(m.startswith("hf_scfm") for m in sys.modules)
        print(len(rows), len(rows[0]["input_ids"]), rows[0]["source_file"])
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    n, length, source = done.stdout.split()
    assert int(n) == N_A + N_B and 2 <= int(length) <= MAX_LENGTH and source == "donors_a.h5ad"


def test_split_by_column_holds_out_donors(corpus):
    out, _ = corpus
    ds = load_corpus(out)
    kept, held = split_by_column(ds, "batch", ["human1", "human3"])
    assert set(held["batch"]) == {"human1", "human3"} and not {"human1", "human3"} & set(kept["batch"])
    assert sorted(list(kept["cell_id"]) + list(held["cell_id"])) == sorted(ds["cell_id"])
    stream = load_corpus(out, streaming=True)
    s_kept, s_held = split_by_column(stream, "batch", "human1")
    held_ids = [r["cell_id"] for r in s_held]
    assert held_ids and {r["batch"] for r in s_held} == {"human1"}
    assert not set(held_ids) & {r["cell_id"] for r in s_kept}
    with pytest.raises(ValueError, match="Column 'donor' is not in the dataset"):
        split_by_column(ds, "donor", ["x"])
    with pytest.raises(ValueError, match=r"\['human9'\] do not occur in column 'batch'"):
        split_by_column(ds, "batch", ["human9"])


def test_split_by_node_gives_disjoint_shards_and_cells(corpus):
    out, _ = corpus
    all_ids = load_corpus(out)["cell_id"]
    stream = load_corpus(out, streaming=True, shuffle=True, seed=3, buffer_size=50)
    assert stream.num_shards == 5
    parts = [split_by_node(stream, rank, 5) for rank in range(5)]
    assert all(p.num_shards == 1 for p in parts)
    seen = [{r["source_file"] + "/" + r["cell_id"] for r in p} for p in parts]
    assert sum(map(len, seen)) == len(all_ids) and len(set().union(*seen)) == len(all_ids)
    with pytest.warns(UserWarning, match="not a multiple of world_size=2"):
        halves = [split_by_node(stream, rank, 2) for rank in range(2)]
    ids = [[r["cell_id"] for r in h] for h in halves]
    assert not set(ids[0]) & set(ids[1]) and len(ids[0]) + len(ids[1]) == len(all_ids)
    mapped = [split_by_node(load_corpus(out), rank, 3)["cell_id"] for rank in range(3)]
    assert sum(map(len, mapped)) == len(all_ids) and len(set().union(*map(set, mapped))) == len(set(all_ids))
    with pytest.raises(ValueError, match="rank must be in"):
        split_by_node(stream, 2, 2)


def test_streaming_shuffle_is_seeded_and_feeds_a_collator(corpus):
    import torch

    from hf_scfm.data import DataCollatorForMaskedExpression

    out, _ = corpus
    order = lambda seed: [r["cell_id"] for r in load_corpus(out, streaming=True, shuffle=True, seed=seed, buffer_size=40)]
    first = order(1)
    assert first == order(1) and first != order(2) and sorted(first) == sorted(order(2))
    ds = load_corpus(out, streaming=True, columns=["input_ids", "values"])
    loader = torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=DataCollatorForMaskedExpression(seed=0))
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 16 and batch["labels"].shape == batch["values"].shape
    assert ((batch["labels"] != -100) == (batch["values"] == -1.0)).all()


def test_length_grouped_batches(corpus, inputs):
    out, _ = corpus
    assert len(LengthGroupedBatchSampler(load_corpus(out)["length"], batch_size=16)) == -(-(N_A + N_B) // 16)
    # real sentence lengths (expressed genes + <cls> of Baron cells, untruncated) vary a lot
    _, a, b = inputs
    lengths = np.concatenate([np.diff(x.X.indptr) for x in (a, b)]) + 1
    sampler = LengthGroupedBatchSampler(lengths, batch_size=16, mega_batch_size=5, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == -(-len(lengths) // 16)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert max(lengths[i] for i in batches[0]) == lengths.max()  # longest batch first
    padded = sum(len(b) * lengths[b].max() for b in map(np.asarray, batches))
    rng = np.random.default_rng(0)
    random_padded = np.mean([sum(len(c) * lengths[c].max() for c in np.array_split(rng.permutation(len(lengths)), len(batches)))
                             for _ in range(5)])
    assert padded < 0.8 * random_padded
    assert list(sampler) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    dropped = list(LengthGroupedBatchSampler(lengths, batch_size=16, drop_last=True))
    assert all(len(b) == 16 for b in dropped) and len(dropped) == len(lengths) // 16
    assert length_grouping_arguments() == {"train_sampling_strategy": "group_by_length", "length_column_name": "length"}


def test_missing_corpus_and_unknown_columns(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="No Parquet shards"):
        load_corpus(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a corpus folder"):
        load_corpus(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(ValueError, match=r"Column\(s\) \['donor'\] are not in the corpus"):
        load_corpus(corpus[0], columns=["input_ids", "donor"])
    only = load_corpus(corpus[0], columns=["input_ids", "values"])
    assert only.column_names == ["input_ids", "values"] and len(only) == N_A + N_B
