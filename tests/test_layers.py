"""The package's layers point one way (docs/architecture.md): checked from the source, every import counted.

Both top-level and function-level imports of ``ssah_plugin`` modules are read (a lazy import must not hide an
upward dependency or a cycle); imports under ``if TYPE_CHECKING:`` are type-only and skipped.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ssah_plugin

PKG = Path(ssah_plugin.__file__).parent

# Lowest first. A module may import its own layer or lower ones. The package root (public names, lazily) and
# ``__main__`` sit above everything.
LAYERS = [
    {"errors", "_version"},
    {"data"},
    {"core"},
    {"io"},
    {"hosts"},
    {"evaluation"},
    {"locate"},
    {"recipes"},
    {"integrations", "cli"},
    {"testing"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path) -> set[str]:
    """Every ``ssah_plugin.*`` module that ``path`` imports at run time (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "ssah_plugin")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] == "ssah_plugin":
                out.add(mod)
                for a in node.names:  # ``from ssah_plugin.core import mask`` imports a module too
                    if (PKG.parent / (mod + "." + a.name).replace(".", "/")).with_suffix(".py").is_file():
                        out.add(mod + "." + a.name)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}
GRAPH = {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def test_every_layer_is_known():
    unknown = {_layer(m) for m in MODULES} - set(RANK) - {None, "__main__"}
    assert not unknown, f"packages without a layer in tests/test_layers.py and docs/architecture.md: {unknown}"


def test_no_upward_imports():
    bad = []
    for mod, deps in GRAPH.items():
        layer = _layer(mod)
        if layer not in RANK:  # the package root and __main__ may import anything
            continue
        for dep in deps:
            dl = _layer(dep)
            root = dep == "ssah_plugin" and RANK[layer] < RANK["integrations"]  # the public API serves the top
            if root or (dl in RANK and RANK[dl] > RANK[layer]):
                bad.append(f"{mod} ({layer}) imports {dep} ({dl or 'the package root'})")
    assert not bad, "imports that point upward:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    """No cycle among modules, counting function-level imports (a lazy import must not hide one)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                dfs(dep)
        stack.pop()
        state[node] = 2

    for mod in sorted(GRAPH):
        if mod not in state:
            dfs(mod)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("framework", ["transformers", "peft", "deepspeed", "trl", "accelerate"])
def test_core_is_framework_free(framework):
    """``ssah_plugin.core`` needs only torch and safetensors (hosts bring the frameworks)."""
    users = []
    for name, path in MODULES.items():
        if _layer(name) != "core":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == framework for n in names):
                users.append(name)
    assert not users, f"core modules importing {framework}: {sorted(set(users))}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checker itself: a core module importing a host is found (so the tests above can fail)."""
    fake = PKG / "core" / "_layer_probe_tmp.py"
    fake.write_text("def f():\n    from ssah_plugin.hosts.callback import SSAHCallback\n", encoding="utf-8")
    try:
        assert "ssah_plugin.hosts.callback" in _imports(fake)
    finally:
        fake.unlink()
