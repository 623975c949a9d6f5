"""A local method plugin loaded with ``-p tests.plugin_fixture:plugin`` (no packaging)."""

from dataclasses import dataclass, field

import torch
from torch import nn

from pstar_plugins.methods.base import MethodConfig, MethodPlugin, MethodSpec, PromptMethod


@dataclass
class TemperatureConfig(MethodConfig):
    initial: float = field(default=1.0, metadata={"help": "initial logit scale"})


class Temperature(PromptMethod):
    """Learns one scale of the frozen model's logits: the smallest possible 'method'."""

    def __init__(self, config, base_model, tokenizer=None):
        super().__init__(config)
        self.log_scale = nn.Parameter(torch.tensor(float(config.initial)).log())

    def run(self, base_model, inputs, task_ids):
        out = base_model(**{k: v for k, v in inputs.items() if v is not None})
        out.logits = out.logits * self.log_scale.exp()
        return out


plugin = MethodPlugin(MethodSpec("temperature", TemperatureConfig, "learned logit temperature (test plugin)",
                                 method_class=Temperature))
