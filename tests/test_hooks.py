"""One test per hook (each calls the hook through the plugin manager), the meta-tests that
every hook is documented with its exact signature and has its test here, and the refusal of
hooks that earlier versions had (the method class answers those now)."""

import inspect
import re
import sys
from pathlib import Path

import pytest

from pstar_plugins import build_model, hookimpl, param_groups
from pstar_plugins.assembly.registry import REMOVED_HOOKS, create_plugin_manager
from pstar_plugins.contract import hookspecs
from pstar_plugins.contract.errors import PluginError
from pstar_plugins.contract.method import MethodConfig, MethodPlugin, MethodSpec
from pstar_plugins.testing import registered_plugin, tiny_model
from tests.helpers import UnfreezeNorms

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugin_hooks.md"
HOOKS = sorted(name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("pstar_"))


def _model(method="prefix-tuning", **options):
    return build_model(tiny_model("llama"), method, **options)


def test_hook_pstar_register_methods():
    """Registration runs the hook through the manager (traced, errors naming the plugin) for the
    plugin being registered only, and its methods become known by name."""
    pm = create_plugin_manager(autoload=False)
    assert set(pm.methods) == {"prompt-tuning", "prefix-tuning", "p-tuning", "p-tuning-v2"}
    assert all(isinstance(s, MethodSpec) and s.help and s.plugin == s.name for s in pm.methods.values())
    calls = []
    pm.add_hookcall_monitoring(
        lambda name, impls, kwargs: calls.append((name, [i.plugin_name for i in impls])), lambda *a: None
    )

    class TwoMethods:
        @hookimpl
        def pstar_register_methods(self, register):
            builtin = pm.methods["prompt-tuning"]
            register(MethodSpec("first-extra", builtin.config_class, "one", method_class=builtin.method_class))
            register(MethodSpec("second-extra", builtin.config_class, "two", method_class=builtin.method_class))

    pm.register_plugin(TwoMethods(), name="two-methods")
    assert calls == [("pstar_register_methods", ["two-methods"])]
    assert pm.methods["first-extra"].plugin == pm.methods["second-extra"].plugin == "two-methods"

    class Raising:
        @hookimpl
        def pstar_register_methods(self, register):
            raise KeyError("oops")

    try:
        pm.register_plugin(Raising(), name="raising")
    except PluginError as exc:
        assert "plugin 'raising' raised KeyError in pstar_register_methods" in str(exc)
    else:
        raise AssertionError("a raising registration was accepted")
    assert pm.get_plugin("raising") is None


def test_hook_pstar_trainable_parameters():
    """The method's own parameters come from the method; the hook adds other plugins' names."""
    with registered_plugin(UnfreezeNorms(), name="norms"):
        model = _model()
        contributed = {
            n for result in model.plugin_manager.hook.pstar_trainable_parameters(model=model) for n in (result or [])
        }
        assert contributed == {"base_model.model.norm.weight"}
        own = {"method." + n for n in model.method.trainable_parameter_names()}
        assert own and all(n.startswith("method.tables.self.") for n in own)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == own | contributed


def test_hook_pstar_param_groups():
    with registered_plugin(UnfreezeNorms(), name="norms"):
        model = _model()
        groups = [
            g
            for r in model.plugin_manager.hook.pstar_param_groups(model=model, learning_rate=0.1, weight_decay=0.01)
            for g in (r or [])
        ]
        assert [g["name"] for g in groups] == ["norms"] and groups[0]["lr"] == 0.01
        by_name = {g["name"]: g for g in param_groups(model, 0.1, 0.01)}  # the method's groups, then the plugins'
    assert set(by_name) == {"prefix", "prefix-projection", "norms"}
    assert by_name["prefix"]["weight_decay"] == 0.0 and by_name["prefix-projection"]["weight_decay"] == 0.01


@pytest.mark.parametrize("hook", sorted(REMOVED_HOOKS))
def test_a_plugin_implementing_a_removed_hook_is_refused_naming_the_replacement(hook):
    plugin = type("OldStyle", (), {hook: hookimpl(lambda self, **kwargs: None)})()
    pm = create_plugin_manager(autoload=False)
    with pytest.raises(PluginError, match=f"plugin 'old-style' implements {hook}, which no longer exists.*Instead, "):
        pm.register_plugin(plugin, name="old-style")
    assert pm.get_plugin("old-style") is None and hook not in HOOKS


def test_a_method_plugin_overriding_create_is_refused():
    class OldPlugin(MethodPlugin):
        spec = MethodSpec(
            "old", MethodConfig, "built by create()", method_class="pstar_plugins.contract.method:PromptMethod"
        )

        def create(self, base_model, config, tokenizer):
            raise AssertionError("never called")

    pm = create_plugin_manager(autoload=False)
    with pytest.raises(
        PluginError, match="overrides MethodPlugin.create\\(\\), which is no longer called: set method_class"
    ):
        pm.register_plugin(OldPlugin(), name="old")
    assert "old" not in pm.methods


def test_a_spec_without_a_method_class_is_refused_at_registration():
    pm = create_plugin_manager(autoload=False)
    with pytest.raises(PluginError, match="registers method 'classless' without a method class"):
        pm.register_plugin(MethodPlugin(MethodSpec("classless", MethodConfig, "no class")), name="classless")
    assert "classless" not in pm.methods and pm.get_plugin("classless") is None


def _signature(name: str) -> str:
    params = inspect.signature(getattr(hookspecs, name)).parameters
    return f"{name}({', '.join(params)})"


def test_every_hook_is_documented_with_its_exact_signature():
    doc = DOC.read_text()
    sections = dict(re.findall(r"^## (pstar_\w+)\n(.*?)(?=^## |\Z)", doc, re.M | re.S))
    assert sorted(sections) == HOOKS
    for name in HOOKS:
        assert f"```python\n{_signature(name)}\n```" in sections[name], name
        assert "*When:*" in sections[name] and "*Arguments:*" in sections[name] and "@hookimpl" in sections[name], name


def test_every_hook_has_a_test_of_its_own():
    module = sys.modules[__name__]
    for name in HOOKS:
        assert callable(getattr(module, f"test_hook_{name}", None)), f"no test_hook_{name}"
