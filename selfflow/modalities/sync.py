"""Audio-video in sync: the digit appears in the clip when its name is spoken, and a measure of the offset.

The clip and the utterance span the same ``seconds`` (0.8 s): video frame k covers [k, k+1) · seconds / T,
audio frame f is centred on sample f · hop. Clip i draws its appearance frame a_i (from (seed, i) only);
frames before a_i are blank, and the utterance paired with it is shifted so that its first sound falls at
a_i · seconds / T (docs/modalities.md#audio-video-in-sync).

- :func:`appear_frames`, :func:`hide_before`, :func:`align_onsets`: make synchronised pairs;
- :func:`video_event_frames`, :func:`audio_onset_frames`, :func:`sync_offsets`: measure, on any pair
  (real or generated), the time between the digit's appearance and the word's start.
"""
from __future__ import annotations

import numpy as np
import torch

from selfflow.modalities.audio import SAMPLE_RATE, hop_length

SYNC_STREAM = 0x5943  # a third seed word, so the appearance draws are independent of the clip's own


def appear_frames(n: int, frames: int, seed: int) -> torch.Tensor:
    """(n,) int64: clip i's appearance frame, uniform in 1 … max(1, T // 2 − 1), from (seed, i) alone
    (1 … 3 for 8 frames: the word starts 0.1–0.3 s in and has room to finish)."""
    last = max(1, frames // 2 - 1)
    return torch.tensor([int(np.random.default_rng([seed, i, SYNC_STREAM]).integers(1, last + 1)) for i in range(n)],
                        dtype=torch.int64)


def hide_before(videos: torch.Tensor, appear: torch.Tensor) -> torch.Tensor:
    """Videos (n, C, T, H, W) with frames t < appear[i] set to the background (0 for uint8, −1 for float)."""
    T = videos.shape[2]
    hidden = torch.arange(T)[None, :] < appear[:, None]  # (n, T)
    background = 0 if videos.dtype == torch.uint8 else -1.0
    return videos.masked_fill(hidden[:, None, :, None, None].to(videos.device), background)


def onset_samples(waves: torch.Tensor) -> torch.Tensor:
    """(n,) int64: each wave's first non-zero sample (an utterance is placed in a zero window), its length if silent."""
    loud = waves != 0
    return torch.where(loud.any(1), loud.float().argmax(1), torch.full((waves.shape[0],), waves.shape[1]))


def align_onsets(waves: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Waves (n, samples) shifted so that each one's first sound starts at ``targets[i]`` samples (zero-filled;
    what passes the window's end is cut)."""
    n, samples = waves.shape
    out = torch.zeros_like(waves)
    for i, (start, target) in enumerate(zip(onset_samples(waves).tolist(), targets.tolist())):
        length = min(samples - start, samples - target)
        out[i, target:target + length] = waves[i, start:start + length]
    return out


def video_event_frames(videos: torch.Tensor) -> torch.Tensor:
    """(n,) int64: the first frame whose mean intensity reaches half of the clip's brightest frame's
    (videos (n, 1, T, H, W) float in [−1, 1])."""
    brightness = ((videos.float() + 1) / 2).clamp(0, 1).mean(dim=(1, 3, 4))  # (n, T)
    return (brightness >= 0.5 * brightness.amax(1, keepdim=True)).float().argmax(1)


def audio_onset_frames(mels: torch.Tensor) -> torch.Tensor:
    """(n,) int64: the first frame whose loudest band is past half-way from the clip's quietest frame to its
    loudest (log-mel (n, 1, n_mels, frames) in [−1, 1], so half-way in dB)."""
    level = mels.float().amax(dim=(1, 2))  # (n, frames)
    low, high = level.amin(1, keepdim=True), level.amax(1, keepdim=True)
    return (level >= (low + high) / 2).float().argmax(1)


def sync_offsets(videos: torch.Tensor, mels: torch.Tensor, seconds: float) -> torch.Tensor:
    """(n,) seconds from the word's start to the digit's appearance: k · seconds / T − f · hop / 16000, with k
    :func:`video_event_frames` and f :func:`audio_onset_frames`; 0 for a pair in sync, up to the detectors'
    resolution (one video frame, one hop)."""
    frames, audio_frames = videos.shape[2], mels.shape[-1]
    hop = hop_length(round(seconds * SAMPLE_RATE), audio_frames)
    video_time = video_event_frames(videos).double() * seconds / frames
    audio_time = audio_onset_frames(mels).double() * hop / SAMPLE_RATE
    return (video_time - audio_time).float()


def sync_measures(videos: torch.Tensor, mels: torch.Tensor, seconds: float) -> dict:
    """``sync_offset``: mean |offset| (s); ``sync_rate``: the fraction of pairs within half a video frame
    (0.05 s at 8 frames; synchronised real pairs: all, pairs shuffled: about a third)."""
    offsets = sync_offsets(videos, mels, seconds).abs()
    return {"sync_offset": float(offsets.mean()),
            "sync_rate": float((offsets <= seconds / videos.shape[2] / 2).float().mean())}
