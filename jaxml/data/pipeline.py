"""Grain input pipelines: the endless, checkpointable training stream and one-pass eval batches.

Both shard by striding: with P processes and a global batch of G, process p gets positions
b*G + p, b*G + p + P, ... of global batch b, so the processes' local batches b together are
exactly the global batch b of a one-process run with the same seed.
"""

from typing import Any, Iterator, Sequence

import grain
import numpy as np
from absl import flags

Batch = dict[str, np.ndarray]

# Each grain element is a whole batch, so grain's default buffer of 500 elements would
# hold 500 batches; a few keep the device fed.
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)


def train_dataset(source: Sequence[dict[str, Any]], *, global_batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  num_workers: int = 0) -> grain.IterDataset:
    """Endless shuffled local batches (leading dim global_batch_size // process_count); iterators checkpoint."""
    local = _local_batch_size(global_batch_size, process_index, process_count)
    if len(source) == 0:
        raise ValueError("train_dataset: the source is empty")
    if num_workers < 0:
        raise ValueError(f"train_dataset: num_workers must be >= 0, got {num_workers}")
    # repeat() reseeds the shuffle every epoch: a fresh permutation per epoch.
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    # Stride before batching (see the module docstring); both are index arithmetic on
    # the endless MapDataset, so nothing is materialised.
    ds = ds[process_index::process_count].batch(local, drop_remainder=True)
    ds = ds.to_iter_dataset(_READ_OPTIONS)
    if num_workers > 0:
        # Grain's worker start reads an absl flag. Entry points parse flags; notebooks and
        # tests do not, so accept the defaults there.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Workers split the batch stream round-robin, so batches come in the same order as
        # in-process; the iterator state is then per worker, valid for this num_workers.
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return ds


def eval_batches(source: Sequence[dict[str, Any]], *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
    """One in-order pass as local batches with a float32 `mask` (0 = zero padding); same count on every process."""
    local = _local_batch_size(global_batch_size, process_index, process_count)
    return _eval_pass(source, global_batch_size, local, process_index, process_count)


def _eval_pass(source, global_batch_size: int, local: int, process_index: int,
               process_count: int) -> Iterator[Batch]:
    n = len(source)
    # Every process runs ceil(n / G) steps, even one with no real example left: SPMD
    # programs hang when one process skips a collective.
    num_batches = -(-n // global_batch_size)
    padding = None
    for b in range(num_batches):
        positions = range(b * global_batch_size + process_index, (b + 1) * global_batch_size, process_count)
        examples = [source[i] for i in positions if i < n]
        real = len(examples)  # positions increase, so the real examples come first
        if real < local:
            if padding is None:
                padding = {k: np.zeros_like(v) for k, v in source[0].items()}
            examples += [padding] * (local - real)
        batch = {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}
        if "mask" in batch:
            raise ValueError(f"eval_batches: the examples already have a 'mask' feature; features: {sorted(batch)}")
        batch["mask"] = (np.arange(local) < real).astype(np.float32)
        yield batch


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    return global_batch_size // process_count
