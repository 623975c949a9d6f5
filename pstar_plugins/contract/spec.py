"""What a method declares without torch: its config base class, its spec (name, config class,
help, preset, the class that implements it) and the plugin class that registers specs.

Kept free of torch and transformers imports so that listing methods and building the command
line (``pstar methods``, ``pstar train --help``) stays fast; the module (``PromptMethod``, in
:mod:`pstar_plugins.contract.method`) is imported only when a method is built.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from pstar_plugins.contract.errors import ConfigError, PluginError
from pstar_plugins.contract.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from pstar_plugins.contract.method import PromptMethod


# ----------------------------------------------------------------------------- config


@dataclass
class MethodConfig:
    """Base of every method config. Fields carry ``metadata={"help": ...}`` for the CLI."""

    num_tasks: int = field(default=1, metadata={"help": "number of task-specific prompts held in one table"})

    #: fields that earlier versions had (and wrote into adapter files); :meth:`from_saved` drops them
    retired_fields: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for an invalid value. Subclasses extend this."""
        if not isinstance(self.num_tasks, int) or self.num_tasks < 1:
            raise ConfigError(f"num_tasks={self.num_tasks!r}: expected an integer ≥ 1 (one prompt per task).")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "MethodConfig":
        """Build and validate a config; unknown keys are an error that lists the known ones."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"method config must be a JSON object, got {type(values).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for {cls.__name__}; known options: {sorted(known)}.")
        try:
            config = cls(**dict(values))
        except TypeError as exc:
            raise ConfigError(f"invalid options for {cls.__name__}: {exc}") from exc
        config.validate()
        return config

    @classmethod
    def from_saved(cls, values: Mapping[str, Any]) -> "MethodConfig":
        """The config recorded in an adapter file (:meth:`from_dict`, less :attr:`retired_fields`,
        so that files written before a field was retired still load)."""
        if isinstance(values, Mapping):
            values = {k: v for k, v in values.items() if k not in cls.retired_fields}
        return cls.from_dict(values)

    def for_loading(self) -> "MethodConfig":
        """The config to build with when saved tensors will overwrite the initialisation.

        Methods whose initialisation reads text or the vocabulary return a copy that skips it.
        """
        return self

    def replace(self, **changes: Any) -> "MethodConfig":
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config


class ClassifierHead:
    """Opt-in for a config whose method can score classes with a linear head of its own instead
    of the task's label words (P-tuning v2). ``pstar train`` and ``pstar eval`` then score through
    the head and size it with :meth:`for_classes`."""

    def has_classifier_head(self) -> bool:
        """Whether this config's method has the head (a config may also leave it off)."""
        return True

    def for_classes(self, num_classes: int) -> "MethodConfig":
        """The config for a task with ``num_classes`` classes (the head sizes itself from it)."""
        raise NotImplementedError


def has_classifier_head(config: MethodConfig | None) -> bool:
    """Whether ``config``'s method scores classes with its own head (:class:`ClassifierHead`)."""
    return isinstance(config, ClassifierHead) and config.has_classifier_head()


def positive_int(owner: MethodConfig, name: str) -> None:
    value = getattr(owner, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(
            f"{name}={value!r}: expected a positive integer. Set --{name.replace('_', '-')} to 1 or more."
        )


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
    """A registered method: its CLI name, config class, one-line help, preset, and the class
    that implements it (:class:`~pstar_plugins.contract.method.PromptMethod`).

    ``method_class`` is the class itself or its import path ``"package.module:Class"`` (imported
    only when a method is built, so that listing methods needs no torch). ``peft_types`` are the
    PEFT ``peft_type`` values whose adapters ``pstar import-peft`` may turn into this method
    (the class's :meth:`~pstar_plugins.contract.capabilities.PeftExport.peft_options` says how).
    """

    name: str
    config_class: type[MethodConfig]
    help: str
    plugin: str = ""
    preset: Preset = DEFAULT_PRESET
    method_class: "type[PromptMethod] | str | None" = None
    peft_types: tuple[str, ...] = ()

    def resolve_class(self) -> "type[PromptMethod]":
        """The method's class (importing it when ``method_class`` is an import path)."""
        target = self.method_class
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            try:
                target = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as exc:
                raise PluginError(
                    f"method {self.name!r}: cannot import its class {self.method_class!r} ({exc})."
                ) from exc
        if not isinstance(target, type):
            raise PluginError(
                f"method {self.name!r} names no method class (method_class={self.method_class!r}); "
                "set MethodSpec(method_class=YourPromptMethod) or an import path 'module:Class'."
            )
        return target

    def create(self, base_model: Any, config: MethodConfig, tokenizer: Any = None) -> "PromptMethod":
        """Build the method's module on ``base_model`` (``method_class(config, base_model, tokenizer=...)``)."""
        return self.resolve_class()(config, base_model, tokenizer=tokenizer)


# ----------------------------------------------------------------------------- plugin


class MethodPlugin:
    """A plugin that registers methods: ``MethodPlugin(spec, ...)``, or a subclass with a
    ``spec`` class attribute. Everything a method does is asked of its class (the spec's
    ``method_class``); this object only makes the specs known."""

    spec: ClassVar[MethodSpec]

    def __init__(self, *specs: MethodSpec) -> None:
        if not specs and not hasattr(type(self), "spec"):
            raise PluginError(
                f"{type(self).__name__}() registers no method: pass MethodPlugin(MethodSpec(...)) or set a spec "
                "class attribute."
            )
        self.specs: tuple[MethodSpec, ...] = specs or (type(self).spec,)

    @hookimpl
    def pstar_register_methods(self, register) -> None:
        for spec in self.specs:
            register(spec)
