"""Peak training memory per model size, batch and option, and the largest batch that fits.

One measured step is the trainer's own ``Trainer.train_step`` (forward, backward, gradient clipping,
AdamW, the EMA update; for Self-Flow also the EMA teacher's pass), after one warm-up step so that
the optimizer state exists. So the figure includes weights, EMA copy, gradients, AdamW moments and
activations — what a run really needs, not the model alone.

Options (``--options``, combinable with ``+``): ``fp32``, ``bf16`` (autocast; with FSDP also bf16
gathered weights), ``ckpt`` (activation checkpointing, one block at a time). FSDP: launch under
torchrun with ``--fsdp``; each process reports its own peak, and the row gives the largest.

    # the ImageNet-256 latent setting (32×32×4 latents, patch 2 → 256 tokens, 1000 classes) on one GPU
    python benchmarks/memory.py --device cuda --latent --sizes S B L XL --batches 32 64 128 256 \\
        --options bf16 bf16+ckpt fp32 --find-max --method self_flow
    # FSDP over the GPUs of one node (every process prints; rank 0 writes the table)
    torchrun --nproc_per_node 8 benchmarks/memory.py --device cuda --latent --sizes XL --batches 256 --options bf16 --fsdp
    # CPU: tiny sizes only, a check that the script works (what docs/benchmarks/memory.md holds until a GPU run)
    python benchmarks/memory.py --device cpu --sizes tiny mini --image-size 8 --channels 1 --batches 16 64 \\
        --options fp32 fp32+ckpt --find-max --max-batch 512 --memory-limit-gib 0.25

Memory measure. CUDA: ``torch.cuda.max_memory_allocated`` over the measured step (tensors only;
``reserved`` adds the caching allocator's slack and is given too). CPU: each configuration runs
in a fresh subprocess and reports the growth of its peak resident set (``ru_maxrss``) from just
before the trainer is built — tensors plus allocator overhead, but not torch's own code and data.
With ``--fsdp`` or ``--in-process`` the running process is measured, whose resident peak only
grows: give one configuration per command there.

Largest batch (``--find-max``): double from the first ``--batches`` value until a step runs out of
memory (CUDA OOM, or beyond ``--memory-limit-gib``), then bisect between the last batch that fit
and the first that did not, to a multiple of ``--granularity``; capped at ``--max-batch``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import markdown_table, write_result  # noqa: E402

from selfflow.config import MODEL_SIZES, config_from_dict  # noqa: E402


class SyntheticData:
    """Random 'images' of a given shape: the trainer's data interface without any files."""

    name = "synthetic"

    def __init__(self, channels: int, size: int, num_classes: int, length: int):
        self.channels, self.image_size, self.num_classes, self.length = channels, size, num_classes, length
        self.shape = (channels, size, size)
        self.class_names = None

    def __len__(self) -> int:
        return self.length

    def get_batch(self, indices, device=None):
        index = torch.as_tensor(indices, dtype=torch.int64)
        generator = torch.Generator().manual_seed(int(index[0]) if len(index) else 0)
        images = torch.randn(len(index), *self.shape, generator=generator).clamp(-1, 1)
        labels = index % self.num_classes
        return (images.to(device), labels.to(device)) if device is not None else (images, labels)


def _options(text: str) -> dict:
    parts = set(text.split("+"))
    unknown = parts - {"fp32", "bf16", "ckpt"}
    if unknown or not parts & {"fp32", "bf16"}:
        raise SystemExit(f"bad option {text!r}: use fp32 or bf16, optionally +ckpt (e.g. bf16+ckpt)")
    return {"precision": "bf16" if "bf16" in parts else "fp32", "activation_checkpointing": "ckpt" in parts}


def _trainer(args, size: str, batch: int, option: str, out_dir: str, model_overrides: dict | None = None):
    from selfflow.trainer import Trainer

    opts = _options(option)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    raw = {
        "data": {"name": "digits"},  # unused: the synthetic data is passed in
        "model": {"size": size, "patch_size": args.patch_size, **(model_overrides or {})},
        "method": {"name": args.method},
        "train": {
            "steps": 10**9, "batch_size": batch * world, "lr": 1e-4, "warmup_steps": 0, "ckpt_every": 0, "num_sample_images": 0,
            "out_dir": out_dir, "progress": False, "tensorboard": False, "device": args.device, "log_every": 10**9,
            "distributed": "fsdp" if args.fsdp else "ddp", **opts,
        },
    }
    config = config_from_dict(raw)
    data = SyntheticData(args.channels, args.image_size, args.num_classes, max(4 * batch * world, 4096))
    return Trainer(config, dataset=data)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_once(args, size: str, batch: int, option: str) -> dict:
    """One configuration in this process: {'status': 'ok'|'oom', 'peak_GiB', 'step_ms', ...}."""
    cuda = args.device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not cuda:
        # First a throw-away step of a minute model: torch's lazy imports and first-use buffers
        # (the optimizer pulls in torch._dynamo) then count in the baseline, not in the row.
        with tempfile.TemporaryDirectory() as out_dir:
            warm = _trainer(args, "tiny", 2, option, out_dir, {"depth": 1, "hidden_size": 32, "num_heads": 2})
            warm.train_step()
            warm.train_step()
            if world == 1:  # under torchrun the process group lives until the end
                warm.close()
            del warm
            gc.collect()
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    trainer = None
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            trainer = _trainer(args, size, batch, option, out_dir)
            params = sum(p.numel() for p in trainer.model.parameters())
            trainer.train_step()  # creates the optimizer state
            _sync(args.device)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            trainer.train_step()
            _sync(args.device)
            step_ms = (time.perf_counter() - start) * 1e3
            if cuda:
                peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            else:
                peak, reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline_rss, None
            row = {"status": "ok", "params_M": round(params / 1e6, 2), "tokens": trainer.model.num_tokens, "step_ms": round(step_ms, 1),
                   "peak_GiB": round(peak / 2**30, 3)}
            if reserved is not None:
                row["reserved_GiB"] = round(reserved / 2**30, 3)
            return row
        except torch.cuda.OutOfMemoryError:
            return {"status": "oom"}
        finally:
            if trainer is not None and world == 1:
                trainer.close()
            del trainer
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()


def measure(args, size: str, batch: int, option: str) -> dict:
    """CPU: a fresh subprocess per configuration (peak RSS only grows); CUDA: in this process."""
    if args.device.startswith("cuda") or args.in_process or args.fsdp:
        row = measure_once(args, size, batch, option)
    else:
        cmd = [sys.executable, __file__, "--one", json.dumps([size, batch, option]), *args.passthrough]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            row = {"status": "error", "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            row = json.loads(lines[-1])
    if row["status"] == "ok" and args.memory_limit_gib and row["peak_GiB"] > args.memory_limit_gib:
        row["status"] = "over limit"
    return row


def largest_batch(args, size: str, option: str, start: int) -> tuple[int, list[dict]]:
    """Doubling, then bisection, on whether a training step fits. Returns (largest batch or 0, probes)."""
    probes = []

    def fits(batch: int) -> bool:
        row = measure(args, size, batch, option)
        probes.append({"batch": batch, **row})
        print(f"  probe size={size} option={option} batch={batch}: {row['status']} {row.get('peak_GiB', '')}", flush=True)
        return row["status"] == "ok"

    good, bad = 0, None
    batch = max(start, args.granularity)
    while batch <= args.max_batch:
        if fits(batch):
            good, batch = batch, batch * 2
        else:
            bad = batch
            break
    if bad is None:
        return good, probes  # the cap fits
    while bad - good > args.granularity:
        middle = (good + bad) // 2 // args.granularity * args.granularity
        if middle <= good:
            break
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good, probes


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", nargs="+", default=["tiny", "mini"], choices=sorted(MODEL_SIZES))
    p.add_argument("--batches", nargs="+", type=int, default=[16, 64], help="per-process batch sizes to measure")
    p.add_argument("--options", nargs="+", default=["fp32", "fp32+ckpt"], help="fp32 | bf16, optionally +ckpt")
    p.add_argument("--method", default="flow_matching", help="flow_matching | self_flow (adds the EMA teacher pass)")
    p.add_argument("--latent", action="store_true", help="32×32×4 inputs, 1000 classes: the ImageNet-256 latent setting")
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (launch with torchrun)")
    p.add_argument("--find-max", action="store_true", help="search the largest batch per size and option")
    p.add_argument("--max-batch", type=int, default=4096)
    p.add_argument("--granularity", type=int, default=8)
    p.add_argument("--memory-limit-gib", type=float, default=None, help="treat a larger peak as not fitting (CPU, or a smaller GPU)")
    p.add_argument("--in-process", action="store_true", help="CPU: measure in this process (peaks then only grow)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--name", default=None, help="result name (default memory_<device>)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.latent:
        args.image_size, args.channels, args.num_classes = 32, 4, 1000
    # what a subprocess needs to rebuild the same configuration
    args.passthrough = ["--device", args.device, "--method", args.method, "--image-size", str(args.image_size), "--channels",
                        str(args.channels), "--num-classes", str(args.num_classes), "--patch-size", str(args.patch_size)]
    if args.threads:
        torch.set_num_threads(args.threads)
        args.passthrough += ["--threads", str(args.threads)]
    return args


def main() -> None:
    args = parse()
    if args.one is not None:  # subprocess mode: one configuration, one JSON line
        size, batch, option = json.loads(args.one)
        print(json.dumps(measure_once(args, size, batch, option)), flush=True)
        return
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.fsdp and args.find_max:
        raise SystemExit("--find-max is not supported with --fsdp: an out-of-memory on one process would stall the others")
    rows, best = [], []
    for size in args.sizes:
        for option in args.options:
            for batch in args.batches:
                row = measure(args, size, batch, option)
                if world > 1:  # the largest peak over the processes
                    peak = torch.tensor([row.get("peak_GiB", float("nan"))], device=args.device if args.device.startswith("cuda") else "cpu")
                    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
                    row["peak_GiB"] = round(float(peak), 3)
                rows.append({"size": size, "option": option, "method": args.method, "fsdp_world": world if args.fsdp else 1,
                             "batch_per_process": batch, **row})
                print(json.dumps(rows[-1]), flush=True)
            if args.find_max:
                largest, probes = largest_batch(args, size, option, args.batches[0])
                best.append({"size": size, "option": option, "method": args.method, "largest_batch": largest,
                             "limit": f"{args.memory_limit_gib} GiB" if args.memory_limit_gib else "device memory",
                             "probes": len(probes)})
        if rank == 0:  # after every size, so that a run cut by a time limit keeps the sizes it measured
            path = write(args, rows, best, world)
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"wrote {path}")


def write(args, rows: list[dict], best: list[dict], world: int) -> Path:
    tokens = (args.image_size // args.patch_size) ** 2
    setting = f"{args.channels}×{args.image_size}×{args.image_size} inputs, patch {args.patch_size} ({tokens} tokens), {args.num_classes} classes"
    notes = [f"Setting: {setting}; method {args.method}; peak = "
             + ("`torch.cuda.max_memory_allocated` during one training step after a warm-up step." if args.device.startswith("cuda")
                else "growth of the process's peak resident set while building the trainer and running two steps "
                + ("(measured in the running process)." if (args.fsdp or args.in_process) else "(fresh process per row)."))]
    if world > 1:
        notes.append(f"Launched with `torchrun --nproc_per_node {world}`; each row is the largest peak over the {world} processes.")
    if best:
        notes += ["", "## Largest batch per process", ""] + markdown_table(best, ["size", "option", "method", "largest_batch", "limit", "probes"])
    name = args.name or f"memory_{'cuda' if args.device.startswith('cuda') else 'cpu'}"
    return write_result(
        name, rows, ["size", "option", "method", "fsdp_world", "batch_per_process", "params_M", "tokens", "status", "peak_GiB", "reserved_GiB", "step_ms"],
        f"Training memory ({args.device})", notes="\n".join(notes), extra={"largest_batch": best, "setting": setting},
    )

if __name__ == "__main__":
    main()
