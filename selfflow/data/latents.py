"""Latent data sets: autoencoder latents stored by ``selfflow encode-latents``, or ``.npy`` files.

:class:`LatentDataset` reads a latent shard folder (``set.json`` with ``"kind": "latents"``, see
:mod:`selfflow.latents` for how it is made) or ``.npy`` files made by any other tool:
``latents.npy`` (N, c, h, w) with an optional ``labels.npy`` (N,) — or several
``latents_<part>.npy`` / ``labels_<part>.npy`` pairs — and an optional ``meta.json``
(``num_classes``, ``class_names``). Files are memory-mapped (safetensors shards through their JSON
header, ``.npy`` with ``mmap_mode="r"``, never with pickle), so eight training processes on a node
share one copy in the page cache; rows are read per batch. NaN or infinite values are refused at
load time, naming the file and row. Decoding samples back to pixels is
:func:`selfflow.autoencoders.decoder_for` (the manifest names the autoencoder).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from selfflow.errors import DataError
from selfflow.files import read_json
from selfflow.shards import MANIFEST, ShardSet

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64}


def _memmap_safetensors(path: Path, key: str) -> np.ndarray:
    """A read-only numpy view of one tensor of a safetensors file, through its JSON header."""
    try:
        with open(path, "rb") as handle:
            size_bytes = handle.read(8)
            if len(size_bytes) != 8:
                raise ValueError("shorter than a header")
            header_size = int.from_bytes(size_bytes, "little")
            if header_size > 100_000_000:
                raise ValueError(f"header of {header_size} bytes")
            header = json.loads(handle.read(header_size))
        entry = header[key]
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise ValueError("offsets do not match the shape")
        if 8 + header_size + end > path.stat().st_size:
            raise ValueError("file shorter than its header says")
        return np.memmap(path, dtype=dtype, mode="r", offset=8 + header_size + begin, shape=shape)
    except KeyError as exc:
        raise DataError(f"{path}: no tensor {exc} (or an unsupported dtype: latents float32/float16, labels int64)") from None
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path}: not a readable safetensors shard ({exc}); truncated or corrupt?") from None


class LatentDataset:
    """Latents (N, c, h, w) and labels (N,), read row by row from memory-mapped files.

    Quacks like :class:`selfflow.data.ImageDataset` for the trainer (``get_batch``, ``channels``,
    ``image_size``, ``num_classes``), except that values are latents, not pixels in [-1, 1].
    """

    is_latent = True
    name = "latents"

    def __init__(self, parts: Sequence[tuple[Path, np.ndarray]], labels: torch.Tensor, num_classes: int,
                 source: str, class_names: Optional[list[str]] = None, manifest: Optional[dict] = None, split: str = "train"):
        self.parts = [array for _, array in parts]
        self.files = [file for file, _ in parts]
        shapes = {tuple(a.shape[1:]) for a in self.parts}
        if len(shapes) != 1:
            raise DataError(f"{source}: latent files have different shapes {sorted(shapes)}")
        (shape,) = shapes
        if len(shape) != 3 or shape[1] != shape[2]:
            raise DataError(f"{source}: latents must be (N, c, h, h), got (N, {', '.join(map(str, shape))})")
        self.offsets = np.cumsum([0] + [len(a) for a in self.parts])
        self.labels = labels
        if len(labels) != self.offsets[-1]:
            raise DataError(f"{source}: {self.offsets[-1]} latents but {len(labels)} labels")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= max(num_classes, 1)):
            raise DataError(f"{source}: labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
        self.num_classes = int(num_classes)
        self.source = source
        self.class_names = class_names
        self.manifest = manifest or {}
        self.split = split
        self._shape = shape

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"LatentDataset(n={len(self)}, shape={self.shape}, num_classes={self.num_classes}, source={self.source!r})"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self._shape)

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def image_size(self) -> int:
        return self.shape[1]

    def check_finite(self, chunk: int = 4096) -> None:
        """Refuse NaN or infinite values, naming the file and the first bad row."""
        for file, array in zip(self.files, self.parts):
            for lo in range(0, len(array), chunk):
                block = np.asarray(array[lo:lo + chunk])
                finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
                if not finite.all():
                    row = lo + int(np.argmin(finite))
                    raise DataError(f"{file}: NaN or infinite value in row {row}")

    def get_batch(self, indices, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, c, h, w) float32 and labels (B,) int64."""
        index = torch.as_tensor(indices, dtype=torch.int64).numpy()
        out = np.empty((len(index), *self._shape), dtype=np.float32)
        part = np.searchsorted(self.offsets, index, side="right") - 1
        for p in np.unique(part):
            rows = np.nonzero(part == p)[0]
            out[rows] = self.parts[p][index[rows] - self.offsets[p]]
        latents = torch.from_numpy(out)
        labels = self.labels[torch.as_tensor(index)]
        if device is not None:
            latents, labels = latents.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        return latents, labels


def load_latents(path: str | os.PathLike, split: str = "train", verify: bool = True) -> LatentDataset:
    """A latent shard set (``set.json``) or a folder of ``.npy`` files; see the module docstring."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: latent folder not found")
    if (folder / MANIFEST).is_file():
        shards = ShardSet.open(folder)
        if shards.manifest.get("kind") != "latents":
            raise DataError(f"{folder / MANIFEST}: a {shards.manifest.get('kind')!r} set, not latents")
        missing = shards.pending()
        if missing:
            raise DataError(f"{folder}: latent set is incomplete ({len(missing)} of {shards.num_shards} shards missing); "
                            "run the same encode-latents command again to finish it")
        parts = [(shards.path(i), _memmap_safetensors(shards.path(i), "latents")) for i in range(shards.num_shards)]
        labels = torch.cat([torch.from_numpy(np.array(_memmap_safetensors(shards.path(i), "labels"))) for i in range(shards.num_shards)])
        for file, array in parts:
            if array.dtype.kind != "f":
                raise DataError(f"{file}: latents have dtype {array.dtype}; expected floating point")
        m = shards.manifest
        dataset = LatentDataset(parts, labels.to(torch.int64), int(m.get("num_classes") or 1), str(folder), m.get("class_names"), m, split)
    else:
        dataset = _load_npy_folder(folder, split)
    if verify:
        dataset.check_finite()
    return dataset


def _load_npy(file: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{file}: cannot read as .npy without pickle ({exc})") from None


def _load_npy_folder(folder: Path, split: str) -> LatentDataset:
    latent_files = sorted(folder.glob("latents*.npy"))
    if not latent_files:
        raise DataError(f"{folder}: no set.json and no latents*.npy files")
    parts, labels = [], []
    for file in latent_files:
        array = _load_npy(file, mmap=True)
        if array.dtype not in (np.float32, np.float16, np.float64):
            raise DataError(f"{file}: dtype {array.dtype}; latents must be floating point")
        if array.ndim != 4:
            raise DataError(f"{file}: shape {array.shape}; expected (N, c, h, w)")
        parts.append((file, array))
        label_file = file.with_name("labels" + file.name[len("latents"):])
        if label_file.is_file():
            raw = _load_npy(label_file, mmap=False)
            if raw.dtype.kind not in "iu" or raw.shape != (len(array),):
                raise DataError(f"{label_file}: expected {len(array)} integer labels, got dtype {raw.dtype} shape {raw.shape}")
            labels.append(torch.from_numpy(raw.astype(np.int64)))
        else:
            labels.append(torch.zeros(len(array), dtype=torch.int64))
    all_labels = torch.cat(labels)
    meta = read_json(folder / "meta.json", DataError) if (folder / "meta.json").is_file() else {}
    num_classes = int(meta.get("num_classes") or (int(all_labels.max()) + 1 if len(all_labels) else 1))
    return LatentDataset(parts, all_labels, num_classes, str(folder), meta.get("class_names"), meta, split)
