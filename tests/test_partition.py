"""One data order for any number of processes (hf_scfm.data.partition, hf_scfm.training.pretrain_data): the
processes read disjoint shards, every cell of a part's epoch once, and step k's cells are the same set whether
1, 2 or 4 processes read them; positions handed over from 2 processes continue in 1.

The corpus is uneven on purpose: 70 real cells (Baron human) in shards of 16, so 5 shards of 16, 16, 16, 16 and 6
cells, read as 4 parts (the default for a global batch of 8 and 5 shards)."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest

from hf_scfm.data.partition import (
    PartStream,
    cells_per_part,
    check_parts,
    default_num_parts,
    partition_shards,
    rank_parts,
)
from hf_scfm.training.pretrain_data import CorpusParts, StepStream, corpus_tokenizer, is_eval_cell

from test_pretrain import small_adata, small_tokenizer

GLOBAL_BATCH, EVAL_FRACTION = 8, 0.1


@pytest.fixture(autouse=True)
def no_stream_shutdown_sleep(monkeypatch):
    """``datasets`` sleeps 5 s at the end of every pass over a shuffled parquet stream (apache/arrow#45214); each
    part goes round its epoch several times here."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from hf_scfm.data import build_corpus

    adata = small_adata("human", n_cells=70)
    folder = tmp_path_factory.mktemp("uneven") / "corpus"
    build_corpus(adata, small_tokenizer(adata, "human", "binned"), folder, shard_size=16, max_length=64,
                 progress=False)
    train_ids = [c for c in adata.obs_names if not is_eval_cell(c, EVAL_FRACTION)]
    return folder, sorted(train_ids)


def parts_of(folder, **kwargs):
    return CorpusParts(str(folder), corpus_tokenizer(str(folder)), global_batch=GLOBAL_BATCH, num_parts=None,
                       eval_fraction=EVAL_FRACTION, seed=3, shuffle_buffer=12, with_cell_id=True, **kwargs)


def test_layout_helpers():
    assert default_num_parts(8, 5) == 4 and default_num_parts(8, 3) == 2 and default_num_parts(12, 100) == 6
    assert default_num_parts(64, 1000) == 8 and default_num_parts(1, 7) == 1
    assert partition_shards([16, 16, 16, 16, 6], 4) == [[0, 4], [1], [2], [3]]
    sizes = [5, 9, 3, 9, 1, 7, 7, 2]
    split = partition_shards(sizes, 3)
    assert sorted(i for part in split for i in part) == list(range(8))
    loads = [sum(sizes[i] for i in part) for part in split]
    assert max(loads) - min(loads) <= max(sizes) and loads == [15, 14, 14]
    with pytest.raises(ValueError, match="Cannot split 2 shard"):
        partition_shards([3, 3], 3)
    assert cells_per_part(8, 4) == [2, 2, 2, 2] and cells_per_part(10, 4) == [3, 3, 2, 2]
    assert rank_parts(4, 1, 2) == [1, 3] and rank_parts(5, 0, 2) == [0, 2, 4]
    with pytest.raises(ValueError, match="read as 2 data part.*but 4 processes"):
        check_parts(2, 4, 8)
    with pytest.raises(ValueError, match="1 cell\\(s\\) per step, fewer than its 2 micro-batches"):
        check_parts(8, 8, 8, micro_batches=2)
    with pytest.warns(UserWarning, match=r"the processes get \[4, 2, 2\] cells per step"):
        check_parts(4, 3, 8)
    with pytest.warns(UserWarning, match=r"hold \[22, 16, 16, 16\] cells"):
        check_parts(4, 2, 8, part_cells=[22, 16, 16, 16])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_parts(4, 2, 8, part_cells=[16, 16, 16, 15])


def test_processes_read_disjoint_shards_and_every_cell_once_per_epoch(corpus):
    folder, train_ids = corpus
    parts = parts_of(folder)
    assert parts.num_parts == 4 and parts.shards == [[0, 4], [1], [2], [3]] and parts.part_cells == [22, 16, 16, 16]
    seen: Counter = Counter()
    for rank in range(2):
        others = {s for r in range(2) if r != rank for p in rank_parts(4, r, 2) for s in parts.shards[p]}
        for p in rank_parts(4, rank, 2):
            assert not set(parts.shards[p]) & others  # no shard is opened by two processes
            stream = PartStream(parts.train(p))
            epoch0 = []
            while stream.epoch == 0:
                epoch0.extend(r["cell_id"] for r in stream.take(1))
            last = epoch0.pop()  # the record that crossed into epoch 1
            assert stream.state() == {"epoch": 1, "consumed": 1} and last in epoch0
            assert len(epoch0) == len(set(epoch0))  # no cell twice within the part's epoch
            seen.update(epoch0)
            # epoch 1 is the same cells in another order
            epoch1 = [last] + [r["cell_id"] for r in stream.take(len(epoch0) - 1)]
            assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0
    assert sorted(seen) == train_ids and set(seen.values()) == {1}  # none skipped, none read twice


def step_cells(folder, world, steps, positions=None, start=0):
    """The cell ids of each step, over all ``world`` processes, and every part's position after the last step."""
    parts = parts_of(folder)
    per_part = cells_per_part(GLOBAL_BATCH, parts.num_parts)
    streams = [StepStream(parts, rank_parts(parts.num_parts, r, world), per_part, positions) for r in range(world)]
    steps_out = []
    for _ in range(start, steps):
        by_rank = [[rec["cell_id"] for rec in s.next_step()] for s in streams]
        assert len({len(ids) for ids in by_rank}) == 1  # every process gets GLOBAL_BATCH / world cells
        steps_out.append(sorted(i for ids in by_rank for i in ids))
    state = {int(p): where for s in streams for p, where in s.state().items()}
    return steps_out, state


def test_every_step_has_the_same_cells_for_1_2_and_4_processes_and_hands_over_positions(corpus):
    folder, train_ids = corpus
    steps = 13  # part 0 (22 cells) goes round once, the 16-cell parts more than once: epochs end mid-step
    one, _ = step_cells(folder, 1, steps)
    two, _ = step_cells(folder, 2, steps)
    four, _ = step_cells(folder, 4, steps)
    assert one == two == four
    assert all(len(cells) == GLOBAL_BATCH for cells in one)
    assert set().union(*map(set, one)) == set(train_ids)

    # 2 processes stop after 5 steps; 1 process continues from their positions with the uninterrupted cells
    _, handed = step_cells(folder, 2, 5)
    assert sorted(handed) == [0, 1, 2, 3] and handed[0] == {"epoch": 0, "consumed": 10}
    rest, _ = step_cells(folder, 1, steps, positions=handed, start=5)
    assert rest == one[5:]
