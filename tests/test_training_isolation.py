"""After optimizer steps only the method's tensors changed, and every one of them learned."""

import pytest
import torch

from pstar_plugins import make_optimizer
from tests.helpers import CASES, inputs_for, make


@pytest.mark.parametrize("arch,method", CASES)
def test_only_method_tensors_change(arch, method):
    model = make(arch, method)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trainable
    assert all(n.startswith("method.") for n in trainable)
    optimizer = make_optimizer(model, learning_rate=1e-2)
    batch = inputs_for(arch, method)
    for step in range(3):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                if p.requires_grad:
                    assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
                else:
                    assert p.grad is None, f"frozen {name} got a gradient"
        optimizer.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen {name} changed"
        else:
            assert not torch.equal(p, trainable[name]), f"trainable {name} did not change"


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_prefix_has_three_independent_prefixes(arch):
    model = make(arch, "prefix-tuning")
    assert set(model.method.tables) == {"encoder", "decoder", "cross"}
    batch = inputs_for(arch, "prefix-tuning")
    model(**batch).loss.backward()
    for kind, table in model.method.tables.items():
        assert table.embedding.grad.abs().sum() > 0, f"{kind} prefix got no gradient"
    params = [id(t.embedding) for t in model.method.tables.values()]
    assert len(set(params)) == 3


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning", "p-tuning", "p-tuning-v2"])
def test_gradient_checkpointing_gives_same_gradients(method):
    arch = "llama"
    plain = make(arch, method)
    ckpt = make(arch, method)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.activation_checkpointing_enable()
    assert ckpt.base_model.is_activation_checkpointing and ckpt.is_activation_checkpointing
    for m in (plain, ckpt):
        m.train()
    batch = inputs_for(arch, method)
    plain(**batch).loss.backward()
    ckpt(**batch).loss.backward()
    for (n, p), (_, q) in zip(plain.trainable_named_parameters(), ckpt.trainable_named_parameters()):
        assert q.grad is not None and q.grad.abs().sum() > 0, n
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning", "p-tuning", "p-tuning-v2"])
def test_bf16_model_keeps_fp32_master_weights(method):
    from pstar_plugins import build_model
    from pstar_plugins.testing import tiny_model
    from tests.helpers import METHOD_OPTIONS

    base = tiny_model("llama", dtype=torch.bfloat16)
    model = build_model(base, method, **METHOD_OPTIONS[method])
    assert all(p.dtype == torch.float32 for _, p in model.trainable_named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.base_model.parameters())
    out = model(**inputs_for("llama", method))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in model.trainable_named_parameters())
