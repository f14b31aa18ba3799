"""Collated batches straight from a corpus's Arrow data: the fast way to feed a model.

:func:`iter_batches` hands ``dataset.with_format("arrow").iter(batch_size)`` tables to a collator (serially, with a
read-ahead thread, or with worker threads or processes, each reading its own part: :class:`CollatedBatches`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset as _TorchIterableDataset  # torch: already loaded by the collators

__all__ = ["iter_batches", "CollatedBatches"]


def iter_batches(dataset, batch_size: int, collator, *, drop_last: bool = False, prefetch: int = 0,
                 num_workers: int = 0, processes: bool = False,
                 multiprocessing_context=None) -> Iterator[dict[str, Any]]:
    """Collated batches straight from a corpus's Arrow record batches: the fast way to feed a model.

    ``for batch in iter_batches(load_corpus(path, streaming=True), 64, collator): model(**batch)``

    Reads ``dataset.with_format("arrow").iter(batch_size)`` (a streaming ``IterableDataset`` or a
    map-style ``Dataset``, shuffled, split by node, or not) and hands each ``pyarrow.Table`` of
    ``batch_size`` cells to ``collator``. The hf-scfm collators read an Arrow table as flat, zero-copy
    NumPy arrays, so no Python object is ever made per cell; a ``torch`` ``DataLoader`` over the same
    dataset builds a Python list per cell and column first, which costs several times the collating.
    The batches are the same as collating the same cells as records (same cells, order and masks).

    **Parallel** (``num_workers > 0``): ``num_workers`` workers each read a disjoint part of the data (see
    :class:`CollatedBatches`: their own shards of a streaming corpus) and collate it. Threads by default:
    Parquet decoding and the collators' compiled kernels release the GIL, and a batch never has to be
    copied between processes. ``processes=True`` runs them as ``torch.utils.data.DataLoader`` worker
    processes instead (no GIL at all, but every padded batch is copied into shared memory: measured at
    about twice the CPU time per cell here, so only worth it with cores to spare). Either way every cell
    is read and collated exactly once per pass, with the same values and the same mask as in the serial
    path (the hf-scfm collators draw masks from the seed, the epoch and the cell's content, never from
    its batch). The order differs from the serial one, and is the same for threads and processes:
    batches come from the workers in turn (worker 0's first batch, worker 1's first, ...; a worker that
    is done drops out), each worker's batches in its own order, so it is deterministic for a given
    ``num_workers``. Batches are cut within each worker's part, so when shards hold a multiple of
    ``batch_size`` cells the batches are exactly the serial path's batches, reordered; otherwise only
    the last batch of each part is smaller. Call ``collator.set_epoch(epoch)`` before iterating.

    With ``prefetch > 0`` (and no workers) a background thread reads the next ``prefetch`` Arrow tables
    while the caller collates (Parquet decoding releases the GIL, and so does the collators' compiled
    kernel), so reading and collating can overlap; the batches and their order are unchanged. Off by
    default: on a busy 2-core machine it measured no gain (``datasets``' streaming reader holds the GIL
    for much of its work); ``num_workers`` is the way to use several cores.

    Args:
        dataset: a ``datasets.Dataset`` or ``datasets.IterableDataset`` (e.g. from :func:`load_corpus`).
        batch_size: cells per batch.
        collator: any callable taking a ``pyarrow.Table`` (every hf-scfm collator does).
        drop_last: drop the last, smaller batch (of each worker's part, with workers).
        prefetch: Arrow tables read ahead in a background thread (0, the default: read in the calling thread).
        num_workers: workers reading and collating in parallel (0: all in the calling thread).
        processes: workers are ``DataLoader`` worker processes rather than threads.
        multiprocessing_context: how worker processes start (``DataLoader``'s argument; default: the
            platform's, ``fork`` on Linux, which starts at once).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    if prefetch < 0:
        raise ValueError(f"prefetch must be 0 or a positive number of batches, got {prefetch}.")
    if num_workers < 0:
        raise ValueError(f"num_workers must be 0 or a positive number of workers, got {num_workers}.")
    if not hasattr(dataset, "with_format"):
        raise ValueError(f"iter_batches takes a datasets Dataset or IterableDataset, got {type(dataset).__name__}.")
    if num_workers:
        batches = CollatedBatches(dataset, batch_size, collator, drop_last=drop_last, num_parts=num_workers)
        if processes:
            from torch.utils.data import DataLoader

            yield from DataLoader(batches, batch_size=None, num_workers=num_workers,
                                  multiprocessing_context=multiprocessing_context)
        else:
            from . import masking

            masking.compiled_kernels()  # load the optional compiled kernels here, not racing in the threads
            yield from _in_turn([_read_ahead(batches.iter_part(i, num_workers), max(prefetch, 2))
                                 for i in range(num_workers)])
        return
    tables = dataset.with_format("arrow").iter(batch_size=batch_size, drop_last_batch=drop_last)
    if prefetch:
        tables = _read_ahead(tables, prefetch)
    for table in tables:
        yield collator(table)


class CollatedBatches(_TorchIterableDataset):
    """Collated batches of a corpus as a ``torch.utils.data.IterableDataset`` for a ``DataLoader`` with
    workers: ``DataLoader(CollatedBatches(ds, 64, collator), batch_size=None, num_workers=2)``
    (what :func:`iter_batches` with ``num_workers`` does).

    Each worker reads its own part of ``dataset`` and collates it (Arrow tables straight into
    ``collator``), so reading and collating use as many cores as workers and only finished tensors
    cross process boundaries. The parts, for ``n`` workers:

    * streaming ``IterableDataset``: ``dataset.shard(n, worker, contiguous=False)``, i.e. worker ``i``
      reads shards ``i, i + n, ...`` (the efficient case: no cell is read twice). It needs at least
      ``n`` shards; build the corpus with a smaller ``shard_size`` otherwise. A shuffled dataset
      shuffles within each worker (its shards, then its cells through its own buffer).
    * map-style ``Dataset``: ``dataset.shard(n, worker, contiguous=True)``, contiguous blocks of rows.

    Outside a worker (or with one) the whole dataset is read, as :func:`iter_batches` does serially.
    ``num_parts`` checks the shard count up front (pass the ``DataLoader``'s ``num_workers``).
    """

    def __init__(self, dataset, batch_size: int, collator, *, drop_last: bool = False, num_parts: int | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
        import datasets

        n_shards = getattr(dataset, "num_shards", None)
        if num_parts and isinstance(dataset, datasets.IterableDataset) and n_shards is not None and n_shards < num_parts:
            raise ValueError(
                f"The streaming corpus has {n_shards} shard(s) for {num_parts} workers: each worker reads whole shards. "
                f"Use at most {n_shards} workers, or build the corpus with a smaller shard_size."
            )
        self.dataset, self.batch_size, self.collator, self.drop_last = dataset, batch_size, collator, drop_last

    def part(self, index: int, num_parts: int):
        """The part of the dataset worker ``index`` of ``num_parts`` reads."""
        import datasets

        if num_parts <= 1:
            return self.dataset
        if isinstance(self.dataset, datasets.IterableDataset):
            return self.dataset.shard(num_shards=num_parts, index=index, contiguous=False)
        return self.dataset.shard(num_shards=num_parts, index=index, contiguous=True)

    def iter_part(self, index: int, num_parts: int) -> Iterator[Any]:
        """The collated batches of part ``index`` of ``num_parts``."""
        part = self.part(index, num_parts)
        for table in part.with_format("arrow").iter(batch_size=self.batch_size, drop_last_batch=self.drop_last):
            yield self.collator(table)

    def __iter__(self):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        return self.iter_part(0, 1) if info is None else self.iter_part(info.id, info.num_workers)


def _in_turn(iterators: list[Iterator[Any]]) -> Iterator[Any]:
    """One item from each iterator in turn, dropping those that are done (a ``DataLoader``'s worker order).
    Closing this generator closes them all (stopping their read-ahead threads)."""
    live = list(iterators)
    try:
        while live:
            for it in list(live):
                try:
                    yield next(it)
                except StopIteration:
                    live.remove(it)
    finally:
        for it in iterators:
            close = getattr(it, "close", None)
            if close is not None:
                close()


def _read_ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Yield ``items`` while a daemon thread produces up to ``depth`` of them ahead. An exception in
    the producer is re-raised here; closing this generator early stops the producer."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("done", done))
        except BaseException as err:  # handed to the consumer, which re-raises it
            q.put(("error", err))

    thread = threading.Thread(target=produce, name="hf_scfm-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join()  # at most the item being produced: the producer then sees ``stop``
