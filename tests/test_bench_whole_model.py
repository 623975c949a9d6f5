"""bench/whole_model.py, the full fine-tuning reference of the quality table: through ``pstar
train -p bench.whole_model`` every weight of the base model trains and is saved, and the plugin
leaves runs of other methods as they are."""

import pytest
import torch

from tests.test_train_entry_point import _train, needs_model


def _tiny_weights(tiny_dir):
    from safetensors.torch import load_file

    return load_file(next(tiny_dir.glob("*.safetensors")))


@pytest.mark.slow
@needs_model
def test_every_base_weight_trains_and_is_saved_with_the_adapter(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    result = _train(tiny_dir, tmp_path / "run", "-p", "bench.whole_model", "--method", "whole-model", "--learning-rate", "1e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = load_file(tmp_path / "run" / "adapter" / "adapter.safetensors")
    before = _tiny_weights(tiny_dir)
    assert set(saved) == {f"base_model.{name}" for name in before}  # the whole model, under the wrapper's names
    unchanged = [name for name in before if torch.equal(saved[f"base_model.{name}"], before[name])]
    assert not unchanged, f"{len(unchanged)} weights did not train: {unchanged[:5]}"


@pytest.mark.slow
@needs_model
def test_the_plugin_leaves_other_methods_runs_as_they_are(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    flags = ("--method", "prompt-tuning", "--num-virtual-tokens", "2", "--seed", "3")
    plain = _train(tiny_dir, tmp_path / "plain", *flags)
    loaded = _train(tiny_dir, tmp_path / "loaded", "-p", "bench.whole_model", *flags)
    assert plain.returncode == 0 and loaded.returncode == 0, loaded.stderr[-3000:]
    a = load_file(tmp_path / "plain" / "adapter" / "adapter.safetensors")
    b = load_file(tmp_path / "loaded" / "adapter" / "adapter.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
