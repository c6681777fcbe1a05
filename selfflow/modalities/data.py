"""The data set of a modality run, made deterministically from the ``modality`` section and ``data``.

=============  ==============================================  ====================================
kind           a sample x (what the flow generates)             its condition y
=============  ==============================================  ====================================
video          (1, T, S, S) moving digits in [-1, 1]            the digit's class (int64)
audio          (1, F, T') log-mel of a spoken digit in [-1, 1]  the spoken digit (int64)
audio_video    both, flattened and concatenated (Layout.join)   the digit, shown and spoken
actions        (2, H) the expert's next H actions in [-1, 1]    the observation (float32, OBS_DIM)
=============  ==============================================  ====================================

``split="train"`` uses the modality's ``seed`` and the source digits' train split; ``"test"`` uses
``seed + 1`` and the test split, so that evaluation compares samples with clips never trained on.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from selfflow.config import ModalityConfig, RunConfig
from selfflow.errors import DataError
from selfflow.files import cache_root
from selfflow.modalities.tokens import Layout, Part

log = logging.getLogger("selfflow")

AUDIO_SECONDS = 0.8  # the window every utterance is placed in
AUDIO_POOL = 200  # audio_video: utterances drawn at least, so that every digit has some to pair with


def layout_for(modality: ModalityConfig) -> Layout:
    """The token layout of a modality's samples (docs/modalities.md#tokens)."""
    m = modality
    video = Part("video", (1, m.frames, m.frame_size, m.frame_size), (m.video_patch_frames, m.video_patch, m.video_patch))
    audio = Part("audio", (1, m.n_mels, m.audio_frames), (m.audio_patch_mels, m.audio_patch_frames))
    if m.kind == "video":
        return Layout((video,))
    if m.kind == "audio":
        return Layout((audio,))
    if m.kind == "audio_video":  # both span the same 0.8 s: one time axis (tokens.sincos_shared_time)
        return Layout((dataclasses.replace(video, time_axis=0), dataclasses.replace(audio, time_axis=1)))
    if m.kind == "metaworld":
        from selfflow.modalities.metaworld import ACTION_DIM as METAWORLD_ACTIONS

        return Layout((Part("actions", (METAWORLD_ACTIONS, m.horizon), (m.action_patch,)),))
    from selfflow.modalities.actions import ACTION_DIM

    return Layout((Part("actions", (ACTION_DIM, m.horizon), (m.action_patch,)),))


def condition_dim(modality: ModalityConfig) -> int:
    """0 for class labels; the observation's size for a policy."""
    if modality.kind == "metaworld":
        from selfflow.modalities.metaworld import cond_dim

        return cond_dim(modality.observation, modality.obs_horizon, modality.obs_image_size)
    if modality.kind != "actions":
        return 0
    from selfflow.modalities.actions import OBS_DIM

    return OBS_DIM


def condition_image(modality: ModalityConfig) -> tuple[int, int, int] | None:
    """(frames, size, proprioception) of an image-observation policy, else None."""
    if modality.kind != "metaworld" or modality.observation != "image":
        return None
    from selfflow.modalities.metaworld import PROPRIO_DIM

    return modality.obs_horizon, modality.obs_image_size, PROPRIO_DIM


@dataclass
class TokenDataset:
    """A modality's samples held in memory, with the trainer's data-set interface."""

    x: torch.Tensor  # (N, *layout.sample_shape) float32
    y: torch.Tensor  # (N,) int64 labels or (N, OBS_DIM) float32 observations
    num_classes: int  # 0 for a policy (a vector condition)
    kind: str
    layout: Layout
    info: dict = field(default_factory=dict)
    image_size: None = None  # not an image set: the model's size comes from the layout
    channels: None = None
    is_latent: bool = False

    def __len__(self) -> int:
        return self.x.shape[0]

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.x[index], self.y[index]


def _source_digits(config: RunConfig, split: str):
    from selfflow.data import load_dataset

    d = config.data
    source = load_dataset(d.name, path=d.path, split=split)
    if source.images.shape[1] != 1:
        raise DataError(f"data.name={d.name}: moving digits need grey images, got {source.images.shape[1]} channels")
    return source


def make_video(config: RunConfig, split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips (n, 1, T, S, S) in [-1, 1] and their labels."""
    from selfflow.modalities.video import moving_digits, video_to_float

    m = config.modality
    source = _source_digits(config, split)
    videos, labels = moving_digits(source.images, source.labels, n, frames=m.frames, size=m.frame_size,
                                   digits_per_clip=m.digits_per_clip, seed=seed)
    return video_to_float(videos), labels


def _cache_dir(modality: ModalityConfig) -> Path:
    if modality.cache_dir:
        return Path(modality.cache_dir)
    return cache_root() / "audio"


def make_waves(modality: ModalityConfig, n: int, seed: int, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Utterances (n, samples), their spoken digits, and the source used."""
    from selfflow.modalities.audio import synthesize_digits

    return synthesize_digits(n, seed=seed, source=modality.audio_source, duration=AUDIO_SECONDS,
                             cache_dir=_cache_dir(modality), progress=progress)


def make_audio(modality: ModalityConfig, n: int, seed: int, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Log-mel spectrograms (n, 1, F, T) in [-1, 1], their spoken digits, and the source used."""
    from selfflow.modalities.audio import log_mel

    waves, labels, source = make_waves(modality, n, seed, progress)
    return log_mel(waves, n_mels=modality.n_mels, frames=modality.audio_frames), labels, source


def make_audio_video(config: RunConfig, split: str, n: int, seed: int, progress: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Synchronised pairs (docs/modalities.md#audio-video-in-sync): clips (n, 1, T, S, S) whose digit appears at
    frame a_i, log-mel spectrograms (n, 1, F, T') of an utterance of the same digit starting at a_i · 0.8 s / T,
    the labels and the audio source."""
    from selfflow.modalities.audio import SAMPLE_RATE, log_mel
    from selfflow.modalities.sync import align_onsets, appear_frames, hide_before

    m = config.modality
    video, labels = make_video(config, split, n, seed)
    appear = appear_frames(n, m.frames, seed)
    waves, spoken, source = make_waves(m, max(n, AUDIO_POOL), seed, progress)
    samples = round(AUDIO_SECONDS * SAMPLE_RATE)
    waves = align_onsets(waves[match_by_label(labels, spoken)], appear * samples // m.frames)
    return hide_before(video, appear), log_mel(waves, n_mels=m.n_mels, frames=m.audio_frames), labels, source


def match_by_label(labels: torch.Tensor, pool_labels: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """For each wanted label, an index into the pool with that label: the k-th clip of class c takes the
    k-th utterance of class c (cycling), so pairs are fixed by the two sets alone."""
    index = torch.empty_like(labels)
    for c in range(num_classes):
        wanted = (labels == c).nonzero().flatten()
        have = (pool_labels == c).nonzero().flatten()
        if len(wanted) and not len(have):
            raise DataError(f"audio_video: no utterance of digit {c} to pair with its {len(wanted)} clips; raise modality.num_samples")
        if len(wanted):
            index[wanted] = have[torch.arange(len(wanted)) % len(have)]
    return index


def modality_samples(config: RunConfig, split: str = "train", n: int | None = None, progress: bool = True) -> TokenDataset:
    """The modality's data set: ``n`` samples (default ``modality.num_samples``) of ``split``."""
    m = config.modality
    n = m.num_samples if n is None else n
    seed = m.seed if split == "train" else m.seed + 1
    layout = layout_for(m)
    if m.kind == "video":
        x, y = make_video(config, split, n, seed)
        return TokenDataset(x, y, 10, m.kind, layout)
    if m.kind == "audio":
        x, y, source = make_audio(m, n, seed, progress)
        return TokenDataset(x, y, 10, m.kind, layout, {"audio_source": source})
    if m.kind == "audio_video":
        video, audio, labels, source = make_audio_video(config, split, n, seed, progress)
        return TokenDataset(layout.join([video, audio]), labels, 10, m.kind, layout, {"audio_source": source})
    if m.kind == "metaworld":
        from selfflow.modalities.metaworld import demonstrations as metaworld_demonstrations

        obs, chunks, info = metaworld_demonstrations(
            m.task, n, seed=seed, obs_horizon=m.obs_horizon, horizon=m.horizon, observation=m.observation,
            image_size=m.obs_image_size, max_steps=m.max_episode_steps, cache_dir=m.cache_dir, progress=progress)
        return TokenDataset(chunks, obs, 0, m.kind, layout, info)
    from selfflow.modalities.actions import demonstrations

    obs, chunks, info = demonstrations(n, seed=seed, horizon=m.horizon, progress=progress)
    return TokenDataset(chunks, obs, 0, m.kind, layout, info)


def load_modality_dataset(config: RunConfig) -> TokenDataset:
    """What a modality run trains on (``data.split`` picks the source digits' split)."""
    dataset = modality_samples(config, "train" if config.data.split == "all" else config.data.split)
    log.info("modality kind=%s samples=%d tokens=%d %s", dataset.kind, len(dataset), dataset.layout.num_tokens,
             " ".join(f"{k}={v}" for k, v in dataset.info.items() if not isinstance(v, dict)))
    return dataset
