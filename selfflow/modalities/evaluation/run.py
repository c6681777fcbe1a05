"""Evaluate a modality checkpoint with its modality's measures (docs/modalities.md#evaluation).

=============  ===========================================================================================
kind           what is measured (samples: ``n`` generated for labels ``seed % 10`` with the run's sampler)
=============  ===========================================================================================
video          per-frame FD, accuracy, temporal consistency, smoothness (selfflow.modalities.evaluation.video)
audio          spoken-digit accuracy and FD in the classifier's features (…evaluation.audio)
audio_video    both, on the two halves of each joint sample; ``agreement``: how often the frame classifier
               and the spoken-digit classifier name the same digit; cross-modal generation: video for a
               real clip's sound (``video_given_audio_accuracy``) and sound for its picture
               (``audio_given_video_accuracy``), judged against the real clip's label
actions        success rate over seeded episodes (…evaluation.actions), which way round the wall
=============  ===========================================================================================

The judges (frame classifier, spoken-digit classifier) are trained once on the run's own training data
and kept in ``work_dir``; the real reference clips are the test split (another seed, other source
digits), never trained on.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from selfflow.config import RunConfig, config_from_dict
from selfflow.errors import CheckpointError
from selfflow.evaluation.feature_net import FeatureNet, conditional_accuracy, load_feature_net
from selfflow.modalities.data import TokenDataset, modality_samples
from selfflow.modalities.evaluation.video import clip_classes
from selfflow.loader import load_model
from selfflow.modalities.sampling import generate_given, make_policy, sample_conditioned
from selfflow.modalities.tokens import Layout

log = logging.getLogger("selfflow")

JUDGE_STEPS = 800  # training steps of each judge (frame / spoken-digit classifier) unless told otherwise


def run_config_of(run: dict | None, folder: Path) -> RunConfig:
    if not isinstance(run, dict):
        raise CheckpointError(f"{folder}: config.json has no 'run' section; evaluate a training checkpoint or run folder")
    return config_from_dict(run, f"{folder / 'config.json'}:run")


def _judge(folder: Path, train, *, device, progress: bool) -> FeatureNet:
    """Load the judge in ``folder``, or train it with ``train(out)`` first."""
    if (folder / "model.safetensors").is_file():
        return load_feature_net(folder, device)
    log.info("training the judge %s", folder)
    train(folder)
    return load_feature_net(folder, device)


def video_judge(train_set: TokenDataset, work_dir: Path, device, progress: bool,
                steps: int = JUDGE_STEPS) -> FeatureNet:
    from selfflow.modalities.evaluation.video import train_frame_classifier
    from selfflow.modalities.video import video_to_uint8

    clips = video_to_uint8(train_set.layout.part(train_set.x, "video"))
    return _judge(work_dir / "frame_classifier", lambda out: train_frame_classifier(
        clips, train_set.y, 10, out, steps=steps, device=device, progress=progress), device=device, progress=progress)


def audio_judge(train_set: TokenDataset, work_dir: Path, device, progress: bool,
                steps: int = JUDGE_STEPS) -> FeatureNet:
    from selfflow.modalities.evaluation.audio import train_digit_classifier

    mels = train_set.layout.part(train_set.x, "audio")
    return _judge(work_dir / "digit_classifier", lambda out: train_digit_classifier(
        mels, train_set.y, out, steps=steps, device=device, progress=progress), device=device, progress=progress)


def evaluate_modality(path: str | Path, *, n: int = 256, work_dir: str | Path | None = None, device="cpu",
                      steps: int | None = None, given_mode: str = "clean", judge_steps: int = JUDGE_STEPS,
                      progress: bool = True) -> dict:
    """The modality's measures for the checkpoint at ``path`` (a checkpoint or run folder)."""
    loaded = load_model(path, device=device, expect="modality")
    model, folder, modality, run = loaded.model, loaded.folder, loaded.modality, loaded.run
    config = run_config_of(run, folder)
    if steps is not None:
        import dataclasses

        config = dataclasses.replace(config, sample=dataclasses.replace(config.sample, steps=steps))
    work = Path(work_dir) if work_dir else folder.parent.parent / "eval"
    report = {"checkpoint": str(folder), "kind": modality.kind, "method": config.method_name(), "n": n, "judge_steps": judge_steps,
              "sampler": config.sample.sampler, "steps": config.sample.steps, "cfg_scale": config.sample.cfg_scale}
    if modality.kind == "actions":
        policy = make_policy(model, steps=config.sample.steps, sampler=config.sample.sampler,
                             regression=config.method_name() == "regression")
        from selfflow.modalities.evaluation.actions import success_rate

        report.update(success_rate(policy, episodes=n, execute=modality.execute, progress=progress))
        return report
    train_set = modality_samples(config, "train", progress=progress)
    real = modality_samples(config, "test", n=n, progress=progress)
    samples, labels = sample_conditioned(model, config, n, device, progress=progress)
    layout = model.layout
    judges = {}
    if modality.kind in ("video", "audio_video"):
        from selfflow.modalities.evaluation.video import video_metrics

        judges["video"] = video_judge(train_set, work, device, progress, judge_steps)
        report["video"] = video_metrics(judges["video"], layout.part(samples, "video"), labels, layout.part(real.x, "video"),
                                        real_labels=real.y)
    if modality.kind in ("audio", "audio_video"):
        from selfflow.modalities.evaluation.audio import audio_metrics

        judges["audio"] = audio_judge(train_set, work, device, progress, judge_steps)
        real_audio = layout.part(real.x, "audio")
        report["audio"] = audio_metrics(judges["audio"], layout.part(samples, "audio"), labels, real_audio)
        report["audio"]["accuracy_real"] = conditional_accuracy(judges["audio"], real_audio, real.y)[0]
    if modality.kind == "audio_video":
        report.update(_joint(model, config, samples, real, judges, device, n, given_mode))
    return report


def agreement(frames: FeatureNet, spoken: FeatureNet, layout: Layout, x: torch.Tensor) -> float:
    """Fraction of audio-video samples whose picture (frame classifier, majority over frames) and sound
    (spoken-digit classifier) name the same digit."""
    return float((clip_classes(frames, layout.part(x, "video")) == spoken.predict(layout.part(x, "audio"))).float().mean())


def _joint(model, config: RunConfig, samples, real: TokenDataset, judges: dict, device, n: int, given_mode: str) -> dict:
    """Picture and sound agree; each generated from the other (cross-modal generation by given tokens)."""
    layout = model.layout
    frames, spoken = judges["video"], judges["audio"]
    out = {"agreement": agreement(frames, spoken, layout, samples), "agreement_real": agreement(frames, spoken, layout, real.x),
           "given_mode": given_mode}
    given, labels = real.x.to(device), real.y.to(device)
    for target, other in (("video", "audio"), ("audio", "video")):
        made = generate_given(model, given, layout.token_mask(other), seeds=range(n), labels=labels, steps=config.sample.steps,
                              cfg_scale=config.sample.cfg_scale, mode=given_mode).cpu()
        part = layout.part(made, target)
        heard = clip_classes(frames, part) if target == "video" else spoken.predict(part)
        out[f"{target}_given_{other}_accuracy"] = float((heard == real.y).float().mean())
    return out
