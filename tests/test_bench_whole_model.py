"""bench/whole_model.py, the full fine-tuning reference of the quality table: through ``pstar
train -p bench.whole_model`` every weight of the base model trains and is saved, and the plugin
leaves runs of other methods as they are."""

import sys
from pathlib import Path

import pytest
import torch

from pstar_plugins.assembly.build import build_model
from pstar_plugins.contract.errors import ConfigError
from pstar_plugins.testing import registered_plugin, tiny_model
from tests.test_train_entry_point import _train, needs_model, saved_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import whole_model  # noqa: E402


@pytest.fixture
def registered():
    with registered_plugin(whole_model.WholeModelPlugin()):
        yield


def test_weights_train_in_fp32_and_every_one_is_trainable(registered):
    base = tiny_model("llama", dtype=torch.bfloat16)
    base.is_quantized = True  # as transformers marks a model it de-quantized from GGUF: .float() refuses it
    model = build_model(base, "whole-model")
    params = dict(model.named_parameters())
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params.values())
    ids = torch.tensor([[5, 6, 7]])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    out.logits.sum().backward()
    assert all(p.grad is not None for p in params.values())


def test_what_the_method_cannot_be_is_refused(registered):
    model = build_model(tiny_model("llama"), "whole-model")
    with pytest.raises(ConfigError, match="no bare model to switch back to"):
        with model.disable_adapter():
            pass
    with pytest.raises(ConfigError, match="num_tasks=3: whole-model trains one model's weights"):
        build_model(tiny_model("llama"), "whole-model", num_tasks=3)


def test_generation_is_the_base_models_own(registered):
    base = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    model = build_model(base, "whole-model")
    got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)


def _tiny_weights(tiny_dir):
    from safetensors.torch import load_file

    return load_file(next(tiny_dir.glob("*.safetensors")))


@pytest.mark.slow
@needs_model
def test_every_base_weight_trains_and_is_saved_with_the_adapter(tiny_dir, tmp_path):
    result = _train(
        tiny_dir, tmp_path / "run", "-p", "bench.whole_model", "--method", "whole-model", "--learning-rate", "1e-3"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = saved_adapter(tmp_path / "run")
    before = _tiny_weights(tiny_dir)
    assert set(saved) == {f"base_model.{name}" for name in before}  # the whole model, under the wrapper's names
    unchanged = [name for name in before if torch.equal(saved[f"base_model.{name}"], before[name])]
    assert not unchanged, f"{len(unchanged)} weights did not train: {unchanged[:5]}"


@pytest.mark.slow
@needs_model
def test_the_plugin_leaves_other_methods_runs_as_they_are(tiny_dir, tmp_path):
    flags = ("--method", "prompt-tuning", "--num-virtual-tokens", "2", "--seed", "3")
    plain = _train(tiny_dir, tmp_path / "plain", *flags)
    loaded = _train(tiny_dir, tmp_path / "loaded", "-p", "bench.whole_model", *flags)
    assert plain.returncode == 0 and loaded.returncode == 0, loaded.stderr[-3000:]
    a = saved_adapter(tmp_path / "plain")
    b = saved_adapter(tmp_path / "loaded")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
