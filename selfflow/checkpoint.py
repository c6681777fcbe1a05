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

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from selfflow.distributed import DistInfo, any_rank

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


MAX_TENSOR_ELEMENTS = 1 << 28  # 1 GiB of float32: larger than any tensor of the largest model size (XL), by far
MAX_STATE_ELEMENTS = 1 << 32  # 16 GiB of float32 in all


def check_state_bounds(state: dict, source: Path | str) -> None:
    """Every key a string, every value a tensor, and the element counts the tensors declare within
    bounds: checked on shapes alone, before anything is copied (a zero-stride tensor can declare
    gigabytes over a few bytes of storage)."""
    total = 0
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: a key that is not text ({type(key).__name__} {str(key)[:40]!r})")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: {key} is a {type(value).__name__}, not a tensor")
        count = value.numel()
        if count and value.untyped_storage().nbytes() < count * value.element_size():
            raise CheckpointError(f"{source}: {key} declares shape {tuple(value.shape)} over a storage of "
                                  f"{value.untyped_storage().nbytes()} bytes (zero or overlapping strides); refusing to build it")
        if count > MAX_TENSOR_ELEMENTS:
            raise CheckpointError(f"{source}: {key} declares shape {tuple(value.shape)} ({count:,} elements, over the "
                                  f"limit of {MAX_TENSOR_ELEMENTS:,}); refusing to build it")
        total += count
    if total > MAX_STATE_ELEMENTS:
        raise CheckpointError(f"{source}: the tensors declare {total:,} elements in all, over the limit of {MAX_STATE_ELEMENTS:,}")


def check_finite(state: dict[str, torch.Tensor], source: Path | str, keys=None) -> None:
    """Refuse NaN or infinite values (in ``keys``, default every floating-point tensor), naming the first key."""
    for key in (state if keys is None else keys):
        value = state[key]
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: {key} holds NaN or infinite values; refusing weights that would sample garbage")


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """``load_state_dict`` whose errors name the file, the key and both shapes; NaN/inf parameters refused."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the model (missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}); was it saved for another model size or method?"
        )
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)} "
                "(a checkpoint of a different model size?)"
            )
    check_finite(state, source, [name for name, _ in module.named_parameters()])
    module.load_state_dict(state)


# --------------------------------------------------------------------------------------------
# training checkpoints: save and restore an explicit training state
# --------------------------------------------------------------------------------------------
@dataclass
class TrainingState:
    """Everything a training checkpoint holds, named. The objects are live: loading writes into them."""

    model: nn.Module
    ema_model: nn.Module
    method: nn.Module
    optimizer: torch.optim.Optimizer
    generators: dict[str, torch.Generator]
    data: Any  # the data position: state_dict() / load_state_dict() (selfflow.data.IndexStream)
    step: int = 0


def write_records(state: TrainingState, folder: Path, extra_state: dict, *, run: dict, world_size: int) -> None:
    """``rng.safetensors``, ``config.json`` and ``state.json`` of a checkpoint (main process only)."""
    save_tensors(rng_state(state.generators), folder / "rng.safetensors")
    write_json({"model": run["model"], "run": run}, folder / "config.json")
    records = {
        "step": state.step,
        "images_seen": state.step * run["train"]["batch_size"],
        "data": state.data.state_dict(),
        "world_size": world_size,
        "versions": {"torch": torch.__version__},
        **extra_state,
    }
    write_json(records, folder / "state.json")


def save_training_checkpoint(state: TrainingState, target: Path, *, run: dict, dist: DistInfo, device: torch.device,
                             sharded: bool) -> None:
    """Write ``target`` (``checkpoints/step_N``) atomically; every process calls it.

    Unsharded: the main process writes the safetensors files. Sharded (FSDP): every process writes its
    shards (``selfflow.fsdp``). A failed write (disk full, no permission) raises ``CheckpointError`` on
    every process and leaves the previous checkpoint as it was.
    """
    records = functools.partial(write_records, state, run=run, world_size=dist.world_size)
    if sharded:
        from selfflow.fsdp import save_sharded_checkpoint

        save_sharded_checkpoint(state, target, records, dist, device)
        return
    problem = None
    if dist.is_main:
        try:
            with atomic_directory(target, replace=True) as tmp:
                save_tensors(state.model.state_dict(), tmp / "model.safetensors")
                save_tensors(state.ema_model.state_dict(), tmp / "ema.safetensors")
                method_state = state.method.state_dict()
                if method_state:
                    save_tensors(method_state, tmp / "method.safetensors")
                opt_tensors, opt_rest = split_optimizer_state(state.optimizer.state_dict())
                save_tensors(opt_tensors, tmp / "optimizer.safetensors")
                records(tmp, {"optimizer": opt_rest})
        except CheckpointError as exc:
            problem = exc
        except SafetensorError as exc:  # the writer's own I/O error (e.g. disk full)
            problem = CheckpointError(f"could not write {target}: {exc}; the previous checkpoint is untouched")
    if any_rank(problem is not None, dist, device):
        raise problem or CheckpointError(f"the main process could not write {target}; the previous checkpoint is untouched")


def check_same_run(directory: Path, run: dict) -> None:
    """A checkpoint resumes only a run with the same model and method settings."""
    meta = read_json(directory / "config.json")
    saved = meta.get("run")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{directory / 'config.json'}: no 'run' section")
    for section in ("model", "method", "text"):  # text: only caption-conditioned runs have it
        mine, theirs = run.get(section) or {}, saved.get(section) or {}
        if theirs != mine:
            diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
            raise CheckpointError(
                f"{directory}: checkpoint was trained with a different {section} config (keys {diff}); "
                f"use a new train.out_dir or the same config"
            )


def load_training_checkpoint(state: TrainingState, directory: Path, *, run: dict, device: torch.device, sharded: bool) -> int:
    """Restore weights, EMA, method, optimizer, every generator and the data position; returns the step.

    A sharded checkpoint (or a sharded ``state``) goes through ``selfflow.fsdp``, on any number of
    processes.
    """
    check_same_run(directory, run)
    saved = read_json(directory / "state.json")
    if sharded or saved.get("format") == "sharded":
        from selfflow.fsdp import load_sharded_checkpoint

        load_sharded_checkpoint(state, directory, saved)
    else:
        for module, file in ((state.model, "model"), (state.ema_model, "ema"), (state.method, "method")):
            path = directory / f"{file}.safetensors"
            if file == "method" and not path.exists():
                continue
            load_state_strict(module, load_tensors(path, device), path)
        try:
            opt = join_optimizer_state(load_tensors(directory / "optimizer.safetensors", device), saved["optimizer"])
            state.optimizer.load_state_dict(opt)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{directory / 'optimizer.safetensors'}: optimizer state does not fit ({exc})") from None
    set_rng_state(load_tensors(directory / "rng.safetensors"), state.generators, directory / "rng.safetensors")
    try:
        state.data.load_state_dict(saved["data"])
        state.step = int(saved["step"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{directory / 'state.json'}: the data position does not fit this run ({exc}); use a new train.out_dir") from None
    return state.step
