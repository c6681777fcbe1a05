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
| a bad value for any choice field        | the key (CHOICE_FIELDS walks every one) |
| fields that contradict each other       | both keys                               |
"""
import os
import pickle
import shutil

import numpy as np
import pytest

from selfflow.cli import main
from support import one_line_error

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
    one_line_error(capsys, "bad.yaml", "malformed YAML", "line 2")
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_a_file(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("train:\n  stpes: 10\n")
    assert _train(tmp_path / "run", config=config) == 2
    one_line_error(capsys, "typo.yaml", "train.stpes")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("item, needle", [
    ("train.lr=fast", "train.lr"),
    ("train.steps=2.5", "train.steps"),
    ("train.compile=maybe", "train.compile"),
    ("model.size=huge", "model.size"),
])
def test_wrong_type_or_value(tmp_path, capsys, item, needle):
    assert _train(tmp_path / "run", item) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("item", ["train.batch_size=0", "train.steps=-5", "model.depth=0", "model.hidden_size=-64",
                                  "data.image_size=0", "model.patch_size=0", "train.grad_accum=0", "sample.steps=0"])
def test_zero_or_negative_sizes(tmp_path, capsys, item):
    assert _train(tmp_path / "run", item) == 2
    key, value = item.split("=")
    one_line_error(capsys, key, value)
    assert not (tmp_path / "run").exists()


def test_zero_or_negative_counts_on_the_command_line(trained, tmp_path, capsys):
    assert main(["sample", "--ckpt", str(trained), "--n", "0", "--out", str(tmp_path / "s")]) == 2
    one_line_error(capsys, "--n")
    assert main(["generate-set", "--ckpt", str(trained), "--n", "4", "--shard-size", "-1", "--out", str(tmp_path / "g")]) == 2
    one_line_error(capsys, "--shard-size")
    assert not (tmp_path / "s").exists() and not (tmp_path / "g").exists()


# ---- every field with a fixed set of values ---------------------------------------------------
# (key, a bad value, what else the key needs to exist). Each is refused by `selfflow train` before
# any work: exit 2, one line naming the key, no run folder.
CHOICE_FIELDS = [
    ("data.name", "imagenet", []),
    ("data.split", "validation", []),
    ("model.size", "huge", []),
    ("model.pos_embed", "learned", []),
    ("train.loggers", "mlflow", []),  # a list is expected; "[mlflow]" names an unknown logger (tests/test_trainer.py)
    ("train.device", "gpu", []),
    ("train.device", "cuda:x", []),
    ("train.precision", "fp16", []),
    ("train.compile_mode", "fastest", []),
    ("train.distributed", "horovod", []),
    ("sample.sampler", "eulr", []),
    ("method.name", "magic", []),
    ("method.time_distribution", "beta", []),
    ("method.mask_mode", "sideways", ["method.name=self_flow"]),
    ("method.encoder", "dinov2", ["method.name=repa"]),
    ("method.encoder_layer", "mixed_99", ["method.name=repa", "method.encoder=inception"]),
    ("method.encoder_layer", "layer2", ["method.name=repa", "method.encoder=feature_net"]),
    ("method.loss", "l3", ["method.name=distill"]),
    ("modality.kind", "smell", []),
    ("modality.audio_source", "tape", ["modality.kind=audio"]),
    ("modality.observation", "lidar", ["modality.kind=metaworld"]),
    ("text.encoder", "bert", []),
    ("data.crop", "middle", ["data.name=folder", "data.path=."]),
    ("data.on_bad_image", "ignore", ["data.name=folder", "data.path=."]),
]
# str fields whose value is not a choice: paths and the like.
FREE_TEXT_FIELDS = {"data.path", "train.out_dir", "train.init_from", "method.encoder_path", "method.feature_net", "method.teacher",
                    "modality.cache_dir", "text.captions", "text.cache_dir",
                    "data.image_column", "data.label_column",  # column names / tar extensions of the user's set
                    "modality.task"}  # a Meta-World task name, checked against the installed benchmark when its data is made


def _str_fields():
    import dataclasses
    import typing

    from selfflow.config import METHOD_CONFIGS, SECTION_TYPES, ModalityConfig, TextConfig

    classes = [(name, cls) for name, cls in SECTION_TYPES.items()] + [("method", cls) for cls in METHOD_CONFIGS.values()] \
        + [("modality", ModalityConfig), ("text", TextConfig)]
    found = {"method.name"}
    for section, cls in classes:
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if hint is str or str in typing.get_args(hint):
                found.add(f"{section}.{f.name}")
    return found


def test_every_str_field_is_a_checked_choice_or_free_text():
    fields = _str_fields()
    table = {key for key, _bad, _needs in CHOICE_FIELDS}
    assert {"sample.sampler", "data.name", "train.precision", "method.mask_mode"} <= fields  # the walk finds them
    assert not table & FREE_TEXT_FIELDS
    unlisted = fields - table - FREE_TEXT_FIELDS
    assert not unlisted, f"str config fields with no bad-value test: {sorted(unlisted)} (add to CHOICE_FIELDS or FREE_TEXT_FIELDS)"
    assert not table - fields, f"CHOICE_FIELDS names fields that do not exist: {sorted(table - fields)}"


@pytest.fixture
def tiny_digits_config(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("data: {name: digits}\nmodel: {size: tiny, depth: 2, hidden_size: 64}\nmethod: {name: flow_matching}\n"
                      "train: {steps: 2, batch_size: 16, device: cpu, progress: false, tensorboard: false, num_sample_images: 4}\n"
                      "sample: {steps: 2}\n")
    return config


@pytest.mark.parametrize("key, bad, needs", CHOICE_FIELDS, ids=[f"{k}={b}" for k, b, _ in CHOICE_FIELDS])
def test_every_choice_field_is_checked_before_work(tiny_digits_config, tmp_path, capsys, key, bad, needs):
    out = tmp_path / "run"
    args = ["train", "--config", str(tiny_digits_config), "--set", f"train.out_dir={out}"]
    for item in [*needs, f"{key}={bad}"]:
        args += ["--set", item]
    assert main(args) == 2
    one_line_error(capsys, key, bad)
    assert not out.exists()


@pytest.mark.parametrize("items, needles", [
    (["method.name=self_flow", "method.student_layer=3"], ["method.student_layer=3", "2 blocks"]),
    (["method.name=self_flow", "method.teacher_layer=5"], ["method.teacher_layer=5", "2 blocks"]),
    (["method.name=repa", "method.student_layer=4"], ["method.student_layer=4", "2 blocks"]),
    (["method.name=repa", "data.name=latents", "data.path=latents/x"], ["method.name=repa", "data.name=latents", "pixels"]),
    (["data.class_conditional=false", "sample.cfg_scale=2"], ["sample.cfg_scale", "class_conditional"]),
    (["data.class_conditional=false", "model.num_classes=10"], ["model.num_classes", "class_conditional"]),
    (["data.image_size=12", "model.patch_size=5"], ["model.patch_size=5", "12"]),
    (["data.path=somewhere"], ["data.path", "digits"]),
    (["data.name=mnist"], ["data.path", "mnist"]),
    (["data.name=latents", "data.path=latents/x", "data.image_size=16"], ["data.image_size", "latents"]),
    (["train.batch_size=10", "train.grad_accum=4"], ["train.batch_size", "grad_accum"]),
    (["modality.kind=video", "method.name=repa"], ["modality.kind=video", "method.name=repa"]),
    (["modality.kind=video", "data.image_size=16"], ["data.image_size", "modality"]),
    (["modality.kind=video", "modality.frame_size=30"], ["modality.video_patch=4", "frame_size=30"]),
    (["modality.kind=audio", "data.name=mnist", "data.path=x"], ["modality.kind=audio", "data.name=mnist"]),
    (["modality.kind=actions", "sample.cfg_scale=2"], ["sample.cfg_scale", "policy"]),
    (["modality.kind=actions", "modality.execute=9"], ["modality.execute=9", "horizon=8"]),
    (["modality.kind=video", "method.name=regression"], ["method.name=regression", "modality.kind=video"]),
    (["modality.kind=audio", "text.encoder=hashed"], ["modality", "text"]),
])
def test_contradicting_fields_fail_before_work(tiny_digits_config, tmp_path, capsys, items, needles):
    out = tmp_path / "run"
    args = ["train", "--config", str(tiny_digits_config), "--set", f"train.out_dir={out}"]
    for item in items:
        args += ["--set", item]
    assert main(args) == 2
    one_line_error(capsys, *needles)
    assert not out.exists()


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
    one_line_error(capsys, "b.png", "cannot read image")
    assert _snapshot(tmp_path / "data") == before


def test_data_folder_with_mismatched_image_sizes(tmp_path, capsys):
    _image_folder(tmp_path / "data", [8, 12])
    assert _train(tmp_path / "run", "data.name=folder", f"data.path={tmp_path / 'data'}") == 2
    one_line_error(capsys, "12x12", "8x8", "differs")


def test_nan_in_data(tmp_path, capsys):
    images = np.zeros((20, 8, 8), dtype=np.float32)
    images[3, 2, 2] = np.nan
    np.savez(tmp_path / "data.npz", images=images, labels=np.zeros(20, dtype=np.int64))
    assert _train(tmp_path / "run", "data.name=npz", f"data.path={tmp_path / 'data.npz'}") == 2
    one_line_error(capsys, "data.npz", "NaN")


# ---- checkpoints ------------------------------------------------------------------------------
def test_checkpoint_of_another_model_size(run_copy, capsys):
    before = _snapshot(run_copy)
    assert _train(run_copy, "train.steps=2", "model.hidden_size=128") == 2
    one_line_error(capsys, "different model config", "hidden_size")
    assert _snapshot(run_copy) == before


def test_checkpoint_of_another_method(run_copy, capsys):
    before = _snapshot(run_copy)
    assert _train(run_copy, "train.steps=2", "method.name=self_flow") == 2
    one_line_error(capsys, "different method config")
    assert _snapshot(run_copy) == before


def test_weights_that_do_not_fit_their_config(run_copy, capsys, tmp_path):
    import json

    folder = run_copy / "checkpoints" / "step_0000001"
    meta = json.loads((folder / "config.json").read_text())
    meta["model"]["hidden_size"] = 128  # a config that claims another size than the weights
    (folder / "config.json").write_text(json.dumps(meta))
    before = _snapshot(run_copy)
    assert main(["sample", "--ckpt", str(folder), "--n", "2", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2
    one_line_error(capsys, "ema.safetensors", "has shape", "the model expects")
    assert _snapshot(run_copy) == before and not (tmp_path / "s").exists()


def test_truncated_safetensors_on_resume(run_copy, capsys):
    file = run_copy / "checkpoints" / "step_0000001" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    before = _snapshot(run_copy)
    assert _train(run_copy, "train.steps=2") == 2
    one_line_error(capsys, "model.safetensors", "truncated or corrupt")
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
    one_line_error(capsys, "ema.safetensors", "truncated or corrupt")
    assert _train(run_copy, "train.steps=2") == 2
    one_line_error(capsys, "model.safetensors")
    assert main(["sample", "--ckpt", str(folder / "model.pt"), "--n", "2", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2
    one_line_error(capsys, "no checkpoint found")
    assert not marker.exists()
    assert _snapshot(run_copy) == before


def test_corrupt_state_json(run_copy, capsys):
    (run_copy / "checkpoints" / "step_0000001" / "state.json").write_text('{"step": 1, "data": ')
    before = _snapshot(run_copy)
    assert _train(run_copy, "train.steps=2") == 2
    one_line_error(capsys, "state.json", "not valid JSON")
    assert _snapshot(run_copy) == before


def test_changed_batch_size_on_resume(run_copy, capsys):
    before = _snapshot(run_copy)
    assert _train(run_copy, "train.steps=2", "train.batch_size=32") == 2
    one_line_error(capsys, "state.json", "data position", "batch_size")
    assert _snapshot(run_copy) == before


def test_garbage_checkpoint_config_on_resume(run_copy, capsys):
    (run_copy / "checkpoints" / "step_0000001" / "config.json").write_bytes(b"\x00\xffnot json")
    before = _snapshot(run_copy)
    assert _train(run_copy, "train.steps=2") == 2
    one_line_error(capsys, "config.json")
    assert _snapshot(run_copy) == before


@pytest.mark.parametrize("name", ["npz", "folder", "mnist", "idx", "latents"])
def test_data_path_that_is_a_text_file(tmp_path, capsys, name):
    (tmp_path / "notes.txt").write_text("not data\n")
    assert _train(tmp_path / "run", f"data.name={name}", f"data.path={tmp_path / 'notes.txt'}") == 2
    one_line_error(capsys, "notes.txt")
    assert not (tmp_path / "run").exists()  # the data is read before the run folder is made


def test_batch_that_does_not_split_over_the_processes(tmp_path, capsys, monkeypatch):
    """Under torchrun with 3 processes a batch of 16 cannot be split: refused before any file is written."""
    from selfflow import trainer
    from selfflow.distributed import DistInfo

    monkeypatch.setattr(trainer, "init_distributed", lambda device_type: DistInfo(rank=0, world_size=3))
    assert _train(tmp_path / "run") == 2
    one_line_error(capsys, "train.batch_size=16", "world size (3)")
    assert not (tmp_path / "run").exists()


def test_a_batch_larger_than_the_data_set_is_one_line_and_writes_nothing(tmp_path, capsys):
    from selfflow.cli import main

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "small.npz", images=rng.integers(0, 256, size=(5, 8, 8), dtype=np.uint8), labels=np.arange(5) % 2)
    out = tmp_path / "run"
    code = main(["train", "--set", "data.name=npz", "--set", f"data.path={tmp_path / 'small.npz'}", "--set", "model.depth=2",
                 "--set", "model.hidden_size=64", "--set", "train.batch_size=8", "--set", f"train.out_dir={out}",
                 "--set", "train.device=cpu", "--set", "train.steps=1"])
    assert code == 2
    one_line_error(capsys, "train.batch_size=8", "5 items")
    assert not out.exists()
