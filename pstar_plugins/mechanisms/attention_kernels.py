"""The attention function a prefix method registers (``"pstar_prefix"``) and the kernels it hands
each call to: the prefix's keys and values go in front of the layer's, the mask gains ``m``
always-visible columns in the shape each kernel takes (a mask tensor for sdpa and eager, a block
mask for flex_attention, a longer 2D padding mask or variable-length rows for
flash_attention_2), and the call goes on to the implementation the model was loaded with. Why
the function sits behind transformers' attention-function registry: :mod:`pstar_plugins.mechanisms.attention`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from pstar_plugins.contract.errors import IncompatibleModelError

if TYPE_CHECKING:  # the injector hands itself to these functions through the module it routes
    from pstar_plugins.mechanisms.attention import PrefixInjector

ATTN_IMPLEMENTATION = "pstar_prefix"
#: kernels a prefix runs on, each checked by a suite: sdpa and eager (the conformance matrix),
#: flex_attention (evaluation equal to sdpa on the CPU, tests/test_flex_attention.py)
_SUPPORTED_BASES = ("sdpa", "eager", "flex_attention", None)
#: kernels whose prefix path is written and tested on the CPU against an emulation of the kernel,
#: but has not yet passed bench/gpu_check.sh on a GPU: refused unless named in this variable (the
#: check sets it). Once the check's cells pass on a GPU, the kernel moves to _SUPPORTED_BASES, and
#: mechanisms.fast_paths.kernel_reason allows its packing without the variable.
UNVERIFIED_KERNELS_ENV = "PSTAR_UNVERIFIED_KERNELS"
_UNVERIFIED_BASES = ("flash_attention_2",)


def opted_in(kernel: str) -> bool:
    """Whether ``PSTAR_UNVERIFIED_KERNELS`` (comma-separated) names ``kernel``."""
    return kernel in os.environ.get(UNVERIFIED_KERNELS_ENV, "").split(",")


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
                allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                    ~allowed, torch.finfo(dtype).min
                )
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
        return injector.shared_mask(
            ("lower-right", q_len, kv_len, m, query.device),
            None,
            lambda: lower_right_causal(q_len, kv_len, m, query.device),
        )
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


def _unpadded_causal_sdpa(
    module,
    query,
    key,
    value,
    m: int,
    injector: "PrefixInjector",
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
):
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
        bias = injector.shared_mask(
            ("lower-right", q_len, kv_len, m, query.device),
            None,
            lambda: lower_right_causal(q_len, kv_len, m, query.device),
        )
        gqa = query.shape[1] != key.shape[1]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling, **({"enable_gqa": True} if gqa else {})
    )
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
        ("flex", m, kv_len, q_len),
        mask,
        lambda: create_block_mask(
            mask_mod, batch, None, q_len, m + kv_len, device=query.device, _compile=query.device.type == "cuda"
        ),
    )


def _flash_prefix_mask(mask, m: int) -> torch.Tensor | None:
    """flash_attention_2's ``(B, kv_len)`` padding mask with ``m`` visible prefix columns in front;
    ``None`` stays ``None``: flash aligns the causal pattern to the bottom-right corner, so with
    more keys than queries every query already sees the whole prefix."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise IncompatibleModelError(
            f"flash_attention_2 received a mask of shape {tuple(mask.shape)}; prefix methods on it need the 2D padding "
            "mask transformers builds for flash (a packed call passes cu_seq_lens instead). Use "
            "attn_implementation='sdpa'."
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
        raise IncompatibleModelError(
            "a packed flash_attention_2 call takes one prompt for all examples; pass no "
            "task_ids, or turn packing off (model.packing = False)."
        )
    cu = kwargs["cu_seq_lens_k"]
    n, m, total = cu.numel() - 1, prefix_k.shape[2], key.shape[2]
    example = torch.repeat_interleave(torch.arange(n, device=cu.device), cu.diff().long(), output_size=total)
    real = torch.arange(total, device=cu.device) + m * (example + 1)
    prompt = (
        (cu[:-1].long() + m * torch.arange(n, device=cu.device))[:, None] + torch.arange(m, device=cu.device)
    ).flatten()
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
    if (
        prefix_k.shape[1] != key.shape[1]
        or prefix_k.shape[-1] != key.shape[-1]
        or prefix_v.shape[-1] != value.shape[-1]
    ):
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
        if kwargs.get("cu_seq_lens_k") is not None:  # one packed row (mechanisms.pack_plan.varlen_kwargs)
            return function(
                module, query, *_flash_varlen_prefix(key, value, prefix_k, prefix_v, kwargs), attention_mask, **kwargs
            )
    key = torch.cat([prefix_k.to(key.dtype), key], dim=2)
    value = torch.cat([prefix_v.to(value.dtype), value], dim=2)
    causal = kwargs.get("is_causal")
    causal = causal if causal is not None else getattr(module, "is_causal", False)
    if (
        attention_mask is None
        and causal
        and query.shape[2] > 1
        and injector.segments is None
        and implementation == "sdpa"
        and bias is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions")
    ):
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
