"""`selfflow quickstart` and `selfflow pipeline`: the README's main job.

The quickstart is the pipeline (:mod:`selfflow.pipeline`) on scikit-learn's bundled 8×8 digits (no
download), sized for 2 CPU cores and under 4 minutes: a Self-Flow teacher, a one-step student
distilled from the teacher's pairs, a synthetic set from the student, a label-free StableRep encoder
trained on it (positives: the 4 independent draws of one caption row; other rows, of the same class
too, are negatives), and probes on the real digits — one HTML report (and ``report.md``) at the end. Every
training stage has a time limit (``train.time_limit_minutes``), so a slow machine still finishes,
and the report says what was cut. ``configs/digits_pipeline.yaml`` is the same pipeline as a file.
"""
from __future__ import annotations

import json
from pathlib import Path

# Measured on the busy 2-core development CPU (docs/benchmarks/quickstart.md; 201 s in all): teacher
# 104 s, pairs + student 41 s, evaluation 14 s, synthetic set 0.4 s, encoder 35 s, probes 2.5 s. At a load
# of 7–8 with these limits and the ResNet encoder: 241 s (teacher and student cut by their limits).
_DIGITS_MODEL = {"size": "tiny", "depth": 4, "hidden_size": 64, "num_heads": 4, "patch_size": 2}
QUICKSTART_PIPELINE = {
    # One thread: this small a model gains little from a second, and loses several-fold when other
    # processes share the cores (measured: 0.06 s vs 0.22 s per teacher step on a busy 2-core machine).
    "pipeline": {"out_dir": "runs/quickstart", "device": "auto", "threads": 1},
    "teacher": {
        "data": {"name": "digits", "split": "train"},
        "model": dict(_DIGITS_MODEL),
        "method": {"name": "self_flow", "class_dropout_prob": 0.1, "mask_ratio": 0.25, "rep_weight": 0.8},
        "train": {"steps": 1500, "batch_size": 64, "lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.999, "seed": 0,
                  "time_limit_minutes": 1.5, "precision": "fp32", "log_every": 50, "ckpt_every": 0, "sample_every": 0,
                  "num_sample_images": 0, "tensorboard": False},
        "sample": {"sampler": "heun", "steps": 20, "cfg_scale": 1.0},
    },
    "student": {
        "kind": "distill", "pairs": 2000, "pairs_sampler": "heun", "pairs_steps": 16,
        "method": {"steps": 1, "loss": "l2"},
        "train": {"steps": 600, "batch_size": 64, "lr": 5e-4, "warmup_steps": 50, "ema_decay": 0.99, "seed": 0,
                  "time_limit_minutes": 0.75, "precision": "fp32", "log_every": 25, "ckpt_every": 0, "num_sample_images": 0,
                  "tensorboard": False},
        "sample": {"sampler": "euler", "steps": 1},
    },
    "evaluate": {"num_samples": 500, "feature_net_steps": 300, "seed": 0},
    "synth": {"generator": "student", "captions": "classes", "per_caption": 4, "num": 2000, "seed": 0},
    "encoder": {
        "model": dict(_DIGITS_MODEL),
        # the small ResNet (0.17 M parameters): 0.20 s per step of 128 digits on one thread, the ViT of the
        # teacher's sizes 0.49 s (measured side by side on the busy machine)
        "method": {"name": "stablerep", "encoder": "resnet", "width": 16, "head_hidden": 256, "embed_dim": 64,
                   "temperature": 0.1},
        "train": {"steps": 400, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.05, "warmup_steps": 20, "seed": 0,
                  "time_limit_minutes": 0.75, "precision": "fp32", "log_every": 10, "ckpt_every": 0, "num_sample_images": 0,
                  "tensorboard": False},
    },
    "probes": {"data": "digits", "max_iter": 1000, "few_shot": [1, 5, 10], "few_shot_trials": 3, "seed": 0},
}

# --tiny: every stage a few steps (tests, a smoke check of an installation; seconds, not minutes).
TINY_OVERRIDES = [
    "teacher.model.depth=2", "teacher.model.hidden_size=32", "encoder.model.depth=2", "encoder.model.hidden_size=32",
    "teacher.train.steps=4", "teacher.train.log_every=2", "teacher.sample.steps=2",
    "student.pairs=32", "student.pairs_steps=2", "student.train.steps=3", "student.train.batch_size=16",
    "student.train.log_every=1",
    "evaluate.num_samples=100", "evaluate.feature_net_steps=5",
    "synth.num=40", "encoder.train.steps=3", "encoder.train.batch_size=4", "encoder.train.log_every=1",
    "probes.max_iter=20", "probes.few_shot_trials=1",
]


def quickstart_config(out_dir: str = "runs/quickstart", steps: int | None = None, device: str = "auto", tiny: bool = False,
                      overrides: list[str] | None = None):
    from selfflow.config import load_pipeline_config

    given = [f"pipeline.out_dir={out_dir}", f"pipeline.device={device}"]
    if tiny:
        given += TINY_OVERRIDES + ["pipeline.progress=false"]
    if steps is not None:
        given.append(f"teacher.train.steps={steps}")
    return load_pipeline_config(raw=json.loads(json.dumps(QUICKSTART_PIPELINE)), overrides=given + list(overrides or []))


def run_quickstart(out_dir: str = "runs/quickstart", steps: int | None = None, device: str = "auto", tiny: bool = False,
                   overrides: list[str] | None = None, say=print) -> Path:
    """Run the quickstart pipeline; returns the path of ``report.html``."""
    from selfflow.pipeline import run_pipeline

    return run_pipeline(quickstart_config(out_dir, steps, device, tiny, overrides), say=say)


# --------------------------------------------------------------------------------------------
# selfflow pipeline
# --------------------------------------------------------------------------------------------
def add_pipeline_parser(sub) -> None:
    p = sub.add_parser("pipeline", help="real data → teacher → one-step student → synthetic set → StableRep → probes → report")
    p.add_argument("--config", required=True, help="pipeline YAML (see configs/digits_pipeline.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. teacher.train.steps=500 or pipeline.out_dir=runs/p")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(handler=cmd_pipeline)


def cmd_pipeline(args) -> int:
    from selfflow.config import load_pipeline_config
    from selfflow.pipeline import run_pipeline

    config = load_pipeline_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    report = run_pipeline(config)
    print(f"report: {report}")
    return 0
