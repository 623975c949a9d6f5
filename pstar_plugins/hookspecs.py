"""The hook specifications: the whole contract between the core and a method plugin.

Every hook is prefixed ``pstar_``. Hooks that *decide or create* something are
``firstresult=True`` and return ``None`` for "not mine"; hooks that *contribute* return a
value that the core collects from every plugin. The core never branches on a method's name:
built-in methods answer these hooks exactly like third-party plugins do.

Lifecycle (see ``docs/plugin_hooks.md``)::

    load plugins ─ pstar_register_methods ─┐
                                           ▼
    base model loaded ─ pstar_build_method ─ core freezes everything
          ─ pstar_trainable_parameters (unfreeze) ─ pstar_param_groups ─ optimizer
          ─ training ─ pstar_trainable_state (save) ... pstar_load_trainable_state (resume/load)
          ─ pstar_fold (inference) ─ pstar_trainable_state (save folded)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel

    from pstar_plugins.core.model import PStarModel
    from pstar_plugins.methods.base import MethodConfig, MethodSpec, PromptMethod

PROJECT_NAME = "pstar_plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def pstar_register_methods(register: Callable[["MethodSpec"], None]) -> None:
    """Register the methods this plugin provides.

    :param register: call it once per method with a :class:`~pstar_plugins.methods.base.MethodSpec`
        (name, config class, one-line help). Registering a name twice is an error.
    :return: nothing.
    """


@hookspec(firstresult=True)
def pstar_build_method(
    base_model: "PreTrainedModel", method: str, config: "MethodConfig", tokenizer: Any
) -> "PromptMethod | None":
    """Create the method's module for ``base_model`` and inject it (attention hooks, embeddings).

    Called once per model, before freezing and before ``accelerator.prepare``.

    :param base_model: the loaded, frozen-to-be Hugging Face model; the hook may mutate it
        (e.g. route its attention modules through the prefix injector).
    :param method: the method name the user asked for.
    :param config: an instance of the config class registered for ``method``.
    :param tokenizer: the model's tokenizer or ``None`` (initialisations that read text need it).
    :return: the :class:`~pstar_plugins.methods.base.PromptMethod` module, or ``None`` when
        ``method`` is not this plugin's.
    """


@hookspec
def pstar_trainable_parameters(model: "PStarModel") -> "Iterable[str] | None":
    """Name the parameters of ``model`` that stay trainable.

    The core first freezes every parameter, then unfreezes the union of what all plugins
    return. Names are those of ``model.named_parameters()``.

    :param model: the wrapped model; ``model.method_name`` says which method it carries.
    :return: parameter names to keep trainable, or ``None`` to contribute nothing.
    """


@hookspec
def pstar_param_groups(
    model: "PStarModel", learning_rate: float, weight_decay: float
) -> "list[dict[str, Any]] | None":
    """Contribute optimizer parameter groups.

    Each group is a dict accepted by ``torch.optim`` (``params``, optionally ``lr``,
    ``weight_decay``) plus a ``name``. A trainable parameter may appear in at most one group
    across all plugins; trainable parameters in no group land in a default group.

    :param model: the wrapped model.
    :param learning_rate: the run's base learning rate.
    :param weight_decay: the run's base weight decay.
    :return: a list of groups, or ``None``.
    """


@hookspec(firstresult=True)
def pstar_trainable_state(model: "PStarModel") -> "Mapping[str, torch.Tensor] | None":
    """Return the tensors that make up the trained adapter (never frozen weights).

    :param model: the wrapped model.
    :return: a flat mapping of names to tensors, or ``None`` when the method is not this
        plugin's.
    """


@hookspec(firstresult=True)
def pstar_load_trainable_state(model: "PStarModel", state: "Mapping[str, torch.Tensor]") -> "bool | None":
    """Load tensors produced by :func:`pstar_trainable_state` into ``model`` (in place).

    :param model: the wrapped model, already built for the adapter's method and config.
    :param state: the saved tensors.
    :return: ``True`` when loaded, ``None`` when the method is not this plugin's.
    """


@hookspec(firstresult=True)
def pstar_fold(model: "PStarModel") -> "bool | None":
    """Fold training-only reparameterisation into static tensors for inference.

    After folding, the reparameterisation modules are gone and :func:`pstar_trainable_state`
    returns the static tensors.

    :param model: the wrapped model.
    :return: ``True`` when folded (or nothing to fold), ``None`` when not this plugin's.
    """
