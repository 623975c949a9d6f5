"""Data from a `datasets` source (a hub id for users with a hub; here a local dataset folder,
which goes through the same `load_dataset` call) and column renaming."""

import json

import pytest

from pstar_plugins.contract.errors import ConfigError, DataError
from pstar_plugins.tasks.data import load_split, parse_column_mapping, read_dataset
from tests.test_train_entry_point import _train, needs_model


@pytest.fixture()
def dataset_dir(tmp_path):
    folder = tmp_path / "reviews"
    folder.mkdir()
    for split, n in (("train", 12), ("validation", 4)):
        rows = [{"text": f"review number {i}", "y": i % 2} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def test_dataset_splits_load_and_columns_are_renamed(dataset_dir):
    rows = read_dataset(str(dataset_dir), "validation")
    assert rows == [{"text": f"review number {i}", "y": i % 2} for i in range(4)]
    renamed, source = load_split(None, str(dataset_dir), None, "train", 5, {"text": "sentence", "y": "label"})
    assert len(renamed) == 5 and set(renamed[0]) == {"sentence", "label"} and source.endswith("[train]")


def test_dataset_errors_name_the_dataset_split_and_fix(dataset_dir):
    with pytest.raises(DataError, match=r"split 'test' of dataset .*reviews.*--dataset-config"):
        read_dataset(str(dataset_dir), "test")
    with pytest.raises(DataError, match=r"--column txt=\.\.\. names no column"):
        load_split(None, str(dataset_dir), None, "train", None, {"txt": "sentence"})
    with pytest.raises(ConfigError, match="expected DATA_COLUMN=NAME"):
        parse_column_mapping(["sentence"])


@pytest.mark.slow
@needs_model
def test_training_reads_a_dataset_with_renamed_columns(tiny_dir, tmp_path, dataset_dir):
    result = _train(
        tiny_dir,
        tmp_path / "run",
        "--method",
        "prompt-tuning",
        "--dataset",
        str(dataset_dir),
        "--column",
        "text=sentence",
        "--column",
        "y=label",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["tuned_accuracy"] <= 1.0 and len(metrics["history"]["loss"]) == 3
