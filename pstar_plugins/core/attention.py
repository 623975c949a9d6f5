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
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from pstar_plugins.core.geometry import CROSS, DECODER, ENCODER, SELF, AttentionGeometry  # noqa: F401 (kinds re-exported)
from pstar_plugins.errors import IncompatibleModelError

ATTN_IMPLEMENTATION = "pstar_prefix"
#: kernels a prefix runs on, each checked by a suite: sdpa and eager (the conformance matrix),
#: flex_attention (evaluation equal to sdpa on the CPU, tests/test_flex_attention.py)
_SUPPORTED_BASES = ("sdpa", "eager", "flex_attention", None)
#: kernels whose prefix path is written and tested on the CPU against an emulation of the kernel,
#: but has not yet passed bench/gpu_check.sh on a GPU: refused unless named in this variable (the
#: check sets it). Once the check's cells pass on a GPU, the kernel moves to _SUPPORTED_BASES, and
#: core.packing.kernel_reason allows its packing without the variable.
UNVERIFIED_KERNELS_ENV = "PSTAR_UNVERIFIED_KERNELS"
_UNVERIFIED_BASES = ("flash_attention_2",)


def opted_in(kernel: str) -> bool:
    """Whether ``PSTAR_UNVERIFIED_KERNELS`` (comma-separated) names ``kernel``."""
    return kernel in os.environ.get(UNVERIFIED_KERNELS_ENV, "").split(",")



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
    from transformers import PreTrainedModel, PretrainedConfig

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
    from pstar_plugins.core.distributed import gathered_module_by_module

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
        sites.append(AttentionSite(name, module, kind, counters.get(kind, 0), int(key_shape[1]), int(key_shape[-1]),
                                   int(value_shape[-1])))
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

    In a packed call (``core.packing``) one row of the call holds examples of several tasks.
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
                f"the attention of this {type(model).__name__} is already routed by pstar-plugins ({carried[0]}); build "
                "the method on a fresh base model, or .unwrap() the PStarModel that holds it first."
            )
        self.probing: dict | None = None
        self._saved: list[tuple[nn.Module, object]] = []
        self.sites = find_attention_sites(model, probe_attention_calls(model, self))
        for site in self.sites:
            self._saved.append((site.module, object.__getattribute__(site.module.config, "_pstar_base")))
        if not self.sites:
            raise IncompatibleModelError(
                f"{type(model).__name__} (model type {getattr(model.config, 'model_type', '?')!r}) computes attention in "
                "its own code, not through transformers' attention interface, so its layers cannot take key/value "
                "prefixes. Use prompt-tuning or p-tuning instead (docs/architectures.md lists what each family supports)."
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
    def activate(self, prefixes: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 row_groups: torch.Tensor | None = None) -> Iterator[None]:
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
    def activate_tasks(self, task_ids: torch.Tensor | None,
                       prefixes_of: Callable[[torch.Tensor | None], dict[str, tuple[torch.Tensor, torch.Tensor]]]):
        """Activate the prefixes of a call whose rows pick a task by ``task_ids`` (or share one
        prompt when ``None``) and yield the ``while_packed`` for ``core.packing.call``.

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
        position, 0 at padding (``core.packing.PackPlan.segment``). ``unpadded``: every packed
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


def _base_function(module: nn.Module, implementation: str | None) -> Callable:
    if implementation in (None, "eager"):
        # each modeling file has its own eager kernel (T5 adds position_bias, ...)
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise IncompatibleModelError(
                f"{type(module).__name__} has no eager kernel; load the model with attn_implementation='sdpa'."
            )
        return eager
    return ALL_ATTENTION_FUNCTIONS[implementation]


class _PackedSegments:
    """Prompt group of every packed position, ``(R, C)`` (-1 at padding), out of ``n_groups``
    prompts, and the masks over the prompt columns it implies, built once per call and dtype."""

    def __init__(self, groups: torch.Tensor, n_groups: int) -> None:
        self.groups = groups
        self.n_groups = n_groups
        self._visible: dict[tuple[int, torch.dtype | None], torch.Tensor] = {}

    def visible(self, columns: int, dtype: torch.dtype | None) -> torch.Tensor:
        """``(R, 1, C, columns)`` over ``n_groups`` prompts side by side: a query sees the columns
        of its own example's prompt (boolean, or additive in ``dtype``); a padding query sees
        none (it sees itself)."""
        key = (columns, dtype)
        if key not in self._visible:
            column_group = torch.arange(columns, device=self.groups.device) // (columns // self.n_groups)
            allowed = (self.groups[:, :, None] == column_group)[:, None]
            if dtype is not None:
                allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
            self._visible[key] = allowed
        return self._visible[key]


def lower_right_causal(q_len: int, kv_len: int, m: int, device: torch.device) -> torch.Tensor:
    """``(1, 1, q_len, m + kv_len)`` boolean: query ``i`` sees the ``m`` prefix columns and the real
    keys up to its own position, the causal pattern aligned to the bottom-right corner
    (``torch.nn.attention.bias.causal_lower_right``) materialised once for kernels that need a tensor."""
    return torch.ones(q_len, m + kv_len, dtype=torch.bool, device=device).tril(m + kv_len - q_len)[None, None]


def _extend_mask(injector: "PrefixInjector", mask, module, query, kv_len: int, m: int, explicit_causal):
    """Prepend ``m`` prefix columns to the attention mask: visible from every query, or in a
    packed mixed-task call (``injector.segments``) only from the queries of each column's own
    prompt. Built once per call for each mask transformers passes (every layer gets the same)."""
    q_len = query.shape[2]
    segments = injector.segments
    if segments is not None:
        if mask is None or mask.dim() != 4:
            raise IncompatibleModelError("a packed call with several prompts needs its 4D block mask.")

        def with_prompt_columns():
            visible = segments.visible(m, None if mask.dtype == torch.bool else mask.dtype)
            return torch.cat([visible.to(mask.device), mask[..., :kv_len]], dim=-1)

        return injector.shared_mask(("segments", m, kv_len), mask, with_prompt_columns)
    if mask is None:
        causal = explicit_causal if explicit_causal is not None else getattr(module, "is_causal", False)
        if not causal or q_len == 1:
            return None  # every real key is visible, and so is the prefix
        return injector.shared_mask(("lower-right", q_len, kv_len, m, query.device), None,
                                    lambda: lower_right_causal(q_len, kv_len, m, query.device))
    if mask.dim() != 4:
        raise IncompatibleModelError(
            f"expected a 4D attention mask in the attention call, got shape {tuple(mask.shape)}; load the "
            "model with attn_implementation='sdpa' or 'eager'."
        )

    def with_prefix_columns():
        cut = mask[..., :kv_len]
        shape = (*cut.shape[:-1], m)
        if cut.dtype == torch.bool:
            visible = torch.ones(shape, dtype=torch.bool, device=cut.device)
        else:
            visible = torch.zeros(shape, dtype=cut.dtype, device=cut.device)
        return torch.cat([visible, cut], dim=-1)

    return injector.shared_mask(("prefix", m, kv_len), mask, with_prefix_columns)


def _unpadded_causal_sdpa(module, query, key, value, m: int, injector: "PrefixInjector", dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    """SDPA over ``m`` prefix columns and causal real keys with no mask tensor per layer.

    On CUDA the pattern is ``causal_lower_right`` (torch dispatches it to its flash or
    memory-efficient kernel; they take no grouped K/V there, so K/V heads are repeated); elsewhere
    one boolean mask per call, shared by every layer, with grouped K/V passed as they are
    (``enable_gqa``). Returns ``(B, q_len, heads, d)`` as transformers' sdpa function does."""
    import torch.nn.functional as F

    q_len, kv_len = query.shape[2], key.shape[2] - m
    if query.device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right

        if query.shape[1] != key.shape[1]:
            repeat = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
        bias, gqa = causal_lower_right(q_len, m + kv_len), False
    else:
        bias = injector.shared_mask(("lower-right", q_len, kv_len, m, query.device), None,
                                    lambda: lower_right_causal(q_len, kv_len, m, query.device))
        gqa = query.shape[1] != key.shape[1]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling,
                                         **({"enable_gqa": True} if gqa else {}))
    return out.transpose(1, 2).contiguous(), None


def _flex_prefix_mask(injector: "PrefixInjector", mask, module, query, kv_len: int, m: int, explicit_causal):
    """The block mask of a flex_attention call with ``m`` prefix columns in front: the model's own
    ``mask_mod`` (causal, padding, packing, window) shifted past them, and the prefix columns
    visible from every query (in a packed mixed-task call, from the queries of its own prompt).
    Built once per call and shared by every layer. ``None`` when every key is visible anyway."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    q_len = query.shape[2]
    if isinstance(mask, BlockMask):
        inner, batch = mask.mask_mod, mask.shape[0]
    elif mask is None:
        causal = explicit_causal if explicit_causal is not None else getattr(module, "is_causal", False)
        if not causal or q_len == 1:
            return None
        offset = kv_len - q_len  # bottom-right alignment, as the cache's positions are

        def inner(b, h, q, kv):
            return kv <= q + offset

        batch = 1
    else:
        raise IncompatibleModelError(
            f"flex_attention received a {type(mask).__name__} mask of shape {tuple(mask.shape)}; prefix methods on "
            "flex_attention need transformers' block mask. Pass a 2D attention_mask, or use attn_implementation='sdpa'."
        )
    segments = injector.segments
    if segments is not None:
        groups, width = segments.groups, m // segments.n_groups

        def prompt(b, q, kv):
            return groups[b, q] == kv // width
    else:
        def prompt(b, q, kv):
            return kv >= 0  # every query sees every prefix column

    def mask_mod(b, h, q, kv):
        real = inner(b, h, q, (kv - m).clamp(min=0))
        return torch.where(kv < m, prompt(b, q, kv), real)

    return injector.shared_mask(
        ("flex", m, kv_len, q_len), mask,
        lambda: create_block_mask(mask_mod, batch, None, q_len, m + kv_len, device=query.device,
                                  _compile=query.device.type == "cuda"))


def _flash_prefix_mask(mask, m: int) -> torch.Tensor | None:
    """flash_attention_2's ``(B, kv_len)`` padding mask with ``m`` visible prefix columns in front;
    ``None`` stays ``None``: flash aligns the causal pattern to the bottom-right corner, so with
    more keys than queries every query already sees the whole prefix."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise IncompatibleModelError(
            f"flash_attention_2 received a mask of shape {tuple(mask.shape)}; prefix methods on it need the 2D padding "
            "mask transformers builds for flash (a packed call passes cu_seq_lens instead). Use attn_implementation='sdpa'."
        )
    return torch.cat([mask.new_ones((mask.shape[0], m)), mask], dim=-1)


def _check_flash_prefix(site, sliding_window: int | None, key_len: int) -> None:
    """Refuse what flash_attention_2 would compute wrongly with a prefix: a sliding window that
    applies (transformers slides only when the keys outnumber it, and the window would count the
    prefix columns, so later queries would lose the prefix), and kernels that align causal
    attention to the top-left corner (every query would lose the prefix's last columns)."""
    from transformers.integrations import flash_attention

    if sliding_window is not None and key_len > sliding_window:
        raise IncompatibleModelError(
            f"{site[0]} layer {site[1]} slides a window of {sliding_window} over {key_len} keys on flash_attention_2, "
            "whose window counts the prefix columns too (later queries would lose the prefix); load the model with "
            "attn_implementation='sdpa'."
        )
    if getattr(flash_attention, "_use_top_left_mask", False):
        raise IncompatibleModelError(
            "this flash_attention_2 kernel aligns causal attention to the top-left corner, so queries would not see "
            "the whole prefix; load the model with attn_implementation='sdpa'."
        )


def varlen_kwargs_from_lengths(lengths: torch.Tensor) -> dict:
    """transformers' variable-length kwargs (``cu_seq_lens_q/k`` in int32, ``max_length_q/k`` as
    ints, what flash-attn's varlen kernel takes) for consecutive examples of ``lengths`` tokens."""
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    longest = int(lengths.max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _varlen_from_positions(position_ids) -> dict:
    """transformers' variable-length kwargs of one row whose position ids restart at every example
    (each example starts at the row's smallest position id, as transformers reads them); none when
    the row is one example."""
    if position_ids is None or position_ids.shape[-1] < 2:
        return {}
    positions = position_ids.reshape(-1)
    if bool((positions == torch.arange(positions.numel(), device=positions.device) + positions.min()).all()):
        return {}
    starts = (positions == positions.min()).nonzero().view(-1)
    return varlen_kwargs_from_lengths(torch.cat([starts, starts.new_tensor([positions.numel()])]).diff())


def _flash_varlen_prefix(key, value, prefix_k, prefix_v, kwargs: dict):
    """Keys and values of a packed one-row flash call with the prefix in front of every example:
    example ``i``'s keys move ``m·(i+1)`` columns right and its prefix fills the ``m`` before
    them; ``kwargs``' key boundaries (``cu_seq_lens_k``, ``max_length_k``) are updated to match.
    flash aligns each example's causal pattern to its bottom-right corner, so every query sees
    its whole prefix and its own earlier tokens."""
    if prefix_k.shape[0] != 1:
        raise IncompatibleModelError("a packed flash_attention_2 call takes one prompt for all examples; pass no "
                                     "task_ids, or turn packing off (model.packing = False).")
    cu = kwargs["cu_seq_lens_k"]
    n, m, total = cu.numel() - 1, prefix_k.shape[2], key.shape[2]
    example = torch.repeat_interleave(torch.arange(n, device=cu.device), cu.diff().long(), output_size=total)
    real = torch.arange(total, device=cu.device) + m * (example + 1)
    prompt = ((cu[:-1].long() + m * torch.arange(n, device=cu.device))[:, None]
              + torch.arange(m, device=cu.device)).flatten()
    out = []
    for tensor, prefix in ((key, prefix_k), (value, prefix_v)):
        joined = tensor.new_empty((1, tensor.shape[1], total + n * m, tensor.shape[-1]))
        joined[:, :, real] = tensor
        joined[:, :, prompt] = prefix.to(tensor.dtype).repeat(1, 1, n, 1)
        out.append(joined)
    kwargs["cu_seq_lens_k"] = cu + m * torch.arange(n + 1, device=cu.device, dtype=cu.dtype)
    kwargs["max_length_k"] = kwargs["max_length_k"] + m
    return out[0], out[1]


@contextlib.contextmanager
def _base_config(module: nn.Module, base) -> Iterator[None]:
    """The module's own config meanwhile (flash_attention_2 reads the implementation's name from it)."""
    view = module.__dict__["config"]
    module.__dict__["config"] = base
    try:
        yield
    finally:
        module.__dict__["config"] = view


def prefix_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """Attention with the layer's prefix prepended to keys and values. Shapes ``(B, heads, len, d)``."""
    base = object.__getattribute__(module.config, "_pstar_base")
    implementation = getattr(base, "_attn_implementation", None)
    function = _base_function(module, implementation)
    if implementation == "flash_attention_2":  # it reads the implementation's name from module.config
        with _base_config(module, base):
            return _prefix_attention(module, implementation, function, query, key, value, attention_mask, **kwargs)
    return _prefix_attention(module, implementation, function, query, key, value, attention_mask, **kwargs)


def _prefix_attention(module, implementation: str | None, function, query, key, value, attention_mask, **kwargs):
    injector: PrefixInjector | None = module.__dict__.get("_pstar_injector")
    site = module.__dict__.get("_pstar_site")
    if injector is not None and injector.probing is not None:
        injector.probing.setdefault(module, (tuple(key.shape), tuple(value.shape)))
        return function(module, query, key, value, attention_mask, **kwargs)
    if injector is not None and injector.capturing is not None:
        injector.capturing.setdefault(site, (key.detach(), value.detach()))
        return function(module, query, key, value, attention_mask, **kwargs)
    pair = injector.prefix_for(*site, batch=query.shape[0]) if injector is not None else None
    if pair is None:
        return function(module, query, key, value, attention_mask, **kwargs)
    prefix_k, prefix_v = pair
    if prefix_k.shape[1] != key.shape[1] or prefix_k.shape[-1] != key.shape[-1] or prefix_v.shape[-1] != value.shape[-1]:
        raise IncompatibleModelError(
            f"prefix for {site[0]} layer {site[1]} has {prefix_k.shape[1]} key/value heads of size "
            f"{prefix_k.shape[-1]}/{prefix_v.shape[-1]}, but the model's keys/values have {key.shape[1]} of size "
            f"{key.shape[-1]}/{value.shape[-1]}; the adapter was made for a different model geometry."
        )
    m, kv_len = prefix_k.shape[2], key.shape[2]
    flash = implementation == "flash_attention_2"
    bias = kwargs.get("position_bias")
    if bias is not None:  # T5: relative position bias has no entry for the prefix
        bias = bias[..., :kv_len]
        kwargs["position_bias"] = torch.cat([bias.new_zeros((*bias.shape[:-1], m)), bias], dim=-1)
    if flash:
        _check_flash_prefix(site, kwargs.get("sliding_window"), m + kv_len)
        if kwargs.get("cu_seq_lens_k") is None and attention_mask is None and query.shape[0] == 1:
            # a packed row described by position ids alone (DataCollatorWithFlattening): transformers
            # would cut keys and queries at the same places, but the keys are m longer
            kwargs.update(_varlen_from_positions(kwargs.get("position_ids")))
        if kwargs.get("cu_seq_lens_k") is not None:  # one packed row (core.packing.varlen_kwargs)
            return function(module, query, *_flash_varlen_prefix(key, value, prefix_k, prefix_v, kwargs),
                            attention_mask, **kwargs)
    key = torch.cat([prefix_k.to(key.dtype), key], dim=2)
    value = torch.cat([prefix_v.to(value.dtype), value], dim=2)
    causal = kwargs.get("is_causal")
    causal = causal if causal is not None else getattr(module, "is_causal", False)
    if (attention_mask is None and causal and query.shape[2] > 1 and injector.segments is None
            and implementation == "sdpa" and bias is None
            and kwargs.get("softcap") is None and not kwargs.get("output_attentions")):
        # an unpadded causal batch: no mask from transformers, and none built per layer here
        # (transformers' sdpa function would drop keys past the query length when given is_causal)
        call = {k: v for k, v in kwargs.items() if k in ("dropout", "scaling")}
        return _unpadded_causal_sdpa(module, query, key, value, m, injector, **call)
    if flash:
        return function(module, query, key, value, _flash_prefix_mask(attention_mask, m), **kwargs)
    if implementation == "flex_attention" and not isinstance(attention_mask, torch.Tensor):
        attention_mask = _flex_prefix_mask(injector, attention_mask, module, query, kv_len, m, kwargs.get("is_causal"))
        return function(module, query, key, value, attention_mask, **kwargs)
    attention_mask = _extend_mask(injector, attention_mask, module, query, kv_len, m, kwargs.get("is_causal"))
    return function(module, query, key, value, attention_mask, **kwargs)


def register_attention_function() -> None:
    """Register :func:`prefix_attention_forward` under :data:`ATTN_IMPLEMENTATION` with
    transformers (once; on the first injector, not at import: importing the library changes
    nothing in transformers)."""
    if ATTN_IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
