"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation")."""

from pstar_plugins.methods.prefix_tuning.config import PrefixTuningConfig
from pstar_plugins.methods.prefix_tuning.module import PrefixTuning

__all__ = ["PrefixTuningConfig", "PrefixTuning"]
