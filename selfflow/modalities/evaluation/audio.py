"""Spoken-digit measures: a classifier trained on log-mel spectrograms, its accuracy on samples and FD in its features.

The classifier is the project's FD_dom network (selfflow.evaluation.feature_net) trained on
spectrograms (n, 1, n_mels, frames) instead of images: ``accuracy`` is how often a spectrogram
generated for digit y is heard as y, ``fd`` the Fréchet distance between its penultimate features
on generated and on real spectrograms (docs/modalities_audio.md).
"""
from __future__ import annotations

from pathlib import Path

import torch

from selfflow.evaluation.feature_net import (FD_DOM_WIDTHS, FeatureNet, conditional_accuracy, save_feature_net,
                                             train_feature_net)
from selfflow.evaluation.features import compute_stats
from selfflow.modalities.audio import WORDS


def train_digit_classifier(mels: torch.Tensor, labels: torch.Tensor, out: str | Path, *, steps: int = 600,
                           seed: int = 0, device: str | torch.device = "cpu", progress: bool = True,
                           widths: tuple[int, ...] = FD_DOM_WIDTHS, batch_size: int = 128) -> FeatureNet:
    """Train the spoken-digit classifier on log-mel spectrograms and their labels; save it in folder ``out``.

    Square spectrograms of 8..64 bins (n_mels = frames) are what the FeatureNet takes. Its
    augmentation shifts each spectrogram by up to n_mels / 8 bins in time and in frequency (a
    later start, a higher voice). ``widths`` / ``batch_size``: smaller values for quick tests.
    """
    net = train_feature_net(mels, labels, len(WORDS), steps=steps, seed=seed, device=device, progress=progress,
                            widths=tuple(widths), batch_size=batch_size)
    save_feature_net(net, out, metadata={"task": "spoken digits", "input": "log-mel spectrograms",
                                         "classes": list(WORDS)})
    return net


def audio_metrics(net: FeatureNet, samples: torch.Tensor, labels: torch.Tensor, real: torch.Tensor) -> dict:
    """{"accuracy", "fd", "n"}: accuracy of ``samples`` against the digits they were generated for,
    and the Fréchet distance between the classifier's features on ``samples`` and on ``real``."""
    accuracy, _ = conditional_accuracy(net, samples, labels)
    fd = compute_stats(net, samples).frechet_distance(compute_stats(net, real))
    return {"accuracy": accuracy, "fd": fd, "n": int(samples.shape[0])}
