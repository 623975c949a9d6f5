"""Command-line parsing shared by ``pstar train`` and ``pstar eval``: a parser that never guesses
(no abbreviated flags, a suggestion on a typo, a library error instead of argparse's exit), and
method config fields turned into flags.

Nothing here imports torch or transformers, so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Callable

from pstar_plugins.contract.errors import ConfigError, PluginError
from pstar_plugins.mechanisms.template import check_label_words  # noqa: F401 (part of the command-line checks)

#: task flags that fill a method config field of the same name instead of being a second flag:
#: P-tuning places its soft tokens in the task's ``--template``, prompt tuning initialises from
#: the task's ``--label-words`` (``init=labels``). Any other clash is refused.
SHARED_TASK_FLAGS = {
    "template": "the task's --template fills it (P-tuning places its soft tokens there)",
    "label_words": "the task's --label-words fills it (one word per class)",
}


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` for every option with a real default; options whose help already
    says what is used (``(default: the method's preset)``), or that default to nothing, are left alone."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or not action.option_strings or action.default in (None, [], False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


class RawDescriptionDefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """:class:`DefaultsHelpFormatter` that keeps the description's line breaks."""


class StrictParser(argparse.ArgumentParser):
    """``argparse`` without prefix matching; usage errors raise :class:`ConfigError` (exit 2 through
    :func:`pstar_plugins.contract.errors.run_reporting_errors`) and an unknown flag names the nearest one."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            raise ConfigError(unknown_flag_message(unknown, self.option_strings()))
        return parsed

    def option_strings(self) -> list[str]:
        return [o for a in self._actions for o in a.option_strings]

    def error(self, message: str):  # argparse's own usage errors (missing value, bad choice, ...)
        raise ConfigError(f"{message}. See {self.prog} --help.")


def add_plugin_argument(parser: argparse.ArgumentParser) -> None:
    """``-p MODULE[:OBJECT]``, repeatable: a plugin module to load for this command only (one
    not installed under the entry points, such as the one a run was trained with)."""
    parser.add_argument(
        "-p",
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE[:OBJECT]",
        help="extra plugin module for this command (module or module:object); repeatable",
    )


def load_plugins(modules: list[str]) -> None:
    """Register the ``-p`` modules (:meth:`~pstar_plugins.assembly.registry.PStarPluginManager.load_module`)."""
    from pstar_plugins.assembly.registry import get_plugin_manager

    pm = get_plugin_manager()
    for module in modules:
        pm.load_module(module)


def unknown_flag_message(unknown: list[str], known: list[str]) -> str:
    first = unknown[0]
    flag = first.split("=", 1)[0]
    if not flag.startswith("-"):
        return f"unexpected argument {first!r}; every option is a --flag VALUE pair (see --help)."
    near = difflib.get_close_matches(flag, [k for k in known if k.startswith("--")], n=1, cutoff=0.6)
    hint = (
        f"; did you mean {near[0]}?" if near else "; see --help for the flags (method options: --method NAME --help)."
    )
    return f"unknown option {flag}{hint}"


# --------------------------------------------------------------------------- value checks


def positive_int(flag: str, value: int) -> None:
    if value is None or value < 1:
        raise ConfigError(f"{flag} {value}: expected a positive integer; pass {flag} 1 or more.")


def non_negative_int(flag: str, value: int) -> None:
    if value is None or value < 0:
        raise ConfigError(f"{flag} {value}: expected 0 or a positive integer.")


def positive_float(flag: str, value: float) -> None:
    if value is None or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{flag} {value}: expected a finite number above 0, e.g. {flag} 1e-3.")


def non_negative_float(flag: str, value: float) -> None:
    if value is None or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{flag} {value}: expected a finite number ≥ 0.")


# --------------------------------------------------------------------------- method config fields


def flag_of(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_METAVARS = {int: "N", float: "X", str: "TEXT", bool: "{true,false}"}


def _converter(kind: Any) -> Callable[[str], Any]:
    if kind is bool:
        return _parse_bool
    if kind in (int, float, str):
        return kind
    if isinstance(kind, type):
        return kind
    raise TypeError(kind)


def _union_members(hint: Any) -> tuple[list[Any], bool]:
    """The non-None members of ``X | Y | None`` / ``Optional[X]`` and whether None is allowed."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = list(typing.get_args(hint))
        optional = type(None) in members
        return [m for m in members if m is not type(None)], optional
    return [hint], False


def field_argument(hint: Any) -> dict[str, Any]:
    """``add_argument`` keywords (type, nargs, metavar) for a config field of type ``hint``.

    ``int | None`` and ``Optional[int]`` take an int or ``none``; ``int | str`` tries the types in
    order; ``list[X]`` takes several values. Raises ``TypeError`` for a type the CLI cannot parse.
    """
    members, optional = _union_members(hint)
    nargs = None
    if len(members) == 1 and typing.get_origin(members[0]) is list:
        nargs = "*"
        members = [typing.get_args(members[0])[0] if typing.get_args(members[0]) else str]
    converters = [_converter(m) for m in members]

    def convert(text: str) -> Any:
        if optional and text.strip().lower() == "none":
            return None
        for conv in converters:
            try:
                return conv(text)
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                continue
        names = " or ".join("true or false" if m is bool else getattr(m, "__name__", str(m)) for m in members)
        raise argparse.ArgumentTypeError(f"expected {names}{' or none' if optional else ''}, got {text!r}")

    convert.__name__ = " | ".join(getattr(m, "__name__", str(m)) for m in members) + (" | None" if optional else "")
    metavar = "|".join(_METAVARS.get(m, getattr(m, "__name__", "VALUE").upper()) for m in members) + (
        "|none" if optional else ""
    )
    return {"type": convert, "nargs": nargs, "metavar": metavar}


def check_method_fields(config_class, method: str, plugin: str, script_flags: set[str]) -> None:
    """Refuse a method whose config fields cannot all be set from the command line.

    A field named like a script flag (``seed``, ``max_length``) would be shadowed by it and keep
    its default; only :data:`SHARED_TASK_FLAGS` share a flag on purpose. A field of a type the
    CLI cannot parse is refused too.
    """
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        flag = flag_of(f.name)
        if flag in script_flags and f.name not in SHARED_TASK_FLAGS:
            raise PluginError(
                f"plugin {plugin!r}: method {method!r} has a config field {f.name!r}, whose flag {flag} is already a "
                "flag of pstar train, so it could never be set; rename the field (e.g. "
                f"{method.replace('-', '_')}_{f.name})."
            )
        try:
            field_argument(hints[f.name])
        except TypeError:
            raise PluginError(
                f"plugin {plugin!r}: method {method!r} has a config field {f.name!r} of type {hints[f.name]!r}, which "
                "cannot be given on the command line; use int, float, str, bool, list[...] or an optional of these."
            ) from None


def add_method_arguments(
    parser: argparse.ArgumentParser, config_class, method: str, defaults: dict[str, Any]
) -> list[str]:
    """Add a flag per field of ``config_class`` (except :data:`SHARED_TASK_FLAGS`, which the task's
    flags fill); return the field names. Unset flags leave no attribute (``argparse.SUPPRESS``),
    so ``--x none`` can set a field to None. ``defaults``: the values this run would use (the
    method's preset over the config's default), shown in ``--help``."""
    group = parser.add_argument_group(f"{method} options ({config_class.__name__})")
    hints = typing.get_type_hints(config_class)
    names = []
    for f in dataclasses.fields(config_class):
        if f.name in SHARED_TASK_FLAGS:
            continue
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        group.add_argument(
            flag_of(f.name),
            dest=f"m_{f.name}",
            default=argparse.SUPPRESS,
            help=f"{help_text} (default: {default!r})",
            **field_argument(hints[f.name]),
        )
        names.append(f.name)
    return names
