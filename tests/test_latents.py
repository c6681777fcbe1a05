"""Latent data: encode with a local autoencoder, train and sample on the latents, read .npy latents.

The autoencoder here is a small one the test trains on the digits in a second. The diffusers path
is checked twice: against a stand-in with AutoencoderKL's interface (scale, shift, the load options),
and with a real, randomly initialised AutoencoderKL saved by diffusers itself (diffusers is the
optional `latents` extra; the `dev` extra installs it, so CI runs these tests).
"""
import json
import sys
import types

import numpy as np
import pytest
import torch

from selfflow.cli import main
from selfflow.data import DataError, load_dataset
from selfflow.autoencoders import DiffusersAutoencoder, SmallAutoencoderConfig, load_autoencoder, train_small_autoencoder
from selfflow.data import LatentDataset, load_latents
from selfflow.latents import encode_dataset
from selfflow.shards import ShardSet


@pytest.fixture(scope="module")
def autoencoder_dir(tmp_path_factory):
    digits = load_dataset("digits", split="train")
    model = train_small_autoencoder(digits, SmallAutoencoderConfig(in_channels=1, latent_channels=4, width=16, downsample=2),
                                    steps=30, batch_size=32)
    return model.save_pretrained(tmp_path_factory.mktemp("ae") / "autoencoder")


@pytest.fixture(scope="module")
def latent_set(autoencoder_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "digits"
    code = main(["encode-latents", "--data", "digits", "--autoencoder", str(autoencoder_dir), "--out", str(out),
                 "--shard-size", "400", "--batch-size", "128", "--device", "cpu"])
    assert code == 0
    return out


def test_encoded_set_has_the_data_labels_and_the_autoencoder_record(latent_set, autoencoder_dir):
    dataset = load_dataset("latents", path=str(latent_set))
    digits = load_dataset("digits", split="train")
    assert isinstance(dataset, LatentDataset) and len(dataset) == len(digits) == 1500
    assert dataset.shape == (4, 4, 4) and dataset.num_classes == 10
    latents, labels = dataset.get_batch(torch.tensor([0, 1499, 401]))
    assert latents.dtype == torch.float32 and torch.equal(labels, digits.labels[[0, 1499, 401]])
    autoencoder = load_autoencoder(autoencoder_dir)
    with torch.no_grad():
        expected, _ = autoencoder.encode(digits.get_batch([401])[0])
    torch.testing.assert_close(latents[2:], expected)
    record = json.loads((latent_set / "set.json").read_text())
    assert record["kind"] == "latents" and record["autoencoder"]["kind"] == "small" and len(record["autoencoder"]["sha256"]) == 64


def test_encoding_resumes_to_identical_shards(latent_set, autoencoder_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(latent_set, copy)
    (copy / "shard_00002.safetensors").unlink()
    with pytest.raises(DataError, match="incomplete"):
        load_latents(copy)
    args = ["encode-latents", "--data", "digits", "--autoencoder", str(autoencoder_dir), "--out", str(copy),
            "--shard-size", "400", "--batch-size", "128", "--device", "cpu"]
    assert main(args) == 0
    assert (copy / "shard_00002.safetensors").read_bytes() == (latent_set / "shard_00002.safetensors").read_bytes()
    assert main([*args[:-4], "--shard-size", "300", "--device", "cpu"]) == 2  # another layout: refused


def test_posterior_samples_do_not_depend_on_the_batch(autoencoder_dir, tmp_path, capsys):
    digits = load_dataset("digits", split="train").subset(range(20))
    autoencoder = load_autoencoder(autoencoder_dir)
    a = encode_dataset(digits, autoencoder, tmp_path / "a", shard_size=20, batch_size=7, posterior="sample", seed=5, progress=True)
    bar = capsys.readouterr().err
    assert "encoding latents" in bar and "20/20" in bar and "img/s" in bar
    b = encode_dataset(digits, autoencoder, tmp_path / "b", shard_size=20, batch_size=20, posterior="sample", seed=5)
    mean = encode_dataset(digits, autoencoder, tmp_path / "m", shard_size=20, posterior="mean")
    first, second, means = (s.read_all()["latents"] for s in (a, b, mean))
    torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, means)


def test_train_and_sample_on_latents(latent_set, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--set", "data.name=latents", "--set", f"data.path={latent_set}", "--set", "model.depth=2",
            "--set", "model.hidden_size=64", "--set", "train.steps=2", "--set", "train.batch_size=16", "--set", f"train.out_dir={run}",
            "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "train.num_sample_images=4",
            "--set", "sample.steps=2", "--set", "train.device=cpu"]
    assert main(args) == 0
    assert (run / "samples" / "step_0000002.png").is_file() and (run / "samples" / "step_0000002.safetensors").is_file()
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(run), "--n", "3", "--out", str(out), "--steps", "2", "--device", "cpu"]) == 0
    assert {p.name for p in out.iterdir()} == {"latents.safetensors", "grid.png", "samples.npz", "samples.json", ".selfflow-output.json"}
    assert np.load(out / "samples.npz")["images"].shape == (3, 1, 8, 8)


def test_latent_samples_are_not_clipped():
    """A model that predicts v = 0 leaves each item at its seed's noise, values beyond ±1 included."""
    from selfflow.config import ModelConfig
    from selfflow.model import DiT
    from selfflow.sampling import generate, noise_for_seeds

    model = DiT(ModelConfig(size="tiny", depth=1, hidden_size=32, num_heads=2, image_size=4, in_channels=4, num_classes=3))
    options = dict(num_samples=3, seeds=[7, 8, 9], labels=torch.tensor([0, 1, 2]), steps=3, batch_size=2, image_shape=(4, 4, 4),
                   progress=False)
    latents = generate(model, clip=False, **options).images
    noise = noise_for_seeds([7, 8, 9], (4, 4, 4))
    assert torch.equal(latents, noise) and latents.abs().max() > 1
    assert torch.equal(generate(model, **options).images, noise.clamp(-1, 1))  # pixels are clipped


def test_npy_latents_and_nan(tmp_path, capsys):
    folder = tmp_path / "npy"
    folder.mkdir()
    latents = np.random.default_rng(0).standard_normal((40, 4, 4, 4)).astype(np.float16)
    np.save(folder / "latents_000.npy", latents[:30])
    np.save(folder / "latents_001.npy", latents[30:])
    np.save(folder / "labels_000.npy", np.arange(30) % 5)
    np.save(folder / "labels_001.npy", np.arange(10) % 5)
    (folder / "meta.json").write_text(json.dumps({"num_classes": 6}))
    dataset = load_latents(folder)
    assert len(dataset) == 40 and dataset.num_classes == 6 and dataset.channels == 4
    batch, labels = dataset.get_batch([35, 2])
    assert torch.equal(batch, torch.from_numpy(latents[[35, 2]].astype(np.float32))) and labels.tolist() == [0, 2]

    latents[33, 1, 2, 3] = np.nan
    np.save(folder / "latents_001.npy", latents[30:])
    with pytest.raises(DataError, match=r"latents_001\.npy: NaN or infinite value in row 3"):
        load_latents(folder)
    code = main(["train", "--set", "data.name=latents", "--set", f"data.path={folder}", "--set", f"train.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "latents_001.npy" in err and "Traceback" not in err


def test_truncated_latent_shard_is_refused(latent_set, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(latent_set, copy)
    shard = copy / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"shard_00001\.safetensors: not a readable safetensors shard"):
        load_latents(copy)


def test_diffusers_autoencoder_adapter(tmp_path, monkeypatch):
    """The AutoencoderKL path: local files only, safetensors only, scale and shift applied both ways."""
    calls = {}

    class Posterior:
        def __init__(self, mean):
            self.mean, self.std = mean, torch.full_like(mean, 0.5)

    class FakeVAE(torch.nn.Module):
        dtype = torch.float32

        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(scaling_factor=0.25, shift_factor=0.1, latent_channels=4, in_channels=3,
                                                block_out_channels=[8, 8, 8, 8])

        @classmethod
        def from_pretrained(cls, path, **options):
            calls.update(options, path=path)
            return cls()

        def encode(self, x):  # (B, 3, H, W) -> latents (B, 4, H/8, W/8)
            return types.SimpleNamespace(latent_dist=Posterior(torch.nn.functional.avg_pool2d(x, 8).repeat(1, 2, 1, 1)[:, :4]))

        def decode(self, z):
            return types.SimpleNamespace(sample=torch.nn.functional.interpolate(z[:, :3], scale_factor=8))

    monkeypatch.setitem(sys.modules, "diffusers", types.SimpleNamespace(AutoencoderKL=FakeVAE))
    folder = tmp_path / "sd-vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    vae = load_autoencoder(folder)
    assert isinstance(vae, DiffusersAutoencoder)
    assert calls["local_files_only"] is True and calls["use_safetensors"] is True
    assert vae.downsample == 8 and vae.latent_channels == 4
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = vae.encode(x)
    raw = torch.nn.functional.avg_pool2d(x, 8).repeat(1, 2, 1, 1)[:, :4]
    torch.testing.assert_close(mean, (raw - 0.1) * 0.25)
    torch.testing.assert_close(std, torch.full_like(mean, 0.125))
    torch.testing.assert_close(vae.decode(mean), torch.nn.functional.interpolate(raw[:, :3], scale_factor=8))
    assert vae.describe()["scaling_factor"] == 0.25


def test_missing_diffusers_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(DataError, match=r"selfflow\[latents\]"):
        load_autoencoder(tmp_path)


# --------------------------------------------------------------------------------------------
# a real diffusers AutoencoderKL (when the `latents` extra is installed; the dev extra installs it)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_vae_dir(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=8,
        scaling_factor=0.5, shift_factor=0.1,
    )
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(folder, safe_serialization=True)
    return folder, vae.eval()


def test_a_real_autoencoderkl_folder_encodes_trains_and_decodes(real_vae_dir, tmp_path):
    folder, reference = real_vae_dir
    vae = load_autoencoder(folder)
    assert isinstance(vae, DiffusersAutoencoder) and vae.downsample == 2 and vae.latent_channels == 4
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        posterior = reference.encode(x).latent_dist
        mean, std = vae.encode(x)
        torch.testing.assert_close(mean, (posterior.mean - 0.1) * 0.5)
        torch.testing.assert_close(std, posterior.std * 0.5)
        torch.testing.assert_close(vae.decode(mean), reference.decode(posterior.mean).sample)
    assert vae.describe()["sha256"] is not None

    latents = tmp_path / "latents"
    assert main(["encode-latents", "--data", "digits", "--autoencoder", str(folder), "--out", str(latents),
                 "--shard-size", "1000", "--batch-size", "256", "--device", "cpu"]) == 0
    dataset = load_dataset("latents", path=str(latents))
    assert tuple(dataset.get_batch(torch.arange(2))[0].shape) == (2, 4, 4, 4)  # 8×8 digits → 4 × 4×4 latents
    run = tmp_path / "run"
    assert main(["train", "--set", "data.name=latents", "--set", f"data.path={latents}", "--set", "model.depth=2",
                 "--set", "model.hidden_size=64", "--set", "model.patch_size=1", "--set", "train.steps=2", "--set", "train.batch_size=16",
                 "--set", f"train.out_dir={run}", "--set", "train.progress=false", "--set", "train.tensorboard=false",
                 "--set", "train.num_sample_images=0", "--set", "train.device=cpu"]) == 0
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(run), "--n", "2", "--out", str(out), "--steps", "2", "--device", "cpu"]) == 0
    assert np.load(out / "samples.npz")["images"].shape == (2, 1, 8, 8)  # decoded by the AutoencoderKL


def test_an_autoencoderkl_with_pickled_weights_is_refused_unopened(real_vae_dir, tmp_path, capsys):
    """Only safetensors are read: a folder whose weights are a pickle is an error, and the pickle never runs."""
    folder, _ = real_vae_dir
    bad = tmp_path / "pickled-vae"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle
    (bad / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(DataError, match="cannot load the AutoencoderKL"):
        load_autoencoder(bad)
    assert main(["encode-latents", "--data", "digits", "--autoencoder", str(bad), "--out", str(tmp_path / "z"), "--device", "cpu"]) == 2
    assert "cannot load the AutoencoderKL" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "z").exists()


def test_latent_pairs_are_the_raw_ode_output(latent_set, tmp_path, capsys):
    """generate-set --kind pairs on a latent model stores the solver's x0 unclipped (|x| > 1 kept), set.json says so;
    a sampler that injects noise is refused in one line, exit 2, before anything is written."""
    from selfflow.model import load_generator
    from selfflow.sampling import generate

    run = tmp_path / "run"
    assert main(["train", "--set", "data.name=latents", "--set", f"data.path={latent_set}", "--set", "model.depth=1",
                 "--set", "model.hidden_size=32", "--set", "model.num_heads=2", "--set", "train.steps=1", "--set", "train.lr=1e-12",
                 "--set", "train.batch_size=8", "--set", f"train.out_dir={run}", "--set", "train.progress=false",
                 "--set", "train.tensorboard=false", "--set", "train.num_sample_images=0", "--set", "train.device=cpu"]) == 0
    pairs = tmp_path / "pairs"
    assert main(["generate-set", "--ckpt", str(run), "--out", str(pairs), "--kind", "pairs", "--n", "6", "--shard-size", "4",
                 "--sampler", "heun", "--steps", "3", "--device", "cpu"]) == 0
    manifest = json.loads((pairs / "set.json").read_text())
    assert manifest["clipped"] is False
    stored = ShardSet.open(pairs).read_all()
    model, _ = load_generator(run)  # v ≈ 0 (lr 1e-12): x0 ≈ ε, beyond ±1
    expected = generate(model, num_samples=6, seeds=list(range(6)), sampler="heun", steps=3, batch_size=4, clip=False,
                        image_shape=tuple(stored["samples"].shape[1:]), progress=False).images
    assert stored["samples"].abs().max() > 1.5
    torch.testing.assert_close(stored["samples"], expected, rtol=0, atol=1e-6)
    capsys.readouterr()
    for sampler in ("sde", "sit_sde"):
        refused = tmp_path / f"refused_{sampler}"
        assert main(["generate-set", "--ckpt", str(run), "--out", str(refused), "--kind", "pairs", "--n", "4",
                     "--sampler", sampler, "--steps", "3", "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and sampler in err[0] and "deterministic" in err[0]
        assert not refused.exists()
