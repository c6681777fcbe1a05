"""Data sets and the index stream: everything a training run reads comes through here.

- ``load_dataset(name, path, split, image_size, channels)`` returns an :class:`ImageDataset`
  (whole set in memory as uint8 ``(N, C, H, W)`` plus int64 labels) or, for ``latents``, a
  :class:`LatentDataset`; ``get_batch(indices)`` gives float32 NCHW (pixels in [-1, 1]).
- :class:`IndexStream` decides which indices form each global batch, identically for any number
  of processes, and resumes exactly from a plain-int ``state_dict``.

One module per job:

=====================  =====================================================================
``images``             :class:`ImageDataset`; ``digits``, ``folder`` and ``npz`` loaders; resize
``idx``                IDX files: ``idx`` (any image/label pair), ``mnist``, ``fashion-mnist``
``fetch``              downloads of the named IDX sets with their hash checks
``stream``             :class:`IndexStream`
``latents``            :class:`LatentDataset`: encoded shard sets and ``.npy`` latent folders
``pairs``              :class:`PairDataset`: reflow pairs (``generate-set --kind pairs``), with their noise
=====================  =====================================================================
"""

from __future__ import annotations

import os

from selfflow.data.idx import IDX_FILES, MNIST_SHA256, NAMED_SETS, load_idx, load_mnist, read_idx
from selfflow.data.images import SPLITS, ImageDataset, check_split, load_digits, load_folder, load_npz
from selfflow.data.latents import LatentDataset, load_latents
from selfflow.data.loader import BatchLoader
from selfflow.data.source import STREAMED_SOURCES, StreamedImageSet, load_streamed
from selfflow.data.stream import IndexStream
from selfflow.errors import DataError
from selfflow.imageio import uint8_to_float

__all__ = [
    "DataError", "ImageDataset", "LatentDataset", "IndexStream", "BatchLoader", "StreamedImageSet", "DATASET_NAMES", "SPLITS", "IDX_FILES",
    "MNIST_SHA256", "NAMED_SETS", "load_dataset", "load_digits", "load_idx", "load_mnist", "load_folder",
    "load_npz", "load_latents", "read_idx", "uint8_to_float",
]

DATASET_NAMES = ("digits", "mnist", "fashion-mnist", "idx", "folder", "npz", "latents", "pairs", "synth", "webdataset", "hf")


def load_dataset(name: str, path: str | os.PathLike | None = None, split: str = "train",
                 image_size: int | None = None, channels: int | None = None, *, crop: str | None = None,
                 on_bad_image: str = "error", image_column: str | None = None, label_column: str | None = None):
    """Load a data set by name.

    Args:
        name: one of :data:`DATASET_NAMES`: ``digits`` (bundled), ``mnist`` / ``fashion-mnist``
            (their IDX files, hash-checked), ``idx`` (any IDX image/label pair), ``folder``
            (class sub-folders), ``npz`` (a file), ``latents`` (an encoded set or ``.npy`` files).
        path: folder or file; unused by ``digits``.
        split: ``"train"``, ``"test"`` or ``"all"``.
        image_size: make every image ``image_size × image_size`` (streamed sources: by ``crop``;
            the in-memory sets: bilinear, antialiased when shrinking). None keeps the stored size.
        channels: 1 or 3. Grey -> RGB repeats the channel; RGB -> grey uses the ITU-R 601
            luma weights. None keeps the source's own (``folder``: 1 if every image is grey,
            else 3).
        crop, on_bad_image, image_column, label_column: for the streamed sources ``folder``,
            ``webdataset`` and ``hf`` only (:mod:`selfflow.data.source`): ``center`` (default),
            ``random`` or ``resize``; ``error`` or ``skip``; the columns (or tar extensions) read.

    Returns:
        :class:`ImageDataset` with uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)``, or a
        :class:`LatentDataset` for ``latents``, or a :class:`StreamedImageSet` for ``folder``,
        ``webdataset`` and ``hf``.
    """
    if name not in DATASET_NAMES:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(DATASET_NAMES)}")
    check_split(split)
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image_size must be a positive int or None, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1, 3 or None, got {channels!r}")
    if name == "digits":
        if path is not None:
            raise DataError(f"digits is embedded in scikit-learn and takes no path; got path={str(path)!r}")
        return load_digits(split, image_size, channels)
    if path is None:
        hint = f" (download it with: selfflow data fetch {name} --to DIR)" if name in NAMED_SETS else ""
        raise DataError(f"data set {name!r} needs a path{hint}")
    streamed_only = {"crop": crop, "image_column": image_column, "label_column": label_column,
                     "on_bad_image": None if on_bad_image == "error" else on_bad_image}
    given = [key for key, value in streamed_only.items() if value is not None]
    if name in STREAMED_SOURCES:
        return load_streamed(name, path, split, image_size, channels, crop, on_bad_image, image_column, label_column)
    if given:
        raise DataError(f"{', '.join(given)}: for the streamed sources ({', '.join(STREAMED_SOURCES)}) only, not {name!r}")
    if name == "pairs":  # reflow pairs (selfflow.data.pairs)
        if image_size is not None or channels is not None:
            raise DataError("pairs are used as stored: leave data.image_size and data.channels unset")
        from selfflow.data.pairs import load_pairs

        return load_pairs(path, split)
    if name == "synth":  # captioned synthetic images (selfflow.data.synth)
        if image_size is not None or channels is not None:
            raise DataError("synthetic sets are used as stored: leave data.image_size and data.channels unset")
        from selfflow.data.synth import load_synth

        return load_synth(path, split)
    if name == "latents":
        if image_size is not None or channels is not None:
            raise DataError("latents are used as stored: leave data.image_size and data.channels unset")
        return load_latents(path, split)
    if name in NAMED_SETS or name == "idx":
        return load_idx(path, split, image_size, channels, name=name)
    return load_npz(path, split, image_size, channels)
