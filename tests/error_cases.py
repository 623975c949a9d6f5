"""Every bad input and fault the library is tested against, with what the user gets.

``docs/errors.md`` is rendered from this list (``python -m tests.error_cases --write``) and
``tests/test_error_table.py`` runs each input case and checks the document is current, so the
table cannot drift from the behaviour.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"


@dataclass
class Case:
    what: str  # the bad input or fault
    run: Callable | None  # makes it happen (tmp_path) -> None; None: covered by the named test
    error: str  # exception type, or the observable outcome
    message: str  # a fragment of what the user reads
    test: str = "tests/test_error_table.py"


def _tiny(arch="llama"):
    from pstar_plugins.testing import tiny_model

    return tiny_model(arch)


def _build(method, **options):
    from pstar_plugins import build_model

    return lambda tmp: build_model(_tiny(), method, **options)


#: the output folder of the training command a case runs, and its files just before the command
#: ran (after the case's own set-up); tests/test_error_table.py checks that a refused command
#: changed none of them
BEFORE_COMMAND: dict[str, tuple[Path, dict | None]] = {}


def tree(path: Path) -> dict | None:
    """Every file under ``path`` with its size and modification time (``None``: no folder)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def _train(*argv):
    def run(tmp):
        from pstar_plugins.train import _main

        args = [*argv, "--output-dir", str(tmp / "out")] if "--output-dir" not in argv else list(argv)
        out = Path(args[args.index("--output-dir") + 1])
        BEFORE_COMMAND["train"] = (out, tree(out))
        _main(args)
    return run


def _saved_adapter(tmp, arch="llama", method="prefix-tuning"):
    from pstar_plugins import build_model

    build_model(_tiny(arch), method).save_adapter(tmp / "adapter")
    return tmp / "adapter"


def _load(tmp, arch="llama"):
    from pstar_plugins import load_adapter

    load_adapter(_tiny(arch), tmp / "adapter")


def _adapter_for_other_model(tmp):
    _saved_adapter(tmp, arch="llama")
    _load(tmp, arch="gpt2")


def _truncated_adapter(tmp):
    path = _saved_adapter(tmp) / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    _load(tmp)


def _rewrite_embedded_config(tmp, change):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = _saved_adapter(tmp) / "adapter.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    meta = json.loads(metadata["pstar_adapter_config"])
    change(meta)
    save_file(load_file(path), str(path), metadata={**metadata, "pstar_adapter_config": json.dumps(meta)})
    _load(tmp)


def _eval(*argv):
    from pstar_plugins.evaluate import parse_args, resolve_task

    resolve_task(parse_args(list(argv)), None)


def _generation_rows(rows, target_column):
    def run(tmp):
        from pstar_plugins.tasks.generation import group_references
        from pstar_plugins.tasks.template import Template

        group_references(rows, Template.parse("D: {mr} T:{answer}"), target_column)
    return run


def _data_file(name, content: bytes, label_column="label"):
    def run(tmp):
        from pstar_plugins.tasks.data import labels_of, read_examples

        path = tmp / name
        path.write_bytes(content)
        rows = read_examples(path)
        labels_of(rows, label_column, str(path), ["negative", "positive"])
    return run


def _dataset(split="validation", mapping=None):
    def run(tmp):
        from pstar_plugins.tasks.data import load_split

        folder = tmp / "ds"
        folder.mkdir()
        (folder / "validation.jsonl").write_text('{"text": "fine", "label": 1}\n')
        load_split(None, str(folder), None, split, None, mapping or {})
    return run


def _other_run_in_output_dir(tmp):
    out = tmp / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"method": "p-tuning", "model": "x", "train_file": "y"}))
    _train("--method", "prompt-tuning", "--output-dir", str(out))(tmp)


def _adapter_of_another_method(tmp):
    _saved_adapter(tmp, method="prefix-tuning")
    _train("--method", "prompt-tuning", "--init-from-adapter", str(tmp / "adapter"))(tmp)


def _misspelt_hook(tmp):
    from pstar_plugins import hookimpl
    from pstar_plugins.plugins import create_plugin_manager

    class Typo:
        @hookimpl
        def pstar_fold_prefix(self, model):
            return True

    create_plugin_manager(autoload=False).register_plugin(Typo(), name="typo-plugin")


def _raising_hook(tmp):
    from pstar_plugins import build_model, hookimpl
    from pstar_plugins.plugins import create_plugin_manager

    class Broken:
        @hookimpl
        def pstar_param_groups(self, model, learning_rate, weight_decay):
            raise ZeroDivisionError("division by zero")

    pm = create_plugin_manager(autoload=False)
    pm.register_plugin(Broken(), name="broken-plugin")
    from pstar_plugins import param_groups

    param_groups(build_model(_tiny(), "prompt-tuning", init="random", plugin_manager=pm), 1e-3)


def _no_attention(tmp):
    import transformers as tf

    from pstar_plugins import build_model

    build_model(tf.AutoModelForCausalLM.from_config(tf.MambaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, state_size=4)),
                "prefix-tuning")


def _flash(tmp):
    from pstar_plugins import build_model

    model = _tiny()
    model.config._attn_implementation = "flash_attention_2"
    build_model(model, "p-tuning-v2")


def _mixed_without_task_ids(tmp):
    import torch

    from pstar_plugins import build_model

    build_model(_tiny(), "prompt-tuning", num_tasks=3, init="random")(input_ids=torch.ones(1, 3, dtype=torch.long))


def _template(text):
    def run(tmp):
        from pstar_plugins.tasks.template import Template

        Template.parse(text)
    return run


CASES = [
    Case("unknown method name", _train("--method", "prefix-tunning"), "exit 2 (UnknownMethodError)", "unknown method 'prefix-tunning'; known methods: p-tuning, p-tuning-v2, prefix-tuning, prompt-tuning"),
    Case("prompt length 0", _build("prompt-tuning", num_virtual_tokens=0), "ConfigError", "num_virtual_tokens=0: expected a positive integer"),
    Case("unknown method option", _build("prefix-tuning", num_virtual_token=4), "ConfigError", "unknown option(s) ['num_virtual_token']"),
    Case("template without a text slot", _template("Sentiment:{answer}"), "ConfigError", "has no text slot; add one such as {sentence}"),
    Case("template with an unknown slot", _template("{sentence} {label words}"), "ConfigError", "unknown slot {label words}"),
    Case("p-tuning template without soft tokens", _build("p-tuning", template="{sentence}{answer}"), "ConfigError", "has no {soft} token"),
    Case("classification head with fewer than 2 labels", _build("p-tuning-v2", num_labels=1), "ConfigError", "num_labels=1: a classification head needs at least 2 labels"),
    Case("prefix tuning on a model without attention layers", _no_attention, "IncompatibleModelError", "not through transformers' attention interface"),
    Case("prefix methods on a flash-attention model", _flash, "IncompatibleModelError", "Reload it with from_pretrained(..., attn_implementation='sdpa')"),
    Case("mixed-task adapter called without task_ids", _mixed_without_task_ids, "ConfigError", "holds 3 task prompts; pass task_ids"),
    Case("adapter trained for a different model", _adapter_for_other_model, "AdapterError", "the adapter was trained for a model with attention={'self': {'head_dim': 8, 'n_kv_heads': 2"),
    Case("adapter of another method passed to --init-from-adapter", _adapter_of_another_method, "exit 2 (ConfigError)", "holds a 'prefix-tuning' adapter, but --method is 'prompt-tuning'"),
    Case("truncated or corrupt safetensors file", _truncated_adapter, "AdapterError", "is truncated or corrupt"),
    Case("adapter config missing fields", lambda tmp: _rewrite_embedded_config(tmp, lambda m: m.pop("folded")), "AdapterError", "lacks field(s) ['folded']"),
    Case("adapter config from a newer format version", lambda tmp: _rewrite_embedded_config(tmp, lambda m: m.update(format_version=7)), "AdapterError", "has format_version 7; this pstar-plugins reads up to 1"),
    Case("adapter config with a malformed task record", lambda tmp: _rewrite_embedded_config(tmp, lambda m: m.update(task={"kind": "regression", "template": "x"})), "AdapterError", "has task {'kind': 'regression', 'template': 'x'}; expected an object with kind classification or generation"),
    Case("eval: generation without a template", lambda tmp: _eval("--task", "generation"), "ConfigError", "--task generation needs --template"),
    Case("eval: generation demonstrations without a file", lambda tmp: _eval("--task", "generation", "--template", "D: {mr} T:{answer}", "--shots", "2"), "ConfigError", "--shots 2 with --task generation needs --demonstration-file"),
    Case("data: generation row without the target column", _generation_rows([{"mr": "a"}], "ref"), "DataError", "evaluation row 1 has no target column 'ref' (columns: ['mr']); set --target-column"),
    Case("data: missing label column", _data_file("a.tsv", b"sentence\tgold\nfine\t1\n"), "DataError", "row 1 has no column 'label'"),
    Case("data: unknown label", _data_file("b.tsv", b"sentence\tlabel\nfine\tmaybe\n"), "DataError", "row 1 has label 'maybe'; expected one of ['negative', 'positive']"),
    Case("data: empty file", _data_file("c.csv", b""), "DataError", "is empty; expected a header row"),
    Case("data: invalid UTF-8", _data_file("d.tsv", b"sentence\tlabel\nok\t1\n\xff\t0\n"), "DataError", "line 3 is not valid UTF-8"),
    Case("data: malformed JSON line", _data_file("e.jsonl", b'{"sentence": "a", "label": 1}\n{"sentence": \n'), "DataError", "row 2 is not valid JSON"),
    Case("data: dataset split that does not exist", _dataset("test"), "DataError", "could not load split 'test' of dataset"),
    Case("data: --column names no column of the data", _dataset(mapping={"sentence": "text"}), "DataError", "--column sentence=... names no column (columns: ['label', 'text'])"),
    Case("data: --column without '='", lambda tmp: __import__("pstar_plugins.tasks.data", fromlist=["x"]).parse_column_mapping(["text"]), "ConfigError", "--column 'text': expected DATA_COLUMN=NAME"),
    Case("output directory holds a different run", _other_run_in_output_dir, "exit 2 (ConfigError)", "holds a different run (p-tuning); choose another directory or pass --overwrite"),
    Case("misspelt hook implementation in a plugin", _misspelt_hook, "PluginError", "plugin 'typo-plugin' implements an unknown hook"),
    Case("exception inside a plugin's hook", _raising_hook, "PluginError", "plugin 'broken-plugin' raised ZeroDivisionError in pstar_param_groups"),
    Case("loss becomes NaN/inf", None, "exit 2, earlier checkpoints kept", "loss became nan at step N; lower --learning-rate. Checkpoints so far are kept.",
         "tests/test_faults.py::test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint"),
    Case("SIGKILL while an adapter is being saved", None, "previous or new adapter loads, never a mix", "(atomic rename; config embedded in the tensor file)",
         "tests/test_adapter_files.py::test_sigkill_during_saves_leaves_a_consistent_adapter"),
    Case("process died while writing a checkpoint", None, "resume takes the newest complete checkpoint", "(trainer_state.json is written last)",
         "tests/test_faults.py::test_resume_picks_the_latest_complete_checkpoint"),
    Case("one rank of a 2-process run killed", None, "launcher exits non-zero within seconds", "ChildFailedError ... rank : 1 (exitcode -9); collectives time out after --dist-timeout",
         "tests/test_faults.py::test_killing_one_rank_ends_the_other_quickly_naming_the_lost_rank"),
    Case("random text as a template / random bytes as a data file", None, "only PStarError subclasses", "(Hypothesis fuzzing)",
         "tests/test_tasks.py::test_template_parser_raises_only_library_errors, tests/test_tasks.py::test_data_reader_raises_only_library_errors"),
]


def render() -> str:
    lines = [
        "# Bad input and faults: what the user gets",
        "",
        "Generated from `tests/error_cases.py` by `python -m tests.error_cases --write`; `tests/test_error_table.py`",
        "runs every input row and fails when this file is out of date. All errors derive from",
        "`pstar_plugins.errors.PStarError`; the training script prints them as `error: ...` and exits 2 before",
        "loading a model or writing anything.",
        "",
        "| bad input or fault | what happens | message (fragment) | checked by |",
        "|---|---|---|---|",
    ]
    for c in CASES:
        lines.append(f"| {c.what} | {c.error} | `{c.message.replace('|', '/')}` | `{c.test}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if "--write" in sys.argv:
        DOC.write_text(render())
        print(f"wrote {DOC}")
    else:
        print(render())
