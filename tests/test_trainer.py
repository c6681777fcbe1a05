"""Trust in training: exact resume, divergence handling, signals."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from selfflow import checkpoint as ckpt
from selfflow.trainer import Trainer, TrainingDiverged
from support import train_config


run = train_config  # (trainer, result) of a config trained to the end


def weights(trainer):
    return {**{f"model.{k}": v for k, v in trainer.model.state_dict().items()}, **{f"ema.{k}": v for k, v in trainer.ema.model.state_dict().items()}}


def test_training_lowers_the_loss(tiny_config, tmp_path):
    trainer, _ = run(tiny_config(tmp_path, train={"steps": 40, "log_every": 10, "lr": 3e-3}))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "train.log").is_file()


def test_resume_is_bit_identical(tiny_config, tmp_path):
    straight, _ = run(tiny_config(tmp_path / "a", train={"steps": 6, "grad_accum": 2}))
    first, _ = run(tiny_config(tmp_path / "b", train={"steps": 3, "grad_accum": 2}))
    resumed, result = run(tiny_config(tmp_path / "b", train={"steps": 6, "grad_accum": 2}))
    assert result["step"] == 6
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())


def test_resume_refuses_a_different_model(tiny_config, tmp_path):
    run(tiny_config(tmp_path, train={"steps": 2}))
    with pytest.raises(ckpt.CheckpointError, match="different model config .*hidden_size"):
        run(tiny_config(tmp_path, train={"steps": 4}, model={"hidden_size": 128}))


def test_nan_loss_stops_without_touching_the_checkpoint(tiny_config, tmp_path, monkeypatch):
    trainer, _ = run(tiny_config(tmp_path, train={"steps": 2}))
    good = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    before = (good / "model.safetensors").read_bytes()
    config = tiny_config(tmp_path, train={"steps": 4})
    trainer = Trainer(config)
    original = trainer.method.loss

    def poisoned(model, batch):
        loss, logs = original(model, batch)
        return loss * float("nan"), logs

    monkeypatch.setattr(trainer.method, "loss", poisoned)
    trainer.maybe_resume()
    params_before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(TrainingDiverged, match="loss is nan at step 3"):
        trainer.fit()
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints") == good
    assert (good / "model.safetensors").read_bytes() == before
    assert all(torch.equal(a, b) for a, b in zip(params_before, trainer.model.parameters()))


def test_sigterm_saves_and_exits_zero(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "selfflow", "train",
        "--set", "model.depth=2", "--set", "model.hidden_size=64", "--set", "train.steps=100000",
        "--set", "train.batch_size=16", "--set", f"train.out_dir={out}", "--set", "train.progress=false",
        "--set", "train.tensorboard=false", "--set", "train.ckpt_every=0", "--set", "train.device=cpu",
        "--set", "train.num_sample_images=0", "--set", "train.log_every=1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "received SIGTERM" in output and "interrupted" in output
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    assert latest is not None and json.loads((latest / "state.json").read_text())["step"] >= 3


def test_ema_half_life_is_batch_size_free():
    from selfflow.ema import decay_from_half_life

    # Two steps at batch 64 decay as much as one step at batch 128.
    assert decay_from_half_life(64, 1000) ** 2 == pytest.approx(decay_from_half_life(128, 1000))
    assert decay_from_half_life(500, 500) == pytest.approx(0.5)


def test_ema_tracks_the_average():
    from selfflow.ema import EMA

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=0)
    ema.update(model, step=1)
    assert ema.model.weight.item() == pytest.approx(0.75)


def test_ema_multi_tensor_update_equals_one_parameter_at_a_time():
    """The foreach update gives, bit for bit, θ_ema.lerp_(θ, 1 − d) per parameter."""
    from selfflow.ema import EMA
    from support import perturbed_dit

    model = perturbed_dit()
    ema = EMA(model, decay=0.9, warmup=True)
    expected = {n: p.detach().clone() for n, p in ema.model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model, step=3)
    d = ema.decay_at(3)
    for name, param in model.named_parameters():
        assert torch.equal(ema.model.get_parameter(name), expected[name].lerp_(param, 1 - d)), name


def test_time_limit_stops_with_a_checkpoint(tiny_config, tmp_path):
    trainer, result = run(tiny_config(tmp_path, train={"steps": 1000, "time_limit_minutes": 1e-6}))
    assert result["status"] == "time_limit" and result["step"] == 1
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints").name == ckpt.step_dir_name(1)


def test_wandb_logs_what_metrics_jsonl_holds_and_is_off_by_default(tmp_path, monkeypatch):
    """train.loggers: [wandb] sends every logged scalar (train/<key> at its step); without the package it is
    a one-line ConfigError before training. A stand-in module records the calls (no account, no network)."""
    import sys
    import types

    from selfflow.config import ConfigError, config_from_dict
    from support import tiny_run, train_config

    calls = {"log": [], "finish": 0}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    assert config_from_dict(tiny_run(tmp_path / "off")).train.loggers == ()
    train_config(config_from_dict(tiny_run(tmp_path / "run", train={"steps": 3, "loggers": ["wandb"]})))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in calls["log"]] == [r["step"] for r in records] == [1, 2, 3]
    for (step, values), record in zip(calls["log"], records):
        assert values == {f"train/{k}": v for k, v in record.items() if k != "step"}
    assert calls["finish"] == 1 and calls["init"]["name"] == "run" and list(calls["init"]["config"]["train"]["loggers"]) == ["wandb"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match="wandb is not installed"):
        train_config(config_from_dict(tiny_run(tmp_path / "run2", train={"loggers": ["wandb"]})))
    with pytest.raises(ConfigError, match="train.loggers"):
        config_from_dict(tiny_run(tmp_path / "run3", train={"loggers": ["mlflow"]}))
