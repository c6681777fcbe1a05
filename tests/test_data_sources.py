"""Streamed image sets (folder, WebDataset, Hugging Face datasets), the crops, the loader's workers.

Every set here is made by the test itself from the bundled digits (8×8 grey, 10 classes).
"""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from selfflow import checkpoint as ckpt
from selfflow.cli import main
from selfflow.data import BatchLoader, IndexStream, load_dataset
from selfflow.data.preprocess import center_crop, prepare_image, random_crop
from selfflow.errors import DataError
from support import fit, fit_phases, free_port, join_as_rank, leave_process_group_env, one_line_error, spawn_ranks, tiny_run


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))


def digits(count=40):
    data = load_dataset("digits", split="train")
    return data.images[:count, 0].numpy(), data.labels[:count].numpy()


def png_bytes(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(root, count=40):
    images, labels = digits(count)
    for k, (image, label) in enumerate(zip(images, labels)):
        (root / f"class_{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / f"class_{label}" / f"{k:04d}.png")
    return root


def make_shards(folder, count=40, per_shard=16, label_ext="cls"):
    images, labels = digits(count)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(0, count, per_shard):
        with tarfile.open(folder / f"shard-{shard // per_shard:04d}.tar", "w") as archive:
            for k in range(shard, min(shard + per_shard, count)):
                for ext, payload in (("png", png_bytes(images[k])), (label_ext, str(int(labels[k])).encode())):
                    info = tarfile.TarInfo(f"sample{k:05d}.{ext}")
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
    return folder


def make_hf(folder, count=40):
    datasets = pytest.importorskip("datasets")
    images, labels = digits(count)
    features = datasets.Features({"picture": datasets.Image(), "digit": datasets.ClassLabel(names=[str(k) for k in range(10)])})
    table = datasets.Dataset.from_dict({"picture": [Image.fromarray(a) for a in images], "digit": labels.tolist()}, features=features)
    table.save_to_disk(str(folder))
    return folder


# ---- the crops, by hand ---------------------------------------------------------------------------
def test_center_crop_is_adms_box_halving_then_centre_window():
    """A 9×20 (W×H) image to 4: the short side 9 ≥ 8, so one box halving to 4×10 (each output row the
    mean of rows 2k, 2k+1), then no bicubic change (short side already 4), then rows (10−4)//2 = 3 … 6.
    Rows hold 10·r, so halved row k is 10·(2k) + 5 = 20k + 5 and the crop is rows 65, 85, 105, 125."""
    image = np.repeat((10 * np.arange(20, dtype=np.uint8))[:, None], 9, axis=1)
    out = center_crop(Image.fromarray(image), 4)
    assert out.shape == (4, 4)
    assert out[:, 0].tolist() == [65, 85, 105, 125] and (out == out[:, :1]).all()

    # Columns instead: an 8×4 image to 2, value 10·c + 40·r: one halving to 4×2 (2×2 block means), the
    # short side is then 2 (no resize), the window starts at column (4 − 2)//2 = 1: blocks 1 and 2.
    image = (10 * np.arange(8)[None, :] + 40 * np.arange(4)[:, None]).astype(np.uint8)
    out = center_crop(Image.fromarray(image), 2)
    # block (row pair 0, columns 2-3): (20 + 30 + 60 + 70)/4 = 45; columns 4-5: 65; row pair 1 adds 80.
    assert out.tolist() == [[45, 65], [125, 145]]


def test_center_crop_bicubic_step_sizes_the_short_side():
    """5×3 to 2: 3 < 4 so no halving; bicubic to (round(5·2/3), 2) = (3, 2); window at column 0.
    A constant image stays constant through bicubic (its weights sum to one)."""
    out = center_crop(Image.fromarray(np.full((3, 5, 3), 77, np.uint8)), 2)
    assert out.shape == (2, 2, 3) and (out == 77).all()


def test_random_crop_is_drawn_from_the_seed_and_flips():
    image = np.repeat((10 * np.arange(20, dtype=np.uint8))[None, :], 16, axis=0)  # columns hold 10·c
    crops = [random_crop(Image.fromarray(image), 8, np.random.default_rng(seed)) for seed in range(40)]
    assert all(c.shape == (8, 8) for c in crops)
    again = random_crop(Image.fromarray(image), 8, np.random.default_rng(3))
    assert np.array_equal(again, crops[3])
    increasing = [bool(c[0, -1] > c[0, 0]) for c in crops]
    assert any(increasing) and not all(increasing)  # some mirrored, some not
    assert len({c.tobytes() for c in crops}) > 5  # sizes and offsets vary


def test_resize_squashes_and_prepare_image_returns_chw():
    picture = Image.fromarray(np.zeros((6, 12, 3), np.uint8))
    assert prepare_image(picture, 4, "resize", 3).shape == (3, 4, 4)
    assert prepare_image(picture, 4, "center", 1).shape == (1, 4, 4)
    assert prepare_image(picture, None, "center", 3).shape == (3, 6, 12)


# ---- the folder source ----------------------------------------------------------------------------
def test_folder_is_listed_once_and_decoded_per_batch(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "set")
    data = load_dataset("folder", root)
    images, labels = digits()
    order = np.argsort(labels, kind="stable")  # class folders in order, files sorted within
    assert data.shape == (1, 8, 8) and len(data) == 40 and data.num_classes == 10
    assert data.labels.tolist() == labels[order].tolist()
    assert torch.equal(data.images[:, 0], torch.from_numpy(images[order]))
    x, y = data.get_batch([3, 0])
    assert torch.equal(x, data.images[[3, 0]].float() / 127.5 - 1) and y.tolist() == data.labels[[3, 0]].tolist()

    from selfflow.data import source

    opened = []
    real = source._header
    monkeypatch.setattr(source, "_header", lambda opener, name: opened.append(name) or real(opener, name))
    load_dataset("folder", root)
    assert opened == []  # the cached index: no image opened again
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "class_1" / "new.png")
    assert len(load_dataset("folder", root)) == 41 and len(opened) == 41  # a changed folder is listed again


def test_folder_of_mixed_sizes_needs_image_size_and_crops(tmp_path):
    root = make_folder(tmp_path / "set", 10)
    Image.fromarray(np.full((16, 24), 200, np.uint8)).save(root / "class_0" / "wide.png")
    with pytest.raises(DataError, match=r"wide\.png: size 24x16 \(WxH\) differs .*image_size"):
        load_dataset("folder", root)
    data = load_dataset("folder", root, image_size=8)
    wide = data.get_batch([1])[0]  # class_0 holds 0000.png then wide.png
    assert wide.shape == (1, 1, 8, 8) and torch.allclose(wide, torch.full_like(wide, 200 / 127.5 - 1))


def test_bad_images_are_named_then_refused_or_skipped(tmp_path, caplog):
    root = make_folder(tmp_path / "set", 20)
    (root / "class_3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"broken\.png: cannot read image.*on_bad_image=skip"):
        load_dataset("folder", root)
    data = load_dataset("folder", root, on_bad_image="skip")
    assert len(data) == 20 and "broken.png" in caplog.text

    # A file whose header reads but whose pixels do not: found when its batch is decoded.
    good = root / "class_5" / "late.png"
    payload = png_bytes(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8))  # noise: no compression
    good.write_bytes(payload[:len(payload) - 40])
    lenient = load_dataset("folder", root, on_bad_image="skip")
    row = [k for k in range(len(lenient)) if lenient._name(k).endswith("late.png")][0]
    x, y = lenient.get_batch([row])
    assert torch.equal(x, lenient.get_batch([row + 1])[0]) and "late.png" in caplog.text  # the next image instead
    (root / "class_3" / "broken.png").unlink()
    strict = load_dataset("folder", root)
    with pytest.raises(DataError, match=r"late\.png: cannot read image"):
        strict.get_batch([row])


# ---- the loader: workers, ranks, resume ----------------------------------------------------------
def test_loader_workers_ranks_and_resume_give_the_same_batches(tmp_path):
    data = load_dataset("folder", make_folder(tmp_path / "set"), image_size=8, crop="random")

    def batches(loader, count):
        return [loader.next_batch() for _ in range(count)]

    single = batches(BatchLoader(data, IndexStream(len(data), 8, seed=1), num_workers=0), 7)
    worked = batches(BatchLoader(data, IndexStream(len(data), 8, seed=1), num_workers=2), 7)
    for (i0, x0, y0), (i1, x1, y1) in zip(single, worked):
        assert torch.equal(i0, i1) and torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(single[0][1], data.decode(single[0][0])[0])  # random crops really drawn

    ranks = [BatchLoader(data, IndexStream(len(data), 8, seed=1, rank=r, world_size=2), num_workers=1) for r in (0, 1)]
    for step in range(7):
        halves = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([h[0] for h in halves]), single[step][0])  # distinct slices, the global batch
        assert torch.equal(torch.cat([h[1] for h in halves]), single[step][1])  # and the same crops

    stream = IndexStream(len(data), 8, seed=1)
    loader = BatchLoader(data, stream, num_workers=2)
    batches(loader, 3)
    state = stream.state_dict()
    batches(loader, 2)
    stream.load_state_dict(state)  # a checkpoint loaded: the workers restart from there
    for (i0, x0, _), (i1, x1, _) in zip(single[3:], batches(loader, 4)):
        assert torch.equal(i0, i1) and torch.equal(x0, x1)
    loader.close()


def _weights(out):
    return ckpt.load_tensors(ckpt.latest_checkpoint(out / "checkpoints") / "model.safetensors")


def _data_section(kind, path):
    columns = {"image_column": "picture", "label_column": "digit"} if kind == "hf" else {}
    return {"name": kind, "path": str(path), "image_size": 8, "crop": "random", **columns}


@pytest.mark.parametrize("kind", ["folder", "webdataset", "hf"])
def test_streamed_sets_train_and_resume_exactly(tmp_path, kind):
    path = {"folder": make_folder, "webdataset": make_shards, "hf": make_hf}[kind](tmp_path / "set")
    data = _data_section(kind, path)
    straight = fit(tiny_run(tmp_path / "straight", data=data, train={"steps": 4, "num_workers": 2, "ckpt_every": 2}))
    assert straight.dataset.num_classes == 10 and len(straight.dataset) == 40
    first = tiny_run(tmp_path / "resumed", data=data, train={"steps": 2, "num_workers": 0, "ckpt_every": 2})
    fit(first)
    fit({**first, "train": {**first["train"], "steps": 4, "num_workers": 1}})
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_webdataset_and_hf_shard_across_two_processes(tmp_path):
    """Each set trained by 2 gloo processes (each reading its half of every batch, 1 decoding worker each) ends
    where one process ends; both sets in one spawn, one process group each (support.fit_phases)."""
    phases = []
    for kind, make in (("webdataset", make_shards), ("hf", make_hf)):
        data = _data_section(kind, make(tmp_path / kind))
        one = tiny_run(tmp_path / f"one_{kind}", data=data, train={"steps": 3, "warmup_steps": 1})
        threads = torch.get_num_threads()
        try:
            join_as_rank(0, 1, free_port())
            fit(one)
            leave_process_group_env()
        finally:
            torch.set_num_threads(threads)
        phases.append((free_port(), tiny_run(tmp_path / f"two_{kind}", data=data,
                                             train={"steps": 3, "warmup_steps": 1, "num_workers": 1})))
    spawn_ranks(fit_phases, 2, 2, phases)
    for kind in ("webdataset", "hf"):
        one, two = _weights(tmp_path / f"one_{kind}"), _weights(tmp_path / f"two_{kind}")
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=f"{kind}: {key}")


# ---- formats: what they hold, and bad ones ----------------------------------------------------------
def test_webdataset_and_hf_hold_the_same_images_as_the_folder(tmp_path):
    images, labels = digits()
    shards = load_dataset("webdataset", make_shards(tmp_path / "wds"))
    assert len(shards.reader.shards) == 3 and shards.labels.tolist() == labels.tolist()
    assert torch.equal(shards.images[:, 0], torch.from_numpy(images))
    hf = load_dataset("hf", make_hf(tmp_path / "hf"), image_column="picture", label_column="digit")
    assert hf.class_names == [str(k) for k in range(10)] and hf.labels.tolist() == labels.tolist()
    assert torch.equal(hf.images[:, 0], torch.from_numpy(images))

    datasets = pytest.importorskip("datasets")
    table = datasets.load_from_disk(str(tmp_path / "hf"))
    table.to_parquet(str(tmp_path / "parquet" / "train-00000.parquet"))
    parquet = load_dataset("hf", tmp_path / "parquet", image_column="picture", label_column="digit")
    assert torch.equal(parquet.images, hf.images) and parquet.labels.tolist() == labels.tolist()


def _train_cli(out, *overrides):
    return main(["train", "--set", "model.depth=2", "--set", "model.hidden_size=64", "--set", "train.steps=1",
                 "--set", "train.batch_size=8", "--set", "train.device=cpu", "--set", "train.progress=false",
                 "--set", f"train.out_dir={out}", *[a for o in overrides for a in ("--set", o)]])


def test_a_tar_shard_cut_mid_file_is_one_line_and_exit_2(tmp_path, capsys):
    folder = make_shards(tmp_path / "wds")
    shard = folder / "shard-0001.tar"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:len(whole) // 2 + 100])
    assert _train_cli(tmp_path / "run", "data.name=webdataset", f"data.path={folder}") == 2
    one_line_error(capsys, "shard-0001.tar", "cut")
    assert shard.read_bytes() == whole[:len(whole) // 2 + 100] and not (tmp_path / "run").exists()


def test_a_missing_dataset_column_is_one_line_and_exit_2(tmp_path, capsys):
    path = make_hf(tmp_path / "hf")
    assert _train_cli(tmp_path / "run", "data.name=hf", f"data.path={path}", "data.image_column=picture",
                      "data.label_column=category") == 2
    one_line_error(capsys, "no column 'category'", "picture", "digit")
    assert _train_cli(tmp_path / "run", "data.name=hf", f"data.path={path}") == 2
    one_line_error(capsys, "no column 'image'", "data.image_column")


def test_streamed_only_keys_are_refused_elsewhere(tmp_path, capsys):
    assert _train_cli(tmp_path / "run", "data.crop=random") == 2
    one_line_error(capsys, "data.crop", "folder | webdataset | hf")
    assert _train_cli(tmp_path / "run", "data.name=folder", f"data.path={tmp_path}", "data.crop=middle") == 2
    one_line_error(capsys, "data.crop", "middle", "center")


def test_eval_reads_a_folder_of_mixed_sizes_with_image_size(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "mixed"
    for k in range(12):
        (root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        height, width = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / f"c{k % 2}" / f"{k}.jpg")
    np.savez(tmp_path / "samples.npz", images=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    common = ["eval", "--samples", str(tmp_path / "samples.npz"), "--data", "folder", "--data-path", str(root),
              "--metrics", "fd_dom", "--train-steps", "2", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert main(common + ["--out", str(tmp_path / "no.json")]) == 2
    one_line_error(capsys, "differs", "--image-size")
    assert main(common + ["--image-size", "32", "--out", str(tmp_path / "eval.json")]) == 0
    assert (tmp_path / "eval.json").is_file()
    assert main(common + ["--image-size", "32", "--crop", "resize", "--out", str(tmp_path / "eval_resize.json")]) == 0


def test_encode_latents_streams_a_folder_and_a_kill_9_resumes_to_identical_shards(tmp_path):
    """encode-latents on a folder (decoded in 2 workers), killed with SIGKILL after its first shard, run
    again: the set equals one made in one go, shard for shard, byte for byte."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from selfflow.autoencoders import SmallAutoencoderConfig, train_small_autoencoder

    model = train_small_autoencoder(load_dataset("digits", split="train"),
                                    SmallAutoencoderConfig(in_channels=1, latent_channels=4, width=16, downsample=2), steps=2, batch_size=16)
    autoencoder = model.save_pretrained(tmp_path / "autoencoder")
    root = make_folder(tmp_path / "set", 300)

    def command(out, workers):
        return [sys.executable, "-m", "selfflow", "encode-latents", "--data", "folder", "--data-path", str(root), "--autoencoder",
                str(autoencoder), "--out", str(out), "--shard-size", "20", "--batch-size", "10", "--device", "cpu",
                "--num-workers", str(workers)]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run(command(tmp_path / "whole", 0), env=env, capture_output=True).returncode == 0
    # Its own process group, killed whole: the decoding workers share the set folder's lock and die with it.
    process = subprocess.Popen(command(tmp_path / "killed", 2), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "shard_00000.safetensors").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(0.5)
    done = sorted(p.name for p in (tmp_path / "killed").glob("shard_*.safetensors"))
    assert 1 <= len(done) < 15  # killed part-way
    again = subprocess.run(command(tmp_path / "killed", 2), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    whole = sorted((tmp_path / "whole").glob("shard_*.safetensors"))
    assert len(whole) == 15
    for shard in whole:
        assert (tmp_path / "killed" / shard.name).read_bytes() == shard.read_bytes(), shard.name
    record = json.loads((tmp_path / "whole" / "set.json").read_text())
    assert record["data"]["crop"] == "center" and record["autoencoder"]["shift_factor"] == 0.0
    assert len(record["autoencoder"]["sha256"]) == 64
