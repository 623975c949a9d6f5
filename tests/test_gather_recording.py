"""``mechanisms.distributed.recording_gathers``: what ``gathered`` materialises is recorded inside a
recording block only (the ZeRO-3 runs report it; nothing accumulates outside one)."""

import contextlib
import sys
import types

import torch

from pstar_plugins.mechanisms import distributed


def _partitioned(n: int) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(n)]
    for i, p in enumerate(params):
        p.ds_id = i  # what ZeRO-3 sets on a partitioned parameter
    return params


def test_gathers_are_recorded_inside_a_recording_block_only(monkeypatch):
    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=lambda params, modifier_rank=None: contextlib.nullcontext())
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    a, b = _partitioned(2)
    plain = torch.nn.Parameter(torch.zeros(1))
    with distributed.gathered([a]):  # outside any recording: nothing kept anywhere
        pass
    with distributed.recording_gathers() as outer:
        with distributed.gathered([a, plain]):
            pass
        with distributed.recording_gathers() as inner:
            with distributed.gathered([b]):
                pass
    assert outer == [[id(a)], [id(b)]] and inner == [[id(b)]]
    with distributed.gathered([b]):
        pass
    assert outer == [[id(a)], [id(b)]]
    assert not distributed._GATHERS
