"""Bad configs fail before training, naming the key and the value."""
from pathlib import Path

import pytest

from selfflow.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_load():
    config = load_config(None)
    assert config.train.steps > 0 and config.method_name() == "flow_matching"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    import yaml

    from selfflow.config import load_pipeline_config

    if "pipeline" in (yaml.safe_load(path.read_text()) or {}):  # a `selfflow pipeline` config
        load_pipeline_config(path)
    else:
        load_config(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  stepz: 10\n", "train.stepz"),
        ("train:\n  steps: ten\n", "train.steps: expected an integer, got 'ten'"),
        ("train:\n  steps: 0\n", "train.steps must be positive, got 0"),
        ("train:\n  lr: -1\n", "train.lr must be positive"),
        ("model:\n  size: huge\n", "model.size: unknown value 'huge'"),
        ("model:\n  hidden_size: -8\n", "model.hidden_size must be positive"),
        ("model:\n  hidden_size: 100\n  num_heads: 3\n", "not divisible by num_heads"),
        ("method:\n  name: magic\n", "method.name: unknown value 'magic'"),
        ("method:\n  time_distribution: beta\n", "method.time_distribution"),
        ("optimiser:\n  lr: 1\n", "unknown section(s) ['optimiser']"),
        ("train: [1, 2]\n", "train: expected a mapping"),
        ("train:\n  steps: 5\n   lr: 1\n", "malformed YAML"),
        ("train:\n  compile: yes please\n", "train.compile: expected true/false"),
        ("train:\n  batch_size: 10\n  grad_accum: 3\n", "not divisible by grad_accum"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_overrides_are_typed_and_checked():
    config = load_config(None, ["train.lr=3e-4", "train.compile=true", "model.size=S", "data.path=null"])
    assert config.train.lr == 3e-4 and config.train.compile is True and config.model.size == "S"
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(None, ["train.nope=1"])
    with pytest.raises(ConfigError, match="section.key"):
        load_config(None, ["lr=1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["train.steps=1.5"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips_through_its_dict():
    from selfflow.config import config_from_dict

    config = load_config(None, ["train.steps=7"])
    again = config_from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
