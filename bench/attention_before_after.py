"""Training-step time of this revision's attention paths against an earlier revision's, on SmolLM2.

The attention work (one causal pattern per forward for prefixes on unpadded batches, padded
masks extended once per forward instead of in every layer, packed unpadded calls with no mask)
must cost nothing where it cannot gain: on this CPU. For prompt tuning, prefix tuning and P-tuning
v2 (P-tuning takes prompt tuning's attention path) and two batch kinds, one step is what
``pstar train`` runs: forward with packing on and logits at the answer position only, cross-entropy
against a label word, backward, AdamW.

* ``unpadded``: 16 SST-2 dev rows cut to the shortest row's length, so no row has padding;
* ``padded``: the same 16 rows at their own lengths, left-padded.

Each revision runs in its own worker processes (the library imported from its own tree; the
earlier one is unpacked with ``git archive``). Workers alternate before, after, before, ... so
that the machine's drift hits both alike; each times ``--repeats`` steps per cell after
``--warmup``. Reported: median step time per cell and side, and after / before.

    python bench/attention_before_after.py [--before 232e485] [--rounds 3] [--repeats 5]

Writes bench/results/attention_before_after.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "prompt-tuning": {"num_virtual_tokens": 10, "init": "random"},
    "prefix-tuning": {"num_virtual_tokens": 10, "projection": True, "projection_hidden_size": 512},
    "p-tuning-v2": {"num_virtual_tokens": 10, "projection": False, "head": "none"},
}
KINDS = ("unpadded", "padded")


def worker(args) -> None:
    sys.path.insert(0, args.tree)
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    import pstar_plugins
    from pstar_plugins import build_model

    assert Path(pstar_plugins.__file__).resolve().is_relative_to(Path(args.tree).resolve()), pstar_plugins.__file__
    torch.set_num_threads(args.threads)
    batches = torch.load(args.batches)
    out = {}
    for method, options in METHODS.items():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(args.folder, attn_implementation="sdpa")
        base.requires_grad_(False)
        model = build_model(base, method, **options)
        model.packing = True
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for kind in KINDS:
            ids, mask, target = batches[kind]

            def step():
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
                F.cross_entropy(logits, target).backward()
                optimizer.step()
                optimizer.zero_grad()

            times = []
            for i in range(args.warmup + args.repeats):
                t0 = time.perf_counter()
                step()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            out[f"{method}/{kind}"] = times
    print("RESULT " + json.dumps(out), flush=True)


def batches(tokenizer, n: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import _common as C

    rows = C.sst2_rows(n)
    texts = [C.SST2_TEMPLATE.split("{answer}")[0].format(sentence=r["sentence"]) for r in rows]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    words = [tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in C.LABEL_WORDS]
    target = torch.tensor([words[int(r["label"])] for r in rows])
    shortest = min(len(e) for e in encoded)
    unpadded = torch.tensor([e[:shortest] for e in encoded])
    width = max(len(e) for e in encoded)
    ids = torch.full((n, width), tokenizer.pad_token_id)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :] = torch.tensor(e)
        mask[i, width - len(e) :] = 1
    return {"unpadded": (unpadded, torch.ones_like(unpadded), target), "padded": (ids, mask, target)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    parser.add_argument("--before", default="232e485", help="the earlier revision (default: before the attention work)")
    parser.add_argument("--rounds", type=int, default=3, help="worker pairs (before, after) to alternate")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per cell in each worker")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per cell first")
    parser.add_argument("--batch", type=int, default=16, help="rows per step")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per worker")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import _common as C

    from pstar_plugins.models import dequantized_gguf, load_tokenizer, resolve

    path, gguf = resolve("smollm2")
    folder = dequantized_gguf(AutoModelForCausalLM, path, gguf)
    revision = subprocess.run(
        ["git", "rev-parse", "--short", args.before], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    current = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        before.mkdir()
        archive = subprocess.run(["git", "archive", revision], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        batch_file = Path(tmp) / "batches.pt"
        torch.save(batches(load_tokenizer("smollm2"), args.batch), batch_file)
        trees = {"before": before, "after": ROOT}
        samples: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
        for round_ in range(args.rounds):
            for side, tree in trees.items():
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--tree",
                    str(tree),
                    "--folder",
                    str(folder),
                    "--batches",
                    str(batch_file),
                    "--repeats",
                    str(args.repeats),
                    "--warmup",
                    str(args.warmup),
                    "--threads",
                    str(args.threads),
                ]
                env = {**os.environ, "PYTHONPATH": str(tree)}
                done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
                result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
                for cell, times in result.items():
                    samples[side].setdefault(cell, []).extend(times)
                print(f"round {round_ + 1}/{args.rounds}: {side} done", flush=True)
    cells = {}
    print(
        f"\nstep time, median of {args.rounds * args.repeats} steps per cell ({revision} = before, {current} = after)"
    )
    print(f"{'method':14} {'batch':9} {'before':>9} {'after':>9} {'after/before':>13}")
    for cell in samples["after"]:
        b, a = statistics.median(samples["before"][cell]), statistics.median(samples["after"][cell])
        method, kind = cell.split("/")
        cells[cell] = {
            "method": method,
            "batch": kind,
            "before_seconds": b,
            "after_seconds": a,
            "ratio": a / b,
            "before_samples": samples["before"][cell],
            "after_samples": samples["after"][cell],
        }
        print(f"{method:14} {kind:9} {b:8.3f}s {a:8.3f}s {a / b:12.2f}x")
    if not args.no_write:
        path = C.write_result(
            "attention_before_after",
            {
                "before": revision,
                "after": current,
                "model": "SmolLM2-135M-Instruct",
                "batch": args.batch,
                "rounds": args.rounds,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "threads": args.threads,
                "cells": cells,
            },
        )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
