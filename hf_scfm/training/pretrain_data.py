"""The data side of pretraining: the corpus's tokenizer, this process's part of every step, held-out cells.

* **Eval split by cell id.** A cell is held out when a CRC32 of its ``cell_id`` falls below the eval fraction:
  stable across runs, ranks, shard layouts and streaming, with no index to store.
* **The same steps for any number of processes** (:mod:`hf_scfm.data.partition`). The corpus is read as
  ``num_parts`` parts (whole shards each, nearly equal cell counts); step ``k`` trains on the next cells of
  every part, ``global_batch`` cells in all; process ``r`` of ``W`` reads only parts ``r, r + W, ...``. So 1, 2
  or 8 processes train on the same cells at every step, and a checkpoint of one world size resumes in another.
  Each part is shuffled through its own seeded buffer (``shuffle_buffer / num_parts`` cells: the same memory as
  one buffer), its shards in a new seeded order every epoch.
* **Exact resume.** :meth:`StepStream.state` is every part's position (epoch, cells read in it); a stream
  restored with the positions of all parts (from the files of every process of the run that saved them)
  re-reads the consumed cells of each part's current epoch without collating them, then continues.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

__all__ = ["is_eval_cell", "corpus_tokenizer", "CorpusParts", "StepStream", "split_micro_batches", "collate_step", "EVAL_MASK_EPOCH",
           "held_out_batches"]


def is_eval_cell(cell_id: str, fraction: float) -> bool:
    """Deterministic held-out membership of a cell: CRC32 of its id, compared with ``fraction``."""
    return (zlib.crc32(str(cell_id).encode("utf-8")) & 0xFFFFFFFF) < fraction * 2**32


def corpus_tokenizer(corpus: str, cache_dir: str | None = None):
    """The tokenizer a corpus (folder or Hub dataset repo) was built with, from its ``tokenizer/`` folder."""
    from ..tokenization import GeneTokenizer

    local = Path(corpus) / "tokenizer"
    if local.is_dir():
        return GeneTokenizer.from_pretrained(str(local))
    if Path(corpus).exists():
        raise FileNotFoundError(
            f"{corpus} has no tokenizer/ folder: it is not a corpus written by hf_scfm.data.build_corpus. "
            "Build one with build_corpus(inputs, tokenizer, out_dir)."
        )
    from huggingface_hub import snapshot_download

    folder = snapshot_download(corpus, repo_type="dataset", allow_patterns=["tokenizer/*"], cache_dir=cache_dir)
    return GeneTokenizer.from_pretrained(str(Path(folder) / "tokenizer"))


class CorpusParts:
    """A corpus as ``num_parts`` parts (``None``: :func:`~hf_scfm.data.partition.default_num_parts` of the global
    batch), checked against the corpus and the tokenizer once; :meth:`train` and :meth:`held_out` stream one
    part's training or held-out cells (rows ``{input_ids, values}``, and ``cell_id`` with ``with_cell_id``)."""

    def __init__(self, corpus: str, tokenizer, *, global_batch: int, num_parts: int | None, eval_fraction: float,
                 seed: int, shuffle_buffer: int, with_cell_id: bool = False):
        from ..data.loading import corpus_files, shard_cells, validate_corpus
        from ..data.partition import default_num_parts, partition_shards

        files = corpus_files(corpus)
        validate_corpus(files, tokenizer=tokenizer)
        self.files = files
        self.corpus, self.eval_fraction, self.seed, self.with_cell_id = corpus, eval_fraction, seed, with_cell_id
        sizes = shard_cells(files)
        self.num_parts = num_parts or default_num_parts(global_batch, len(files))
        self.shards = partition_shards(sizes, self.num_parts)
        self.part_cells = [sum(sizes[i] for i in part) for part in self.shards]
        self.buffer = max(1, math.ceil(shuffle_buffer / self.num_parts))

    def _load(self, part: int, held_out: bool):
        from ..data import load_corpus

        ds = load_corpus(self.corpus, streaming=True, columns=["input_ids", "values", "cell_id"], validate=False,
                         shards=self.shards[part])
        fraction = self.eval_fraction
        keep = (lambda cid: is_eval_cell(cid, fraction)) if held_out else (lambda cid: not is_eval_cell(cid, fraction))
        return ds.filter(keep, input_columns=["cell_id"])

    def train(self, part: int):
        ds = self._load(part, held_out=False).shuffle(seed=self.seed, buffer_size=self.buffer)
        return ds if self.with_cell_id else ds.remove_columns(["cell_id"])

    def held_out(self, part: int):
        """Held-out cells of ``part`` in file order, or None without an eval fraction."""
        if self.eval_fraction <= 0:
            return None
        ds = self._load(part, held_out=True)
        return ds if self.with_cell_id else ds.remove_columns(["cell_id"])


class StepStream:
    """This process's records of every optimizer step: the next ``per_part[p]`` records of each of its parts
    ``p`` (in part order), from endless :class:`~hf_scfm.data.partition.PartStream` s."""

    def __init__(self, parts: CorpusParts, part_ids: list[int], per_part: list[int],
                 positions: dict[int, dict] | None = None):
        from ..data.partition import PartStream

        self.per_part = per_part
        self.streams = {}
        for p in part_ids:
            where = (positions or {}).get(p, {"epoch": 0, "consumed": 0})
            self.streams[p] = PartStream(parts.train(p), epoch=where["epoch"], consumed=where["consumed"],
                                         name=f"Data part {p} of {parts.num_parts} ({len(parts.shards[p])} shard(s))",
                                         files=[parts.files[i] for i in parts.shards[p]])

    def next_step(self) -> list[dict]:
        return [record for p, stream in self.streams.items() for record in stream.take(self.per_part[p])]

    @property
    def epoch(self) -> int:
        """The lowest epoch among this process's parts."""
        return min(s.epoch for s in self.streams.values())

    def state(self) -> dict[str, dict[str, int]]:
        """``{"<part>": {"epoch", "consumed"}}`` of this process's parts (JSON keys are strings)."""
        return {str(p): s.state() for p, s in self.streams.items()}


def split_micro_batches(records: list, n: int) -> list[list]:
    """``records`` cut into ``n`` consecutive micro-batches whose sizes differ by at most one (larger first)."""
    base, extra = divmod(len(records), n)
    out, start = [], 0
    for i in range(n):
        stop = start + base + (i < extra)
        out.append(records[start:stop])
        start = stop
    return out


#: The mask epoch of held-out evaluation: the same masked positions at every evaluation, so the curve compares.
EVAL_MASK_EPOCH = 0


def collate_step(collator, records: list, step: int, accumulation: int) -> list[dict]:
    """The micro-batches of optimizer step ``step`` (0-based), collated with that step's masks.

    Dynamic masking (RoBERTa's, scGPT's): masks depend on (seed, epoch, cell) and the collator's epoch here is
    the step number plus one, so a cell gets new masked positions every time it is read, while a corpus of a few
    thousand cells read with one fixed set of masks would be memorised within a few hundred steps. The step is the
    same for every process and after a resume, so any number of processes and a resumed run see the same masks;
    held-out evaluation uses :data:`EVAL_MASK_EPOCH` (never a training step's)."""
    if hasattr(collator, "set_epoch"):  # the next-gene objective has no masks
        collator.set_epoch(step + 1)
    return [collator(part) for part in split_micro_batches(records, accumulation)]


def held_out_batches(parts: CorpusParts, part_ids: list[int], batch_size: int, max_cells_per_part: int):
    """Uncollated batches (lists of records) of the first ``max_cells_per_part`` held-out cells of each of
    ``part_ids``: collation happens only for batches actually used."""
    for p in part_ids:
        held = parts.held_out(p)
        if held is None:
            return
        batch = []
        for index, record in enumerate(held):
            if index >= max_cells_per_part:
                break
            batch.append(record)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
