"""One test per hook (each calls the hook through the plugin manager), and the meta-tests that
every hook is documented with its exact signature and has its test here."""

import inspect
import re
import sys
from pathlib import Path

import torch

from pstar_plugins import build_model, hookspecs
from pstar_plugins.methods.base import MethodSpec
from pstar_plugins.plugins import get_plugin_manager
from pstar_plugins.testing import random_batch, tiny_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugin_hooks.md"
HOOKS = sorted(name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("pstar_"))


def _model(method="prefix-tuning", **options):
    return build_model(tiny_model("llama"), method, **options)


def test_hook_pstar_register_methods():
    """Registration runs the hook through the manager (traced, errors naming the plugin) for the
    plugin being registered only, and its methods become known by name."""
    from pstar_plugins import hookimpl
    from pstar_plugins.errors import PluginError
    from pstar_plugins.plugins import create_plugin_manager

    pm = create_plugin_manager(autoload=False)
    assert set(pm.methods) == {"prompt-tuning", "prefix-tuning", "p-tuning", "p-tuning-v2"}
    assert all(isinstance(s, MethodSpec) and s.help and s.plugin == s.name for s in pm.methods.values())
    calls = []
    pm.add_hookcall_monitoring(lambda name, impls, kwargs: calls.append((name, [i.plugin_name for i in impls])), lambda *a: None)

    class TwoMethods:
        @hookimpl
        def pstar_register_methods(self, register):
            register(MethodSpec("first-extra", pm.methods["prompt-tuning"].config_class, "one"))
            register(MethodSpec("second-extra", pm.methods["prompt-tuning"].config_class, "two"))

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


def test_hook_pstar_build_method():
    pm = get_plugin_manager()
    base = tiny_model("llama")
    config = pm.method("prefix-tuning").config_class()
    module = pm.hook.pstar_build_method(base_model=base, method="prefix-tuning", config=config, tokenizer=None)
    assert type(module).__name__ == "PrefixTuning" and module.injector.counts() == {"self": 2}
    assert pm.hook.pstar_build_method(base_model=base, method="no-such-method", config=config, tokenizer=None) is None


def test_hook_pstar_trainable_parameters():
    model = _model()
    names = {n for result in model._pm.hook.pstar_trainable_parameters(model=model) for n in (result or [])}
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("method.tables.self.") for n in names)


def test_hook_pstar_param_groups():
    model = _model()
    groups = [g for r in model._pm.hook.pstar_param_groups(model=model, learning_rate=0.1, weight_decay=0.01) for g in (r or [])]
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"prefix", "prefix-projection"}
    assert by_name["prefix"]["weight_decay"] == 0.0 and by_name["prefix-projection"]["weight_decay"] == 0.01


def test_hook_pstar_trainable_state():
    model = _model("prompt-tuning", num_virtual_tokens=3, init="random")
    state = model._pm.hook.pstar_trainable_state(model=model)
    assert set(state) == {"prompt"} and torch.equal(state["prompt"], model.method.prompt.detach())


def test_hook_pstar_load_trainable_state():
    model = _model("prompt-tuning", num_virtual_tokens=3, init="random")
    new = {"prompt": torch.randn(1, 3, 32)}
    assert model._pm.hook.pstar_load_trainable_state(model=model, state=new) is True
    assert torch.equal(model.method.prompt.detach(), new["prompt"])


def test_hook_pstar_fold():
    model = _model().eval()
    ids = random_batch(1, 5)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert model._pm.hook.pstar_fold(model=model) is True
        after = model(input_ids=ids).logits
    assert model.method.folded and (before - after).abs().max() <= 1e-5


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
