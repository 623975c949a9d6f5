"""P-tuning v2 (Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning
Universally Across Scales and Tasks"): deep prompts on every layer and a linear head."""

from pstar_plugins.methods.p_tuning_v2.config import PTuningV2Config
from pstar_plugins.methods.p_tuning_v2.module import PTuningV2

__all__ = ["PTuningV2Config", "PTuningV2"]
