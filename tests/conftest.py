import os

os.environ.setdefault("PSTAR_DISABLE_PLUGIN_AUTOLOAD", "1")  # tests see built-ins unless they opt in
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with the offline SmolLM2 tokenizer, saved as a model folder."""
    from pstar_plugins.testing import save_tiny_pretrained

    return save_tiny_pretrained(tmp_path_factory.mktemp("tiny-llama"))


pytest_plugins = ["pytester"]  # plugin authors' fixtures are tested inside a pytest run of their own
