"""The packages import downward only (DESIGN.md, "Who owns what").

Every module's imports are read from its source (top level and inside functions alike, so a
lazy import does not hide a dependency), and the test fails on:
- an import of one of our packages that its layer does not allow (`node/` is imported by
  nothing; `archive/` imports none of our packages);
- an import cycle between modules;
- pynetdicom imported outside `scp/`, aiohttp outside `viewer/`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("archive", "certs", "gpu_workers", "scp", "router", "viewer", "node")
# what each package may import of ours; node/ wires everything and is imported by nothing
ALLOWED = {
    "archive": set(),
    "certs": set(),
    "gpu_workers": {"archive"},
    "scp": {"archive", "certs"},
    "router": {"archive", "scp", "gpu_workers"},
    "viewer": {"archive", "scp", "router", "gpu_workers"},
    "node": {"archive", "certs", "gpu_workers", "scp", "router", "viewer"},
}
ONLY_IN = {"pynetdicom": "scp", "aiohttp": "viewer"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            found.append((node.lineno, stem))
            found += [(node.lineno, f"{stem}.{alias.name}") for alias in node.names]   # a submodule, if it is one
    return found


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


MODULES = _sources()


def test_the_packages_are_all_read():
    assert {name.split(".")[0] for name in MODULES} == set(PACKAGES)
    assert "archive.index" in MODULES and "node.cli" in MODULES


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_the_packages_below_it(package):
    wrong = []
    for name, path in MODULES.items():
        if name.split(".")[0] != package:
            continue
        for line, target in _imports(path):
            top = target.split(".")[0]
            if top in PACKAGES and top != package and top not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
            if top in ONLY_IN and ONLY_IN[top] != package:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} (only {ONLY_IN[top]}/ may)")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_no_module_imports_itself_through_others():
    graph = {name: sorted({t for _, t in _imports(path) if t in MODULES and t != name})
             for name, path in MODULES.items()}
    # a package's __init__ importing its own modules is how a package exports them, not a cycle
    for name in graph:
        graph[name] = [t for t in graph[name] if not (name + ".").startswith(t + ".") or t == name]
    cycles, state, stack = [], {}, []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for target in graph[name]:
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_reader_sees_lazy_and_relative_imports(tmp_path):
    """What the rules above read: an import inside a function, and a relative one, resolved."""
    source = tmp_path / "probe.py"
    source.write_text("from . import ingest\nfrom ..node.config import load\n\n\ndef f():\n    import aiohttp.web\n")
    found = _imports(source, "archive.probe")
    assert {(1, "archive.ingest"), (2, "node.config"), (6, "aiohttp.web")} <= set(found), found
