import os

os.environ.setdefault("PSTAR_DISABLE_PLUGIN_AUTOLOAD", "1")  # tests see built-ins unless they opt in
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
