"""Self-Flow vs flow matching beyond images: video, audio, audio-video and robot actions (issue 15).

For each kind, both methods (and, for actions, the MSE ``regression`` policy baseline) train from the
committed configs (``configs/<kind>_<method>.yaml``) with the overrides of the chosen preset, at EQUAL
steps and batch per kind, for each ``--seeds`` value as ``train.seed``; the data seed ``modality.seed``
stays 0, so every method and seed sees the same data. Each run is then scored by
selfflow.modalities.evaluation.run.evaluate_modality with one judge folder per kind, so that both
methods are judged by the same classifiers (trained once on the kind's training data):

=============  =================================================================================
video          fd_frames, accuracy, temporal_consistency, smoothness (+ the real clips' values)
audio          accuracy, fd (+ accuracy_real)
audio_video    both halves, agreement (+ agreement_real), video_given_audio / audio_given_video
               accuracy with the given tokens "clean" (time 0) and "replace" (re-noised each step)
actions        success_rate, mode_left / mode_right, mean_steps over seeded episodes
=============  =================================================================================

Resumable: a finished run (train_seconds.json) or evaluation (its JSON) is not done again; the report
is rewritten after each kind, so a time limit still leaves the kinds that finished.

    python benchmarks/modalities.py --out docs/benchmarks/modalities_cpu --device cpu
    python benchmarks/modalities.py --out docs/benchmarks/modalities_gpu --device cuda --preset gpu
    python benchmarks/modalities.py --report-only ...     (the report from the JSON in --work)
    python benchmarks/modalities.py --smoke ...           (tiny sizes: the plumbing in under a minute)
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["video", "audio", "audio_video", "actions"]
METHODS = {"video": ["flow_matching", "self_flow"], "audio": ["flow_matching", "self_flow"],
           "audio_video": ["flow_matching", "self_flow", "self_flow_whole_part"],
           "actions": ["flow_matching", "self_flow", "regression"]}

# per preset and kind: the config overrides (steps and batch equal for every method of a kind), the
# evaluation's samples (episodes for actions) and the judges' training steps
_VIDEO16 = ["modality.frame_size=16", "modality.frames=8", "modality.video_patch_frames=2", "modality.video_patch=4"]
_AUDIO16 = ["modality.n_mels=16", "modality.audio_frames=16", "modality.audio_patch_mels=4", "modality.audio_patch_frames=4"]
_AUDIO32 = ["modality.n_mels=32", "modality.audio_frames=32", "modality.audio_patch_mels=4", "modality.audio_patch_frames=4"]
_VIDEO32 = ["modality.frame_size=32", "modality.frames=8", "modality.video_patch_frames=2", "modality.video_patch=4"]
_MODEL = ["model.depth=4", "model.hidden_size=64", "model.num_heads=4"]
PRESETS = {
    "cpu": {
        "video": {"set": _VIDEO16 + _MODEL + ["modality.num_samples=2048"], "steps": 1000, "batch": 32, "n": 256, "judge_steps": 600},
        "audio": {"set": _AUDIO16 + _MODEL + ["modality.num_samples=2048"], "steps": 1000, "batch": 64, "n": 256, "judge_steps": 600},
        "audio_video": {"set": _VIDEO16 + _AUDIO16 + _MODEL + ["modality.num_samples=2048"], "steps": 1000, "batch": 32, "n": 256,
                        "judge_steps": 600},
        "actions": {"set": ["modality.num_samples=200", "model.depth=4", "model.hidden_size=128"], "steps": 1000, "batch": 128,
                    "n": 100, "judge_steps": 0},
    },
    # 32 mel bins (the configs' own spectrogram; 64 audio tokens) at the CPU preset's steps; audio-video with 16 px frames
    "cpu-mel32": {
        "audio": {"set": _AUDIO32 + _MODEL + ["modality.num_samples=2048"], "steps": 1000, "batch": 64, "n": 256, "judge_steps": 600},
        "audio_video": {"set": _VIDEO16 + _AUDIO32 + _MODEL + ["modality.num_samples=2048"], "steps": 1000, "batch": 32, "n": 256,
                        "judge_steps": 600},
    },
    # shorter, wider: 4-frame clips (32 tokens) and a width-128 model for 3000 steps, the video setting in which the
    # CPU's budget gets furthest (docs/benchmarks/modalities_cpu_video_4frames.md)
    "cpu-4frames": {
        "video": {"set": ["modality.frame_size=16", "modality.frames=4", "modality.video_patch_frames=2", "modality.video_patch=4",
                          "model.depth=4", "model.hidden_size=128", "model.num_heads=4", "modality.num_samples=2048"],
                  "steps": 3000, "batch": 32, "n": 256, "judge_steps": 600},
    },
    # a lent GPU (benchmarks/gpu_suite.sh, last step, ~90 s): the configs' own sizes (32 px frames, 32 mel bins),
    # larger batches; the tiny models are launch-bound there, so a larger batch costs little per step
    # (estimate, no GPU measurement yet: ~10 ms per flow-matching step and ~20 ms per Self-Flow step for these tiny
    # models, launch-bound; 18 runs of 300 steps ≈ 60 s of training, the rest data, judges and evaluation)
    "gpu": {
        "video": {"set": _VIDEO32 + _MODEL + ["modality.num_samples=2048"], "steps": 300, "batch": 256, "n": 512, "judge_steps": 600},
        "audio": {"set": _AUDIO32 + _MODEL + ["modality.num_samples=2048"], "steps": 300, "batch": 256, "n": 512, "judge_steps": 600},
        "audio_video": {"set": _VIDEO32 + _AUDIO32 + _MODEL + ["modality.num_samples=2048"], "steps": 300, "batch": 256, "n": 512,
                        "judge_steps": 600},
        "actions": {"set": ["modality.num_samples=200", "model.depth=4", "model.hidden_size=128"], "steps": 300, "batch": 256,
                    "n": 100, "judge_steps": 0},
    },
    "smoke": {
        "video": {"set": _VIDEO16 + ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "modality.num_samples=64",
                                     "sample.steps=2"], "steps": 2, "batch": 8, "n": 8, "judge_steps": 2},
        "audio": {"set": _AUDIO16 + ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "modality.num_samples=64",
                                     "sample.steps=2"], "steps": 2, "batch": 8, "n": 8, "judge_steps": 2},
        "audio_video": {"set": _VIDEO16 + _AUDIO16 + ["model.depth=2", "model.hidden_size=32", "model.num_heads=2",
                                                      "modality.num_samples=64", "sample.steps=2"],
                        "steps": 2, "batch": 8, "n": 8, "judge_steps": 2},
        "actions": {"set": ["modality.num_samples=4", "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "sample.steps=2"],
                    "steps": 2, "batch": 8, "n": 2, "judge_steps": 0},
    },
}

# (key in the flattened results, label, better: "low" | "high" | None (descriptive))
MEASURES = {
    "video": [("fd_frames", "FD (frames)", "low"), ("fd_clips", "FD (clips)", "low"), ("accuracy", "accuracy", "high"),
              ("temporal_consistency", "temporal consistency", "high"), ("smoothness", "smoothness", None)],
    "audio": [("accuracy", "accuracy", "high"), ("fd", "FD", "low")],
    "audio_video": [("video_fd_frames", "video FD (frames)", "low"), ("video_fd_clips", "video FD (clips)", "low"),
                    ("video_accuracy", "video accuracy", "high"),
                    ("video_temporal_consistency", "video temporal consistency", "high"), ("video_smoothness", "video smoothness", None),
                    ("audio_accuracy", "audio accuracy", "high"), ("audio_fd", "audio FD", "low"),
                    ("agreement", "agreement", "high"),
                    ("video_given_audio_clean", "video given audio, clean", "high"), ("audio_given_video_clean", "audio given video, clean", "high"),
                    ("video_given_audio_replace", "video given audio, replace", "high"),
                    ("audio_given_video_replace", "audio given video, replace", "high"),
                    ("sync_offset", "sync offset s", "low"), ("audio_given_video_clean_sync_offset", "sync offset s, audio given video, clean", "low"),
                    ("audio_given_video_replace_sync_offset", "sync offset s, audio given video, replace", "low")],
    "actions": [("success_rate", "success rate", "high"), ("mode_left", "mode left", None), ("mode_right", "mode right", None),
                ("mean_steps", "mean steps", "low")],
}


# measured and compared but kept out of the main table and the plot (the cross-modal table shows them)
EXTRA = {"audio_video": [("video_given_audio_clean_sync_offset", "sync offset s, video given audio, clean", "low"),
                         ("video_given_audio_replace_sync_offset", "sync offset s, video given audio, replace", "low")]}


def summary_measures(kind: str) -> list[tuple]:
    return MEASURES[kind] + EXTRA.get(kind, [])


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def overrides(args, kind: str, method: str, seed: int) -> list[str]:
    size = args.sizes[kind]
    steps = max(1, round(size["steps"] * args.steps_scale))
    return size["set"] + [
        f"train.steps={steps}", f"train.batch_size={size['batch']}", f"train.seed={seed}", "modality.seed=0",
        f"train.device={args.device}", f"train.precision={'fp32' if args.device == 'cpu' else 'auto'}",
        f"train.warmup_steps={min(100, max(1, steps // 10))}",
        "train.progress=false", "train.tensorboard=false", f"train.log_every={max(1, steps // 4)}", "train.ckpt_every=0",
        "train.num_sample_images=0", f"train.out_dir={run_dir(args, kind, method, seed)}"]


def run_dir(args, kind: str, method: str, seed: int) -> Path:
    return args.work / kind / f"{method}_seed{seed}"


def train(args, kind: str, method: str, seed: int) -> float:
    from selfflow.config import load_config
    from selfflow.trainer import train

    out = run_dir(args, kind, method, seed)
    timing = out / "train_seconds.json"
    if not timing.exists():
        config = load_config(ROOT / "configs" / f"{kind}_{method}.yaml", overrides(args, kind, method, seed))
        log("train", kind, method, "seed", seed, "steps", config.train.steps, "batch", config.train.batch_size)
        seconds = train(config)["seconds"]
        timing.write_text(json.dumps({"seconds": seconds, "steps": config.train.steps, "batch": config.train.batch_size}))
    return json.loads(timing.read_text())["seconds"]


def evaluate(args, kind: str, method: str, seed: int) -> dict:
    from selfflow.files import write_json
    from selfflow.modalities.evaluation.run import evaluate_modality

    out = run_dir(args, kind, method, seed)
    size = args.sizes[kind]
    modes = ["clean", "replace"] if kind == "audio_video" else ["clean"]
    reports = {}
    for mode in modes:
        path = out / f"eval_{mode}.json"
        if not path.exists():
            log("evaluate", kind, method, "seed", seed, "given_mode" if kind == "audio_video" else "", mode if kind == "audio_video" else "")
            start = time.perf_counter()
            report = evaluate_modality(out, n=size["n"], judge_steps=max(size["judge_steps"], 1), work_dir=args.work / kind / "judges",
                                       device=args.device, given_mode=mode, progress=False)
            report["eval_seconds"] = time.perf_counter() - start
            write_json(report, path)
        reports[mode] = json.loads(path.read_text())
    return reports


def flatten(kind: str, reports: dict) -> dict:
    r = reports["clean"]
    video_keys = ("fd_frames", "fd_clips", "accuracy", "temporal_consistency", "smoothness")
    if kind == "video":
        return {k: r["video"].get(k) for k in video_keys}
    if kind == "audio":
        return {k: r["audio"][k] for k in ("accuracy", "fd")}
    if kind == "audio_video":
        row = {f"video_{k}": r["video"].get(k) for k in video_keys}
        row.update({f"audio_{k}": r["audio"][k] for k in ("accuracy", "fd")})
        row["agreement"] = r["agreement"]
        for mode, rep in reports.items():
            row[f"video_given_audio_{mode}"] = rep["video_given_audio_accuracy"]
            row[f"audio_given_video_{mode}"] = rep["audio_given_video_accuracy"]
            row[f"audio_given_video_{mode}_sync_offset"] = rep.get("audio_given_video_sync_offset")
            row[f"video_given_audio_{mode}_sync_offset"] = rep.get("video_given_audio_sync_offset")
        row["sync_offset"] = r.get("sync_offset")
        return row
    return {k: r[k] for k in ("success_rate", "mode_left", "mode_right", "mean_steps")}


def references(args, kind: str) -> dict:
    """The real clips' own values with the same judges: the test split scored as if generated (accuracy,
    consistency, smoothness, agreement) and the FD of ``n`` real TRAINING samples against the test split (a floor)."""
    path = args.work / kind / "references.json"
    if path.exists():
        return json.loads(path.read_text())
    from selfflow.config import load_config
    from selfflow.files import write_json

    if kind == "actions":  # the scripted expert, each way round, and the two ways averaged (what MSE regression learns)
        from selfflow.modalities.actions import expert_policy
        from selfflow.modalities.evaluation.actions import success_rate

        config = load_config(ROOT / "configs" / "actions_flow_matching.yaml", overrides(args, kind, "flow_matching", 0))
        ref = {name: success_rate(expert_policy(mode, config.modality.horizon), episodes=args.sizes[kind]["n"],
                                  execute=config.modality.execute, progress=False)
               for name, mode in (("expert_left", 0), ("expert_right", 1), ("expert_averaged", None))}
        write_json(ref, path)
        return ref
    from selfflow.modalities.data import modality_samples
    from selfflow.modalities.evaluation.run import agreement, audio_judge, video_judge

    config = load_config(ROOT / "configs" / f"{kind}_flow_matching.yaml", overrides(args, kind, "flow_matching", 0))
    size = args.sizes[kind]
    train_set = modality_samples(config, "train", progress=False)
    real = modality_samples(config, "test", n=size["n"], progress=False)
    layout = train_set.layout
    pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[:size["n"]]
    ref, judges = {}, {}
    work = args.work / kind / "judges"
    if kind in ("video", "audio_video"):
        from selfflow.modalities.evaluation.run import clip_judge
        from selfflow.modalities.evaluation.video import video_metrics

        judges["video"] = video_judge(train_set, work, args.device, False, max(size["judge_steps"], 1))
        m = video_metrics(judges["video"], layout.part(train_set.x[pick], "video"), train_set.y[pick],
                          layout.part(real.x, "video"), real_labels=real.y,
                          clip_net=clip_judge(train_set, work, args.device, max(size["judge_steps"], 1)))
        prefix = "video_" if kind == "audio_video" else ""
        ref.update({f"{prefix}fd_frames": m["fd_frames"], f"{prefix}fd_clips": m["fd_clips"], f"{prefix}accuracy": m["accuracy_real"],
                    f"{prefix}temporal_consistency": m["temporal_consistency_real"], f"{prefix}smoothness": m["smoothness_real"]})
    if kind in ("audio", "audio_video"):
        from selfflow.evaluation.feature_net import conditional_accuracy
        from selfflow.modalities.evaluation.audio import audio_metrics

        judges["audio"] = audio_judge(train_set, work, args.device, False, max(size["judge_steps"], 1))
        real_audio = layout.part(real.x, "audio")
        m = audio_metrics(judges["audio"], layout.part(train_set.x[pick], "audio"), train_set.y[pick], real_audio)
        prefix = "audio_" if kind == "audio_video" else ""
        ref.update({f"{prefix}fd": m["fd"], f"{prefix}accuracy": conditional_accuracy(judges["audio"], real_audio, real.y)[0]})
    if kind == "audio_video":
        ref["agreement"] = agreement(judges["video"], judges["audio"], layout, real.x)
        # given the real half, the best a generator can do is the real clip's own label: the judges' accuracy on it
        ref["video_given_audio_clean"] = ref["video_given_audio_replace"] = ref["video_accuracy"]
        ref["audio_given_video_clean"] = ref["audio_given_video_replace"] = ref["audio_accuracy"]
        from selfflow.modalities.data import AUDIO_SECONDS
        from selfflow.modalities.sync import sync_measures

        real_sync = sync_measures(layout.part(real.x, "video"), layout.part(real.x, "audio"), AUDIO_SECONDS)["sync_offset"]
        ref["sync_offset"] = ref["audio_given_video_clean_sync_offset"] = ref["audio_given_video_replace_sync_offset"] = real_sync
        ref["sync_offset_shuffled"] = sync_measures(layout.part(real.x, "video"), layout.part(real.x, "audio").roll(1, 0),
                                                    AUDIO_SECONDS)["sync_offset"]
    ref["audio_source"] = train_set.info.get("audio_source")
    write_json(ref, path)
    return ref


def media(args, kind: str, method: str) -> list[str]:
    """Seed 0's media: a GIF (video, audio-video), a spectrogram PNG and 2 WAVs (audio, audio-video), a rollout GIF (actions)."""
    from selfflow.modalities.evaluation.run import run_config_of
    from selfflow.modalities.model import load_token_generator
    from selfflow.modalities.sampling import make_policy, sample_conditioned, write_media

    folder = args.out.parent / args.out.name
    base = folder / f"{kind}_{method}"
    seed = args.seeds[0]
    model, ckpt, modality, run = load_token_generator(run_dir(args, kind, method, seed), device=args.device)
    config = run_config_of(run, ckpt)
    if kind == "actions":
        from selfflow.modalities.evaluation.actions import save_rollout_gif

        path = base.with_suffix(".gif")
        if not path.exists():
            policy = make_policy(model, steps=config.sample.steps, sampler=config.sample.sampler, regression=method == "regression")
            save_rollout_gif(policy, path, seeds=range(1000, 1003), execute=modality.execute)
        return [path.name]
    if not any(folder.glob(f"{base.name}*")):
        labels = torch.arange(10)
        samples, _ = sample_conditioned(model, config, 10, args.device, labels=labels)
        write_media(samples.cpu(), config, base, wavs=2)
    return sorted(p.name for p in folder.glob(f"{base.name}*"))


def summarise(kind: str, rows: list[dict]) -> dict:
    out = {}
    for method in METHODS[kind]:
        group = [r for r in rows if r["method"] == method]
        if not group:
            continue
        stats = {}
        for key, _, _ in summary_measures(kind):
            values = [r[key] for r in group if r.get(key) is not None and not math.isnan(r[key])]
            if values:
                stats[key] = {"mean": sum(values) / len(values), "spread": (max(values) - min(values)) / 2,
                              "seeds": {str(r["seed"]): r[key] for r in group}}
        out[method] = stats
    return out


def fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}"


def compare(kind: str, summary: dict, base: str, other: str, names: tuple[str, str], keys=None) -> list[str]:
    """Per measure with a direction: which of two methods is better (``names`` = how the report calls ``base`` and
    ``other``), and whether the gap exceeds the sum of their half-ranges over the seeds."""
    a_stats, b_stats = summary.get(base, {}), summary.get(other, {})
    lines = []
    for key, label, better in summary_measures(kind):
        if better is None or key not in a_stats or key not in b_stats or (keys is not None and key not in keys):
            continue
        a, b = a_stats[key], b_stats[key]
        gap = b["mean"] - a["mean"]
        if gap == 0:
            lines.append(f"{label}: equal ({fmt(a['mean'])})")
            continue
        winner = names[1] if (gap < 0) == (better == "low") else names[0]
        head = f"{label}: {winner} better ({names[1]} {fmt(b['mean'])}, {names[0]} {fmt(a['mean'])}"
        if min(len(a["seeds"]), len(b["seeds"])) < 2:
            lines.append(f"{head}; one seed: no spread to judge the gap {fmt(abs(gap))} by)")
            continue
        clear = abs(gap) > a["spread"] + b["spread"]
        lines.append(f"{head}; the gap {fmt(abs(gap))} is {'larger' if clear else 'NOT larger'} than the two seed "
                     f"half-ranges together, {fmt(a['spread'] + b['spread'])})")
    return lines


def verdicts(kind: str, summary: dict) -> list[str]:
    """Self-Flow against flow matching per measure (see ``compare``), then any baseline beside the two."""
    lines = compare(kind, summary, "flow_matching", "self_flow", ("flow matching", "Self-Flow"))
    for method, stats in summary.items():  # a baseline beside the two (actions: the regression policy)
        if method in ("flow_matching", "self_flow"):
            continue
        values = ", ".join(f"{label} {fmt(stats[key]['mean'])} ± {fmt(stats[key]['spread'])}" for key, label, _ in MEASURES[kind]
                           if key in stats)
        lines.append(f"{method}: {values}")
    return lines


CROSS = [("audio_given_video", "audio given video"), ("video_given_audio", "video given audio")]


def cross_modal(summary: dict, ref: dict, n: int) -> list[str]:
    """audio_video: the cross-modal table, given tokens clean (time 0) vs re-noised (replace) for each method, with the
    per-seed gap clean − replace, the synchrony of the sound generated for a real picture, and Self-Flow with
    whole-part times against Self-Flow without them."""
    def cell(stats, key):
        if key not in stats:
            return ""
        s = stats[key]
        return f"{fmt(s['mean'])} ± {fmt(s['spread'])} [" + ", ".join(fmt(v) for v in s["seeds"].values()) + "]"

    def gap(stats, key):
        clean, replace = stats.get(f"{key}_clean"), stats.get(f"{key}_replace")
        if not clean or not replace:
            return ""
        d = [clean["seeds"][k] - replace["seeds"][k] for k in clean["seeds"] if k in replace["seeds"]]
        return f"{fmt(sum(d) / len(d))} ± {fmt((max(d) - min(d)) / 2)} [" + ", ".join(fmt(v) for v in d) + "]"

    head = []
    for key, label in CROSS:
        head += [f"{label}, clean ↑", f"{label}, replace ↑", f"{label}, clean − replace"]
    sync = [f"{key}_{mode}_sync_offset" for key, _ in CROSS for mode in ("clean", "replace")]
    head += [f"sync offset s, {label}, {mode} ↓" for _, label in CROSS for mode in ("clean", "replace")]
    lines = ["### Cross-modal generation: given tokens clean vs replace, with and without whole-part times", "",
             "| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for method, stats in summary.items():
        cells = []
        for key, _ in CROSS:
            cells += [cell(stats, f"{key}_clean"), cell(stats, f"{key}_replace"), gap(stats, key)]
        cells += [cell(stats, key) for key in sync]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if ref.get("audio_given_video_clean") is not None:
        cells = []
        for key, _ in CROSS:
            cells += [fmt(ref[f"{key}_clean"]), fmt(ref[f"{key}_replace"]), ""]
        cells += [fmt(ref["sync_offset"]) if isinstance(ref.get("sync_offset"), (int, float)) else ""] * len(sync)
        lines.append("| real data | " + " | ".join(cells) + " |")
    keys = {f"{key}_{mode}" for key, _ in CROSS for mode in ("clean", "replace")} | {
        "sync_offset", "agreement", *sync}
    with_times = compare("audio_video", summary, "self_flow", "self_flow_whole_part", ("without", "with whole-part times"), keys)
    lines += ["", "Accuracy: the judge names the real clip's digit in the generated half; clean − replace per seed (same "
              "model, same given halves): positive where holding the given half clean at time 0 helps; one accuracy "
              f"near chance (0.1) over {n} samples has a sampling standard error of about {fmt(math.sqrt(0.09 / n))}. "
              "Sync offset: mean "
              "|appearance − spoken onset| in seconds of the real half and the generated one (selfflow.modalities.sync); "
              "the real row is the real pairs' (the detectors' floor)" + (
                  f"; real pairs with each clip's sound taken from another clip: {fmt(ref['sync_offset_shuffled'])} s (no "
                  "sync)." if isinstance(ref.get("sync_offset_shuffled"), (int, float)) else ".")]
    if with_times:
        lines += ["", "**With vs without whole-part times (Self-Flow).** " + "; ".join(with_times) + "."]
    return lines


def protocol(args, kind: str, record: dict) -> str:
    size = record["settings"][kind]
    steps = max(1, round(size["steps"] * args.steps_scale))
    sampler = record["kinds"][kind].get("sampler", "euler, 16 steps")
    base = (f"Training: `configs/{kind}_<method>.yaml` with `{' '.join(size['set'])}`, {steps} steps, batch {size['batch']} for "
            f"every method, `train.seed` ∈ {args.seeds}, `modality.seed=0` (the same data for all runs); fp32 on the CPU "
            f"(bf16 autocast on CUDA); EMA weights evaluated. Sampler: {sampler}, no guidance. Self-Flow's mask ratios per "
            f"modality (video 0.10, audio 0.50, actions 0.25) are stated for Self-Flow in its source text but found in no "
            f"paper, so they are ours, as are the whole-part probabilities (0.5, 0.5).")
    if kind == "actions":
        return base + (f" Evaluation: {size['n']} seeded episodes (env seeds 1000…{999 + size['n']}, disjoint from the training "
                       f"seeds), receding horizon (the first `execute` actions of each chunk, then replanning), at most 100 steps; "
                       f"`mode_left`/`mode_right`: fractions of the successful episodes that went round the wall's left/right "
                       f"end; `mean_steps` counts a failure as 100. The regression policy is the MSE baseline (one action chunk per "
                       f"observation: it averages the two ways round).")
    judges = {"video": "the frame classifier", "audio": "the spoken-digit classifier",
              "audio_video": "the frame classifier and the spoken-digit classifier"}[kind]
    text = (base + f" Evaluation: {size['n']} samples, labels `k % 10`; judged by {judges}, trained once for this kind "
            f"({size['judge_steps']} steps, on the kind's training data: every method and seed is scored by the same judge). "
            f"Reference set: {size['n']} clips of the test split (data seed 1, the source digits' test split / other "
            f"utterances), never trained on.")
    if kind in ("video", "audio_video"):
        text += (" `fd_clips`: Fréchet distance of the clip features of a spatio-temporal classifier (3-D convolutions; "
                 "digit and frame order, trained on the kind's real clips; it sees the frames' order, `fd_frames` does not). "
                 "`fd_frames`: Fréchet distance of the per-frame classifier features; `accuracy`: majority vote of the "
                 "frames; `temporal_consistency`: fraction of frames agreeing with the clip's majority; `smoothness`: mean "
                 "|second difference| of the centroid trajectory (real clips: small; not a better/worse score on its own).")
    if kind in ("audio", "audio_video"):
        text += " Audio `fd`: Fréchet distance in the spoken-digit classifier's features."
    if kind == "audio_video":
        text += (" `agreement`: the two judges name the same digit for a joint sample. Cross-modal generation: the real test "
                 "clip's other half is given and this half generated (same sampler), judged against the real clip's label; "
                 "`clean`: the given tokens sit at time 0 (clean) at every step; `replace`: they are re-noised to the current "
                 "time at every step (the usual inpainting replacement), the state every flow model trains on. `clean` "
                 "(a whole part at time 0 beside a noisy one) is trained on only by `self_flow_whole_part` "
                 "(`method.whole_part_prob` 0.5: per sample with probability 0.5 one whole part takes its own time, exactly "
                 "0 in half of those, `method.whole_part_clean_prob` 0.5); plain Self-Flow's in-part masks never make it "
                 "and flow matching has one time per sample. The digit appears in the clip when its name "
                 "is spoken; `sync offset`: mean |appearance − spoken onset| in seconds (selfflow.modalities.sync), of "
                 "joint samples and of the sound generated for a real clip's picture; the real row is the real pairs' "
                 f"(the detectors' floor); real pairs with each clip's sound taken from another clip: "
                 f"{fmt(record['kinds'][kind].get('references', {}).get('sync_offset_shuffled', float('nan')))} s.")
    return text


def report(args, record: dict) -> None:
    out = args.out
    lines = ["# Beyond images: Self-Flow vs flow matching on video, audio, audio-video and actions", "",
             f"Command: `{record['command']}`  ", f"Date: {record['date']}  ",
             f"Machine: {record['environment'].get('device_name')} ({record['environment'].get('torch_threads')} torch threads, "
             f"{record['environment'].get('cpu_count')} CPUs), torch {record['environment'].get('torch')}; preset `{record['preset']}`, "
             f"total wall time {record.get('wall_seconds', 0) / 60:.1f} min", "",
             "Equal steps and batch for every method of a kind, seeds " + ", ".join(map(str, args.seeds)) +
             " (`train.seed`; the data is the same for all). Each cell: mean ± half the range over the seeds, then each seed's "
             "value in brackets. ↓ lower is better, ↑ higher is better; no arrow: descriptive.", ""]
    if record.get("note"):
        lines += [record["note"], ""]
    for kind in record["kinds"]:
        info = record["kinds"][kind]
        summary, ref = info["summary"], info.get("references", {})
        lines += [f"## {kind}", ""]
        arrows = {"low": " ↓", "high": " ↑", None: ""}
        cols = [f"{label}{arrows[better]}" for _, label, better in MEASURES[kind]]
        lines += ["| method | " + " | ".join(cols) + " | train s/run |", "|---|" + "---|" * (len(cols) + 1)]
        for method, stats in summary.items():
            cells = []
            for key, _, _ in MEASURES[kind]:
                if key in stats:
                    s = stats[key]
                    seeds = ", ".join(fmt(v) for v in s["seeds"].values())
                    cells.append(f"{fmt(s['mean'])} ± {fmt(s['spread'])} [{seeds}]")
                else:
                    cells.append("")
            secs = [r["train_s"] for r in info["rows"] if r["method"] == method]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {sum(secs) / max(len(secs), 1):.0f} |")
        if kind == "actions":
            for name in ("expert_left", "expert_right", "expert_averaged"):
                if name in ref:
                    lines.append(f"| {name.replace('_', ' ')} (scripted) | " + " | ".join(fmt(ref[name][k]) for k, _, _ in MEASURES[kind])
                                 + " | |")
        elif ref:
            lines.append("| real data | " + " | ".join(fmt(ref[k]) if isinstance(ref.get(k), (int, float)) else "" for k, _, _ in MEASURES[kind])
                         + " | |")
        lines += ["", protocol(args, kind, record)]
        if kind == "actions" and ref:
            lines += ["", "Scripted rows: the expert that made the demonstrations, always left / always right (each episode "
                      "of the training data draws one of the two), and the two experts' actions averaged, which is what a "
                      "regressor fit by MSE to the forked demonstrations converges to."]
        elif ref:
            lines += ["", "Real data row: the test clips scored as if generated (accuracy, consistency, smoothness, agreement; "
                      "for cross-modal generation the judge's accuracy on the real half it would have to reproduce), and the FD "
                      f"of {args.sizes[kind]['n']} real training samples against the test split (the floor of the FD at this "
                      f"sample count). Audio source: {ref.get('audio_source') or 'n/a'}."]
        lines += ["", "**What this shows.** " + "; ".join(verdicts(kind, summary)) + "."]
        if kind == "audio_video":
            lines += [""] + cross_modal(summary, ref, args.sizes[kind]["n"])
        if info.get("note"):
            lines += ["", info["note"]]
        media_files = info.get("media", {})
        if media_files:
            lines += ["", "Media (seed 0, EMA, labels 0–9 in order; actions: env seeds 1000–1002):", ""]
            for method, files in media_files.items():
                links = []
                for f in files:
                    rel = f"{out.name}/{f}"
                    links.append(f"![{f}]({rel})" if f.endswith((".gif", ".png")) and "frames" not in f else f"[{f}]({rel})")
                lines.append(f"- {method}: " + " ".join(links))
        lines.append("")
    lines += [f"![measures]({out.name}.png)", "", "Bars: means; dots: the seeds; dashed line: the real data's value.", "",
              "All numbers and settings: "
              f"[{out.name}.json]({out.name}.json). Runs and judges: `{args.work}` (not committed)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def plot(args, record: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    kinds = list(record["kinds"])
    if not kinds:
        return
    fig = plt.figure(figsize=(13, 2.6 * len(kinds)), layout="constrained")
    subfigs = fig.subfigures(len(kinds), 1, squeeze=False)[:, 0]
    colours = {"flow_matching": "tab:blue", "self_flow": "tab:orange", "regression": "tab:green",
               "self_flow_whole_part": "tab:red"}
    for sub, kind in zip(subfigs, kinds):
        summary, ref = record["kinds"][kind]["summary"], record["kinds"][kind].get("references", {})
        measures = MEASURES[kind]
        axes = sub.subplots(1, len(measures), squeeze=False)[0]
        sub.suptitle(kind, fontweight="bold")
        for ax, (key, label, better) in zip(axes, measures):
            for i, (method, stats) in enumerate(summary.items()):
                if key not in stats:
                    continue
                ax.bar(i, stats[key]["mean"], color=colours[method], alpha=0.6)
                seeds = list(stats[key]["seeds"].values())
                ax.scatter([i] * len(seeds), seeds, color="k", s=10, zorder=3)
            if isinstance(ref.get(key), (int, float)):
                ax.axhline(ref[key], color="grey", ls="--", lw=0.8)
            ax.set_xticks(range(len(summary)), [m.replace("_", "\n") for m in summary], fontsize=6)
            ax.set_title(label + {"low": " ↓", "high": " ↑", None: ""}[better], fontsize=7)
            ax.tick_params(axis="y", labelsize=6)
    fig.savefig(args.out.with_suffix(".png"), dpi=80)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/modalities_cpu"), help="report prefix (.md, .json, .png, media folder)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiplies every kind's training steps")
    p.add_argument("--work", type=Path, default=Path("runs/modalities_bench"))
    p.add_argument("--preset", default="cpu", choices=list(PRESETS))
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the plumbing only): --preset smoke")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the stored JSON in --work")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the development machine has 2 shared cores)")
    args = p.parse_args()
    if args.smoke:
        args.preset = "smoke"
    args.kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(args.kinds) - set(KINDS)
    if unknown:
        raise SystemExit(f"--kinds: unknown {sorted(unknown)}; choose from {KINDS}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.sizes = PRESETS[args.preset]
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.cuda.init()
    args.work.mkdir(parents=True, exist_ok=True)
    (args.out.parent / args.out.name).mkdir(parents=True, exist_ok=True)

    from selfflow.evaluation.metrics import environment_info

    json_path = args.out.with_suffix(".json")
    start = time.perf_counter()
    previous = json.loads(json_path.read_text()) if args.report_only and json_path.exists() else {}
    record = {"name": args.out.name, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]), "preset": args.preset, "seeds": args.seeds,
              "steps_scale": args.steps_scale, "environment": environment_info(args.device), "torch": torch.__version__,
              "settings": {k: args.sizes[k] for k in args.kinds}, "kinds": {}}
    if args.report_only and previous:  # keep the command, date, machine and wall time of the run that made the numbers
        for key in ("command", "date", "environment", "wall_seconds", "note"):
            record[key] = previous.get(key, record.get(key))
        args.steps_scale = record["steps_scale"] = previous.get("steps_scale", args.steps_scale)
    for kind in args.kinds:
        rows = []
        for method in METHODS[kind]:
            for seed in args.seeds:
                folder = run_dir(args, kind, method, seed)
                if args.report_only:
                    if not (folder / "eval_clean.json").exists():
                        continue
                    seconds = json.loads((folder / "train_seconds.json").read_text())["seconds"]
                else:
                    seconds = train(args, kind, method, seed)
                reports = evaluate(args, kind, method, seed)
                rows.append({"method": method, "seed": seed, "train_s": seconds,
                             "eval_s": sum(r.get("eval_seconds", 0) for r in reports.values()), **flatten(kind, reports),
                             "eval": reports})
        if not rows:
            continue
        ref = references(args, kind)  # cheap: the judges exist by now (actions: scripted experts, a few seconds)
        first = rows[0]["eval"]["clean"]
        info = {"rows": rows, "summary": summarise(kind, rows), "references": ref,
                "sampler": f"{first['sampler']}, {first['steps']} steps"}
        if not args.report_only or not (previous.get("kinds", {}).get(kind, {}).get("media")):
            info["media"] = {m: media(args, kind, m) for m in METHODS[kind] if run_dir(args, kind, m, args.seeds[0]).exists()}
        else:
            info["media"] = previous["kinds"][kind]["media"]
        if previous.get("kinds", {}).get(kind, {}).get("note"):
            info["note"] = previous["kinds"][kind]["note"]
        record["kinds"][kind] = info
        if not args.report_only:
            record["wall_seconds"] = time.perf_counter() - start + (previous.get("wall_seconds", 0) if previous else 0)
        json_path.write_text(json.dumps(record, indent=2, default=str))
        report(args, record)
        plot(args, record)
        log("wrote", kind, "->", args.out.with_suffix(".md"))
    log("done in", f"{time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
