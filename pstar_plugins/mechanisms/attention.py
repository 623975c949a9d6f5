"""Per-layer key/value prefixes, injected through transformers' attention-function registry.

Design (the reason is in ``docs/design.md``): every attention module of a transformers 5 model
calls ``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, ...)`` *after*
it has projected, rotated (RoPE) and cached its keys and values. We give each attention module
a tiny view of its config whose ``_attn_implementation`` is ``"pstar_prefix"``; our function
concatenates the layer's prefix in front of the keys/values, extends the mask by ``m`` always
visible columns, and calls the implementation the model was loaded with: sdpa or eager (a mask
tensor), flex_attention (a block mask whose ``mask_mod`` gains the prefix columns) or
flash_attention_2 (the 2D padding mask gains ``m`` columns; flash aligns causal attention to the
bottom-right corner, so every query sees the whole prefix).

Consequences:

* the KV cache never sees the prefix, so every ``Cache`` class works unchanged and positions
  of real tokens are those of the frozen model (the prefix lives in post-rotary key space and
  has no position, which is exactly a free parameter);
* the model-level config is untouched, so masks are built by transformers as usual;
* gradient checkpointing works: the prefix is read through a closure and recomputed layers
  see the same tensor (non-reentrant checkpointing is required, see ``PStarModel``);
* encoder self-attention, decoder self-attention and cross-attention are independent sites.

PEFT instead feeds prefixes as ``past_key_values`` and has broken whenever the Cache API
changed (peft#2821, #2379, #2662, #2735).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from pstar_plugins.contract.errors import IncompatibleModelError
from pstar_plugins.mechanisms.attention_kernels import (
    _SUPPORTED_BASES,
    _UNVERIFIED_BASES,
    ATTN_IMPLEMENTATION,
    UNVERIFIED_KERNELS_ENV,
    _PackedSegments,
    opted_in,
    register_attention_function,
)
from pstar_plugins.mechanisms.geometry import CROSS, DECODER, ENCODER, SELF, AttentionGeometry  # noqa: F401 (kinds re-exported)


@dataclass(frozen=True)
class AttentionSite:
    """One attention module that can receive a prefix: ``kind`` and its index within that kind."""

    name: str
    module: nn.Module
    kind: str
    index: int
    n_kv_heads: int  # as the module passed its keys to the attention function
    key_dim: int
    value_dim: int


def _is_cross(name: str, module: nn.Module) -> bool:
    return bool(getattr(module, "is_cross_attention", False)) or "cross" in type(module).__name__.lower()


def _probe_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Two tokens (and one decoder token) that any model of the family accepts."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    param = next(model.parameters())
    token = int(getattr(text, "bos_token_id", None) or 0) % max(1, int(getattr(text, "vocab_size", 1) or 1))
    ids = torch.full((1, 2), token, dtype=torch.long, device=param.device)
    inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None)
        inputs["decoder_input_ids"] = torch.full((1, 1), int(start or 0), dtype=torch.long, device=param.device)
    elif model.can_generate():
        inputs["use_cache"] = False
    return inputs


def probe_attention_calls(model: nn.Module, injector: "PrefixInjector") -> dict[nn.Module, tuple[tuple, tuple]]:
    """Which modules call transformers' attention interface, and with which key/value shapes.

    Every module that holds a config (the model-level modules that build masks aside) is given
    the view that names our registered attention function, and the model runs once on two
    tokens. The modules that arrive in our function as its ``module`` argument are the attention
    sites; the others get their own config back. This relies only on the attention-interface
    registration (``AttentionInterface.register``) that transformers' own kernels use, not on the
    names or source of the modeling code.
    """
    from transformers import PretrainedConfig, PreTrainedModel

    wrapped = []
    for module in model.modules():
        config = module.__dict__.get("config")
        if isinstance(module, PreTrainedModel) or not isinstance(config, PretrainedConfig):
            continue
        module.config = _ConfigView(config)
        module.__dict__["_pstar_injector"] = injector
        wrapped.append((module, config))
    seen: dict[nn.Module, tuple[tuple, tuple]] = {}
    training = model.training
    injector.probing = seen
    from pstar_plugins.mechanisms.distributed import gathered_module_by_module

    try:
        model.eval()
        with torch.no_grad(), gathered_module_by_module(model):  # ZeRO-3: one module's weights at a time
            model(**_probe_inputs(model))
    finally:
        injector.probing = None
        model.train(training)
        for module, config in wrapped:
            if module not in seen:
                module.config = config
                module.__dict__.pop("_pstar_injector", None)
    return seen


def find_attention_sites(model: nn.Module, calls: dict[nn.Module, tuple[tuple, tuple]]) -> list["AttentionSite"]:
    """The modules that called the attention interface (:func:`probe_attention_calls`), in layer
    order, classified by kind."""
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    counters: dict[str, int] = {}
    sites = []
    for name, module in model.named_modules():
        if module not in calls:
            continue
        if encoder_decoder:
            parts = name.split(".")
            if "encoder" in parts:
                kind = ENCODER
            elif _is_cross(name, module) or not getattr(module, "is_causal", True):
                kind = CROSS
            else:
                kind = DECODER
        else:
            if _is_cross(name, module):
                continue  # cross-attention of an encoder-only/decoder-only model is not prefixed
            kind = SELF
        key_shape, value_shape = calls[module]
        sites.append(
            AttentionSite(
                name, module, kind, counters.get(kind, 0), int(key_shape[1]), int(key_shape[-1]), int(value_shape[-1])
            )
        )
        counters[kind] = counters.get(kind, 0) + 1
    return sites


class _ConfigView:
    """Read-through view of a config that reports our attention implementation."""

    def __init__(self, base) -> None:
        object.__setattr__(self, "_pstar_base", base)

    def __getattr__(self, name):
        if name == "_attn_implementation":
            return ATTN_IMPLEMENTATION
        return getattr(object.__getattribute__(self, "_pstar_base"), name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_pstar_base"), name, value)


class PrefixInjector:
    """Owns the attention routing of one model and the prefix tensors of the current call.

    ``active`` maps a kind to a pair ``(keys, values)``, each ``(N, n_sites, n_kv, m, head_dim)``
    where ``N`` is 1 (one prompt for the whole batch), the batch size (one row per example), or
    the number of distinct prompts of a mixed-task batch with ``row_groups`` naming each row's.
    A site whose row is missing (``layer_map``) gets no prefix.

    In a packed call (``mechanisms.packing``) one row of the call holds examples of several tasks.
    :meth:`packed` then gives every row all ``N`` prompts side by side (``N·m`` columns) and
    masks each query to the ``m`` columns of its own example's prompt.
    """

    def __init__(self, model: nn.Module) -> None:
        register_attention_function()
        base_impl = getattr(model.config, "_attn_implementation", None)
        if base_impl in _UNVERIFIED_BASES and not opted_in(base_impl):
            raise IncompatibleModelError(
                f"prefix methods on {base_impl} are written but not yet verified on a GPU: load the model with "
                f"attn_implementation='sdpa' (torch's flash kernel serves unpadded prefix batches), or run "
                f"`bash bench/gpu_check.sh` on a GPU, which checks them with {UNVERIFIED_KERNELS_ENV}={base_impl}."
            )
        if base_impl == "flash_attention_2" and getattr(model.config, "is_encoder_decoder", False):
            raise IncompatibleModelError(
                "prefix methods on flash_attention_2 are for decoder-only models: transformers' flash cross-attention "
                "unpads decoder queries with the encoder's mask. Load the model with attn_implementation='sdpa'."
            )
        if base_impl not in _SUPPORTED_BASES + _UNVERIFIED_BASES:
            raise IncompatibleModelError(
                f"prefix methods need attn_implementation 'sdpa', 'eager' or 'flex_attention', but the model was "
                f"loaded with {base_impl!r}. Reload it with from_pretrained(..., attn_implementation='sdpa')."
            )
        carried = [type(m).__name__ for m in model.modules() if isinstance(m.__dict__.get("config"), _ConfigView)]
        if carried:
            raise IncompatibleModelError(
                f"the attention of this {type(model).__name__} is already routed by pstar-plugins ({carried[0]}); "
                "build "
                "the method on a fresh base model, or .unwrap() the PStarModel that holds it first."
            )
        self.probing: dict | None = None
        self._saved: list[tuple[nn.Module, object]] = []
        self.sites = find_attention_sites(model, probe_attention_calls(model, self))
        for site in self.sites:
            self._saved.append((site.module, object.__getattribute__(site.module.config, "_pstar_base")))
        if not self.sites:
            raise IncompatibleModelError(
                f"{type(model).__name__} (model type {getattr(model.config, 'model_type', '?')!r}) computes "
                "attention in "
                "its own code, not through transformers' attention interface, so its layers cannot take key/value "
                "prefixes. Use prompt-tuning or p-tuning instead (docs/architectures.md lists what each family "
                "supports)."
            )
        self.active: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.row_groups: torch.Tensor | None = None  # (B,) prompt row of each example, or None
        self.segments: _PackedSegments | None = None  # set during a packed call
        # when a dict: every site records its (keys, values) there and runs without a prefix
        self.capturing: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.layer_map: dict[str, list[int | None]] = {}
        # masks built for the current call, shared by every layer (see shared_mask)
        self._masks: dict[tuple, tuple[object, object]] = {}
        for site in self.sites:
            site.module.__dict__["_pstar_site"] = (site.kind, site.index)

    def geometry(self) -> dict[str, "AttentionGeometry"]:
        """Each kind's key/value shape as its sites computed them in the probe call."""

        out = {}
        for kind in self.counts():
            shapes = {(s.n_kv_heads, s.key_dim, s.value_dim) for s in self.sites if s.kind == kind}
            if len(shapes) != 1:
                raise IncompatibleModelError(
                    f"the {kind} attention layers of this model use different key/value shapes {sorted(shapes)}; "
                    "prefix methods need one shape per kind of attention site. Use prompt-tuning instead."
                )
            n_kv, key_dim, value_dim = shapes.pop()
            out[kind] = AttentionGeometry(self.counts()[kind], n_kv, key_dim, value_dim if value_dim != key_dim else 0)
        return out

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for site in self.sites:
            out[site.kind] = out.get(site.kind, 0) + 1
        return out

    def detach(self) -> None:
        """Restore every attention module's own config (the model is as before)."""
        for module, config in self._saved:
            module.config = config
            module.__dict__.pop("_pstar_site", None)
            module.__dict__.pop("_pstar_injector", None)
        self._saved.clear()

    @contextlib.contextmanager
    def activate(
        self, prefixes: dict[str, tuple[torch.Tensor, torch.Tensor]], row_groups: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Use ``prefixes`` in every attention call meanwhile; ``row_groups`` ``(B,)``: which of
        their rows each example of the batch uses (default: row ``i`` for example ``i``, or the
        single row for all)."""
        with self.restored((prefixes, row_groups, None)):
            yield

    def state(self):
        """What the current call uses, for :meth:`restored` (gradient checkpointing recomputes
        layers during backward, after the forward's contexts have closed)."""
        return self.active, self.row_groups, self.segments

    @contextlib.contextmanager
    def restored(self, state) -> Iterator[None]:
        previous = self.state()
        self.active, self.row_groups, self.segments = state
        self._masks.clear()  # a new call builds its own masks
        try:
            yield
        finally:
            self.active, self.row_groups, self.segments = previous
            self._masks.clear()

    def shared_mask(self, key: tuple, source, build: Callable[[], object]):
        """The mask ``build()`` gives for ``key``, built once per call and shared by every layer:
        transformers hands all layers (of one layer type) the same mask tensor, so the prefix
        columns are prepended once per forward, not once per layer. ``source`` is the tensor the
        mask derives from (``None`` for masks built from shapes alone); it is kept with the
        entry, so an entry is reused only for that very tensor."""
        key = (*key, id(source))  # layers of different types get different masks: keep one entry each
        entry = self._masks.get(key)
        if entry is not None and entry[0] is source:
            return entry[1]
        if len(self._masks) >= 16:  # generate(): a new mask shape every step
            self._masks.clear()
        mask = build()
        self._masks[key] = (source, mask)
        return mask

    @contextlib.contextmanager
    def activate_tasks(
        self,
        task_ids: torch.Tensor | None,
        prefixes_of: Callable[[torch.Tensor | None], dict[str, tuple[torch.Tensor, torch.Tensor]]],
    ):
        """Activate the prefixes of a call whose rows pick a task by ``task_ids`` (or share one
        prompt when ``None``) and yield the ``while_packed`` for ``mechanisms.packing.call``.

        ``prefixes_of(tasks)`` computes the prefixes of the distinct ``tasks`` only (``None``:
        the single prompt); rows are mapped to them through ``row_groups``."""
        if task_ids is None:
            with self.activate(prefixes_of(None)):
                yield None
            return
        tasks, row_groups = torch.unique(task_ids, return_inverse=True)
        with self.activate(prefixes_of(tasks), row_groups):
            yield lambda plan: self.packed(plan.segment, plan.unpadded)

    @contextlib.contextmanager
    def packed(self, segment: torch.Tensor, unpadded: bool = False) -> Iterator[None]:
        """During a packed call: ``segment`` ``(R, C)`` is 1 + the source example of every packed
        position, 0 at padding (``mechanisms.pack_plan.PackPlan.segment``). ``unpadded``: every packed
        row is one whole example (``PackPlan.unpadded``), so each row keeps its own prompt and
        the call runs without a mask, like an unpadded plain call."""
        previous = self.segments, self.row_groups
        if self.row_groups is not None:
            groups = self.row_groups.to(segment.device)[(segment - 1).clamp(min=0)]
            if unpadded:
                self.row_groups = groups[:, 0]  # (R,): the prompt of the example in each packed row
            else:
                self.segments = _PackedSegments(groups.masked_fill(segment == 0, -1), int(self.row_groups.max()) + 1)
        try:
            yield
        finally:
            self.segments, self.row_groups = previous

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]]:
        """Record the keys and values every site computes (post-rotary, ``(B, n_kv, L, d)``),
        keyed by ``(kind, index)``; no prefix is applied meanwhile."""
        previous, self.capturing = self.capturing, {}
        try:
            yield self.capturing
        finally:
            self.capturing = previous

    def prefix_for(self, kind: str, index: int, batch: int):
        pair = self.active.get(kind)
        if pair is None:
            return None
        rows = self.layer_map.get(kind)
        row = index if rows is None else rows[index]
        if row is None:
            return None
        keys, values = pair[0][:, row], pair[1][:, row]  # (N, n_kv, m, head_dim)
        if self.segments is not None:  # packed mixed-task call: every prompt, side by side
            n, n_kv, m = keys.shape[:3]
            keys = keys.transpose(0, 1).reshape(1, n_kv, n * m, keys.shape[-1]).expand(batch, -1, -1, -1)
            values = values.transpose(0, 1).reshape(1, n_kv, n * m, values.shape[-1]).expand(batch, -1, -1, -1)
            return keys, values
        if self.row_groups is not None:
            groups = self.row_groups.to(keys.device)
            if batch != groups.numel() and batch % groups.numel() == 0:  # generate() expanded rows
                groups = groups.repeat_interleave(batch // groups.numel())
            keys, values = keys[groups], values[groups]
        n = keys.shape[0]
        if n != batch:
            if n == 1:
                keys, values = keys.expand(batch, *keys.shape[1:]), values.expand(batch, *values.shape[1:])
            elif batch % n == 0:  # generate() expanded each row for beams / sampling
                keys = keys.repeat_interleave(batch // n, dim=0)
                values = values.repeat_interleave(batch // n, dim=0)
            else:
                raise IncompatibleModelError(
                    f"prefix holds {n} rows but the attention call has batch {batch}; pass task_ids "
                    "with one entry per example."
                )
        return keys, values
