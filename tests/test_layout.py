"""The package's shape: no import cycle (lazy imports included), no module over ~500 lines, no two
modules of one name that mean different things, and no code outside the detector packages reading
a dense detector's raw outputs or priors except through the contract (kdctl.models.contract)."""
from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "kdctl"
MAX_LINES = 500


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the kdctl modules it imports anywhere in its file (top level, inside functions,
    under TYPE_CHECKING): every edge a lazy import could close into a cycle."""
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from kdctl.x import y` imports module kdctl.x.y when there is one, else kdctl.x
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                found = resolve(target)
                if found and found != mod:
                    graph[mod].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_check_finds_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_imports_inside_functions():
    graph = import_graph(modules())
    # kdctl.load_detector imports the artifact module inside the function: an edge all the same
    assert "kdctl.artifact.stored" in graph["kdctl"]
    assert "kdctl.models.contract" in graph["kdctl.models.detector"]


def test_no_import_cycle_lazy_or_not():
    found = cycles(import_graph(modules()))
    assert found == [], f"import cycles: {found}"


def test_no_module_is_over_the_size_limit():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"


# one name, one meaning; the exceptions share theirs: the CLI modules are named after the command
# group they serve (cli/export.py is `kdctl export`), distill's trainer is a Trainer, and the two
# yolo modules are the YOLO dataset format and the YOLO-style family
SAME_MEANING = {"trainer.py", "yolo.py"}


def test_no_two_modules_share_a_name():
    names = Counter(p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" and p.parent.name != "cli")
    repeated = sorted(n for n, c in names.items() if c > 1 and n not in SAME_MEANING)
    assert repeated == [], f"module names used twice: {repeated}"


def test_the_package_root_holds_only_shared_utilities():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "classes.py", "errors.py", "progressbar.py", "version.py"]


# a dense detector's raw outputs, priors, decoder and head, read directly
DENSE_LAYOUT = re.compile(r'\["(cls|reg|centerness)"\]|\bPriors\b|\.flat_outputs\(|\.priors\(|\.decoder\.|\.head\.|\.neck\.')
# where the dense layout may be read: the detectors themselves, and the KD methods and the conflict
# analysis, which declare the dense capabilities they need (KDMethod.needs, analysis.sides.NEEDS)
DENSE_READERS = ("models", "distill", "analysis")


def test_nothing_else_reads_the_dense_layout():
    hits = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] in DENSE_READERS:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if DENSE_LAYOUT.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert hits == [], "\n".join(hits)
