"""Prompt tuning with transformers.Trainer on the packaged SST-2 sample; adapter-only checkpoints.

python examples/hf_trainer_sst2.py --method prompt-tuning --output-dir runs/trainer --max-steps 100
pstar eval --adapter runs/trainer/adapter
"""

import argparse

import transformers as tf
from datasets import Dataset

from pstar_plugins import build_model
from pstar_plugins.hf_trainer import PStarDataCollator, PStarTrainer, encode_example
from pstar_plugins.models import load, packaged_data
from pstar_plugins.tasks.data import labels_of, read_examples

TEMPLATE, WORDS = "Review: {sentence} Sentiment:{answer}", ["negative", "positive"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="prompt-tuning")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--output-dir", default="runs/trainer")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=3e-2)
    args = parser.parse_args()

    base, tokenizer = load(args.model)
    model = build_model(base, args.method, tokenizer=tokenizer)  # the frozen model plus the method's tensors
    path = packaged_data("sst2_train_sample.tsv")
    rows = read_examples(path)
    labels = labels_of(rows, "label", path, WORDS)
    # label word after the template's prompt, loss on it only (p-tuning: its template's soft slots too)
    template = getattr(model.method_config, "template", TEMPLATE)
    train = Dataset.from_list(
        [
            encode_example(template, tokenizer, r, WORDS[y], max_length=128, slot_input=model.method.slot_input)
            for r, y in zip(rows, labels)
        ]
    )
    trainer = PStarTrainer(
        model=model,
        train_dataset=train,
        data_collator=PStarDataCollator(tokenizer),
        processing_class=tokenizer,
        args=tf.TrainingArguments(
            args.output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=16,
            learning_rate=args.learning_rate,
            warmup_steps=min(10, args.max_steps),
            save_steps=50,
        ),
    )
    trainer.train()  # checkpoint-N/: adapter.safetensors, optimizer.pt, scheduler.pt, ... (no frozen weight)
    # the adapter records its task, so `pstar eval --adapter` scores it with this template and these words
    model.save_pretrained(
        f"{args.output_dir}/adapter",
        task={
            "kind": "classification",
            "template": template,
            "label_words": WORDS,
            "label_column": "label",
            "max_length": 128,
        },
    )


if __name__ == "__main__":
    main()
