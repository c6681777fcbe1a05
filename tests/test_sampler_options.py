"""``--sampler-option KEY=VALUE`` on the sampling commands: parsed like ``--set`` values, checked
against the chosen sampler's keyword options before any work, passed to ``generate`` unchanged,
and recorded beside the other sampler settings."""
import json

import numpy as np
import pytest
import torch

from selfflow.cli import main
from selfflow.config import ConfigError
from selfflow.imageio import to_uint8
from selfflow.model import load_generator
from selfflow.sampling import generate, parse_sampler_options, sampler_option_names
from support import fit, one_line_error, tiny_run

SIT = ["--sampler", "sit_sde", "--steps", "4", "--cfg-scale", "2", "--batch-size", "4"]
OPTIONS = {"last_step_size": 0.1, "last_step": "euler", "guidance_interval": [0.0, 0.5]}
FLAGS = ["--sampler-option", "last_step_size=0.1", "--sampler-option", "last_step=euler",
         "--sampler-option", "guidance_interval=[0, 0.5]"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sampler_options") / "run"
    fit(tiny_run(out, train={"steps": 1}))
    return out


def test_options_are_the_samplers_keywords_parsed_like_set_values():
    assert sampler_option_names("sit_sde") == ["last_step_size", "last_step", "diffusion_norm", "guidance_interval"]
    assert sampler_option_names("dopri5") == ["rtol", "atol"]
    assert sampler_option_names("euler") == []
    assert parse_sampler_options(["rtol=1e-4", "atol = 3e-4", "rtol=2e-4"], "dopri5") == {"rtol": 2e-4, "atol": 3e-4}
    assert parse_sampler_options(["last_step_size=0.1", "last_step=euler", "guidance_interval=[0, 0.5]"], "sit_sde") == OPTIONS
    with pytest.raises(ConfigError, match=r"^--sampler-option rtol: the sit_sde sampler has no option 'rtol'; its options: "
                                          r"last_step_size, last_step, diffusion_norm, guidance_interval$"):
        parse_sampler_options(["rtol=1e-4"], "sit_sde")
    with pytest.raises(ConfigError, match="the euler sampler has no option 'rtol'; it takes no options"):
        parse_sampler_options(["rtol=1e-4"], "euler")
    with pytest.raises(ConfigError, match="is not of the form KEY=VALUE"):
        parse_sampler_options(["rtol"], "dopri5")


@pytest.mark.parametrize("command", ["sample", "generate-set", "eval"])
def test_an_unknown_key_is_one_line_and_writes_nothing(run, tmp_path, capsys, command):
    out = tmp_path / "out"
    argv = [command, "--ckpt", str(run), "--n", "2", "--out", str(out), *SIT, "--sampler-option", "rtol=1e-4"]
    assert main(argv) == 2
    one_line_error(capsys, "--sampler-option rtol", "sit_sde", "last_step_size, last_step, diffusion_norm, guidance_interval")
    assert not out.exists()


def test_sit_sde_options_change_the_samples_exactly_as_generate_does(run, tmp_path, capsys):
    model, _ = load_generator(run, "ema")
    common = dict(num_samples=4, seeds=[0, 1, 2, 3], sampler="sit_sde", steps=4, cfg_scale=2.0, batch_size=4,
                  image_shape=(1, 8, 8), progress=False)
    expected = to_uint8(generate(model, sampler_options=OPTIONS, **common).images).numpy()
    plain = to_uint8(generate(model, **common).images).numpy()
    assert not np.array_equal(expected, plain)  # the options matter

    assert main(["sample", "--ckpt", str(run), "--n", "4", "--out", str(tmp_path / "a"), *SIT, *FLAGS]) == 0
    assert main(["sample", "--ckpt", str(run), "--n", "4", "--out", str(tmp_path / "b"), *SIT]) == 0
    assert np.array_equal(np.load(tmp_path / "a" / "samples.npz")["images"], expected)
    assert np.array_equal(np.load(tmp_path / "b" / "samples.npz")["images"], plain)
    assert json.loads((tmp_path / "a" / "samples.json").read_text())["sampler_options"] == OPTIONS
    assert "sampler_options" not in json.loads((tmp_path / "b" / "samples.json").read_text())


def test_generate_set_passes_and_records_the_options(run, tmp_path):
    from selfflow.shards import ShardSet

    assert main(["generate-set", "--ckpt", str(run), "--n", "4", "--out", str(tmp_path / "set"), *SIT, *FLAGS]) == 0
    manifest = json.loads((tmp_path / "set" / "set.json").read_text())
    assert manifest["sampler"] == "sit_sde" and manifest["sampler_options"] == OPTIONS
    model, _ = load_generator(run, "ema")
    expected = generate(model, num_samples=4, seeds=[0, 1, 2, 3], sampler="sit_sde", steps=4, cfg_scale=2.0, batch_size=4,
                        image_shape=(1, 8, 8), progress=False, sampler_options=OPTIONS).images
    assert torch.equal(ShardSet.open(tmp_path / "set").read_all()["images"], to_uint8(expected))
    # dopri5: the given tolerance replaces its default in the record, the other default stays
    assert main(["generate-set", "--ckpt", str(run), "--n", "2", "--out", str(tmp_path / "d"), "--sampler", "dopri5",
                 "--steps", "1", "--sampler-option", "rtol=1e-3"]) == 0
    assert json.loads((tmp_path / "d" / "set.json").read_text())["sampler_options"] == {"rtol": 1e-3, "atol": 1e-5}


def test_synth_records_the_options_and_instances_refuse_them(run, tmp_path, capsys):
    base = ["synth", "--ckpt", str(run), "--per-caption", "2", "--n", "4"]
    assert main([*base, "--captions", "classes", "--out", str(tmp_path / "c"), *SIT, *FLAGS]) == 0
    assert json.loads((tmp_path / "c" / "set.json").read_text())["sampler_options"] == OPTIONS
    capsys.readouterr()
    argv = [*base, "--captions", "variations", "--out", str(tmp_path / "i"), "--sampler", "sde", "--steps", "4",
            "--sampler-option", "diffusion_norm=0.5"]
    assert main(argv) == 2
    one_line_error(capsys, "--sampler-option diffusion_norm", "--captions variations")
    assert not (tmp_path / "i").exists()


def test_a_value_the_sampler_refuses_is_one_line_before_any_work(run, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^--sampler-option last_step=mode: the sit_sde sampler refuses it: unknown last_step 'mode'"):
        parse_sampler_options(["last_step=mode"], "sit_sde", steps=4)
    assert parse_sampler_options(["last_step=mode"], "sit_sde") == {"last_step": "mode"}  # keys only without steps
    out = tmp_path / "set"
    assert main(["generate-set", "--ckpt", str(run), "--n", "2", "--out", str(out), *SIT, "--sampler-option", "last_step_size=1.5"]) == 2
    one_line_error(capsys, "--sampler-option last_step_size=1.5", "last_step_size must lie in (0, 1.0)")
    assert not out.exists()
