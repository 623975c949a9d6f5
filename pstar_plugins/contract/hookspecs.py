"""The hook specifications: where plugins *contribute* across methods.

A method's own behaviour (building, trainable state, folding, its parameter groups, export)
lives on its class, :class:`~pstar_plugins.contract.method.PromptMethod`, which the core calls
directly (``docs/method_contract.md``). Hooks remain only where several plugins add up: the
methods they register, the base-model parameters they unfreeze and the optimizer groups they
add. Every hook is prefixed ``pstar_``; the core collects the result of every plugin.

Lifecycle (see ``docs/plugin_hooks.md``)::

    load plugins ─ pstar_register_methods ─┐
                                           ▼
    base model loaded ─ spec.create() ─ core freezes everything
          ─ method.trainable_parameter_names() + pstar_trainable_parameters (unfreeze)
          ─ method.param_groups() + pstar_param_groups ─ optimizer
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from pstar_plugins.assembly.model import PStarModel
    from pstar_plugins.contract.spec import MethodSpec

PROJECT_NAME = "pstar_plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def pstar_register_methods(register: Callable[["MethodSpec"], None]) -> None:
    """Register the methods this plugin provides.

    :param register: call it once per method with a :class:`~pstar_plugins.contract.method.MethodSpec`
        (name, config class, one-line help). Registering a name twice is an error.
    :return: nothing.
    """


@hookspec
def pstar_trainable_parameters(model: "PStarModel") -> "Iterable[str] | None":
    """Name further parameters of ``model`` that stay trainable (e.g. base-model weights).

    The core first freezes every parameter, then unfreezes the method's own
    (``PromptMethod.trainable_parameter_names``) and the union of what all plugins return.
    Names are those of ``model.named_parameters()``; base-model weights named here are saved
    with the adapter.

    :param model: the wrapped model; ``model.method_name`` says which method it carries.
    :return: parameter names to keep trainable, or ``None`` to contribute nothing.
    """


@hookspec
def pstar_param_groups(model: "PStarModel", learning_rate: float, weight_decay: float) -> "list[dict[str, Any]] | None":
    """Contribute optimizer parameter groups beyond the method's own (``PromptMethod.param_groups``).

    Each group is a dict accepted by ``torch.optim`` (``params``, optionally ``lr``,
    ``weight_decay``) plus a ``name``. A trainable parameter may appear in at most one group
    across all plugins; trainable parameters in no group land in a default group.

    :param model: the wrapped model.
    :param learning_rate: the run's base learning rate.
    :param weight_decay: the run's base weight decay.
    :return: a list of groups, or ``None``.
    """
