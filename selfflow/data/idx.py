"""IDX files (the MNIST format): any image/label pair in a folder, and the named sets with their hashes.

``idx`` (any IDX set: KMNIST, EMNIST, Fashion-MNIST, your own)
    The folder holds ``<prefix>-images-idx3-ubyte`` and ``<prefix>-labels-idx1-ubyte`` pairs,
    each gzip-compressed (``.gz``) or raw. The prefix names the split: ``train`` (or ending in
    ``-train``) is ``"train"``; ``t10k`` or ``test`` (or ending in ``-t10k``/``-test``) is
    ``"test"``; ``"all"`` is both, train first. Images are uint8 ``(N, H, W)``; labels any
    non-negative integers, ``num_classes = 1 + the largest label`` over every label file of the
    folder (so train and test agree). Header, dimensions and length are checked; nothing else.
``mnist``, ``fashion-mnist`` (named sets)
    The four files under their original names, checked against the sha256 values in
    :data:`NAMED_SETS`. MNIST's values are of the DECOMPRESSED bytes, so a raw copy or any
    mirror's gzip passes; Fashion-MNIST's published values are of its ``.gz`` files, so that set
    must be kept compressed (or loaded as ``idx``, unchecked).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from selfflow.data.images import ImageDataset, check_split, finish_images
from selfflow.errors import DataError

# split -> (images file, labels file) of a named set, names without the ".gz".
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class NamedSet:
    """A published IDX set: the sha256 of each of its four files, and what those hashes cover.

    ``hashed`` is ``"content"`` (sha256 of the decompressed bytes, whatever the compression) or
    ``"gzip"`` (sha256 of the ``.gz`` file exactly as published).
    """

    name: str
    sha256: Mapping[str, str]  # file stem (no ".gz") -> hex digest
    hashed: str
    class_names: tuple[str, ...]


# MNIST: sha256 of each file AFTER gzip decompression (the same bytes whatever the mirror or the
# compression level it used), computed from the original files.
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# Fashion-MNIST: sha256 of each published .gz file, as listed by tensorflow-datasets in
# tensorflow_datasets/url_checksums/fashion_mnist.txt (the files of Zalando's repository and S3
# bucket; their md5 values, 8d4fb7e6…, 25c81989…, bef4ecab…, bb300cfd…, are in Zalando's README
# and torchvision's FashionMNIST.resources).
FASHION_MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}

NAMED_SETS: dict[str, NamedSet] = {
    "mnist": NamedSet("mnist", MNIST_SHA256, "content", tuple(str(k) for k in range(10))),
    "fashion-mnist": NamedSet("fashion-mnist", FASHION_MNIST_SHA256, "gzip",
                              ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                               "Shirt", "Sneaker", "Bag", "Ankle boot")),
}

# IDX element types: third byte of the magic number -> numpy dtype (multi-byte ones big-endian).
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_PAIR = re.compile(r"^(?P<prefix>.*?)(?P<split>train|t10k|test)-(?P<kind>images-idx3|labels-idx1)-ubyte$")


# --------------------------------------------------------------------------------------------
# the format
# --------------------------------------------------------------------------------------------

def read_idx(data: bytes, where: str, expected_ndim: int | None = None) -> np.ndarray:
    """Parse an IDX blob into an array; ``where`` names it in errors.

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


def _read_file(file: Path) -> tuple[bytes, bytes]:
    """(bytes on disk, content): the content is decompressed when the name ends in .gz."""
    try:
        stored = file.read_bytes()
        content = gzip.decompress(stored) if file.suffix == ".gz" else stored
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        kind = "corrupt or truncated gzip" if file.suffix == ".gz" else "unreadable file"
        raise DataError(f"{file}: {kind}: {error}") from error
    return stored, content


# --------------------------------------------------------------------------------------------
# finding the pairs in a folder
# --------------------------------------------------------------------------------------------

def _stem(file: Path) -> str:
    return file.name[:-3] if file.name.endswith(".gz") else file.name


def find_pairs(folder: Path) -> dict[str, list[tuple[Path, Path | None]]]:
    """Split -> [(images file, its labels file or None)] for every IDX image file in ``folder``.

    A ``.gz`` file is preferred over a raw file of the same stem.
    """
    files: dict[str, Path] = {}
    for file in sorted(folder.iterdir()):
        if file.is_file() and not file.name.startswith(".") and _PAIR.match(_stem(file)):
            stem = _stem(file)
            if stem not in files or file.name.endswith(".gz"):
                files[stem] = file
    pairs: dict[str, list[tuple[Path, Path | None]]] = {"train": [], "test": []}
    for stem, file in files.items():
        match = _PAIR.match(stem)
        if match["kind"] != "images-idx3":
            continue
        split = "train" if match["split"] == "train" else "test"
        prefix = match["prefix"]
        if prefix and not prefix.endswith(("-", "_")):
            continue  # e.g. "mytrain-…": the split word must stand on its own
        labels = files.get(f"{prefix}{match['split']}-labels-idx1-ubyte")
        pairs[split].append((file, labels))
    return pairs


def _pair_for(folder: Path, split: str) -> tuple[Path, Path]:
    found = find_pairs(folder)[split]
    if not found:
        word = "train-" if split == "train" else "t10k- or test-"
        raise DataError(f"{folder}: no {split} IDX images (a file named like {word}images-idx3-ubyte[.gz], "
                        "with its -labels-idx1-ubyte[.gz] beside it)")
    if len(found) > 1:
        names = ", ".join(images.name for images, _ in found)
        raise DataError(f"{folder}: several {split} IDX image files ({names}); keep one set per folder")
    images, labels = found[0]
    if labels is None:
        wanted = _stem(images).replace("-images-idx3-ubyte", "-labels-idx1-ubyte")
        raise DataError(f"{images}: no labels file beside it (expected {wanted}[.gz])")
    return images, labels


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

def _read_array(file: Path, ndim: int, named: NamedSet | None, sha256: Mapping[str, str] | None) -> np.ndarray:
    stored, content = _read_file(file)
    array = read_idx(content, str(file), expected_ndim=ndim)
    if named is not None and sha256 is not None:
        stem = _stem(file)
        if stem not in sha256:
            raise DataError(f"{file}: no expected sha256 for {stem!r} in {named.name}")
        if named.hashed == "gzip":
            if not file.name.endswith(".gz"):
                raise DataError(f"{file}: {named.name}'s published sha256 values are of the .gz files; keep the "
                                f"file compressed ({stem}.gz), or load the folder as data.name=idx (unchecked)")
            digest, what = hashlib.sha256(stored).hexdigest(), "the file"
        else:
            digest, what = hashlib.sha256(content).hexdigest(), "the decompressed data"
        if digest != sha256[stem]:
            raise DataError(f"{file}: sha256 of {what} is {digest}, expected {sha256[stem]} (corrupt, or not the "
                            f"original {named.name} file; data.name=idx reads any IDX pair unchecked)")
    return array


def _load_pair(images_file: Path, labels_file: Path, named: NamedSet | None,
               sha256: Mapping[str, str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    images = _read_array(images_file, 3, named, sha256)
    labels = _read_array(labels_file, 1, named, sha256)
    if images.dtype != np.uint8:
        raise DataError(f"{images_file}: IDX element type is {images.dtype}, expected uint8 images")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{labels_file}: IDX element type is {labels.dtype}, expected integer labels")
    if len(images) != len(labels):
        raise DataError(f"{labels_file}: {len(labels)} labels for the {len(images)} images of {images_file.name}")
    if len(labels) and int(labels.min()) < 0:
        raise DataError(f"{labels_file}: negative label {int(labels.min())}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_idx(path: str | os.PathLike, split: str = "train", image_size: int | None = None,
             channels: int | None = None, name: str = "idx",
             sha256: Mapping[str, str] | None = None) -> ImageDataset:
    """An IDX image/label pair (or both splits) from folder ``path``; see the module docstring.

    ``name``: ``"idx"`` (any pair, no hash check) or a key of :data:`NAMED_SETS` (the original
    file names, each checked against ``sha256``, by default the set's published values).
    """
    named = NAMED_SETS.get(name)
    if name != "idx" and named is None:
        raise DataError(f"unknown IDX set {name!r}; known: idx, {', '.join(NAMED_SETS)}")
    return _load(path, split, image_size, channels, named, (sha256 or named.sha256) if named else None)


def load_mnist(path: str | os.PathLike, split: str = "train", image_size: int | None = None,
               channels: int | None = None, sha256: Mapping[str, str] | None = MNIST_SHA256) -> ImageDataset:
    """MNIST from its four IDX files in ``path``: images ``(N, 1, 28, 28)`` uint8, labels ``(N,)``.

    ``sha256`` maps file stems (no ``.gz``) to the sha256 of the decompressed bytes (default: the
    original MNIST's); None reads the same file names without a hash check.
    """
    return _load(path, split, image_size, channels, NAMED_SETS["mnist"], sha256)


def _load(path, split: str, image_size: int | None, channels: int | None, named: NamedSet | None,
          sha256: Mapping[str, str] | None) -> ImageDataset:
    check_split(split)
    folder = Path(path)
    name = named.name if named else "idx"
    if not folder.is_dir():
        raise DataError(f"{folder}: {name} folder not found")
    parts = ["train", "test"] if split == "all" else [split]
    all_images, all_labels = [], []
    for part in parts:
        if named is not None:
            images_file, labels_file = (_named_file(folder, stem, named.name) for stem in IDX_FILES[part])
        else:
            images_file, labels_file = _pair_for(folder, part)
        images, labels = _load_pair(images_file, labels_file, named, sha256)
        all_images.append(images)
        all_labels.append(labels)
    images = torch.cat(all_images) if len(all_images) > 1 else all_images[0]
    labels = torch.cat(all_labels) if len(all_labels) > 1 else all_labels[0]
    if named is not None:
        class_names = list(named.class_names)
        if len(labels) and int(labels.max()) >= len(class_names):
            raise DataError(f"{folder}: label {int(labels.max())} outside 0..{len(class_names) - 1} for {name}")
        num_classes = len(class_names)
    else:
        class_names = None
        num_classes = max(int(labels.max()) + 1 if len(labels) else 1, _largest_label_elsewhere(folder, parts) + 1)
    return ImageDataset(finish_images(images, image_size, channels), labels, num_classes, name, str(folder),
                        class_names, split)


def _named_file(folder: Path, stem: str, name: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder}: missing {stem}.gz (or raw {stem}); download with: selfflow data fetch {name} --to DIR")


def _largest_label_elsewhere(folder: Path, loaded: list[str]) -> int:
    """The largest label in the other split's label file, so that train and test agree on num_classes."""
    largest = -1
    for split, found in find_pairs(folder).items():
        if split in loaded or len(found) != 1 or found[0][1] is None:
            continue
        try:
            labels = read_idx(_read_file(found[0][1])[1], str(found[0][1]), expected_ndim=1)
        except DataError:
            continue  # reported when that split itself is loaded
        if len(labels) and labels.dtype.kind in "iu":
            largest = max(largest, int(labels.max()))
    return largest
