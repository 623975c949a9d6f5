"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning")."""

from pstar_plugins.methods.prompt_tuning.config import PromptTuningConfig
from pstar_plugins.methods.prompt_tuning.module import PromptTuning

__all__ = ["PromptTuningConfig", "PromptTuning"]
