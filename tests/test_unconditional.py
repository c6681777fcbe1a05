"""Unconditional models (``data.class_conditional: false``): training, resume, sampling, sets, evaluation.

The model has no classes (``num_classes == 0``): its label table holds only the null row and the
data's labels never reach it. Guidance, ``--labels`` and the class-accuracy metric need classes and
are refused with one line, before any work.
"""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from selfflow.cli import main
from support import one_line_error


def _config(tmp_path, method="flow_matching", extra=""):
    config = tmp_path / f"unconditional_{method}.yaml"
    config.write_text(
        "data: {name: digits, class_conditional: false}\n"
        "model: {size: tiny, depth: 2, hidden_size: 64}\n"
        f"method: {{name: {method}{extra}}}\n"
        "train: {steps: 4, batch_size: 16, device: cpu, progress: false, tensorboard: false, num_sample_images: 4,\n"
        "        ckpt_every: 2, warmup_steps: 1, log_every: 1}\n"
        "sample: {steps: 2}\n")
    return config


def _train(config, out, *items):
    args = ["train", "--config", str(config), "--set", f"train.out_dir={out}"]
    for item in items:
        args += ["--set", item]
    return main(args)


def _latest(out):
    return sorted((out / "checkpoints").glob("step_*"))[-1]




@pytest.fixture(scope="module", params=["flow_matching", "self_flow"])
def unconditional_run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"uncond_{request.param}")
    out = root / "run"
    assert _train(_config(root, request.param), out) == 0
    return out


def test_training_builds_a_model_without_classes(unconditional_run):
    folder = _latest(unconditional_run)
    meta = json.loads((folder / "config.json").read_text())
    assert meta["model"]["num_classes"] == 0 and meta["run"]["data"]["class_conditional"] is False
    ema = load_file(str(folder / "ema.safetensors"))
    assert ema["label_embed.weight"].shape[0] == 1  # the null row only
    assert (unconditional_run / "samples" / "step_0000004.png").is_file()
    losses = [json.loads(line)["loss"] for line in (unconditional_run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(np.isfinite(losses))


def test_sampling_gives_finite_images_and_no_labels(unconditional_run, tmp_path):
    out = tmp_path / "s"
    assert main(["sample", "--ckpt", str(unconditional_run), "--n", "3", "--out", str(out), "--device", "cpu"]) == 0
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (3, 1, 8, 8) and data["labels"].size == 0
    from selfflow.model import load_generator
    from selfflow.sampling import generate

    model, _ = load_generator(unconditional_run, "ema")
    assert model.num_classes == 0
    result = generate(model, num_samples=3, seeds=[0, 1, 2], steps=2, image_shape=(1, 8, 8), progress=False)
    assert torch.isfinite(result.images).all() and result.labels is None


def test_labels_and_guidance_are_refused_in_one_line(unconditional_run, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", "--ckpt", str(unconditional_run), "--n", "2", "--out", str(out), "--labels", "1", "--device", "cpu"]) == 2
    one_line_error(capsys, "--labels", "unconditional")
    assert main(["sample", "--ckpt", str(unconditional_run), "--n", "2", "--out", str(out), "--cfg-scale", "2", "--device", "cpu"]) == 2
    one_line_error(capsys, "--cfg-scale", "guidance", "unconditional")
    assert main(["generate-set", "--ckpt", str(unconditional_run), "--n", "2", "--out", str(out), "--cfg-scale", "1.5",
                 "--device", "cpu"]) == 2
    one_line_error(capsys, "--cfg-scale", "unconditional")
    assert main(["generate-set", "--ckpt", str(unconditional_run), "--n", "2", "--out", str(out), "--labels", "0",
                 "--device", "cpu"]) == 2
    one_line_error(capsys, "--labels", "unconditional")
    assert not out.exists()


def test_guidance_in_the_run_config_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(_config(tmp_path), out, "sample.cfg_scale=1.5") == 2
    one_line_error(capsys, "sample.cfg_scale", "class_conditional")
    assert not out.exists()


def test_generate_set_and_eval_without_classes(unconditional_run, tmp_path, capsys):
    assert main(["generate-set", "--ckpt", str(unconditional_run), "--n", "3", "--shard-size", "2",
                 "--out", str(tmp_path / "set"), "--device", "cpu"]) == 0
    shard = load_file(str(tmp_path / "set" / "shard_00000.safetensors"))
    assert shard["images"].shape[0] == 2
    capsys.readouterr()
    common = ["eval", "--ckpt", str(unconditional_run), "--n", "20", "--train-steps", "5", "--device", "cpu",
              "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--metrics", "fd_dom,acc", "--out", str(tmp_path / "acc.json")]) == 2
    one_line_error(capsys, "acc", "unconditional")
    assert not (tmp_path / "acc.json").exists()
    assert main([*common, "--metrics", "fd_dom,pr", "--out", str(tmp_path / "eval.json")]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["fd_dom"] >= 0 and 0 <= report["precision"] <= 1 and report.get("accuracy") is None
    assert main([*common, "--out", str(tmp_path / "default.json")]) == 0, capsys.readouterr().err  # default metrics: no acc
    report = json.loads((tmp_path / "default.json").read_text())
    assert report["fd_dom"] >= 0 and report.get("accuracy") is None


@pytest.mark.parametrize("method", ["flow_matching", "self_flow"])
def test_resume_is_bit_identical(tmp_path, method):
    config = _config(tmp_path, method)
    assert _train(config, tmp_path / "straight") == 0
    assert _train(config, tmp_path / "resumed", "train.steps=2") == 0
    assert _train(config, tmp_path / "resumed") == 0
    a, b = _latest(tmp_path / "straight"), _latest(tmp_path / "resumed")
    assert a.name == b.name == "step_0000004"
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), (name, key)


def test_the_data_labels_never_reach_the_model(tmp_path):
    """Same images, other labels: an unconditional run trains to exactly the same weights."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(32, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=images, labels=np.zeros(32, dtype=np.int64))
    np.savez(tmp_path / "b.npz", images=images, labels=rng.integers(0, 5, size=32).astype(np.int64))
    config = _config(tmp_path)
    for name in ("a", "b"):
        assert _train(config, tmp_path / name, "data.name=npz", f"data.path={tmp_path / f'{name}.npz'}", "train.steps=2",
                      "train.num_sample_images=0") == 0
    x, y = load_file(str(_latest(tmp_path / "a") / "model.safetensors")), load_file(str(_latest(tmp_path / "b") / "model.safetensors"))
    assert all(torch.equal(x[k], y[k]) for k in x)
