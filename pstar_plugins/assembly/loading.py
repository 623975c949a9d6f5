"""Loading an adapter: build its method on a base model from the adapter's files and load its
tensors (construction; the files themselves are read by :mod:`pstar_plugins.mechanisms.adapter_io`)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from pstar_plugins.assembly.build import build_model, make_config
from pstar_plugins.assembly.registry import get_plugin_manager
from pstar_plugins.mechanisms.adapter_io import check_geometry, read_adapter
from pstar_plugins.mechanisms.inputs import position_convention


def load_adapter(
    base_model,
    directory,
    tokenizer=None,
    plugin_manager=None,
    trainable: bool = True,
    contents: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None,
):
    """Build the adapter's method on ``base_model`` and load its tensors bit-exactly
    (``contents``: what :func:`read_adapter` already returned for ``directory``)."""
    meta, tensors = contents if contents is not None else read_adapter(directory)
    if meta["format_version"] < 2 and position_convention(base_model) != (0, 0):
        warnings.warn(
            f"{directory}: this adapter was trained by a pstar-plugins that numbered this model's positions from 0; "
            f"{type(base_model).__name__} numbers them from its padding index + 1, as the model does now, so its "
            "outputs differ from those the adapter was trained with. Retrain it for exact results.",
            stacklevel=2,
        )

    pm = plugin_manager or get_plugin_manager()
    config_class = pm.adapter_method(meta, directory).config_class
    config = make_config(meta["method"], config_class.from_saved(meta["method_config"]), plugin_manager=pm)
    check_geometry(meta, base_model.config)  # what the config alone tells, before anything is injected
    # the saved tensors replace any initialisation, so skip the data-dependent ones (no tokenizer needed)
    model = build_model(base_model, meta["method"], config.for_loading(), tokenizer=tokenizer, plugin_manager=pm)
    try:
        model.method.config = config
        check_geometry(meta, base_model.config, model.method.adapter_geometry())
        if meta["folded"]:
            model.fold()
        model.load_trainable_state(tensors)
    except BaseException:
        model.unwrap()  # a refused adapter leaves the base model as it was
        raise
    # base-model weights saved with the adapter were trainable when it was trained (a plugin
    # unfroze them); they stay so, also when that plugin is not loaded now
    for name, param in model.named_parameters():
        if name in tensors and not name.startswith("method."):
            param.requires_grad_(True)
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def save_adapter(model, directory, state=None, write: bool = True, task=None) -> None:
    """Write ``model``'s adapter into ``directory`` (:meth:`PStarModel.save_adapter`)."""
    model.save_adapter(directory, state=state, write=write, task=task)
