"""Meta-World policies (selfflow.modalities.metaworld): windows and observations exactly, the image condition,
and, where the optional ``metaworld`` extra is installed, the scripted expert, seeded episodes and rollouts."""
import numpy as np
import pytest
import torch

from selfflow.config import ConfigError, ModelConfig, config_from_dict
from selfflow.modalities import metaworld as mw
from support import tiny_run

NO_METAWORLD = "metaworld is not installed (pip install 'selfflow[metaworld]'; rendering also needs libosmesa6)"
needs_metaworld = pytest.mark.skipif(not mw.available(), reason=NO_METAWORLD)


def test_windows_pad_the_past_with_the_first_observation_and_the_future_with_the_last_action():
    T = 5
    states = np.arange((T + 1) * mw.STATE_DIM, dtype=np.float32).reshape(T + 1, mw.STATE_DIM)
    actions = np.arange(T * 4, dtype=np.float32).reshape(T, 4) / 100
    conds, chunks = mw.windows([{"states": states, "actions": actions}], obs_horizon=3, horizon=4)
    assert conds.shape == (T, 3 * mw.STATE_DIM) and chunks.shape == (T, 4, 4)
    # step 1: observations (0, 0, 1); actions 1, 2, 3, 4
    assert torch.equal(conds[1], torch.from_numpy(states[[0, 0, 1]].reshape(-1)))
    assert torch.equal(chunks[1], torch.from_numpy(actions[[1, 2, 3, 4]].T))
    # the last step: observations (2, 3, 4); its action, then the last action repeated
    assert torch.equal(conds[4], torch.from_numpy(states[[2, 3, 4]].reshape(-1)))
    assert torch.equal(chunks[4], torch.from_numpy(actions[[4, 4, 4, 4]].T))


def test_an_image_observation_is_the_frames_in_unit_range_then_the_hand():
    states = np.random.default_rng(0).normal(size=(2, mw.STATE_DIM)).astype(np.float32)
    frames = np.full((2, 3, 8, 8), 255, np.uint8)
    frames[1] = 0
    vector = mw.observation_vector(states, frames)
    assert vector.shape == (mw.cond_dim("image", 2, 8),) == (2 * 3 * 64 + 2 * mw.PROPRIO_DIM,)
    assert np.all(vector[:192] == 1.0) and np.all(vector[192:384] == -1.0)
    assert np.array_equal(vector[384:], states[:, :4].reshape(-1))


def test_an_image_policy_reads_its_frames_through_the_cnn():
    from selfflow.modalities.data import condition_dim, condition_image, layout_for
    from selfflow.modalities.model import TokenDiT

    config = config_from_dict(tiny_run("unused", method={"name": "flow_matching", "class_dropout_prob": 0.0}, modality={
        "kind": "metaworld", "observation": "image", "obs_image_size": 16, "obs_horizon": 2, "horizon": 8, "action_patch": 2,
        "execute": 4}))
    m = config.modality
    torch.manual_seed(0)
    model = TokenDiT(ModelConfig(size="tiny", depth=2, hidden_size=32, num_heads=2, num_classes=10), layout_for(m),
                     cond_dim=condition_dim(m), cond_image=condition_image(m)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert model.sample_shape == (4, 8) and condition_image(m) == (2, 16, mw.PROPRIO_DIM)
    cond = torch.rand(3, condition_dim(m)) * 2 - 1
    x, t = torch.randn(3, 4, 8), torch.full((3,), 0.5)
    v = model(x, t, cond)
    assert v.shape == x.shape
    moved = cond.clone()
    moved[:, :16 * 16 * 3] = moved[:, :16 * 16 * 3].flip(1)  # the same pixels, another picture
    assert not torch.allclose(model(x, t, moved), v)


@pytest.mark.parametrize("key, value", [("observation", "depth"), ("obs_image_size", 20), ("obs_horizon", 0)])
def test_bad_metaworld_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        config_from_dict(tiny_run("unused", method={"name": "regression"}, modality={"kind": "metaworld", key: value}))


@needs_metaworld
def test_the_scripted_expert_solves_seeded_episodes_and_the_harness_counts_them():
    episodes, rate = mw.expert_episodes("reach-v3", 2, seed=3, max_steps=150, progress=False)
    again, _ = mw.expert_episodes("reach-v3", 2, seed=3, max_steps=150, progress=False)
    assert rate == 1.0 and len(episodes) == 2
    assert np.array_equal(episodes[0]["states"], again[0]["states"])  # an episode is fixed by its seed
    assert not np.array_equal(episodes[0]["states"][0], episodes[1]["states"][0])  # and episodes differ
    assert episodes[0]["actions"].shape == (len(episodes[0]["states"]) - 1, 4)
    scripted = mw.expert("reach-v3")

    def expert_chunks(cond):
        return torch.tensor(np.stack([scripted.get_action(s) for s in cond[:, -mw.STATE_DIM:].numpy()]),
                            dtype=torch.float32)[:, :, None]

    good = mw.success_rate(expert_chunks, task="reach-v3", episodes=2, execute=1, obs_horizon=2, max_steps=150, progress=False)
    idle = mw.success_rate(lambda c: torch.zeros(c.shape[0], 4, 8), task="reach-v3", episodes=2, execute=8, obs_horizon=2,
                           max_steps=30, progress=False)
    assert good["success_rate"] == 1.0 and good["mean_steps"] < 150
    assert idle["success_rate"] == 0.0 and idle["mean_steps"] == 30


@needs_metaworld
def test_rendered_rollouts_give_frames_of_the_asked_size(tmp_path):
    out = mw.success_rate(lambda c: torch.zeros(c.shape[0], 4, 2), task="push-v3", episodes=1, execute=2, obs_horizon=2,
                          observation="image", image_size=16, max_steps=3, gif_episodes=1, progress=False)
    (frames,) = out["frames"]
    assert frames.shape == (4, 16, 16, 3) and frames.dtype == np.uint8 and frames.std() > 0
    assert mw.save_gif(out["frames"], tmp_path / "a.gif").stat().st_size > 0


@needs_metaworld
def test_the_camera_renders_a_state_to_the_same_pixels_and_sees_the_hand_move():
    envs = [mw.make_env("reach-v3", 3) for _ in range(2)]
    cameras = [mw.Camera(env, 16) for env in envs]
    try:
        for env in envs:
            env.reset()
        first = [camera() for camera in cameras]
        assert first[0].shape == (3, 16, 16) and first[0].dtype == np.uint8
        assert np.array_equal(first[0], first[1])  # same seed, same state: the same frame, from separate renderers
        assert np.array_equal(cameras[0](), first[0])  # the reused renderer redraws the unchanged scene exactly
        for _ in range(10):
            envs[0].step(np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32))
        assert not np.array_equal(cameras[0](), first[0])
    finally:
        for closing in [*cameras, *envs]:
            closing.close()
