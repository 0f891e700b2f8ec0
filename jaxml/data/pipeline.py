"""Grain input pipelines: the endless, checkpointable training stream and one-pass eval batches.

Both shard by rows of the global batch: process p reads the rows of global batch b that its
devices hold (`rows`, from `jaxml.train.parallel.process_rows`; by default the contiguous
block [p*G/P, (p+1)*G/P) of a global batch of G), so the processes' local batches b placed
together are exactly, row for row, the global batch b of a one-process run with the same
seed. Per-example random numbers (dropout masks, crop offsets) are drawn by row of the
global batch, so they too are the same with 1 or N processes.
"""

import collections
import functools
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from absl import flags

from jaxml.data import sources

Batch = dict[str, np.ndarray]

# Each grain element is a whole batch, so grain's default buffer of 500 elements would
# hold 500 batches; a few keep the device fed.
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)
# A source held in memory is gathered by one numpy index: inline it takes 29 us a CNN batch,
# handed over from grain's prefetch threads 167 us (of an 11 ms step, on the step's cores).
_INLINE_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def train_dataset(source: Sequence[dict[str, Any]], *, global_batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  num_workers: int = 0, rows: Sequence[int] | None = None) -> grain.IterDataset:
    """Endless shuffled local batches (`rows` of each global batch; default: this process's block); checkpointable."""
    rows = _rows(global_batch_size, process_index, process_count, rows)
    if len(source) == 0:
        raise ValueError("train_dataset: the source is empty")
    if num_workers < 0:
        raise ValueError(f"train_dataset: num_workers must be >= 0, got {num_workers}")
    # Element b of the endless stream is this process's share of global batch b, computed
    # as index arithmetic (a fresh seeded permutation per epoch) and then gathered in one
    # go: far cheaper per batch than shuffling and batching records one at a time.
    indices = _BatchIndices(len(source), global_batch_size, seed, rows)
    ds = grain.MapDataset.range(_ENDLESS).map(indices).map(functools.partial(_take, source))
    ds = ds.to_iter_dataset(_INLINE_READ_OPTIONS if isinstance(source, sources.ArraySource) else _READ_OPTIONS)
    if num_workers > 0:
        # Grain's worker start reads an absl flag. Entry points parse flags; notebooks and
        # tests do not, so accept the defaults there.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Workers split the batch stream round-robin, so batches come in the same order as
        # in-process; the iterator state is then per worker, valid for this num_workers.
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return ds


_ENDLESS = 2**62  # batches in the "endless" stream: more than any run takes


class _BatchIndices:
    """Maps batch number b to the source positions of `rows` of global batch b."""

    def __init__(self, n: int, global_batch_size: int, seed: int, rows: np.ndarray):
        self.n, self.seed = n, seed
        self.global_batch_size = global_batch_size
        self.offsets = rows
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) > 4:  # a batch spans at most two epochs: keep a few
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._permutations[epoch]

    def __call__(self, b: int) -> np.ndarray:
        positions = b * self.global_batch_size + self.offsets
        epochs, within = np.divmod(positions, self.n)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            at = epochs == epoch
            out[at] = self._permutation(int(epoch))[within[at]]
        return out


class DeviceBatches:
    """Batches placed on the devices one step ahead: `place` (host -> device) of batch b + 1
    is issued before step b is handed out, so its transfer overlaps step b on accelerators.

    `get_state()` is the position after the last batch handed out, not after the ones placed
    ahead, so a checkpoint taken between steps resumes at the first batch no step has seen.
    """

    def __init__(self, iterator, place, ahead: int = 1):
        if ahead < 0:
            raise ValueError(f"DeviceBatches: ahead must be >= 0, got {ahead}")
        self._iterator, self._place, self._ahead = iterator, place, ahead
        self._queue: collections.deque = collections.deque()  # (iterator state before the batch, placed batch)

    def __iter__(self):
        return self

    def __next__(self):
        while len(self._queue) <= self._ahead:
            state = self._iterator.get_state()
            self._queue.append((state, self._place(next(self._iterator))))
        return self._queue.popleft()[1]

    def get_state(self):
        return self._queue[0][0] if self._queue else self._iterator.get_state()


def eval_batches(source: Sequence[dict[str, Any]], *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, rows: Sequence[int] | None = None) -> Iterator[Batch]:
    """One in-order pass as local batches with a float32 `mask` (0 = zero padding); same count on every process."""
    return _eval_pass(source, global_batch_size, _rows(global_batch_size, process_index, process_count, rows))


def _eval_pass(source, global_batch_size: int, rows: np.ndarray) -> Iterator[Batch]:
    n = len(source)
    # Every process runs ceil(n / G) steps, even one with no real example left: SPMD
    # programs hang when one process skips a collective.
    num_batches = -(-n // global_batch_size)
    padding = None
    local = len(rows)
    for b in range(num_batches):
        positions = b * global_batch_size + rows
        real_positions = positions[positions < n]
        real = len(real_positions)  # positions increase, so the real examples come first
        batch = _take(source, real_positions)
        if real < local:
            if padding is None:
                padding = {k: np.zeros_like(v[:1]) for k, v in _take(source, [0]).items()}
            batch = {k: np.concatenate([v[:real], np.repeat(padding[k], local - real, axis=0)])
                     for k, v in batch.items()}
        if "mask" in batch:
            raise ValueError(f"eval_batches: the examples already have a 'mask' feature; features: {sorted(batch)}")
        batch["mask"] = (np.arange(local) < real).astype(np.float32)
        yield batch


def _take(source, positions) -> Batch:
    """The examples at `positions` stacked per feature (one gather for in-memory sources)."""
    if isinstance(source, sources.ArraySource):
        return source.gather(np.asarray(positions, dtype=np.int64))
    examples = [source[int(i)] for i in positions] or [source[0]]  # source[0]: shapes of an empty batch
    batch = {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}
    return batch if len(positions) else {k: v[:0] for k, v in batch.items()}


def _rows(global_batch_size: int, process_index: int, process_count: int,
          rows: Sequence[int] | None) -> np.ndarray:
    """The rows of each global batch this process reads: `rows` checked, or its contiguous block."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    if rows is None:
        local = global_batch_size // process_count
        return np.arange(process_index * local, (process_index + 1) * local)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or len(rows) == 0 or np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= global_batch_size:
        raise ValueError(f"rows must be increasing positions in [0, {global_batch_size}) (the global batch), "
                         f"got {rows.tolist()[:16]}")
    return rows
