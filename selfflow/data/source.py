"""Image sets read from disk one batch at a time: a folder of images, WebDataset tar shards, a
Hugging Face ``datasets`` set. Memory does not grow with the number of images beyond the index.

Each source is listed once into an :class:`ImageIndex` (an item name, its label, its size and
whether it is grey; tar items also their byte span), cached under
``files.cache_root()/image-index`` and reused while the files are unchanged. A
:class:`StreamedImageSet` decodes the items of a batch on demand through
:func:`selfflow.data.preprocess.prepare_image` (PIL, then the crop), so the same pixels reach
training, ``encode-latents``, reference statistics and ``eval``; :class:`selfflow.data.loader.BatchLoader`
does it in ``torch.utils.data`` workers ahead of the trainer.

``folder``
    ``path/<class>/**/<image>``; classes are the sorted sub-folder names (no sub-folders: one
    class). Listing stamp: each image's relative path, byte size and mtime.
``webdataset``
    ``path`` is a ``.tar`` shard or a folder of them (sorted by name). Members are grouped into
    samples by key (the member name up to the first dot of its last component, as WebDataset
    does); the image is the member with extension ``image_column`` (default: the first of
    jpg, jpeg, png, webp, ppm, bmp, tif, tiff) and the label the integer text of ``label_column``
    (default ``cls``; absent from every sample: one class). Stamp: each shard's size and mtime.
``hf``
    A ``datasets`` set on disk, offline: a ``save_to_disk`` folder (a DatasetDict's ``split``
    is chosen), a folder of ``.parquet`` files, or an image folder (``imagefolder``). Columns
    ``image_column`` (default ``image``) and ``label_column`` (default ``label``; absent:
    one class; ClassLabel names become the class names). Stamp: the set's fingerprint.

An image that cannot be read is named: ``on_bad_image="error"`` stops with its name,
``"skip"`` leaves it out of the index (found when listing) or, when only its decoding fails,
uses the next readable item in its place (a warning names the file) so batches stay full and runs
stay deterministic.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from selfflow.data.preprocess import CROPS, GREY_MODES, prepare_image
from selfflow.errors import DataError
from selfflow.files import atomic_file, cache_root
from selfflow.imageio import uint8_to_float

log = logging.getLogger("selfflow")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TAR_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
BAD_IMAGE_POLICIES = ("error", "skip")
STREAMED_SOURCES = ("folder", "webdataset", "hf")
INDEX_VERSION = 1
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError)  # what PIL raises for bad bytes (UnidentifiedImageError is an OSError)


# --------------------------------------------------------------------------------------------
# the index: one row per item
# --------------------------------------------------------------------------------------------
@dataclass
class ImageIndex:
    """What a source holds, listed once. Rows are items; ``bad`` lists items that could not be read.

    names: bytes ``(N,)`` (a relative path, ``shard.tar/member``, or ``row K``); labels int64 ``(N,)``;
    sizes int64 ``(N, 2)`` (width, height); grey bool ``(N,)``; spans int64 ``(N, 3)`` (tar only:
    shard number, byte offset, byte length; else ``(N, 0)``); bad: ``(name, reason)`` pairs.
    """

    names: np.ndarray
    labels: np.ndarray
    sizes: np.ndarray
    grey: np.ndarray
    spans: np.ndarray
    class_names: list[str]
    bad: list[tuple[str, str]]

    def save(self, file: Path, stamp: str) -> None:
        bad_names = np.array([n for n, _ in self.bad], dtype="U") if self.bad else np.zeros(0, "U1")
        bad_reasons = np.array([r for _, r in self.bad], dtype="U") if self.bad else np.zeros(0, "U1")
        with atomic_file(file) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, version=np.array(INDEX_VERSION), stamp=np.array(stamp), names=self.names, labels=self.labels,
                         sizes=self.sizes, grey=self.grey, spans=self.spans, class_names=np.array(self.class_names, dtype="U"),
                         bad_names=bad_names, bad_reasons=bad_reasons)

    @classmethod
    def load(cls, file: Path, stamp: str) -> Optional["ImageIndex"]:
        """The cached index if it is ours and its stamp matches; None otherwise (it is rebuilt)."""
        try:
            with np.load(file, allow_pickle=False) as saved:
                if int(saved["version"]) != INDEX_VERSION or str(saved["stamp"]) != stamp:
                    return None
                return cls(saved["names"], saved["labels"], saved["sizes"], saved["grey"], saved["spans"],
                           [str(n) for n in saved["class_names"]], list(zip(map(str, saved["bad_names"]), map(str, saved["bad_reasons"]))))
        except (OSError, ValueError, KeyError, EOFError):
            return None

    def __len__(self) -> int:
        return len(self.labels)


def _header(opener, name: str) -> tuple[int, int, bool]:
    """(width, height, grey) from an image's header (PIL reads no pixels here)."""
    from PIL import Image

    with Image.open(opener()) as picture:
        width, height = picture.size
        return int(width), int(height), picture.mode in GREY_MODES


class _IndexBuilder:
    def __init__(self):
        self.names, self.labels, self.sizes, self.grey, self.spans, self.bad = [], [], [], [], [], []

    def add(self, name: str, label: int, opener, span: tuple[int, ...] = ()) -> None:
        try:
            width, height, grey = _header(opener, name)
        except _READ_ERRORS as exc:
            self.bad.append((name, f"cannot read image: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"))
            return
        self.names.append(name.encode("utf-8", "surrogateescape"))
        self.labels.append(label)
        self.sizes.append((width, height))
        self.grey.append(grey)
        self.spans.append(span)

    def finish(self, class_names: list[str]) -> ImageIndex:
        n = len(self.labels)
        spans = np.array(self.spans, dtype=np.int64).reshape(n, -1) if n else np.zeros((0, 0), np.int64)
        return ImageIndex(np.array(self.names, dtype=bytes) if n else np.zeros(0, "S1"), np.array(self.labels, dtype=np.int64),
                          np.array(self.sizes, dtype=np.int64).reshape(n, 2), np.array(self.grey, dtype=bool), spans,
                          class_names, self.bad)


def _cached_index(kind: str, identity: str, stamp: str, build) -> ImageIndex:
    file = cache_root() / "image-index" / f"{kind}-{hashlib.sha256(identity.encode()).hexdigest()[:24]}.npz"
    index = ImageIndex.load(file, stamp) if file.is_file() else None
    if index is None:
        index = build()
        try:
            index.save(file, stamp)
        except OSError as exc:  # a read-only cache: the listing is simply not kept
            log.warning("could not cache the image index in %s (%s)", file.parent, exc.strerror or exc)
    return index


# --------------------------------------------------------------------------------------------
# readers: list a source, open item i
# --------------------------------------------------------------------------------------------
class FolderReader:
    kind = "folder"

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder not found")
        class_dirs = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if class_dirs:
            stray = sorted(f.name for f in self.root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if stray:
                raise DataError(f"{self.root}: image {stray[0]} lies beside the class sub-folders; put every image inside its class folder")
            self.classes = [(name, self._files(self.root / name)) for name in class_dirs]
            empty = [name for name, files in self.classes if not files]
            if empty:
                raise DataError(f"{self.root}: class folder(s) with no images: {', '.join(empty)} "
                                f"(extensions read: {' '.join(IMAGE_EXTENSIONS)})")
        else:
            self.classes = [(self.root.name, self._files(self.root))]
            if not self.classes[0][1]:
                raise DataError(f"{self.root}: no images and no class sub-folders (extensions read: {' '.join(IMAGE_EXTENSIONS)})")

    def _files(self, folder: Path) -> list[str]:
        """Image files under ``folder`` (recursive, hidden names skipped), relative to the root, sorted."""
        found = []
        for directory, subdirs, files in os.walk(folder):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            base = Path(directory).relative_to(self.root)
            found.extend(str(base / f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS)
        return sorted(found, key=lambda name: Path(name).parts)  # the order of sorted(Path.rglob()): captions' ids follow it

    def index(self) -> ImageIndex:
        digest = hashlib.sha256()
        for _, files in self.classes:
            for name in files:
                st = os.stat(self.root / name)
                digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))

        def build() -> ImageIndex:
            builder = _IndexBuilder()
            for label, (_, files) in enumerate(self.classes):
                for name in files:
                    builder.add(name, label, lambda name=name: self.root / name)
            return builder.finish([name for name, _ in self.classes])

        return _cached_index("folder", str(self.root.resolve()), digest.hexdigest(), build)

    def describe(self, name: str) -> str:
        return str(self.root / name)

    def open_bytes(self, index: ImageIndex, row: int):
        return self.root / index.names[row].decode("utf-8", "surrogateescape")


class TarReader:
    """WebDataset shards read by byte span: tar headers are listed once, members are read by seek."""

    kind = "webdataset"

    def __init__(self, path: str | os.PathLike, image_key: Optional[str] = None, label_key: Optional[str] = None):
        self.path = Path(path)
        if self.path.is_dir():
            self.shards = sorted(p for p in self.path.iterdir() if p.suffix == ".tar" and not p.name.startswith("."))
            if not self.shards:
                raise DataError(f"{self.path}: no .tar shards in this folder")
        elif self.path.is_file():
            self.shards = [self.path]
        else:
            raise DataError(f"{self.path}: WebDataset shard or folder not found")
        self.image_key = image_key.lstrip(".").lower() if image_key else None
        self.label_key = (label_key or "cls").lstrip(".").lower()
        self.label_given = label_key is not None

    def _samples(self, shard: Path):
        """[(key, {ext: (offset, size)})] of one shard, in order; a shard cut short is a DataError."""
        total = shard.stat().st_size
        samples: dict[str, dict[str, tuple[int, int]]] = {}
        last, end = None, 0
        try:
            with tarfile.open(shard, "r:") as archive:
                for member in archive:
                    end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    if not member.isfile():
                        continue
                    if member.offset_data + member.size > total:
                        raise DataError(f"{shard}: tar shard cut mid-file: member {member.name} needs {member.size} bytes at "
                                        f"offset {member.offset_data}, the file has {total}; re-copy the shard")
                    last = member.name
                    directory, _, base = member.name.rpartition("/")
                    stem, dot, ext = base.partition(".")
                    if not dot or base.startswith("."):
                        continue
                    key = f"{directory}/{stem}" if directory else stem
                    samples.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
        except (tarfile.TarError, EOFError, OSError) as exc:
            where = f" after member {last}" if last else ""
            raise DataError(f"{shard}: not a readable tar shard ({exc}){where}; truncated or corrupt?") from None
        # tarfile stops quietly at a header cut short; a whole archive ends with two zero blocks after its last member.
        with open(shard, "rb") as handle:
            handle.seek(end)
            marker = handle.read(1024)
        if marker != bytes(1024):
            where = f"after member {last}" if last else "at its start"
            raise DataError(f"{shard}: tar shard cut mid-file {where} (no end-of-archive blocks at byte {end} of {total}); "
                            "re-copy the shard")
        return list(samples.items())

    def index(self) -> ImageIndex:
        stamp = hashlib.sha256("\n".join(f"{p.name}\0{p.stat().st_size}\0{p.stat().st_mtime_ns}" for p in self.shards).encode()).hexdigest()
        stamp += f":{self.image_key}:{self.label_key}"

        def build() -> ImageIndex:
            rows = []  # (name, label or None, opener, span)
            for number, shard in enumerate(self.shards):
                with open(shard, "rb") as handle:
                    for key, members in self._samples(shard):
                        name = f"{shard.name}/{key}"
                        image_ext = self.image_key if self.image_key else next((e for e in TAR_IMAGE_KEYS if e in members), None)
                        if image_ext is None or image_ext not in members:
                            wanted = f".{self.image_key}" if self.image_key else "an image (" + ", ".join(TAR_IMAGE_KEYS) + ")"
                            raise DataError(f"{name}: sample has no {wanted} member (members: {', '.join(sorted(members))}); "
                                            "set data.image_column to the image's extension")
                        label = None
                        if self.label_key in members:
                            offset, size = members[self.label_key]
                            handle.seek(offset)
                            text = handle.read(size).decode("utf-8", "replace").strip()
                            try:
                                label = int(text)
                            except ValueError:
                                raise DataError(f"{name}.{self.label_key}: label {text[:40]!r} is not an integer") from None
                        offset, size = members[image_ext]
                        rows.append((name, label, (number, offset, size)))
            labelled = [label is not None for _, label, _ in rows]
            if any(labelled) and not all(labelled):
                missing = rows[labelled.index(False)][0]
                raise DataError(f"{missing}: sample has no .{self.label_key} label member while others have one")
            if self.label_given and not any(labelled):
                raise DataError(f"{self.path}: no sample has a .{self.label_key} member (data.label_column={self.label_key}); "
                                "leave data.label_column unset for an unlabelled set")
            labels = [label if label is not None else 0 for _, label, _ in rows]
            if labels and min(labels) < 0:
                raise DataError(f"{rows[labels.index(min(labels))][0]}: negative label {min(labels)}")
            builder = _IndexBuilder()
            handles: dict[int, object] = {}
            try:
                for (name, _, span), label in zip(rows, labels):
                    builder.add(name, label, lambda span=span: self._member(span, handles), span)
            finally:
                for handle in handles.values():
                    handle.close()
            count = max(labels) + 1 if labels else 1
            return builder.finish([str(k) for k in range(count)])

        return _cached_index("webdataset", str(self.path.resolve()), stamp, build)

    def _member(self, span, handles: dict) -> io.BytesIO:
        number, offset, size = (int(v) for v in span)
        if number not in handles:
            handles[number] = open(self.shards[number], "rb")
        handle = handles[number]
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise DataError(f"{self.shards[number]}: tar shard cut mid-file at offset {offset} (the index was made from a longer file)")
        return io.BytesIO(data)

    def describe(self, name: str) -> str:
        return str(self.path / name) if self.path.is_dir() else f"{self.path.parent / name}"

    def open_bytes(self, index: ImageIndex, row: int):
        if not hasattr(self, "_handles"):
            self._handles = {}
        return self._member(index.spans[row], self._handles)

    def __getstate__(self):  # workers open their own file handles
        state = dict(self.__dict__)
        state.pop("_handles", None)
        return state


class HFReader:
    """A Hugging Face ``datasets`` set on disk, read offline; images decoded by PIL from their bytes."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike, split: str, image_column: Optional[str] = None, label_column: Optional[str] = None):
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import datasets
        except ImportError:
            raise DataError(f"{path}: data.name=hf needs the optional extra: pip install \"selfflow[hf]\"") from None
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: Hugging Face dataset folder not found")
        datasets.disable_progress_bars()
        hf_split = "test" if split == "test" else "train"
        try:
            if (self.path / "dataset_dict.json").is_file() or (self.path / "state.json").is_file():
                loaded = datasets.load_from_disk(str(self.path))
                if isinstance(loaded, datasets.DatasetDict):
                    if hf_split not in loaded:
                        raise DataError(f"{self.path}: no split {hf_split!r} (splits: {', '.join(loaded)})")
                    loaded = loaded[hf_split]
            else:
                parquet = sorted(str(p) for p in self.path.rglob("*.parquet"))
                if parquet:
                    loaded = datasets.load_dataset("parquet", data_files=parquet, split="train")
                else:
                    loaded = datasets.load_dataset("imagefolder", data_dir=str(self.path), split=hf_split)
        except DataError:
            raise
        except Exception as exc:  # datasets raises many kinds for a folder it cannot read
            raise DataError(f"{self.path}: not a readable Hugging Face dataset ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        self.image_column = image_column or "image"
        columns = list(loaded.column_names)
        if self.image_column not in columns:
            raise DataError(f"{self.path}: no column {self.image_column!r} (columns: {', '.join(columns)}); set data.image_column")
        if label_column is not None and label_column not in columns:
            raise DataError(f"{self.path}: no column {label_column!r} (columns: {', '.join(columns)}); set data.label_column, "
                            "or leave it unset for an unlabelled set")
        self.label_column = label_column or ("label" if "label" in columns else None)
        feature = loaded.features[self.image_column]
        if isinstance(feature, datasets.Image):
            loaded = loaded.cast_column(self.image_column, datasets.Image(decode=False))
        self.data = loaded
        self.class_names = None
        if self.label_column is not None and isinstance(loaded.features[self.label_column], datasets.ClassLabel):
            self.class_names = list(loaded.features[self.label_column].names)

    def _raw(self, row: int):
        value = self.data[int(row)][self.image_column]
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return io.BytesIO(value["bytes"])
            if value.get("path"):
                return value["path"]
        if isinstance(value, (bytes, bytearray)):
            return io.BytesIO(value)
        raise DataError(f"{self.path}: column {self.image_column!r} row {row} holds {type(value).__name__}, not an image")

    def index(self) -> ImageIndex:
        stamp = f"{getattr(self.data, '_fingerprint', '')}:{len(self.data)}:{self.image_column}:{self.label_column}"

        def build() -> ImageIndex:
            if self.label_column is not None:
                raw = np.asarray(self.data[self.label_column])
                if raw.dtype.kind not in "iu":
                    raise DataError(f"{self.path}: column {self.label_column!r} holds {raw.dtype}, not integer labels")
                if len(raw) and raw.min() < 0:
                    raise DataError(f"{self.path}: column {self.label_column!r} has a negative label {int(raw.min())}")
            else:
                raw = np.zeros(len(self.data), np.int64)
            builder = _IndexBuilder()
            for row in range(len(self.data)):
                builder.add(f"row {row}", int(raw[row]), lambda row=row: self._raw(row), (row,))
            count = len(self.class_names) if self.class_names else (int(raw.max()) + 1 if len(raw) else 1)
            return builder.finish(self.class_names or [str(k) for k in range(count)])

        return _cached_index("hf", str(self.path.resolve()) + f":{len(self.data)}", stamp, build)

    def describe(self, name: str) -> str:
        return f"{self.path} ({name})"

    def open_bytes(self, index: ImageIndex, row: int):
        return self._raw(int(index.spans[row][0]))


# --------------------------------------------------------------------------------------------
# the data set the trainer sees
# --------------------------------------------------------------------------------------------
class StreamedImageSet:
    """Images listed in an index and decoded per batch; quacks like :class:`selfflow.data.ImageDataset`.

    ``get_batch(indices, draws=None)`` decodes ``indices`` (``draws``: one seed per image for the
    random crop) into float32 ``(B, C, H, W)`` in [-1, 1] and int64 labels; ``decode(indices, draws)``
    gives uint8 (what the loader's workers return). ``images`` decodes the whole set (small sets only).
    """

    streamed = True

    def __init__(self, reader, name: str, split: str = "train", image_size: Optional[int] = None, channels: Optional[int] = None,
                 crop: Optional[str] = None, on_bad_image: str = "error"):
        crop = crop or "center"
        if crop not in CROPS:
            raise DataError(f"unknown crop {crop!r}; choose one of {', '.join(CROPS)}")
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise DataError(f"unknown on_bad_image {on_bad_image!r}; choose one of {', '.join(BAD_IMAGE_POLICIES)}")
        self.reader, self.name, self.split, self.crop, self.on_bad_image = reader, name, split, crop, on_bad_image
        index = reader.index()
        if index.bad:
            name_, reason = index.bad[0]
            if on_bad_image == "error":
                more = f" (and {len(index.bad) - 1} more)" if len(index.bad) > 1 else ""
                raise DataError(f"{reader.describe(name_)}: {reason}{more}; set data.on_bad_image=skip to leave unreadable images out")
            for bad_name, bad_reason in index.bad:
                log.warning("skipping %s: %s", reader.describe(bad_name), bad_reason)
        if not len(index):
            raise DataError(f"{getattr(reader, 'root', getattr(reader, 'path', '?'))}: no readable images")
        self.index = index
        self.source = str(getattr(reader, "root", getattr(reader, "path", "")))
        self.class_names = list(index.class_names)
        self.num_classes = len(self.class_names)
        self.labels = torch.from_numpy(index.labels.astype(np.int64))
        if int(self.labels.max()) >= self.num_classes:
            raise DataError(f"{self.source}: label {int(self.labels.max())} but only {self.num_classes} classes")
        self._channels = channels if channels is not None else (1 if bool(index.grey.all()) else 3)
        if image_size is None:
            first = index.sizes[0]
            differs = np.nonzero((index.sizes != first).any(axis=1))[0]
            if len(differs):
                other = int(differs[0])
                raise DataError(f"{reader.describe(self._name(other))}: size {index.sizes[other][0]}x{index.sizes[other][1]} (WxH) "
                                f"differs from {reader.describe(self._name(0))}: {first[0]}x{first[1]}; pass image_size to resize "
                                "(data.image_size / --image-size)")
            self._height, self._width = int(first[1]), int(first[0])
        else:
            self._height = self._width = int(image_size)
        self.image_size_arg = image_size

    def _name(self, row: int) -> str:
        return self.index.names[row].decode("utf-8", "surrogateescape")

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return (f"StreamedImageSet(name={self.name!r}, split={self.split!r}, n={len(self)}, shape={self.shape}, "
                f"crop={self.crop!r}, num_classes={self.num_classes}, source={self.source!r})")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._channels, self._height, self._width

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def image_size(self) -> int:
        if self._height != self._width:
            raise DataError(f"{self.name}: images are {self._height}x{self._width}, not square; pass image_size")
        return self._height

    @property
    def null_label(self) -> int:
        return self.num_classes

    def _decode_one(self, row: int, seed: Optional[int]) -> np.ndarray:
        from PIL import Image

        with Image.open(self.reader.open_bytes(self.index, row)) as picture:
            picture.load()
            return prepare_image(picture, self.image_size_arg, self.crop, self._channels, seed)

    def decode(self, indices: Sequence[int] | torch.Tensor, draws: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``(B, C, H, W)`` and int64 labels ``(B,)`` for ``indices`` (``draws``: per-image crop seeds)."""
        rows = [int(i) for i in torch.as_tensor(indices, dtype=torch.int64).reshape(-1)]
        out = np.empty((len(rows), *self.shape), dtype=np.uint8)
        labels = np.empty(len(rows), dtype=np.int64)
        for slot, row in enumerate(rows):
            seed = None if draws is None else int(draws[slot])
            for attempt in range(len(self)):
                used = (row + attempt) % len(self)
                try:
                    out[slot] = self._decode_one(used, seed)
                    labels[slot] = self.index.labels[used]
                    break
                except _READ_ERRORS as exc:
                    where = self.reader.describe(self._name(used))
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    if self.on_bad_image == "error":
                        raise DataError(f"{where}: cannot read image: {reason}; set data.on_bad_image=skip to use the next image instead") from None
                    log.warning("skipping %s (cannot read image: %s); using the next image in its place", where, reason)
            else:
                raise DataError(f"{self.source}: no image of the set could be read")
        return torch.from_numpy(out), torch.from_numpy(labels)

    def get_batch(self, indices, device=None, draws: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(B, C, H, W)`` float32 in [-1, 1] and labels ``(B,)`` int64, decoded now."""
        images, labels = self.decode(indices, draws)
        if device is not None:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        return uint8_to_float(images), labels

    @property
    def images(self) -> torch.Tensor:
        """Every image decoded, uint8 ``(N, C, H, W)``: for the small sets that probes and captions read whole."""
        return torch.cat([self.decode(range(lo, min(lo + 256, len(self))))[0] for lo in range(0, len(self), 256)])

    def describe(self) -> dict:
        """What a manifest records of this set."""
        return {"name": self.name, "source": self.source, "split": self.split, "crop": self.crop, "image_size": self.image_size_arg,
                "channels": self._channels, "count": len(self)}


def load_streamed(name: str, path: str | os.PathLike, split: str = "train", image_size: Optional[int] = None,
                  channels: Optional[int] = None, crop: Optional[str] = None, on_bad_image: str = "error",
                  image_column: Optional[str] = None, label_column: Optional[str] = None) -> StreamedImageSet:
    """A :class:`StreamedImageSet` for ``folder``, ``webdataset`` or ``hf`` (see the module docstring)."""
    if name == "folder":
        if image_column is not None or label_column is not None:
            raise DataError("data.image_column / data.label_column: a folder's labels are its class sub-folders; leave them unset")
        reader = FolderReader(path)
    elif name == "webdataset":
        reader = TarReader(path, image_column, label_column)
    elif name == "hf":
        reader = HFReader(path, split, image_column, label_column)
    else:
        raise DataError(f"unknown streamed source {name!r}; known: {', '.join(STREAMED_SOURCES)}")
    return StreamedImageSet(reader, name, split, image_size, channels, crop, on_bad_image)

