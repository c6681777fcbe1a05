"""FSDP2 (``fully_shard``) beside DDP, and sharded checkpoints that any number of processes can read.

Wrapping (:func:`shard_for_training`). Under ``train.distributed=fsdp`` every process holds 1/world
of each parameter, gradient and optimizer moment. The units that gather their weights together are
each transformer block, of the student and of the EMA teacher, plus one root per tree: the
``Objective`` (the student's embeddings and final layer, and the method's own parameters, such as
Self-Flow's head, or DMD's whole fake-score DiT and GAN head; DMD's frozen real score is outside the
module tree and replicated) and the EMA model. A unit whose parameters get no gradient on a step (the
student's blocks on DMD2's fake-score-only steps) reduces nothing: its shards' gradients stay None
and AdamW skips them, on every process alike (tests/test_one_step_fsdp.py). Student and EMA are sharded on the same mesh with the same
placements, so the EMA update ``ema.lerp_(θ, 1 − d)`` stays a local operation on each shard. With
bf16 the gathered weights are cast to bf16 and gradients are reduced in fp32
(``MixedPrecisionPolicy``); the sharded master weights and the optimizer stay fp32.

Sharded checkpoints (:func:`save_training_checkpoint`). A checkpoint folder of a sharded run is::

    step_NNNNNNN/
      sharded/shard-0000R-model-00001-of-00001.safetensors   one file per process R (torch.distributed.checkpoint)
      ema.safetensors      the full EMA weights, gathered on rank 0: `selfflow sample` and export read it
      rng.safetensors, config.json, state.json               as in an unsharded checkpoint; state.json has
                                                             "format": "sharded" and the shard files and sizes

The tensors are written by ``torch.distributed.checkpoint`` (DCP) through its safetensors storage
layer (``HuggingFaceStorageWriter(save_distributed=True)``): each process writes its own shards,
and each file's JSON header records where its pieces sit in the full tensors (``saved_offsets``).
Reading (``HuggingFaceStorageReader``) rebuilds the layout from those headers, so a checkpoint
written by N processes loads on M processes, sharded or not — including one process without any
process group. Keys: ``model/<name>``, ``ema/<name>``, ``method/<name>`` and
``optim/<parameter name>/<state>`` (parameter names as in ``Objective``: ``model.blocks.0...``).

What is, and is not, unpickled. DCP's default file layout stores its metadata (``.metadata``) as a
Python pickle and reads it with an unrestricted ``pickle.load``; its default load planner reads
non-tensor items with ``torch.load(weights_only=False)``. Neither is used here: the safetensors
layer has no pickled metadata, every value we save is a tensor, and :class:`TensorOnlyLoadPlanner`
refuses to read a non-tensor item. Loading a sharded checkpoint therefore runs no code from the
files. (Non-tensor optimizer settings go to ``state.json``.)

The folder is written under ``.step_NNNNNNN.tmp-sharded`` by all processes and renamed by rank 0
once every process has finished, so a crash mid-write leaves the previous checkpoint the newest.
Several nodes need a file system they all see (the usual shared ``/checkpoint`` mount).
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from safetensors import SafetensorError

import selfflow.files as files
from selfflow.distributed import DistInfo, any_rank
from selfflow.errors import CheckpointError, ConfigError

SHARDED_DIR = "sharded"
FORMAT_SHARDED = "sharded"


def _require_torch_support() -> None:
    try:
        from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"train.distributed=fsdp needs torch >= 2.8 (fully_shard and DCP's safetensors storage); this is torch {torch.__version__}"
        ) from None


# --------------------------------------------------------------------------------------------
# wrapping
# --------------------------------------------------------------------------------------------
def shard_for_training(objective: nn.Module, model: nn.Module, ema_model: nn.Module, device: torch.device,
                       world_size: int, param_dtype: torch.dtype | None = None) -> None:
    """Apply ``fully_shard`` in place: each block of ``model`` and ``ema_model``, then the roots.

    ``objective`` must contain ``model`` (it is the root that owns the leftovers: embeddings,
    final layer, method parameters). Build the optimizer *after* this call: sharding replaces the
    parameters by DTensors.
    """
    _require_torch_support()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    options: dict[str, Any] = {"mesh": mesh}
    if param_dtype is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for tree in (model, ema_model):
        for block in tree.blocks:
            fully_shard(block, **options)
    # The EMA tree has no backward pass to reshard it, so its root must reshard after forward
    # (FSDP2 keeps a root gathered by default); the update then sees shards on both sides.
    fully_shard(ema_model, reshard_after_forward=True, **options)
    fully_shard(objective, **options)


class no_gradient_sync:
    """FSDP2's counterpart of DDP's ``no_sync()``: accumulate local gradients, reduce on the last micro-batch."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.module.set_requires_gradient_sync(False)
        return self

    def __exit__(self, *exc):
        self.module.set_requires_gradient_sync(True)
        return False


def local_scalar(value: torch.Tensor) -> float:
    """A float from a tensor that may be a (replicated) DTensor, e.g. ``clip_grad_norm_``'s result."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state of ``module`` on rank 0, on the CPU ({} on other ranks). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# --------------------------------------------------------------------------------------------
# the tensors of a training state, by name
# --------------------------------------------------------------------------------------------
def parameter_names(model: nn.Module, method: nn.Module) -> dict[nn.Parameter, str]:
    """Each trained parameter → its name in the ``Objective`` (``model.…`` or ``method.…``)."""
    names = {p: f"model.{n}" for n, p in model.named_parameters()}
    names.update({p: f"method.{n}" for n, p in method.named_parameters()})
    return names


@torch.no_grad()
def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors (as its first step would) without moving any weight.

    Loading fills existing tensors in place, so a fresh optimizer needs them first: one step with
    zero gradients and a learning rate of 0 (AdamW: moments stay 0, decay multiplies by 1).
    """
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    saved_grads = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    for p, grad in zip(params, saved_grads):
        p.grad = grad


def training_tensors(model: nn.Module, ema_model: nn.Module, method: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the training state, keyed for a sharded checkpoint; values alias the live tensors.

    Under FSDP the values are the local shards' DTensors, so loading into this dict in place loads
    the training state.
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, module in (("model", model), ("ema", ema_model), ("method", method)):
        for key, value in module.state_dict().items():
            out[f"{prefix}/{key}"] = value
    names = parameter_names(model, method)
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"optimizer state {names[p]}/{key} is not a tensor ({type(value).__name__}); cannot shard it")
                out[f"optim/{names[p]}/{key}"] = value
    return out


def _make_tensor_only_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorOnlyLoadPlanner(DefaultLoadPlanner):
        """DCP's default planner, except that a non-tensor item is refused instead of unpickled."""

        def load_bytes(self, read_item, value):  # DefaultLoadPlanner would torch.load(weights_only=False)
            raise CheckpointError(f"checkpoint item {read_item.dest_index.fqn!r} is not a tensor; refusing to unpickle it")

    return TensorOnlyLoadPlanner()


def _short(exc: BaseException) -> str:
    """One line from an exception (DCP wraps each rank's traceback into its message)."""
    for failure in (getattr(exc, "failures", None) or {}).values():  # DCP's CheckpointException: {rank: (error, stack)}
        error = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
    cause: BaseException | None = exc
    while cause is not None:  # an OS error anywhere in the chain says it best ("No space left on device")
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("Traceback", "File ", "CheckpointException ranks")):
            return line[:300]
    return type(exc).__name__


def save_sharded_tensors(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every process writes its shards of ``tensors`` into ``directory`` (collective)."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter, save

    directory.mkdir(parents=True, exist_ok=True)
    single = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        save(tensors, storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True), no_dist=single)


def check_shard_files(directory: Path, expected: dict[str, int] | None) -> None:
    """Refuse a sharded folder with a missing or resized shard (DCP would load it partly)."""
    if not directory.is_dir():
        raise CheckpointError(f"missing sharded checkpoint folder: {directory}")
    present = {p.name: p.stat().st_size for p in directory.iterdir() if p.suffix == ".safetensors"}
    if not present:
        raise CheckpointError(f"{directory}: no shard files")
    if expected is None:
        return
    for name, size in expected.items():
        if name not in present:
            raise CheckpointError(f"{directory / name}: shard file missing (the checkpoint is incomplete)")
        if present[name] != size:
            raise CheckpointError(f"{directory / name}: {present[name]} bytes, state.json says {size}; truncated or corrupt?")
    extra = sorted(set(present) - set(expected))
    if extra:
        raise CheckpointError(f"{directory}: unexpected shard file(s) {extra}")


def load_sharded_tensors(directory: Path, template: dict[str, torch.Tensor]) -> None:
    """Fill ``template`` in place from a sharded folder written by any number of processes."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load

    for key, value in template.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"internal: {key} is not a tensor")
    try:
        single = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        with warnings.catch_warnings():  # DCP warns that one process without a group is "assumed"; it is intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            load(template, storage_reader=HuggingFaceStorageReader(str(directory)), planner=_make_tensor_only_planner(), no_dist=single)
    except CheckpointError:
        raise
    except Exception as exc:  # DCP raises CheckpointException / RuntimeError / ValueError with long messages
        message = _short(exc)
        if "Missing key" in str(exc) or "missing" in message.lower():
            message = f"{message} (was it saved for another model size or method?)"
        raise CheckpointError(f"{directory}: cannot load the sharded checkpoint: {message}") from None


def load_full_tensors(template: dict[str, torch.Tensor], full: dict[str, torch.Tensor], source: Path | str) -> None:
    """Fill ``template`` (possibly sharded DTensors) from full tensors, each process its own piece."""
    missing = sorted(set(template) - set(full))
    unexpected = sorted(set(full) - set(template))
    if missing or unexpected:
        raise CheckpointError(f"{source}: tensors do not match (missing {missing[:5]}, unexpected {unexpected[:5]}); another model size or method?")
    with torch.no_grad():
        for key, target in template.items():
            value = full[key]
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}")
            if hasattr(target, "device_mesh"):  # a DTensor: keep only this process's piece
                from torch.distributed.tensor import distribute_tensor

                local = target.to_local()
                piece = distribute_tensor(value.to(device=local.device, dtype=target.dtype), target.device_mesh, target.placements,
                                          src_data_rank=None)
                local.copy_(piece.to_local())
            else:
                target.copy_(value)


# --------------------------------------------------------------------------------------------
# training checkpoints of a sharded run
# --------------------------------------------------------------------------------------------
def save_sharded_checkpoint(state: Any, target: Path, write_records: Callable[[Path, dict], None],
                            info: DistInfo, device: torch.device) -> None:
    """Write a sharded checkpoint folder of ``state`` (a ``selfflow.checkpoint.TrainingState``); collective.

    ``write_records(folder, extra_state)`` writes ``rng.safetensors``, ``config.json`` and
    ``state.json`` (``selfflow.checkpoint.write_records``), run on rank 0 only.
    """
    tmp = target.parent / f".{target.name}.tmp-sharded"

    def agree(problem: str | None) -> None:
        if any_rank(problem is not None, info, device):
            if info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(problem or f"another process could not write {target}; the previous checkpoint is untouched")

    problem = None
    if info.is_main:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / SHARDED_DIR).mkdir(parents=True)
        except OSError as exc:
            problem = f"cannot write to {target.parent}: {exc.strerror or exc}"
    agree(problem)

    ema = full_state_dict(state.ema_model)  # rank 0 only
    tensors = training_tensors(state.model, state.ema_model, state.method, state.optimizer)
    try:
        save_sharded_tensors(tmp / SHARDED_DIR, tensors)
    except Exception as exc:
        problem = f"could not write {target}: {_short(exc)}; the previous checkpoint is untouched"
    agree(problem)

    if info.is_main:
        try:
            files.save_tensors(ema, tmp / "ema.safetensors")
            sizes = {p.name: p.stat().st_size for p in sorted((tmp / SHARDED_DIR).iterdir())}
            groups = [{k: v for k, v in g.items() if k != "params"} for g in state.optimizer.param_groups]
            write_records(tmp, {"format": FORMAT_SHARDED, "sharded": {"files": sizes}, "optimizer": {"param_groups": groups}})
            files.replace_directory(tmp, target)
        except (OSError, SafetensorError) as exc:
            problem = f"could not write {target}: {getattr(exc, 'strerror', None) or exc}; the previous checkpoint is untouched"
            shutil.rmtree(tmp, ignore_errors=True)
    agree(problem)


def load_sharded_checkpoint(live: Any, directory: Path, state: dict) -> None:
    """Load weights, EMA, method and optimizer of any checkpoint into a training state that may be sharded.

    A sharded checkpoint loads through DCP (any number of processes, sharded or not); an
    unsharded one (safetensors files) loads into a sharded state piece by piece. The caller
    restores the RNG, the data position and the step.
    """
    ensure_optimizer_state(live.optimizer)
    tensors = training_tensors(live.model, live.ema_model, live.method, live.optimizer)
    if state.get("format") == FORMAT_SHARDED:
        folder = directory / SHARDED_DIR
        check_shard_files(folder, state.get("sharded", {}).get("files"))
        load_sharded_tensors(folder, tensors)
        saved_groups = state.get("optimizer", {}).get("param_groups", [])
        if len(saved_groups) == len(live.optimizer.param_groups):
            for group, saved in zip(live.optimizer.param_groups, saved_groups):
                group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k != "params"})
        return

    # An unsharded checkpoint: safetensors files of full tensors, optimizer keyed by position.
    full: dict[str, torch.Tensor] = {}
    for prefix, file in (("model", "model.safetensors"), ("ema", "ema.safetensors"), ("method", "method.safetensors")):
        if prefix == "method" and not (directory / file).exists():
            continue
        full.update({f"{prefix}/{k}": v for k, v in files.load_tensors(directory / file).items()})
    names = parameter_names(live.model, live.method)
    order = [p for group in live.optimizer.param_groups for p in group["params"]]
    for key, value in files.load_tensors(directory / "optimizer.safetensors").items():
        index, name = key.split(".", 1)
        if not index.isdigit() or int(index) >= len(order):
            raise CheckpointError(f"{directory / 'optimizer.safetensors'}: unexpected entry {key!r}; another model size or method?")
        full[f"optim/{names[order[int(index)]]}/{name}"] = value
    load_full_tensors(tensors, full, directory)
    for group, saved in zip(live.optimizer.param_groups, state.get("optimizer", {}).get("param_groups", [])):
        group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k != "params"})
