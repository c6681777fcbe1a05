"""Text-to-image on the digits or MNIST (CPU): flow matching vs Self-Flow trained on captions, equal steps, several seeds.

Each run trains the caption-conditioned DiT (selfflow.text.model) on the digits train split with
generated captions (``captions_per_image`` per image: the digit, and often its measured stroke
thickness and slant), encoded by MiniLM (or the built-in hashed encoder). Then, from the EMA
weights, for each guidance scale: ``per_prompt`` images for each of the 90 evaluation prompts
(held-out templates; every digit × thickness × slant) and the scores of selfflow.text.evaluation:

- prompt accuracy: the FD_dom classifier reads the digit the prompt names;
- thickness / slant agreement: the measured bin equals the prompt's (chance 1/3);
- FD_dom of all images against the digits test split (floor: real train images, same count);
- alignment top-1: a small contrastive image–text model trained here on real images and their
  training captions picks the image's prompt among its 10 digit variants (chance 0.1).

Resumable: a finished run (its checkpoint at ``--steps``) is not trained again.

    python benchmarks/text_to_image.py --steps 2000 --seeds 0 1 --encoder minilm --work runs/t2i

On a busy machine, train the methods in parallel first (one thread each, same --work, --name of
your choice), then run the command above: it skips finished runs and writes the combined report.

MNIST (28×28, patch 4: 49 tokens; the FD_dom classifier and the alignment model trained on MNIST's train split):

    python benchmarks/text_to_image.py --data mnist --data-path .carry/mnist --steps 1200 --seeds 0 1 --one-step-steps 0 \
        --work runs/t2i_mnist --name text_to_image_mnist_cpu

On a GPU (benchmarks/gpu_suite.sh more): ``--device cuda`` trains, loads, samples and scores there (bf16 autocast by
default: ``--precision auto``); ``--model-size S`` is the DiT size S (depth 12, width 384, 6 heads; lr 2e-4 and
warm-up 200 as the MNIST size-S configs), ``--batch-size`` the training batch. The defaults (CPU, fp32, the tiny
depth-4 width-64 DiT, batch 64) are the CPU reports' settings: the same configs, so a CPU --work folder is reused.

    python benchmarks/text_to_image.py --data mnist --data-path .carry/mnist --device cuda --model-size S --batch-size 256 \
        --steps 1500 --seeds 0 1 --one-step-steps 0 --encoder hashed --work runs/t2i_mnist_gpu --name text_to_image_mnist_gpu

The alignment model is trained and scored on the CPU whatever --device (selfflow.text.evaluation's
train_alignment_model has no device argument): the same judge as the CPU reports, a few seconds on a many-core host.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from selfflow.config import MODEL_SIZES, config_from_dict  # noqa: E402

RUN = {  # the data section comes from --data
    "model": {"size": "tiny", "depth": 4, "hidden_size": 64, "num_heads": 4, "patch_size": 2},
    "method": {"class_dropout_prob": 0.1},
    "train": {"batch_size": 64, "lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.999, "device": "cpu", "precision": "fp32",
              "log_every": 250, "ckpt_every": 0, "num_sample_images": 0, "progress": False, "tensorboard": False},
    "sample": {"sampler": "heun", "steps": 20},
}
METHODS = {"flow_matching": {"name": "flow_matching"}, "self_flow": {"name": "self_flow", "mask_ratio": 0.25, "rep_weight": 0.8}}
COLUMNS = ["method", "seed", "cfg_scale", "prompt_accuracy", "thickness_agreement", "slant_agreement", "fd_dom", "alignment_top1",
           "train_s", "nfe_per_sample"]
GRID_PROMPTS = ["a handwritten zero", "the digit 1", "a thick two", "the digit 3, thin strokes, upright",
                "a bold four", "number 5, slanted left", "a thin six", "a seven leaning right",
                "an image of the number eight, drawn upright with thick lines", "9 (thin, slanted right)"]


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# A DiT size other than the default tiny one: the MNIST size-S configs' learning rate (configs/mnist_*.yaml) and
# the GPU suite's warm-up; the tiny one keeps RUN's settings (the CPU reports').
SIZED_TRAIN = {"lr": 2e-4, "warmup_steps": 200}


def base_raw(args) -> dict:
    """RUN with --device, --precision, --model-size and --batch-size; exactly RUN with the defaults."""
    raw = copy.deepcopy(RUN)
    raw["train"].update(device=args.device_name, precision=args.precision, batch_size=args.batch_size)
    if args.model_size != "tiny":
        raw["model"] = {"size": args.model_size, "patch_size": raw["model"]["patch_size"]}
        raw["train"].update(SIZED_TRAIN)
    return raw


def run_config(args, method: str, seed: int):
    raw = base_raw(args)
    raw["data"] = {"name": args.data, "path": args.data_path}
    raw["model"]["patch_size"] = args.patch
    raw["method"].update(METHODS[method])
    raw["train"].update(steps=args.steps, seed=seed, out_dir=str(args.work / f"{method}_seed{seed}"))
    raw["text"] = {"encoder": args.encoder, "captions_per_image": args.captions_per_image, "cache_dir": str(args.work / "text_cache"),
                   "max_tokens": 16}
    return config_from_dict(raw)


def train(config, device: torch.device) -> tuple[float, object]:
    from selfflow import checkpoint as ckpt
    from selfflow.text.model import load_text_generator
    from selfflow.trainer import train

    out = Path(config.train.out_dir)
    timing = out / "train_seconds.json"
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    if latest is None or not latest.name.endswith(f"{config.train.steps:07d}") or not timing.exists():
        timing.write_text(json.dumps({"seconds": train(config)["seconds"]}))
    model, _, _ = load_text_generator(out, "ema", device)
    return json.loads(timing.read_text())["seconds"], model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--data", default="digits", choices=["digits", "mnist"])
    p.add_argument("--data-path", default=None, help="MNIST's IDX folder (--data mnist; default: data/mnist or .carry/mnist)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--encoder", default="minilm", choices=["minilm", "hashed"])
    p.add_argument("--captions-per-image", type=int, default=4)
    p.add_argument("--per-prompt", type=int, default=4)
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--align-steps", type=int, default=600)
    p.add_argument("--fd-steps", type=int, default=2000)
    p.add_argument("--work", type=Path, default=Path("runs/text_to_image"))
    p.add_argument("--name", default="text_to_image_digits")
    p.add_argument("--one-step-steps", type=int, default=1500, help="the one-step text student's distillation steps (0: none)")
    p.add_argument("--pairs", type=int, default=3000, help="pairs the teacher makes from the training captions")
    p.add_argument("--pair-cfg", type=float, default=2.0, help="the teacher's guidance in the pairs (the student bakes it in)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto: training, sampling and scoring")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="train.precision and the sampler's autocast (default: fp32 on the CPU, auto = bf16 autocast on CUDA)")
    p.add_argument("--model-size", default="tiny", choices=list(MODEL_SIZES),
                   help="DiT size (default tiny: depth 4, width 64; S: depth 12, width 384, for MNIST on a GPU)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch")
    args = p.parse_args()
    from selfflow.device import autocast_dtype, resolve_device
    from selfflow.errors import ConfigError

    try:
        device = resolve_device(args.device, "--device")
    except ConfigError as e:
        raise SystemExit(f"text_to_image.py: {e}") from None
    args.device_name = str(device)  # train.device: "cpu" with the defaults, as the CPU runs' configs
    args.precision = args.precision or ("auto" if device.type == "cuda" else "fp32")
    amp = autocast_dtype(args.precision, device)  # None (float32) with the defaults
    args.dims = MODEL_SIZES[args.model_size]
    args.data_path = harness.resolve_data_path(args)
    args.patch = 4 if args.data == "mnist" else 2  # 49 tokens on 28×28, 16 on 8×8
    harness.env_threads()
    args.work.mkdir(parents=True, exist_ok=True)

    from selfflow.data import load_dataset
    from selfflow.evaluation import evaluate
    from selfflow.evaluation.feature_net import feature_net_for
    from selfflow.evaluation.metrics import environment_info
    from selfflow.imageio import save_grid
    from selfflow.text.data import generated_captions, make_encoder
    from selfflow.text.evaluation import (alignment_score, evaluation_prompts, prompt_scores, real_alignment_reference,
                                          train_alignment_model)
    from selfflow.text.generate import generate_from_prompts

    train_set, test_set = load_dataset(args.data, args.data_path, split="train"), load_dataset(args.data, args.data_path, split="test")
    image_shape = tuple(train_set.shape)
    text_config = run_config(args, args.methods[0], args.seeds[0]).text
    encoder = make_encoder(text_config, device)
    net, _ = feature_net_for(args.data, args.data_path, device, args.work / "cache", steps=args.fd_steps, progress=False)
    captions, bins = generated_captions(train_set.images, train_set.labels, 10, per_image=args.captions_per_image,
                                        seed=text_config.caption_seed)
    log("alignment model (CPU): encoding captions, training", args.align_steps, "steps")
    first = [caps[0].text for caps in captions]
    unique = list(dict.fromkeys(first))
    pooled = encoder.encode(unique).pooled
    ids = torch.tensor([unique.index(t) for t in first])
    real = train_set.get_batch(torch.arange(len(train_set)))[0]
    align = train_alignment_model(real, ids, pooled, steps=args.align_steps, seed=0)
    test_images = test_set.get_batch(torch.arange(len(test_set)))[0]
    real_ref = real_alignment_reference(align, test_images, test_set.labels, bins, encoder)
    prompts = evaluation_prompts()
    n_images = len(prompts) * args.per_prompt
    floor = evaluate(real[torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:n_images]], metrics=["fd_dom"],
                     reference=test_set, feature_net_dir=net, device=device, progress=False)["fd_dom"]
    real_rows = prompt_scores(test_images, [p for p in real_prompts(test_set, bins)], classifier=net, bins=bins)
    log(f"real test images: {real_rows}, alignment {real_ref}, FD_dom floor {floor:.3g}")

    def score(model, method, seed, scale, seconds, sampler="heun", steps=args.sample_steps) -> dict:
        """The prompt scores, FD_dom and alignment of ``model``'s images for the evaluation prompts."""
        per_prompt_prompts = [p for p in prompts for _ in range(args.per_prompt)]
        result = generate_from_prompts(model, encoder, prompts, per_prompt=args.per_prompt, seed=10_000,
                                       sampler=sampler, steps=steps, cfg_scale=scale, batch_size=360,
                                       progress=False, image_shape=image_shape, device=device, autocast_dtype=amp)
        scores = prompt_scores(result.images, per_prompt_prompts, classifier=net, bins=bins)
        fd = evaluate(result.images, metrics=["fd_dom"], reference=test_set, feature_net_dir=net, device=device,
                      progress=False)["fd_dom"]
        aligned = alignment_score(align, result.images, per_prompt_prompts, encoder)
        row = {"method": method, "seed": seed, "cfg_scale": scale, **scores, "fd_dom": fd, **aligned, "train_s": seconds,
               "nfe_per_sample": result.nfe_per_sample}
        log(json.dumps(row))
        return row

    rows = []
    for method in args.methods:
        for seed in args.seeds:
            config = run_config(args, method, seed)
            log("train", method, "seed", seed, "steps", args.steps)
            seconds, model = train(config, device)
            for scale in args.cfg_scales:
                rows.append(score(model, method, seed, scale, seconds))
                if seed == args.seeds[0] and scale == max(args.cfg_scales):
                    grid = generate_from_prompts(model, encoder, GRID_PROMPTS, per_prompt=8, seed=0, sampler="heun",
                                                 steps=args.sample_steps, cfg_scale=scale, progress=False, image_shape=image_shape,
                                                 device=device, autocast_dtype=amp)
                    save_grid(grid.images, harness.DOCS / f"{args.name}_{method}_grid.png", nrow=8)

    if args.one_step_steps:
        rows += one_step_rows(args, list(dict.fromkeys(c.text for caps in captions for c in caps)), score, device, amp)
    summary = summarise(rows, args)
    environment = environment_info(device)
    notes = notes_text(args, real_rows, real_ref, floor, summary, len(train_set), environment)
    title = f"Text-to-image on {'MNIST' if args.data == 'mnist' else 'the digits'}: flow matching vs Self-Flow on captions"
    path = harness.write_result(args.name, summary + rows, COLUMNS, title,
                                notes=notes, extra={"device": str(device), "precision": args.precision,
                                                    "autocast": str(amp).replace("torch.", "") if amp else "none",
                                                    "model_size": args.model_size, "model_dims": dict(zip(("depth", "width", "heads"), args.dims)),
                                                    "batch_size": args.batch_size, "environment": environment, "real_test": real_rows, "real_alignment": real_ref, "fd_dom_floor": floor,
                                                    "prompts": prompts, "grid_prompts": GRID_PROMPTS, "args": {k: str(v) for k, v in vars(args).items()}})
    plot(summary, args, harness.DOCS / f"{args.name}.png")
    log("wrote", path)


def one_step_rows(args, captions: list[str], score, device: torch.device, amp) -> list[dict]:
    """InstaFlow on text: the last method's first-seed run makes pairs from the training captions
    (Heun, guidance ``--pair-cfg``), a student started from it is distilled to one Euler step (l2) on
    them; rows for the student (1 step, no guidance: it is baked in) and the teacher at 1 step."""
    from selfflow.sets import generate_set

    teacher_config = run_config(args, args.methods[-1], args.seeds[0])
    seconds, teacher = train(teacher_config, device)
    pairs = args.work / f"one_step_pairs_{args.methods[-1]}"
    log("pairs:", args.pairs, "from", len(captions), "training captions")
    generate_set(teacher, pairs, num=args.pairs, shard_size=1000, kind="pairs", prompts=captions, text=teacher_config.text,
                 sampler="heun", steps=args.sample_steps, cfg_scale=args.pair_cfg, batch_size=500, device=device,
                 autocast_dtype=amp)
    raw = base_raw(args)
    raw["method"] = {"name": "distill", "steps": 1, "loss": "l2", "class_dropout_prob": 0.0}
    raw["data"] = {"name": "pairs", "path": str(pairs)}
    raw["train"].update(steps=args.one_step_steps, seed=args.seeds[0], init_from=str(teacher_config.train.out_dir),
                        out_dir=str(args.work / f"distill_{args.methods[-1]}"), warmup_steps=0,
                        lr=3e-4 if args.model_size == "tiny" else SIZED_TRAIN["lr"])
    raw["text"] = dataclasses.asdict(teacher_config.text)
    log("distill to one step:", args.one_step_steps, "steps")
    student_seconds, student = train(config_from_dict(raw), device)
    name = args.methods[-1]
    return [score(student, f"{name} → distill (1 step)", args.seeds[0], 1.0, student_seconds, "euler", 1),
            score(teacher, f"{name} teacher (1 step)", args.seeds[0], args.pair_cfg, seconds, "euler", 1)]


def real_prompts(dataset, bins):
    from selfflow.text.captions import HELDOUT_TEMPLATES, fill
    import random

    th = bins.thickness_bin(dataset.images, dataset.labels)
    sl = bins.slant_bin(dataset.images)
    return [fill(HELDOUT_TEMPLATES[k % 2], int(dataset.labels[k]), th[k], sl[k], random.Random(k)).text for k in range(len(dataset))]


def summarise(rows, args):
    out = []
    for method in args.methods:
        for scale in args.cfg_scales:
            group = [r for r in rows if r["method"] == method and r["cfg_scale"] == scale]
            if not group:
                continue
            row = {"method": method, "seed": f"mean of {len(group)}", "cfg_scale": scale}
            for key in COLUMNS[3:]:
                values = [r[key] for r in group if r.get(key) is not None]
                if values:
                    mean = sum(values) / len(values)
                    spread = (max(values) - min(values)) / 2
                    row[key] = f"{mean:.3g} ± {spread:.2g}" if len(values) > 1 else mean
                    row[key + "_mean"] = mean
            out.append(row)
    return out


def notes_text(args, real_rows, real_ref, floor, summary, n_train: int, environment: dict) -> str:
    from selfflow.text.evaluation import evaluation_prompts

    size = "MNIST 28×28" if args.data == "mnist" else "digits 8×8"
    depth, width, heads = args.dims
    precision = {"fp32": "fp32", "bf16": "bf16 autocast"}.get(args.precision) or (
        "auto: bf16 autocast" if environment["device"].startswith("cuda") else "auto: fp32")
    lines = [
        f"Setting: {size} train split ({n_train:,} images × {args.captions_per_image} generated captions), text encoder "
        f"`{args.encoder}`, DiT {'size ' + args.model_size + ', ' if args.model_size != 'tiny' else ''}"
        f"depth {depth} / width {width} / patch {args.patch} with cross-attention to the caption tokens, "
        f"{args.steps} steps, batch {args.batch_size}, "
        f"seeds {args.seeds}. Sampling: Heun, {args.sample_steps} steps, guidance on text at the listed scales; "
        f"{len(evaluation_prompts())} evaluation prompts from held-out templates × {args.per_prompt} images.",
        "",
        f"Device: {environment['device']} ({environment['device_name']}), precision {precision}, torch {environment['torch']}, "
        f"{environment['torch_threads']} CPU threads. The FD_dom classifier trains (or loads) on the device; the alignment "
        f"model trains and scores on the CPU.",
        "",
        f"References: real test images scored with prompts that state their own measured attributes: prompt accuracy "
        f"{real_rows.get('prompt_accuracy', float('nan')):.3f}, thickness agreement {real_rows.get('thickness_agreement') or 0:.3f}, "
        f"slant agreement {real_rows.get('slant_agreement') or 0:.3f} (by construction 1 for the attributes); "
        f"alignment top-1 {real_ref['alignment_top1']:.3f} (chance 0.1). FD_dom floor (real train images, same count, vs test): "
        f"{floor:.3g}. Attribute agreement chance ≈ 1/3.",
        "",
        "± is half the range over the seeds. Rows after the means: one per run.",
        "",
        (f"One step (InstaFlow on text): the {args.methods[-1]} seed-{args.seeds[0]} run made {args.pairs} pairs from the "
         f"training captions (Heun {args.sample_steps} steps, guidance {args.pair_cfg}); a student started from it was "
         f"distilled to one Euler step (l2, {args.one_step_steps} steps, batch {args.batch_size}) and samples without guidance (baked in). "
         f"The teacher's own 1-step row uses guidance {args.pair_cfg}." if args.one_step_steps else ""),
        "",
        f"![metrics]({args.name}.png)",
        "",
        "Samples (EMA, guidance at the largest scale, seed 0); one row per prompt: " + "; ".join(f"`{p}`" for p in GRID_PROMPTS),
        "",
        *[f"![{m}]({args.name}_{m}_grid.png) {m}" for m in args.methods],
    ]
    return "\n".join(lines)


def plot(summary, args, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = ["prompt_accuracy", "thickness_agreement", "slant_agreement", "alignment_top1"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / max(len(summary), 1)
    for i, row in enumerate(summary):
        axes[0].bar([k + i * width for k in range(len(keys))], [row.get(k + "_mean", 0) for k in keys], width,
                    label=f"{row['method']} w={row['cfg_scale']}")
        axes[1].bar(i, row.get("fd_dom_mean", 0), label=f"{row['method']} w={row['cfg_scale']}")
    axes[0].set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], ["prompt acc", "thickness", "slant", "align top-1"])
    axes[0].axhline(1 / 3, color="grey", lw=0.8, ls="--")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    axes[1].set_title("FD_dom (lower is better)")
    axes[1].set_xticks(range(len(summary)), [f"{r['method'][:4]} w={r['cfg_scale']}" for r in summary], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
