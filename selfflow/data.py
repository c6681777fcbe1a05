"""Image data sets and a deterministic, resumable, rank-aware index stream.

Everything a training run reads comes through here:

- ``load_dataset(name, path, split, image_size, channels)`` returns an :class:`ImageDataset`
  holding the whole set in memory as compact uint8 ``(N, C, H, W)`` plus int64 labels;
- ``ImageDataset.get_batch(indices)`` turns a batch into the project's convention: float32 in
  [-1, 1], NCHW, labels int64 (the "null" label for guidance is ``num_classes``);
- :class:`IndexStream` decides which indices form each global batch, identically for any number
  of processes, and resumes exactly from a plain-int ``state_dict``.

Sources (``name``):

``digits``
    scikit-learn's ``load_digits()`` (1,797 grey 8×8 digits, 10 classes), shipped inside the
    package, so it needs no download. Pixel values 0..16 are scaled to 0..255 (``v * 255 / 16``,
    rounded). Split: the first 1,500 images (in scikit-learn's order) are ``"train"``, the last
    297 are ``"test"``; ``"all"`` is every image.
``mnist``
    The four original IDX files in the folder ``path``, each either gzip-compressed
    (``train-images-idx3-ubyte.gz``) or raw (``train-images-idx3-ubyte``). The decompressed bytes
    must match the sha256 values in :data:`MNIST_SHA256`; header, dimensions and length are
    checked too. ``"train"`` = 60,000 images, ``"test"`` = the 10,000 t10k images, ``"all"`` =
    both (train first). Fetch the files with :func:`selfflow.data_fetch.fetch_mnist`.
``folder``
    A folder with one sub-folder per class; class names are the sub-folder names in sorted order
    and label ``k`` is ``class_names[k]``. Images are found recursively inside each class
    folder (hidden files skipped). A folder with images and no sub-folders is one class.
``npz``
    A ``.npz`` file (loaded with ``allow_pickle=False``); see :func:`load_npz` for the keys,
    layouts and value ranges it accepts.
``latents``
    Autoencoder latents stored by ``selfflow encode-latents`` (a shard folder) or as ``.npy``
    files; returns a :class:`selfflow.latents.LatentDataset` (see that module).

For ``folder`` and ``npz`` the path itself is the split: ``split`` is checked and recorded but
selects nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DataError",
    "ImageDataset",
    "IndexStream",
    "DATASET_NAMES",
    "SPLITS",
    "MNIST_FILES",
    "MNIST_SHA256",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_folder",
    "load_npz",
    "read_idx",
    "uint8_to_float",
]

DATASET_NAMES = ("digits", "mnist", "folder", "npz", "latents")
SPLITS = ("train", "test", "all")

# sha256 of each MNIST file AFTER gzip decompression (the same bytes whatever the mirror or the
# compression level it used). The project carries these itself so that a user's copy, from any
# source, can be checked without anything else.
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# split -> (images file, labels file), names without the ".gz".
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

DIGITS_TRAIN_COUNT = 1500
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


from selfflow.errors import DataError  # noqa: E402,F401  (re-exported)


# --------------------------------------------------------------------------------------------
# The in-memory data set
# --------------------------------------------------------------------------------------------

def uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., C, H, W)`` in 0..255 -> float32 in [-1, 1] via ``x / 127.5 - 1``."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


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


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def load_dataset(name: str, path: str | os.PathLike | None = None, split: str = "train",
                 image_size: int | None = None, channels: int | None = None) -> ImageDataset:
    """Load a data set by name (see the module docstring for each source).

    Args:
        name: one of :data:`DATASET_NAMES`.
        path: folder (``mnist``, ``folder``) or file (``npz``); unused by ``digits``.
        split: ``"train"``, ``"test"`` or ``"all"``.
        image_size: resize every image to ``image_size × image_size`` (bilinear; antialiased
            when shrinking). None keeps the stored size.
        channels: 1 or 3. Grey -> RGB repeats the channel; RGB -> grey uses the ITU-R 601
            luma weights. None keeps the source's own (``folder``: 1 if every image is grey,
            else 3).

    Returns:
        :class:`ImageDataset` with uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)``.
    """
    if name not in DATASET_NAMES:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(DATASET_NAMES)}")
    _check_split(split)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image_size must be a positive int or None, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1, 3 or None, got {channels!r}")
    if name == "digits":
        if path is not None:
            raise DataError("digits is embedded in scikit-learn and takes no path; "
                            f"got path={str(path)!r}")
        return load_digits(split, image_size, channels)
    if path is None:
        hint = " (download it with: selfflow data fetch mnist --to DIR)" if name == "mnist" else ""
        raise DataError(f"data set {name!r} needs a path{hint}")
    if name == "latents":  # pre-encoded autoencoder latents (selfflow.latents)
        if image_size is not None or channels is not None:
            raise DataError("latents are used as stored: leave data.image_size and data.channels unset")
        from selfflow.latents import load_latents

        return load_latents(path, split)
    if name == "mnist":
        return load_mnist(path, split, image_size, channels)
    if name == "folder":
        return load_folder(path, split, image_size, channels)
    return load_npz(path, split, image_size, channels)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")


def _finish(images: torch.Tensor, image_size: int | None, channels: int | None
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
    _check_split(split)
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
    return ImageDataset(_finish(images, image_size, channels), labels.clone(), 10, "digits",
                        "sklearn", [str(k) for k in range(10)], split)


# --------------------------------------------------------------------------------------------
# MNIST (IDX files)
# --------------------------------------------------------------------------------------------

# IDX element types: third byte of the magic number -> numpy dtype (multi-byte ones big-endian).
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_maybe_gzip(file: Path) -> bytes:
    """The file's bytes, decompressed when its name ends in .gz; DataError naming the file."""
    try:
        if file.suffix == ".gz":
            with gzip.open(file, "rb") as handle:
                return handle.read()
        return file.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        kind = "corrupt or truncated gzip" if file.suffix == ".gz" else "unreadable file"
        raise DataError(f"{file}: {kind}: {error}") from error


def read_idx(data: bytes, where: str, expected_ndim: int | None = None) -> np.ndarray:
    """Parse an IDX blob (the MNIST format) into an array; ``where`` names it in errors.

    Layout: two zero bytes, a type byte (0x08 = uint8), a dimension count d, then d big-endian
    uint32 sizes, then the elements. The blob's length must equal exactly what the header says.
    """
    if len(data) < 4:
        raise DataError(f"{where}: {len(data)} bytes, too short for an IDX header")
    zero0, zero1, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_TYPES or ndim == 0:
        raise DataError(f"{where}: bad IDX magic number 0x{data[:4].hex()} "
                        "(expected 00 00 <type> <ndim>, e.g. 0x00000803 for images)")
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataError(f"{where}: IDX header says {ndim} dimensions, expected {expected_ndim}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{where}: truncated IDX header ({len(data)} bytes, need {header_len})")
    dims = tuple(int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
    dtype = np.dtype(_IDX_TYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        shape = "x".join(str(d) for d in dims)
        problem = "truncated" if actual < expected else "trailing bytes"
        raise DataError(f"{where}: {problem}: header says {shape} ({expected} data bytes), "
                        f"file has {actual}")
    return np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)


def _find_mnist_file(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder}: missing {stem}.gz (or raw {stem}); "
                    "download with: selfflow data fetch mnist --to DIR")


def _load_mnist_file(folder: Path, stem: str, ndim: int,
                     sha256: Mapping[str, str] | None) -> np.ndarray:
    file = _find_mnist_file(folder, stem)
    data = _read_maybe_gzip(file)
    array = read_idx(data, str(file), expected_ndim=ndim)
    if sha256 is not None:
        if stem not in sha256:
            raise DataError(f"{file}: no expected sha256 for {stem!r}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256[stem]:
            raise DataError(f"{file}: sha256 of the decompressed data is {digest}, expected "
                            f"{sha256[stem]} (corrupt or not the original MNIST file)")
    if array.dtype != np.uint8:
        raise DataError(f"{file}: IDX element type is {array.dtype}, expected uint8")
    return array


def load_mnist(path: str | os.PathLike, split: str = "train", image_size: int | None = None,
               channels: int | None = None,
               sha256: Mapping[str, str] | None = MNIST_SHA256) -> ImageDataset:
    """MNIST from IDX files in folder ``path``: images ``(N, 1, 28, 28)`` uint8, labels ``(N,)``.

    ``sha256`` maps file stems (no ``.gz``) to the expected sha256 of the decompressed bytes;
    the default is the original MNIST's. Pass None to skip the check (e.g. for an IDX set with
    the same file names, such as Fashion-MNIST); the structural checks always run.
    """
    _check_split(split)
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: MNIST folder not found")
    parts = ["train", "test"] if split == "all" else [split]
    all_images, all_labels = [], []
    for part in parts:
        image_stem, label_stem = MNIST_FILES[part]
        images = _load_mnist_file(folder, image_stem, 3, sha256)
        labels = _load_mnist_file(folder, label_stem, 1, sha256)
        if len(images) != len(labels):
            raise DataError(f"{folder}: {image_stem} has {len(images)} images but {label_stem} "
                            f"has {len(labels)} labels")
        if len(labels) and int(labels.max()) > 9:
            raise DataError(f"{folder / label_stem}: label {int(labels.max())} outside 0..9")
        all_images.append(torch.from_numpy(images.copy()).unsqueeze(1))
        all_labels.append(torch.from_numpy(labels.astype(np.int64)))
    images = torch.cat(all_images) if len(all_images) > 1 else all_images[0]
    labels = torch.cat(all_labels) if len(all_labels) > 1 else all_labels[0]
    return ImageDataset(_finish(images, image_size, channels), labels, 10, "mnist", str(folder),
                        [str(k) for k in range(10)], split)


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
                channels: int | None = None) -> ImageDataset:
    """Images from ``path/<class name>/**/<image>``: uint8 ``(N, C, H, W)``, labels by class.

    Without ``image_size`` every image must have the same size. ``channels`` None means 1 when
    every image is grey (PIL modes 1, L, LA, I, I;16, F) and 3 otherwise; alpha is dropped.
    """
    from PIL import Image, UnidentifiedImageError

    _check_split(split)
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if class_dirs:
        classes = [(d.name, _image_files(d)) for d in class_dirs]
        stray = [f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        if stray:
            raise DataError(f"{root}: image {stray[0].name} lies beside the class sub-folders; "
                            "put every image inside its class folder")
        empty = [name for name, files in classes if not files]
        if empty:
            raise DataError(f"{root}: class folder(s) with no images: {', '.join(empty)} "
                            f"(extensions read: {' '.join(IMAGE_EXTENSIONS)})")
    else:
        classes = [(root.name, _image_files(root))]
        if not classes[0][1]:
            raise DataError(f"{root}: no images and no class sub-folders "
                            f"(extensions read: {' '.join(IMAGE_EXTENSIONS)})")

    pictures = []  # (file, label, PIL image fully decoded)
    for label, (_, files) in enumerate(classes):
        for file in files:
            try:
                with Image.open(file) as handle:
                    handle.load()
                    picture = handle.copy()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
                raise DataError(f"{file}: cannot read image: {error}") from error
            pictures.append((file, label, picture))

    if channels is None:
        channels = 1 if all(p.mode in _GREY_MODES for _, _, p in pictures) else 3
    first_file, _, first = pictures[0]
    if image_size is None:
        for file, _, picture in pictures:
            if picture.size != first.size:
                raise DataError(f"{file}: size {picture.size[0]}x{picture.size[1]} (WxH) differs "
                                f"from {first_file}: {first.size[0]}x{first.size[1]}; pass "
                                "image_size to resize")
        width, height = first.size
    else:
        width = height = image_size

    images = np.empty((len(pictures), height, width, channels), dtype=np.uint8)
    labels = np.empty(len(pictures), dtype=np.int64)
    for row, (file, label, picture) in enumerate(pictures):
        picture = _to_mode(picture, "L" if channels == 1 else "RGB")
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.Resampling.BILINEAR)
        array = np.asarray(picture, dtype=np.uint8)
        images[row] = array.reshape(height, width, channels)
        labels[row] = label
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(tensor, torch.from_numpy(labels), len(classes), "folder", str(root),
                        [name for name, _ in classes], split)


def _to_mode(picture, mode: str):
    """Convert a PIL image to L or RGB; 16-bit and float grey are scaled, not clipped."""
    if picture.mode in ("I", "I;16", "F"):
        array = np.asarray(picture, dtype=np.float64)
        top = 65535.0 if picture.mode != "F" or array.max() > 1.0 else 1.0
        from PIL import Image
        picture = Image.fromarray(np.rint(np.clip(array / top, 0, 1) * 255).astype(np.uint8))
    if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency"
                                                 in picture.info):
        picture = picture.convert("RGBA").convert("RGB")  # drop alpha, keep the colours
    return picture.convert(mode)


# --------------------------------------------------------------------------------------------
# .npz arrays
# --------------------------------------------------------------------------------------------

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
    _check_split(split)
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: npz file not found")
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zlib.error, EOFError) as error:
        raise DataError(f"{file}: cannot read as .npz (without pickle): {error}") from error
    known = {"images", "labels", "num_classes", "class_names"}
    unknown = sorted(set(arrays) - known)
    if unknown:
        raise DataError(f"{file}: unknown key(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(known))}")
    if "images" not in arrays:
        raise DataError(f"{file}: no 'images' key (keys: {', '.join(sorted(arrays)) or 'none'})")
    images = _npz_images(arrays["images"], f"{file}['images']")
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
    return ImageDataset(_finish(images, image_size, channels), labels, num_classes, "npz",
                        str(file), class_names, split)


def _npz_images(array: np.ndarray, where: str) -> torch.Tensor:
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
        array = np.rint((array.astype(np.float64) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    elif kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise DataError(f"{where}: integer values span [{low}, {high}]; expected 0..255")
        array = array.astype(np.uint8)
    else:
        raise DataError(f"{where}: dtype {array.dtype} is not an image type (uint8 or float)")
    return torch.from_numpy(np.ascontiguousarray(array))


# --------------------------------------------------------------------------------------------
# Deterministic, resumable, rank-aware batches of indices
# --------------------------------------------------------------------------------------------

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
