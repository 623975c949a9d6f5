"""Run under 2 processes (tests/test_trainer_zero3.py): PStarTrainer with TrainingArguments(deepspeed=...)
ZeRO-3 on CPU, 4 steps with a checkpoint every 2 (or resumed from one), then save_model; rank 0
writes what saving gathered.

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 \
        tests/trainer_zero3_run.py MODEL DS_JSON OUT [RESUME|best]

``best``: evaluate at every checkpoint and end with ``load_best_model_at_end`` (the "best" being the
highest loss, so that it is not the last step's state).
"""

import json
import sys
from pathlib import Path

import transformers as tf
from datasets import Dataset

from pstar_plugins import build_model
from pstar_plugins.hf_trainer import PStarDataCollator, PStarTrainer, deepspeed_without_gpu, encode_example
from pstar_plugins.mechanisms import distributed


def main(model_dir: str, ds_config: str, out: str, resume: str | None = None) -> None:
    ds = json.loads(Path(ds_config).read_text())
    best = resume == "best"
    resume = None if best else resume
    selection = (
        dict(
            eval_strategy="steps",
            eval_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="loss",
            greater_is_better=True,
            per_device_eval_batch_size=2,
        )
        if best
        else {}
    )
    # the arguments come first: from_pretrained then builds the model partitioned (zero.Init)
    args = tf.TrainingArguments(
        out,
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        deepspeed=ds,
        accelerator_config=deepspeed_without_gpu(),
        report_to="none",
        **selection,
    )
    tokenizer = tf.AutoTokenizer.from_pretrained(model_dir)
    base = tf.AutoModelForCausalLM.from_pretrained(model_dir)
    model = build_model(base, "prompt-tuning", tokenizer=tokenizer, num_virtual_tokens=4)
    rows = [{"sentence": f"film {i} was {'great' if i % 2 else 'dull'}"} for i in range(8)]
    data = Dataset.from_list(
        [
            encode_example("Review: {sentence} Sentiment:{answer}", tokenizer, r, ["negative", "positive"][i % 2])
            for i, r in enumerate(rows)
        ]
    )
    trainer = PStarTrainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data if best else None,
        data_collator=PStarDataCollator(tokenizer),
    )
    with distributed.recording_gathers() as calls:
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(str(Path(out) / "final"))
    gathered = {i for call in calls for i in call}
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    if trainer.args.process_index == 0:
        (Path(out) / "gathers.json").write_text(
            json.dumps(
                {
                    "world_size": trainer.args.world_size,
                    "deepspeed": trainer.is_deepspeed_enabled,
                    "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
                    "partitioned_frozen": sum(
                        distributed.is_partitioned(p) for p in model.parameters() if not p.requires_grad
                    ),
                    "gather_calls": len(calls),
                    "gathered": len(gathered),
                    "frozen_gathered": len(gathered & frozen),
                    "frozen_bytes": sum(
                        getattr(p, "ds_numel", p.numel()) * 4 for p in model.parameters() if not p.requires_grad
                    ),
                    "best_model_checkpoint": trainer.state.best_model_checkpoint,
                }
            )
        )
    distributed.shut_down()


if __name__ == "__main__":
    main(*sys.argv[1:5])
