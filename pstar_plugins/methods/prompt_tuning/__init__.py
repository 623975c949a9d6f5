"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning")."""

from pstar_plugins.methods.prompt_tuning.config import PromptTuningConfig

__all__ = ["PromptTuningConfig", "PromptTuning"]


def __getattr__(name: str):
    """The module class is imported on first use: importing the config needs no torch."""
    if name == "PromptTuning":
        from pstar_plugins.methods.prompt_tuning.module import PromptTuning

        return PromptTuning
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
