"""The p-tuning-v2 plugin."""

from pstar_plugins.methods.spec import MethodPlugin, MethodSpec, Preset
from pstar_plugins.methods.p_tuning_v2.config import PTuningV2Config


class PTuningV2Plugin(MethodPlugin):
    spec = MethodSpec("p-tuning-v2", PTuningV2Config, "deep prompts on every layer with a linear classification head (Liu et al. 2022)",
                      preset=Preset({"num_virtual_tokens": 16}, 5e-3))

    def create(self, base_model, config, tokenizer):
        from pstar_plugins.methods.p_tuning_v2.module import PTuningV2  # torch: only when a method is built

        return PTuningV2(config, base_model, tokenizer=tokenizer)


plugin = PTuningV2Plugin()
