"""One report in two forms: HTML (with figures) and its Markdown twin, and simple SVG line plots.

No plotting library: :func:`svg_line_plot` draws loss curves as a small self-contained SVG file, so a
report never depends on matplotlib. A report is a list of blocks (:class:`Report`): headings,
paragraphs, tables, images; :meth:`Report.write` renders both files from the same blocks.
"""
from __future__ import annotations

import html
import math
import os
import platform
from pathlib import Path
from typing import Sequence

import torch

from selfflow.files import atomic_file

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    step = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 5, 10):
        if raw <= mult * step:
            step *= mult
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.6g}" if value != 0 else "0"


def svg_line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], *, title: str, xlabel: str, ylabel: str,
                  width: int = 480, height: int = 300, log_y: bool = False) -> str:
    """An SVG document plotting each named (xs, ys) series as a line; non-finite points are dropped."""
    clean = {}
    for name, (xs, ys) in series.items():
        points = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(x)) and math.isfinite(float(y))
                  and (not log_y or float(y) > 0)]
        if points:
            clean[name] = points
    left, right, top, bottom = 56, 16, 28, 42
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>']
    if not clean:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>')
        return "\n".join(parts)
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [fy(y) for pts in clean.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = width - left - right, height - top - bottom

    def px(x):
        return left + (x - x0) / (x1 - x0) * pw

    def py(y):
        return top + (1 - (fy(y) - y0) / (y1 - y0)) * ph

    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    for t in _ticks(x0, x1):
        parts.append(f'<line x1="{px(t):.1f}" y1="{top + ph}" x2="{px(t):.1f}" y2="{top + ph + 4}" stroke="#888"/>'
                     f'<text x="{px(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{_fmt(t)}</text>')
    for t in _ticks(y0, y1):
        value = 10 ** t if log_y else t
        y = top + (1 - (t - y0) / (y1 - y0)) * ph
        parts.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(value)}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">{html.escape(xlabel)}</text>')
    parts.append(f'<text x="14" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {top + ph / 2})">'
                 f'{html.escape(ylabel)}</text>')
    for i, (name, pts) in enumerate(clean.items()):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        parts.append(f'<text x="{left + pw - 4}" y="{top + 14 + 13 * i}" text-anchor="end" fill="{colour}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


class Report:
    """Blocks rendered to HTML and Markdown; image paths are relative to the report's folder."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", text, level))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence]) -> None:
        self.blocks.append(("table", list(header), [list(r) for r in rows]))

    def image(self, src: str, caption: str, width: int | None = None) -> None:
        self.blocks.append(("image", src, caption, width))

    def bullets(self, items: Sequence[str]) -> None:
        self.blocks.append(("bullets", list(items)))

    # ---- rendering ---------------------------------------------------------------------------
    def html(self) -> str:
        e = html.escape
        out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{e(self.title)}</title>",
               "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.4}"
               "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:0.2em 0.6em;text-align:left}"
               "figure{margin:1em 0}figcaption{font-size:90%;color:#444}img{image-rendering:pixelated}</style>",
               "</head>", "<body>", f"<h1>{e(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                level = min(max(block[2], 2), 6)
                out.append(f"<h{level}>{e(block[1])}</h{level}>")
            elif kind == "paragraph":
                out.append(f"<p>{e(block[1])}</p>")
            elif kind == "bullets":
                out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block[1]) + "</ul>")
            elif kind == "table":
                out.append("<table>")
                out.append("<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in block[1]) + "</tr>")
                for row in block[2]:
                    out.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>")
                out.append("</table>")
            elif kind == "image":
                size = f' width="{block[3]}"' if block[3] else ""
                out.append(f'<figure><img src="{e(block[1])}" alt="{e(block[2])}"{size}>'
                           f"<figcaption>{e(block[2])}</figcaption></figure>")
        out += ["</body>", "</html>", ""]
        return "\n".join(out)

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out += ["#" * min(max(block[2], 2), 6) + " " + block[1], ""]
            elif kind == "paragraph":
                out += [block[1], ""]
            elif kind == "bullets":
                out += [f"- {item}" for item in block[1]] + [""]
            elif kind == "table":
                out.append("| " + " | ".join(str(h) for h in block[1]) + " |")
                out.append("|" + "---|" * len(block[1]))
                out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in block[2]]
                out.append("")
            elif kind == "image":
                out += [f"![{Path(block[1]).stem}]({block[1]})", "", f"*{block[2]}*", ""]
        return "\n".join(out)

    def write(self, folder: str | Path, name: str = "report") -> tuple[Path, Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return write_text(folder / f"{name}.html", self.html()), write_text(folder / f"{name}.md", self.markdown())


def machine() -> dict:
    """The machine a report's times come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
