"""Generated sets: ``num`` items from a model into resumable shards (:mod:`selfflow.shards`).

Kinds (StableRep and reflow build on them):

``images``  ``images`` uint8 (n, C, H, W) in 0..255, ``labels`` int64 (n,), ``seeds`` int64 (n,)
``pairs``   ``noise`` float32 (n, C, H, W) = ε of each seed, ``samples`` float32 (n, C, H, W) =
            the ODE sampler's raw x0, ``labels``, ``seeds`` — the (ε, x0) pairs of reflow. A pixel
            model's x0 is clipped to [-1, 1] (its data range); a latent model's (``clip=False``) is
            not: ``set.json`` records ``clipped``. A sampler that injects noise (``sde``, ``sit_sde``)
            is refused: reflow and distillation learn the deterministic coupling of ε and x0.

A caption-conditioned model (caption-conditioned :class:`selfflow.model.DiT`) takes ``prompts`` instead of
labels: item k uses prompt ``k mod P``, its ``labels`` entry is that prompt's index, and ``set.json``
records the prompt table (``prompts``) and the text section that encodes it (``text``).

Item k always comes from seed ``seed + k``, and each shard is generated in batches that start at its
first item, so a set finished after any number of interruptions is bit-identical to one made in a
single run.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from selfflow.imageio import to_uint8
from selfflow.sampling import generate, injects_noise, noise_for_seeds
from selfflow.shards import ShardSet

KINDS = ("images", "pairs")


def install_prompts(model, prompts: list[str], text, labels: Optional[Sequence[int]]) -> list[int]:
    """Encode ``prompts`` into a caption-conditioned model's bank; the item→prompt cycle (all prompts by default)."""
    from selfflow.text.data import make_encoder

    if not getattr(model, "conditions_on_text", False) or text is None:
        raise ValueError("prompts need a caption-conditioned model and its text section")
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("prompts must be non-empty strings")
    model.set_bank(make_encoder(text).encode(prompts))
    return list(range(len(prompts))) if labels is None else list(labels)


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
    sampler_options: Optional[dict] = None,
    prompts: Optional[Sequence[str]] = None,
    text=None,
    on_shard: Optional[Callable[[int, Path], None]] = None,
    progress: bool = False,
    clip: bool = True,
) -> ShardSet:
    """Generate ``num`` items from ``model`` into ``folder``, skipping shards already there.

    Item k uses seed ``seed + k`` and label ``labels[k % len(labels)]`` (default: ``(seed + k) mod
    num_classes``, as :func:`selfflow.sampling.generate` does). ``source`` (e.g. the checkpoint
    path and weights) is recorded in ``set.json``. ``on_shard(index, path)`` is called after
    each shard is written; ``progress`` shows a bar over the items still to generate. ``prompts``
    and ``text`` (a :class:`selfflow.config.TextConfig`) condition a caption-conditioned model.
    ``sampler_options`` go to the sampler (``generate``'s) and into ``set.json``. ``clip=False``
    (a latent model) keeps the sampler's raw output (pairs record it as ``clipped``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    for name, value in (("num", num), ("shard_size", shard_size), ("steps", steps), ("batch_size", batch_size)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if kind == "pairs" and injects_noise(sampler):
        raise ValueError(f"pairs need a deterministic (ODE) sampler; {sampler!r} injects noise")
    image_shape = (model.in_channels, model.image_size, model.image_size)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if prompts is not None:
        labels, num_classes = install_prompts(model, list(prompts), text, labels), 0
    manifest = {
        "kind": kind, "num": num, "shard_size": shard_size, "seed": seed, "sampler": sampler, "steps": steps,
        "cfg_scale": cfg_scale, "batch_size": batch_size, "image_shape": list(image_shape), "num_classes": num_classes,
        "labels": list(labels) if labels is not None else "seed mod num_classes", "source": source or {},
    }
    if kind == "pairs":
        manifest["clipped"] = clip
    if sampler == "dopri5":  # what reflow needs to know of an adaptive solve: its tolerances (the defaults generate uses)
        import inspect

        from selfflow.sampling import dopri5

        defaults = inspect.signature(dopri5).parameters
        manifest["sampler_options"] = {"rtol": defaults["rtol"].default, "atol": defaults["atol"].default, **(sampler_options or {})}
    elif sampler_options:
        manifest["sampler_options"] = dict(sampler_options)
    if prompts is not None:
        manifest.update(prompts=list(prompts), text=dataclasses.asdict(text))
    shards = ShardSet.create_or_resume(folder, manifest)

    def make(start: int, stop: int) -> dict[str, torch.Tensor]:
        seeds = list(range(seed + start, seed + stop))
        shard_labels = None
        if labels is not None:
            shard_labels = torch.tensor([labels[k % len(labels)] for k in range(start, stop)], dtype=torch.int64)
        result = generate(
            model, num_samples=stop - start, seeds=seeds, labels=shard_labels, sampler=sampler, steps=steps,
            cfg_scale=cfg_scale, batch_size=batch_size, device=device, image_shape=image_shape,
            autocast_dtype=autocast_dtype, sampler_options=sampler_options, progress=False, clip=clip or kind == "images",
        )
        out_labels = result.labels if result.labels is not None else torch.full((stop - start,), -1, dtype=torch.int64)
        tensors = {"labels": out_labels.to(torch.int64), "seeds": torch.tensor(seeds, dtype=torch.int64)}
        if kind == "images":
            tensors["images"] = to_uint8(result.images)
        else:
            tensors["noise"] = noise_for_seeds(seeds, image_shape).float().cpu()
            tensors["samples"] = result.images.float()
        return tensors

    return shards.fill(make, desc=f"generating {kind}", progress=progress, on_shard=on_shard)

