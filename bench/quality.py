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
  one whose kept states scored best on the selection splits (:func:`counted_seeds`).
- ``minilm``: P-tuning v2 with a linear head on frozen all-MiniLM-L6-v2 against full fine-tuning
  of the same model (same encoder, inputs, pooling and head shape) at the same example budget;
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
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PARTS = ("icl", "sst2-methods", "sst2-seeds", "minilm", "rte-prompting", "rte-methods", "rte-seeds", "rte-longer", "rte-reference",
         "e2e", "e2e-prompting")
METHODS = ("prompt-tuning", "prefix-tuning", "p-tuning", "p-tuning-v2")
# per-method settings for SmolLM2 on SST-2 (docs/recipes.md explains the choices)
SST2_METHODS = {method: [] for method in METHODS}

# RTE: the question format of Zhao et al. 2021 ("Calibrate Before Use", whose contextual
# calibration the calibrated rows apply), which names its answer space in the prompt so that a
# zero-shot model has a fair chance; " True" and " False" are one token each for SmolLM2, so every
# row scores a single next-token distribution. Class order follows GLUE: 0 entailment, 1 not.
RTE_TEMPLATE = "{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:{answer}"
RTE_LABEL_WORDS = ["True", "False"]
RTE_MAX_LENGTH = 320  # the longest RTE train row is 307 tokens with this template: nothing is cut
DEV_SIZES = {"sst2": 872, "rte": 277}


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


def cli_text(template: str) -> str:
    """A template as typed on a command line (a newline as ``\\n``, as ``--template`` reads it)."""
    return template.replace("\n", "\\n").replace("\t", "\\t")


def train_command(train_args: list[str]) -> list[str]:
    return ["accelerate", "launch", "--num_processes", "1", "--num_cpu_threads_per_process", str(os.cpu_count() or 1),
            "-m", "pstar_plugins.train", *train_args]


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
    from pstar_plugins.tasks.template import Answer, Field, Literal, Soft, Template

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


def binomial_standard_error(accuracy: float, n: int) -> float:
    """Standard error of an accuracy measured on ``n`` independent examples: √(p(1−p)/n)."""
    if not 0.0 <= accuracy <= 1.0 or n < 1:
        raise ValueError(f"accuracy {accuracy!r} must lie in [0, 1] and n {n!r} be positive")
    return math.sqrt(accuracy * (1.0 - accuracy) / n)


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (as ``pstar eval`` reports over demonstration draws)."""
    return statistics.mean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def selection_flags(percentage: int) -> list[str]:
    """``pstar train`` flags that choose the kept state on a split of the training file, never
    on the evaluation file (none when ``percentage`` is 0)."""
    return ["--validation-split-percentage", str(percentage), "--select-best", "best"] if percentage else []


def check_train_supports(flag: str) -> None:
    """Stop before any run when this checkout's ``pstar train`` lacks ``flag``."""
    text = subprocess.run([sys.executable, "-m", "pstar_plugins.train", "--method", "prompt-tuning", "--help"],
                          capture_output=True, text=True, cwd=C.ROOT).stdout
    if flag not in text:
        raise SystemExit(f"pstar train here has no {flag}; pass --selection-percentage 0 to train without model "
                         "selection (the rows then record that), or update the checkout.")


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
    return str(work / "sst2-train-sentences.tsv")


def write_sst2_sentences(work: Path) -> Path:
    """Write the sentences of GLUE's SST-2 train file (:func:`treebank_sentences`) under ``work``."""
    from pstar_plugins.tasks.data import read_examples

    source = C.SHARED_DATA / "sst2" / "train.tsv"
    if not source.is_file():
        raise SystemExit(f"--sst2-rows sentences: {source} not found; it needs GLUE's SST-2 train file")
    rows = [(r["sentence"], r["label"]) for r in read_examples(source)]  # as pstar train reads it
    out = work / "sst2-train-sentences.tsv"
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
    return [Step("SST-2 ICL", eval_command([*base, "--shots", "0", "4", "8", "--output", rel(work / "icl.json")]), work / "icl.json"),
            # contextual calibration (Zhao et al. 2021) of the same draws: small models' in-context
            # predictions lean towards one label, which calibration is meant to undo
            Step("SST-2 ICL calibrated", eval_command([*base, "--shots", "4", "8", "--calibrate", "--output",
                                                       rel(work / "icl-calibrated.json")]), work / "icl-calibrated.json")]


def sst2_train_args(args, method: str, run_dir: Path, steps: int, seed: int, extra: list[str], selection: int) -> list[str]:
    dev = sst2_files()[1]
    train = sst2_train_file(args, run_dir.parent)
    return ["--method", method, "--model", "smollm2", "--train-file", rel(train), "--validation-file", rel(dev),
            *selection_flags(selection), "--max-steps", str(steps), "--batch-size", str(args.batch_size),
            "--warmup-steps", str(steps // 10), "--eval-steps", str(steps // 3), "--eval-subset-size", "200",
            "--no-zero-shot", "--output-dir", rel(run_dir), "--overwrite", "--seed", str(seed), *extra]


SST2_TEMPLATE = "Review: {sentence} Sentiment:{answer}"  # the discrete template of every SST-2 row


def method_extra(args, method: str) -> list[str]:
    # P-tuning: the SST-2 words with soft tokens around the input, as in the recorded rows (the
    # method's own default builds its template from the data's columns, without words)
    template = ["--template", cli_text(p_tuning_template(SST2_TEMPLATE))] if method == "p-tuning" else []
    return SST2_METHODS[method] + template + dict(args.method_args).get(method, [])


def sst2_method_steps(args, work: Path) -> list[Step]:
    return [Step(f"SST-2 {method}", train_command(sst2_train_args(args, method, work / f"sst2-{method}", args.steps, args.seed,
                                                                  method_extra(args, method), 0)), work / f"sst2-{method}")
            for method in args.methods]


def sst2_seed_steps(args, work: Path) -> list[Step]:
    method = args.seeds_method
    rows = "sentences-" if args.sst2_rows == "sentences" else ""
    return [Step(f"SST-2 {method} seed {seed}",
                 train_command(sst2_train_args(args, method, work / f"sst2-seeds-{rows}{method}-{seed}", args.seeds_steps, seed,
                                               method_extra(args, method), args.selection_percentage)),
                 work / f"sst2-seeds-{rows}{method}-{seed}")
            for seed in args.seed_list]


MINILM_TEMPLATE = "Review: {sentence} Sentiment:{answer}"


def minilm_steps(args, work: Path) -> list[Step]:
    train, dev = sst2_train_file(args, work), sst2_files()[1]
    rows = "-sentences" if args.sst2_rows == "sentences" else ""
    steps, run_dir = args.minilm_steps, work / f"minilm-p-tuning-v2{rows}"
    cmd = ["--method", "p-tuning-v2", "--model", "minilm", "--model-kind", "masked-lm", "--train-file", rel(train),
           "--validation-file", rel(dev), "--max-train-samples", str(args.minilm_examples), "--max-steps", str(steps),
           "--batch-size", str(args.batch_size), "--warmup-steps", str(steps // 10), "--eval-steps", "0",
           "--output-dir", rel(run_dir), "--overwrite", "--seed", str(args.seed), "--template", MINILM_TEMPLATE,
           "--learning-rate", str(args.minilm_lr), "--num-virtual-tokens", str(args.minilm_virtual_tokens),
           # all-MiniLM-L6-v2 was trained to give sentence embeddings by mean pooling (its 1_Pooling config)
           "--pooling", "mean"]
    return [Step("MiniLM p-tuning-v2 (then full fine-tuning in this process: full_finetune_minilm)", train_command(cmd), run_dir)]


def rte_prompting_steps(args, work: Path) -> list[Step]:
    train, dev = rte_files()
    base = ["--model", "smollm2", "--validation-file", rel(dev), "--demonstration-file", rel(train),
            "--template", cli_text(RTE_TEMPLATE), "--label-words", *RTE_LABEL_WORDS, "--seeds", str(args.seeds)]
    shots = ["--shots", "0", str(args.rte_shots)]
    calibrated = ["--shots", *map(str, args.rte_calibrated_shots)]
    return [Step("RTE prompting", eval_command([*base, *shots, "--output", rel(work / "rte-prompting.json")]),
                 work / "rte-prompting.json"),
            Step("RTE prompting calibrated", eval_command([*base, *calibrated, "--calibrate", "--output",
                                                           rel(work / "rte-prompting-calibrated.json")]),
                 work / "rte-prompting-calibrated.json")]


def rte_train_args(args, method: str, run_dir: Path, budget: list[str], eval_steps: int, seed: int | None = None) -> list[str]:
    """A ``pstar train`` on RTE with the table's template and label words; ``budget`` sets its length,
    ``seed`` its seed (default ``--seed``)."""
    train, dev = rte_files()
    template = p_tuning_template(RTE_TEMPLATE) if method == "p-tuning" else RTE_TEMPLATE
    return ["--method", method, "--model", "smollm2", "--train-file", rel(train), "--validation-file", rel(dev),
            *selection_flags(args.selection_percentage), "--template", cli_text(template),
            "--label-words", *RTE_LABEL_WORDS, "--max-length", str(RTE_MAX_LENGTH), *budget,
            "--batch-size", str(args.batch_size), "--eval-steps", str(eval_steps),
            "--eval-subset-size", str(DEV_SIZES["rte"]), "--no-zero-shot", "--output-dir", rel(run_dir), "--overwrite",
            "--seed", str(args.seed if seed is None else seed)]


def rte_budget(args) -> tuple[list[str], int]:
    """The train flags of the ``rte-methods`` budget (``--rte-steps``, a tenth of them warm-up) and
    the steps between its selection evaluations (three in a run)."""
    steps = args.rte_steps
    return ["--max-steps", str(steps), "--warmup-steps", str(steps // 10)], max(1, steps // 3)


def rte_method_steps(args, work: Path) -> list[Step]:
    budget, eval_steps = rte_budget(args)
    return [Step(f"RTE {method}", train_command(rte_train_args(args, method, work / f"rte-{method}", budget, eval_steps)),
                 work / f"rte-{method}")
            for method in args.rte_methods]


def rte_seed_steps(args, work: Path) -> list[Step]:
    """``rte-methods``' command for ``--rte-seeds-method``, once per seed of ``--seed-list``."""
    budget, eval_steps = rte_budget(args)
    method = args.rte_seeds_method
    return [Step(f"RTE {method} seed {seed}",
                 train_command(rte_train_args(args, method, work / f"rte-seeds-{method}-{seed}", budget, eval_steps, seed)),
                 work / f"rte-seeds-{method}-{seed}")
            for seed in args.seed_list]


def rte_reference_steps(args, work: Path) -> list[Step]:
    """Full fine-tuning with ``rte-methods``' budget, template, label words and selection split."""
    budget, eval_steps = rte_budget(args)
    run_dir = work / "rte-full-fine-tuning"
    cmd = ["-p", "bench.whole_model", *rte_train_args(args, "whole-model", run_dir, budget, eval_steps),
           "--learning-rate", f"{args.rte_reference_lr:g}"]
    return [Step("RTE full fine-tuning (reference)", train_command(cmd), run_dir)]


def rte_longer_steps(args, work: Path) -> list[Step]:
    budget = ["--num-train-epochs", f"{args.rte_epochs:g}", "--warmup-ratio", "0.1"]
    return [Step(f"RTE {method}, {args.rte_epochs:g} epochs",
                 train_command(rte_train_args(args, method, work / f"rte-{method}-{args.rte_epochs:g}-epochs", budget,
                                              args.rte_longer_eval_steps)),
                 work / f"rte-{method}-{args.rte_epochs:g}-epochs")
            for method in args.rte_longer_methods]


def e2e_method_steps(args, work: Path) -> list[Step]:
    train, dev = e2e_files()
    out = []
    for method in ("prefix-tuning", "prompt-tuning"):
        run_dir = work / f"e2e-{method}"
        cmd = ["--task", "generation", "--method", method, "--model", "smollm2", "--train-file", rel(train),
               "--validation-file", rel(dev), "--template", cli_text(C.E2E_TEMPLATE), "--target-column", "ref",
               "--max-steps", str(args.e2e_steps), "--batch-size", "8", "--warmup-steps", str(args.e2e_steps // 10),
               "--eval-steps", "0", "--max-eval-samples", str(args.e2e_eval_rows), "--max-new-tokens", str(args.e2e_new_tokens),
               "--output-dir", rel(run_dir), "--overwrite", "--seed", str(args.seed), "--no-zero-shot"]
        out.append(Step(f"E2E {method}", train_command(cmd), run_dir))
    return out


def e2e_prompting_steps(args, work: Path) -> list[Step]:
    """Zero-shot and k-shot prompting on the rows and decoding of the ``e2e`` part's final evaluation."""
    train, dev = e2e_files()
    cmd = ["--task", "generation", "--model", "smollm2", "--validation-file", rel(dev), "--demonstration-file", rel(train),
           "--template", cli_text(C.E2E_TEMPLATE), "--target-column", "ref", "--max-new-tokens", str(args.e2e_new_tokens),
           "--max-eval-samples", str(args.e2e_eval_rows), "--shots", "0", str(args.e2e_shots), "--seeds", str(args.seeds),
           "--output", rel(work / "e2e-prompting.json")]
    return [Step("E2E prompting", eval_command(cmd), work / "e2e-prompting.json")]


STEPS = {"icl": icl_steps, "sst2-methods": sst2_method_steps, "sst2-seeds": sst2_seed_steps, "minilm": minilm_steps,
         "rte-prompting": rte_prompting_steps, "rte-methods": rte_method_steps, "rte-seeds": rte_seed_steps,
         "rte-longer": rte_longer_steps,
         "rte-reference": rte_reference_steps,
         "e2e": e2e_method_steps,
         "e2e-prompting": e2e_prompting_steps}
NEEDS = {"rte-prompting": rte_files, "rte-methods": rte_files, "rte-seeds": rte_files, "rte-longer": rte_files, "rte-reference": rte_files, "e2e": e2e_files, "e2e-prompting": e2e_files}


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
        result["runs"] += [{**r, "command": step.command, "date": now(), "command_seconds": seconds} for r in record["runs"]]
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
    return {"accuracy": metrics["tuned_accuracy"], "trainable_parameters": metrics["trainable_parameters"],
            **curves(metrics), **kept, "metrics": scalars, "command": step.command, "date": now(), "seconds": seconds, **extra}


def kept_selection_accuracy(run: dict) -> float | None:
    """The selection split's accuracy of the state a run kept: recorded by :func:`trained_row`, or,
    in a row from before it was, read off the run's curve at its kept step when its command kept
    the best state (:func:`run_data_plan`). ``None`` for a run without a selection split, whose
    curve scored evaluation rows, which must never choose."""
    if "selection_accuracy" in run:
        return run["selection_accuracy"]
    plan = run_data_plan(run)
    if not plan or not plan["validation_split_percentage"] or plan["select_best"] != "best":
        return None
    kept, curve = (run.get("final") or {}).get("kept_step"), run.get("curve") or {}
    return curve.get(str(kept), curve.get(kept)) if kept is not None else None


def curves(metrics: dict) -> dict:
    """A run's evaluations by step from its ``metrics.json``: ``curve``, the periodic ones (on the
    selection split when the run has one, else on the first evaluation rows), and ``final``, the
    last entry of its history, which scores the whole evaluation file with the state the run kept:
    ``kept_step`` is the selection split's best step (its last one under ``--select-best last``), or the last step without one. A run with a
    selection split evaluates it at the last step too, so that step is in both, with other rows."""
    metric = metrics.get("metric", "accuracy")
    history = metrics.get("history", {})
    steps, values = history.get("eval_step", []), history.get(metric, [])
    if not steps:
        return {"curve": {}}
    selection = metrics.get("selection") or {}
    kept = selection.get("best_step" if selection.get("select", "best") == "best" else "last_step", steps[-1])
    return {"curve": dict(zip(steps[:-1], values[:-1])), "final": {metric: values[-1], "kept_step": kept}}


def run_sst2_methods(args, work: Path) -> dict:
    results = dict(args.previous.get("sst2_methods", {}))  # methods not rerun keep their results
    for method, step in zip(args.methods, sst2_method_steps(args, work)):
        seconds = run_step(step, work / f"sst2-{method}.log")
        results[method] = trained_row(step, seconds, steps=args.steps, batch_size=args.batch_size, options=method_extra(args, method))
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
        "method": args.seeds_method, "steps": args.seeds_steps, "batch_size": args.batch_size, "train_rows": args.sst2_rows,
        "options": method_extra(args, args.seeds_method), "selection_percentage": args.selection_percentage,
        "seeds": list(args.seed_list), "accuracy": mean, "accuracy_std": std, "date": now(), "runs": runs}
    selection = seeds_selection_accuracy(runs)
    if selection is not None:
        results[args.sst2_rows][args.seeds_method]["selection_accuracy"] = selection
    return results


def seeds_selection_accuracy(runs: list[dict]) -> float | None:
    """The mean over the runs' kept states of their selection splits' accuracies, or ``None`` when
    a run has no selection score."""
    values = [kept_selection_accuracy(r) for r in runs]
    return None if not values or None in values else statistics.mean(values)


def record_selection_accuracy(record: dict) -> float | None:
    """A seed record's mean selection accuracy: recorded by :func:`run_sst2_seeds`, or, in a record
    from before it was, computed from its runs."""
    if "selection_accuracy" in record:
        return record["selection_accuracy"]
    return seeds_selection_accuracy(record.get("runs", []))


def by_train_rows(recorded: dict | None, flat_key: str) -> dict:
    """A part's record by SST-2 training rows (``phrases``, ``sentences``); a record from before
    the variants, which has ``flat_key`` at its top, is the phrases one."""
    if not recorded:
        return {}
    return {"phrases": recorded} if flat_key in recorded else dict(recorded)


def seed_variants(recorded: dict | None) -> dict:
    """``sst2_seeds`` by training rows, then by method: ``{rows: {method: record}}``. Older records
    read the same: one flat record (the phrases one), or one record per training rows."""
    return {rows: ({v["method"]: v} if "method" in v else dict(v)) for rows, v in by_train_rows(recorded, "method").items()}


# what besides the data plan decides which rows a run trained and selected on, and which it was scored on
RUN_ROWS_FLAGS = ("model", "train_file", "dataset", "dataset_config", "train_split", "column", "validation_file", "max_eval_samples")
TARGET_SEEDS, TARGET_PERCENTAGE = (1, 2, 3), 10  # the SST-2 target: three seeds, the best state on 10% of the rows


def run_data_plan(run: dict) -> dict | None:
    """The rows a recorded run trained, selected and was scored on: its data plan
    (``pstar_plugins.train.data_plan``: seed, ``--max-train-samples``,
    ``--validation-split-percentage``, ``--select-best``) and :data:`RUN_ROWS_FLAGS`, read from its
    command by pstar train's own parser, so that a flag given twice, or passed through
    ``--method-args``, reads as it did in the run; the training file by its name. No plugin is
    imported (``-p`` adds methods, not rows: the parser stores it, only ``train.parse_args``
    loads it) and nothing of this machine is checked. ``None`` for a run whose
    command is not a pstar train command that parses."""
    from pstar_plugins import train
    from pstar_plugins.errors import ConfigError

    command = run.get("command")
    argv = shlex.split(command) if isinstance(command, str) else list(command or [])
    if "pstar_plugins.train" not in argv:
        return None
    argv = argv[argv.index("pstar_plugins.train") + 1:]
    method = train._pre_parse(argv).method
    try:
        parser = train.build_parser([method] if method else [], method)
        args, _ = parser.parse_known_args(argv)  # method flags are no rows; -p is read, never loaded
    except (ConfigError, SystemExit):
        return None
    plan = {**train.data_plan(args), **{name: getattr(args, name, None) for name in RUN_ROWS_FLAGS}}
    if plan["train_file"]:  # by name: the sentences file is written under whichever --work-dir the bench ran with
        plan["train_file"] = Path(plan["train_file"]).name
    return plan


def record_splits(record: dict) -> list | None:
    """A seed record's rows: its runs' :func:`run_data_plan` by seed; ``None`` when a run's cannot
    be read."""
    plans = [run_data_plan(run) for run in record.get("runs") or []]
    return None if not plans or None in plans else sorted(plans, key=lambda plan: plan["seed"])


def target_splits(rows: str) -> list:
    """The rows the SST-2 target is measured on for training rows ``rows``: those of ``--only
    sst2-seeds`` (its model, files and cuts), over :data:`TARGET_SEEDS` with
    :data:`TARGET_PERCENTAGE` of the training rows held out and the best state on them kept
    (``--select-best best``, as the target asks)."""
    defaults = parse_args(["--only", "sst2-seeds", "--sst2-rows", rows, "--seed-list", *map(str, TARGET_SEEDS),
                           "--selection-percentage", str(TARGET_PERCENTAGE)])
    steps = sst2_seed_steps(defaults, Path(defaults.work_dir))
    plans = [dict(run_data_plan({"command": step.command}), select_best="best") for step in steps]
    return sorted(plans, key=lambda plan: plan["seed"])


def counted_seeds(variants: dict) -> tuple[str | None, dict | None, dict]:
    """The SST-2 seed record a target counts: its training rows, the record (``None`` when no
    method qualifies), and how it was chosen.

    The rows are :func:`counted_rows`. Only methods whose runs trained, selected and were scored
    on the target's own rows compete (:func:`target_splits`: the same model, files, seeds,
    held-out rows and ``--select-best best``, read from each run's command), so the comparison is
    paired and never counts a record outside the target; the others are listed as
    ``other_splits``, records whose commands cannot be read as ``unreadable``, and methods
    without selection scores as ``not_scored``. Of those left, the one whose kept states scored best on the
    selection splits (mean over its seeds) counts, never the best on SST-2 dev, the rows it is
    scored on. Scores equal to 9 decimals are a tie, which the first recorded wins."""
    rows = counted_rows(variants)
    methods = variants.get(rows) or {}
    if not methods:
        return None, None, {}
    wanted = target_splits(rows)
    plans = {m: record_splits(methods[m]) for m in methods}
    on_target = [m for m in methods if plans[m] == wanted]
    scores = {m: record_selection_accuracy(methods[m]) for m in on_target}
    scored = [m for m in on_target if scores[m] is not None]
    choice: dict = {"rule": "best mean selection accuracy of the kept states, on the target's selection splits"}
    if scored:
        choice["candidates"] = {m: scores[m] for m in scored}
    choice.update({key: names for key, names in (("other_splits", [m for m in methods if plans[m] is not None and m not in on_target]),
                                                  ("unreadable", [m for m in methods if plans[m] is None]),
                                                  ("not_scored", [m for m in on_target if m not in scored])) if names})
    if not scored:
        return rows, None, choice
    return rows, methods[max(scored, key=lambda m: round(scores[m], 9))], choice


def minilm_variants(recorded: dict | None) -> dict:
    """``minilm`` by training rows."""
    return by_train_rows(recorded, "gap_points")


def counted_variant(variants: dict) -> dict | None:
    """The variant a target counts: the one trained on whole sentences, the shape of the dev set it
    is scored on (docs/recipes.md, "Your own data"), when it is recorded, else GLUE's file as it
    is. Never the better of the two: picking the best of several measurements on the same dev rows
    would tune on them."""
    return variants.get(counted_rows(variants))


def counted_rows(variants: dict) -> str:
    """Which training rows' variant :func:`counted_variant` returns: ``sentences`` when recorded."""
    return "sentences" if variants.get("sentences") else "phrases"


def run_rte_methods(args, work: Path) -> dict:
    recorded = dict(args.previous.get("rte_methods", {}))
    return _rte_rows(args, recorded, args.rte_methods, rte_method_steps(args, work), work)


def run_rte_seeds(args, work: Path) -> dict:
    """``rte_seeds`` by method: the runs of each seed and their mean ± std (other methods keep theirs)."""
    runs, mean, std = seed_runs(args, rte_seed_steps(args, work), work)
    results = dict(args.previous.get("rte_seeds") or {})
    results[args.rte_seeds_method] = {
        "method": args.rte_seeds_method, "steps": args.rte_steps, "batch_size": args.batch_size,
        "selection_percentage": args.selection_percentage, "seeds": list(args.seed_list), "accuracy": mean,
        "accuracy_std": std, "date": now(), "runs": runs}
    return results


def run_rte_longer(args, work: Path) -> dict:
    names = [longer_name(method, args.rte_epochs) for method in args.rte_longer_methods]
    recorded = dict(args.previous.get("rte_longer", {}))
    return _rte_rows(args, recorded, names, rte_longer_steps(args, work), work, epochs=args.rte_epochs)


def run_rte_reference(args, work: Path) -> dict:
    return _rte_rows(args, {}, [REFERENCE_ROW], rte_reference_steps(args, work), work, learning_rate=args.rte_reference_lr)


REFERENCE_ROW = "full fine-tuning"


def longer_name(method: str, epochs: float) -> str:
    """The key and README name of an ``rte-longer`` row: one row per method and length."""
    return f"{method}, {epochs:g} epochs"


def _rte_rows(args, recorded: dict, names: list[str], steps: list[Step], work: Path, **extra) -> dict:
    """Run the RTE trainings ``steps``; the ``recorded`` rows with theirs (by name) replaced."""
    if args.selection_percentage:
        check_train_supports("--select-best")
    results = recorded
    for name, step in zip(names, steps):
        seconds = run_step(step, work / f"{step.output.name}.log")
        row = trained_row(step, seconds, batch_size=args.batch_size, selection_percentage=args.selection_percentage, **extra)
        results[name] = {**row, "steps": row["metrics"]["max_steps"]}  # the planned length (an early stop ends sooner)
        print(f"  {name}: {results[name]['accuracy']:.4f}", flush=True)
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

    if args.sst2_rows == "sentences":
        write_sst2_sentences(work)
    train, dev = sst2_train_file(args, work), sst2_files()[1]
    (step,) = minilm_steps(args, work)
    steps, examples = args.minilm_steps, args.minilm_examples
    seconds = run_step(step, work / f"{step.output.name}.log")
    metrics = json.loads((step.output / "metrics.json").read_text())
    ours = {"accuracy": metrics["tuned_accuracy"], "trainable_parameters": metrics["trainable_parameters"],
            "command": step.command, "date": now(), "seconds": seconds}
    print(f"  p-tuning-v2: {ours['accuracy']:.4f}; full fine-tuning ...", flush=True)
    train_rows = read_examples(train)[:examples]  # the same labelled examples --max-train-samples keeps
    dev_rows = read_examples(dev)
    started = time.perf_counter()
    full = full_finetune_minilm(train_rows, labels_of(train_rows, "label", train, C.LABEL_WORDS), dev_rows,
                                labels_of(dev_rows, "label", dev, C.LABEL_WORDS), steps, args.batch_size,
                                args.full_finetune_lr, args.seed, MINILM_TEMPLATE, pooling="mean")
    full["seconds"] = time.perf_counter() - started
    rows = f" --sst2-rows {args.sst2_rows}" if args.sst2_rows != "phrases" else ""
    full["command"] = f"python bench/quality.py --only minilm{rows} (full_finetune_minilm, lr {args.full_finetune_lr:g})"
    full["date"] = now()
    print(f"  full fine-tuning: {full['accuracy']:.4f}", flush=True)
    recorded = args.previous.get("minilm")
    results = minilm_variants(recorded)  # the other training rows keep theirs
    if recorded and "gap_points" in recorded:  # a record from before the variants: its date was the part's
        results["phrases"].setdefault("date", (args.previous.get("part_dates") or {}).get("minilm") or args.previous.get("date"))
    results[args.sst2_rows] = {
        "steps": steps, "batch_size": args.batch_size, "training_examples": len(train_rows), "train_rows": args.sst2_rows,
        "epochs": steps * args.batch_size / len(train_rows), "date": now(),
        "p-tuning-v2": ours, "full-finetuning": full, "gap_points": 100 * (full["accuracy"] - ours["accuracy"])}
    return results


def run_e2e(args, work: Path) -> dict:
    results = {}
    for step in e2e_method_steps(args, work):
        method = step.output.name.removeprefix("e2e-")
        seconds = run_step(step, work / f"e2e-{method}.log")
        metrics = json.loads((step.output / "metrics.json").read_text())
        scores = metrics["generation_scores"]["final eval"]
        results[method] = {"bleu": scores["bleu"], "rouge_l": scores["rouge_l"], "sources": scores["sources"],
                           "example": scores["example"][:2], "steps": args.e2e_steps, "batch_size": 8,
                           "command": step.command, "date": now(), "seconds": seconds}
        print(f"  {method}: BLEU {scores['bleu']:.2f} ROUGE-L {scores['rouge_l']:.2f} over {scores['sources']} MRs", flush=True)
    return results


RUNNERS = {"icl": run_icl, "sst2-methods": run_sst2_methods, "sst2-seeds": run_sst2_seeds, "minilm": run_minilm,
           "rte-seeds": run_rte_seeds,
           "rte-prompting": run_rte_prompting, "rte-methods": run_rte_methods, "rte-longer": run_rte_longer,
           "rte-reference": run_rte_reference, "e2e": run_e2e,
           "e2e-prompting": run_e2e_prompting}


# ------------------------------------------------------------------------------ targets and table


def _zero_and_icl(runs: list[dict]) -> tuple[dict | None, dict | None]:
    """The best zero-shot row (plain or calibrated) and the best in-context row of a prompting part."""
    zero = max((r for r in runs if r["shots"] == 0), key=lambda r: r["accuracy"], default=None)
    icl = max((r for r in runs if r["shots"] > 0), key=lambda r: r["accuracy"], default=None)
    return zero, icl


def rte_method_rows(result: dict) -> dict:
    """The trained RTE rows by name: ``rte-methods`` by method, ``rte-longer`` by method and epochs."""
    return {**(result.get("rte_methods") or {}), **(result.get("rte_longer") or {})}


def rte_counted_rows(result: dict) -> dict:
    """What the RTE target compares: :func:`rte_method_rows`, where a method run over seeds
    (``rte_seeds``) counts with the mean of its seeds instead of its one ``rte-methods`` run."""
    return {**rte_method_rows(result), **(result.get("rte_seeds") or {})}


def targets(result: dict) -> dict:
    """Each target of the quality table, ``None`` while a part it needs has no rows; the SST-2 one
    unmet, with ``method`` ``None`` and its reasons, when rows exist but none qualifies."""
    out: dict = {}
    rows, seeds, choice = counted_seeds(seed_variants(result.get("sst2_seeds")))
    if seeds:
        out["sst2_mean_of_seeds_at_least_0.88"] = {
            "method": seeds["method"], "train_rows": rows, "seeds": seeds["seeds"], "accuracy": seeds["accuracy"],
            "accuracy_std": seeds["accuracy_std"], "chosen": choice, "met": seeds["accuracy"] >= 0.88}
    else:  # no rows yet (None), or rows of which none was run as the target asks (unmet, saying why)
        out["sst2_mean_of_seeds_at_least_0.88"] = {"method": None, "train_rows": rows, "chosen": choice, "met": False} if rows else None
    rte_runs = (result.get("rte_prompting") or {}).get("runs", [])
    methods = rte_counted_rows(result)
    zero, icl = _zero_and_icl(rte_runs)
    if methods and zero and icl:
        best = max(methods, key=lambda m: methods[m]["accuracy"])
        acc = methods[best]["accuracy"]
        seeds = {"seeds": methods[best]["seeds"], "accuracy_std": methods[best]["accuracy_std"]} if "seeds" in methods[best] else {}
        out["rte_best_method_at_least_zero_shot_plus_5_and_best_icl"] = {
            "method": best, "accuracy": acc, **seeds, "best_zero_shot": {"name": zero["name"], "accuracy": zero["accuracy"]},
            "best_icl": {"name": icl["name"], "accuracy": icl["accuracy"]},
            "met": acc >= zero["accuracy"] + 0.05 and acc >= icl["accuracy"]}
    else:
        out["rte_best_method_at_least_zero_shot_plus_5_and_best_icl"] = None
    prefix = (result.get("e2e") or {}).get("prefix-tuning")
    shots = [r for r in (result.get("e2e_prompting") or {}).get("runs", []) if r["shots"] > 0]
    if prefix and shots:
        k_shot = max(shots, key=lambda r: r["bleu"])
        out["e2e_prefix_tuning_bleu_at_least_k_shot"] = {"prefix_tuning_bleu": prefix["bleu"], "prompting": k_shot["name"],
                                                         "prompting_bleu": k_shot["bleu"], "met": prefix["bleu"] >= k_shot["bleu"]}
    else:
        out["e2e_prefix_tuning_bleu_at_least_k_shot"] = None
    variants = minilm_variants(result.get("minilm"))
    minilm = counted_variant(variants)  # both contenders trained on the same rows
    # the issue asks an unmet gap to be recorded at its best too; it never decides "met"
    best = min(variants, key=lambda rows: variants[rows]["gap_points"], default=None)
    out["minilm_within_2_points"] = None if not minilm else {
        "gap_points": minilm["gap_points"], "train_rows": minilm.get("train_rows", "phrases"), "met": minilm["gap_points"] <= 2.0,
        "best_measured": {"gap_points": variants[best]["gap_points"], "train_rows": best}}
    return out


def _prompting_name(run: dict) -> str:
    k = run["shots"]
    name = "zero-shot prompt" if k == 0 else f"{k}-shot in-context ({run['seeds']} draw{'s' if run['seeds'] > 1 else ''})"
    if "calibrated" in run["name"]:
        name += ", contextual calibration"
    return name


def _pm(run: dict, key: str) -> str:
    value, std = run[key], run.get(f"{key}_std", 0.0)
    scale = 100 if key == "accuracy" else 1
    return f"{scale * value:.1f}" + (f" ± {scale * std:.1f}" if run.get("seeds", 1) > 1 else "")


def _noise(task: str, accuracy: float) -> str:
    n = DEV_SIZES[task]
    se = 100 * binomial_standard_error(accuracy, n)
    return (f"Noise: one run's accuracy on {n} examples has a binomial standard error of √(p(1−p)/{n}) = {se:.1f} points "
            f"at p = {100 * accuracy:.0f}%, and the difference of two runs one of {math.sqrt(2) * se:.1f} points; gaps smaller "
            "than that are not read as differences.")


def _kept_state(row: dict, sep: str) -> str:
    """How a trained row chose the state it scored, for its README label; empty for the last state."""
    return f"{sep}kept state chosen on {row['selection_percentage']}% of train" if row.get("selection_percentage") else ""


def readme_table(result: dict) -> str:
    dates = {k: v[:10] for k, v in result.get("part_dates", {}).items()}
    when = lambda key: dates.get(key, result["date"][:10])  # noqa: E731
    lines = [f"Measured by `python bench/quality.py` on {result['machine']['cpus']} CPU cores; the last column gives the "
             "date of each row, bench/results/quality.json its command (`python bench/quality.py --dry-run --only PART` "
             "prints them).", "",
             "| SST-2 dev (872), frozen SmolLM2-135M-Instruct | accuracy | measured |", "|---|---|---|"]
    sst2 = []
    for r in result.get("icl", {}).get("runs", []):
        lines.append(f"| {_prompting_name(r)} | {_pm(r, 'accuracy')} | {when('icl')} |")
    for method, r in result.get("sst2_methods", {}).items():
        options = "; " + " ".join(r["options"]) if r.get("options") else ""
        lines.append(f"| {method} ({r.get('steps', result['steps'])} steps × {r.get('batch_size', result['batch_size'])}{options}) "
                     f"| {100 * r['accuracy']:.1f} | {r['date'][:10] if r.get('date') else when('sst2_methods')} |")
        sst2.append(r["accuracy"])
    for rows, s in ((rows, s) for rows, methods in seed_variants(result.get("sst2_seeds")).items() for s in methods.values()):
        options = "; " + " ".join(s["options"]) if s.get("options") else ""
        chosen = _kept_state(s, ", ") or ", last state"
        train_rows = {r["metrics"]["train_rows"] for r in s.get("runs", []) if "train_rows" in r.get("metrics", {})}
        trained_on = ("; trained on whole sentences only" + (f" ({train_rows.pop():,} rows)" if len(train_rows) == 1 else "")
                      if rows == "sentences" else "")
        date = (s.get("date") or (s["runs"][-1].get("date") if s.get("runs") else None) or when("sst2_seeds"))[:10]
        lines.append(f"| {s['method']} ({s['steps']} steps × {s['batch_size']}{options}{chosen}{trained_on}), seeds "
                     f"{', '.join(map(str, s['seeds']))} | {100 * s['accuracy']:.1f} ± {100 * s['accuracy_std']:.1f} | {date} |")
        sst2.append(s["accuracy"])
    if sst2:
        lines += ["", _noise("sst2", max(sst2))]
    for rows, m in minilm_variants(result.get("minilm")).items():
        budget = (f"{m['training_examples']:,} labelled examples, {m['steps']} steps × {m['batch_size']} ({m['epochs']:.1f} epochs) each"
                  if "training_examples" in m else f"{m['examples_seen']} examples")
        trained_on = "whole sentences of SST-2 train" if rows == "sentences" else "SST-2 train as it is"
        date = lambda row: (row.get("date") or m.get("date") or when("minilm"))[:10]  # noqa: E731
        lines += ["", f"| SST-2 dev, all-MiniLM-L6-v2, {trained_on}: {budget} | accuracy | trained parameters | measured |",
                  "|---|---|---|---|",
                  f"| P-tuning v2 + linear head (frozen encoder) | {100 * m['p-tuning-v2']['accuracy']:.1f} | "
                  f"{m['p-tuning-v2']['trainable_parameters']:,} | {date(m['p-tuning-v2'])} |",
                  f"| full fine-tuning | {100 * m['full-finetuning']['accuracy']:.1f} | {m['full-finetuning']['trainable_parameters']:,} "
                  f"| {date(m['full-finetuning'])} |"]
    rte = result.get("rte_prompting") or {}
    rte_methods = rte_method_rows(result)
    if rte.get("runs") or rte_methods:
        words = " / ".join(rte.get("label_words") or RTE_LABEL_WORDS)
        lines += ["", f"| RTE dev (277), frozen SmolLM2-135M-Instruct; template `{cli_text(rte.get('template') or RTE_TEMPLATE)}`, "
                      f"label words {words} | accuracy | measured |", "|---|---|---|"]
        lines += [f"| {_prompting_name(r)} | {_pm(r, 'accuracy')} | {when('rte_prompting')} |" for r in rte.get("runs", [])]
        for name, r in rte_methods.items():
            chosen = _kept_state(r, "; ")
            method, epochs = (name.split(", ")[0], f", {r['epochs']:g} epochs") if "epochs" in r else (name, "")
            lines.append(f"| {method} ({r['steps']} steps × {r['batch_size']}{epochs}{chosen}) | {100 * r['accuracy']:.1f} | "
                         f"{r['date'][:10] if r.get('date') else when('rte_methods')} |")
        for method, r in (result.get("rte_seeds") or {}).items():
            lines.append(f"| {method} ({r['steps']} steps × {r['batch_size']}{_kept_state(r, '; ')}), seeds "
                         f"{', '.join(map(str, r['seeds']))} | {100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f} | "
                         f"{r['date'][:10]} |")
        for name, r in (result.get("rte_reference") or {}).items():
            chosen = _kept_state(r, "; ")
            lines.append(f"| {name}, every weight: a reference, not a prompt method ({r['steps']} steps × {r['batch_size']}, "
                         f"learning rate {r['learning_rate']:g}{chosen}) | {100 * r['accuracy']:.1f} | {r['date'][:10]} |")
        accuracies = [r["accuracy"] for r in rte.get("runs", [])] + [r["accuracy"] for r in rte_counted_rows(result).values()]
        lines += ["", _noise("rte", max(accuracies))]
    e = {k: v for k, v in (result.get("e2e") or {}).items() if isinstance(v, dict)}
    ep = result.get("e2e_prompting") or {}
    if e or ep.get("runs"):
        sources = ep.get("sources") or next(iter(e.values()))["sources"]
        lines += ["", f"| E2E dev ({sources} MRs, greedy), SmolLM2 | BLEU | ROUGE-L | measured |", "|---|---|---|---|"]
        lines += [f"| {_prompting_name(r)} | {_pm(r, 'bleu')} | {_pm(r, 'rouge_l')} | {when('e2e_prompting')} |" for r in ep.get("runs", [])]
        lines += [f"| {method} ({r.get('steps', result.get('e2e_steps'))} steps × {r.get('batch_size', 8)}) | {r['bleu']:.1f} | "
                  f"{r['rouge_l']:.1f} | {when('e2e')} |" for method, r in e.items()]
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


def _percentage(text: str) -> int:
    value = int(text)
    if not 0 <= value < 100:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a percentage from 0 (no selection split) to 99")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), metavar="PART", help=f"parts to run: {', '.join(PARTS)}")
    p.add_argument("--dry-run", action="store_true", help="print the parts' commands; run and write nothing")
    p.add_argument("--steps", type=int, default=300, help="SST-2 optimizer steps per method on SmolLM2")
    p.add_argument("--methods", nargs="+", choices=list(SST2_METHODS), default=list(SST2_METHODS),
                   help="SST-2 methods to (re)run; the others keep their recorded results")
    p.add_argument("--method-args", action="append", default=[], type=_method_args, metavar="METHOD=FLAGS",
                   help="extra train flags for one SST-2 method, e.g. 'prompt-tuning=--num-virtual-tokens 20' (repeatable; recorded)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3, help="demonstration draws per k")
    p.add_argument("--seeds-method", choices=list(SST2_METHODS), default="prompt-tuning",
                   help="sst2-seeds: the method run over --seed-list (its own row; other methods keep theirs)")
    p.add_argument("--sst2-rows", choices=["phrases", "sentences"], default="phrases",
                   help="sst2-seeds, minilm: train on GLUE's SST-2 file as it is (the treebank's phrases) or on "
                        "its whole sentences only, the shape of SST-2 dev (written to WORK/sst2-train-sentences.tsv)")
    p.add_argument("--seed-list", type=int, nargs="+", default=[1, 2, 3], help="sst2-seeds, rte-seeds: training seeds")
    p.add_argument("--seeds-steps", type=int, default=300, help="sst2-seeds: optimizer steps per seed")
    p.add_argument("--selection-percentage", type=_percentage, default=10, metavar="P",
                   help="sst2-seeds, rte-methods, rte-seeds, rte-longer, rte-reference: keep the best state as judged on P%% of the training file "
                        "(pstar train --validation-split-percentage P --select-best best); 0: the last state")
    p.add_argument("--rte-reference-lr", type=float, default=2e-5,
                   help="rte-reference: learning rate of full fine-tuning (the low end of Devlin et al. 2019's GLUE search)")
    p.add_argument("--rte-steps", type=int, default=150,
                   help="rte-methods, rte-seeds, rte-reference: optimizer steps of every run (150 × 16 is about one epoch of the "
                        "2,241 pairs left to train on beside the 10%% selection split)")
    p.add_argument("--rte-methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                   help="RTE methods to (re)run; the others keep their recorded results")
    p.add_argument("--rte-seeds-method", choices=list(METHODS), default="p-tuning-v2",
                   help="rte-seeds: the method run over --seed-list with rte-methods' budget (the best rte-methods row)")
    p.add_argument("--rte-longer-methods", nargs="+", choices=list(METHODS), default=["p-tuning-v2"],
                   help="rte-longer: methods trained for --rte-epochs")
    p.add_argument("--rte-epochs", type=float, default=4, help="rte-longer: epochs of the training split")
    p.add_argument("--rte-longer-eval-steps", type=int, default=70, help="rte-longer: steps between selection evaluations")
    p.add_argument("--rte-shots", type=int, default=4, help="rte-prompting: demonstrations of the in-context rows")
    p.add_argument("--rte-calibrated-shots", type=int, nargs="+", default=[0],
                   help="rte-prompting: the rows with contextual calibration (0: zero-shot; add 4 for calibrated 4-shot)")
    p.add_argument("--e2e-steps", type=int, default=200)
    p.add_argument("--e2e-eval-rows", type=int, default=400, help="first N E2E dev rows (grouped by MR)")
    p.add_argument("--e2e-new-tokens", type=int, default=48, help="E2E greedy decoding length")
    p.add_argument("--e2e-shots", type=int, default=2, help="e2e-prompting: demonstrations of the in-context row")
    p.add_argument("--full-finetune-lr", type=float, default=5e-5)
    p.add_argument("--minilm-lr", type=float, default=2e-2, help="P-tuning v2 learning rate on MiniLM")
    p.add_argument("--minilm-virtual-tokens", type=int, default=16)
    p.add_argument("--minilm-examples", type=int, default=9600,
                   help="labelled SST-2 examples both MiniLM contenders train on (at most: the sentences are 6,885)")
    p.add_argument("--minilm-steps", type=int, default=1800,
                   help="optimizer steps of both MiniLM contenders (1800 × 16 = 3 epochs of 9,600 phrases, 4.2 of the sentences)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--work-dir", default=str(C.ROOT / "runs" / "bench-quality"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir).resolve()
    selected = [part for part in PARTS if part in args.only]
    if args.sst2_rows != "phrases" and "sst2-methods" in selected:
        raise SystemExit(f"--sst2-rows {args.sst2_rows} is for the sst2-seeds and minilm parts, whose rows are kept by "
                         "training rows; sst2-methods rows are the training file as it is. Run --only sst2-seeds or "
                         "--only minilm with it.")
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
    result.update(steps=args.steps, batch_size=args.batch_size, e2e_steps=args.e2e_steps, seed=args.seed,
                  sst2_train_file=rel(sst2_files()[0]))
    for part in selected:
        missing = [str(f) for f in NEEDS[part]() if not f.is_file()] if part in NEEDS else []
        if missing:
            print(f"{part}: {', '.join(missing)} not found; skipped (its recorded rows stay)", flush=True)
            continue
        started = time.perf_counter()
        result[part_key(part)] = RUNNERS[part](args, work)
        part_dates[part_key(part)] = now()
        result["part_dates"] = part_dates
        result.setdefault("part_seconds", dict(previous.get("part_seconds", {})))[part_key(part)] = time.perf_counter() - started
        C.write_result("quality", result)  # each finished part is kept if a later one fails
    result["targets"] = targets(result)
    written = C.write_result("quality", result)
    record = json.loads(written.read_text())
    table = readme_table(record)
    print("\n" + table)
    update_readme("quality-table", table)
    print("wrote", written)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
