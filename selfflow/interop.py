"""Import SiT, REPA and official Self-Flow checkpoints into selfflow's DiT (docs/methods.md#imported-checkpoints).

The three sources share SiT's network (DiT blocks, adaLN-Zero, sin-cos positions, a label table
whose last row is the null class) and differ in their time convention and a few names:

========================  ===============================  ===============================================
source                    its raw network computes          selfflow's v(x, t) from it
========================  ===============================  ===============================================
``sit``                   u(x, s) = dx/ds, x_s = s·x0 +     v(x, t) = −u(x, 1 − t): the time embedding sees
                          (1 − s)·ε (s = 1 data)            τ = 1 − t, the output layer is negated
``selfflow-official``     the same raw network as SiT; its  the same as ``sit``
                          forward wraps it (t → 1 − t, −·)
``repa``                  v(x, t), our convention           the weights as they are, τ = t
========================  ===============================  ===============================================

Every source embeds its time unscaled (τ ∈ [0, 1]; ours embeds 1000·t), so the imported model
sets ``model.time_scale``/``time_shift``; learned-sigma heads lose their variance channels; the
release's Linear patch embedding becomes our Conv by a reshape ((c p1 p2) order); a positional
table that is not our sin-cos table is kept (``model.pos_embed: stored``). Files are read with
:func:`load_torch_file` (``torch.load(weights_only=True)``), which never runs code from them.
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from selfflow.config import MODEL_SIZES, ConfigError, ModelConfig
from selfflow.checkpoint import check_finite, check_state_bounds
from selfflow.errors import CheckpointError
from selfflow.model import DiT, sincos_2d

__all__ = ["SOURCES", "unwrap_state", "convert_state", "import_checkpoint", "export_state", "ImportResult"]

SOURCES = ("selfflow-official", "sit", "repa")
SIT_HEADS = {"XL": 16, "L": 16, "B": 12, "S": 6}  # SiT-<size>/<patch> model names → heads
WRAPPERS = {"ema": ("ema", "model", "state_dict", "model_state_dict", "module"),
            "model": ("model", "state_dict", "model_state_dict", "module", "ema")}
GENERATOR_PREFIXES = ("x_embedder.", "t_embedder.", "y_embedder.", "blocks.", "final_layer.", "pos_embed")
# source time τ = shift + scale·t and the output sign, per source
CONVENTIONS = {"sit": (1.0, -1.0, -1.0), "selfflow-official": (1.0, -1.0, -1.0), "repa": (0.0, 1.0, 1.0)}
MAX_WIDTH, MAX_DEPTH = 8192, 256  # far above SiT-XL (1152, 28): anything larger is refused before it is built
POS_TOLERANCE = 1e-5  # a positional table within this of our sin-cos table is ours (float64 vs float32 rounding)


# --------------------------------------------------------------------------------------------
# reading a checkpoint file without running code from it
# --------------------------------------------------------------------------------------------
# What a published SiT/REPA training dict carries besides tensors and plain containers: its argparse
# arguments. torch's weights-only unpickler admits tensors, storages, OrderedDict and these; any other
# global (os.system, builtins.exec, any class) is refused before it is looked up.
SAFE_GLOBALS = [argparse.Namespace]


def load_torch_file(path: str | Path) -> Any:
    """The object a ``torch.save`` zip file holds, read with ``torch.load(weights_only=True)`` inside
    ``torch.serialization.safe_globals(SAFE_GLOBALS)``; a refused global is a one-line CheckpointError
    naming the file and the global."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch zip archive (files saved by torch < 1.6 are not read: re-save them with a newer torch)")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            name = found.group(1) if "." in found.group(1) else f"builtins.{found.group(1)}"
            raise CheckpointError(f"{path}: refused to load: the file asks for {name}, which is not a tensor, a plain container "
                                  "or an argparse.Namespace (loading it could run code)") from None
        raise CheckpointError(f"{path}: corrupt or unsupported torch file ({_first_line(exc)})") from None
    except (EOFError, ValueError, TypeError, RuntimeError, AttributeError, IndexError, KeyError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: corrupt or unsupported torch file ({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def read_checkpoint_file(path: str | Path) -> Any:
    """A ``.pt``/``.pth``/``.bin`` torch file (safely, :func:`load_torch_file`) or a ``.safetensors`` file (a dict)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from selfflow.files import load_tensors

        return load_tensors(path)
    return load_torch_file(path)


def plain_data(value: Any) -> Any:
    """An ``argparse.Namespace`` (nested in lists, tuples, dicts) as dicts, for JSON records; tensors as shapes."""
    if isinstance(value, argparse.Namespace):
        return {k: plain_data(v) for k, v in vars(value).items()}
    if isinstance(value, dict):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _is_state(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state(obj: Any, where: str, weights: str = "ema") -> tuple[dict[str, torch.Tensor], dict]:
    """The generator's flat state dict inside a loaded file, and what else the file said.

    Accepts a bare state dict or a training dict (``"ema"``/``"model"``/``"state_dict"``, nested once),
    strips ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes. ``weights`` picks EMA or raw
    weights when both are there. The record holds the key used, ``args`` as plain data and ``steps``.
    """
    record: dict = {}
    for _depth in range(3):
        if _is_state(obj):
            break
        if not isinstance(obj, dict):
            raise CheckpointError(f"{where}: expected a state dict or a training dict, found {type(obj).__name__}")
        if "args" in obj and "args" not in record:
            record["args"] = plain_data(obj["args"])
        if "steps" in obj and "steps" not in record:
            record["steps"] = plain_data(obj["steps"])
        key = next((k for k in WRAPPERS[weights] if k in obj), None)
        if key is None:
            shown = ", ".join(sorted(map(str, obj))[:8])
            raise CheckpointError(f"{where}: no weights found (keys: {shown}); expected a state dict or one under "
                                  f"{'/'.join(WRAPPERS[weights])}")
        record.setdefault("weights_key", []).append(key)
        obj = obj[key]
    else:
        raise CheckpointError(f"{where}: no state dict of tensors found")
    state = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{where}: a key that is not text ({type(name).__name__} {str(name)[:40]!r})")
        for prefix in ("module.", "_orig_mod."):
            while name.startswith(prefix):
                name = name[len(prefix):]
        state[name] = value
    return state, record


def _heads(hidden: int, args: dict, given: Optional[int], where: str) -> int:
    if given:
        heads = given
    else:
        heads = None
        name = str((args or {}).get("model") or "")
        match = re.match(r"SiT-(XL|L|B|S)/\d+$", name)
        if match:
            heads = SIT_HEADS[match.group(1)]
        elif hidden == 1152:
            heads = 16
        elif hidden % 64 == 0:
            heads = hidden // 64
        if heads is None:
            raise ConfigError(f"{where}: cannot tell the number of attention heads of width {hidden}; pass --num-heads")
    if hidden % heads:
        raise ConfigError(f"{where}: --num-heads {heads} does not divide the width {hidden}")
    return heads


def convert_state(state: dict[str, torch.Tensor], source: str, where: str, *, args: Optional[dict] = None,
                  num_heads: Optional[int] = None, num_classes: Optional[int] = None,
                  patch_size: Optional[int] = None) -> tuple[ModelConfig, dict[str, torch.Tensor], list[str]]:
    """(our ModelConfig, our state dict, notes) from a source state dict (names as in the module doc).

    ``num_classes``: the classes when the label table has no null row (table rows == classes); by
    default the last row is the null label. ``patch_size`` is needed only for a Linear patch
    embedding without a positional table to tell it.
    """
    if source not in SOURCES:
        raise ConfigError(f"--from {source!r}: unknown source; choose one of {', '.join(SOURCES)}")
    notes: list[str] = []
    check_state_bounds(state, where)  # before any copy: a few kB of zero-stride tensors can declare gigabytes
    odd = sorted(k for k in state if re.match(r"(decoder_)?blocks\.", k) and not re.match(r"(decoder_)?blocks\.\d+\.", k))
    if odd:
        raise CheckpointError(f"{where}: {odd[0]}: block parameters are named blocks.<number>.<name>")
    state = {k: v.detach().to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    # REPA --legacy: blocks 0..k−1 under "blocks", the rest under "decoder_blocks" numbered from 0
    if any(k.startswith("decoder_blocks.") for k in state):
        encoder_depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        state = {(f"blocks.{int(k.split('.')[1]) + encoder_depth}.{k.split('.', 2)[2]}" if k.startswith("decoder_blocks.") else k): v
                 for k, v in state.items()}
        notes.append(f"legacy REPA layout: decoder_blocks renumbered after {encoder_depth} encoder blocks")
    dropped = sorted({k.split(".")[0] for k in state if not k.startswith(GENERATOR_PREFIXES)})
    if dropped:
        notes.append(f"left out (not part of the generator): {', '.join(dropped)}")
    needed = ["x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
              "final_layer.linear.weight", "final_layer.linear.bias", "blocks.0.attn.qkv.weight"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointError(f"{where}: not a {source} checkpoint: missing {', '.join(missing)}")
    unsupported = sorted(k for k in state if re.match(r"blocks\.\d+\.(norm1|norm2|attn\.q_norm|attn\.k_norm)\.", k)
                         or k.startswith("final_layer.norm_final."))
    if unsupported:
        raise CheckpointError(f"{where}: {unsupported[0]}: affine norms and qk-norm are not part of selfflow's DiT")

    patch_w = state["x_embedder.proj.weight"]
    hidden = patch_w.shape[0] if patch_w.dim() else 0
    if not 0 < hidden <= MAX_WIDTH:
        raise CheckpointError(f"{where}: x_embedder.proj.weight {list(patch_w.shape)} gives width {hidden}; "
                              f"expected 1..{MAX_WIDTH}")
    pos = state.get("pos_embed")
    tokens = pos.numel() // hidden if pos is not None else None
    out_rows = _shape(state, "final_layer.linear.weight", where, 2)[0]
    if patch_w.dim() == 4:  # Conv2d [D, C, p, p]
        channels, p = patch_w.shape[1], patch_w.shape[2]
        conv = patch_w
    elif patch_w.dim() == 2:  # Linear [D, C·p·p] over tokens in (c p1 p2) order
        p = patch_size
        if p is None:
            if tokens is None:
                raise ConfigError(f"{where}: a Linear patch embedding without pos_embed: pass --patch-size")
            p = 2  # the release's patch; checked against the output layer below
        if patch_w.shape[1] % (p * p):
            raise CheckpointError(f"{where}: x_embedder.proj.weight {list(patch_w.shape)} is not (D, C·{p}·{p})")
        channels = patch_w.shape[1] // (p * p)
        conv = patch_w.reshape(hidden, channels, p, p)
        notes.append("Linear patch embedding reshaped to a convolution ((c p1 p2) order)")
    else:
        raise CheckpointError(f"{where}: x_embedder.proj.weight has shape {list(patch_w.shape)}; expected a Conv or Linear weight")
    if out_rows == p * p * channels:
        learned_sigma = False
    elif out_rows == 2 * p * p * channels:
        learned_sigma = True
    else:
        raise CheckpointError(f"{where}: final_layer.linear.weight has {out_rows} rows; expected {p * p * channels} "
                              f"(or {2 * p * p * channels} with learned sigma) for {channels} channels and patch {p}")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if sorted(int(i) for i in {k.split(".")[1] for k in state if k.startswith("blocks.")}) != list(range(depth)):
        raise CheckpointError(f"{where}: the blocks are not numbered 0..{depth - 1}")
    if depth > MAX_DEPTH:
        raise CheckpointError(f"{where}: {depth} blocks; expected at most {MAX_DEPTH}")
    mlp_hidden = _shape(state, "blocks.0.mlp.fc1.weight", where, 2)[0]
    check_source_shapes(state, where, hidden, mlp_hidden, out_rows, depth)
    heads = _heads(hidden, args or {}, num_heads, where)
    freq = state["t_embedder.mlp.0.weight"].shape[1]
    if freq != 256:
        raise CheckpointError(f"{where}: t_embedder.mlp.0.weight takes {freq} frequency features; selfflow's takes 256")

    table = state["y_embedder.embedding_table.weight"]
    rows = table.shape[0]
    if num_classes is None or num_classes == rows - 1:
        classes = rows - 1
    elif num_classes == rows:
        classes = rows
        table = torch.cat([table, torch.zeros(1, hidden)])
        notes.append("the label table has no null row (trained without label dropout): a zero row added; guidance is meaningless")
    else:
        raise ConfigError(f"--num-classes {num_classes}: the label table has {rows} rows (classes + null, or classes)")

    if tokens is None:
        raise CheckpointError(f"{where}: no pos_embed: the number of tokens is unknown")
    if pos.numel() % hidden or pos.shape[-1] != hidden:
        raise CheckpointError(f"{where}: pos_embed has shape {list(pos.shape)}; expected (1, tokens, {hidden})")
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"{where}: pos_embed has {tokens} tokens, not a square grid")
    shift, scale, sign = CONVENTIONS[source]
    ours_table = sincos_2d(hidden, grid, grid)
    pos = pos.reshape(tokens, hidden)
    stored = (pos - ours_table).abs().max().item() > POS_TOLERANCE
    if stored:
        notes.append("pos_embed differs from selfflow's sin-cos table: stored with the weights")
    size = next((name for name, dims in MODEL_SIZES.items() if dims == (depth, hidden, heads)), "tiny")
    config = ModelConfig(size=size, depth=depth, hidden_size=hidden, num_heads=heads, patch_size=p,
                         mlp_ratio=mlp_hidden / hidden, time_scale=scale, time_shift=shift,
                         pos_embed="stored" if stored else "sincos", image_size=grid * p, in_channels=channels,
                         num_classes=classes)
    config.validate("imported model")

    final_w, final_b = state["final_layer.linear.weight"], state["final_layer.linear.bias"]
    if learned_sigma:  # rows in (p q c) order with c < 2C: keep c < C
        final_w = final_w.reshape(p, p, 2 * channels, hidden)[:, :, :channels].reshape(-1, hidden)
        final_b = final_b.reshape(p, p, 2 * channels)[:, :, :channels].reshape(-1)
        notes.append("learned-sigma head: the variance channels are dropped")
    ours = {
        "patch_embed.weight": conv, "patch_embed.bias": state["x_embedder.proj.bias"],
        "time_embed.mlp.0.weight": state["t_embedder.mlp.0.weight"], "time_embed.mlp.0.bias": state["t_embedder.mlp.0.bias"],
        "time_embed.mlp.2.weight": state["t_embedder.mlp.2.weight"], "time_embed.mlp.2.bias": state["t_embedder.mlp.2.bias"],
        "label_embed.weight": table,
        "final.linear.weight": sign * final_w, "final.linear.bias": sign * final_b,
        "final.adaLN.1.weight": state["final_layer.adaLN_modulation.1.weight"],
        "final.adaLN.1.bias": state["final_layer.adaLN_modulation.1.bias"],
    }
    block_names = {"attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2", "adaLN_modulation.1": "adaLN.1"}
    for i in range(depth):
        for theirs, mine in block_names.items():
            for kind in ("weight", "bias"):
                key = f"blocks.{i}.{theirs}.{kind}"
                if key not in state:
                    raise CheckpointError(f"{where}: missing {key}")
                ours[f"blocks.{i}.{mine}.{kind}"] = state[key]
    if stored:
        ours["pos_embed"] = pos[None]
    known = {f"blocks.{i}.{theirs}.{kind}" for i in range(depth) for theirs in block_names for kind in ("weight", "bias")}
    known |= {"x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
              "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
              "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias", "pos_embed"}
    strange = sorted(k for k in state if k.startswith(GENERATOR_PREFIXES) and k not in known)
    if strange:
        raise CheckpointError(f"{where}: {strange[0]}: a parameter selfflow's DiT has no place for")
    notes.insert(0, f"{source}: depth {depth}, width {hidden}, {heads} heads, patch {p}, {channels} channels, "
                    f"{grid * p}×{grid * p} input, {classes} classes")
    return config, ours, notes


def _shape(state: dict, key: str, where: str, dims: int) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{where}: missing {key}")
    if state[key].dim() != dims:
        raise CheckpointError(f"{where}: {key} has shape {list(state[key].shape)}; expected {dims} dimensions")
    return tuple(state[key].shape)


def check_source_shapes(state: dict, where: str, hidden: int, mlp_hidden: int, out_rows: int, depth: int) -> None:
    """Every generator tensor of a SiT-layout state present with the shape the width ``hidden``, MLP width
    and output rows imply (one line naming the key otherwise), before any network is built."""
    if not 0 < mlp_hidden <= 8 * hidden:
        raise CheckpointError(f"{where}: blocks.0.mlp.fc1.weight gives MLP width {mlp_hidden} for width {hidden}")
    wanted = {"x_embedder.proj.bias": (hidden,), "t_embedder.mlp.0.weight": (hidden, 256), "t_embedder.mlp.0.bias": (hidden,),
              "t_embedder.mlp.2.weight": (hidden, hidden), "t_embedder.mlp.2.bias": (hidden,),
              "final_layer.linear.weight": (out_rows, hidden), "final_layer.linear.bias": (out_rows,),
              "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden), "final_layer.adaLN_modulation.1.bias": (2 * hidden,)}
    for i in range(depth):
        for name, rows, cols in (("attn.qkv", 3 * hidden, hidden), ("attn.proj", hidden, hidden), ("mlp.fc1", mlp_hidden, hidden),
                                 ("mlp.fc2", hidden, mlp_hidden), ("adaLN_modulation.1", 6 * hidden, hidden)):
            wanted[f"blocks.{i}.{name}.weight"], wanted[f"blocks.{i}.{name}.bias"] = (rows, cols), (rows,)
    for key, shape in wanted.items():
        if tuple(_shape(state, key, where, len(shape))) != shape:
            raise CheckpointError(f"{where}: {key} has shape {list(state[key].shape)}; width {hidden} needs {list(shape)}")
    table = _shape(state, "y_embedder.embedding_table.weight", where, 2)
    if table[1] != hidden or table[0] < 1:
        raise CheckpointError(f"{where}: y_embedder.embedding_table.weight has shape {list(table)}; expected (classes + 1, {hidden})")
    check_finite(state, where)


def _source_model_name(args: dict) -> Optional[str]:
    return str(args.get("model")) if isinstance(args, dict) and args.get("model") else None


class ImportResult(dict):
    """What :func:`import_checkpoint` did: ``config`` (ModelConfig), ``notes``, ``record`` (the file's args, steps)."""


def import_checkpoint(file: str | Path, source: str, out: str | Path, *, weights: str = "ema", num_heads: Optional[int] = None,
                      num_classes: Optional[int] = None, patch_size: Optional[int] = None,
                      sample: Optional[dict] = None, latent: bool = True) -> ImportResult:
    """Read ``file`` (``.pt``/``.pth``/``.safetensors``) of ``source`` and write our model folder ``out``.

    The folder holds ``model.safetensors`` and ``config.json`` (``model``; ``run.sample``: the
    authors' sampler, ``sit_sde`` with 250 evaluations unless ``sample`` says otherwise; ``import``:
    where it came from). It loads with ``DiT.from_pretrained``, ``selfflow sample`` and ``train.init_from``.
    ``latent`` (all three publish SD-VAE latent models) marks the model as generating latents
    (``run.data.name: latents``): ``selfflow sample`` writes latents and decodes them with ``--autoencoder``.
    """
    if source not in SOURCES:
        raise ConfigError(f"--from {source!r}: unknown source; choose one of {', '.join(SOURCES)}")
    if weights not in WRAPPERS:
        raise ConfigError(f"--weights {weights!r}: choose ema or model")
    for flag, value in (("--num-heads", num_heads), ("--num-classes", num_classes), ("--patch-size", patch_size)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    file = Path(file)
    try:
        obj = read_checkpoint_file(file)
        state, record = unwrap_state(obj, str(file), weights)
    except RecursionError:  # e.g. args nested 200 000 deep
        raise CheckpointError(f"{file}: nested too deeply to read (a crafted or corrupt file?)") from None
    config, ours, notes = convert_state(state, source, str(file), args=record.get("args"), num_heads=num_heads,
                                        num_classes=num_classes, patch_size=patch_size)
    model = DiT(config)
    from selfflow.checkpoint import load_state_strict

    load_state_strict(model, ours, file)
    out = Path(out)
    model.save_pretrained(out)
    meta = json.loads((out / "config.json").read_text())
    meta["run"] = {"sample": dict(sample or {"sampler": "sit_sde", "steps": 250, "cfg_scale": 1.0})}
    if latent:
        meta["run"]["data"] = {"name": "latents"}
    meta["import"] = {"source": source, "file": str(file), "weights": weights, "notes": notes,
                      "source_model": _source_model_name(record.get("args") or {}), **{k: v for k, v in record.items() if k != "args"}}
    from selfflow.files import write_json

    write_json(meta, out / "config.json")
    return ImportResult(config=config, notes=notes, record=record)


def export_state(model: DiT, source: str, *, learned_sigma: bool = False, linear_patch: bool = False) -> dict[str, torch.Tensor]:
    """The inverse of :func:`convert_state`: our DiT's weights in a source's layout (tests, benchmarks).

    Needs a model whose time embedding matches the source's (``time_scale``, ``time_shift``), since the
    weights are not retrained. ``learned_sigma`` adds zero variance channels; ``linear_patch`` writes the
    release's Linear patch embedding.
    """
    shift, scale, sign = CONVENTIONS[source]
    if (model.config.time_shift, model.config.time_scale) != (shift, scale):
        raise ConfigError(f"export to {source}: the model embeds {model.config.time_shift} + {model.config.time_scale}·t, "
                          f"the source {shift} + {scale}·t")
    s = {k: v.detach().clone() for k, v in model.state_dict().items()}
    p, C, D = model.patch_size, model.in_channels, model.hidden_size
    w, b = sign * s["final.linear.weight"], sign * s["final.linear.bias"]
    if learned_sigma:
        w = torch.cat([w.reshape(p, p, C, D), torch.zeros(p, p, C, D)], dim=2).reshape(-1, D)
        b = torch.cat([b.reshape(p, p, C), torch.zeros(p, p, C)], dim=2).reshape(-1)
    out = {
        "x_embedder.proj.weight": s["patch_embed.weight"].reshape(D, -1) if linear_patch else s["patch_embed.weight"],
        "x_embedder.proj.bias": s["patch_embed.bias"],
        "pos_embed": model.pos_embed.detach().clone(),
        "t_embedder.mlp.0.weight": s["time_embed.mlp.0.weight"], "t_embedder.mlp.0.bias": s["time_embed.mlp.0.bias"],
        "t_embedder.mlp.2.weight": s["time_embed.mlp.2.weight"], "t_embedder.mlp.2.bias": s["time_embed.mlp.2.bias"],
        "y_embedder.embedding_table.weight": s["label_embed.weight"],
        "final_layer.linear.weight": w, "final_layer.linear.bias": b,
        "final_layer.adaLN_modulation.1.weight": s["final.adaLN.1.weight"],
        "final_layer.adaLN_modulation.1.bias": s["final.adaLN.1.bias"],
    }
    for i in range(model.depth):
        for theirs, mine in (("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"), ("mlp.fc1", "mlp.0"),
                             ("mlp.fc2", "mlp.2"), ("adaLN_modulation.1", "adaLN.1")):
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{theirs}.{kind}"] = s[f"blocks.{i}.{mine}.{kind}"]
    return out


def model_overrides(config: ModelConfig) -> list[str]:
    """``--set model.KEY=VALUE`` flags that make a training config's model section equal ``config``
    (``train.init_from`` requires the same model); image size, channels and classes come from the data."""
    fields = asdict(config)
    keep = ("size", "depth", "hidden_size", "num_heads", "patch_size", "mlp_ratio", "time_scale", "time_shift", "pos_embed")
    return [f"--set model.{k}={fields[k]}" for k in keep]

