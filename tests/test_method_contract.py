"""The method contract (docs/method_contract.md): what a method must implement, may override, may
call and may opt into, each documented where it belongs; the smallest method passes the
conformance suite; the core asks the class, never the name, for what differs."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pstar_plugins import build_model
from pstar_plugins.assembly.registry import create_plugin_manager
from pstar_plugins.contract.capabilities import (
    CheckpointContext,
    OnePassContinuations,
    PeftExport,
    PromptCache,
    TokenizerCheck,
)
from pstar_plugins.contract.errors import AdapterError
from pstar_plugins.contract.method import MethodConfig, MethodPlugin, MethodSpec, PromptMethod
from pstar_plugins.contract.spec import ClassifierHead
from pstar_plugins.interop.peft import PEFT_CONFIG, PEFT_WEIGHTS, export_peft, import_peft
from pstar_plugins.mechanisms import base_calls, inputs
from pstar_plugins.methods.embedding_prompt import EmbeddingPromptMethod
from pstar_plugins.methods.prompt_tuning import PromptTuning, PromptTuningConfig
from pstar_plugins.testing import random_batch, registered_plugin, tiny_model
from pstar_plugins.testing.conformance import assert_conforms
from tests.plugin_fixture import plugin as temperature_plugin

DOC = Path(__file__).resolve().parents[1] / "docs" / "method_contract.md"
FIXTURE = Path(__file__).resolve().parent / "plugin_fixture.py"


def _sections() -> dict[str, set[str]]:
    """``## part`` → the ``### member`` headings under it."""
    parts: dict[str, set[str]] = {}
    part = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            part = parts.setdefault(line[3:].strip(), set())
        elif line.startswith("### ") and part is not None:
            part.add(line[4:].strip().replace("\\_", "_"))
    return parts


def _own_public(cls, base=object) -> set[str]:
    return {n for n in vars(cls) if not n.startswith("_") and n not in vars(base)}


CAPABILITIES = [OnePassContinuations, PeftExport, PromptCache, TokenizerCheck, CheckpointContext, ClassifierHead]
#: what a method must implement; everything else on PromptMethod has a default
MUST = {"__init__", "run"}
MAY_CALL = {"contributing", "disabled", "check_task_ids", "packing", "call_base", "generate_base", "fill_position_ids"}


def test_the_contract_doc_separates_must_may_and_opt_in():
    parts = _sections()
    method = _own_public(PromptMethod, torch.nn.Module) | {"packing"}
    assert parts["Must"] == MUST
    assert parts["May call"] == MAY_CALL
    assert parts["May override"] == method - MUST - MAY_CALL, (
        "every other member of PromptMethod is a documented default"
    )
    assert {"call_base", "generate_base"} <= set(vars(base_calls)) and "fill_position_ids" in vars(inputs)
    opt_in = {c.__name__ for c in CAPABILITIES} | {"EmbeddingPromptMethod"}
    opt_in |= {m for c in CAPABILITIES for m in _own_public(c)}
    opt_in |= _own_public(EmbeddingPromptMethod, PromptMethod) - {"peft_embedding_config", "run", "generate"}
    assert parts["Opt-in capabilities"] == opt_in
    spec = {f.name for f in dataclasses.fields(MethodSpec) if f.name != "plugin"} | (
        _own_public(MethodSpec) - {"plugin"}
    )
    assert parts["The spec: `MethodSpec`"] == spec
    config = _own_public(MethodConfig) - {f.name for f in dataclasses.fields(MethodConfig)}
    assert parts["The config: `MethodConfig`"] == config


def test_must_members_have_no_default_and_may_members_do():
    method = PromptMethod(MethodConfig())
    with pytest.raises(NotImplementedError):
        method.run(None, {}, None)
    assert method.adapter_geometry() == {} and method.folded and method.input_pads == {} and method.slot_input is None


def test_the_documented_smallest_method_is_the_test_fixture():
    block = re.search(r"## The smallest complete method.*?```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    assert block == FIXTURE.read_text(), (
        "docs/method_contract.md shows tests/plugin_fixture.py: copy the file into the doc"
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_smallest_method_passes_the_conformance_suite(arch):
    with registered_plugin(temperature_plugin, name="temperature-plugin"):
        report = assert_conforms(lambda: tiny_model(arch), "temperature", {"initial": 1.7})
    passed = {o.check for o in report.outcomes if o.status == "passed"}
    assert {"disabled_equals_base", "trains_only_method_tensors", "save_load_roundtrip"} <= passed, report.summary()


def test_a_method_without_a_peft_layout_is_refused_on_export_by_its_class(tmp_path):
    with registered_plugin(temperature_plugin, name="temperature-plugin"):
        build_model(tiny_model("llama"), "temperature").save_adapter(tmp_path / "ours")
        with pytest.raises(AdapterError, match="Temperature has no PEFT equivalent"):
            export_peft(tmp_path / "ours", tiny_model("llama"), tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_peft_import_builds_the_method_whose_spec_claims_the_type(tmp_path, capsys):
    """No name is looked up: a third-party spec that lists a PEFT type gets its adapters."""
    pm = create_plugin_manager(autoload=False)
    pm.register_plugin(
        MethodPlugin(
            MethodSpec(
                "my-prompt",
                PromptTuningConfig,
                "prompt tuning, another name",
                method_class=PromptTuning,
                peft_types=("MY_PROMPT",),
            )
        ),
        name="mine",
    )
    embeddings = torch.randn(3, 32)
    (tmp_path / PEFT_CONFIG).write_text(json.dumps({"peft_type": "MY_PROMPT", "num_virtual_tokens": 3}))
    save_file({"prompt_embeddings": embeddings}, str(tmp_path / PEFT_WEIGHTS))
    model = import_peft(tmp_path, tiny_model("llama"), plugin_manager=pm)
    assert model.method_name == "my-prompt" and torch.equal(model.method.prompt.detach()[0], embeddings)
    (tmp_path / PEFT_CONFIG).write_text(json.dumps({"peft_type": "LORA", "num_virtual_tokens": 3}))
    with pytest.raises(
        AdapterError,
        match=r"'LORA' is imported by no loaded method \(they import MY_PROMPT, PREFIX_TUNING, "
        r"PROMPT_TUNING, P_TUNING\)\. A plugin whose MethodSpec lists it in peft_types would: "
        r"pass that plugin with -p MODULE",
    ):
        import_peft(tmp_path, tiny_model("llama"), plugin_manager=pm)
    from pstar_plugins.cli import main

    # pstar import says so from the files, before it loads the model (which does not exist here)
    assert main(["import", str(tmp_path), "--model", "/no/such/model", "--output", str(tmp_path / "out")]) == 2
    assert "'LORA' is imported by no loaded method" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_spec_builds_its_class_from_an_import_path():
    spec = MethodSpec(
        "lazy",
        PromptTuningConfig,
        "imported when built",
        method_class="pstar_plugins.methods.prompt_tuning.module:PromptTuning",
    )
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


def test_a_methods_own_inputs_are_named_by_forward_and_a_deep_copy_is_a_model_of_its_own():
    """``transformers.Trainer`` keeps the dataset columns ``forward`` names: P-tuning's declared
    input is among them, and a deep copy (TRL's reference model) calls its own method."""
    import copy
    import inspect

    model = build_model(tiny_model("llama"), "p-tuning", template="{soft:2} {sentence}:{answer}")
    assert set(model.method.input_pads) <= set(inspect.signature(model.forward).parameters)
    assert "prompt_index" not in inspect.signature(build_model(tiny_model("llama"), "prompt-tuning").forward).parameters
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin and twin.plugin_manager is model.plugin_manager
    with torch.no_grad():
        twin.method.encoder.embedding.add_(1.0)
        ids = random_batch(2, 6)
        slots = torch.tensor([[0, 1, -1, -1, -1, -1]] * 2)
        assert not torch.equal(
            model(input_ids=ids, prompt_index=slots).logits, twin(input_ids=ids, prompt_index=slots).logits
        )
