"""The method contract (docs/method_contract.md): every member of ``PromptMethod``, its spec and
its config is documented, and the core asks the class, never the name, for what differs."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pstar_plugins import build_model
from pstar_plugins.errors import AdapterError
from pstar_plugins.interop.peft import PEFT_CONFIG, PEFT_WEIGHTS, export_peft, import_peft
from pstar_plugins.methods.base import MethodConfig, MethodPlugin, MethodSpec, PromptMethod
from pstar_plugins.methods.prompt_tuning import PromptTuning, PromptTuningConfig
from pstar_plugins.plugins import create_plugin_manager
from pstar_plugins.testing import random_batch, registered_plugin, tiny_model
from tests.plugin_fixture import plugin as temperature_plugin

DOC = Path(__file__).resolve().parents[1] / "docs" / "method_contract.md"


def _sections() -> set[str]:
    return {name.replace("\\_", "_") for name in re.findall(r"^### (\S+)$", DOC.read_text(), re.M)}


def _own_public(cls, base) -> set[str]:
    return {n for n in vars(cls) if not n.startswith("_") and n not in vars(base)}


def test_every_member_of_the_contract_is_documented():
    documented = _sections()
    members = (_own_public(PromptMethod, torch.nn.Module) | {"__init__"}
               | {f.name for f in dataclasses.fields(MethodSpec) if f.name != "plugin"} | (_own_public(MethodSpec, object) - {"plugin"})
               | _own_public(MethodConfig, object) - {f.name for f in dataclasses.fields(MethodConfig)})
    missing = sorted(members - documented)
    assert not missing, f"undocumented in {DOC.name}: {missing}"
    assert not documented - members, f"documented but not on the contract: {sorted(documented - members)}"


def test_a_method_without_a_peft_layout_is_refused_on_export_by_its_class(tmp_path):
    with registered_plugin(temperature_plugin, name="temperature-plugin"):
        build_model(tiny_model("llama"), "temperature").save_adapter(tmp_path / "ours")
        with pytest.raises(AdapterError, match="Temperature has no PEFT equivalent"):
            export_peft(tmp_path / "ours", tiny_model("llama"), tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_peft_import_builds_the_method_whose_spec_claims_the_type(tmp_path, capsys):
    """No name is looked up: a third-party spec that lists a PEFT type gets its adapters."""
    pm = create_plugin_manager(autoload=False)
    pm.register_plugin(MethodPlugin(MethodSpec("my-prompt", PromptTuningConfig, "prompt tuning, another name",
                                               method_class=PromptTuning, peft_types=("MY_PROMPT",))), name="mine")
    embeddings = torch.randn(3, 32)
    (tmp_path / PEFT_CONFIG).write_text(json.dumps({"peft_type": "MY_PROMPT", "num_virtual_tokens": 3}))
    save_file({"prompt_embeddings": embeddings}, str(tmp_path / PEFT_WEIGHTS))
    model = import_peft(tmp_path, tiny_model("llama"), plugin_manager=pm)
    assert model.method_name == "my-prompt" and torch.equal(model.method.prompt.detach()[0], embeddings)
    (tmp_path / PEFT_CONFIG).write_text(json.dumps({"peft_type": "LORA", "num_virtual_tokens": 3}))
    with pytest.raises(AdapterError, match=r"'LORA' is imported by no loaded method \(they import MY_PROMPT, PREFIX_TUNING, "
                                           r"PROMPT_TUNING, P_TUNING\)\. A plugin whose MethodSpec lists it in peft_types would: "
                                           r"pass that plugin with -p MODULE"):
        import_peft(tmp_path, tiny_model("llama"), plugin_manager=pm)
    from pstar_plugins.cli import main

    # pstar import says so from the files, before it loads the model (which does not exist here)
    assert main(["import", str(tmp_path), "--model", "/no/such/model", "--output", str(tmp_path / "out")]) == 2
    assert "'LORA' is imported by no loaded method" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_spec_builds_its_class_from_an_import_path():
    spec = MethodSpec("lazy", PromptTuningConfig, "imported when built",
                      method_class="pstar_plugins.methods.prompt_tuning.module:PromptTuning")
    assert spec.resolve_class() is PromptTuning
    module = spec.create(tiny_model("llama"), PromptTuningConfig(num_virtual_tokens=2, init="random"))
    assert isinstance(module, PromptTuning) and module.prompt.shape == (1, 2, 32)
    with pytest.raises(Exception, match="cannot import its class 'no.such:Thing'"):
        dataclasses.replace(spec, method_class="no.such:Thing").resolve_class()


def test_the_core_calls_the_method_for_state_and_folding():
    """``PStarModel`` saves, loads and folds through the method's own members."""
    calls = []

    class Counting(PromptTuning):
        def trainable_state(self):
            calls.append("state")
            return super().trainable_state()

        def load_trainable_state(self, state):
            calls.append("load")
            super().load_trainable_state(state)

        def fold(self):
            calls.append("fold")

    spec = MethodSpec("counting", PromptTuningConfig, "counts calls", method_class=Counting)
    with registered_plugin(MethodPlugin(spec)):
        model = build_model(tiny_model("llama"), "counting", num_virtual_tokens=2, init="random")
        state = model.trainable_state()
        model.load_trainable_state(state)
        model.fold()
        with torch.no_grad():
            model(input_ids=random_batch(1, 4))
    assert calls == ["state", "load", "fold"]
