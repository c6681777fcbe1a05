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

import shutil
from pathlib import Path
from typing import Any

import torch

from selfflow.errors import CheckpointError  # noqa: F401  (re-exported)
from selfflow.files import (atomic_directory, fsync_dir, load_tensors, read_json, replace_directory,  # noqa: F401  (re-exported)
                            save_tensors, sha256_file, write_json)

STEP_PREFIX = "step_"


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
