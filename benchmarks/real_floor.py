"""The real-data floor: how far two real samples of the same data set are from each other.

    python benchmarks/real_floor.py --data mnist --data-path data/mnist --feature-net nets/mnist \
        --fid-count 10000 --inception PATH          # GPU: the full protocol
    python benchmarks/real_floor.py --data mnist --data-path data/mnist --fid-count 1000   # CPU

Compares the test split (as if it were generated) with the train split through
``selfflow.evaluation.evaluate``: FD_dom, precision/recall and the feature net's accuracy on the
full test split, and Inception FID on the first ``--fid-count`` images of each split.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from harness import env_threads, write_result
from selfflow.data import load_dataset
from selfflow.evaluation import cache_root, feature_net_for
from selfflow.evaluation.metrics import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--data-path", default=None)
    parser.add_argument("--feature-net", default=None, help="FD_dom classifier folder (default: trained once, cached)")
    parser.add_argument("--fid-count", type=int, default=0, help="images per split for Inception FID (0: skip)")
    parser.add_argument("--inception", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", default=None)
    parser.add_argument("--time-cached", action=argparse.BooleanOptionalAction, default=None,
                        help="time a second FID against the cached reference (default: on CUDA only; on a CPU it doubles the run)")
    args = parser.parse_args()
    env_threads()
    device = torch.device(args.device)
    if args.time_cached is None:
        args.time_cached = device.type == "cuda"
    test = load_dataset(args.data, path=args.data_path, split="test")
    train = load_dataset(args.data, path=args.data_path, split="train")
    net = Path(args.feature_net) if args.feature_net else feature_net_for(args.data, args.data_path, device, cache_root())[1]
    x_test, y_test = test.get_batch(torch.arange(len(test)))
    rows = []
    report = evaluate(x_test, y_test, metrics=("fd_dom", "pr", "acc"), reference=train, feature_net_dir=net, device=device,
                      cache_dir=cache_root() / "reference_stats", progress=False)
    rows.append({"metric": "FD_dom", "value": report["fd_dom"], "test_count": len(test), "train_count": report["num_reference"]})
    rows.append({"metric": "precision (k=3, feature net)", "value": report["precision"], "test_count": report["pr_count"], "train_count": report["pr_count"]})
    rows.append({"metric": "recall (k=3, feature net)", "value": report["recall"], "test_count": report["pr_count"], "train_count": report["pr_count"]})
    rows.append({"metric": "feature-net accuracy on test", "value": report["accuracy"], "test_count": len(test), "train_count": ""})
    extra = {"fd_dom_report": report}
    if args.fid_count:
        n = args.fid_count

        def first_n_fid(progress: bool = True) -> dict:  # the first n test images against the first n train images
            return evaluate(x_test[:n], metrics=("fid",), reference=train, num_reference=n, inception_path=args.inception,
                            device=device, cache_dir=cache_root() / "reference_stats", progress=progress)

        fid = first_n_fid()
        rows.append({"metric": "Inception FID", "value": fid["fid"], "test_count": n, "train_count": n})
        extra["fid_report"] = fid
    if args.fid_count and args.time_cached:
        # The figure a user waits for: FID of n new images once the reference statistics are cached.
        again = first_n_fid(progress=False)
        rows.append({"metric": f"seconds: Inception FID of {n} images, reference cached ({device.type})",
                     "value": again["timings_s"]["fid"], "test_count": n, "train_count": n})
        extra["fid_cached_report"] = again
    if args.fid_count:
        rows.append({"metric": f"seconds: the first FID, reference computed too ({device.type})",
                     "value": fid["timings_s"]["fid"], "test_count": n, "train_count": n})
    notes = (
        f"Real {args.data} test images scored as if generated, against {args.data} train (first K images of each split, "
        "in the files' order). FD_dom: the project's feature net (`selfflow eval train-feature-net`); FID: TF-FID "
        "Inception-v3 pool features, bilinear resize to 299, uint8 quantisation, grey repeated to 3 channels"
        + (f", weights sha256 {extra['fid_report']['inception']['weights_sha256'][:16]}…" if args.fid_count else "")
        + ". FID is biased upwards at small counts: compare FIDs only at equal counts."
    )
    name = args.name or f"real_floor_{args.data}_{device.type}"
    print(write_result(name, rows, ["metric", "value", "test_count", "train_count"], f"Real-data floor: {args.data} test vs train", notes, extra))


if __name__ == "__main__":
    main()
