"""The package's shape, read from its own imports: stage packages in the order data flows, no import
circles, and Ray imported by the distributed layer alone (the stages stay plain functions on arrays)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "boneage"
STAGES = ("data", "registration", "model", "validation", "clinical", "distributed", "run")


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p): p for p in root.rglob("*.py")}


def imported(name: str, path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function-level imports count: they are still a need),
    relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


def graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the package's modules it imports; a package's own __init__ is not counted as a need of
    its submodules (importing `boneage.run.checks` runs `boneage.run` first, whatever the code says)."""
    return {m: {d for d in imported(m, p) if d in mods and d != m and not m.startswith(d + ".")}
            for m, p in mods.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(u: str, path: list[str]) -> None:
        state[u] = 1
        path.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == 1:
                found.append(path[path.index(v):] + [v])
            elif not state.get(v):
                visit(v, path)
        path.pop()
        state[u] = 2

    for m in sorted(edges):
        if not state.get(m):
            visit(m, [])
    return found


def test_the_tree_shows_the_stages():
    for stage in STAGES:
        assert (PACKAGE / stage / "__init__.py").is_file(), stage
        assert ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text())), f"{stage}: say what it holds"
    flat = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    # Above the stages: what joins them (score, bundle, report, the CLI) and what all of them share.
    assert flat == ["bundle", "cli", "config", "errors", "progress", "score"]


def test_no_import_circles():
    assert circles(graph(modules())) == []


def test_the_circle_check_finds_one(tmp_path):
    """The check itself can fail: two modules that import each other are a circle."""
    pkg = tmp_path / "boneage"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from boneage.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from boneage.sub.a import x\n")
    mods = {module_name_in(p, tmp_path): p for p in pkg.rglob("*.py")}
    assert circles(graph(mods)) == [["boneage.sub.a", "boneage.sub.b", "boneage.sub.a"]]


def module_name_in(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


@pytest.mark.parametrize("name", sorted(m for m in modules() if not m.startswith("boneage.distributed")))
def test_only_the_distributed_layer_imports_ray(name):
    needs = imported(name, modules()[name])
    assert not {m for m in needs if m == "ray" or m.startswith("ray.")}, \
        f"{name} imports ray: move the Ray part into boneage/distributed/"
