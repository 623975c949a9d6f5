"""P-tuning v2 (Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning
Universally Across Scales and Tasks"): deep prompts on every layer and a linear head."""

from pstar_plugins.methods.p_tuning_v2.config import PTuningV2Config

__all__ = ["PTuningV2Config", "PTuningV2"]


def __getattr__(name: str):
    """The module class is imported on first use: importing the config needs no torch."""
    if name == "PTuningV2":
        from pstar_plugins.methods.p_tuning_v2.module import PTuningV2

        return PTuningV2
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
