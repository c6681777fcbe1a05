"""``selfflow sample --prompt "…"`` / ``--prompts FILE`` for a caption-conditioned checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

from selfflow.errors import ConfigError


def is_text_checkpoint(path) -> bool:
    """Whether ``path`` holds a caption-conditioned model (False when unreadable: the loader says why)."""
    from selfflow.loader import folder_kind

    return folder_kind(path) == "text"


def prompts_of(args) -> list[str]:
    """The prompts of ``--prompt`` (repeatable) then ``--prompts FILE``, for a caption-conditioned ``--ckpt``."""
    from selfflow.text.generate import read_prompts

    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += read_prompts(args.prompts)
    if not prompts:
        raise ConfigError(f"--ckpt {args.ckpt}: a caption-conditioned model; give --prompt \"…\" or --prompts FILE")
    if any(not p.strip() for p in prompts):
        raise ConfigError("--prompt: an empty prompt; write the caption (the null caption is what --cfg-scale guides away from)")
    if args.labels:
        raise ConfigError("--labels: a caption-conditioned model takes --prompt/--prompts, not class labels")
    return prompts


def load_set_generator(args, device):
    """``generate-set``'s model: (model, folder, prompts, text section), prompts and text None for a class-label model.

    A caption-conditioned model gets its prompts installed as its caption bank (so guidance is checked as for labels)."""
    from selfflow.loader import load_model
    from selfflow.text.data import make_encoder

    if not is_text_checkpoint(args.ckpt):
        if args.prompt or args.prompts:
            raise ConfigError(f"--prompt/--prompts: {args.ckpt} is a class-label model (no text section); use --labels")
        loaded = load_model(args.ckpt, args.weights, device, expect="image")
        return loaded.model, loaded.folder, None, None
    prompts = prompts_of(args)
    loaded = load_model(args.ckpt, args.weights, device, expect="text")
    model, folder, text = loaded.model, loaded.folder, loaded.text
    model.set_bank(make_encoder(text).encode(prompts))
    return model, folder, prompts, text


def sample_prompts(args, resolved_sampling) -> int:
    """Writes grid.png (one row per prompt), samples.npz (images, prompt index, seeds) and samples.json (with the prompts)."""
    import numpy as np

    from selfflow.device import autocast_dtype, resolve_device
    from selfflow.imageio import save_grid, to_uint8
    from selfflow.text.data import make_encoder
    from selfflow.text.generate import generate_from_prompts
    from selfflow.loader import load_model

    prompts = prompts_of(args)
    if args.n <= 0:
        raise ConfigError(f"--n must be positive, got {args.n}")
    device = resolve_device(args.device)
    loaded = load_model(args.ckpt, args.weights, device, expect="text")
    model, folder, text = loaded.model, loaded.folder, loaded.text
    model.set_bank(make_encoder(text).encode(prompts[:1]))  # a bank, so guidance settings are checked as for labels
    settings = resolved_sampling(args, folder, model)
    per_prompt = max(1, -(-args.n // len(prompts)))  # --n images in all, rounded up to whole rows
    result = generate_from_prompts(
        model, make_encoder(text), prompts, per_prompt=per_prompt, seed=args.seed, sampler=settings.sampler,
        steps=settings.steps, cfg_scale=settings.cfg_scale, batch_size=settings.batch_size, device=device,
        image_shape=model.sample_shape, autocast_dtype=autocast_dtype(args.precision, device),
        sampler_options=args.sampler_options,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if loaded.modality is not None:  # a caption-conditioned video: a GIF (one row per prompt), its frames, the clips
        from selfflow.modalities.video import save_frame_strip, save_gif, video_to_uint8

        clips = video_to_uint8(result.images)
        written = [save_gif(clips, out / "samples.gif", columns=per_prompt), save_frame_strip(clips, out / "frames.png")]
        np.savez(out / "samples.npz", videos=clips.numpy(), prompt_index=result.labels.numpy(), seeds=np.array(result.seeds))
    else:
        written = [save_grid(result.images, out / "grid.png", nrow=per_prompt)]
        np.savez(out / "samples.npz", images=to_uint8(result.images).numpy(), prompt_index=result.labels.numpy(),
                 seeds=np.array(result.seeds))
    info = {
        "checkpoint": str(folder), "weights": args.weights, "prompts": prompts, "per_prompt": per_prompt,
        "sampler": settings.sampler, "steps": settings.steps, "cfg_scale": settings.cfg_scale, "precision": args.precision,
        "seeds": [result.seeds[0], result.seeds[-1]], "nfe_per_sample": result.nfe_per_sample,
        "wall_time_s": result.wall_time_s, "device": str(device), "text_encoder": text.encoder,
    }
    if args.sampler_options:
        info["sampler_options"] = args.sampler_options
    (out / "samples.json").write_text(json.dumps(info, indent=2))
    items = "clips" if loaded.modality is not None else "images"
    print(f"wrote {', '.join(str(p) for p in written)} and {out / 'samples.npz'} ({len(prompts)} prompt(s) × {per_prompt} "
          f"{items}, {result.nfe_per_sample:g} evaluations each)")
    return 0
