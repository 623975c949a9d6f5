"""Adapter files get the usual file mode, and a hand-edited adapter_config.json is reported."""

import json
import os
import stat

import pytest

from pstar_plugins import build_model, load_adapter
from pstar_plugins.testing import tiny_model


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_adapter_files_get_the_umask_mode_like_any_new_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        build_model(tiny_model("llama"), "prompt-tuning", num_virtual_tokens=2, init="random").save_adapter(
            tmp_path / "a"
        )
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in ("adapter.safetensors", "adapter_config.json"):
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == expected, name


def test_an_edited_adapter_config_json_is_reported_and_the_embedded_one_used(tmp_path):
    build_model(tiny_model("llama"), "prompt-tuning", num_virtual_tokens=2, init="random").save_adapter(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta["method_config"]["num_virtual_tokens"] = 7
    path.write_text(json.dumps(meta))
    with pytest.warns(
        UserWarning,
        match=r"adapter_config.json differs in \['method_config'\] from the config stored inside "
        r"adapter.safetensors, which is the one used; edits to adapter_config.json have no effect",
    ):
        model = load_adapter(tiny_model("llama"), tmp_path / "a")
    assert model.method_config.num_virtual_tokens == 2
