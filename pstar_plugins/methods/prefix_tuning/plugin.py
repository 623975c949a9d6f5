"""The prefix-tuning plugin."""

from pstar_plugins.contract.spec import MethodPlugin, MethodSpec, Preset
from pstar_plugins.methods.prefix_tuning.config import PrefixTuningConfig

# Adam moves every weight of the wide P' → prefix MLP by ~lr per step, so the MLP output moves
# hundreds of times faster than a raw prompt: 5e-3 kept SmolLM2 at chance, 2e-4 trains
spec = MethodSpec(
    "prefix-tuning",
    PrefixTuningConfig,
    "key/value prefixes in every attention layer, P = MLP(P') (Li & Liang 2021)",
    preset=Preset({"num_virtual_tokens": 10}, 2e-4),
    method_class="pstar_plugins.methods.prefix_tuning.module:PrefixTuning",
    peft_types=("PREFIX_TUNING",),
)

plugin = MethodPlugin(spec)
