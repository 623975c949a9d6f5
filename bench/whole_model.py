"""Full fine-tuning through ``pstar train``: the reference row that tells how much of a task a
model learns at a budget when every weight trains, next to the prompt methods on the same inputs.

Loaded from the repository root with ``-p bench.whole_model`` (``pstar train -p bench.whole_model
--method whole-model --learning-rate 2e-5 ...``). The method adds nothing to the input; the
plugin's ``pstar_trainable_parameters`` hook unfreezes every weight of the base model, so the run
goes through the same template, label words, selection split and evaluation as the methods it is
compared with. The hook acts only on runs of this method. Its adapter file holds the whole model
(base-model weights a hook unfroze are saved with the adapter), about 4 bytes per parameter.
"""

from dataclasses import dataclass

from pstar_plugins.hookspecs import hookimpl
from pstar_plugins.methods.base import PromptMethod
from pstar_plugins.methods.spec import MethodConfig, MethodPlugin, MethodSpec, Preset

NAME = "whole-model"


@dataclass
class WholeModelConfig(MethodConfig):
    """No options: the method is the base model itself."""


class WholeModel(PromptMethod):
    """The base model's own forward pass; its weights are the trainable parameters (the hook below)."""

    # nothing is added to the input, so label-word continuations may be scored from the input's cache
    one_pass_continuations = True

    def __init__(self, config, base_model, tokenizer=None):
        super().__init__(config)

    def run(self, base_model, inputs, task_ids):
        self.check_task_ids(task_ids, inputs["input_ids"].shape[0])
        return self.call_base(base_model, inputs)


class WholeModelPlugin(MethodPlugin):
    # the learning rate of BERT-sized models fine-tuned on GLUE's small tasks (Devlin et al. 2019 search
    # 2e-5 to 5e-5); a reference run should pass its own --learning-rate anyway
    spec = MethodSpec(NAME, WholeModelConfig, "every weight of the base model trained (a reference, not a prompt method)",
                      preset=Preset(learning_rate=2e-5), method_class=WholeModel)

    @hookimpl
    def pstar_trainable_parameters(self, model):
        if model.method_name != NAME:
            return None
        return [name for name, _ in model.named_parameters()]


plugin = WholeModelPlugin()
