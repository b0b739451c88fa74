"""The layers of lmforge point one way (docs/architecture.md): an AST walk over src/lmforge finds every import
between its packages and fails on one that points up, or on two packages that import each other.

The only sanctioned upward edges are the models' `from_pretrained` / `save_pretrained`, one-line delegates to
lmforge.interop (the names users know from transformers), imported when called, never when a model module loads.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"

# bottom to top; a package may import its own layer's packages or any below, never one above
LAYERS: list[tuple[str, ...]] = [
    # lmforge/__init__ (the version, LmforgeError), errors, atomic files, threads/allocator, packaged files, plots
    ("", "errors", "files", "runtime", "assets", "report"),
    ("config",),  # dataclasses, presets, the one run-config loader
    ("tokenizer", "nn"),  # the tokenizer wrapper; the layer library (attention, LoRA, quantized linears)
    ("models",),  # the three families; no file I/O
    ("interop",),  # HF / GGUF / PEFT / quantized directories, load_model / load_pretrained
    ("data",),  # corpora, shards, masking, labelled / QA / chat / pair sets, tokenizer training
    ("generate", "predict", "eval", "explain", "train"),  # inference, evaluation, the loops
    ("tune", "compress", "serve", "quickstart", "info"),  # pipelines
    ("cli",),
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
DELEGATES = {  # (module, function) -> the one upward import it may make, at call time
    ("lmforge.models.base", "from_pretrained"): "lmforge.interop",
    ("lmforge.models.decoder", "save_pretrained"): "lmforge.interop.hf",
    ("lmforge.models.encoder", "save_pretrained"): "lmforge.interop.hf_bert",
    ("lmforge.models.seq2seq", "save_pretrained"): "lmforge.interop.hf_t5",
}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports() -> list[tuple[str, str, str | None, int]]:
    """(importing module, imported lmforge module, enclosing function or None, line) for every import."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        tree = ast.parse(path.read_text(encoding="utf-8"))

        def walk(node: ast.AST, func: str | None, module: str = module) -> None:
            for child in ast.iter_child_nodes(node):
                f = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
                if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                    targets = [child.module]
                elif isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                else:
                    targets = []
                for t in targets:
                    if t == "lmforge" or t.startswith("lmforge."):
                        found.append((module, t, func, child.lineno))
                walk(child, f)

        walk(tree, None)
    return found


IMPORTS = _imports()


def test_the_walk_sees_the_package():
    assert len(IMPORTS) > 200  # ~390 imports between lmforge modules: the walk is not looking at nothing
    assert set(RANK) >= {_package(m) for m, *_ in IMPORTS}, "a package is missing from LAYERS"
    assert not any(t.startswith("lmforge.") and ".." in t for _, t, _, _ in IMPORTS)


def test_no_import_points_up():
    up = []
    for module, target, func, line in IMPORTS:
        src, dst = _package(module), _package(target)
        if dst and src != dst and RANK[dst] > RANK[src] and DELEGATES.get((module, func)) != target:
            up.append(f"{module}:{line} imports {target} ({src} is below {dst})")
    assert not up, "\n".join(up)


def test_no_two_packages_import_each_other():
    edges = {
        (_package(m), _package(t))
        for m, t, f, _ in IMPORTS
        if _package(t) and _package(m) != _package(t) and DELEGATES.get((m, f)) != t
    }
    mutual = sorted((a, b) for a, b in edges if (b, a) in edges and a < b)
    assert not mutual, mutual


@pytest.mark.parametrize("where", sorted(DELEGATES), ids=lambda w: f"{w[0]}.{w[1]}")
def test_delegates_are_one_line_and_import_at_call_time(where):
    module, func = where
    path = SRC.parent / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    defs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == func]
    assert defs, f"{module} has no {func}"
    for d in defs:
        body = [s for s in d.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        imports = [s for s in body if isinstance(s, ast.ImportFrom)]
        assert [s.module for s in imports] == [DELEGATES[where]]
        assert len(body) - len(imports) <= 4, f"{module}.{func} does more than delegate"
    # and nothing at module level reaches the I/O layer
    assert not [t for m, t, f, _ in IMPORTS if m == module and f is None and _package(t) == "interop"]


def _top_level_names(module: str) -> set[str] | None:
    """Names a module defines or imports at its top level (None: no such module). Submodules count for a
    package."""
    base = SRC.parent / module.replace(".", "/")
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    if not path.is_file():
        return None
    names = (
        {p.stem for p in base.glob("*.py")} | {p.name for p in base.iterdir() if p.is_dir()} if base.is_dir() else set()
    )
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def test_every_lmforge_import_resolves():
    """Every `from lmforge.X import name` in the package, its tests and benchmarks names a module that exists and
    a name it defines: a module that moved leaves no import behind, even inside a function no test calls."""
    root = SRC.parents[1]
    missing = []
    for path in [*SRC.rglob("*.py"), *(root / "tests").glob("*.py"), *(root / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lmforge"):
                names = _top_level_names(node.module)
                if names is None:
                    missing.append(f"{path.relative_to(root)}:{node.lineno} {node.module}")
                else:
                    missing += [
                        f"{path.relative_to(root)}:{node.lineno} {node.module}.{a.name}"
                        for a in node.names
                        if a.name != "*" and a.name not in names
                    ]
            elif isinstance(node, ast.Import):
                missing += [
                    f"{path.relative_to(root)}:{node.lineno} {a.name}"
                    for a in node.names
                    if a.name.startswith("lmforge") and _top_level_names(a.name) is None
                ]
    assert not missing, "\n".join(missing)


# Function-level imports of lmforge modules remain only where start-up time needs them: the CLI (each verb loads
# only its own modules; torch alone takes 1.5 s), the task loaders of tune/recipe.py (the CLI builds its finetune
# flags from that module, so it must not load the tasks) and the delegates above.
LAZY = (
    {("lmforge.tune.recipe", f) for f in ("_classify", "_qa", "_chat", "_dpo", "_grpo", "_seq2seq")}
    # (the process group under torchrun: recipe.py is read at CLI start-up, train.distributed imports torch)
    | {("lmforge.tune.recipe", "finetune")}
    | set(DELEGATES)
)


def test_function_level_imports_only_where_start_up_needs_them():
    lazy = sorted(
        f"{m}:{line} in {f}() imports {t}"
        for m, t, f, line in IMPORTS
        if f is not None and m != "lmforge.cli" and (m, f) not in LAZY
    )
    assert not lazy, "\n".join(lazy)


def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh module table: an import cycle between modules fails here whatever
    order the tests happen to import them in."""
    import subprocess
    import sys

    code = """
import importlib, sys
from pathlib import Path
src = Path(sys.argv[1])
failed = []
for p in sorted(src.rglob("*.py")):
    parts = p.relative_to(src.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    for k in [k for k in sys.modules if k == "lmforge" or k.startswith("lmforge.")]:
        del sys.modules[k]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {e!r}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    r = subprocess.run([sys.executable, "-c", code, str(SRC)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]


def _cycles(modules: str) -> list[list[str]]:
    """The import circles (strongly connected groups of two or more, lazy imports counted) among the modules
    under `modules`."""
    under = modules + "."
    graph: dict[str, set[str]] = {}
    for m, t, _, _ in IMPORTS:
        if m.startswith(under) and t.startswith(under) and m != t:
            graph.setdefault(m, set()).add(t)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_no_circle_between_the_fine_tuning_modules():
    """tune/tasks.py declares the tasks, each task module imports it, the driver (tune/recipe.py) imports the
    tasks: nothing inside tune/ imports back around, not even inside a function."""
    assert any(m == "lmforge.tune.recipe" and t.startswith("lmforge.tune.") for m, t, _, _ in IMPORTS)
    assert _cycles_selftest()
    assert _cycles("lmforge.tune") == []


def _cycles_selftest() -> bool:
    """The circle finder finds a planted circle (a check that cannot fail is no check)."""
    global IMPORTS
    saved = IMPORTS
    IMPORTS = saved + [("lmforge.x.a", "lmforge.x.b", None, 1), ("lmforge.x.b", "lmforge.x.a", "f", 2)]
    try:
        return _cycles("lmforge.x") == [["lmforge.x.a", "lmforge.x.b"]]
    finally:
        IMPORTS = saved
