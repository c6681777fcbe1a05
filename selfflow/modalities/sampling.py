"""Sampling token models: generation with some tokens given (cross-modal generation), a policy's
action chunks, and the previews the trainer writes (docs/modalities.md#sampling).

**Given tokens.** To generate video for a given sound (or sound for a given video), the given part is
held fixed and only the rest is integrated, with Euler steps on the grid t_0 = 1 > … > t_K = 0:

- ``mode="clean"``: the given tokens enter at their clean values with time 0, the others at t_i:
  a per-token time map, trained on only with whole-part times (``method.whole_part_prob`` > 0);
- ``mode="replace"``: the given tokens enter noised to the same t_i, ``(1 − t_i)·x_given + t_i·ε``, as
  in inpainting by replacement; every token has one time, which any flow model has trained on.

In both, x_{i+1} = x_i + (t_{i+1} − t_i)·v on the generated tokens, and the output holds the given
values exactly on the given tokens.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from selfflow.config import RunConfig
from selfflow.sampling import GuidedVelocity, evaluating, generate, noise_for_seeds, time_grid

GIVEN_MODES = ("clean", "replace")


@torch.no_grad()
def generate_given(model, given: torch.Tensor, given_tokens: torch.Tensor, *, seeds: Sequence[int],
                   labels: torch.Tensor | None = None, steps: int = 32, cfg_scale: float = 1.0,
                   mode: str = "clean") -> torch.Tensor:
    """Samples (B, *sample_shape) whose tokens where ``given_tokens`` (N,) bool is True equal ``given``."""
    if mode not in GIVEN_MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(GIVEN_MODES)}")
    device = given.device
    B = given.shape[0]
    tokens = given_tokens.to(device)[None].expand(B, -1)
    known = model.expand_token_values(tokens.float()) > 0.5  # (B, *shape)
    noise = noise_for_seeds(list(seeds), given.shape[1:], device)
    velocity = GuidedVelocity(model, cfg_scale) if labels is not None else model
    x = noise.clone()
    times = time_grid(steps)
    with evaluating(model):
        for t, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
            if mode == "clean":
                x_in = torch.where(known, given, x)
                tau = torch.where(tokens, torch.zeros((), device=device), torch.full((), t, device=device))
            else:
                x_in = torch.where(known, (1 - t) * given + t * noise, x)
                tau = torch.full((B,), t, device=device)
            v = velocity(x_in, tau, labels)
            x = x + (t_next - t) * v.float()
    return torch.where(known, given, x).clamp(-1, 1)


def make_policy(model, *, steps: int = 16, sampler: str = "euler", regression: bool = False,
                seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """obs (B, OBS_DIM) → action chunks (B, *sample_shape) from a token model conditioned on observations.

    A flow policy integrates from fresh noise (one generator seeded once, so an evaluation is
    reproducible); the regression baseline makes its one step from zero noise (selfflow.methods.regression)."""
    from selfflow.sampling import get_sampler

    generator = torch.Generator().manual_seed(seed)
    sample_fn = get_sampler("euler" if regression else sampler)
    times = time_grid(1 if regression else steps)
    device = next(model.parameters()).device

    @torch.no_grad()
    def policy(obs: torch.Tensor) -> torch.Tensor:
        model.eval()
        shape = (obs.shape[0], *model.sample_shape)
        x = torch.zeros(shape) if regression else torch.randn(shape, generator=generator)
        out = sample_fn(model, x.to(device), times, y=obs.to(device).float())
        return out.clamp(-1, 1).cpu()

    return policy


def sample_conditioned(model, config: RunConfig, n: int, device, *, labels: torch.Tensor | None = None,
                       seeds: Sequence[int] | None = None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """n class-conditional samples (n, *sample_shape) in [-1, 1] with the run's sampler; (samples, labels)."""
    s = config.sample
    result = generate(model, num_samples=n, seeds=list(range(n)) if seeds is None else seeds, labels=labels,
                      sampler=s.sampler, steps=s.steps, cfg_scale=s.cfg_scale, batch_size=min(s.batch_size, n),
                      device=device, image_shape=model.sample_shape, progress=progress)
    return result.images, result.labels


def write_media(samples: torch.Tensor, config: RunConfig, base: Path, *, wavs: int = 4) -> Path:
    """Write samples of a video/audio/audio_video run as base.gif (+ .png frames), base_mel.png and
    base_k.wav; returns the main file."""
    from selfflow.modalities.data import AUDIO_SECONDS, layout_for

    layout = layout_for(config.modality)
    base.parent.mkdir(parents=True, exist_ok=True)
    pieces = dict(zip([p.name for p in layout.parts], layout.split(samples)))
    main = None
    if "video" in pieces:
        from selfflow.modalities.video import save_frame_strip, save_gif, video_to_uint8

        clips = video_to_uint8(pieces["video"])
        main = save_gif(clips, base.with_suffix(".gif"))
        save_frame_strip(clips[:8], base.parent / f"{base.name}_frames.png")
    if "audio" in pieces:
        from selfflow.modalities.audio import SAMPLE_RATE, mel_to_wave, save_spectrograms, write_wav

        mel_png = save_spectrograms(pieces["audio"], base.parent / f"{base.name}_mel.png")
        main = main or mel_png
        count = min(wavs, pieces["audio"].shape[0])
        waves = mel_to_wave(pieces["audio"][:count], samples=round(AUDIO_SECONDS * SAMPLE_RATE))
        for k in range(count):
            write_wav(base.parent / f"{base.name}_{k}.wav", waves[k])
    if main is None:
        raise ValueError(f"modality.kind={config.modality.kind} has no media to write")
    return main


def write_preview(model, config: RunConfig, base: Path, device) -> Path | None:
    """The trainer's sample preview of a modality run (a policy's is its success rate: selfflow modality eval)."""
    if config.modality.kind in ("actions", "metaworld"):
        return None
    n = config.train.num_sample_images
    samples, _ = sample_conditioned(model, config, n, device)
    return write_media(samples, config, base)
