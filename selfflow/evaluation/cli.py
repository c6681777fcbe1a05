"""`selfflow eval`: generate from a checkpoint (or read samples) and report every protocol field.

    selfflow eval --ckpt runs/x --metrics fid,fd_dom,pr,acc --n 10000 --out eval.json
    selfflow eval --samples samples/samples.npz --ckpt runs/x --metrics fd_dom,pr
    selfflow eval train-feature-net --data mnist --data-path data/mnist --out nets/mnist
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def cache_root() -> Path:
    return Path(os.environ.get("SELFFLOW_CACHE", Path.home() / ".cache" / "selfflow"))


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: FID, FD_dom, precision/recall, class accuracy, speed")
    p.add_argument("action", nargs="?", default="run", choices=["run", "train-feature-net"],
                   help="run (default): evaluate; train-feature-net: train the FD_dom classifier")
    p.add_argument("--ckpt", help="checkpoint, run or exported model folder")
    p.add_argument("--samples", help="evaluate these samples (.npz from `selfflow sample`) instead of generating")
    p.add_argument("--metrics", default="fd_dom,pr,acc", help="comma-separated: fid, fd_dom, pr, acc")
    p.add_argument("--n", type=int, default=10000, help="generated images")
    p.add_argument("--data", default=None, help="reference data set (default: the checkpoint's)")
    p.add_argument("--data-path", default=None)
    p.add_argument("--split", default="train", help="reference split (train | test | all)")
    p.add_argument("--num-reference", type=int, default=None, help="first K reference images (default: all)")
    p.add_argument("--feature-net", default=None, help="FD_dom classifier folder (default: trained once and cached)")
    p.add_argument("--inception", default=None, help="Inception FID weights (TorchScript .pt)")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=None, help="reference statistics and feature nets (default ~/.cache/selfflow)")
    p.add_argument("--out", default=None, help="report JSON (default: eval.json next to the checkpoint / feature net folder)")
    p.add_argument("--train-steps", type=int, default=2000, help="optimisation steps of the FD_dom feature net when it is trained")
    p.set_defaults(handler=cmd_eval)


def _dataset(name: str, path: str | None, split: str):
    from selfflow.data import load_dataset

    return load_dataset(name, path=path, split=split)


def feature_net_for(name: str, path: str | None, device, cache_dir: Path, steps: int = 2000, out: Path | None = None):
    """Load the data set's FD_dom classifier from the cache, training it once if needed."""
    from selfflow.evaluation.feature_net import load_feature_net, save_feature_net, train_feature_net

    from selfflow.evaluation.feature_net import FeatureNetConfig

    train = _dataset(name, path, "train")
    # The cache name carries everything that shapes the network: data, size, steps, architecture.
    widths = "-".join(str(w) for w in FeatureNetConfig(in_channels=train.channels, num_classes=train.num_classes, image_size=train.image_size).widths)
    folder = out or cache_dir / "feature_nets" / f"{name}_{len(train)}_{train.shape[0]}x{train.shape[1]}x{train.shape[2]}_s{steps}_w{widths}"
    if (folder / "model.safetensors").exists() and out is None:
        return load_feature_net(folder, device), folder
    x, y = train.get_batch(torch.arange(len(train)))
    print(f"training the FD_dom feature net on {name} train ({len(train)} images, {steps} steps) → {folder}")
    net = train_feature_net(x, y, train.num_classes, steps=steps, seed=0, device=device)
    test = _dataset(name, path, "test") if name in ("digits", "mnist") else None
    meta = {"data": name, "train_count": len(train)}
    if test is not None:
        xt, yt = test.get_batch(torch.arange(len(test)))
        meta["test_accuracy"] = float((net.predict(xt) == yt).float().mean())
        print(f"feature net test accuracy: {meta['test_accuracy']:.4f}")
    save_feature_net(net, folder, metadata=meta)
    return net, folder


def _print_table(report: dict) -> None:
    rows = [(k, report[k]) for k in ("fid", "fd_dom", "precision", "recall", "accuracy") if report.get(k) is not None]
    sampling = report.get("sampling", {})
    print(f"{'metric':<12} value")
    for key, value in rows:
        print(f"{key:<12} {value:.4f}")
    if sampling:
        print(f"sampler={sampling.get('sampler')} steps={sampling.get('steps')} cfg={sampling.get('cfg_scale')} "
              f"nfe/image={sampling.get('nfe_per_sample')} "
              f"ms/image={1e3 * sampling.get('speed', {}).get('seconds_per_image', float('nan')):.3f}")


def cmd_eval(args) -> int:
    import numpy as np

    from selfflow.config import ConfigError
    from selfflow.evaluation.metrics import METRICS, evaluate
    from selfflow.trainer import resolve_device

    device = resolve_device(args.device)
    cache_dir = Path(args.cache_dir) if args.cache_dir else cache_root()
    if args.action == "train-feature-net":
        if not args.data or not args.out:
            raise ConfigError("eval train-feature-net needs --data and --out")
        _net, folder = feature_net_for(args.data, args.data_path, device, cache_dir, args.train_steps, Path(args.out))
        print(f"wrote {folder}")
        return 0

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ConfigError(f"--metrics: unknown {unknown}; known: {', '.join(METRICS)}")
    if args.n <= 0:
        raise ConfigError(f"--n must be positive, got {args.n}")
    if not args.ckpt and not (args.samples and args.data):
        raise ConfigError("give --ckpt (to generate) or --samples with --data")

    data_name, data_path, model, folder = args.data, args.data_path, None, None
    if args.ckpt:
        from selfflow.checkpoint import read_json
        from selfflow.model import load_generator

        model, folder = load_generator(args.ckpt, "ema", device)
        if "acc" in metrics and not model.num_classes:
            raise ConfigError(f"--metrics acc: {folder} is an unconditional model (no classes to check); "
                              f"leave acc out of --metrics")
        run = read_json(folder / "config.json").get("run", {})
        data_name = data_name or run.get("data", {}).get("name")
        data_path = data_path or run.get("data", {}).get("path")
    if not data_name:
        raise ConfigError("the reference data set is unknown: pass --data")

    sampling: dict = {}
    if args.samples:
        archive = np.load(args.samples, allow_pickle=False)
        images = torch.from_numpy(archive["images"]).float() / 127.5 - 1
        labels = torch.from_numpy(archive["labels"]).long() if archive["labels"].size else None
        sampling = {"source": str(args.samples)}
    else:
        from selfflow.evaluation.metrics import measure_sampler_speed
        from selfflow.sampling import generate

        shape = (model.in_channels, model.image_size, model.image_size)
        seeds = list(range(args.seed, args.seed + args.n))
        result = generate(model, num_samples=args.n, seeds=seeds, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                          batch_size=args.batch_size, device=device, image_shape=shape)
        images, labels = result.images, result.labels
        speed_n = min(args.batch_size, args.n)
        speed = measure_sampler_speed(
            lambda k: generate(model, num_samples=k, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                               batch_size=args.batch_size, device=device, image_shape=shape, progress=False),
            speed_n, warmup=1, device=device,
        )
        sampling = {"checkpoint": str(folder), "weights": "ema", "sampler": args.sampler, "steps": args.steps,
                    "cfg_scale": args.cfg_scale, "seeds": [seeds[0], seeds[-1]], "nfe_per_sample": result.nfe_per_sample,
                    "generation_wall_time_s": result.wall_time_s, "speed": speed}

    reference = _dataset(data_name, data_path, args.split)
    net = None
    if {"fd_dom", "pr", "acc"} & set(metrics):
        if args.feature_net:
            net = args.feature_net
        else:
            net = feature_net_for(data_name, data_path, device, cache_dir, args.train_steps)[1]
    report = evaluate(images, labels, metrics=metrics, reference=reference, num_reference=args.num_reference,
                      feature_net_dir=net, inception_path=args.inception, device=device,
                      cache_dir=cache_dir / "reference_stats", sampling=sampling)
    out = Path(args.out) if args.out else (folder / "eval.json" if folder else Path("eval.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    _print_table(report)
    print(f"wrote {out}")
    return 0
