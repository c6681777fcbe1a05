"""The parts of a Self-Flow training step outside the network, each measured against its alternative.

- EMA update: one ``lerp_`` per parameter vs one ``torch._foreach_lerp_`` over all (selfflow.ema).
- AdamW step: per-parameter loop vs foreach vs fused (the trainer uses fused, on CPUs too).
- Teacher forward to 0.7·depth: ``torch.no_grad`` vs ``torch.inference_mode``.

Alternatives run in interleaved rounds (every variant in every round); times are process CPU time
(one torch thread) so other processes on a shared machine do not enter them; median of rounds.

    python benchmarks/step_extras.py --depth 8 --hidden-size 256 --num-heads 4 --batch-size 32 --image-size 28 \\
        --out docs/benchmarks/step_extras_cpu
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from harness import machine, write_report


def cpu_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1000 * statistics.median(times)


def interleaved(variants: dict, rounds: int, repeats: int) -> dict:
    per_round = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            per_round[name].append(cpu_ms(fn, repeats))
    return {name: statistics.median(values) for name, values in per_round.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from selfflow.config import ModelConfig
    from selfflow.methods.self_flow import default_layers
    from selfflow.model import DiT

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DiT(ModelConfig(depth=args.depth, hidden_size=args.hidden_size, num_heads=args.num_heads, patch_size=2,
                            image_size=args.image_size, in_channels=1, num_classes=10))
    ema = copy.deepcopy(model).requires_grad_(False)
    pairs = [(dict(ema.named_parameters())[n], p) for n, p in model.named_parameters()]

    @torch.no_grad()
    def ema_loop():
        for target, source in pairs:
            target.lerp_(source.detach(), 0.001)

    @torch.no_grad()
    def ema_foreach():
        torch._foreach_lerp_([t for t, _ in pairs], [s.detach() for _, s in pairs], 0.001)

    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizers = {kind: torch.optim.AdamW(model.parameters(), lr=1e-4, **{kind: True} if kind != "loop" else {"foreach": False})
                  for kind in ("loop", "foreach", "fused")}

    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    x = torch.randn(args.batch_size, 1, args.image_size, args.image_size)
    t, y = torch.rand(args.batch_size), torch.randint(0, 10, (args.batch_size,))
    layer = default_layers(args.depth)[1]

    def teacher_forward(context):
        def run():
            with context():
                teacher(x, t, y, stop_after=layer)
        return run

    parts = {
        "EMA update": interleaved({"per-parameter lerp_": ema_loop, "foreach lerp_": ema_foreach}, args.rounds, 20),
        "AdamW step": interleaved({f"{k}": o.step for k, o in optimizers.items()}, args.rounds, 5),
        f"teacher forward to layer {layer}": interleaved({"no_grad": teacher_forward(torch.no_grad),
                                                           "inference_mode": teacher_forward(torch.inference_mode)}, args.rounds, 2),
    }
    kept = {"EMA update": "foreach lerp_", "AdamW step": "fused", f"teacher forward to layer {layer}": "no_grad"}
    rows = [{"part": part, "variant": name, "cpu_ms": ms, "x_first": ms / next(iter(times.values())), "kept": name == kept[part]}
            for part, times in parts.items() for name, ms in times.items()]
    report = {"benchmark": "step_extras", "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine("cpu"),
              "setup": vars(args), "rows": rows}
    m = report["machine"]
    lines = ["# The step outside the network: EMA, AdamW, teacher context (cpu)", "", f"Command: `{report['command']}`", "",
             f"Machine: {m['cpu']}; {m['cpu_count']} CPUs, torch threads {m['torch_threads']}; torch {m['torch']}; load average "
             f"at start {tuple(round(v, 1) for v in m.get('load_average_at_start', ()))}.",
             f"Model: depth {args.depth}, width {args.hidden_size}, {(args.image_size // 2) ** 2} tokens, batch {args.batch_size}; "
             f"process CPU time, median of {args.rounds} interleaved rounds.", "",
             "| part | variant | CPU ms | × first | kept |", "|---|---|---|---|---|"]
    lines += [f"| {r['part']} | {r['variant']} | {r['cpu_ms']:.1f} | {r['x_first']:.2f} | {'yes' if r['kept'] else ''} |" for r in rows]
    lines += ["", "Kept: what the trainer does (selfflow.ema, selfflow.trainer). The foreach EMA update is kept for GPUs, "
              "where it replaces one kernel launch per parameter by a few (on this CPU it is a wash). The teacher stays under no_grad unless "
              "inference_mode is clearly faster at the side-by-side size (≥ 3 %); on CUDA the teacher already runs in bf16 "
              "under the step's autocast."]
    write_report(args.out, report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
