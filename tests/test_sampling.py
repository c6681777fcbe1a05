"""Tests for selfflow.sampling: solvers against closed forms, guidance, counting, seeding."""

import math
import sys

import pytest
import torch
from torch import nn

from selfflow.sampling import (
    SAMPLERS,
    CountingVelocity,
    GuidedVelocity,
    dopri5,
    euler,
    euler_maruyama,
    generate,
    get_sampler,
    heun,
    noise_for_seeds,
    randn_like,
    time_grid,
)

HAS_TORCHDIFFEQ = True
try:
    import torchdiffeq  # noqa: F401
except ImportError:
    HAS_TORCHDIFFEQ = False


def _sampler_params():
    """Every registered sampler, with dopri5 skipped when torchdiffeq is missing."""
    marks = {"dopri5": pytest.mark.skipif(not HAS_TORCHDIFFEQ, reason="torchdiffeq not installed")}
    return [pytest.param(name, marks=marks.get(name, ())) for name in SAMPLERS]


class ToyModel(nn.Module):
    """Class-conditional velocity v = gain[y] * x + (1 - t) * offset[y], row by row.

    Elementwise, so each row's output is bit-identical whatever else is in the batch.
    Label ``num_classes`` is the null label (its own gain/offset).
    """

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("gain", torch.linspace(-0.5, 0.8, num_classes + 1))
        self.register_buffer("offset", torch.linspace(-0.3, 0.4, num_classes + 1))

    def forward(self, x, t, y):
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.int64, device=x.device)
        view = (-1,) + (1,) * (x.ndim - 1)
        return self.gain[y].view(view) * x + (1 - t).view(view) * self.offset[y].view(view)


# ---------------------------------------------------------------------------- time grid


def test_time_grid_uniform_and_shift():
    grid = time_grid(4)
    assert torch.equal(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = time_grid(4, shift=3.0)
    u = grid
    assert torch.allclose(shifted, 3 * u / (1 + 2 * u))
    assert shifted[0] == 1 and shifted[-1] == 0
    assert bool((shifted[1:-1] > grid[1:-1]).all())  # shift > 1: more time near t = 1
    assert bool((shifted[1:] < shifted[:-1]).all())
    with pytest.raises(ValueError, match="known: uniform"):
        time_grid(4, kind="cosine")
    with pytest.raises(ValueError):
        time_grid(0)


def test_times_validation():
    x = torch.zeros(2, 3)
    fn = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="decreasing"):
        euler(fn, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError):
        euler(fn, x, torch.tensor([1.0]))


# ---------------------------------------------------------------------------- exactness / order


def test_euler_exact_on_constant_field():
    c = torch.tensor([[0.3, -1.7, 2.5]], dtype=torch.float64)
    x1 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = euler(lambda x, t, y: c.expand_as(x), x1, time_grid(7, shift=2.0))
    assert torch.allclose(out, x1 - c, atol=1e-12, rtol=0)


def test_heun_exact_on_field_affine_in_time():
    # v = c0 + c1 * t, so x(0) = x(1) - integral_0^1 v dt = x(1) - c0 - c1 / 2. The trapezoid
    # rule integrates affine functions exactly, on any grid; Euler does not.
    c0, c1 = 0.7, -2.3
    fn = lambda x, t, y: c0 + c1 * t.view(-1, 1).expand_as(x)  # noqa: E731
    x1 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = x1 - c0 - c1 / 2
    grid = time_grid(5, shift=0.5)
    assert torch.allclose(heun(fn, x1, grid), exact, atol=1e-12, rtol=0)
    assert (euler(fn, x1, grid) - exact).abs().max() > 1e-2


def _endpoint_error(sampler, steps, lam=1.5, **options):
    # dx/dt = lam * x integrated from t = 1 to 0: x(0) = x(1) * exp(-lam).
    x1 = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    out = sampler(lambda x, t, y: lam * x, x1, time_grid(steps), **options)
    return (out - x1 * math.exp(-lam)).abs().max().item()


@pytest.mark.parametrize(
    "sampler, options, order",
    [(euler, {}, 1), (heun, {}, 2), (heun, {"euler_last_step": True}, 2)],
)
def test_convergence_order_on_linear_field(sampler, options, order):
    errors = [_endpoint_error(sampler, n, **options) for n in (16, 32, 64)]
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    for ratio in ratios:
        assert ratio == pytest.approx(2**order, rel=0.1)


@pytest.mark.skipif(not HAS_TORCHDIFFEQ, reason="torchdiffeq not installed")
def test_dopri5_accurate_and_counted():
    counter = CountingVelocity(lambda x, t, y: 1.5 * x)
    x1 = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    out = dopri5(counter, x1, time_grid(1), rtol=1e-9, atol=1e-9)
    assert torch.allclose(out, x1 * math.exp(-1.5), atol=1e-7, rtol=0)
    assert counter.calls > 6 and counter.rows == counter.calls


def test_dopri5_missing_torchdiffeq_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)  # makes `import torchdiffeq` fail
    with pytest.raises(ImportError, match=r"pip install 'selfflow\[ode\]'"):
        dopri5(lambda x, t, y: x, torch.zeros(1, 2), time_grid(2))


def test_sde_with_zero_diffusion_is_euler():
    model = ToyModel()
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2])
    grid = time_grid(6)
    expected = euler(model, x, grid, y=y)
    assert torch.equal(euler_maruyama(model, x, grid, y=y, diffusion="zero"), expected)


def test_sde_last_step_is_deterministic_clean_estimate():
    # A single interval is the final deterministic step: x0_hat = x - t * v, no noise drawn.
    v = torch.randn(2, 3)
    x = torch.randn(2, 3)
    out = euler_maruyama(lambda x_, t, y: v, x, time_grid(1))
    assert torch.allclose(out, x - v)


# ---------------------------------------------------------------------------- Gaussian closed form

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)


def gaussian_velocity(x, t, y=None):
    """Exact v(x, t) = E[eps - x0 | x_t = x] for x0 ~ N(MU, SIGMA), x_t = (1 - t) x0 + t eps.

    x_t ~ N(m, C) with m = (1 - t) MU, C = (1 - t)^2 SIGMA + t^2 I; Cov(x0, x_t) = (1 - t) SIGMA
    and Cov(eps, x_t) = t I, so v = (t I - (1 - t) SIGMA) C^{-1} (x - m) - MU. In the eigenbasis
    SIGMA = Q diag(lam) Q^T every matrix is diagonal:
    v_q = (t - (1 - t) lam) / ((1 - t)^2 lam + t^2) * (x_q - (1 - t) MU_q) - MU_q.
    """
    lam, q = torch.linalg.eigh(SIGMA)
    s = t.view(-1, 1)
    gain = (s - (1 - s) * lam) / ((1 - s) ** 2 * lam + s**2)  # (B, 2)
    mu_q = MU @ q
    return (gain * (x @ q - (1 - s) * mu_q) - mu_q) @ q.T


@pytest.mark.parametrize(
    "name, steps, cov_tol",
    [("euler", 100, 0.05), ("heun", 50, 0.02), ("sde", 200, 0.03), ("dopri5", 1, 0.02)],
)
def test_gaussian_marginals(name, steps, cov_tol):
    # 20k samples: sampling error ~0.007 on mean and covariance entries. Euler's O(h) bias is
    # ~0.03 on the covariance at 100 steps; a wrong noise or score factor in the SDE is >= 0.3.
    if name == "dopri5" and not HAS_TORCHDIFFEQ:
        pytest.skip("torchdiffeq not installed")
    gen = torch.Generator().manual_seed(10)
    x1 = torch.randn(20_000, 2, dtype=torch.float64, generator=gen)
    samples = SAMPLERS[name](gaussian_velocity, x1, time_grid(steps), generator=gen)
    mean = samples.mean(0)
    cov = torch.cov(samples.T)
    assert torch.allclose(mean, MU, atol=0.04), (mean, MU)
    assert torch.allclose(cov, SIGMA, atol=cov_tol), (cov, SIGMA)


# ---------------------------------------------------------------------------- one signature


@pytest.mark.parametrize("name", _sampler_params())
def test_every_sampler_same_call(name):
    model = ToyModel()
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 3])
    generators = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    seen = []
    out = get_sampler(name)(
        GuidedVelocity(model, 1.5), x, time_grid(4), y=y, generator=generators, callback=seen.append
    )
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert [info["step"] for info in seen] == [0, 1, 2, 3]
    assert seen[-1]["t_next"] == 0.0 and torch.equal(seen[-1]["x"], out)


def test_unknown_sampler_lists_known():
    with pytest.raises(ValueError, match="euler, heun, sde, dopri5"):
        get_sampler("ddim")


# ---------------------------------------------------------------------------- guidance and counting


def test_guidance_scales():
    model = ToyModel()
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(4))
    t = torch.full((4,), 0.3)
    y = torch.tensor([0, 1, 2, 1])
    cond, uncond = model(x, t, y), model(x, t, None)

    counted = CountingVelocity(model)
    assert torch.equal(GuidedVelocity(counted, 1.0, null_label=3)(x, t, y), cond)
    assert (counted.calls, counted.rows) == (1, 4)  # scale 1: a single B-row pass

    counted.reset()
    assert torch.equal(GuidedVelocity(counted, 0.0, null_label=3)(x, t, y), uncond)
    assert (counted.calls, counted.rows) == (1, 8)  # one batched call of 2B rows

    guided = GuidedVelocity(model, 2.5)  # null label from model.num_classes
    assert torch.allclose(guided(x, t, y), uncond + 2.5 * (cond - uncond), atol=1e-6)
    with pytest.raises(ValueError, match="needs class labels"):
        guided(x, t, None)


@pytest.mark.parametrize(
    "name, options, expected_calls",
    [("euler", {}, 5), ("heun", {}, 10), ("heun", {"euler_last_step": True}, 9), ("sde", {}, 5)],
)
def test_nfe_counts(name, options, expected_calls):
    counter = CountingVelocity(ToyModel())
    x = torch.randn(2, 1, 2, 2)
    SAMPLERS[name](counter, x, time_grid(5), y=torch.tensor([0, 1]), **options)
    assert counter.calls == expected_calls and counter.rows == 2 * expected_calls


# ---------------------------------------------------------------------------- seeds and generate


def test_noise_for_seeds_per_row():
    both = noise_for_seeds([11, 12], (2, 3, 3))
    assert both.shape == (2, 2, 3, 3) and both.dtype == torch.float32
    assert torch.equal(noise_for_seeds([12], (2, 3, 3))[0], both[1])
    expected = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(11))
    assert torch.equal(both[0], expected)
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    assert torch.equal(randn_like(torch.empty(2, 2, 3, 3), gens), both)


@pytest.mark.parametrize("sampler", ["euler", "sde"])
def test_generate_sample_k_independent_of_batch_size(sampler):
    model = ToyModel()
    common = dict(
        num_samples=5, image_shape=(2, 4, 4), seeds=[3, 1, 4, 1, 5], sampler=sampler,
        steps=6, cfg_scale=1.5, progress=False,
    )
    one_by_one = generate(model, batch_size=1, **common)
    all_at_once = generate(model, batch_size=5, **common)
    uneven = generate(model, batch_size=2, **common)
    assert torch.equal(one_by_one.images, all_at_once.images)
    assert torch.equal(uneven.images, all_at_once.images)
    # Equal seeds give equal images; different seeds differ.
    assert torch.equal(all_at_once.images[1], all_at_once.images[3])
    assert not torch.equal(all_at_once.images[0], all_at_once.images[2])
    assert torch.equal(all_at_once.labels, torch.tensor([0, 1, 1, 1, 2]))  # seed % num_classes
    assert all_at_once.nfe_per_sample == 12.0  # 6 steps, guided = 2 evaluations per step
    assert all_at_once.images.dtype == torch.float32
    assert all_at_once.images.abs().max() <= 1.0


def test_generate_starts_from_seeded_noise_and_restores_mode():
    class Still(ToyModel):
        def forward(self, x, t, y):
            return torch.zeros_like(x)

    model = Still()
    model.train()
    result = generate(
        model, num_samples=3, image_shape=(1, 3, 3), seeds=[7, 8, 9], steps=2, progress=False
    )
    expected = noise_for_seeds([7, 8, 9], (1, 3, 3)).clamp(-1, 1)
    assert torch.equal(result.images, expected)
    assert model.training
    assert result.nfe_per_sample == 2.0 and result.seeds == [7, 8, 9]


def test_generate_rejects_bad_requests():
    uncond = ToyModel(num_classes=0)
    with pytest.raises(ValueError, match="class-conditional"):
        generate(uncond, num_samples=2, image_shape=(1, 2, 2), cfg_scale=2.0, progress=False)
    with pytest.raises(ValueError, match="known: euler"):
        generate(ToyModel(), num_samples=2, image_shape=(1, 2, 2), sampler="rk4", progress=False)
    with pytest.raises(TypeError):
        generate(
            ToyModel(), num_samples=2, image_shape=(1, 2, 2), sampler="sde",
            sampler_options={"difusion": "zero"}, progress=False,
        )
    result = generate(uncond, num_samples=2, image_shape=(1, 2, 2), steps=3, progress=False)
    assert result.labels is None


def test_generate_autocast_keeps_float32_state():
    class Mixer(ToyModel):
        def __init__(self):
            super().__init__()
            self.mix = nn.Conv2d(2, 2, kernel_size=1)
            with torch.no_grad():
                self.mix.weight.copy_(torch.tensor([[0.5, -0.2], [0.1, 0.3]]).view(2, 2, 1, 1))
                self.mix.bias.zero_()

        def forward(self, x, t, y):
            return self.mix(x) + super().forward(x, t, y)

    common = dict(num_samples=3, image_shape=(2, 3, 3), steps=4, progress=False)
    full = generate(Mixer(), **common)
    low = generate(Mixer(), autocast_dtype=torch.bfloat16, **common)
    assert low.images.dtype == torch.float32
    assert torch.allclose(low.images, full.images, atol=0.05)
    assert not torch.equal(low.images, full.images)  # bf16 really ran


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_same_noise_on_cuda():
    common = dict(num_samples=3, image_shape=(2, 3, 3), steps=4, sampler="sde", progress=False)
    on_cpu = generate(ToyModel(), **common)
    on_gpu = generate(ToyModel().cuda(), device="cuda", **common)
    assert torch.allclose(on_cpu.images, on_gpu.images, atol=1e-5)


def test_evaluating_puts_training_modules_in_eval_and_back_exactly():
    """generate() runs the network in eval mode and leaves every module as it found it, a mixed state
    included (model.eval() + model.train(was) would have flattened it), even when sampling fails."""
    import pytest
    from torch import nn

    from selfflow.sampling import evaluating

    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 2)))
    model.train()
    model[2].eval()  # a frozen part inside a training model
    before = [m.training for m in model.modules()]
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
    with pytest.raises(RuntimeError), evaluating(model):
        raise RuntimeError("a sampler that fails")
    assert [m.training for m in model.modules()] == before
    with evaluating(lambda x: x):  # a plain velocity function: nothing to switch
        pass
