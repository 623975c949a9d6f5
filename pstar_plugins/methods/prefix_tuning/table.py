"""A table of per-task prefixes for the attention sites of one kind, optionally reparameterised."""

from __future__ import annotations

import torch
from torch import nn

from pstar_plugins.mechanisms.geometry import AttentionGeometry


class PrefixTable(nn.Module):
    """Prefixes for ``n_layers`` attention sites: keys and values ``(n_kv_heads, m, head_dim)`` each.

    With ``projection`` (Li & Liang §4.3): ``P = MLP(P')``, ``P'`` of shape ``(T, m, d_in)`` and a
    Linear–Tanh–Linear MLP to ``n_layers·2·n_kv·head_dim``; :meth:`fold` computes ``P`` once and
    drops ``P'`` and the MLP. Without: ``P`` is the parameter.
    """

    def __init__(
        self,
        geometry: AttentionGeometry,
        num_tasks: int,
        m: int,
        projection: bool,
        input_size: int,
        hidden_size: int,
        init_std: float,
        device=None,
    ) -> None:
        super().__init__()
        self.geometry = geometry
        self.m = m
        width = geometry.n_layers * geometry.n_kv_heads * (geometry.head_dim + geometry.value_width)
        kw = {"device": device, "dtype": torch.float32}
        if projection:
            self.embedding = nn.Parameter(torch.randn(num_tasks, m, input_size, **kw))  # P'
            self.mlp = nn.Sequential(
                nn.Linear(input_size, hidden_size, **kw), nn.Tanh(), nn.Linear(hidden_size, width, **kw)
            )
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
        return self.split(dropout(flat))

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, m, width)`` → keys ``(N, n_layers, n_kv, m, head_dim)`` and values (``value_width``)."""
        g = self.geometry
        if g.value_width == g.head_dim:  # layout (m, layer, key|value, head, d), as PEFT's
            kv = flat.view(flat.shape[0], self.m, g.n_layers, 2, g.n_kv_heads, g.head_dim)
            kv = kv.permute(3, 0, 2, 4, 1, 5)  # (2, N, n_layers, n_kv, m, head_dim)
            return kv[0], kv[1]
        kv = flat.view(flat.shape[0], self.m, g.n_layers, g.n_kv_heads, g.head_dim + g.value_width)
        kv = kv.permute(0, 2, 3, 1, 4)  # (N, n_layers, n_kv, m, key | value)
        return kv[..., : g.head_dim], kv[..., g.head_dim :]

    def join(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`split` for one prompt: ``(n_layers, n_kv, m, d)`` each → ``(m, width)``."""
        g = self.geometry
        if g.value_width == g.head_dim:
            return torch.stack([keys, values], 1).permute(3, 0, 1, 2, 4).reshape(self.m, -1)
        return torch.cat([keys, values], -1).permute(2, 0, 1, 3).reshape(self.m, -1)

    @torch.no_grad()
    def fold(self) -> None:
        if self.prefix is not None:
            return
        static = self.mlp(self.embedding).detach().clone()
        del self.mlp
        del self.embedding
        self.prefix = nn.Parameter(static)
