"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): soft tokens placed by a template and
produced by a prompt encoder."""

from pstar_plugins.methods.p_tuning.config import PTuningConfig

__all__ = ["PTuningConfig", "PTuning"]


def __getattr__(name: str):
    """The module class is imported on first use: importing the config needs no torch."""
    if name == "PTuning":
        from pstar_plugins.methods.p_tuning.module import PTuning

        return PTuning
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
