"""PushAround: a 2-D pushing task with the gymnasium API, a scripted two-way expert and its demonstrations.

A round pusher (the agent) pushes a round block on the unit-square table to a goal above a wall
segment; the block must go around the wall on the LEFT or on the RIGHT, and both succeed, so the
expert's demonstrations are bimodal at the fork. A regression (MSE) policy learns the mean of the
two modes there, which pushes the block straight into the wall: the task separates generative
policies from regression (docs/modalities_actions.md has the equations).

- :class:`PushAroundEnv`: the environment (kinematic physics in :func:`simulate`, image in :func:`draw`).
- :func:`expert_action`, :func:`expert_policy`: the scripted expert (mode 0 left, 1 right) per step / per chunk.
- :func:`rollout_expert`, :func:`demonstrations`: expert episodes and the (observation, action chunk) windows.
- :func:`normalise_observations` / :func:`denormalise_observations`: table units <-> [-1, 1].
"""
from __future__ import annotations

import math
from typing import Callable

try:
    import gymnasium
except ImportError:  # the [actions] extra: the core install does not need it
    from selfflow.errors import ConfigError

    raise ConfigError("modality.kind=actions needs gymnasium: pip install 'selfflow[actions]'") from None
import numpy as np
import torch
from tqdm import tqdm

from selfflow.errors import DataError

OBS_DIM = 6
"""Observation layout (table units, [0, 1]): pusher x, y, block x, y, goal x, y. It is the full state."""
ACTION_DIM = 2
"""Action: the pusher's velocity command in [-1, 1]^2, times MAX_SPEED per step."""

MAX_SPEED = 0.05
PUSHER_RADIUS = 0.04
BLOCK_RADIUS = 0.06
CONTACT = PUSHER_RADIUS + BLOCK_RADIUS
WALL_Y = 0.55
WALL_HALF = 0.2
WALL_RADIUS = 0.015
"""The obstacle: the capsule of radius WALL_RADIUS around the segment (0.5 +- WALL_HALF, WALL_Y)."""
GOAL_RADIUS = 0.06
MAX_STEPS = 100
SUBSTEPS = 5
"""Collision substeps per step: a substep moves at most MAX_SPEED / SUBSTEPS = 0.01 < WALL_RADIUS + radius."""

OBS_CENTRE = 0.5
OBS_SCALE = 0.5
"""normalise_observations: (obs - OBS_CENTRE) / OBS_SCALE maps the table [0, 1] onto [-1, 1]."""

SIDE_OFFSET = 0.32
"""The expert's via-points are at x = 0.5 -+ SIDE_OFFSET, clear of the wall's ends by a block diameter."""

GRAY_LEVELS = {"goal": 60, "wall": 120, "block": 180, "pusher": 255}
RGB_COLOURS = {"goal": (70, 200, 90), "wall": (130, 130, 130), "block": (60, 110, 230), "pusher": (230, 60, 50)}


def normalise_observations(obs: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Table units [0, 1] -> [-1, 1]: what a policy sees (demonstrations and success_rate both apply it)."""
    return (obs - OBS_CENTRE) / OBS_SCALE


def denormalise_observations(obs: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """[-1, 1] -> table units: the inverse of :func:`normalise_observations`."""
    return obs * OBS_SCALE + OBS_CENTRE


# ---- physics ---------------------------------------------------------------------------------

def _resolve_static(q: np.ndarray, radius: float) -> np.ndarray:
    """A disc centre pushed out of the wall capsule along its normal, then clamped inside the table."""
    nearest = np.array([min(max(q[0], 0.5 - WALL_HALF), 0.5 + WALL_HALF), WALL_Y])
    gap = q - nearest
    dist = float(np.hypot(*gap))
    reach = radius + WALL_RADIUS
    if dist < reach:
        normal = gap / dist if dist > 1e-9 else np.array([0.0, -1.0])
        q = nearest + normal * reach
    return np.clip(q, radius, 1.0 - radius)


def _separate(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """``moving`` displaced along the contact normal (fixed -> moving) until the discs just touch."""
    gap = moving - fixed
    dist = float(np.hypot(*gap))
    if dist >= CONTACT:
        return moving
    normal = gap / dist if dist > 1e-9 else np.array([0.0, 1.0])
    return fixed + normal * CONTACT


def simulate(state: np.ndarray, action: np.ndarray) -> np.ndarray:
    """One step of the quasi-static, frictionless kinematics; ``state`` is an observation (table units).

    Per substep: the pusher moves by a / SUBSTEPS * MAX_SPEED and is stopped by the wall and the table;
    an overlapped block is displaced along the contact normal to touch, then stopped by the wall and the
    table; if the block could not give way the pusher is put back against it (nothing interpenetrates).
    """
    velocity = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0) * (MAX_SPEED / SUBSTEPS)
    pusher, block, goal = (np.asarray(state[i:i + 2], dtype=np.float64) for i in (0, 2, 4))
    for _ in range(SUBSTEPS):
        pusher = _resolve_static(pusher + velocity, PUSHER_RADIUS)
        block = _resolve_static(_separate(pusher, block), BLOCK_RADIUS)
        pusher = _resolve_static(_separate(block, pusher), PUSHER_RADIUS)
    return np.concatenate([pusher, block, goal]).astype(np.float32)


def succeeded(state: np.ndarray) -> bool:
    """Success: the block's centre inside the goal disc, ||block - goal|| < GOAL_RADIUS."""
    return bool(np.hypot(state[2] - state[4], state[3] - state[5]) < GOAL_RADIUS)


def passed_side(block_xy: np.ndarray) -> int | None:
    """Which side of the wall the block went round: its x when it first rose above WALL_Y, 0 left, 1 right.

    None when it never rose above the wall. The block cannot cross the wall, so above WALL_Y its x is
    beyond one of the wall's ends.
    """
    above = np.nonzero(np.asarray(block_xy)[:, 1] > WALL_Y)[0]
    if above.size == 0:
        return None
    return int(block_xy[above[0], 0] > 0.5)


# ---- image -----------------------------------------------------------------------------------

def _masks(state: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Boolean (size, size) masks of goal, wall, block and pusher; row 0 is the table's top (y = 1)."""
    centres = (np.arange(size) + 0.5) / size
    x, y = np.meshgrid(centres, centres[::-1])
    wall_x = np.clip(x, 0.5 - WALL_HALF, 0.5 + WALL_HALF)
    half_pixel = 0.5 / size
    return {
        "goal": np.hypot(x - state[4], y - state[5]) < GOAL_RADIUS,
        "wall": np.hypot(x - wall_x, y - WALL_Y) < WALL_RADIUS + half_pixel,
        "block": np.hypot(x - state[2], y - state[3]) < BLOCK_RADIUS,
        "pusher": np.hypot(x - state[0], y - state[1]) < PUSHER_RADIUS + half_pixel,
    }


def draw(state: np.ndarray, size: int = 32, rgb: bool = True) -> np.ndarray:
    """Top-down picture: uint8 (size, size, 3) RGB, or (1, size, size) gray (goal < wall < block < pusher)."""
    image = np.zeros((size, size, 3) if rgb else (1, size, size), dtype=np.uint8)
    for name, mask in _masks(state, size).items():
        if rgb:
            image[mask] = RGB_COLOURS[name]
        else:
            image[0][mask] = GRAY_LEVELS[name]
    return image


# ---- environment -----------------------------------------------------------------------------

class PushAroundEnv(gymnasium.Env):
    """Push the block into the goal, around the wall on either side; gymnasium API, info["success"].

    reset(seed) draws pusher x ~ U(0.35, 0.65), y ~ U(0.06, 0.14); block x ~ U(0.4, 0.6), y ~ U(0.25, 0.35);
    goal x ~ U(0.35, 0.65), y ~ U(0.8, 0.88). Reward: 1 on the step that succeeds, else 0. Terminated on
    success, truncated after ``max_steps``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, max_steps: int = MAX_STEPS, render_mode: str | None = None, render_size: int = 32):
        if not isinstance(max_steps, int) or max_steps < 1:
            raise DataError(f"max_steps: expected a positive integer, got {max_steps!r}")
        if render_mode not in (None, "rgb_array"):
            raise DataError(f"render_mode: expected None or 'rgb_array', got {render_mode!r}")
        if not isinstance(render_size, int) or render_size < 8:
            raise DataError(f"render_size: expected an integer >= 8, got {render_size!r}")
        self.max_steps, self.render_mode, self.render_size = max_steps, render_mode, render_size
        self.observation_space = gymnasium.spaces.Box(0.0, 1.0, (OBS_DIM,), np.float32)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        self.state = np.zeros(OBS_DIM, dtype=np.float32)
        self.steps = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        low = np.array([0.35, 0.06, 0.4, 0.25, 0.35, 0.8])
        high = np.array([0.65, 0.14, 0.6, 0.35, 0.65, 0.88])
        self.state = self.np_random.uniform(low, high).astype(np.float32)
        self.steps = 0
        return self.state.copy(), {"success": False}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.state = simulate(self.state, action)
        self.steps += 1
        success = succeeded(self.state)
        return self.state.copy(), float(success), success, self.steps >= self.max_steps and not success, {"success": success}

    def render(self) -> np.ndarray:
        """uint8 (render_size, render_size, 3) RGB, top-down."""
        return draw(self.state, self.render_size, rgb=True)

    def image(self) -> np.ndarray:
        """uint8 (1, render_size, render_size) gray: the image observation for an image-conditioned policy."""
        return draw(self.state, self.render_size, rgb=False)


# ---- expert ----------------------------------------------------------------------------------

def _check_mode(mode: object) -> int:
    if mode not in (0, 1) or isinstance(mode, bool):
        raise DataError(f"mode: expected 0 (around the left) or 1 (around the right), got {mode!r}")
    return int(mode)


def _block_target(block: np.ndarray, goal: np.ndarray, mode: int) -> np.ndarray:
    """Where the expert pushes the block next: beside the wall, then up past it, then the goal."""
    side = -1.0 if mode == 0 else 1.0
    if block[1] >= WALL_Y + BLOCK_RADIUS + WALL_RADIUS + 0.01:
        return goal
    beside = side * (block[0] - 0.5) > WALL_HALF + WALL_RADIUS + BLOCK_RADIUS - 0.02
    return np.array([0.5 + side * SIDE_OFFSET, WALL_Y + (0.25 if beside else -0.1)])


def _pusher_target(pusher: np.ndarray, block: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Where the pusher heads this step to move the block towards ``target``.

    Behind the block (within 15 degrees of the push line): through the contact point, which pushes.
    Elsewhere: orbit the block at a clearance, turning at most 25 degrees a step towards the push line.
    """
    push = target - block
    push = push / max(float(np.hypot(*push)), 1e-9)
    rel = pusher - block
    angle_error = math.atan2(-push[1], -push[0]) - math.atan2(rel[1], rel[0])
    angle_error = (angle_error + math.pi) % (2 * math.pi) - math.pi
    if abs(angle_error) < math.radians(15) and np.hypot(*rel) < CONTACT + 0.04:
        return block - push * CONTACT + push * MAX_SPEED
    turn = math.atan2(rel[1], rel[0]) + float(np.clip(angle_error, -math.radians(25), math.radians(25)))
    return block + (CONTACT + 0.03) * np.array([math.cos(turn), math.sin(turn)])


def expert_action(env_or_state: PushAroundEnv | np.ndarray, mode: int) -> np.ndarray:
    """The scripted expert's action in [-1, 1]^2 for one state (an env or an observation in table units).

    mode 0 pushes the block around the wall's left end, mode 1 around its right end.
    """
    mode = _check_mode(mode)
    state = np.asarray(env_or_state.state if isinstance(env_or_state, PushAroundEnv) else env_or_state, dtype=np.float64)
    if state.shape != (OBS_DIM,):
        raise DataError(f"env_or_state: expected an env or a state of shape ({OBS_DIM},), got shape {state.shape}")
    pusher, block, goal = state[0:2], state[2:4], state[4:6]
    aim = _pusher_target(pusher, block, _block_target(block, goal, mode))
    return np.clip((aim - pusher) / MAX_SPEED, -1.0, 1.0).astype(np.float32)


def averaged_expert_action(state: np.ndarray) -> np.ndarray:
    """The mean of the two modes' actions: what an MSE regressor learns where the demonstrations fork."""
    return (expert_action(state, 0) + expert_action(state, 1)) / 2


def expert_policy(mode: int | None, horizon: int = 8) -> Callable[[torch.Tensor], torch.Tensor]:
    """The expert as a chunk policy for success_rate: normalised obs (B, OBS_DIM) -> (B, ACTION_DIM, horizon).

    The state is fully observed and the physics deterministic, so the chunk is the closed-loop expert
    simulated ``horizon`` steps ahead. mode None: the averaged expert (:func:`averaged_expert_action`).
    """
    act = averaged_expert_action if mode is None else (lambda state: expert_action(state, mode))
    if mode is not None:
        _check_mode(mode)
    if not isinstance(horizon, int) or horizon < 1:
        raise DataError(f"horizon: expected a positive integer, got {horizon!r}")

    def policy(obs: torch.Tensor) -> torch.Tensor:
        chunks = np.zeros((obs.shape[0], ACTION_DIM, horizon), dtype=np.float32)
        for row, state in enumerate(denormalise_observations(obs.detach().cpu().double().numpy())):
            for k in range(horizon):
                chunks[row, :, k] = act(state)
                state = simulate(state, chunks[row, :, k])
        return torch.from_numpy(chunks)

    return policy


def mode_from_seed(seed: int) -> int:
    """The expert mode an episode seed draws, 50/50 (a stream separate from the env's reset draws)."""
    return int(np.random.default_rng([int(seed), 1]).integers(2))


def episode_seed(seed: int, episode: int) -> int:
    """Episode ``episode``'s env seed from (seed, episode); >= 2**31, so disjoint from small evaluation seeds."""
    return int(np.random.SeedSequence([int(seed), int(episode)]).generate_state(1)[0]) | (1 << 31)


def rollout_expert(seed: int, mode: int | None = None) -> dict:
    """One expert episode from ``reset(seed=seed)``; mode None draws it from the seed (:func:`mode_from_seed`).

    Returns obs (T+1, OBS_DIM) float32 in table units, actions (T, ACTION_DIM) float32, success, mode, side
    (:func:`passed_side` of the block's trajectory).
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed: expected a non-negative integer, got {seed!r}")
    mode = mode_from_seed(seed) if mode is None else _check_mode(mode)
    env = PushAroundEnv()
    obs, info = env.reset(seed=int(seed))
    observations, actions = [obs], []
    done = False
    while not done:
        action = expert_action(env, mode)
        obs, _, terminated, truncated, info = env.step(action)
        observations.append(obs)
        actions.append(action)
        done = terminated or truncated
    observations = np.stack(observations)
    return {"obs": observations, "actions": np.stack(actions), "success": bool(info["success"]), "mode": mode,
            "side": passed_side(observations[:, 2:4])}


def _windows(actions: np.ndarray, horizon: int) -> np.ndarray:
    """(T, ACTION_DIM) -> (T, ACTION_DIM, horizon): the chunk starting at each step, zero-padded past the end."""
    padded = np.concatenate([actions, np.zeros((horizon, ACTION_DIM), dtype=np.float32)])
    return np.stack([padded[t:t + horizon].T for t in range(len(actions))])


def demonstrations(episodes: int, *, seed: int = 0, horizon: int = 8,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Windows for a chunked policy from ``episodes`` expert episodes; deterministic in (episodes, seed, horizon).

    Episode e runs from env seed :func:`episode_seed` (seed, e) in the mode that seed draws (50/50); only
    successful episodes are kept. Returns observations float32 (N, OBS_DIM), normalised to [-1, 1]
    (:func:`normalise_observations`), and the action chunk that followed each, float32
    (N, ACTION_DIM, horizon) in [-1, 1], padded past the episode's end with zeros (the pusher stands
    still); info: episodes, kept, mode_counts [left, right] of the kept episodes, expert_success.
    """
    for name, value in (("episodes", episodes), ("horizon", horizon)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DataError(f"{name}: expected a positive integer, got {value!r}")
    observations, chunks, mode_counts = [], [], [0, 0]
    for e in tqdm(range(episodes), desc="expert demonstrations", disable=not progress):
        episode = rollout_expert(episode_seed(seed, e))
        if episode["success"]:
            observations.append(normalise_observations(episode["obs"][:-1]))
            chunks.append(_windows(episode["actions"], horizon))
            mode_counts[episode["mode"]] += 1
    kept = sum(mode_counts)
    if kept == 0:
        raise DataError(f"episodes: none of the {episodes} expert episodes succeeded")
    info = {"episodes": episodes, "kept": kept, "mode_counts": mode_counts, "expert_success": kept / episodes}
    return (torch.from_numpy(np.concatenate(observations).astype(np.float32)),
            torch.from_numpy(np.concatenate(chunks).astype(np.float32)), info)
