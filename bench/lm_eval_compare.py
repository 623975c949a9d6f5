"""lm-evaluation-harness scores an adapter as ``pstar eval --adapter`` does.

The adapter is exported with ``pstar export --format peft``; lm-eval's Hugging Face model loads
it with ``peft=`` and scores a local multiple-choice task written from the adapter's own task
record (template up to ``{answer}``, label words as the choices, `` `` as target delimiter) over
the same rows ``pstar eval`` reads (written once as JSON lines, so both read identical text).
Both scorers sum the label word's token log-probabilities after the prompt and pick the larger
(lm-eval's ``acc``), so the accuracies agree; per-row log-likelihoods are compared too.

    pip install 'pstar-plugins[lm-eval]'
    python bench/lm_eval_compare.py --adapter runs/quickstart/adapter [--model smollm2] [--max-eval-samples N]

Writes ``bench/results/lm_eval.json`` (``--output``) and prints both accuracies.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TASK = "pstar_classification"


def task_yaml(template, label_words: list[str], data_file: Path) -> str:
    """An lm-eval multiple-choice task over ``data_file`` with ``template``'s text up to its answer slot."""
    from pstar_plugins.contract.errors import AdapterError
    from pstar_plugins.mechanisms.template import Answer, Field, Literal, Soft

    parts = list(template.parts)
    while parts and isinstance(parts[0], Soft):  # p-tuning's leading block: the exported PEFT prompt adds it
        parts.pop(0)
    if not parts or not isinstance(parts[-1], Answer) or any(not isinstance(p, (Literal, Field)) for p in parts[:-1]):
        raise AdapterError(
            f"template {template.text!r}: lm-eval's task needs plain text and {{field}} slots ending in "
            "{answer}, with {soft} tokens (if any) only in front; score such an adapter with "
            "pstar eval --adapter."
        )
    text = "".join(
        p.text.replace("{", "{{ '{' }}").replace("}", "{{ '}' }}") if isinstance(p, Literal) else "{{" + p.name + "}}"
        for p in parts[:-1]
    ).rstrip(" ")
    return "\n".join(
        [
            f"task: {TASK}",
            "dataset_path: json",
            "dataset_kwargs:",
            f"  data_files: {{validation: {json.dumps(str(data_file))}}}",
            "output_type: multiple_choice",
            "validation_split: validation",
            f"doc_to_text: {json.dumps(text)}",
            "doc_to_target: label",
            f"doc_to_choice: {json.dumps([w.strip() for w in label_words])}",
            'target_delimiter: " "',  # pstar scores " " + word after the prompt with trailing spaces removed
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "",
        ]
    )


def pstar_scores(model_name, gguf_file, adapter_dir, template, label_words, rows, batch_size: int) -> torch.Tensor:
    """``(N, C)`` label-word log-probabilities from the library's own verbalizer (what ``pstar eval`` argmaxes)."""
    from pstar_plugins import load_adapter
    from pstar_plugins.models import load
    from pstar_plugins.tasks.verbalizer import Verbalizer

    base, tokenizer = load(model_name, gguf_file=gguf_file)
    model = load_adapter(base, adapter_dir, tokenizer=tokenizer, trainable=False).eval()
    verbalizer = Verbalizer(tokenizer, template, label_words, masked_lm=False)
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            out.append(verbalizer.scores(model, verbalizer.encode(rows[i : i + batch_size])).cpu())
    return torch.cat(out)


def compare(
    adapter: str,
    model_name: str = "smollm2",
    gguf_file: str | None = None,
    validation_file: str | None = None,
    max_eval_samples: int | None = None,
    batch_size: int = 32,
    work_dir: str | None = None,
) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pstar_plugins import evaluate
    from pstar_plugins.contract.errors import AdapterError
    from pstar_plugins.interop.peft import export_peft
    from pstar_plugins.mechanisms.adapter_io import read_adapter
    from pstar_plugins.mechanisms.template import Template, special_tokens
    from pstar_plugins.models import load, packaged_data, resolve
    from pstar_plugins.tasks.data import labels_of, load_split

    meta, _ = read_adapter(adapter)
    task = meta.get("task") or {}
    if task.get("kind") != "classification":
        raise AdapterError(
            f"{adapter} records task {task.get('kind')!r}; this comparison scores classification adapters."
        )
    template, words = Template.parse(task["template"]), list(task["label_words"])
    work = Path(work_dir or tempfile.mkdtemp(prefix="pstar-lm-eval-"))
    source = validation_file or packaged_data("sst2_dev.tsv")
    rows, where = load_split(source, None, None, "validation", max_eval_samples, {})
    labels = labels_of(rows, task.get("label_column", "label"), where, words)
    data = work / "data" / "validation.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(
        "".join(json.dumps({**{f: r[f] for f in template.fields}, "label": y}) + "\n" for r, y in zip(rows, labels))
    )
    (work / "tasks").mkdir(exist_ok=True)
    (work / "tasks" / f"{TASK}.yaml").write_text(task_yaml(template, words, data))

    timings = {}
    started = time.perf_counter()
    base, tokenizer = load(model_name, gguf_file=gguf_file)
    export_peft(adapter, base, work / "peft")  # what `pstar export ADAPTER --format peft` writes
    bos = bool(special_tokens(tokenizer)[0])  # pstar's templates start with the tokenizer's prefix tokens
    del base

    # 1. pstar eval --adapter on the same rows
    started = time.perf_counter()
    argv = [
        "--model",
        model_name,
        "--adapter",
        adapter,
        "--validation-file",
        str(data),
        "--label-column",
        "label",
        "--batch-size",
        str(batch_size),
        "--output",
        str(work / "pstar_eval.json"),
    ]
    if gguf_file:
        argv += ["--gguf-file", gguf_file]
    if evaluate.main(argv) != 0:
        raise RuntimeError("pstar eval failed")
    pstar_acc = json.loads((work / "pstar_eval.json").read_text())["runs"][0]["accuracy"]
    timings["pstar_eval_s"] = time.perf_counter() - started
    ours = pstar_scores(model_name, gguf_file, adapter, template, words, rows, batch_size)

    # 2. lm-eval's HF model with the exported PEFT adapter
    path, gguf = resolve(model_name, gguf_file)
    model_args = {"pretrained": path, "peft": str(work / "peft"), "dtype": "float32", "add_bos_token": bos}
    if gguf:
        model_args["gguf_file"] = gguf
    started = time.perf_counter()
    result = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=[TASK],
        device="cpu",
        task_manager=TaskManager(include_path=str(work / "tasks")),
        batch_size=batch_size,
        log_samples=True,
    )
    timings["lm_eval_s"] = time.perf_counter() - started
    lm_acc = result["results"][TASK]["acc,none"]
    samples = sorted(result["samples"][TASK], key=lambda s: s["doc_id"])
    theirs = torch.tensor([[float(r[0]) for r in s["filtered_resps"]] for s in samples], dtype=torch.float64)
    diff = (theirs - ours.double()).abs()
    report = {
        "model": model_name,
        "adapter": str(adapter),
        "method": meta["method"],
        "validation_data": where,
        "examples": len(rows),
        "template": task["template"],
        "label_words": words,
        "add_bos_token": bos,
        "pstar_eval_accuracy": pstar_acc,
        "lm_eval_accuracy": lm_acc,
        "verbalizer_accuracy": float((ours.argmax(-1) == torch.tensor(labels)).double().mean()),
        "rows_with_different_prediction": int((theirs.argmax(-1) != ours.argmax(-1)).sum()),
        "max_abs_loglik_diff": float(diff.max()),
        "mean_abs_loglik_diff": float(diff.mean()),
        "seconds": timings,
        "work_dir": str(work),
        "lm_eval_command": (
            f"lm_eval --model hf --model_args pretrained={path},"
            + (f"gguf_file={gguf}," if gguf else "")
            + f"peft={work / 'peft'},dtype=float32,add_bos_token={bos} --tasks {TASK} "
            f"--include_path {work / 'tasks'} --device cpu --batch_size {batch_size}"
        ),
    }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--adapter",
        required=True,
        help="a pstar classification adapter (prompt-tuning, prefix-tuning, "
        "p-tuning with soft tokens in front, p-tuning-v2 with --head none)",
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--validation-file", default=None, help="default: the packaged SST-2 dev file")
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--work-dir", default=None, help="where the data, task YAML and PEFT export go (default: a temp dir)"
    )
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "lm_eval.json"))
    args = parser.parse_args(argv)
    report = compare(
        args.adapter,
        args.model,
        args.gguf_file,
        args.validation_file,
        args.max_eval_samples,
        args.batch_size,
        args.work_dir,
    )
    import datetime

    report["date"] = datetime.date.today().isoformat()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"\n{report['examples']} rows, {report['method']} adapter on {report['model']}")
    print(f"  pstar eval --adapter accuracy : {report['pstar_eval_accuracy']:.4f}")
    print(f"  lm-eval (hf, peft=) acc       : {report['lm_eval_accuracy']:.4f}")
    print(f"  rows predicted differently    : {report['rows_with_different_prediction']}")
    print(f"  max |log-likelihood diff|     : {report['max_abs_loglik_diff']:.2e}")
    print(f"  lm-eval command               : {report['lm_eval_command']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
