"""The package's imports flow one way. Built from the source with ``ast``, so lazy imports inside
functions and ``TYPE_CHECKING`` blocks count too: a cycle hidden in a function is still a cycle.

    errors, files, config, checkpoint → data → model → sampling → autoencoders → frozen networks
    → methods → trainer → evaluation → command line

(the sampler sits below the trainer because the trainer draws its sample grids with it).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "selfflow"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module → the selfflow modules it imports (``from pkg import sub`` resolves to the submodule)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in files else source for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t in files and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "selfflow"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from selfflow.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from selfflow import a  # lazy, still a cycle\n")
    graph = import_graph(pkg)
    assert graph["selfflow.a"] == {"selfflow.sub.b"}
    assert graph["selfflow.sub.b"] == {"selfflow.a"}
    assert find_cycle(graph) in (["selfflow.a", "selfflow.sub.b", "selfflow.a"], ["selfflow.sub.b", "selfflow.a", "selfflow.sub.b"])
    (pkg / "sub" / "b.py").write_text("")
    assert find_cycle(import_graph(pkg)) is None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_errors_is_a_leaf():
    assert import_graph()["selfflow.errors"] == set()


# Which modules may import which: a module may import only modules of its own layer or a lower one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("selfflow", "selfflow.errors", "selfflow.files", "selfflow.config", "selfflow.distributed",
                    "selfflow.device", "selfflow.path", "selfflow.imageio", "selfflow.ema", "selfflow.shards",
                    "selfflow.fsdp", "selfflow.checkpoint", "selfflow.represent", "selfflow.arguments",
                    "selfflow.report")),  # represent: losses, augment
    ("data", ("selfflow.data", "selfflow.text", "selfflow.modalities")),  # text: captions, text encoders, captioned sets
    ("model", ("selfflow.model", "selfflow.loader", "selfflow.represent.encoders", "selfflow.interop", "selfflow.text.model",
               "selfflow.modalities.model")),  # interop: imported checkpoints
    ("sampling", ("selfflow.sampling", "selfflow.sets", "selfflow.represent.synth", "selfflow.text.generate",
                  "selfflow.modalities.sampling")),  # the trainer draws its sample grids with it
    ("autoencoders", ("selfflow.autoencoders", "selfflow.latents")),
    ("networks", ("selfflow.evaluation.frechet", "selfflow.evaluation.feature_net", "selfflow.evaluation.inception",
                  "selfflow.evaluation.inception_net", "selfflow.evaluation.features", "selfflow.encoders")),  # frozen networks REPA and evaluation share
    ("methods", ("selfflow.methods",)),
    ("trainer", ("selfflow.trainer",)),
    ("evaluation", ("selfflow.evaluation", "selfflow.represent.probes", "selfflow.text.evaluation",
                    "selfflow.modalities.evaluation")),
    ("pipeline", ("selfflow.pipeline", "selfflow.pipeline_report")),  # every stage above, run in order; its report
    ("api", ("selfflow.api", "selfflow.hub")),  # the Python API; hub: the diffusers pipeline (load, Generator.sample, train); the package re-exports it
    ("serve", ("selfflow.serve",)),  # a generator behind HTTP (the command itself is selfflow.serve.cli)
    ("cli", ("selfflow.quickstart", "selfflow.evaluation.cli", "selfflow.represent.cli", "selfflow.text.cli", "selfflow.modalities.cli", "selfflow.serve.cli", "selfflow.cli", "selfflow.__main__")),
]


def layer_of(module: str) -> int:
    """The layer whose longest matching prefix names the module (``selfflow.data.idx`` → data)."""
    if module == "selfflow":  # the package's __init__ re-exports the Python API (selfflow.api), on first use
        return [name for name, _ in LAYERS].index("api")
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} has no layer in tests/test_architecture.py: place it in LAYERS")
    return best


def test_imports_flow_one_way():
    graph = import_graph()
    upward = []
    for module, edges in sorted(graph.items()):
        for target in sorted(edges):
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports against the flow:\n" + "\n".join(upward)


def test_library_modules_never_import_command_line_modules():
    graph = import_graph()
    cli = {"selfflow.cli", "selfflow.evaluation.cli", "selfflow.quickstart"}
    offenders = sorted(f"{m} → {t}" for m, edges in graph.items() if m not in cli and m != "selfflow.__main__"
                       for t in edges if t in cli)
    assert not offenders, offenders


@pytest.mark.parametrize("module", ["selfflow.data", "selfflow.shards", "selfflow.files", "selfflow.checkpoint"])
def test_storage_and_data_never_import_sampling_or_training(module):
    graph = import_graph()
    reach, todo = set(), [m for m in graph if m == module or m.startswith(module + ".")]
    while todo:
        m = todo.pop()
        if m in reach:
            continue
        reach.add(m)
        todo.extend(graph.get(m, ()))
    assert not reach & {"selfflow.sampling", "selfflow.trainer", "selfflow.methods", "selfflow.cli"}, sorted(reach)
