"""StableRep on the digits or MNIST (docs/methods.md#stablerep): can a generator's images teach an encoder
as well as real images do?

One pre-declared comparison, fixed before any number is seen: **label-free StableRep on N synthetic images
against SimCLR on N real images**. StableRep's positives are the images of one caption row (a group of m
independent draws of one class, each from its own noise seed); every other row of the batch is a negative,
rows of the same class included — no label defines a positive. Encoders (one architecture, augmentations,
steps, optimiser and encoder passes per step for all) trained on

  (a) N synthetic images, StableRep, caption-row groups (label-free)     (b) N real images, SimCLR
  (c) N real images, supervised (labels; for scale)

then probed, frozen, on real images (linear probe: L-BFGS logistic regression, its L2 strength chosen on
held-out train images; k-NN; 10-shot) and scored on the real test split; raw pixels and the untrained
encoder through the same probes. ≥ 3 seeds per cell. The verdict says "≥" or "<" only when the gap of the
means exceeds the larger per-seed range of the two, else "tied". ``--also`` adds the label-supervised
SupCon on the synthetic classes (to be compared with (c), not with SimCLR) and SimCLR on synthetic images.

The generator is a Self-Flow teacher trained on the *labelled* real train split (its class labels are its
condition): the synthetic images carry what it learnt from them. Synthesis: Heun (--synth-steps) with
classifier-free guidance --synth-cfg (default 2, the paper's low-data setting); m = --per-caption images per
caption row, --images-per-caption of them drawn per row and batch (the paper: 10 and 6; --fast: 4 and 4).

    python benchmarks/stablerep.py --sizes 300 1500 --seeds 0 1 2 --steps 200
    python benchmarks/stablerep.py --data mnist --teacher RUN --sizes 2000 --seeds 0 1 2 --steps 600 \
        --probe-train 5000 --probe-test 2000 --out stablerep_mnist_cpu

On MNIST (28×28) the encoder is the same ViT (4 DiT blocks, width 64) with patch 4 (49 tokens) instead of
patch 2, or the ResNet (--encoder resnet; --width 16 --stem-stride 2: a narrow ResNet that downsamples in its
stem, 0.17 M parameters, ~0.2 s per step of 128 images on one thread); the probes use a fixed real subset (the
first --probe-train train and --probe-test test images) to stay cheap. --teacher takes a training run or an
exported folder (e.g. weights/mnist_teacher_cpu, the committed MNIST teacher):

    python benchmarks/stablerep.py --data mnist --teacher weights/mnist_teacher_cpu --sizes 2000 --seeds 0 1 2 \
        --steps 1000 --fast --encoder resnet --width 16 --stem-stride 2 --synth-steps 12 --out stablerep_mnist_cpu

StableRep vs StableRep+ (--text-teacher, digits): one synthetic set drawn by a caption-conditioned teacher
from the lines of a caption file (4 images per row, guidance --synth-cfg), then StableRep (method.caption_weight
0) and StableRep+ (--caption-weight, default 1 as published: its own linear image projection, a learned logit
scale from 1/0.07 capped at 100), same encoder, steps and seeds, probed on the real digits as above:

    python benchmarks/stablerep.py --text-teacher runs/t2i/self_flow_seed0 --sizes 1200 --seeds 0 1 2 --steps 300
"""
from __future__ import annotations

import argparse
import json
import os
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
from selfflow.represent.probes import raw_pixel_probes, run_probes  # noqa: E402
from selfflow.represent.synth import make_synth_set, read_caption_file  # noqa: E402
from selfflow.trainer import Trainer  # noqa: E402

LABEL_FREE = "StableRep, synthetic, caption-row groups (label-free)"
VARIANTS = [  # name, method, data: real | a synth set kind — the pre-declared comparison is the first two
    (LABEL_FREE, "stablerep", "classes"),
    ("SimCLR, real", "simclr", "real"),
    ("supervised, real", "supervised", "real"),
]
ALSO = [
    ("SupCon, synthetic, class labels (label-supervised)", "supcon", "classes"),
    ("SimCLR, synthetic", "simclr", "single"),
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
                  encoder: str, out: Path, extra: list[str] = (), passes: int = 128, per_batch: int = 4) -> Path:
    """Train one encoder (a finished run in ``out`` is resumed, i.e. reused). Every variant makes ``passes``
    encoder passes per step: StableRep/SupCon passes // per_batch rows × per_batch images, SimCLR passes // 2
    images × 2 views, supervised ``passes`` images."""
    batch = {"stablerep": passes // per_batch, "supcon": passes // per_batch, "simclr": passes // 2, "supervised": passes}[method]
    overrides = [f"train.steps={steps}", f"train.seed={seed}", f"train.out_dir={out}", "train.progress=false",
                 "train.tensorboard=false", f"train.log_every={max(steps // 10, 1)}", f"method.encoder={encoder}",
                 f"train.batch_size={batch}", *extra]
    if data_kind != "real":
        overrides += ["data.name=synth", f"data.path={set_path}"]
    if method in ("stablerep", "supcon") and data_kind != "real":
        overrides.append(f"method.images_per_caption={per_batch}")
    base = "stablerep" if data_kind != "real" and method != "simclr" else ("supervised" if method == "supcon" else method)
    config = load_config(ROOT / "configs" / f"digits_{base}.yaml", [f"method.name={method}", *overrides])
    trainer = Trainer(config, dataset=subset(real, n) if data_kind == "real" else None)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return out


def scored_run(label: str, method: str, kind: str, set_path: str | None, real: ImageDataset, n: int, seed: int, args,
               out: Path, extra: list[str], probes: tuple[ImageDataset, ImageDataset, ProbeConfig]) -> dict:
    """Train one encoder (or reuse its finished run and its probe record) and probe it on the real splits."""
    from selfflow.represent.probes import load_encoder

    record = out / "bench_probe.json"
    if record.is_file():
        result = json.loads(record.read_text())
    else:
        t0 = time.perf_counter()
        train_encoder(method, kind, set_path, real, n, seed, args.steps, args.encoder, out, extra, args.passes, args.images_per_caption)
        encoder, _, _ = load_encoder(out, "model")
        result = run_probes(encoder, *probes)
        result.update(variant=label, n=n, seed=seed, seconds=time.perf_counter() - t0, load_average=os.getloadavg()[0])
        record.write_text(json.dumps(result))
    log(f"{label:52s} N={n:5d} seed={seed} linear={result['linear']:.3f} knn={result['knn']:.3f} "
        f"10-shot={result['few_shot']['10']['mean']:.3f} ({result['seconds']:.0f} s)")
    return result


def spread(scores: list[dict]) -> float:
    """The range of the per-seed linear-probe accuracies."""
    values = [r["linear"] for r in scores]
    return max(values) - min(values)


def verdict_of(name_a: str, a: list[dict], name_b: str, b: list[dict]) -> str:
    """"≥" / "<" only when the gap of the means exceeds the larger per-seed range, else "tied"."""
    mean_a, mean_b = statistics.mean(r["linear"] for r in a), statistics.mean(r["linear"] for r in b)
    gap, limit = mean_a - mean_b, max(spread(a), spread(b))
    word = "≥" if gap > limit else ("<" if -gap > limit else "tied with")
    return (f"{name_a} {mean_a:.3f} {word} {name_b} {mean_b:.3f} (gap {gap:+.3f}; the larger per-seed range "
            f"{limit:.3f}{'' if word != 'tied with' else ': the gap is inside it'})")


def above(name: str, scores: list[dict], reference: float, what: str) -> str:
    mean = statistics.mean(r["linear"] for r in scores)
    word = "above" if min(r["linear"] for r in scores) > reference else (
        "below" if max(r["linear"] for r in scores) < reference else "not separated from")
    return f"{name} {mean:.3f} is {word} {what} {reference:.3f} (every seed {'above' if word == 'above' else 'not above'})"


def summary_row(label: str, n: int, scores: list[dict]) -> dict:
    """The means over seeds of one variant at one N, with the per-seed linear-probe accuracies."""
    return {
        "variant": label, "N": n,
        "linear probe": statistics.mean(r["linear"] for r in scores),
        "linear (per seed)": " / ".join(f"{r['linear']:.3f}" for r in scores),
        "per seed": [r["linear"] for r in scores],
        "seeds": [r.get("seed") for r in scores],
        "k-NN": statistics.mean(r["knn"] for r in scores),
        "10-shot": statistics.mean(r["few_shot"]["10"]["mean"] for r in scores),
        "L2 chosen": " / ".join(f"{r['linear_selection']['weight_decay']:g}" for r in scores if "linear_selection" in r),
    }


COLUMNS = ["variant", "N", "linear probe", "linear (per seed)", "k-NN", "10-shot", "L2 chosen"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[300, 1500])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--encoder", default="vit", choices=["vit", "resnet"])
    p.add_argument("--width", type=int, default=32, help="--encoder resnet: channels of its first stage (method.width)")
    p.add_argument("--stem-stride", type=int, default=1, choices=[1, 2],
                   help="--encoder resnet: 2 halves the image in the stem (early downsampling, ~4x cheaper)")
    p.add_argument("--passes", type=int, default=128, help="encoder passes per step, the same for every variant")
    p.add_argument("--per-caption", type=int, default=10, help="m: images generated per caption row (the paper: 10)")
    p.add_argument("--images-per-caption", type=int, default=6, help="k of a row's m images per batch (the paper: 6)")
    p.add_argument("--fast", action="store_true", help="m = 4 images per caption row, all 4 in each batch")
    p.add_argument("--also", action="store_true", help="add SupCon on the synthetic classes and SimCLR on synthetic images")
    p.add_argument("--data", default="digits", choices=["digits", "mnist"])
    p.add_argument("--data-path", default=".carry/mnist", help="MNIST's IDX folder (--data mnist)")
    p.add_argument("--patch", type=int, default=None, help="ViT patch size (default: 2 on digits, 4 on MNIST)")
    p.add_argument("--probe-train", type=int, default=None, help="real train images for the probes (default: all "
                   "on digits, 5000 on MNIST)")
    p.add_argument("--probe-test", type=int, default=None, help="real test images (default: all on digits, 2000 on MNIST)")
    p.add_argument("--teacher", default=None, help="a Self-Flow run of the same data or its exported folder (default: train one into --work)")
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--synth-steps", type=int, default=20, help="Heun steps for the synthetic sets")
    p.add_argument("--synth-cfg", type=float, default=2.0, help="classifier-free guidance of the synthesis (the paper's "
                   "low-data setting: 2)")
    p.add_argument("--work", default=None, help="default: runs/stablerep_bench (digits), runs/stablerep_bench_mnist")
    p.add_argument("--out", default=None, help="result name (default: stablerep_<data>, stablerep_text_digits)")
    p.add_argument("--note", default="", help="a paragraph appended to the report (what was cut, the machine's load)")
    p.add_argument("--text-teacher", default=None, help="a caption-conditioned run: compare StableRep with StableRep+ instead")
    p.add_argument("--captions", default=str(ROOT / "configs" / "digits_text_prompts.txt"), help="--text-teacher: caption file")
    p.add_argument("--caption-weight", type=float, default=1.0, help="--text-teacher: StableRep+'s method.caption_weight (the paper: 1)")
    args = p.parse_args()
    if args.fast:
        args.per_caption = args.images_per_caption = 4
    if not 2 <= args.images_per_caption <= args.per_caption:
        p.error(f"--images-per-caption {args.images_per_caption}: between 2 and --per-caption {args.per_caption}")
    env_threads()
    if args.text_teacher:
        return text_comparison(args)
    mnist = args.data == "mnist"
    work = Path(args.work or ("runs/stablerep_bench_mnist" if mnist else "runs/stablerep_bench"))
    out_name = args.out or f"stablerep_{args.data}"
    data_path = str(Path(args.data_path) if Path(args.data_path).is_dir() else ROOT / args.data_path) if mnist else None
    patch = args.patch or (4 if mnist else None)
    extra = data_overrides(args.data, data_path, patch)
    if args.encoder == "resnet":
        extra += [f"method.width={args.width}", f"method.stem_stride={args.stem_stride}"]
    started = time.perf_counter()
    variants = VARIANTS + (ALSO if args.also else [])

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
    m = args.per_caption
    sets: dict[tuple[str, int], str] = {}
    for n in args.sizes:
        for kind in sorted({k for _, _, k in variants if k != "real"}):
            path = work / "sets" / f"{kind}_m{m if kind == 'classes' else 1}_cfg{args.synth_cfg:g}_{n}"
            t0 = time.perf_counter()
            make_synth_set(model, path, captions="classes", per_caption=m if kind == "classes" else 1, num=n, shard_size=n,
                           batch_size=500, sampler="heun", steps=args.synth_steps, cfg_scale=args.synth_cfg)
            sets[kind, n] = str(path)
            log(f"set {path} ready ({time.perf_counter() - t0:.0f} s)")

    probe = ProbeConfig(few_shot=(10,), few_shot_trials=3)
    # references first, through the same probes (cached in --work): the raw pixels and an untrained encoder per seed
    from selfflow.trainer import resolve_config
    from selfflow.represent.encoders import build_encoder

    def cached(file: Path, make):
        if file.is_file():
            return json.loads(file.read_text())
        value = make()
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(value))
        return value

    arch = args.encoder + (f"_w{args.width}_s{args.stem_stride}" if args.encoder == "resnet" else "")
    references = work / "references" / f"probe{len(probe_train)}_{len(probe_test)}_{arch}"
    pixels = cached(references / "raw_pixels.json", lambda: raw_pixel_probes(probe_train, probe_test, probe))
    log(f"raw pixels: linear={pixels['linear']:.3f} knn={pixels['knn']:.3f}")
    config = load_config(ROOT / "configs" / "digits_simclr.yaml", [f"method.encoder={args.encoder}", *extra])

    def untrained_probe(seed):
        torch.manual_seed(seed)
        return {**run_probes(build_encoder(resolve_config(config, real)).eval(), probe_train, probe_test, probe), "seed": seed}

    untrained = [cached(references / f"untrained_s{seed}.json", lambda: untrained_probe(seed)) for seed in args.seeds]
    log(f"untrained encoder: linear={statistics.mean(r['linear'] for r in untrained):.3f}")

    rows, raw, scores_of = [], [], {}
    for label, method, kind in variants:
        for n in args.sizes:
            name = f"{method}_{kind}_m{m}_k{args.images_per_caption}_{n}" if kind == "classes" else f"{method}_{kind}_{n}"
            scores = [scored_run(label, method, kind, sets.get((kind, n)), real, n, seed, args,
                                 work / "runs" / f"{name}_s{seed}", extra, (probe_train, probe_test, probe))
                      for seed in args.seeds]
            raw += scores
            scores_of[label, n] = scores
            rows.append(summary_row(label, n, scores))
        # the report after every variant: a run cut short still leaves every finished comparison on record
        report(args, rows, raw, scores_of, pixels, untrained, variants, folder, patch, mnist, out_name, real,
               probe_train, probe_test, started)


def report(args, rows, raw, scores_of, pixels, untrained, variants, folder, patch, mnist, out_name, real, probe_train,
           probe_test, started) -> None:
    """Write the result (JSON, Markdown, plot) with the variants finished so far and the references."""
    m = args.per_caption
    rows = rows + [summary_row("untrained encoder (reference)", 0, untrained),
                   {**summary_row("raw pixels (reference)", 0, [pixels]), "linear (per seed)": "(deterministic)"}]
    done = [v for v in variants if all((v[0], n) in scores_of for n in args.sizes)]
    verdict = []
    for n in args.sizes:
        a, b = scores_of.get((LABEL_FREE, n)), scores_of.get(("SimCLR, real", n))
        if a and b:
            verdict.append(f"N={n}: " + verdict_of("label-free StableRep", a, "SimCLR on real", b))
        for name, scores in (("label-free StableRep", a), ("SimCLR on real", b)):
            if scores:
                verdict.append(f"N={n}: " + above(name, scores, pixels["linear"], "raw pixels"))
        if args.also and (ALSO[0][0], n) in scores_of and ("supervised, real", n) in scores_of:
            verdict.append(f"N={n} (label-supervised, for scale): " + verdict_of(
                "SupCon on synthetic classes", scores_of[ALSO[0][0], n], "supervised on real", scores_of["supervised, real", n]))
    missing = [v[0] for v in variants if v not in done]
    data_words = ("the real MNIST train split (60000 images)" if mnist else f"the real digits train split ({len(real)} images)")
    notes = "\n".join([
        f"Encoder: {args.encoder} ({f'ViT of 4 DiT blocks, width 64, patch {patch or 2}, mean-pooled' if args.encoder == 'vit' else f'ResNet of 3 stages × 2 residual blocks, width {args.width}/{2 * args.width}/{4 * args.width}, stem stride {args.stem_stride}, GroupNorm, average-pooled to {4 * args.width} features'}; "
        f"configs/digits_*.yaml{' with data.name=mnist' if mnist else ''}), {args.steps} steps, AdamW lr 2e-3, {args.passes} encoder "
        f"passes per step for every variant (StableRep: {args.passes // args.images_per_caption} caption rows × "
        f"{args.images_per_caption} images; SimCLR: {args.passes // 2} images × 2 views; supervised: {args.passes} images), "
        "the same augmentations.",
        f"Positives (pre-declared variant (a)): the images of one caption row — {m} independent draws of one class, image k "
        f"from noise seed k, {args.images_per_caption} of them drawn per row and batch; every other row is a negative, rows "
        "of the same class included. No label defines a positive.",
        f"Generator: Self-Flow teacher {folder} (EMA), trained on {data_words} **with their class labels** as its "
        f"condition — the synthetic images carry what it learnt from the labelled real set. Synthesis: Heun "
        f"{args.synth_steps} steps, guidance {args.synth_cfg:g}, captions = classes (row g: class g mod 10).",
        f"Probes on {'a fixed real MNIST subset (the first ' + str(len(probe_train)) + ' train / first ' + str(len(probe_test)) + ' test images)' if mnist else 'the real digits (train ' + str(len(probe_train)) + ' / test ' + str(len(probe_test)) + ')'}, "
        "encoder frozen, raw pixels and the untrained encoder through the same probes: linear = logistic regression on "
        "standardised features by L-BFGS to convergence, its L2 strength chosen from 1e-5…1e-1 on 10% of the probe's train "
        "images held out (never the test images; the column 'L2 chosen'), then refitted on all of them; k-NN (k = 20, "
        f"cosine, τ = 0.07); 10-shot linear (3 draws). Seeds {args.seeds}; one test image is {100 / len(probe_test):.2f} points.",
        "", "Verdict (\"≥\" / \"<\" only beyond the larger per-seed range, else tied):", *[f"- {v}" for v in verdict],
        *(["", f"Not run (the benchmark was cut short): {', '.join(missing)}."] if missing else []),
        *(["", args.note] if args.note else []),
        "", f"Total wall time {time.perf_counter() - started:.0f} s (load average at the end {os.getloadavg()[0]:.1f} on 2 cores).",
    ])
    title_data = "MNIST 28×28" if mnist else "the digits"
    path = write_result(out_name, rows, COLUMNS,
                        f"Label-free StableRep vs SimCLR vs supervised on {title_data} (linear probe on the real test split)", notes,
                        extra={"runs": raw, "raw_pixels": pixels, "untrained": untrained, "data": args.data,
                               "teacher": str(folder), "steps": args.steps, "sizes": args.sizes, "seeds": args.seeds,
                               "per_caption": m, "images_per_caption": args.images_per_caption, "synth_cfg": args.synth_cfg,
                               "verdict": verdict})
    if mnist:  # the MNIST record sits next to its Markdown (docs/benchmarks/<name>.json)
        (RESULTS / f"{out_name}.json").replace(path.with_suffix(".json"))
    plot(rows, args.sizes, path.with_suffix(".png"), done, "MNIST" if mnist else "digits")
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
    probe = ProbeConfig(few_shot=(10,), few_shot_trials=3)
    variants = [("StableRep (caption_weight 0)", 0.0), (f"StableRep+ (caption_weight {args.caption_weight:g})", args.caption_weight)]
    rows, raw, verdict = [], [], []
    args.images_per_caption = 4
    for n in args.sizes:
        set_path = work / "sets" / f"text_{n}"
        make_synth_set(model, set_path, captions=args.captions, per_caption=4, num=n, shard_size=n, batch_size=500,
                       sampler="heun", steps=args.synth_steps, cfg_scale=args.synth_cfg, text=text)
        log(f"set of {n} ready ({time.perf_counter() - started:.0f} s)")
        scores = []
        for label, weight in variants:
            scores.append([scored_run(label, "stablerep", "text", str(set_path), real, n, seed, args,
                                      work / "runs" / f"w{weight:g}_{n}_s{seed}", [f"method.caption_weight={weight}"],
                                      (real, test, probe)) for seed in args.seeds])
            raw += scores[-1]
            rows.append(summary_row(label, n, scores[-1]))
        verdict.append(f"N={n}: " + verdict_of("StableRep+", scores[1], "StableRep", scores[0]))
    pixels = raw_pixel_probes(real, test, probe)
    rows.append({**summary_row("raw pixels (reference)", 0, [pixels]), "linear (per seed)": "(deterministic)"})
    captions = Path(args.captions)
    notes = "\n".join([
        f"Set: the caption-conditioned teacher {folder} (EMA, text encoder `{text.encoder}`) draws N images from "
        f"the {len(read_caption_file(captions))} lines of `{captions.name}` (row g of 4 images uses line g mod L; "
        f"Heun {args.synth_steps} steps, guidance {args.synth_cfg:g}); a row is an identity: its 4 images are positives, "
        "every other row a negative, rows of the same line included.",
        f"Encoder: {args.encoder} (configs/digits_stablerep.yaml: ViT of 4 DiT blocks, width 64, patch 2), {args.steps} steps, "
        f"{args.passes // 4} rows × 4 images per step, the same augmentations; StableRep+ adds w · the symmetric image–caption "
        "InfoNCE between a separate linear projection of the encoder's features and a linear map of the frozen caption "
        "embeddings, logit scale learned from 1/0.07 (capped at 100) (docs/methods.md#stablerep).",
        "Probes on the real digits (train 1500 / test 297; one test image is 0.34 points), encoder frozen: linear (L-BFGS, "
        f"L2 chosen on held-out train images), k-NN (k = 20), 10-shot linear (3 draws). Seeds {args.seeds}; the set is the "
        "same for every seed.",
        "", "Verdict (\"≥\" / \"<\" only beyond the larger per-seed range):", *[f"- {v}" for v in verdict],
        *(["", args.note] if args.note else []),
        "", f"Total wall time {time.perf_counter() - started:.0f} s.",
    ])
    path = write_result(out_name, rows, COLUMNS,
                        "StableRep vs StableRep+ on a caption-drawn synthetic set (digits; linear probe on the real test split)",
                        notes, extra={"runs": raw, "teacher": str(folder), "captions": str(captions.relative_to(ROOT) if captions.is_relative_to(ROOT) else captions), "steps": args.steps,
                                      "sizes": args.sizes, "seeds": args.seeds, "caption_weight": args.caption_weight,
                                      "synth_cfg": args.synth_cfg, "verdict": verdict})
    (RESULTS / f"{out_name}.json").replace(path.with_suffix(".json"))
    log(f"wrote {path}")


def plot(rows, sizes, path: Path, variants, data: str = "digits") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, _, _ in variants:
        row = [next(r for r in rows if r["variant"] == label and r["N"] == n) for n in sizes]
        line, = ax.plot(sizes, [r["linear probe"] for r in row], marker="o", label=label)
        for n, r in zip(sizes, row):  # every seed, so the spread shows
            ax.scatter([n] * len(r["per seed"]), r["per seed"], color=line.get_color(), s=10, alpha=0.5)
    for name, style in (("untrained", ":"), ("raw pixels", "--")):
        ref = next(r["linear probe"] for r in rows if r["variant"].startswith(name))
        ax.axhline(ref, color="grey", ls=style, label=f"{name} (reference)")
    if len(sizes) > 1:
        ax.set_xscale("log")
    ax.set_xlabel("training images N")
    ax.set_ylabel("linear-probe accuracy, real test split")
    ax.set_title(f"{data}: encoders from synthetic vs real images")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
