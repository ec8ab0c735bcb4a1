"""Decode the batches of a :class:`~noise_rater.data.ResumableBatches` stream in DataLoader worker processes.

:class:`ResumableBatches` loads in the training process and draws random flips from the global torch RNG.
:class:`WorkerBatches` yields the same batches (same items, same order, same epochs and shards) but builds
each one in a worker process of a ``torch.utils.data.DataLoader``, with the global torch RNG of that worker
seeded from ``(seed, shard, epoch, sample position)`` just for that batch. So random flips

* do not depend on the number of workers nor on which worker builds a batch,
* do not depend on where a run was resumed (the stream stays exactly resumable), and
* never touch the training process's global RNG,

but they differ from the in-process stream's flips (a different, equally valid, random draw). Without
random flips the two streams are identical.
"""

import copy
import math
from typing import Dict, Iterator, Tuple

import numpy as np
import torch

from .data import ResumableBatches


def batch_seed(seed: int, shard: int, epoch: int, position: int) -> int:
    """The 63-bit seed of the batch that starts at sample ``position`` of ``epoch`` on ``shard`` (numpy
    ``SeedSequence`` mixing)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(shard), int(epoch), int(position)])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _at(batches: ResumableBatches, epoch: int, position: int) -> ResumableBatches:
    """A copy of the stream placed at ``(epoch, position)`` (same layout, so no elastic-resume warning)."""
    stream = copy.copy(batches)
    stream.epoch, stream.position, stream._order = int(epoch), int(position), None
    return stream


class _BatchByKey(torch.utils.data.Dataset):
    """``(epoch, position)`` -> the batch of the stream that starts there, built under a per-batch RNG seed."""

    def __init__(self, batches: ResumableBatches):
        self.batches = batches

    def __getitem__(self, key: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        epoch, position = key
        stream = _at(self.batches, epoch, position)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed(stream.seed, stream.shard, epoch, position))
            return next(stream)

    def __len__(self) -> int:  # the stream is endless; DataLoader only needs the keys from the sampler
        return math.ceil(self.batches.batches_per_epoch)


class _Keys(torch.utils.data.Sampler):
    """Endless ``(epoch, position)`` keys of consecutive batches from a start position."""

    def __init__(self, batches: ResumableBatches):
        self.start = (batches.epoch, batches.position)
        self.n, self.step = len(batches.dataset), batches.samples_per_step

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch, position = self.start
        while True:
            yield epoch, position
            position += self.step  # a batch that straddles the end of an epoch continues into the next one
            while position >= self.n:
                epoch, position = epoch + 1, position - self.n


class WorkerBatches:
    """:class:`ResumableBatches` built by ``num_workers`` DataLoader worker processes (see the module doc).

    Args:
        batches (:class:`ResumableBatches`): the stream; it holds the position (what has been *consumed*,
            not what the workers have prefetched) and is advanced as batches are taken.
        num_workers (`int`): worker processes, >= 1.
        prefetch_factor (`int`): batches loaded in advance per worker.

    ``state_dict`` / ``load_state_dict`` / ``epoch`` / ``batches_per_epoch`` / ``steps_for_epochs`` behave as
    for the wrapped stream.

    Raises:
        ValueError: ``num_workers`` < 1.
    """

    def __init__(self, batches: ResumableBatches, num_workers: int, prefetch_factor: int = 2):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 (use ResumableBatches itself for 0), got {num_workers}")
        self.batches, self.num_workers, self.prefetch_factor = batches, int(num_workers), int(prefetch_factor)
        self._iterator = None

    @property
    def epoch(self) -> int:
        return self.batches.epoch

    @property
    def batches_per_epoch(self) -> float:
        return self.batches.batches_per_epoch

    def steps_for_epochs(self, num_epochs: int) -> int:
        return self.batches.steps_for_epochs(num_epochs)

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self._iterator is None:
            loader = torch.utils.data.DataLoader(_BatchByKey(copy.copy(self.batches)), sampler=_Keys(self.batches),
                                                 batch_size=None, num_workers=self.num_workers,
                                                 prefetch_factor=self.prefetch_factor,
                                                 generator=torch.Generator().manual_seed(0))  # not the global RNG
            self._iterator = iter(loader)
        batch = next(self._iterator)
        self.batches.next_indices()  # advance the consumed position by one step, exactly as the workers did
        return batch

    def state_dict(self) -> Dict[str, int]:
        return self.batches.state_dict()

    def load_state_dict(self, state: Dict[str, int]) -> bool:
        changed = self.batches.load_state_dict(state)
        self._iterator = None  # the next batch restarts the workers at the loaded position
        return changed
