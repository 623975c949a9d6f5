"""--report-to in pstar_plugins.train: TensorBoard event files read back hold the logged scalars
and the run's configuration; bad values fail before anything loads."""

import importlib.util
import json
from pathlib import Path

import pytest

from pstar_plugins.train import main
from tests.test_train_entry_point import needs_model

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard is installed by scripts/setup.sh ([tracking])",
)


def run(tiny_dir, out, *extra):
    return main(
        [
            "--method",
            "prompt-tuning",
            "--num-virtual-tokens",
            "4",
            "--model",
            str(tiny_dir),
            "--output-dir",
            str(out),
            "--max-steps",
            "4",
            "--warmup-steps",
            "2",
            "--batch-size",
            "4",
            "--max-train-samples",
            "16",
            "--max-eval-samples",
            "8",
            "--eval-steps",
            "2",
            "--eval-subset-size",
            "8",
            "--plot",
            "",
            *extra,
        ]
    )


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        acc = event_accumulator.EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


@needs_model
def test_tensorboard_event_files_hold_loss_learning_rate_metrics_and_config(tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert run(tiny_dir, out, "--report-to", "tensorboard", "--learning-rate", "0.01") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    logged = scalars(out / "pstar-plugins")
    loss = logged["train/loss"]
    assert [s for s, _ in loss] == [1, 2, 3, 4]
    assert [v for _, v in loss] == pytest.approx(history["loss"], rel=1e-6)
    # the rate after each step's scheduler update (transformers' linear schedule): warm-up over 2
    # steps to 0.01, then linear decay to 0 at step 4
    assert [v for _, v in logged["train/learning_rate"]] == pytest.approx([0.005, 0.01, 0.005, 0.0], abs=1e-9)
    assert logged["eval/accuracy"] == [
        (2, pytest.approx(history["accuracy"][0])),
        (4, pytest.approx(metrics["tuned_accuracy"])),
    ]
    assert logged["eval/zero_shot_accuracy"] == [(0, pytest.approx(metrics["zero_shot_accuracy"]))]
    # the configuration: flags and resolved method options, as TensorBoard hparams and a YAML copy
    hparams = next((out / "pstar-plugins").rglob("hparams.yml")).read_text()
    for line in ("method: prompt-tuning", "method.num_virtual_tokens: 4", "learning_rate: 0.01", "max_steps: 4"):
        assert line in hparams.splitlines(), line


@needs_model
def test_no_tracker_by_default(tiny_dir, tmp_path):
    assert run(tiny_dir, tmp_path / "run", "--max-steps", "1", "--warmup-steps", "1", "--no-zero-shot") == 0
    assert not list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert not (tmp_path / "run" / "pstar-plugins").exists()


@pytest.mark.parametrize(
    "value, message",
    [
        (["none", "tensorboard"], "'none' cannot be combined with trackers"),
        (["aim"], "--report-to aim: the tracker's package is not installed; pip install aim"),
    ],
)
def test_bad_report_to_fails_before_anything_loads(tmp_path, capsys, value, message):
    if value == ["aim"] and importlib.util.find_spec("aim") is not None:
        pytest.skip("aim is installed here")
    assert (
        main(
            [
                "--method",
                "prompt-tuning",
                "--model",
                str(tmp_path / "no-such-model"),
                "--output-dir",
                str(tmp_path / "out"),
                "--report-to",
                *value,
            ]
        )
        == 2
    )
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_tracker_is_refused_by_the_parser(tmp_path, capsys):
    assert main(["--method", "prompt-tuning", "--output-dir", str(tmp_path / "out"), "--report-to", "tensorbord"]) == 2
    assert "invalid choice: 'tensorbord'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
