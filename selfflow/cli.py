"""The ``selfflow`` command line.

    selfflow train --config configs/digits_flow_matching.yaml [--set train.lr=3e-4 ...]
    selfflow sample --ckpt runs/x --n 64 --out samples/
    selfflow export --ckpt runs/x --out model/
    selfflow quickstart
    selfflow data fetch mnist --to data/mnist

Errors in input (config, data, checkpoints) print one line naming the problem and exit with 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from selfflow.arguments import add_ckpt_argument


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        from selfflow.arguments import HelpFormatter

        kwargs.setdefault("formatter_class", HelpFormatter)  # every --help shows the defaults
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        if not kwargs.get("help") and kwargs.get("default") not in (None, False, [], argparse.SUPPRESS):
            kwargs["help"] = "(default: %(default)s)"  # an option without help text still shows its default
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):  # argparse's own errors: one line, exit 2
        self.exit(2, f"selfflow: error: {message} (see {self.prog} --help)\n")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", help="YAML file (see configs/); defaults when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.lr=3e-4")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


DISTILL_KINDS = {"reflow": "reflow", "one-step": "distill", "dmd": "dmd", "dmd2": "dmd2"}  # subcommand → method.name


def _add_distill(sub) -> None:
    p = sub.add_parser("distill", help="one-step generation: selfflow train with the method checked (reflow, one-step, dmd, dmd2)")
    p.add_argument("kind", choices=list(DISTILL_KINDS), help="reflow | one-step (method distill) | dmd | dmd2")
    p.add_argument("--config", required=True, help="YAML file (see configs/digits_reflow.yaml, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def add_sampling_arguments(p) -> None:
    """--sampler, --steps, --cfg-scale, --batch-size: default to the checkpoint's own ``sample`` section;
    --sampler-option KEY=VALUE (repeatable): a keyword option of the chosen sampler."""
    p.add_argument("--sampler", default=None, help="euler | heun | sde | dopri5 | sit_sde (default: the run's sample.sampler)")
    p.add_argument("--sampler-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword option of the sampler, parsed like --set values (repeatable), e.g. sit_sde's "
                        "last_step_size=0.04, guidance_interval=[0,0.7]; dopri5's rtol=1e-4")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default: the run's sample.steps)")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale, 1 = off (default: the run's)")
    p.add_argument("--batch-size", type=int, default=None, help="images per network batch (default: the run's sample.batch_size)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="network precision: auto = bf16 autocast on CUDA, fp32 on the CPU (as in training)")


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate images from a checkpoint (PNG grid + .npz)")
    add_ckpt_argument(p)
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--out", required=True, help="output folder")
    add_sampling_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="image k uses seed (seed + k)")
    p.add_argument("--labels", default=None, help="comma-separated class labels (cycled); default: (seed + k) mod classes")
    p.add_argument("--prompt", action="append", default=None,
                   help="caption-conditioned models: a prompt (repeatable); --n images in all, one grid row per prompt")
    p.add_argument("--prompts", default=None, help="caption-conditioned models: a text file, one prompt per line")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="which weights of a training checkpoint")
    p.add_argument("--autoencoder", default=None,
                   help="latent models: the autoencoder folder that decodes the samples (default: the one the latent set names)")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export the generator (EMA weights, no training-only parts) as a model folder")
    add_ckpt_argument(p)
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="which weights of a training checkpoint")
    p.add_argument("--format", default="selfflow", choices=["selfflow", "diffusers"],
                   help="selfflow: model.safetensors + config.json + model card (selfflow.load reads it); diffusers: a "
                        "SelfFlowPipeline folder (model_index.json, transformer/, scheduler/; pip install selfflow[diffusers])")


def _add_generate_set(sub) -> None:
    p = sub.add_parser("generate-set", help="generate N images (or reflow pairs) into resumable safetensors shards")
    add_ckpt_argument(p)
    p.add_argument("--out", required=True, help="set folder (set.json + shard_NNNNN.safetensors); run again to resume")
    p.add_argument("--n", type=int, required=True, help="number of items")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--kind", default="images", choices=["images", "pairs"], help="images: uint8; pairs: (noise, sample) float32 for reflow")
    add_sampling_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="item k uses seed (seed + k)")
    p.add_argument("--labels", default=None, help="comma-separated class labels (cycled); default: (seed + k) mod classes")
    p.add_argument("--prompt", action="append", default=None,
                   help="caption-conditioned models: a prompt (repeatable); item k uses prompt k mod P, set.json lists them")
    p.add_argument("--prompts", default=None, help="caption-conditioned models: a text file, one prompt per line")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default="ema", choices=["ema", "model"])


def _add_encode_latents(sub) -> None:
    p = sub.add_parser("encode-latents", help="encode a data set with a local autoencoder into latent shards (resumable)")
    p.add_argument("--data", default="folder", help="digits | mnist | fashion-mnist | idx | folder | npz")
    p.add_argument("--data-path", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this size first (e.g. 256)")
    p.add_argument("--channels", type=int, default=None, help="1 or 3; default: what the autoencoder takes")
    p.add_argument("--crop", default=None, choices=["center", "resize"],
                   help="folder / webdataset / hf: center (default; ADM's centre crop) or resize (squash)")
    p.add_argument("--on-bad-image", default="error", choices=["error", "skip"],
                   help="folder / webdataset / hf: an unreadable image stops the run (error) or is left out (skip)")
    p.add_argument("--image-column", default=None, help="hf: the image column (default image); webdataset: the image's extension")
    p.add_argument("--label-column", default=None, help="hf: the label column (default label); webdataset: the label's extension (cls)")
    p.add_argument("--num-workers", type=int, default=0, help="folder / webdataset / hf: processes decoding images ahead")
    p.add_argument("--autoencoder", required=True, help="a diffusers AutoencoderKL folder or a selfflow autoencoder folder")
    p.add_argument("--out", required=True, help="latent set folder (set.json + shards); run again to resume")
    p.add_argument("--shard-size", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--posterior", default="mean", choices=["mean", "sample"], help="sample: item k's draw uses seed (seed + k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored precision of the latents")
    p.add_argument("--device", default="auto")


def _add_quickstart(sub) -> None:
    p = sub.add_parser("quickstart", help="the pipeline on the bundled digits: teacher, one-step student, StableRep, probes, report (CPU, ~4 min)")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--steps", type=int, default=None, help="override the teacher's training steps")
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="every stage a few steps: checks an installation in seconds (numbers meaningless)")


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="data set tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="download a data set with hash checks")
    f.add_argument("name", choices=["mnist", "fashion-mnist"])
    f.add_argument("--to", required=True, help="destination folder")
    f.add_argument("--base-url", default=None, help="mirror to download from (default: the set's usual mirrors)")


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="import a SiT, REPA or official Self-Flow checkpoint as a model folder (reads .pt safely)")
    add_ckpt_argument(p, required=False, help="the checkpoint file: .pt/.pth (read without running code) or .safetensors")
    p.add_argument("file", nargs="?", default=None, help="the checkpoint file, as --ckpt (deprecated: use --ckpt)")
    p.add_argument("--from", dest="source", required=True, choices=["selfflow-official", "sit", "repa"], help="the file's layout")
    p.add_argument("--out", required=True, help="model folder to write (model.safetensors + config.json)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="a training dict's EMA or raw weights")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (default: from the file's args, else width/64; XL: 16)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes, when the label table has no null row (default: the table's last row is the null label)")
    p.add_argument("--patch-size", type=int, default=None, help="only for a Linear patch embedding without pos_embed")
    p.add_argument("--pixels", action="store_true", help="the model generates pixels (default: autoencoder latents, as published)")


def build_parser() -> argparse.ArgumentParser:
    from selfflow import __version__

    parser = _Parser(prog="selfflow", description="Self-Flow and friends: flow-matching transformers that learn their own representations.")
    parser.add_argument("--version", action="version", version=f"selfflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_distill(sub)
    _add_sample(sub)
    _add_export(sub)
    _add_generate_set(sub)
    _add_encode_latents(sub)
    _add_quickstart(sub)
    _add_data(sub)
    _add_import(sub)
    try:
        from selfflow.evaluation.cli import add_eval_parser
    except ImportError:
        pass
    else:
        add_sampling_arguments(add_eval_parser(sub))
    from selfflow.represent.cli import add_parsers as add_represent_parsers

    add_represent_parsers(sub, add_sampling_arguments)  # synth, represent train|probe
    from selfflow.modalities.cli import add_parsers as add_modality_parsers

    add_modality_parsers(sub)  # modality sample|eval
    from selfflow.quickstart import add_pipeline_parser

    add_pipeline_parser(sub)
    from selfflow.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)  # serve (FastAPI and uvicorn load only when it runs)
    _add_force_flags(parser)
    return parser


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from selfflow.config import load_config
    from selfflow.trainer import train

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(config.to_json())
        return 0
    result = train(config)
    return 0 if result["status"] in ("finished", "interrupted", "time_limit") else 1


def cmd_distill(args) -> int:
    """``selfflow train`` whose config must name the subcommand's method."""
    from selfflow.config import ConfigError, load_config

    wanted = DISTILL_KINDS[args.kind]
    name = load_config(args.config, args.overrides).method_name()
    if name != wanted:
        raise ConfigError(f"{args.config}: method.name={name} but `selfflow distill {args.kind}` trains method.name={wanted}")
    return cmd_train(args)


def resolved_sampling(args, folder, model=None):
    """The checkpoint's ``sample`` settings with the command's flags on top (``args`` gains them);
    ``model`` (when given) refuses guidance on an unconditional model; ``args.sampler_options``: the
    ``--sampler-option`` values, checked against the sampler's keyword options."""
    from selfflow.config import sample_settings
    from selfflow.sampling import parse_sampler_options

    settings = sample_settings(folder, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                               batch_size=args.batch_size, num_classes=getattr(model, "num_classes", None))
    args.sampler, args.steps, args.cfg_scale, args.batch_size = settings.sampler, settings.steps, settings.cfg_scale, settings.batch_size
    args.sampler_options = parse_sampler_options(args.sampler_option, settings.sampler, settings.steps)
    return settings


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from selfflow.config import ConfigError
    from selfflow.imageio import save_grid, to_uint8
    from selfflow.loader import folder_kind, load_model
    from selfflow.sampling import generate, parse_labels
    from selfflow.device import autocast_dtype, resolve_device

    from selfflow.text.cli import sample_prompts

    if args.prompt or args.prompts or folder_kind(args.ckpt) == "text":  # captions (selfflow.text)
        return sample_prompts(args, resolved_sampling)
    if args.n <= 0:
        raise ConfigError(f"--n must be positive, got {args.n}")
    device = resolve_device(args.device)
    loaded = load_model(args.ckpt, args.weights, device, expect="image")
    model, folder = loaded.model, loaded.folder
    settings = resolved_sampling(args, folder, model)
    values = parse_labels(args.labels, model.num_classes)
    labels = torch.tensor([values[k % len(values)] for k in range(args.n)], dtype=torch.long) if values else None
    seeds = list(range(args.seed, args.seed + args.n))
    autoencoder = _latent_autoencoder(folder, args.autoencoder)
    if autoencoder is not None:
        return _sample_latent_model(args, model, folder, device, labels, seeds, autoencoder)
    result = generate(
        model, num_samples=args.n, seeds=seeds, labels=labels, sampler=settings.sampler, steps=settings.steps,
        cfg_scale=settings.cfg_scale, batch_size=settings.batch_size, device=device,
        image_shape=(model.in_channels, model.image_size, model.image_size), autocast_dtype=autocast_dtype(args.precision, device),
        sampler_options=args.sampler_options,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_grid(result.images, out / "grid.png")
    pixels = to_uint8(result.images).numpy()
    np.savez(out / "samples.npz", images=pixels, labels=(result.labels.numpy() if result.labels is not None else np.zeros(0)), seeds=np.array(seeds))
    info = {
        "checkpoint": str(folder), "weights": args.weights, "n": args.n, "sampler": args.sampler, "steps": args.steps,
        "cfg_scale": args.cfg_scale, "precision": args.precision, "seeds": [seeds[0], seeds[-1]], "nfe_per_sample": result.nfe_per_sample,
        "wall_time_s": result.wall_time_s, "device": str(device),
    }
    if args.sampler_options:
        info["sampler_options"] = args.sampler_options
    (out / "samples.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {out / 'grid.png'} and {out / 'samples.npz'} ({args.n} images, {result.nfe_per_sample:g} evaluations each)")
    return 0


def _latent_autoencoder(folder: Path, given: str | None) -> str | None:
    """None for a pixel model; for a latent model the autoencoder folder, or "" when none is at hand."""
    from selfflow.api import latent_autoencoder

    return latent_autoencoder(folder, given)


def _sample_latent_model(args, model, folder, device, labels, seeds, autoencoder: str) -> int:
    """A latent model: sample latents (unclipped), decode them when the autoencoder is at hand."""
    import numpy as np
    import torch

    from selfflow.autoencoders import decode_latents, load_autoencoder
    from selfflow.device import autocast_dtype
    from selfflow.files import save_tensors
    from selfflow.imageio import save_grid, to_uint8
    from selfflow.sampling import generate

    result = generate(model, num_samples=len(seeds), seeds=seeds, labels=labels, sampler=args.sampler, steps=args.steps,
                      cfg_scale=args.cfg_scale, batch_size=args.batch_size, device=device, clip=False,
                      image_shape=(model.in_channels, model.image_size, model.image_size),
                      autocast_dtype=autocast_dtype(args.precision, device), sampler_options=args.sampler_options)
    latents, labels = result.images, result.labels
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"latents": latents, "seeds": torch.tensor(seeds, dtype=torch.int64)}
    if labels is not None:
        tensors["labels"] = labels
    save_tensors(tensors, out / "latents.safetensors")
    written = [out / "latents.safetensors"]
    if autoencoder:
        images = decode_latents(load_autoencoder(autoencoder, device).decode, latents, args.batch_size, device)
        save_grid(images, out / "grid.png")
        pixels = to_uint8(images).numpy()
        np.savez(out / "samples.npz", images=pixels, labels=(labels.numpy() if labels is not None else np.zeros(0)), seeds=np.array(seeds))
        written += [out / "grid.png", out / "samples.npz"]
    info = {"checkpoint": str(folder), "weights": args.weights, "n": args.n, "sampler": args.sampler, "steps": args.steps,
            "cfg_scale": args.cfg_scale, "precision": args.precision, "seeds": [seeds[0], seeds[-1]], "latent": True, "autoencoder": autoencoder or None,
            "nfe_per_sample": result.nfe_per_sample, "device": str(device)}
    if args.sampler_options:
        info["sampler_options"] = args.sampler_options
    (out / "samples.json").write_text(json.dumps(info, indent=2))
    hint = "" if autoencoder else " (no autoencoder at hand: pass --autoencoder DIR to decode)"
    print(f"wrote {', '.join(str(p) for p in written)}{hint}")
    return 0


def cmd_export(args) -> int:
    """Any generator folder → an exported model folder that keeps its kind's sections and the run's sampler settings."""
    from selfflow.api import export_model
    from selfflow.config import ConfigError, sample_settings
    from selfflow.loader import load_model

    loaded = load_model(args.ckpt, args.weights)
    settings = sample_settings(loaded.folder)
    if args.format == "diffusers":
        from selfflow.api import model_card

        try:
            from selfflow.hub import save_diffusers
        except ImportError:
            raise ConfigError("--format diffusers needs the diffusers package: pip install selfflow[diffusers]") from None
        save_diffusers(loaded, args.out, settings, model_card(loaded, settings, "diffusers"))
    else:
        export_model(loaded, args.out, settings)
    print(f"exported {args.weights} weights of {loaded.folder} to {args.out}")
    return 0


def cmd_generate_set(args) -> int:
    from selfflow.config import ConfigError
    from selfflow.sampling import injects_noise, parse_labels
    from selfflow.sets import generate_set
    from selfflow.device import autocast_dtype, resolve_device
    from selfflow.text.cli import load_set_generator

    for name in ("n", "shard_size"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    device = resolve_device(args.device)
    model, folder, prompts, text = load_set_generator(args, device)  # prompts: a caption-conditioned model (selfflow.text)
    resolved_sampling(args, folder, model)
    if args.kind == "pairs" and injects_noise(args.sampler):  # before anything is written
        raise ConfigError(f"--kind pairs --sampler {args.sampler}: pairs need a deterministic (ODE) sampler "
                          f"(euler, heun, dopri5); {args.sampler} injects noise")
    labels = None if prompts else parse_labels(args.labels, model.num_classes)
    latent = not prompts and _latent_autoencoder(folder, None) is not None  # latents are never clipped to [-1, 1]
    source = {"checkpoint": str(folder.resolve()), "weights": args.weights}
    shards = generate_set(
        model, args.out, num=args.n, shard_size=args.shard_size, kind=args.kind, seed=args.seed, labels=labels,
        sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, batch_size=args.batch_size, device=device,
        autocast_dtype=autocast_dtype(args.precision, device), source=source, prompts=prompts, text=text,
        sampler_options=args.sampler_options, clip=not latent,
        on_shard=lambda index, path: print(f"wrote {path}", flush=True), progress=True,
    )
    print(f"set complete: {args.out} ({shards.num} items in {shards.num_shards} shards)")
    return 0


def cmd_encode_latents(args) -> int:
    import torch

    from selfflow.config import ConfigError
    from selfflow.autoencoders import load_autoencoder
    from selfflow.data import load_dataset
    from selfflow.latents import encode_dataset
    from selfflow.device import resolve_device

    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {args.num_workers}")
    for name in ("shard_size", "batch_size"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    _check_data_flags(args)
    device = resolve_device(args.device)
    autoencoder = load_autoencoder(args.autoencoder, device)
    dataset = load_dataset(args.data, path=args.data_path, split=args.split, image_size=args.image_size,
                           channels=args.channels or autoencoder.in_channels, crop=args.crop, on_bad_image=args.on_bad_image,
                           image_column=args.image_column, label_column=args.label_column)
    shards = encode_dataset(
        dataset, autoencoder, args.out, autoencoder_dir=args.autoencoder, shard_size=args.shard_size, batch_size=args.batch_size,
        posterior=args.posterior, seed=args.seed, dtype=getattr(torch, args.dtype), device=device, num_workers=args.num_workers,
        on_shard=lambda index, path: print(f"wrote {path}", flush=True), progress=True,
    )
    shape = "x".join(str(v) for v in shards.manifest["latent_shape"])
    print(f"latents complete: {args.out} ({shards.num} items of {shape}); train with data.name=latents data.path={args.out}")
    return 0


def _check_data_flags(args) -> None:
    """--data, --data-path, --split, --image-size, --channels: checked as the config's data section is."""
    from selfflow.config import DataConfig, from_dict
    from selfflow.errors import ConfigError

    flags = {"name": "--data", "path": "--data-path", "split": "--split", "image_size": "--image-size", "channels": "--channels",
             "crop": "--crop", "on_bad_image": "--on-bad-image", "image_column": "--image-column", "label_column": "--label-column"}
    attributes = {"name": "data", "path": "data_path"}
    values = {key: getattr(args, attributes.get(key, key), None) for key in flags}
    values = {key: value for key, value in values.items() if value is not None}
    try:
        from_dict(DataConfig, values, "data")
    except ConfigError as exc:
        message = str(exc)
        for key, flag in flags.items():
            message = message.replace(f"data.{key}=", f"{flag} ").replace(f"data.{key}", flag)
        raise ConfigError(message) from None
    if args.data_path and not Path(args.data_path).exists():
        raise ConfigError(f"--data-path {args.data_path}: no such file or folder")


def cmd_quickstart(args) -> int:
    from selfflow.errors import ConfigError
    from selfflow.quickstart import run_quickstart

    if args.steps is not None and args.steps <= 0:
        raise ConfigError(f"--steps must be positive, got {args.steps}")
    report = run_quickstart(out_dir=args.out, steps=args.steps, device=args.device, tiny=args.tiny)
    print(f"report: {report}")
    return 0


def cmd_data(args) -> int:
    from selfflow.data.fetch import main_fetch

    return main_fetch(args.name, args.to, args.base_url)


def cmd_import(args) -> int:
    from selfflow.errors import ConfigError
    from selfflow.interop import import_checkpoint, model_overrides

    if args.file and args.ckpt:
        raise ConfigError(f"the checkpoint is given twice ({args.file} and --ckpt {args.ckpt}); give --ckpt only")
    if not (args.file or args.ckpt):
        raise ConfigError("give the checkpoint file with --ckpt FILE")
    if args.file:
        print("selfflow: note: the positional checkpoint file is deprecated and will be removed in the next release; "
              "use --ckpt", file=sys.stderr)
    result = import_checkpoint(args.ckpt or args.file, args.source, args.out, weights=args.weights, num_heads=args.num_heads,
                               num_classes=args.num_classes, patch_size=args.patch_size, latent=not args.pixels)
    for note in result["notes"]:
        print(f"  {note}")
    print(f"wrote {Path(args.out) / 'model.safetensors'} and config.json; sample with: selfflow sample --ckpt {args.out} "
          f"--sampler sit_sde --steps 250 (the authors' sampler) or --sampler heun --steps 50")
    print("fine-tune with train.init_from=" + str(args.out) + " and " + " ".join(model_overrides(result["config"])))
    return 0


COMMANDS = {"train": cmd_train, "distill": cmd_distill, "sample": cmd_sample, "export": cmd_export, "quickstart": cmd_quickstart, "data": cmd_data,
            "generate-set": cmd_generate_set, "encode-latents": cmd_encode_latents, "import": cmd_import}


def _one_line(message: str) -> str:
    """Errors print on one line; a multi-line message (a YAML parser's caret diagram) is joined."""
    parts = [line.strip() for line in message.splitlines() if line.strip() and set(line.strip()) != {"^"}]
    return " | ".join(parts)


# The output-folder rule (selfflow.files.check_output_folder), per command: the flag naming the folder,
# the purpose its marker records, the flags naming what the command reads (never written into), and
# entries that mark a folder the command wrote before markers existed. Checked before any work.
MODEL_FILES = ("model.safetensors", "model_index.json")  # a model folder (ours, or diffusers'), ready for the Hub: no marker
OUTPUT_RULES = {
    "sample": ("out", "sample", ("ckpt",), ("samples.json",)),
    "export": ("out", "model", ("ckpt",), MODEL_FILES),
    "import": ("out", "model", ("file", "ckpt"), MODEL_FILES),
    "generate-set": ("out", "set", ("ckpt",), ("set.json",)),
    "encode-latents": ("out", "latents", ("data_path", "autoencoder"), ("set.json",)),
    "synth": ("out", "set", ("ckpt",), ("set.json",)),
    "data fetch": ("to", "data", (), ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")),
    "eval train-feature-net": ("out", "feature-net", ("ckpt",), ()),
    "modality sample": ("out", "modality-samples", ("ckpt",), ()),
    "modality eval": ("work", "judges", (), ()),
    "represent probe": ("out", "probe", (), ("probe.json",)),
}
LOCKED_SETS = ("generate-set", "synth", "encode-latents")  # resumable writers: a second one into the folder is refused
OUTPUT_FILES = {"eval run": ("out", "eval"), "modality eval": ("out", "modality-eval")}  # report files: flag, purpose


def _command_path(args) -> str:
    """"sample", "data fetch", "eval run", "modality sample", ...: the command and its action."""
    for sub in ("data_command", "action", "modality_command", "represent_command"):
        if getattr(args, sub, None):
            return f"{args.command} {getattr(args, sub)}"
    return args.command


def _add_force_flags(parser) -> None:
    """--force on every command that takes an output folder or report file (OUTPUT_RULES, OUTPUT_FILES)."""
    actions = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for path in sorted({p.split()[0] if p.split()[0] == "eval" else p for p in (*OUTPUT_RULES, *OUTPUT_FILES)}):
        words = path.split()
        p = actions[words[0]]
        for word in words[1:]:
            p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
        p.add_argument("--force", action="store_true",
                       help="write into an output folder that holds other files: this command's files replace their "
                            "namesakes, nothing else is deleted")


def _check_output_folder(args) -> tuple[str, str, bool] | None:
    """Apply the output rule before any work; (folder, purpose, owned whole) for :func:`_mark_output_folder`."""
    from selfflow.files import check_output_file, check_output_folder

    path = _command_path(args)
    force = bool(getattr(args, "force", False))
    if path in OUTPUT_FILES and getattr(args, OUTPUT_FILES[path][0], None):
        flag, purpose = OUTPUT_FILES[path]
        check_output_file(getattr(args, flag), purpose, force=force, flag=f"--{flag}")
    if path not in OUTPUT_RULES:
        return None
    flag, purpose, reads, recognise = OUTPUT_RULES[path]
    value = getattr(args, flag, None)
    if not value:
        return None
    fresh = check_output_folder(value, purpose, force=force, reads=tuple(getattr(args, r, None) for r in reads),
                                recognise=recognise, also=("run",) if path == "represent probe" else (), flag=f"--{flag}")
    if path in ("data fetch", "export", "import"):  # known by their files' names; nothing extra in a data or model folder
        return None
    return value, purpose, fresh


def _mark_output_folder(claim, succeeded: bool) -> None:
    """Record the purpose in the folder: after success, or after a failure that left files in a folder the
    command found absent or empty (a resumable set, killed or stopped halfway)."""
    from selfflow.files import mark_output_folder

    if claim is not None and (succeeded or (claim[2] and Path(claim[0]).is_dir() and any(Path(claim[0]).iterdir()))):
        try:
            mark_output_folder(claim[0], claim[1])
        except OSError:
            pass  # a read-only or full disk: the command's own error says so


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush of a closed pipe stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # an in-process stdout without a descriptor (tests)
        pass


def main(argv: list[str] | None = None) -> int:
    from selfflow.errors import USER_ERRORS

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's one-line error: the exit status, also in-process
        return exc.code if isinstance(exc.code, int) else 2
    handler = COMMANDS.get(args.command) or getattr(args, "handler", None)
    from selfflow.arguments import log_redirect

    claim, status = None, 1
    try:
        claim = _check_output_folder(args)
        with log_redirect():  # log lines never break a progress bar
            if args.command in LOCKED_SETS:  # one writer per set folder (files.lock_folder)
                from selfflow.files import lock_folder

                with lock_folder(args.out, "set folder"):
                    status = handler(args)
            else:
                status = handler(args)
        return status
    except BrokenPipeError:  # `selfflow ... | head`: the reader has what it wanted; no error, no traceback at exit
        _silence_stdout()
        return 0
    except USER_ERRORS as exc:
        print(f"selfflow: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine's fault, not ours: a full disk, a read-only folder
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"selfflow: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfflow: interrupted", file=sys.stderr)
        return 130
    finally:
        _mark_output_folder(claim, status == 0)


if __name__ == "__main__":
    sys.exit(main())
