"""Moving digits: short clips of digits bouncing in a square frame, generated from a seed.

The video modality's data (docs/modalities_video.md). Each digit is a source image (MNIST or
scikit-learn digits) resized to ``digit_size`` and moved on the straight line
``p(t) = p0 + v·t``, folded back into ``[0, L]`` (``L = size − digit_size``) at each wall, which
is an elastic bounce. Positions are continuous; a digit is drawn at its sub-pixel position by a
2×2 bilinear splat, which conserves its pixel mass and moves its centroid by exactly the
position, so the clips' motion can be checked to the pixel (tests/test_modality_video.py).

Clip ``i`` depends only on ``(seed, i)`` and the arguments, never on ``n``: a set of 1,000 clips
is the first 1,000 of a set of 10,000. Also here: the float/uint8 conversion of videos, their
centroid trajectories, and GIF / PNG strips of them for reports.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from selfflow.errors import DataError
from selfflow.files import atomic_file
from selfflow.imageio import to_uint8, uint8_to_float

MIN_SPEED, MAX_SPEED = 1.0, 3.0   # pixels per frame
CHUNK = 1024                      # clips rendered at once (bounds memory: CHUNK·frames·size² floats)
PAD_VALUE = 128                   # grey lines between the tiles of a GIF or strip


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------
def check_videos(videos: torch.Tensor, name: str = "videos") -> torch.Tensor:
    """``videos`` as a tensor (n, 1, frames, H, W), uint8 or float; else a DataError naming it."""
    videos = torch.as_tensor(videos)
    if videos.ndim != 5 or videos.shape[1] != 1 or videos.shape[0] < 1:
        raise DataError(f"{name} must be (n >= 1, 1, frames, H, W), got shape {tuple(videos.shape)}")
    if videos.dtype != torch.uint8 and not videos.is_floating_point():
        raise DataError(f"{name} must be uint8 or float, got {videos.dtype}")
    return videos


def _check_sources(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1 or images.shape[0] < 1:
        raise DataError(f"images must be uint8 (M >= 1, 1, h, w), got {images.dtype} {tuple(images.shape)}")
    if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
        raise DataError(f"labels must be int64 ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
    return images, labels


def _check_counts(n: int, frames: int, size: int, digits_per_clip: int, seed: int, digit_size: int) -> None:
    for name, value, low in (("n", n, 1), ("frames", frames, 2), ("digits_per_clip", digits_per_clip, 1),
                             ("digit_size", digit_size, 1), ("seed", seed, 0)):
        if int(value) != value or value < low:
            raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
    if size <= digit_size:
        raise DataError(f"size must exceed digit_size ({digit_size}) so that the digit can move, got {size}")


# --------------------------------------------------------------------------------------------
# motion
# --------------------------------------------------------------------------------------------
def fold(x: np.ndarray, length: float) -> np.ndarray:
    """Reflect ``x`` into ``[0, length]``: the position of a point bouncing elastically between walls.

    ``u = x mod 2L``; ``fold(x) = u`` if ``u <= L`` else ``2L − u`` (a triangle wave of period 2L).
    """
    u = np.mod(x, 2.0 * length)
    return np.where(u <= length, u, 2.0 * length - u)


def _clip_plan(seed: int, index: int, sources: int, frames: int, digits: int, room: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (digits,) and top-left positions (digits, frames, 2) of clip ``index``.

    Its generator is seeded with ``(seed, index)`` alone, so the clip does not depend on n.
    """
    rng = np.random.default_rng([seed, index])
    chosen = rng.integers(0, sources, size=digits)
    start = rng.uniform(0.0, room, size=(digits, 1, 2))
    speed = rng.uniform(MIN_SPEED, MAX_SPEED, size=(digits, 1, 1))
    angle = rng.uniform(0.0, 2.0 * math.pi, size=(digits, 1, 1))
    velocity = speed * np.concatenate([np.sin(angle), np.cos(angle)], axis=-1)   # (y, x)
    t = np.arange(frames, dtype=np.float64)[None, :, None]
    return chosen, fold(start + velocity * t, float(room))


# --------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------
def _splat(digits: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Bilinear splat: digits (B, d, d) shifted by fractional offsets (B, 2) in [0, 1] → (B, d+1, d+1).

    The four shifted copies are weighted (1−fy)(1−fx), (1−fy)fx, fy(1−fx), fy·fx; the weights sum
    to 1, so the mass is kept and the centroid moves by exactly (fy, fx).
    """
    b, d, _ = digits.shape
    fy, fx = offset[:, 0, None, None], offset[:, 1, None, None]
    out = digits.new_zeros(b, d + 1, d + 1)
    out[:, :d, :d] += (1 - fy) * (1 - fx) * digits
    out[:, :d, 1:] += (1 - fy) * fx * digits
    out[:, 1:, :d] += fy * (1 - fx) * digits
    out[:, 1:, 1:] += fy * fx * digits
    return out


def _draw(digits: torch.Tensor, positions: torch.Tensor, size: int) -> torch.Tensor:
    """Frames (B, size, size) with digit b's top-left corner at positions[b] (y, x) in [0, size − d]."""
    b, d, _ = digits.shape
    corner = positions.floor().clamp(max=size - d - 1).to(torch.int64)   # the splat needs one more pixel
    patch = _splat(digits, positions - corner)
    span = torch.arange(d + 1)
    rows = (corner[:, 0, None] + span)[:, :, None]
    cols = (corner[:, 1, None] + span)[:, None, :]
    frames = digits.new_zeros(b, size, size)
    frames[torch.arange(b)[:, None, None], rows, cols] = patch
    return frames


def _resized(images: torch.Tensor, digit_size: int) -> torch.Tensor:
    """uint8 (k, 1, h, w) → float32 (k, digit_size, digit_size) in 0..255, bilinear with antialias."""
    x = images.to(torch.float32)
    if x.shape[-2:] != (digit_size, digit_size):
        x = F.interpolate(x, size=(digit_size, digit_size), mode="bilinear", align_corners=False,
                          antialias=True).clamp_(0, 255)
    return x[:, 0]


def _render(digits: torch.Tensor, positions: torch.Tensor, size: int) -> torch.Tensor:
    """digits (B, k, d, d) float, positions (B, k, T, 2) → uint8 videos (B, 1, T, size, size), max-composed."""
    b, k, d, _ = digits.shape
    frames = positions.shape[2]
    flat = digits[:, :, None].expand(b, k, frames, d, d).reshape(-1, d, d)
    drawn = _draw(flat, positions.reshape(-1, 2), size).view(b, k, frames, size, size)
    return drawn.amax(dim=1).round_().clamp_(0, 255).to(torch.uint8)[:, None]


def moving_digits(images: torch.Tensor, labels: torch.Tensor, n: int, *, frames: int = 8, size: int = 32,
                  digits_per_clip: int = 1, seed: int = 0, digit_size: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips of digits bouncing in a size×size frame.

    images: uint8 (M, 1, h, w) source digits (MNIST 28×28 or scikit-learn digits 8×8, as the
    selfflow.data loaders give them); labels: int64 (M,). Returns videos uint8
    (n, 1, frames, size, size) and labels int64 (n,), the class of each clip's first digit.

    Clip i comes from its own generator seeded with (seed, i): the same arguments give the same
    bytes, and clip i does not depend on n. Each digit: resized to ``digit_size`` (default
    size // 2; bilinear with antialias), a uniform start position with the digit fully inside the
    frame, a uniform speed in [1, 3] px/frame in a uniform direction, bouncing off the walls
    (:func:`fold`); several digits are composed with max(). Pixels in 0..255.
    """
    images, labels = _check_sources(images, labels)
    digit_size = size // 2 if digit_size is None else digit_size
    _check_counts(n, frames, size, digits_per_clip, seed, digit_size)
    room = size - digit_size
    videos = torch.empty((n, 1, frames, size, size), dtype=torch.uint8)
    first = torch.empty(n, dtype=torch.int64)
    for start in range(0, n, CHUNK):
        plans = [_clip_plan(seed, i, images.shape[0], frames, digits_per_clip, room)
                 for i in range(start, min(n, start + CHUNK))]
        chosen = torch.from_numpy(np.stack([c for c, _ in plans]))                    # (B, k)
        positions = torch.from_numpy(np.stack([p for _, p in plans])).to(torch.float32)  # (B, k, T, 2)
        digits = _resized(images[chosen.reshape(-1)], digit_size).view(*chosen.shape, digit_size, digit_size)
        videos[start:start + len(plans)] = _render(digits, positions, size)
        first[start:start + len(plans)] = labels[chosen[:, 0]]
    return videos, first


# --------------------------------------------------------------------------------------------
# conversions and trajectories
# --------------------------------------------------------------------------------------------
def video_to_float(videos_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 videos 0..255 → float32 in [−1, 1] (``u / 127.5 − 1``, as images)."""
    videos = check_videos(videos_uint8, "videos_uint8")
    if videos.dtype != torch.uint8:
        raise DataError(f"videos_uint8 must be uint8, got {videos.dtype}")
    return uint8_to_float(videos)


def video_to_uint8(videos_float: torch.Tensor) -> torch.Tensor:
    """Float videos in [−1, 1] → uint8 0..255, clamped and rounded (as images), on the CPU."""
    videos = check_videos(videos_float, "videos_float")
    if not videos.is_floating_point():
        raise DataError(f"videos_float must be float, got {videos.dtype}")
    return to_uint8(videos)


def intensity(videos: torch.Tensor) -> torch.Tensor:
    """Videos as float32 intensities in [0, 1]: uint8 / 255, or float mapped from [−1, 1] and clamped."""
    videos = check_videos(videos)
    if videos.dtype == torch.uint8:
        return videos.to(torch.float32) / 255.0
    return ((videos.detach().to(torch.float32) + 1.0) / 2.0).clamp_(0.0, 1.0)


def trajectories(videos: torch.Tensor) -> torch.Tensor:
    """Intensity-weighted centroid (y, x) of each frame, in pixels: (n, frames, 2) float32, on the CPU.

    uint8 or float videos (float is mapped from [−1, 1] to [0, 1] first). A blank frame has no
    centroid; it is given the frame's centre, so a vanished digit reads as a jump.
    """
    x = intensity(videos)[:, 0].cpu().to(torch.float64)              # (n, T, H, W)
    h, w = x.shape[-2:]
    mass = x.sum(dim=(-2, -1))
    ys = torch.arange(h, dtype=torch.float64)
    xs = torch.arange(w, dtype=torch.float64)
    cy = (x.sum(dim=-1) * ys).sum(dim=-1) / mass
    cx = (x.sum(dim=-2) * xs).sum(dim=-1) / mass
    centre = torch.tensor([(h - 1) / 2.0, (w - 1) / 2.0], dtype=torch.float64)
    out = torch.stack([cy, cx], dim=-1)
    return torch.where((mass > 0)[..., None], out, centre).to(torch.float32)


# --------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------
def _tile(frames: np.ndarray, columns: int) -> np.ndarray:
    """uint8 (B, H, W) → one (rows·(H+1)−1, columns·(W+1)−1) picture, grey lines between tiles."""
    b, h, w = frames.shape
    rows = math.ceil(b / columns)
    grid = np.full((rows * (h + 1) - 1, columns * (w + 1) - 1), PAD_VALUE, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, columns)
        grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = frames[i]
    return grid


def _uint8_frames(videos_uint8: torch.Tensor) -> np.ndarray:
    """(n, 1, T, H, W) uint8 → numpy (n, T, H, W)."""
    videos = check_videos(videos_uint8, "videos_uint8")
    if videos.dtype != torch.uint8:
        raise DataError(f"videos_uint8 must be uint8, got {videos.dtype}; convert with video_to_uint8")
    return videos[:, 0].cpu().numpy()


def save_gif(videos_uint8: torch.Tensor, path: str | Path, *, columns: int | None = None,
             duration_ms: int = 120) -> Path:
    """One animated GIF (looping) of a grid of clips (n, 1, T, H, W): one grid per frame.

    ``columns``: clips per row (default ⌈√n⌉). Written atomically; greyscale, so the pixel values
    survive exactly. Pillow merges consecutive identical frames into one longer frame.
    """
    clips = _uint8_frames(videos_uint8)
    columns = columns or math.ceil(math.sqrt(clips.shape[0]))
    if columns < 1:
        raise DataError(f"columns must be >= 1, got {columns}")
    grids = [Image.fromarray(_tile(clips[:, t], columns), mode="L") for t in range(clips.shape[1])]
    path = Path(path)
    with atomic_file(path) as tmp:
        grids[0].save(tmp, format="GIF", save_all=True, append_images=grids[1:], duration=duration_ms, loop=0)
    return path


def save_frame_strip(videos_uint8: torch.Tensor, path: str | Path) -> Path:
    """A PNG with one row per clip and its frames left to right (for reports where GIFs do not play)."""
    clips = _uint8_frames(videos_uint8)
    n, t, h, w = clips.shape
    path = Path(path)
    with atomic_file(path) as tmp:
        Image.fromarray(_tile(clips.reshape(n * t, h, w), t), mode="L").save(tmp, format="PNG")
    return path
