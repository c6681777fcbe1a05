"""The Python API (``selfflow.load``, ``Generator.sample``, ``save_pretrained``): sample k equals
``selfflow sample``'s image k for the same folder and seed, for every kind of generator folder, and the
README's "Python API" snippets run as written."""
import importlib.util
import json
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
    from selfflow import DiT

    assert g.layout.parts[0].name == "image" and g.layout.sample_shape == g.sample_shape
    model = DiT.from_pretrained(image_run, weights="ema.safetensors")  # a run folder: its newest checkpoint
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), g.model.state_dict().values()))
    assert main(["export", "--ckpt", str(image_run), "--out", str(tmp_path / "cli_export")]) == 0
    g.save_pretrained(tmp_path / "api_export")
    for folder in ("cli_export", "api_export"):
        meta = json.loads((tmp_path / folder / "config.json").read_text())
        assert meta["sample"]["sampler"] == "heun" and meta["sample"]["steps"] == 3
        exported = selfflow.load(tmp_path / folder, device="cpu")
        assert exported.settings == g.settings
        assert torch.equal(exported.sample(3, seed=4), g.sample(3, seed=4))  # heun, 3 steps: not the Euler default


def test_text_runs_sample_from_prompts(tmp_path, capsys):
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
    if importlib.util.find_spec("diffusers") is not None:  # the pipeline takes label/unconditional pixel models only
        capsys.readouterr()
        assert main(["export", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "d"), "--format", "diffusers"]) == 2
        one_line_error(capsys, "--format diffusers", "text model")
        assert not (tmp_path / "d").exists()


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


def test_the_diffusers_export_reproduces_our_euler_samples(image_run, tmp_path):
    pytest.importorskip("diffusers")
    from selfflow.hub import SelfFlowPipeline, SelfFlowTransformer2DModel
    from selfflow.sampling import generate, noise_for_seeds

    out = tmp_path / "diffusers"
    assert main(["export", "--ckpt", str(image_run), "--out", str(out), "--format", "diffusers"]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "SelfFlowPipeline" and index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift"] == 1.0 and scheduler["num_train_timesteps"] == 1000 and not scheduler["use_dynamic_shifting"]
    assert "library_name: diffusers" in (out / "README.md").read_text()
    pipe = SelfFlowPipeline.from_pretrained(str(out))
    assert isinstance(pipe.transformer, SelfFlowTransformer2DModel)
    g = selfflow.load(image_run, device="cpu")
    seeds, shape = [3, 4, 5], g.sample_shape
    labels = torch.tensor([1, 2, 9]) if g.num_classes else None
    for steps, scale in ((4, g.settings.cfg_scale), (7, 1.0)):
        ours = generate(g.model, num_samples=3, seeds=seeds, labels=labels, sampler="euler", steps=steps, cfg_scale=scale,
                        image_shape=shape, clip=False, progress=False).images
        theirs = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=scale, latents=noise_for_seeds(seeds, shape),
                      output_type="raw").images
        assert (theirs - ours).abs().max().item() <= 1e-5, (steps, scale)
        assert (ours - noise_for_seeds(seeds, shape)).abs().max() > 0.1  # the network moved the samples
    # the pipeline's defaults are the run's steps and guidance; images in [0, 1]
    default = pipe(class_labels=labels, batch_size=3, generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    assert default.shape == (3, *shape) and 0 <= default.min() and default.max() <= 1


def test_the_default_export_is_hub_ready(image_run, tmp_path):
    out = tmp_path / "model"
    assert main(["export", "--ckpt", str(image_run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: selfflow") and "- method: flow_matching" in card
    assert "sampler heun, 3 steps" in card and "training loss" in card and "- data: digits" in card


def test_a_video_run_samples_what_the_modality_command_samples(tmp_path):
    from selfflow.modalities.evaluation.run import run_config_of
    from selfflow.modalities.sampling import sample_conditioned
    from support import fit
    from test_modalities import raw_run

    fit(raw_run(tmp_path / "run", "video", steps=2))
    g = selfflow.load(tmp_path / "run", device="cpu")
    assert g.kind == "modality" and g.sample_shape == g.model.layout.sample_shape
    x = g.sample(3, labels=[4, 2, 7])
    expected, _ = sample_conditioned(g.model, run_config_of(g.loaded.run, g.folder), 3, "cpu", labels=torch.tensor([4, 2, 7]))
    assert x.shape == (3, *g.sample_shape) and torch.equal(x, expected)
    g.save_pretrained(tmp_path / "exported")
    assert torch.equal(selfflow.load(tmp_path / "exported", device="cpu").sample(3, labels=[4, 2, 7]), x)


def test_a_one_step_student_samples_as_the_command_line_does(tmp_path):
    from selfflow.sets import generate_set
    from support import fit, tiny_run

    fit(tiny_run(tmp_path / "teacher", train={"steps": 2}))
    generate_set(selfflow.load(tmp_path / "teacher", device="cpu").model, tmp_path / "pairs", num=16, shard_size=16,
                 kind="pairs", sampler="euler", steps=2)
    fit(tiny_run(tmp_path / "student", data={"name": "pairs", "path": str(tmp_path / "pairs")}, method={"name": "distill", "steps": 1},
                 train={"steps": 2, "init_from": str(tmp_path / "teacher")}))
    g = selfflow.load(tmp_path / "student", device="cpu")
    x = g.sample(3, seed=2)
    assert np.array_equal(to_uint8(x).numpy(), _cli_images(tmp_path / "student", tmp_path / "s", "--n", "3", "--seed", "2"))
