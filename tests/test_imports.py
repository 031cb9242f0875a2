"""Every mythos_rt module imports, and no two of the package's modules import each other,
directly or through others — counting imports inside functions too (a lazy import only
hides a cycle)."""

import ast
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import mythos_rt


def _modules() -> dict[str, Path]:
    found = {"mythos_rt": Path(mythos_rt.__file__)}
    for info in pkgutil.walk_packages(mythos_rt.__path__, "mythos_rt."):
        found[info.name] = Path(importlib.util.find_spec(info.name).origin)
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = (f"{base}.{node.module}" if node.module else base) if node.level \
                else node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in modules and m != name}


def _cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of module names, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_every_module_imports():
    for name in _modules():
        try:
            importlib.import_module(name)
        except ImportError as exc:  # only the optional CUDA extension may be missing
            assert "mythos_rt._C" in str(exc), f"{name}: {exc}"


def test_no_import_cycle_between_the_package_modules():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["mythos_rt.compiler"] >= {"mythos_rt.runtime", "mythos_rt.artifact"}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
