"""Quality of tuned prompts against prompting baselines, through the user's own commands.

1. SST-2 dev accuracy on frozen SmolLM2-135M-Instruct: zero-shot, 4-shot and 8-shot in-context
   learning (class-balanced demonstrations, ``--seeds`` draws, mean ± std) with ``pstar eval``,
   and each of the four methods trained with ``accelerate launch -m pstar_plugins.train``.
2. P-tuning v2 with a linear head on frozen all-MiniLM-L6-v2 against full fine-tuning of the same
   model (same encoder, same inputs, same pooling and head shape) at the same example budget: the
   same ``--minilm-examples`` labelled examples and the same number of steps for both.
3. E2E data-to-text (dev subset, greedy decoding): BLEU and ROUGE-L of prefix tuning and prompt
   tuning on SmolLM2.

Training data: SST-2 train and E2E train from ``../shared/data`` when present (otherwise the
packaged SST-2 sample; E2E is then skipped). Writes bench/results/quality.json (machine, date,
every command's settings) and regenerates the README's quality table.

    python bench/quality.py [--steps 300] [--only sst2-methods icl minilm e2e]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PARTS = ("icl", "sst2-methods", "minilm", "e2e")
# per-method settings for SmolLM2 on SST-2 (docs/recipes.md explains the choices)
SST2_METHODS = {
    "prompt-tuning": [],
    "prefix-tuning": [],
    "p-tuning": [],
    "p-tuning-v2": [],
}


def launch(args: list[str], log: Path) -> None:
    """``accelerate launch`` of the training script with every core, output to ``log``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_cpu_threads_per_process",
           str(os.cpu_count() or 1), "-m", "pstar_plugins.train", *args]
    started = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=C.ROOT).returncode
    if code != 0:
        raise SystemExit(f"training failed ({code}); see {log}")
    print(f"  done in {time.perf_counter() - started:.0f} s ({log})", flush=True)


def sst2_files() -> tuple[str, str]:
    from pstar_plugins.models import packaged_data

    full = C.SHARED_DATA / "sst2" / "train.tsv"
    return (str(full) if full.is_file() else packaged_data("sst2_train_sample.tsv")), packaged_data("sst2_dev.tsv")


def run_icl(args, work: Path) -> dict:
    out = work / "icl.json"
    cmd = [sys.executable, "-m", "pstar_plugins.evaluate", "--model", "smollm2", "--shots", "0", "4", "8",
           "--seeds", str(args.seeds), "--output", str(out)]
    print("ICL:", " ".join(cmd[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=C.ROOT)
    result = json.loads(out.read_text())
    # contextual calibration (Zhao et al. 2021) of the same draws: small models' in-context
    # predictions lean towards one label, which calibration is meant to undo
    calibrated = work / "icl-calibrated.json"
    cmd = cmd[:cmd.index("--shots")] + ["--shots", "4", "8", "--seeds", str(args.seeds), "--calibrate", "--output", str(calibrated)]
    print("ICL calibrated:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=C.ROOT)
    result["runs"] += json.loads(calibrated.read_text())["runs"]
    result["seconds"] = time.perf_counter() - started
    return result


def run_sst2_methods(args, work: Path) -> dict:
    train, dev = sst2_files()
    results = dict(getattr(args, "previous", {}).get("sst2_methods", {}))  # methods not rerun keep their results
    overrides = dict(args.method_args)
    for method in args.methods:
        extra = SST2_METHODS[method] + overrides.get(method, [])
        run_dir = work / f"sst2-{method}"
        cmd = ["--method", method, "--model", "smollm2", "--train-file", train, "--validation-file", dev,
               "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--warmup-steps", str(args.steps // 10),
               "--eval-steps", str(args.steps // 3), "--eval-subset-size", "200", "--no-zero-shot",
               "--output-dir", str(run_dir), "--overwrite", "--seed", str(args.seed), *extra]
        print(f"SST-2 {method}: train {' '.join(cmd)}", flush=True)
        launch(cmd, work / f"sst2-{method}.log")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        results[method] = {"accuracy": metrics["tuned_accuracy"], "steps": args.steps, "batch_size": args.batch_size,
                           "options": extra, "command": cmd, "trainable_parameters": metrics["trainable_parameters"],
                           "curve": dict(zip(metrics["history"]["eval_step"], metrics["history"]["accuracy"]))}
        print(f"  {method}: {metrics['tuned_accuracy']:.4f}", flush=True)
    return results


def full_finetune_minilm(train_rows, train_labels, dev_rows, dev_labels, steps, batch_size, lr, seed, template, pooling) -> dict:
    """Every weight of MiniLM trained, with the same inputs (the verbalizer's encoding of the
    template), the same pooling and a linear head, at the same example budget."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    from pstar_plugins.models import load
    from pstar_plugins.tasks.template import Template
    from pstar_plugins.tasks.verbalizer import Verbalizer

    torch.manual_seed(seed)
    mlm, tokenizer = load("minilm", kind="masked-lm")
    encoder = mlm.bert if hasattr(mlm, "bert") else mlm.base_model
    hidden = encoder.config.hidden_size
    head = nn.Sequential(nn.Dropout(0.1), nn.Linear(hidden, 2))
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    verbalizer = Verbalizer(tokenizer, Template.parse(template), C.LABEL_WORDS, masked_lm=True)
    rng = random.Random(seed)
    order: list[int] = []

    def logits(rows):
        enc = verbalizer.encode(rows, max_length=128)
        mask = enc.inputs["attention_mask"]
        out = encoder(input_ids=enc.inputs["input_ids"], attention_mask=mask).last_hidden_state
        if pooling == "mean":
            pooled = (out * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        else:
            pooled = out[:, 0]
        return head(pooled)

    encoder.train()
    head.train()
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(train_rows)))
            rng.shuffle(fresh)
            order += fresh
        pick, order = order[:batch_size], order[batch_size:]
        loss = F.cross_entropy(logits([train_rows[i] for i in pick]), torch.tensor([train_labels[i] for i in pick]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    encoder.eval()
    head.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(dev_rows), 64):
            pred = logits(dev_rows[i:i + 64]).argmax(-1)
            correct += int((pred == torch.tensor(dev_labels[i:i + 64])).sum())
    return {"accuracy": correct / len(dev_rows), "trainable_parameters": sum(p.numel() for p in params), "learning_rate": lr}


def run_minilm(args, work: Path) -> dict:
    from pstar_plugins.tasks.data import labels_of, read_examples

    train, dev = sst2_files()
    run_dir = work / "minilm-p-tuning-v2"
    template = "Review: {sentence} Sentiment:{answer}"
    steps, examples = args.minilm_steps, args.minilm_examples
    cmd = ["--method", "p-tuning-v2", "--model", "minilm", "--model-kind", "masked-lm", "--train-file", train,
           "--validation-file", dev, "--max-train-samples", str(examples), "--max-steps", str(steps),
           "--batch-size", str(args.batch_size), "--warmup-steps", str(steps // 10), "--eval-steps", "0", "--output-dir", str(run_dir), "--overwrite",
           "--seed", str(args.seed), "--template", template, "--learning-rate", str(args.minilm_lr),
           "--num-virtual-tokens", str(args.minilm_virtual_tokens),
           # all-MiniLM-L6-v2 was trained to give sentence embeddings by mean pooling (its 1_Pooling config)
           "--pooling", "mean"]
    print(f"MiniLM p-tuning-v2: train {' '.join(cmd)}", flush=True)
    launch(cmd, work / "minilm-p-tuning-v2.log")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ours = {"accuracy": metrics["tuned_accuracy"], "trainable_parameters": metrics["trainable_parameters"], "command": cmd}
    print(f"  p-tuning-v2: {ours['accuracy']:.4f}; full fine-tuning ...", flush=True)
    train_rows = read_examples(train)[:examples]  # the same labelled examples --max-train-samples keeps
    dev_rows = read_examples(dev)
    started = time.perf_counter()
    full = full_finetune_minilm(train_rows, labels_of(train_rows, "label", train, C.LABEL_WORDS), dev_rows,
                                labels_of(dev_rows, "label", dev, C.LABEL_WORDS), steps, args.batch_size,
                                args.full_finetune_lr, args.seed, template, pooling="mean")
    full["seconds"] = time.perf_counter() - started
    print(f"  full fine-tuning: {full['accuracy']:.4f}", flush=True)
    return {"steps": steps, "batch_size": args.batch_size, "training_examples": len(train_rows),
            "epochs": steps * args.batch_size / len(train_rows),
            "p-tuning-v2": ours, "full-finetuning": full, "gap_points": 100 * (full["accuracy"] - ours["accuracy"])}


def run_e2e(args, work: Path) -> dict:
    train = C.SHARED_DATA / "e2e" / "trainset.csv"
    dev = C.SHARED_DATA / "e2e" / "devset.csv"
    if not train.is_file():
        print("E2E: ../shared/data/e2e not found; skipped", flush=True)
        return {"skipped": "no E2E data"}
    results = {}
    for method in ("prefix-tuning", "prompt-tuning"):
        run_dir = work / f"e2e-{method}"
        cmd = ["--task", "generation", "--method", method, "--model", "smollm2", "--train-file", str(train),
               "--validation-file", str(dev), "--template", C.E2E_TEMPLATE.replace("\n", "\\n"), "--target-column", "ref",
               "--max-steps", str(args.e2e_steps), "--batch-size", "8", "--warmup-steps", str(args.e2e_steps // 10),
               "--eval-steps", "0", "--max-eval-samples", str(args.e2e_eval_rows), "--max-new-tokens", "48",
               "--output-dir", str(run_dir), "--overwrite", "--seed", str(args.seed), "--no-zero-shot"]
        print(f"E2E {method}: train {' '.join(cmd)}", flush=True)
        launch(cmd, work / f"e2e-{method}.log")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        scores = metrics["generation_scores"]["final eval"]
        results[method] = {"bleu": scores["bleu"], "rouge_l": scores["rouge_l"], "sources": scores["sources"],
                           "example": scores["example"][:2], "command": cmd}
        print(f"  {method}: BLEU {scores['bleu']:.2f} ROUGE-L {scores['rouge_l']:.2f} over {scores['sources']} MRs", flush=True)
    return results


def readme_table(result: dict) -> str:
    dates = {k: v[:10] for k, v in result.get("part_dates", {}).items()}
    when = "; ".join(f"{label} {dates[k]}" for k, label in (("icl", "prompting baselines"), ("sst2_methods", "SmolLM2 methods"),
                                                           ("minilm", "MiniLM"), ("e2e", "E2E")) if k in dates)
    lines = [f"Measured by `python bench/quality.py` on {result['machine']['cpus']} CPU cores ({when or result['date'][:10]}; "
             f"bench/results/quality.json).", "",
             "| SST-2 dev (872), frozen SmolLM2-135M-Instruct | accuracy |", "|---|---|"]
    for r in result.get("icl", {}).get("runs", []):
        k = r["shots"]
        std = f" ± {100 * r['accuracy_std']:.1f}" if r.get("seeds", 1) > 1 else ""
        name = "zero-shot prompt" if k == 0 else f"{k}-shot in-context ({r['seeds']} draws)"
        if "calibrated" in r["name"]:
            name += ", contextual calibration"
        lines.append(f"| {name} | {100 * r['accuracy']:.1f}{std} |")
    for method, r in result.get("sst2_methods", {}).items():
        options = "; " + " ".join(r["options"]) if r.get("options") else ""
        lines.append(f"| {method} ({r.get('steps', result['steps'])} steps × {r.get('batch_size', result['batch_size'])}{options}) | {100 * r['accuracy']:.1f} |")
    m = result.get("minilm")
    if m:
        budget = (f"{m['training_examples']:,} labelled examples, {m['steps']} steps × {m['batch_size']} ({m['epochs']:.0f} epochs) each"
                  if "training_examples" in m else f"{m['examples_seen']} examples")
        lines += ["", f"| SST-2 dev, all-MiniLM-L6-v2, {budget} | accuracy | trained parameters |", "|---|---|---|",
                  f"| P-tuning v2 + linear head (frozen encoder) | {100 * m['p-tuning-v2']['accuracy']:.1f} | {m['p-tuning-v2']['trainable_parameters']:,} |",
                  f"| full fine-tuning | {100 * m['full-finetuning']['accuracy']:.1f} | {m['full-finetuning']['trainable_parameters']:,} |"]
    e = result.get("e2e")
    if e and "skipped" not in e:
        any_run = next(iter(e.values()))
        lines += ["", f"| E2E dev ({any_run['sources']} MRs, greedy), SmolLM2, {result['e2e_steps']} steps × 8 | BLEU | ROUGE-L |", "|---|---|---|"]
        lines += [f"| {method} | {r['bleu']:.1f} | {r['rouge_l']:.1f} |" for method, r in e.items()]
    return "\n".join(lines)


def update_readme(marker: str, text: str) -> None:
    readme = C.ROOT / "README.md"
    content = readme.read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in content or end not in content:
        print(f"README has no {start} … {end} block; table not written there", flush=True)
        return
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def _method_args(text: str) -> tuple[str, list[str]]:
    method, sep, flags = text.partition("=")
    if not sep or method not in SST2_METHODS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected METHOD=FLAGS with METHOD one of {sorted(SST2_METHODS)}")
    return method, shlex.split(flags)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--steps", type=int, default=300, help="SST-2 optimizer steps per method on SmolLM2")
    p.add_argument("--methods", nargs="+", choices=list(SST2_METHODS), default=list(SST2_METHODS),
                   help="SST-2 methods to (re)run; the others keep their recorded results")
    p.add_argument("--method-args", action="append", default=[], type=_method_args, metavar="METHOD=FLAGS",
                   help="extra train flags for one SST-2 method, e.g. 'prompt-tuning=--num-virtual-tokens 20' (repeatable; recorded)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3, help="demonstration draws per k")
    p.add_argument("--e2e-steps", type=int, default=200)
    p.add_argument("--e2e-eval-rows", type=int, default=400, help="first N E2E dev rows (grouped by MR)")
    p.add_argument("--full-finetune-lr", type=float, default=5e-5)
    p.add_argument("--minilm-lr", type=float, default=2e-2, help="P-tuning v2 learning rate on MiniLM")
    p.add_argument("--minilm-virtual-tokens", type=int, default=16)
    p.add_argument("--minilm-examples", type=int, default=9600, help="labelled SST-2 examples both MiniLM contenders train on")
    p.add_argument("--minilm-steps", type=int, default=1800, help="optimizer steps of both MiniLM contenders (1800 × 16 = 3 epochs of 9,600)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--work-dir", default=str(C.ROOT / "runs" / "bench-quality"))
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    path = C.RESULTS / "quality.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    result = {k: previous[k] for k in ("icl", "sst2_methods", "minilm", "e2e") if k in previous}  # parts not rerun
    # when each part was measured: a part that is not rerun keeps its date
    part_dates = dict(previous.get("part_dates") or {k: previous["date"] for k in result})
    args.previous = previous
    result.update(steps=args.steps, batch_size=args.batch_size, e2e_steps=args.e2e_steps, seed=args.seed,
                  sst2_train_file=sst2_files()[0])
    parts = {"icl": ("icl", run_icl), "sst2-methods": ("sst2_methods", run_sst2_methods),
             "minilm": ("minilm", run_minilm), "e2e": ("e2e", run_e2e)}
    for part in PARTS:
        if part in args.only:
            key, run = parts[part]
            result[key] = run(args, work)
            part_dates[key] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            result["part_dates"] = part_dates
            C.write_result("quality", result)  # each finished part is kept if a later one fails
    best = max(result.get("sst2_methods", {}).items(), key=lambda kv: kv[1]["accuracy"], default=None)
    result["targets"] = {
        "best_method_sst2_at_least_0.88": None if best is None else {"method": best[0], "accuracy": best[1]["accuracy"], "met": best[1]["accuracy"] >= 0.88},
        "minilm_within_2_points": None if "minilm" not in result else {"gap_points": result["minilm"]["gap_points"], "met": result["minilm"]["gap_points"] <= 2.0},
    }
    written = C.write_result("quality", result)
    record = json.loads(written.read_text())
    table = readme_table(record)
    print("\n" + table)
    update_readme("quality-table", table)
    print("wrote", written)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
