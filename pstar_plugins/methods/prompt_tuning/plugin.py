"""The prompt-tuning plugin: registered through the same path as third-party plugins."""

from pstar_plugins.methods.spec import MethodPlugin, MethodSpec, Preset
from pstar_plugins.methods.prompt_tuning.config import PromptTuningConfig


class PromptTuningPlugin(MethodPlugin):
    spec = MethodSpec("prompt-tuning", PromptTuningConfig, "m trainable vectors before the input embeddings (Lester et al. 2021)",
                      preset=Preset({"num_virtual_tokens": 10}, 3e-2))

    def create(self, base_model, config, tokenizer):
        from pstar_plugins.methods.prompt_tuning.module import PromptTuning  # torch: only when a method is built

        return PromptTuning(config, base_model, tokenizer)


plugin = PromptTuningPlugin()
