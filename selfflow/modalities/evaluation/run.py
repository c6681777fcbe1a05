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
from selfflow.evaluation.feature_net import FeatureNet, load_feature_net
from selfflow.modalities.data import TokenDataset, modality_samples
from selfflow.modalities.model import load_token_generator
from selfflow.modalities.sampling import generate_given, make_policy, sample_conditioned

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


def _part(dataset_or_x, config: RunConfig, name: str) -> torch.Tensor:
    from selfflow.modalities.data import layout_for

    layout = layout_for(config.modality)
    x = dataset_or_x.x if isinstance(dataset_or_x, TokenDataset) else dataset_or_x
    return dict(zip([p.name for p in layout.parts], layout.split(x)))[name]


def video_judge(config: RunConfig, train_set: TokenDataset, work_dir: Path, device, progress: bool,
                steps: int = JUDGE_STEPS) -> FeatureNet:
    from selfflow.modalities.evaluation.video import train_frame_classifier
    from selfflow.modalities.video import video_to_uint8

    clips = video_to_uint8(_part(train_set, config, "video"))
    return _judge(work_dir / "frame_classifier", lambda out: train_frame_classifier(
        clips, train_set.y, 10, out, steps=steps, device=device, progress=progress), device=device, progress=progress)


def audio_judge(config: RunConfig, train_set: TokenDataset, work_dir: Path, device, progress: bool,
                steps: int = JUDGE_STEPS) -> FeatureNet:
    from selfflow.modalities.evaluation.audio import train_digit_classifier

    mels = _part(train_set, config, "audio")
    return _judge(work_dir / "digit_classifier", lambda out: train_digit_classifier(
        mels, train_set.y, out, steps=steps, device=device, progress=progress), device=device, progress=progress)


def evaluate_modality(path: str | Path, *, n: int = 256, work_dir: str | Path | None = None, device="cpu",
                      steps: int | None = None, given_mode: str = "clean", judge_steps: int = JUDGE_STEPS,
                      progress: bool = True) -> dict:
    """The modality's measures for the checkpoint at ``path`` (a checkpoint or run folder)."""
    model, folder, modality, run = load_token_generator(path, device=device)
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
    if modality.kind in ("video", "audio_video"):
        from selfflow.modalities.evaluation.video import video_metrics

        judge = video_judge(config, train_set, work, device, progress, judge_steps)
        report["video"] = video_metrics(judge, _part(samples, config, "video"), labels, _part(real, config, "video"),
                                        real_labels=real.y)
    if modality.kind in ("audio", "audio_video"):
        from selfflow.modalities.evaluation.audio import audio_metrics

        judge = audio_judge(config, train_set, work, device, progress, judge_steps)
        report["audio"] = audio_metrics(judge, _part(samples, config, "audio"), labels, _part(real, config, "audio"))
        report["audio"]["accuracy_real"] = audio_metrics(judge, _part(real, config, "audio"), real.y,
                                                         _part(real, config, "audio"))["accuracy"]
    if modality.kind == "audio_video":
        report.update(_joint(model, config, samples, real, work, train_set, device, n, given_mode, judge_steps, progress))
    return report


def _joint(model, config: RunConfig, samples, real: TokenDataset, work: Path, train_set, device, n: int,
           given_mode: str, judge_steps: int, progress: bool) -> dict:
    """Picture and sound agree; each generated from the other (cross-modal generation by given tokens)."""
    from selfflow.modalities.evaluation.video import clip_classes

    frames = video_judge(config, train_set, work, device, progress, judge_steps)
    spoken = audio_judge(config, train_set, work, device, progress, judge_steps)
    out = {"agreement": float((clip_classes(frames, _part(samples, config, "video"))
                               == spoken.predict(_part(samples, config, "audio"))).float().mean()),
           "agreement_real": float((clip_classes(frames, _part(real, config, "video"))
                                    == spoken.predict(_part(real, config, "audio"))).float().mean()),
           "given_mode": given_mode}
    video_tokens = model.modality_index == 0
    given, labels = real.x.to(device), real.y.to(device)
    for target, given_tokens, judge in (("video", ~video_tokens, None), ("audio", video_tokens, spoken)):
        made = generate_given(model, given, given_tokens, seeds=range(n), labels=labels, steps=config.sample.steps,
                              cfg_scale=config.sample.cfg_scale, mode=given_mode).cpu()
        part = _part(made, config, target)
        heard = clip_classes(frames, part) if judge is None else judge.predict(part)
        other = "audio" if target == "video" else "video"
        out[f"{target}_given_{other}_accuracy"] = float((heard == real.y).float().mean())
    return out
