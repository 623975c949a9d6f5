"""The p-tuning-v2 plugin."""

from pstar_plugins.methods.base import MethodPlugin, MethodSpec
from pstar_plugins.methods.p_tuning_v2.config import PTuningV2Config
from pstar_plugins.methods.p_tuning_v2.module import PTuningV2


class PTuningV2Plugin(MethodPlugin):
    spec = MethodSpec("p-tuning-v2", PTuningV2Config, "deep prompts on every layer with a linear classification head (Liu et al. 2022)")

    def create(self, base_model, config, tokenizer):
        return PTuningV2(config, base_model, tokenizer=tokenizer)


plugin = PTuningV2Plugin()
