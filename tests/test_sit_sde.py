"""``sit_sde``: the published SiT/REPA/Self-Flow sampler, checked step for step against a direct
re-implementation of its update written here in the source's own convention (SiT time s = 1 − t,
s = 0 noise, s = 1 data; the network's u = dx/ds), with the same noise."""
from __future__ import annotations

import math

import pytest
import torch

from selfflow.sampling import CountingVelocity, GuidedVelocity, euler, generate, sit_sde, time_grid

CLASSES = 3


class Toy:
    """A smooth class-conditional velocity field in our convention (v = ε − x0 direction), float64."""

    num_classes = CLASSES

    def __call__(self, x, t, y):
        t = t.view(-1, 1, 1, 1).to(x.dtype)
        c = (0.3 * (y.to(x.dtype) + 1)).view(-1, 1, 1, 1)
        return torch.tanh(x) * (1 + t) + 0.4 * torch.sin(3 * t) - c * x * (1 - t)


def published_sampler(u_of, x, y, num_steps, generator, *, last_step_size=0.04, norm=1.0, cfg=1.0, interval=(0.0, 1.0)):
    """SiT's Euler–Maruyama in its own time s: grid linspace(0, 1 − L, n), diffusion w = norm·(1 − s)
    ("sigma"), score from the velocity of the path x_s = s·x0 + (1 − s)·ε, n − 1 noisy steps, then the
    "Mean" last step of size L. Guidance (the release): only where t = 1 − s lies in the interval."""
    s_grid = torch.linspace(0.0, 1.0 - last_step_size, num_steps, dtype=torch.float64).tolist()
    dt = s_grid[1] - s_grid[0]

    def u(x, s):
        t = 1.0 - s
        if cfg != 1.0 and interval[0] <= t <= interval[1]:
            cond, uncond = u_of(x, s, y), u_of(x, s, torch.full_like(y, CLASSES))
            return uncond + cfg * (cond - uncond)
        return u_of(x, s, y)

    def drift(x, s):
        velocity = u(x, s)
        alpha, d_alpha, sigma, d_sigma = s, 1.0, 1.0 - s, -1.0
        score = ((alpha / d_alpha) * velocity - x) / (sigma ** 2 - (alpha / d_alpha) * d_sigma * sigma)
        return velocity + norm * (1.0 - s) * score

    states = []
    for s in s_grid[:-1]:
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        mean = x + drift(x, s) * dt
        x = mean + math.sqrt(2 * norm * (1.0 - s)) * z * math.sqrt(dt)
        states.append(x)
    x = x + drift(x, s_grid[-1]) * last_step_size
    states.append(x)
    return states


def sit_u(field):
    """The SiT network matching our field: u(x, s) = −v(x, 1 − s)."""
    return lambda x, s, y: -field(x, torch.full((x.shape[0],), 1.0 - s, dtype=x.dtype), y)


@pytest.mark.parametrize("steps, cfg, interval, norm", [(12, 1.0, (0.0, 1.0), 1.0), (9, 2.5, (0.0, 0.7), 1.0),
                                                        (6, 1.7, (0.2, 0.6), 0.5)])
def test_sit_sde_matches_the_published_update_step_for_step(steps, cfg, interval, norm):
    field = Toy()
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1])
    expected = published_sampler(sit_u(field), x, y, steps, torch.Generator().manual_seed(5), cfg=cfg, interval=interval, norm=norm)
    got = []
    fn = GuidedVelocity(field, cfg, null_label=CLASSES)
    out = sit_sde(fn, x, time_grid(steps), y=y, generator=torch.Generator().manual_seed(5), guidance_interval=interval,
                  diffusion_norm=norm, callback=lambda info: got.append(info["x"]))
    assert len(got) == len(expected) == steps
    for k, (a, b) in enumerate(zip(got, expected)):
        assert torch.allclose(a, b, atol=1e-11, rtol=1e-11), (k, (a - b).abs().max())
    assert torch.equal(out, got[-1])


def test_the_published_grid_is_linspace_1_to_last_step_size():
    seen = []
    field = Toy()
    x = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    sit_sde(field, x, time_grid(250), y=torch.tensor([0]), generator=torch.Generator().manual_seed(0),
            callback=lambda info: seen.append((info["t"], info["t_next"])))
    ts = [t for t, _ in seen]
    assert len(ts) == 250 and ts[0] == 1.0 and ts[-1] == 0.04 and seen[-1][1] == 0.0
    assert torch.allclose(torch.tensor(ts, dtype=torch.float64), torch.linspace(1.0, 0.04, 250, dtype=torch.float64), atol=1e-14)


def test_without_noise_and_with_an_euler_last_step_it_is_euler_on_its_grid():
    field = Toy()
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    got = sit_sde(field, x, time_grid(7), y=y, diffusion_norm=0.0, last_step="euler", last_step_size=0.1)
    grid = torch.cat([torch.linspace(1.0, 0.1, 7, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    assert torch.allclose(got, euler(field, x, grid, y=y), atol=1e-13)


def test_guidance_outside_the_interval_costs_one_evaluation():
    net = CountingVelocity(Toy())
    fn = GuidedVelocity(net, 3.0, null_label=CLASSES)
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    sit_sde(fn, x, time_grid(11), y=torch.tensor([0, 1]), guidance_interval=(0.0, 0.7))
    guided = sum(1 for t in torch.linspace(1.0, 0.04, 11).tolist() if t <= 0.7 + 1e-12)
    assert net.rows == 2 * (2 * guided + (11 - guided))


def test_generate_counts_steps_evaluations_and_reproduces_per_seed():
    model = Toy()
    a = generate(model, num_samples=3, image_shape=(1, 2, 2), sampler="sit_sde", steps=5, batch_size=3, progress=False, clip=False)
    b = generate(model, num_samples=3, image_shape=(1, 2, 2), sampler="sit_sde", steps=5, batch_size=1, progress=False, clip=False)
    assert a.nfe_per_sample == 5 and torch.allclose(a.images, b.images, atol=1e-6)


@pytest.mark.parametrize("options, message", [({"last_step_size": 0.0}, "last_step_size"), ({"last_step": "tweedie"}, "last_step"),
                                              ({"guidance_interval": (0.8, 0.2)}, "guidance_interval"),
                                              ({"diffusion_norm": -1.0}, "diffusion_norm")])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        sit_sde(Toy(), torch.zeros(1, 1, 1, 1), time_grid(4), y=torch.tensor([0]), **options)
    with pytest.raises(ValueError, match="at least 2 steps"):
        sit_sde(Toy(), torch.zeros(1, 1, 1, 1), time_grid(1), y=torch.tensor([0]))
