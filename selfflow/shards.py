"""Generated sets on disk: numbered safetensors shards, each written whole or not at all, resumable.

A set is a folder::

    set.json                   what the set is (kind, count, shard size, generator and its settings);
                               written first, and a restarted run must describe the same set
    shard_00000.safetensors    items [0, S)        every tensor has the items on its first axis
    shard_00001.safetensors    items [S, 2S)
    ...

A shard is serialised in memory, written as ``.shard_00000.safetensors.tmp-XXXXXXXX``
(:func:`selfflow.files.atomic_file`), flushed to disk and renamed, so a crash (kill -9, power loss, a
full disk) leaves complete shards and temporaries, never a half shard under a shard's name, and no
file but ours (safetensors' own ``save_file`` would write through a ``.tmpXXXXXX`` of its own that a
kill leaves behind). Running the same command again removes the temporaries and writes only the
missing shards. Item k always comes from seed ``seed + k`` and shards are generated in batches that
start at the shard's first item, so a resumed set is bit-identical to an uninterrupted one.

What goes into a set is decided by its writer: :func:`selfflow.sets.generate_set` (generated images
or reflow pairs) and :func:`selfflow.latents.encode_dataset` (autoencoder latents).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from selfflow.errors import ShardError
from selfflow.files import atomic_file, read_json

MANIFEST = "set.json"
SHARD_NAME = "shard_{:05d}.safetensors"
FORMAT = "selfflow-set"
# Temporaries a crash can leave: ours (atomic_file), and safetensors' own from older versions.
_STALE = re.compile(r"^\.(shard_\d+\.safetensors|set\.json)\.tmp-[0-9a-f]{8}$|^\.tmp[A-Za-z0-9]{6}$")


def shard_name(index: int) -> str:
    return SHARD_NAME.format(index)


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (a temporary name of :func:`atomic_file`)."""
    with open(path, "wb") as handle:
        handle.write(data)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """Write one shard atomically (safetensors, contiguous CPU copies); ShardError naming it on failure."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        data = save(flat, metadata=metadata)
        with atomic_file(path) as tmp:
            write_bytes(tmp, data)
    except (OSError, SafetensorError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ShardError(f"could not write {path}: {reason}; the shards already written are untouched") from None


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ShardError(f"missing shard: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ShardError(f"{path}: not a readable safetensors file ({exc}); truncated or corrupt?") from None


# --------------------------------------------------------------------------------------------
# a set of shards
# --------------------------------------------------------------------------------------------
class ShardSet:
    """A folder of shards described by ``set.json`` (``manifest``: ``num`` items, ``shard_size``)."""

    def __init__(self, folder: str | os.PathLike, manifest: dict):
        self.folder = Path(folder)
        self.manifest = manifest
        for key in ("num", "shard_size"):
            value = manifest.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ShardError(f"{self.folder / MANIFEST}: {key} must be a positive integer, got {value!r}")

    # ---- layout -------------------------------------------------------------------------
    @property
    def num(self) -> int:
        return int(self.manifest["num"])

    @property
    def shard_size(self) -> int:
        return int(self.manifest["shard_size"])

    @property
    def num_shards(self) -> int:
        return -(-self.num // self.shard_size)

    def item_range(self, index: int) -> tuple[int, int]:
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.num)

    def path(self, index: int) -> Path:
        return self.folder / shard_name(index)

    def complete(self) -> list[int]:
        return [i for i in range(self.num_shards) if self.path(i).is_file()]

    def pending(self) -> list[int]:
        return [i for i in range(self.num_shards) if not self.path(i).is_file()]

    # ---- writing ------------------------------------------------------------------------
    @classmethod
    def create_or_resume(cls, folder: str | os.PathLike, manifest: dict) -> "ShardSet":
        """Start a set in ``folder``, or continue one that ``set.json`` says is the same set."""
        folder = Path(folder)
        manifest = {"format": FORMAT, **manifest}
        shards = cls(folder, manifest)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ShardError(f"cannot create {folder}: {exc.strerror or exc}") from None
        file = folder / MANIFEST
        if file.exists():
            existing = _read_manifest(file)
            wanted = json.loads(json.dumps(manifest))  # tuples → lists, as JSON stores them
            different = sorted(k for k in set(existing) | set(wanted) if existing.get(k) != wanted.get(k))
            if different:
                key = different[0]
                raise ShardError(
                    f"{folder} holds a different set ({key}: {existing.get(key)!r} there, {wanted.get(key)!r} now); "
                    "use another output folder, or the same settings to finish it"
                )
        else:
            try:
                with atomic_file(file) as tmp:
                    write_bytes(tmp, json.dumps(manifest, indent=2).encode())
            except OSError as exc:
                raise ShardError(f"could not write {file}: {exc.strerror or exc}") from None
        for stale in folder.iterdir():  # left by a crash mid-write
            if _STALE.match(stale.name):
                with contextlib.suppress(OSError):
                    stale.unlink()
        return shards

    def fill(self, make, *, desc: str, progress: bool = True, on_shard=None) -> "ShardSet":
        """Write every pending shard from ``make(start, stop) -> tensors``, in order; a bar counts items.

        ``on_shard(index, path)`` is called after each shard is on disk.
        """
        pending = self.pending()
        bar = None
        if progress and pending:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(b - a for a, b in map(self.item_range, pending)), unit="img", desc=desc, dynamic_ncols=True)
        try:
            for index in pending:
                start, stop = self.item_range(index)
                path = self.write(index, make(start, stop))
                if bar is not None:
                    bar.update(stop - start)
                if on_shard is not None:
                    on_shard(index, path)
        finally:
            if bar is not None:
                bar.close()
        return self

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> Path:
        start, stop = self.item_range(index)
        for key, value in tensors.items():
            if value.shape[:1] != (stop - start,):
                raise ValueError(f"shard {index}: {key} has {tuple(value.shape)}, expected {stop - start} items first")
        path = self.path(index)
        # One metadata key: safetensors writes several in a random (hash) order, and a resumed set
        # should be byte-identical to an uninterrupted one.
        write_shard(path, tensors, metadata={"shard": json.dumps({"index": index, "start": start, "stop": stop})})
        return path

    # ---- reading ------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike) -> "ShardSet":
        folder = Path(folder)
        if not folder.is_dir():
            raise ShardError(f"{folder}: set folder not found")
        return cls(folder, _read_manifest(folder / MANIFEST))

    def read(self, index: int) -> dict[str, torch.Tensor]:
        start, stop = self.item_range(index)
        tensors = read_shard(self.path(index))
        for key, value in tensors.items():
            if value.shape[:1] != (stop - start,):
                raise ShardError(f"{self.path(index)}: {key} has shape {tuple(value.shape)}, expected {stop - start} items")
        return tensors

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every shard concatenated; refuses an unfinished set."""
        missing = self.pending()
        if missing:
            shown = ", ".join(shard_name(i) for i in missing[:3]) + ("…" if len(missing) > 3 else "")
            raise ShardError(f"{self.folder}: set is incomplete ({len(missing)} of {self.num_shards} shards missing: {shown}); "
                             "run the same command again to finish it")
        parts = [self.read(i) for i in range(self.num_shards)]
        keys = set(parts[0])
        for i, part in enumerate(parts):
            if set(part) != keys:
                raise ShardError(f"{self.path(i)}: keys {sorted(part)} differ from {sorted(keys)}")
            for key in keys:
                if part[key].shape[1:] != parts[0][key].shape[1:] or part[key].dtype != parts[0][key].dtype:
                    raise ShardError(f"{self.path(i)}: {key} has items of shape {tuple(part[key].shape[1:])} ({part[key].dtype}), "
                                     f"{self.path(0).name} of {tuple(parts[0][key].shape[1:])} ({parts[0][key].dtype}); "
                                     f"one set, one shape")
        return {k: torch.cat([p[k] for p in parts]) for k in sorted(keys)}


def _read_manifest(file: Path) -> dict:
    data = read_json(file, ShardError, missing="not a generated set, or its first write failed; no manifest")
    if data.get("format") != FORMAT:
        raise ShardError(f"{file}: not a {FORMAT} manifest")
    return data
