"""The package's layering, read from the source with `ast` (nothing is imported).

The rule for imports: an edge A -> B exists when module A has an import statement naming B anywhere in its
file, at module level or inside a function (a deferred import still couples A to B; deferring only hides
a cycle until the day someone moves the line up). Importing `pkg.sub.mod` also runs `pkg/__init__.py` and
`pkg/sub/__init__.py`, so it is an edge to those packages too. Imports under `if TYPE_CHECKING:` never run
and do not count. Third-party imports (optional dependencies included) are not nodes: only `llama3.*`
modules are. With that graph:

- there is no cycle;
- `llama3.model` imports nothing of ours but `llama3.config`, and nothing outside torch and the standard
  library (the model file reads top to bottom as single-device PyTorch);
- the layers below the applications (inference, train, checkpoint, eval, data) never reach `serve` or `cli`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
LOWER_LAYERS = ("llama3.inference", "llama3.train", "llama3.checkpoint", "llama3.eval", "llama3.data")
APPLICATIONS = ("llama3.serve", "llama3.cli")


def _modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package __init__)."""
    found = {}
    for path in (root / package).rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _runtime_imports(tree: ast.AST):
    """Import nodes that can run: all of them but those under `if TYPE_CHECKING:`."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            todo.extend(node.orelse)  # the guarded body never runs
        else:
            todo.extend(ast.iter_child_nodes(node))


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Absolute dotted names an import statement refers to (a `from X import y` gives X.y and X)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    return [origin] + [f"{origin}.{alias.name}" for alias in node.names]


def import_graph(root: Path, package: str = "llama3") -> dict[str, set[str]]:
    """Module -> the package's modules it imports (see the module docstring for the rule)."""
    modules = _modules(root, package)
    graph: dict[str, set[str]] = {}
    for module, (path, is_package) in modules.items():
        targets: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            for name in _imported_names(node, module, is_package):
                parts = name.split(".")
                # the module itself (or the package an attribute import names) and every package above it
                targets.update(".".join(parts[:i]) for i in range(1, len(parts) + 1)
                               if ".".join(parts[:i]) in modules)
        own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        graph[module] = targets - own_packages - {module}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def _describe(cycle: list[str], graph: dict[str, set[str]]) -> str:
    edges = [f"{a} -> {b}" for a in cycle for b in sorted(graph[a]) if b in cycle]
    return "; ".join(edges)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(PACKAGE_ROOT)


def test_the_package_has_no_import_cycle(graph):
    assert "llama3.train.loop" in graph and len(graph) > 50  # the walk found the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + " | ".join(_describe(c, graph) for c in cycles)


def test_the_checker_finds_cycles_deferred_imports_and_package_inits(tmp_path):
    """The rule's cases on a made-up package: a cycle through a function-level import, one through a
    package __init__, and a TYPE_CHECKING import that does not count."""
    pkg = tmp_path / "llama3"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from .b import g\n",
        "b.py": "from llama3.a import f\n",
        "sub/__init__.py": "from .inner import x\n",
        "sub/inner.py": "from ..c import y\n",
        "c.py": "from llama3.sub.other import z\n",
        "sub/other.py": "",
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import q\n",
        "e.py": "from . import d\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    fake = import_graph(tmp_path)
    assert sorted(find_cycles(fake)) == [["llama3.a", "llama3.b"],
                                         ["llama3.c", "llama3.sub", "llama3.sub.inner"]]


def test_model_imports_only_its_config(graph):
    assert graph["llama3.model"] == {"llama3.config"}
    path = PACKAGE_ROOT / "llama3" / "model.py"
    outside = set()
    for node in _runtime_imports(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            continue
        for name in _imported_names(node, "llama3.model", False)[:1 if isinstance(node, ast.ImportFrom) else None]:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in ("torch", "__future__"):
                outside.add(name)
    assert not outside, f"model.py imports {sorted(outside)}; it may use torch and the standard library only"


@pytest.mark.parametrize("layer", LOWER_LAYERS)
def test_lower_layers_never_reach_the_server_or_the_cli(graph, layer):
    members = [m for m in graph if m == layer or m.startswith(layer + ".")]
    assert members
    bad = sorted(f"{m} -> {t}" for m in members for t in graph[m]
                 if any(t == app or t.startswith(app + ".") for app in APPLICATIONS))
    assert not bad, f"{layer} imports the applications: {bad}"


def test_the_distributed_package_loads_its_parts_on_first_use():
    """`llama3 generate` asks `distributed.mesh` whether torchrun started it; that must not import the
    parallelize stack (FSDP, tensor parallel), which costs most of a second of every start."""
    code = ("import sys, llama3.distributed.mesh as mesh\n"
            "assert isinstance(mesh.launched_by_torchrun(), bool)\n"
            "assert 'llama3.distributed.parallelize' not in sys.modules, 'mesh pulled in parallelize'\n"
            "import llama3.distributed as d\n"
            "assert callable(d.check_tp_shapes) and 'llama3.distributed.parallelize' in sys.modules\n"
            "try:\n    d.no_such_name\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no error')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
