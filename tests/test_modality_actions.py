"""PushAround (selfflow.modalities.actions and its evaluation): gymnasium compliance, the kinematics' closed
form and impassable wall, the two-way expert, the averaged expert's failure at the fork, demonstrations
and success rate."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from PIL import Image

from selfflow.errors import DataError
from selfflow.modalities import actions as A
from selfflow.modalities.evaluation.actions import save_rollout_gif, success_rate

torch.set_num_threads(1)


def _state(pusher, block, goal=(0.5, 0.85)) -> np.ndarray:
    return np.array([*pusher, *block, *goal], dtype=np.float32)


def test_gymnasium_api_compliance():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*alternative render modes.*")  # needs gymnasium.make
        check_env(A.PushAroundEnv(render_mode="rgb_array"))
    env = A.PushAroundEnv()
    obs, info = env.reset(seed=3)
    assert obs.dtype == np.float32 and obs.shape == (A.OBS_DIM,) and info == {"success": False}
    _, reward, terminated, truncated, info = env.step(np.zeros(2, np.float32))
    assert (reward, terminated, truncated, info["success"]) == (0.0, False, False, False)


def test_reset_is_deterministic_and_seeds_differ():
    a, b = A.PushAroundEnv(), A.PushAroundEnv()
    first = a.reset(seed=11)[0]
    np.testing.assert_array_equal(first, b.reset(seed=11)[0])
    assert not np.allclose(first, A.PushAroundEnv().reset(seed=12)[0])
    for _ in range(5):
        action = np.array([0.3, 1.0], np.float32)
        np.testing.assert_array_equal(a.step(action)[0], A.simulate(b.state, action))
        b.step(action)


def test_collinear_push_moves_the_block_by_the_pusher_displacement():
    """Frictionless quasi-static contact: pushing along the line of centres moves the block rigidly."""
    start = _state((0.5, 0.2), (0.5, 0.2 + A.CONTACT))
    after = A.simulate(start, np.array([0.0, 1.0]))
    np.testing.assert_allclose(after[:4], start[:4] + [0, A.MAX_SPEED, 0, A.MAX_SPEED], atol=1e-6)
    free = A.simulate(_state((0.2, 0.2), (0.8, 0.2)), np.array([-1.0, 0.5]))  # no contact: block stays
    np.testing.assert_allclose(free[:4], [0.2 - A.MAX_SPEED, 0.2 + A.MAX_SPEED / 2, 0.8, 0.2], atol=1e-6)


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_the_block_cannot_pass_through_the_wall(direction):
    """Pushed straight into the wall's middle for 200 steps, from below or above: the block rests against
    the wall, the pusher against the block, nothing interpenetrates."""
    y_block = A.WALL_Y - direction * (A.BLOCK_RADIUS + 0.05)
    state = _state((0.5, y_block - direction * (A.CONTACT + 0.02)), (0.5, y_block))
    for _ in range(200):
        state = A.simulate(state, np.array([0.0, direction]))
        assert direction * (A.WALL_Y - state[3]) >= A.BLOCK_RADIUS + A.WALL_RADIUS - 1e-5
        assert direction * (state[3] - state[1]) > 0 and np.hypot(*(state[0:2] - state[2:4])) >= A.CONTACT - 1e-5
    resting = A.WALL_Y - direction * (A.WALL_RADIUS + A.BLOCK_RADIUS)
    np.testing.assert_allclose(state[:4], [0.5, resting - direction * A.CONTACT, 0.5, resting], atol=1e-5)


@pytest.mark.parametrize("mode", [0, 1])
def test_expert_succeeds_in_each_mode_on_its_own_side(mode):
    episodes = [A.rollout_expert(seed, mode) for seed in range(40)]
    assert sum(e["success"] for e in episodes) >= 38
    for e in episodes:
        block = e["obs"][:, 2:4]
        crossing = block[np.argmax(block[:, 1] > A.WALL_Y), 0]  # x where the block rose above the wall
        assert e["side"] == mode and (crossing < 0.5 - A.WALL_HALF if mode == 0 else crossing > 0.5 + A.WALL_HALF)
        assert np.abs(e["actions"]).max() <= 1.0 and len(e["obs"]) == len(e["actions"]) + 1


def test_the_averaged_expert_fails_where_the_modes_fork():
    """The mean of the two modes' actions (an MSE regressor's answer) pushes the block into the wall."""
    assert success_rate(A.expert_policy(None), episodes=16, progress=False)["success_rate"] < 0.5
    env = A.PushAroundEnv()
    env.reset(seed=5)
    for _ in range(A.MAX_STEPS):
        env.step(A.averaged_expert_action(env.state))
    assert env.state[3] < A.WALL_Y and not A.succeeded(env.state)


@pytest.mark.parametrize("mode", [0, 1])
def test_success_rate_of_the_expert_as_a_chunk_policy(mode):
    result = success_rate(A.expert_policy(mode, horizon=8), episodes=12, seed=1000, execute=4, progress=False)
    assert result["success_rate"] >= 0.9 and result["episodes"] == 12
    assert (result["mode_left"], result["mode_right"]) == ((1.0, 0.0) if mode == 0 else (0.0, 1.0))
    assert 10 < result["mean_steps"] < A.MAX_STEPS


def test_demonstrations_are_deterministic_windows_of_the_expert_episodes():
    obs, chunks, info = A.demonstrations(6, seed=4, horizon=5, progress=False)
    obs2, chunks2, info2 = A.demonstrations(6, seed=4, horizon=5, progress=False)
    assert torch.equal(obs, obs2) and torch.equal(chunks, chunks2) and info == info2
    assert obs.dtype == chunks.dtype == torch.float32 and chunks.shape == (len(obs), A.ACTION_DIM, 5)
    assert info["kept"] == sum(info["mode_counts"]) and info["expert_success"] == info["kept"] / 6
    assert obs.abs().max() <= 1.0 and chunks.abs().max() <= 1.0
    first = A.rollout_expert(A.episode_seed(4, 0))
    steps = len(first["actions"])
    np.testing.assert_allclose(obs[:steps].numpy(), A.normalise_observations(first["obs"][:-1]), atol=1e-6)
    np.testing.assert_array_equal(chunks[0].T.numpy(), first["actions"][:5])
    np.testing.assert_array_equal(chunks[steps - 2].numpy(), np.pad(first["actions"][-2:].T, ((0, 0), (0, 3))))
    assert A.denormalise_observations(obs[:1]).allclose(torch.from_numpy(first["obs"][:1]))


def test_modes_are_drawn_half_and_half_and_training_seeds_are_disjoint_from_evaluation():
    modes = [A.mode_from_seed(A.episode_seed(0, e)) for e in range(200)]
    assert 80 <= sum(modes) <= 120
    assert min(A.episode_seed(0, e) for e in range(200)) >= 2 ** 31


def test_render_shows_each_object():
    env = A.PushAroundEnv(render_mode="rgb_array", render_size=64)
    env.state = _state((0.2, 0.2), (0.7, 0.3), (0.5, 0.85))
    rgb, gray = env.render(), env.image()
    assert rgb.shape == (64, 64, 3) and gray.shape == (1, 64, 64) and rgb.dtype == gray.dtype == np.uint8

    def pixel(x, y):
        return int((1 - y) * 64), int(x * 64)
    for name, (x, y) in {"pusher": (0.2, 0.2), "block": (0.7, 0.3), "goal": (0.5, 0.85), "wall": (0.5, A.WALL_Y)}.items():
        assert tuple(rgb[pixel(x, y)]) == A.RGB_COLOURS[name] and gray[(0, *pixel(x, y))] == A.GRAY_LEVELS[name]
    assert tuple(rgb[pixel(0.05, 0.95)]) == (0, 0, 0)


def test_rollout_gif(tmp_path):
    path = save_rollout_gif(A.expert_policy(1), tmp_path / "roll.gif", seeds=(1000, 1001))
    lengths = [len(A.rollout_expert(s, 1)["actions"]) for s in (1000, 1001)]
    with Image.open(path) as gif:
        assert gif.size == (2 * 96 + 2, 96) and gif.n_frames == max(lengths) + 1


@pytest.mark.parametrize("call, name", [
    (lambda: A.demonstrations(0, progress=False), "episodes"),
    (lambda: A.demonstrations(2, horizon=0, progress=False), "horizon"),
    (lambda: A.expert_action(np.zeros(A.OBS_DIM), 2), "mode"),
    (lambda: A.expert_action(np.zeros(3), 0), "env_or_state"),
    (lambda: A.rollout_expert(-1), "seed"),
    (lambda: A.PushAroundEnv(max_steps=0), "max_steps"),
    (lambda: A.PushAroundEnv(render_mode="human"), "render_mode"),
    (lambda: success_rate(A.expert_policy(0), episodes=0, progress=False), "episodes"),
    (lambda: success_rate(A.expert_policy(0, horizon=2), episodes=1, execute=4, progress=False), "execute"),
    (lambda: success_rate(lambda o: torch.zeros(len(o), 3, 8), episodes=1, progress=False), "policy"),
    (lambda: save_rollout_gif(A.expert_policy(0), "unused.gif", seeds=()), "seeds"),
])
def test_bad_arguments_raise_a_one_line_data_error(call, name):
    with pytest.raises(DataError) as caught:
        call()
    assert str(caught.value).startswith(name + ":") and "\n" not in str(caught.value)


def test_without_gymnasium_the_actions_task_is_a_one_line_error(monkeypatch):
    """gymnasium is the [actions] extra: the core install runs without it, an actions run says what to install."""
    import importlib
    import sys

    from selfflow.errors import ConfigError

    monkeypatch.setitem(sys.modules, "gymnasium", None)
    monkeypatch.delitem(sys.modules, "selfflow.modalities.actions")
    with pytest.raises(ConfigError, match=r"selfflow\[actions\]"):
        importlib.import_module("selfflow.modalities.actions")
