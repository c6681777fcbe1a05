"""Caption-conditioned video (text + a video modality), end to end: the config is checked before any work,
each clip is captioned the way a text-to-image run captions its images, ``selfflow train`` trains,
checkpoints and resumes it, and ``selfflow sample --prompt`` and ``selfflow.load(RUN).sample(prompt=…)``
draw the same clips of the layout's shape."""
import json

import numpy as np
import pytest
import torch

import selfflow
from selfflow.checkpoint import step_dir_name
from selfflow.cli import main
from selfflow.config import ConfigError, load_config
from selfflow.modalities.video import video_to_uint8
from support import REPO, one_line_error

CONFIG = REPO / "configs" / "video_text_flow_matching.yaml"
PROMPTS = ["a thick seven", "the digit 2, slanted left"]


def tiny(out, cache, steps=4, *extra):
    """``--set`` overrides that shrink the shipped config to seconds on a CPU: 4 frames of 8×8, depth 2, width 64."""
    return ["modality.num_samples=48", "modality.frames=4", "modality.frame_size=8", "modality.video_patch=4",
            "model.depth=2", f"train.steps={steps}", "train.batch_size=8", "train.ckpt_every=2", "train.device=cpu",
            "train.precision=fp32", "train.num_sample_images=2", "train.log_every=1", "train.progress=false",
            "train.tensorboard=false", "train.warmup_steps=1", "sample.steps=2", "text.encoder=hashed",
            "text.hashed_dim=32", f"text.cache_dir={cache}", f"train.out_dir={out}", *extra]


def train_cli(overrides):
    argv = ["train", "--config", str(CONFIG)]
    for item in overrides:
        argv += ["--set", item]
    return main(argv)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2v")
    assert train_cli(tiny(root / "run", root / "cache")) == 0
    return root


def test_the_shipped_config_is_a_caption_conditioned_video_run():
    config = load_config(CONFIG)
    assert config.text is not None and config.modality.kind == "video" and config.text.captions == "generated"


@pytest.mark.parametrize("override, key", [
    ("modality.kind=audio", "modality.kind=audio"),
    ("modality.kind=audio_video", "modality.kind=audio_video"),
    ("modality.kind=actions", "modality.kind=actions"),
    ("modality.digits_per_clip=2", "modality.digits_per_clip=2"),
    ("model.num_classes=10", "model.num_classes=10"),
    ("data.class_conditional=false", "data.class_conditional"),
])
def test_combinations_that_cannot_work_are_refused_before_any_work(override, key, tmp_path, capsys):
    with pytest.raises(ConfigError, match=key):
        load_config(CONFIG, [override])
    assert train_cli(tiny(tmp_path / "run", tmp_path / "cache", 4, override)) == 2
    one_line_error(capsys, key)
    assert not (tmp_path / "run").exists()


def test_a_missing_caption_file_fails_before_the_run_folder_exists(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert train_cli(tiny(tmp_path / "run", tmp_path / "cache", 4, f"text.captions={missing}")) == 2
    one_line_error(capsys, "text.captions", str(missing))
    assert not (tmp_path / "run").exists()


def test_a_caption_file_gives_each_clip_its_captions(tmp_path):
    """Caption files work as for images: one line per clip index; a clip without captions is named."""
    from selfflow.trainer import load_data

    lines = [json.dumps({"id": str(i), "captions": [f"clip {i % 3}"]}) for i in range(48)]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    base = ["modality.num_samples=48", "modality.frames=4", "modality.frame_size=8", "text.encoder=hashed"]
    config = load_config(CONFIG, [*base, f"text.captions={tmp_path / 'captions.jsonl'}"])
    data = load_data(config)
    assert len(data) == 48 and data.texts == ["clip 0", "clip 1", "clip 2"]
    x, y = data.get_batch([4, 5])
    assert x.shape == (2, 1, 4, 8, 8) and y.tolist() == [1, 2]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines[:47]) + "\n")
    with pytest.raises(selfflow.errors.DataError, match="id '47'"):
        load_data(config)


def test_generated_captions_name_each_clips_digit_and_attributes(tmp_path):
    """Each clip's captions are the text-to-image captions of its first frame (a translated digit: same ink, same slant)."""
    from selfflow.modalities.data import modality_samples
    from selfflow.text.captions import parse_prompt
    from selfflow.text.data import generated_captions
    from selfflow.trainer import load_data

    config = load_config(CONFIG, ["modality.num_samples=40", "modality.frames=4", "modality.frame_size=16",
                                  "text.encoder=hashed", "text.captions_per_image=3"])
    data = load_data(config)
    clips = modality_samples(config, "train")
    assert len(data) == 3 * 40 and torch.equal(data.get_batch([0, 1, 2])[0], clips.x[[0, 0, 0]])
    expected, _ = generated_captions(clips.x[:, :, 0], clips.y, 10, per_image=3, seed=0)
    for i in (0, 7, 39):
        captions = [data.texts[int(c)] for c in data.pairs[data.pairs[:, 0] == i, 1]]
        assert captions == [c.text for c in expected[i]]
        assert all(parse_prompt(c).label == int(clips.y[i]) for c in captions)  # every caption names the clip's digit


def test_train_checkpoints_resumes_and_samples_identically(run, tmp_path, capsys):
    folder = run / "run"
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [step_dir_name(2), step_dir_name(4)]
    assert (folder / "samples" / f"{step_dir_name(4)}.gif").is_file()  # the trainer's preview
    # resume: train on to step 6 from step 4, and the same 6 steps at once give the same weights
    assert train_cli(tiny(folder, run / "cache", 6)) == 0
    assert train_cli(tiny(tmp_path / "straight", run / "cache", 6)) == 0
    a = selfflow.load(folder, device="cpu")
    b = selfflow.load(tmp_path / "straight", device="cpu")
    assert a.folder.name == step_dir_name(6)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))

    assert a.kind == "modality" and a.text is not None and a.num_classes == 0
    x = a.sample(4, prompt=PROMPTS, seed=3)
    assert x.shape == (4, *a.layout.sample_shape) == (4, 1, 4, 8, 8) and x.abs().max() <= 1
    assert torch.equal(a.sample(4, prompt=PROMPTS, seed=3), x)
    assert not torch.equal(a.sample(4, prompt=PROMPTS[::-1], seed=3), x)  # the caption reaches the velocity
    out = tmp_path / "cli"
    flags = ["--n", "4", "--seed", "3", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--device", "cpu"]
    assert main(["sample", "--ckpt", str(folder), "--out", str(out), *flags]) == 0
    saved = np.load(out / "samples.npz")
    assert np.array_equal(saved["videos"], video_to_uint8(x).numpy()) and saved["prompt_index"].tolist() == [0, 0, 1, 1]
    assert (out / "samples.gif").is_file() and json.loads((out / "samples.json").read_text())["prompts"] == PROMPTS
    # an exported folder keeps the text and modality sections and samples the same clips
    assert main(["export", "--ckpt", str(folder), "--out", str(tmp_path / "exported")]) == 0
    assert torch.equal(selfflow.load(tmp_path / "exported", device="cpu").sample(4, prompt=PROMPTS, seed=3), x)
    assert "pipeline_tag: text-to-video" in (tmp_path / "exported" / "README.md").read_text()

    capsys.readouterr()
    for argv, needle in ((["sample", "--ckpt", str(folder), "--out", str(tmp_path / "none")], "--prompt"),
                         (["modality", "sample", "--ckpt", str(folder), "--out", str(tmp_path / "m")], "selfflow sample --prompt")):
        assert main(argv) == 2
        one_line_error(capsys, needle)
    with pytest.raises(ConfigError, match="prompt"):
        a.sample(2)
    with pytest.raises(ConfigError, match="labels"):
        a.sample(2, prompt="a seven", labels=[1])
