"""Checkpoints a user can trust: safetensors + JSON folders, written atomically, loaded without code.

A training checkpoint is a folder ``<run>/checkpoints/step_XXXXXXX/``::

    model.safetensors      raw weights            (DiT.from_pretrained reads these)
    ema.safetensors        EMA weights            (what `selfflow sample` uses)
    method.safetensors     training-only parts of the method (Self-Flow head, REPA projector)
    optimizer.safetensors  optimizer tensors      + their scalars in state.json
    rng.safetensors        every generator's state
    config.json            {"model": ..., "run": ...}
    state.json             step, data position, optimizer param groups, versions

Every folder is written under a temporary name and renamed into place once complete, so a crash
mid-write leaves the previous checkpoint as the newest complete one. Nothing is ever unpickled.
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

STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file."""


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
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


def sha256_file(path: str | Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


# --------------------------------------------------------------------------------------------
# optimizer and RNG state as tensors + JSON
# --------------------------------------------------------------------------------------------
def split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer ``state_dict`` → (flat tensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entry in rest.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": rest["param_groups"]}


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    for name, gen in generators.items():
        out[f"generator_{name}"] = gen.get_state()
    return out


def set_rng_state(states: dict[str, torch.Tensor], generators: dict[str, torch.Generator], source: Path) -> None:
    if "torch_cpu" not in states:
        raise CheckpointError(f"{source}: no 'torch_cpu' RNG state")
    torch.set_rng_state(states["torch_cpu"])
    cuda_states = [states[k] for k in sorted(states) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    for name, gen in generators.items():
        key = f"generator_{name}"
        if key not in states:
            raise CheckpointError(f"{source}: no RNG state for generator {name!r}")
        gen.set_state(states[key])


# --------------------------------------------------------------------------------------------
# the training-checkpoint folder set
# --------------------------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first (temporaries are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(STEP_PREFIX) and path.name[len(STEP_PREFIX):].isdigit():
            found.append((int(path.name[len(STEP_PREFIX):]), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def remove_stale_temporaries(root: str | Path) -> None:
    root = Path(root)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(".") and (".tmp-" in path.name or ".old-" in path.name):
                shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    for path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a run folder, or its ``checkpoints/`` folder → the checkpoint folder."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(f"no checkpoint found at {path} (expected a folder with config.json, or a run folder with checkpoints/)")
