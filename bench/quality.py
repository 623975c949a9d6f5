"""Quality of tuned prompts against prompting baselines, through the user's own commands.

Parts (``--only PART ...``; each keeps its own date in bench/results/quality.json, and a part
that is not rerun keeps its recorded rows and date):

- ``icl``: SST-2 dev accuracy on frozen SmolLM2-135M-Instruct, zero-shot and 4-/8-shot in-context
  learning (class-balanced demonstrations, ``--seeds`` draws, mean ± std), plain and with
  contextual calibration, through ``pstar eval``.
- ``sst2-methods``: each of the four methods trained with ``accelerate launch -m pstar_plugins.train``.
- ``sst2-seeds``: one method (``--seeds-method``) over several seeds (``--seed-list``, mean ± std),
  with model selection on a split of the training file (``--selection-percentage``), trained on
  GLUE's file as it is or on its whole sentences (``--sst2-rows``, :func:`treebank_sentences`).
  Each method keeps its own row; of the methods run on the same rows, the SST-2 target counts the
  one whose kept states scored best on the selection splits (``quality_results.counted_seeds``).
- ``minilm``: P-tuning v2 with a linear head on frozen all-MiniLM-L6-v2 against full fine-tuning
  of the same model (same encoder, inputs, pooling and head shape; ``bench/minilm_reference.py``,
  run in this process) at the same example budget;
  ``--sst2-rows sentences`` trains both on the whole sentences of SST-2 train, a row of its own.
- ``rte-prompting``: RTE dev (sentence pairs) zero-shot, 4-shot in-context and contextually
  calibrated zero-shot (and 4-shot), one template and one pair of label words for every row.
- ``rte-methods``: the four methods on RTE with the same budget (``--rte-steps``), the same
  template (P-tuning: the same text with soft tokens around the input, :func:`p_tuning_template`).
- ``rte-seeds``: one method of ``rte-methods`` (``--rte-seeds-method``) with its budget over
  ``--seed-list`` (mean ± std): the RTE target counts that mean for the method, not one run.
- ``rte-longer``: methods of ``rte-methods`` (``--rte-longer-methods``) trained for several epochs
  (``--rte-epochs``, ``--num-train-epochs`` and ``--warmup-ratio`` as docs/recipes.md advises
  while the selection split still peaks at the last step), the state kept on the selection split.
- ``rte-reference``: full fine-tuning of SmolLM2 on RTE (every weight, through the same command
  with ``-p bench.whole_model``) at the budget of ``rte-methods``: how much of RTE this model
  learns at that budget at all. A reference, not a method: the RTE target does not count it.
- ``e2e``: E2E data-to-text (dev subset, greedy decoding), BLEU and ROUGE-L of prefix tuning and
  prompt tuning on SmolLM2.
- ``e2e-prompting``: zero-shot and 2-shot prompting on the same E2E rows and decoding.

This script is the launcher: the parts' commands, running them and recording their rows.
Which rows count toward the targets, how older record layouts read, and the table it writes
into docs/quality.md are ``bench/quality_results.py``'s, which imports nothing of the package.

Data come from ``../shared/data`` when present (otherwise SST-2 falls back to the packaged sample
and the RTE and E2E parts are skipped). Every command is recorded with the row it produced, and
``--dry-run`` prints them without running anything, so that anyone can repeat a row:

    python bench/quality.py --dry-run --only rte-prompting rte-methods
    python bench/quality.py --only rte-prompting e2e-prompting
    python bench/quality.py --only rte-methods --selection-percentage 0   # a pstar train without --select-best
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import minilm_reference  # noqa: E402
from quality_results import (
    DEV_SIZES,
    QUALITY_DOC,
    RTE_LABEL_WORDS,
    RTE_TEMPLATE,
    SENTENCES_FILE,
    TABLE_MARKER,  # noqa: E402
    cli_text,
    curves,
    mean_and_std,
    minilm_variants,
    quality_table,
    seed_variants,
    seeds_selection_accuracy,
    targets,
    write_between_markers,
)

PARTS = (
    "icl",
    "sst2-methods",
    "sst2-seeds",
    "minilm",
    "rte-prompting",
    "rte-methods",
    "rte-seeds",
    "rte-longer",
    "rte-reference",
    "e2e",
    "e2e-prompting",
)
METHODS = ("prompt-tuning", "prefix-tuning", "p-tuning", "p-tuning-v2")
# per-method settings for SmolLM2 on SST-2 (docs/recipes.md explains the choices)
SST2_METHODS = {method: [] for method in METHODS}

# RTE: the template and label words of every row (quality_results.RTE_TEMPLATE says why)
RTE_MAX_LENGTH = 320  # the longest RTE train row is 307 tokens with this template: nothing is cut


@dataclass
class Step:
    """One command of a part: what it is, the command line as a user types it, where it writes."""

    label: str
    argv: list[str]
    output: Path

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def part_key(part: str) -> str:
    """The quality.json key of a part (``rte-methods`` → ``rte_methods``)."""
    return part.replace("-", "_")


def rel(path) -> str:
    """``path`` relative to the repository root when it lies under the root's parent (the commands
    run from the root, so ``../shared/data/...`` repeats on any checkout)."""
    path = Path(path)
    try:
        return os.path.relpath(path, C.ROOT) if path.resolve().is_relative_to(C.ROOT.parent.resolve()) else str(path)
    except ValueError:  # another drive
        return str(path)


def train_command(train_args: list[str]) -> list[str]:
    return [
        "accelerate",
        "launch",
        "--num_processes",
        "1",
        "--num_cpu_threads_per_process",
        str(os.cpu_count() or 1),
        "-m",
        "pstar_plugins.train",
        *train_args,
    ]


def eval_command(eval_args: list[str]) -> list[str]:
    return ["python", "-m", "pstar_plugins.evaluate", *eval_args]


def executable(argv: list[str]) -> list[str]:
    """The command line of :class:`Step` with this interpreter (``accelerate launch`` → its module)."""
    if argv[:2] == ["accelerate", "launch"]:
        return [sys.executable, "-m", "accelerate.commands.launch", *argv[2:]]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    return argv


def run_step(step: Step, log: Path) -> float:
    """Run ``step`` from the repository root, output to ``log``; its seconds."""
    print(f"{step.label}: {step.command}", flush=True)
    started = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.run(executable(step.argv), stdout=fh, stderr=subprocess.STDOUT, cwd=C.ROOT).returncode
    seconds = time.perf_counter() - started
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise SystemExit(f"{step.label} failed (exit {code}) after {seconds:.0f} s; last lines of {log}:\n{tail}")
    print(f"  done in {seconds:.0f} s ({log})", flush=True)
    return seconds


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def p_tuning_template(template: str, soft: int = 3) -> str:
    """P-tuning's ``[P1; X; P2; Y]`` (Liu et al. 2021) from a task's discrete template: ``soft``
    virtual tokens before the text and after its last column, the task's words kept as anchors.
    ``Review: {sentence} Sentiment:{answer}`` gives the template of the recorded SST-2 row; a template that
    already places soft tokens is returned as it is."""
    from pstar_plugins.mechanisms.template import Answer, Field, Literal, Soft, Template

    parts = Template.parse(template).parts
    if any(isinstance(p, Soft) for p in parts):
        return template
    last_field = max(i for i, p in enumerate(parts) if isinstance(p, Field))
    out = [f"{{soft:{soft}}} "]
    for i, part in enumerate(parts):
        if isinstance(part, Literal):
            out.append(part.text.replace("{", "{{").replace("}", "}}"))
        elif isinstance(part, Field):
            out.append("{" + part.name + "}")
        elif isinstance(part, Answer):
            out.append("{answer}")
        if i == last_field:
            out.append(f" {{soft:{soft}}}")
    return "".join(out)


def selection_flags(percentage: int) -> list[str]:
    """``pstar train`` flags that choose the kept state on a split of the training file, never
    on the evaluation file (none when ``percentage`` is 0)."""
    return ["--validation-split-percentage", str(percentage), "--select-best", "best"] if percentage else []


def check_train_supports(flag: str) -> None:
    """Stop before any run when this checkout's ``pstar train`` lacks ``flag``."""
    text = subprocess.run(
        [sys.executable, "-m", "pstar_plugins.train", "--method", "prompt-tuning", "--help"],
        capture_output=True,
        text=True,
        cwd=C.ROOT,
    ).stdout
    if flag not in text:
        raise SystemExit(
            f"pstar train here has no {flag}; pass --selection-percentage 0 to train without model "
            "selection (the rows then record that), or update the checkout."
        )


# ------------------------------------------------------------------------------ data


def sst2_files() -> tuple[str, str]:
    from pstar_plugins.models import packaged_data

    full = C.SHARED_DATA / "sst2" / "train.tsv"
    return (str(full) if full.is_file() else packaged_data("sst2_train_sample.tsv")), packaged_data("sst2_dev.tsv")


def treebank_sentences(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The rows of GLUE SST-2's training file that are whole sentences, in file order.

    GLUE's SST-2 train file holds every phrase of the treebank's parse trees (Socher et al. 2013),
    each sentence's sub-phrases beside it (median 7 words), while dev holds whole sentences
    (median 19). A phrase is a contiguous run of words of its sentence, so the sentences are the
    rows that no other row contains: 6,885 of the 67,349, close to the 6,920 training sentences of
    the original SST-2 that Gao et al. 2021 (LM-BFF) train on. ``rows`` are (text, label) pairs.
    """
    texts = {text.strip() for text, _ in rows}
    inside: set[str] = set()
    for text in texts:
        words = text.split()
        for start in range(len(words)):
            for end in range(start + 1, len(words) + 1):
                if end - start < len(words):
                    part = " ".join(words[start:end])
                    if part in texts:
                        inside.add(part)
    return [(text, label) for text, label in rows if text.strip() not in inside]


def sst2_train_file(args, work: Path) -> str:
    """The SST-2 training file of the sst2 parts: GLUE's file, or its sentences (``--sst2-rows``)."""
    full = sst2_files()[0]
    if args.sst2_rows == "phrases":
        return full
    return str(work / SENTENCES_FILE)


def write_sst2_sentences(work: Path) -> Path:
    """Write the sentences of GLUE's SST-2 train file (:func:`treebank_sentences`) under ``work``."""
    from pstar_plugins.tasks.data import read_examples

    source = C.SHARED_DATA / "sst2" / "train.tsv"
    if not source.is_file():
        raise SystemExit(f"--sst2-rows sentences: {source} not found; it needs GLUE's SST-2 train file")
    rows = [(r["sentence"], r["label"]) for r in read_examples(source)]  # as pstar train reads it
    out = work / SENTENCES_FILE
    with open(out, "w", newline="") as fh:
        fh.write("sentence\tlabel\n")
        fh.writelines(f"{text}\t{label}\n" for text, label in treebank_sentences(rows))
    return out


def rte_files() -> tuple[Path, Path]:
    return C.SHARED_DATA / "rte" / "train.jsonl", C.SHARED_DATA / "rte" / "dev.jsonl"


def e2e_files() -> tuple[Path, Path]:
    return C.SHARED_DATA / "e2e" / "trainset.csv", C.SHARED_DATA / "e2e" / "devset.csv"


# ------------------------------------------------------------------------------ commands


def icl_steps(args, work: Path) -> list[Step]:
    base = ["--model", "smollm2", "--seeds", str(args.seeds)]
    return [
        Step(
            "SST-2 ICL",
            eval_command([*base, "--shots", "0", "4", "8", "--output", rel(work / "icl.json")]),
            work / "icl.json",
        ),
        # contextual calibration (Zhao et al. 2021) of the same draws: small models' in-context
        # predictions lean towards one label, which calibration is meant to undo
        Step(
            "SST-2 ICL calibrated",
            eval_command([*base, "--shots", "4", "8", "--calibrate", "--output", rel(work / "icl-calibrated.json")]),
            work / "icl-calibrated.json",
        ),
    ]


def sst2_train_args(
    args, method: str, run_dir: Path, steps: int, seed: int, extra: list[str], selection: int
) -> list[str]:
    dev = sst2_files()[1]
    train = sst2_train_file(args, run_dir.parent)
    return [
        "--method",
        method,
        "--model",
        "smollm2",
        "--train-file",
        rel(train),
        "--validation-file",
        rel(dev),
        *selection_flags(selection),
        "--max-steps",
        str(steps),
        "--batch-size",
        str(args.batch_size),
        "--warmup-steps",
        str(steps // 10),
        "--eval-steps",
        str(steps // 3),
        "--eval-subset-size",
        "200",
        "--no-zero-shot",
        "--output-dir",
        rel(run_dir),
        "--overwrite",
        "--seed",
        str(seed),
        *extra,
    ]


SST2_TEMPLATE = "Review: {sentence} Sentiment:{answer}"  # the discrete template of every SST-2 row


def method_extra(args, method: str) -> list[str]:
    # P-tuning: the SST-2 words with soft tokens around the input, as in the recorded rows (the
    # method's own default builds its template from the data's columns, without words)
    template = ["--template", cli_text(p_tuning_template(SST2_TEMPLATE))] if method == "p-tuning" else []
    return SST2_METHODS[method] + template + dict(args.method_args).get(method, [])


def sst2_method_steps(args, work: Path) -> list[Step]:
    return [
        Step(
            f"SST-2 {method}",
            train_command(
                sst2_train_args(
                    args, method, work / f"sst2-{method}", args.steps, args.seed, method_extra(args, method), 0
                )
            ),
            work / f"sst2-{method}",
        )
        for method in args.methods
    ]


def sst2_seed_steps(args, work: Path) -> list[Step]:
    method = args.seeds_method
    rows = "sentences-" if args.sst2_rows == "sentences" else ""
    return [
        Step(
            f"SST-2 {method} seed {seed}",
            train_command(
                sst2_train_args(
                    args,
                    method,
                    work / f"sst2-seeds-{rows}{method}-{seed}",
                    args.seeds_steps,
                    seed,
                    method_extra(args, method),
                    args.selection_percentage,
                )
            ),
            work / f"sst2-seeds-{rows}{method}-{seed}",
        )
        for seed in args.seed_list
    ]


MINILM_TEMPLATE = "Review: {sentence} Sentiment:{answer}"


def minilm_steps(args, work: Path) -> list[Step]:
    train, dev = sst2_train_file(args, work), sst2_files()[1]
    rows = "-sentences" if args.sst2_rows == "sentences" else ""
    steps, run_dir = args.minilm_steps, work / f"minilm-p-tuning-v2{rows}"
    cmd = [
        "--method",
        "p-tuning-v2",
        "--model",
        "minilm",
        "--model-kind",
        "masked-lm",
        "--train-file",
        rel(train),
        "--validation-file",
        rel(dev),
        "--max-train-samples",
        str(args.minilm_examples),
        "--max-steps",
        str(steps),
        "--batch-size",
        str(args.batch_size),
        "--warmup-steps",
        str(steps // 10),
        "--eval-steps",
        "0",
        "--output-dir",
        rel(run_dir),
        "--overwrite",
        "--seed",
        str(args.seed),
        "--template",
        MINILM_TEMPLATE,
        "--learning-rate",
        str(args.minilm_lr),
        "--num-virtual-tokens",
        str(args.minilm_virtual_tokens),
        # all-MiniLM-L6-v2 was trained to give sentence embeddings by mean pooling (its 1_Pooling config)
        "--pooling",
        "mean",
    ]
    return [
        Step(
            "MiniLM p-tuning-v2 (then full fine-tuning in this process: full_finetune_minilm)",
            train_command(cmd),
            run_dir,
        )
    ]


def rte_prompting_steps(args, work: Path) -> list[Step]:
    train, dev = rte_files()
    base = [
        "--model",
        "smollm2",
        "--validation-file",
        rel(dev),
        "--demonstration-file",
        rel(train),
        "--template",
        cli_text(RTE_TEMPLATE),
        "--label-words",
        *RTE_LABEL_WORDS,
        "--seeds",
        str(args.seeds),
    ]
    shots = ["--shots", "0", str(args.rte_shots)]
    calibrated = ["--shots", *map(str, args.rte_calibrated_shots)]
    return [
        Step(
            "RTE prompting",
            eval_command([*base, *shots, "--output", rel(work / "rte-prompting.json")]),
            work / "rte-prompting.json",
        ),
        Step(
            "RTE prompting calibrated",
            eval_command([*base, *calibrated, "--calibrate", "--output", rel(work / "rte-prompting-calibrated.json")]),
            work / "rte-prompting-calibrated.json",
        ),
    ]


def rte_train_args(
    args, method: str, run_dir: Path, budget: list[str], eval_steps: int, seed: int | None = None
) -> list[str]:
    """A ``pstar train`` on RTE with the table's template and label words; ``budget`` sets its length,
    ``seed`` its seed (default ``--seed``)."""
    train, dev = rte_files()
    template = p_tuning_template(RTE_TEMPLATE) if method == "p-tuning" else RTE_TEMPLATE
    return [
        "--method",
        method,
        "--model",
        "smollm2",
        "--train-file",
        rel(train),
        "--validation-file",
        rel(dev),
        *selection_flags(args.selection_percentage),
        "--template",
        cli_text(template),
        "--label-words",
        *RTE_LABEL_WORDS,
        "--max-length",
        str(RTE_MAX_LENGTH),
        *budget,
        "--batch-size",
        str(args.batch_size),
        "--eval-steps",
        str(eval_steps),
        "--eval-subset-size",
        str(DEV_SIZES["rte"]),
        "--no-zero-shot",
        "--output-dir",
        rel(run_dir),
        "--overwrite",
        "--seed",
        str(args.seed if seed is None else seed),
    ]


def rte_budget(args) -> tuple[list[str], int]:
    """The train flags of the ``rte-methods`` budget (``--rte-steps``, a tenth of them warm-up) and
    the steps between its selection evaluations (three in a run)."""
    steps = args.rte_steps
    return ["--max-steps", str(steps), "--warmup-steps", str(steps // 10)], max(1, steps // 3)


def rte_method_steps(args, work: Path) -> list[Step]:
    budget, eval_steps = rte_budget(args)
    return [
        Step(
            f"RTE {method}",
            train_command(rte_train_args(args, method, work / f"rte-{method}", budget, eval_steps)),
            work / f"rte-{method}",
        )
        for method in args.rte_methods
    ]


def rte_seed_steps(args, work: Path) -> list[Step]:
    """``rte-methods``' command for ``--rte-seeds-method``, once per seed of ``--seed-list``."""
    budget, eval_steps = rte_budget(args)
    method = args.rte_seeds_method
    return [
        Step(
            f"RTE {method} seed {seed}",
            train_command(rte_train_args(args, method, work / f"rte-seeds-{method}-{seed}", budget, eval_steps, seed)),
            work / f"rte-seeds-{method}-{seed}",
        )
        for seed in args.seed_list
    ]


def rte_reference_steps(args, work: Path) -> list[Step]:
    """Full fine-tuning with ``rte-methods``' budget, template, label words and selection split."""
    budget, eval_steps = rte_budget(args)
    run_dir = work / "rte-full-fine-tuning"
    cmd = [
        "-p",
        "bench.whole_model",
        *rte_train_args(args, "whole-model", run_dir, budget, eval_steps),
        "--learning-rate",
        f"{args.rte_reference_lr:g}",
    ]
    return [Step("RTE full fine-tuning (reference)", train_command(cmd), run_dir)]


def rte_longer_steps(args, work: Path) -> list[Step]:
    budget = ["--num-train-epochs", f"{args.rte_epochs:g}", "--warmup-ratio", "0.1"]
    return [
        Step(
            f"RTE {method}, {args.rte_epochs:g} epochs",
            train_command(
                rte_train_args(
                    args, method, work / f"rte-{method}-{args.rte_epochs:g}-epochs", budget, args.rte_longer_eval_steps
                )
            ),
            work / f"rte-{method}-{args.rte_epochs:g}-epochs",
        )
        for method in args.rte_longer_methods
    ]


def e2e_method_steps(args, work: Path) -> list[Step]:
    train, dev = e2e_files()
    out = []
    for method in ("prefix-tuning", "prompt-tuning"):
        run_dir = work / f"e2e-{method}"
        cmd = [
            "--task",
            "generation",
            "--method",
            method,
            "--model",
            "smollm2",
            "--train-file",
            rel(train),
            "--validation-file",
            rel(dev),
            "--template",
            cli_text(C.E2E_TEMPLATE),
            "--target-column",
            "ref",
            "--max-steps",
            str(args.e2e_steps),
            "--batch-size",
            "8",
            "--warmup-steps",
            str(args.e2e_steps // 10),
            "--eval-steps",
            "0",
            "--max-eval-samples",
            str(args.e2e_eval_rows),
            "--max-new-tokens",
            str(args.e2e_new_tokens),
            "--output-dir",
            rel(run_dir),
            "--overwrite",
            "--seed",
            str(args.seed),
            "--no-zero-shot",
        ]
        out.append(Step(f"E2E {method}", train_command(cmd), run_dir))
    return out


def e2e_prompting_steps(args, work: Path) -> list[Step]:
    """Zero-shot and k-shot prompting on the rows and decoding of the ``e2e`` part's final evaluation."""
    train, dev = e2e_files()
    cmd = [
        "--task",
        "generation",
        "--model",
        "smollm2",
        "--validation-file",
        rel(dev),
        "--demonstration-file",
        rel(train),
        "--template",
        cli_text(C.E2E_TEMPLATE),
        "--target-column",
        "ref",
        "--max-new-tokens",
        str(args.e2e_new_tokens),
        "--max-eval-samples",
        str(args.e2e_eval_rows),
        "--shots",
        "0",
        str(args.e2e_shots),
        "--seeds",
        str(args.seeds),
        "--output",
        rel(work / "e2e-prompting.json"),
    ]
    return [Step("E2E prompting", eval_command(cmd), work / "e2e-prompting.json")]


STEPS = {
    "icl": icl_steps,
    "sst2-methods": sst2_method_steps,
    "sst2-seeds": sst2_seed_steps,
    "minilm": minilm_steps,
    "rte-prompting": rte_prompting_steps,
    "rte-methods": rte_method_steps,
    "rte-seeds": rte_seed_steps,
    "rte-longer": rte_longer_steps,
    "rte-reference": rte_reference_steps,
    "e2e": e2e_method_steps,
    "e2e-prompting": e2e_prompting_steps,
}
NEEDS = {
    "rte-prompting": rte_files,
    "rte-methods": rte_files,
    "rte-seeds": rte_files,
    "rte-longer": rte_files,
    "rte-reference": rte_files,
    "e2e": e2e_files,
    "e2e-prompting": e2e_files,
}


# ------------------------------------------------------------------------------ running the parts


def prompting_rows(steps: list[Step], work: Path) -> tuple[dict, float]:
    """Run ``pstar eval`` steps; their runs (each with its command and date) in one result."""
    result: dict = {"runs": []}
    total = 0.0
    for step in steps:
        seconds = run_step(step, work / (step.output.stem + ".log"))
        total += seconds
        record = json.loads(step.output.read_text())
        for key in ("model", "template", "label_words", "validation_data", "examples", "sources"):
            if key in record:
                result[key] = record[key]
        # the seconds are the whole command's, which may measure several rows
        result["runs"] += [
            {**r, "command": step.command, "date": now(), "command_seconds": seconds} for r in record["runs"]
        ]
    result["seconds"] = total
    return result, total


def run_icl(args, work: Path) -> dict:
    return prompting_rows(icl_steps(args, work), work)[0]


def run_rte_prompting(args, work: Path) -> dict:
    return prompting_rows(rte_prompting_steps(args, work), work)[0]


def run_e2e_prompting(args, work: Path) -> dict:
    return prompting_rows(e2e_prompting_steps(args, work), work)[0]


def trained_row(step: Step, seconds: float, **extra) -> dict:
    metrics = json.loads((step.output / "metrics.json").read_text())
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) and k != "tuned_accuracy"}
    selection = metrics.get("selection") or {}
    value = selection.get(f"{selection.get('select')}_{selection.get('metric', 'accuracy')}")
    kept = {"selection_accuracy": value} if value is not None else {}
    return {
        "accuracy": metrics["tuned_accuracy"],
        "trainable_parameters": metrics["trainable_parameters"],
        **curves(metrics),
        **kept,
        "metrics": scalars,
        "command": step.command,
        "date": now(),
        "seconds": seconds,
        **extra,
    }


def run_sst2_methods(args, work: Path) -> dict:
    results = dict(args.previous.get("sst2_methods", {}))  # methods not rerun keep their results
    for method, step in zip(args.methods, sst2_method_steps(args, work)):
        seconds = run_step(step, work / f"sst2-{method}.log")
        results[method] = trained_row(
            step, seconds, steps=args.steps, batch_size=args.batch_size, options=method_extra(args, method)
        )
        print(f"  {method}: {results[method]['accuracy']:.4f}", flush=True)
    return results


def seed_runs(args, steps: list[Step], work: Path) -> tuple[list[dict], float, float]:
    """Run one training per seed of ``--seed-list`` (``steps``, in that order): their rows, and
    the mean ± std of their accuracies."""
    if args.selection_percentage:
        check_train_supports("--select-best")
    runs = []
    for seed, step in zip(args.seed_list, steps):
        seconds = run_step(step, work / f"{step.output.name}.log")
        runs.append(trained_row(step, seconds, seed=seed))
        print(f"  seed {seed}: {runs[-1]['accuracy']:.4f}", flush=True)
    mean, std = mean_and_std([r["accuracy"] for r in runs])
    return runs, mean, std


def run_sst2_seeds(args, work: Path) -> dict:
    if args.sst2_rows == "sentences":
        write_sst2_sentences(work)
    runs, mean, std = seed_runs(args, sst2_seed_steps(args, work), work)
    results = seed_variants(args.previous.get("sst2_seeds"))  # other rows and methods keep theirs
    results.setdefault(args.sst2_rows, {})[args.seeds_method] = {
        "method": args.seeds_method,
        "steps": args.seeds_steps,
        "batch_size": args.batch_size,
        "train_rows": args.sst2_rows,
        "options": method_extra(args, args.seeds_method),
        "selection_percentage": args.selection_percentage,
        "seeds": list(args.seed_list),
        "accuracy": mean,
        "accuracy_std": std,
        "date": now(),
        "runs": runs,
    }
    selection = seeds_selection_accuracy(runs)
    if selection is not None:
        results[args.sst2_rows][args.seeds_method]["selection_accuracy"] = selection
    return results


def run_rte_methods(args, work: Path) -> dict:
    recorded = dict(args.previous.get("rte_methods", {}))
    return _rte_rows(args, recorded, args.rte_methods, rte_method_steps(args, work), work)


def run_rte_seeds(args, work: Path) -> dict:
    """``rte_seeds`` by method: the runs of each seed and their mean ± std (other methods keep theirs)."""
    runs, mean, std = seed_runs(args, rte_seed_steps(args, work), work)
    results = dict(args.previous.get("rte_seeds") or {})
    results[args.rte_seeds_method] = {
        "method": args.rte_seeds_method,
        "steps": args.rte_steps,
        "batch_size": args.batch_size,
        "selection_percentage": args.selection_percentage,
        "seeds": list(args.seed_list),
        "accuracy": mean,
        "accuracy_std": std,
        "date": now(),
        "runs": runs,
    }
    return results


def run_rte_longer(args, work: Path) -> dict:
    names = [longer_name(method, args.rte_epochs) for method in args.rte_longer_methods]
    recorded = dict(args.previous.get("rte_longer", {}))
    return _rte_rows(args, recorded, names, rte_longer_steps(args, work), work, epochs=args.rte_epochs)


def run_rte_reference(args, work: Path) -> dict:
    return _rte_rows(
        args, {}, [REFERENCE_ROW], rte_reference_steps(args, work), work, learning_rate=args.rte_reference_lr
    )


REFERENCE_ROW = "full fine-tuning"


def longer_name(method: str, epochs: float) -> str:
    """The key and table name of an ``rte-longer`` row: one row per method and length."""
    return f"{method}, {epochs:g} epochs"


def _rte_rows(args, recorded: dict, names: list[str], steps: list[Step], work: Path, **extra) -> dict:
    """Run the RTE trainings ``steps``; the ``recorded`` rows with theirs (by name) replaced."""
    if args.selection_percentage:
        check_train_supports("--select-best")
    results = recorded
    for name, step in zip(names, steps):
        seconds = run_step(step, work / f"{step.output.name}.log")
        row = trained_row(
            step, seconds, batch_size=args.batch_size, selection_percentage=args.selection_percentage, **extra
        )
        results[name] = {**row, "steps": row["metrics"]["max_steps"]}  # the planned length (an early stop ends sooner)
        print(f"  {name}: {results[name]['accuracy']:.4f}", flush=True)
    return results


def run_minilm(args, work: Path) -> dict:
    from pstar_plugins.tasks.data import labels_of, read_examples

    if args.sst2_rows == "sentences":
        write_sst2_sentences(work)
    train, dev = sst2_train_file(args, work), sst2_files()[1]
    (step,) = minilm_steps(args, work)
    steps, examples = args.minilm_steps, args.minilm_examples
    seconds = run_step(step, work / f"{step.output.name}.log")
    metrics = json.loads((step.output / "metrics.json").read_text())
    ours = {
        "accuracy": metrics["tuned_accuracy"],
        "trainable_parameters": metrics["trainable_parameters"],
        "command": step.command,
        "date": now(),
        "seconds": seconds,
    }
    print(f"  p-tuning-v2: {ours['accuracy']:.4f}; full fine-tuning ...", flush=True)
    train_rows = read_examples(train)[:examples]  # the same labelled examples --max-train-samples keeps
    dev_rows = read_examples(dev)
    started = time.perf_counter()
    full = minilm_reference.full_finetune_minilm(
        train_rows,
        labels_of(train_rows, "label", train, C.LABEL_WORDS),
        dev_rows,
        labels_of(dev_rows, "label", dev, C.LABEL_WORDS),
        steps,
        args.batch_size,
        args.full_finetune_lr,
        args.seed,
        MINILM_TEMPLATE,
        pooling="mean",
    )
    full["seconds"] = time.perf_counter() - started
    rows = f" --sst2-rows {args.sst2_rows}" if args.sst2_rows != "phrases" else ""
    full["command"] = (
        f"python bench/quality.py --only minilm{rows} (full_finetune_minilm, lr {args.full_finetune_lr:g})"
    )
    full["date"] = now()
    print(f"  full fine-tuning: {full['accuracy']:.4f}", flush=True)
    recorded = args.previous.get("minilm")
    results = minilm_variants(recorded)  # the other training rows keep theirs
    if recorded and "gap_points" in recorded:  # a record from before the variants: its date was the part's
        results["phrases"].setdefault(
            "date", (args.previous.get("part_dates") or {}).get("minilm") or args.previous.get("date")
        )
    results[args.sst2_rows] = {
        "steps": steps,
        "batch_size": args.batch_size,
        "training_examples": len(train_rows),
        "train_rows": args.sst2_rows,
        "epochs": steps * args.batch_size / len(train_rows),
        "date": now(),
        "p-tuning-v2": ours,
        "full-finetuning": full,
        "gap_points": 100 * (full["accuracy"] - ours["accuracy"]),
    }
    return results


def run_e2e(args, work: Path) -> dict:
    results = {}
    for step in e2e_method_steps(args, work):
        method = step.output.name.removeprefix("e2e-")
        seconds = run_step(step, work / f"e2e-{method}.log")
        metrics = json.loads((step.output / "metrics.json").read_text())
        scores = metrics["generation_scores"]["final eval"]
        results[method] = {
            "bleu": scores["bleu"],
            "rouge_l": scores["rouge_l"],
            "sources": scores["sources"],
            "example": scores["example"][:2],
            "steps": args.e2e_steps,
            "batch_size": 8,
            "command": step.command,
            "date": now(),
            "seconds": seconds,
        }
        print(
            f"  {method}: BLEU {scores['bleu']:.2f} ROUGE-L {scores['rouge_l']:.2f} over {scores['sources']} MRs",
            flush=True,
        )
    return results


RUNNERS = {
    "icl": run_icl,
    "sst2-methods": run_sst2_methods,
    "sst2-seeds": run_sst2_seeds,
    "minilm": run_minilm,
    "rte-seeds": run_rte_seeds,
    "rte-prompting": run_rte_prompting,
    "rte-methods": run_rte_methods,
    "rte-longer": run_rte_longer,
    "rte-reference": run_rte_reference,
    "e2e": run_e2e,
    "e2e-prompting": run_e2e_prompting,
}


def _method_args(text: str) -> tuple[str, list[str]]:
    method, sep, flags = text.partition("=")
    if not sep or method not in SST2_METHODS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected METHOD=FLAGS with METHOD one of {sorted(SST2_METHODS)}")
    return method, shlex.split(flags)


def _percentage(text: str) -> int:
    value = int(text)
    if not 0 <= value < 100:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a percentage from 0 (no selection split) to 99")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--only",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        metavar="PART",
        help=f"parts to run: {', '.join(PARTS)}",
    )
    p.add_argument("--dry-run", action="store_true", help="print the parts' commands; run and write nothing")
    p.add_argument("--steps", type=int, default=300, help="SST-2 optimizer steps per method on SmolLM2")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(SST2_METHODS),
        default=list(SST2_METHODS),
        help="SST-2 methods to (re)run; the others keep their recorded results",
    )
    p.add_argument(
        "--method-args",
        action="append",
        default=[],
        type=_method_args,
        metavar="METHOD=FLAGS",
        help=(
            "extra train flags for one SST-2 method, e.g. 'prompt-tuning=--num-virtual-tokens 20' (repeatable; "
            "recorded)"
        ),
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3, help="demonstration draws per k")
    p.add_argument(
        "--seeds-method",
        choices=list(SST2_METHODS),
        default="prompt-tuning",
        help="sst2-seeds: the method run over --seed-list (its own row; other methods keep theirs)",
    )
    p.add_argument(
        "--sst2-rows",
        choices=["phrases", "sentences"],
        default="phrases",
        help="sst2-seeds, minilm: train on GLUE's SST-2 file as it is (the treebank's phrases) or on "
        "its whole sentences only, the shape of SST-2 dev (written to WORK/sst2-train-sentences.tsv)",
    )
    p.add_argument("--seed-list", type=int, nargs="+", default=[1, 2, 3], help="sst2-seeds, rte-seeds: training seeds")
    p.add_argument("--seeds-steps", type=int, default=300, help="sst2-seeds: optimizer steps per seed")
    p.add_argument(
        "--selection-percentage",
        type=_percentage,
        default=10,
        metavar="P",
        help="sst2-seeds, rte-methods, rte-seeds, rte-longer, rte-reference: keep the best state as judged on P%% "
        "of the training file (pstar train --validation-split-percentage P --select-best best); 0: the last state",
    )
    p.add_argument(
        "--rte-reference-lr",
        type=float,
        default=2e-5,
        help="rte-reference: learning rate of full fine-tuning (the low end of Devlin et al. 2019's GLUE search)",
    )
    p.add_argument(
        "--rte-steps",
        type=int,
        default=150,
        help="rte-methods, rte-seeds, rte-reference: optimizer steps of every run (150 × 16 is about one epoch of the "
        "2,241 pairs left to train on beside the 10%% selection split)",
    )
    p.add_argument(
        "--rte-methods",
        nargs="+",
        choices=list(METHODS),
        default=list(METHODS),
        help="RTE methods to (re)run; the others keep their recorded results",
    )
    p.add_argument(
        "--rte-seeds-method",
        choices=list(METHODS),
        default="p-tuning-v2",
        help="rte-seeds: the method run over --seed-list with rte-methods' budget (the best rte-methods row)",
    )
    p.add_argument(
        "--rte-longer-methods",
        nargs="+",
        choices=list(METHODS),
        default=["p-tuning-v2"],
        help="rte-longer: methods trained for --rte-epochs",
    )
    p.add_argument("--rte-epochs", type=float, default=4, help="rte-longer: epochs of the training split")
    p.add_argument(
        "--rte-longer-eval-steps", type=int, default=70, help="rte-longer: steps between selection evaluations"
    )
    p.add_argument("--rte-shots", type=int, default=4, help="rte-prompting: demonstrations of the in-context rows")
    p.add_argument(
        "--rte-calibrated-shots",
        type=int,
        nargs="+",
        default=[0],
        help="rte-prompting: the rows with contextual calibration (0: zero-shot; add 4 for calibrated 4-shot)",
    )
    p.add_argument("--e2e-steps", type=int, default=200)
    p.add_argument("--e2e-eval-rows", type=int, default=400, help="first N E2E dev rows (grouped by MR)")
    p.add_argument("--e2e-new-tokens", type=int, default=48, help="E2E greedy decoding length")
    p.add_argument("--e2e-shots", type=int, default=2, help="e2e-prompting: demonstrations of the in-context row")
    p.add_argument("--full-finetune-lr", type=float, default=5e-5)
    p.add_argument("--minilm-lr", type=float, default=2e-2, help="P-tuning v2 learning rate on MiniLM")
    p.add_argument("--minilm-virtual-tokens", type=int, default=16)
    p.add_argument(
        "--minilm-examples",
        type=int,
        default=9600,
        help="labelled SST-2 examples both MiniLM contenders train on (at most: the sentences are 6,885)",
    )
    p.add_argument(
        "--minilm-steps",
        type=int,
        default=1800,
        help="optimizer steps of both MiniLM contenders (1800 × 16 = 3 epochs of 9,600 phrases, 4.2 of the sentences)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--work-dir", default=str(C.ROOT / "runs" / "bench-quality"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir).resolve()
    selected = [part for part in PARTS if part in args.only]
    if args.sst2_rows != "phrases" and "sst2-methods" in selected:
        raise SystemExit(
            f"--sst2-rows {args.sst2_rows} is for the sst2-seeds and minilm parts, whose rows are kept by "
            "training rows; sst2-methods rows are the training file as it is. Run --only sst2-seeds or "
            "--only minilm with it."
        )
    if args.dry_run:
        for part in selected:
            print(f"# {part}")
            for step in STEPS[part](args, work):
                print(step.command)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    path = C.RESULTS / "quality.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    keys = [part_key(part) for part in PARTS]
    result = {k: previous[k] for k in keys if k in previous}  # parts not rerun
    # when each part was measured: a part that is not rerun keeps its date
    part_dates = dict(previous.get("part_dates") or {k: previous["date"] for k in result})
    args.previous = previous
    result.update(
        steps=args.steps,
        batch_size=args.batch_size,
        e2e_steps=args.e2e_steps,
        seed=args.seed,
        sst2_train_file=rel(sst2_files()[0]),
    )
    for part in selected:
        missing = [str(f) for f in NEEDS[part]() if not f.is_file()] if part in NEEDS else []
        if missing:
            print(f"{part}: {', '.join(missing)} not found; skipped (its recorded rows stay)", flush=True)
            continue
        started = time.perf_counter()
        result[part_key(part)] = RUNNERS[part](args, work)
        part_dates[part_key(part)] = now()
        result["part_dates"] = part_dates
        result.setdefault("part_seconds", dict(previous.get("part_seconds", {})))[part_key(part)] = (
            time.perf_counter() - started
        )
        C.write_result("quality", result)  # each finished part is kept if a later one fails
    result["targets"] = targets(result)
    written = C.write_result("quality", result)
    record = json.loads(written.read_text())
    table = quality_table(record)
    print("\n" + table)
    write_between_markers(QUALITY_DOC, TABLE_MARKER, table)
    print("wrote", written)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
