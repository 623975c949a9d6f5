"""The smallest complete method: a learned temperature of the frozen model's logits, one per task.

docs/method_contract.md shows this file; tests/test_method_contract.py runs the conformance suite
on it. Loaded with ``-p tests.plugin_fixture:plugin`` (no packaging).
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from pstar_plugins import MethodConfig, MethodPlugin, MethodSpec, PromptMethod
from pstar_plugins.mechanisms.base_calls import call_base
from pstar_plugins.mechanisms.inputs import fill_position_ids


@dataclass
class TemperatureConfig(MethodConfig):
    initial: float = field(default=1.0, metadata={"help": "initial logit scale"})


class Temperature(PromptMethod):
    """Must: ``__init__`` and ``run``; everything else has a default (``generate`` refuses)."""

    def __init__(self, config, base_model, tokenizer=None):
        super().__init__(config)
        self.log_scale = nn.Parameter(torch.full((config.num_tasks,), float(config.initial)).log())

    def run(self, base_model, inputs, task_ids):
        labels = inputs.pop("labels", None)  # the loss is the scaled logits', computed below
        task_ids = self.check_task_ids(task_ids, inputs["input_ids"].shape[0])
        fill_position_ids(base_model, inputs)  # a left-padded row gets the positions it has alone
        out = call_base(self, base_model, inputs)
        if self.contributing:  # disabled: the bare model's outputs
            scale = self.log_scale.exp()[task_ids if task_ids is not None else [0] * len(out.logits)]
            out.logits = out.logits * scale.to(out.logits.dtype).view(-1, *[1] * (out.logits.dim() - 1))
        if labels is not None:
            out.loss = base_model.loss_function(out.logits, labels, vocab_size=out.logits.shape[-1])
        return out


plugin = MethodPlugin(
    MethodSpec("temperature", TemperatureConfig, "learned logit temperature (test plugin)", method_class=Temperature)
)
