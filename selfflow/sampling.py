"""Sampling from a flow-matching model: velocity wrappers, ODE/SDE solvers, seeded generation.

Conventions (docs/methods.md#sampling has every update): ``x_t = (1 - t) * x0 + t * eps``, t = 0 clean, t = 1 noise.
The network predicts the velocity ``v = eps - x0``; sampling integrates ``dx/dt = v`` from
t = 1 down to t = 0. From one velocity evaluation at (x_t, t)::

    x0_hat  = x_t - t * v            # clean estimate
    eps_hat = x_t + (1 - t) * v      # noise estimate
    score   = -eps_hat / t           # grad_x log p_t(x_t), since x_t | x0 ~ N((1-t) x0, t^2 I)

A *velocity function* is any callable ``fn(x, t, y) -> v`` with ``x`` of shape (B, ...), ``t``
a float tensor of shape (B,) and ``y`` an int64 tensor of shape (B,) or None. The model is one;
the wrappers below (:class:`GuidedVelocity`, :class:`CountingVelocity`) take and return the
same call, so they stack freely.

Every sampler has one signature (the k-diffusion design)::

    sampler(fn, x, times, *, y=None, generator=None, callback=None, **method_options) -> x0

``times`` is a 1-D strictly decreasing grid (normally from 1 to 0 inclusive, see
:func:`time_grid`); ``x`` is the state at ``times[0]``. Method options are keyword arguments
with defaults (e.g. ``rtol`` for :func:`dopri5`); unknown ones raise ``TypeError``. Samplers do
not switch off autograd themselves, so they can be differentiated through; :func:`generate`
runs them under ``torch.no_grad()``.

``generator`` (stochastic samplers only) is one of

* ``None``: the global torch RNG;
* a ``torch.Generator``: one stream for the whole batch (sample k then depends on the batch);
* a sequence of ``torch.Generator`` (one per row): row k draws its noise only from
  ``generator[k]``, in float32 on that generator's device, then moves to ``x``. Sample k is
  then identical whatever else is in the batch. :func:`generate` uses this form, seeded by
  ``seeds[k]``, and draws the starting noise from the same stream first (so the starting noise
  equals :func:`noise_for_seeds`).

``callback`` is called once per step with a dict: ``step`` (int), ``t`` and ``t_next``
(floats), ``x`` (the state at ``t_next``) and ``x0_hat`` (the clean estimate made at ``t``, or
None where the method has none, i.e. :func:`dopri5`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from selfflow.config import NOISE_INJECTING_SAMPLERS

__all__ = [
    "VelocityFn",
    "GuidedVelocity",
    "CountingVelocity",
    "time_grid",
    "randn_like",
    "noise_for_seeds",
    "euler",
    "heun",
    "euler_maruyama",
    "dopri5",
    "sit_sde",
    "SAMPLERS",
    "NOISE_INJECTING",
    "injects_noise",
    "get_sampler",
    "sampler_option_names",
    "parse_sampler_options",
    "SampleResult",
    "generate",
]

VelocityFn = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]
GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]
Callback = Optional[Callable[[dict], None]]


# --------------------------------------------------------------------------------------------
# Wrappers: each takes and returns the (x, t, y) -> v call.
# --------------------------------------------------------------------------------------------


class GuidedVelocity:
    """Classifier-free guidance: ``v = v_uncond + scale * (v_cond - v_uncond)``.

    ``v_cond = model(x, t, y)`` and ``v_uncond = model(x, t, null)`` are computed in one batched
    call on 2B rows (conditional rows first). ``scale == 1`` returns exactly ``model(x, t, y)``
    with a single B-row call; ``scale == 0`` is the unconditional model.

    Args:
        model: velocity function ``(x (B,...), t (B,), y (B,) int64) -> v (B,...)``.
        scale: guidance scale w (1 = no guidance).
        null_label: the label that means "no class"; defaults to ``model.num_classes``.
    """

    def __init__(self, model: VelocityFn, scale: float, null_label: Optional[int] = None):
        if null_label is None:
            null_label = getattr(model, "num_classes", None)
            if null_label is None:
                raise ValueError(
                    "GuidedVelocity needs null_label, or a model with a `num_classes` attribute"
                )
        self.model = model
        self.scale = float(scale)
        self.null_label = int(null_label)

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        if self.scale == 1.0:
            return self.model(x, t, y)
        if y is None:
            raise ValueError(
                f"classifier-free guidance (scale={self.scale}) needs class labels y, got None"
            )
        null = torch.full_like(y, self.null_label)
        v = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + self.scale * (v_cond - v_uncond)

    def __repr__(self) -> str:
        return f"GuidedVelocity(scale={self.scale}, null_label={self.null_label})"


class CountingVelocity:
    """Counts evaluations of the wrapped velocity function.

    ``calls`` is the number of calls; ``rows`` the number of sample evaluations (the sum of
    the batch sizes seen). Wrap the *network* (inside :class:`GuidedVelocity`) to count network
    work: a guided step is then one call of 2B rows, i.e. 2 evaluations per sample, and an
    unguided step 1. :func:`generate` reports ``nfe_per_sample = rows / num_samples`` with this
    convention (network evaluations per image, independent of batching).
    """

    def __init__(self, fn: VelocityFn):
        self.fn = fn
        self.calls = 0
        self.rows = 0

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        return self.fn(x, t, y)

    def reset(self) -> None:
        self.calls = 0
        self.rows = 0

    def __repr__(self) -> str:
        return f"CountingVelocity(calls={self.calls}, rows={self.rows})"


class _Autocast:
    """Runs the wrapped call under ``torch.autocast`` and returns v in the state's dtype."""

    def __init__(self, fn: VelocityFn, device_type: str, dtype: torch.dtype):
        self.fn = fn
        self.device_type = device_type
        self.dtype = dtype

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            v = self.fn(x, t, y)
        return v.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Time grids and noise.
# --------------------------------------------------------------------------------------------

TIME_GRID_KINDS = ("uniform",)


@contextlib.contextmanager
def evaluating(model):
    """Eval mode for the block: the modules of ``model`` that were training are put in eval mode and put
    back afterwards, and only those (``model.eval()`` + ``model.train(was)`` would walk every module
    twice per call, a noticeable part of a small one-step model's pass, and would flatten a mixed
    state). Anything without ``modules()`` (a plain velocity function) is left alone."""
    training = [module for module in model.modules() if module.training] if hasattr(model, "modules") else []
    for module in training:
        module.training = False
    try:
        yield model
    finally:
        for module in training:
            module.training = True


def time_grid(steps: int, kind: str = "uniform", shift: float = 1.0) -> Tensor:
    """Decreasing time grid from 1 to 0, shape (steps + 1,), float64.

    ``kind="uniform"``: ``u_i = 1 - i / steps``. A timestep shift s (SD3's resolution-dependent
    shift, Esser et al. 2024) then maps ``t = s * u / (1 + (s - 1) * u)``: s > 1 spends more steps at high noise
    (t near 1), s < 1 at low noise; s = 1 is the identity. The endpoints 1 and 0 are fixed.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if kind not in TIME_GRID_KINDS:
        raise ValueError(f"unknown time grid kind {kind!r}; known: {', '.join(TIME_GRID_KINDS)}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    u = torch.linspace(1.0, 0.0, int(steps) + 1, dtype=torch.float64)
    if shift != 1.0:
        u = shift * u / (1.0 + (shift - 1.0) * u)
    u[0], u[-1] = 1.0, 0.0
    return u


def _per_row_randn(generators: Sequence[torch.Generator], row_shape, device, dtype) -> Tensor:
    rows = [
        torch.randn(tuple(row_shape), generator=g, device=g.device, dtype=torch.float32)
        for g in generators
    ]
    return torch.stack(rows).to(device=device, dtype=dtype)


def randn_like(x: Tensor, generator: GeneratorArg = None) -> Tensor:
    """Standard normal noise shaped like ``x`` (B, ...), drawn as described in the module doc.

    With a sequence of generators, row k comes from ``generator[k]`` alone (float32 draw on the
    generator's device, then cast/moved to ``x``), so it does not depend on the batch.
    """
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
        return noise.to(x.device)
    generators = list(generator)
    if len(generators) != x.shape[0]:
        raise ValueError(
            f"got {len(generators)} per-sample generators for a batch of {x.shape[0]}"
        )
    return _per_row_randn(generators, x.shape[1:], x.device, x.dtype)


def _seeded_generators(seeds: Sequence[int]) -> list:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def noise_for_seeds(
    seeds: Sequence[int],
    shape: Sequence[int],
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Starting noise (B, *shape), row k drawn from ``torch.Generator().manual_seed(seeds[k])``.

    Draws are float32 on the CPU, then moved to ``device``/``dtype``, so row k is the same
    whatever the batch, the device or the device RNG state.
    """
    return _per_row_randn(_seeded_generators(seeds), shape, torch.device(device), dtype)


# --------------------------------------------------------------------------------------------
# Samplers (one signature).
# --------------------------------------------------------------------------------------------


def _as_time_list(times, x: Tensor) -> list:
    times = torch.as_tensor(times, dtype=torch.float64).detach().cpu()
    if times.ndim != 1 or times.numel() < 2:
        raise ValueError(f"times must be 1-D with at least 2 entries, got shape {tuple(times.shape)}")
    if not bool((times[1:] < times[:-1]).all()):
        raise ValueError("times must be strictly decreasing (from noise t=1 to data t=0)")
    if times[-1] < 0 or times[0] > 1:
        raise ValueError(f"times must lie in [0, 1], got [{times[-1].item()}, {times[0].item()}]")
    if x.ndim < 1:
        raise ValueError("x must have a leading batch dimension")
    return times.tolist()


def _time_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _t_batch(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=_time_dtype(x), device=x.device)  # (B,)


def euler(
    fn: VelocityFn,
    x: Tensor,
    times,
    *,
    y: Optional[Tensor] = None,
    generator: GeneratorArg = None,
    callback: Callback = None,
) -> Tensor:
    """Explicit Euler for ``dx/dt = v(x, t)``: ``x_{i+1} = x_i + (t_{i+1} - t_i) * v(x_i, t_i)``.

    x: (B, ...) at ``times[0]``; returns the state at ``times[-1]``. One evaluation per step;
    exact when v is constant. ``generator`` is unused (deterministic).
    """
    ts = _as_time_list(times, x)
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        v = fn(x, _t_batch(t, x), y)
        x0_hat = x - t * v
        x = x + (t_next - t) * v
        if callback is not None:
            callback({"step": i, "t": t, "t_next": t_next, "x": x, "x0_hat": x0_hat})
    return x


def heun(
    fn: VelocityFn,
    x: Tensor,
    times,
    *,
    y: Optional[Tensor] = None,
    generator: GeneratorArg = None,
    callback: Callback = None,
    euler_last_step: bool = False,
) -> Tensor:
    """Heun's method (explicit trapezoid), 2nd order, two evaluations per step::

        x_e     = x_i + h * v(x_i, t_i),                 h = t_{i+1} - t_i  (< 0)
        x_{i+1} = x_i + h/2 * (v(x_i, t_i) + v(x_e, t_{i+1}))

    By default Heun is used on every step, including the last one into t = 0: unlike EDM's
    denoiser, the velocity is well defined at t = 0, so 2n evaluations for n steps. Exact when
    v depends on t only and affinely (v = c0 + c1 * t). ``euler_last_step=True`` takes a plain
    Euler step last (EDM's choice; 2n - 1 evaluations, still 2nd order globally).
    """
    ts = _as_time_list(times, x)
    n = len(ts) - 1
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        h = t_next - t
        v = fn(x, _t_batch(t, x), y)
        x0_hat = x - t * v
        x_euler = x + h * v
        if euler_last_step and i == n - 1:
            x = x_euler
        else:
            v_next = fn(x_euler, _t_batch(t_next, x), y)
            x = x + (0.5 * h) * (v + v_next)
        if callback is not None:
            callback({"step": i, "t": t, "t_next": t_next, "x": x, "x0_hat": x0_hat})
    return x


DIFFUSION_FORMS = ("sigma", "constant", "zero")


def _diffusion_fn(diffusion, norm: float) -> Callable[[float], float]:
    if callable(diffusion):
        return lambda t: norm * float(diffusion(t))
    if diffusion == "sigma":
        return lambda t: norm * t
    if diffusion == "constant":
        return lambda t: norm
    if diffusion == "zero":
        return lambda t: 0.0
    raise ValueError(
        f"unknown diffusion {diffusion!r}; known: {', '.join(DIFFUSION_FORMS)}, or a callable t -> w(t)"
    )


def reverse_sde_drift(x: Tensor, v: Tensor, t: float, w: float) -> Tensor:
    """Drift of the reverse-time SDE with diffusion w(t) on the linear path: v + (w / t)·ε̂, where
    ε̂ = x + (1 − t)·v is the noise the velocity implies (score = −ε̂ / t)."""
    return v + (w / t) * (x + (1.0 - t) * v)


def euler_maruyama(
    fn: VelocityFn,
    x: Tensor,
    times,
    *,
    y: Optional[Tensor] = None,
    generator: GeneratorArg = None,
    callback: Callback = None,
    diffusion: Union[str, Callable[[float], float]] = "sigma",
    diffusion_norm: float = 1.0,
) -> Tensor:
    """Euler–Maruyama on the reverse-time SDE with the marginals of the linear path.

    With diffusion ``w(t) = g(t)^2 / 2`` (SiT's convention), every SDE
    ``dx = [v - w(t) * score] dt + sqrt(2 w(t)) dW`` run backwards in t has the same marginals
    p_t as the ODE ``dx/dt = v`` (Fokker–Planck). Using ``score = -eps_hat / t`` with
    ``eps_hat = x + (1 - t) * v``, one step of size ``h = t_i - t_{i+1} > 0`` is::

        x_{i+1} = x_i - h * (v + (w(t_i) / t_i) * eps_hat) + sqrt(2 * w(t_i) * h) * z,  z ~ N(0, I)

    The last step is deterministic (plain Euler), which into t = 0 gives ``x0_hat = x - t * v``
    exactly; so no division by t = 0 happens and n steps cost n evaluations (the Self-Flow
    release: 249 stochastic steps + 1 deterministic step = 250 calls).

    diffusion: ``"sigma"`` (default, SiT's default: w(t) = sigma_t = t, so the drift is
    ``v + eps_hat`` and g(t) = sqrt(2 t)), ``"constant"`` (w = 1), ``"zero"`` (the ODE; equals
    :func:`euler`), or a callable ``t -> w(t)``; all multiplied by ``diffusion_norm``.
    generator: see the module doc; a sequence of per-sample generators makes sample k
    independent of the batch.
    """
    ts = _as_time_list(times, x)
    w_of_t = _diffusion_fn(diffusion, float(diffusion_norm))
    n = len(ts) - 1
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        v = fn(x, _t_batch(t, x), y)
        x0_hat = x - t * v
        if i == n - 1:
            x = x + (t_next - t) * v
        else:
            h = t - t_next
            w = w_of_t(t)
            if w < 0:
                raise ValueError(f"diffusion w(t) must be >= 0, got {w} at t={t}")
            x = x - h * reverse_sde_drift(x, v, t, w) + math.sqrt(2.0 * w * h) * randn_like(x, generator)
        if callback is not None:
            callback({"step": i, "t": t, "t_next": t_next, "x": x, "x0_hat": x0_hat})
    return x


def dopri5(
    fn: VelocityFn,
    x: Tensor,
    times,
    *,
    y: Optional[Tensor] = None,
    generator: GeneratorArg = None,
    callback: Callback = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> Tensor:
    """Adaptive Dormand–Prince RK5(4) (torchdiffeq) from ``times[0]`` to ``times[-1]``.

    The step size is chosen by the error control (rtol, atol), not by ``times``; intermediate
    entries of ``times`` only serve as output points for ``callback`` (interpolated, no extra
    evaluations; ``x0_hat`` is None). Count evaluations by passing a :class:`CountingVelocity`.
    The error norm is taken over the whole batch, so unlike the fixed-step samplers the result
    for sample k depends (within the tolerances) on the rest of the batch.
    Needs torchdiffeq: ``pip install selfflow[ode]`` (or ``pip install torchdiffeq``).
    """
    try:
        from torchdiffeq import odeint
    except ImportError as err:
        raise ImportError(
            "the dopri5 sampler needs torchdiffeq: pip install 'selfflow[ode]' "
            "(or pip install torchdiffeq)"
        ) from err
    ts = _as_time_list(times, x)
    t_dtype = _time_dtype(x)

    def velocity(t: Tensor, state: Tensor) -> Tensor:
        t_vec = t.to(dtype=t_dtype, device=state.device).expand(state.shape[0])  # (B,)
        return fn(state, t_vec, y)

    out_times = ts if callback is not None else [ts[0], ts[-1]]
    grid = torch.tensor(out_times, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    states = odeint(velocity, x, grid.to(x.device), rtol=rtol, atol=atol, method="dopri5")
    if callback is not None:
        for i in range(len(ts) - 1):
            callback({"step": i, "t": ts[i], "t_next": ts[i + 1], "x": states[i + 1], "x0_hat": None})
    return states[-1]


SIT_LAST_STEPS = ("mean", "euler")


def sit_sde(
    fn: VelocityFn,
    x: Tensor,
    times,
    *,
    y: Optional[Tensor] = None,
    generator: GeneratorArg = None,
    callback: Callback = None,
    last_step_size: float = 0.04,
    last_step: str = "mean",
    diffusion_norm: float = 1.0,
    guidance_interval: tuple = (0.0, 1.0),
) -> Tensor:
    """The SDE sampler behind the published SiT, REPA and Self-Flow FIDs, in our time (docs/methods.md#sit_sde).

    With n = len(times) − 1 evaluations (the authors': 250): Euler–Maruyama with diffusion
    w(t) = diffusion_norm·t (SiT's "sigma") over n grid points g_0 = times[0] … g_{n−1} = L
    (``last_step_size``), i.e. n − 1 stochastic steps of size h_i = g_i − g_{i+1}::

        x ← x − h_i·(v + (w/t)·ε̂) + sqrt(2·w·h_i)·z,      ε̂ = x + (1 − t)·v,  t = g_i

    then one deterministic step of size L from t = L to 0: ``"mean"`` (the authors') keeps the
    score term, x ← x − L·(v + (w/L)·ε̂); ``"euler"`` drops it, x ← x − L·v. The grid is
    ``times[:-1]`` mapped affinely onto [L, times[0]]: a uniform grid gives linspace(1, L, n), the
    published one (SiT's linspace(0, 1 − L, n) in its time s = 1 − t); times[-1] must be 0.

    guidance_interval (lo, hi): when ``fn`` is a :class:`GuidedVelocity`, guidance is applied only
    at lo ≤ t ≤ hi (our t; the release: (0, 0.7), i.e. not at the noisiest 30 %), elsewhere the
    conditional velocity alone (one evaluation per image instead of two).
    """
    ts = _as_time_list(times, x)
    n = len(ts) - 1
    L = float(last_step_size)
    if n < 2:
        raise ValueError(f"sit_sde needs at least 2 steps (n − 1 stochastic + 1 last), got {n}")
    if ts[-1] != 0.0:
        raise ValueError(f"sit_sde ends at t = 0; the grid ends at {ts[-1]}")
    if not 0.0 < L < ts[0]:
        raise ValueError(f"last_step_size must lie in (0, {ts[0]}), got {last_step_size!r}")
    if last_step not in SIT_LAST_STEPS:
        raise ValueError(f"unknown last_step {last_step!r}; known: {', '.join(SIT_LAST_STEPS)}")
    if not diffusion_norm >= 0:
        raise ValueError(f"diffusion_norm must be >= 0, got {diffusion_norm!r}")
    lo, hi = (float(v) for v in guidance_interval)
    if not lo <= hi:
        raise ValueError(f"guidance_interval must be (lo, hi) with lo <= hi, got {guidance_interval!r}")
    top, bottom = ts[0], ts[n - 1]
    grid = [L + (t - bottom) * (top - L) / (top - bottom) for t in ts[:n]]
    grid[0], grid[-1] = top, L

    def velocity(state: Tensor, t: float) -> Tensor:
        if isinstance(fn, GuidedVelocity) and fn.scale != 1.0 and not lo <= t <= hi:
            return fn.model(state, _t_batch(t, state), y)
        return fn(state, _t_batch(t, state), y)

    for i in range(n):
        t = grid[i]
        v = velocity(x, t)
        x0_hat = x - t * v
        w = float(diffusion_norm) * t
        drift = reverse_sde_drift(x, v, t, w)
        if i < n - 1:
            h = t - grid[i + 1]
            t_next = grid[i + 1]
            x = x - h * drift + math.sqrt(2.0 * w * h) * randn_like(x, generator)
        else:
            t_next = 0.0
            x = x - L * (drift if last_step == "mean" else v)
        if callback is not None:
            callback({"step": i, "t": t, "t_next": t_next, "x": x, "x0_hat": x0_hat})
    return x


SAMPLERS = {
    "euler": euler,
    "heun": heun,
    "sde": euler_maruyama,
    "dopri5": dopri5,
    "sit_sde": sit_sde,
}


def parse_labels(text: Optional[str], num_classes: int) -> Optional[list[int]]:
    """``"1,2,3"`` → [1, 2, 3], each checked against the model's classes; None/"" → None."""
    from selfflow.errors import ConfigError

    if not text:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--labels must be comma-separated integers, got {text!r}") from None
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad or num_classes == 0:
        if num_classes == 0:
            raise ConfigError(f"--labels {values}: the model is unconditional (no classes)")
        raise ConfigError(f"--labels {bad} outside 0..{num_classes - 1} (model has {num_classes} classes)")
    return values


NOISE_INJECTING = NOISE_INJECTING_SAMPLERS  # samplers that draw fresh noise along the way (selfflow.config)


def injects_noise(sampler: str) -> bool:
    """Whether a sampler draws fresh noise along the way (:data:`NOISE_INJECTING`).

    Such a sampler's output is not a function of the starting noise alone, so it cannot make the
    deterministic (noise, image) coupling that reflow and distillation learn."""
    get_sampler(sampler)  # unknown names raise
    return sampler in NOISE_INJECTING


def get_sampler(name: str) -> Callable:
    """The sampler registered under ``name``; unknown names raise listing the known ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}") from None


_CALL_ARGUMENTS = ("y", "generator", "callback")  # what generate() itself passes to every sampler


def sampler_option_names(sampler: Union[str, Callable]) -> list[str]:
    """The keyword options a sampler takes beyond what :func:`generate` passes (sit_sde: last_step_size, ...)."""
    import inspect

    fn = get_sampler(sampler) if isinstance(sampler, str) else sampler
    return [name for name, p in inspect.signature(fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _CALL_ARGUMENTS]


def parse_sampler_options(items: Sequence[str], sampler: str, steps: Optional[int] = None, flag: str = "--sampler-option") -> dict:
    """``KEY=VALUE`` strings → ``generate``'s ``sampler_options``, values parsed as ``--set`` values
    (YAML: ``0.04``, ``euler``, ``[0, 0.7]``); a key the sampler does not take is a ConfigError
    naming it and listing the sampler's options. A repeated key: the last one wins. With ``steps``,
    the values are checked too, by a dry run of the sampler on a zero velocity field (one number,
    its own generator): the sampler's own refusal (``last_step_size`` outside (0, 1), ...) becomes
    a ConfigError before any work."""
    from selfflow.config import parse_scalar
    from selfflow.errors import ConfigError

    names = sampler_option_names(sampler)
    options: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r} is not of the form KEY=VALUE (e.g. {flag} last_step_size=0.04)")
        if key not in names:
            known = f"its options: {', '.join(names)}" if names else "it takes no options"
            raise ConfigError(f"{flag} {key}: the {sampler} sampler has no option {key!r}; {known}")
        options[key] = parse_scalar(text)
    if options and steps is not None:
        x = torch.zeros(1, 1)
        try:
            get_sampler(sampler)(lambda state, t, y: torch.zeros_like(state), x, time_grid(steps), y=None,
                                 generator=torch.Generator().manual_seed(0), **options)
        except ImportError:  # dopri5 without torchdiffeq: generate says so
            pass
        except (ValueError, TypeError) as exc:
            given = " ".join(f"{k}={v}" for k, v in options.items())
            raise ConfigError(f"{flag} {given}: the {sampler} sampler refuses it: {exc}") from None
    return options


# --------------------------------------------------------------------------------------------
# Top level: seeded, batched generation.
# --------------------------------------------------------------------------------------------


@dataclass
class SampleResult:
    """What :func:`generate` made, with what is needed to report it (docs/methods.md#evaluation).

    images: (N, C, H, W) float32 on the CPU, clipped to [-1, 1] unless ``clip=False`` (latents);
    labels: (N,) int64 or None;
    nfe_per_sample: network evaluations per image (a guided step counts 2);
    wall_time_s: sampling wall time; seeds: seed of each image.
    """

    images: Tensor
    labels: Optional[Tensor]
    nfe_per_sample: float
    wall_time_s: float
    seeds: list
    sampler: str
    steps: int
    cfg_scale: float


def generate(
    model: Callable,
    *,
    num_samples: int,
    image_shape: Sequence[int],
    seeds: Optional[Sequence[int]] = None,
    labels: Optional[Tensor] = None,
    sampler: Union[str, Callable] = "euler",
    steps: int = 50,
    cfg_scale: float = 1.0,
    batch_size: int = 256,
    device: Union[str, torch.device] = "cpu",
    time_shift: float = 1.0,
    sampler_options: Optional[dict] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    clip: bool = True,
) -> SampleResult:
    """Generate ``num_samples`` images; image k depends only on ``seeds[k]`` and ``labels[k]``.

    Image k starts from ``noise_for_seeds([seeds[k]], image_shape)`` and its SDE noise (if any)
    continues the same per-sample generator, so it is identical whatever ``batch_size`` for the
    fixed-step samplers (bit-identical when the network treats rows independently; dopri5's
    shared step size is the exception). Runs the model in eval mode under ``torch.no_grad()``
    and restores its training flag afterwards. The model must already live on ``device``.

    Args:
        model: ``model(x (B,C,H,W), t (B,), y (B,) or None) -> v``; ``model.num_classes``
            (0 or missing = unconditional) gives the null label ``num_classes`` for guidance.
        seeds: one int per image; default ``range(num_samples)``.
        labels: (N,) int64; for a class-conditional model left None, ``labels = seed % num_classes``.
        sampler: a name in :data:`SAMPLERS` or a sampler callable.
        steps: grid intervals, ``time_grid(steps, shift=time_shift)``; for dopri5 they are only
            output points (its step size is adaptive).
        cfg_scale: classifier-free guidance scale (1 = off, a single pass per step).
        sampler_options: extra keyword arguments for the sampler (e.g. ``{"rtol": 1e-4}``).
        autocast_dtype: e.g. ``torch.bfloat16`` to run the network under ``torch.autocast`` on
            ``device``'s type; the sampler state stays float32.
        clip: clip the output to the pixel range [-1, 1]; ``False`` keeps the sampler's raw
            output (latents, which exceed that range).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = list(range(num_samples)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != num_samples:
        raise ValueError(f"got {len(seeds)} seeds for num_samples={num_samples}")
    image_shape = tuple(int(s) for s in image_shape)

    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes > 0:
        if labels is None:
            labels = torch.tensor(seeds, dtype=torch.int64) % num_classes
        labels = torch.as_tensor(labels).to(dtype=torch.int64, device="cpu")
        if labels.shape != (num_samples,):
            raise ValueError(f"labels must have shape ({num_samples},), got {tuple(labels.shape)}")
        if labels.min() < 0 or labels.max() > num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}] ({num_classes} = null)")
    elif labels is not None:
        raise ValueError("labels given but the model is unconditional (num_classes == 0)")
    if cfg_scale != 1.0 and num_classes == 0:
        raise ValueError("cfg_scale != 1 needs a class-conditional model (num_classes > 0)")

    if isinstance(sampler, str):
        sampler_name, sample_fn = sampler, get_sampler(sampler)
    else:
        sampler_name, sample_fn = getattr(sampler, "__name__", repr(sampler)), sampler
    if sampler_options:
        sample_fn = functools.partial(sample_fn, **sampler_options)

    device = torch.device(device)
    times = time_grid(steps, shift=time_shift)
    counter = CountingVelocity(model)
    network: VelocityFn = counter
    if autocast_dtype is not None:
        network = _Autocast(counter, device.type, autocast_dtype)
    velocity = GuidedVelocity(network, cfg_scale, null_label=num_classes) if num_classes else network

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_samples, unit="img", desc=f"sampling ({sampler_name})")
        except ImportError:
            bar = None

    chunks = []
    start = time.perf_counter()
    try:
        with torch.no_grad(), evaluating(model):
            for lo in range(0, num_samples, batch_size):
                batch_seeds = seeds[lo : lo + batch_size]
                generators = _seeded_generators(batch_seeds)
                x = _per_row_randn(generators, image_shape, device, torch.float32)  # (B,C,H,W)
                y = None if labels is None else labels[lo : lo + batch_size].to(device)
                x = sample_fn(velocity, x, times, y=y, generator=generators)
                x = x.float()
                chunks.append((x.clamp(-1.0, 1.0) if clip else x).cpu())
                if bar is not None:
                    bar.update(len(batch_seeds))
    finally:
        if bar is not None:
            bar.close()
    wall_time = time.perf_counter() - start

    return SampleResult(
        images=torch.cat(chunks),
        labels=labels,
        nfe_per_sample=counter.rows / num_samples,
        wall_time_s=wall_time,
        seeds=seeds,
        sampler=sampler_name,
        steps=int(steps),
        cfg_scale=float(cfg_scale),
    )
