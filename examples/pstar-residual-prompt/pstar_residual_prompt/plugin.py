"""Residual reparameterisation of prompt tuning (Razdaibiedina et al. 2023, §3).

Built only on pstar-plugins' public base classes: a config, a module, a plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pstar_plugins.methods.base import MethodPlugin, MethodSpec, positive_int
from pstar_plugins.methods.prompt_tuning import PromptTuning, PromptTuningConfig


@dataclass
class ResidualPromptConfig(PromptTuningConfig):
    bottleneck_size: int = field(default=64, metadata={"help": "width of the shared bottleneck MLP"})

    def validate(self) -> None:
        super().validate()
        positive_int(self, "bottleneck_size")


class ResidualPrompt(PromptTuning):
    """``P' = P + LN(W_up ReLU(W_down P))``, one MLP shared by every token and task."""

    def __init__(self, config: ResidualPromptConfig, base_model, tokenizer=None) -> None:
        super().__init__(config, base_model, tokenizer)
        hidden = self.prompt.shape[-1]
        kw = {"device": self.prompt.device, "dtype": torch.float32}
        self.residual = nn.Sequential(
            nn.Linear(hidden, config.bottleneck_size, **kw), nn.ReLU(),
            nn.Linear(config.bottleneck_size, hidden, **kw), nn.LayerNorm(hidden, **kw),
        )

    def virtual_block(self, batch, task_ids):
        prompt = super().virtual_block(batch, task_ids)
        if not hasattr(self, "residual"):
            return prompt
        return prompt + self.residual(prompt)

    @property
    def folded(self) -> bool:
        return not hasattr(self, "residual")

    @torch.no_grad()
    def fold(self) -> None:
        if self.folded:
            return
        static = self.prompt + self.residual(self.prompt)
        del self.residual
        self.prompt = nn.Parameter(static.detach().clone())


class ResidualPromptPlugin(MethodPlugin):
    spec = MethodSpec("residual-prompt", ResidualPromptConfig, "prompt tuning with a residual MLP reparameterisation (Razdaibiedina et al. 2023)")

    def create(self, base_model, config, tokenizer):
        return ResidualPrompt(config, base_model, tokenizer)


plugin = ResidualPromptPlugin()
