"""What a run tells its user: the start lines, the save record, the summary and the plot."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger("pstar_plugins.train")


def save_record(core, state: dict, calls: list) -> dict:
    """What the final save gathered (``calls``, recorded; under ZeRO-3: the method's partitions
    only, no frozen weight)."""
    gathered_ids = {i for call in calls for i in call}
    frozen_ids = {id(p) for p in core.parameters() if not p.requires_grad}
    return {
        "gather_calls": len(calls),
        "gathered_parameters": len(gathered_ids),
        "frozen_parameters_gathered": len(gathered_ids & frozen_ids),
        "bytes": sum(t.numel() * t.element_size() for t in state.values()),
    }


def _is_cpu_notice(record: logging.LogRecord) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


def quiet_third_party(interactive: bool) -> None:
    """Keep other libraries' notices out of a normal run's output: DeepSpeed's "Setting
    accelerator to CPU" on machines without a GPU, and, in a log file, the weight-loading bar."""
    logging.getLogger("DeepSpeed").addFilter(_is_cpu_notice)  # the logger DeepSpeed writes through
    if not interactive:
        # tqdm reads TQDM_DISABLE when it is imported: other libraries' bars (GGUF conversion, ...)
        os.environ.setdefault("TQDM_DISABLE", "1")
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def summary_text(args, results: dict, metric: str, written: list[Path]) -> str:
    """The closing report: the scores (with their scales) and every file this run wrote."""
    from pstar_plugins.train.tasks import BY_METRIC

    lines = ["", "-" * 60, f"method {args.method} on {args.model}", *BY_METRIC[metric].summary_lines(results)]
    lines += _run_size_lines(args, results, metric)
    lines.append("  files written:")
    lines += [f"    {p}{'/' if p.is_dir() else ''}" for p in written]
    lines.append("-" * 60)
    return "\n".join(lines)


def _run_size_lines(args, results: dict, metric: str) -> list[str]:
    """How much the run trained, and what the selection split chose."""
    if "steps" not in results:
        return []
    lines = [f"  fast paths             : {line}" for line in results.get("fast_paths", [])[:1]]
    lines += [f"                           {line}" for line in results.get("fast_paths", [])[1:]]
    lines += [
        f"  training               : {results['steps']} steps, {results['examples_seen']} examples seen "
        f"({results['train_rows']} training rows)"
        + (f"; the preset expects {results['expected_examples']}" if results.get("expected_examples") else "")
    ]
    if results.get("early_stopped_at"):
        lines.append(f"  early stop             : at step {results['early_stopped_at']} (--early-stopping-patience)")
    chosen = results.get("selection")
    if chosen and chosen["best_step"] is not None:
        lines.append(
            f"  selection split        : {chosen['rows']} rows; best {metric} {chosen[f'best_{metric}']:.4f} at step "
            f"{chosen['best_step']}, last {chosen[f'last_{metric}']:.4f} at step {chosen['last_step']}; "
            f"saved: the {'best' if chosen['select'] == 'best' else 'last'} step's adapter"
        )
    return lines


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, v in enumerate(values, start=1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight**i))
    return out


def write_plot(
    history, path: Path, method: str, metric: str = "accuracy", subset: int = 0, periodic_on_selection: bool = False
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; no plot written (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["step"], history["loss"], color="tab:blue", alpha=0.25, linewidth=0.8, label="training loss (raw)")
    ax.plot(history["step"], smooth(history["loss"]), color="tab:blue", label="training loss (smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax2 = ax.twinx()
    # the periodic evaluations score a subset, the last one the whole dev set: two series, not one line
    periodic = list(zip(history["eval_step"][:-1], history[metric][:-1]))
    if periodic:
        label = (
            f"selection-split {metric}"
            if periodic_on_selection
            else f"dev {metric}, first {subset} rows"
            if subset
            else f"dev {metric}"
        )
        ax2.plot(*zip(*periodic), "o-", color="tab:red", label=label)
    if history["eval_step"]:
        ax2.plot(
            history["eval_step"][-1:],
            history[metric][-1:],
            "*",
            color="black",
            markersize=12,
            label=f"final dev {metric}, all rows",
        )
    ax2.set_ylabel(f"dev {metric}", color="tab:red")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="best", fontsize=8)
    ax.set_title(f"{method}: training loss and dev {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
