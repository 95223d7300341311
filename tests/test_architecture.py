"""The package's imports run one way (docs/architecture.md, "Import structure"): no module
imports, even inside a function, a module of a higher layer or of its own layer's cycle.
Imports under ``if TYPE_CHECKING:`` (annotations only) do not count."""
import ast
from pathlib import Path

import spikegrad

PACKAGE = Path(spikegrad.__file__).parent

# highest first; a module may import only modules of lower layers (or of its own, acyclically)
LAYERS = [
    {"__main__", "cli"},
    {"ablation", "bench"},
    {"train"},
    {"callbacks", "plots", "report", "nir", "tracking"},
    {"tandem"},
    {"checkpoint"},
    {"config"},
    {"methods"},
    {"shortcut", "monitor", "distributed", "schedules", "losses"},
    {"models"},
    {"layers", "data"},
    {"neuron"},
    {"kernels", "memory", "surrogate"},
    {"registry", "defaults"},
]


def _group(path: Path) -> str:
    """The top-level name of a module file (``kernels/lif.py`` -> ``kernels``)."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0] if rel.parts[0] != "__init__" else "__init__"


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in ast.walk(node):
                lines.add(getattr(child, "lineno", -1))
    return lines


def _imports(path: Path) -> set[str]:
    """Top-level package modules that ``path`` imports anywhere (relative or absolute)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for spikegrad/x.py
    found = set()
    for node in ast.walk(tree):
        if node.lineno in skip if hasattr(node, "lineno") else False:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "spikegrad":
                    continue
                names = parts[1:2] or [a.name for a in node.names]
            elif node.level == depth + 1:  # relative to the package root
                names = (node.module or "").split(".")[:1] if node.module else [a.name for a in node.names]
            else:  # within a subpackage
                continue
            found.update(n for n in names if n)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "spikegrad" and len(parts) > 1:
                    found.add(parts[1])
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        group = _group(path)
        if group == "__init__":
            continue
        graph.setdefault(group, set()).update(_imports(path) - {group, "__version__"})
    return graph


def test_every_module_has_a_layer():
    known = set().union(*LAYERS)
    assert set(_graph()) <= known, sorted(set(_graph()) - known)


def test_imports_point_down_the_layers():
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    upward = [(a, b) for a, targets in _graph().items() for b in targets if layer[b] < layer[a]]
    assert not upward, f"imports against the layering (module -> imported): {sorted(upward)}"


def test_there_is_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [node, nxt])}")
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_kernels_import_one_way():
    kernels = PACKAGE / "kernels"
    uses = {p.stem: {a.name for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ImportFrom)
                     and n.level == 1 for a in n.names} | {n.module for n in ast.walk(ast.parse(p.read_text()))
                     if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}
            for p in kernels.glob("*.py")}
    for a, targets in uses.items():
        for b in targets:
            assert a not in uses.get(b, set()), f"kernels/{a}.py and kernels/{b}.py import each other"
