"""torch.compile on the training step: graph breaks, recompiles, compile time, eager vs compiled step time.

Each method (flow matching, Self-Flow) is built twice as a real ``Trainer`` from ``configs/<data>_<method>.yaml``
with the same model, batch and seed: eager (``train.compile=false``) and compiled (``train.compile=true``:
the method's draws eager, the rest of the step — student and teacher forwards, losses and, through
AOTAutograd, the backward — one graph compiled with ``fullgraph=True``; selfflow.trainer.compiled_objective).
A "step" is ``Trainer.train_step()`` (forward, backward, clipping, AdamW, EMA update), every step with
new times, masks and labels.

- ``graph_breaks``, ``graphs``: ``torch._dynamo.explain`` of the method's compute on one drawn batch.
- ``compile_s``: wall and CPU seconds of the compiled variant's first step minus one eager step of the same
  method (Inductor's caches off, one compile thread; CPU time includes the C++ compiler's child processes).
- ``recompiles``: graphs Dynamo compiled after the warm-up steps (``counters["stats"]["unique_graphs"]``),
  over ``steps_after_warmup`` steps with changing masks.
- Times: variants run in interleaved rounds (every variant in every round) so that load drift on a shared
  machine hits them alike; per-round ratios, median over rounds. On a CPU the ratios use the process's CPU
  time (``time.process_time()`` plus finished children, one torch thread): other processes' time slices do not enter it.

    python benchmarks/compile.py --data mnist --depth 8 --hidden-size 256 --num-heads 4 --batch-size 32 \\
        --device cpu --threads 1 --out docs/benchmarks/compile_cpu
    python benchmarks/compile.py --data mnist --size S --batch-size 256 --device cuda --out docs/benchmarks/compile_cuda
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness import machine, resolve_data_path, write_report

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("flow_matching", "self_flow")


def build_trainer(args, method: str, compiled: bool, dataset, out_dir: str):
    from selfflow.config import load_config
    from selfflow.trainer import Trainer

    overrides = [
        f"train.batch_size={args.batch_size}", f"train.device={args.device}", f"train.seed={args.seed}",
        f"train.out_dir={out_dir}", "train.progress=false", "train.tensorboard=false", "train.num_sample_images=0",
        "train.ckpt_every=0", "train.log_every=1000000", "train.warmup_steps=1",
        f"train.precision={'bf16' if args.device.startswith('cuda') else 'fp32'}",
        f"train.compile={str(compiled).lower()}", f"train.compile_mode={args.compile_mode}",
    ]
    if args.size:
        overrides += [f"model.size={args.size}", "model.depth=null", "model.hidden_size=null", "model.num_heads=null"]
    for key in ("depth", "hidden_size", "num_heads"):
        if getattr(args, key, None):
            overrides += [f"model.{key}={getattr(args, key)}"]
    if args.data == "mnist":
        overrides += [f"data.path={resolve_data_path(args)}"]
    return Trainer(load_config(ROOT / "configs" / f"{args.data}_{method}.yaml", overrides), dataset=dataset)


def explain_step(trainer) -> dict:
    """Graphs and breaks of the method's compute (what the compiled trainer compiles) on one batch."""
    method, model = trainer.method, trainer.model
    _, batch = next(trainer._micro_batches())
    explanation = torch._dynamo.explain(method.compute)(model, batch.x0, method.draw(model, batch))
    return {"graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count,
            "break_reasons": sorted({str(b.reason).splitlines()[0] for b in explanation.break_reasons})}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (Inductor's C++ compiler runs as a child)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed_steps(trainer, steps: int, device: torch.device) -> tuple[float, float]:
    """(wall s, CPU s) per step over ``steps`` steps."""
    sync(device)
    start, start_cpu = time.perf_counter(), cpu_seconds()
    for _ in range(steps):
        trainer.train_step()
    sync(device)
    return (time.perf_counter() - start) / steps, (cpu_seconds() - start_cpu) / steps


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--data-path", default=None)
    parser.add_argument("--size", default=None, help="model size (tiny, S, B, ...); default: the config's")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--hidden-size", type=int, default=None)
    parser.add_argument("--num-heads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eager-steps", type=int, default=2, help="timed eager steps per variant per round")
    parser.add_argument("--compiled-steps", type=int, default=6, help="timed compiled steps per variant per round")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing (the compiled variants compile in the first)")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output prefix: writes <out>.json and <out>.md")
    args = parser.parse_args(argv)

    import torch._inductor.config as inductor_config
    from selfflow.data import load_dataset

    torch.set_num_threads(args.threads)
    inductor_config.compile_threads = 1  # the compile's CPU time stays in this process
    inductor_config.fx_graph_cache = False  # a cold compile every run: compile_s means the same each time
    if hasattr(inductor_config, "autotune_local_cache"):
        inductor_config.autotune_local_cache = False
    device = torch.device(args.device)
    dataset = load_dataset(args.data, path=resolve_data_path(args), split="train")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="selfflow-compile-"))
    variants = [(m, c) for c in (False, True) for m in methods]
    trainers = {v: build_trainer(args, v[0], v[1], dataset, str(workdir / f"{v[0]}_{v[1]}")) for v in variants}
    first = trainers[variants[0]]

    explained = {m: explain_step(trainers[(m, False)]) for m in methods}
    torch._dynamo.reset()
    first_step: dict = {}
    for v in variants:  # eager first: the compiled variant's first step minus an eager one is the compile
        wall, cpu = timed_steps(trainers[v], 1, device)
        first_step[v] = (wall, cpu)
        timed_steps(trainers[v], args.warmup - 1, device) if args.warmup > 1 else None
    warm_graphs = graphs_compiled()

    wall: dict = {v: [] for v in variants}
    cpu: dict = {v: [] for v in variants}
    for _round in range(args.rounds):
        for v in variants:
            w, c = timed_steps(trainers[v], args.compiled_steps if v[1] else args.eager_steps, device)
            wall[v].append(w)
            cpu[v].append(c)
    recompiles = graphs_compiled() - warm_graphs
    clock = cpu if device.type == "cpu" else wall  # what the ratios are taken on

    rows = []
    for m, compiled in variants:
        v = (m, compiled)
        fm = (methods[0], compiled)
        eager = (m, False)
        row = {
            "method": m, "compiled": compiled, "compile_mode": args.compile_mode if compiled else "",
            "graphs": explained[m]["graphs"], "graph_breaks": explained[m]["graph_breaks"],
            "eager_ms": 1000 * statistics.median(clock[eager]), "compiled_ms": 1000 * statistics.median(clock[v]) if compiled else None,
            "step_ms": 1000 * statistics.median(clock[v]), "step_wall_ms": 1000 * statistics.median(wall[v]),
            "ratio_to_flow_matching": statistics.median(a / b for a, b in zip(clock[v], clock[fm])),
            "compiled_over_eager": statistics.median(a / b for a, b in zip(clock[v], clock[eager])) if compiled else None,
            "round_ratios_to_flow_matching": [a / b for a, b in zip(clock[v], clock[fm])],
        }
        if compiled:
            row["compile_s"] = first_step[v][0] - first_step[eager][0]
            row["compile_cpu_s"] = first_step[v][1] - first_step[eager][1]
            row["recompiles"] = recompiles  # over every compiled variant's steps after warm-up
            row["steps_after_warmup"] = args.warmup - 1 + args.rounds * args.compiled_steps
        rows.append(row)

    report = {
        "benchmark": "compile", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(device), "device": str(device),
        "setup": {"depth": first.model.depth, "hidden_size": first.model.hidden_size, "tokens": first.model.num_tokens,
                  "image_size": first.model.image_size, "batch_size": args.batch_size,
                  "params_M": sum(p.numel() for p in first.model.parameters()) / 1e6,
                  "precision": "bf16" if device.type == "cuda" else "fp32", "clock": "process CPU time" if device.type == "cpu" else "wall",
                  "rounds": args.rounds, "eager_steps_per_round": args.eager_steps, "compiled_steps_per_round": args.compiled_steps,
                  "warmup_steps": args.warmup},
        "break_reasons": {m: explained[m]["break_reasons"] for m in methods},
        "rows": rows,
    }
    write_report(args.out, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    s, m = report["setup"], report["machine"]
    lines = [
        f"# torch.compile of the training step ({report['device']})", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {m['cpu']}; {m['cpu_count']} CPUs, torch threads {m['torch_threads']}; torch {m['torch']}; "
        f"load average at start {tuple(round(x, 1) for x in m.get('load_average_at_start', ()))}"
        + (f"; {m['gpu']}" if m.get("gpu") else "") + ".",
        f"Model: depth {s['depth']}, width {s['hidden_size']} ({s['params_M']:.2f}M params), {s['image_size']}×{s['image_size']} "
        f"images, {s['tokens']} tokens; batch {s['batch_size']}; {s['precision']}. {s['rounds']} interleaved rounds of "
        f"{s['eager_steps_per_round']} eager / {s['compiled_steps_per_round']} compiled steps after {s['warmup_steps']} warm-up "
        f"steps; step times are {s['clock']}.", "",
        "| method | compiled | graphs | graph breaks | eager ms | compiled ms | compiled / eager | × flow matching (same mode) "
        "| compile s (wall) | compile s (CPU) | recompiles after warm-up | steps after warm-up | step wall ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, p=1: "" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))  # noqa: E731
    for r in report["rows"]:
        lines.append(f"| {r['method']} | {'yes' if r['compiled'] else 'no'} | {r['graphs']} | {r['graph_breaks']} | "
                     f"{fmt(r['eager_ms'])} | {fmt(r['compiled_ms'])} | {fmt(r['compiled_over_eager'], 3)} | "
                     f"{fmt(r['ratio_to_flow_matching'], 3)} | {fmt(r.get('compile_s'))} | {fmt(r.get('compile_cpu_s'))} | "
                     f"{fmt(r.get('recompiles'))} | {fmt(r.get('steps_after_warmup'))} | {fmt(r['step_wall_ms'])} |")
    lines += ["", "Graphs and breaks: `torch._dynamo.explain` of the method's compute (everything after the random draws: "
              "student forward, teacher forward to its layer, losses). Ratios: per round, median over rounds."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
