"""The probability path against its closed forms (docs/methods.md#the-probability-path)."""
import torch

from selfflow import path


def test_interpolation_endpoints_and_midpoint():
    x0, eps = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    assert torch.equal(path.interpolate(x0, eps, torch.zeros(4)), x0)
    assert torch.equal(path.interpolate(x0, eps, torch.ones(4)), eps)
    torch.testing.assert_close(path.interpolate(x0, eps, torch.full((4,), 0.25)), 0.75 * x0 + 0.25 * eps)


def test_velocity_is_time_derivative_of_the_path():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([0.3, 0.7])
    h = 1e-3
    numeric = (path.interpolate(x0.double(), eps.double(), t.double() + h) - path.interpolate(x0.double(), eps.double(), t.double() - h)) / (2 * h)
    torch.testing.assert_close(numeric, path.velocity_target(x0, eps).double())


def test_clean_and_noise_estimates_invert_the_path():
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t = path.interpolate(x0, eps, t)
    v = path.velocity_target(x0, eps)
    torch.testing.assert_close(path.x0_from_velocity(x_t, t, v), x0)
    torch.testing.assert_close(path.noise_from_velocity(x_t, t, v), eps)


def test_per_pixel_time_map_matches_per_sample_time():
    x0, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    t = torch.tensor([0.2, 0.6])
    tmap = t.view(2, 1, 1, 1).expand(2, 1, 4, 4)
    torch.testing.assert_close(path.interpolate(x0, eps, tmap), path.interpolate(x0, eps, t))


def test_time_distributions():
    g = torch.Generator().manual_seed(0)
    u = path.sample_time(200_000, "uniform", g, "cpu")
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    ln = path.sample_time(200_000, "logit_normal", g, "cpu", logit_mean=0.5, logit_std=1.0)
    logit = torch.log(ln / (1 - ln))
    assert abs(logit.mean() - 0.5) < 0.01 and abs(logit.std() - 1.0) < 0.01


def test_rectified_flow_convention_round_trip():
    """RF writes x_τ = τ·x0 + (1−τ)·ε; its velocity dx/dτ must equal −v at τ = 1 − t."""
    x0, eps = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    t = torch.tensor([0.3, 0.8])
    tau, u = path.to_data_at_one(t, path.velocity_target(x0, eps))
    rf_point = tau.view(-1, 1, 1, 1) * x0 + (1 - tau.view(-1, 1, 1, 1)) * eps
    torch.testing.assert_close(rf_point, path.interpolate(x0, eps, t))
    torch.testing.assert_close(u, x0 - eps)
    back_t, back_v = path.from_data_at_one(tau, u)
    torch.testing.assert_close(back_t, t)
    torch.testing.assert_close(back_v, eps - x0)
