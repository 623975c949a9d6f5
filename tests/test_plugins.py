"""The plugin system: registration, hooks shaping construction/freezing/groups, entry points."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from pstar_plugins import build_model, get_plugin_manager, hookimpl, param_groups
from pstar_plugins.assembly.registry import create_plugin_manager
from pstar_plugins.contract.errors import PluginError, UnknownMethodError
from pstar_plugins.contract.method import MethodConfig, MethodPlugin, MethodSpec, PromptMethod
from pstar_plugins.testing import random_batch, registered_plugin, tiny_model
from tests.helpers import UnfreezeNorms

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ScaleConfig(MethodConfig):
    scale: float = 1.0


class OutputScale(PromptMethod):
    """A toy method: multiplies the base model's logits by a trainable scalar."""

    def __init__(self, config, base_model, tokenizer=None):
        super().__init__(config)
        self.scale = nn.Parameter(torch.tensor(float(config.scale)))
        self.unused = nn.Parameter(torch.zeros(3))

    def run(self, base_model, inputs, task_ids):
        out = base_model(**{k: v for k, v in inputs.items() if v is not None})
        out.logits = out.logits * self.scale
        return out

    def trainable_parameter_names(self):
        return ["scale"]  # the method decides: 'unused' stays frozen


class ScalePlugin(MethodPlugin):
    spec = MethodSpec("output-scale", ScaleConfig, "toy method for tests", method_class=OutputScale)


def test_throwaway_plugin_shapes_construction_freezing_and_groups():
    pm = get_plugin_manager()
    with registered_plugin(ScalePlugin()), registered_plugin(UnfreezeNorms()):
        assert "output-scale" in pm.methods
        model = build_model(tiny_model("llama"), "output-scale", scale=2.0)
        assert isinstance(model.method, OutputScale)  # construction
        trainable = {n for n, _ in model.trainable_named_parameters()}
        assert trainable == {"method.scale", "base_model.model.norm.weight"}  # freezing
        groups = {g["name"]: g for g in param_groups(model, learning_rate=1.0)}
        assert set(groups) == {"prompt", "norms"}
        assert groups["norms"]["lr"] == pytest.approx(0.1)
        ids = random_batch(1, 5)
        with torch.no_grad():
            plain = model.base_model(input_ids=ids).logits
            torch.testing.assert_close(model(input_ids=ids).logits, plain * 2.0)
    assert "output-scale" not in pm.methods  # unregistered on exit


def test_unknown_method_lists_known_ones():
    with pytest.raises(UnknownMethodError, match="known methods: p-tuning, p-tuning-v2, prefix-tuning, prompt-tuning"):
        build_model(tiny_model("llama"), "prompt-tunning")


def test_misspelt_hook_fails_at_registration():
    class Typo:
        @hookimpl
        def pstar_trainable_parameter(self, model):  # missing 's'
            return []

    with pytest.raises(PluginError, match="unknown hook"):
        get_plugin_manager().register_plugin(Typo(), name="typo")
    assert get_plugin_manager().get_plugin("typo") is None


def test_duplicate_method_name_is_refused():
    class Clash(ScalePlugin):
        spec = MethodSpec("prompt-tuning", ScaleConfig, "clash", method_class=OutputScale)

    with pytest.raises(PluginError, match="already registered by plugin 'prompt-tuning'"):
        get_plugin_manager().register_plugin(Clash(), name="clash")


def test_block_list_environment_variable(monkeypatch):
    monkeypatch.setenv("PSTAR_BLOCK_PLUGINS", "p-tuning")
    pm = create_plugin_manager(autoload=False)
    assert "p-tuning" not in pm.methods and "prompt-tuning" in pm.methods


def test_third_party_package_installs_and_trains_by_name(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT / "examples" / "pstar-residual-prompt"),
        ],
        check=True,
    )
    script = r"""
import torch
from pstar_plugins import build_model, make_optimizer, get_plugin_manager
from pstar_plugins.testing import tiny_model, random_batch
pm = get_plugin_manager()
assert "residual-prompt" in pm.methods, sorted(pm.methods)
assert pm.methods["residual-prompt"].plugin == "residual-prompt"
model = build_model(tiny_model("llama"), "residual-prompt", num_virtual_tokens=4, init="random", bottleneck_size=8)
model.train()
opt = make_optimizer(model, 1e-2)
ids = random_batch(2, 8)
losses = []
for _ in range(20):
    opt.zero_grad(); loss = model(input_ids=ids, labels=ids).loss; loss.backward(); opt.step()
    losses.append(loss.item())
assert losses[-1] < losses[0], losses
model.eval()
with torch.no_grad():
    before = model(input_ids=ids).logits
    model.fold()
    after = model(input_ids=ids).logits
assert (before - after).abs().max() < 1e-5
import json, sys
model.save_adapter(sys.argv[1])
print(json.dumps(json.loads(open(sys.argv[1] + "/adapter_config.json").read())["plugin"]))
print("ok", losses[0], losses[-1])
"""
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{ROOT}", "PSTAR_DISABLE_PLUGIN_AUTOLOAD": "0"}
    adapter = tmp_path / "adapter"
    result = subprocess.run([sys.executable, "-c", script, str(adapter)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    record, done = result.stdout.splitlines()[-2:]
    assert done.startswith("ok")
    assert json.loads(record) == {
        "name": "residual-prompt",
        "loaded_by": "entry point",
        "package": "pstar-residual-prompt",
        "version": "0.1.0",
    }
    # and with autoload disabled the third-party method is not there
    env["PSTAR_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", "from pstar_plugins import get_plugin_manager as g; print(sorted(g().methods))"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert "residual-prompt" not in result.stdout
    # so an adapter of it names the package to install
    result = subprocess.run(
        [sys.executable, "-m", "pstar_plugins.evaluate", "--adapter", str(adapter)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "install pstar-residual-prompt==0.1.0" in result.stderr.replace("\n", " "), result.stderr[-2000:]


def test_cli_lists_methods_and_plugin_hooks():
    out = subprocess.run(
        [sys.executable, "-m", "pstar_plugins.cli", "methods"], capture_output=True, text=True, check=True
    ).stdout
    assert "prefix-tuning" in out and "Li & Liang" in out
    out = subprocess.run(
        [sys.executable, "-m", "pstar_plugins.cli", "plugins"], capture_output=True, text=True, check=True
    ).stdout
    assert "pstar_register_methods" in out and "built-in" in out


def test_exception_inside_a_hook_names_the_plugin():
    class Broken:
        @hookimpl
        def pstar_trainable_parameters(self, model):
            raise KeyError("no such layer")

    with registered_plugin(Broken(), name="broken-plugin"):
        with pytest.raises(PluginError, match="plugin 'broken-plugin' raised KeyError in pstar_trainable_parameters"):
            build_model(tiny_model("llama"), "prompt-tuning", init="random")


def test_author_kit_fixtures_register_and_clean_up(pstar_register, pstar_tiny_model):
    name = pstar_register(ScalePlugin())
    pm = get_plugin_manager()
    assert pm.methods["output-scale"].plugin == name
    model = build_model(pstar_tiny_model("gpt2"), "output-scale", scale=3.0)
    assert {n for n, _ in model.trainable_named_parameters()} == {"method.scale"}


def test_author_kit_fixture_unregisters_after_each_test(pytester):
    """Two tests in a plugin author's suite: what the first registers is gone in the second."""
    pytester.makepyfile(
        """
        from pstar_plugins.contract.method import MethodPlugin, MethodSpec, MethodConfig
        from pstar_plugins.assembly.registry import get_plugin_manager

        class Throwaway(MethodPlugin):
            spec = MethodSpec("throwaway-method", MethodConfig, "for one test", method_class="torch.nn:Module")

        def test_registers(pstar_register):
            pstar_register(Throwaway())
            assert "throwaway-method" in get_plugin_manager().methods

        def test_gone_afterwards():
            assert "throwaway-method" not in get_plugin_manager().methods
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=2)
