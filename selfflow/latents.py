"""Latent data: encode images once with a local autoencoder, then train on the stored latents.

The ImageNet-256 recipe of DiT/SiT/REPA/Self-Flow trains on Stable Diffusion VAE latents
(32×32×4 for 256×256 images, patch 2 → 256 tokens). Here that is two commands::

    selfflow encode-latents --data folder --data-path imagenet/train --image-size 256 \\
        --autoencoder sd-vae-ft-ema/ --out latents/imagenet256
    selfflow train --config configs/imagenet256_latents_self_flow.yaml

Autoencoders (:func:`load_autoencoder`, a local folder; nothing is downloaded):

``diffusers``  a diffusers ``AutoencoderKL`` folder (``config.json`` with ``"_class_name":
               "AutoencoderKL"`` and safetensors weights), e.g. sd-vae-ft-ema. Needs the optional
               extra ``pip install "selfflow[latents]"``. Latent = ``scaling_factor · (z − shift_factor)``
               (0.18215 and 0 for the SD VAE), the convention the DiT/SiT line trains on.
``small``      :class:`SmallAutoencoder`, a few convolutions this project trains itself
               (:func:`train_small_autoencoder`); for CPU experiments and tests.

A latent set is a shard folder (:mod:`selfflow.shards`) whose ``set.json`` has ``"kind":
"latents"`` and names the autoencoder (kind, path, sha256 of its weights) and the data it
encoded; each shard holds ``latents`` float32/float16 (n, c, h, w) and ``labels`` int64 (n,).
Encoding is resumable like any shard set. ``posterior="sample"`` draws item k's latent from the
encoder's Gaussian with seed ``seed + k``; ``"mean"`` takes its mean.

:class:`LatentDataset` reads such a folder, or ``.npy`` files made by any other tool:
``latents.npy`` (N, c, h, w) with an optional ``labels.npy`` (N,) — or several
``latents_<part>.npy`` / ``labels_<part>.npy`` pairs — and an optional ``meta.json``
(``num_classes``, ``class_names``). Files are memory-mapped (safetensors shards through their JSON
header, ``.npy`` with ``mmap_mode="r"``, never with pickle), so eight training processes on a node
share one copy in the page cache; rows are read per batch. NaN or infinite values are refused at
load time, naming the file and row.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selfflow.checkpoint import read_json, sha256_file
from selfflow.data import DataError

AUTOENCODER_KINDS = ("small", "diffusers")
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64}


# --------------------------------------------------------------------------------------------
# autoencoders
# --------------------------------------------------------------------------------------------
@dataclass
class SmallAutoencoderConfig:
    in_channels: int = 1
    latent_channels: int = 4
    width: int = 32
    downsample: int = 2  # a power of two: 1, 2, 4, ...


class SmallAutoencoder(nn.Module):
    """A tiny Gaussian autoencoder: images (B, C, H, W) in [-1, 1] ↔ latents (B, c, H/f, W/f)."""

    kind = "small"

    def __init__(self, config: SmallAutoencoderConfig):
        super().__init__()
        if config.downsample < 1 or config.downsample & (config.downsample - 1):
            raise ValueError(f"downsample must be a power of two, got {config.downsample}")
        self.config = config
        w, levels = config.width, int(math.log2(config.downsample))
        encoder: list[nn.Module] = [nn.Conv2d(config.in_channels, w, 3, padding=1), nn.SiLU()]
        for _ in range(levels):
            encoder += [nn.Conv2d(w, w, 4, stride=2, padding=1), nn.SiLU()]
        encoder += [nn.Conv2d(w, 2 * config.latent_channels, 3, padding=1)]
        decoder: list[nn.Module] = [nn.Conv2d(config.latent_channels, w, 3, padding=1), nn.SiLU()]
        for _ in range(levels):
            decoder += [nn.ConvTranspose2d(w, w, 4, stride=2, padding=1), nn.SiLU()]
        decoder += [nn.Conv2d(w, config.in_channels, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*encoder), nn.Sequential(*decoder)
        self.scaling_factor = 1.0

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the latent Gaussian, each (B, c, h, w)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from selfflow.checkpoint import atomic_directory, save_tensors

        with atomic_directory(directory) as tmp:
            save_tensors(self.state_dict(), tmp / "model.safetensors")
            (tmp / "config.json").write_text(json.dumps({"autoencoder": asdict(self.config)}, indent=2))
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "SmallAutoencoder":
        from selfflow.checkpoint import load_tensors
        from selfflow.config import from_dict
        from selfflow.model import load_state_strict

        directory = Path(directory)
        meta = read_json(directory / "config.json")
        config = from_dict(SmallAutoencoderConfig, meta.get("autoencoder"), f"{directory / 'config.json'}:autoencoder")
        model = cls(config)
        load_state_strict(model, load_tensors(directory / "model.safetensors"), directory / "model.safetensors")
        return model.eval()

    def describe(self, directory: Optional[Path] = None) -> dict:
        out = {"kind": self.kind, "latent_channels": self.latent_channels, "downsample": self.downsample, "scaling_factor": 1.0}
        if directory is not None:
            out.update(path=str(Path(directory).resolve()), sha256=sha256_file(Path(directory) / "model.safetensors"))
        return out


class DiffusersAutoencoder(nn.Module):
    """A diffusers ``AutoencoderKL`` (local folder) behind the same encode/decode calls.

    Latents are ``scaling_factor · (z − shift_factor)``; decoding inverts that. Weights are read
    from safetensors only (``use_safetensors=True``), and nothing is fetched from the network.
    """

    kind = "diffusers"

    def __init__(self, directory: str | os.PathLike, dtype: torch.dtype = torch.float32):
        super().__init__()
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise DataError(f"{directory}: a diffusers AutoencoderKL folder needs the optional extra: pip install \"selfflow[latents]\"") from None
        self.directory = Path(directory)
        try:
            self.vae = AutoencoderKL.from_pretrained(str(self.directory), local_files_only=True, use_safetensors=True, torch_dtype=dtype)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise DataError(f"{self.directory}: cannot load the AutoencoderKL ({str(exc).splitlines()[0]})") from None
        self.vae.eval().requires_grad_(False)
        config = self.vae.config
        self.scaling_factor = float(getattr(config, "scaling_factor", None) or 0.18215)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self.latent_channels = int(config.latent_channels)
        self.in_channels = int(config.in_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        mean = (posterior.mean.float() - self.shift_factor) * self.scaling_factor
        return mean, posterior.std.float() * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()

    def describe(self, directory: Optional[Path] = None) -> dict:
        weights = sorted(self.directory.glob("*.safetensors"))
        return {
            "kind": self.kind, "path": str(self.directory.resolve()), "latent_channels": self.latent_channels,
            "downsample": self.downsample, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
            "sha256": sha256_file(weights[0]) if weights else None,
        }


def load_autoencoder(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """A :class:`SmallAutoencoder` or :class:`DiffusersAutoencoder` from a local folder."""
    directory = Path(directory)
    config_file = directory / "config.json"
    meta = read_json(config_file, DataError, missing="not an autoencoder folder (no config.json)")
    if "autoencoder" in meta:
        return SmallAutoencoder.from_pretrained(directory).to(device)
    if meta.get("_class_name") == "AutoencoderKL":
        return DiffusersAutoencoder(directory).to(device)
    raise DataError(f"{config_file}: neither a selfflow autoencoder nor a diffusers AutoencoderKL (_class_name)")


def train_small_autoencoder(dataset, config: SmallAutoencoderConfig, steps: int = 500, batch_size: int = 64, lr: float = 2e-3,
                            kl_weight: float = 1e-4, seed: int = 0, device: str | torch.device = "cpu") -> SmallAutoencoder:
    """Fit a :class:`SmallAutoencoder` to ``dataset`` (reconstruction MSE + a small KL to N(0, I))."""
    torch.manual_seed(seed)
    model = SmallAutoencoder(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(dataset), (batch_size,), generator=generator)
        x, _labels = dataset.get_batch(index, device=device)
        mean, std = model.encode(x)
        z = mean + std * torch.randn(mean.shape, generator=generator).to(device)
        reconstruction = F.mse_loss(model.decode(z), x)
        kl = 0.5 * (mean.pow(2) + std.pow(2) - 2 * torch.log(std) - 1).mean()
        loss = reconstruction + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


# --------------------------------------------------------------------------------------------
# encoding a data set
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_dataset(dataset, autoencoder, folder: str | os.PathLike, *, autoencoder_dir: Optional[str | os.PathLike] = None,
                   shard_size: int = 10000, batch_size: int = 64, posterior: str = "mean", seed: int = 0,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", on_shard=None):
    """Encode every image of ``dataset`` into a latent shard set in ``folder`` (resumable)."""
    from selfflow.shards import ShardSet

    if posterior not in ("mean", "sample"):
        raise ValueError(f"posterior must be mean or sample, got {posterior!r}")
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
        "data": {"name": dataset.name, "source": dataset.source, "split": dataset.split, "image_shape": list(dataset.shape)},
        "autoencoder": autoencoder.describe(Path(autoencoder_dir) if autoencoder_dir is not None else None),
    }
    shards = ShardSet.create_or_resume(folder, manifest)
    autoencoder.eval()
    for index in shards.pending():
        start, stop = shards.item_range(index)
        parts = []
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            x, _ = dataset.get_batch(torch.arange(lo, hi), device=device)
            mean, std = autoencoder.encode(x)
            if posterior == "sample":  # item k's noise from seed + k: the same whatever the batching
                noise = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(seed + k)) for k in range(lo, hi)])
                mean = mean + std * noise.to(mean.device)
            parts.append(mean.float().cpu())
        latents = torch.cat(parts)
        if not torch.isfinite(latents).all():
            raise DataError(f"the autoencoder produced NaN or infinite latents for items {start}..{stop - 1}")
        path = shards.write(index, {"latents": latents.to(dtype), "labels": dataset.labels[start:stop].clone()})
        if on_shard is not None:
            on_shard(index, path)
    return shards


# --------------------------------------------------------------------------------------------
# reading latents
# --------------------------------------------------------------------------------------------
def _memmap_safetensors(path: Path, key: str) -> np.ndarray:
    """A read-only numpy view of one tensor of a safetensors file, through its JSON header."""
    try:
        with open(path, "rb") as handle:
            size_bytes = handle.read(8)
            if len(size_bytes) != 8:
                raise ValueError("shorter than a header")
            header_size = int.from_bytes(size_bytes, "little")
            if header_size > 100_000_000:
                raise ValueError(f"header of {header_size} bytes")
            header = json.loads(handle.read(header_size))
        entry = header[key]
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise ValueError("offsets do not match the shape")
        if 8 + header_size + end > path.stat().st_size:
            raise ValueError("file shorter than its header says")
        return np.memmap(path, dtype=dtype, mode="r", offset=8 + header_size + begin, shape=shape)
    except KeyError as exc:
        raise DataError(f"{path}: no tensor {exc} (or an unsupported dtype: latents float32/float16, labels int64)") from None
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path}: not a readable safetensors shard ({exc}); truncated or corrupt?") from None


class LatentDataset:
    """Latents (N, c, h, w) and labels (N,), read row by row from memory-mapped files.

    Quacks like :class:`selfflow.data.ImageDataset` for the trainer (``get_batch``, ``channels``,
    ``image_size``, ``num_classes``), except that values are latents, not pixels in [-1, 1].
    """

    is_latent = True
    name = "latents"

    def __init__(self, parts: Sequence[tuple[Path, np.ndarray]], labels: torch.Tensor, num_classes: int,
                 source: str, class_names: Optional[list[str]] = None, manifest: Optional[dict] = None, split: str = "train"):
        self.parts = [array for _, array in parts]
        self.files = [file for file, _ in parts]
        shapes = {tuple(a.shape[1:]) for a in self.parts}
        if len(shapes) != 1:
            raise DataError(f"{source}: latent files have different shapes {sorted(shapes)}")
        (shape,) = shapes
        if len(shape) != 3 or shape[1] != shape[2]:
            raise DataError(f"{source}: latents must be (N, c, h, h), got (N, {', '.join(map(str, shape))})")
        self.offsets = np.cumsum([0] + [len(a) for a in self.parts])
        self.labels = labels
        if len(labels) != self.offsets[-1]:
            raise DataError(f"{source}: {self.offsets[-1]} latents but {len(labels)} labels")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= max(num_classes, 1)):
            raise DataError(f"{source}: labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
        self.num_classes = int(num_classes)
        self.source = source
        self.class_names = class_names
        self.manifest = manifest or {}
        self.split = split
        self._shape = shape

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"LatentDataset(n={len(self)}, shape={self.shape}, num_classes={self.num_classes}, source={self.source!r})"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self._shape)

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def image_size(self) -> int:
        return self.shape[1]

    def check_finite(self, chunk: int = 4096) -> None:
        """Refuse NaN or infinite values, naming the file and the first bad row."""
        for file, array in zip(self.files, self.parts):
            for lo in range(0, len(array), chunk):
                block = np.asarray(array[lo:lo + chunk])
                finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
                if not finite.all():
                    row = lo + int(np.argmin(finite))
                    raise DataError(f"{file}: NaN or infinite value in row {row}")

    def get_batch(self, indices, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, c, h, w) float32 and labels (B,) int64."""
        index = torch.as_tensor(indices, dtype=torch.int64).numpy()
        out = np.empty((len(index), *self._shape), dtype=np.float32)
        part = np.searchsorted(self.offsets, index, side="right") - 1
        for p in np.unique(part):
            rows = np.nonzero(part == p)[0]
            out[rows] = self.parts[p][index[rows] - self.offsets[p]]
        latents = torch.from_numpy(out)
        labels = self.labels[torch.as_tensor(index)]
        if device is not None:
            latents, labels = latents.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        return latents, labels

    def decoder(self, device: str | torch.device = "cpu"):
        """The autoencoder's ``decode`` if the folder it was made with is still there and unchanged."""
        info = self.manifest.get("autoencoder") or {}
        path = info.get("path")
        if not path or not Path(path).is_dir():
            return None
        try:
            autoencoder = load_autoencoder(path, device)
            if info.get("sha256") and autoencoder.describe(Path(path)).get("sha256") != info["sha256"]:
                return None
        except DataError:
            return None
        return autoencoder.decode


def load_latents(path: str | os.PathLike, split: str = "train", verify: bool = True) -> LatentDataset:
    """A latent shard set (``set.json``) or a folder of ``.npy`` files; see the module docstring."""
    from selfflow.shards import MANIFEST, ShardSet

    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: latent folder not found")
    if (folder / MANIFEST).is_file():
        shards = ShardSet.open(folder)
        if shards.manifest.get("kind") != "latents":
            raise DataError(f"{folder / MANIFEST}: a {shards.manifest.get('kind')!r} set, not latents")
        missing = shards.pending()
        if missing:
            raise DataError(f"{folder}: latent set is incomplete ({len(missing)} of {shards.num_shards} shards missing); "
                            "run the same encode-latents command again to finish it")
        parts = [(shards.path(i), _memmap_safetensors(shards.path(i), "latents")) for i in range(shards.num_shards)]
        labels = torch.cat([torch.from_numpy(np.array(_memmap_safetensors(shards.path(i), "labels"))) for i in range(shards.num_shards)])
        for file, array in parts:
            if array.dtype.kind != "f":
                raise DataError(f"{file}: latents have dtype {array.dtype}; expected floating point")
        m = shards.manifest
        dataset = LatentDataset(parts, labels.to(torch.int64), int(m.get("num_classes") or 1), str(folder), m.get("class_names"), m, split)
    else:
        dataset = _load_npy_folder(folder, split)
    if verify:
        dataset.check_finite()
    return dataset


def _load_npy(file: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{file}: cannot read as .npy without pickle ({exc})") from None


def _load_npy_folder(folder: Path, split: str) -> LatentDataset:
    latent_files = sorted(folder.glob("latents*.npy"))
    if not latent_files:
        raise DataError(f"{folder}: no set.json and no latents*.npy files")
    parts, labels = [], []
    for file in latent_files:
        array = _load_npy(file, mmap=True)
        if array.dtype not in (np.float32, np.float16, np.float64):
            raise DataError(f"{file}: dtype {array.dtype}; latents must be floating point")
        if array.ndim != 4:
            raise DataError(f"{file}: shape {array.shape}; expected (N, c, h, w)")
        parts.append((file, array))
        label_file = file.with_name("labels" + file.name[len("latents"):])
        if label_file.is_file():
            raw = _load_npy(label_file, mmap=False)
            if raw.dtype.kind not in "iu" or raw.shape != (len(array),):
                raise DataError(f"{label_file}: expected {len(array)} integer labels, got dtype {raw.dtype} shape {raw.shape}")
            labels.append(torch.from_numpy(raw.astype(np.int64)))
        else:
            labels.append(torch.zeros(len(array), dtype=torch.int64))
    all_labels = torch.cat(labels)
    meta = read_json(folder / "meta.json", DataError) if (folder / "meta.json").is_file() else {}
    num_classes = int(meta.get("num_classes") or (int(all_labels.max()) + 1 if len(all_labels) else 1))
    return LatentDataset(parts, all_labels, num_classes, str(folder), meta.get("class_names"), meta, split)


# --------------------------------------------------------------------------------------------
# samples of a latent model
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_latents(model, seeds: Sequence[int], labels: Optional[torch.Tensor], *, sampler: str = "euler", steps: int = 50,
                   cfg_scale: float = 1.0, batch_size: int = 64, device: str | torch.device = "cpu") -> torch.Tensor:
    """Latents (N, c, h, w) from ``model``, item k from seed ``seeds[k]``, not clipped.

    :func:`selfflow.sampling.generate` clips to the pixel range [-1, 1], which latents exceed;
    this runs the same samplers with the same per-item noise, without the clip.
    """
    from selfflow.sampling import GuidedVelocity, get_sampler, time_grid

    num_classes = int(getattr(model, "num_classes", 0) or 0)
    velocity = GuidedVelocity(model, cfg_scale, null_label=num_classes) if num_classes else model
    sample_fn, times = get_sampler(sampler), time_grid(steps)
    shape = (model.in_channels, model.image_size, model.image_size)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for lo in range(0, len(seeds), batch_size):
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds[lo:lo + batch_size]]
            x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
            y = None if labels is None else labels[lo:lo + batch_size].to(device)
            chunks.append(sample_fn(velocity, x, times, y=y, generator=generators).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def write_latent_samples(model, dataset: LatentDataset, n: int, sample_config, device, base: Path) -> Path:
    """``<base>.safetensors`` with the sampled latents; ``<base>.png`` too when the autoencoder is at hand."""
    from selfflow.checkpoint import save_tensors

    seeds = list(range(n))
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    labels = torch.tensor(seeds, dtype=torch.int64) % num_classes if num_classes else None
    latents = sample_latents(model, seeds, labels, sampler=sample_config.sampler, steps=sample_config.steps,
                             cfg_scale=sample_config.cfg_scale, batch_size=min(sample_config.batch_size, n), device=device)
    base.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"latents": latents, "seeds": torch.tensor(seeds, dtype=torch.int64)}
    if labels is not None:
        tensors["labels"] = labels
    save_tensors(tensors, base.with_suffix(".safetensors"))
    decode = dataset.decoder(device)
    if decode is None:
        return base.with_suffix(".safetensors")
    from selfflow.imageio import save_grid

    images = decode(latents.to(device)).float().clamp(-1, 1).cpu()
    return save_grid(images, base.with_suffix(".png"), nrow=int(math.sqrt(n)) or None)
