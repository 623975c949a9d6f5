"""The package's shape: an acyclic import graph, no per-method branches outside ``methods/``,
no long functions, and imports that are cheap and change nothing (docs/design.md, Architecture)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pstar_plugins"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST):
    """Every import statement of a module, at any depth (functions, methods, ``try``), except
    inside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _package_exports() -> dict[str, str]:
    """``pstar_plugins.__init__``'s lazy exports (name → module), read from its ``_EXPORTS``."""
    tree = ast.parse(MODULES["pstar_plugins"].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("pstar_plugins/__init__.py has no _EXPORTS table")


def _owner(name: str) -> str | None:
    """The package module that ``name`` (a module, or ``module.attribute``) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports.

    ``import a.b`` and ``from a.b import c`` are edges to ``a.b`` (to ``a.b.c`` when that is a
    module). Parent packages are not added as edges: their ``__init__`` modules are nodes of
    their own with their own edges, and every ``__init__`` here imports its heavy parts lazily
    (PEP 562 ``__getattr__``, counted as that ``__init__``'s edges). ``from pstar_plugins import
    name`` is an edge to the module the top-level package's lazy table (``_EXPORTS``) maps
    ``name`` to, and the package itself has an edge to every module of that table.
    Imports under ``if TYPE_CHECKING:`` never run and are left out.
    """
    exports = _package_exports()
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(_owner(alias.name) for alias in node.names if alias.name.startswith("pstar_plugins"))
                continue
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("pstar_plugins"):
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in MODULES:
                    edges.add(target)
                elif base == "pstar_plugins" and alias.name in exports:
                    edges.add(exports[alias.name])
                else:
                    edges.add(_owner(base))
        if module == "pstar_plugins":  # its __getattr__ imports these through importlib
            edges.update(exports.values())
        edges.discard(None)
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for succ in sorted(graph.get(node, ())):
            if state.get(succ) == 1:
                return path[path.index(succ):] + [succ]
            if not state.get(succ):
                found = visit(succ)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if not state.get(node):
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_of_the_package_has_no_cycle():
    graph = import_graph()
    assert graph["pstar_plugins.core.loading"] >= {"pstar_plugins.core.build", "pstar_plugins.core.adapter_io"}
    assert "pstar_plugins.core.loading" in graph["pstar_plugins"]  # through the lazy export table
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_reports_a_function_local_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    tree = ast.parse("def f():\n    from pstar_plugins.core import model\nif TYPE_CHECKING:\n    import pstar_plugins.train\n")
    assert [n.module for n in _imports(tree)] == ["pstar_plugins.core"]


#: the layers of docs/design.md ("Architecture"), bottom first; a module belongs to the entry
#: with the longest matching prefix and imports only from its own layer or below
LAYERS = [
    ("contract", ["pstar_plugins.errors", "pstar_plugins.hookspecs", "pstar_plugins.methods.spec",
                  "pstar_plugins.methods.builtin"]),
    ("plugins", ["pstar_plugins.plugins"]),
    ("mechanisms", ["pstar_plugins.core", "pstar_plugins.tasks.template"]),
    ("methods", ["pstar_plugins.methods"]),
    ("adapter files", ["pstar_plugins.core.adapter_io"]),
    ("wrapped model", ["pstar_plugins.core.model", "pstar_plugins.core.build"]),
    ("loading", ["pstar_plugins.core.loading"]),
    ("tasks and interop", ["pstar_plugins.tasks", "pstar_plugins.interop", "pstar_plugins.arguments",
                           "pstar_plugins.models", "pstar_plugins.run_dir", "pstar_plugins.tracking"]),
    ("scripts", ["pstar_plugins"]),
]


def layer_of(module: str) -> int:
    best = max(((len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} is in no layer"
    return best[1]


def test_every_import_goes_to_the_same_layer_or_below():
    graph = import_graph()
    upward = sorted(f"{m} ({LAYERS[layer_of(m)][0]}) -> {t} ({LAYERS[layer_of(t)][0]})"
                    for m, targets in graph.items() for t in targets if layer_of(t) > layer_of(m))
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)
    assert layer_of("pstar_plugins.methods.spec") == 0 and layer_of("pstar_plugins.methods.base") == 3
    assert layer_of("pstar_plugins.core.packing") == 2 and layer_of("pstar_plugins.train") == len(LAYERS) - 1


def test_contract_types_import_no_wrapped_model():
    """The bottom layer (spec, hook specs, plugin manager, method base classes) imports nothing
    from the wrapped model or above."""
    graph = import_graph()
    above = {"pstar_plugins.core.model", "pstar_plugins.core.build", "pstar_plugins.core.loading",
             "pstar_plugins.train", "pstar_plugins.evaluate", "pstar_plugins.cli"}
    for module in ("pstar_plugins.methods.spec", "pstar_plugins.hookspecs", "pstar_plugins.plugins",
                   "pstar_plugins.methods.base", "pstar_plugins.methods.embedding_prompt"):
        reachable, todo = set(), [module]
        while todo:
            for succ in graph[todo.pop()] - reachable:
                reachable.add(succ)
                todo.append(succ)
        assert not reachable & above, (module, sorted(reachable & above))


# --------------------------------------------------------------------------- method names
METHOD_NAME = re.compile(r"(?<![\w-])(prompt-tuning|prefix-tuning|p-tuning|p-tuning-v2)(?![\w-])")
#: (file, text the literal starts with) → why a method name may appear there
NAME_ALLOWED = {
    ("pstar_plugins/core/attention.py", ") computes attention in its own code"):
        "an error message suggesting methods that need no attention routing; nothing is decided by it",
    ("pstar_plugins/core/attention.py", "; prefix methods need one shape per kind"):
        "an error message suggesting an alternative method; nothing is decided by it",
    ("pstar_plugins/tasks/template.py", ": {soft} tokens are only for the p-tuning method"):
        "an error message naming the method whose templates take {soft} tokens; nothing is decided by it",
}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def method_name_literals(root: Path = PACKAGE) -> list[tuple[str, int, str]]:
    """String literals naming a built-in method in code outside ``methods/`` (docstrings and
    comments excluded; f-string parts included)."""
    hits = []
    for path in sorted(root.rglob("*.py")):
        if "methods" in path.relative_to(root).parts:
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                    and METHOD_NAME.search(node.value):
                hits.append((path.relative_to(root.parent).as_posix(), node.lineno, node.value))
    return hits


def test_no_method_name_in_code_outside_methods():
    """Every method-specific decision is asked of the method's class or spec, never of its name."""
    hits = [(f, line, text) for f, line, text in method_name_literals()
            if not any(f == af and text.startswith(prefix) for af, prefix in NAME_ALLOWED)]
    assert not hits, "method names in code outside pstar_plugins/methods/: " + json.dumps(hits, indent=1)
    used = {(af, prefix) for af, prefix in NAME_ALLOWED for f, _, text in method_name_literals()
            if f == af and text.startswith(prefix)}
    assert used == set(NAME_ALLOWED), f"allow-list entries that match nothing any more: {set(NAME_ALLOWED) - used}"


def test_the_method_name_check_catches_a_branch(tmp_path):
    pkg = tmp_path / "pstar_plugins"
    (pkg / "methods").mkdir(parents=True)
    (pkg / "core.py").write_text('"""Docstrings may say prompt-tuning."""\n\ndef f(m):\n    return m.name == "p-tuning-v2"\n')
    (pkg / "methods" / "x.py").write_text('NAME = "prefix-tuning"\n')
    assert method_name_literals(pkg) == [("pstar_plugins/core.py", 4, "p-tuning-v2")]


# --------------------------------------------------------------------------- function length
MAX_FUNCTION_LINES = 80
#: (file, function) → why it may be longer
LONG_ALLOWED: dict[tuple[str, str], str] = {}  # (file, function) -> why it stays long


def long_functions(root: Path = PACKAGE, limit: int = MAX_FUNCTION_LINES) -> dict[tuple[str, str], int]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found[(path.relative_to(ROOT).as_posix(), node.name)] = lines
    return found


def test_no_function_is_longer_than_80_lines():
    found = long_functions()
    unexpected = {k: v for k, v in found.items() if k not in LONG_ALLOWED}
    assert not unexpected, f"functions over {MAX_FUNCTION_LINES} lines (split them): {unexpected}"
    stale = set(LONG_ALLOWED) - set(found)
    assert not stale, f"these are no longer long: remove them from LONG_ALLOWED: {stale}"


def test_the_length_check_counts_a_long_function():
    assert long_functions(limit=10_000) == {}
    short = long_functions(limit=20)
    assert short[("pstar_plugins/core/loading.py", "load_adapter")] > 20


# --------------------------------------------------------------------------- import cost and side effects
def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_importing_the_package_imports_no_torch():
    result = _run("import sys, pstar_plugins, pstar_plugins.plugins, pstar_plugins.methods.spec, pstar_plugins.hookspecs\n"
                  "import pstar_plugins.methods.builtin, pstar_plugins.cli\n"
                  "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_pytest_entry_point_module_imports_no_torch():
    """pyproject's ``pytest11`` entry point is loaded into every pytest run of an environment
    with pstar-plugins installed; it must stay free of torch and transformers."""
    text = (ROOT / "pyproject.toml").read_text()
    module = re.search(r"\[project\.entry-points\.pytest11\]\s*\n\s*\w+\s*=\s*\"([\w.]+)\"", text).group(1)
    result = _run(f"import sys, {module}\nassert callable({module}.pstar_register)\n"
                  "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_importing_every_module_changes_nothing_in_transformers_or_the_environment():
    """Registration with transformers happens when a prefix method is first built, not at import."""
    modules = sorted(m for m in MODULES if not m.startswith(("pstar_plugins.trl_sft", "pstar_plugins.testing.conformance")))
    code = (
        "import json, os, importlib\n"
        "from transformers import AttentionInterface\n"
        "env, registry = dict(os.environ), set(AttentionInterface._global_mapping)\n"
        f"for name in {modules!r}:\n    importlib.import_module(name)\n"
        "after = {'env': sorted(set(os.environ.items()) ^ set(env.items())),\n"
        "         'registry': sorted(set(AttentionInterface._global_mapping) - registry)}\n"
        "from pstar_plugins import build_model\nfrom pstar_plugins.testing import tiny_model\n"
        "build_model(tiny_model('llama'), 'prefix-tuning')\n"
        "after['built'] = sorted(set(AttentionInterface._global_mapping) - registry)\n"
        "print(json.dumps(after))\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"env": [], "registry": [], "built": ["pstar_prefix"]}


def test_import_time_is_under_a_second():
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import pstar_plugins"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    total = [int(line.split("|")[1]) for line in result.stderr.splitlines() if line.rstrip().endswith("| pstar_plugins")]
    assert total and total[-1] < 1_000_000, result.stderr[-2000:]  # microseconds, cumulative
