"""The p-tuning plugin."""

from pstar_plugins.contract.spec import MethodPlugin, MethodSpec, Preset
from pstar_plugins.methods.p_tuning.config import PTuningConfig

spec = MethodSpec(
    "p-tuning",
    PTuningConfig,
    "template-placed soft tokens from an LSTM/MLP prompt encoder (Liu et al. 2021)",
    preset=Preset({}, 1e-3),  # the template comes from the data's columns (pstar_plugins.mechanisms.data_templates)
    method_class="pstar_plugins.methods.p_tuning.module:PTuning",
)

plugin = MethodPlugin(spec)
