"""Tiny random Hugging Face models of many architectures, for a conformance matrix.

Every method must behave the same way on every family it claims to support; the quickest way
to find out is to run each check against a model of each family that is random, built from the
family's own config class (nothing is downloaded) and small enough that a forward pass on a
``(4, 16)`` batch takes milliseconds.

``ARCHITECTURES`` names the families (the keys are the transformers ``model_type`` strings),
``KIND`` says whether each is a ``"causal-lm"`` (decoder-only), ``"masked-lm"`` (encoder-only) or
``"seq2seq-lm"`` (encoder-decoder) model, ``tiny_config(arch)`` returns the Auto class and the
config, and ``tiny_model(arch)`` builds the model in eval mode.

Conventions shared by every config (where the family lets them be set):

* ``vocab_size=96``; tokens 0, 1, 2 are special: pad 0, bos 1, eos 2. Families whose code ties
  meaning to other ids keep their own conventions, inside the 96-token vocabulary:

  - RoBERTa, XLM-RoBERTa: pad 1, bos 0, eos 2 (position ids start after ``padding_idx``, so
    ``max_position_embeddings`` is 130 = 128 + ``pad_token_id + 1``);
  - Bart: pad 1, bos 0, eos 2, ``decoder_start_token_id`` 2;
  - T5, mT5: pad 0, eos 1, ``decoder_start_token_id`` 0 (no bos);
  - Pegasus: pad 0, eos 1, ``decoder_start_token_id`` 0 (no bos);
  - Marian: pad 95 (the last id, as Marian checkpoints put pad at ``vocab_size - 1``), eos 0,
    ``decoder_start_token_id`` 95 (no bos);
  - ModernBERT: pad 0, bos/cls 1, eos/sep 2.

* hidden size 32, 4 query heads of ``head_dim`` 8, intermediate (feed-forward) size 64,
  ``max_position_embeddings`` 128, 2 layers. Families that alternate layer kinds get 3 layers
  and a pattern in which both kinds appear: Gemma 3 (sliding, sliding, full), ModernBERT (full,
  local, local), SmolLM3 (RoPE, RoPE, no RoPE). Gemma 2 alternates with 2 layers already.
* Grouped-query attention: 2 key/value heads wherever the family has ``num_key_value_heads``;
  GPT-BigCode is multi-query (1 key/value head); Falcon uses ``multi_query=True`` with the
  classic (Falcon-7B) decoder, i.e. 1 key/value head.
* Mixture of experts (Mixtral, Qwen3-MoE, DeepSeek-V3): 4 experts, top-2, small experts.
  DeepSeek-V3 has a dense first layer and an MoE second layer (``first_k_dense_replace=1``), 1
  shared expert, 2 expert groups of which 1 is kept, and multi-head latent attention with
  small ranks and a query/key head size (8 + 4 = 12) that differs from the value head size (8),
  as in the real model.
* Sliding windows are 4 tokens wherever the family has a window (Mistral, Mixtral, Phi-3,
  Starcoder2, Gemma 2, Gemma 3, ModernBERT's half-window ``local_attention // 2``), so the
  window matters on 12- and 16-token inputs. Qwen2, Qwen3, Qwen3-MoE and SmolLM3 keep
  ``use_sliding_window=False`` as their released checkpoints do, so their ``sliding_window`` is
  ``None``. Gemma 2 keeps its attention and final logit soft-capping, Cohere its ``logit_scale``;
  Granite gets non-trivial multipliers (embedding 2, residual 0.5, attention 1/8, logits divided
  by 4) so that code bypassing them is caught.
* Every dropout probability is 0 (all config fields named ``*dropout*``, ``*pdrop*`` and
  ``layerdrop``, and MPT's ``attn_config.attn_pdrop``) and router jitter is 0, so outputs are
  deterministic in train mode too.
* ``tie_word_embeddings`` is left at the family default; ``pad_token_id`` is set on every config.
* ELECTRA keeps its factorised embeddings (``embedding_size`` 16 < hidden 32), as its released
  checkpoints do, so the input embedding width differs from the hidden size.

Families without scaled-dot-product attention in transformers fall back to ``"eager"`` when
``"sdpa"`` is asked for; ``ATTN_FALLBACK`` lists them with the reason.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

VOCAB = 96
HIDDEN = 32
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 8
FFN = 64
LAYERS = 2
POSITIONS = 128
WINDOW = 4
PAD, BOS, EOS = 0, 1, 2

ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi",
    "phi3",
    "gpt2",
    "gpt_neox",
    "gptj",
    "gpt_bigcode",
    "falcon",
    "opt",
    "bloom",
    "starcoder2",
    "olmo2",
    "cohere",
    "granite",
    "stablelm",
    "mpt",
    "smollm3",
    "deepseek_v3",
    "bert",
    "roberta",
    "deberta-v2",
    "distilbert",
    "electra",
    "xlm-roberta",
    "modernbert",
    "t5",
    "bart",
    "mt5",
    "pegasus",
    "marian",
)

_ENCODERS = ("bert", "roberta", "deberta-v2", "distilbert", "electra", "xlm-roberta", "modernbert")
_SEQ2SEQ = ("t5", "bart", "mt5", "pegasus", "marian")

KIND: dict[str, str] = {
    arch: "masked-lm" if arch in _ENCODERS else "seq2seq-lm" if arch in _SEQ2SEQ else "causal-lm"
    for arch in ARCHITECTURES
}

#: Requested architectures that transformers 5.24 does not have (none at present).
MISSING: dict[str, str] = {}

#: Families built with ``"eager"`` attention when ``"sdpa"`` is requested, and why.
ATTN_FALLBACK: dict[str, str] = {
    "gemma2": "Gemma2PreTrainedModel does not declare _supports_sdpa (attention logit soft-capping "
    "cannot be expressed through torch's scaled_dot_product_attention)",
    "bloom": "BloomAttention computes attention itself (ALiBi via baddbmm); "
    "BloomPreTrainedModel does not declare _supports_sdpa",
    "mpt": "MptAttention computes attention itself (ALiBi bias added to explicit scores); "
    "MptPreTrainedModel does not declare _supports_sdpa",
    "deberta-v2": "disentangled (content/position) attention is computed explicitly; "
    "DebertaV2PreTrainedModel does not declare _supports_sdpa",
}

_TOKENS = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
# Decoder-only families written in the Llama style (hidden_size / num_attention_heads / ...).
_LLAMA_STYLE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=FFN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=POSITIONS,
    **_TOKENS,
)
# Encoder-only families written in the BERT style.
_BERT_STYLE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=FFN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    max_position_embeddings=POSITIONS,
)
# Encoder-decoder families written in the Bart style.
_BART_STYLE = dict(
    vocab_size=VOCAB,
    d_model=HIDDEN,
    encoder_layers=LAYERS,
    decoder_layers=LAYERS,
    encoder_attention_heads=HEADS,
    decoder_attention_heads=HEADS,
    encoder_ffn_dim=FFN,
    decoder_ffn_dim=FFN,
    max_position_embeddings=POSITIONS,
    forced_eos_token_id=None,
)
_T5_STYLE = dict(
    vocab_size=VOCAB,
    d_model=HIDDEN,
    d_kv=HEAD_DIM,
    d_ff=FFN,
    num_layers=LAYERS,
    num_decoder_layers=LAYERS,
    num_heads=HEADS,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


#: keyword arguments for each architecture's config class (see the module docstring for the choices)
_KWARGS: dict[str, dict[str, Any]] = {
    "llama": dict(_LLAMA_STYLE, head_dim=HEAD_DIM),
    "mistral": dict(_LLAMA_STYLE, head_dim=HEAD_DIM, sliding_window=WINDOW),
    "mixtral": dict(
        _LLAMA_STYLE,
        head_dim=HEAD_DIM,
        intermediate_size=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=WINDOW,
        router_jitter_noise=0.0,
    ),
    "qwen2": dict(_LLAMA_STYLE),
    "qwen3": dict(_LLAMA_STYLE, head_dim=HEAD_DIM),
    "qwen3_moe": dict(
        _LLAMA_STYLE,
        head_dim=HEAD_DIM,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        decoder_sparse_step=1,
    ),
    "gemma": dict(_LLAMA_STYLE, head_dim=HEAD_DIM),
    # query_pre_attn_scalar = head_dim, as in the released Gemma 2/3 checkpoints (256 = head_dim there).
    "gemma2": dict(_LLAMA_STYLE, head_dim=HEAD_DIM, sliding_window=WINDOW, query_pre_attn_scalar=HEAD_DIM),
    "gemma3_text": dict(
        _LLAMA_STYLE,
        head_dim=HEAD_DIM,
        num_hidden_layers=3,
        sliding_window=WINDOW,
        query_pre_attn_scalar=HEAD_DIM,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    ),
    "phi": dict(_LLAMA_STYLE),
    "phi3": dict(_LLAMA_STYLE, sliding_window=WINDOW, original_max_position_embeddings=POSITIONS),
    "gpt2": dict(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=POSITIONS, **_TOKENS
    ),
    "gpt_neox": dict(_BERT_STYLE, **_TOKENS),
    # rotary_dim 4 of head_dim 8: GPT-J rotates part of each head, as GPT-J-6B does (64 of 256).
    "gptj": dict(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=FFN,
        rotary_dim=4,
        n_positions=POSITIONS,
        **_TOKENS,
    ),
    "gpt_bigcode": dict(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=FFN,
        n_positions=POSITIONS,
        multi_query=True,
        **_TOKENS,
    ),
    "falcon": dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        ffn_hidden_size=FFN,
        max_position_embeddings=POSITIONS,
        multi_query=True,
        new_decoder_architecture=False,
        alibi=False,
        **_TOKENS,
    ),
    "opt": dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        word_embed_proj_dim=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        ffn_dim=FFN,
        max_position_embeddings=POSITIONS,
        **_TOKENS,
    ),
    # Bloom has no intermediate size: its MLP is 4 * hidden.
    "bloom": dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, **_TOKENS),
    "starcoder2": dict(_LLAMA_STYLE, sliding_window=WINDOW),
    "olmo2": dict(_LLAMA_STYLE),
    "cohere": dict(_LLAMA_STYLE),
    "granite": dict(
        _LLAMA_STYLE,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=1 / HEAD_DIM,
        logits_scaling=4.0,
    ),
    "stablelm": dict(_LLAMA_STYLE),
    "mpt": dict(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        n_heads=HEADS,
        n_layers=LAYERS,
        expansion_ratio=FFN // HIDDEN,
        max_seq_len=POSITIONS,
        attn_config={"attn_pdrop": 0},
        **_TOKENS,
    ),
    # NoPE on every third layer: with 3 layers, layer 2 has no rotary embedding.
    "smollm3": dict(_LLAMA_STYLE, num_hidden_layers=3, no_rope_layer_interval=3),
    "deepseek_v3": dict(
        _LLAMA_STYLE,
        num_key_value_heads=HEADS,
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
    ),
    "bert": dict(_BERT_STYLE, pad_token_id=PAD),
    "roberta": dict(_BERT_STYLE, max_position_embeddings=POSITIONS + 2, pad_token_id=1, bos_token_id=0, eos_token_id=2),
    # DeBERTa-v3 style: relative (disentangled) attention only, no absolute positions in the input.
    "deberta-v2": dict(
        _BERT_STYLE,
        pad_token_id=PAD,
        relative_attention=True,
        position_biased_input=False,
        pos_att_type=["p2c", "c2p"],
        max_relative_positions=-1,
        position_buckets=16,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
    ),
    "distilbert": dict(
        vocab_size=VOCAB,
        dim=HIDDEN,
        hidden_dim=FFN,
        n_layers=LAYERS,
        n_heads=HEADS,
        max_position_embeddings=POSITIONS,
        pad_token_id=PAD,
    ),
    "electra": dict(_BERT_STYLE, embedding_size=16, pad_token_id=PAD),
    "xlm-roberta": dict(
        _BERT_STYLE, max_position_embeddings=POSITIONS + 2, pad_token_id=1, bos_token_id=0, eos_token_id=2
    ),
    # local_attention is the whole window (+-4 tokens, sliding_window == 4); layer 0 global, 1 and 2 local.
    "modernbert": dict(
        _BERT_STYLE,
        num_hidden_layers=3,
        local_attention=2 * WINDOW,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        cls_token_id=BOS,
        sep_token_id=EOS,
    ),
    "t5": dict(_T5_STYLE),
    "mt5": dict(_T5_STYLE),
    "bart": dict(_BART_STYLE, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2),
    "pegasus": dict(_BART_STYLE, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    "marian": dict(_BART_STYLE, pad_token_id=VOCAB - 1, eos_token_id=0, decoder_start_token_id=VOCAB - 1),
}


def _kwargs(arch: str) -> dict[str, Any]:
    """Keyword arguments for ``arch``'s config class (a copy: callers may change it)."""
    return copy.deepcopy(_KWARGS[arch])


_DROPOUT_WORDS = ("dropout", "pdrop", "layerdrop")


def _zero_dropout(config) -> None:
    """Set every dropout probability of ``config`` (and of nested sub-configs) to 0."""
    for name, value in list(vars(config).items()):
        if (
            any(word in name for word in _DROPOUT_WORDS)
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        ):
            setattr(config, name, type(value)(0))  # keep the field's type (MPT's attn_pdrop is an int)
        elif hasattr(value, "to_dict") and hasattr(value, "__dict__"):  # e.g. MptAttentionConfig
            _zero_dropout(value)


def _check_arch(arch: str) -> None:
    if arch in MISSING:
        raise ValueError(f"tiny architecture {arch!r} is not available: {MISSING[arch]}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")


def tiny_config(arch: str):
    """``(auto_class, config)`` for a tiny random ``arch`` model (conventions: module docstring).

    :param arch: one of ``ARCHITECTURES`` (a transformers ``model_type``).
    :returns: the ``AutoModelFor...`` class matching ``KIND[arch]`` and a config of the
        family's own config class.
    :raises ValueError: for an unknown architecture, naming the known ones.
    """
    _check_arch(arch)
    import transformers as tf

    auto = {
        "causal-lm": tf.AutoModelForCausalLM,
        "masked-lm": tf.AutoModelForMaskedLM,
        "seq2seq-lm": tf.AutoModelForSeq2SeqLM,
    }[KIND[arch]]
    config = tf.AutoConfig.for_model(arch, **_kwargs(arch))
    _zero_dropout(config)
    return auto, config


def tiny_model(arch: str, seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
    """A randomly initialised ``arch`` model in eval mode, built after ``torch.manual_seed(seed)``.

    ``attn_implementation="sdpa"`` becomes ``"eager"`` for the families in ``ATTN_FALLBACK``.
    """
    auto, config = tiny_config(arch)
    if attn_implementation == "sdpa" and arch in ATTN_FALLBACK:
        attn_implementation = "eager"
    torch.manual_seed(seed)
    model = auto.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


_SAVED: dict[tuple[str, int], str] = {}  # (arch, seed) -> folder of this process's saved tiny model


def tiny_quantized_model(arch: str, bits: int, seed: int = 0):
    """:func:`tiny_model`'s weights loaded with bitsandbytes in ``bits`` (4: NF4 computing in fp32;
    8: LLM.int8), the way a user loads a quantized base: transformers quantizes only while
    loading, so the tiny model is saved once per process and loaded from there."""
    import tempfile

    import transformers as tf

    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r}: expected 4 or 8")
    folder = _SAVED.get((arch, seed))
    if folder is None:
        folder = tempfile.mkdtemp(prefix=f"pstar-tiny-{arch}-")
        tiny_model(arch, seed=seed).save_pretrained(folder)
        _SAVED[(arch, seed)] = folder
    config = (
        tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        if bits == 4
        else tf.BitsAndBytesConfig(load_in_8bit=True)
    )
    auto = tiny_config(arch)[0]
    attn = "eager" if arch in ATTN_FALLBACK else "sdpa"
    return auto.from_pretrained(
        folder, quantization_config=config, attn_implementation=attn, device_map={"": "cpu"}
    ).eval()
