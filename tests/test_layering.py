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
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


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
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
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
                return path[path.index(succ) :] + [succ]
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
    assert graph["pstar_plugins.assembly.loading"] >= {
        "pstar_plugins.assembly.build",
        "pstar_plugins.mechanisms.adapter_io",
    }
    assert "pstar_plugins.assembly.loading" in graph["pstar_plugins"]  # through the lazy export table
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_reports_a_function_local_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    tree = ast.parse(
        "def f():\n    from pstar_plugins.core import model\nif TYPE_CHECKING:\n    import pstar_plugins.train\n"
    )
    assert [n.module for n in _imports(tree)] == ["pstar_plugins.core"]


#: the layers of docs/design.md ("Layers"), bottom first. Each entry is a package (all its
#: modules) or one module, named exactly: there is no catch-all, and a module in none of them
#: fails :func:`test_every_module_is_in_exactly_one_layer`. A module imports only from its own
#: layer or below.
LAYERS = [
    ("contract", ["pstar_plugins.contract"]),
    ("mechanisms", ["pstar_plugins.mechanisms"]),
    ("methods", ["pstar_plugins.methods"]),
    ("assembly", ["pstar_plugins.assembly"]),
    ("tasks and scoring", ["pstar_plugins.tasks"]),
    (
        "scripts and integrations",
        [
            "pstar_plugins",
            "pstar_plugins.cli",
            "pstar_plugins.arguments",
            "pstar_plugins.models",
            "pstar_plugins.evaluate",
            "pstar_plugins.hf_trainer",
            "pstar_plugins.trl_sft",
            "pstar_plugins.train",
            "pstar_plugins.interop",
            "pstar_plugins.testing",
        ],
    ),
]


def _units() -> dict[str, str]:
    """Layer entry (package or module) → its layer's name."""
    return {unit: name for name, units in LAYERS for unit in units}


def unit_of(module: str) -> str | None:
    """The layer entry a module belongs to: itself, or the package entry it lies in (the top-level
    package ``pstar_plugins`` is an entry for its own ``__init__`` only)."""
    units = _units()
    if module in units:
        return module
    parts = module.split(".")
    for cut in range(len(parts) - 1, 1, -1):
        prefix = ".".join(parts[:cut])
        if prefix in units:
            return prefix
    return None


def layer_of(module: str) -> int:
    unit = unit_of(module)
    assert unit is not None, f"{module} is in no layer: add it to LAYERS (tests/test_layering.py) and docs/design.md"
    return [name for name, _ in LAYERS].index(_units()[unit])


def test_every_module_is_in_exactly_one_layer():
    unassigned = sorted(m for m in MODULES if unit_of(m) is None)
    assert not unassigned, f"modules in no layer (add them to LAYERS and to docs/design.md): {unassigned}"
    units = [unit for _, layer in LAYERS for unit in layer]
    assert len(units) == len(set(units)), "an entry is in two layers"
    assert all(unit in MODULES for unit in units), sorted(set(units) - set(MODULES))


def test_a_new_top_level_module_is_in_no_layer():
    assert unit_of("pstar_plugins.newly_added") is None
    assert unit_of("pstar_plugins.train.loop") == "pstar_plugins.train"
    assert unit_of("pstar_plugins.mechanisms.packing") == "pstar_plugins.mechanisms"


def test_every_import_goes_to_the_same_layer_or_below():
    graph = import_graph()
    upward = sorted(
        f"{m} ({LAYERS[layer_of(m)][0]}) -> {t} ({LAYERS[layer_of(t)][0]})"
        for m, targets in graph.items()
        for t in targets
        if layer_of(t) > layer_of(m)
    )
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph seen at the level of layer entries (packages and top-level modules)."""
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        source = unit_of(module) or module
        units.setdefault(source, set()).update((unit_of(t) or t) for t in targets)
        units[source].discard(source)
    return units


def test_the_packages_import_each_other_without_a_cycle():
    """Acyclic modules can still form a knot of packages (a imports b.x, b.y imports a.z); the
    folders are the layers only when the package-level graph has no cycle either."""
    cycle = find_cycle(package_graph(import_graph()))
    assert cycle is None, "package import cycle: " + " -> ".join(cycle)


def test_the_package_cycle_check_sees_a_knot_of_acyclic_modules():
    graph = {
        "pstar_plugins.mechanisms.a": {"pstar_plugins.methods.b"},
        "pstar_plugins.methods.c": {"pstar_plugins.mechanisms.d"},
    }
    assert find_cycle(graph) is None
    assert find_cycle(package_graph(graph)) == [
        "pstar_plugins.mechanisms",
        "pstar_plugins.methods",
        "pstar_plugins.mechanisms",
    ]


#: what lower layers must not touch: the plugin registry lives in assembly, and what a mechanism
#: or a method needs from it is passed down at build time (``PStarModel.plugin_origin``)
REGISTRY_ATTRIBUTES = {"plugin_manager", "hook", "_pm"}


def below_assembly() -> list[str]:
    return [m for m in MODULES if layer_of(m) < layer_of("pstar_plugins.assembly")]


def attribute_uses(modules: list[str], names: set[str]) -> list[str]:
    """``module:line .name`` for every attribute access ``x.name`` of ``names`` in ``modules``."""
    return sorted(
        f"{m}:{node.lineno} .{node.attr}"
        for m in modules
        for node in ast.walk(ast.parse(MODULES[m].read_text()))
        if isinstance(node, ast.Attribute) and node.attr in names
    )


def test_no_layer_below_assembly_reaches_the_plugin_registry():
    below = below_assembly()
    hits = attribute_uses(below, REGISTRY_ATTRIBUTES)
    assert not hits, f"calls back up to the plugin registry: {hits}"
    assert "pstar_plugins.contract.hookspecs" in below and "pstar_plugins.methods.prompt_tuning.module" in below


def wrapped_model_members() -> set[str]:
    """What only the wrapped model (``PStarModel``) has, its class's members and those its build
    sets: no member of ``nn.Module``, of a transformers model or of a method."""
    from torch import nn
    from transformers import PreTrainedModel

    from pstar_plugins import build_model
    from pstar_plugins.contract.method import PromptMethod
    from pstar_plugins.testing import tiny_model

    model = build_model(tiny_model("llama"), "prompt-tuning", num_virtual_tokens=2, init="random")
    own = {n for n in [*vars(type(model)), *vars(model)] if not n.startswith("__")}
    transformers_model = set(dir(PreTrainedModel)) | {"config", "generation_config"}  # the last two: per instance
    return own - set(dir(nn.Module())) - transformers_model - set(dir(PromptMethod))


def test_no_layer_below_assembly_calls_the_wrapped_model():
    """Mechanisms and methods get data and callables passed down, never a ``PStarModel`` whose
    members they would call by name (its state, its method's name, its plugin record)."""
    members = wrapped_model_members()
    assert {"raw_trainable_state", "extra_trainable_parameters", "method_name", "plugin_origin"} <= members
    hits = attribute_uses(below_assembly(), members)
    assert not hits, f"calls up into the wrapped model: {hits}"


def test_contract_types_import_no_wrapped_model():
    """The contract (spec, hook specs, method base classes) reaches nothing else of the package."""
    graph = import_graph()
    for module in [m for m in MODULES if unit_of(m) == "pstar_plugins.contract"]:
        reachable, todo = set(), [module]
        while todo:
            for succ in graph[todo.pop()] - reachable:
                reachable.add(succ)
                todo.append(succ)
        outside = sorted(r for r in reachable if unit_of(r) != "pstar_plugins.contract")
        assert not outside, (module, outside)


# --------------------------------------------------------------------------- method names
METHOD_NAME = re.compile(r"(?<![\w-])(prompt-tuning|prefix-tuning|p-tuning|p-tuning-v2)(?![\w-])")
#: (file, text the literal starts with) → why a method name may appear there
NAME_ALLOWED = {
    (
        "pstar_plugins/mechanisms/attention.py",
        ") computes attention in its own code",
    ): "an error message suggesting methods that need no attention routing; nothing is decided by it",
    (
        "pstar_plugins/mechanisms/attention.py",
        "; prefix methods need one shape per kind",
    ): "an error message suggesting an alternative method; nothing is decided by it",
    (
        "pstar_plugins/mechanisms/template.py",
        ": {soft} tokens are only for the p-tuning method",
    ): "an error message naming the method whose templates take {soft} tokens; nothing is decided by it",
}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                found.add(id(first.value))
    return found


def literals_outside_methods(pattern: re.Pattern, root: Path = PACKAGE) -> list[tuple[str, int, str]]:
    """String literals matching ``pattern`` in code outside ``methods/`` (docstrings and comments
    excluded; f-string parts included)."""
    hits = []
    for path in sorted(root.rglob("*.py")):
        if "methods" in path.relative_to(root).parts:
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docs
                and pattern.search(node.value)
            ):
                hits.append((path.relative_to(root.parent).as_posix(), node.lineno, node.value))
    return hits


def method_name_literals(root: Path = PACKAGE) -> list[tuple[str, int, str]]:
    """String literals naming a built-in method in code outside ``methods/``."""
    return literals_outside_methods(METHOD_NAME, root)


def test_no_method_name_in_code_outside_methods():
    """Every method-specific decision is asked of the method's class or spec, never of its name."""
    hits = [
        (f, line, text)
        for f, line, text in method_name_literals()
        if not any(f == af and text.startswith(prefix) for af, prefix in NAME_ALLOWED)
    ]
    assert not hits, "method names in code outside pstar_plugins/methods/: " + json.dumps(hits, indent=1)
    used = {
        (af, prefix)
        for af, prefix in NAME_ALLOWED
        for f, _, text in method_name_literals()
        if f == af and text.startswith(prefix)
    }
    assert used == set(NAME_ALLOWED), f"allow-list entries that match nothing any more: {set(NAME_ALLOWED) - used}"


def test_the_method_name_check_catches_a_branch(tmp_path):
    pkg = tmp_path / "pstar_plugins"
    (pkg / "methods").mkdir(parents=True)
    (pkg / "core.py").write_text(
        '"""Docstrings may say prompt-tuning."""\n\ndef f(m):\n    return m.name == "p-tuning-v2"\n'
    )
    (pkg / "methods" / "x.py").write_text('NAME = "prefix-tuning"\n')
    assert method_name_literals(pkg) == [("pstar_plugins/core.py", 4, "p-tuning-v2")]


def owned_input_literals(names: set[str], root: Path = PACKAGE) -> list[tuple[str, int, str]]:
    """String literals outside ``methods/`` that name one of ``names``, inputs a method owns."""
    return literals_outside_methods(re.compile("|".join(rf"(?<!\w){re.escape(n)}(?!\w)" for n in sorted(names))), root)


def test_inputs_a_method_owns_are_named_only_by_the_method():
    """P-tuning's ``prompt_index`` and any other method's own inputs reach it through what the
    method declares (``input_pads``, ``slot_input``); no module outside ``methods/`` names them."""
    from pstar_plugins.assembly.registry import get_plugin_manager

    owned = {name for spec in get_plugin_manager().methods.values() for name in spec.resolve_class().input_pads}
    assert "prompt_index" in owned
    hits = owned_input_literals(owned)
    assert not hits, "a method's own inputs named outside pstar_plugins/methods/: " + json.dumps(hits, indent=1)


def test_the_owned_input_check_catches_a_literal(tmp_path):
    pkg = tmp_path / "pstar_plugins"
    (pkg / "methods").mkdir(parents=True)
    (pkg / "collate.py").write_text('"""Pads prompt_index."""\nPADS = {"prompt_index": -1}\n')
    (pkg / "methods" / "m.py").write_text('input_pads = {"prompt_index": -1}\n')
    assert owned_input_literals({"prompt_index"}, pkg) == [("pstar_plugins/collate.py", 2, "prompt_index")]


# --------------------------------------------------------------------------- function length
MAX_FUNCTION_LINES = 80
#: (file, function) → why it may be longer
LONG_ALLOWED: dict[tuple[str, str], str] = {}  # (file, function) -> why it stays long


def long_functions(
    package: Path = PACKAGE, limit: int = MAX_FUNCTION_LINES, root: Path = ROOT
) -> dict[tuple[str, str], int]:
    found = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found[(path.relative_to(root).as_posix(), node.name)] = lines
    return found


def test_no_function_is_longer_than_80_lines():
    found = long_functions()
    unexpected = {k: v for k, v in found.items() if k not in LONG_ALLOWED}
    assert not unexpected, f"functions over {MAX_FUNCTION_LINES} lines (split them): {unexpected}"
    stale = set(LONG_ALLOWED) - set(found)
    assert not stale, f"these are no longer long: remove them from LONG_ALLOWED: {stale}"


def test_the_length_check_counts_a_long_function(tmp_path):
    (tmp_path / "pkg").mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(30))
    (tmp_path / "pkg" / "m.py").write_text("def short():\n    return 1\n\n\ndef long():\n" + body)
    found = long_functions(tmp_path / "pkg", limit=20, root=tmp_path)
    assert found == {("pkg/m.py", "long"): 31}


# --------------------------------------------------------------------------- import cost and side effects
def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_importing_the_package_imports_no_torch():
    result = _run(
        "import sys, pstar_plugins, pstar_plugins.assembly.registry, pstar_plugins.contract.spec, "
        "pstar_plugins.contract.hookspecs\n"
        "import pstar_plugins.methods.builtin, pstar_plugins.cli\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_pytest_entry_point_module_imports_no_torch():
    """pyproject's ``pytest11`` entry point is loaded into every pytest run of an environment
    with pstar-plugins installed; it must stay free of torch and transformers."""
    text = (ROOT / "pyproject.toml").read_text()
    module = re.search(r"\[project\.entry-points\.pytest11\]\s*\n\s*\w+\s*=\s*\"([\w.]+)\"", text).group(1)
    result = _run(
        f"import sys, {module}\nassert callable({module}.pstar_register)\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_importing_every_module_changes_nothing_in_transformers_or_the_environment():
    """Registration with transformers happens when a prefix method is first built, not at import."""
    modules = sorted(
        m
        for m in MODULES
        if not m.startswith(("pstar_plugins.trl_sft", "pstar_plugins.testing.conformance"))
        and not m.endswith(".__main__")
    )  # running it is what importing it does
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


# --------------------------------------------------------------------------- module length
MAX_MODULE_LINES = 500


def long_modules(package: Path = PACKAGE, limit: int = MAX_MODULE_LINES) -> dict[str, int]:
    lengths = {
        path.relative_to(package.parent).as_posix(): len(path.read_text().splitlines())
        for path in sorted(package.rglob("*.py"))
    }
    return {name: n for name, n in lengths.items() if n > limit}


def test_no_module_is_longer_than_500_lines():
    assert not long_modules(), f"modules over {MAX_MODULE_LINES} lines (split them by what they do): {long_modules()}"


def test_the_module_length_check_counts_lines(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "short.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "long.py").write_text("x = 1\n" * 501)
    assert long_modules(tmp_path / "pkg") == {"pkg/long.py": 501}
