"""Frozen bases in 4 and 8 bits (bitsandbytes, whose CPU backend runs here): every method trains
with the frozen weights still quantized, passes the conformance suite, saves an adapter that
loads onto the full-precision base (and the reverse), and generates."""

import pytest
import torch

from pstar_plugins import build_model, load_adapter
from pstar_plugins.testing.architectures import tiny_model, tiny_quantized_model
from tests.helpers import METHOD_OPTIONS, inputs_for

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is installed by scripts/setup.sh ([quantization])")
pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning")  # int8's fp16 cast, as on GPUs
METHODS = ["prompt-tuning", "prefix-tuning", "p-tuning", "p-tuning-v2"]
QUANTIZED = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}


def _frozen_bytes(model) -> dict[str, bytes]:
    return {
        n: p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        for n, p in model.named_parameters()
        if not p.requires_grad
    }


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_on_a_quantized_base_and_only_the_method_changes(method, bits, tmp_path):
    base = tiny_quantized_model("llama", bits)
    model = build_model(base, method, **METHOD_OPTIONS[method]).train()
    layers = [m for m in model.base_model.modules() if isinstance(m, QUANTIZED[bits])]
    assert layers, "the base's linear layers are quantized"
    frozen = _frozen_bytes(model)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("method.") for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        loss = model(**inputs_for("llama", method, n=3, length=9, seed=step)).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert _frozen_bytes(model) == frozen, "a quantized frozen weight changed"
    assert all(isinstance(m, QUANTIZED[bits]) for m in layers)
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if p.requires_grad)

    # the adapter loads onto the full-precision base, and back onto a quantized one, bit for bit
    model.save_adapter(tmp_path / "adapter")
    state = model.trainable_state()
    full = load_adapter(tiny_model("llama"), tmp_path / "adapter")
    assert all(torch.equal(full.trainable_state()[k], v) for k, v in state.items())
    full.save_adapter(tmp_path / "again")
    back = load_adapter(tiny_quantized_model("llama", bits), tmp_path / "again")
    assert all(torch.equal(back.trainable_state()[k], v) for k, v in state.items())


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_a_quantized_base_generates(method):
    model = build_model(tiny_quantized_model("llama", 4), method, **METHOD_OPTIONS[method]).eval()
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0
    )
    assert out.shape == (2, 10) and torch.equal(out[:, :6], ids)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_quantized_bases_pass_the_conformance_suite(arch, bits):
    from pstar_plugins.testing.conformance import check_method
    from tests.matrix import options

    for method in METHODS:
        report = check_method(
            lambda: tiny_quantized_model(arch, bits),
            method,
            options(arch, method),
            name=f"{method} on {bits}-bit {arch}",
        )
        assert report.refused is None and report.ok, report.summary()


def test_parameter_counts_count_the_real_elements_of_packed_4bit_weights():
    full = build_model(tiny_model("llama"), "prompt-tuning", **METHOD_OPTIONS["prompt-tuning"])
    packed = build_model(tiny_quantized_model("llama", 4), "prompt-tuning", **METHOD_OPTIONS["prompt-tuning"])
    assert packed.parameter_counts() == full.parameter_counts()
