"""PEFT-compatible export and import of prompt-learning adapters (decoder-only models).

PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors`` holding one tensor,
``prompt_embeddings``, saved in inference mode (the reparameterisation already applied):

* prompt tuning / P-tuning: ``(m, hidden)`` virtual token embeddings, placed in front of the input;
* prefix tuning / P-tuning v2: ``(m, n_layers · 2 · n_kv_heads · head_dim)``, which PEFT views as
  ``(m, layer·2 + {key, value}, kv_head, head_dim)`` — the same order as our flat prefix table.

One difference is not a matter of layout. PEFT puts the prefix in the KV cache, so the real
tokens sit at positions ``m, m+1, ...``; ours keep the frozen model's positions ``0, 1, ...`` and
the prefix has none. With rotary embeddings the two are equivalent: a query at position ``m+i``
against key ``R(m)k`` scores the same as a query at ``i`` against ``k``, so export rotates the
prefix keys by ``m`` positions and import rotates them back. Models with absolute position
embeddings (GPT-2) have no such equivalence and are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from pstar_plugins.assembly.build import build_model
from pstar_plugins.assembly.loading import load_adapter
from pstar_plugins.assembly.registry import get_plugin_manager
from pstar_plugins.contract.capabilities import PeftExport
from pstar_plugins.contract.errors import AdapterError, IncompatibleModelError
from pstar_plugins.mechanisms.adapter_io import atomic_write
from pstar_plugins.mechanisms.inputs import is_encoder_decoder

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def _peft_config(kind: str, m: int, name_or_path: str, extra: dict) -> dict:
    config = {
        "peft_type": kind,
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "num_virtual_tokens": m,
        "num_transformer_submodules": 1,
        "base_model_name_or_path": name_or_path or None,
        "revision": None,
        "auto_mapping": None,
    }
    config.update(extra)
    return config


def export_peft(adapter_dir, base_model, output_dir, contents=None) -> dict:
    """Write the adapter in ``adapter_dir`` (trained on ``base_model``) in PEFT's layout; the
    method says what that layout holds (``PeftExport.peft_export``) or why it has none.
    ``contents``: what ``read_adapter(adapter_dir)`` already returned."""
    if is_encoder_decoder(base_model):
        raise IncompatibleModelError("PEFT export covers decoder-only models; this one is encoder-decoder.")
    model = load_adapter(base_model, adapter_dir, trainable=False, contents=contents)
    extra = sorted(
        k for k in model.raw_trainable_state() if not k.startswith("method.") and k.startswith("base_model.")
    )
    if extra:
        raise AdapterError(
            f"the adapter also holds base-model weights a plugin trained ({extra[:3]}); a PEFT "
            "prompt-learning adapter has no place for them. Use the pstar adapter itself."
        )
    if not isinstance(model.method, PeftExport):
        raise AdapterError(f"{type(model.method).__name__} has no PEFT equivalent; export the pstar adapter itself.")
    model.fold()
    exported = model.method.peft_export(base_model)
    embeddings = exported.embeddings
    config = _peft_config(
        exported.peft_type, embeddings.shape[0], getattr(base_model.config, "_name_or_path", ""), exported.config
    )
    out = Path(output_dir)
    tensors = {"prompt_embeddings": embeddings.float().contiguous().cpu()}
    atomic_write(out / PEFT_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(out / PEFT_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    return config


def read_peft(peft_dir, plugin_manager=None):
    """The spec of the method that imports the PEFT adapter in ``peft_dir``, its config and its
    prompt embeddings; the refusals here need only the files, so they come before any model loads
    (the method's own ``peft_options`` still checks the config when the adapter is built)."""
    pm = plugin_manager or get_plugin_manager()
    peft_dir = Path(peft_dir)
    try:
        config = json.loads((peft_dir / PEFT_CONFIG).read_text())
        weights = load_file(str(peft_dir / PEFT_WEIGHTS))
    except (OSError, json.JSONDecodeError, ValueError) as exc:
        raise AdapterError(
            f"{peft_dir} is not a readable PEFT adapter ({exc}); expected {PEFT_CONFIG} and {PEFT_WEIGHTS}."
        ) from exc
    kind = config.get("peft_type")
    embeddings = weights.get("prompt_embeddings")
    if embeddings is None:
        raise AdapterError(
            f"{peft_dir / PEFT_WEIGHTS} has no 'prompt_embeddings' tensor; save the PEFT adapter with "
            "inference_mode or PEFT >= 0.5."
        )
    specs = [spec for spec in pm.methods.values() if kind in spec.peft_types]
    if not specs:
        known = sorted({t for spec in pm.methods.values() for t in spec.peft_types})
        raise AdapterError(
            f"PEFT adapter type {kind!r} is imported by no loaded method (they import {', '.join(known)}). "
            "A plugin whose MethodSpec lists it in peft_types would: pass that plugin with -p MODULE. Types "
            "that are not prompt learning (LORA, IA3, ...) have no pstar equivalent; use PEFT for them."
        )
    return specs[0], config, embeddings


def import_peft(peft_dir, base_model, tokenizer=None, plugin_manager=None, contents=None):
    """Build a trainable ``PStarModel`` from a PEFT prompt-learning adapter (PEFT itself refuses
    to continue training a saved prompt-learning adapter, peft#2256). The method is the one
    whose spec lists the adapter's ``peft_type`` in ``peft_types``. ``contents``: what
    :func:`read_peft` already returned for ``peft_dir``."""
    pm = plugin_manager or get_plugin_manager()
    spec, config, embeddings = contents if contents is not None else read_peft(peft_dir, pm)
    method_class = spec.resolve_class()
    if not issubclass(method_class, PeftExport):
        raise AdapterError(
            f"method {spec.name!r} lists PEFT type {config.get('peft_type')!r} in peft_types, but its class "
            f"{method_class.__name__} does not subclass PeftExport; it cannot be built from a PEFT adapter."
        )
    options = method_class.peft_options(config)
    model = build_model(base_model, spec.name, tokenizer=tokenizer, plugin_manager=pm, **options)
    model.load_trainable_state(model.method.state_from_peft(base_model, embeddings))
    return model
