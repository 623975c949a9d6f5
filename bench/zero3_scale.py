"""ZeRO-3 at scale on this machine: a random-init ~1B-parameter Llama, prompt tuning, on 1, 2 and 4 processes.

Reports, side by side in one run:
  * per-rank peak resident memory during model construction, training and the adapter save, the
    same script's peak around a model of next to no parameters (the process baseline), and
    ``(peak - baseline) / (model bytes / N)``: how far a rank holds more than its share of the
    frozen weights (goal: <= 1.1 at every N);
  * adapter save (gathering only the prompt) against ``accelerator.get_state_dict`` with the
    16-bit gather of the whole model: time and bytes gathered (goal: >= 20x faster).

Run:  python bench/zero3_scale.py            (launches itself with 1, 2 and 4 processes, fp32 and bf16)
      python bench/zero3_scale.py --from-runs bench/results/zero3_scale_runs   (the table from recorded runs)
Each run's record goes to ``--out`` (result-<dtype>-<N>[-baseline].json); the table of all of them to
bench/results/zero3_scale.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "zero3_scale.json"
# glibc keeps the buffers of freed all-gathers in its heaps, so a CPU process's RSS creeps up each
# step; serving allocations of 1 MiB and more by mmap returns them to the system when freed
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator, DeepSpeedPlugin, InitProcessGroupKwargs
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pstar_plugins import build_model, param_groups
    from pstar_plugins.mechanisms import distributed

    ds_config = json.loads((ROOT / "integrations" / "deepspeed" / "zero3.json").read_text())
    zero = ds_config["zero_optimization"]
    # keep only a few layers gathered at a time (DeepSpeed's defaults allow up to 1e9 live parameters)
    budget = args.gather_budget
    zero.update(
        stage3_max_live_parameters=budget,
        stage3_prefetch_bucket_size=budget,
        stage3_max_reuse_distance=budget,
        stage3_param_persistence_threshold=1e4,
        stage3_gather_16bit_weights_on_model_save=True,
    )  # needed by the get_state_dict baseline only
    ds_config["bf16"] = {"enabled": args.dtype == "bf16"}  # bf16: DeepSpeed keeps fp32 masters of the prompt
    ds_config["fp16"] = {"enabled": False}
    ds_config["train_micro_batch_size_per_gpu"] = args.batch_size
    ds_config["gradient_accumulation_steps"] = 1
    ds_config["gradient_clipping"] = 1.0
    plugin = DeepSpeedPlugin(hf_ds_config=ds_config, zero3_init_flag=True)
    accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    rank = accelerator.process_index

    if args.baseline:  # the same script around a model of next to no parameters: what a process costs by itself
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
    else:
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=args.layers,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
    t0 = time.perf_counter()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    base = AutoModelForCausalLM.from_config(
        config, dtype=dtype
    )  # built inside deepspeed.zero.Init: already partitioned
    build_seconds = time.perf_counter() - t0
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in base.parameters())
    local_numel = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in base.parameters())
    with distributed.recording_gathers() as init_calls:
        model = build_model(base, "prompt-tuning", num_virtual_tokens=args.prompt_length, init="vocab")
    init_gathers = len(init_calls)
    groups = param_groups(model, 3e-2)
    for g in groups:
        g.pop("name")
    optimizer = torch.optim.AdamW(groups, lr=3e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    after_construction = peak_rss_bytes()

    g = torch.Generator().manual_seed(rank)
    step_seconds, step_rss = [], []
    for _ in range(args.steps):
        ids = torch.randint(3, 32000, (args.batch_size, args.seq_len), generator=g)
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        step_seconds.append(time.perf_counter() - t)
        step_rss.append(current_rss_bytes())
    core = accelerator.unwrap_model(model)

    # ours: gather only the prompt, rank 0 writes
    accelerator.wait_for_everyone()
    t = time.perf_counter()
    with distributed.recording_gathers() as save_calls:
        state = core.trainable_state()
    if accelerator.is_main_process:
        core.save_adapter(Path(args.out) / "adapter", state=state)
    accelerator.wait_for_everyone()
    ours_seconds = time.perf_counter() - t
    ours_bytes = sum(v.numel() * v.element_size() for v in state.values())
    frozen_ids = {id(p) for p in core.parameters() if not p.requires_grad}
    frozen_gathered = len({i for call in save_calls for i in call} & frozen_ids)
    peak_before_baseline = peak_rss_bytes()

    # baseline: the whole model gathered to rank 0 (16-bit gather path of accelerate/DeepSpeed)
    accelerator.wait_for_everyone()
    t = time.perf_counter()
    full = accelerator.get_state_dict(model)
    accelerator.wait_for_everyone()
    baseline_seconds = time.perf_counter() - t
    baseline_bytes = sum(v.numel() * v.element_size() for v in full.values()) if full else 0
    del full

    report = {
        "rank": rank,
        "peak_rss_after_construction": after_construction,
        "peak_rss_train_and_save": peak_before_baseline,
        "peak_rss_after_full_gather": peak_rss_bytes(),
        "local_numel": local_numel,
        "rss_after_each_step": step_rss,
    }
    reports = [None] * accelerator.num_processes
    dist.all_gather_object(reports, report)
    if accelerator.is_main_process:
        full_fp32 = numel * 4
        result = {
            "benchmark": "zero3_scale",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                "accelerator": "cpu (DS_ACCELERATOR=cpu, gloo)",
            },
            "versions": {
                "torch": torch.__version__,
                "deepspeed": __import__("deepspeed").__version__,
                "transformers": __import__("transformers").__version__,
                "accelerate": __import__("accelerate").__version__,
            },
            "processes": accelerator.num_processes,
            "frozen_dtype": args.dtype,
            "gather_budget": args.gather_budget,
            "model": {
                "parameters": numel,
                "layers": args.layers,
                "full_fp32_bytes": full_fp32,
                "build_seconds": round(build_seconds, 2),
            },
            "prompt": {"num_virtual_tokens": args.prompt_length, "init_gather_calls": init_gathers},
            "train": {
                "steps": args.steps,
                "batch_per_rank": args.batch_size,
                "seq_len": args.seq_len,
                "median_step_seconds": sorted(step_seconds)[len(step_seconds) // 2],
            },
            "ranks": reports,
            "memory": {
                "max_peak_rss_train_and_save": max(r["peak_rss_train_and_save"] for r in reports),
                "ratio_to_full_fp32": max(r["peak_rss_train_and_save"] for r in reports) / full_fp32,
                "goal": "<= 0.6",
            },
            "save": {
                "ours_seconds": ours_seconds,
                "ours_bytes_gathered": ours_bytes,
                "ours_frozen_parameters_gathered": frozen_gathered,
                "get_state_dict_seconds": baseline_seconds,
                "get_state_dict_bytes_gathered": baseline_bytes,
                "speedup": baseline_seconds / ours_seconds,
                "goal": ">= 20x",
            },
        }
        Path(args.result_file).write_text(json.dumps(result, indent=2))
        gib = 2**30
        print(
            f"\nZeRO-3 ({args.dtype} frozen weights), {accelerator.num_processes} processes, random-init Llama "
            f"{numel / 1e9:.2f}B params (fp32 {full_fp32 / gib:.2f} GiB)"
        )
        for r in reports:
            print(
                f"  rank {r['rank']}: peak RSS {r['peak_rss_train_and_save'] / gib:.2f} GiB during build/train/save "
                f"({r['peak_rss_train_and_save'] / full_fp32:.2f}x full fp32), "
                f"{r['peak_rss_after_full_gather'] / gib:.2f} GiB after the full gather"
            )
        print(
            f"  adapter save  : {ours_seconds * 1e3:9.1f} ms, {ours_bytes / 1e3:10.1f} kB gathered, frozen params "
            f"gathered: {frozen_gathered}"
        )
        print(f"  get_state_dict: {baseline_seconds * 1e3:9.1f} ms, {baseline_bytes / 1e3:10.1f} kB gathered")
        print(
            f"  speedup {baseline_seconds / ours_seconds:.0f}x; median train step "
            f"{result['train']['median_step_seconds']:.2f} s"
        )
    accelerator.end_training()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=20, help="decoder layers (20: about 1.03B parameters)")
    parser.add_argument("--steps", type=int, default=3, help="training steps")
    parser.add_argument("--batch-size", type=int, default=2, help="rows per rank")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per row")
    parser.add_argument("--prompt-length", type=int, default=20, help="virtual tokens")
    parser.add_argument(
        "--processes", type=int, nargs="+", default=[1, 2, 4], help="process counts to launch, one run each"
    )
    parser.add_argument(
        "--gather-budget",
        type=float,
        default=5e7,
        metavar="PARAMS",
        help="stage3_max_live_parameters, prefetch bucket and reuse distance (parameters)",
    )
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both", help="dtype of the frozen model")
    parser.add_argument("--result-file", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="/tmp/pstar-zero3-scale", help="where the adapter is written")
    parser.add_argument(
        "--from-runs",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="only rebuild the table from the per-run records in DIR(s) (e.g. bench/results/zero3_scale_runs)",
    )
    args, rest = parser.parse_known_args()
    if args.worker:
        worker(args)
        return
    if args.from_runs:
        write_table(args.from_runs)
        return
    env = {
        **os.environ,
        **MALLOC_ENV,
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
        "OMP_NUM_THREADS": "1",
    }
    skip = {"--dtype", "--processes"}
    forwarded, drop = [], False
    for a in sys.argv[1:]:  # everything but the loops' own flags and values
        if a.split("=", 1)[0] in skip:
            drop = "=" not in a
            continue
        if drop and not a.startswith("--"):
            continue
        drop = False
        forwarded.append(a)

    def launch(dtype: str, processes: int, baseline: bool) -> None:
        part = Path(args.out) / f"result-{dtype}-{processes}{'-baseline' if baseline else ''}.json"
        part.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            "29541",
            __file__,
            "--worker",
            "--dtype",
            dtype,
            "--result-file",
            str(part),
            *(["--baseline"] if baseline else []),
            *forwarded,
        ]
        code = subprocess.call(cmd, env=env)
        if code:
            raise SystemExit(code)

    for dtype in ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]:
        for n in args.processes:
            launch(dtype, n, baseline=False)
            launch(dtype, n, baseline=True)
    write_table([Path(args.out)])


def row(run: dict, base: dict) -> dict:
    """One table row from a run's record and its baseline's (the same script, next to no parameters)."""
    dtype, n = run["frozen_dtype"], run["processes"]
    model_bytes = run["model"]["parameters"] * (2 if dtype == "bf16" else 4)
    peak = run["memory"]["max_peak_rss_train_and_save"]
    baseline = base["memory"]["max_peak_rss_train_and_save"]
    return {
        "frozen_dtype": dtype,
        "processes": n,
        "model_bytes": model_bytes,
        "peak_rss_per_rank": peak,
        "peak_rss_after_build": max(r["peak_rss_after_construction"] for r in run["ranks"]),
        "baseline_rss_per_rank": baseline,
        "share_bytes": model_bytes / n,
        "ratio_above_baseline_to_share": (peak - baseline) / (model_bytes / n),
        "train": run["train"],
        "median_step_seconds": run["train"]["median_step_seconds"],
        "save": run["save"],
        "run_date": run["date"],
    }


def write_table(folders: list[Path]) -> None:
    """The table of every run recorded in ``folders`` (``result-<dtype>-<N>.json`` beside its
    ``-baseline``), written to bench/results/zero3_scale.json and printed."""
    rows = []
    for folder in folders:
        for path in sorted(folder.glob("result-*-*.json")):
            if path.stem.endswith("-baseline"):
                continue
            base = path.with_name(f"{path.stem}-baseline.json")
            if base.is_file():
                rows.append(row(json.loads(path.read_text()), json.loads(base.read_text())))
    rows.sort(key=lambda r: (r["frozen_dtype"] != "fp32", r["processes"]))
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(
        json.dumps(
            {
                "benchmark": "zero3_scale",
                "goal": "(peak - baseline) / (model bytes / N) <= 1.1",
                "runs": [str(f) for f in folders],
                "rows": rows,
            },
            indent=2,
        )
    )
    gib = 2**30
    print(
        "\n| frozen | N | share (model / N) | peak RSS per rank | after the build | baseline | (peak − baseline) / "
        "share | steps × rows×tokens per rank |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["train"]
        print(
            f"| {r['frozen_dtype']} | {r['processes']} | {r['share_bytes'] / gib:.2f} GiB | "
            f"{r['peak_rss_per_rank'] / gib:.2f} GiB "
            f"| {r['peak_rss_after_build'] / gib:.2f} GiB | {r['baseline_rss_per_rank'] / gib:.2f} GiB "
            f"| {r['ratio_above_baseline_to_share']:.2f} | {t['steps']} × {t['batch_per_rank']}×{t['seq_len']} tokens |"
        )
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
