"""The FD_dom feature network: a small CNN classifier trained on the data set itself.

FD_dom (docs/methods.md#evaluation) is the Fréchet distance between the penultimate features
(B, 128) of this classifier on generated and on real images. It is cheap on a CPU and, unlike the
Inception network, it has seen the domain (digits look nothing like ImageNet). The same network
also measures class-conditional accuracy: how often a sample generated for label y is classified
as y.

Architecture (for 1- or 3-channel images of 8..64 pixels a side)::

    3 × [conv3×3 → GroupNorm → SiLU → conv3×3 → GroupNorm → SiLU], 2×2 average pool between
    blocks → global average pool → features (B, 128) → Linear → logits (B, num_classes)

``train_on_dataset`` trains one on an image data set and saves it; ``feature_net_for`` is the
cached FD_dom network of a named data set (trained once). ``selfflow eval train-feature-net``
is the command for both the FD_dom network and REPA's small CNN encoder.

Saved as a folder, like every selfflow checkpoint: ``model.safetensors`` + ``config.json``,
written to a temporary folder and renamed into place; nothing is pickled.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save

from selfflow.files import atomic_directory, read_json, sha256_file, write_json

from .features import progress_bar

logger = logging.getLogger(__name__)

FORMAT = "selfflow.feature_net/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class FeatureNetConfig:
    in_channels: int
    num_classes: int
    image_size: int                      # square images, 8..64
    widths: tuple[int, ...] = (32, 64, 128, 128)  # last width = feature dimension

    def __post_init__(self) -> None:
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if not 8 <= self.image_size <= 64:
            raise ValueError(f"image_size must be in 8..64, got {self.image_size}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be ≥ 2, got {self.num_classes}")
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    @classmethod
    def from_dict(cls, data: dict) -> "FeatureNetConfig":
        known = {"in_channels", "num_classes", "image_size", "widths"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown feature-net config keys: {sorted(unknown)}")
        return cls(**data)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    groups = math.gcd(8, c_out)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU(),
    )


class FeatureNet(nn.Module):
    def __init__(self, config: FeatureNetConfig) -> None:
        super().__init__()
        self.config = config
        blocks, c_in = [], config.in_channels
        for width in config.widths:
            blocks.append(_conv_block(c_in, width))
            c_in = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        if images.ndim != 4 or images.shape[1] != c.in_channels or images.shape[-2:] != (c.image_size, c.image_size):
            raise ValueError(f"feature net expects images (B, {c.in_channels}, {c.image_size}, {c.image_size}), "
                             f"got {tuple(images.shape)}")
        return images.to(self.device, torch.float32)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [−1, 1] → penultimate features (B, feature_dim)."""
        x = self._check(images)
        for i, block in enumerate(self.blocks):
            if i > 0 and min(x.shape[-2:]) >= 2:
                x = F.avg_pool2d(x, 2)
            x = block(x)
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self.head(self.features(images))

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Predicted labels (N,) int64 on the CPU."""
        was_training = self.training
        self.eval()
        try:
            return torch.cat([self(images[i:i + batch_size]).argmax(1).cpu()
                              for i in range(0, images.shape[0], batch_size)])
        finally:
            self.train(was_training)

    def weights_sha256(self) -> str:
        """sha256 of the safetensors serialisation of the weights (= sha256 of model.safetensors)."""
        return hashlib.sha256(_serialise(self)).hexdigest()

    @property
    def key(self) -> dict:
        """What identifies this feature space in a cache key or a report."""
        return {
            "extractor": "selfflow-feature-net",
            "format": FORMAT,
            "config": _config_dict(self.config),
            "weights_sha256": self.weights_sha256(),
            "feature_dim": self.config.feature_dim,
        }


def _config_dict(config: FeatureNetConfig) -> dict:
    d = asdict(config)
    d["widths"] = list(d["widths"])
    return d


def _serialise(model: FeatureNet) -> bytes:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return save(state, metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [−max_shift, max_shift]², edges replicated."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).to(x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]      # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def train_feature_net(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                      steps: int | None = None, epochs: float | None = None, batch_size: int = 128,
                      lr: float = 3e-3, weight_decay: float = 1e-4, augment: bool = True,
                      widths: tuple[int, ...] = (32, 64, 128, 128), seed: int = 0,
                      device: str | torch.device = "cpu", log_every: int = 0, progress: bool = False) -> FeatureNet:
    """Train the classifier with AdamW and a warm-up + cosine schedule; return it in eval mode.

    images: (N, C, H, W) in [−1, 1]; labels: (N,) int64. Give ``steps`` or ``epochs`` (default
    1000 steps). Augmentation: random integer translations of up to H/8 pixels. The same seed
    and data give the same network on the same device. ``progress``: a bar over the steps.
    """
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    images = torch.as_tensor(images, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"images (N, C, H, W) and labels (N,) expected, got {tuple(images.shape)}, {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    n = images.shape[0]
    batch_size = min(batch_size, n)
    steps_per_epoch = max(1, n // batch_size)
    total = steps if steps is not None else (math.ceil(epochs * steps_per_epoch) if epochs is not None else 1000)
    if total < 1:
        raise ValueError("training needs at least one step")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError("square images expected")

    config = FeatureNetConfig(in_channels=images.shape[1], num_classes=num_classes,
                              image_size=images.shape[-1], widths=tuple(widths))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureNet(config)
    device = torch.device(device)
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)
    data, targets = images.to(device), labels.to(device)

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, total // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    max_shift = config.image_size // 8 if augment else 0
    order, position = torch.randperm(n, generator=generator), 0
    start = time.perf_counter()
    with _flush_denormals(device), progress_bar(total, "feature net", "step", progress) as bar:
        for step in range(total):
            if position + batch_size > n:
                order, position = torch.randperm(n, generator=generator), 0
            idx = order[position:position + batch_size].to(device)
            position += batch_size
            x = _random_shift(data[idx], max_shift, generator)
            loss = F.cross_entropy(model(x), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update(1)
            if log_every and (step + 1) % log_every == 0:
                logger.info("feature net step %d/%d loss %.4f (%.1f s)", step + 1, total, loss.item(),
                            time.perf_counter() - start)
    model.eval()
    model.training_info = {"steps": total, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                           "augment_max_shift": max_shift, "seed": seed, "train_count": n,
                           "train_seconds": round(time.perf_counter() - start, 3), "device": str(device)}
    return model


@contextlib.contextmanager
def _flush_denormals(device: torch.device) -> Iterator[None]:
    """Flush denormal floats to zero on the CPU while training.

    Near-constant inputs (the digits' zero background) drive some activations and Adam moments
    into denormal range, which made CPU training ten times slower. torch has no getter for the
    flag, so afterwards it is set back to its default (off).
    """
    flushing = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(False)


# --------------------------------------------------------------------------------------------
# evaluation helpers
# --------------------------------------------------------------------------------------------
@torch.inference_mode()
def conditional_accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor,
                         batch_size: int = 1000) -> tuple[float, dict[int, float]]:
    """Fraction of images classified as their label, overall and per class.

    images: (N, C, H, W); labels: (N,) the classes the images were generated for (or their true
    classes). Per-class accuracy is given only for classes present in ``labels``.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}")
    correct = net.predict(images, batch_size=batch_size) == labels
    per_class = {int(c): float(correct[labels == c].float().mean()) for c in labels.unique().tolist()}
    return float(correct.float().mean()), per_class


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def save_feature_net(model: FeatureNet, directory: str | Path, metadata: dict | None = None) -> Path:
    """Write ``directory/{model.safetensors, config.json}`` atomically (temp folder + rename)."""
    directory = Path(directory)
    payload = _serialise(model)
    info = dict(getattr(model, "training_info", {}) or {})
    info.update(metadata or {})
    config = {"format": FORMAT, "config": _config_dict(model.config),
              "weights_sha256": hashlib.sha256(payload).hexdigest(), "metadata": info}
    with atomic_directory(directory) as tmp:
        with open(tmp / WEIGHTS_FILE, "wb") as handle:  # the very bytes that weights_sha256 names
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        write_json(config, tmp / CONFIG_FILE)
    return directory


def load_feature_net(directory: str | Path, device: str | torch.device = "cpu") -> FeatureNet:
    """Load a folder written by ``save_feature_net``; checks format and weight hash; eval mode."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{directory} is not a feature-net folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    meta = read_json(config_path, ValueError)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    sha = sha256_file(weights_path)
    if meta.get("weights_sha256") not in (None, sha):
        raise ValueError(f"{weights_path}: sha256 {sha} differs from the {meta['weights_sha256']} in {config_path}")
    model = FeatureNet(FeatureNetConfig.from_dict(meta["config"]))
    state = load_file(str(weights_path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_path}: missing tensors {missing}, unexpected tensors {unexpected}")
    model.training_info = meta.get("metadata", {})
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# training on a data set, and the cached FD_dom network of a data set
# --------------------------------------------------------------------------------------------
FD_DOM_WIDTHS = FeatureNetConfig.__dataclass_fields__["widths"].default


def train_on_dataset(dataset, out: str | Path, *, steps: int = 2000, seed: int = 0,
                     widths: tuple[int, ...] = FD_DOM_WIDTHS, device: str | torch.device = "cpu",
                     test=None, metadata: dict | None = None, progress: bool = True) -> tuple[FeatureNet, Path]:
    """Train the classifier on every image of ``dataset`` (an ImageDataset) and save it to ``out``.

    ``test``: a held-out ImageDataset whose accuracy is recorded in the folder's metadata. The
    defaults are the FD_dom network's; REPA's encoder uses other widths and another seed
    (``selfflow.encoders.train_encoder``) so that it is not aligned to the features FD_dom measures.
    """
    images, labels = dataset.get_batch(torch.arange(len(dataset)))
    net = train_feature_net(images, labels, dataset.num_classes, steps=steps, seed=seed, widths=tuple(widths),
                            device=device, progress=progress)
    info = {"data": getattr(dataset, "name", None), "split": getattr(dataset, "split", None),
            "train_count": len(dataset), **(metadata or {})}
    if test is not None:
        xt, yt = test.get_batch(torch.arange(len(test)))
        info["test_accuracy"] = float((net.predict(xt) == yt).float().mean())
        print(f"feature net accuracy on {getattr(test, 'name', 'the')} test split: {info['test_accuracy']:.4f}")
    return net, save_feature_net(net, out, metadata=info)


def feature_net_for(name: str, path: str | None, device: str | torch.device, cache_dir: str | Path,
                    steps: int = 2000, out: str | Path | None = None, *, seed: int = 0,
                    widths: tuple[int, ...] = FD_DOM_WIDTHS, progress: bool = True,
                    data_options: dict | None = None) -> tuple[FeatureNet, Path]:
    """The FD_dom classifier of data set ``name``: loaded from ``cache_dir`` when it was trained
    before, else trained on the train split and saved there (or to ``out``, always trained).
    ``data_options``: ``load_dataset``'s image_size / crop / columns, as the reference set was read."""
    from selfflow.data import load_dataset

    data_options = {k: v for k, v in (data_options or {}).items() if v is not None}
    train = load_dataset(name, path=path, split="train", **data_options)
    widths = tuple(int(w) for w in widths)
    # The cache name carries everything that shapes the network: data, size, steps, architecture, seed.
    c, h, w = train.shape
    folder = Path(out) if out is not None else (
        Path(cache_dir) / "feature_nets"
        / f"{name}_{len(train)}_{c}x{h}x{w}{'_' + train.crop if getattr(train, 'crop', None) else ''}"
          f"_s{steps}_w{'-'.join(map(str, widths))}{f'_seed{seed}' if seed else ''}")
    if out is None and (folder / WEIGHTS_FILE).exists():
        return load_feature_net(folder, device), folder
    print(f"training the feature net on {name} train ({len(train)} images, {steps} steps) → {folder}")
    test = load_dataset(name, path=path, split="test", **data_options) if name in ("digits", "mnist") else None
    return train_on_dataset(train, folder, steps=steps, seed=seed, widths=widths, device=device, test=test,
                            progress=progress)
