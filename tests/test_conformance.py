"""The conformance suite on the built-in methods and on cases that broke it before."""

from pathlib import Path

import pytest
import torch

from pstar_plugins import build_model, hookimpl, load_adapter
from pstar_plugins.testing import tiny_model
from pstar_plugins.testing.conformance import FAILED, assert_conforms, check_method
from tests.helpers import METHOD_OPTIONS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pstar-residual-prompt"


class NormTrainer:
    """The plugin of docs/plugin_hooks.md: also tunes the final norm, for any method."""

    @hookimpl
    def pstar_trainable_parameters(self, model):
        return [n for n, _ in model.named_parameters() if n.endswith("model.norm.weight")]


def test_weights_a_plugin_unfreezes_are_saved_and_loaded(pstar_register, tmp_path):
    pstar_register(NormTrainer())
    model = build_model(tiny_model("llama"), "prefix-tuning", **METHOD_OPTIONS["prefix-tuning"])
    norm = dict(model.named_parameters())["base_model.model.norm.weight"]
    assert norm.requires_grad
    with torch.no_grad():
        norm.mul_(1.5)
    model.save_adapter(tmp_path / "adapter")
    loaded = load_adapter(tiny_model("llama"), tmp_path / "adapter")
    restored = dict(loaded.named_parameters())["base_model.model.norm.weight"]
    assert torch.equal(restored, norm) and restored.requires_grad


def test_the_suite_sees_plugin_weights_that_are_not_saved(pstar_register, monkeypatch):
    pstar_register(NormTrainer())
    from pstar_plugins.assembly.model import PStarModel

    monkeypatch.setattr(PStarModel, "extra_trainable_parameters", lambda self: [])  # the old behaviour
    report = check_method(
        lambda: tiny_model("llama"), "prompt-tuning", METHOD_OPTIONS["prompt-tuning"], checks=["save_load_roundtrip"]
    )
    assert report.outcome("save_load_roundtrip").status == FAILED, report.summary()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_residual_prompt_example_conforms_with_packing(arch, pstar_register, monkeypatch):
    """The example overrides ``virtual_block``; the prompts' cache must serve its prompt."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from pstar_residual_prompt.plugin import plugin

    pstar_register(plugin)
    report = assert_conforms(
        lambda: tiny_model(arch), "residual-prompt", {"num_virtual_tokens": 4, "init": "random", "bottleneck_size": 8}
    )
    assert "call: packed" in report.outcome("inference_fast_path").detail


@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta", "bart"])
def test_roberta_and_friends_keep_their_positions(arch):
    """With the method switched off the wrapper is the bare model (RoBERTa numbers from pad + 1)."""
    report = check_method(
        lambda: tiny_model(arch), "prompt-tuning", METHOD_OPTIONS["prompt-tuning"], checks=["disabled_equals_base"]
    )
    assert report.ok, report.summary()


def test_p_tuning_trains_on_encoder_decoder_models():
    assert_conforms(
        lambda: tiny_model("t5"), "p-tuning", METHOD_OPTIONS["p-tuning"], checks=["trains_only_method_tensors"]
    )


def test_second_build_and_refused_load_leave_the_base_usable():
    assert_conforms(
        lambda: tiny_model("llama"),
        "prefix-tuning",
        METHOD_OPTIONS["prefix-tuning"],
        checks=["build_twice_and_refused_load"],
    )


def test_adapter_of_the_old_position_numbering_warns_on_roberta(tmp_path):
    """Adapters written before RoBERTa-style models kept their own position numbering load,
    with a warning that their outputs moved; others load silently."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    for arch, warns in (("roberta", True), ("llama", False)):
        model = build_model(tiny_model(arch), "prompt-tuning", **METHOD_OPTIONS["prompt-tuning"])
        folder = tmp_path / arch
        model.save_adapter(folder)
        path = folder / "adapter.safetensors"
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata()
        meta = json.loads(metadata["pstar_adapter_config"])
        meta["format_version"] = 1
        save_file(load_file(path), str(path), metadata={**metadata, "pstar_adapter_config": json.dumps(meta)})
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_adapter(tiny_model(arch), folder)
        assert any("numbered this model's positions from 0" in str(w.message) for w in caught) == warns
