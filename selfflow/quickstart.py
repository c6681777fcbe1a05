"""`selfflow quickstart`: the README's main job.

Trains a small class-conditional flow transformer on scikit-learn's bundled 8×8 digits (no
download) on the CPU in a few minutes, draws a sample grid (one row per class) and writes a short
report with an in-domain Fréchet distance and the accuracy of a digit classifier on the samples.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from selfflow.config import config_from_dict

QUICKSTART_CONFIG = {
    "data": {"name": "digits", "split": "train"},
    "model": {"size": "tiny", "depth": 4, "hidden_size": 96, "num_heads": 4, "patch_size": 2},
    "method": {"name": "flow_matching", "time_distribution": "logit_normal", "class_dropout_prob": 0.1},
    "train": {
        # The README promises ≤ 5 minutes on 2 CPU cores: on a slower or busier machine training
        # stops at the time limit (with a checkpoint; the report says so) instead of running over.
        "steps": 2000, "batch_size": 64, "lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.999, "time_limit_minutes": 3.0,
        "log_every": 250, "ckpt_every": 1000, "sample_every": 0, "num_sample_images": 100,
        "precision": "fp32", "out_dir": "runs/quickstart",
    },
    "sample": {"sampler": "heun", "steps": 20, "cfg_scale": 1.0},
}


def run_quickstart(out_dir: str = "runs/quickstart", steps: int | None = None, device: str = "auto", classifier_steps: int = 300) -> Path:
    from selfflow.imageio import save_grid
    from selfflow.sampling import generate
    from selfflow.trainer import Trainer, log

    raw = json.loads(json.dumps(QUICKSTART_CONFIG))
    raw["train"]["out_dir"] = out_dir
    raw["train"]["device"] = device
    if steps is not None:
        raw["train"]["steps"] = steps
    config = config_from_dict(raw, "quickstart")
    start = time.perf_counter()
    trainer = Trainer(config)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    train_seconds = time.perf_counter() - start

    # 10 samples per class, one row per class, from the EMA weights.
    model = trainer.ema.model
    num_classes = max(model.num_classes, 1)
    n = 10 * num_classes
    labels = torch.arange(n) // 10 if model.num_classes else None
    s = config.sample
    samples = generate(
        model, num_samples=n, seeds=list(range(n)), labels=labels, sampler=s.sampler, steps=s.steps,
        cfg_scale=s.cfg_scale, batch_size=n, device=trainer.device,
        image_shape=(model.in_channels, model.image_size, model.image_size), progress=False,
    )
    out = Path(out_dir)
    grid = save_grid(samples.images, out / "samples.png", nrow=10, upscale=8)

    report = {
        "status": result["status"], "steps": result["step"], "train_seconds": round(train_seconds, 1),
        "final_loss": result["last"].get("loss"), "sampler": s.sampler, "sampler_steps": s.steps,
        "nfe_per_sample": samples.nfe_per_sample, "grid": str(grid), "device": str(trainer.device),
    }
    report.update(_quality(samples.images, samples.labels, trainer.device, classifier_steps))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    path = out / "report.md"
    path.write_text(_markdown(report))
    log.info("quickstart report=%s grid=%s", path, grid)
    return path


def _quality(images: torch.Tensor, labels: torch.Tensor | None, device, classifier_steps: int) -> dict:
    """FD_dom against the digits test split and classifier accuracy of the samples."""
    try:
        from selfflow.evaluation.feature_net import conditional_accuracy, train_feature_net
        from selfflow.evaluation import FeatureStats, extract_features
    except ImportError:
        return {}
    from selfflow.data import load_dataset

    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    x_train, y_train = train.get_batch(torch.arange(len(train)))
    x_test, _ = test.get_batch(torch.arange(len(test)))
    net = train_feature_net(x_train, y_train, train.num_classes, steps=classifier_steps, seed=0, device=device)
    real = FeatureStats.from_features(extract_features(net, x_test))
    fake = FeatureStats.from_features(extract_features(net, images))
    train_stats = FeatureStats.from_features(extract_features(net, x_train[: len(x_test)]))
    out = {
        "fd_dom_samples_vs_test": round(fake.frechet_distance(real), 3),
        "fd_dom_train_vs_test_floor": round(train_stats.frechet_distance(real), 3),
        "fd_dom_count": {"samples": len(images), "test": len(x_test)},
    }
    if labels is not None:
        overall, _per_class = conditional_accuracy(net, images, labels)
        out["classifier_accuracy_on_samples"] = round(float(overall), 3)
    return out


def _markdown(report: dict) -> str:
    lines = [
        "# selfflow quickstart report",
        "",
        f"A class-conditional flow transformer trained on scikit-learn's 8×8 digits for {report['steps']} steps "
        f"in {report['train_seconds']} s on `{report['device']}` (status: {report['status']}).",
        "",
        f"![samples]({Path(report['grid']).name}) — one row per class (0–9), EMA weights, "
        f"{report['sampler']} sampler, {report['nfe_per_sample']:g} network evaluations per image.",
        "",
        "| measure | value |",
        "| --- | --- |",
    ]
    for key, value in report.items():
        if key not in ("grid",):
            lines.append(f"| {key} | {value} |")
    lines += [
        "",
        "FD_dom is the Fréchet distance in the feature space of a small digit classifier trained on the "
        "digits train split (`selfflow.evaluation.feature_net`); the floor is the same distance between "
        "real train and test images. Lower is better.",
        "",
    ]
    return "\n".join(lines)
