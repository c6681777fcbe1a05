"""StableRep on the digits or MNIST (docs/methods.md#stablerep): can a generator's images teach an encoder
as well as real images do?

Encoders (one architecture, augmentations, steps, optimiser and encoder passes per step for all) trained on

  (a) N synthetic images, StableRep with class captions and with instance captions (m = 4 per caption)
  (b) N real images, SimCLR              (c) N synthetic images, SimCLR      (d) N real images, supervised

then probed, frozen, on the real train split (linear probe, k-NN, 10-shot) and scored on the real test
split. Two seeds per cell; accuracy vs N. The generator is a Self-Flow teacher of the same data
(configs/digits_self_flow.yaml or configs/mnist_self_flow.yaml), trained here unless --teacher names one.

    python benchmarks/stablerep.py --sizes 300 1500 --seeds 0 1 --steps 200
    python benchmarks/stablerep.py --data mnist --teacher RUN --sizes 1000 --seeds 0 1 --steps 150 \
        --probe-train 5000 --probe-test 2000 --out stablerep_mnist_cpu

On MNIST (28×28) the encoder is the same ViT (4 DiT blocks, width 64) with patch 4 (49 tokens) instead of
patch 2, or the ResNet (--encoder resnet); the probes use a fixed real subset (the first --probe-train
train and --probe-test test images) to stay cheap.

StableRep vs StableRep+ (--text-teacher, digits): one synthetic set drawn by a caption-conditioned teacher
from the lines of a caption file (4 images per line's group, guidance --cfg-scale), then StableRep
(method.caption_weight 0) and StableRep+ (--caption-weight) on it, same encoder, steps and seeds, probed on
the real digits as above:

    python benchmarks/stablerep.py --text-teacher runs/t2i/self_flow_seed0 --sizes 1200 --seeds 0 1 --steps 300
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, ROOT, env_threads, write_result  # noqa: E402

from selfflow.config import ProbeConfig, load_config  # noqa: E402
from selfflow.data import ImageDataset, load_dataset  # noqa: E402
from selfflow.model import load_generator  # noqa: E402
from selfflow.represent.probes import linear_probe, run_probes  # noqa: E402
from selfflow.represent.synth import make_synth_set, read_caption_file  # noqa: E402
from selfflow.trainer import Trainer  # noqa: E402

VARIANTS = [  # name, config, data: real | synth set kind
    ("StableRep, synthetic, class captions", "stablerep", "classes"),
    ("StableRep, synthetic, instance captions", "stablerep", "instances"),
    ("SimCLR, real", "simclr", "real"),
    ("SimCLR, synthetic", "simclr", "single"),
    ("supervised, real", "supervised", "real"),
]


def log(*a):
    print(*a, flush=True)


def subset(data: ImageDataset, n: int) -> ImageDataset:
    return ImageDataset(data.images[:n].clone(), data.labels[:n].clone(), data.num_classes, data.name, data.source,
                        data.class_names, data.split)


def data_overrides(data: str, data_path: str | None, patch: int | None) -> list[str]:
    """Config overrides that turn a configs/digits_*.yaml encoder run into one on ``data``."""
    out = [] if data == "digits" else [f"data.name={data}", f"data.path={data_path}"]
    return out + ([f"model.patch_size={patch}"] if patch else [])


def train_encoder(method: str, data_kind: str, set_path: str | None, real: ImageDataset, n: int, seed: int, steps: int,
                  encoder: str, out: Path, extra: list[str] = ()) -> Path:
    overrides = [f"train.steps={steps}", f"train.seed={seed}", f"train.out_dir={out}", "train.progress=false",
                 "train.tensorboard=false", f"train.log_every={steps}", f"method.encoder={encoder}", *extra]
    if data_kind != "real":
        overrides += ["data.name=synth", f"data.path={set_path}"]
    if method == "simclr" and data_kind == "single":
        overrides.append("train.batch_size=64")  # groups of one image: 64 images × 2 views, as on real data
    config = load_config(ROOT / "configs" / f"digits_{method}.yaml", overrides)
    trainer = Trainer(config, dataset=subset(real, n) if data_kind == "real" else None)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return out


def scored_run(label: str, method: str, kind: str, set_path: str | None, real: ImageDataset, n: int, seed: int, args,
               out: Path, extra: list[str], probes: tuple[ImageDataset, ImageDataset, ProbeConfig]) -> dict:
    """Train one encoder (or reuse its finished run) and probe it on the real splits; the probe scores with the run's facts."""
    from selfflow.represent.probes import load_encoder

    t0 = time.perf_counter()
    train_encoder(method, kind, set_path, real, n, seed, args.steps, args.encoder, out, extra)
    encoder, _, _ = load_encoder(out, "model")
    result = run_probes(encoder, *probes)
    result.update(variant=label, n=n, seed=seed, seconds=time.perf_counter() - t0)
    log(f"{label:42s} N={n:5d} seed={seed} linear={result['linear']:.3f} knn={result['knn']:.3f} "
        f"10-shot={result['few_shot']['10']['mean']:.3f} ({result['seconds']:.0f} s)")
    return result


def summary_row(label: str, n: int, scores: list[dict]) -> dict:
    """The means over seeds of one variant at one N, with the per-seed linear-probe accuracies."""
    return {
        "variant": label, "N": n,
        "linear probe": statistics.mean(r["linear"] for r in scores),
        "linear (per seed)": " / ".join(f"{r['linear']:.3f}" for r in scores),
        "k-NN": statistics.mean(r["knn"] for r in scores),
        "10-shot": statistics.mean(r["few_shot"]["10"]["mean"] for r in scores),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[300, 1500])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--encoder", default="vit", choices=["vit", "resnet"])
    p.add_argument("--data", default="digits", choices=["digits", "mnist"])
    p.add_argument("--data-path", default=".carry/mnist", help="MNIST's IDX folder (--data mnist)")
    p.add_argument("--patch", type=int, default=None, help="ViT patch size (default: 2 on digits, 4 on MNIST)")
    p.add_argument("--probe-train", type=int, default=None, help="real train images for the probes (default: all "
                   "on digits, 5000 on MNIST)")
    p.add_argument("--probe-test", type=int, default=None, help="real test images (default: all on digits, 2000 on MNIST)")
    p.add_argument("--teacher", default=None, help="a Self-Flow run of the same data (default: train one into --work)")
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--synth-steps", type=int, default=20, help="sampler steps for the synthetic sets")
    p.add_argument("--work", default=None, help="default: runs/stablerep_bench (digits), runs/stablerep_bench_mnist")
    p.add_argument("--out", default=None, help="result name (default: stablerep_<data>, stablerep_text_digits)")
    p.add_argument("--text-teacher", default=None, help="a caption-conditioned run: compare StableRep with StableRep+ instead")
    p.add_argument("--captions", default=str(ROOT / "configs" / "digits_text_prompts.txt"), help="--text-teacher: caption file")
    p.add_argument("--caption-weight", type=float, default=0.5, help="--text-teacher: StableRep+'s method.caption_weight")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="--text-teacher: the teacher's guidance on the captions")
    args = p.parse_args()
    env_threads()
    if args.text_teacher:
        return text_comparison(args)
    mnist = args.data == "mnist"
    work = Path(args.work or ("runs/stablerep_bench_mnist" if mnist else "runs/stablerep_bench"))
    out_name = args.out or f"stablerep_{args.data}"
    data_path = str(Path(args.data_path) if Path(args.data_path).is_dir() else ROOT / args.data_path) if mnist else None
    patch = args.patch or (4 if mnist else None)
    extra = data_overrides(args.data, data_path, patch)
    started = time.perf_counter()

    teacher = args.teacher
    if teacher is None:
        teacher = str(work / "teacher")
        if not (Path(teacher) / "checkpoints").is_dir():
            subprocess.run([sys.executable, "-m", "selfflow", "train", "--config", str(ROOT / f"configs/{args.data}_self_flow.yaml"),
                            "--set", f"train.steps={args.teacher_steps}", "--set", f"train.out_dir={teacher}",
                            "--set", "train.progress=false", *(["--set", f"data.path={data_path}"] if mnist else []),
                            *(["--set", "train.device=cpu"] if mnist and not torch.cuda.is_available() else [])],
                           check=True)
    model, folder = load_generator(teacher, "ema", "cpu")
    real = load_dataset(args.data, data_path, split="train")
    test = load_dataset(args.data, data_path, split="test")
    probe_train = subset(real, args.probe_train or (5000 if mnist else len(real)))
    probe_test = subset(test, args.probe_test or (2000 if mnist else len(test)))
    k = args.synth_steps
    sampling = {"classes": dict(sampler="heun", steps=k), "single": dict(sampler="heun", steps=k),
                "instances": dict(sampler="sde", steps=k)}
    sets: dict[tuple[str, int], str] = {}
    for n in args.sizes:
        for kind in ("classes", "instances", "single"):
            path = work / "sets" / f"{kind}_{n}"
            per = 1 if kind == "single" else 4
            make_synth_set(model, path, captions="instances" if kind == "instances" else "classes", per_caption=per, num=n,
                           shard_size=n, batch_size=500, **sampling[kind])
            sets[kind, n] = str(path)
    log(f"sets ready ({time.perf_counter() - started:.0f} s)")

    probe = ProbeConfig(few_shot=(10,), few_shot_trials=3)
    rows, raw = [], []
    pixels = linear_probe(probe_train.images.flatten(1).float(), probe_train.labels, probe_test.images.flatten(1).float(),
                          probe_test.labels, 10)
    for label, method, kind in VARIANTS:
        for n in args.sizes:
            scores = [scored_run(label, method, kind, sets.get((kind, n)), real, n, seed, args,
                                 work / "runs" / f"{method}_{kind}_{n}_s{seed}", extra, (probe_train, probe_test, probe))
                      for seed in args.seeds]
            raw += scores
            rows.append(summary_row(label, n, scores))
    # an untrained encoder, for scale
    config = load_config(ROOT / "configs" / "digits_stablerep.yaml", [f"method.encoder={args.encoder}", "data.name=digits",
                                                                         "data.path=null", *extra])
    from selfflow.trainer import resolve_config
    from selfflow.represent.encoders import build_encoder

    torch.manual_seed(0)
    untrained = build_encoder(resolve_config(config, real)).eval()
    base = run_probes(untrained, probe_train, probe_test, probe)
    rows.append({"variant": "untrained encoder (reference)", "N": 0, "linear probe": base["linear"], "k-NN": base["knn"],
                 "10-shot": base["few_shot"]["10"]["mean"]})
    rows.append({"variant": "raw pixels (reference)", "N": 0, "linear probe": pixels})

    def best(name, n):
        return next(r["linear probe"] for r in rows if r["variant"] == name and r["N"] == n)

    verdict = []
    for n in args.sizes:
        a = max(best(VARIANTS[0][0], n), best(VARIANTS[1][0], n))
        b = best("SimCLR, real", n)
        verdict.append(f"N={n}: best StableRep {a:.3f} vs SimCLR on real {b:.3f} → (a) {'≥' if a >= b else '<'} (b)")
    notes = "\n".join(mnist_notes(args, folder, verdict, started, patch, len(probe_train), len(probe_test)) if mnist else [
        f"Encoder: {args.encoder} (configs/digits_*.yaml: ViT of 4 DiT blocks, width 64, patch 2, mean-pooled), "
        f"{args.steps} steps, AdamW lr 2e-3, 128 encoder passes per step for every variant (StableRep: 32 captions × 4 "
        f"images; SimCLR: 64 images × 2 views; supervised: 128 images), the same augmentations.",
        f"Generator: Self-Flow digits teacher {folder} (EMA); class-caption and single sets with Heun 20 steps, "
        "instance sets with the SDE (20 steps, churn: noise while t ≤ 0.6), 4 images per caption.",
        "Probes on the real digits (train 1500 / test 297), encoder frozen: linear (full-batch AdamW, 100 epochs, "
        "standardised features), k-NN (k = 20, cosine, τ = 0.07), 10-shot linear (3 draws). Means over seeds "
        f"{args.seeds}.", "", "Target (a) ≥ (b):", *[f"- {v}" for v in verdict],
        "", "Reading: compare a gap with the per-seed spread — on 297 test images one image is 0.34 points and two "
        "seeds of one variant differ by up to 8 points here, so a gap of a few points is not evidence. A linear probe "
        "on the raw 64 pixels is a strong baseline on 8×8 digits: encoders this small and this briefly trained do not "
        "beat it.",
        "", f"Total wall time {time.perf_counter() - started:.0f} s. Plot: stablerep_digits.png.",
    ])
    title_data = "MNIST 28×28" if mnist else "the digits"
    path = write_result(out_name, rows, ["variant", "N", "linear probe", "linear (per seed)", "k-NN", "10-shot"],
                        f"StableRep vs SimCLR vs supervised on {title_data} (linear probe on the real test split)", notes,
                        extra={"runs": [{k: v for k, v in r.items()} for r in raw], "data": args.data,
                               "teacher": str(folder), "steps": args.steps, "sizes": args.sizes, "seeds": args.seeds})
    if mnist:  # the MNIST record sits next to its Markdown (docs/benchmarks/<name>.json)
        (RESULTS / f"{out_name}.json").replace(path.with_suffix(".json"))
    plot(rows, args.sizes, path.with_suffix(".png"), "MNIST" if mnist else "digits")
    log(f"wrote {path}")


def text_comparison(args) -> None:
    """StableRep vs StableRep+ on one synthetic set a caption-conditioned teacher drew from a caption file's lines,
    probed on the real digits; the verdict compares the gap of the means with the seeds' spread."""
    from selfflow.text.model import load_text_generator

    started = time.perf_counter()
    work = Path(args.work or "runs/stablerep_text_bench")
    out_name = args.out or "stablerep_text_digits"
    model, folder, text = load_text_generator(args.text_teacher, "ema", "cpu")
    real, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    probes = (real, test, ProbeConfig(few_shot=(10,), few_shot_trials=3))
    variants = [("StableRep (caption_weight 0)", 0.0), (f"StableRep+ (caption_weight {args.caption_weight:g})", args.caption_weight)]
    rows, raw, verdict = [], [], []
    for n in args.sizes:
        set_path = work / "sets" / f"text_{n}"
        make_synth_set(model, set_path, captions=args.captions, per_caption=4, num=n, shard_size=n, batch_size=500,
                       sampler="heun", steps=args.synth_steps, cfg_scale=args.cfg_scale, text=text)
        log(f"set of {n} ready ({time.perf_counter() - started:.0f} s)")
        means, spreads = [], []
        for label, weight in variants:
            scores = [scored_run(label, "stablerep", "text", str(set_path), real, n, seed, args,
                                 work / "runs" / f"w{weight:g}_{n}_s{seed}", [f"method.caption_weight={weight}"], probes)
                      for seed in args.seeds]
            raw += scores
            rows.append(summary_row(label, n, scores))
            means.append(rows[-1]["linear probe"])
            spreads.append(max(r["linear"] for r in scores) - min(r["linear"] for r in scores))
        gap, spread = means[1] - means[0], max(spreads)
        verdict.append(f"N={n}: StableRep+ − StableRep = {gap:+.3f} on the linear probe; the larger per-seed range is "
                       f"{spread:.3f}, so the difference {'exceeds' if abs(gap) > spread else 'does not exceed'} the seed spread")
    pixels = linear_probe(real.images.flatten(1).float(), real.labels, test.images.flatten(1).float(), test.labels, 10)
    rows.append({"variant": "raw pixels (reference)", "N": 0, "linear probe": pixels})
    captions = Path(args.captions)
    notes = "\n".join([
        f"Set: the caption-conditioned teacher {folder} (EMA, text encoder `{text.encoder}`) draws N images from "
        f"the {len(read_caption_file(captions))} lines of `{captions.name}` (group g of 4 images uses line g mod L; "
        f"Heun {args.synth_steps} steps, guidance {args.cfg_scale:g}); a caption id is a line, so images of one line are positives.",
        f"Encoder: {args.encoder} (configs/digits_stablerep.yaml: ViT of 4 DiT blocks, width 64, patch 2), {args.steps} steps, "
        "32 captions × 4 images per step, the same augmentations; StableRep+ adds w · the symmetric image–caption InfoNCE "
        "against the frozen caption embeddings through a learned projection (docs/methods.md#stablerep).",
        "Probes on the real digits (train 1500 / test 297; one test image is 0.34 points), encoder frozen: linear, "
        f"k-NN (k = 20), 10-shot linear (3 draws). Means over seeds {args.seeds}; the set is the same for every seed.",
        "", "Verdict:", *[f"- {v}" for v in verdict],
        "", f"Total wall time {time.perf_counter() - started:.0f} s.",
    ])
    path = write_result(out_name, rows, ["variant", "N", "linear probe", "linear (per seed)", "k-NN", "10-shot"],
                        "StableRep vs StableRep+ on a caption-drawn synthetic set (digits; linear probe on the real test split)",
                        notes, extra={"runs": raw, "teacher": str(folder), "captions": str(captions), "steps": args.steps,
                                      "sizes": args.sizes, "seeds": args.seeds, "caption_weight": args.caption_weight,
                                      "cfg_scale": args.cfg_scale, "verdict": verdict})
    (RESULTS / f"{out_name}.json").replace(path.with_suffix(".json"))
    log(f"wrote {path}")


def mnist_notes(args, folder, verdict, started, patch, n_train, n_test) -> list[str]:
    enc = (f"ViT of 4 DiT blocks, width 64, patch {patch} (49 tokens), mean-pooled" if args.encoder == "vit"
           else "ResNet (method.width 32)")
    return [
        f"Encoder: {args.encoder} ({enc}; configs/digits_*.yaml with data.name=mnist), {args.steps} steps, AdamW lr "
        "2e-3, 128 encoder passes per step for every variant (StableRep: 32 captions × 4 images; SimCLR: 64 images × 2 "
        "views; supervised: 128 images), the same augmentations.",
        f"Generator: Self-Flow MNIST teacher {folder} (EMA); class-caption and single sets with Heun {args.synth_steps} "
        f"steps, instance sets with the SDE ({args.synth_steps} steps, churn: noise while t ≤ 0.6), 4 images per caption.",
        f"Probes on a fixed real MNIST subset (the first {n_train} train / first {n_test} test images), encoder frozen: "
        "linear (full-batch AdamW, 100 epochs, standardised features), k-NN (k = 20, cosine, τ = 0.07), 10-shot linear "
        f"(3 draws). Means over seeds {args.seeds}.", "", "Target (a) ≥ (b):", *[f"- {v}" for v in verdict],
        "", f"Total wall time {time.perf_counter() - started:.0f} s. Plot: {args.out or 'stablerep_mnist'}.png.",
    ]


def plot(rows, sizes, path: Path, data: str = "digits") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, _, _ in VARIANTS:
        ys = [next(r["linear probe"] for r in rows if r["variant"] == label and r["N"] == n) for n in sizes]
        ax.plot(sizes, ys, marker="o", label=label)
    ref = next(r["linear probe"] for r in rows if r["variant"].startswith("untrained"))
    ax.axhline(ref, color="grey", ls=":", label="untrained encoder")
    ax.set_xscale("log")
    ax.set_xlabel("training images N")
    ax.set_ylabel("linear-probe accuracy, real test split")
    ax.set_title(f"{data}: encoders from synthetic vs real images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
