"""pstar-plugins: the P*-tuning family (prompt tuning, prefix tuning, P-tuning, P-tuning v2)
as pluggy plugins for Hugging Face transformers, Accelerate and DeepSpeed.

The public names are imported on first use (PEP 562), so that ``pstar --help``, ``pstar methods``
and argument errors answer without importing torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    # the method contract (docs/method_contract.md)
    "MethodConfig": "pstar_plugins.contract.spec",
    "MethodPlugin": "pstar_plugins.contract.spec",
    "MethodSpec": "pstar_plugins.contract.spec",
    "Preset": "pstar_plugins.contract.spec",
    "PromptMethod": "pstar_plugins.contract.method",
    # building, training and loading
    "PStarError": "pstar_plugins.contract.errors",
    "PStarModel": "pstar_plugins.assembly.model",
    "build_model": "pstar_plugins.assembly.build",
    "get_plugin_manager": "pstar_plugins.assembly.registry",
    "hookimpl": "pstar_plugins.contract.hookspecs",
    "load_adapter": "pstar_plugins.assembly.loading",
    "make_optimizer": "pstar_plugins.assembly.build",
    "param_groups": "pstar_plugins.assembly.build",
    "save_adapter": "pstar_plugins.assembly.loading",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from pstar_plugins.assembly.build import build_model, make_optimizer, param_groups
    from pstar_plugins.assembly.loading import load_adapter, save_adapter
    from pstar_plugins.assembly.model import PStarModel
    from pstar_plugins.assembly.registry import get_plugin_manager
    from pstar_plugins.contract.errors import PStarError
    from pstar_plugins.contract.hookspecs import hookimpl
    from pstar_plugins.contract.method import PromptMethod
    from pstar_plugins.contract.spec import MethodConfig, MethodPlugin, MethodSpec, Preset


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pstar_plugins' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
