"""What every benchmark shares: the machine record, JSON results, Markdown tables and plots.

Each script calls :func:`write_result` with its rows; the JSON lands in
``docs/benchmarks/results/<name>.json`` and a Markdown table in ``docs/benchmarks/<name>.md``
(or under ``$SELFFLOW_BENCH_DIR``), both carrying the command line and the machine (docs/methods.md#evaluation).
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# SELFFLOW_BENCH_DIR sends every result elsewhere (benchmarks/gpu_suite.sh's CPU smoke run uses it)
DOCS = Path(os.environ.get("SELFFLOW_BENCH_DIR") or ROOT / "docs" / "benchmarks").resolve()
RESULTS = DOCS / "results"


def machine(device: torch.device | str | None = None) -> dict:
    """The record of where a figure was measured (CPU, threads, load, GPU, versions)."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
    }
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    device = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        props = torch.cuda.get_device_properties(device if device is not None and device.index is not None else 0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_result(name: str, rows: list[dict], columns: list[str], title: str, notes: str = "", extra: dict | None = None) -> Path:
    """Write results/<name>.json and <name>.md; returns the Markdown path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command(), "machine": machine(), "rows": rows, **(extra or {})}
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2))
    md = [f"# {title}", "", f"Command: `{record['command']}`  ", f"Date: {record['date']}  ", f"Machine: {describe_machine(record['machine'])}", ""]
    md += markdown_table(rows, columns)
    if notes:
        md += ["", notes]
    path = DOCS / f"{name}.md"
    path.write_text("\n".join(md) + "\n")
    return path


def write_report(out: str | Path, report: dict, markdown: str) -> None:
    """``<out>.json`` (the report) and ``<out>.md`` (its Markdown), and the Markdown on stdout."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


def describe_machine(m: dict) -> str:
    text = f"{m['cpu']} ({m['cpu_threads']} threads), torch {m['torch']}"
    if m.get("gpu"):
        text = f"{m['gpu']} ({m['gpu_memory_gib']} GiB), " + text
    return text


def markdown_table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return lines


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def resolve_data_path(args) -> str | None:
    """MNIST's folder: --data-path, else the first of data/mnist, .carry/mnist."""
    if args.data != "mnist":
        return None
    candidates = [args.data_path] if args.data_path else ["data/mnist", ".carry/mnist"]
    for candidate in candidates:
        for path in (Path(candidate), ROOT / candidate):
            if path.is_dir():
                return str(path.resolve())
    raise SystemExit(f"MNIST not found in {candidates}; pass --data-path")


def timed(fn, warmup: int, repeats: int, sync=None) -> float:
    """Median seconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def cuda_sync():
    return torch.cuda.synchronize if torch.cuda.is_available() else None


def env_threads() -> None:
    threads = os.environ.get("SELFFLOW_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
