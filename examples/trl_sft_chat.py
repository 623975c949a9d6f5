"""Prefix tuning with TRL's SFTTrainer on a prompt/completion chat dataset (loss on the
assistant's completion only), adapter-only checkpoints.

    python examples/trl_sft_chat.py --method prefix-tuning --output-dir runs/sft --max-steps 50
"""

import argparse

from datasets import Dataset
from trl import SFTConfig

from pstar_plugins import build_model
from pstar_plugins.models import load, packaged_data
from pstar_plugins.tasks.data import read_examples
from pstar_plugins.trl_sft import PStarSFTTrainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="prefix-tuning")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--output-dir", default="runs/sft")
    parser.add_argument("--max-steps", type=int, default=50)
    args = parser.parse_args()

    base, tokenizer = load(args.model)
    options = {"head": "none"} if args.method == "p-tuning-v2" else {}  # SFT trains the LM head's output
    model = build_model(base, args.method, tokenizer=tokenizer, **options)
    rows = read_examples(packaged_data("sst2_train_sample.tsv"))
    chats = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"Is this review positive or negative? {r['sentence']}"}],
                "completion": [{"role": "assistant", "content": "positive" if r["label"] == "1" else "negative"}],
            }
            for r in rows
        ]
    )
    trainer = PStarSFTTrainer(
        model=model,
        train_dataset=chats,
        processing_class=tokenizer,
        args=SFTConfig(
            args.output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=8,
            learning_rate=2e-4 if args.method == "prefix-tuning" else 5e-3,
            bf16=False,
            save_steps=25,
            report_to="none",
        ),
    )
    trainer.train()
    trainer.save_model(f"{args.output_dir}/adapter")  # adapter_config.json + adapter.safetensors


if __name__ == "__main__":
    main()
