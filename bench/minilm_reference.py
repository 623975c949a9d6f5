"""Full fine-tuning of all-MiniLM-L6-v2 on SST-2: the reference of ``bench/quality.py``'s
``minilm`` part, against which P-tuning v2 with a linear head on the frozen encoder is measured.

A baseline, not a P*-method: every weight of the encoder trains, with the same inputs (the
verbalizer's encoding of the template), the same pooling and a linear head of the same shape as
P-tuning v2's, at the same example budget. ``pstar train`` has no such run: the full fine-tuning
it runs for RTE through ``-p bench.whole_model`` adds no head and scores label words. This loop is
the one the recorded rows name (``full_finetune_minilm`` in their ``command``).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def full_finetune_minilm(
    train_rows, train_labels, dev_rows, dev_labels, steps, batch_size, lr, seed, template, pooling
) -> dict:
    """Every weight of MiniLM trained, with the same inputs (the verbalizer's encoding of the
    template), the same pooling and a linear head, at the same example budget."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    from pstar_plugins.mechanisms.template import Template
    from pstar_plugins.models import load
    from pstar_plugins.tasks.verbalizer import Verbalizer

    torch.manual_seed(seed)
    mlm, tokenizer = load("minilm", kind="masked-lm")
    encoder = mlm.bert if hasattr(mlm, "bert") else mlm.base_model
    hidden = encoder.config.hidden_size
    head = nn.Sequential(nn.Dropout(0.1), nn.Linear(hidden, 2))
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    verbalizer = Verbalizer(tokenizer, Template.parse(template), C.LABEL_WORDS, masked_lm=True)
    rng = random.Random(seed)
    order: list[int] = []

    def logits(rows):
        enc = verbalizer.encode(rows, max_length=128)
        mask = enc.inputs["attention_mask"]
        out = encoder(input_ids=enc.inputs["input_ids"], attention_mask=mask).last_hidden_state
        if pooling == "mean":
            pooled = (out * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        else:
            pooled = out[:, 0]
        return head(pooled)

    encoder.train()
    head.train()
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(train_rows)))
            rng.shuffle(fresh)
            order += fresh
        pick, order = order[:batch_size], order[batch_size:]
        loss = F.cross_entropy(logits([train_rows[i] for i in pick]), torch.tensor([train_labels[i] for i in pick]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    encoder.eval()
    head.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(dev_rows), 64):
            pred = logits(dev_rows[i : i + 64]).argmax(-1)
            correct += int((pred == torch.tensor(dev_labels[i : i + 64])).sum())
    return {
        "accuracy": correct / len(dev_rows),
        "trainable_parameters": sum(p.numel() for p in params),
        "learning_rate": lr,
    }
