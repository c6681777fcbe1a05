"""The Python API (``selfflow.load``, ``Generator.sample``, ``save_pretrained``): sample k equals
``selfflow sample``'s image k for the same folder and seed, for every kind of generator folder, and the
README's "Python API" snippets run as written."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import selfflow
from selfflow.cli import main
from selfflow.imageio import to_uint8
from support import REPO, one_line_error

RUN_YAML = ("data: {{name: digits, class_conditional: {cond}}}\n"
            "model: {{size: tiny, depth: 2, hidden_size: 64, num_heads: 4}}\n"
            "method: {{name: flow_matching}}\n"
            "train: {{steps: 3, batch_size: 16, device: cpu, progress: false, tensorboard: false, num_sample_images: 0,\n"
            "        ckpt_every: 0, warmup_steps: 1, log_every: 1, lr: 3.0e-3}}\n"
            "sample: {{sampler: heun, steps: 3, cfg_scale: {cfg}}}\n")


def _run(root: Path, conditional: bool) -> Path:
    config = root / "run.yaml"
    config.write_text(RUN_YAML.format(cond=str(conditional).lower(), cfg=1.5 if conditional else 1.0))
    assert main(["train", "--config", str(config), "--set", f"train.out_dir={root / 'run'}"]) == 0
    return root / "run"


@pytest.fixture(scope="module", params=[True, False], ids=["labels", "unconditional"])
def image_run(request, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("api_run"), request.param)


def _cli_images(run: Path, out: Path, *flags: str) -> np.ndarray:
    assert main(["sample", "--ckpt", str(run), "--out", str(out), "--device", "cpu", *flags]) == 0
    return np.load(out / "samples.npz")["images"]


def test_sample_k_is_the_command_lines_image_k(image_run, tmp_path):
    g = selfflow.load(image_run, device="cpu")
    assert g.kind == "image" and g.settings.sampler == "heun" and g.settings.steps == 3
    x = g.sample(5, seed=7)
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32 and x.abs().max() <= 1
    assert np.array_equal(to_uint8(x).numpy(), _cli_images(image_run, tmp_path / "a", "--n", "5", "--seed", "7"))
    # the settings default to the run's sample section; given ones win, as the flags do
    y = g.sample(2, seed=7, sampler="euler", steps=2)
    assert np.array_equal(to_uint8(y).numpy(), _cli_images(image_run, tmp_path / "b", "--n", "2", "--seed", "7",
                                                            "--sampler", "euler", "--steps", "2"))
    assert not torch.equal(y, x[:2])
    if g.num_classes:
        z = g.sample(4, labels=[3, 5], seed=1)
        assert np.array_equal(to_uint8(z).numpy(), _cli_images(image_run, tmp_path / "c", "--n", "4", "--seed", "1",
                                                                "--labels", "3,5"))
        torch.testing.assert_close(g.sample(1, labels=5, seed=2), z[1:2], rtol=0, atol=1e-5)  # its seed (1 + k) and label only
    else:
        with pytest.raises(selfflow.api.ConfigError, match="unconditional"):
            g.sample(2, labels=[1])


def test_an_exported_folder_keeps_the_sampler_settings(image_run, tmp_path):
    g = selfflow.load(image_run, device="cpu")
    assert main(["export", "--ckpt", str(image_run), "--out", str(tmp_path / "cli_export")]) == 0
    g.save_pretrained(tmp_path / "api_export")
    for folder in ("cli_export", "api_export"):
        meta = json.loads((tmp_path / folder / "config.json").read_text())
        assert meta["sample"]["sampler"] == "heun" and meta["sample"]["steps"] == 3
        exported = selfflow.load(tmp_path / folder, device="cpu")
        assert exported.settings == g.settings
        assert torch.equal(exported.sample(3, seed=4), g.sample(3, seed=4))  # heun, 3 steps: not the Euler default


def test_text_runs_sample_from_prompts(tmp_path):
    from selfflow.config import config_from_dict
    from selfflow.trainer import train
    from support import tiny_run

    raw = tiny_run(tmp_path / "run", method={"name": "flow_matching"}, train={"steps": 2},
                   text={"encoder": "hashed", "hashed_dim": 32, "captions_per_image": 2, "cache_dir": str(tmp_path / "cache")})
    raw["sample"] = {"steps": 2, "cfg_scale": 2.0}
    train(config_from_dict(raw))
    g = selfflow.load(tmp_path / "run", device="cpu")
    assert g.kind == "text"
    prompts = ["a thin seven", "the digit 3"]
    x = g.sample(4, prompt=prompts, seed=3)
    flags = ["--n", "4", "--seed", "3", "--prompt", prompts[0], "--prompt", prompts[1]]
    assert np.array_equal(to_uint8(x).numpy(), _cli_images(tmp_path / "run", tmp_path / "s", *flags))
    g.save_pretrained(tmp_path / "exported")
    assert torch.equal(selfflow.load(tmp_path / "exported", device="cpu").sample(4, prompt=prompts, seed=3), x)
    with pytest.raises(selfflow.api.ConfigError, match="prompt"):
        g.sample(2)


def test_bad_arguments_are_one_line_errors(image_run, capsys):
    from selfflow.errors import USER_ERRORS

    g = selfflow.load(image_run, device="cpu")
    for call, needle in ((lambda: g.sample(0), "n must be positive"), (lambda: g.sample(2, sampler="nope"), "nope"),
                         (lambda: g.sample(2, prompt="a seven"), "not caption-conditioned"),
                         (lambda: selfflow.load(image_run, weights="best"), "weights='best'")):
        with pytest.raises(USER_ERRORS, match=re.escape(needle)):
            call()


def readme_snippets() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_python_api_snippets_run(tmp_path, monkeypatch):
    snippets = readme_snippets()
    assert len(snippets) >= 2
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for snippet in snippets:  # one session, in order, as a reader would paste them
        exec(compile(snippet, "README.md", "exec"), scope)
    assert Path("models/digits").is_dir() and scope["x"].shape[0] == 16
