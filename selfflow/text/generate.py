"""Sampling from prompts: encode them, install them as the model's caption bank, sample with guidance on text.

Image k uses seed ``seed + k`` and prompt ``k // per_prompt``; guidance ``v = v_∅ + w·(v_c − v_∅)``
with v_∅ the null caption (``GuidedVelocity`` with the bank's null index), w = 1 a single pass.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from selfflow.errors import ConfigError
from selfflow.sampling import SampleResult, generate


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (blank lines and lines starting with ``#`` skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"--prompts {path}: not a UTF-8 text file (one prompt per line)") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise ConfigError(f"--prompts {path}: no prompts in the file (one per line)")
    return prompts


def generate_from_prompts(model, encoder, prompts: Sequence[str], *, per_prompt: int = 1, seed: int = 0,
                          seeds: Optional[Sequence[int]] = None, **options) -> SampleResult:
    """``per_prompt`` images for each prompt (prompt-major order); ``options`` go to :func:`selfflow.sampling.generate`."""
    prompts = list(prompts)
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise ConfigError("give at least one prompt (a string)")
    n = len(prompts) * per_prompt
    model.set_bank(encoder.encode(prompts))
    labels = torch.arange(len(prompts)).repeat_interleave(per_prompt)
    seeds = list(range(seed, seed + n)) if seeds is None else list(seeds)
    return generate(model, num_samples=n, seeds=seeds, labels=labels, **options)
