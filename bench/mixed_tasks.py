"""Mixed-task inference: prompts of 4 tasks, 32 rows mixed across them, on SmolLM2-135M-Instruct.

Ours: one forward over all 32 rows, each row picking its task's prompt by ``task_ids`` (one table
holds the 4 prompts). PEFT: 4 adapters on one model, looping adapter by adapter (``set_adapter``,
then a forward over that task's rows), the way PEFT serves prompt-learning adapters (its
per-row ``adapter_names`` covers LoRA-style layers, not prompts). Both score the label words at
the answer slot (``logits_to_keep=1`` on both sides). Ours runs padding-free: rows of different
tasks share packed rows, each query masked to its own task's prefix (prefix methods) or carrying
its own virtual tokens (prompt tuning). Calls alternate; medians; rows per second.

    python bench/mixed_tasks.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TASKS = 4


def peft_config(method: str, m: int):
    from peft import PrefixTuningConfig, PromptTuningConfig

    if method == "prompt-tuning":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=m)
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=m, prefix_projection=False)


def run(method: str, rows: int, m: int, repeats: int, warmup: int, dtype) -> dict:
    from peft import get_peft_model

    from pstar_plugins import build_model
    from pstar_plugins.mechanisms.template import Template
    from pstar_plugins.tasks.verbalizer import Verbalizer

    base, tokenizer = C.smollm2(dtype)
    options = {"num_virtual_tokens": m, "num_tasks": TASKS}
    options.update({"init": "random"} if method == "prompt-tuning" else {"projection": False, "head": "none"})
    ours = build_model(base, method, tokenizer=tokenizer, **options).eval()
    ours.packing = True
    verbalizer = Verbalizer(tokenizer, Template.parse(C.SST2_TEMPLATE), C.LABEL_WORDS, masked_lm=False)
    data = C.sst2_rows(rows)
    task_ids = torch.arange(rows) % TASKS
    enc = verbalizer.encode(data, [int(r["label"]) for r in data])
    dev = C.device()
    inputs = {k: v.to(dev) for k, v in enc.inputs.items()}
    task_ids = task_ids.to(dev)

    base_peft, _ = C.smollm2(dtype)
    peft_model = get_peft_model(base_peft, peft_config(method, m), adapter_name="task0")
    for t in range(1, TASKS):
        peft_model.add_adapter(f"task{t}", peft_config(method, m))
    peft_model.eval()
    # each task's rows, encoded on their own (left-padded to their own longest row)
    per_task = []
    for t in range(TASKS):
        picked = [data[i] for i in range(rows) if i % TASKS == t]
        e = verbalizer.encode(picked, [int(r["label"]) for r in picked])
        per_task.append({k: v.to(dev) for k, v in e.inputs.items()})

    @torch.no_grad()
    def ours_pass():
        return ours(**inputs, task_ids=task_ids, logits_to_keep=1).logits[:, -1]

    @torch.no_grad()
    def peft_loop():
        out = []
        for t in range(TASKS):
            peft_model.set_adapter(f"task{t}")
            out.append(peft_model(**per_task[t], logits_to_keep=1).logits[:, -1])
        return out

    times = C.alternate({"ours": ours_pass, "peft": peft_loop}, repeats, warmup)
    ours_s, peft_s = C.median(times["ours"]), C.median(times["peft"])
    return {
        "rows": rows,
        "tasks": TASKS,
        "virtual_tokens": m,
        "ours": {"median_seconds": ours_s, "rows_per_second": rows / ours_s, "seconds": times["ours"]},
        "peft": {"median_seconds": peft_s, "rows_per_second": rows / peft_s, "seconds": times["peft"]},
        "throughput_ratio": peft_s / ours_s,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument(
        "--methods", nargs="+", default=["prompt-tuning", "p-tuning-v2"], choices=["prompt-tuning", "p-tuning-v2"]
    )
    C.add_common_arguments(p, repeats=7)
    args = p.parse_args(argv)
    dtype = C.dtype_of(args)
    results = {}
    for method in args.methods:
        r = run(method, args.rows, args.virtual_tokens, args.repeats, args.warmup, dtype)
        results[method] = r
        print(
            f"{method:14} ours {r['ours']['rows_per_second']:7.1f} rows/s  peft loop "
            f"{r['peft']['rows_per_second']:7.1f} rows/s"
            f"  -> {r['throughput_ratio']:.2f}x",
            flush=True,
        )
    payload = {
        "dtype": args.dtype,
        "model": "SmolLM2-135M-Instruct",
        "goal": {"throughput_ratio": ">= 3"},
        "repeats": args.repeats,
        "warmup": args.warmup,
        "methods": results,
    }
    if not args.no_write:
        print("wrote", C.write_result("mixed_tasks", payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
