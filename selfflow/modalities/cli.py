"""``selfflow modality sample|eval``: sample and evaluate video, audio, audio-video and action models.

    selfflow train --config configs/video_self_flow.yaml                      # training is selfflow train
    selfflow modality sample --ckpt runs/video_self_flow --n 16 --out samples/video
    selfflow modality sample --ckpt runs/audio_video_self_flow --given audio --out samples/av_from_sound
    selfflow modality eval --ckpt runs/video_self_flow --n 256 [--out report.json]

``sample`` writes a GIF (+ a PNG of frames) for video, spectrograms (PNG) and WAVs for audio, both for
audio-video; for a policy, a GIF of seeded episodes. ``--given video|audio`` (audio-video only) takes
that half from real test clips and generates the other (docs/modalities.md#sampling).
"""
from __future__ import annotations

import json
from pathlib import Path

from selfflow.arguments import add_ckpt_argument


def add_parsers(sub) -> None:
    p = sub.add_parser("modality", help="sample or evaluate a video, audio, audio-video or action model")
    msub = p.add_subparsers(dest="modality_command", required=True)
    s = msub.add_parser("sample", help="samples as GIF / spectrogram PNG / WAV files (a policy: episodes as a GIF)")
    add_ckpt_argument(s, "--checkpoint")
    s.add_argument("--out", required=True, help="folder for the files")
    s.add_argument("--n", type=int, default=16)
    s.add_argument("--labels", default=None, help="comma-separated digits (default: seed %% 10)")
    s.add_argument("--given", default=None, choices=["video", "audio"], help="audio_video: take this half from real test clips")
    s.add_argument("--given-mode", default="clean", choices=["clean", "replace"])
    s.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's sample.steps)")
    s.add_argument("--device", default="auto")
    s.set_defaults(handler=cmd_sample)
    e = msub.add_parser("eval", help="the modality's measures (FD, classifier accuracy, agreement, success rate)")
    add_ckpt_argument(e, "--checkpoint")
    e.add_argument("--n", type=int, default=256, help="samples (episodes for a policy)")
    e.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's sample.steps)")
    e.add_argument("--given-mode", default="clean", choices=["clean", "replace"], help="audio_video: cross-modal generation")
    e.add_argument("--work", default=None, help="folder for the judges (default: the run's eval/)")
    e.add_argument("--judge-steps", type=int, default=None, help="training steps of each judge (default 800)")
    e.add_argument("--out", default=None, help="write the report as JSON here")
    e.add_argument("--device", default="auto")
    e.set_defaults(handler=cmd_eval)


def _positive(value: int, flag: str) -> None:
    from selfflow.errors import ConfigError

    if value is not None and value < 1:
        raise ConfigError(f"{flag} must be >= 1, got {value}")


def cmd_sample(args) -> int:
    import dataclasses

    import torch

    from selfflow.device import resolve_device
    from selfflow.errors import ConfigError
    from selfflow.modalities.evaluation.run import run_config_of
    from selfflow.loader import load_model
    from selfflow.modalities.sampling import generate_given, make_policy, sample_conditioned, write_media
    from selfflow.sampling import parse_labels

    _positive(args.n, "--n")
    _positive(args.steps, "--steps")
    device = resolve_device(args.device, "--device")
    loaded = load_model(args.ckpt, device=device, expect="modality")
    model, folder, modality, run = loaded.model, loaded.folder, loaded.modality, loaded.run
    config = run_config_of(run, folder)
    if args.steps:
        config = dataclasses.replace(config, sample=dataclasses.replace(config.sample, steps=args.steps))
    out = Path(args.out)
    if modality.kind == "actions":
        if args.labels or args.given:
            raise ConfigError("--labels / --given: a policy is conditioned on observations; leave them out")
        from selfflow.modalities.evaluation.actions import save_rollout_gif

        policy = make_policy(model, steps=config.sample.steps, sampler=config.sample.sampler,
                             regression=config.method_name() == "regression")
        path = save_rollout_gif(policy, out / "episodes.gif", seeds=range(1000, 1000 + args.n), execute=modality.execute)
        print(path)
        return 0
    if args.given:
        if modality.kind != "audio_video":
            raise ConfigError(f"--given {args.given}: cross-modal generation needs an audio_video model, not {modality.kind}")
        from selfflow.modalities.data import modality_samples

        real = modality_samples(config, "test", n=args.n)
        samples = generate_given(model, real.x.to(device), model.layout.token_mask(args.given), seeds=range(args.n),
                                 labels=real.y.to(device), steps=config.sample.steps, cfg_scale=config.sample.cfg_scale,
                                 mode=args.given_mode).cpu()
        write_media(real.x, config, out / "real")
    else:
        values = parse_labels(args.labels, model.num_classes)
        labels = None if values is None else torch.tensor([values[k % len(values)] for k in range(args.n)])
        samples, _ = sample_conditioned(model, config, args.n, device, labels=labels, progress=True)
    print(write_media(samples, config, out / "samples"))
    return 0


def cmd_eval(args) -> int:
    from selfflow.device import resolve_device
    from selfflow.files import write_json
    from selfflow.modalities.evaluation.run import evaluate_modality

    from selfflow.modalities.evaluation.run import JUDGE_STEPS

    _positive(args.n, "--n")
    _positive(args.steps, "--steps")
    _positive(args.judge_steps, "--judge-steps")
    device = resolve_device(args.device, "--device")
    report = evaluate_modality(args.ckpt, n=args.n, work_dir=args.work, device=device, steps=args.steps,
                               given_mode=args.given_mode, judge_steps=args.judge_steps or JUDGE_STEPS)
    if args.out:
        write_json({"written_by": "modality-eval", **report}, Path(args.out))  # --out's rule reads written_by
    print(json.dumps(report, indent=2))
    return 0
