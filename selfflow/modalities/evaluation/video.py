"""The video modality's measures (docs/modalities_video.md): per-frame FD, class accuracy by
majority vote, temporal consistency of the digit's identity, and motion smoothness.

Frames are scored with the project's FD_dom network (selfflow.evaluation.feature_net) trained on
single frames of real clips, each labelled with its clip's label: a cheap, in-domain judge of
what a frame shows. Motion is judged without a network, from the intensity-weighted centroid
trajectory (selfflow.modalities.video.trajectories): real digits move with a constant velocity
between bounces, so its second difference is zero except at a bounce.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from selfflow.errors import DataError
from selfflow.evaluation.feature_net import FeatureNet, save_feature_net, train_feature_net
from selfflow.evaluation.frechet import FeatureStats
from selfflow.modalities.video import check_videos, trajectories, video_to_float


def _float_videos(videos: torch.Tensor, name: str) -> torch.Tensor:
    """Videos (n, 1, T, H, W), uint8 or float in [−1, 1] → float32 in [−1, 1]."""
    videos = check_videos(videos, name)
    if videos.dtype == torch.uint8:
        return video_to_float(videos)
    return videos.detach().to(torch.float32)


def _frames(videos: torch.Tensor, name: str = "videos") -> torch.Tensor:
    """(n, 1, T, H, W) → (n·T, 1, H, W) float in [−1, 1], clip-major (clip 0's frames first)."""
    x = _float_videos(videos, name)
    n, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(n * t, c, h, w)


def _labels(labels: torch.Tensor, n: int, name: str) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    if labels.shape != (n,):
        raise DataError(f"{name} must have shape ({n},), got {tuple(labels.shape)}")
    return labels


def train_frame_classifier(videos_uint8: torch.Tensor, labels: torch.Tensor, num_classes: int, out: str | Path,
                           *, steps: int = 600, seed: int = 0, device: str | torch.device = "cpu",
                           progress: bool = True) -> FeatureNet:
    """A FeatureNet trained on every frame of real clips (each labelled with its clip's label).

    Blank frames are left out. Saved to folder ``out`` (save_feature_net; load it again with load_feature_net)
    and returned in eval mode. The same data and seed give the same network on the same device.
    """
    frames = _frames(videos_uint8, "videos_uint8")
    n, t = videos_uint8.shape[0], videos_uint8.shape[2]
    frame_labels = _labels(labels, n, "labels").repeat_interleave(t)
    shown = frames.flatten(1).amax(1) > -1.0  # blank frames (audio-video's before the digit appears) show no digit
    frames, frame_labels = frames[shown], frame_labels[shown]
    net = train_feature_net(frames, frame_labels, num_classes, steps=steps, seed=seed, device=device,
                            progress=progress)
    save_feature_net(net, out, metadata={"modality": "video", "clips": n, "frames": t})
    return net


@torch.inference_mode()
def _per_frame(net: FeatureNet, videos: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (n·T, D) and predicted classes (n·T,) of every frame, on the CPU."""
    frames = _frames(videos)
    feats, preds = [], []
    for start in range(0, frames.shape[0], batch_size):
        f = net.features(frames[start:start + batch_size])
        feats.append(f.float().cpu())
        preds.append(net.head(f).argmax(1).cpu())
    return torch.cat(feats), torch.cat(preds)


def frame_features(net: FeatureNet, videos: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Penultimate features of every frame: (n·frames, feature_dim), clip-major, on the CPU."""
    return _per_frame(net, videos, batch_size)[0]


def _votes(predictions: torch.Tensor, n: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Majority class of each clip (ties → the smallest class) and the fraction of frames that agree."""
    per_clip = predictions.view(n, -1)
    counts = F.one_hot(per_clip, num_classes).sum(dim=1)            # (n, C)
    majority = counts.argmax(dim=1)                                 # first maximum = smallest class
    agreement = (per_clip == majority[:, None]).float().mean(dim=1)
    return majority, agreement


def smoothness(videos: torch.Tensor) -> float:
    """Mean Euclidean norm of the centroid's second difference c[t+1] − 2c[t] + c[t−1] (px/frame²).

    Over every clip and every inner frame; NaN for clips of fewer than 3 frames.
    """
    c = trajectories(videos).to(torch.float64)
    if c.shape[1] < 3:
        return float("nan")
    second = c[:, 2:] - 2 * c[:, 1:-1] + c[:, :-2]
    return float(second.norm(dim=-1).mean())


def video_metrics(net: FeatureNet, samples: torch.Tensor, labels: torch.Tensor, real: torch.Tensor, *,
                  real_labels: torch.Tensor | None = None, batch_size: int = 256, clip_net=None) -> dict:
    """Measures of generated clips against real ones (videos uint8 or float in [−1, 1]).

    - ``fd_frames``: Fréchet distance between the per-frame features of samples and of real clips;
    - ``accuracy``: fraction of clips whose frames' majority vote is the label asked for;
    - ``temporal_consistency``: mean over clips of the fraction of frames whose predicted class is
      the clip's majority class (1.0: the digit keeps its identity in every frame);
    - ``smoothness`` / ``smoothness_real``: mean |second difference| of the centroid trajectory
      of samples / real clips (small for real clips: constant velocity between bounces);
    - ``n``: the number of sample clips. With ``real_labels``, also ``accuracy_real`` and
      ``temporal_consistency_real`` (the judge's own ceiling);
    - with ``clip_net`` (selfflow.modalities.evaluation.clip_net), ``fd_clips``: the Fréchet distance of
      whole-clip spatio-temporal features, which, unlike ``fd_frames``, sees the frames' order.
    """
    samples, real = check_videos(samples, "samples"), check_videos(real, "real")
    n, num_classes = samples.shape[0], net.config.num_classes
    labels = _labels(labels, n, "labels")
    feats, preds = _per_frame(net, samples, batch_size)
    real_feats, real_preds = _per_frame(net, real, batch_size)
    majority, agreement = _votes(preds, n, num_classes)
    result = {
        "fd_frames": FeatureStats.from_features(feats).frechet_distance(FeatureStats.from_features(real_feats)),
        "accuracy": float((majority == labels).float().mean()),
        "temporal_consistency": float(agreement.mean()),
        "smoothness": smoothness(samples),
        "smoothness_real": smoothness(real),
        "n": n,
    }
    if clip_net is not None:
        from selfflow.modalities.evaluation.clip_net import clip_frechet_distance

        result["fd_clips"] = clip_frechet_distance(clip_net, _float_videos(samples, "samples"), _float_videos(real, "real"))
    if real_labels is not None:
        real_majority, real_agreement = _votes(real_preds, real.shape[0], num_classes)
        real_labels = _labels(real_labels, real.shape[0], "real_labels")
        result["accuracy_real"] = float((real_majority == real_labels).float().mean())
        result["temporal_consistency_real"] = float(real_agreement.mean())
    return result


def clip_classes(net: FeatureNet, videos: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The majority class of each clip's frames, (n,) int64: what the clip shows, to the frame classifier."""
    videos = check_videos(videos, "videos")
    _, preds = _per_frame(net, videos, batch_size)
    return _votes(preds, videos.shape[0], net.config.num_classes)[0]
