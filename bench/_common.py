"""What the side-by-side benchmarks share: the machine record, a fast-loading copy of the
offline model, the workloads' batches, peak-memory measurement and alternating timing.

Every script prints a table and writes ``bench/results/<name>.json`` with the machine and date.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"
SST2_TEMPLATE = "Review: {sentence} Sentiment:{answer}"
E2E_TEMPLATE = "Data: {mr}\nText:{answer}"
LABEL_WORDS = ["negative", "positive"]

# glibc keeps freed buffers in its heaps, so a CPU process's RSS stays at its high-water mark;
# serving allocations of 64 KiB and more by mmap returns them at free and makes the peak of one
# step measurable (the same reason bench/zero3_scale.py sets MALLOC_MMAP_THRESHOLD_)
if not torch.cuda.is_available():
    try:
        _libc = ctypes.CDLL("libc.so.6")
        _libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        _libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    except OSError:  # not glibc: peaks include cached heap memory
        _libc = None
else:
    _libc = None


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    info["accelerator"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return info


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "accelerate", "deepspeed", "pstar-plugins"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        **payload,
    }
    path = RESULTS / (f"{name}_{device().type}.json" if device().type != "cpu" else f"{name}.json")
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------ model


def smollm2(dtype: torch.dtype = torch.float32):
    """A fresh SmolLM2-135M-Instruct (frozen weights as in the GGUF file) and its tokenizer.

    The GGUF file is dequantised once and kept as safetensors (``pstar_plugins.models.dequantized_gguf``),
    so the many fresh copies a side-by-side run needs load in about a second.
    """
    from transformers import AutoModelForCausalLM

    from pstar_plugins.models import dequantized_gguf, load_tokenizer, resolve

    path, gguf = resolve("smollm2")
    folder = dequantized_gguf(AutoModelForCausalLM, path, gguf)  # the library's own cache of the weights
    tokenizer = load_tokenizer("smollm2")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device())
    model.requires_grad_(False)
    return model, tokenizer


# ------------------------------------------------------------------------------ data


def sst2_rows(n: int, offset: int = 0) -> list[dict]:
    from pstar_plugins.models import packaged_data
    from pstar_plugins.tasks.data import read_examples

    return read_examples(packaged_data("sst2_dev.tsv"))[offset : offset + n]


def e2e_rows(n: int, offset: int = 0) -> list[dict]:
    """E2E training rows from ``../shared/data`` when present, else a few built-in ones."""
    from pstar_plugins.tasks.data import read_examples

    path = SHARED_DATA / "e2e" / "trainset.csv"
    if path.is_file():
        return read_examples(path, limit=offset + n)[offset : offset + n]
    base = [
        {
            "mr": "name[The Eagle], eatType[coffee shop], food[French], priceRange[moderate], area[riverside]",
            "ref": "The Eagle is a moderately priced French coffee shop by the riverside.",
        },
        {
            "mr": "name[Alimentum], food[Chinese], area[city centre], familyFriendly[no]",
            "ref": "Alimentum serves Chinese food in the city centre and is not family-friendly.",
        },
    ]
    return [base[i % 2] for i in range(offset, offset + n)]


# ------------------------------------------------------------------------------ measuring


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory of a block above what was resident when it started, in bytes.

    GPU: ``torch.cuda.max_memory_allocated``. CPU (Linux): the resident high-water mark, reset
    through ``/proc/self/clear_refs`` before the block and read from ``VmHWM`` after it.
    """

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            if _libc is not None:
                _libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.start = _read_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _read_status_kib("VmHWM") * 1024 - self.start


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def alternate(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each contender, calls interleaved (a, b, c, a, b, c, ...) so that
    drifts of a noisy machine hit all alike; ``warmup`` rounds are run first and dropped."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(warmup + repeats):
        for name, fn in contenders.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def add_common_arguments(parser, repeats: int = 7, warmup: int = 2) -> None:
    """The flags every side-by-side script takes."""
    parser.add_argument("--virtual-tokens", type=int, default=10, help="prompt length m, the same on both sides")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed rounds first")
    parser.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"], help="frozen weights' dtype (bf16 for GPUs)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only (trial runs)")


def dtype_of(args) -> torch.dtype:
    return torch.bfloat16 if args.dtype == "bf16" else torch.float32
