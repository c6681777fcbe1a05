"""The repository is self-contained: no file points at documents or folders users never get.

The equations live in docs/methods.md; the code, configs and docs point there. A pointer to a
planning document or a sibling folder outside the repository is a dead end for every user, so
this test names each one (file:line).
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Built from pieces, so that this file does not match itself.
_FORBIDDEN = ["SPEC" + r"\.md", "DATA" + r"\.md", "STYLE" + r"\.md", r"\.\./" + "shared"]
FORBIDDEN = re.compile("|".join(_FORBIDDEN))

# What the fallback walk covers when git is not available (e.g. an unpacked source archive).
WALKED = ("selfflow", "configs", "docs", "benchmarks", "tests", "README.md", "DEVELOPERS.md")
SKIPPED_DIRS = {"__pycache__", ".git", ".venv", "runs", ".carry", "node_modules"}
BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".pdf", ".npz", ".npy", ".pt", ".safetensors", ".gz", ".tgz", ".zip"}


def repository_files() -> list[Path]:
    """The files git tracks or would track (``git ls-files``), or the project's folders walked when git is absent."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
        files = [ROOT / name for name in out.decode().split("\0") if name]
        if files:
            return files
    except (OSError, subprocess.SubprocessError):
        pass
    files = []
    for entry in WALKED:
        path = ROOT / entry
        if path.is_file():
            files.append(path)
        for folder, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
            files.extend(Path(folder) / name for name in names)
    return files


def references_outside(files, root: Path = ROOT) -> list[str]:
    """'file:line: text' for every line that points outside the repository (paths relative to root)."""
    found = []
    for path in files:
        if path.suffix.lower() in BINARY_SUFFIXES or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if FORBIDDEN.search(line):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()[:160]}")
    return found


def test_nothing_points_outside_the_repository():
    found = references_outside(repository_files())
    assert not found, (
        "these lines point at files users do not have; point at docs/methods.md (or say the fact) instead:\n"
        + "\n".join(found)
    )


def test_the_check_catches_a_reference(tmp_path):
    sample = tmp_path / "module.py"
    sample.write_text('"""See ' + "SPEC" + '.md section 1."""\nx = 1\npath = "..' + "/shared" + '/data"\n')
    found = references_outside([sample], root=tmp_path)
    assert [line.split(": ", 1)[0] for line in found] == ["module.py:1", "module.py:3"]


def test_methods_page_exists_and_names_real_functions():
    """docs/methods.md is the page the code points at; every `selfflow.x.y` it names exists."""
    import importlib

    text = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    names = sorted(set(re.findall(r"`(selfflow(?:\.\w+)+)", text)))
    assert len(names) > 20
    missing = []
    for name in names:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        try:
            for attribute in parts[cut:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            missing.append(name)
    assert not missing, f"docs/methods.md names functions that do not exist: {missing}"


def _slug(heading: str) -> str:
    """A Markdown heading's anchor, as GitHub makes it: lower case, punctuation dropped, spaces → '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_into_the_methods_page_land_on_a_section():
    text = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    anchors = {_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}
    broken = []
    for path in repository_files():
        if path.suffix.lower() in BINARY_SUFFIXES or not path.is_file():
            continue
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(lines, start=1):
            for anchor in re.findall(r"methods\.md#([\w\-]+)", line):
                if anchor not in anchors:
                    broken.append(f"{path.relative_to(ROOT)}:{number}: #{anchor}")
    assert not broken, "links to sections docs/methods.md does not have:\n" + "\n".join(broken)
