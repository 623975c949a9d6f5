"""The p-tuning plugin."""

from pstar_plugins.methods.base import MethodPlugin, MethodSpec
from pstar_plugins.methods.p_tuning.config import PTuningConfig
from pstar_plugins.methods.p_tuning.module import PTuning


class PTuningPlugin(MethodPlugin):
    spec = MethodSpec("p-tuning", PTuningConfig, "template-placed soft tokens from an LSTM/MLP prompt encoder (Liu et al. 2021)")

    def create(self, base_model, config, tokenizer):
        return PTuning(config, base_model, tokenizer)


plugin = PTuningPlugin()
