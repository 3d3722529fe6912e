"""The import graph of the chattts_ort package, read from the source with `ast` (imports inside functions
count too), and the checks of the layering the README's module map describes:

    floor 0  the package root: the torch-free product (format, runtime, params, ...)
    floor 1  export/  (torch): may import the root
    floor 2  checks/  (proof): may import the root and export/
    floor 3  cli.py, prepare.py   the command line and the model it runs, the composition root: may import anything

An upward import is one from a lower floor to a higher one. Run: python tools/import_graph.py [--dot]
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = "chattts_ort"
EXTENSIONS = {"_core"}  # compiled modules: no source to read, they import nothing of ours
ROOT = Path(__file__).resolve().parents[1] / "python" / PKG


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> list:
    """Module names an ImportFrom refers to (a submodule when the imported name is one)."""
    known = modules()
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    out = []
    for alias in node.names:
        if alias.name in EXTENSIONS:
            continue
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in known else target)
    return out


def graph() -> dict:
    known = modules()
    edges = {m: set() for m in known}
    for mod, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = resolve(mod, is_pkg, node)
            for t in targets:
                while t and t not in known and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in known and t != mod and t.startswith(PKG):
                    edges[mod].add(t)
    return edges


def floor(mod: str) -> int:
    if mod in (f"{PKG}.cli", f"{PKG}.prepare"):
        return 3
    if mod.startswith(f"{PKG}.checks"):
        return 2
    if mod.startswith(f"{PKG}.export"):
        return 1
    return 0


def cycles(edges: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def upward(edges: dict) -> list:
    return sorted((a, b) for a, bs in edges.items() for b in bs if floor(b) > floor(a))


def main(argv) -> int:
    edges = graph()
    if "--dot" in argv:
        print("digraph chattts_ort {")
        for a, bs in sorted(edges.items()):
            for b in sorted(bs):
                print(f'  "{a[len(PKG) + 1:] or PKG}" -> "{b[len(PKG) + 1:] or PKG}";')
        print("}")
        return 0
    cyc, up = cycles(edges), upward(edges)
    print(f"{len(edges)} modules, {sum(len(b) for b in edges.values())} import edges")
    print(f"import circles: {cyc or 'none'}")
    print(f"upward imports: {up or 'none'}")
    return 1 if cyc or len(up) > 1 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
