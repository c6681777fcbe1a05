"""Where a Self-Flow training step's time goes, next to flow matching's: torch.profiler, CPU or CUDA.

Flow matching, dual-timestep only and Self-Flow trainers (benchmarks/method_overhead.py's
``build_trainer``: same config family, model, batch, seed) run real ``Trainer.train_step()`` calls,
interleaved: each round times one plain (unprofiled) step of every variant, then one profiled step
of every variant. Ratios are taken within a round and the median over rounds is reported, so that a
shared machine's drift hits every variant alike.

Attribution. The step is cut into labelled ranges (``record_function``) without touching the
library: hooks on the student, the teacher, the per-block adaLN MLPs and the head; wrappers around
the method's drawing functions, the conditioning, the cosine loss, ``Tensor.backward``, gradient
clipping, the optimizer and the EMA update. Every profiler event's *self* time goes to the nearest
labelled range above it; an op inside the student forward that gathers per-token modulation rows
(``aten::index``, ``aten::split``…) goes to "per-token modulation". Backward work is attributed to
the forward op that created it (autograd sequence numbers), so "head + cosine loss" and "per-token
modulation" include their own backward. Categories:

    draw                  label dropout, t/s/ε, mask, painting times onto pixels, x_τ, target
    student forward       the student's transformer forward (minus the modulation parts)
    per-token modulation  conditioning (time/label embedding, (sample, time) dedupe), the adaLN MLPs,
                          gathering the rows to tokens — forward and backward
    backward              the student transformer's backward
    teacher forward       EMA teacher, no grad, blocks 1..l_t
    head + cosine loss    projection head and 1 − cos, forward and backward
    loss, glue            flow-matching MSE and what the method does between the parts
    optimizer + EMA       clipping, AdamW, zero_grad, EMA update

    python benchmarks/self_flow_profile.py --data mnist --depth 8 --hidden-size 256 --num-heads 4 \\
        --batch-size 32 --rounds 6 --label after --out docs/benchmarks/self_flow_profile_w256d8_after
    python benchmarks/self_flow_profile.py --report docs/benchmarks/self_flow_profile_{w256d8,S}_{before,after}.json \\
        --out docs/benchmarks/self_flow_profile
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from harness import machine, resolve_data_path

VARIANTS = ["flow_matching", "dual_timestep_only", "self_flow"]
CATEGORIES = ["draw", "student forward", "per-token modulation", "backward", "teacher forward",
              "head + cosine loss", "loss, glue", "optimizer + EMA", "other"]
GATHER_OPS = ("aten::index", "aten::split", "aten::chunk", "aten::unique_dim", "aten::_unique2", "aten::sort",
              "aten::where", "aten::bmm", "aten::embedding", "aten::index_select", "aten::gather")
LABEL = "sf::"
FORWARD_BUCKET = {  # label of the nearest range → category
    "draw": "draw", "student": "student forward", "conditioning": "per-token modulation", "adaLN": "per-token modulation",
    "gather": "per-token modulation", "teacher": "teacher forward", "head": "head + cosine loss",
    "rep_loss": "head + cosine loss", "loss": "loss, glue", "optimizer": "optimizer + EMA", "ema": "optimizer + EMA",
}


# --------------------------------------------------------------------------------------------
# labelling the step
# --------------------------------------------------------------------------------------------
class Labels:
    """Open record_function ranges from hooks and wrappers; undo everything on close()."""

    def __init__(self):
        self._undo = []

    def hook(self, module: torch.nn.Module, name: str, only_with_grad: bool = False) -> None:
        stack = []

        def pre(_module, _args):
            if only_with_grad and not torch.is_grad_enabled():
                stack.append(None)
                return
            rf = record_function(LABEL + name)
            rf.__enter__()
            stack.append(rf)

        def post(_module, _args, _out):
            rf = stack.pop()
            if rf is not None:
                rf.__exit__(None, None, None)

        handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        self._undo.append(lambda: [h.remove() for h in handles])

    def wrap(self, owner, attr: str, name: str) -> None:
        if not hasattr(owner, attr):
            return
        original = getattr(owner, attr)
        had_own = attr in vars(owner) if not isinstance(owner, type) else True

        def wrapper(*args, **kwargs):
            with record_function(LABEL + name):
                return original(*args, **kwargs)

        setattr(owner, attr, wrapper)
        self._undo.append(lambda: setattr(owner, attr, original) if had_own else delattr(owner, attr))

    def close(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def label_step(trainer, labels: Labels) -> None:
    import selfflow.methods.flow_matching as fm_module
    import selfflow.methods.self_flow as sf_module

    model, method = trainer.model, trainer.method
    labels.hook(trainer.objective, "loss")
    labels.hook(model, "student", only_with_grad=True)
    labels.hook(trainer.ema.model, "teacher")
    for module in [*(b.adaLN for b in model.blocks), model.final.adaLN]:
        labels.hook(module, "adaLN", only_with_grad=True)
    labels.wrap(model, "_conditioning", "conditioning")
    labels.wrap(method, "drop_labels", "draw")
    for name in ("draw_dual_timesteps", "draw_flow", "interpolate", "velocity_target", "paint_token_times",
                 "mixed_inputs"):
        labels.wrap(sf_module, name, "draw")
        labels.wrap(fm_module, name, "draw")
    labels.wrap(sf_module, "representation_loss", "rep_loss")
    if getattr(method, "head", None) is not None:
        labels.hook(method.head, "head")
    labels.wrap(torch.Tensor, "backward", "backward")
    labels.wrap(torch.nn.utils, "clip_grad_norm_", "optimizer")
    labels.wrap(trainer.optimizer, "step", "optimizer")
    labels.wrap(trainer.optimizer, "zero_grad", "optimizer")
    labels.wrap(trainer.ema, "update", "ema")


# --------------------------------------------------------------------------------------------
# attribution
# --------------------------------------------------------------------------------------------
def nearest_label(event) -> tuple[str | None, bool]:
    """(nearest sf:: label above the event (itself included), whether a gather op lies on the way)."""
    gather = False
    node = event
    while node is not None:
        if node.name.startswith(LABEL):
            return node.name[len(LABEL):], gather
        if node.name in GATHER_OPS:
            gather = True
        node = node.cpu_parent
    return None, gather


def forward_category(label: str | None, gather: bool) -> str:
    if label == "student" and gather:
        return "per-token modulation"
    return FORWARD_BUCKET.get(label, "other")


def evaluate_ancestor(event):
    node = event
    while node is not None:
        if node.name.startswith("autograd::engine::evaluate_function"):
            return node
        node = node.cpu_parent
    return None


def attribute(events, steps: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """ms per step per category, and the top ops by self time (ms per step)."""
    seq_category: dict[int, str] = {}
    placed = []
    for event in events:
        label, gather = nearest_label(event)
        if label == "backward":
            placed.append((event, None))
            continue
        category = forward_category(label, gather)
        if event.sequence_nr is not None and event.sequence_nr >= 0 and label not in (None, "optimizer", "ema"):
            seq_category.setdefault(event.sequence_nr, category)
        placed.append((event, category))
    totals: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    for event, category in placed:
        if category is None:  # backward: the forward op that created the node decides
            node = evaluate_ancestor(event)
            forward = seq_category.get(node.sequence_nr) if node is not None else None
            category = "backward" if forward in (None, "student forward", "loss, glue", "draw") else forward
            if forward == "loss, glue":
                category = "loss, glue"
        totals[category] += event.self_cpu_time_total / 1000 / steps
        if not event.name.startswith(LABEL):
            ops[event.name] += event.self_cpu_time_total / 1000 / steps
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
    return {c: totals.get(c, 0.0) for c in CATEGORIES}, top


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def run(args) -> dict:
    from method_overhead import build_trainer
    from selfflow.data import load_dataset

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dataset = load_dataset(args.data, path=resolve_data_path(args), split="train")
    workdir = Path(tempfile.mkdtemp(prefix="selfflow-profile-"))
    trainers = {v: build_trainer(args, v, dataset, None, str(workdir / v)) for v in VARIANTS}
    first = trainers["flow_matching"]
    setup = {"depth": first.model.depth, "hidden_size": first.model.hidden_size, "num_heads": first.model.num_heads,
             "tokens": first.model.num_tokens, "image_size": first.model.image_size, "patch_size": first.model.patch_size,
             "params_M": sum(p.numel() for p in first.model.parameters()) / 1e6, "batch_size": args.batch_size,
             "precision": "bf16" if device.type == "cuda" else "fp32",
             "student_layer": trainers["self_flow"].method.student_layer,
             "teacher_layer": trainers["self_flow"].method.teacher_layer}
    for trainer in trainers.values():
        for _ in range(args.warmup):
            trainer.train_step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    plain = {v: [] for v in VARIANTS}
    plain_cpu = {v: [] for v in VARIANTS}
    profiled_events = {v: [] for v in VARIANTS}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _round in range(args.rounds):
        for v in VARIANTS:
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            trainers[v].train_step()
            sync()
            plain[v].append(time.perf_counter() - start)
            plain_cpu[v].append(time.process_time() - start_cpu)
        for v in VARIANTS:
            labels = Labels()
            label_step(trainers[v], labels)
            try:
                with profile(activities=activities) as prof:
                    trainers[v].train_step()
                    sync()
            finally:
                labels.close()
            profiled_events[v].append(prof.events())

    results = {}
    for v in VARIANTS:
        per_round = [attribute(events, 1) for events in profiled_events[v]]
        categories = {c: statistics.median(r[0][c] for r in per_round) for c in CATEGORIES}
        top: dict[str, float] = defaultdict(float)
        for _, ops in per_round:
            for name, ms in ops:
                top[name] += ms / len(per_round)
        ratios = [a / b for a, b in zip(plain[v], plain["flow_matching"])]
        cpu_ratios = [a / b for a, b in zip(plain_cpu[v], plain_cpu["flow_matching"])]
        results[v] = {
            "step_ms_median": 1000 * statistics.median(plain[v]), "step_ms": [1000 * t for t in plain[v]],
            "ratio_to_flow_matching": statistics.median(ratios), "round_ratios": ratios,
            "step_cpu_ms_median": 1000 * statistics.median(plain_cpu[v]),
            "cpu_ratio_to_flow_matching": statistics.median(cpu_ratios), "round_cpu_ratios": cpu_ratios,
            "profiled_share": {c: statistics.median(r[0][c] / sum(r[0].values()) for r in per_round) for c in CATEGORIES},
            "profiled_ms": categories, "profiled_total_ms": sum(categories.values()),
            "top_ops_ms": sorted(top.items(), key=lambda kv: -kv[1])[:12],
        }
    return {"benchmark": "self_flow_profile", "label": args.label, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine(device), "device": str(device), "setup": setup, "rounds": args.rounds,
            "warmup_steps": args.warmup, "results": results}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def section(report: dict) -> list[str]:
    s, m, res = report["setup"], report["machine"], report["results"]
    lines = [
        f"### {report['label']}: depth {s['depth']}, width {s['hidden_size']}, {s['num_heads']} heads "
        f"({s['params_M']:.1f}M), {s['tokens']} tokens, batch {s['batch_size']}, {s['precision']}",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m.get('gpu', m['cpu'])}; {m['cpu_count']} CPUs, torch threads {m['torch_threads']}; torch {m['torch']}; "
        f"load average at start {tuple(round(x, 2) for x in m.get('load_average_at_start', ()))}.  ",
        f"{report['rounds']} interleaved rounds after {report['warmup_steps']} warm-up steps; Self-Flow layers "
        f"{s['student_layer']} → {s['teacher_layer']}.",
        "",
        "Unprofiled steps: wall time and process CPU time (median of rounds), and their ratios to flow matching "
        "(median of per-round ratios). CPU time is what this process ran, so other processes' time slices on a "
        "shared machine do not enter it; it is the primary figure on a CPU.",
        "",
        "| variant | step ms (wall) | × FM (wall) | step ms (CPU) | × FM (CPU) | round ratios (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for v, r in res.items():
        lines.append(f"| {v} | {r['step_ms_median']:.0f} | {r['ratio_to_flow_matching']:.3f} | {r['step_cpu_ms_median']:.0f} | "
                     f"{r['cpu_ratio_to_flow_matching']:.3f} | " + " ".join(f"{x:.2f}" for x in r["round_cpu_ratios"]) + " |")
    lines += ["", "Profiled steps: each part's share of its own step (median over rounds) times the variant's CPU-time "
              "ratio, i.e. in units of one flow-matching step (profiled ms per step in brackets):", "",
              "| part | " + " | ".join(res) + " |", "|---|" + "---|" * len(res)]
    for c in CATEGORIES + ["total"]:
        cells = []
        for v in res:
            r = res[v]
            share = 1.0 if c == "total" else r["profiled_share"][c]
            ms = r["profiled_total_ms"] if c == "total" else r["profiled_ms"][c]
            cells.append(f"{share * r['cpu_ratio_to_flow_matching']:.3f} ({ms:.0f})")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    sf = res["self_flow"]
    lines += ["", "Self-Flow's top ops by self time (ms per step): "
              + ", ".join(f"`{name}` {ms:.0f}" for name, ms in sf["top_ops_ms"][:8]) + ".", ""]
    return lines


MARKER = "<!-- generated by benchmarks/self_flow_profile.py --report: everything below this line -->"


def summary(reports: list[dict]) -> list[str]:
    """One table: per model size and run label, the CPU-time ratios and Self-Flow's parts in FM steps."""
    lines = ["| model | run | dual-timestep / FM | Self-Flow / FM | SF: teacher | SF: head + cos | SF: per-token modulation | "
             "dual: per-token modulation |", "|---|---|---|---|---|---|---|---|"]
    for report in reports:
        s, res = report["setup"], report["results"]
        sf, dual = res["self_flow"], res["dual_timestep_only"]

        def part(r, c):
            return r["profiled_share"][c] * r["cpu_ratio_to_flow_matching"]

        lines.append(
            f"| depth {s['depth']}, width {s['hidden_size']} | {report['label']} | {dual['cpu_ratio_to_flow_matching']:.3f} | "
            f"{sf['cpu_ratio_to_flow_matching']:.3f} | {part(sf, 'teacher forward'):.3f} | {part(sf, 'head + cosine loss'):.3f} | "
            f"{part(sf, 'per-token modulation'):.3f} | {part(dual, 'per-token modulation'):.3f} |")
    return lines


def write_report(paths: list[str], out: Path) -> None:
    """<out>.md: the text above MARKER is kept (written by hand), everything below is regenerated;
    <out>.json: the runs' records in one file."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    md = out.with_suffix(".md")
    head = md.read_text().split(MARKER)[0].rstrip() + "\n\n" if md.exists() and MARKER in md.read_text() else "# Self-Flow step profile\n\n"
    lines = [MARKER, "", "## Summary (CPU-time ratios; parts in units of one flow-matching step)", ""]
    lines += summary(reports) + ["", "## Runs", ""]
    for report in reports:
        lines += section(report)
    md.write_text(head + "\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"benchmark": "self_flow_profile", "runs": reports,
                                                    "sources": [str(p) for p in paths]}, indent=2))
    print("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["digits", "mnist"], default="mnist")
    parser.add_argument("--data-path", default=None)
    parser.add_argument("--size", default=None)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--hidden-size", type=int, default=None)
    parser.add_argument("--num-heads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="run", help="a name for this run in the report (before, after)")
    parser.add_argument("--report", nargs="*", default=None, help="JSON files of earlier runs: write the Markdown only")
    parser.add_argument("--out", required=True, help="output prefix: <out>.json (a run), or <out>.md + <out>.json (--report)")
    args = parser.parse_args(argv)
    # build_trainer reads these
    args.repa_encoder, args.projector_dim = "feature_net", None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.report is not None:
        write_report(args.report, out)
        return 0
    report = run(args)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    print("\n".join(section(report)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
