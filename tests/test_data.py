"""Tests for selfflow.data: loaders (digits, IDX sets named and generic, folders, npz), validation
errors, the index stream, and verified downloads from a local HTTP server."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import shutil
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from support import LOCAL_MNIST
import torch
from PIL import Image

from selfflow.data import (MNIST_SHA256, NAMED_SETS, DataError, ImageDataset, IndexStream, load_dataset,
                           load_mnist, read_idx)
from selfflow.data import fetch as data_fetch
from selfflow.data.idx import NamedSet

SHARED_MNIST = LOCAL_MNIST  # .carry/mnist or $SELFFLOW_MNIST (tests/support.py)
needs_mnist = pytest.mark.skipif(
    not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="no local MNIST copy (.carry/mnist or $SELFFLOW_MNIST)")


# ------------------------------------------------------------------ helpers

def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format (magic 0x0000 08 <ndim>, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_mnist_blobs(n_train: int = 6, n_test: int = 4) -> dict[str, bytes]:
    """Tiny MNIST-shaped IDX files (4x4 images) keyed by stem."""
    rng = np.random.default_rng(0)
    return {
        "train-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n_train, 4, 4))),
        "train-labels-idx1-ubyte": idx_bytes(np.arange(n_train) % 10),
        "t10k-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n_test, 4, 4))),
        "t10k-labels-idx1-ubyte": idx_bytes(np.arange(n_test) % 10),
    }


def hashes_of(blobs: dict[str, bytes]) -> dict[str, str]:
    return {stem: hashlib.sha256(blob).hexdigest() for stem, blob in blobs.items()}


def write_png(file: Path, array: np.ndarray) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(file)


# ------------------------------------------------------------------ digits

def test_digits_splits_shapes_and_range():
    train = load_dataset("digits")
    test = load_dataset("digits", split="test")
    full = load_dataset("digits", split="all")
    assert (len(train), len(test), len(full)) == (1500, 297, 1797)
    assert train.images.dtype == torch.uint8 and train.shape == (1, 8, 8)
    assert train.image_size == 8 and train.channels == 1
    assert train.num_classes == 10 and train.null_label == 10
    assert sorted(full.labels.unique().tolist()) == list(range(10))
    assert int(full.images.max()) == 255 and int(full.images.min()) == 0  # 16 -> 255
    assert torch.equal(full.images[1500:], test.images)
    x, y = train.get_batch(torch.arange(32))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert "n=1500" in repr(train)


def test_digits_resize_and_channels():
    data = load_dataset("digits", split="test", image_size=16, channels=3)
    assert data.shape == (3, 16, 16)
    assert torch.equal(data.images[:, 0], data.images[:, 2])  # grey repeated
    x, _ = data.get_batch([0, 1])
    assert x.shape == (2, 3, 16, 16) and -1.0 <= float(x.min()) <= float(x.max()) <= 1.0


def test_unknown_name_split_and_arguments():
    with pytest.raises(DataError, match="known: digits, mnist, fashion-mnist, idx, folder, npz"):
        load_dataset("cifar")
    with pytest.raises(DataError, match="unknown split 'val'"):
        load_dataset("digits", split="val")
    with pytest.raises(DataError, match="channels"):
        load_dataset("digits", channels=2)
    with pytest.raises(DataError, match="needs a path"):
        load_dataset("mnist")


def test_config_knows_every_data_set_name():
    from selfflow.config import DATA_NAMES
    from selfflow.data import DATASET_NAMES

    assert set(DATA_NAMES) == set(DATASET_NAMES)


def test_image_dataset_validates_and_subsets():
    with pytest.raises(DataError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), 1, "t", "x")
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\)"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), 2,
                     "t", "x")
    data = ImageDataset(torch.zeros(3, 1, 4, 6, dtype=torch.uint8), torch.tensor([0, 1, 1]), 2,
                        "t", "x")
    with pytest.raises(DataError, match="not square"):
        data.image_size
    assert data.subset([2, 0]).labels.tolist() == [1, 0]


# ------------------------------------------------------------------ IDX / MNIST

def test_read_idx_checks_header_and_length():
    blob = idx_bytes(np.arange(24).reshape(2, 3, 4))
    assert read_idx(blob, "x", 3).tolist() == np.arange(24).reshape(2, 3, 4).tolist()
    with pytest.raises(DataError, match="x: truncated: header says 2x3x4"):
        read_idx(blob[:-5], "x")
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx(blob + b"\0", "x")
    with pytest.raises(DataError, match="bad IDX magic"):
        read_idx(b"\x12\x34" + blob[2:], "x")
    with pytest.raises(DataError, match="3 dimensions, expected 1"):
        read_idx(blob, "x", 1)


def test_mnist_format_without_shared_copy(tmp_path):
    blobs = fake_mnist_blobs()
    for stem, blob in blobs.items():
        (tmp_path / f"{stem}.gz").write_bytes(gzip.compress(blob))
    data = load_mnist(tmp_path, "all", sha256=hashes_of(blobs))
    assert len(data) == 10 and data.shape == (1, 4, 4)
    # The original hashes reject these files, naming the file.
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: sha256"):
        load_dataset("mnist", tmp_path, split="test")
    # Label count must match image count.
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3))))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: 3 labels for the 4 images of t10k-images"):
        load_mnist(tmp_path, "test", sha256=None)


@needs_mnist
def test_mnist_shared_copy_loads_and_verifies():
    test = load_dataset("mnist", SHARED_MNIST, split="test")
    assert len(test) == 10000 and test.shape == (1, 28, 28) and test.num_classes == 10
    assert sorted(test.labels.unique().tolist()) == list(range(10))
    counts = torch.bincount(test.labels, minlength=10).tolist()
    assert counts[0] == 980 and counts[1] == 1135  # the known t10k class counts
    full = load_dataset("mnist", SHARED_MNIST, split="all")
    assert len(full) == 70000 and torch.equal(full.labels[60000:], test.labels)
    resized = load_dataset("mnist", SHARED_MNIST, split="test", image_size=32)
    assert resized.shape == (1, 32, 32) and torch.equal(resized.labels, test.labels)
    assert resized.images[:, :, 0].float().mean() < 1  # MNIST's empty border stays empty
    # The project's constants agree with the shared SHA256SUMS file.
    listed = dict(line.split()[::-1] for line in
                  (SHARED_MNIST / "SHA256SUMS.raw").read_text().splitlines() if line.strip())
    assert listed == MNIST_SHA256


@needs_mnist
def test_mnist_raw_files_equal_gzip(tmp_path):
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / stem).write_bytes(gzip.decompress((SHARED_MNIST / f"{stem}.gz").read_bytes()))
    raw = load_dataset("mnist", tmp_path, split="test")
    packed = load_dataset("mnist", SHARED_MNIST, split="test")
    assert torch.equal(raw.images, packed.images) and torch.equal(raw.labels, packed.labels)


@needs_mnist
def test_mnist_corrupt_copies_name_the_file(tmp_path):
    images = "t10k-images-idx3-ubyte"
    labels = "t10k-labels-idx1-ubyte"
    shutil.copy(SHARED_MNIST / f"{images}.gz", tmp_path)
    packed = (SHARED_MNIST / f"{labels}.gz").read_bytes()
    raw = gzip.decompress(packed)

    # Truncated gzip stream.
    (tmp_path / f"{labels}.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match=rf"{labels}\.gz: corrupt or truncated gzip"):
        load_dataset("mnist", tmp_path, split="test")

    # Not gzip at all.
    (tmp_path / f"{labels}.gz").write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match=rf"{labels}\.gz: corrupt or truncated gzip"):
        load_dataset("mnist", tmp_path, split="test")

    # Valid structure, one label changed: only the hash catches it.
    (tmp_path / f"{labels}.gz").unlink()
    changed = bytearray(raw)
    changed[-1] = (changed[-1] + 1) % 10
    (tmp_path / labels).write_bytes(bytes(changed))
    with pytest.raises(DataError, match=rf"{labels}: sha256 of the decompressed data"):
        load_dataset("mnist", tmp_path, split="test")

    # Short data behind a valid header.
    (tmp_path / labels).write_bytes(raw[:-100])
    with pytest.raises(DataError, match=rf"{labels}: truncated: header says 10000"):
        load_dataset("mnist", tmp_path, split="test")

    # Missing file.
    (tmp_path / labels).unlink()
    with pytest.raises(DataError, match=rf"missing {labels}\.gz"):
        load_dataset("mnist", tmp_path, split="test")


# ------------------------------------------------------------------ any IDX pair; Fashion-MNIST

def test_generic_idx_pair_loads_exact_pixels_and_labels(tmp_path):
    rng = np.random.default_rng(3)
    train_images = rng.integers(0, 256, (7, 5, 5)).astype(np.uint8)
    train_labels = np.array([0, 4, 2, 4, 1, 3, 0], dtype=np.uint8)
    test_images = rng.integers(0, 256, (2, 5, 5)).astype(np.uint8)
    (tmp_path / "kmnist-train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(train_images)))
    (tmp_path / "kmnist-train-labels-idx1-ubyte").write_bytes(idx_bytes(train_labels))  # raw beside gzip
    (tmp_path / "kmnist-t10k-images-idx3-ubyte").write_bytes(idx_bytes(test_images))
    (tmp_path / "kmnist-t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.array([6, 1]))))
    train = load_dataset("idx", tmp_path)
    assert train.shape == (1, 5, 5) and train.name == "idx" and len(train) == 7
    assert torch.equal(train.images[:, 0], torch.from_numpy(train_images))
    assert train.labels.tolist() == [0, 4, 2, 4, 1, 3, 0]
    assert train.num_classes == 7  # label 6 of the test split counts: both splits agree
    both = load_dataset("idx", tmp_path, split="all")
    assert len(both) == 9 and both.labels.tolist()[-2:] == [6, 1] and both.num_classes == 7
    assert torch.equal(both.images[7:, 0], torch.from_numpy(test_images))


def test_generic_idx_errors_name_the_file(tmp_path, capsys):
    from selfflow.cli import main

    images = np.zeros((7, 5, 5), dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images)[:-3])  # truncated
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(7)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated: header says 7x5x5"):
        load_dataset("idx", tmp_path)
    out = tmp_path / "run"
    code = main(["train", "--set", "data.name=idx", "--set", f"data.path={tmp_path}", "--set", f"train.out_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and "train-images-idx3-ubyte: truncated" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()

    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x07" + idx_bytes(images)[4:])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: IDX header says 7 dimensions, expected 3"):
        load_dataset("idx", tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(6)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: 6 labels for the 7 images"):
        load_dataset("idx", tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: no labels file beside it \(expected train-labels"):
        load_dataset("idx", tmp_path)
    with pytest.raises(DataError, match=r"no test IDX images"):
        load_dataset("idx", tmp_path, split="test")


def fashion_blobs() -> dict[str, bytes]:
    """Fashion-MNIST-shaped .gz files; its published hashes are of the .gz files, so these are too."""
    return {stem: gzip.compress(blob, mtime=0) for stem, blob in fake_mnist_blobs().items()}


def test_fashion_mnist_is_checked_against_the_gzip_hashes(tmp_path, monkeypatch):
    blobs = fashion_blobs()
    for stem, blob in blobs.items():
        (tmp_path / f"{stem}.gz").write_bytes(blob)
    # The published hashes refuse these stand-ins, naming the file.
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: sha256 of the file is [0-9a-f]{64}, "
                                        r"expected 346e55b9.*fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path, split="test")
    assert len(load_dataset("idx", tmp_path, split="test")) == 4  # as a plain IDX pair: unchecked

    named = NAMED_SETS["fashion-mnist"]
    monkeypatch.setitem(NAMED_SETS, "fashion-mnist", NamedSet(named.name, hashes_of(blobs), "gzip", named.class_names))
    data = load_dataset("fashion-mnist", tmp_path, split="all")
    assert len(data) == 10 and data.num_classes == 10 and data.class_names[9] == "Ankle boot"
    # A raw copy cannot be checked against hashes of .gz files: refused with the way out.
    (tmp_path / "t10k-labels-idx1-ubyte.gz").rename(tmp_path / "t10k-labels-idx1-ubyte.gz.bak")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(blobs["t10k-labels-idx1-ubyte"]))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: fashion-mnist's published sha256 values are of the \.gz"):
        load_dataset("fashion-mnist", tmp_path, split="test")


def test_fetch_fashion_mnist_from_a_local_server(http_folder, tmp_path, monkeypatch, capsys):
    from selfflow.cli import main

    served, url, requests = http_folder
    blobs = fashion_blobs()
    for stem, blob in blobs.items():
        (served / f"{stem}.gz").write_bytes(blob)
    dest = tmp_path / "fashion"
    # The published hashes refuse the stand-ins: exit status 1, nothing under a real name.
    assert main(["data", "fetch", "fashion-mnist", "--to", str(dest), "--base-url", url]) == 1
    assert "sha256 mismatch: the file has" in capsys.readouterr().err
    assert not [p for p in dest.iterdir()]
    named = NAMED_SETS["fashion-mnist"]
    monkeypatch.setitem(NAMED_SETS, "fashion-mnist", NamedSet(named.name, hashes_of(blobs), "gzip", named.class_names))
    assert main(["data", "fetch", "fashion-mnist", "--to", str(dest), "--base-url", url]) == 0
    assert "fashion-mnist ready" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == {f"{s}.gz": b for s, b in blobs.items()}
    assert len(load_dataset("fashion-mnist", dest, split="train")) == 6
    count = len(requests)
    assert main(["data", "fetch", "fashion-mnist", "--to", str(dest), "--base-url", url]) == 0
    assert len(requests) == count  # present and valid: nothing downloaded again
    assert data_fetch.MIRRORS["fashion-mnist"][0].startswith("https://")


# ------------------------------------------------------------------ folder

def test_folder_classes_sorted_grey_and_rgb(tmp_path):
    root = tmp_path / "set"
    for k in range(3):
        write_png(root / "zebra" / f"{k}.png", np.full((6, 6), 10 * k))
        write_png(root / "apple" / "nested" / f"{k}.png", np.full((6, 6), 200))
    (root / "apple" / "notes.txt").write_text("ignored")
    data = load_dataset("folder", root)
    assert data.class_names == ["apple", "zebra"] and data.num_classes == 2
    assert data.shape == (1, 6, 6) and len(data) == 6
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert int(data.images[0].max()) == 200 and int(data.images[4].max()) == 10

    write_png(root / "zebra" / "colour.png", np.zeros((6, 6, 3)) + [255, 0, 0])
    data = load_dataset("folder", root, image_size=4)
    assert data.shape == (3, 4, 4)  # one colour image makes the set RGB
    red = data.images[data.labels == 1][-1]
    assert red[0].min() == 255 and red[1].max() == 0
    assert load_dataset("folder", root, channels=1).channels == 1


def test_folder_errors_name_the_culprit(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=rf"{empty}: no images"):
        load_dataset("folder", empty)
    with pytest.raises(DataError, match="not found"):
        load_dataset("folder", tmp_path / "absent")

    root = tmp_path / "set"
    write_png(root / "a" / "0.png", np.zeros((8, 8)))
    (root / "b").mkdir()
    with pytest.raises(DataError, match="class folder.*with no images: b"):
        load_dataset("folder", root)

    write_png(root / "b" / "big.png", np.zeros((10, 12)))
    with pytest.raises(DataError, match=r"big\.png: size 12x10 \(WxH\) differs from .*0\.png: 8x8"):
        load_dataset("folder", root)
    assert load_dataset("folder", root, image_size=8).shape == (1, 8, 8)

    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"broken\.png: cannot read image"):
        load_dataset("folder", root, image_size=8)


def test_folder_without_subfolders_is_one_class(tmp_path):
    for k in range(2):
        write_png(tmp_path / f"{k}.png", np.zeros((4, 4)))
    data = load_dataset("folder", tmp_path)
    assert data.num_classes == 1 and data.labels.tolist() == [0, 0]


# ------------------------------------------------------------------ npz

def test_npz_layouts_and_ranges(tmp_path):
    grey = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
    np.savez(tmp_path / "nhw.npz", images=grey, labels=np.array([0, 1, 2, 1, 0]))
    data = load_dataset("npz", tmp_path / "nhw.npz")
    assert data.shape == (1, 4, 4) and data.num_classes == 3
    assert torch.equal(data.images[:, 0], torch.from_numpy(grey))

    rgb = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "nhwc.npz", images=rgb, class_names=np.array(["cat", "dog"]),
             labels=np.array([1, 1]))
    data = load_dataset("npz", tmp_path / "nhwc.npz")
    assert data.shape == (3, 5, 6) and data.class_names == ["cat", "dog"]
    assert torch.equal(data.images, torch.from_numpy(rgb).permute(0, 3, 1, 2))

    floats = np.linspace(-1, 1, 2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    np.savez(tmp_path / "nchw.npz", images=floats)
    data = load_dataset("npz", tmp_path / "nchw.npz")
    assert data.shape == (3, 4, 4) and data.num_classes == 1
    x, _ = data.get_batch([0, 1])
    assert torch.allclose(x, torch.from_numpy(floats), atol=1 / 127.5)


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.array([[[0.0, np.nan]]])}, r"\['images'\]: 1 NaN or infinite"),
    ({"images": np.full((2, 4, 4), np.inf)}, r"\['images'\]: 32 NaN or infinite"),
    ({"images": np.zeros((2, 4))}, r"\['images'\]: 2-D array"),
    ({"images": np.zeros((2, 4, 4, 5))}, r"\['images'\]: shape .* no channel axis"),
    ({"images": np.full((2, 4, 4), 2.0)}, r"\['images'\]: float values span \[2, 2\]"),
    ({"images": np.zeros((3, 4, 4)), "labels": np.zeros(2, int)}, r"\['labels'\]: shape \(2,\)"),
    ({"images": np.zeros((2, 4, 4)), "labels": np.zeros(2)}, r"\['labels'\]: labels must be int"),
    ({"labels": np.zeros(2, int)}, r"no 'images' key"),
    ({"images": np.zeros((2, 4, 4)), "extra": np.zeros(1)}, r"unknown key\(s\) extra"),
])
def test_npz_errors_name_file_and_key(tmp_path, arrays, message):
    file = tmp_path / "bad.npz"
    np.savez(file, **arrays)
    with pytest.raises(DataError, match=rf"bad\.npz.*{message}" if "key" not in message
                       else message):
        load_dataset("npz", file)


def test_npz_refuses_pickled_objects(tmp_path):
    file = tmp_path / "objects.npz"
    np.savez(file, images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match=r"objects\.npz: cannot read"):
        load_dataset("npz", file)


# ------------------------------------------------------------------ IndexStream

def take(stream: IndexStream, count: int) -> list[list[int]]:
    return [stream.next_batch().tolist() for _ in range(count)]


def test_index_stream_is_deterministic_and_covers_each_epoch():
    first = take(IndexStream(12, 4, seed=3), 9)
    assert first == take(IndexStream(12, 4, seed=3), 9)
    assert first != take(IndexStream(12, 4, seed=4), 9)
    for epoch in range(3):  # 3 batches per epoch, each epoch a permutation of 0..11
        items = sum(first[3 * epoch:3 * epoch + 3], [])
        assert sorted(items) == list(range(12))
    assert first[:3] != first[3:6]  # a new order each epoch


def test_index_stream_drop_last_and_fill():
    dropped = IndexStream(10, 4, seed=0)
    assert dropped.batches_per_epoch == 2
    filled = IndexStream(10, 4, seed=0, drop_last=False)
    batches = take(filled, 3)
    assert filled.batches_per_epoch == 3 and all(len(b) == 4 for b in batches)
    flat = sum(batches, [])
    assert set(flat) == set(range(10)) and flat[10:] == flat[:2]
    assert take(dropped, 2) == batches[:2]


def test_index_stream_resumes_exactly_through_json():
    reference = take(IndexStream(10, 4, seed=7, drop_last=False), 11)
    for stop in (0, 2, 3, 5, 10):
        stream = IndexStream(10, 4, seed=7, drop_last=False)
        take(stream, stop)
        state = json.loads(json.dumps(stream.state_dict()))
        resumed = IndexStream(10, 4, seed=7, drop_last=False)
        resumed.load_state_dict(state)
        assert take(resumed, 11 - stop) == reference[stop:]
    with pytest.raises(ValueError, match="seed=7 but this stream has seed=8"):
        IndexStream(10, 4, seed=8, drop_last=False).load_state_dict(state)


def test_index_stream_ranks_split_the_global_batch():
    single = take(IndexStream(50, 8, seed=1), 14)
    ranks = [take(IndexStream(50, 8, seed=1, rank=r, world_size=2), 14) for r in range(2)]
    assert all(len(b) == 4 for b in ranks[0])
    assert [a + b for a, b in zip(*ranks)] == single
    # A run saved on 2 ranks resumes on 1 rank at the same global batch.
    two = IndexStream(50, 8, seed=1, rank=0, world_size=2)
    take(two, 9)
    one = IndexStream(50, 8, seed=1)
    one.load_state_dict(two.state_dict())
    assert take(one, 5) == single[9:]


def test_index_stream_validates_arguments():
    with pytest.raises(ValueError, match="not divisible by world_size 3"):
        IndexStream(20, 8, world_size=3)
    with pytest.raises(ValueError, match="larger than the data set"):
        IndexStream(5, 8)
    with pytest.raises(ValueError, match="rank"):
        IndexStream(20, 8, rank=2, world_size=2)


# ------------------------------------------------------------------ fetch over HTTP

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def http_folder(tmp_path, monkeypatch):
    """Serve tmp_path/'served' on 127.0.0.1; yields (folder, base_url, request log)."""
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    served = tmp_path / "served"
    served.mkdir()
    handler = type("Handler", (_QuietHandler,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             partial(handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}/", handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_fetch_downloads_verifies_and_skips(http_folder, tmp_path):
    served, url, requests = http_folder
    blobs = fake_mnist_blobs()
    for stem, blob in blobs.items():
        (served / f"{stem}.gz").write_bytes(gzip.compress(blob))
    dest = tmp_path / "dest"
    lines = []
    # The first mirror is missing every file (404); the second one serves them.
    paths = data_fetch.fetch_set("mnist", dest, [url + "nowhere/", url], timeout=5,
                                 sha256=hashes_of(blobs), log=lines.append)
    assert sorted(p.name for p in paths) == sorted(f"{s}.gz" for s in blobs)
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{s}.gz" for s in blobs)
    assert len(requests) == 8 and all("downloaded" in line for line in lines)
    assert len(load_mnist(dest, "all", sha256=hashes_of(blobs))) == 10

    data_fetch.fetch_set("mnist", dest, url, timeout=5, sha256=hashes_of(blobs))
    assert len(requests) == 8  # everything present and valid: nothing downloaded again

    (dest / "train-labels-idx1-ubyte.gz").write_bytes(b"broken")
    data_fetch.fetch_set("mnist", dest, url, timeout=5, sha256=hashes_of(blobs))
    assert requests[8:] == ["/train-labels-idx1-ubyte.gz"]  # only the broken file again
    assert len(load_mnist(dest, "train", sha256=hashes_of(blobs))) == 6


def test_fetch_rejects_corrupt_file_and_leaves_nothing(http_folder, tmp_path, monkeypatch):
    served, url, _ = http_folder
    blobs = fake_mnist_blobs()
    for stem, blob in blobs.items():
        (served / f"{stem}.gz").write_bytes(gzip.compress(blob))
    (served / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(blobs[
        "t10k-images-idx3-ubyte"][:-1] + b"\x01"))  # one byte changed
    dest = tmp_path / "dest"
    with pytest.raises(data_fetch.FetchError, match="t10k-images-idx3-ubyte.gz.*sha256 mismatch"):
        data_fetch.fetch_set("mnist", dest, url, timeout=5, sha256=hashes_of(blobs))
    left = sorted(p.name for p in dest.iterdir())
    assert "t10k-images-idx3-ubyte.gz" not in left
    assert not [name for name in left if name.endswith(".part")]

    # A truncated gzip is rejected too, and main_fetch reports it as exit status 1.
    (served / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(blobs["t10k-images-idx3-ubyte"])[:20])
    monkeypatch.setitem(NAMED_SETS, "mnist", NamedSet("mnist", hashes_of(blobs), "content", NAMED_SETS["mnist"].class_names))
    assert data_fetch.main_fetch("mnist", str(dest), base_url=url) == 1
    assert not [p for p in dest.iterdir() if p.name.startswith(".") or "t10k-images" in p.name]
    assert data_fetch.main_fetch("imagenet", str(dest)) == 2
