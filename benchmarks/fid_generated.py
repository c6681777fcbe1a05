"""Inception FID of N generated images, timed: what a user runs, and waits for, after training.

    python benchmarks/fid_generated.py --ckpt runs/convergence_mnist_gpu/runs/self_flow/seed0 --n 10000 \\
        --inception .carry/fid_inception_v3_fp16.pt --device cuda --name fid10k_mnist_S_self_flow_cuda

Runs ``selfflow eval --metrics fid`` as a user would: the run's EMA weights generate N images (seed k,
label k mod classes, no guidance), and their Inception FID is taken against the first N images of the
training split. The whole command is timed from outside, and the table splits the time into
generation and FID (Inception features of both sets, the reference's included unless cached).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import RESULTS, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="training run, checkpoint or exported model folder")
    parser.add_argument("--n", type=int, default=10000, help="generated images, and reference images")
    parser.add_argument("--inception", default=None, help="Inception FID weights (default: $SELFFLOW_INCEPTION)")
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance (1 = off)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cache-dir", default=None, help="reference statistics (default: a fresh folder, so the reference is timed too)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--data", default=None, help="reference data set (default: the checkpoint's; an exported model folder has none)")
    parser.add_argument("--data-path", default=None)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    report_file = RESULTS / f"{args.name}_eval.json"
    with tempfile.TemporaryDirectory() as fresh:
        command = [sys.executable, "-m", "selfflow", "eval", "--ckpt", args.ckpt, "--metrics", "fid", "--n", str(args.n),
                   "--num-reference", str(args.n), "--sampler", args.sampler, "--steps", str(args.steps), "--cfg-scale", f"{args.cfg_scale:g}",
                   "--batch-size", str(args.batch_size), "--device", args.device, "--cache-dir", args.cache_dir or fresh,
                   "--out", str(report_file)]
        if args.inception:
            command += ["--inception", args.inception]
        if args.data:
            command += ["--data", args.data]
        if args.data_path:
            command += ["--data-path", args.data_path]
        print(" ".join(command), flush=True)
        start = time.perf_counter()
        done = subprocess.run(command)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"selfflow eval failed (exit status {done.returncode}): {' '.join(command)}")
    report = json.loads(report_file.read_text())
    sampling = report.get("sampling", {})
    seconds_per_image = sampling.get("speed", {}).get("seconds_per_image")
    rows = [
        {"quantity": "Inception FID", "value": report["fid"]},
        {"quantity": "generated images", "value": args.n},
        {"quantity": "reference images (train split, first N)", "value": args.n},
        {"quantity": "network evaluations per image", "value": sampling.get("nfe_per_sample")},
        {"quantity": "seconds: generation", "value": sampling.get("generation_wall_time_s")},
        {"quantity": "seconds: FID (Inception features of both sets, Fréchet distance)", "value": report["timings_s"]["fid"]},
        {"quantity": "seconds: the whole `selfflow eval` command", "value": wall},
    ]
    if seconds_per_image:
        rows.insert(5, {"quantity": f"ms per image, one batch of {min(args.batch_size, args.n)} (timed again)", "value": 1e3 * seconds_per_image})
    inception = report.get("inception", {}).get("weights_sha256", "")
    notes = (f"Model: `{args.ckpt}` (EMA weights), {args.sampler} sampler, {args.steps} steps, guidance {args.cfg_scale:g}, batch {args.batch_size}. "
             "FID: TF-FID Inception-v3 pool features, bilinear resize to 299, grey repeated to 3 channels"
             + (f", weights sha256 {inception[:16]}…" if inception else "")
             + f". The whole command includes starting Python, loading the model and data, and a second timed batch "
             f"for the per-image speed. `selfflow eval`'s own report: `results/{report_file.name}`.")
    print(write_result(args.name, rows, ["quantity", "value"], f"FID of {args.n} generated images, timed ({args.device})", notes,
                       {"eval_report": report, "wall_seconds": wall}))


if __name__ == "__main__":
    main()
