"""`selfflow eval`: generate from a checkpoint (or read samples) and report every protocol field.

    selfflow eval --ckpt runs/x --metrics fid,fd_dom,pr,acc --n 10000 --out eval.json
    selfflow eval --samples samples/samples.npz --ckpt runs/x --metrics fd_dom,pr
    selfflow eval train-feature-net --data mnist --data-path data/mnist --out nets/mnist

Sampler, steps, guidance and batch size default to the checkpoint run's own ``sample`` section
(``selfflow.cli`` adds those flags to this parser); the report records the values used.
This module imports nothing from ``selfflow.cli`` or ``selfflow.trainer``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from selfflow.errors import ConfigError, DataError
from selfflow.files import cache_root

__all__ = ["add_eval_parser", "cmd_eval", "load_samples", "cache_root"]


def add_eval_parser(sub):
    """Add the ``eval`` sub-command to ``sub`` and return its parser."""
    p = sub.add_parser("eval", help="evaluate a model: FID, FD_dom, precision/recall, class accuracy, speed")
    p.add_argument("action", nargs="?", default="run", choices=["run", "train-feature-net"],
                   help="run (default): evaluate; train-feature-net: train the FD_dom classifier "
                        "(or, with other --widths/--seed, REPA's feature_net encoder)")
    p.add_argument("--ckpt", help="checkpoint, run or exported model folder")
    p.add_argument("--samples", help="evaluate these samples (.npz: 'images' (N,H,W), (N,H,W,C) or (N,C,H,W), "
                                     "uint8 or float in [-1, 1]; optional 'labels' (N,)) instead of generating")
    p.add_argument("--metrics", default=None, help="comma-separated: fid, fd_dom, pr, acc (default: fd_dom,pr,acc; "
                                                   "an unconditional model: fd_dom,pr)")
    p.add_argument("--n", type=int, default=10000, help="generated images")
    p.add_argument("--data", default=None, help="reference data set (default: the checkpoint's)")
    p.add_argument("--data-path", default=None)
    p.add_argument("--split", default="train", help="reference split (train | test | all)")
    p.add_argument("--num-reference", type=int, default=None, help="first K reference images (default: all)")
    p.add_argument("--image-size", type=int, default=None,
                   help="folder / webdataset / hf references: make images this size (default: the checkpoint's data.image_size)")
    p.add_argument("--crop", default=None, choices=["center", "resize", "random"],
                   help="folder / webdataset / hf references: how (default: the checkpoint's data.crop, else center, ADM's)")
    p.add_argument("--feature-net", default=None, help="FD_dom classifier folder (default: trained once and cached)")
    p.add_argument("--inception", default=None, help="Inception FID weights: the TorchScript .pt archive, read as "
                                                     "weights only (its code never runs)")
    p.add_argument("--seed", type=int, default=0,
                   help="image k uses seed (seed + k); train-feature-net: the training seed")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=None, help="reference statistics and feature nets (default ~/.cache/selfflow)")
    p.add_argument("--out", default=None, help="report JSON (default: eval.json next to the checkpoint); "
                                               "train-feature-net: the network's folder")
    p.add_argument("--train-steps", type=int, default=2000, help="optimisation steps of the feature net when it is trained")
    p.add_argument("--widths", default=None,
                   help="train-feature-net: comma-separated conv widths (default 32,64,128,128, the FD_dom network; "
                        "REPA's encoder: 24,48,96)")
    p.set_defaults(handler=cmd_eval)
    return p


# --------------------------------------------------------------------------------------------
# reading samples
# --------------------------------------------------------------------------------------------
def load_samples(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (N, C, H, W) float32 in [−1, 1] and labels (N,) int64 or None from an ``.npz``.

    ``images`` takes every layout the npz data loader takes ((N, H, W), (N, H, W, C),
    (N, C, H, W); uint8 0..255 or float in [−1, 1], quantised to uint8 as a saved image would be);
    ``labels`` is optional (absent or empty: unconditional samples). Anything else is a
    DataError naming the file, the key and the shape or dtype.
    """
    from selfflow.data.images import npz_images, read_npz
    from selfflow.imageio import uint8_to_float

    file = Path(path)
    arrays = read_npz(file, "samples file")
    if "images" not in arrays:
        raise DataError(f"{file}: no 'images' key (keys: {', '.join(sorted(arrays)) or 'none'})")
    images = uint8_to_float(npz_images(arrays["images"], f"{file}['images']"))
    raw = arrays.get("labels")
    if raw is None or raw.size == 0:
        return images, None
    where = f"{file}['labels']"
    if raw.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers, got dtype {raw.dtype}")
    if raw.shape != (images.shape[0],):
        raise DataError(f"{where}: shape {raw.shape}, expected ({images.shape[0]},) to match the images")
    if int(raw.min()) < 0:
        raise DataError(f"{where}: negative label {int(raw.min())}")
    return images, torch.from_numpy(raw.astype(np.int64))


def check_samples_fit(images: torch.Tensor, labels: torch.Tensor | None, reference, where) -> None:
    """Samples a Fréchet distance can be computed of (at least 2: a covariance), with labels among the
    reference's classes (an accuracy against classes the reference lacks would be a silent 0)."""
    if images.shape[0] < 2:
        raise DataError(f"{where}['images']: {images.shape[0]} image; the metrics need at least 2 (a covariance)")
    classes = int(getattr(reference, "num_classes", 0) or 0)
    if labels is not None and classes and int(labels.max()) >= classes:
        raise DataError(f"{where}['labels']: label {int(labels.max())} is outside the reference's {classes} classes "
                        f"(0..{classes - 1})")


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def _print_table(report: dict) -> None:
    rows = [(k, report[k]) for k in ("fid", "fd_dom", "precision", "recall", "accuracy") if report.get(k) is not None]
    sampling = report.get("sampling", {})
    print(f"{'metric':<12} value")
    for key, value in rows:
        print(f"{key:<12} {value:.4f}")
    if sampling.get("sampler"):
        print(f"sampler={sampling.get('sampler')} steps={sampling.get('steps')} cfg={sampling.get('cfg_scale')} "
              f"nfe/image={sampling.get('nfe_per_sample')} "
              f"ms/image={1e3 * sampling.get('speed', {}).get('seconds_per_image', float('nan')):.3f}")


def _widths(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) <= 0:
        raise ConfigError(f"--widths: expected comma-separated positive integers, got {text!r}")
    return widths


def _train_feature_net(args, device, cache_dir: Path) -> int:
    from selfflow.evaluation.feature_net import FD_DOM_WIDTHS, feature_net_for

    if not args.data or not args.out:
        raise ConfigError("eval train-feature-net needs --data and --out")
    if args.train_steps <= 0:
        raise ConfigError(f"--train-steps must be positive, got {args.train_steps}")
    widths = _widths(args.widths) or FD_DOM_WIDTHS
    _net, folder = feature_net_for(args.data, args.data_path, device, cache_dir, args.train_steps, Path(args.out),
                                   seed=args.seed, widths=widths, data_options=_reference_options(args, {}))
    print(f"wrote {folder}")
    return 0


def cmd_eval(args) -> int:
    from selfflow.device import resolve_device
    from selfflow.evaluation.metrics import METRICS, evaluate

    device = resolve_device(args.device, "--device")
    cache_dir = Path(args.cache_dir) if args.cache_dir else cache_root()
    if args.action == "train-feature-net":
        return _train_feature_net(args, device, cache_dir)

    metrics = [m.strip() for m in (args.metrics or "fd_dom,pr,acc").split(",") if m.strip()]
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ConfigError(f"--metrics: unknown {unknown}; known: {', '.join(METRICS)}")
    if args.n <= 0:
        raise ConfigError(f"--n must be positive, got {args.n}")
    if not args.ckpt and not (args.samples and args.data):
        raise ConfigError("give --ckpt (to generate) or --samples with --data")
    inception = None
    if "fid" in metrics:  # before any work: a missing weight file should not cost a generation
        from selfflow.evaluation.inception import resolve_inception_path

        try:
            inception = resolve_inception_path(args.inception)
        except FileNotFoundError as exc:
            raise ConfigError(f"--inception: {exc}") from None

    images = labels = None
    if args.samples:  # read (and check) the file before loading a model or training anything
        images, labels = load_samples(args.samples)

    data_name, data_path, model, folder, settings = args.data, args.data_path, None, None, None
    run_data: dict = {}
    if args.ckpt:
        from selfflow.config import sample_settings
        from selfflow.files import read_json
        from selfflow.loader import load_model

        loaded = load_model(args.ckpt, "ema", device, expect="image")
        model, folder = loaded.model, loaded.folder
        if "acc" in metrics and not model.num_classes and args.metrics is None:
            metrics.remove("acc")  # the default set, less what needs classes
        elif "acc" in metrics and not model.num_classes:
            raise ConfigError(f"--metrics acc: {folder} is an unconditional model (no classes to check); "
                              f"leave acc out of --metrics")
        run = read_json(folder / "config.json").get("run") or {}
        if not data_name or data_name == (run.get("data") or {}).get("name"):  # the training data's preprocessing too
            run_data = run.get("data") or {}
        data_name = data_name or (run.get("data") or {}).get("name")
        data_path = data_path or (run.get("data") or {}).get("path")
        if images is None:
            settings = sample_settings(folder, sampler=getattr(args, "sampler", None), steps=getattr(args, "steps", None),
                                       cfg_scale=getattr(args, "cfg_scale", None),
                                       batch_size=getattr(args, "batch_size", None), num_classes=model.num_classes)
            from selfflow.sampling import parse_sampler_options

            args.sampler_options = parse_sampler_options(getattr(args, "sampler_option", None) or [], settings.sampler,
                                                          settings.steps)
    if not data_name:
        raise ConfigError("the reference data set is unknown: pass --data")

    from selfflow.data import load_dataset

    options = _reference_options(args, run_data)
    reference = load_dataset(data_name, path=data_path, split=args.split, **options)
    if args.num_reference is not None and not 2 <= args.num_reference <= len(reference):
        raise ConfigError(f"--num-reference: {args.num_reference}, the {data_name} {args.split} split has "
                          f"{len(reference)} images (need 2..{len(reference)})")
    if images is not None and tuple(images.shape[1:]) != tuple(reference.shape):
        raise DataError(f"{args.samples}['images']: images of shape {tuple(images.shape[1:])} (C, H, W), "
                        f"but the reference set {data_name} has {tuple(reference.shape)}")
    if images is not None:
        check_samples_fit(images, labels, reference, args.samples)

    if images is not None:
        sampling: dict = {"source": str(args.samples)}
    else:
        images, labels, sampling = _generate(model, folder, settings, args, device)

    net = None
    if {"fd_dom", "pr", "acc"} & set(metrics):
        if args.feature_net:
            net = args.feature_net
        else:
            from selfflow.evaluation.feature_net import feature_net_for

            net = feature_net_for(data_name, data_path, device, cache_dir, args.train_steps, data_options=options)[1]
    report = evaluate(images, labels, metrics=metrics, reference=reference, num_reference=args.num_reference,
                      feature_net_dir=net, inception_path=inception, device=device,
                      cache_dir=cache_dir / "reference_stats", sampling=sampling)
    out = Path(args.out) if args.out else (folder / "eval.json" if folder else Path("eval.json"))
    from selfflow.files import atomic_file

    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps({"written_by": "eval", **report}, indent=2, default=str))  # --out's rule reads written_by
    _print_table(report)
    print(f"wrote {out}")
    return 0


def _reference_options(args, run_data: dict) -> dict:
    """image_size / crop (and the streamed sources' columns) for the reference set: the flags, else the training run's."""
    if args.image_size is not None and args.image_size <= 0:
        raise ConfigError(f"--image-size must be positive, got {args.image_size}")
    options = {"image_size": args.image_size if args.image_size is not None else run_data.get("image_size")}
    for key in ("crop", "image_column", "label_column"):
        value = getattr(args, key, None) or run_data.get(key)
        if value is not None:
            options[key] = value
    return options


def _generate(model, folder: Path, settings, args, device) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Generate ``args.n`` images with the resolved sampling settings; time the sampler too."""
    from selfflow.evaluation.metrics import measure_sampler_speed
    from selfflow.sampling import generate

    shape = (model.in_channels, model.image_size, model.image_size)
    seeds = list(range(args.seed, args.seed + args.n))
    from selfflow.device import autocast_dtype

    common = dict(sampler=settings.sampler, steps=settings.steps, cfg_scale=settings.cfg_scale,
                  batch_size=settings.batch_size, device=device, image_shape=shape,
                  autocast_dtype=autocast_dtype(args.precision, device), sampler_options=args.sampler_options)
    result = generate(model, num_samples=args.n, seeds=seeds, **common)  # its bar: a total and images/s
    speed = measure_sampler_speed(lambda k: generate(model, num_samples=k, progress=False, **common),
                                  min(settings.batch_size, args.n), warmup=1, device=device)
    sampling = {"checkpoint": str(folder), "weights": "ema", "sampler": settings.sampler, "steps": settings.steps,
                "cfg_scale": settings.cfg_scale, "batch_size": settings.batch_size, "precision": args.precision,
                "seeds": [seeds[0], seeds[-1]],
                "nfe_per_sample": result.nfe_per_sample, "generation_wall_time_s": result.wall_time_s, "speed": speed}
    if args.sampler_options:
        sampling["sampler_options"] = args.sampler_options
    return result.images, result.labels, sampling
