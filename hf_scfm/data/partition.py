"""One data order for any number of processes: a streamed corpus read as ``P`` parts, interleaved step by step.

Data-parallel training must not change *which* cells a step trains on when the number of processes changes:
otherwise a run on 8 GPUs trains on other batches than the same run on 1, and a checkpoint written by 8
processes cannot be continued by 4. So the order is defined without the number of processes:

* the corpus's shards are split once into ``num_parts`` parts of nearly equal cell counts
  (:func:`partition_shards`: largest shard first onto the lightest part; the shard sizes come from the Parquet
  footers);
* every part is an endless, resumable stream of its own cells, reshuffled each epoch (:class:`PartStream`);
* optimizer step ``k`` trains on the next ``cells_per_part(G, P)[p]`` cells of every part ``p``, ``G`` cells in
  all (the global batch).

Process ``r`` of ``W`` reads only parts ``r, r + W, ...`` (:func:`rank_parts`): no shard is opened by two
processes, no cell is read twice or skipped within a part's epoch, and the union over the processes of the
cells of step ``k`` is the same set for every ``W`` that is at most ``P``. ``W`` dividing ``P`` gives every process
the same number of cells per step.

What the parts cost: a part that holds more cells than another takes longer to go round its epoch, so its cells
are drawn a little less often; :func:`partition_shards` keeps the parts within one shard of each other, so
the imbalance is at most one shard's worth per part (negligible when a part holds many shards; a warning
names it otherwise). Each part's epoch ends on its own: a step near an epoch boundary mixes two epochs of
different parts, as any endless stream does.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = [
    "MAX_DEFAULT_PARTS",
    "default_num_parts",
    "partition_shards",
    "cells_per_part",
    "rank_parts",
    "check_parts",
    "PartStream",
]

#: The default number of parts is at most this (each part is one open stream with its own shuffle buffer).
MAX_DEFAULT_PARTS = 8


def default_num_parts(global_batch: int, num_shards: int, max_parts: int = MAX_DEFAULT_PARTS) -> int:
    """The largest divisor of ``global_batch`` that is at most ``min(num_shards, max_parts)``: every part gives
    the same number of cells per step, and every part has at least one shard. Depends only on the global batch
    and the corpus, never on the number of processes."""
    if global_batch < 1 or num_shards < 1:
        raise ValueError(f"global_batch and num_shards must be >= 1 (got {global_batch}, {num_shards}).")
    cap = min(num_shards, max_parts, global_batch)
    return max(d for d in range(1, cap + 1) if global_batch % d == 0)


def partition_shards(shard_cells: Sequence[int], num_parts: int) -> list[list[int]]:
    """Shard indices of each of ``num_parts`` parts, of nearly equal cell counts: shards by decreasing size (ties
    by index) each onto the part with the fewest cells so far (ties: the lowest part). Deterministic; every part
    gets at least one shard; each part's shards are listed in index order."""
    if not 1 <= num_parts <= len(shard_cells):
        raise ValueError(
            f"Cannot split {len(shard_cells)} shard(s) into {num_parts} parts: each part reads whole shards. Use at "
            f"most {len(shard_cells)} parts, or build the corpus with a smaller shard_size."
        )
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    load = [0] * num_parts
    for shard in sorted(range(len(shard_cells)), key=lambda i: (-int(shard_cells[i]), i)):
        lightest = min(range(num_parts), key=lambda p: (load[p], len(parts[p]), p))
        parts[lightest].append(shard)
        load[lightest] += int(shard_cells[shard])
    return [sorted(p) for p in parts]


def cells_per_part(global_batch: int, num_parts: int) -> list[int]:
    """Cells each part gives to one step: ``global_batch // num_parts``, one more for the first
    ``global_batch % num_parts`` parts."""
    if num_parts < 1 or global_batch < num_parts:
        raise ValueError(f"The global batch ({global_batch} cells) must be at least the number of data parts "
                         f"({num_parts}): every part gives a step at least one cell.")
    base, extra = divmod(global_batch, num_parts)
    return [base + (p < extra) for p in range(num_parts)]


def rank_parts(num_parts: int, rank: int, world_size: int) -> list[int]:
    """The parts process ``rank`` of ``world_size`` reads: ``rank, rank + world_size, ...``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}.")
    return list(range(rank, num_parts, world_size))


def check_parts(num_parts: int, world_size: int, global_batch: int, micro_batches: int = 1,
                part_cells: Sequence[int] | None = None) -> None:
    """Refuse a layout in which some process would have no cells (or fewer than ``micro_batches``) per step,
    and warn when processes get unequal shares or parts unequal cell counts (see the module docstring)."""
    if num_parts < world_size:
        raise ValueError(
            f"The corpus is read as {num_parts} data part(s) but {world_size} processes run: each process reads whole "
            f"parts. Pass --data-parts N with N a multiple of {world_size} (at most the number of shards, at most the "
            "global batch), or build the corpus with more shards (a smaller shard_size)."
        )
    per_part = cells_per_part(global_batch, num_parts)
    shares = [sum(per_part[p] for p in rank_parts(num_parts, r, world_size)) for r in range(world_size)]
    if min(shares) < micro_batches:
        raise ValueError(
            f"With {num_parts} data parts and a global batch of {global_batch} cells, a process gets {min(shares)} "
            f"cell(s) per step, fewer than its {micro_batches} micro-batches. Use a larger batch or fewer "
            "--gradient-accumulation-steps."
        )
    if len(set(shares)) > 1:
        warnings.warn(
            f"{num_parts} data parts over {world_size} processes: the processes get {shares} cells per step. The "
            f"result is the same, but the busiest process sets the pace; use a number of parts that "
            f"{world_size} divides (--data-parts).",
            stacklevel=2,
        )
    if part_cells is not None and min(part_cells) > 0 and max(part_cells) > 1.25 * min(part_cells):
        warnings.warn(
            f"The {num_parts} data parts hold {list(part_cells)} cells: cells of the smaller parts are drawn up to "
            f"{max(part_cells) / min(part_cells):.2f}x as often. Build the corpus with more, smaller shards, or use "
            "fewer --data-parts.",
            stacklevel=2,
        )


class PartStream:
    """The endless stream of one part's records, epoch after epoch, with a resumable position.

    ``dataset`` is a ``datasets.IterableDataset`` of the part's cells (its shards, filtered and shuffled as the
    caller wants); ``dataset.set_epoch(epoch)`` is called at the start of each epoch, so a shuffled dataset
    gives a new order each epoch, the same for the same epoch. ``(epoch, consumed)`` is the position: a stream
    re-created with it reads (without handing out) the first ``consumed`` records of that epoch, then continues
    exactly where the first one was.
    """

    def __init__(self, dataset, *, epoch: int = 0, consumed: int = 0, name: str = "data part",
                 files: Sequence[str] | None = None):
        self.dataset, self.name, self.files = dataset, name, files  # files: the part's shards, to name a corrupt one
        self.epoch, self.consumed = int(epoch), int(consumed)
        self._records: Iterator[dict[str, Any]] | None = None

    def _epoch_records(self) -> Iterator[dict[str, Any]]:
        while True:
            self.dataset.set_epoch(self.epoch)
            produced = 0
            try:
                for index, record in enumerate(self.dataset):
                    produced += 1
                    if index < self.consumed:  # handed out before the resume
                        continue
                    self.consumed = index + 1
                    yield record
            except Exception:  # a shard whose data does not decode (footer intact): name it and the fix
                if self.files:
                    from .loading import check_shard_data

                    check_shard_data(self.files)
                raise
            if produced == 0:
                raise ValueError(
                    f"{self.name} has no cells to train on (after holding out the evaluation cells): the corpus is "
                    "too small for this many data parts. Use a larger corpus, fewer --data-parts or a smaller "
                    "--eval-fraction."
                )
            if produced < self.consumed:
                raise ValueError(
                    f"{self.name} holds {produced} cells in epoch {self.epoch}, but the resumed position says "
                    f"{self.consumed} were read: the corpus changed since the checkpoint was written."
                )
            self.epoch, self.consumed = self.epoch + 1, 0

    def take(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` records (crossing into the next epoch when this one ends)."""
        if self._records is None:
            self._records = self._epoch_records()
        return [next(self._records) for _ in range(n)]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}
