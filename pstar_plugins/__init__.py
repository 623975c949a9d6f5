"""pstar-plugins: the P*-tuning family (prompt tuning, prefix tuning, P-tuning, P-tuning v2)
as pluggy plugins for Hugging Face transformers, Accelerate and DeepSpeed.

The public names are imported on first use (PEP 562), so that ``pstar --help``, ``pstar methods``
and argument errors answer without importing torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "PStarError": "pstar_plugins.errors",
    "PStarModel": "pstar_plugins.core.model",
    "build_model": "pstar_plugins.core.build",
    "get_plugin_manager": "pstar_plugins.plugins",
    "hookimpl": "pstar_plugins.hookspecs",
    "load_adapter": "pstar_plugins.core.loading",
    "make_optimizer": "pstar_plugins.core.build",
    "param_groups": "pstar_plugins.core.build",
    "save_adapter": "pstar_plugins.core.adapter_io",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from pstar_plugins.core.adapter_io import save_adapter
    from pstar_plugins.core.loading import load_adapter
    from pstar_plugins.core.build import build_model, make_optimizer, param_groups
    from pstar_plugins.core.model import PStarModel
    from pstar_plugins.errors import PStarError
    from pstar_plugins.hookspecs import hookimpl
    from pstar_plugins.plugins import get_plugin_manager


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pstar_plugins' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
