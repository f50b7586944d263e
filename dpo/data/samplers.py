"""Which rows each rank serves, in which order.

* :class:`GlobalBatchSampler`: training. One global order of the rows per epoch, cut into optimizer
  steps, each rank taking its micro-batches of each step, so any world size and accumulation train
  on the same rows per step; resumes mid-epoch exactly.
* :class:`ShardBatches`: evaluation and the reference pass. Contiguous shards, each row once, and
  the same number of batches on every rank (FSDP2 runs a collective in every forward).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from torch.utils.data import Sampler


def grouped_order(groups: list[int], rng: random.Random) -> list[int]:
    """A shuffle of prompt groups, each group's rows kept together (``group_by_prompt``)."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    blocks = list(members.values())
    rng.shuffle(blocks)
    return [i for block in blocks for i in block]


class GlobalBatchSampler(Sampler[int]):
    """This rank's share of one global order of training rows, cut into optimizer steps.

    Every epoch draws one order of all rows (seeded by ``seed`` and the epoch), the same on every
    rank. Optimizer step ``s`` uses rows ``order[s*G:(s+1)*G]`` with ``G = micro * world *
    accumulate``; micro-batch ``a`` of rank ``r`` within the step is the slice starting at
    ``s*G + (a*world + r)*micro``. So one process with micro-batch G, one with accumulation, and
    W DDP ranks all train on exactly the same rows per step, and their gradients agree; a last,
    incomplete global batch is dropped. Mid-epoch resume skips the micro-batches already trained
    on (``skip_batches``), so a resumed run sees the rows an uninterrupted run would.

    Lightning's own distributed sampler is turned off (``use_distributed_sampler: false``):
    it would reshuffle per rank and break this equivalence, and ``group_by_prompt``.
    """

    def __init__(
        self,
        groups: list[int],
        micro: int,
        world: int = 1,
        rank: int = 0,
        accumulate: int = 1,
        shuffle: bool = True,
        group_by_prompt: bool = False,
        seed: int = 0,
    ) -> None:
        self.groups = groups
        self.micro, self.world, self.rank, self.accumulate = micro, world, rank, accumulate
        self.shuffle, self.group_by_prompt, self.seed = shuffle, group_by_prompt, seed
        self.epoch = 0
        self.skip_batches = 0

    @property
    def global_batch(self) -> int:
        return self.micro * self.world * self.accumulate

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """The global order of rows for ``epoch`` (identical on every rank)."""
        n = len(self.groups)
        if not self.shuffle:
            return list(range(n))
        rng = random.Random(self.seed * 1_000_003 + epoch)
        if self.group_by_prompt:
            return grouped_order(self.groups, rng)
        order = list(range(n))
        rng.shuffle(order)
        return order

    def __iter__(self) -> Iterator[int]:
        order, g = self.order(self.epoch), self.global_batch
        skip, self.skip_batches = self.skip_batches, 0
        k = 0
        for step in range(len(order) // g):
            for a in range(self.accumulate):
                if k >= skip:
                    start = step * g + (a * self.world + self.rank) * self.micro
                    yield from order[start : start + self.micro]
                k += 1

    def __len__(self) -> int:
        return (len(self.groups) // self.global_batch) * self.accumulate * self.micro


class ShardBatches(Sampler[list[int]]):
    """Rank ``rank``'s contiguous share of ``n`` rows in batches of ``batch_size``.

    Shares differ by at most one row, so a rank may have one batch fewer than another; it then
    yields a stand-in batch (row ``-1 - i``: :class:`dpo.data.datamodule.TokenizedDataset` serves it
    with index -1, which counts for nothing), so every rank runs the same number of forwards.
    """

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0) -> None:
        self.bounds = [n * r // world for r in range(world + 1)]
        self.batch_size, self.rank = batch_size, rank
        self.active = True  # False: yield nothing (e.g. the reference pass found its cache)

    def _count(self, rank: int) -> int:
        return -(-(self.bounds[rank + 1] - self.bounds[rank]) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if not self.active:
            return
        start, end = self.bounds[self.rank], self.bounds[self.rank + 1]
        batches = [list(range(i, min(i + self.batch_size, end))) for i in range(start, end, self.batch_size)]
        stand_in = [-1 - (start if start < end else 0)]
        yield from batches + [stand_in] * (len(self) - len(batches))

    def __len__(self) -> int:
        return max(self._count(r) for r in range(len(self.bounds) - 1))
