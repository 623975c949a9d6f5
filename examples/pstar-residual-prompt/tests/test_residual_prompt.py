"""The example's own tests: pstar-plugins' conformance suite on its method (the
``pstar_conformance`` and ``pstar_register`` fixtures come with pstar-plugins)."""

import pytest

from pstar_plugins.testing import tiny_model
from pstar_residual_prompt.plugin import plugin

OPTIONS = {"num_virtual_tokens": 4, "init": "random", "bottleneck_size": 8}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_residual_prompt_passes_the_conformance_suite(arch, pstar_register, pstar_conformance):
    pstar_register(plugin)
    pstar_conformance(lambda: tiny_model(arch), "residual-prompt", OPTIONS)
