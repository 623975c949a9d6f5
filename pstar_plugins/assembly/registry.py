"""Plugin manager: built-in methods and third-party plugins through one registration path.

Environment variables (read when the manager is first created):

``PSTAR_DISABLE_PLUGIN_AUTOLOAD=1``
    load no entry-point plugins (built-ins only).
``PSTAR_PLUGINS=name,name``
    load only these entry-point plugins (names of the ``pstar_plugins`` entry points).
``PSTAR_BLOCK_PLUGINS=name,name``
    never load these plugins (entry-point names or built-in names).
``PSTAR_TRACE_PLUGINS=1``
    print every hook call and result to stderr.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata as metadata
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pluggy

from pstar_plugins.contract import hookspecs
from pstar_plugins.contract.errors import PluginError, PStarError, UnknownMethodError
from pstar_plugins.contract.spec import MethodPlugin, MethodSpec
from pstar_plugins.methods.builtin import BUILTIN_PLUGINS

ENTRY_POINT_GROUP = "pstar_plugins"
ENV_DISABLE_AUTOLOAD = "PSTAR_DISABLE_PLUGIN_AUTOLOAD"
ENV_SELECT = "PSTAR_PLUGINS"
ENV_BLOCK = "PSTAR_BLOCK_PLUGINS"
ENV_TRACE = "PSTAR_TRACE_PLUGINS"

#: hooks of earlier versions that only routed a call to the method owning the model; the core
#: now asks the method itself. Each maps to what a plugin implements instead.
REMOVED_HOOKS: dict[str, str] = {
    "pstar_build_method": "set method_class on the MethodSpec (the core builds with spec.create())",
    "pstar_trainable_state": "override PromptMethod.trainable_state() on the method class",
    "pstar_load_trainable_state": "override PromptMethod.load_trainable_state() on the method class",
    "pstar_fold": "override PromptMethod.fold() (and the folded property) on the method class",
}


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def _import_object(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


@dataclass
class PluginInfo:
    name: str
    version: str
    hooks: list[str]
    source: str


class PStarPluginManager(pluggy.PluginManager):
    """A pluggy manager that also keeps the method registry filled by ``pstar_register_methods``."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.methods: dict[str, MethodSpec] = {}
        self.sources: dict[str, tuple[str, str]] = {}  # plugin name -> (version, source)
        self.packages: dict[str, str] = {}  # entry-point plugin name -> the distribution that installed it

    # -- registration ----------------------------------------------------------------
    def register_plugin(self, plugin: Any, name: str, version: str = "", source: str = "") -> None:
        """Register ``plugin``, validate its hooks and collect the methods it provides."""
        if name in _env_list(ENV_BLOCK):
            return
        if self.get_plugin(name) is not None:
            raise PluginError(f"a plugin named {name!r} is already registered; choose another name.")
        _refuse_removed_hooks(plugin, name)
        try:
            self.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r} has an invalid hook implementation: {exc}") from exc
        try:
            self.check_pending()
        except pluggy.PluginValidationError as exc:
            self.unregister(name=name)
            raise PluginError(f"plugin {name!r} implements an unknown hook: {exc}") from exc
        self.sources[name] = (version, source)
        self._name_failures(plugin, name)

        def register(spec: MethodSpec) -> None:
            if not isinstance(spec, MethodSpec):
                raise PluginError(f"plugin {name!r} registered {spec!r}; expected a MethodSpec.")
            if spec.method_class is None:
                raise PluginError(
                    f"plugin {name!r} registers method {spec.name!r} without a method class; set "
                    "MethodSpec(..., method_class=YourPromptMethod) (or an import path 'module:Class')."
                )
            if spec.name in self.methods:
                owner = self.methods[spec.name].plugin
                raise PluginError(
                    f"plugin {name!r} registers method {spec.name!r}, already registered by plugin {owner!r}. "
                    f"Rename one of them or block one with {ENV_BLOCK}={name}."
                )
            self.methods[spec.name] = dataclasses.replace(spec, plugin=name)

        if any(impl.plugin is plugin for impl in self.hook.pstar_register_methods.get_hookimpls()):
            # through pluggy (tracing and the plugin-naming wrapper apply), this plugin's implementation only
            others = [p for p in self.get_plugins() if p is not plugin]
            try:
                self.subset_hook_caller("pstar_register_methods", remove_plugins=others)(register=register)
            except Exception:
                self.unregister(name=name)
                self.methods = {k: v for k, v in self.methods.items() if v.plugin != name}
                raise

    def _name_failures(self, plugin: Any, name: str) -> None:
        """Make an unexpected exception inside one of ``plugin``'s hooks name the plugin and hook.

        The library's own errors (``PStarError``) already say what is wrong and pass unchanged.
        """
        for caller in self.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin is not plugin or getattr(impl.function, "_pstar_wrapped", False):
                    continue
                impl.function = _naming_wrapper(impl.function, name, caller.name)

    def unregister_plugin(self, name: str) -> None:
        self.unregister(name=name)
        self.sources.pop(name, None)
        self.packages.pop(name, None)
        self.methods = {k: v for k, v in self.methods.items() if v.plugin != name}

    def load_module(self, path: str) -> str:
        """Register a plugin given as ``module`` or ``module:object`` (the ``-p`` flag).

        A bare ``module`` must implement hooks itself, or hold exactly one plugin object (an
        attribute with hook implementations), which is then registered: a module whose hooks
        are all misspelt or missing is an error, never a silent no-op.
        """
        try:
            obj = _import_object(path)
        except (ImportError, AttributeError) as exc:
            raise PluginError(f"cannot import plugin {path!r}: {exc}. Check the module path and PYTHONPATH.") from exc
        except Exception as exc:  # the module itself raised while importing
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
            raise PluginError(
                f"plugin module {path.partition(':')[0]!r} raised {type(exc).__name__} on import: {last}. "
                "Fix the module, or drop -p " + path + "."
            ) from exc
        name = path
        if ":" not in path:
            obj, name = _plugin_of_module(obj, path)
        if self.is_registered(obj):  # the same -p again in this process, or a plugin an entry point already loaded
            return self.get_name(obj)
        self.register_plugin(obj, name=name, source="-p")
        return name

    def load_entry_points(self) -> None:
        selected = set(_env_list(ENV_SELECT))
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if selected and ep.name not in selected:
                continue
            if ep.name in _env_list(ENV_BLOCK) or self.get_plugin(ep.name) is not None:
                continue
            try:
                obj = ep.load()
            except Exception as exc:
                raise PluginError(f"entry-point plugin {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
            dist = getattr(ep, "dist", None)
            self.register_plugin(obj, name=ep.name, version=getattr(dist, "version", "") or "", source="entry point")
            package = getattr(dist, "name", None) or (dist.metadata["Name"] if dist is not None else None)
            if package and self.get_plugin(ep.name) is obj:
                self.packages[ep.name] = package

    # -- queries ---------------------------------------------------------------------
    def method(self, name: str, adapter=None, plugin: dict | None = None) -> MethodSpec:
        """The spec of method ``name``. ``adapter``: the folder of an adapter saved by ``name``,
        with ``plugin`` its record of the plugin that registered it; an unknown method's error
        then names them and how to load that plugin."""
        if name not in self.methods:
            known = ", ".join(sorted(self.methods)) or "(none)"
            if adapter is None:
                raise UnknownMethodError(f"unknown method {name!r}; known methods: {known}. Pick one with --method.")
            raise UnknownMethodError(
                f"{adapter}: this adapter was saved by method {name!r}, which no loaded plugin "
                f"registers (known methods: {known}). "
                f"{_how_to_load(plugin if isinstance(plugin, dict) else {})}"
            )
        return self.methods[name]

    def adapter_method(self, meta: dict, directory) -> MethodSpec:
        """The spec of the method that saved the adapter in ``directory`` (``meta``: its config);
        :meth:`method`'s error when no loaded plugin registers it, with the plugin it records."""
        return self.method(meta["method"], adapter=directory, plugin=meta.get("plugin"))

    def describe(self) -> list[PluginInfo]:
        infos = []
        for name, plugin in self.list_name_plugin():
            hooks = sorted(h.name for h in self.get_hookcallers(plugin) or [])
            version, source = self.sources.get(name, ("", ""))
            infos.append(PluginInfo(name, version, hooks, source))
        return infos


#: the commands that take ``-p MODULE``
P_COMMANDS = "pstar train, pstar eval, pstar export, pstar import"


def _how_to_load(plugin: dict) -> str:
    """Advice for loading the plugin an adapter records (``plugin_record``), or any plugin."""
    name, loaded_by, version = plugin.get("name"), plugin.get("loaded_by"), plugin.get("version")
    if name and loaded_by == "-p":
        return (
            f"It was registered by plugin module {name!r}, loaded with -p: pass -p {name} ({P_COMMANDS}), or from "
            f"Python call get_plugin_manager().load_module({name!r}) first."
        )
    if name and loaded_by == "built-in":
        if name in _env_list(ENV_BLOCK):
            return (
                f"It is built into pstar-plugins (plugin {name!r}), which {ENV_BLOCK} keeps out: remove {name!r} "
                "from it."
            )
        saved_by = f"pstar-plugins {version}" if version else "another pstar-plugins"
        return (
            f"It was built into {saved_by} (plugin {name!r}), and this pstar-plugins {_version()} has no such method: "
            f"load the adapter with the version that saved it."
        )
    if name and loaded_by == "entry point":
        package = plugin.get("package")
        pinned = f"{package}=={version}" if package and version else package
        install = f"install {pinned} (pip install '{pinned}')" if package else "install the package that provides it"
        return (
            f"It was registered by the plugin installed under the {ENTRY_POINT_GROUP!r} entry point {name!r}: "
            f"{install}, and check that {ENV_DISABLE_AUTOLOAD}, {ENV_SELECT} or {ENV_BLOCK} do not keep it out."
        )
    return (
        f"Load the plugin that provides it: install its package (it registers under the {ENTRY_POINT_GROUP!r} entry "
        f"points; {ENV_DISABLE_AUTOLOAD}, {ENV_SELECT} and {ENV_BLOCK} can keep an installed one out), pass -p MODULE "
        f"({P_COMMANDS}), or from Python call get_plugin_manager().load_module(MODULE) first."
    )


def _refuse_removed_hooks(plugin: Any, name: str) -> None:
    """A plugin written against the routing hooks of earlier versions fails loudly, naming the
    hook and what replaces it, instead of being silently ignored."""
    for hook, instead in REMOVED_HOOKS.items():
        if callable(getattr(plugin, hook, None)):
            raise PluginError(
                f"plugin {name!r} implements {hook}, which no longer exists: the core asks the method "
                f"class directly. Instead, {instead} (docs/method_contract.md)."
            )
    if isinstance(plugin, MethodPlugin) and callable(getattr(type(plugin), "create", None)):
        raise PluginError(
            f"plugin {name!r} overrides MethodPlugin.create(), which is no longer called: set "
            "method_class on its MethodSpec instead (docs/method_contract.md)."
        )


def _hook_like(obj: Any) -> list[str]:
    """Names on ``obj`` that look meant as hooks: ``pstar_*`` callables or marked implementations."""
    marker = hookspecs.PROJECT_NAME + "_impl"
    names = []
    for attr in dir(obj):
        value = getattr(obj, attr, None)
        if callable(value) and (attr.startswith("pstar_") or hasattr(value, marker)):
            names.append(attr)
    return names


def _plugin_of_module(module: Any, path: str) -> tuple[Any, str]:
    """What ``-p module`` registers: the module when it implements hooks itself, else its one plugin object."""
    marker = hookspecs.PROJECT_NAME + "_impl"
    if any(hasattr(getattr(module, a, None), marker) for a in dir(module)):
        return module, path
    candidates = [
        a
        for a in dir(module)
        if not a.startswith("_")
        and not isinstance(getattr(module, a), (type, ModuleType))
        and not callable(getattr(module, a))
        and _hook_like(getattr(module, a))
    ]
    if len(candidates) == 1:
        return getattr(module, candidates[0]), f"{path}:{candidates[0]}"
    if candidates:
        raise PluginError(
            f"-p {path}: the module holds several plugin objects ({', '.join(candidates)}); "
            f"name one with -p {path}:{candidates[0]}."
        )
    raise PluginError(
        f"-p {path}: the module implements no pstar hook (no @hookimpl function named like a hook in "
        "docs/plugin_hooks.md, and no plugin object); check the hook names, or pass -p MODULE:OBJECT."
    )


def _naming_wrapper(function, plugin_name: str, hook_name: str):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except PStarError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {plugin_name!r} raised {type(exc).__name__} in {hook_name}: {exc}") from exc

    wrapper._pstar_wrapped = True
    return wrapper


_MANAGER: PStarPluginManager | None = None


def _version() -> str:
    try:
        return metadata.version("pstar-plugins")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def create_plugin_manager(autoload: bool | None = None) -> PStarPluginManager:
    """A fresh manager with the built-in methods and (unless disabled) entry-point plugins."""
    pm = PStarPluginManager()
    version = _version()
    for name, path in BUILTIN_PLUGINS.items():
        pm.register_plugin(_import_object(path), name=name, version=version, source="built-in")
    if autoload is None:
        autoload = os.environ.get(ENV_DISABLE_AUTOLOAD, "").lower() not in ("1", "true", "yes")
    if autoload:
        pm.load_entry_points()
    if os.environ.get(ENV_TRACE, "").lower() in ("1", "true", "yes"):
        pm.trace.root.setwriter(lambda text: sys.stderr.write(text))
        pm.enable_tracing()
    return pm


def get_plugin_manager() -> PStarPluginManager:
    """The process-wide manager, created on first use."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = create_plugin_manager()
    return _MANAGER


def plugin_record(plugin_manager, method: str) -> dict[str, str]:
    """Which plugin registered ``method`` and how it was loaded (``"-p"``, ``"entry point"``,
    ...), so that a command given the adapter without that plugin can say how to load it."""
    spec = getattr(plugin_manager, "methods", {}).get(method)
    if spec is None or not spec.plugin:
        return {}
    version, source = plugin_manager.sources.get(spec.plugin, ("", ""))
    package = getattr(plugin_manager, "packages", {}).get(spec.plugin, "")
    fields = (("name", spec.plugin), ("loaded_by", source), ("package", package), ("version", version))
    return {key: value for key, value in fields if value}
