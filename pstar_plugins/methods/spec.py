"""What a method declares without torch: its config base class, its spec and the plugin base
class whose hook implementations delegate to the method's module.

Kept free of torch and transformers imports so that listing methods and building the command
line (``pstar methods``, ``pstar train --help``) stays fast; the module (``PromptMethod``, in
:mod:`pstar_plugins.methods.base`) is imported only when a method is built.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from pstar_plugins.errors import ConfigError
from pstar_plugins.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from pstar_plugins.core.model import PStarModel
    from pstar_plugins.methods.base import PromptMethod


# ----------------------------------------------------------------------------- config


@dataclass
class MethodConfig:
    """Base of every method config. Fields carry ``metadata={"help": ...}`` for the CLI."""

    num_tasks: int = field(default=1, metadata={"help": "number of task-specific prompts held in one table"})

    def validate(self) -> None:
        """Raise :class:`ConfigError` for an invalid value. Subclasses extend this."""
        if not isinstance(self.num_tasks, int) or self.num_tasks < 1:
            raise ConfigError(f"num_tasks={self.num_tasks!r}: expected an integer ≥ 1 (one prompt per task).")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "MethodConfig":
        """Build and validate a config; unknown keys are an error that lists the known ones."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"method config must be a JSON object, got {type(values).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for {cls.__name__}; known options: {sorted(known)}."
            )
        try:
            config = cls(**dict(values))
        except TypeError as exc:
            raise ConfigError(f"invalid options for {cls.__name__}: {exc}") from exc
        config.validate()
        return config

    def for_loading(self) -> "MethodConfig":
        """The config to build with when saved tensors will overwrite the initialisation.

        Methods whose initialisation reads text or the vocabulary return a copy that skips it.
        """
        return self

    def has_classifier_head(self) -> bool:
        """Whether the method scores classes with a linear head of its own instead of label words."""
        return False

    def for_classes(self, num_classes: int) -> "MethodConfig":
        """The config for a task with ``num_classes`` classes (a head sizes itself from it)."""
        return self

    def replace(self, **changes: Any) -> "MethodConfig":
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config


def positive_int(owner: MethodConfig, name: str) -> None:
    value = getattr(owner, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}={value!r}: expected a positive integer. Set --{name.replace('_', '-')} to 1 or more.")


def one_of(owner: MethodConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(owner, name)
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {list(choices)}.")


# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class Preset:
    """The recipe ``pstar train`` uses for a method unless told otherwise.

    ``options`` are method config values, ``learning_rate`` the base AdamW rate, and
    ``expected_examples`` how many training examples the recipe was chosen for (None: unstated).
    """

    options: Mapping[str, Any] = field(default_factory=dict)
    learning_rate: float = 1e-3
    expected_examples: int | None = None


DEFAULT_PRESET = Preset()  # methods that declare none


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its CLI name, config class, one-line help and preset."""

    name: str
    config_class: type[MethodConfig]
    help: str
    plugin: str = ""
    preset: Preset = DEFAULT_PRESET


# ----------------------------------------------------------------------------- plugin


class MethodPlugin:
    """Hook implementations that delegate to the method's :class:`PromptMethod`.

    Subclasses set ``spec`` and implement :meth:`create`. Every hook returns ``None`` when the
    model carries another plugin's method, so the core never needs to know the name.
    """

    spec: ClassVar[MethodSpec]

    def create(self, base_model, config: MethodConfig, tokenizer) -> PromptMethod:
        raise NotImplementedError

    def _mine(self, model: "PStarModel") -> bool:
        return model.method_name == self.spec.name

    @hookimpl
    def pstar_register_methods(self, register) -> None:
        register(self.spec)

    @hookimpl
    def pstar_build_method(self, base_model, method, config, tokenizer):
        if method != self.spec.name:
            return None
        return self.create(base_model, config, tokenizer)

    @hookimpl
    def pstar_trainable_parameters(self, model):
        if not self._mine(model):
            return None
        return ["method." + name for name in model.method.trainable_parameter_names()]

    @hookimpl
    def pstar_param_groups(self, model, learning_rate, weight_decay):
        if not self._mine(model):
            return None
        return model.method.param_groups(learning_rate, weight_decay)

    @hookimpl
    def pstar_trainable_state(self, model):
        if not self._mine(model):
            return None
        return model.method.trainable_state()

    @hookimpl
    def pstar_load_trainable_state(self, model, state):
        if not self._mine(model):
            return None
        model.method.load_trainable_state(state)
        return True

    @hookimpl
    def pstar_fold(self, model):
        if not self._mine(model):
            return None
        model.method.fold()
        return True
