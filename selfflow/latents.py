"""Encode a data set once with a local autoencoder; training then reads the stored latents.

The ImageNet-256 recipe of DiT/SiT/REPA/Self-Flow trains on Stable Diffusion VAE latents. Here that
is two commands::

    selfflow encode-latents --data folder --data-path imagenet/train --image-size 256 \\
        --autoencoder sd-vae-ft-ema/ --out latents/imagenet256
    selfflow train --config configs/imagenet256_latents_self_flow.yaml

The autoencoders live in :mod:`selfflow.autoencoders`; reading latents back is
:mod:`selfflow.data.latents`. A latent set is a shard folder (:mod:`selfflow.shards`) whose
``set.json`` has ``"kind": "latents"`` and names the autoencoder (kind, path, sha256 of its weights)
and the data it encoded; each shard holds ``latents`` float32/float16 (n, c, h, w) and ``labels``
int64 (n,). Encoding is resumable like any shard set. ``posterior="sample"`` draws item k's latent
from the encoder's Gaussian with seed ``seed + k``; ``"mean"`` takes its mean.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from selfflow.errors import DataError
from selfflow.imageio import uint8_to_float
from selfflow.shards import ShardSet


@torch.no_grad()
def encode_dataset(dataset, autoencoder, folder: str | os.PathLike, *, autoencoder_dir: Optional[str | os.PathLike] = None,
                   shard_size: int = 10000, batch_size: int = 64, posterior: str = "mean", seed: int = 0,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", on_shard=None,
                   progress: bool = False, num_workers: int = 0):
    """Encode every image of ``dataset`` into a latent shard set in ``folder`` (resumable).

    ``autoencoder``: from :func:`selfflow.autoencoders.load_autoencoder`; ``progress`` shows a bar
    over the images still to encode. A set decoded per batch (folder, webdataset, hf) streams: only
    one shard's latents are held, its images decoded ahead in ``num_workers`` workers.
    """
    if posterior not in ("mean", "sample"):
        raise ValueError(f"posterior must be mean or sample, got {posterior!r}")
    if getattr(dataset, "crop", None) == "random":
        raise DataError("encode-latents stores one latent per image: use crop center or resize, not random")
    if dataset.channels != autoencoder.in_channels:
        raise DataError(f"the data has {dataset.channels} channel(s), the autoencoder expects {autoencoder.in_channels} "
                        f"(pass channels={autoencoder.in_channels} / --channels)")
    height, width = dataset.shape[1:]
    if height % autoencoder.downsample or width % autoencoder.downsample:
        raise DataError(f"image size {height}x{width} is not divisible by the autoencoder's downsampling {autoencoder.downsample}")
    latent_shape = [autoencoder.latent_channels, height // autoencoder.downsample, width // autoencoder.downsample]
    manifest = {
        "kind": "latents", "num": len(dataset), "shard_size": shard_size, "posterior": posterior, "seed": seed,
        "dtype": str(dtype).replace("torch.", ""), "latent_shape": latent_shape,
        "num_classes": dataset.num_classes, "class_names": dataset.class_names,
        "data": {"name": dataset.name, "source": dataset.source, "split": dataset.split, "image_shape": list(dataset.shape),
                 **({"crop": dataset.crop} if getattr(dataset, "crop", None) else {})},
        "autoencoder": autoencoder.describe(Path(autoencoder_dir) if autoencoder_dir is not None else None),
    }
    shards = ShardSet.create_or_resume(folder, manifest)
    autoencoder.eval()
    pending = shards.pending()
    todo = sum(stop - start for start, stop in map(shards.item_range, pending))
    bar = tqdm(total=todo, unit="img", desc="encoding latents", dynamic_ncols=True, disable=not progress or not todo)
    ranges = [(lo, min(lo + batch_size, stop)) for start, stop in map(shards.item_range, pending) for lo in range(start, stop, batch_size)]
    if getattr(dataset, "streamed", False):
        from selfflow.data.loader import decoded_batches

        decoded = ((uint8_to_float(images.to(device)), labels) for images, labels in decoded_batches(dataset, [range(lo, hi) for lo, hi in ranges], num_workers))
    else:
        decoded = (dataset.get_batch(torch.arange(lo, hi), device=device) for lo, hi in ranges)
    for index in pending:
        start, stop = shards.item_range(index)
        parts, label_parts = [], []
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            x, labels = next(decoded)  # labels as decoded: a skipped unreadable image's stand-in brings its own
            label_parts.append(labels.cpu())
            mean, std = autoencoder.encode(x)
            if posterior == "sample":  # item k's noise from seed + k: the same whatever the batching
                noise = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(seed + k)) for k in range(lo, hi)])
                mean = mean + std * noise.to(mean.device)
            parts.append(mean.float().cpu())
            bar.update(hi - lo)
        latents = torch.cat(parts)
        if not torch.isfinite(latents).all():
            raise DataError(f"the autoencoder produced NaN or infinite latents for items {start}..{stop - 1}")
        path = shards.write(index, {"latents": latents.to(dtype), "labels": torch.cat(label_parts).to(torch.int64)})
        if on_shard is not None:
            on_shard(index, path)
    bar.close()
    return shards
