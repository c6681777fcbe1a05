"""Generated sets on disk: numbered safetensors shards, each written whole or not at all, resumable.

A set is a folder::

    set.json                   what the set is (kind, count, shard size, generator and its settings);
                               written first, and a restarted run must describe the same set
    shard_00000.safetensors    items [0, S)        every tensor has the items on its first axis
    shard_00001.safetensors    items [S, 2S)
    ...

A shard is written as ``.shard_00000.safetensors.tmp-XXXXXXXX``, flushed to disk and renamed, so a
crash (kill -9, power loss, a full disk) leaves complete shards and temporaries, never a half shard
under a shard's name. Running the same command again removes the temporaries and writes only the
missing shards. Item k always comes from seed ``seed + k`` and shards are generated in batches that
start at the shard's first item, so a resumed set is bit-identical to an uninterrupted one.

Kinds written by :func:`generate_set` (StableRep and reflow build on them):

``images``  ``images`` uint8 (n, C, H, W) in 0..255, ``labels`` int64 (n,), ``seeds`` int64 (n,)
``pairs``   ``noise`` float32 (n, C, H, W) = ε of each seed, ``samples`` float32 (n, C, H, W) =
            the sampler's x0 (clipped to [-1, 1]), ``labels``, ``seeds`` — the (ε, x0) pairs of reflow
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from selfflow.checkpoint import fsync_dir, read_json
from selfflow.data import DataError

MANIFEST = "set.json"
SHARD_NAME = "shard_{:05d}.safetensors"
FORMAT = "selfflow-set"
KINDS = ("images", "pairs")


from selfflow.errors import ShardError  # noqa: E402,F401  (re-exported)


def shard_name(index: int) -> str:
    return SHARD_NAME.format(index)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is fsynced and renamed to ``path``."""
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, (OSError, SafetensorError)):
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ShardError(f"could not write {path}: {reason}; the shards already written are untouched") from None
        raise


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """Write one shard atomically (safetensors, contiguous CPU copies)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


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
            with atomic_file(file) as tmp:
                tmp.write_text(json.dumps(manifest, indent=2))
        for stale in folder.glob(".shard_*.tmp-*"):  # left by a crash mid-write
            with contextlib.suppress(OSError):
                stale.unlink()
        return shards

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
        return {k: torch.cat([p[k] for p in parts]) for k in sorted(keys)}


def _read_manifest(file: Path) -> dict:
    data = read_json(file, ShardError, missing="not a generated set, or its first write failed; no manifest")
    if data.get("format") != FORMAT:
        raise ShardError(f"{file}: not a {FORMAT} manifest")
    return data


# --------------------------------------------------------------------------------------------
# generating a set from a model
# --------------------------------------------------------------------------------------------
def generate_set(
    model,
    folder: str | os.PathLike,
    *,
    num: int,
    shard_size: int = 1000,
    kind: str = "images",
    seed: int = 0,
    labels: Optional[Sequence[int]] = None,
    sampler: str = "euler",
    steps: int = 50,
    cfg_scale: float = 1.0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    autocast_dtype: Optional[torch.dtype] = None,
    source: Optional[dict] = None,
    on_shard: Optional[Callable[[int, Path], None]] = None,
) -> ShardSet:
    """Generate ``num`` items from ``model`` into ``folder``, skipping shards already there.

    Item k uses seed ``seed + k`` and label ``labels[k % len(labels)]`` (default: ``(seed + k) mod
    num_classes``, as :func:`selfflow.sampling.generate` does). ``source`` (e.g. the checkpoint
    path and weights) is recorded in ``set.json``. ``on_shard(index, path)`` is called after
    each shard is written.
    """
    from selfflow.sampling import generate, noise_for_seeds

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    for name, value in (("num", num), ("shard_size", shard_size), ("steps", steps), ("batch_size", batch_size)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    image_shape = (model.in_channels, model.image_size, model.image_size)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    manifest = {
        "kind": kind, "num": num, "shard_size": shard_size, "seed": seed, "sampler": sampler, "steps": steps,
        "cfg_scale": cfg_scale, "batch_size": batch_size, "image_shape": list(image_shape), "num_classes": num_classes,
        "labels": list(labels) if labels is not None else "seed mod num_classes", "source": source or {},
    }
    shards = ShardSet.create_or_resume(folder, manifest)
    for index in shards.pending():
        start, stop = shards.item_range(index)
        seeds = list(range(seed + start, seed + stop))
        shard_labels = None
        if labels is not None:
            shard_labels = torch.tensor([labels[k % len(labels)] for k in range(start, stop)], dtype=torch.int64)
        result = generate(
            model, num_samples=stop - start, seeds=seeds, labels=shard_labels, sampler=sampler, steps=steps,
            cfg_scale=cfg_scale, batch_size=batch_size, device=device, image_shape=image_shape,
            autocast_dtype=autocast_dtype, progress=False,
        )
        out_labels = result.labels if result.labels is not None else torch.full((stop - start,), -1, dtype=torch.int64)
        tensors = {"labels": out_labels.to(torch.int64), "seeds": torch.tensor(seeds, dtype=torch.int64)}
        if kind == "images":
            tensors["images"] = ((result.images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        else:
            tensors["noise"] = noise_for_seeds(seeds, image_shape).float().cpu()
            tensors["samples"] = result.images.float()
        path = shards.write(index, tensors)
        if on_shard is not None:
            on_shard(index, path)
    return shards
