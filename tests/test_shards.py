"""Shard sets (selfflow.shards) and generated sets (selfflow.sets): atomic shards, resumable generation,
the same set whatever the interruptions."""
import errno
import json
import os

import pytest
import torch

from selfflow import sets, shards
from selfflow.config import ModelConfig
from selfflow.model import DiT


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = DiT(ModelConfig(size="tiny", depth=2, hidden_size=32, num_heads=2, image_size=8, in_channels=1, num_classes=10))
    with torch.no_grad():  # leave adaLN-Zero's identity start, so samples differ from noise
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def test_shards_round_trip_and_refuse_an_unfinished_set(tmp_path):
    layout = shards.ShardSet.create_or_resume(tmp_path / "set", {"kind": "images", "num": 5, "shard_size": 2})
    assert layout.num_shards == 3 and layout.item_range(2) == (4, 5)
    layout.write(0, {"x": torch.arange(2)})
    layout.write(2, {"x": torch.arange(4, 5)})
    with pytest.raises(shards.ShardError, match=r"incomplete \(1 of 3 shards missing: shard_00001"):
        layout.read_all()
    layout.write(1, {"x": torch.arange(2, 4)})
    assert torch.equal(shards.ShardSet.open(tmp_path / "set").read_all()["x"], torch.arange(5))
    with pytest.raises(ValueError, match="expected 2 items"):
        layout.write(1, {"x": torch.arange(3)})


def test_a_different_set_in_the_same_folder_is_refused(tmp_path):
    shards.ShardSet.create_or_resume(tmp_path, {"kind": "images", "num": 4, "shard_size": 2, "seed": 0})
    with pytest.raises(shards.ShardError, match="holds a different set .*seed"):
        shards.ShardSet.create_or_resume(tmp_path, {"kind": "images", "num": 4, "shard_size": 2, "seed": 1})


def test_a_failed_write_leaves_no_shard_and_no_temporary(tmp_path, monkeypatch):
    layout = shards.ShardSet.create_or_resume(tmp_path, {"kind": "images", "num": 2, "shard_size": 2})

    def full(path, data):
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards, "write_bytes", full)
    with pytest.raises(shards.ShardError, match="shard_00000.safetensors: No space left on device"):
        layout.write(0, {"x": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.json"]


def test_resumed_generation_equals_uninterrupted(model, tmp_path):
    options = dict(num=10, shard_size=4, seed=100, sampler="euler", steps=3, batch_size=3)
    whole = sets.generate_set(model, tmp_path / "whole", **options)
    part = sets.generate_set(model, tmp_path / "part", **options)
    (tmp_path / "part" / "shard_00001.safetensors").unlink()
    left = [".shard_00001.safetensors.tmp-deadbeef", ".set.json.tmp-0123abcd", ".tmpAb12Cd"]  # ours, and old safetensors'
    for name in left:
        (tmp_path / "part" / name).write_bytes(b"left by a crash")
    (tmp_path / "part" / "notes.txt").write_text("a user's file stays")
    written = []
    sets.generate_set(model, tmp_path / "part", **options, on_shard=lambda i, p: written.append(i))
    assert written == [1]
    assert sorted(p.name for p in (tmp_path / "part").iterdir()) == sorted([p.name for p in (tmp_path / "whole").iterdir()] + ["notes.txt"])
    for name in ("shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors", "set.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "part" / name).read_bytes()
    data = whole.read_all()
    assert data["images"].dtype == torch.uint8 and data["images"].shape == (10, 1, 8, 8)
    assert data["seeds"].tolist() == list(range(100, 110)) and data["labels"].tolist() == [s % 10 for s in range(100, 110)]
    assert part.read_all().keys() == data.keys()


def test_pairs_hold_each_seeds_noise_and_its_sample(model, tmp_path):
    from selfflow.sampling import generate, noise_for_seeds

    pairs = sets.generate_set(model, tmp_path, num=5, shard_size=5, kind="pairs", seed=7, steps=2, labels=[3])
    data = pairs.read_all()
    assert torch.equal(data["noise"], noise_for_seeds(range(7, 12), (1, 8, 8)))
    reference = generate(model, num_samples=5, seeds=range(7, 12), labels=torch.full((5,), 3), steps=2, image_shape=(1, 8, 8), progress=False)
    assert torch.equal(data["samples"], reference.images) and data["labels"].tolist() == [3] * 5
    assert json.loads((tmp_path / "set.json").read_text())["kind"] == "pairs"


def test_generate_set_command(model, tmp_path, capsys):
    from selfflow.cli import main

    model.save_pretrained(tmp_path / "model")
    args = ["generate-set", "--ckpt", str(tmp_path / "model"), "--out", str(tmp_path / "set"), "--n", "6", "--shard-size", "4",
            "--steps", "2", "--labels", "1,2", "--device", "cpu"]
    assert main(args) == 0
    assert "set complete" in capsys.readouterr().out
    data = shards.ShardSet.open(tmp_path / "set").read_all()
    assert data["labels"].tolist() == [1, 2, 1, 2, 1, 2]
    assert main(args) == 0 and "wrote" not in capsys.readouterr().out  # nothing left to do
    assert main([*args[:-4], "--labels", "12", "--device", "cpu"]) == 2


def test_generated_images_are_the_samples_in_uint8(model, tmp_path, capsys):
    from selfflow.imageio import to_uint8
    from selfflow.sampling import generate

    data = sets.generate_set(model, tmp_path, num=6, shard_size=4, seed=2, steps=2, progress=True).read_all()
    reference = generate(model, num_samples=6, seeds=range(2, 8), steps=2, image_shape=(1, 8, 8), progress=False)
    assert torch.equal(data["images"], to_uint8(reference.images))
    assert torch.equal(data["images"], ((reference.images + 1) * 127.5).round().to(torch.uint8))
    bar = capsys.readouterr().err
    assert "generating images" in bar and "6/6" in bar and "img/s" in bar


def test_to_uint8_and_back():
    from selfflow.imageio import to_uint8, uint8_to_float

    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 64, 128, 255, 255, 255]  # 63.75 -> 64, 127.5 -> 128 (half to even)
    pixels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(uint8_to_float(pixels)), pixels)
    assert uint8_to_float(pixels)[[0, 255]].tolist() == [-1.0, 1.0]
