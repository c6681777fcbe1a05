"""A deterministic, resumable, rank-aware stream of batch indices.

:class:`IndexStream` decides which indices form each global batch, identically for any number of
processes, and resumes exactly from a plain-int ``state_dict``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch


def _epoch_seed(seed: int, epoch: int) -> int:
    # A hash, not seed + epoch, so that (seed 0, epoch 1) and (seed 1, epoch 0) differ.
    digest = hashlib.sha256(f"selfflow-index-stream:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(eq=False)
class IndexStream:
    """An endless stream of batches of indices into a data set of ``num_items`` items.

    Epoch ``e`` visits the items in the order of ``torch.randperm`` drawn from a generator
    seeded with a hash of ``(seed, e)``; consecutive slices of that order are the GLOBAL
    batches of ``batch_size``. Each process takes its contiguous share
    ``global[rank * b : (rank + 1) * b]`` with ``b = batch_size // world_size``, so the union
    over ranks equals the single-process batch, in the same order.

    ``drop_last=True`` drops the ``num_items % batch_size`` items left at the end of an epoch;
    ``drop_last=False`` fills the last batch up from the start of the same epoch's order so that
    every batch is full (a few items then appear twice in that epoch).

    ``state_dict()`` holds plain ints; after ``load_state_dict`` the next batch is the one an
    uninterrupted stream would have produced. The state is independent of rank and world
    size, so a run may resume on a different number of processes.
    """

    num_items: int
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    drop_last: bool = True
    epoch: int = field(default=0, init=False)
    position: int = field(default=0, init=False)  # batches already produced in this epoch
    _order: torch.Tensor | None = field(default=None, init=False, repr=False)
    _order_epoch: int = field(default=-1, init=False, repr=False)

    def __post_init__(self) -> None:
        for key in ("num_items", "batch_size", "seed", "rank", "world_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"IndexStream: {key} must be an int, got {value!r}")
        if self.num_items < 1:
            raise ValueError(f"IndexStream: num_items must be >= 1, got {self.num_items}")
        if self.batch_size < 1:
            raise ValueError(f"IndexStream: batch_size must be >= 1, got {self.batch_size}")
        if self.batch_size > self.num_items:
            raise ValueError(f"IndexStream: batch_size {self.batch_size} is larger than the "
                             f"data set ({self.num_items} items)")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"IndexStream: need 0 <= rank < world_size, got rank={self.rank}, "
                             f"world_size={self.world_size}")
        if self.batch_size % self.world_size:
            raise ValueError(f"IndexStream: batch_size {self.batch_size} is not divisible by "
                             f"world_size {self.world_size}")

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_items, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._order = torch.randperm(self.num_items, generator=generator)
            self._order_epoch = epoch
        return self._order

    def next_global_batch(self) -> torch.Tensor:
        """The next full batch of all ranks: int64 ``(batch_size,)``. Advances the stream."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        order = self._epoch_order(self.epoch)
        start = self.position * self.batch_size
        batch = order[start:start + self.batch_size]
        if len(batch) < self.batch_size:  # only when drop_last is False
            batch = torch.cat([batch, order[:self.batch_size - len(batch)]])
        self.position += 1
        return batch.clone()

    def next_batch(self) -> torch.Tensor:
        """This rank's share of the next global batch: int64 ``(batch_size // world_size,)``."""
        batch = self.next_global_batch()
        share = self.local_batch_size
        return batch[self.rank * share:(self.rank + 1) * share]

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int | bool]:
        """Plain, JSON-serialisable position of the stream (no rank or world size)."""
        return {"epoch": int(self.epoch), "position": int(self.position), "seed": int(self.seed),
                "num_items": int(self.num_items), "batch_size": int(self.batch_size),
                "drop_last": bool(self.drop_last)}

    def load_state_dict(self, state: Mapping[str, int | bool]) -> None:
        """Resume from :meth:`state_dict`; refuses a state made for different data or batches."""
        expected = {"epoch", "position", "seed", "num_items", "batch_size", "drop_last"}
        missing, unknown = expected - set(state), set(state) - expected
        if missing or unknown:
            raise ValueError(f"IndexStream state: missing keys {sorted(missing)}, unknown keys "
                             f"{sorted(unknown)}")
        for key in ("seed", "num_items", "batch_size", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(f"IndexStream state: {key}={state[key]!r} but this stream has "
                                 f"{key}={getattr(self, key)!r}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(f"IndexStream state: epoch={epoch}, position={position} out of "
                             f"range (batches per epoch: {self.batches_per_epoch})")
        self.epoch, self.position = epoch, position
