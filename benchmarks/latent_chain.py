"""The latent chain end to end, every stage through the command line a user runs:

    image folder (PNG, streamed) ─ small autoencoder ─ encode-latents ─ Self-Flow teacher on the latents
    ─ generate-set --kind pairs (the ODE's raw latents, unclipped) ─ reflow / one-step distill / DMD students
    ─ sample (decoded by the autoencoder the latent set names) ─ eval FD_dom against the image folder

Reported per generator: FD_dom of decoded samples against the folder, steps per sample, the time of
each stage; and the autoencoder's own floor (FD_dom of its reconstructions). On the digits (8×8, 4×4×4
latents) by default; ``--data mnist`` writes a 28×28 folder from the MNIST IDX files (14×14×4 latents).

    python benchmarks/latent_chain.py --out docs/benchmarks/latent_chain_cpu --work runs/latent_chain
    python benchmarks/latent_chain.py --tiny --work /tmp/chain      # plumbing in a minute (numbers meaningless)

ImageNet-like shapes on a GPU (synthetic data, throughput and memory): ``--data synthetic --image-size 256``
with ``--autoencoder-downsample 8`` (32×32×4 latents, 256 tokens at patch 2); ``benchmarks/gpu_suite.sh`` runs it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_folder(kind: str, folder: Path, count: int, image_size: int, mnist_path: str | None) -> Path:
    """An image folder (one sub-folder per class) the chain starts from; written once."""
    from PIL import Image

    if (folder / ".complete").is_file():
        return folder
    if kind == "synthetic":  # ImageNet-like shapes: RGB, mixed sizes around image_size, 10 classes of colour fields
        rng = np.random.default_rng(0)
        images, labels = None, rng.integers(0, 10, count)
    else:
        from selfflow.data import load_dataset

        data = load_dataset(kind, path=mnist_path, split="train")
        images, labels = data.images[:count, 0].numpy(), data.labels[:count].numpy()
    for k in range(count):
        target = folder / f"class_{int(labels[k])}" / f"{k:06d}.{'png' if images is not None else 'jpg'}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if images is not None:
            Image.fromarray(images[k]).save(target)
        else:
            side = int(image_size * rng.uniform(1.0, 1.5))
            coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            coarse[..., int(labels[k]) % 3] = 255
            Image.fromarray(coarse).resize((side, int(side * rng.uniform(0.75, 1.0))), Image.Resampling.BICUBIC).save(target, quality=90)
    (folder / ".complete").write_text(str(count))
    return folder


PEAK_GPU_MIB: dict[str, float] = {}  # stage → peak CUDA memory allocated (MiB), on a GPU


def run(argv: list[str], stage: str | None = None) -> float:
    from selfflow.cli import main

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    code = main(argv)
    if code != 0:
        raise SystemExit(f"stage failed ({code}): selfflow {' '.join(argv)}")
    if torch.cuda.is_available() and stage:
        PEAK_GPU_MIB[stage] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return time.perf_counter() - start


def images_per_s(run_dir: Path) -> float | None:
    """The trainer's last logged training throughput."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    values = [json.loads(line).get("images_per_s") for line in lines]
    values = [v for v in values if v is not None]
    return round(float(values[-1]), 1) if values else None


def sets(values: dict) -> list[str]:
    return [a for key, value in values.items() for a in ("--set", f"{key}={value}")]


def fd_dom(samples: Path, folder: Path, device: str, cache: Path, args) -> dict:
    out = samples.parent / "eval.json"
    run(["eval", "--samples", str(samples), "--data", "folder", "--data-path", str(folder), "--image-size", str(args.image_size),
         "--metrics", "fd_dom", "--train-steps", str(args.feature_steps), "--cache-dir", str(cache), "--device", device, "--out", str(out)])
    report = json.loads(out.read_text())
    return report["fd_dom"]


def chain(args) -> dict:
    from selfflow.autoencoders import SmallAutoencoderConfig, train_small_autoencoder
    from selfflow.data import load_dataset

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    device = args.device
    times: dict[str, float] = {}
    folder = write_folder(args.data, work / "images", args.count, args.image_size, args.data_path)
    images = load_dataset("folder", folder, image_size=args.image_size, channels=args.channels)

    start = time.perf_counter()
    autoencoder = work / "autoencoder"
    if not (autoencoder / "model.safetensors").is_file():
        model = train_small_autoencoder(images, SmallAutoencoderConfig(in_channels=args.channels, latent_channels=4, width=args.ae_width,
                                                                       downsample=args.autoencoder_downsample),
                                        steps=args.ae_steps, batch_size=64, device=device)
        model.save_pretrained(autoencoder)
    times["autoencoder"] = time.perf_counter() - start

    latents = work / "latents"
    times["encode-latents"] = run(stage="encode-latents", argv=["encode-latents", "--data", "folder", "--data-path", str(folder), "--image-size", str(args.image_size),
                                   "--autoencoder", str(autoencoder), "--out", str(latents), "--shard-size", "1000",
                                   "--batch-size", "128", "--num-workers", str(args.workers), "--device", device])
    if args.model_size:  # a named size with its own heads and Self-Flow layers (e.g. S on a GPU)
        model = {"model.size": args.model_size, "model.depth": "null", "model.hidden_size": "null", "model.num_heads": "null",
                 "model.patch_size": 2}
        layers = {}
    else:
        model = {"model.size": "tiny", "model.depth": args.depth, "model.hidden_size": args.width, "model.num_heads": 4, "model.patch_size": 2}
        layers = {"method.student_layer": 1, "method.teacher_layer": args.depth - 1}
    common = {"train.device": device, "train.progress": "false", "train.tensorboard": "false", "train.num_sample_images": 0,
              "train.ckpt_every": 0, "train.log_every": 100, **model}
    teacher = work / "teacher"
    times["teacher (self_flow)"] = run(stage="teacher (self_flow)", argv=["train", "--config", str(ROOT / "configs" / "digits_self_flow.yaml"), *sets({
        **common, "data.name": "latents", "data.path": str(latents), "train.steps": args.teacher_steps, "train.batch_size": args.batch_size,
        "train.lr": 1e-3 if not args.model_size else 1e-4, "train.warmup_steps": 50, "train.out_dir": str(teacher), **layers})])
    pairs = work / "pairs"
    times["pairs"] = run(["generate-set", "--ckpt", str(teacher), "--out", str(pairs), "--n", str(args.pairs), "--kind", "pairs",
                          "--sampler", "heun", "--steps", str(args.teacher_sample_steps), "--shard-size", "1000", "--device", device])
    students = {"reflow": ("reflow", "digits_reflow.yaml", {"data.name": "pairs", "data.path": str(pairs)}),
                "one-step distill": ("one-step", "digits_distill.yaml", {"data.name": "pairs", "data.path": str(pairs)}),
                "dmd": ("dmd", "digits_dmd.yaml", {"data.name": "latents", "data.path": str(latents), "method.teacher": str(teacher)})}
    for name, (kind, config, data) in students.items():
        times[f"student ({name})"] = run(stage=f"student ({name})", argv=["distill", kind, "--config", str(ROOT / "configs" / config), *sets({
            **common, **data, "train.init_from": str(teacher), "train.steps": args.student_steps, "train.batch_size": args.batch_size,
            "train.out_dir": str(work / name.replace(" ", "_"))})])

    rows = []
    cache = work / "eval_cache"
    generators = [("teacher (self_flow)", teacher, "heun", args.teacher_sample_steps)] + \
                 [(f"student ({name})", work / name.replace(" ", "_"), "euler", 1) for name in students]
    for name, run_dir, sampler, steps in generators:
        out = work / "samples" / run_dir.name
        seconds = run(["sample", "--ckpt", str(run_dir), "--n", str(args.samples), "--out", str(out), "--sampler", sampler,
                       "--steps", str(steps), "--device", device])
        record = json.loads((out / "samples.json").read_text())
        rows.append({"generator": name, "sampler": f"{sampler} {steps}", "evaluations_per_image": record.get("nfe_per_sample"),
                     "fd_dom": round(float(fd_dom(out / "samples.npz", folder, device, cache, args)), 3),
                     "sample_and_decode_s": round(seconds, 2), "train_s": round(times.get(name, 0.0), 1),
                     "train_images_per_s": images_per_s(run_dir), "peak_gpu_mib": PEAK_GPU_MIB.get(name, "")})

    # The autoencoder's floor: its reconstructions of images spread over the folder, against the folder.
    from selfflow.autoencoders import load_autoencoder
    from selfflow.imageio import to_uint8

    ae = load_autoencoder(autoencoder, device)
    with torch.no_grad():
        x, _ = images.get_batch(torch.linspace(0, len(images) - 1, min(args.samples, len(images))).long())  # every class, not the first folders
        mean, _ = ae.encode(x.to(device))
        recon = ae.decode(mean).clamp(-1, 1).cpu()
    floor = work / "samples" / "reconstructions" / "samples.npz"
    floor.parent.mkdir(parents=True, exist_ok=True)
    np.savez(floor, images=to_uint8(recon).numpy())
    rows.append({"generator": "autoencoder reconstructions (floor)", "sampler": "-", "evaluations_per_image": 0,
                 "fd_dom": round(float(fd_dom(floor, folder, device, cache, args)), 3), "sample_and_decode_s": "", "train_s": round(times["autoencoder"], 1)})
    manifest = json.loads((pairs / "set.json").read_text())
    return {"rows": rows, "times": {k: round(v, 1) for k, v in times.items()}, "pairs_clipped": manifest.get("clipped"), "peak_gpu_mib": PEAK_GPU_MIB,
            "latent_shape": json.loads((latents / "set.json").read_text())["latent_shape"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits", choices=["digits", "mnist", "synthetic"])
    parser.add_argument("--data-path", default=None, help="MNIST's IDX folder (default .carry/mnist)")
    parser.add_argument("--work", default="runs/latent_chain")
    parser.add_argument("--out", default=None, help="report path without extension (docs/benchmarks/latent_chain_cpu)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--count", type=int, default=1500, help="images in the folder")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--autoencoder-downsample", type=int, default=2)
    parser.add_argument("--ae-width", type=int, default=32)
    parser.add_argument("--ae-steps", type=int, default=600)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--model-size", default=None, help="a named DiT size (S, B, …) instead of --depth/--width")
    parser.add_argument("--batch-size", type=int, default=64, help="teacher and students")
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--teacher-sample-steps", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--feature-steps", type=int, default=1000, help="FD_dom network's training steps")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="every stage a few steps (plumbing only)")
    args = parser.parse_args()
    if args.data == "mnist":
        args.data_path = args.data_path or str(ROOT / ".carry" / "mnist")
        if args.image_size == 8:
            args.image_size = 28
    if args.tiny:
        args.count, args.ae_steps, args.teacher_steps, args.pairs, args.student_steps = 200, 5, 4, 64, 2
        args.samples, args.feature_steps, args.teacher_sample_steps = 64, 5, 2
    if args.device == "cpu":
        torch.set_num_threads(1)
    started = time.perf_counter()
    result = chain(args)
    result["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))
    if args.out:
        from benchmarks.harness import write_result

        out = Path(args.out)
        notes = (f"Folder: {args.count} {args.data} images ({args.image_size}×{args.image_size}, {args.channels} channel(s)), read "
                 f"streamed (ADM centre crop). Small autoencoder (downsample {args.autoencoder_downsample}, {args.ae_steps} steps) → "
                 f"latents {result['latent_shape']}; teacher: Self-Flow, depth {args.depth}, width {args.width}, {args.teacher_steps} "
                 f"steps; pairs: {args.pairs}, Heun {args.teacher_sample_steps} steps, clipped={result['pairs_clipped']} (the ODE's "
                 f"raw latents); students {args.student_steps} steps each from the teacher's EMA. FD_dom of {args.samples} decoded "
                 f"samples against the folder (FD_dom network trained {args.feature_steps} steps on the folder). Stage times (s): "
                 + ", ".join(f"{k} {v}" for k, v in result["times"].items()) + f"; total {result['total_s']} s. Machine: {args.device}.")
        import os

        os.environ["SELFFLOW_BENCH_DIR"] = str(out.parent.resolve())
        import importlib

        import benchmarks.harness as harness

        importlib.reload(harness)
        columns = ["generator", "sampler", "evaluations_per_image", "fd_dom", "sample_and_decode_s", "train_s", "train_images_per_s"]
        if result["peak_gpu_mib"]:
            columns.append("peak_gpu_mib")
            notes += " Peak GPU memory per stage (MiB): " + ", ".join(f"{k} {v}" for k, v in result["peak_gpu_mib"].items()) + "."
        title = "The latent chain end to end on the " + ("GPU" if args.device.startswith("cuda") else "CPU")
        path = harness.write_result(out.name, result["rows"], columns, title, notes, extra={"times": result["times"]})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
