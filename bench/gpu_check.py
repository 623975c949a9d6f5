"""The GPU check in one command (``bash bench/gpu_check.sh``): what this library cannot show on a CPU.

1. The conformance suite (``pstar_plugins.testing.conformance``) on 3 families x 4 methods x the
   attention backends this machine has (sdpa, flex_attention, flash_attention_2 when the
   ``flash_attn`` package is installed), on CUDA. sdpa and flex cells run in fp32 (the suite's
   tolerances are fp32's); flash_attention_2 exists only in bf16/fp16 and runs in bf16. Prefixes
   and packed calls on flash_attention_2 are refused until this check has passed them, so
   gpu_check.sh runs with PSTAR_UNVERIFIED_KERNELS=flash_attention_2.
2. A training step against PEFT on a ~1B-parameter Llama built from its config (random weights,
   bf16): median step time and peak CUDA memory, side by side in one run.

Writes ``bench/results/gpu_check_cuda.json``; prints one line per cell and per contender.
``--dry-run`` runs the first cell and one step of the bench on a tiny model on the CPU (the
test suite runs it, so the script cannot rot where no GPU is); it writes to ``--out`` only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _common as C  # noqa: E402

FAMILIES = ("llama", "qwen2", "gpt2")  # GQA + RoPE, RoPE with biases, learned absolute positions
METHODS = ("prompt-tuning", "prefix-tuning", "p-tuning", "p-tuning-v2")


def backends(dry_run: bool) -> list[str]:
    if dry_run:
        return ["sdpa"]
    out = ["sdpa", "flex_attention"]
    if importlib.util.find_spec("flash_attn") is not None:
        out.append("flash_attention_2")
    return out


def conformance(device: torch.device, dry_run: bool) -> list[dict]:
    from pstar_plugins.testing.architectures import tiny_model
    from pstar_plugins.testing.conformance import check_method
    from tests.matrix import options

    rows = []
    cells = [(f, m, b) for f in FAMILIES for m in METHODS for b in backends(dry_run)]
    for family, method, backend in cells[:1] if dry_run else cells:
        dtype = torch.bfloat16 if backend == "flash_attention_2" else torch.float32
        start = time.perf_counter()

        def factory(family=family, backend=backend, dtype=dtype):
            return tiny_model(family, attn_implementation=backend, dtype=dtype).to(device)

        report = check_method(factory, method, options(family, method), name=f"{method} on {family} ({backend})")
        result = "refused" if report.refused is not None else ("passes" if report.ok else "fails")
        row = {
            "family": family,
            "method": method,
            "backend": backend,
            "dtype": str(dtype).removeprefix("torch."),
            "result": result,
            "seconds": round(time.perf_counter() - start, 1),
            "detail": report.refused or "; ".join(f"{o.check}: {o.detail}" for o in report.failures),
        }
        rows.append(row)
        print(
            f"{family:6} {method:14} {backend:18} {result:8} {row['seconds']:6.1f} s  {row['detail'][:160]}", flush=True
        )
    return rows


def train_step_bench(device: torch.device, dry_run: bool) -> dict:
    """Prompt tuning and prefix tuning against PEFT on one random Llama: median step time and peak memory."""
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pstar_plugins import build_model

    if dry_run:
        config = LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        dtype, batch, length, steps, warmup = torch.float32, 2, 16, 1, 0
    else:  # about 1.1B parameters, SmolLM2-1.7B/TinyLlama-like shapes
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        )
        dtype, batch, length, steps, warmup = torch.bfloat16, 8, 256, 10, 3
    m = 20
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (batch, length), generator=g).to(device)
    results = {
        "config": {
            "parameters_billion": None,
            "dtype": str(dtype).removeprefix("torch."),
            "batch": batch,
            "length": length,
            "virtual_tokens": m,
            "steps": steps,
        }
    }
    sides = {
        "prompt-tuning": (
            lambda base: build_model(base, "prompt-tuning", num_virtual_tokens=m, init="random"),
            lambda base: get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m)),
        ),
        "prefix-tuning": (
            lambda base: build_model(base, "prefix-tuning", num_virtual_tokens=m, projection=False),
            lambda base: get_peft_model(base, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m)),
        ),
    }
    for method, (ours_of, peft_of) in sides.items():
        row = {}
        for side, make in (("ours", ours_of), ("peft", peft_of)):
            torch.manual_seed(0)
            base = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device)
            results["config"]["parameters_billion"] = round(sum(p.numel() for p in base.parameters()) / 1e9, 3)
            model = make(base).train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-3)
            times = []
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for step in range(warmup + steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if step >= warmup:
                    times.append(time.perf_counter() - start)
            row[side] = {
                "median_seconds": C.median(times),
                "loss": float(loss),
                "peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
            }
            del model, base, optimizer
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["time_vs_peft"] = row["ours"]["median_seconds"] / row["peft"]["median_seconds"]
        if row["ours"]["peak_bytes"]:
            row["memory_vs_peft"] = row["ours"]["peak_bytes"] / row["peft"]["peak_bytes"]
        results[method] = row
        print(
            f"train step {method:14} ours {row['ours']['median_seconds'] * 1e3:8.1f} ms  peft "
            f"{row['peft']['median_seconds'] * 1e3:8.1f} ms  time/peft {row['time_vs_peft']:.2f}"
            + (f"  memory/peft {row['memory_vs_peft']:.2f}" if "memory_vs_peft" in row else ""),
            flush=True,
        )
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the first cell and one bench step, tiny, on the CPU")
    parser.add_argument(
        "--out", type=Path, default=None, help="where the JSON goes (default: bench/results/gpu_check_cuda.json)"
    )
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench/gpu_check.sh needs a CUDA device; on a CPU run it with --dry-run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 cells compare against fp32 references
        torch.backends.cudnn.allow_tf32 = False
    started = time.perf_counter()
    cells = conformance(device, args.dry_run)
    bench = train_step_bench(device, args.dry_run)
    record = {
        "benchmark": "gpu_check",
        "dry_run": args.dry_run,
        "machine": C.machine(),
        "versions": C.versions(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "conformance": cells,
        "train_step": bench,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = args.out or C.RESULTS / "gpu_check_cuda.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    failed = [c for c in cells if c["result"] == "fails"]
    print(f"wrote {out}: {len(cells)} cells ({len(failed)} failing), {record['seconds']} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
