"""The prefix-tuning plugin."""

from pstar_plugins.methods.spec import MethodPlugin, MethodSpec
from pstar_plugins.methods.prefix_tuning.config import PrefixTuningConfig


class PrefixTuningPlugin(MethodPlugin):
    spec = MethodSpec("prefix-tuning", PrefixTuningConfig, "key/value prefixes in every attention layer, P = MLP(P') (Li & Liang 2021)")

    def create(self, base_model, config, tokenizer):
        from pstar_plugins.methods.prefix_tuning.module import PrefixTuning  # torch: only when a method is built

        return PrefixTuning(config, base_model, tokenizer=tokenizer)


plugin = PrefixTuningPlugin()
