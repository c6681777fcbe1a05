"""Decode the stream's next batches ahead of the trainer, in ``torch.utils.data`` workers.

:class:`BatchLoader` wraps an :class:`~selfflow.data.IndexStream` and a data set that decodes
per batch (:class:`selfflow.data.source.StreamedImageSet`). The stream stays the one authority on
position: the workers read from a copy of it that runs ahead, and each batch handed to the trainer
is checked against the real stream's next batch. When the two disagree (the trainer loaded a
checkpoint, so the stream jumped) the workers are restarted from the stream's new state, so a
resumed run reads exactly the batches an uninterrupted one would have.

Each image's random crop is drawn from a seed made of the stream's seed, the global batch's
(epoch, position) and the image's row in the global batch: the same pixels whatever the number of
workers or processes.
"""
from __future__ import annotations

import hashlib
from typing import Iterator, Optional, Sequence

import torch

from selfflow.data.stream import IndexStream
from selfflow.errors import DataError


def batch_seed(seed: int, epoch: int, position: int) -> int:
    digest = hashlib.sha256(f"selfflow-crop:{seed}:{epoch}:{position}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def _keys(stream: IndexStream) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(this rank's indices, their crop seeds) for every batch the stream will produce."""
    share = stream.local_batch_size
    while True:
        indices = stream.next_batch()
        base = batch_seed(stream.seed, stream.epoch, stream.position)
        first = stream.rank * share
        yield tuple(indices.tolist()), tuple(base + first + row for row in range(share))


class _Decoder(torch.utils.data.Dataset):
    """Key → decoded batch; an unreadable image comes back as its message (raised by the trainer's process)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key):
        indices, draws = key
        try:
            images, labels = self.dataset.decode(indices, draws)
        except DataError as exc:
            return str(exc)
        return torch.tensor(indices, dtype=torch.int64), images, labels

    def __len__(self) -> int:  # the keys come from an endless stream; DataLoader never asks
        raise TypeError("an endless stream of batches has no length")


class _KeySampler(torch.utils.data.Sampler):
    def __init__(self, stream: IndexStream):
        self.stream = stream

    def __iter__(self):
        return _keys(self.stream)


def decoded_batches(dataset, batches: Sequence[Sequence[int]], num_workers: int = 0, prefetch: int = 2
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 images and labels of each index list in ``batches``, in order, decoded in ``num_workers`` workers
    (for one pass over a set: ``encode-latents``); centre or resize crops (no draws)."""
    keys = [(tuple(int(i) for i in batch), None) for batch in batches]
    decoder = _Decoder(dataset)
    items = (decoder[key] for key in keys) if num_workers == 0 else iter(torch.utils.data.DataLoader(
        decoder, batch_size=None, sampler=keys, num_workers=num_workers, prefetch_factor=prefetch))
    for item in items:
        if isinstance(item, str):
            raise DataError(item)
        yield item[1], item[2]


class BatchLoader:
    """``next_batch()`` → (indices ``(b,)``, uint8 images ``(b, C, H, W)``, labels ``(b,)``), this rank's share."""

    def __init__(self, dataset, stream: IndexStream, num_workers: int = 0, prefetch: int = 2):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset, self.stream, self.num_workers, self.prefetch = dataset, stream, num_workers, prefetch
        self._batches: Optional[Iterator] = None
        self._expected: Optional[dict] = None  # the stream state the next prefetched batch starts from

    def _start(self, state: dict) -> None:
        self.close()
        ahead = IndexStream(self.stream.num_items, self.stream.batch_size, seed=self.stream.seed, rank=self.stream.rank,
                            world_size=self.stream.world_size, drop_last=self.stream.drop_last)
        ahead.load_state_dict(state)
        if self.num_workers == 0:
            decoder = _Decoder(self.dataset)
            self._batches = (decoder[key] for key in _keys(ahead))
        else:
            loader = torch.utils.data.DataLoader(_Decoder(self.dataset), batch_size=None, sampler=_KeySampler(ahead),
                                                 num_workers=self.num_workers, prefetch_factor=self.prefetch)
            self._batches = iter(loader)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        state = self.stream.state_dict()
        if self._batches is None or state != self._expected:
            self._start(state)
        indices = self.stream.next_batch()
        item = next(self._batches)
        self._expected = self.stream.state_dict()
        if isinstance(item, str):
            self.close()
            raise DataError(item)
        got, images, labels = item
        if not torch.equal(got, indices):  # cannot happen unless the stream was changed behind our back
            raise RuntimeError("BatchLoader: the prefetched batch does not match the stream's")
        return indices, images, labels

    def close(self) -> None:
        """Stop the workers (a later ``next_batch`` starts them again)."""
        batches, self._batches, self._expected = self._batches, None, None
        if batches is not None and hasattr(batches, "_shutdown_workers"):
            batches._shutdown_workers()
