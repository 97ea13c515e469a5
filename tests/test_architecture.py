"""The package's shape: no import cycle, light start-up, each module importable alone."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import cnnlab

SRC = Path(cnnlab.__file__).parent
TESTS = Path(__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every cnnlab module `path` imports, at the top or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cnnlab")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("cnnlab"):
                continue
            for a in node.names:  # `from . import x` may name a submodule
                sub = f"{mod}.{a.name}"
                found.add(sub if (SRC.parent / sub.replace(".", "/")).exists()
                          or (SRC.parent / (sub.replace(".", "/") + ".py")).exists() else mod)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    g = {}
    for name, path in modules.items():
        deps = set()
        for dep in imports_of(path):
            while dep not in modules and "." in dep:
                dep = dep.rpartition(".")[0]
            # importing a.b.c runs the packages a and a.b first (their __init__ modules)
            parts = dep.split(".")
            for k in range(2, len(parts) + 1):
                d = ".".join(parts[:k])
                if d in modules and d != name and not name.startswith(d + "."):
                    deps.add(d)
        g[name] = deps
    return g


def test_no_import_cycle_even_through_imports_inside_functions():
    g = graph()
    edges = g.__getitem__
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(edges(n)):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2
    for n in sorted(g):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def topological_order() -> list[str]:
    g, order, seen = graph(), [], set()

    def visit(n):
        if n in seen:
            return
        seen.add(n)
        for d in sorted(g[n]):
            visit(d)
        order.append(n)
    for n in sorted(g):
        visit(n)
    return order


def test_every_module_imports_in_dependency_order_in_a_fresh_interpreter():
    order = [m for m in topological_order() if not m.endswith(".__main__")   # runs the CLI
             and (not m.startswith("cnnlab.serve") or _has("waitress"))]
    code = ("import importlib, sys\n"
            f"for m in {order!r}:\n"
            "    importlib.import_module(m)\n"
            "print('ok', len(sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def _has(mod):
    import importlib.util
    return importlib.util.find_spec(mod) is not None


def _modules_after(code: str) -> set[str]:
    probe = code + "\nimport sys; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(out.stdout.split())


def test_cli_help_needs_neither_matplotlib_nor_torch():
    mods = _modules_after("from cnnlab.cli import build_parser\nbuild_parser()")
    assert "matplotlib" not in mods and "torch" not in mods


def test_description_and_training_config_do_not_import_engines_or_torch():
    mods = _modules_after("import cnnlab.model, cnnlab.layers, cnnlab.training.config")
    assert "torch" not in mods
    assert not any(m.startswith("cnnlab.engines.torch") or m.startswith("cnnlab.engines.numpy.engine")
                   for m in mods)
def test_no_test_module_imports_another():
    names = {p.stem for p in TESTS.glob("test_*.py")}
    for p in TESTS.glob("test_*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            bad = [m for m in mods if m.split(".")[-1] in names or m.startswith("tests")]
            assert not bad, f"{p.name} imports {bad}"
