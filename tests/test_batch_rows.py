"""Each rank's rows of a training step (``train.loop._next_rows``) and the refusal of a training split
smaller than one step (``train.checks.check_batch_fits``)."""

import random
from types import SimpleNamespace

import pytest

from pstar_plugins import train
from pstar_plugins.contract.errors import ConfigError
from pstar_plugins.train import checks, cli, loop
from pstar_plugins.train import data as train_data
from pstar_plugins.train.tasks import Split


def _runs(rows: int, batch_size: int, world: int, seed: int = 0):
    split = Split([{"sentence": str(i)} for i in range(rows)], list(range(rows)), "test")
    return [
        SimpleNamespace(
            args=SimpleNamespace(batch_size=batch_size),
            accelerator=SimpleNamespace(num_processes=world, process_index=rank),
            plan=SimpleNamespace(train=split),
            order=[],
            rng=random.Random(seed),
        )
        for rank in range(world)
    ]


def test_ranks_split_each_epoch_without_overlap():
    runs = _runs(rows=12, batch_size=3, world=2, seed=5)
    first, second = ([loop._next_rows(run)[1] for run in runs] for _ in range(2))
    epoch = first[0] + first[1] + second[0] + second[1]
    assert sorted(epoch) == list(range(12))  # one epoch: every row once, on one rank
    assert [len(share) for share in first + second] == [3, 3, 3, 3]


def test_a_training_split_smaller_than_one_step_is_refused_with_the_batch_that_fits():
    checks.check_batch_fits(32, 16, 2)  # exactly one step
    with pytest.raises(
        ConfigError,
        match=r"has 31 rows, fewer than the 32 one step takes \(--batch-size 16 on each of 2 "
        r"processes\); pass --batch-size 15 or fewer",
    ):
        checks.check_batch_fits(31, 16, 2)
    with pytest.raises(
        ConfigError,
        match=r"has 10 rows, fewer than the 16 one step takes \(--batch-size 16\); pass "
        r"--batch-size 10 or fewer",
    ):
        checks.check_batch_fits(10, 16, 1)
    for batch_size in (1, 4):  # fewer rows than processes: the fix needs both flags
        with pytest.raises(ConfigError, match="launch at most 3 processes with --batch-size 1"):
            checks.check_batch_fits(3, batch_size, 4)
    checks.check_batch_fits(3, 1, 3)


def test_the_refusal_names_the_flags_that_left_the_split_short():
    args = SimpleNamespace(max_train_samples=20, validation_split_percentage=50)
    limits = checks.data_limits(args, rows_read=20, available=100, needed=16)
    with pytest.raises(
        ConfigError,
        match=r"has 10 rows \(what --max-train-samples 20 and --validation-split-percentage 50 "
        r"left\), fewer than the 16 .*or train on more rows \(a larger --max-train-samples "
        r"or a smaller --validation-split-percentage\)\.",
    ):
        checks.check_batch_fits(10, 16, 1, limits)
    # a file of exactly --max-train-samples rows: the flag cut nothing and is not named
    assert checks.data_limits(args, rows_read=20, available=20, needed=16) == (
        ("--validation-split-percentage 50", "a smaller --validation-split-percentage"),
    )


def test_the_refusal_offers_only_changes_that_can_fill_a_step():
    pct = SimpleNamespace(max_train_samples=None, validation_split_percentage=10)
    # 12 rows in all, 11 left to train on: no smaller percentage makes the 16 of one step
    limits = checks.data_limits(pct, 12, 12, 16)
    assert limits == (("--validation-split-percentage 10", None),)
    with pytest.raises(
        ConfigError,
        match=r"has 11 rows \(what --validation-split-percentage 10 left\), fewer than the 16 "
        r".*or train on more rows\.$",
    ):
        checks.check_batch_fits(11, 16, 1, limits)
    # 16 rows: every percentage holds out a row, so 15 at most train
    assert checks.data_limits(pct, 16, 16, 16) == (("--validation-split-percentage 10", None),)
    assert checks.data_limits(pct, 17, 17, 16) == (
        ("--validation-split-percentage 10", "a smaller --validation-split-percentage"),
    )
    # --max-train-samples 10 of a 12-row file: a larger value cannot make 16 rows either
    cut = SimpleNamespace(max_train_samples=10, validation_split_percentage=None)
    assert checks.data_limits(cut, 10, 12, 16) == (("--max-train-samples 10", None),)
    assert checks.data_limits(cut, 10, 40, 16) == (("--max-train-samples 10", "a larger --max-train-samples"),)
    assert checks.data_limits(cut, 10, None, 16) == (
        ("--max-train-samples 10", "a larger --max-train-samples"),
    )  # unknown


def _rows_file(tmp_path, rows: int, tail: str = "") -> str:
    data = tmp_path / f"rows{rows}.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"line {i}\t{i % 2}\n" for i in range(rows)) + tail)
    return str(data)


def _refusal(tmp_path, capsys, rows: int, *flags) -> str:
    data = _rows_file(tmp_path, rows)
    code = train.main(
        [
            "--method",
            "prompt-tuning",
            "--train-file",
            data,
            "--validation-file",
            data,
            "--output-dir",
            str(tmp_path / "out"),
            *flags,
        ]
    )
    assert code == 2
    return capsys.readouterr().err


def test_the_cli_names_max_train_samples_only_when_it_cut_rows(tmp_path, capsys):
    err = _refusal(tmp_path, capsys, 40, "--max-train-samples", "10", "--batch-size", "16")
    assert "(what --max-train-samples 10 left)" in err and "(a larger --max-train-samples)" in err
    err = _refusal(tmp_path, capsys, 12, "--max-train-samples", "10", "--batch-size", "16")
    assert "(what --max-train-samples 10 left)" in err and "a larger" not in err  # 12 rows cannot make 16
    err = _refusal(tmp_path, capsys, 10, "--max-train-samples", "10", "--batch-size", "16")
    assert "has 10 rows, fewer than the 16" in err and "--max-train-samples" not in err.split("fewer")[1]


def test_a_bad_row_past_max_train_samples_is_never_read(tmp_path):
    data = _rows_file(tmp_path, 20, tail="broken row\n")
    good = _rows_file(tmp_path, 8)
    args = cli.parse_args(
        [
            "--method",
            "prompt-tuning",
            "--train-file",
            data,
            "--validation-file",
            good,
            "--max-train-samples",
            "20",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert len(train_data.read_data(args)[0]) == 20


def test_the_batch_refusal_comes_before_the_schedule_that_counts_its_steps(tmp_path, capsys):
    # 10 rows cannot make a step of 16; the warm-up of 5 steps past one epoch's 1 step is the lesser fault
    err = _refusal(tmp_path, capsys, 10, "--num-train-epochs", "1", "--warmup-steps", "5", "--batch-size", "16")
    assert "the training split has 10 rows" in err and "--warmup-steps" not in err
