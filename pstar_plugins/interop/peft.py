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
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pstar_plugins.core.adapter_io import _atomic_write, load_adapter
from pstar_plugins.core.build import build_model
from pstar_plugins.core.geometry import hidden_size
from pstar_plugins.core.inputs import is_encoder_decoder
from pstar_plugins.errors import AdapterError, IncompatibleModelError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def _rotary(base_model):
    """``(rotary module, apply_rotary_pos_emb)`` of a RoPE model, or ``None``."""
    rotary = getattr(getattr(base_model, "base_model", base_model), "rotary_emb", None)
    if rotary is None:
        return None
    for module in base_model.modules():
        apply = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
        if apply is not None:
            return rotary, apply
    return None


def _rotate_keys(base_model, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Rotate keys ``(N, L, n_kv, m, d)`` as if they sat at position ``shift`` (negative: undo)."""
    found = _rotary(base_model)
    if found is None:
        raise IncompatibleModelError(
            f"{type(base_model).__name__} has no rotary position embedding: PEFT's prefixes shift the real tokens' "
            "positions by the prefix length, which only rotary models can compensate; this adapter cannot be "
            "converted exactly."
        )
    rotary, apply = found
    N, L, H, m, d = keys.shape
    flat = keys.reshape(N * L, H, m, d).float()
    position = torch.full((1, m), abs(shift), dtype=torch.long, device=flat.device)
    cos, sin = rotary(flat, position)
    if shift < 0:
        sin = -sin  # R(-m) = R(m)^T
    rotated, _ = apply(flat, flat, cos.to(flat.dtype), sin.to(flat.dtype))
    return rotated.reshape(N, L, H, m, d)


def _peft_config(kind: str, model, m: int, name_or_path: str, extra: dict) -> dict:
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


def export_peft(adapter_dir, base_model, output_dir) -> dict:
    """Write the adapter in ``adapter_dir`` (trained on ``base_model``) in PEFT's layout."""
    if is_encoder_decoder(base_model):
        raise IncompatibleModelError("PEFT export covers decoder-only models; this one is encoder-decoder.")
    model = load_adapter(base_model, adapter_dir, trainable=False)
    extra = sorted(k for k in model.raw_trainable_state() if not k.startswith("method.") and k.startswith("base_model."))
    if extra:
        raise AdapterError(f"the adapter also holds base-model weights a plugin trained ({extra[:3]}); a PEFT "
                           "prompt-learning adapter has no place for them. Use the pstar adapter itself.")
    model.fold()
    method, cfg = model.method_name, model.method_config
    text = base_model.config.get_text_config() if hasattr(base_model.config, "get_text_config") else base_model.config
    hidden = hidden_size(base_model.config)
    name = getattr(base_model.config, "_name_or_path", "")
    if method == "prompt-tuning":
        if cfg.num_tasks != 1 or cfg.position != "start":
            raise AdapterError("PEFT prompt tuning has one prompt in front of the input: export needs num_tasks=1 and position='start'.")
        embeddings = model.method.prompt.detach()[0]
        config = _peft_config("PROMPT_TUNING", model, embeddings.shape[0], name, {
            "token_dim": hidden, "num_attention_heads": int(text.num_attention_heads), "num_layers": int(text.num_hidden_layers),
            "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None})
    elif method == "p-tuning":
        positions = [i for i, part in enumerate(model.method.template.parts) if type(part).__name__ == "Soft"]
        if positions != [0]:
            raise AdapterError(
                f"PEFT's P-tuning puts every virtual token in front of the input; the template {cfg.template!r} places "
                "soft tokens elsewhere, which PEFT cannot express. Use a template that starts with one {soft:N} block."
            )
        embeddings = model.method.encoder.embedding.detach()
        config = _peft_config("P_TUNING", model, embeddings.shape[0], name, {
            "token_dim": hidden, "num_attention_heads": int(text.num_attention_heads), "num_layers": int(text.num_hidden_layers),
            "encoder_reparameterization_type": "MLP", "encoder_hidden_size": hidden, "encoder_num_layers": 2, "encoder_dropout": 0.0})
    elif method in ("prefix-tuning", "p-tuning-v2"):
        if getattr(cfg, "head", "none") != "none":
            raise AdapterError("a p-tuning-v2 adapter with a classification head has no PEFT equivalent; export needs head='none'.")
        if cfg.num_tasks != 1 or getattr(cfg, "layers", None):
            raise AdapterError("PEFT prefix tuning has one prefix on every layer: export needs num_tasks=1 and all layers.")
        table = model.method.tables["self"]
        if table.geometry.value_width != table.geometry.head_dim:
            raise AdapterError("keys and values of this model have different head sizes (latent attention); PEFT's "
                               "prefix layout has one size for both, so this adapter has no PEFT equivalent.")
        keys, values = table(None, torch.nn.Identity())  # (1, L, n_kv, m, d)
        keys = _rotate_keys(base_model, keys.detach(), table.m)
        g = table.geometry
        flat = torch.stack([keys, values.detach().float()], dim=2)  # (1, L, 2, n_kv, m, d)
        embeddings = flat.permute(0, 4, 1, 2, 3, 5).reshape(table.m, g.n_layers * 2 * g.n_kv_heads * g.head_dim)
        config = _peft_config("PREFIX_TUNING", model, table.m, name, {
            "token_dim": g.n_kv_heads * g.head_dim, "num_attention_heads": g.n_kv_heads, "num_layers": g.n_layers,
            "encoder_hidden_size": g.n_kv_heads * g.head_dim, "prefix_projection": False})
    else:
        raise AdapterError(f"method {method!r} has no PEFT equivalent; export supports prompt-tuning, p-tuning, prefix-tuning, p-tuning-v2.")
    out = Path(output_dir)
    tensors = {"prompt_embeddings": embeddings.float().contiguous().cpu()}
    _atomic_write(out / PEFT_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(out / PEFT_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    return config


def import_peft(peft_dir, base_model, tokenizer=None):
    """Build a trainable ``PStarModel`` from a PEFT prompt-learning adapter (PEFT itself refuses
    to continue training a saved prompt-learning adapter, peft#2256)."""
    peft_dir = Path(peft_dir)
    try:
        config = json.loads((peft_dir / PEFT_CONFIG).read_text())
        weights = load_file(str(peft_dir / PEFT_WEIGHTS))
    except (OSError, json.JSONDecodeError, ValueError) as exc:
        raise AdapterError(f"{peft_dir} is not a readable PEFT adapter ({exc}); expected {PEFT_CONFIG} and {PEFT_WEIGHTS}.") from exc
    kind = config.get("peft_type")
    embeddings = weights.get("prompt_embeddings")
    if embeddings is None:
        raise AdapterError(f"{peft_dir / PEFT_WEIGHTS} has no 'prompt_embeddings' tensor; save the PEFT adapter with inference_mode or PEFT >= 0.5.")
    m = int(config["num_virtual_tokens"])
    if kind in ("PROMPT_TUNING", "P_TUNING"):
        model = build_model(base_model, "prompt-tuning", num_virtual_tokens=m, init="random", tokenizer=tokenizer)
        model.load_trainable_state({"prompt": embeddings.reshape(1, m, -1)})
        return model
    if kind == "PREFIX_TUNING":
        model = build_model(base_model, "prefix-tuning", num_virtual_tokens=m, projection=False)
        table = model.method.tables["self"]
        g = table.geometry
        flat = embeddings.float().view(m, g.n_layers, 2, g.n_kv_heads, g.head_dim).permute(2, 1, 3, 0, 4)  # (2, L, H, m, d)
        keys = _rotate_keys(base_model, flat[0].unsqueeze(0), -m)[0]
        values = flat[1]
        ours = torch.stack([keys, values], dim=1).permute(3, 0, 1, 2, 4).reshape(1, m, -1)
        model.load_trainable_state({"tables.self.prefix": ours})
        return model
    raise AdapterError(f"PEFT adapter type {kind!r} is not prompt learning; import supports PROMPT_TUNING, P_TUNING and PREFIX_TUNING.")
