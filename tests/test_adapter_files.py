"""Save → load round-trips bit-exactly and the file holds only trainable tensors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pstar_plugins import load_adapter
from pstar_plugins.contract.errors import AdapterError, ConfigError
from pstar_plugins.mechanisms.adapter_io import read_adapter
from pstar_plugins.testing import tiny_model
from tests.helpers import CASES, inputs_for, make

EXPECTED_TENSORS = {
    "prompt-tuning": lambda m: {"prompt": (1, 4, 32)},
    "p-tuning": lambda m: {"encoder.embedding": (3, 32), "encoder.lstm.weight_ih_l0": (32, 32)},
}


@pytest.mark.parametrize("arch,method", CASES)
def test_save_load_round_trip_is_bit_exact(tmp_path, arch, method):
    model = make(arch, method)
    with torch.no_grad():
        for p in model.method.parameters():
            p.add_(torch.randn_like(p))
    model.save_adapter(tmp_path)
    saved = load_file(tmp_path / "adapter.safetensors")
    trainable = {n[len("method.") :]: p for n, p in model.trainable_named_parameters()}
    assert set(saved) == set(trainable)  # only trainable tensors, nothing frozen
    for name, tensor in saved.items():
        assert tensor.shape == trainable[name].shape
    for name, shape in EXPECTED_TENSORS.get(method, lambda m: {})(model).items():
        assert tuple(saved[name].shape) == shape
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["method"] == method and meta["format_version"] == 2

    loaded = load_adapter(tiny_model(arch, seed=0), tmp_path)
    for (n, a), (m, b) in zip(model.trainable_named_parameters(), loaded.trainable_named_parameters()):
        assert n == m and torch.equal(a, b), n
    batch = inputs_for(arch, method)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_folded_adapter_round_trips(tmp_path):
    model = make("llama", "prefix-tuning").fold()
    model.save_adapter(tmp_path)
    saved = load_file(tmp_path / "adapter.safetensors")
    assert set(saved) == {"tables.self.prefix"}
    assert saved["tables.self.prefix"].shape == (1, 3, 2 * 2 * 2 * 8)  # (T, m, layers·2·kv_heads·head_dim)
    loaded = load_adapter(tiny_model("llama"), tmp_path)
    assert loaded.method.folded
    assert torch.equal(loaded.method.tables["self"].prefix, model.method.tables["self"].prefix)


def test_adapter_for_another_geometry_is_refused(tmp_path):
    make("llama", "prefix-tuning").save_adapter(tmp_path)
    with pytest.raises(AdapterError, match="trained for a model with"):
        load_adapter(tiny_model("gpt2"), tmp_path)


def test_corrupt_and_future_adapters_are_refused(tmp_path):
    make("llama", "prompt-tuning").save_adapter(tmp_path)
    weights = tmp_path / "adapter.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        load_adapter(tiny_model("llama"), tmp_path)
    weights.write_bytes(data)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(weights), framework="pt") as fh:
        metadata = fh.metadata()
    meta = json.loads(metadata["pstar_adapter_config"])
    meta["format_version"] = 99
    save_file(load_file(weights), str(weights), metadata={**metadata, "pstar_adapter_config": json.dumps(meta)})
    with pytest.raises(AdapterError, match="format_version 99"):
        load_adapter(tiny_model("llama"), tmp_path)


def test_unwrap_restores_the_base_model():
    base = tiny_model("llama")
    ids = torch.randint(3, 90, (1, 6))
    with torch.no_grad():
        before = base(input_ids=ids).logits
    from pstar_plugins import build_model

    model = build_model(base, "prefix-tuning")
    restored = model.unwrap()
    with torch.no_grad():
        assert torch.equal(restored(input_ids=ids).logits, before)


def test_sigkill_during_saves_leaves_a_consistent_adapter(tmp_path):
    """A process saving over and over is killed at an arbitrary moment: what is on disk loads,
    and all its tensors come from one and the same save."""
    import signal
    import subprocess
    import sys
    import time

    script = f"""
import torch
from pstar_plugins.testing import tiny_model
from pstar_plugins import build_model
model = build_model(tiny_model("llama"), "prefix-tuning", num_virtual_tokens=64, projection_hidden_size=256)
version = 0
while True:
    version += 1
    with torch.no_grad():
        for p in model.method.parameters():
            p.fill_(version)
    model.save_adapter({str(tmp_path)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        # on a loaded machine the child's imports alone can take minutes: wait for its first save
        deadline = time.time() + 600
        while not (tmp_path / "adapter_config.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.7)
        alive = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    assert alive, f"the saving process ended on its own:\n{err.decode(errors='replace')[-2000:]}"
    assert (tmp_path / "adapter_config.json").exists(), "the saving process wrote nothing in 10 minutes"
    model = load_adapter(tiny_model("llama"), tmp_path)
    values = {float(v) for p in model.method.parameters() for v in p.detach().unique()}
    assert len(values) == 1 and values.pop() >= 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    # at most dead temp files, never a half-written adapter: ours (.adapter…), and the one safetensors
    # (0.8 on) writes the tensor file through before its own rename (.tmpXXXXXX)
    assert all(".adapter" in name or name.startswith(".tmp") for name in leftovers), leftovers


def test_a_p_tuning_adapter_saved_with_the_retired_label_words_field_still_loads(tmp_path):
    """Earlier versions wrote ``label_words`` into a p-tuning adapter's method config; the field
    is gone (the method never read it), and such files load unchanged."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = make("llama", "p-tuning")
    model.save_adapter(tmp_path)
    weights = tmp_path / "adapter.safetensors"
    with safe_open(str(weights), framework="pt") as fh:
        metadata = fh.metadata()
    meta = json.loads(metadata["pstar_adapter_config"])
    assert "label_words" not in meta["method_config"]
    meta["method_config"]["label_words"] = ["bad", "good"]
    save_file(load_file(weights), str(weights), metadata={**metadata, "pstar_adapter_config": json.dumps(meta)})
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    loaded = load_adapter(tiny_model("llama"), tmp_path)
    assert not hasattr(loaded.method_config, "label_words")
    batch = inputs_for("llama", "p-tuning")
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, loaded.eval()(**batch).logits)
    with pytest.raises(ConfigError, match="unknown option"):  # a new config given by hand still refuses it
        type(model.method_config).from_dict({**model.method_config.to_dict(), "label_words": ["a"]})


def test_pstar_train_continues_an_adapter_with_the_retired_label_words_field(tmp_path):
    """``--init-from-adapter`` reads the saved config the way loading does (retired fields dropped)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from pstar_plugins.testing import save_tiny_pretrained
    from pstar_plugins.train.cli import parse_args
    from pstar_plugins.train.plan import make_plan

    model_dir = tmp_path / "model"
    save_tiny_pretrained(model_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pstar_plugins import build_model

    adapter = tmp_path / "adapter"
    build_model(
        AutoModelForCausalLM.from_pretrained(model_dir), "p-tuning", tokenizer=AutoTokenizer.from_pretrained(model_dir)
    ).save_adapter(adapter)
    weights = adapter / "adapter.safetensors"
    with safe_open(str(weights), framework="pt") as fh:
        metadata = fh.metadata()
    meta = json.loads(metadata["pstar_adapter_config"])
    meta["method_config"]["label_words"] = ["negative", "positive"]
    save_file(load_file(weights), str(weights), metadata={**metadata, "pstar_adapter_config": json.dumps(meta)})
    (adapter / "adapter_config.json").write_text(json.dumps(meta))
    plan = make_plan(
        parse_args(
            [
                "--method",
                "p-tuning",
                "--model",
                str(model_dir),
                "--output-dir",
                str(tmp_path / "out"),
                "--init-from-adapter",
                str(adapter),
            ]
        )
    )
    assert not hasattr(plan.config, "label_words")


def test_an_adapter_of_a_method_no_plugin_registers_names_it_and_how_to_load_it(tmp_path, capsys):
    from pstar_plugins import build_model
    from pstar_plugins.contract.errors import UnknownMethodError
    from pstar_plugins.testing import registered_plugin
    from tests.plugin_fixture import plugin

    with registered_plugin(plugin):
        build_model(tiny_model("llama"), "temperature").save_adapter(tmp_path / "adapter")
    message = (
        r"adapter: this adapter was saved by method 'temperature', which no loaded plugin registers .*'pstar_plugins' "
        r"entry points; PSTAR_DISABLE_PLUGIN_AUTOLOAD, PSTAR_PLUGINS and PSTAR_BLOCK_PLUGINS can keep an installed one "
        r"out\), pass -p MODULE \(pstar train, pstar eval, pstar export, pstar import\), or from Python call "
        r"get_plugin_manager\(\).load_module\(MODULE\) first\."
    )
    with pytest.raises(UnknownMethodError, match=message):
        load_adapter(tiny_model("llama"), tmp_path / "adapter")
    # the commands say so before any model loads (pstar train: before advising --method)
    from pstar_plugins import evaluate, train
    from pstar_plugins.cli import main as pstar

    for command, argv in (
        (evaluate.main, ["--adapter", str(tmp_path / "adapter"), "--model", "/no/such/model"]),
        (
            train.main,
            [
                "--method",
                "prompt-tuning",
                "--init-from-adapter",
                str(tmp_path / "adapter"),
                "--output-dir",
                str(tmp_path / "out"),
            ],
        ),
        (pstar, ["export", str(tmp_path / "adapter"), "--model", "/no/such/model", "--output", str(tmp_path / "peft")]),
    ):
        assert command(argv) == 2
        import re

        assert re.search(message, capsys.readouterr().err.replace("\n", " ")), command


def test_an_adapter_records_the_plugin_of_its_method_and_the_error_says_how_to_load_it(tmp_path):
    from pstar_plugins import build_model
    from pstar_plugins.assembly.registry import get_plugin_manager
    from pstar_plugins.contract.errors import UnknownMethodError

    pm = get_plugin_manager()
    name = pm.load_module("tests.plugin_fixture")
    try:
        assert pm.load_module("tests.plugin_fixture") == name  # a second -p of the same module in one process
        build_model(tiny_model("llama"), "temperature").save_adapter(tmp_path / "adapter")
        builtin = build_model(tiny_model("llama"), "prompt-tuning", num_virtual_tokens=2)
        builtin.save_adapter(tmp_path / "builtin")
    finally:
        pm.unregister_plugin(name)
    assert read_adapter(tmp_path / "adapter")[0]["plugin"] == {"name": "tests.plugin_fixture:plugin", "loaded_by": "-p"}
    recorded = read_adapter(tmp_path / "builtin")[0]["plugin"]
    spec = pm.method("prompt-tuning")
    assert recorded["name"] == spec.plugin and recorded["loaded_by"] == pm.sources[spec.plugin][1]
    with pytest.raises(
        UnknownMethodError,
        match=r"registered by plugin module 'tests.plugin_fixture:plugin', loaded with "
        r"-p: pass -p tests.plugin_fixture:plugin \(pstar train, pstar eval",
    ):
        load_adapter(tiny_model("llama"), tmp_path / "adapter")
    with pytest.raises(
        UnknownMethodError,
        match=r"built into pstar-plugins \(plugin 'prompt-tuning'\), which "
        r"PSTAR_BLOCK_PLUGINS keeps out: remove 'prompt-tuning' from it",
    ):
        with pytest.MonkeyPatch.context() as env:
            env.setenv("PSTAR_BLOCK_PLUGINS", "prompt-tuning")
            from pstar_plugins.assembly.registry import create_plugin_manager

            load_adapter(
                tiny_model("llama"), tmp_path / "builtin", plugin_manager=create_plugin_manager(autoload=False)
            )
    older = {"name": "prompt-tuning", "loaded_by": "built-in", "version": "0.0.9"}  # a method this version lacks
    with pytest.raises(
        UnknownMethodError,
        match=r"built into pstar-plugins 0\.0\.9 \(plugin 'prompt-tuning'\), and this "
        r"pstar-plugins \S+ has no such method: load the adapter with the version",
    ):
        pm.method("retired-method", adapter=tmp_path / "builtin", plugin=older)
    entry_point = {"name": "their-methods", "loaded_by": "entry point", "package": "their-pkg", "version": "1.0"}
    with pytest.raises(
        UnknownMethodError,
        match=r"registered by the plugin installed under the 'pstar_plugins' entry point "
        r"'their-methods': install their-pkg==1\.0 \(pip install 'their-pkg==1\.0'\)",
    ):
        pm.method("temperature", adapter=tmp_path / "adapter", plugin=entry_point)
    with pytest.raises(UnknownMethodError, match=r"Load the plugin that provides it"):  # a hand-edited record
        pm.method("temperature", adapter=tmp_path / "adapter", plugin="not a record")
