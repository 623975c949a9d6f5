"""Each rank's rows of a training step (``train._next_rows``): a full batch on every rank, the
global batch split between ranks without overlap, epochs drawn from one seeded shuffle."""

import random
from collections import Counter
from types import SimpleNamespace

from pstar_plugins import train
from pstar_plugins.script_tasks import Split


def _runs(rows: int, batch_size: int, world: int, seed: int = 0):
    split = Split([{"sentence": str(i)} for i in range(rows)], list(range(rows)), "test")
    return [SimpleNamespace(args=SimpleNamespace(batch_size=batch_size),
                            accelerator=SimpleNamespace(num_processes=world, process_index=rank),
                            plan=SimpleNamespace(train=split), order=[], rng=random.Random(seed))
            for rank in range(world)]


def _step(runs):
    return [train._next_rows(run)[1] for run in runs]


def test_fewer_rows_than_a_global_batch_still_fill_every_ranks_batch():
    runs = _runs(rows=3, batch_size=4, world=2)
    for _ in range(3):
        shares = _step(runs)
        assert [len(share) for share in shares] == [4, 4]
        # 8 rows from epochs of 3: every row appears two or three times
        assert set(Counter(shares[0] + shares[1]).values()) <= {2, 3}


def test_ranks_split_each_epoch_without_overlap():
    runs = _runs(rows=12, batch_size=3, world=2, seed=5)
    first, second = _step(runs), _step(runs)
    epoch = first[0] + first[1] + second[0] + second[1]
    assert sorted(epoch) == list(range(12))  # one epoch: every row once, on one rank
    assert [len(share) for share in first + second] == [3, 3, 3, 3]
