"""Meta-World (the optional ``metaworld`` extra): scripted expert demonstrations, observation windows and
action chunks as in Diffusion Policy, and success over seeded episodes (docs/modalities_actions.md#meta-world).

A policy sees the last ``obs_horizon`` observations — the 39-number state, or rendered RGB frames with the
hand's position and gripper (``observation: image``) — and predicts the next ``horizon`` actions (4 numbers
in [-1, 1]: the hand's displacement and the gripper); ``execute`` of them run before it replans.

- :func:`make_env`: ``gym.make("Meta-World/MT1", env_name=task, seed=…)``; :class:`Camera` renders it headless
  (``MUJOCO_GL=osmesa``, set when unset, and Debian's ``libosmesa6``; ``egl`` on a GPU machine).
- :func:`expert_episodes`: the task's scripted policy (``metaworld.policies``), successful episodes kept.
- :func:`windows`: (observation window, action chunk) pairs, padded at the ends as Diffusion Policy does.
- :func:`success_rate`, :func:`save_rollout_gif`: a chunk policy run in lock-step on parallel environments.

Episode streams: an environment made with seed s gives the same sequence of initial states on each
successive ``reset()``. Demonstrations use environments seeded ``seed·1000 + b``; evaluation seed k uses
``EVAL_SEED_BASE + k·1000 + b`` (b < PARALLEL_ENVS), so the two never share an episode.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from selfflow.errors import DataError
from selfflow.files import atomic_file, cache_root, load_tensors, save_tensors

ACTION_DIM = 4
STATE_DIM = 39
PROPRIO_DIM = 4  # hand x, y, z and gripper: the first four state numbers, beside the frames of an image policy
OBSERVATIONS = ("state", "image")
PARALLEL_ENVS = 10
EVAL_SEED_BASE = 1_000_000
RECIPE = "metaworld-demos/2"  # bump when the collection changes: part of the cache key

Policy = Callable[[torch.Tensor], torch.Tensor]


def available() -> bool:
    os.environ.setdefault("MUJOCO_GL", "osmesa")  # headless; read once, when mujoco is first imported
    try:
        import metaworld  # noqa: F401
    except ImportError:
        return False
    return True


def _require() -> None:
    if not available():
        raise DataError("modality.kind=metaworld needs the metaworld package: pip install 'selfflow[metaworld]' "
                        "(metaworld 3.1.1, mujoco, packaging) and, to render, apt-get install libosmesa6")


def make_env(task: str, seed: int):
    """A Meta-World MT1 environment of ``task`` whose successive resets are fixed by ``seed``."""
    _require()
    import gymnasium as gym
    import metaworld  # noqa: F401  (registers the Meta-World environments)

    try:
        return gym.make("Meta-World/MT1", env_name=task, seed=int(seed))
    except (ValueError, KeyError) as exc:
        raise DataError(f"modality.task={task!r}: not a Meta-World task ({exc})") from None


class Camera:
    """Renders an environment's scene as (3, S, S) uint8 RGB from one fixed view of the workspace (the hand,
    the object and the goal in frame), with one MuJoCo renderer made once and reused for every frame.

    Shadows (Meta-World's 4096² shadow map), reflections, the skybox and multisampling are off: in software
    rendering (osmesa) they cost 0.3–0.6 s a frame at 48–64 pixels; without them ≈ 0.01 s."""

    VIEW = {"lookat": (0.0, 0.72, 0.08), "azimuth": -60.0, "elevation": -40.0, "distance": 0.9}

    def __init__(self, env, size: int):
        import mujoco

        self._mujoco = mujoco
        model = env.unwrapped.model
        model.vis.quality.shadowsize = 0
        model.vis.quality.offsamples = 0
        self.data = env.unwrapped.data
        self.renderer = mujoco.Renderer(model, size, size)
        self.camera = mujoco.MjvCamera()
        self.camera.type = mujoco.mjtCamera.mjCAMERA_FREE
        self.camera.lookat[:] = self.VIEW["lookat"]
        self.camera.azimuth, self.camera.elevation = self.VIEW["azimuth"], self.VIEW["elevation"]
        self.camera.distance = self.VIEW["distance"]

    def __call__(self) -> np.ndarray:
        flags = self._mujoco.mjtRndFlag
        self.renderer.update_scene(self.data, camera=self.camera)
        for flag in (flags.mjRND_SHADOW, flags.mjRND_REFLECTION, flags.mjRND_SKYBOX):
            self.renderer.scene.flags[flag] = 0
        return np.ascontiguousarray(self.renderer.render().transpose(2, 0, 1))

    def close(self) -> None:
        self.renderer.close()


def expert(task: str):
    """The task's scripted policy: ``get_action(state) → (4,)``."""
    _require()
    from metaworld.policies import ENV_POLICY_MAP

    if task not in ENV_POLICY_MAP:
        raise DataError(f"modality.task={task!r}: no scripted Meta-World policy; e.g. push-v3, reach-v3, drawer-open-v3")
    return ENV_POLICY_MAP[task]()


def cond_dim(observation: str, obs_horizon: int, image_size: int) -> int:
    """The flattened observation window's length: state, or pixels of every frame then the proprioception."""
    per_step = STATE_DIM if observation == "state" else 3 * image_size * image_size + PROPRIO_DIM
    return obs_horizon * per_step


def observation_vector(states: np.ndarray, frames: np.ndarray | None) -> np.ndarray:
    """A window (H, 39) states [and (H, 3, S, S) uint8 frames] → the policy's condition (cond_dim,) float32:
    the states, or the frames in [-1, 1] followed by the proprioception (H, 4)."""
    if frames is None:
        return states.astype(np.float32).reshape(-1)
    pixels = frames.astype(np.float32).reshape(-1) / 127.5 - 1.0
    return np.concatenate([pixels, states[:, :PROPRIO_DIM].astype(np.float32).reshape(-1)])


# --------------------------------------------------------------------------------------------
# demonstrations
# --------------------------------------------------------------------------------------------
def expert_episodes(task: str, episodes: int, *, seed: int = 0, image_size: int | None = None,
                    max_steps: int = 150, progress: bool = True) -> tuple[list[dict], float]:
    """Run the scripted expert for ``episodes`` episodes: (the successful ones, the success rate).

    Each episode: ``states`` (T+1, 39) float32, ``actions`` (T, 4) float32 clipped to [-1, 1], and with
    ``image_size`` ``frames`` (T+1, 3, S, S) uint8; it stops at the first success or after max_steps.
    """
    from tqdm.auto import tqdm

    policy = expert(task)
    parallel = min(episodes, PARALLEL_ENVS)
    envs = [make_env(task, seed * 1000 + b) for b in range(parallel)]
    cameras = [Camera(env, image_size) for env in envs] if image_size else None
    kept, successes = [], 0
    for e in tqdm(range(episodes), desc=f"{task} expert", disable=not progress, dynamic_ncols=True):
        env = envs[e % parallel]
        state, _ = env.reset()
        states, actions = [state], []
        frames = [cameras[e % parallel]()] if cameras else None
        success = False
        for _ in range(max_steps):
            action = np.clip(policy.get_action(state), -1.0, 1.0).astype(np.float32)
            state, _, terminated, truncated, info = env.step(action)
            actions.append(action)
            states.append(state)
            if frames is not None:
                frames.append(cameras[e % parallel]())
            if info.get("success"):
                success = True
                break
            if terminated or truncated:
                break
        successes += success
        if success:
            episode = {"states": np.stack(states).astype(np.float32), "actions": np.stack(actions)}
            if frames is not None:
                episode["frames"] = np.stack(frames)
            kept.append(episode)
    for closing in [*(cameras or []), *envs]:
        closing.close()
    return kept, successes / episodes


def windows(episodes: list[dict], obs_horizon: int, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditions (N, cond_dim) float32, chunks (N, 4, horizon) float32): one pair per step t of every episode:
    observations t−H+1 … t (the first repeated before the start), actions t … t+horizon−1 (the last repeated
    after the end), as Diffusion Policy pads its windows."""
    conds, chunks = [], []
    for ep in episodes:
        states, actions, frames = ep["states"], ep["actions"], ep.get("frames")
        T = actions.shape[0]
        for t in range(T):
            past = np.clip(np.arange(t - obs_horizon + 1, t + 1), 0, None)
            future = np.clip(np.arange(t, t + horizon), None, T - 1)
            conds.append(observation_vector(states[past], None if frames is None else frames[past]))
            chunks.append(actions[future].T)
    if not conds:
        raise DataError("metaworld: no successful expert episode to learn from; raise modality.num_samples")
    return torch.from_numpy(np.stack(conds)), torch.from_numpy(np.stack(chunks).astype(np.float32))


def demonstrations(task: str, episodes: int, *, seed: int, obs_horizon: int, horizon: int, observation: str,
                   image_size: int, max_steps: int, cache_dir: str | Path | None = None,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(conditions, chunks, info) from ``episodes`` expert episodes; the episodes are cached (safetensors,
    keyed by every argument that changes them, the recipe and the metaworld version)."""
    import metaworld

    size = image_size if observation == "image" else None
    key = json.dumps({"recipe": RECIPE, "task": task, "episodes": episodes, "seed": seed, "image_size": size,
                      "max_steps": max_steps, "metaworld": getattr(metaworld, "__version__", "?")}, sort_keys=True)
    folder = Path(cache_dir) if cache_dir else cache_root() / "metaworld"
    path = folder / f"{task}_{episodes}_seed{seed}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():
        stored = load_tensors(path)
        count, rate = int(stored["count"]), float(stored["rate"])
        kept = [{name: stored[f"{i}_{name}"].numpy() for name in ("states", "actions", "frames") if f"{i}_{name}" in stored}
                for i in range(count)]
    else:
        kept, rate = expert_episodes(task, episodes, seed=seed, image_size=size, max_steps=max_steps, progress=progress)
        tensors = {"count": torch.tensor(len(kept)), "rate": torch.tensor(rate, dtype=torch.float64)}
        for i, ep in enumerate(kept):
            tensors.update({f"{i}_{name}": torch.from_numpy(value) for name, value in ep.items()})
        with atomic_file(path) as tmp:
            save_tensors(tensors, tmp)
    conds, chunks = windows(kept, obs_horizon, horizon)
    return conds, chunks, {"task": task, "expert_success": rate, "episodes_kept": len(kept), "windows": len(conds)}


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
def success_rate(policy: Policy, *, task: str, episodes: int = 50, seed: int = 0, execute: int = 8, obs_horizon: int = 2,
                 observation: str = "state", image_size: int = 64, max_steps: int = 150, gif_episodes: int = 0,
                 progress: bool = True) -> dict:
    """Success over ``episodes`` episodes of evaluation seed ``seed``: PARALLEL_ENVS environments in lock-step,
    each live one without queued actions gets a chunk in one batched policy call, the first ``execute`` actions
    run (clipped to [-1, 1]), then it replans. An episode succeeds at the first ``info["success"]`` within
    ``max_steps``. Returns success_rate, successes, episodes, mean_steps (a failure counts max_steps), and with
    ``gif_episodes`` the frames of the first ones (``frames``: list of (T, S, S, 3) uint8)."""
    from tqdm.auto import tqdm

    if observation not in OBSERVATIONS:
        raise DataError(f"observation must be one of {OBSERVATIONS}, got {observation!r}")
    parallel = min(episodes, PARALLEL_ENVS)
    render = observation == "image" or gif_episodes > 0
    envs = [make_env(task, EVAL_SEED_BASE + seed * 1000 + b) for b in range(parallel)]
    cameras = [Camera(env, image_size) for env in envs] if render else None
    assigned = [list(range(b, episodes, parallel)) for b in range(parallel)]
    state = [None] * parallel
    history: list[list] = [[] for _ in range(parallel)]  # per env: (state, frame) of the current episode
    queue: list[list] = [[] for _ in range(parallel)]
    steps, current = [0] * parallel, [None] * parallel
    results, gifs = {}, {}

    def start(b: int) -> bool:
        if not assigned[b]:
            return False
        current[b] = assigned[b].pop(0)
        state[b], _ = envs[b].reset()
        frame = cameras[b]() if render else None
        history[b] = [(state[b], frame)] * obs_horizon
        queue[b], steps[b] = [], 0
        if current[b] < gif_episodes:
            gifs[current[b]] = [frame.transpose(1, 2, 0)]
        return True

    live = [b for b in range(parallel) if start(b)]
    with tqdm(total=episodes, desc=f"{task} policy", disable=not progress, dynamic_ncols=True) as bar:
        while live:
            need = [b for b in live if not queue[b]]
            if need:
                conds = np.stack([observation_vector(np.stack([s for s, _ in history[b]]),
                                                     np.stack([f for _, f in history[b]]) if observation == "image" else None)
                                  for b in need])
                with torch.no_grad():
                    chunk = torch.as_tensor(policy(torch.from_numpy(conds))).float().cpu().numpy()
                if chunk.ndim != 3 or chunk.shape[1] != ACTION_DIM or chunk.shape[2] < execute:
                    raise DataError(f"policy: expected chunks ({len(need)}, {ACTION_DIM}, >= {execute}), got {chunk.shape}")
                for row, b in enumerate(need):
                    queue[b] = list(chunk[row, :, :execute].T)
            for b in list(live):
                state[b], _, terminated, truncated, info = envs[b].step(np.clip(queue[b].pop(0), -1.0, 1.0))
                steps[b] += 1
                frame = cameras[b]() if render else None
                history[b] = history[b][1:] + [(state[b], frame)]
                if current[b] in gifs:
                    gifs[current[b]].append(frame.transpose(1, 2, 0))
                success = bool(info.get("success"))
                if success or steps[b] >= max_steps or terminated or truncated:
                    results[current[b]] = (success, steps[b] if success else max_steps)
                    bar.update(1)
                    if not start(b):
                        live.remove(b)
    for closing in [*(cameras or []), *envs]:
        closing.close()
    wins = sum(s for s, _ in results.values())
    out = {"success_rate": wins / episodes, "successes": wins, "episodes": episodes,
           "mean_steps": sum(n for _, n in results.values()) / episodes}
    if gif_episodes:
        out["frames"] = [np.stack(gifs[e]) for e in sorted(gifs)]
    return out


def save_gif(frames: list[np.ndarray], path: str | Path, *, scale: int = 2, fps: int = 20) -> Path:
    """Episodes (T, S, S, 3) uint8 side by side as an animated GIF (a finished episode holds its last frame)."""
    from PIL import Image

    length = max(len(f) for f in frames)
    padded = [np.concatenate([f, np.repeat(f[-1:], length - len(f), 0)]) for f in frames]
    strip = np.concatenate(padded, axis=2)  # (T, S, k·S, 3)
    images = [Image.fromarray(s).resize((s.shape[1] * scale, s.shape[0] * scale), Image.NEAREST) for s in strip]
    path = Path(path)
    with atomic_file(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
    return path
