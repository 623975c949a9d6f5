"""Evaluate a frozen model with a discrete template (zero-shot, k-shot in-context) or with a
tuned adapter, on a classification file: accuracy and macro-F1, as JSON and a printed table.

    python -m pstar_plugins.evaluate --model smollm2 --shots 0 4 8 --seeds 3
    python -m pstar_plugins.evaluate --model smollm2 --adapter runs/quickstart/adapter
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from pstar_plugins.errors import run_reporting_errors


def parse_args(argv=None):
    from pstar_plugins.models import packaged_data

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="offline alias (smollm2, minilm), a local folder, or any hub model id")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model's folder")
    p.add_argument("--model-kind", default="causal-lm", choices=["causal-lm", "masked-lm"], help="which head to load")
    p.add_argument("--adapter", default=None, help="a tuned adapter directory to evaluate instead of the baselines")
    p.add_argument("--validation-file", default=packaged_data("sst2_dev.tsv"), help="evaluation data (.csv, .tsv, .jsonl)")
    p.add_argument("--dataset", default=None, help="a Hugging Face datasets id or local dataset folder instead of the files")
    p.add_argument("--dataset-config", default=None, help="the dataset's configuration (e.g. sst2 for glue)")
    p.add_argument("--validation-split", default="validation", help="--dataset split to evaluate on")
    p.add_argument("--demonstration-split", default="train", help="--dataset split the demonstrations come from")
    p.add_argument("--column", action="append", default=[], metavar="DATA_COLUMN=NAME",
                   help="rename a data column to the name the template or --label-column uses (repeatable)")
    p.add_argument("--demonstration-file", default=packaged_data("sst2_train_sample.tsv"), help="where in-context demonstrations come from")
    p.add_argument("--template", default="Review: {sentence} Sentiment:{answer}", help="template with {column} slots and one {answer} slot")
    p.add_argument("--label-column", default="label", help="column with the class")
    p.add_argument("--label-words", nargs="+", default=["negative", "positive"], help="one word per class, in class order")
    p.add_argument("--shots", type=int, nargs="+", default=[0], help="numbers of in-context demonstrations (0: zero-shot)")
    p.add_argument("--seeds", type=int, default=3, help="demonstration draws per k > 0 (mean ± std over them)")
    p.add_argument("--calibrate", action="store_true", help="contextual calibration with a content-free input")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="run the demonstrations with every batch instead of computing their key/value cache once")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                   help="with --adapter: score on real tokens only, rows packed padding-free (same scores)")
    p.add_argument("--max-eval-samples", type=int, default=None, help="use only the first N rows")
    p.add_argument("--max-length", type=int, default=1024, help="truncate prompts to this many tokens (from the left)")
    p.add_argument("--output", default=None, help="write results JSON here")
    return p.parse_args(argv)


@torch.no_grad()
def score_rows(model, verbalizer, rows, labels, batch_size, max_length, calibration=None, progress=None):
    from pstar_plugins.tasks.baselines import calibrate

    preds = []
    head = getattr(getattr(model, "method_config", None), "head", "none") != "none"
    for i in range(0, len(rows), batch_size):
        batch = verbalizer.encode(rows[i:i + batch_size], labels[i:i + batch_size], max_length=max_length)
        scores = verbalizer.class_scores(model, batch, head)
        if calibration is not None:
            scores = calibrate(scores, calibration)
        preds.extend(scores.argmax(-1).tolist())
        if progress is not None:
            progress.update(len(batch.answer_index))
    return preds


def main(argv=None) -> int:
    return run_reporting_errors(_main, argv)


def _main(argv):
    args = parse_args(argv)
    from tqdm.auto import tqdm

    from pstar_plugins.core.adapter_io import load_adapter
    from pstar_plugins.models import load
    from pstar_plugins.tasks.baselines import (
        SharedPrefixModel, accuracy_and_macro_f1, balanced_demonstrations, common_prefix, content_free_scores,
        in_context_template)
    from pstar_plugins.tasks.data import labels_of, load_split, parse_column_mapping
    from pstar_plugins.tasks.template import Template
    from pstar_plugins.tasks.verbalizer import Verbalizer

    columns = parse_column_mapping(args.column)
    rows, source = load_split(args.validation_file, args.dataset, args.dataset_config, args.validation_split,
                              args.max_eval_samples, columns)
    labels = labels_of(rows, args.label_column, source, args.label_words)
    C = len(args.label_words)
    base, tokenizer = load(args.model, kind=args.model_kind, gguf_file=args.gguf_file)
    base.eval()
    masked = args.model_kind == "masked-lm"
    results = {"model": args.model, "validation_data": source, "examples": len(rows), "runs": []}

    def run(name, model, template, calibrate_with=None, shared_prefix=False):
        verbalizer = Verbalizer(tokenizer, template, args.label_words, masked_lm=masked)
        calibration = content_free_scores(verbalizer, model) if calibrate_with else None
        if shared_prefix and not masked and len(rows) > 1:
            # every prompt starts with the same demonstrations: run them once, reuse their cache
            sample = verbalizer.encode(rows[:4], max_length=args.max_length).inputs
            prefix = common_prefix([ids[m.bool()].tolist() for ids, m in zip(sample["input_ids"], sample["attention_mask"])])
            if len(prefix) > 8:
                model = SharedPrefixModel(model, prefix)
        with tqdm(total=len(rows), desc=name, leave=False) as bar:
            preds = score_rows(model, verbalizer, rows, labels, args.batch_size, args.max_length, calibration, bar)
        return accuracy_and_macro_f1(preds, labels, C)

    if args.adapter:
        model = load_adapter(base, args.adapter, tokenizer=tokenizer, trainable=False).eval()
        model.packing = args.packing
        template = Template.parse(getattr(model.method_config, "template", None) or args.template)
        acc, f1 = run("adapter", model, template)
        results["runs"].append({"name": f"adapter {model.method_name}", "accuracy": acc, "macro_f1": f1})
    else:
        template = Template.parse(args.template)
        demo_rows, demo_source = load_split(args.demonstration_file, args.dataset, args.dataset_config,
                                            args.demonstration_split, None, columns)
        demo_labels = labels_of(demo_rows, args.label_column, demo_source, args.label_words)
        for k in args.shots:
            accs, f1s = [], []
            for seed in range(args.seeds if k > 0 else 1):
                picks = balanced_demonstrations(demo_rows, demo_labels, k, C, seed)
                demos = [(demo_rows[i], args.label_words[demo_labels[i]]) for i in picks]
                acc, f1 = run(f"{k}-shot seed {seed}", base, in_context_template(template, demos), args.calibrate,
                              shared_prefix=k > 0 and not args.no_prefix_cache)
                accs.append(acc)
                f1s.append(f1)
            results["runs"].append({
                "name": f"{k}-shot" + (" calibrated" if args.calibrate else ""), "shots": k, "seeds": len(accs),
                "accuracy": statistics.mean(accs), "accuracy_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                "macro_f1": statistics.mean(f1s), "per_seed_accuracy": accs})
    print(f"\n{'run':<28} {'accuracy':>9}{'':<9} {'macro-F1':>9}")
    for r in results["runs"]:
        std = f" ± {r['accuracy_std']:.4f}" if r.get("seeds", 1) > 1 else ""
        print(f"{r['name']:<28} {r['accuracy']:>9.4f}{std:<9} {r['macro_f1']:>9.4f}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
