"""PushAround policies re-planning after every action: the 3000-step checkpoints of
``benchmarks/modalities.py`` (docs/benchmarks/modalities_cpu_actions3000.md, where they execute 4 actions of
each 8-action chunk) evaluated with execute = 1, 100 seeded episodes (env seeds 1000–1099).

    python benchmarks/policy_replanning.py [--work runs/modalities_bench_actions3000] [--out docs/benchmarks/modalities_cpu_actions3000_replan]

Writes ``OUT.json`` (every number, the protocol, the machine) and ``OUT.md`` (the table).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

METHODS = ("flow_matching", "self_flow", "regression")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/modalities_bench_actions3000"))
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/modalities_cpu_actions3000_replan"))
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--execute", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()
    torch.set_num_threads(1)
    from selfflow.evaluation.metrics import environment_info
    from selfflow.modalities.evaluation.actions import success_rate
    from selfflow.modalities.model import load_token_generator
    from selfflow.modalities.sampling import make_policy

    results = {}
    for method in METHODS:
        for seed in args.seeds:
            model, *_ = load_token_generator(args.work / "actions" / f"{method}_seed{seed}")
            start = time.perf_counter()
            policy = make_policy(model, steps=16, regression=method == "regression")
            results[f"{method}_seed{seed}"] = {**success_rate(policy, episodes=args.episodes, execute=args.execute, progress=False),
                                               "seconds": time.perf_counter() - start}
            print(method, seed, results[f"{method}_seed{seed}"]["success_rate"], flush=True)
    protocol = {"command": "python benchmarks/policy_replanning.py", "checkpoints": str(args.work), "episodes": args.episodes,
                "env_seeds": f"1000-{999 + args.episodes}", "execute": args.execute, "sampler": "euler, 16 steps (regression: 1 step from 0)",
                "machine": environment_info("cpu")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"protocol": protocol, "results": results}, indent=2))
    rows = ["| method | success rate (seed 0, seed 1) | mean | mode left / right (mean) |", "|---|---|---|---|"]
    for method in METHODS:
        runs = [results[f"{method}_seed{s}"] for s in args.seeds]
        rates = [r["success_rate"] for r in runs]
        left = sum(r["mode_left"] for r in runs) / len(runs)
        rows.append(f"| {method} | {', '.join(f'{x:.2f}' for x in rates)} | {sum(rates) / len(rates):.3f} | {left:.2f} / {1 - left:.2f} |")
    args.out.with_suffix(".md").write_text(
        f"# PushAround policies re-planning after every action\n\nCommand: `{protocol['command']}`; machine: "
        f"{protocol['machine'].get('device_name', 'cpu')}, torch {torch.__version__}.\n\nThe 3000-step checkpoints of "
        f"[modalities_cpu_actions3000.md](modalities_cpu_actions3000.md) (there: execute 4 of each 8-action chunk), here "
        f"executing {args.execute} action(s) per policy call, {args.episodes} episodes (env seeds {protocol['env_seeds']}), "
        f"EMA weights, the flow policies with Euler 16 steps from fresh noise per call.\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
