"""One-step generation (docs/methods.md#one-step-generation): reflow pairs as data, train.init_from,
straightness, reflow, distillation to k steps, DMD and DMD2 — each against its mathematics."""
import copy
import json
import math

import pytest
import torch

from selfflow.config import ConfigError, DmdConfig, StudentStage, config_from_dict
from selfflow.methods.base import Batch, BatchRandom
from selfflow.methods.one_step import (dmd_generator_loss, dmd_gradient, euler_steps, huber_constant, pseudo_huber,
                                       straightness, x0_estimate)
from selfflow.model import load_generator
from selfflow.sampling import euler, heun, noise_for_seeds, time_grid
from selfflow.sets import generate_set
from selfflow.trainer import Trainer
from support import fit, perturbed_dit, tiny_run


# ---- a tiny digits teacher and its pairs, shared by the trainer tests ------------------------------
@pytest.fixture(scope="module")
def teacher_and_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_step")
    fit(tiny_run(root / "teacher", train={"steps": 3}))
    teacher, _ = load_generator(root / "teacher")
    generate_set(teacher, root / "pairs", num=32, shard_size=16, kind="pairs", sampler="euler", steps=4)
    return root / "teacher", root / "pairs"


def one_step_run(out, teacher, pairs, method, **train):
    data = {"name": "pairs", "path": str(pairs)}
    return tiny_run(out, data=data, method=method, train={"init_from": str(teacher), **train})


def states(trainer):
    out = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in trainer.ema.model.state_dict().items()})
    out.update({f"method.{k}": v for k, v in trainer.method.state_dict().items()})
    return out


# ---- pairs as data -------------------------------------------------------------------------------------
def test_pairs_are_reproducible_from_seeds_and_independent_of_shard_size(tmp_path):
    from selfflow.data.pairs import load_pairs

    model = perturbed_dit(depth=2)
    a = generate_set(model, tmp_path / "a", num=5, shard_size=2, kind="pairs", seed=7, sampler="heun", steps=3, batch_size=1)
    b = generate_set(model, tmp_path / "b", num=5, shard_size=5, kind="pairs", seed=7, sampler="heun", steps=3, batch_size=1)
    c = generate_set(model, tmp_path / "c", num=5, shard_size=3, kind="pairs", seed=7, sampler="heun", steps=3, batch_size=4)
    ta, tb, tc = a.read_all(), b.read_all(), c.read_all()
    for key in ("noise", "samples", "labels", "seeds"):
        assert torch.equal(ta[key], tb[key]), key  # same batches of one row: bit-identical
        if key != "samples":
            assert torch.equal(ta[key], tc[key]), key
    # other batch sizes regroup the rows of a matrix product: equal up to float rounding
    torch.testing.assert_close(ta["samples"], tc["samples"], rtol=0, atol=1e-5)
    assert torch.equal(ta["noise"], noise_for_seeds(range(7, 12), (1, 8, 8)))  # ε of item k is the noise of seed 7 + k
    labels = torch.arange(7, 12) % 10
    with torch.no_grad():  # the samples are the sampler's output from that noise (clipped to the pixel range)
        expected = heun(model, ta["noise"], time_grid(3), y=labels).clamp(-1, 1)
    torch.testing.assert_close(ta["samples"], expected, rtol=0, atol=1e-5)
    manifest = json.loads((tmp_path / "a" / "set.json").read_text())
    assert (manifest["kind"], manifest["sampler"], manifest["steps"], manifest["cfg_scale"]) == ("pairs", "heun", 3, 1.0)
    assert "sampler_options" not in manifest  # fixed-step solvers have no tolerances
    pairs = load_pairs(tmp_path / "a")
    x0, y = pairs.get_batch([4, 0])
    assert torch.equal(x0, ta["samples"][[4, 0]]) and torch.equal(y, labels[[4, 0]])
    assert torch.equal(pairs.get_noise([4, 0]), ta["noise"][[4, 0]])


def test_pairs_clip_pixels_keep_latents_raw_and_refuse_noise_injecting_samplers(tmp_path):
    """A fresh DiT predicts v = 0, so the ODE's x0 is the seed's noise itself, beyond ±1: pixel pairs clip it to
    the data range, latent pairs (clip=False) keep it; set.json records which. sde / sit_sde cannot make pairs."""
    from selfflow.config import ModelConfig
    from selfflow.model import DiT

    model = DiT(ModelConfig(size="tiny", depth=1, hidden_size=32, num_heads=2, image_size=4, in_channels=4, num_classes=3))
    noise = noise_for_seeds(range(3), (4, 4, 4))
    assert noise.abs().max() > 1
    raw = generate_set(model, tmp_path / "raw", num=3, kind="pairs", sampler="heun", steps=2, clip=False).read_all()
    pixels = generate_set(model, tmp_path / "pix", num=3, kind="pairs", sampler="heun", steps=2).read_all()
    assert torch.equal(raw["samples"], noise) and torch.equal(pixels["samples"], noise.clamp(-1, 1))
    assert json.loads((tmp_path / "raw" / "set.json").read_text())["clipped"] is False
    assert json.loads((tmp_path / "pix" / "set.json").read_text())["clipped"] is True
    for sampler in ("sde", "sit_sde"):
        with pytest.raises(ValueError, match="injects noise"):
            generate_set(model, tmp_path / sampler, num=3, kind="pairs", sampler=sampler, steps=2)
        assert not (tmp_path / sampler).exists()
    generate_set(model, tmp_path / "images", num=3, kind="images", sampler="sde", steps=2)  # images may come from an SDE
    with pytest.raises(ConfigError, match="pairs_sampler.*injects noise"):
        StudentStage(pairs_sampler="sde").validate("student")


def test_dopri5_pairs_record_the_tolerances(tmp_path):
    model = perturbed_dit(depth=2)
    generate_set(model, tmp_path / "d", num=2, shard_size=2, kind="pairs", sampler="dopri5", steps=1)
    manifest = json.loads((tmp_path / "d" / "set.json").read_text())
    assert manifest["sampler"] == "dopri5" and manifest["sampler_options"] == {"rtol": 1e-5, "atol": 1e-5}


def test_the_trainer_hands_each_pair_its_own_noise(teacher_and_pairs, tmp_path):
    teacher, pairs = teacher_and_pairs
    trainer = Trainer(config_from_dict(one_step_run(tmp_path / "r", teacher, pairs, {"name": "reflow"}, grad_accum=2)))
    data = trainer.dataset
    seen = 0
    for _, batch in trainer._micro_batches():
        for x0, noise in zip(batch.x0, batch.noise):
            (k,) = [k for k in range(len(data)) if torch.equal(data.samples[k], x0)]
            assert torch.equal(data.noise[k], noise)
            seen += 1
    assert seen == 16
    trainer.close()


def test_methods_on_pairs_refuse_other_data_and_need_a_teacher(teacher_and_pairs, tmp_path):
    teacher, pairs = teacher_and_pairs
    with pytest.raises(ConfigError, match="data.name=digits"):
        config_from_dict(tiny_run(tmp_path / "x", method={"name": "reflow"}))
    with pytest.raises(ConfigError, match="train.init_from"):
        config_from_dict(tiny_run(tmp_path / "x", data={"name": "pairs", "path": str(pairs)}, method={"name": "distill"}))
    with pytest.raises(ConfigError, match="regression"):
        config_from_dict(tiny_run(tmp_path / "x", method={"name": "dmd2", "teacher": str(teacher), "regression_weight": 1.0},
                                  train={"init_from": str(teacher)}))
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="train.init_from=.*nowhere.*no such folder"):
        Trainer(config_from_dict(one_step_run(tmp_path / "run", missing, pairs, {"name": "reflow"})))
    with pytest.raises(ConfigError, match="teacher's model differs: model.hidden_size=128"):
        Trainer(config_from_dict(tiny_run(tmp_path / "run", data={"name": "pairs", "path": str(pairs)}, method={"name": "reflow"},
                                          model={"hidden_size": 128}, train={"init_from": str(teacher)})))
    assert not (tmp_path / "run").exists()


def test_cli_distill_checks_the_method_against_the_subcommand(teacher_and_pairs, tmp_path, capsys):
    from selfflow.cli import main

    teacher, pairs = teacher_and_pairs
    config = tmp_path / "c.yaml"
    import yaml

    config.write_text(yaml.safe_dump(one_step_run(tmp_path / "run", teacher, pairs, {"name": "reflow"}, steps=1)))
    assert main(["distill", "dmd", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "method.name=reflow" in err[0] and "dmd" in err[0]
    assert not (tmp_path / "run").exists()
    assert main(["distill", "reflow", "--config", str(config)]) == 0
    assert (tmp_path / "run" / "checkpoints").is_dir()
    assert main(["distill", "one-step", "--config", str(config), "--set", "method.name=distill"]) == 2  # run exists: other method
    assert "different method config" in capsys.readouterr().err


# ---- init_from: the student starts as the teacher ------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_student_starts_as_the_teachers_euler_output(teacher_and_pairs, tmp_path, steps):
    teacher_dir, pairs = teacher_and_pairs
    trainer = Trainer(config_from_dict(one_step_run(tmp_path / "s", teacher_dir, pairs, {"name": "distill", "steps": steps})))
    teacher, _ = load_generator(teacher_dir)
    noise, y = noise_for_seeds(range(6), (1, 8, 8)), torch.arange(6)
    with torch.no_grad():
        student = trainer.method.student(trainer.model.eval(), noise, y)
        reference = euler(teacher, noise, time_grid(steps), y=y)
        ema = trainer.method.student(trainer.ema.model, noise, y)
    assert torch.equal(student, reference) and torch.equal(ema, reference)
    if steps == 1:  # the one-step map is G(ε, y) = ε − v(ε, 1, y)
        with torch.no_grad():
            assert torch.equal(reference, noise - teacher(noise, torch.ones(6), y))
    trainer.close()


def test_resume_from_the_runs_own_checkpoint_wins_over_init_from(teacher_and_pairs, tmp_path):
    teacher, pairs = teacher_and_pairs
    first = fit(one_step_run(tmp_path / "r", teacher, pairs, {"name": "reflow"}, steps=2))
    again = Trainer(config_from_dict(one_step_run(tmp_path / "r", teacher, pairs, {"name": "reflow"}, steps=4)))
    again.maybe_resume()
    assert again.step == 2
    for a, b in zip(first.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)
    again.close()


# ---- straightness: closed forms ---------------------------------------------------------------------
def test_straightness_is_zero_on_straight_paths():
    noise = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    # v = x / t: the path from ε is x_t = t·ε, a straight line to 0 at constant speed, and Euler follows it exactly
    assert straightness(lambda x, t, y: x / t.view(-1, 1, 1, 1), noise, steps=8) == pytest.approx(0.0, abs=1e-10)  # float32 rounding, squared
    assert straightness(lambda x, t, y: torch.full_like(x, 0.3), noise, steps=8) == pytest.approx(0.0, abs=1e-10)  # float32 rounding, squared


@pytest.mark.parametrize("steps", [1, 4, 64])
def test_straightness_of_a_curved_field_is_analytic(steps):
    # v(x, t) = a + b·t: the path ends at ε − a − b·(n + 1)/(2n) under n Euler steps, so the chord is
    # a + b·mean(t_i) and S = ‖b‖²·Var(t_i) = ‖b‖²·(n² − 1)/(12 n²)  (→ ‖b‖²/12, the exact ODE's value)
    a = torch.tensor([0.5, -1.0, 0.2, 0.0]).view(1, 1, 2, 2)
    b = torch.tensor([1.0, 2.0, -0.5, 3.0]).view(1, 1, 2, 2)
    field = lambda x, t, y: a + b * t.view(-1, 1, 1, 1)  # noqa: E731
    noise = torch.randn(3, 1, 2, 2)
    expected = b.pow(2).sum().item() * (steps * steps - 1) / (12 * steps * steps)
    assert straightness(field, noise, steps=steps) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_pseudo_huber_and_its_constant():
    assert huber_constant(3 * 64 * 64) == pytest.approx(0.00054 * 64 * math.sqrt(3))
    pred, target = torch.zeros(2, 1, 2, 2), torch.tensor([3.0, 4.0, 0.0, 0.0]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    c = 0.5
    assert torch.allclose(pseudo_huber(pred, target, c), torch.full((2,), math.sqrt(25 + c * c) - c))
    small = torch.full((1, 1, 2, 2), 1e-3)  # ≈ ‖d‖²/(2c) near 0
    assert pseudo_huber(small, torch.zeros_like(small), c).item() == pytest.approx(4e-6 / (2 * c), rel=1e-3)


# ---- the 2-D-like toy: a mixture of two Gaussians in 1×2×2 "images" ----------------------------------
MEANS = torch.tensor([[0.6, 0.6, -0.6, -0.6], [-0.6, -0.6, 0.6, 0.6]])


class Mixture:
    """Two Gaussians (σ = 0.1) at ±0.6·(1, 1, −1, −1), as 1-channel 2×2 images, no labels."""

    is_latent, num_classes, channels, image_size = False, 0, 1, 2

    def __init__(self, n=4096, seed=0):
        g = torch.Generator().manual_seed(seed)
        k = torch.randint(0, 2, (n,), generator=g)
        self.x = (MEANS[k] + 0.1 * torch.randn(n, 4, generator=g)).view(n, 1, 2, 2)

    def __len__(self):
        return len(self.x)

    def get_batch(self, idx):
        idx = torch.as_tensor(idx)
        return self.x[idx], torch.zeros(len(idx), dtype=torch.long)


def toy_run(out, method, steps, lr, data=None, init=None, dataset=None):
    raw = {"data": data or {"name": "digits", "class_conditional": False},
           "model": {"size": "tiny", "depth": 2, "hidden_size": 64, "num_heads": 4, "patch_size": 1},
           "method": method,
           "train": {"steps": steps, "batch_size": 128, "lr": lr, "warmup_steps": 10, "log_every": 50, "ckpt_every": 0,
                     "ema_decay": 0.99, "num_sample_images": 0, "progress": False, "tensorboard": False, "device": "cpu",
                     "out_dir": str(out), "init_from": init}}
    trainer = Trainer(config_from_dict(raw), dataset=dataset)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return load_generator(out)[0]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    teacher = toy_run(root / "teacher", {"name": "flow_matching"}, 150, 3e-3, dataset=Mixture())
    generate_set(teacher, root / "pairs", num=1024, shard_size=512, kind="pairs", sampler="heun", steps=16, batch_size=512)
    pairs = {"name": "pairs", "path": str(root / "pairs"), "class_conditional": False}
    return root, teacher, pairs


def test_reflow_straightens_the_paths(toy):
    root, teacher, pairs = toy
    noise = noise_for_seeds(range(10_000, 10_512), (1, 2, 2))  # not the pairs' noise: seeds 0..1023
    before = straightness(teacher, noise, steps=16)
    reflowed = toy_run(root / "reflow", {"name": "reflow"}, 150, 1e-3, data=pairs, init=str(root / "teacher"))
    after = straightness(reflowed, noise, steps=16)
    # measured: 0.82 → 0.016 (two well separated modes bend the teacher's paths; the pairs' chords do not bend)
    assert after < 0.25 * before, (before, after)


def test_the_one_step_student_matches_the_targets_mean_and_covariance(toy):
    root, teacher, pairs = toy
    from selfflow.data.pairs import load_pairs

    target = load_pairs(pairs["path"]).samples.flatten(1)
    student = toy_run(root / "distill", {"name": "distill"}, 150, 1e-3, data=pairs, init=str(root / "teacher"))
    noise = noise_for_seeds(range(10_000, 10_512), (1, 2, 2))
    with torch.no_grad():
        one_step = euler_steps(student, noise, None, 1).flatten(1)
        teacher_one_step = euler_steps(teacher, noise, None, 1).flatten(1)
    # Tolerance 0.1: with 512 samples of per-coordinate variance ≈ 0.37 (modes at ±0.6, σ = 0.1) the
    # standard error of a mean is sqrt(0.37/512) ≈ 0.027 and of a (co)variance ≈ 0.37·sqrt(2/512) ≈ 0.023,
    # so 0.1 is about 4 standard errors; measured errors are ≈ 0.02 (mean) and ≈ 0.03 (covariance).
    assert (one_step.mean(0) - target.mean(0)).abs().max() < 0.1
    assert (torch.cov(one_step.T) - torch.cov(target.T)).abs().max() < 0.1
    # the check can fail: the teacher's own one-step output collapses onto the mean (covariance error ≈ 0.35)
    assert (torch.cov(teacher_one_step.T) - torch.cov(target.T)).abs().max() > 0.2


# ---- DMD: the gradient ------------------------------------------------------------------------------
def _dmd_method(fake_shift: float):
    from selfflow.methods.dmd import Dmd

    generator = perturbed_dit(depth=2)
    teacher = perturbed_dit(depth=2)
    method = Dmd(DmdConfig(teacher="given"), generator, teacher=teacher)
    if fake_shift:
        with torch.no_grad():
            torch.manual_seed(1)
            for p in method.fake.parameters():
                p.add_(fake_shift * torch.randn_like(p))
    return generator, teacher, method


def _batch(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return Batch(x0=torch.rand(n, 1, 8, 8) * 2 - 1, y=torch.arange(n) % 10, random=BatchRandom(g, n, slice(0, n)))


def test_dmd_gradient_is_zero_when_fake_and_real_scores_agree():
    generator, _teacher, method = _dmd_method(0.0)
    loss, logs = method.loss(generator, _batch(0))
    loss.backward()
    assert logs["dmd_grad_norm"].item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in generator.parameters())  # G's gradient is exactly zero
    assert any(p.grad is not None and p.grad.any() for p in method.fake.parameters())  # the fake score still trains


def test_dmd_loss_gradient_in_x_is_g_over_numel():
    x = torch.randn(3, 1, 2, 2, requires_grad=True)
    x0_fake, x0_real = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    g = dmd_gradient(x.detach(), x0_fake, x0_real)
    expected = (x0_fake - x0_real) / (x.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(g, expected)
    dmd_generator_loss(x, g).backward()
    torch.testing.assert_close(x.grad, g / x.numel())


def test_a_dmd_step_moves_the_generator_from_fake_towards_real():
    generator, teacher, method = _dmd_method(0.05)
    loss, _ = method.loss(generator, _batch(3))
    loss.backward()
    # the draws the loss made, in its order: ε, then t and ε' of the DMD term
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(6, 1, 8, 8, generator=g)
    t = 0.02 + 0.96 * torch.rand(6, generator=g)
    noise_t = torch.randn(6, 1, 8, 8, generator=g)
    y = torch.arange(6) % 10
    with torch.no_grad():
        x = euler_steps(generator, noise, y, 1)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise_t
        towards_real = x0_estimate(x_t, t, teacher(x_t, t, y)) - x0_estimate(x_t, t, method.fake(x_t, t, y))
        for p in generator.parameters():
            p.sub_(1e-3 * p.grad)
        moved = euler_steps(generator, noise, y, 1) - x
    cosine = torch.nn.functional.cosine_similarity(moved.flatten(1), towards_real.flatten(1))
    assert (cosine > 0.5).all(), cosine  # measured 0.78 … 0.93 per sample; an uphill step gives the opposite sign


# ---- DMD v1: the regression on pairs made at the real score's guidance ---------------------------------
def test_dmd_regression_reads_pairs_made_at_the_real_scores_guidance(tmp_path):
    from selfflow.data.pairs import load_pairs
    from selfflow.methods.dmd import Dmd

    generator, teacher, _ = _dmd_method(0.0)
    generate_set(teacher, tmp_path / "cfg1.5", num=6, shard_size=6, kind="pairs", sampler="euler", steps=3, cfg_scale=1.5)
    generate_set(teacher, tmp_path / "cfg1", num=6, shard_size=6, kind="pairs", sampler="euler", steps=3)
    method = Dmd(DmdConfig(teacher="given", real_cfg=1.5, regression_weight=0.25), generator, teacher=teacher)
    pairs = load_pairs(tmp_path / "cfg1.5")
    method.bind_data(pairs)
    x0, y = pairs.get_batch(list(range(6)))
    noise = pairs.get_noise(list(range(6)))
    batch = Batch(x0=x0, y=y, noise=noise, random=BatchRandom(torch.Generator().manual_seed(0), 6, slice(0, 6)))
    _, logs = method.loss(generator, batch)
    with torch.no_grad():  # the L2 distance of G(ε_pair) to the guided teacher's solve from that ε
        expected = (euler_steps(generator, noise, y, 1) - x0).pow(2).mean()
    torch.testing.assert_close(logs["loss_regression"], expected, rtol=1e-6, atol=0)
    with pytest.raises(ConfigError, match=r"guidance 1, but the real score uses method.real_cfg=1.5.*--cfg-scale 1.5"):
        method.bind_data(load_pairs(tmp_path / "cfg1"))
    from selfflow.data import load_dataset

    with pytest.raises(ConfigError, match="needs the teacher's pairs"):
        method.bind_data(load_dataset("digits", split="train"))


# ---- DMD2: fake-only steps --------------------------------------------------------------------------
def test_fake_only_steps_leave_the_generator_and_its_ema_alone(teacher_and_pairs, tmp_path):
    teacher, pairs = teacher_and_pairs
    method = {"name": "dmd2", "teacher": str(teacher), "fake_updates_per_generator": 3}
    trainer = Trainer(config_from_dict(one_step_run(tmp_path / "d", teacher, pairs, method, steps=3, warmup_steps=0)))
    grads_none = []
    original = trainer.optimizer.step

    def watched(*args, **kwargs):
        grads_none.append(all(p.grad is None for p in trainer.model.parameters()))
        return original(*args, **kwargs)

    trainer.optimizer.step = watched
    trainer.train_step()  # step 0: the generator trains
    after_g = copy.deepcopy(states(trainer))
    trainer.train_step()
    trainer.train_step()  # steps 1, 2: the fake score (and GAN head) only
    after_fake = states(trainer)
    assert grads_none == [False, True, True]
    for key, value in after_g.items():
        same = torch.equal(value, after_fake[key])
        assert same if key.startswith(("model.", "ema.")) else True, key
    assert any(not torch.equal(v, after_fake[k]) for k, v in after_g.items() if k.startswith("method.fake."))
    assert any(not torch.equal(v, after_fake[k]) for k, v in after_g.items() if k.startswith("method.gan_head."))
    trainer.close()


# ---- DMD/DMD2: the generator's and the fake score's AdamW, each clipped on its own ----------------------
def test_the_generators_update_does_not_depend_on_the_fake_scores_gradient_scale(teacher_and_pairs, tmp_path):
    """fake_weight × 1000 scales only the fake score's gradient (G's loss reads the fake score without its
    weights' gradients, the fake loss reads G's samples detached). With one clip over both, that norm would
    shrink G's step; with a clip per group G's first update is bit-identical."""
    teacher, pairs = teacher_and_pairs
    after, logs = {}, {}
    for scale in (1.0, 1000.0):
        method = {"name": "dmd2", "teacher": str(teacher), "fake_weight": scale, "fake_updates_per_generator": 1}
        trainer = Trainer(config_from_dict(one_step_run(tmp_path / f"w{scale:g}", teacher, pairs, method, steps=1, warmup_steps=0)))
        groups = {g["name"]: g for g in trainer.optimizer.param_groups}
        assert list(groups) == ["generator", "fake"]
        for g in groups.values():  # DMD2's published defaults: torch's AdamW, clip 10 each
            assert (tuple(g["betas"]), g["weight_decay"], g["clip"], g["lr"]) == ((0.9, 0.999), 0.01, 10.0, 1e-3)
        assert {id(p) for p in groups["generator"]["params"]} == {id(p) for p in trainer.model.parameters()}
        assert {id(p) for p in groups["fake"]["params"]} == {id(p) for p in trainer.method.parameters()}
        logs[scale] = trainer.train_step()
        after[scale] = states(trainer)
        trainer.close()
    assert logs[1000.0]["grad_norm_fake"] > 10.0  # the fake score's clip acts …
    assert logs[1000.0]["grad_norm"] == logs[1.0]["grad_norm"]  # … G's norm is its own
    for key, value in after[1.0].items():
        if key.startswith(("model.", "ema.")):
            assert torch.equal(value, after[1000.0][key]), key
    assert any(not torch.equal(v, after[1000.0][k]) for k, v in after[1.0].items() if k.startswith("method.fake."))


def test_dmd_optimizer_settings_are_per_group(teacher_and_pairs, tmp_path):
    teacher, pairs = teacher_and_pairs
    method = {"name": "dmd", "teacher": str(teacher), "generator_lr": 2e-4, "fake_lr": 4e-4, "generator_beta1": 0.0,
              "fake_grad_clip": 0.0, "generator_weight_decay": 0.0}
    trainer = Trainer(config_from_dict(one_step_run(tmp_path / "d", teacher, pairs, method, steps=1, warmup_steps=2)))
    trainer.train_step()  # warm-up step 0 of 2: every rate at half its own
    generator, fake = trainer.optimizer.param_groups
    assert (generator["lr"], tuple(generator["betas"]), generator["weight_decay"]) == (1e-4, (0.0, 0.999), 0.0)
    assert (fake["lr"], fake["clip"]) == (2e-4, 0.0)
    trainer.close()
    with pytest.raises(ConfigError, match="fake_beta2"):
        DmdConfig(teacher="t", fake_beta2=1.0).validate("method")


# ---- resume of every distillation is bit-identical ----------------------------------------------------
RESUMABLE = {
    "reflow": {"name": "reflow"},
    "distill": {"name": "distill", "steps": 2, "loss": "pseudo_huber"},
    "dmd": {"name": "dmd", "regression_weight": 0.25},  # the fixture's pairs are the teacher's at guidance 1
    "dmd2": {"name": "dmd2", "fake_updates_per_generator": 2, "generator_steps": 2, "backward_simulation": True},
}


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_resume_is_bit_identical(teacher_and_pairs, tmp_path, name):
    teacher, pairs = teacher_and_pairs
    method = dict(RESUMABLE[name])
    if name.startswith("dmd"):
        method["teacher"] = str(teacher)
    straight = fit(one_step_run(tmp_path / "a", teacher, pairs, method, steps=5))
    fit(one_step_run(tmp_path / "b", teacher, pairs, method, steps=2))
    resumed = fit(one_step_run(tmp_path / "b", teacher, pairs, method, steps=5))
    a, b = states(straight), states(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())
    assert any(not torch.equal(v, states(Trainer(config_from_dict(one_step_run(tmp_path / "c", teacher, pairs, method))))[k])
               for k, v in a.items() if k.startswith("model."))  # training moved the weights


def test_feature_loss_reads_the_feature_net(teacher_and_pairs, tmp_path):
    from selfflow.evaluation.feature_net import FeatureNet, FeatureNetConfig, save_feature_net

    teacher, pairs = teacher_and_pairs
    torch.manual_seed(0)
    net = FeatureNet(FeatureNetConfig(in_channels=1, image_size=8, num_classes=10, widths=(8, 16)))
    save_feature_net(net, tmp_path / "fnet")
    trainer = Trainer(config_from_dict(one_step_run(tmp_path / "f", teacher, pairs,
                                                    {"name": "distill", "loss": "feature", "feature_net": str(tmp_path / "fnet")})))
    a, b = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        expected = (net.features(a) - net.features(b)).pow(2).sum(1).mean()
    torch.testing.assert_close(trainer.method.distance(a, b), expected)
    assert trainer.method.distance(a, a).item() == 0.0
    trainer.close()
    with pytest.raises(ConfigError, match="method.feature_net"):
        Trainer(config_from_dict(one_step_run(tmp_path / "g", teacher, pairs,
                                              {"name": "distill", "loss": "feature", "feature_net": str(tmp_path)})))


@pytest.mark.slow
def test_dmd2_one_step_generator_matches_the_mixture(toy):
    """DMD2 (5 fake-score updates per generator update, GAN head) on the toy, 200 steps (≈ 25 s).
    Measured: max |mean error| 0.06, max |covariance error| 0.08 against 4096 fresh data points
    (the teacher's own one-step output: 0.05 / 0.37). With 1:1 updates the mean drifts (0.23 / 0.37)."""
    root, teacher, _pairs = toy
    generator = toy_run(root / "dmd2", {"name": "dmd2", "teacher": str(root / "teacher")}, 200, 1e-3,
                        init=str(root / "teacher"), dataset=Mixture())
    target = Mixture(n=4096, seed=1).x.flatten(1)
    with torch.no_grad():
        x = euler_steps(generator, noise_for_seeds(range(10_000, 10_512), (1, 2, 2)), None, 1).flatten(1)
    assert (x.mean(0) - target.mean(0)).abs().max() < 0.1  # ≈ 4 standard errors of a mean of 512 samples
    assert (torch.cov(x.T) - torch.cov(target.T)).abs().max() < 0.15
