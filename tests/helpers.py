"""Builders shared by the tests: one model + inputs per (architecture, method) case."""

from __future__ import annotations

import torch

from pstar_plugins import build_model, hookimpl
from pstar_plugins.testing import DECODER_ONLY, ENCODER_DECODER, ENCODER_ONLY, random_batch, tiny_model

# p-tuning inputs use this layout: [S S x x x S x x x] with S = soft token (template slots)
SOFT_LAYOUT = (0, 1, -1, -1, -1, 2, -1, -1, -1)

METHOD_OPTIONS = {
    "prompt-tuning": {"num_virtual_tokens": 4, "init": "random"},
    "prefix-tuning": {"num_virtual_tokens": 3, "projection_hidden_size": 16},
    "p-tuning": {
        "template": "{soft:2} {text} {soft} {text2}",
        "encoder": "lstm",
        "encoder_hidden_size": 16,
        "init": "random",
    },
    "p-tuning-v2": {"num_virtual_tokens": 3, "num_labels": 3, "classifier_dropout": 0.0},
}


class UnfreezeNorms:
    """A second plugin that contributes to freezing and parameter groups of any method."""

    @hookimpl
    def pstar_trainable_parameters(self, model):
        return [n for n, _ in model.named_parameters() if n.endswith("model.norm.weight")]

    @hookimpl
    def pstar_param_groups(self, model, learning_rate, weight_decay):
        params = [p for n, p in model.named_parameters() if n.endswith("model.norm.weight")]
        return [{"name": "norms", "params": params, "lr": learning_rate / 10, "weight_decay": 0.0}]


CASES = (
    [(a, m) for a in DECODER_ONLY + ENCODER_ONLY + ENCODER_DECODER for m in ("prompt-tuning", "prefix-tuning")]
    + [(a, "p-tuning") for a in DECODER_ONLY + ENCODER_ONLY]
    + [(a, "p-tuning-v2") for a in DECODER_ONLY + ENCODER_ONLY]
)


def make(arch: str, method: str, seed: int = 0, **options):
    opts = {**METHOD_OPTIONS[method], **options}
    base = tiny_model(arch, seed=seed)
    return build_model(base, method, **opts)


def soft_index(n: int, length: int) -> torch.Tensor:
    layout = list(SOFT_LAYOUT) + [-1] * (length - len(SOFT_LAYOUT))
    return torch.tensor(layout[:length]).expand(n, length).clone()


def inputs_for(arch: str, method: str, n: int = 2, length: int = 9, seed: int = 0) -> dict:
    ids = random_batch(n, length, seed=seed)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if method == "p-tuning":
        out["prompt_index"] = soft_index(n, length)
    if arch in ENCODER_DECODER:
        out["labels"] = random_batch(n, 5, seed=seed + 1)
    elif method == "p-tuning-v2":
        out["labels"] = torch.arange(n) % 3
    else:
        out["labels"] = ids.clone()
    return out


def pad_rows(rows: list[dict], side: str, pad_id: int = 0) -> dict:
    """Pad per-example inputs (each with a leading batch dim of 1) into one batch."""
    length = max(r["input_ids"].shape[1] for r in rows)
    batch: dict[str, list] = {k: [] for k in rows[0]}
    fills = {"input_ids": pad_id, "attention_mask": 0, "prompt_index": -1, "labels": -100}
    for r in rows:
        extra = length - r["input_ids"].shape[1]
        for k, v in r.items():
            if (k == "labels" and v.dim() == 1) or k.startswith("decoder_"):
                batch[k].append(v)
                continue
            pad = torch.full((1, extra), fills[k], dtype=v.dtype)
            batch[k].append(torch.cat([pad, v] if side == "left" else [v, pad], dim=1))
    return {k: torch.cat(v) for k, v in batch.items()}
