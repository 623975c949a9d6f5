"""Run the side-by-side performance benchmarks and regenerate the performance table of docs/performance.md.

    python bench/run_all.py                 # train_step, mixed_tasks, generation; ZeRO-3 results as recorded
    python bench/run_all.py --with-zero3    # also rerun bench/zero3_scale.py (about 10 minutes more)
    python bench/run_all.py --table-only    # rebuild the table from bench/results/*.json

On a GPU machine the same scripts write ``*_cuda.json`` and the table names the card.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SCRIPTS = ("train_step", "mixed_tasks", "generation")


def _load(name: str) -> dict | None:
    suffix = "" if C.device().type == "cpu" else f"_{C.device().type}"
    path = C.RESULTS / f"{name}{suffix}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _ok(value: float, goal: str) -> str:
    op, bound = goal.split()
    met = value <= float(bound) if op == "<=" else value >= float(bound)
    return "met" if met else "**not met**"


def table() -> str:
    lines = []
    ts = _load("train_step")
    if ts:
        g = ts["goals"]
        lines += [
            f"Training step on SmolLM2-135M-Instruct ({ts['dtype']}, m = {ts['virtual_tokens']}), median of "
            f"{ts['repeats']} "
            f"alternating runs; {ts['machine']['accelerator']}, {ts['machine']['cpus']} cores, {ts['date'][:10]}:",
            "",
            "| workload | method | ours | PEFT | floor | time / PEFT | time / floor | peak mem / PEFT | "
            "checkpointed mem / PEFT | ours padded: time, mem / PEFT |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for wname, w in ts["workloads"].items():
            b = w["batch"]
            for method, r in w["methods"].items():
                lines.append(
                    f"| {wname} ({b['rows']}×{b['length']}) | {method} | {1e3 * r['ours']['median_seconds']:.0f} ms | "
                    f"{1e3 * r['peft']['median_seconds']:.0f} ms | {1e3 * r['floor']['median_seconds']:.0f} ms | "
                    f"{r['time_vs_peft']:.2f} ({_ok(r['time_vs_peft'], g['time_vs_peft'])}) | "
                    f"{r['time_vs_floor']:.2f} ({_ok(r['time_vs_floor'], g['time_vs_floor'])}) | "
                    f"{r['memory_vs_peft']:.2f} ({_ok(r['memory_vs_peft'], g['memory_vs_peft'])}) | "
                    f"{r['checkpointed_memory_vs_peft']:.2f} "
                    f"({_ok(r['checkpointed_memory_vs_peft'], g['checkpointed_memory_vs_peft'])}) | "
                    + (
                        f"{r['padded_time_vs_peft']:.2f}, {r['padded_memory_vs_peft']:.2f} |"
                        if "padded_time_vs_peft" in r
                        else "– |"
                    )
                )
        lines.append(
            "\nGoals: time ≤ 0.9× PEFT and ≤ 1.05× the floor; peak memory ≤ 0.7× PEFT; with gradient checkpointing "
            "≤ 0.4× PEFT without."
        )
    mt = _load("mixed_tasks")
    if mt:
        lines += [
            "",
            f"Mixed-task inference, {next(iter(mt['methods'].values()))['rows']} rows over 4 task prompts, "
            f"{mt['date'][:10]} (goal ≥ 3×):",
            "",
            "| method | ours, one pass | PEFT, adapter by adapter | throughput ratio |",
            "|---|---|---|---|",
        ]
        for method, r in mt["methods"].items():
            lines.append(
                f"| {method} | {r['ours']['rows_per_second']:.1f} rows/s | {r['peft']['rows_per_second']:.1f} rows/s | "
                f"{r['throughput_ratio']:.2f}× ({_ok(r['throughput_ratio'], mt['goal']['throughput_ratio'])}) |"
            )
    gen = _load("generation")
    if gen:
        lines += [
            "",
            f"Generation with a tuned prefix (m = {gen['virtual_tokens']}, greedy, {gen['new_tokens']} new "
            f"tokens), {gen['date'][:10]} (goal: first token ≥ 1.2× faster):",
            "",
            "| batch (prompt padding) | first token: ours / PEFT / no prefix / ours padded | speed-up | tokens/s: "
            "ours / PEFT / no prefix |",
            "|---|---|---|---|",
        ]
        for key, r in gen["results"].items():
            padding = gen.get("prompt_padding_fraction", {}).get(key)
            padded = f" / {1e3 * r['ours padded']['ttft_seconds']:.1f}" if "ours padded" in r else ""
            lines.append(
                f"| {key.split('_')[1]}{f' ({100 * padding:.0f}%)' if padding is not None else ''} | "
                f"{1e3 * r['ours']['ttft_seconds']:.1f} / {1e3 * r['peft']['ttft_seconds']:.1f} / "
                f"{1e3 * r['no prefix']['ttft_seconds']:.1f}{padded} ms | {r['ttft_speedup_vs_peft']:.2f}× "
                f"({_ok(r['ttft_speedup_vs_peft'], gen['goal']['ttft_speedup_vs_peft'])}) | "
                f"{r['ours']['tokens_per_second']:.0f} / {r['peft']['tokens_per_second']:.0f} / "
                f"{r['no prefix']['tokens_per_second']:.0f} |"
            )
    z = C.RESULTS / "zero3_scale.json"
    if z.is_file():
        runs = json.loads(z.read_text())["runs"]
        lines += [
            "",
            "ZeRO-3, 1.03B-parameter Llama, 2 processes (`bench/zero3_scale.py`):",
            "",
            "| frozen weights | adapter save vs full 16-bit gather | peak RSS per rank / full fp32 model |",
            "|---|---|---|",
        ]
        for dtype, r in runs.items():
            lines.append(
                f"| {dtype} | {r['save']['speedup']:.0f}× faster ({r['save']['ours_bytes_gathered'] / 1e3:.0f} kB vs "
                f"{r['save']['get_state_dict_bytes_gathered'] / 1e9:.1f} GB) | {r['memory']['ratio_to_full_fp32']:.2f} "
                f"({_ok(r['memory']['ratio_to_full_fp32'], '<= 0.6')}) |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--with-zero3", action="store_true")
    p.add_argument("--table-only", action="store_true")
    p.add_argument(
        "--only",
        nargs="+",
        choices=list(SCRIPTS),
        default=list(SCRIPTS),
        help="scripts to rerun; the others keep their recorded results in the table",
    )
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args(argv)
    if not args.table_only:
        scripts = [s for s in SCRIPTS if s in args.only] + (["zero3_scale"] if args.with_zero3 else [])
        for name in scripts:
            started = time.perf_counter()
            cmd = [sys.executable, str(C.ROOT / "bench" / f"{name}.py")] + (
                ["--dtype", args.dtype] if name in SCRIPTS else []
            )
            print(f"== {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True, cwd=C.ROOT)
            print(f"== {name}: {time.perf_counter() - started:.0f} s", flush=True)
    text = table()
    print("\n" + text)
    if C.device().type == "cpu":
        from quality_results import write_between_markers

        write_between_markers(C.ROOT / "docs" / "performance.md", "perf-table", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
