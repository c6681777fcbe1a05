"""The bad-input catalogue: each mistake a user can make gives one line naming the problem, exit 2,
no traceback, and leaves every file it found as it was.

| input                                   | expected message names                  |
| --------------------------------------- | --------------------------------------- |
| malformed YAML                          | the file, "malformed YAML"              |
| unknown key                             | the key (train.stpes)                   |
| wrong type                              | the key and the value                   |
| zero or negative sizes                  | the key and the value                   |
| data folder with a corrupt image        | the image file                          |
| images of different sizes               | both files and sizes                    |
| NaN in data                             | the file, "NaN"                         |
| checkpoint of another model size        | the differing key (hidden_size)         |
| checkpoint of another method            | "method"                                |
| weights that do not fit their config    | the tensor and both shapes              |
| truncated safetensors file              | the file, "truncated or corrupt"        |
| a pickle posing as a checkpoint         | refused, and its code never runs        |
| corrupt state.json                      | the file, "not valid JSON"              |
| a changed batch size on resume          | state.json, the data position           |
"""
import os
import pickle
import shutil

import numpy as np
import pytest

from selfflow.cli import main

BASE = ["--set", "model.depth=2", "--set", "model.hidden_size=64", "--set", "train.batch_size=16", "--set", "train.progress=false",
        "--set", "train.tensorboard=false", "--set", "train.num_sample_images=0", "--set", "train.device=cpu"]


def _train(out, *extra, config=None):
    args = ["train", *BASE, "--set", f"train.out_dir={out}"]
    if config is not None:
        args += ["--config", str(config)]
    for item in extra:
        args += ["--set", item]
    return main(args)


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("selfflow: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "run"
    assert _train(out, "train.steps=1") == 0
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


# ---- configuration --------------------------------------------------------------------------
def test_malformed_yaml(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  steps: [1, 2\n  lr: 0.1\n")
    assert _train(tmp_path / "run", config=config) == 2
    _one_line_error(capsys, "bad.yaml", "malformed YAML", "line 2")
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_a_file(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("train:\n  stpes: 10\n")
    assert _train(tmp_path / "run", config=config) == 2
    _one_line_error(capsys, "typo.yaml", "train.stpes")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("item, needle", [
    ("train.lr=fast", "train.lr"),
    ("train.steps=2.5", "train.steps"),
    ("train.compile=maybe", "train.compile"),
    ("model.size=huge", "model.size"),
])
def test_wrong_type_or_value(tmp_path, capsys, item, needle):
    assert _train(tmp_path / "run", item) == 2
    _one_line_error(capsys, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("item", ["train.batch_size=0", "train.steps=-5", "model.depth=0", "model.hidden_size=-64",
                                  "data.image_size=0", "model.patch_size=0", "train.grad_accum=0", "sample.steps=0"])
def test_zero_or_negative_sizes(tmp_path, capsys, item):
    assert _train(tmp_path / "run", item) == 2
    key, value = item.split("=")
    _one_line_error(capsys, key, value)
    assert not (tmp_path / "run").exists()


def test_zero_or_negative_counts_on_the_command_line(trained, tmp_path, capsys):
    assert main(["sample", "--ckpt", str(trained), "--n", "0", "--out", str(tmp_path / "s")]) == 2
    _one_line_error(capsys, "--n")
    assert main(["generate-set", "--ckpt", str(trained), "--n", "4", "--shard-size", "-1", "--out", str(tmp_path / "g")]) == 2
    _one_line_error(capsys, "--shard-size")
    assert not (tmp_path / "s").exists() and not (tmp_path / "g").exists()


# ---- data -----------------------------------------------------------------------------------
def _image_folder(root, sizes):
    from PIL import Image

    for label, size in enumerate(sizes):
        (root / f"class_{label}").mkdir(parents=True)
        Image.fromarray(np.full((size, size), 100 + label, dtype=np.uint8)).save(root / f"class_{label}" / "a.png")
        Image.fromarray(np.full((size, size), 50, dtype=np.uint8)).save(root / f"class_{label}" / "b.png")


def test_data_folder_with_a_corrupt_image(tmp_path, capsys):
    _image_folder(tmp_path / "data", [8, 8])
    broken = tmp_path / "data" / "class_1" / "b.png"
    broken.write_bytes(broken.read_bytes()[:20])
    before = _snapshot(tmp_path / "data")
    assert _train(tmp_path / "run", "data.name=folder", f"data.path={tmp_path / 'data'}") == 2
    _one_line_error(capsys, "b.png", "cannot read image")
    assert _snapshot(tmp_path / "data") == before


def test_data_folder_with_mismatched_image_sizes(tmp_path, capsys):
    _image_folder(tmp_path / "data", [8, 12])
    assert _train(tmp_path / "run", "data.name=folder", f"data.path={tmp_path / 'data'}") == 2
    _one_line_error(capsys, "12x12", "8x8", "differs")


def test_nan_in_data(tmp_path, capsys):
    images = np.zeros((20, 8, 8), dtype=np.float32)
    images[3, 2, 2] = np.nan
    np.savez(tmp_path / "data.npz", images=images, labels=np.zeros(20, dtype=np.int64))
    assert _train(tmp_path / "run", "data.name=npz", f"data.path={tmp_path / 'data.npz'}") == 2
    _one_line_error(capsys, "data.npz", "NaN")


# ---- checkpoints ------------------------------------------------------------------------------
def test_checkpoint_of_another_model_size(run_copy, capsys):
    before = _snapshot(run_copy)
    assert _train(run_copy, "train.steps=2", "model.hidden_size=128") == 2
    _one_line_error(capsys, "different model config", "hidden_size")
    assert _snapshot(run_copy) == before


def test_checkpoint_of_another_method(run_copy, capsys):
    before = _snapshot(run_copy)
    assert _train(run_copy, "train.steps=2", "method.name=self_flow") == 2
    _one_line_error(capsys, "different method config")
    assert _snapshot(run_copy) == before


def test_weights_that_do_not_fit_their_config(run_copy, capsys, tmp_path):
    import json

    folder = run_copy / "checkpoints" / "step_0000001"
    meta = json.loads((folder / "config.json").read_text())
    meta["model"]["hidden_size"] = 128  # a config that claims another size than the weights
    (folder / "config.json").write_text(json.dumps(meta))
    before = _snapshot(run_copy)
    assert main(["sample", "--ckpt", str(folder), "--n", "2", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2
    _one_line_error(capsys, "ema.safetensors", "has shape", "the model expects")
    assert _snapshot(run_copy) == before and not (tmp_path / "s").exists()


def test_truncated_safetensors_on_resume(run_copy, capsys):
    file = run_copy / "checkpoints" / "step_0000001" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    before = _snapshot(run_copy)
    assert _train(run_copy, "train.steps=2") == 2
    _one_line_error(capsys, "model.safetensors", "truncated or corrupt")
    assert _snapshot(run_copy) == before


def test_pickle_checkpoint_is_refused_and_never_runs(run_copy, capsys, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = run_copy / "checkpoints" / "step_0000001"
    payload = pickle.dumps({"model": Evil()})
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        (folder / name).write_bytes(payload)
    (folder / "model.pt").write_bytes(payload)  # the usual torch.save name: never looked at
    before = _snapshot(run_copy)
    assert main(["sample", "--ckpt", str(folder), "--n", "2", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2
    _one_line_error(capsys, "ema.safetensors", "truncated or corrupt")
    assert _train(run_copy, "train.steps=2") == 2
    _one_line_error(capsys, "model.safetensors")
    assert main(["sample", "--ckpt", str(folder / "model.pt"), "--n", "2", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2
    _one_line_error(capsys, "no checkpoint found")
    assert not marker.exists()
    assert _snapshot(run_copy) == before


def test_corrupt_state_json(run_copy, capsys):
    (run_copy / "checkpoints" / "step_0000001" / "state.json").write_text('{"step": 1, "data": ')
    before = _snapshot(run_copy)
    assert _train(run_copy, "train.steps=2") == 2
    _one_line_error(capsys, "state.json", "not valid JSON")
    assert _snapshot(run_copy) == before


def test_changed_batch_size_on_resume(run_copy, capsys):
    before = _snapshot(run_copy)
    assert _train(run_copy, "train.steps=2", "train.batch_size=32") == 2
    _one_line_error(capsys, "state.json", "data position", "batch_size")
    assert _snapshot(run_copy) == before
