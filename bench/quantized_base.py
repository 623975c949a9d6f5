"""Frozen SmolLM2-135M-Instruct in fp32, bf16, 8 bits and 4 bits: what it holds and what a step costs.

Side by side in one run: the frozen weights' bytes (as stored: packed 4/8-bit weights count
their packed bytes, quantization constants included) and the median time of one prompt-tuning
training step (SST-2 rows, batch 16, 10 virtual tokens, forward + backward + AdamW), steps of the
four bases interleaved so the machine's drift hits all alike.

    python bench/quantized_base.py          # writes bench/results/quantized_base.json

The accuracy half (the default recipe trained on a 4-bit base beside the full-precision one) is
the training script's own run: ``pstar train --method prompt-tuning --model smollm2 --load-in-4bit``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _common as C  # noqa: E402


def stored_bytes(model) -> int:
    """Bytes of the base model's weights as held (packed weights and their quantization state)."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:  # 4-bit: absmax (and its own quantization) per block
            for t in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        scales = getattr(p, "SCB", None)  # 8-bit: a scale per row
        if isinstance(scales, torch.Tensor):
            total += scales.numel() * scales.element_size()
    return total


def base(kind: str):
    from types import SimpleNamespace

    from pstar_plugins.models import load, quantization_config

    flags = SimpleNamespace(
        load_in_4bit=kind == "4bit",
        load_in_8bit=kind == "8bit",
        bnb_4bit_quant_type=None,
        bnb_4bit_compute_dtype=None,
        dtype="fp32",
    )
    quantized = quantization_config(flags)
    dtype = {"fp32": "fp32", "bf16": "bf16"}.get(kind, "fp32")
    extra = {"quantization_config": quantized, "device_map": {"": str(C.device())}} if quantized else {}
    model, tokenizer = load("smollm2", dtype=dtype, **extra)
    return model.to(C.device()) if not quantized else model, tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--kinds", nargs="+", default=["fp32", "bf16", "8bit", "4bit"], choices=["fp32", "bf16", "8bit", "4bit"]
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    from pstar_plugins import build_model
    from pstar_plugins.mechanisms.template import Template
    from pstar_plugins.tasks.verbalizer import Verbalizer

    rows = C.sst2_rows(args.batch_size)
    template = Template.parse("Review: {sentence} Sentiment:{answer}")
    contenders, sizes = {}, {}
    for kind in args.kinds:
        model_base, tokenizer = base(kind)
        sizes[kind] = stored_bytes(model_base)
        model = build_model(model_base, "prompt-tuning", tokenizer=tokenizer, num_virtual_tokens=10).train()
        scorer = Verbalizer(tokenizer, template, ["negative", "positive"], masked_lm=False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
        batch = scorer.encode(rows, [int(r["label"]) for r in rows], max_length=128)

        def step(model=model, scorer=scorer, optimizer=optimizer, batch=batch):
            scores = scorer.scores(model, batch)  # (B, classes): the label words' log-probabilities
            loss = torch.nn.functional.cross_entropy(scores, batch.labels.to(scores.device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        contenders[kind] = step
        print(f"{kind:5} frozen weights {sizes[kind] / 2**20:8.1f} MiB", flush=True)
    times = C.alternate(contenders, args.repeats, args.warmup)
    reference = C.median(times[args.kinds[0]])
    results = {}
    for kind in args.kinds:
        median = C.median(times[kind])
        results[kind] = {
            "frozen_bytes": sizes[kind],
            "median_step_seconds": median,
            "seconds": times[kind],
            "bytes_vs_fp32": sizes[kind] / sizes.get("fp32", sizes[args.kinds[0]]),
            "time_vs_first": median / reference,
        }
        print(
            f"{kind:5} {sizes[kind] / 2**20:8.1f} MiB ({results[kind]['bytes_vs_fp32']:.2f}x)  step "
            f"{median * 1e3:8.1f} ms "
            f"({results[kind]['time_vs_first']:.2f}x {args.kinds[0]})",
            flush=True,
        )
    payload = {
        "model": "SmolLM2-135M-Instruct",
        "method": "prompt-tuning",
        "virtual_tokens": 10,
        "batch": args.batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "kinds": results,
    }
    if not args.no_write:
        print("wrote", C.write_result("quantized_base", payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
