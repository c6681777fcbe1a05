"""Training-time overhead of Self-Flow and REPA over flow matching: step time and peak memory.

Every variant is a real ``Trainer`` built from the same config file family (``configs/<data>_*.yaml``)
with the same model, batch, seed and device; a "step" is ``Trainer.train_step()`` (forward,
backward, clipping, AdamW, EMA update). Variants are timed in interleaved rounds (round r runs every
variant for ``--steps`` steps) so that drift in a shared machine's load hits all of them alike;
ratios to flow matching are taken within each round, and the median over rounds is reported.

Per-token modulation: ``dedupe on`` computes the adaLN conditioning once per distinct
(sample, time) pair (two per Self-Flow sample) and gathers it to tokens; ``dedupe off`` runs it on
all B·N token rows. Flow matching and REPA pass one time per sample, so dedupe does not apply.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the variant's steps, minus what was
allocated before them (activations, gradients and temporaries of one step), plus the variant's
resident tensors (weights, EMA, AdamW moments, method parameters). On a CPU there is no allocator
counter, so we report (a) the bytes of tensors autograd saves for backward during one training
forward, counted once per storage via ``torch.autograd.graph.saved_tensors_hooks`` (an
allocator-free estimate of activation memory; it leaves out the teacher's transient no-grad
activations), and (b) with ``--rss``, the peak resident set size (Linux VmHWM) of a fresh process that
builds the variant and runs ``--steps`` steps, minus its resident size before the first step.

    python benchmarks/method_overhead.py --data digits --device cpu --threads 1 --out docs/benchmarks/method_overhead_digits_cpu
    python benchmarks/method_overhead.py --data mnist --data-path .carry/mnist --device cuda \\
        --repa-encoder inception --inception .carry/fid_inception_v3_fp16.pt --out docs/benchmarks/method_overhead_mnist_h100
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness import machine, resolve_data_path, write_report

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    # name: (config stem, dedupe)
    "flow_matching": ("flow_matching", None),
    "dual_timestep_only": ("self_flow_dual_timestep_only", True),
    "dual_timestep_only (dedupe off)": ("self_flow_dual_timestep_only", False),
    "self_flow": ("self_flow", True),
    "self_flow (dedupe off)": ("self_flow", False),
    "repa": ("repa", None),
}


def build_trainer(args, variant: str, dataset, encoder_dir: str | None, out_dir: str):
    from selfflow.config import load_config
    from selfflow.trainer import Trainer

    stem, dedupe = VARIANTS[variant]
    overrides = [
        f"train.batch_size={args.batch_size}", f"train.device={args.device}", f"train.seed={args.seed}",
        f"train.out_dir={out_dir}", "train.progress=false", "train.tensorboard=false", "train.num_sample_images=0",
        "train.ckpt_every=0", "train.log_every=1000000", "train.warmup_steps=1",
        f"train.precision={'bf16' if args.device.startswith('cuda') else 'fp32'}",
    ]
    if args.size:
        overrides += [f"model.size={args.size}", "model.depth=null", "model.hidden_size=null", "model.num_heads=null"]
    for key in ("depth", "hidden_size", "num_heads"):  # explicit dimensions override the size's
        if getattr(args, key, None):
            overrides += [f"model.{key}={getattr(args, key)}"]
    if stem == "repa":
        overrides += [f"method.encoder={args.repa_encoder}", f"method.encoder_path={encoder_dir or 'null'}"]
        if args.repa_encoder == "feature_net":
            overrides += ["method.encoder_input_size=null", "method.encoder_layer=block2"]  # the token grid of 8×8 and 28×28
        else:
            overrides += ["method.encoder_layer=mixed_7"]
        if args.projector_dim:
            overrides += [f"method.projector_dim={args.projector_dim}"]
    if args.data == "mnist":
        overrides += [f"data.path={resolve_data_path(args)}"]
    config = load_config(ROOT / "configs" / f"{args.data}_{stem}.yaml", overrides)
    trainer = Trainer(config, dataset=dataset)
    if dedupe is not None:
        trainer.model.dedupe_times = dedupe
    return trainer


def resident_bytes(trainer) -> int:
    tensors = list(trainer.model.parameters()) + list(trainer.ema.model.parameters()) + list(trainer.method.parameters())
    for state in trainer.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_activation_bytes(trainer) -> int:
    """Bytes autograd keeps for backward during one training forward, once per storage."""
    seen: dict[int, int] = {}

    def pack(tensor):
        try:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    batch = next(trainer._micro_batches())[1]
    autocast = torch.autocast(trainer.device.type, dtype=trainer.amp_dtype) if trainer.amp_dtype else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss, _ = trainer.objective(batch)
    del loss
    trainer.optimizer.zero_grad(set_to_none=True)
    return sum(seen.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_small_encoder(dataset, folder: Path) -> str:
    from selfflow.encoders import train_encoder

    # Its quality does not matter for timing; its architecture (the digits configs' encoder) does.
    train_encoder(dataset, folder, steps=20)
    return str(folder)


def _proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_child(args) -> None:
    """--child VARIANT: build one variant, run --steps steps, print peak-RSS figures as JSON.

    Linux's VmHWM (peak RSS of this process image; ru_maxrss would carry the parent's peak across
    exec) is reset through /proc/self/clear_refs after the build, so the peak covers the steps only.
    """
    from selfflow.data import load_dataset

    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.data, path=resolve_data_path(args), split="train")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(args, args.child, dataset, args.encoder_dir, tmp)
        before = _proc_status_mib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        for _ in range(args.steps):
            trainer.train_step()
        peak = _proc_status_mib("VmHWM")
    print(json.dumps({"rss_before_steps_mib": before, "rss_peak_mib": peak, "rss_step_peak_mib": peak - before}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--data-path", default=None)
    parser.add_argument("--size", default=None, help="model size (tiny, mini, S, ...); default: the config's")
    parser.add_argument("--depth", type=int, default=None, help="override the size's depth")
    parser.add_argument("--hidden-size", type=int, default=None, help="override the size's width")
    parser.add_argument("--num-heads", type=int, default=None, help="override the size's head count")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--repa-encoder", choices=["feature_net", "inception"], default="feature_net")
    parser.add_argument("--inception", default=None, help="Inception .pt for --repa-encoder inception")
    parser.add_argument("--projector-dim", type=int, default=None)
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS per variant in fresh processes (CPU)")
    parser.add_argument("--out", required=True, help="output prefix: writes <out>.json and <out>.md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--encoder-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args)
        return 0

    from selfflow.data import load_dataset

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dataset = load_dataset(args.data, path=resolve_data_path(args), split="train")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    workdir = Path(tempfile.mkdtemp(prefix="selfflow-overhead-"))
    encoder_dir = args.inception if args.repa_encoder == "inception" else None
    if "repa" in variants and args.repa_encoder == "feature_net":
        encoder_dir = train_small_encoder(dataset, workdir / "encoder")

    trainers = {v: build_trainer(args, v, dataset, encoder_dir, str(workdir / f"run{i}")) for i, v in enumerate(variants)}
    first = trainers[variants[0]]
    info = {
        "model": {"size": first.config.model.size if not (args.depth or args.hidden_size or args.num_heads) else "custom",
                  "depth": first.model.depth, "hidden_size": first.model.hidden_size,
                  "tokens": first.model.num_tokens, "image_size": first.model.image_size,
                  "params_M": sum(p.numel() for p in first.model.parameters()) / 1e6},
        "batch_size": args.batch_size, "precision": "bf16" if device.type == "cuda" else "fp32",
    }
    for v, tr in trainers.items():
        for _ in range(args.warmup):
            tr.train_step()
    sync(device)

    block_times: dict[str, list[float]] = {v: [] for v in variants}
    block_cpu: dict[str, list[float]] = {v: [] for v in variants}  # process CPU time: immune to other processes' slices
    step_peak: dict[str, int] = {v: 0 for v in variants}
    for _round in range(args.rounds):
        for v in variants:
            tr = trainers[v]
            if device.type == "cuda":
                sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                tr.train_step()
            sync(device)
            block_times[v].append((time.perf_counter() - start) / args.steps)
            block_cpu[v].append((time.process_time() - start_cpu) / args.steps)
            if device.type == "cuda":
                step_peak[v] = max(step_peak[v], torch.cuda.max_memory_allocated(device) - base)

    results = {}
    for v in variants:
        tr = trainers[v]
        row = {
            "config": f"configs/{args.data}_{VARIANTS[v][0]}.yaml",
            "dedupe": VARIANTS[v][1],
            "step_ms_median": 1000 * statistics.median(block_times[v]),
            "step_ms_blocks": [1000 * t for t in block_times[v]],
            "method_params": sum(p.numel() for p in tr.method.parameters()),
            "resident_MiB": resident_bytes(tr) / 2**20,
        }
        if "flow_matching" in block_times:
            ratios = [a / b for a, b in zip(block_times[v], block_times["flow_matching"])]
            row["ratio_to_flow_matching"] = statistics.median(ratios)
            row["ratio_blocks"] = ratios
            if device.type == "cpu":
                cpu_ratios = [a / b for a, b in zip(block_cpu[v], block_cpu["flow_matching"])]
                row["step_cpu_ms_median"] = 1000 * statistics.median(block_cpu[v])
                row["cpu_ratio_to_flow_matching"] = statistics.median(cpu_ratios)
                row["cpu_ratio_blocks"] = cpu_ratios
        if device.type == "cuda":
            row["cuda_step_peak_MiB"] = step_peak[v] / 2**20
        row["saved_activations_MiB"] = saved_activation_bytes(tr) / 2**20
        results[v] = row

    if args.rss:
        for v in variants:
            cmd = [sys.executable, __file__, "--child", v, "--encoder-dir", str(encoder_dir), *argv_for_child(args)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            results[v].update(json.loads(out.stdout.strip().splitlines()[-1]))

    report = {
        "benchmark": "method_overhead", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(device), "device": str(device), "setup": info, "steps_per_block": args.steps,
        "rounds": args.rounds, "warmup_steps": args.warmup, "results": results,
        "memory_note": (
            "cuda_step_peak_MiB: torch.cuda.max_memory_allocated during the variant's steps minus the allocation before them"
            if device.type == "cuda" else
            "CPU: saved_activations_MiB = bytes autograd saves for backward in one training forward (saved_tensors_hooks, "
            "once per storage; excludes the teacher's transient no-grad activations); RSS = peak resident set (VmHWM) of a "
            "fresh process per variant during --steps steps, and that peak minus the RSS before them (only with --rss)"
        ),
    }
    write_report(args.out, report, markdown(report))
    return 0


def argv_for_child(args) -> list[str]:
    out = ["--data", args.data, "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--device", args.device,
           "--threads", str(args.threads), "--seed", str(args.seed), "--repa-encoder", args.repa_encoder, "--out", "unused"]
    for flag, value in (("--data-path", args.data_path), ("--size", args.size), ("--projector-dim", args.projector_dim),
                        ("--depth", args.depth), ("--hidden-size", args.hidden_size), ("--num-heads", args.num_heads)):
        if value is not None:
            out += [flag, str(value)]
    return out


def markdown(report: dict) -> str:
    m, s = report["machine"], report["setup"]
    lines = [
        f"# Method overhead ({report['device']})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m.get('gpu', m['cpu'])}; {m['cpu_count']} CPUs, torch threads {m['torch_threads']}; torch {m['torch']}; "
        f"load average at start {tuple(round(x, 2) for x in m.get('load_average_at_start', ()))}.",
        f"Model: {s['model']['size']} depth {s['model']['depth']} width {s['model']['hidden_size']} "
        f"({s['model']['params_M']:.2f}M params), {s['model']['image_size']}×{s['model']['image_size']} images, "
        f"{s['model']['tokens']} tokens; batch {s['batch_size']}; {s['precision']}. "
        f"{report['rounds']} interleaved rounds × {report['steps_per_block']} steps after {report['warmup_steps']} warm-up steps.",
        "",
    ]
    cuda = report["device"].startswith("cuda")
    rss = any("rss_step_peak_mib" in r for r in report["results"].values())
    cpu_time = any("cpu_ratio_to_flow_matching" in r for r in report["results"].values())
    head = ["variant", "dedupe", "step (ms, median)", "× flow matching (median of rounds)", "round ratios"]
    head += ["CPU step (ms)", "× flow matching (CPU time)", "round ratios (CPU time)"] if cpu_time else []
    head += ["resident MiB"]
    head += ["step peak MiB (CUDA)"] if cuda else ["saved activations MiB"]
    if rss:
        head += ["peak RSS MiB", "RSS step peak MiB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in report["results"].items():
        dedupe = "n/a" if r["dedupe"] is None else ("on" if r["dedupe"] else "off")
        cells = [name, dedupe, f"{r['step_ms_median']:.1f}", f"{r.get('ratio_to_flow_matching', float('nan')):.2f}",
                 " ".join(f"{x:.2f}" for x in r.get("ratio_blocks", []))]
        if cpu_time:
            cells += [f"{r.get('step_cpu_ms_median', float('nan')):.1f}", f"{r.get('cpu_ratio_to_flow_matching', float('nan')):.2f}",
                      " ".join(f"{x:.2f}" for x in r.get("cpu_ratio_blocks", []))]
        cells += [f"{r['resident_MiB']:.1f}"]
        cells += [f"{r['cuda_step_peak_MiB']:.0f}"] if cuda else [f"{r['saved_activations_MiB']:.1f}"]
        if rss:
            cells += [f"{r.get('rss_peak_mib', float('nan')):.0f}", f"{r.get('rss_step_peak_mib', float('nan')):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""]
    if cpu_time:
        lines += ["CPU time: `time.process_time()` of the benchmark process over the same steps (one torch thread), "
                  "so other processes' time slices on a shared machine do not enter the ratio; wall-clock ratios beside it.", ""]
    lines += [report["memory_note"], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
