"""The data side of pretraining: the corpus's tokenizer, this rank's train and held-out streams, and an endless,
resumable stream of micro-batches.

* **Eval split by cell id.** A cell is held out when a CRC32 of its ``cell_id`` falls below the eval fraction:
  stable across runs, ranks, shard layouts and streaming, with no index to store.
* **Each rank reads its own part** (:func:`hf_scfm.data.split_by_node`: its own shards when their number divides
  evenly), shuffled through a seeded buffer.
* **Exact resume.** :class:`BatchStream` records its position (epoch and batches consumed in it); re-created with
  that position it skips the consumed batches *before* collating them, so a skip costs reading only.
"""

from __future__ import annotations

import zlib
from pathlib import Path

__all__ = ["is_eval_cell", "corpus_tokenizer", "build_streams", "BatchStream", "record_batches"]


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


def build_streams(corpus: str, tokenizer, *, eval_fraction: float, seed: int, shuffle_buffer: int, rank: int,
                  world_size: int):
    """(train, eval or None) streaming datasets for this rank, rows ``{input_ids, values}``."""
    from ..data import load_corpus, split_by_node

    ds = load_corpus(corpus, streaming=True, tokenizer=tokenizer, columns=["input_ids", "values", "cell_id"])
    fraction = eval_fraction
    train = ds.filter(lambda cid: not is_eval_cell(cid, fraction), input_columns=["cell_id"])
    held = ds.filter(lambda cid: is_eval_cell(cid, fraction), input_columns=["cell_id"]) if fraction > 0 else None
    if world_size > 1:
        train = split_by_node(train, rank, world_size)
        held = split_by_node(held, rank, world_size) if held is not None else None
    train = train.shuffle(seed=seed, buffer_size=shuffle_buffer)
    train = train.remove_columns(["cell_id"])
    held = held.remove_columns(["cell_id"]) if held is not None else None
    return train, held


def record_batches(dataset, batch_size: int):
    """Uncollated batches (lists of records): collation happens only for batches actually used (see resume)."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, collate_fn=list, num_workers=0)


class BatchStream:
    """Endless micro-batches of this rank's training stream, epoch after epoch, with a resumable position.

    Each epoch also goes to the collator (``collator.set_epoch``), so a masking objective draws new masks every
    epoch (dynamic masking, as RoBERTa and scGPT do): with the same masks every epoch, a corpus of a few thousand
    cells is seen with one fixed set of targets, which a model can memorise within a few hundred steps. Masks
    still depend only on (seed, epoch, cell), so a resumed run sees the same batches.
    """

    def __init__(self, dataset, batch_size: int, collator, epoch: int = 0, consumed: int = 0):
        self.dataset, self.batch_size, self.collator = dataset, batch_size, collator
        self.epoch, self.consumed = epoch, consumed

    def __iter__(self):
        while True:
            self.dataset.set_epoch(self.epoch)
            if hasattr(self.collator, "set_epoch"):  # dynamic masking: fresh masks every epoch (RoBERTa's)
                self.collator.set_epoch(self.epoch)
            skip, produced = self.consumed, 0
            for index, records in enumerate(record_batches(self.dataset, self.batch_size)):
                produced += 1
                if index < skip:  # already consumed before the resume: skipped before collation
                    continue
                self.consumed = index + 1
                yield self.collator(records)
            if produced == 0:
                raise ValueError(
                    "The training stream of this process is empty: the corpus has too few cells for this many "
                    "processes and this --eval-fraction. Use a larger corpus or fewer processes."
                )
            self.epoch, self.consumed = self.epoch + 1, 0

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed_batches": self.consumed}
