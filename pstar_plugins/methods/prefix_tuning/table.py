"""A table of per-task prefixes for the attention sites of one kind, optionally reparameterised."""

from __future__ import annotations

import torch
from torch import nn

from pstar_plugins.core.geometry import AttentionGeometry


class PrefixTable(nn.Module):
    """Prefixes for ``n_layers`` attention sites: keys and values ``(n_kv_heads, m, head_dim)`` each.

    With ``projection`` (Li & Liang §4.3): ``P = MLP(P')``, ``P'`` of shape ``(T, m, d_in)`` and a
    Linear–Tanh–Linear MLP to ``n_layers·2·n_kv·head_dim``; :meth:`fold` computes ``P`` once and
    drops ``P'`` and the MLP. Without: ``P`` is the parameter.
    """

    def __init__(self, geometry: AttentionGeometry, num_tasks: int, m: int, projection: bool,
                 input_size: int, hidden_size: int, init_std: float, device=None) -> None:
        super().__init__()
        self.geometry = geometry
        self.m = m
        width = geometry.n_layers * 2 * geometry.n_kv_heads * geometry.head_dim
        kw = {"device": device, "dtype": torch.float32}
        if projection:
            self.embedding = nn.Parameter(torch.randn(num_tasks, m, input_size, **kw))  # P'
            self.mlp = nn.Sequential(nn.Linear(input_size, hidden_size, **kw), nn.Tanh(), nn.Linear(hidden_size, width, **kw))
            # start from a prefix as small as the unprojected one (std ≈ init_std): with PyTorch's
            # default init the MLP emits keys/values large enough to swamp a frozen model's own
            # attention, and training starts below the zero-shot accuracy and stays there
            with torch.no_grad():
                self.mlp[2].weight.normal_(0.0, init_std / (0.5 * hidden_size) ** 0.5)
                self.mlp[2].bias.zero_()
            self.register_parameter("prefix", None)
        else:
            self.prefix = nn.Parameter(torch.randn(num_tasks, m, width, **kw) * init_std)

    @property
    def folded(self) -> bool:
        return self.prefix is not None

    def table(self) -> torch.Tensor:
        """All tasks' flat prefixes, ``(T, m, n_layers·2·n_kv·head_dim)``."""
        return self.prefix if self.prefix is not None else self.mlp(self.embedding)

    def forward(self, task_ids: torch.Tensor | None, dropout: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.table()
        flat = flat[:1] if task_ids is None else flat[task_ids.to(flat.device)]  # (N, m, width)
        flat = dropout(flat)
        g = self.geometry
        kv = flat.view(flat.shape[0], self.m, g.n_layers, 2, g.n_kv_heads, g.head_dim)
        kv = kv.permute(3, 0, 2, 4, 1, 5)  # (2, N, n_layers, n_kv, m, head_dim)
        return kv[0], kv[1]

    @torch.no_grad()
    def fold(self) -> None:
        if self.prefix is not None:
            return
        static = self.mlp(self.embedding).detach().clone()
        del self.mlp
        del self.embedding
        self.prefix = nn.Parameter(static)
