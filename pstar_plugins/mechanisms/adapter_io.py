"""Adapter files: ``adapter_config.json`` + ``adapter.safetensors`` (no pickle), written atomically.

Reading and writing only: nothing here builds a model (that is :mod:`pstar_plugins.assembly.loading`),
so the wrapped model can save itself through this module.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pstar_plugins.contract.errors import AdapterError
from pstar_plugins.mechanisms.geometry import model_geometry

# 2: base-model weights a plugin trained (``base_model.*`` tensors), separate key/value widths
# in the geometry, and RoBERTa-style models' own position numbering
FORMAT_VERSION = 2
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
METADATA_KEY = "pstar_adapter_config"


def atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp's file is 0600 (and writers may recreate it): give it the mode any new file gets
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


TASK_KINDS = ("classification", "generation")


def adapter_metadata(
    method_name: str,
    method_config: dict[str, Any],
    folded: bool,
    base_config,
    method_geometry: dict[str, Any],
    plugin: dict[str, Any] | None = None,
    task: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An adapter's config: its method and options, whether it is folded, the geometry of the
    model it was trained on (``base_config`` and the method's ``adapter_geometry()``), the plugin
    that provides the method when it is not built in, and ``task``: what it was trained for
    (kind, template, label words or target column), so evaluating it later needs no flags repeated."""
    meta = {
        "format_version": FORMAT_VERSION,
        "method": method_name,
        "method_config": method_config,
        "folded": bool(folded),
        "base_model": {
            "name_or_path": getattr(base_config, "_name_or_path", ""),
            **model_geometry(base_config, method_geometry).to_dict(),
        },
    }
    if plugin:
        meta["plugin"] = plugin
    if task is not None:
        meta["task"] = dict(task)
    return meta


def write_adapter(directory, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Write ``state`` (the adapter tensors) and ``meta`` (:func:`adapter_metadata`) into
    ``directory``, each file replaced atomically."""
    directory = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    text = json.dumps(meta, indent=2, sort_keys=True)
    # the config also travels inside the tensor file, so the one atomic rename that replaces the
    # weights replaces the config they belong to: a kill between the two writes cannot pair new
    # tensors with an old config (the JSON beside it is for people and other tools)
    atomic_write(
        directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt", METADATA_KEY: text})
    )
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text))


def _warn_if_edited(config_path: Path, embedded: str) -> None:
    """The config inside the tensor file is the one that loads (it cannot be out of step with the
    tensors); an ``adapter_config.json`` that says otherwise was edited or is from another save."""

    try:
        beside, inside = json.loads(config_path.read_text(encoding="utf-8")), json.loads(embedded)
    except (UnicodeDecodeError, json.JSONDecodeError, OSError):
        beside, inside = None, {}
    if beside == inside:
        return
    if isinstance(beside, dict) and isinstance(inside, dict):
        keys = sorted(k for k in set(beside) | set(inside) if beside.get(k) != inside.get(k))
        what = f"differs in {keys}"
    else:
        what = "is not valid JSON"
    warnings.warn(
        f"{config_path} {what} from the config stored inside {WEIGHTS_NAME}, which is the one used; edits to "
        f"{CONFIG_NAME} have no effect (re-save the adapter to change its config).",
        stacklevel=3,
    )


def read_adapter(directory) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate an adapter's config and tensors (safetensors only)."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise AdapterError(
            f"{directory} is not an adapter directory: expected {WEIGHTS_NAME} (and {CONFIG_NAME}) in it."
        )
    try:
        with safe_open(str(weights_path), framework="pt") as fh:
            embedded = (fh.metadata() or {}).get(METADATA_KEY)
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights_path} is truncated or corrupt ({exc}); re-export the adapter.") from exc
    source = weights_path if embedded is not None else config_path
    if embedded is None and not config_path.is_file():
        raise AdapterError(f"{directory} has no {CONFIG_NAME} and its tensor file carries no config.")
    if embedded is not None and config_path.is_file():
        _warn_if_edited(config_path, embedded)
    try:
        meta = json.loads(embedded if embedded is not None else config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"the adapter config in {source} is not valid JSON ({exc}); the file is corrupt.") from exc
    if not isinstance(meta, dict):
        raise AdapterError(f"the adapter config in {source} must be a JSON object.")
    missing = [k for k in ("format_version", "method", "method_config", "folded", "base_model") if k not in meta]
    if missing:
        raise AdapterError(
            f"the adapter config in {source} lacks field(s) {missing}; it was not written by pstar-plugins."
        )
    version = meta["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterError(
            f"the adapter config in {source} has format_version {version!r}; this pstar-plugins reads up to "
            f"{FORMAT_VERSION}. Upgrade pstar-plugins to load it."
        )
    task = meta.get("task")
    if task is not None and not (
        isinstance(task, dict) and task.get("kind") in TASK_KINDS and isinstance(task.get("template"), str)
    ):
        raise AdapterError(
            f"the adapter config in {source} has task {task!r}; expected an object with kind "
            f"{' or '.join(TASK_KINDS)} and a template string. Remove the field to evaluate with explicit flags."
        )
    return meta, tensors


def check_geometry(meta: dict[str, Any], config, method_geometry: dict[str, Any] | None = None) -> None:
    """Refuse an adapter recorded for another model geometry. Without ``method_geometry`` (the
    built method's ``adapter_geometry()``) only what ``config`` tells before the method is built
    (hidden size, encoder-decoder) is checked."""
    saved = meta["base_model"]
    current = model_geometry(config, method_geometry).to_dict()
    keys = ("hidden_size", "is_encoder_decoder") + (("attention",) if method_geometry is not None else ())
    for key in keys:
        if saved.get(key) != current.get(key):
            raise AdapterError(
                f"the adapter was trained for a model with {key}={saved.get(key)!r}, but this model has "
                f"{current.get(key)!r} (adapter base: {saved.get('name_or_path')!r}). Load it onto that model."
            )
