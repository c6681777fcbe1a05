"""One image, decoded, made square: the crops the field uses, shared by training, encode-latents,
reference statistics and eval.

``center`` (the default for folders, WebDataset and Hugging Face sets)
    ADM's ``center_crop_arr`` (guided-diffusion, used by DiT, SiT, REPA): while the short side is at
    least twice the target, halve both sides with a box filter (``//2``); then one bicubic resize
    that brings the short side to ``size`` (each side ``round(side · size / short)``); then the
    central ``size × size`` window, offset ``(side − size) // 2``.
``random``
    ADM's ``random_crop_arr`` plus a horizontal flip: the short side is first brought to a size
    drawn uniformly from ``[ceil(size / 1.0), ceil(size / 0.8)]`` (box halving, then bicubic, as
    above), a ``size × size`` window is taken at a uniform random offset, and the result is
    mirrored with probability 1/2. The draw comes from a per-image seed, so a resumed run sees
    the same crops.
``resize``
    squash the whole image to ``size × size`` (bilinear; PIL antialiases when shrinking): the
    aspect ratio is lost. The behaviour before crops existed.
"""
from __future__ import annotations

import math

import numpy as np

CROPS = ("center", "resize", "random")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
RANDOM_CROP_FRACTIONS = (0.8, 1.0)  # ADM's min_crop_frac, max_crop_frac


def to_mode(picture, mode: str):
    """Convert a PIL image to L or RGB; 16-bit and float grey are scaled, not clipped; alpha is dropped."""
    from PIL import Image

    if picture.mode in ("I", "I;16", "F"):
        array = np.asarray(picture, dtype=np.float64)
        top = 65535.0 if picture.mode != "F" or array.max() > 1.0 else 1.0
        picture = Image.fromarray(np.rint(np.clip(array / top, 0, 1) * 255).astype(np.uint8))
    if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
        picture = picture.convert("RGBA").convert("RGB")  # drop alpha, keep the colours
    return picture if picture.mode == mode else picture.convert(mode)  # convert() to the same mode copies every pixel


def _shrink(picture, short_target: int):
    """Box-halve while the short side is ≥ 2 × target, then bicubic to a short side of ``short_target``."""
    from PIL import Image

    while min(picture.size) >= 2 * short_target:
        picture = picture.resize(tuple(side // 2 for side in picture.size), resample=Image.Resampling.BOX)
    scale = short_target / min(picture.size)
    size = tuple(round(side * scale) for side in picture.size)
    return picture if size == picture.size else picture.resize(size, resample=Image.Resampling.BICUBIC)


def center_crop(picture, size: int) -> np.ndarray:
    """ADM's centre crop of a PIL image to ``(size, size[, C])`` uint8 (see the module docstring)."""
    array = np.asarray(_shrink(picture, size))
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


def random_crop(picture, size: int, rng: np.random.Generator) -> np.ndarray:
    """ADM's random crop (short side drawn in [size/1.0, size/0.8]) and a horizontal flip with p = 1/2."""
    low_frac, high_frac = RANDOM_CROP_FRACTIONS
    short = int(rng.integers(math.ceil(size / high_frac), math.ceil(size / low_frac) + 1))
    array = np.asarray(_shrink(picture, short))
    top = int(rng.integers(0, array.shape[0] - size + 1))
    left = int(rng.integers(0, array.shape[1] - size + 1))
    array = array[top:top + size, left:left + size]
    return array[:, ::-1] if rng.random() < 0.5 else array


def prepare_image(picture, size: int | None, crop: str, channels: int, seed: int | None = None) -> np.ndarray:
    """A decoded PIL image as uint8 ``(C, H, W)``: channel conversion, then the crop to ``size``.

    ``size`` None keeps the image's own size (the caller checked that every image has it).
    ``seed`` draws the ``random`` crop; the other crops ignore it.
    """
    from PIL import Image

    picture = to_mode(picture, "L" if channels == 1 else "RGB")
    if size is None:
        array = np.asarray(picture)
    elif crop == "center":
        array = center_crop(picture, size)
    elif crop == "random":
        array = random_crop(picture, size, np.random.default_rng(seed))
    elif crop == "resize":
        if picture.size != (size, size):
            picture = picture.resize((size, size), Image.Resampling.BILINEAR)
        array = np.asarray(picture)
    else:
        raise ValueError(f"unknown crop {crop!r}; choose one of {', '.join(CROPS)}")
    array = array.reshape(array.shape[0], array.shape[1], channels)
    return np.ascontiguousarray(array.transpose(2, 0, 1))
