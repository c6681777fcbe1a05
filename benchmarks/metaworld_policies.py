"""Meta-World: flow-matching vs Self-Flow vs regression policies from scripted-expert demonstrations.

Per task, method and training seed: train from ``configs/metaworld_<method>.yaml`` (Diffusion-Policy-style
windows: the last ``obs_horizon`` observations → a chunk of ``horizon`` actions) with ``--steps`` and
``--batch``; then success over ``--episodes`` episodes of evaluation seed = the training seed (its own
episode stream, disjoint from the demonstrations'), executing 1 action per chunk (execute-1) and
``execute`` actions (execute-k) before replanning. The scripted expert's success on the same evaluation
episodes is measured beside them. Resumable: finished trainings and evaluations are not done again.

    python benchmarks/metaworld_policies.py --out docs/benchmarks/metaworld_cpu --device cpu
    python benchmarks/metaworld_policies.py --smoke ...        (tiny sizes: the plumbing)
    python benchmarks/metaworld_policies.py --report-only ...  (the report from the JSON in --work)

Rows (``<out>.json``): task, method, execute, success (the mean over every episode of every seed), stderr
(binomial, sqrt(p(1−p)/(episodes·seeds))), episodes (per seed), seeds, per_seed, steps_trained, train_s
(per run), eval_s, observation. Rollout GIFs of seed 0 (execute-k) sit in the folder ``<out>/``.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["flow_matching", "self_flow", "regression"]


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def run_dir(args, task: str, method: str, seed: int) -> Path:
    return args.work / task / f"{method}_seed{seed}"


def overrides(args, task: str, method: str, seed: int) -> list[str]:
    return [f"modality.task={task}", f"modality.observation={args.observation}", f"modality.num_samples={args.demos}",
            f"modality.obs_image_size={args.image_size}", f"modality.max_episode_steps={args.max_steps}",
            f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.seed={seed}", "modality.seed=0",
            f"train.device={args.device}", f"train.precision={'fp32' if args.device == 'cpu' else 'auto'}",
            f"train.warmup_steps={min(100, max(1, args.steps // 10))}", "train.progress=false", "train.tensorboard=false",
            f"train.log_every={max(1, args.steps // 4)}", "train.ckpt_every=0", "train.num_sample_images=0",
            f"sample.steps={args.sample_steps}", f"train.out_dir={run_dir(args, task, method, seed)}", *args.set]


def train(args, task: str, method: str, seed: int) -> dict:
    from selfflow.config import load_config
    from selfflow.trainer import train as fit

    out = run_dir(args, task, method, seed)
    timing = out / "train_seconds.json"
    if not timing.exists():
        config = load_config(ROOT / "configs" / f"metaworld_{method}.yaml", overrides(args, task, method, seed))
        log("train", task, method, "seed", seed, "steps", config.train.steps)
        seconds = fit(config)["seconds"]
        timing.write_text(json.dumps({"seconds": seconds, "steps": config.train.steps, "batch": config.train.batch_size}))
    return json.loads(timing.read_text())


def policy_of(args, task: str, method: str, seed: int):
    from selfflow.modalities.evaluation.run import run_config_of
    from selfflow.modalities.model import load_token_generator
    from selfflow.modalities.sampling import make_policy

    model, folder, modality, run = load_token_generator(run_dir(args, task, method, seed), device=args.device)
    config = run_config_of(run, folder)
    return make_policy(model, steps=config.sample.steps, sampler=config.sample.sampler, regression=method == "regression",
                       seed=seed), modality


def expert_policy(task: str, observation: str):
    """The scripted expert as a chunk policy: the newest state is the condition's last 39 numbers (state
    observations), one action per chunk."""
    from selfflow.modalities.metaworld import STATE_DIM, expert

    scripted = expert(task)

    def policy(cond: torch.Tensor) -> torch.Tensor:
        states = cond[:, -STATE_DIM:].numpy()
        return torch.from_numpy(np.stack([np.clip(scripted.get_action(s), -1, 1) for s in states]).astype(np.float32))[:, :, None]

    return policy


def evaluate(args, task: str, method: str, seed: int, execute: int) -> dict:
    from selfflow.files import write_json
    from selfflow.modalities.metaworld import save_gif, success_rate

    folder = args.work / task / ("expert" if method == "expert" else f"{method}_seed{seed}")
    path = folder / f"eval_execute{execute}_seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    if method == "expert":
        policy, horizon = expert_policy(task, "state"), args.obs_horizon
        observation = "state"
    else:
        policy, modality = policy_of(args, task, method, seed)
        horizon, observation = modality.obs_horizon, modality.observation
    gif = args.gif_episodes if seed == args.seeds[0] and execute == args.execute and method in args.gif_methods else 0
    log("evaluate", task, method, "seed", seed, "execute", execute, "episodes", args.episodes)
    start = time.perf_counter()
    result = success_rate(policy, task=task, episodes=args.episodes, seed=seed, execute=execute, obs_horizon=horizon,
                          observation=observation, image_size=args.image_size, max_steps=args.max_steps, gif_episodes=gif,
                          progress=False)
    result["eval_s"] = time.perf_counter() - start
    frames = result.pop("frames", None)
    if frames:
        name = f"{task}_{method}.gif"
        save_gif(frames, args.out / name)
        result["gif"] = name
    write_json(result, path)
    return result


def rows_for(args, task: str, method: str, timings: dict) -> list[dict]:
    rows = []
    for execute in ([1] if method == "expert" else [args.execute] if args.skip_execute_1 else [1, args.execute]):
        per_seed = {}
        eval_s, gif = 0.0, None
        for seed in args.seeds:
            r = evaluate(args, task, method, seed, execute)
            per_seed[str(seed)] = r["success_rate"]
            eval_s += r["eval_s"]
            gif = gif or r.get("gif")
        p = sum(per_seed.values()) / len(per_seed)
        n = args.episodes * len(args.seeds)
        train_s = [t["seconds"] for t in timings.values()] if timings else []
        rows.append({"task": task, "method": method, "execute": execute, "success": p, "stderr": math.sqrt(p * (1 - p) / n),
                     "episodes": args.episodes, "seeds": len(args.seeds), "per_seed": per_seed,
                     "steps_trained": 0 if method == "expert" else args.steps,
                     "train_s": sum(train_s) / len(train_s) if train_s else 0.0, "eval_s": eval_s,
                     "observation": "state" if method == "expert" else args.observation, **({"gif": gif} if gif else {})})
    return rows


def report(args, record: dict) -> None:
    env = record["environment"]
    lines = ["# Meta-World: flow matching vs Self-Flow vs regression policies", "",
             f"Command: `{record['command']}`  ", f"Date: {record['date']}  ",
             f"Machine: {env.get('device_name')} ({env.get('torch_threads')} torch threads, {env.get('cpu_count')} CPUs), "
             f"torch {env.get('torch')}; total wall time {record.get('wall_seconds', 0) / 60:.1f} min", "",
             f"Protocol: Meta-World 3.1.1 MT1 tasks {', '.join(args.tasks)}; demonstrations: {args.demos} scripted-expert "
             f"episodes (the successful ones kept), observation `{args.observation}`"
             + (f" ({args.image_size}×{args.image_size} RGB frames of one fixed camera, through a 3-layer stride-2 CNN, "
                "with the hand's position and gripper)" if args.observation == "image" else " (the 39-number state)")
             + f", the last {args.obs_horizon} observations → a chunk of 16 actions (2 per token); "
             f"{args.steps} training steps, batch {args.batch}, depth-4 width-128 token DiT, EMA weights, Euler "
             f"{args.sample_steps} steps (regression: one step from zero). Evaluation: {args.episodes} episodes per seed × "
             f"seeds {args.seeds} (training seed = evaluation seed, episode streams disjoint from the demonstrations'), "
             f"success = `info['success']` within {args.max_steps} steps; "
             + ("" if args.skip_execute_1 else "execute-1 replans after every action, ")
             + f"execute-{args.execute} replans after {args.execute} actions. The expert runs on the state. success ± stderr: the mean over all episodes and its binomial "
             f"standard error sqrt(p(1−p)/(episodes·seeds)).", ""]
    if record.get("note"):
        lines += [record["note"], ""]
    for task in args.tasks:
        lines += [f"## {task}", "", "| method | execute | success ± stderr | per seed | episodes × seeds | steps trained | train s/run | eval s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in [r for r in record["rows"] if r["task"] == task]:
            seeds = ", ".join(f"{v:.2f}" for v in r["per_seed"].values())
            lines.append(f"| {r['method']} | {r['execute']} | {r['success']:.3f} ± {r['stderr']:.3f} | {seeds} | "
                         f"{r['episodes']} × {r['seeds']} | {r['steps_trained']} | {r['train_s']:.0f} | {r['eval_s']:.0f} |")
        gifs = [(r["method"], r["gif"]) for r in record["rows"] if r["task"] == task and r.get("gif")]
        if gifs:
            lines += ["", f"Rollouts (seed {args.seeds[0]}, execute-{args.execute}, first {args.gif_episodes} episodes):", ""]
            lines += [f"- {m}: ![{g}]({args.out.name}/{g})" for m, g in gifs]
        lines.append("")
    lines += [f"All numbers: [{args.out.name}.json]({args.out.name}.json)."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


SMOKE = {"steps": 2, "batch": 8, "demos": 2, "episodes": 2, "seeds": "0", "sample_steps": 2, "max_steps": 100,
         "tasks": "reach-v3", "gif_episodes": 1, "image_size": 32, "observation": "image"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/metaworld_cpu"))
    p.add_argument("--work", type=Path, default=Path("runs/metaworld_bench"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--tasks", default="push-v3,reach-v3")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--demos", type=int, default=100, help="expert episodes per task (the successful ones train)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--observation", default="state", choices=["state", "image"])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--obs-horizon", type=int, default=2)
    p.add_argument("--execute", type=int, default=8)
    p.add_argument("--skip-execute-1", action="store_true",
                   help="evaluate execute-k only (execute-1 costs a policy call and, with images, no fewer renders per action)")
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--sample-steps", type=int, default=16)
    p.add_argument("--gif-episodes", type=int, default=2)
    p.add_argument("--gif-methods", default=",".join(METHODS), help="whose rollouts become GIFs (each render costs)")
    p.add_argument("--set", action="append", default=[], help="more config overrides, KEY=VALUE")
    p.add_argument("--note", default="")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: the plumbing only")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.methods = [m for m in args.methods.split(",") if m]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.gif_methods = [m for m in args.gif_methods.split(",") if m]
    args.set += [f"modality.obs_horizon={args.obs_horizon}", f"modality.execute={args.execute}"]
    torch.set_num_threads(args.threads)
    from selfflow.modalities.metaworld import available

    if not available():
        raise SystemExit("benchmarks/metaworld_policies.py needs the metaworld extra: pip install 'selfflow[metaworld]' (and libosmesa6)")
    from selfflow.evaluation.metrics import environment_info

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)  # the GIF folder, beside <out>.md
    json_path = args.out.with_suffix(".json")
    start = time.perf_counter()
    previous = json.loads(json_path.read_text()) if json_path.exists() else {}
    record = {"name": args.out.name, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]), "environment": environment_info(args.device),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": [], "note": args.note}
    if args.report_only and previous:
        for key in ("command", "date", "environment", "wall_seconds", "note"):
            record[key] = previous.get(key, record.get(key))
    for task in args.tasks:
        for method in args.methods:
            if args.report_only and not all((run_dir(args, task, method, s) / "train_seconds.json").exists() for s in args.seeds):
                continue
            timings = {seed: train(args, task, method, seed) for seed in args.seeds}
            record["rows"] += rows_for(args, task, method, timings)
            if not args.report_only:
                record["wall_seconds"] = time.perf_counter() - start + previous.get("wall_seconds", 0)
            json_path.write_text(json.dumps(record, indent=2))
            report(args, record)
        record["rows"] += rows_for(args, task, "expert", {})
        json_path.write_text(json.dumps(record, indent=2))
        report(args, record)
        log("wrote", task, "->", args.out.with_suffix(".md"))
    log("done in", f"{time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
