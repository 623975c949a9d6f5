"""Evaluate a frozen model with a discrete template (zero-shot, k-shot in-context) or with a
tuned adapter: accuracy and macro-F1 for classification, BLEU and ROUGE-L (greedy decoding) for
generation, as JSON and a printed table.

    python -m pstar_plugins.evaluate --model smollm2 --shots 0 4 8 --seeds 3
    python -m pstar_plugins.evaluate --model smollm2 --adapter runs/quickstart/adapter
    python -m pstar_plugins.evaluate --task generation --template 'Data: {mr}\\nText:{answer}' \\
        --validation-file devset.csv --demonstration-file trainset.csv --shots 0 2

An adapter saved by the training script records its task (kind, template, label words or target
column, truncation length); evaluating it uses those unless a flag here says otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from pstar_plugins.arguments import (
    RawDescriptionDefaultsHelpFormatter,
    StrictParser,
    add_plugin_argument,
    check_label_words,
    load_plugins,
)
from pstar_plugins.contract.errors import ConfigError, run_reporting_errors
from pstar_plugins.mechanisms.template import DEFAULT_TEMPLATE as CLASSIFICATION_TEMPLATE
from pstar_plugins.tasks.scoring import score_rows  # noqa: F401  (part of this module's interface)

# flag defaults when neither the command line nor the adapter's recorded task gives a value
FALLBACKS = {
    "label_column": "label",
    "label_words": ["negative", "positive"],
    "target_column": "ref",
    "max_new_tokens": 64,
    "max_length": 1024,
}


def parse_args(argv=None, prog: str = "pstar eval"):
    from pstar_plugins.models import add_loading_arguments

    p = StrictParser(prog=prog, description=__doc__, formatter_class=RawDescriptionDefaultsHelpFormatter)
    p.add_argument(
        "--model",
        default=None,
        help="offline alias (smollm2, minilm), a local folder, or any hub model id "
        "(default: with --adapter, the model it was trained on; else smollm2)",
    )
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model's folder")
    p.add_argument(
        "--model-kind",
        default=None,
        choices=["causal-lm", "masked-lm"],
        help="which head to load (default: with --adapter, the kind it was trained with; else causal-lm)",
    )
    p.add_argument("--adapter", default=None, help="a tuned adapter directory to evaluate instead of the baselines")
    add_loading_arguments(p)
    add_plugin_argument(p)  # the plugin of an adapter's method, when no entry point registers it
    _add_data_arguments(p)
    _add_scoring_arguments(p)
    p.add_argument("--output", default=None, help="write results JSON here")
    return p.parse_args(argv)


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    from pstar_plugins.models import packaged_data

    p.add_argument(
        "--validation-file", default=packaged_data("sst2_dev.tsv"), help="evaluation data (.csv, .tsv, .jsonl)"
    )
    p.add_argument(
        "--dataset", default=None, help="a Hugging Face datasets id or local dataset folder instead of the files"
    )
    p.add_argument("--dataset-config", default=None, help="the dataset's configuration (e.g. sst2 for glue)")
    p.add_argument("--validation-split", default="validation", help="--dataset split to evaluate on")
    p.add_argument("--demonstration-split", default="train", help="--dataset split the demonstrations come from")
    p.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="DATA_COLUMN=NAME",
        help="rename a data column to the name the template or --label-column uses (repeatable)",
    )
    p.add_argument(
        "--task",
        default=None,
        choices=["classification", "generation"],
        help="what to score (default: the adapter's recorded task, else classification)",
    )
    p.add_argument(
        "--demonstration-file",
        default=None,
        help="where in-context demonstrations come from (default for classification: the packaged SST-2 sample)",
    )
    p.add_argument(
        "--template",
        default=None,
        help=(
            "template with {column} slots and one {answer} slot (classification default: "
            f"{CLASSIFICATION_TEMPLATE!r})"
        ),
    )
    p.add_argument("--label-column", default=None, help="classification: column with the class (default: label)")
    p.add_argument(
        "--label-words",
        nargs="+",
        default=None,
        help="classification: one word per class, in class order (default: negative positive)",
    )
    p.add_argument("--target-column", default=None, help="generation: column with the reference text (default: ref)")


def _add_scoring_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation: tokens to decode (default: 64)")
    p.add_argument(
        "--shots", type=int, nargs="+", default=[0], help="numbers of in-context demonstrations (0: zero-shot)"
    )
    p.add_argument("--seeds", type=int, default=3, help="demonstration draws per k > 0 (mean ± std over them)")
    p.add_argument("--calibrate", action="store_true", help="contextual calibration with a content-free input")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    p.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="run the demonstrations with every batch instead of computing their key/value cache once",
    )
    p.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --adapter: score on real tokens only, rows packed padding-free (same scores)",
    )
    p.add_argument("--max-eval-samples", type=int, default=None, help="use only the first N rows")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncate prompts to this many tokens, from the left (default: 1024)",
    )


def main(argv=None, prog: str = "python -m pstar_plugins.evaluate") -> int:
    return run_reporting_errors(_main, argv, prog)


def resolve_task(args, recorded: dict | None) -> None:
    """Fill the flags left unset from the adapter's recorded task (when it is the task asked for),
    then from :data:`FALLBACKS`."""
    from pstar_plugins.mechanisms.template import from_command_line

    recorded = recorded or {}
    if getattr(args, "model", None) is None:  # the model the adapter was trained on, else the default
        args.model = recorded.get("model") or "smollm2"
        if args.gguf_file is None and recorded.get("model"):
            args.gguf_file = recorded.get("gguf_file")
    if getattr(args, "model_kind", None) is None:
        args.model_kind = recorded.get("model_kind") or "causal-lm"
    args.task = args.task or recorded.get("kind") or "classification"
    same = recorded.get("kind") == args.task
    for name, fallback in FALLBACKS.items():
        if getattr(args, name) is None:
            setattr(args, name, recorded[name] if same and name in recorded else fallback)
    if args.template is not None:
        args.template = from_command_line(args.template)
    elif same and "template" in recorded:
        args.template = recorded["template"]
    elif args.task == "classification":
        args.template = CLASSIFICATION_TEMPLATE
    else:
        raise ConfigError(
            "--task generation needs --template, with the source columns and an {answer} slot at the end, "
            "e.g. --template 'Data: {mr}\\nText:{answer}'."
        )
    if args.task == "generation" and args.calibrate:
        raise ConfigError("--calibrate rescales class probabilities; it has no meaning for --task generation. Drop it.")
    if (
        args.task == "generation"
        and not args.adapter
        and any(k > 0 for k in args.shots)
        and args.demonstration_file is None
        and args.dataset is None
    ):
        raise ConfigError(
            f"--shots {' '.join(map(str, args.shots))} with --task generation needs --demonstration-file: "
            f"rows with the template's columns and the target column {args.target_column!r}."
        )
    if args.task == "generation" and args.model_kind == "masked-lm":
        raise ConfigError("--task generation decodes text with a causal LM; use --model-kind causal-lm.")
    if args.task == "classification":
        check_label_words(args.label_words)


def check_adapter_base(meta: dict, model: str, gguf_file: str | None) -> None:
    """Refuse an adapter whose recorded hidden size differs from ``model``'s, reading only the config."""
    from pstar_plugins.contract.errors import AdapterError
    from pstar_plugins.models import resolve

    saved = meta.get("base_model", {}).get("hidden_size")
    path, gguf = resolve(model, gguf_file)
    if saved is None or gguf or not (Path(path) / "config.json").is_file():
        return  # GGUF or hub: the geometry check after loading covers it
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if hidden is not None and hidden != saved:
        trained_on = meta.get("task", {}).get("model") or meta["base_model"].get("name_or_path")
        raise AdapterError(
            f"--adapter was trained on a model with hidden size {saved} ({trained_on!r}), but --model {model} "
            f"has {hidden}; pass --model {trained_on} (or leave --model out to use it)."
        )


def _main(argv, prog: str = "pstar eval"):
    """Read and check everything, load the model, score the adapter or the baselines, report."""
    args = parse_args(argv, prog)
    from pstar_plugins.mechanisms.adapter_io import read_adapter
    from pstar_plugins.models import (
        check_attn_implementation,
        check_quantization,
        check_source,
        load,
        quantization_config,
    )
    from pstar_plugins.tasks.data import load_split, parse_column_mapping
    from pstar_plugins.tasks.scoring import make_scoring

    check_quantization(args)
    load_plugins(args.plugin)
    adapter = read_adapter(args.adapter) if args.adapter else None  # a bad adapter fails before any load
    if adapter:
        from pstar_plugins.assembly.registry import get_plugin_manager

        get_plugin_manager().adapter_method(adapter[0], args.adapter)  # so does one of an unknown method
    resolve_task(args, _recorded_task(adapter))
    check_attn_implementation(args.attn_implementation, training=False, generating=args.task == "generation")
    check_source(args.model, args.model_kind, args.gguf_file, args.task)
    if adapter:
        check_adapter_base(adapter[0], args.model, args.gguf_file)
    scoring = make_scoring(args)
    columns = parse_column_mapping(args.column)
    rows, source = load_split(
        args.validation_file, args.dataset, args.dataset_config, args.validation_split, args.max_eval_samples, columns
    )
    scoring.read(rows, source)  # labels or references: checked before the model loads
    quantized = quantization_config(args)
    base, tokenizer = load(
        args.model,
        kind=args.model_kind,
        gguf_file=args.gguf_file,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        **({"quantization_config": quantized} if quantized else {}),
    )
    base.eval()
    scoring.bind(tokenizer)
    results = {
        "model": args.model,
        "task": args.task,
        "template": args.template,
        "validation_data": source,
        "examples": len(rows),
        "runs": [],
        **scoring.describe(),
    }
    if args.adapter:
        results["runs"].append(_adapter_run(args, adapter, base, tokenizer, scoring))
    else:
        results["runs"] += _baseline_runs(args, scoring, base, columns)
    _print_table(results["runs"], scoring.metrics)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


def _recorded_task(adapter) -> dict | None:
    """The adapter's task record, with the model it was trained on when the record lacks it."""
    recorded = dict(adapter[0].get("task") or {}) if adapter else None
    if adapter and not (recorded or {}).get("model") and adapter[0]["base_model"].get("name_or_path"):
        recorded = {**(recorded or {}), "model": adapter[0]["base_model"]["name_or_path"]}
    return recorded


def _adapter_run(args, adapter, base, tokenizer, scoring) -> dict:
    """Score a tuned adapter with the template it was trained with."""
    from pstar_plugins.assembly.loading import load_adapter
    from pstar_plugins.mechanisms.template import Template

    model = load_adapter(base, args.adapter, tokenizer=tokenizer, trainable=False, contents=adapter).eval()
    model.packing = args.packing
    # a template method's adapter places its soft tokens, so its template always comes from the
    # adapter: the task record's text (converted from the command line once, at training), which
    # the method config holds too; adapters written before both held it keep their task record's
    placed = getattr(model.method_config, "template", None)
    if placed is not None and adapter[0].get("task", {}).get("template"):
        placed = adapter[0]["task"]["template"]
    name = f"adapter {model.method_name}"
    scores = scoring.score(name, model, Template.parse(placed or args.template))
    # the fast paths the scoring took (decided when the adapter's model was built), as pstar train's summary shows them
    return {"name": name, **scores, "fast_paths": model.fast_paths.lines()}


def _baseline_runs(args, scoring, base, columns) -> list[dict]:
    """The frozen model with the discrete template: zero-shot and k-shot, mean ± std over seeds."""
    from pstar_plugins.mechanisms.template import Template
    from pstar_plugins.models import packaged_data
    from pstar_plugins.tasks.data import load_split

    template = Template.parse(args.template)
    if any(k > 0 for k in args.shots):
        demo_file = args.demonstration_file or packaged_data("sst2_train_sample.tsv")
        demo_rows, demo_source = load_split(
            demo_file, args.dataset, args.dataset_config, args.demonstration_split, None, columns
        )
        scoring.set_demonstrations(demo_rows, demo_source, template)
    runs = []
    for k in args.shots:
        per_seed = [scoring.score_shots(base, template, k, seed) for seed in range(args.seeds if k > 0 else 1)]
        runs.append(_summarise(f"{k}-shot" + (" calibrated" if args.calibrate else ""), k, per_seed))
    return runs


def _print_table(runs: list[dict], metrics: tuple[str, str]) -> None:
    titles = {"bleu": "BLEU", "rouge_l": "ROUGE-L", "accuracy": "accuracy", "macro_f1": "macro-F1"}
    print(f"\n{'run':<28} {titles[metrics[0]]:>9}{'':<9} {titles[metrics[1]]:>9}")
    for r in runs:
        std = f" ± {r[metrics[0] + '_std']:.4f}" if r.get("seeds", 1) > 1 else ""
        print(f"{r['name']:<28} {r[metrics[0]]:>9.4f}{std:<9} {r[metrics[1]]:>9.4f}")
    for r in runs:
        if r.get("fast_paths"):
            print(f"\nfast paths of {r['name']}:\n  " + "\n  ".join(r["fast_paths"]))


def _summarise(name: str, shots: int, per_seed: list[dict]) -> dict:
    """Mean and population standard deviation over seeds of every metric of ``per_seed``."""
    out = {"name": name, "shots": shots, "seeds": len(per_seed)}
    for key in [k for k, v in per_seed[0].items() if isinstance(v, float)]:
        values = [r[key] for r in per_seed]
        out[key] = statistics.mean(values)
        out[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        out[f"per_seed_{key}"] = values
    if "example" in per_seed[0]:
        out["example"] = per_seed[0]["example"]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
