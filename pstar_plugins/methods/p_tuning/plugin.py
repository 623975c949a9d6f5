"""The p-tuning plugin."""

from pstar_plugins.methods.spec import MethodPlugin, MethodSpec, Preset
from pstar_plugins.methods.p_tuning.config import PTuningConfig


class PTuningPlugin(MethodPlugin):
    spec = MethodSpec("p-tuning", PTuningConfig, "template-placed soft tokens from an LSTM/MLP prompt encoder (Liu et al. 2021)",
                      preset=Preset({}, 1e-3))

    def create(self, base_model, config, tokenizer):
        from pstar_plugins.methods.p_tuning.module import PTuning  # torch: only when a method is built

        return PTuning(config, base_model, tokenizer)


plugin = PTuningPlugin()
