"""The built-in methods: registration name → plugin object (``module:attribute``).

They are registered through the same path as third-party plugins
(:func:`pstar_plugins.assembly.registry.create_plugin_manager`).
"""

from __future__ import annotations

BUILTIN_PLUGINS: dict[str, str] = {
    "prompt-tuning": "pstar_plugins.methods.prompt_tuning.plugin:plugin",
    "prefix-tuning": "pstar_plugins.methods.prefix_tuning.plugin:plugin",
    "p-tuning": "pstar_plugins.methods.p_tuning.plugin:plugin",
    "p-tuning-v2": "pstar_plugins.methods.p_tuning_v2.plugin:plugin",
}
