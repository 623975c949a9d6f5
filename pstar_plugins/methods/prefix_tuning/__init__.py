"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation")."""

from pstar_plugins.methods.prefix_tuning.config import PrefixTuningConfig

__all__ = ["PrefixTuningConfig", "PrefixTuning"]


def __getattr__(name: str):
    """The module class is imported on first use: importing the config needs no torch."""
    if name == "PrefixTuning":
        from pstar_plugins.methods.prefix_tuning.module import PrefixTuning

        return PrefixTuning
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
