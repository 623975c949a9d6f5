"""transformers.Trainer: default arguments train every method, checkpoints and save_model() hold
the adapter only, resume and load_best_model_at_end restore the same tensors."""

from pathlib import Path

import pytest
import torch
import transformers as tf
from datasets import Dataset
from safetensors import safe_open

from pstar_plugins import PStarModel, build_model, load_adapter, param_groups
from pstar_plugins.assembly.registry import get_plugin_manager
from pstar_plugins.contract.errors import AdapterError, ConfigError
from pstar_plugins.hf_trainer import PStarDataCollator, PStarTrainer, encode_example
from pstar_plugins.mechanisms.adapter_io import read_adapter
from pstar_plugins.testing import tiny_model
from tests.test_train_entry_point import needs_model

pytestmark = needs_model
METHODS = ["prompt-tuning", "prefix-tuning", "p-tuning", "p-tuning-v2"]
WORDS = ["negative", "positive"]
OPTIONS = {
    "prompt-tuning": dict(num_virtual_tokens=4, num_tasks=2),  # two prompts: task_ids must reach forward
    "prefix-tuning": dict(num_virtual_tokens=4),
    "p-tuning": dict(template="{soft:2} Review: {sentence} {soft:2} Sentiment:{answer}"),
    "p-tuning-v2": dict(num_virtual_tokens=4),  # its default: a sequence-classification head
}


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return tf.AutoTokenizer.from_pretrained(tiny_dir)


def rows(n=16):
    return [
        {"sentence": f"the film number {i} was {'very ' * (i % 3)}{'great' if i % 2 else 'dull'}", "label": i % 2}
        for i in range(n)
    ]


def features(method, tokenizer, n=16):
    """A datasets.Dataset as a user would build it: a raw text column Trainer must drop, and the
    method's inputs (labels, its template slots, task_ids) that must survive."""
    out = []
    for i, row in enumerate(rows(n)):
        if method == "p-tuning-v2":  # the linear head takes the class index as label
            ids = tokenizer(row["sentence"])["input_ids"]
            feature = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": row["label"]}
        else:
            template = OPTIONS[method].get("template", "Review: {sentence} Sentiment:{answer}")
            feature = encode_example(
                template,
                tokenizer,
                row,
                WORDS[row["label"]],
                task_id=i % 2 if method == "prompt-tuning" else None,
                slot_input=get_plugin_manager().method(method).resolve_class().slot_input,
            )
        out.append({**feature, "sentence": row["sentence"]})
    return Dataset.from_list(out)


def make_model(tiny_dir, tokenizer, method):
    base = tf.AutoModelForCausalLM.from_pretrained(tiny_dir)
    return build_model(base, method, tokenizer=tokenizer, **OPTIONS[method])


def frozen_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


def trainable_copy(model):
    return {k: v.detach().clone() for k, v in model.trainable_state().items()}


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_checkpoints_and_final_hold_the_adapter(
    trainer, tmp_path: Path, model: PStarModel, method: str, trained
) -> None:
    """Checkpoints 1 and 2 and ``save_model()`` hold the adapter only, and the saved one is
    ``method``'s with the ``trained`` tensors."""
    for step in (1, 2):
        assert_adapter_only(tmp_path / "out" / f"checkpoint-{step}", model)
    trainer.save_model(str(tmp_path / "final"))
    assert_adapter_only(tmp_path / "final", model)
    meta, tensors = read_adapter(tmp_path / "final")
    assert meta["method"] == method
    assert_same(tensors, trained)


def assert_adapter_only(folder: Path, model: PStarModel):
    """No frozen weight anywhere in ``folder``: tensor files hold exactly the adapter's tensors,
    the optimizer state only the trainable parameters' moments, and all files together are a
    small fraction of the frozen weights."""
    names = {p.name for p in folder.iterdir()}
    assert not names & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}, names
    expected = trainable_copy(model)
    tensor_files = [p for p in folder.iterdir() if p.suffix == ".safetensors"]
    assert [p.name for p in tensor_files] == ["adapter.safetensors"]
    with safe_open(str(tensor_files[0]), framework="pt") as fh:
        assert sorted(fh.keys()) == sorted(expected)
        assert all(tuple(fh.get_slice(k).get_shape()) == tuple(expected[k].shape) for k in expected)
    trainable = sum(t.numel() for t in expected.values())
    if (folder / "optimizer.pt").exists():
        state = torch.load(folder / "optimizer.pt", weights_only=True)["state"]
        moments = sum(t.numel() for s in state.values() for k, t in s.items() if k != "step")
        assert moments == 2 * trainable  # AdamW's exp_avg and exp_avg_sq of the trainable tensors only
    # tokenizer files are saved beside the adapter when the trainer has one; they hold no weight
    total = sum(
        p.stat().st_size
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(("tokenizer", "chat_template"))
    )
    assert total < frozen_bytes(model) / 4, (total, frozen_bytes(model))


@pytest.mark.parametrize("method", METHODS)
def test_plain_trainer_with_default_arguments_gets_labels_and_method_inputs(tiny_dir, tokenizer, tmp_path, method):
    model = make_model(tiny_dir, tokenizer, method)
    data = features(method, tokenizer, n=8)
    collator = PStarDataCollator(
        tokenizer, input_pads=model.method.input_pads
    )  # a plain Trainer: the method's pads passed
    args = tf.TrainingArguments(
        str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=8
    )
    trainer = tf.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=collator)
    before = trainable_copy(model)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = trainable_copy(model)
    assert all(
        not torch.equal(before[k], after[k])
        for k in before
        if before[k].dtype.is_floating_point and "head.bias" not in k
    )
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    # the loss Trainer reports is the model's own loss on the full batch: labels, prompt_index
    # and task_ids all reached forward (without them p-tuning and two-task prompt tuning raise)
    batch = collator([{k: v for k, v in f.items() if k != "sentence"} for f in data])
    model.eval()
    with torch.no_grad():
        expected = model(**batch).loss.item()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_checkpoints_and_save_model_write_the_adapter_only(tiny_dir, tokenizer, tmp_path, method):
    model = make_model(tiny_dir, tokenizer, method)
    args = tf.TrainingArguments(str(tmp_path / "out"), max_steps=2, save_steps=1, per_device_train_batch_size=4)
    trainer = PStarTrainer(
        model=model,
        args=args,
        train_dataset=features(method, tokenizer, n=8),
        data_collator=PStarDataCollator(tokenizer),
    )
    trainer.train()
    # the optimizer has the method's parameter groups (e.g. p-tuning's soft tokens without weight decay)
    assert [len(g["params"]) for g in trainer.optimizer.param_groups] == [
        len(g["params"]) for g in param_groups(model, 1e-3)
    ]
    assert_checkpoints_and_final_hold_the_adapter(trainer, tmp_path, model, method, trainable_copy(model))
    # loading onto a fresh base model reproduces the trained model's outputs
    reloaded = load_adapter(
        tf.AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "final", trainable=False
    ).eval()
    assert not any(p.requires_grad for p in reloaded.parameters())
    batch = trainer.data_collator(
        [{k: v for k, v in f.items() if k != "sentence"} for f in features(method, tokenizer, n=4)]
    )
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)


def train(tiny_dir, tokenizer, method, out, steps, resume=None, **extra):
    torch.manual_seed(0)
    model = make_model(tiny_dir, tokenizer, method)
    data = features(method, tokenizer, n=16)
    args = tf.TrainingArguments(
        str(out),
        max_steps=steps,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        warmup_steps=1,
        **extra,
    )
    trainer = PStarTrainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data.select(range(8)),
        data_collator=PStarDataCollator(tokenizer),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


@pytest.mark.parametrize("method", METHODS)
def test_resume_from_checkpoint_continues_exactly(tiny_dir, tokenizer, tmp_path, method):
    _, straight = train(tiny_dir, tokenizer, method, tmp_path / "straight", steps=4)
    # a fresh model and trainer (freshly initialised tensors) resumed from step 2: adapter tensors,
    # AdamW moments, the LR schedule and the data position all come back, so step 4 is the same
    trainer, resumed = train(
        tiny_dir, tokenizer, method, tmp_path / "straight", steps=4, resume=str(tmp_path / "straight" / "checkpoint-2")
    )
    assert trainer.state.global_step == 4
    assert_same(trainable_copy(straight), trainable_copy(resumed))


@pytest.mark.parametrize("method", METHODS)
def test_load_best_model_at_end_restores_the_best_checkpoint(tiny_dir, tokenizer, tmp_path, method):
    # "best" = the highest eval loss, so the best checkpoint is an early one, not the last
    trainer, model = train(
        tiny_dir,
        tokenizer,
        method,
        tmp_path / "out",
        steps=4,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
    )
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-2", best
    _, best_tensors = read_adapter(best)
    _, last_tensors = read_adapter(tmp_path / "out" / "checkpoint-4")
    assert_same(trainable_copy(model), best_tensors)
    assert any(not torch.equal(best_tensors[k], last_tensors[k]) for k in best_tensors)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_every_input_with_its_neutral_value(tokenizer, side):
    template = "{soft:2} {sentence}:{answer}"
    short = encode_example(template, tokenizer, {"sentence": "ok"}, "yes", task_id=1, slot_input="slots")
    long = encode_example(
        template, tokenizer, {"sentence": "a much longer review text"}, "no", task_id=0, slot_input="slots"
    )
    batch = PStarDataCollator(tokenizer, padding_side=side, input_pads={"slots": -1})([short, long])
    n, width = len(short["input_ids"]), len(long["input_ids"])
    assert n < width and batch["input_ids"].shape == (2, width)
    real = slice(0, n) if side == "right" else slice(width - n, width)
    pad = slice(n, width) if side == "right" else slice(0, width - n)
    for name, value in [("input_ids", tokenizer.pad_token_id), ("attention_mask", 0), ("labels", -100), ("slots", -1)]:
        assert batch[name][0, real].tolist() == short[name]
        assert set(batch[name][0, pad].tolist()) == {value}, name
        assert batch[name][1].tolist() == long[name]
    assert batch["task_ids"].tolist() == [1, 0]
    # the labels cover the target only (its tokens and EOS), the slots the two soft tokens
    target = tokenizer(" yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [t for t in short["labels"] if t != -100] == target
    assert sorted(i for i in short["slots"] if i >= 0) == [0, 1]


def test_a_methods_own_inputs_are_named_by_the_method_not_guessed(tokenizer):
    """Soft slots go to the input the method declares; without one they are refused, and a column
    with no declared pad value is refused rather than padded with a number that means something."""
    with pytest.raises(ConfigError, match="has \\{soft\\} slots: pass slot_input=model.method.slot_input"):
        encode_example("{soft:2} {sentence}:{answer}", tokenizer, {"sentence": "ok"}, "yes")
    features = [
        encode_example("{soft:2} {sentence}:{answer}", tokenizer, {"sentence": s}, "yes", slot_input="slots")
        for s in ("ok", "longer text")
    ]
    with pytest.raises(ValueError, match="'slots' has no known pad value"):
        PStarDataCollator(tokenizer)(features)
    model = build_model(tiny_model("llama"), "p-tuning", template="{soft:2} {sentence}:{answer}")
    trainer = PStarTrainer(
        model=model,
        data_collator=PStarDataCollator(tokenizer),
        args=tf.TrainingArguments("unused", report_to=[], use_cpu=True),
    )
    assert trainer.data_collator.input_pads == {"prompt_index": -1} == dict(model.method.input_pads)


def test_resuming_from_another_methods_checkpoint_is_refused(tiny_dir, tokenizer, tmp_path):
    train(tiny_dir, tokenizer, "prefix-tuning", tmp_path / "prefix", steps=2)
    with pytest.raises(
        AdapterError, match="holds a 'prefix-tuning' adapter, but the model being trained uses 'prompt-tuning'"
    ):
        train(
            tiny_dir,
            tokenizer,
            "prompt-tuning",
            tmp_path / "prompt",
            steps=4,
            resume=str(tmp_path / "prefix" / "checkpoint-2"),
        )


def checkpoint_bytes(folder: Path) -> int:
    """Every file a checkpoint holds except the tokenizer's (which a trainer with a tokenizer adds)."""
    return sum(
        p.stat().st_size
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(("tokenizer", "chat_template"))
    )


def adapter_and_optimizer_bytes(model: PStarModel) -> int:
    """The trainable tensors once, and AdamW's two fp32 moments of each."""
    state = model.trainable_state()
    return sum(t.numel() * t.element_size() + 2 * 4 * t.numel() for t in state.values())


#: prompts large enough that a checkpoint's fixed files (RNG states, arguments) do not decide the ratio
BIG = {
    "prompt-tuning": dict(num_virtual_tokens=64),
    "prefix-tuning": dict(num_virtual_tokens=16),
    "p-tuning": dict(template="{soft:16} Review: {sentence} {soft:16} Sentiment:{answer}"),
    "p-tuning-v2": dict(num_virtual_tokens=96),
}


@pytest.mark.parametrize("method", METHODS)
def test_plain_trainer_checkpoints_hold_no_frozen_weight_and_resume_exactly(tiny_dir, tokenizer, tmp_path, method):
    """No subclass: ``Trainer`` saves ``PStarModel.state_dict()``, which is the adapter."""

    def run(out, resume=None):
        torch.manual_seed(0)
        base = tf.AutoModelForCausalLM.from_pretrained(tiny_dir)
        model = build_model(base, method, tokenizer=tokenizer, **{**OPTIONS[method], **BIG[method]})
        args = tf.TrainingArguments(
            str(out),
            max_steps=4,
            save_steps=2,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            warmup_steps=1,
            report_to=[],
        )
        trainer = tf.Trainer(
            model=model,
            args=args,
            train_dataset=features(method, tokenizer, n=16),
            data_collator=PStarDataCollator(tokenizer, input_pads=model.method.input_pads),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    trainer, straight = run(tmp_path / "out")
    for step in (2, 4):
        folder = tmp_path / "out" / f"checkpoint-{step}"
        with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
            assert sorted(fh.keys()) == sorted(straight.state_dict())
        assert not any(k.startswith("base_model.") for k in straight.state_dict())
        assert checkpoint_bytes(folder) < 2 * adapter_and_optimizer_bytes(straight), (
            checkpoint_bytes(folder),
            adapter_and_optimizer_bytes(straight),
        )
    trainer.save_model(str(tmp_path / "final"))
    assert checkpoint_bytes(tmp_path / "final") < 2 * adapter_and_optimizer_bytes(straight)
    _, resumed = run(tmp_path / "out", resume=str(tmp_path / "out" / "checkpoint-2"))
    assert_same(trainable_copy(straight), trainable_copy(resumed))


def test_state_dict_is_the_adapter_and_loads_back_strictly(tiny_dir, tokenizer):
    model = make_model(tiny_dir, tokenizer, "prefix-tuning")
    state = model.state_dict()
    assert state and all(k.startswith("method.") for k in state)
    assert {k.removeprefix("method.") for k in state} == set(model.method.state_dict())
    other = make_model(tiny_dir, tokenizer, "prefix-tuning")
    other.load_state_dict({k: v + 1 for k, v in state.items()})
    assert all(torch.equal(other.state_dict()[k], state[k] + 1) for k in state)
    with pytest.raises(RuntimeError, match="Missing key.*method"):
        other.load_state_dict(dict(list(state.items())[1:]))
    with pytest.raises(RuntimeError, match="Unexpected key.*method.nonsense"):
        other.load_state_dict({**state, "method.nonsense": torch.zeros(1)})
    # a full state dict (older checkpoints) still loads: its frozen weights are the model's own
    full = {**{f"base_model.{k}": v for k, v in model.base_model.state_dict().items()}, **state}
    assert other.load_state_dict(full).missing_keys == []
    # a wrapper's state_dict and load (DDP's) recurse past this module's: its prefix, nothing frozen
    wrapped = torch.nn.ModuleDict({"module": model})
    assert sorted(wrapped.state_dict()) == sorted(f"module.{k}" for k in state)
    other_wrapped = torch.nn.ModuleDict({"module": other})
    other_wrapped.load_state_dict(wrapped.state_dict())  # strict
    assert all(torch.equal(other.state_dict()[k], state[k]) for k in state)
    with pytest.raises(RuntimeError, match="Missing key.*module.method"):
        other_wrapped.load_state_dict(dict(list(wrapped.state_dict().items())[1:]))
