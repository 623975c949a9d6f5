"""Untrusted files: adapters are safetensors + JSON, never pickle."""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pstar_plugins"


def test_library_code_never_unpickles():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*import pickle|^\s*from pickle|pickle\.loads?\(", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_adapter_files_are_safetensors_and_json(tmp_path):
    from pstar_plugins import build_model
    from pstar_plugins.testing import tiny_model

    build_model(tiny_model("llama"), "prompt-tuning", init="random").save_adapter(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["adapter.safetensors", "adapter_config.json"]
    assert (tmp_path / "adapter.safetensors").read_bytes()[8:9] == b"{"  # safetensors: 8-byte length + JSON header
