"""The p-tuning-v2 plugin."""

from pstar_plugins.contract.spec import MethodPlugin, MethodSpec, Preset
from pstar_plugins.methods.p_tuning_v2.config import PTuningV2Config

spec = MethodSpec(
    "p-tuning-v2",
    PTuningV2Config,
    "deep prompts on every layer with a linear classification head (Liu et al. 2022)",
    preset=Preset({"num_virtual_tokens": 16}, 5e-3),
    method_class="pstar_plugins.methods.p_tuning_v2.module:PTuningV2",
)

plugin = MethodPlugin(spec)
