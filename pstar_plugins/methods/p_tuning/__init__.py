"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): soft tokens placed by a template and
produced by a prompt encoder."""

from pstar_plugins.methods.p_tuning.config import PTuningConfig
from pstar_plugins.methods.p_tuning.module import PTuning

__all__ = ["PTuningConfig", "PTuning"]
