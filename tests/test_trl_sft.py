"""TRL's SFTTrainer trains every method on a chat dataset, the loss on completion tokens only,
with adapter-only checkpoints."""

import pytest
import torch
import transformers as tf

from pstar_plugins import build_model
from tests.test_hf_trainer import assert_checkpoints_and_final_hold_the_adapter, trainable_copy
from tests.test_train_entry_point import needs_model

trl = pytest.importorskip("trl", reason="trl is installed by scripts/setup.sh ([trl])")
from datasets import Dataset  # noqa: E402

from pstar_plugins.trl_sft import PStarSFTTrainer  # noqa: E402

pytestmark = needs_model
OPTIONS = {
    "prompt-tuning": dict(num_virtual_tokens=4),
    "prefix-tuning": dict(num_virtual_tokens=4),
    "p-tuning": dict(template="{soft:2} {sentence} {soft:1}{answer}"),
    "p-tuning-v2": dict(num_virtual_tokens=4, head="none"),  # the LM head generates the completion
}
ANSWERS = ["no", "yes"]


def chats(n=8):
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"Is review {i} {'really ' * (i % 3)}positive?"}],
                "completion": [{"role": "assistant", "content": ANSWERS[i % 2]}],
            }
            for i in range(n)
        ]
    )


# TRL 1.16's SFTConfig still sets the field transformers 5.25 renamed (gradient_checkpointing)
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("method", list(OPTIONS))
def test_sft_trainer_trains_on_completions_and_saves_the_adapter_only(tiny_dir, tmp_path, method):
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_dir)
    model = build_model(
        tf.AutoModelForCausalLM.from_pretrained(tiny_dir), method, tokenizer=tokenizer, **OPTIONS[method]
    )
    args = trl.SFTConfig(
        str(tmp_path / "out"), max_steps=2, save_steps=1, per_device_train_batch_size=4, bf16=False, report_to="none"
    )  # defaults otherwise (gradient checkpointing on)
    trainer = PStarSFTTrainer(model=model, args=args, train_dataset=chats(), processing_class=tokenizer)
    assert "forward" not in vars(trainer.model)  # TRL's fused head would bypass the method's prompts
    before = trainable_copy(model)
    trainer.train()
    after = trainable_copy(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)

    # the labels are the assistant's answer (and the chat template's end-of-turn) only
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    for row, labels in enumerate(batch["labels"]):
        text = tokenizer.decode(labels[labels != -100])
        assert text.strip().startswith(ANSWERS[row % 2]) and len(text.strip()) <= len(ANSWERS[row % 2]) + len(
            "<|im_end|>"
        ), text
    if method == "p-tuning":  # its 3 soft tokens sit in front of each conversation, outside the loss
        assert batch["prompt_index"][:, :3].tolist() == [[0, 1, 2]] * 4
        assert (batch["prompt_index"][:, 3:] == -1).all() and (batch["labels"][:, :3] == -100).all()
    # the reported loss is the model's mean cross-entropy over those label tokens
    model.eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
        expected = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
        assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(expected.item(), rel=1e-5)

    assert_checkpoints_and_final_hold_the_adapter(trainer, tmp_path, model, method, after)
