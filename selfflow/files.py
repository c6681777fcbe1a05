"""Files written so that a crash never leaves half of one: the project's one place for file I/O.

- :func:`atomic_file` / :func:`atomic_directory`: write under a temporary sibling name, fsync, rename.
- :func:`save_tensors` / :func:`load_tensors`: safetensors only; nothing is ever unpickled.
- :func:`read_json` / :func:`write_json`: JSON objects with an error that names the file.
- :func:`sha256_file`: the one file hash (memoised on path, size and mtime).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from selfflow.errors import CheckpointError


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames) to disk; a no-op where the OS does not allow it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks; memoised on (path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_MEMO[memo] = digest.hexdigest()
    return _SHA_MEMO[memo]


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a flat dict of tensors as safetensors (copies to CPU, breaks shared storage)."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(flat, str(path), metadata=metadata)
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: refusing to load a non-safetensors file (pickles can run code)")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); truncated or corrupt?") from None


def write_json(obj: Any, path: str | Path) -> None:
    path = Path(path)
    with open(path, "w") as handle:
        json.dump(obj, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())


def read_json(path: str | Path, error: type[Exception] = CheckpointError, missing: str = "missing checkpoint file") -> dict:
    """The JSON object in ``path``; anything else raises ``error`` naming the file.

    ``missing`` is the message for an absent file (the path is appended), so each caller can say
    what the file should have been; checkpoints, shard manifests and autoencoder folders share this.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{missing}: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc}); truncated or corrupt?") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def replace_directory(tmp: Path, target: Path) -> None:
    """Move the complete folder ``tmp`` to ``target``, replacing any previous ``target``."""
    fsync_dir(tmp)
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` in one rename.

    On any error the temporary folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise CheckpointError(f"cannot write to {target.parent}: {exc.strerror or exc}") from None
    try:
        yield tmp
        replace_directory(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise CheckpointError(f"could not write {target}: {exc.strerror or exc}; the previous checkpoint is untouched") from None
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it is fsynced and renamed to ``path``.

    On any error the temporary file is removed, ``path`` is left as it was, and the error propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def cache_root() -> Path:
    """The default cache folder: $SELFFLOW_CACHE, else ~/.cache/selfflow."""
    return Path(os.environ.get("SELFFLOW_CACHE", Path.home() / ".cache" / "selfflow"))
