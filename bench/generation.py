"""Generation with a tuned prefix: time to first token and decoding speed, ours against PEFT, on
SmolLM2-135M-Instruct with E2E meaning representations as prompts (greedy).

Both sides are loaded the way a server loads them: a prefix trained with the MLP
reparameterisation, saved, and loaded into a fresh frozen model for inference. Ours is saved
folded (a static prefix: no MLP at load or at any call); PEFT's ``PeftModel.from_pretrained``.
The frozen model with no prefix is the reference. Ours computes the prompt's KV cache
padding-free (``mechanisms.packing.prefill``: a left-padded batch's padding never runs) and hands it to
``generate()``; ``ours padded`` is the same adapter with packing off. Calls alternate; medians.

    python bench/generation.py [--repeats 9] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def prompts(tokenizer, batch: int, offset: int = 0) -> dict:
    from pstar_plugins.mechanisms.template import Template
    from pstar_plugins.tasks.generation import _prompt

    template = Template.parse(C.E2E_TEMPLATE)
    pad = tokenizer.pad_token_id
    encoded = [_prompt(template, tokenizer, row, pad)[0] for row in C.e2e_rows(batch, offset)]
    length = max(map(len, encoded))
    ids = torch.full((batch, length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, length - len(e) :] = torch.tensor(e)
        mask[i, length - len(e) :] = 1
    return {"input_ids": ids.to(C.device()), "attention_mask": mask.to(C.device())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    C.add_common_arguments(p, repeats=9)
    args = p.parse_args(argv)
    from peft import PeftModel, PrefixTuningConfig, get_peft_model

    from pstar_plugins import build_model, load_adapter

    dtype = C.dtype_of(args)
    m = args.virtual_tokens
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base, tokenizer = C.smollm2(dtype)
        trained = build_model(base, "prefix-tuning", num_virtual_tokens=m, projection=True, projection_hidden_size=512)
        trained.fold().save_adapter(Path(tmp) / "ours")
        base_p, _ = C.smollm2(dtype)
        peft_trained = get_peft_model(
            base_p,
            PrefixTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=m, prefix_projection=True, encoder_hidden_size=512
            ),
        )
        peft_trained.save_pretrained(Path(tmp) / "peft")
        del trained, peft_trained, base, base_p
        ours = load_adapter(C.smollm2(dtype)[0], Path(tmp) / "ours").eval()
        ours.packing = True
        ours_padded = load_adapter(C.smollm2(dtype)[0], Path(tmp) / "ours").eval()
        peft_model = PeftModel.from_pretrained(C.smollm2(dtype)[0], Path(tmp) / "peft").eval()
        plain = C.smollm2(dtype)[0].eval()

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    results = {}
    for batch in args.batch_sizes:
        inputs = prompts(tokenizer, batch)

        def gen(model, n):
            def call():
                with torch.no_grad():
                    return model.generate(
                        **inputs,
                        max_new_tokens=n,
                        min_new_tokens=n,
                        do_sample=False,
                        pad_token_id=pad,
                        eos_token_id=eos,
                    )

            return call

        contenders = {"ours": ours, "peft": peft_model, "no prefix": plain, "ours padded": ours_padded}
        first = C.alternate({name: gen(model, 1) for name, model in contenders.items()}, args.repeats, args.warmup)
        full = C.alternate(
            {name: gen(model, args.new_tokens) for name, model in contenders.items()}, max(3, args.repeats // 2), 1
        )
        row = {}
        for name in first:
            ttft, total = C.median(first[name]), C.median(full[name])
            row[name] = {
                "ttft_seconds": ttft,
                "total_seconds": total,
                "tokens_per_second": batch * args.new_tokens / total,
                "decode_tokens_per_second": batch * (args.new_tokens - 1) / max(1e-9, total - ttft),
            }
        row["ttft_speedup_vs_peft"] = row["peft"]["ttft_seconds"] / row["ours"]["ttft_seconds"]
        row["tokens_per_second_vs_peft"] = row["ours"]["tokens_per_second"] / row["peft"]["tokens_per_second"]
        results[f"batch_{batch}"] = row
        print(
            f"batch {batch:2}: TTFT ours {row['ours']['ttft_seconds'] * 1e3:6.1f} ms, peft "
            f"{row['peft']['ttft_seconds'] * 1e3:6.1f} ms,"
            f" no prefix {row['no prefix']['ttft_seconds'] * 1e3:6.1f} ms, ours padded "
            f"{row['ours padded']['ttft_seconds'] * 1e3:6.1f} ms"
            f" -> {row['ttft_speedup_vs_peft']:.2f}x |"
            f" tokens/s ours {row['ours']['tokens_per_second']:6.1f}, peft {row['peft']['tokens_per_second']:6.1f},"
            f" no prefix {row['no prefix']['tokens_per_second']:6.1f} -> {row['tokens_per_second_vs_peft']:.2f}x",
            flush=True,
        )
    padding = {
        f"batch_{b}": float(1 - prompts(tokenizer, b)["attention_mask"].float().mean()) for b in args.batch_sizes
    }
    payload = {
        "dtype": args.dtype,
        "model": "SmolLM2-135M-Instruct",
        "virtual_tokens": m,
        "new_tokens": args.new_tokens,
        "prompt_padding_fraction": padding,
        "goal": {"ttft_speedup_vs_peft": ">= 1.2"},
        "repeats": args.repeats,
        "results": results,
    }
    if not args.no_write:
        print("wrote", C.write_result("generation", payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
