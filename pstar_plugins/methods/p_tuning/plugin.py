"""The p-tuning plugin."""

from pstar_plugins.methods.p_tuning.config import PTuningConfig
from pstar_plugins.methods.spec import MethodPlugin, MethodSpec, Preset

spec = MethodSpec("p-tuning", PTuningConfig, "template-placed soft tokens from an LSTM/MLP prompt encoder (Liu et al. 2021)",
                  preset=Preset({"template": "{soft:3} Review: {sentence} {soft:3} Sentiment:{answer}"}, 1e-3),
                  method_class="pstar_plugins.methods.p_tuning.module:PTuning")

plugin = MethodPlugin(spec)
