"""``selfflow synth`` and ``selfflow represent train|probe`` (docs/methods.md#stablerep).

    selfflow synth --ckpt runs/teacher --captions classes --per-caption 4 --n 1500 --out sets/digits_classes
    selfflow synth --ckpt runs/teacher --captions variations --per-caption 4 --n 1500 --sampler sde --out sets/var
    selfflow synth --ckpt runs/text_teacher --captions captions.txt --per-caption 4 --n 1200 --out sets/text
    selfflow represent train --config configs/digits_stablerep.yaml [--set data.path=sets/inst]
    selfflow represent probe --config configs/digits_stablerep.yaml [--ckpt RUN] [--out DIR]

``probe`` reads the encoder from the run folder (``train.out_dir``) unless ``--ckpt`` names another,
and writes ``probe.json`` (and prints it) into ``--out`` (default: the run folder).
"""
from __future__ import annotations

import json
from pathlib import Path

from selfflow.arguments import add_ckpt_argument


def add_parsers(sub, add_sampling_arguments) -> None:
    p = sub.add_parser("synth", help="generate a captioned synthetic set for StableRep (resumable shards)")
    add_ckpt_argument(p, "--generator", help="checkpoint, run or exported model folder (a teacher or a one-step student)")
    p.add_argument("--captions", required=True, help="classes | variations | FILE (text captions, one per line)")
    p.add_argument("--per-caption", type=int, required=True, help="m: images per caption, generated together")
    p.add_argument("--n", type=int, required=True, help="number of images (a multiple of --per-caption)")
    p.add_argument("--out", required=True, help="set folder; run again to resume")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--churn", type=float, default=0.6, help="variations: SDE noise acts while t <= churn (0 < churn <= 1)")
    add_sampling_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.set_defaults(handler=cmd_synth)

    r = sub.add_parser("represent", help="train an encoder (stablerep, simclr, supervised) or probe one")
    rsub = r.add_subparsers(dest="represent_command", required=True)
    t = rsub.add_parser("train", help="train an encoder from a YAML config (selfflow train with the method checked)")
    t.add_argument("--config", required=True)
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--print-config", action="store_true")
    t.set_defaults(handler=cmd_represent_train)
    q = rsub.add_parser("probe", help="linear, k-NN and few-shot probes of a trained encoder on real images")
    q.add_argument("--config", required=True, help="the run's YAML config (its train.out_dir holds the encoder)")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    q.add_argument("--ckpt", default=None, help="checkpoint or run folder (default: the config's train.out_dir)")
    q.add_argument("--data", default="digits", help="real labelled images with train and test splits: digits | mnist | ...")
    q.add_argument("--data-path", default=None)
    q.add_argument("--weights", default="model", choices=["model", "ema"])
    q.add_argument("--max-iter", type=int, default=1000, help="linear probe: L-BFGS iterations at most (stops once converged)")
    q.add_argument("--few-shot", default="1,5,10", help="labelled images per class, comma-separated")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="auto")
    q.add_argument("--out", default=None, help="folder for probe.json (default: the checkpoint's run folder)")
    q.set_defaults(handler=cmd_represent_probe)


def cmd_synth(args) -> int:
    from selfflow.config import sample_settings
    from selfflow.device import autocast_dtype, resolve_device
    from selfflow.errors import ConfigError
    from selfflow.loader import folder_kind, load_model
    from selfflow.represent.synth import make_synth_set, plan

    for name in ("n", "shard_size", "per_caption"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    device = resolve_device(args.device)
    # a caption-conditioned generator takes --captions FILE (selfflow.text); a label or unconditional one any captions
    loaded = load_model(args.ckpt, args.weights, device, expect="text" if folder_kind(args.ckpt) == "text" else "image")
    model, folder, text = loaded.model, loaded.folder, loaded.text
    classes = 0 if text is not None else int(model.num_classes or 0)
    s = sample_settings(folder, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, batch_size=args.batch_size,
                        num_classes=None if text is not None else model.num_classes)  # text: guidance on the null caption
    plan(args.captions, args.per_caption, args.n, classes, s.sampler, s.steps, text is not None)  # refuse before any work
    from selfflow.sampling import parse_sampler_options

    options = parse_sampler_options(args.sampler_option, s.sampler, s.steps)  # variations refuse them (make_synth_set)
    shards = make_synth_set(
        model, args.out, captions=args.captions, per_caption=args.per_caption, num=args.n, shard_size=args.shard_size,
        seed=args.seed, sampler=s.sampler, steps=s.steps, cfg_scale=s.cfg_scale, churn=args.churn, batch_size=s.batch_size,
        device=device, autocast_dtype=autocast_dtype(args.precision, device),
        source={"checkpoint": str(folder.resolve()), "weights": args.weights}, text=text, sampler_options=options,
        on_shard=lambda index, path: print(f"wrote {path}", flush=True), progress=True,
    )
    print(f"set complete: {args.out} ({shards.num} images, {args.per_caption} per caption, captions: {args.captions})")
    return 0


def _load(args):
    from selfflow.config import REPRESENT_METHODS, ConfigError, load_config

    config = load_config(args.config, args.overrides)
    if config.method_name() not in REPRESENT_METHODS:
        raise ConfigError(f"{args.config}: method.name={config.method_name()} is not a representation method "
                          f"({', '.join(REPRESENT_METHODS)}); use selfflow train")
    return config


def cmd_represent_train(args) -> int:
    from selfflow.trainer import train

    config = _load(args)
    if args.print_config:
        print(config.to_json())
        return 0
    result = train(config)
    return 0 if result["status"] in ("finished", "interrupted", "time_limit") else 1


def cmd_represent_probe(args) -> int:
    from selfflow.config import ConfigError, ProbeConfig, from_dict
    from selfflow.data import load_dataset
    from selfflow.device import resolve_device
    from selfflow.files import write_json
    from selfflow.represent.probes import load_encoder, run_probes

    config = _load(args)
    try:
        shots = [int(v) for v in args.few_shot.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--few-shot {args.few_shot!r}: expected comma-separated integers, e.g. 1,5,10") from None
    values = {"data": args.data, "path": args.data_path, "weights": args.weights, "max_iter": args.max_iter, "few_shot": shots,
              "seed": args.seed, "device": args.device}
    try:
        probe = from_dict(ProbeConfig, values, "probe")
    except ConfigError as exc:
        flags = {"data": "--data", "path": "--data-path", "max_iter": "--max-iter", "few_shot": "--few-shot", "device": "--device"}
        message = str(exc)
        for key, flag in flags.items():
            message = message.replace(f"probe.{key}", flag)
        raise ConfigError(message) from None
    device = resolve_device(probe.device)
    encoder, folder, _ = load_encoder(args.ckpt or config.train.out_dir, probe.weights, device)
    train_set = load_dataset(probe.data, path=probe.path, split="train", image_size=encoder.image_size, channels=encoder.in_channels)
    test_set = load_dataset(probe.data, path=probe.path, split="test", image_size=encoder.image_size, channels=encoder.in_channels)
    if train_set.name in ("folder", "npz") and train_set.source == test_set.source:  # the path is the split: one set for both
        raise ConfigError(f"--data {probe.data} --data-path {probe.path}: one file or folder is one split, so the probe would "
                          f"test on its training images (a leaked accuracy); use a data set with train and test splits "
                          f"(digits, mnist, fashion-mnist, idx)")
    result = {"checkpoint": str(folder), "method": config.method_name(), "probe": probe.__dict__ | {"few_shot": shots},
              **run_probes(encoder, train_set, test_set, probe, device)}
    out = Path(args.out) if args.out else folder.parent.parent
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "probe.json")
    print(json.dumps({k: result[k] for k in ("linear", "knn")} | {"few_shot": {k: v["mean"] for k, v in result["few_shot"].items()}}))
    print(f"wrote {out / 'probe.json'}")
    return 0
