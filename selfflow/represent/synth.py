"""Synthetic sets with caption ids for StableRep (``selfflow synth``; docs/methods.md#stablerep).

Image k belongs to group g = k // m (m = ``per_caption``). A group is one sampled *caption row*: its m
images are generated from that row's caption, and **the group is the identity StableRep trains on**
(:class:`selfflow.data.synth.SynthDataset` serves the group index as the id): the m images of a group
are each other's positives and every other group is a negative, even a group of the same class or the
same caption text — as in the paper, where each caption row of a batch is its own identity.

``classes``    the row's caption is a class label, g mod num_classes. Image k starts from the noise of
               seed ``seed + k`` and runs the chosen sampler (any: an ODE sampler, the SDE, or a one-step
               student's single step): a group is m independent draws of one class.
``text``       a caption file (one UTF-8 caption per line), recorded as ``captions.table`` in set.json
               with the generator's text section (``text``), for a caption-conditioned generator
               (caption-conditioned :class:`selfflow.model.DiT`): group g uses line g mod L, and image k starts from
               the noise of seed ``seed + k`` (as ``classes``): m independent draws of one caption.
``variations`` not independent draws: the m images of a group share the class (g mod num_classes, or
               none for an unconditional generator) **and** the initial noise (seed ``seed + g``) and
               differ only by the SDE's noise — variations of one image, an augmentation. The churn: the
               ``sde`` sampler (Euler–Maruyama, diffusion w(t) = t) injects noise only while t ≤ ``churn``
               (w(t) = 0 above it, plain Euler), the noise of image k drawn from its own generator seeded
               ``seed + CHURN_SEED_OFFSET + k``. Needs ``--sampler sde`` and at least 2 steps (the SDE's
               last step is deterministic). (Called ``instances`` before; renamed for what it is.)

Shards (:class:`selfflow.shards.ShardSet`, resumable, bit-identical after any interruption) hold
``images`` uint8, ``labels`` (−1: none), ``captions`` (the row's condition: the class, the caption
line, or the group for variations), ``seeds`` (initial noise) and, for variations, ``churn_seeds``; the
reader is :mod:`selfflow.data.synth`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from selfflow.data.synth import KIND
from selfflow.errors import ConfigError
from selfflow.imageio import to_uint8
from selfflow.sampling import GuidedVelocity, evaluating, generate, get_sampler, noise_for_seeds, time_grid
from selfflow.sets import install_prompts
from selfflow.shards import ShardSet

CHURN_SEED_OFFSET = 1_000_000_007  # variations' SDE noise: seeds far from every initial-noise seed


def read_caption_file(path: str | os.PathLike) -> list[str]:
    """The captions of a text file, one per non-empty line (stripped); ConfigError naming the file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--captions {file}: not classes, variations or a caption file")
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise ConfigError(f"--captions {file}: not a UTF-8 text file (one caption per line)") from None
    captions = [line for line in lines if line]
    if not captions:
        raise ConfigError(f"--captions {file}: no captions (one per line)")
    return captions


def plan(captions: str, per_caption: int, num: int, num_classes: int, sampler: str, steps: int, text_model: bool = False) -> dict:
    """Check the settings against the generator before any work; returns the ``captions`` record of set.json.

    ``text_model``: the generator is caption-conditioned (it takes a caption file, not classes)."""
    if per_caption < 1:
        raise ConfigError(f"--per-caption must be positive, got {per_caption}")
    if num < 1 or num % per_caption:
        raise ConfigError(f"--n {num} must be a positive multiple of --per-caption {per_caption}")
    if captions == "classes":
        if text_model:
            raise ConfigError("--captions classes: the generator is caption-conditioned (no class labels); give a caption file")
        if num_classes < 1:
            raise ConfigError("--captions classes: the generator is unconditional (no class labels); use --captions variations")
        return {"kind": "classes", "per_caption": per_caption, "identity": "group"}
    if captions == "instances":
        raise ConfigError("--captions instances was renamed variations (m SDE variations of one shared initial noise, "
                          "not independent draws); for independent draws of a class use classes")
    if captions == "variations":
        if sampler != "sde" or steps < 2:
            raise ConfigError(f"--captions variations: the images of a group differ only by SDE noise; use --sampler sde "
                              f"with --steps >= 2 (got --sampler {sampler} --steps {steps})")
        return {"kind": "variations", "per_caption": per_caption, "identity": "group"}
    table = read_caption_file(captions)
    if not text_model:
        raise ConfigError(f"--captions {captions}: {len(table)} text captions, but the generator is conditioned on {num_classes} "
                          f"class labels; use classes or variations, or a caption-conditioned generator (a run with a text section)")
    return {"kind": "text", "per_caption": per_caption, "table": table, "identity": "group"}


def item_plan(k: torch.Tensor, kind: str, per_caption: int, num_classes: int, seed: int, num_texts: int = 0) -> dict[str, torch.Tensor]:
    """Labels, caption ids and seeds of items ``k`` (int64); ``num_texts``: the caption file's lines (kind ``text``)."""
    group = k // per_caption
    if kind == "text":
        return {"labels": torch.full_like(k, -1), "captions": group % num_texts, "seeds": seed + k}
    labels = group % num_classes if num_classes else torch.full_like(k, -1)
    if kind == "classes":
        return {"labels": labels, "captions": labels.clone(), "seeds": seed + k}
    return {"labels": labels, "captions": group, "seeds": seed + group, "churn_seeds": seed + CHURN_SEED_OFFSET + k}


def _variations(model, items: dict, *, steps: int, cfg_scale: float, churn: float, batch_size: int, device,
               autocast_dtype) -> torch.Tensor:
    """Images of variation items: shared initial noise, per-image SDE noise while t ≤ churn."""
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    shape = (model.in_channels, model.image_size, model.image_size)
    velocity = GuidedVelocity(model, cfg_scale, null_label=num_classes) if num_classes else model
    times = time_grid(steps)
    sde = get_sampler("sde")
    out = []
    with evaluating(model):
        for lo in range(0, len(items["seeds"]), batch_size):
            rows = slice(lo, lo + batch_size)
            x = noise_for_seeds(items["seeds"][rows].tolist(), shape, device)
            generators = [torch.Generator().manual_seed(int(s)) for s in items["churn_seeds"][rows]]
            y = items["labels"][rows].to(device) if num_classes else None
            autocast = torch.autocast(torch.device(device).type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
            with torch.no_grad(), autocast:
                x = sde(velocity, x, times, y=y, generator=generators, diffusion=lambda t: t if t <= churn else 0.0)
            out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def make_synth_set(model, folder: str | os.PathLike, *, captions: str, per_caption: int, num: int, shard_size: int = 1000,
                   seed: int = 0, sampler: str = "euler", steps: int = 50, cfg_scale: float = 1.0, churn: float = 0.6,
                   batch_size: int = 256, device="cpu", autocast_dtype=None, source: Optional[dict] = None, text=None,
                   sampler_options: Optional[dict] = None, on_shard: Optional[Callable[[int, Path], None]] = None, progress: bool = False) -> ShardSet:
    """Generate (or finish) a captioned set of ``num`` images in ``folder``; see the module doc.

    ``text``: the caption-conditioned generator's text section (:class:`selfflow.config.TextConfig`).
    ``sampler_options`` go to the sampler and into ``set.json`` (classes and text captions; variations run their
    own churned SDE and refuse them)."""
    text_model = bool(getattr(model, "conditions_on_text", False))
    num_classes = 0 if text_model else int(getattr(model, "num_classes", 0) or 0)
    record = plan(captions, per_caption, num, num_classes, sampler, steps, text_model)
    table = record.get("table") or []
    if table:  # the caption lines become the generator's caption bank: caption id = bank index
        install_prompts(model, table, text, None)
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be positive, got {shard_size}")
    if not 0.0 < churn <= 1.0:
        raise ConfigError(f"--churn must be in (0, 1], got {churn}")
    if record["kind"] == "variations":
        record["churn"] = churn
        if sampler_options:
            raise ConfigError(f"--sampler-option {next(iter(sampler_options))}: --captions variations runs its own SDE "
                              f"(noise while t <= --churn) and takes no sampler options")
    manifest = {
        "kind": KIND, "num": num, "shard_size": shard_size, "seed": seed, "sampler": sampler, "steps": steps,
        "cfg_scale": cfg_scale, "batch_size": batch_size, "num_classes": num_classes, "captions": record,
        "image_shape": [model.in_channels, model.image_size, model.image_size], "source": source or {},
    }
    if sampler_options:
        manifest["sampler_options"] = dict(sampler_options)
    if table:
        manifest["text"] = dataclasses.asdict(text)
    shards = ShardSet.create_or_resume(folder, manifest)

    def make(start: int, stop: int) -> dict[str, torch.Tensor]:
        items = item_plan(torch.arange(start, stop), record["kind"], per_caption, num_classes, seed, len(table))
        if record["kind"] in ("classes", "text"):
            condition = items["captions"] if table else items["labels"]
            images = generate(model, num_samples=stop - start, seeds=items["seeds"].tolist(), labels=condition,
                              sampler=sampler, steps=steps, cfg_scale=cfg_scale, batch_size=batch_size, device=device,
                              image_shape=(model.in_channels, model.image_size, model.image_size),
                              autocast_dtype=autocast_dtype, sampler_options=sampler_options, progress=False).images
        else:
            images = _variations(model, items, steps=steps, cfg_scale=cfg_scale, churn=churn, batch_size=batch_size,
                                device=device, autocast_dtype=autocast_dtype)
        return {"images": to_uint8(images), **items}

    return shards.fill(make, desc=f"synth ({record['kind']})", progress=progress, on_shard=on_shard)

