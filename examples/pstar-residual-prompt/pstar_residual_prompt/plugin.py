"""Residual reparameterisation of prompt tuning (Razdaibiedina et al. 2023, §3).

The whole method against the documented contract (docs/method_contract.md): a config, a
``PromptMethod`` — here the built-in prompt tuning, extended — and the spec that registers both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pstar_plugins.contract.method import MethodPlugin, MethodSpec, positive_int
from pstar_plugins.methods.prompt_tuning import PromptTuning, PromptTuningConfig


@dataclass
class ResidualPromptConfig(PromptTuningConfig):
    bottleneck_size: int = field(default=64, metadata={"help": "width of the shared bottleneck MLP"})

    def validate(self) -> None:
        super().validate()
        positive_int(self, "bottleneck_size")


class ResidualPrompt(PromptTuning):
    """``P' = P + LN(W_up ReLU(W_down P))``, one MLP shared by every token and task; ``fold``
    stores ``P'`` and drops the MLP."""

    def __init__(self, config: ResidualPromptConfig, base_model, tokenizer=None) -> None:
        super().__init__(config, base_model, tokenizer)
        hidden, kw = self.prompt.shape[-1], {"device": self.prompt.device, "dtype": torch.float32}
        self.residual = nn.Sequential(
            nn.Linear(hidden, config.bottleneck_size, **kw),
            nn.ReLU(),
            nn.Linear(config.bottleneck_size, hidden, **kw),
            nn.LayerNorm(hidden, **kw),
        )

    def virtual_block(self, batch, task_ids):
        prompt = super().virtual_block(batch, task_ids)
        return prompt if self.folded else prompt + self.residual(prompt)

    @property
    def folded(self) -> bool:
        return "residual" not in self._modules

    @torch.no_grad()
    def fold(self) -> None:
        if not self.folded:
            self.prompt = nn.Parameter(self.prompt + self.residual(self.prompt))
            del self.residual


plugin = MethodPlugin(
    MethodSpec(
        "residual-prompt",
        ResidualPromptConfig,
        method_class=ResidualPrompt,
        help="prompt tuning with a residual MLP reparameterisation (Razdaibiedina et al. 2023)",
    )
)
