"""PEFT-compatible export and import: PEFT loads our adapters and computes the same logits, and
PEFT adapters come back as trainable pstar adapters."""

import json

import pytest
import torch

from pstar_plugins import build_model, load_adapter, make_optimizer
from pstar_plugins.contract.errors import AdapterError, IncompatibleModelError
from pstar_plugins.interop.peft import export_peft, import_peft
from pstar_plugins.testing import random_batch, tiny_model
from tests.test_train_entry_point import needs_model

peft = pytest.importorskip("peft")

CASES = [
    ("llama", "prompt-tuning", {"init": "random", "num_virtual_tokens": 4}, "PROMPT_TUNING"),
    ("gpt2", "prompt-tuning", {"init": "random", "num_virtual_tokens": 4}, "PROMPT_TUNING"),
    ("llama", "p-tuning", {"template": "{soft:3}{text}", "init": "random"}, "P_TUNING"),
    ("llama", "prefix-tuning", {"num_virtual_tokens": 3}, "PREFIX_TUNING"),
    ("llama", "p-tuning-v2", {"head": "none", "num_virtual_tokens": 3}, "PREFIX_TUNING"),
]


def _trained(arch, method, options, path):
    model = build_model(tiny_model(arch), method, **options)
    with torch.no_grad():
        for p in model.method.parameters():
            p.add_(torch.randn_like(p))
    model.save_adapter(path)
    return model


def _our_logits(model, method, ids):
    if method == "p-tuning":  # the template "{soft:3}{text}": three soft slots, then the text
        n = ids.shape[0]
        full = torch.cat([torch.zeros(n, 3, dtype=torch.long), ids], 1)
        index = torch.cat([torch.arange(3).expand(n, 3), torch.full(ids.shape, -1)], 1)
        return model(input_ids=full, prompt_index=index).logits[:, 3:]
    return model(input_ids=ids).logits


# PEFT 0.21 hands its prefixes to the model as ``past_key_values`` and reads
# ``is_gradient_checkpointing``, names transformers 5.25 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
PEFT_PASSES_PAST_KEY_VALUES = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


@PEFT_PASSES_PAST_KEY_VALUES
@pytest.mark.parametrize("arch,method,options,peft_type", CASES)
def test_peft_loads_the_export_and_gives_the_same_logits(tmp_path, arch, method, options, peft_type):
    _trained(arch, method, options, tmp_path / "ours")
    config = export_peft(tmp_path / "ours", tiny_model(arch), tmp_path / "peft")
    assert config["peft_type"] == peft_type
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == peft_type
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "peft").eval()
    ours = load_adapter(tiny_model(arch), tmp_path / "ours").eval()
    ids = random_batch(2, 7)
    with torch.no_grad():
        a = _our_logits(ours, method, ids)
        b = theirs(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -7:]
    assert (a - b).abs().max() <= 1e-5


@PEFT_PASSES_PAST_KEY_VALUES
@pytest.mark.parametrize(
    "arch,method,options,peft_type", [c for c in CASES if c[1] in ("prompt-tuning", "prefix-tuning")]
)
def test_imported_peft_adapter_matches_and_keeps_training(tmp_path, arch, method, options, peft_type):
    _trained(arch, method, options, tmp_path / "ours")
    export_peft(tmp_path / "ours", tiny_model(arch), tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "peft").eval()
    imported = import_peft(tmp_path / "peft", tiny_model(arch))
    ids = random_batch(2, 7)
    with torch.no_grad():
        diff = (
            (
                imported.eval()(input_ids=ids).logits
                - theirs(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -7:]
            )
            .abs()
            .max()
        )
    assert diff <= 1e-5
    imported.train()
    before = {n: p.detach().clone() for n, p in imported.trainable_named_parameters()}
    assert before
    optimizer = make_optimizer(imported, 1e-2)
    imported(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in imported.trainable_named_parameters())


def test_prefix_export_refused_for_absolute_positions(tmp_path):
    _trained("gpt2", "prefix-tuning", {"num_virtual_tokens": 3}, tmp_path / "ours")
    with pytest.raises(IncompatibleModelError, match="no rotary position embedding"):
        export_peft(tmp_path / "ours", tiny_model("gpt2"), tmp_path / "peft")


def test_p_tuning_template_with_inner_soft_tokens_refused(tmp_path):
    _trained("llama", "p-tuning", {"template": "{soft:2} {text} {soft}", "init": "random"}, tmp_path / "ours")
    with pytest.raises(AdapterError, match="places soft tokens elsewhere"):
        export_peft(tmp_path / "ours", tiny_model("llama"), tmp_path / "peft")


@pytest.mark.slow
@PEFT_PASSES_PAST_KEY_VALUES
def test_cli_export_then_import_then_continue_training(tiny_dir, tmp_path):
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from tests.test_train_entry_point import _train

    assert _train(tiny_dir, tmp_path / "run", "--method", "prefix-tuning", "--num-virtual-tokens", "4").returncode == 0

    def run(*a):
        return subprocess.run([sys.executable, "-m", "pstar_plugins.cli", *a], capture_output=True, text=True)

    out = run(
        "export",
        str(tmp_path / "run" / "adapter"),
        "--format",
        "peft",
        "--model",
        str(tiny_dir),
        "--output",
        str(tmp_path / "peft"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "peft").eval()
    out = run("import", str(tmp_path / "peft"), "--model", str(tiny_dir), "--output", str(tmp_path / "back"))
    assert out.returncode == 0, out.stderr[-2000:]
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "back").eval()
    ids = torch.randint(10, 1000, (2, 6))
    with torch.no_grad():
        assert (
            ours(input_ids=ids).logits - theirs(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -6:]
        ).abs().max() <= 1e-5
    # and training continues from the imported adapter through the training script
    result = _train(
        tiny_dir, tmp_path / "more", "--method", "prefix-tuning", "--init-from-adapter", str(tmp_path / "back")
    )
    assert result.returncode == 0, result.stderr[-2000:]


@needs_model
def test_cli_export_reads_the_adapter_once_so_an_edited_config_is_reported_once(tiny_dir, tmp_path):
    import warnings

    from transformers import AutoModelForCausalLM

    from pstar_plugins.cli import main

    build_model(
        AutoModelForCausalLM.from_pretrained(tiny_dir), "prompt-tuning", num_virtual_tokens=2, init="random"
    ).save_adapter(tmp_path / "ours")
    edited = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    edited["method_config"]["num_virtual_tokens"] = 3  # has no effect: the config inside the tensor file is used
    (tmp_path / "ours" / "adapter_config.json").write_text(json.dumps(edited))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert (
            main(["export", str(tmp_path / "ours"), "--model", str(tiny_dir), "--output", str(tmp_path / "peft")]) == 0
        )
    assert len([w for w in caught if "differs in" in str(w.message)]) == 1
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["num_virtual_tokens"] == 2
