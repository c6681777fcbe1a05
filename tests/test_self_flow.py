"""Self-Flow: the tensors the student and the teacher receive, the losses, and the training-only head."""
import copy
import json

import pytest
import torch

from selfflow.config import ConfigError, ModelConfig, config_from_dict
from selfflow.methods import Batch, BatchRandom
from selfflow.methods.flow_matching import FlowMatching, FlowMatchingConfig
from selfflow.methods.self_flow import SelfFlow, SelfFlowConfig, default_layers, draw_dual_timesteps, representation_loss
from selfflow.model import DiT, TimeRows
from selfflow.path import interpolate


def tiny_model(depth=4, seed=0):
    torch.manual_seed(seed)
    return DiT(ModelConfig(size="tiny", depth=depth, hidden_size=64, num_heads=4, patch_size=2, image_size=8, in_channels=1, num_classes=10))


def make_batch(seed=1, size=32, generator_seed=123):
    torch.manual_seed(seed)
    x0 = torch.rand(size, 1, 8, 8) * 2 - 1
    y = torch.randint(0, 10, (size,))
    generator = torch.Generator().manual_seed(generator_seed)
    return Batch(x0=x0, y=y, random=BatchRandom(generator, size, slice(0, size)))


def replay(batch, state):
    """The same batch with its generator rewound to ``state``."""
    generator = torch.Generator().manual_seed(0)
    generator.set_state(state)
    return Batch(x0=batch.x0, y=batch.y, random=BatchRandom(generator, batch.random.global_batch, batch.random.rows))


def record_calls(module):
    calls = []

    def hook(mod, args, kwargs):
        t = args[1].per_token() if isinstance(args[1], TimeRows) else args[1]  # static-shape per-token times
        calls.append({"x": args[0].detach().clone(), "t": t.detach().clone(), "y": args[2].clone(), "kwargs": dict(kwargs), "grad": torch.is_grad_enabled()})

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    return calls, handle


def build(config_kwargs=None, depth=4):
    model = tiny_model(depth)
    method = SelfFlow(SelfFlowConfig(**(config_kwargs or {})), model)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    method.bind_teacher(teacher)
    return model, method, teacher


def test_default_layers_follow_the_paper():
    assert default_layers(28) == (8, 20)
    assert default_layers(12) == (4, 8)
    assert default_layers(4) == (1, 3)


def test_masked_tokens_get_s_and_the_rest_t():
    model, method, _ = build({"mask_ratio": 0.25})
    batch = make_batch()
    state = batch.random.generator.get_state()
    calls, handle = record_calls(model)
    method.loss(model, batch)
    handle.remove()
    (student,) = calls
    # Replay the draws in the method's order: label dropout, then t, ε, s, mask.
    again = replay(batch, state)
    y = method.drop_labels(again.y, method.config.class_dropout_prob, model.num_classes, again.random)
    draw = draw_dual_timesteps(method.config, again, model)
    times = student["t"]
    assert times.shape == (32, model.num_tokens)
    assert torch.equal(student["y"], y)
    assert torch.equal(draw.mask.sum(1), torch.full((32,), 4))  # exactly round(0.25 · 16) per sample
    assert torch.equal(times[draw.mask], draw.s[:, None].expand_as(times)[draw.mask])
    assert torch.equal(times[~draw.mask], draw.t[:, None].expand_as(times)[~draw.mask])
    assert (draw.s > draw.t).any() and (draw.s < draw.t).any()  # t and s are not sorted
    assert len({tuple(row.nonzero().flatten().tolist()) for row in draw.mask}) > 1  # positions vary
    # Each token's pixels are noised to that token's own time, in the model's token order.
    expected = (1 - times[..., None]) * model.patchify(batch.x0) + times[..., None] * model.patchify(draw.noise)
    assert torch.allclose(model.patchify(student["x"]), expected, atol=1e-6)
    assert student["kwargs"]["return_layers"] == (method.student_layer,)


def test_bernoulli_mask_has_the_right_rate():
    model = tiny_model()
    batch = make_batch(size=512)
    draw = draw_dual_timesteps(SelfFlowConfig(mask_ratio=0.25, mask_mode="bernoulli"), batch, model)
    assert abs(draw.mask.float().mean().item() - 0.25) < 0.02
    assert draw.mask.sum(1).unique().numel() > 3  # counts vary per sample


def test_draws_do_not_depend_on_how_the_batch_is_split():
    model = tiny_model()
    config = SelfFlowConfig()
    whole = draw_dual_timesteps(config, make_batch(size=8), model)
    parts = []
    for rows in (slice(0, 4), slice(4, 8)):
        full = make_batch(size=8)
        part = Batch(x0=full.x0[rows], y=full.y[rows], random=BatchRandom(full.random.generator, 8, rows))
        parts.append(draw_dual_timesteps(config, part, model))
    assert torch.equal(whole.token_times, torch.cat([p.token_times for p in parts]))
    assert torch.equal(whole.noise, torch.cat([p.noise for p in parts]))


def test_teacher_sees_min_t_s_everywhere_stops_at_its_layer_and_gets_no_gradient():
    model, method, teacher = build({"mask_ratio": 0.25})
    batch = make_batch()
    state = batch.random.generator.get_state()
    teacher_calls, handle = record_calls(teacher)
    deeper = []
    later = teacher.blocks[method.teacher_layer].register_forward_hook(lambda *a: deeper.append(1))
    final = teacher.final.register_forward_hook(lambda *a: deeper.append(1))
    loss, logs = method.loss(model, batch)
    loss.backward()
    for h in (handle, later, final):
        h.remove()
    (call,) = teacher_calls
    again = replay(batch, state)
    y = method.drop_labels(again.y, method.config.class_dropout_prob, model.num_classes, again.random)
    draw = draw_dual_timesteps(method.config, again, model)
    cleaner = torch.minimum(draw.t, draw.s)
    per_token = call["t"].expand(32) if call["t"].dim() == 0 else call["t"]
    if per_token.dim() == 1:
        per_token = per_token[:, None].expand(32, model.num_tokens)
    assert torch.equal(per_token, cleaner[:, None].expand(32, model.num_tokens))
    assert torch.allclose(call["x"], interpolate(batch.x0, draw.noise, cleaner), atol=1e-6)  # same x0 and ε
    assert torch.equal(call["y"], y)  # the same (dropped-out) labels
    assert call["kwargs"]["stop_after"] == method.teacher_layer
    assert not call["grad"]
    assert not deeper, "the teacher ran blocks after l_t"
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in method.head.parameters())
    assert set(logs) == {"loss_fm", "loss_rep"}
    # The teacher is not part of the method's state or parameters.
    assert all(k.startswith("head.") for k in method.state_dict())
    assert sum(p.numel() for p in method.parameters()) == sum(p.numel() for p in method.head.parameters())


def test_gamma_zero_and_no_mask_is_flow_matching():
    model = tiny_model()
    batch = make_batch()
    fm_loss, _ = FlowMatching(FlowMatchingConfig(), model).loss(model, replay(batch, batch.random.generator.get_state()))
    plain = SelfFlow(SelfFlowConfig(rep_weight=0.0, mask_ratio=0.0), model)
    assert plain.head is None and not plain.uses_teacher  # no head, no teacher pass to pay for
    sf_loss, _ = plain.loss(model, replay(batch, batch.random.generator.get_state()))
    assert torch.allclose(sf_loss, fm_loss, rtol=1e-6, atol=1e-7)
    # With γ > 0 and r = 0 (single-timestep ablation) the velocity term is still flow matching's.
    _, single, _ = build({"rep_weight": 0.8, "mask_ratio": 0.0})
    _, logs = single.loss(model, replay(batch, batch.random.generator.get_state()))
    assert torch.allclose(logs["loss_fm"], fm_loss, rtol=1e-6, atol=1e-7)


def test_single_timestep_teacher_sees_the_students_time():
    model, method, teacher = build({"mask_ratio": 0.0})
    calls, handle = record_calls(model)
    teacher_calls, handle2 = record_calls(teacher)
    method.loss(model, make_batch())
    handle.remove(), handle2.remove()
    assert calls[0]["t"].shape == (32,)  # one time per sample: DiT's broadcast path
    assert torch.equal(teacher_calls[0]["t"], calls[0]["t"])


def test_representation_loss_is_one_minus_cosine():
    a = torch.randn(2, 5, 8)
    assert representation_loss(3 * a, a).abs().item() < 1e-6
    assert torch.allclose(representation_loss(-a, a), torch.tensor(2.0))


def test_bad_layers_and_ratios_raise():
    with pytest.raises(ConfigError, match="teacher_layer"):
        SelfFlow(SelfFlowConfig(teacher_layer=9), tiny_model(depth=4))
    with pytest.raises(ConfigError, match="mask_ratio"):
        config_from_dict({"method": {"name": "self_flow", "mask_ratio": 1.5}})
    with pytest.raises(ConfigError, match="mask_mode"):
        config_from_dict({"method": {"name": "self_flow", "mask_mode": "sometimes"}})


def test_unbound_teacher_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="bind_teacher"):
        SelfFlow(SelfFlowConfig(), model).loss(model, make_batch())


# --------------------------------------------------------------------------------------------
# with the trainer
# --------------------------------------------------------------------------------------------
def test_head_is_in_the_checkpoint_and_not_in_the_exported_model(tiny_config, tmp_path):
    from safetensors.torch import load_file

    from selfflow import checkpoint as ckpt
    from selfflow.cli import main
    from selfflow.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path, method={"name": "self_flow"}, train={"steps": 2}))
    try:
        trainer.fit()
    finally:
        trainer.close()
    folder = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    method_state = load_file(str(folder / "method.safetensors"))
    assert method_state and all(k.startswith("head.") for k in method_state)
    assert set(method_state) == set(trainer.method.state_dict())
    assert not any(k.startswith("head.") for k in load_file(str(folder / "ema.safetensors")))

    assert main(["export", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "exported")]) == 0
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert not any("head" in k for k in exported)
    assert set(exported) == set(trainer.model.state_dict())
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["README.md", "config.json", "model.safetensors"]  # README: the model card
    reloaded = DiT.from_pretrained(tmp_path / "exported")
    for key, value in trainer.ema.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value)


def test_dual_timestep_only_saves_no_method_file(tiny_config, tmp_path):
    from selfflow import checkpoint as ckpt
    from selfflow.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path, method={"name": "self_flow", "rep_weight": 0.0}, train={"steps": 1}))
    try:
        trainer.fit()
    finally:
        trainer.close()
    assert not (ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints") / "method.safetensors").exists()


def test_a_tiny_self_flow_run_lowers_both_losses(tiny_config, tmp_path):
    from selfflow.trainer import Trainer

    config = tiny_config(
        tmp_path, method={"name": "self_flow"}, model={"depth": 3},
        train={"steps": 120, "batch_size": 64, "lr": 3e-3, "warmup_steps": 10, "log_every": 1, "ema_decay": 0.99},
    )
    trainer = Trainer(config)
    try:
        trainer.fit()
    finally:
        trainer.close()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 120
    for key in ("loss_fm", "loss_rep"):
        values = [r[key] for r in records]
        first, last = sum(values[:15]) / 15, sum(values[-15:]) / 15
        assert last < 0.8 * first, (key, first, last)
