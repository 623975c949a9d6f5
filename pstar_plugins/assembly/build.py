"""From a loaded Hugging Face model to a wrapped, frozen model with an optimizer's groups."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from pstar_plugins.assembly.model import CARRIED_METHOD, PStarModel
from pstar_plugins.assembly.registry import PStarPluginManager, get_plugin_manager
from pstar_plugins.contract.errors import ConfigError, IncompatibleModelError, PluginError
from pstar_plugins.contract.method import MethodConfig, PromptMethod
from pstar_plugins.mechanisms import fast_paths


def make_config(
    method: str, config: MethodConfig | Mapping[str, Any] | None = None, plugin_manager=None, **options
) -> MethodConfig:
    """The validated config of ``method`` from a config object, a mapping and/or keyword options."""
    pm = plugin_manager or get_plugin_manager()
    spec = pm.method(method)
    if isinstance(config, MethodConfig):
        if not isinstance(config, spec.config_class):
            raise ConfigError(f"method {method!r} takes a {spec.config_class.__name__}, got {type(config).__name__}.")
        return config.replace(**options) if options else (config.validate() or config)
    values = dict(config or {})
    values.update(options)
    return spec.config_class.from_dict(values)


def freeze(model: PStarModel) -> None:
    """Freeze everything, then unfreeze the union of what the plugins name."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = dict(model.named_parameters())
    names = {"method." + name for name in model.method.trainable_parameter_names()}
    for contributed in model.plugin_manager.hook.pstar_trainable_parameters(model=model):
        names.update(contributed or ())
    unknown = sorted(names - set(params))
    if unknown:
        raise PluginError(f"the method or a plugin asked to train parameters that do not exist: {unknown[:5]}.")
    for name in names:
        params[name].requires_grad_(True)


def build_model(
    base_model: nn.Module,
    method: str,
    config: MethodConfig | Mapping[str, Any] | None = None,
    tokenizer=None,
    plugin_manager: PStarPluginManager | None = None,
    **options,
) -> PStarModel:
    """Attach ``method`` to a loaded model and freeze the model.

    :param base_model: a loaded ``PreTrainedModel`` (any dtype; the method's tensors are fp32).
    :param method: a registered method name (``pstar methods`` lists them).
    :param config: the method's config object or a mapping of its options.
    :param tokenizer: needed by initialisations that read text (``init='text'``, ``'labels'``).
    :param options: option overrides, e.g. ``num_virtual_tokens=20``.
    """
    pm = plugin_manager or get_plugin_manager()
    method_config = make_config(method, config, plugin_manager=pm, **options)
    carried = base_model.__dict__.get(CARRIED_METHOD)
    if carried is not None:
        raise ConfigError(
            f"this {type(base_model).__name__} already carries method {carried!r}; a second method cannot be built on "
            "it. Call .unwrap() on the PStarModel that holds it to get the bare model back, or load a fresh base model."
        )
    spec = pm.method(method)
    try:
        module = spec.create(base_model, method_config, tokenizer=tokenizer)
    except IncompatibleModelError as exc:  # every refusal names the method and the model type
        model_type = getattr(getattr(base_model, "config", None), "model_type", "?")
        raise IncompatibleModelError(f"{method} on model type {model_type!r}: {exc}") from exc
    if not isinstance(module, PromptMethod):
        raise PluginError(
            f"method {method!r} (plugin {spec.plugin!r}) built a {type(module).__name__}; its method_class "
            "must subclass pstar_plugins.contract.method.PromptMethod."
        )
    model = PStarModel(base_model, module, method, pm)
    base_model.__dict__[CARRIED_METHOD] = method
    fast_paths.of(base_model, module)  # the fast paths this model takes, decided once (model.fast_paths)
    try:
        freeze(model)
    except BaseException:
        model.unwrap()
        raise
    return model


def param_groups(model: PStarModel, learning_rate: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer groups: the method's own, then those the plugins contribute; every trainable
    parameter lands in exactly one."""
    groups: list[dict[str, Any]] = []
    seen: dict[int, str] = {}
    contributions = [model.method.param_groups(learning_rate, weight_decay)]
    contributions += model.plugin_manager.hook.pstar_param_groups(
        model=model, learning_rate=learning_rate, weight_decay=weight_decay
    )
    for contributed in contributions:
        for group in contributed or ():
            group = dict(group)
            group["params"] = [p for p in group["params"] if p.requires_grad]
            for p in group["params"]:
                if id(p) in seen:
                    raise PluginError(
                        f"a parameter is in both optimizer groups {seen[id(p)]!r} and {group.get('name')!r}."
                    )
                seen[id(p)] = group.get("name", "?")
            if group["params"]:
                groups.append(group)
    rest = [p for _, p in model.trainable_named_parameters() if id(p) not in seen]
    if rest:
        groups.append({"name": "default", "params": rest, "lr": learning_rate, "weight_decay": weight_decay})
    return groups


def make_optimizer(model: PStarModel, learning_rate: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    groups = param_groups(model, learning_rate, weight_decay)
    for g in groups:
        g.pop("name", None)
    return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay)
