"""pstar-plugins: the P*-tuning family (prompt tuning, prefix tuning, P-tuning, P-tuning v2)
as pluggy plugins for Hugging Face transformers, Accelerate and DeepSpeed."""

from pstar_plugins.core.adapter_io import load_adapter, save_adapter
from pstar_plugins.core.build import build_model, make_optimizer, param_groups
from pstar_plugins.core.model import PStarModel
from pstar_plugins.errors import PStarError
from pstar_plugins.hookspecs import hookimpl
from pstar_plugins.plugins import get_plugin_manager

__all__ = [
    "PStarError",
    "PStarModel",
    "build_model",
    "get_plugin_manager",
    "hookimpl",
    "load_adapter",
    "make_optimizer",
    "param_groups",
    "save_adapter",
]
