"""The module import map of lab/ and grafts/, counting imports inside functions, and its cycles.

    python scripts/import_graph.py            # the map (module: what it imports), then cycles
    python scripts/import_graph.py --check    # exit 1 on an import cycle, a private name used across
                                              # modules or an import of a package module/name that does not exist

Every `import` / `from ... import` at any depth of every .py file is an edge to the package
modules it names (`from lab import spec` is an edge to lab.spec). A package's own `__init__`
is not counted as a dependency of its submodules (Python imports it first anyway), so
`from lab.cli.common import x` is an edge to lab.cli.common only. tests/test_architecture.py
runs the same checks.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("lab", "grafts")
ROOT = Path(__file__).resolve().parent.parent


def modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages."""
    out = {}
    for pkg in packages:
        for p in sorted((root / pkg).rglob("*.py")):
            parts = p.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(target module, names imported from it, line) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                found.append((a.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            plain = []
            for a in node.names:
                if f"{mod}.{a.name}" in mods:  # `from pkg import submodule`
                    found.append((f"{mod}.{a.name}", [], node.lineno))
                else:
                    plain.append(a.name)
            if plain:
                found.append((mod, plain, node.lineno))
    return found


def _owner(target: str, mods: dict[str, Path]) -> str | None:
    while target and target not in mods:
        target = target.rpartition(".")[0]
    return target or None


def graph(root: Path = ROOT) -> dict[str, list[str]]:
    """Module -> sorted list of the package modules it imports (anywhere in the file)."""
    mods = modules(root)
    out = {}
    for name, path in mods.items():
        deps = set()
        for target, _, _ in _imports(name, path, mods):
            owner = _owner(target, mods)
            if owner and owner != name and not name.startswith(owner + "."):  # not self, not own package
                deps.add(owner)
        out[name] = sorted(deps)
    return out


def find_cycle(g: dict[str, list[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in g.get(n, []):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state:
                c = visit(d)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def private_uses(root: Path = ROOT) -> list[str]:
    """`from other_module import _name` and `other_module._name` across package modules."""
    mods = modules(root)
    bad = []
    for name, path in mods.items():
        aliases: dict[str, str] = {}  # local name -> package module
        for target, names, line in _imports(name, path, mods):
            owner = _owner(target, mods)
            if owner is None or owner == name:
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{path.relative_to(root)}:{line}: imports {owner}.{n}")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    full = a.name if isinstance(node, ast.Import) else f"{node.module}.{a.name}"
                    if node.__class__ is ast.ImportFrom and node.level:
                        continue
                    if full in mods and full != name:
                        aliases[a.asname or (a.name if isinstance(node, ast.ImportFrom) else a.name.split(".")[0])] = (
                            full
                        )
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{path.relative_to(root)}:{node.lineno}: uses {aliases[node.value.id]}.{node.attr}")
    return bad


def _top_level_names(path: Path) -> set[str]:
    """Names a module defines at its top level (functions, classes, assignments, imports)."""
    names: set[str] = set()

    def scan(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                scan(node.body)
                scan(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    scan(h.body)
                scan(getattr(node, "finalbody", []))

    scan(ast.parse(path.read_text()).body)
    return names


def unresolved(root: Path = ROOT) -> list[str]:
    """Imports of package modules or names that do not exist (a module moved, a name renamed)."""
    mods = modules(root)
    bad = []
    for name, path in mods.items():
        for target, names, line in _imports(name, path, mods):
            if target.split(".")[0] not in PACKAGES:
                continue
            where = f"{path.relative_to(root)}:{line}"
            if target not in mods:
                bad.append(f"{where}: no module {target}")
                continue
            defined = _top_level_names(mods[target])
            bad.extend(f"{where}: {target} has no {n}" for n in names if n != "*" and n not in defined)
    return bad


def main(argv: list[str]) -> int:
    g = graph()
    if "--check" not in argv:
        for k, v in g.items():
            print(f"{k}: {', '.join(v)}")
    cycle = find_cycle(g)
    priv = private_uses()
    missing = unresolved()
    if cycle:
        print("import cycle: " + " -> ".join(cycle))
    for b in priv:
        print("private name across modules: " + b)
    for b in missing:
        print("unresolved import: " + b)
    if not cycle and not priv and not missing:
        print("no import cycle, no private name used across modules, every import resolves")
    return 1 if cycle or priv or missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
