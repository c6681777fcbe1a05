"""Moving digits (selfflow.modalities.video) and their measures (selfflow.modalities.evaluation.video).

The generator is checked against its definition: a digit's centroid moves with constant velocity
between bounces and its velocity component flips at a wall, its mass is kept in every frame, clip
i depends on (seed, i) only. The measures are checked on exact properties: FD of a set with
itself, votes against labels chosen to agree or disagree, frozen clips, shuffled frames.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from selfflow.data import load_digits
from selfflow.errors import DataError
from selfflow.evaluation.feature_net import load_feature_net
from selfflow.modalities.evaluation.video import (frame_features, smoothness, train_frame_classifier,
                                                  video_metrics)
from selfflow.modalities.video import (fold, moving_digits, save_frame_strip, save_gif, trajectories,
                                       video_to_float, video_to_uint8)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    data = load_digits("train")
    return data.images, data.labels


def test_same_seed_same_bytes_and_clip_i_independent_of_n(digits):
    a, la = moving_digits(*digits, 6, frames=4, size=16, seed=3)
    b, lb = moving_digits(*digits, 6, frames=4, size=16, seed=3)
    c, _ = moving_digits(*digits, 6, frames=4, size=16, seed=4)
    more, lmore = moving_digits(*digits, 11, frames=4, size=16, seed=3)
    assert a.numpy().tobytes() == b.numpy().tobytes() and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert torch.equal(more[:6], a) and torch.equal(lmore[:6], la)


def test_fold_is_an_elastic_bounce():
    x = np.linspace(-30, 30, 601)
    y = fold(x, 4.0)
    assert y.min() >= 0 and y.max() <= 4.0
    assert abs(fold(5.0, 4.0) - 3.0) < 1e-12 and abs(fold(-1.0, 4.0) - 1.0) < 1e-12
    assert abs(fold(9.0, 4.0) - 1.0) < 1e-12   # off both walls: 9 → 8 − 9 = −1 → 1 (period 2L = 8)
    assert np.allclose(fold(x + 8.0, 4.0), y) and np.allclose(fold(-x, 4.0), y)


def test_centroid_moves_with_constant_velocity_and_flips_at_walls(digits):
    # 8×8 digits (no resize) in 32×32 frames: long free flights, several bounces per clip.
    videos, _ = moving_digits(*digits, 16, frames=24, size=32, digit_size=8, seed=1)
    c = trajectories(videos).double()                   # (n, T, 2)
    step = c[:, 1:] - c[:, :-1]                         # displacement per frame
    second = step[:, 1:] - step[:, :-1]
    tol = 0.05                                          # uint8 rounding moves a centroid by ~0.005 px
    flips = torch.sign(step[:, 1:]) != torch.sign(step[:, :-1])   # (n, T-2, 2)
    near_flip = flips.clone()
    near_flip[:, :-1] |= flips[:, 1:]                   # the bounce step's displacement is shorter,
    near_flip[:, 1:] |= flips[:, :-1]                   # so Δ² is non-zero on both sides of it
    near_flip[:, [0, -1]] = True                        # a bounce in the first or last step shows no flip
    # constant velocity wherever no bounce: Δ² ≈ 0 away from a sign flip of the velocity
    assert (second.abs()[~near_flip] < tol).all()
    # each bounce reverses the component: free steps before and after have equal size, opposite sign
    bounces = 0
    for clip in range(c.shape[0]):
        for k in range(2):
            free = [float(step[clip, t, k]) for t in range(1, step.shape[1] - 1)
                    if abs(second[clip, t - 1, k]) < tol and abs(second[clip, t, k]) < tol]
            assert max(abs(v) for v in free) - min(abs(v) for v in free) < tol
            bounces += sum(a * b < 0 for a, b in zip(free, free[1:]))
    assert bounces >= 8
    # the speed of free flight lies in [1, 3] px/frame
    free_steps = (second[:, :-1].abs() < tol).all(-1) & (second[:, 1:].abs() < tol).all(-1)
    speed = step[:, 1:-1].norm(dim=-1)[free_steps]
    assert speed.numel() > 100 and speed.min() > 1 - tol and speed.max() < 3 + tol


def test_digit_stays_inside_the_frame_with_its_mass(digits):
    images, labels = digits
    videos, _ = moving_digits(images, labels, 32, frames=12, size=16, digit_size=8, seed=2)
    mass = videos.double().sum(dim=(-2, -1))[:, 0]      # (n, T)
    # 8×8 source, no resize: every frame holds the source digit's mass (rounding: ≤ 0.5 on 9×9 pixels)
    spread = mass.max(dim=1).values - mass.min(dim=1).values
    assert (spread <= 81).all()
    assert (mass.mean(dim=1) > 100).all()
    resized, _ = moving_digits(images, labels, 16, frames=8, size=32, seed=2)   # 8 → 16 pixels
    mass = resized.double().sum(dim=(-2, -1))[:, 0]
    assert ((mass.max(1).values - mass.min(1).values) / mass.mean(1) < 0.01).all()


def test_labels_are_the_first_digits_label():
    # source j is a flat square of value 20(j+1): the brightest pixel of a clip names its source
    sources = torch.stack([torch.full((1, 6, 6), 20 * (j + 1), dtype=torch.uint8) for j in range(8)])
    source_labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    videos, labels = moving_digits(sources, source_labels, 40, frames=3, size=16, digit_size=6, seed=5)
    source = videos.amax(dim=(1, 2, 3, 4)).long() // 20 - 1
    assert torch.equal(labels, source_labels[source])
    two, _ = moving_digits(sources, source_labels, 40, frames=3, size=16, digit_size=6, digits_per_clip=2)
    assert set(two.amax(dim=(-2, -1)).unique().tolist()) <= {20 * (j + 1) for j in range(8)}  # max(), no sums


def test_float_round_trip_and_trajectory_of_float(digits):
    videos, _ = moving_digits(*digits, 4, frames=4, size=16)
    x = video_to_float(videos)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert torch.equal(video_to_uint8(x), videos)
    assert torch.allclose(trajectories(x), trajectories(videos), atol=1e-4)
    blank = torch.full((1, 1, 2, 16, 10), -1.0)                  # no mass: the frame's centre
    assert torch.equal(trajectories(blank), torch.tensor([[[7.5, 4.5], [7.5, 4.5]]]))


def test_gif_round_trips_pixels_and_has_every_frame(digits, tmp_path):
    videos, _ = moving_digits(*digits, 4, frames=5, size=16, seed=7)
    path = save_gif(videos[:1], tmp_path / "one.gif")
    with Image.open(path) as gif:
        assert gif.n_frames == 5
        for t in range(5):
            gif.seek(t)
            assert torch.equal(torch.from_numpy(np.array(gif.convert("L"))), videos[0, 0, t])
    with Image.open(save_gif(videos, tmp_path / "grid.gif", columns=2)) as grid:
        assert grid.size == (2 * 16 + 1, 2 * 16 + 1) and grid.n_frames == 5


def test_frame_strip_has_one_row_per_clip(digits, tmp_path):
    videos, _ = moving_digits(*digits, 3, frames=4, size=16, seed=8)
    strip = np.array(Image.open(save_frame_strip(videos, tmp_path / "strip.png")))
    assert strip.shape == (3 * 17 - 1, 4 * 17 - 1)
    assert torch.equal(torch.from_numpy(strip[17:33, 51:67].copy()), videos[1, 0, 3])


@pytest.fixture(scope="module")
def judged(digits, tmp_path_factory):
    videos, labels = moving_digits(*digits, 48, frames=4, size=16, seed=0)
    out = tmp_path_factory.mktemp("judge") / "net"
    net = train_frame_classifier(videos, labels, 10, out, steps=30, progress=False)
    return net, out, videos, labels


def test_frame_classifier_is_saved_and_features_are_per_frame(judged):
    net, out, videos, _ = judged
    loaded = load_feature_net(out)
    feats = frame_features(net, videos)
    assert feats.shape == (48 * 4, net.config.feature_dim)
    assert torch.allclose(frame_features(loaded, videos), feats)
    # clip-major order: row 4·i + t is frame t of clip i
    assert torch.allclose(frame_features(net, videos[5:6, :, 2:3]), feats[5 * 4 + 2:5 * 4 + 3], atol=1e-5)


def test_metrics_on_real_against_itself(judged):
    net, _, videos, labels = judged
    same = video_metrics(net, videos, labels, videos, real_labels=labels)
    assert abs(same["fd_frames"]) < 1e-6
    assert same["n"] == 48 and same["smoothness"] == same["smoothness_real"]
    assert same["accuracy"] == same["accuracy_real"]
    # floats in [-1, 1] are the same videos
    assert video_metrics(net, video_to_float(videos), labels, videos)["fd_frames"] < 1e-6


def test_votes_against_chosen_labels_and_frozen_clips(judged):
    net, _, videos, labels = judged
    votes = net.predict(video_to_float(videos).transpose(1, 2).reshape(-1, 1, 16, 16)).view(48, 4)
    majority = torch.stack([torch.bincount(v, minlength=10).argmax() for v in votes])
    agree = (votes == majority[:, None]).float().mean()
    metrics = video_metrics(net, videos, majority, videos)
    assert metrics["accuracy"] == 1.0 and abs(metrics["temporal_consistency"] - float(agree)) < 1e-6
    assert video_metrics(net, videos, (majority + 1) % 10, videos)["accuracy"] == 0.0
    frozen = videos[:, :, :1].expand(-1, -1, 4, -1, -1)          # the first frame held: one identity
    held = video_metrics(net, frozen, labels, videos)
    assert held["temporal_consistency"] == 1.0 and held["smoothness"] == 0.0
    assert held["fd_frames"] > 0


def test_shuffled_frames_are_less_smooth(digits):
    videos, _ = moving_digits(*digits, 32, frames=8, size=16, seed=9)
    order = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])
    assert smoothness(videos[:, :, order]) > 2 * smoothness(videos)


@pytest.mark.parametrize("kwargs, name", [
    ({"n": 0}, "n"), ({"frames": 1}, "frames"), ({"digits_per_clip": 0}, "digits_per_clip"),
    ({"size": 8, "digit_size": 8}, "size"), ({"size": 6, "digit_size": 8}, "size"), ({"seed": -1}, "seed"),
])
def test_bad_arguments_name_themselves(digits, kwargs, name):
    args = {"n": 2, "frames": 4, "size": 16, **kwargs}
    with pytest.raises(DataError, match=rf"^{name} "):
        moving_digits(*digits, args.pop("n"), **args)


def test_bad_sources_and_videos(digits):
    images, labels = digits
    with pytest.raises(DataError, match="images"):
        moving_digits(images[:, 0], labels, 2)
    with pytest.raises(DataError, match="labels"):
        moving_digits(images, labels[:-1], 2)
    with pytest.raises(DataError, match="videos"):
        trajectories(torch.zeros(2, 4, 16, 16))
    with pytest.raises(DataError, match="videos_uint8"):
        save_gif(torch.zeros(1, 1, 2, 8, 8), "unused.gif")


def test_clip_frechet_distance_sees_the_frame_order_and_the_frame_one_does_not(digits, judged, tmp_path):
    """Two real sets: shuffling the frames of one leaves the per-frame FD exactly as it was (a set of
    frames) but raises the clip FD of the spatio-temporal judge well above the real-vs-real value."""
    from selfflow.modalities.evaluation.clip_net import clip_frechet_distance, load_clip_net, shuffle_frames, train_clip_net

    frame_net = judged[0]
    train, train_labels = moving_digits(*digits, 256, frames=8, size=16, seed=0)
    net = train_clip_net(video_to_float(train), train_labels, tmp_path / "clip", steps=150, batch_size=32)
    a, _ = moving_digits(*digits, 128, frames=8, size=16, seed=1)
    b, _ = moving_digits(*digits, 128, frames=8, size=16, seed=2)
    a, b = video_to_float(a), video_to_float(b)
    shuffled = shuffle_frames(a, torch.Generator().manual_seed(0))
    assert not torch.equal(shuffled, a)
    frames = [video_metrics(frame_net, x, torch.zeros(128, dtype=torch.long), b)["fd_frames"] for x in (a, shuffled)]
    assert frames[0] == pytest.approx(frames[1], rel=1e-6, abs=1e-9)
    real, mixed = clip_frechet_distance(net, a, b), clip_frechet_distance(net, shuffled, b)
    assert mixed > 3 * real, (real, mixed)
    assert clip_frechet_distance(load_clip_net(tmp_path / "clip"), a, b) == pytest.approx(real, rel=1e-6)
    assert video_metrics(frame_net, a, torch.zeros(128, dtype=torch.long), b, clip_net=net)["fd_clips"] == pytest.approx(real, rel=1e-6)
