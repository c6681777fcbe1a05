"""Image data sets held in memory, and the loaders that are not IDX: digits, a folder of images, .npz.

:class:`ImageDataset` holds a whole set as compact uint8 ``(N, C, H, W)`` plus int64 labels;
``get_batch(indices)`` turns a batch into the project's convention: float32 in [-1, 1], NCHW,
labels int64 (the "null" label for guidance is ``num_classes``).

``digits``
    scikit-learn's ``load_digits()`` (1,797 grey 8×8 digits, 10 classes), shipped inside the
    package, so it needs no download. Pixel values 0..16 are scaled to 0..255 (``v * 255 / 16``,
    rounded). Split: the first 1,500 images (in scikit-learn's order) are ``"train"``, the last
    297 are ``"test"``; ``"all"`` is every image.
``folder``
    A folder with one sub-folder per class; class names are the sub-folder names in sorted order
    and label ``k`` is ``class_names[k]``. Images are found recursively inside each class
    folder (hidden files skipped). A folder with images and no sub-folders is one class.
    Not held in memory: :func:`load_folder` returns a :class:`selfflow.data.source.StreamedImageSet`
    that decodes per batch, with the crops of :mod:`selfflow.data.preprocess`.
``npz``
    A ``.npz`` file (loaded with ``allow_pickle=False``); see :func:`load_npz` for the keys,
    layouts and value ranges it accepts.

For ``folder`` and ``npz`` the path itself is the split: ``split`` is checked and recorded but
selects nothing. Every loader takes ``image_size`` (bilinear resize, antialiased when shrinking)
and ``channels`` (1 or 3) and applies them through :func:`finish_images`.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from selfflow.data.source import IMAGE_EXTENSIONS
from selfflow.errors import DataError
from selfflow.imageio import to_uint8, uint8_to_float

SPLITS = ("train", "test", "all")
DIGITS_TRAIN_COUNT = 1500


# --------------------------------------------------------------------------------------------
# The in-memory data set
# --------------------------------------------------------------------------------------------

@dataclass(repr=False)
class ImageDataset:
    """A labelled image set held in memory.

    Attributes:
        images: uint8 ``(N, C, H, W)``, 0..255 (a quarter of float32's memory).
        labels: int64 ``(N,)``, each in ``[0, num_classes)``.
        num_classes: number of real classes; ``num_classes`` itself is the guidance null label.
        name: the source kind (``"digits"``, ``"mnist"``, ``"folder"``, ``"npz"``) or a user's.
        source: where it came from: a path, or ``"sklearn"``.
        class_names: ``class_names[k]`` names label ``k``, or None when unknown.
        split: the split it was loaded as (``"train"``, ``"test"`` or ``"all"``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    source: str
    class_names: list[str] | None = None
    split: str = "all"

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 \
                or self.images.ndim != 4:
            raise DataError(f"{self.name}: images must be a uint8 tensor (N, C, H, W), got "
                            f"{_describe(self.images)}")
        if self.images.shape[1] not in (1, 3):
            raise DataError(f"{self.name}: images must have 1 or 3 channels, got shape "
                            f"{tuple(self.images.shape)}")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64 \
                or self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.name}: labels must be int64 of shape "
                            f"({self.images.shape[0]},), got {_describe(self.labels)}")
        if int(self.num_classes) < 1:
            raise DataError(f"{self.name}: num_classes must be >= 1, got {self.num_classes}")
        self.num_classes = int(self.num_classes)
        if len(self.labels) and (int(self.labels.min()) < 0
                                 or int(self.labels.max()) >= self.num_classes):
            raise DataError(f"{self.name}: labels must lie in [0, {self.num_classes}), got "
                            f"[{int(self.labels.min())}, {int(self.labels.max())}]")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise DataError(f"{self.name}: {len(self.class_names)} class names for "
                            f"{self.num_classes} classes")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={self.shape}, num_classes={self.num_classes}, source={self.source!r})")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """Side length H of the (square) images; raises for non-square sets (use ``shape``)."""
        _, h, w = self.shape
        if h != w:
            raise DataError(f"{self.name}: images are {h}x{w}, not square; use .shape")
        return h

    @property
    def null_label(self) -> int:
        """The label that means "no class" for classifier-free guidance."""
        return self.num_classes

    def get_batch(self, indices: torch.Tensor | Sequence[int],
                  device: torch.device | str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(B, C, H, W)`` float32 in [-1, 1] and labels ``(B,)`` int64.

        ``indices``: ``(B,)`` integer tensor or sequence. The uint8 data moves to ``device``
        before conversion, so a GPU copy costs a quarter of the float bytes.
        """
        index = torch.as_tensor(indices, dtype=torch.int64)
        if index.ndim != 1:
            raise DataError(f"{self.name}: indices must be 1-D, got shape {tuple(index.shape)}")
        images = self.images[index]
        labels = self.labels[index]
        if device is not None:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
        return uint8_to_float(images), labels

    def subset(self, indices: torch.Tensor | Sequence[int]) -> "ImageDataset":
        """A new data set with only ``indices`` (e.g. a few-shot probe set); copies the rows."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        return ImageDataset(self.images[index].clone(), self.labels[index].clone(),
                            self.num_classes, self.name, self.source, self.class_names,
                            self.split)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor dtype={value.dtype} shape={tuple(value.shape)}"
    return type(value).__name__


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")


def finish_images(images: torch.Tensor, image_size: int | None, channels: int | None
            ) -> torch.Tensor:
    """Apply the optional channel conversion and resize to uint8 ``(N, C, H, W)``."""
    if channels is not None:
        images = _convert_channels(images, channels)
    if image_size is not None:
        images = _resize_uint8(images, image_size)
    return images.contiguous()


def _convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    current = images.shape[1]
    if current == channels:
        return images
    if current == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if current == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(1, 3, 1, 1)
        grey = (images.to(torch.float32) * weights).sum(dim=1, keepdim=True)
        return grey.round_().clamp_(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert {current} channels to {channels}")


def _resize_uint8(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Bilinear resize of uint8 ``(N, C, H, W)`` to ``(N, C, size, size)``, in chunks."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    shrinking = size < h or size < w
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for start in range(0, n, chunk):
        part = images[start:start + chunk].to(torch.float32)
        part = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False,
                             antialias=shrinking)
        out[start:start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out



# --------------------------------------------------------------------------------------------
# digits (scikit-learn)
# --------------------------------------------------------------------------------------------

def load_digits(split: str = "train", image_size: int | None = None,
                channels: int | None = None) -> ImageDataset:
    """scikit-learn's 8×8 digits: ``(N, 1, 8, 8)`` uint8; train = first 1,500, test = last 297."""
    check_split(split)
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    pixels = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    images = torch.from_numpy(np.rint(pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8))
    images = images.unsqueeze(1)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    if split == "train":
        images, labels = images[:DIGITS_TRAIN_COUNT], labels[:DIGITS_TRAIN_COUNT]
    elif split == "test":
        images, labels = images[DIGITS_TRAIN_COUNT:], labels[DIGITS_TRAIN_COUNT:]
    return ImageDataset(finish_images(images, image_size, channels), labels.clone(), 10, "digits",
                        "sklearn", [str(k) for k in range(10)], split)



# --------------------------------------------------------------------------------------------
# A folder of images, one sub-folder per class
# --------------------------------------------------------------------------------------------

def _image_files(folder: Path) -> list[Path]:
    files = []
    for file in sorted(folder.rglob("*")):
        relative = file.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(file)
    return files


def load_folder(path: str | os.PathLike, split: str = "train", image_size: int | None = None,
                channels: int | None = None, crop: str | None = None, on_bad_image: str = "error"):
    """Images from ``path/<class name>/**/<image>``, listed once and decoded per batch.

    Returns a :class:`selfflow.data.source.StreamedImageSet`: without ``image_size`` every image
    must have the same size; ``crop`` (``center`` by default) makes mixed sizes square.
    ``channels`` None means 1 when every image is grey and 3 otherwise; alpha is dropped.
    """
    from selfflow.data.source import load_streamed

    check_split(split)
    return load_streamed("folder", path, split, image_size, channels, crop, on_bad_image)



# --------------------------------------------------------------------------------------------
# .npz arrays
# --------------------------------------------------------------------------------------------

def read_npz(file: Path, what: str = "npz file") -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read without pickle; a missing or unreadable file is a DataError."""
    if not file.is_file():
        raise DataError(f"{file}: {what} not found")
    try:
        with np.load(file, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zlib.error, EOFError, zipfile.BadZipFile) as error:  # BadZipFile: a truncated file
        raise DataError(f"{file}: cannot read as .npz (without pickle): {(str(error).splitlines() or [type(error).__name__])[0]}") from None


def load_npz(path: str | os.PathLike, split: str = "train", image_size: int | None = None,
             channels: int | None = None) -> ImageDataset:
    """Images (and labels) from a ``.npz`` file, loaded without pickle.

    Keys:
        ``images`` (required): ``(N, H, W)`` (grey), ``(N, H, W, C)`` or ``(N, C, H, W)`` with
            C in {1, 3}; the layout is read from which axis has size 1 or 3 (an array where both
            axis 1 and axis 3 have size 1 or 3 is refused as ambiguous). Values: uint8 (or any
            integer type) in 0..255, or floating point in [-1, 1] (the project's convention;
            quantised to uint8 on load). NaN or inf, or values out of range, are refused.
        ``labels`` (optional): integer ``(N,)``, non-negative. Missing means one class (all 0).
        ``num_classes`` (optional): integer scalar, >= max(label) + 1; default max(label) + 1
            (or ``len(class_names)``).
        ``class_names`` (optional): string array ``(num_classes,)``.
    """
    check_split(split)
    file = Path(path)
    arrays = read_npz(file, "npz file")
    known = {"images", "labels", "num_classes", "class_names"}
    unknown = sorted(set(arrays) - known)
    if unknown:
        raise DataError(f"{file}: unknown key(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(known))}")
    if "images" not in arrays:
        raise DataError(f"{file}: no 'images' key (keys: {', '.join(sorted(arrays)) or 'none'})")
    images = npz_images(arrays["images"], f"{file}['images']")
    n = images.shape[0]

    if "labels" in arrays:
        raw = arrays["labels"]
        where = f"{file}['labels']"
        if raw.dtype.kind not in "iu":
            raise DataError(f"{where}: labels must be integers, got dtype {raw.dtype}")
        if raw.ndim != 1 or raw.shape[0] != n:
            raise DataError(f"{where}: shape {raw.shape}, expected ({n},) to match images")
        if n and int(raw.min()) < 0:
            raise DataError(f"{where}: negative label {int(raw.min())}")
        labels = torch.from_numpy(raw.astype(np.int64))
    else:
        labels = torch.zeros(n, dtype=torch.int64)

    class_names = None
    if "class_names" in arrays:
        names = arrays["class_names"]
        if names.dtype.kind not in "US" or names.ndim != 1:
            raise DataError(f"{file}['class_names']: expected a 1-D string array, got dtype "
                            f"{names.dtype} shape {names.shape}")
        class_names = [item.decode() if isinstance(item, bytes) else str(item)
                       for item in names.tolist()]
    needed = int(labels.max()) + 1 if n else 1
    if "num_classes" in arrays:
        value = arrays["num_classes"]
        if value.ndim != 0 or value.dtype.kind not in "iu":
            raise DataError(f"{file}['num_classes']: expected an integer scalar, got dtype "
                            f"{value.dtype} shape {value.shape}")
        num_classes = int(value)
    elif class_names is not None:
        num_classes = len(class_names)
    else:
        num_classes = needed
    if num_classes < needed:
        raise DataError(f"{file}['labels']: label {needed - 1} needs num_classes >= {needed}, "
                        f"got {num_classes}")
    if class_names is not None and len(class_names) != num_classes:
        raise DataError(f"{file}['class_names']: {len(class_names)} names for {num_classes} "
                        "classes")
    return ImageDataset(finish_images(images, image_size, channels), labels, num_classes, "npz",
                        str(file), class_names, split)


def npz_images(array: np.ndarray, where: str) -> torch.Tensor:
    """Validate and convert an ``images`` array to uint8 ``(N, C, H, W)``."""
    if array.ndim == 3:
        array = array[:, None, :, :]
    elif array.ndim == 4:
        channels_first = array.shape[1] in (1, 3)
        channels_last = array.shape[3] in (1, 3)
        if channels_first and channels_last:
            raise DataError(f"{where}: shape {array.shape} is ambiguous: both axis 1 and axis 3 "
                            "could be channels")
        if channels_last:
            array = np.transpose(array, (0, 3, 1, 2))
        elif not channels_first:
            raise DataError(f"{where}: shape {array.shape} has no channel axis of size 1 or 3 "
                            "(expected (N,H,W), (N,H,W,C) or (N,C,H,W))")
    else:
        raise DataError(f"{where}: {array.ndim}-D array of shape {array.shape}; expected "
                        "(N,H,W), (N,H,W,C) or (N,C,H,W)")
    if 0 in array.shape:
        raise DataError(f"{where}: empty array of shape {array.shape}")
    kind = array.dtype.kind
    if kind == "f":
        if not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise DataError(f"{where}: {bad} NaN or infinite value(s)")
        low, high = float(array.min()), float(array.max())
        if low < -1.0 or high > 1.0:
            raise DataError(f"{where}: float values span [{low:g}, {high:g}]; expected [-1, 1] "
                            "(or store uint8 0..255)")
        return to_uint8(torch.from_numpy(np.ascontiguousarray(array))).contiguous()
    elif kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise DataError(f"{where}: integer values span [{low}, {high}]; expected 0..255")
        array = array.astype(np.uint8)
    else:
        raise DataError(f"{where}: dtype {array.dtype} is not an image type (uint8 or float)")
    return torch.from_numpy(np.ascontiguousarray(array))
