"""Prompt encoders of P-tuning: soft token embeddings ``(n, hidden)`` → ``(n, hidden)``."""

from __future__ import annotations

import torch
from torch import nn


class PromptEncoder(nn.Module):
    """``lstm``: bi-LSTM over the n soft tokens then a two-layer MLP, so tokens depend on each other
    (Liu et al. 2021 §3.2); ``mlp``: a two-layer MLP per token; ``none``: the embeddings as they are.
    :meth:`fold` stores the encoder's output and drops the encoder (P-tuning's encoder is
    training-only, like prefix tuning's MLP).
    """

    def __init__(self, initial: torch.Tensor, kind: str, hidden_size: int) -> None:
        super().__init__()
        n, width = initial.shape
        self.kind = kind
        self.embedding = nn.Parameter(initial.float().clone())  # (n, hidden)
        kw = {"device": initial.device, "dtype": torch.float32}
        if kind == "lstm":
            self.lstm = nn.LSTM(width, hidden_size // 2, num_layers=2, bidirectional=True, batch_first=True, **kw)
            self.mlp = nn.Sequential(
                nn.Linear(2 * (hidden_size // 2), hidden_size, **kw), nn.ReLU(), nn.Linear(hidden_size, width, **kw)
            )
        elif kind == "mlp":
            self.mlp = nn.Sequential(
                nn.Linear(width, hidden_size, **kw), nn.ReLU(), nn.Linear(hidden_size, width, **kw)
            )
        self.static = kind == "none"

    def forward(self) -> torch.Tensor:
        if self.static:
            return self.embedding
        x = self.embedding
        if self.kind == "lstm":
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)
        return self.mlp(x)

    @torch.no_grad()
    def fold(self) -> None:
        if self.static:
            return
        out = self.forward().detach().clone()
        for name in ("lstm", "mlp"):
            if hasattr(self, name):
                delattr(self, name)
        self.embedding = nn.Parameter(out)
        self.static = True
