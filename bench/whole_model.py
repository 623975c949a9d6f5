"""Full fine-tuning through ``pstar train``: the reference row that tells how much of a task a
model learns at a budget when every weight trains, next to the prompt methods on the same inputs.

Loaded with ``-p bench.whole_model`` where ``bench`` is importable: from the repository root,
``python -m pstar_plugins.train -p bench.whole_model --method whole-model --learning-rate 2e-5 ...``
or ``accelerate launch -m pstar_plugins.train ...`` (the ``pstar`` console script does not put the
current folder on the import path; ``PYTHONPATH=. pstar train ...`` does). The method adds nothing
to the input; the plugin's ``pstar_trainable_parameters`` hook unfreezes every weight of the base
model, so the run goes through the same template, label words, selection split and evaluation as
the methods it is compared with. The hook acts only on runs of this method. The weights train in
fp32: a bf16 model is cast up, in place, when the method is built (AdamW steps of 2e-5 are below
bf16's resolution for most weights), which doubles its memory, also when an adapter is loaded
for inference, and ``detach`` does not cast it back. Its adapter file holds the whole model (base-model weights a hook
unfroze are saved with the adapter), 4 bytes per parameter; ``pstar eval`` loads no ``-p``
plugins, so the run's own final evaluation is the row's score.

What it cannot be: there is no bare model to switch back to once the weights train, so
``disabled()`` (``PStarModel.disable_adapter``) refuses, and one model holds one task.
"""

import contextlib
from dataclasses import dataclass

import torch

from pstar_plugins.contract.capabilities import OnePassContinuations
from pstar_plugins.contract.errors import ConfigError
from pstar_plugins.contract.hookspecs import hookimpl
from pstar_plugins.contract.method import PromptMethod
from pstar_plugins.contract.spec import MethodConfig, MethodPlugin, MethodSpec, Preset
from pstar_plugins.mechanisms.base_calls import call_base, generate_base

NAME = "whole-model"


@dataclass
class WholeModelConfig(MethodConfig):
    """No options: the method is the base model itself."""

    def validate(self) -> None:
        super().validate()
        if self.num_tasks != 1:
            raise ConfigError(
                f"num_tasks={self.num_tasks}: {NAME} trains one model's weights, which hold one task; "
                "pass --num-tasks 1 (or a prompt method for several tasks in one batch)."
            )


class WholeModel(PromptMethod, OnePassContinuations):
    """The base model's own forward pass; its weights are the trainable parameters (the hook below)."""

    # nothing is added to the input, so label-word continuations may be scored from the input's cache
    one_pass_continuations = True

    def __init__(self, config, base_model, tokenizer=None):
        super().__init__(config)
        # fp32 master weights, as the method contract keeps every trainable tensor; parameter by
        # parameter, since transformers refuses .float() on a model it loaded from GGUF
        for param in base_model.parameters():
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()

    @contextlib.contextmanager
    def disabled(self):
        raise ConfigError(
            f"{NAME} trains the base model's own weights, so there is no bare model to switch back to; "
            "compare against a separately loaded base model."
        )
        yield  # pragma: no cover

    def run(self, base_model, inputs, task_ids):
        self.check_task_ids(task_ids, inputs["input_ids"].shape[0])
        return call_base(self, base_model, inputs)

    def generate(self, base_model, inputs, task_ids, **kwargs):
        self.check_task_ids(task_ids, inputs["input_ids"].shape[0])
        return generate_base(self, base_model, inputs, **kwargs)


class WholeModelPlugin(MethodPlugin):
    # the learning rate of BERT-sized models fine-tuned on GLUE's small tasks (Devlin et al. 2019 search
    # 2e-5 to 5e-5); a reference run should pass its own --learning-rate anyway
    spec = MethodSpec(
        NAME,
        WholeModelConfig,
        "every weight of the base model trained (a reference, not a prompt method)",
        preset=Preset(learning_rate=2e-5),
        method_class=WholeModel,
    )

    @hookimpl
    def pstar_trainable_parameters(self, model):
        if model.method_name != NAME:
            return None
        return [name for name, _ in model.named_parameters()]


plugin = WholeModelPlugin()
