"""Classification evaluation under several processes: each rank scores its share of the batches
one process would score, every rank calls the model equally often (a ZeRO-3 forward is a
collective), and the counts added over the ranks give one process's accuracy."""

import argparse

import pytest
import torch

from pstar_plugins.mechanisms import distributed
from pstar_plugins.train.tasks import ClassificationTask, Split


@pytest.mark.parametrize("items, world", [(7, 2), (6, 3), (1, 4), (0, 2), (5, 1)])
def test_every_item_goes_to_one_rank_and_every_rank_gets_as_many_entries(monkeypatch, items, world):
    shares = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank_and_world", lambda rank=rank: (rank, world))
        shares.append(distributed.share_of_this_rank(list(range(items))))
    assert len({len(share) for share in shares}) == 1
    assert sorted(i for share in shares for i in share if i is not None) == list(range(items))


class _Counting(ClassificationTask):
    """Scores row ``i`` as correct when ``i`` is odd, and records the batches it is asked for."""

    def __init__(self, eval_batch_size):
        super().__init__(argparse.Namespace(eval_batch_size=eval_batch_size))
        self.scorer = self.zero_shot_scorer = None
        self.device = torch.device("cpu")
        self.batches = []

    def _classify(self, model, scorer, rows, labels):
        self.batches.append([r["i"] for r in rows])
        scores = torch.tensor([[0.0, 1.0]]).expand(len(rows), 2)  # always class 1
        return scores, torch.tensor([r["i"] % 2 for r in rows])  # which odd rows are


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_score_their_batches_once_and_add_up_to_one_process(monkeypatch, world):
    rows = [{"i": i} for i in range(11)]
    split = Split(rows, [0] * len(rows), "test")
    model = torch.nn.Linear(1, 1)
    per_rank, counts = [], []
    # the sum over the ranks is 5 (the odd rows among the first 10); evaluate must report it
    monkeypatch.setattr(distributed, "sum_over_ranks", lambda value: counts.append(value) or 5)
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank_and_world", lambda rank=rank: (rank, world))
        task = _Counting(eval_batch_size=3)
        assert task.evaluate(model, split, "eval", limit=10) == 0.5
        per_rank.append(task.batches)
    # one process's batches of 3 over the first 10 rows, each scored by exactly one rank
    one_process = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    scored = [
        b for rank, batches in enumerate(per_rank) for k, b in enumerate(batches) if rank + k * world < len(one_process)
    ]
    assert sorted(scored) == one_process
    padding = [
        b
        for rank, batches in enumerate(per_rank)
        for k, b in enumerate(batches)
        if rank + k * world >= len(one_process)
    ]
    assert all(b == [0] for b in padding)  # one row, dropped
    assert len({len(batches) for batches in per_rank}) == 1  # as many model calls on every rank
    # the padding batches are scored but not counted: the ranks' counts add up to one process's
    assert sum(counts) == 5 and all(c <= 5 for c in counts)
    assert model.training  # back in training mode


def _sum_on_rank(rank, world, port, values, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results[rank] = (distributed.sum_over_ranks(values[rank]), distributed.share_of_this_rank(list(range(5))))
    finally:
        dist.destroy_process_group()


def test_sum_over_ranks_adds_every_ranks_value_in_a_real_process_group():
    import socket

    import torch.multiprocessing as mp

    assert distributed.sum_over_ranks(7) == 7  # no process group: the value itself
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_sum_on_rank, args=(2, port, [3, 4], results), nprocs=2, join=True)
    assert dict(results) == {0: (7, [0, 2, 4]), 1: (7, [1, 3, None])}
