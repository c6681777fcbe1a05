"""PushAround policies measured by success over seeded episodes, and an animated GIF of a few.

- :func:`success_rate`: receding-horizon rollouts of a chunk policy, all live episodes in one policy call.
- :func:`save_rollout_gif`: a few episodes side by side, one frame per step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from selfflow.errors import DataError
from selfflow.files import atomic_file
from selfflow.modalities.actions import ACTION_DIM, MAX_STEPS, PushAroundEnv, normalise_observations, passed_side

Policy = Callable[[torch.Tensor], torch.Tensor]


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise DataError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _chunks(policy: Policy, obs: np.ndarray, execute: int) -> np.ndarray:
    """One policy call on the live observations (normalised, float32 CPU); (B, ACTION_DIM, horizon) numpy."""
    with torch.no_grad():
        chunk = policy(torch.from_numpy(normalise_observations(obs).astype(np.float32)))
    chunk = torch.as_tensor(chunk).detach().float().cpu().numpy()
    if chunk.ndim != 3 or chunk.shape[:2] != (len(obs), ACTION_DIM):
        raise DataError(f"policy: expected action chunks of shape ({len(obs)}, {ACTION_DIM}, horizon), got {chunk.shape}")
    if chunk.shape[2] < execute:
        raise DataError(f"execute: {execute} actions per chunk, but the policy's chunks hold {chunk.shape[2]}")
    return chunk


def _rollouts(policy: Policy, seeds: Sequence[int], execute: int, max_steps: int, frames: bool,
              progress: bool) -> list[dict]:
    """Episodes from each seed, run together: per replanning one policy call, then ``execute`` actions each.

    Each record: success, steps, block (T+1, 2) trajectory, and frames (RGB, one per state) if asked.
    """
    envs = [PushAroundEnv(max_steps=max_steps, render_size=96) for _ in seeds]
    obs = np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)])
    records = [{"success": False, "steps": 0, "block": [o[2:4].copy()], "frames": [env.render()] if frames else []}
               for env, o in zip(envs, obs)]
    live = list(range(len(envs)))
    with tqdm(total=len(envs), desc="policy episodes", disable=not progress) as bar:
        while live:
            chunk = _chunks(policy, obs[live], execute)
            for row, i in enumerate(list(live)):
                for k in range(execute):
                    obs[i], _, terminated, truncated, info = envs[i].step(np.clip(chunk[row, :, k], -1.0, 1.0))
                    record = records[i]
                    record["steps"] += 1
                    record["block"].append(obs[i, 2:4].copy())
                    if frames:
                        record["frames"].append(envs[i].render())
                    if terminated or truncated:
                        record["success"] = bool(info["success"])
                        live.remove(i)
                        bar.update(1)
                        break
    return records


def success_rate(policy: Policy, *, episodes: int = 50, seed: int = 1000, execute: int = 4,
                 max_steps: int | None = None, progress: bool = True) -> dict:
    """Success over ``episodes`` seeded episodes (env seeds seed .. seed+episodes-1), receding horizon.

    ``policy``: normalised obs float32 CPU (B, OBS_DIM) -> action chunks (B, ACTION_DIM, horizon), any
    device (moved to the CPU here); all live episodes share one call per replanning; the first ``execute``
    actions of each chunk run (clipped to [-1, 1]), then it replans. Training seeds (episode_seed) are
    >= 2**31, so disjoint. Returns success_rate, episodes, mode_left / mode_right (fractions of the
    successful episodes whose block went round the wall's left / right end, :func:`passed_side`; 0 when
    none succeeded), mean_steps (over all episodes; a failure counts its max_steps).
    """
    episodes = _positive_int("episodes", episodes)
    execute = _positive_int("execute", execute)
    max_steps = MAX_STEPS if max_steps is None else _positive_int("max_steps", max_steps)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed: expected a non-negative integer, got {seed!r}")
    records = _rollouts(policy, range(seed, seed + episodes), execute, max_steps, False, progress)
    sides = [passed_side(np.stack(r["block"])) for r in records if r["success"]]
    wins = max(len(sides), 1)
    return {"success_rate": len(sides) / episodes, "episodes": episodes,
            "mode_left": sides.count(0) / wins, "mode_right": sides.count(1) / wins,
            "mean_steps": float(np.mean([r["steps"] for r in records]))}


def save_rollout_gif(policy: Policy, path: str | Path, *, seeds: Sequence[int] = (1000, 1001, 1002, 1003),
                     execute: int = 4, fps: int = 10) -> Path:
    """Episodes from ``seeds`` side by side (96 px each, a 2 px gap), one GIF frame per step; atomic write.

    A finished episode holds its last frame until the longest one ends.
    """
    execute = _positive_int("execute", execute)
    fps = _positive_int("fps", fps)
    if len(seeds) == 0:
        raise DataError("seeds: expected at least one episode seed")
    records = _rollouts(policy, list(seeds), execute, MAX_STEPS, True, False)
    length = max(len(r["frames"]) for r in records)
    gap = np.full((96, 2, 3), 255, dtype=np.uint8)
    frames = []
    for t in range(length):
        tiles = [r["frames"][min(t, len(r["frames"]) - 1)] for r in records]
        row = [part for tile in tiles for part in (tile, gap)][:-1]
        frames.append(Image.fromarray(np.concatenate(row, axis=1)))
    path = Path(path)
    with atomic_file(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path
