"""The prompt-tuning plugin: registered through the same path as third-party plugins."""

from pstar_plugins.contract.spec import MethodPlugin, MethodSpec, Preset
from pstar_plugins.methods.prompt_tuning.config import PromptTuningConfig

# a folded P-tuning adapter is virtual-token embeddings in front of the input: prompt tuning's layout
spec = MethodSpec(
    "prompt-tuning",
    PromptTuningConfig,
    "m trainable vectors before the input embeddings (Lester et al. 2021)",
    preset=Preset({"num_virtual_tokens": 10}, 3e-2),
    method_class="pstar_plugins.methods.prompt_tuning.module:PromptTuning",
    peft_types=("PROMPT_TUNING", "P_TUNING"),
)

plugin = MethodPlugin(spec)
