"""Every bad input and fault the library is tested against, with what the user gets.

This list is the single source: each input :class:`Case` names, in code, the exception type it
raises and a fragment of its message, and ``tests/test_error_table.py`` runs it and asserts both;
each :class:`Fault` names the test that covers it. ``docs/errors.md`` is rendered from the list
(``python -m tests.error_cases --write``) and one test checks the committed document is that
rendering.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pstar_plugins.contract.errors import (
    AdapterError,
    ConfigError,
    DataError,
    IncompatibleModelError,
    PluginError,
    PStarError,
    UnknownMethodError,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"


@dataclass
class Case:
    """A bad input: ``run(tmp_path)`` raises exactly ``raises``, whose text contains ``message``."""

    what: str  # the bad input
    run: Callable[[Path], object]
    raises: type[PStarError]
    message: str  # a fragment of what the user reads
    exits: bool = False  # a command: its entry point prints the error as ``error: ...`` and exits 2
    test = "tests/test_error_table.py"

    @property
    def outcome(self) -> str:
        return f"exit 2 ({self.raises.__name__})" if self.exits else self.raises.__name__


@dataclass
class Fault:
    """A fault whose outcome a test of its own checks (``test``: ``file::function``, comma-separated)."""

    what: str  # the fault
    outcome: str  # what happens
    message: str  # a fragment of what the user reads
    test: str


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
        from pstar_plugins.mechanisms.template import Template
        from pstar_plugins.tasks.generation import group_references

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
    from pstar_plugins.assembly.registry import create_plugin_manager

    class Typo:
        @hookimpl
        def pstar_fold_prefix(self, model):
            return True

    create_plugin_manager(autoload=False).register_plugin(Typo(), name="typo-plugin")


def _removed_hook(tmp):
    from pstar_plugins import hookimpl
    from pstar_plugins.assembly.registry import create_plugin_manager

    class OldStyle:
        @hookimpl
        def pstar_fold(self, model):
            return True

    create_plugin_manager(autoload=False).register_plugin(OldStyle(), name="old-plugin")


def _raising_hook(tmp):
    from pstar_plugins import build_model, hookimpl
    from pstar_plugins.assembly.registry import create_plugin_manager

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

    build_model(
        tf.AutoModelForCausalLM.from_config(
            tf.MambaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, state_size=4)
        ),
        "prefix-tuning",
    )


def _flash(tmp):
    from pstar_plugins import build_model

    model = _tiny()
    model.config._attn_implementation = "flash_attention_2"
    build_model(model, "p-tuning-v2")


def _mixed_without_task_ids(tmp):
    import torch

    from pstar_plugins import build_model

    build_model(_tiny(), "prompt-tuning", num_tasks=3, init="random")(input_ids=torch.ones(1, 3, dtype=torch.long))


def _encode_missing_slot():
    from pstar_plugins.mechanisms.template import Template

    Template.parse("R: {review}{answer}").encode({"text": "fine"}, tokenizer=None)


def _template(text):
    def run(tmp):
        from pstar_plugins.mechanisms.template import Template

        Template.parse(text)

    return run


_TINY_FOLDER: list[Path] = []


def _tiny_folder() -> Path:
    """A tiny random Llama saved with the offline SmolLM2 tokenizer (made once per process)."""
    if not _TINY_FOLDER:
        import tempfile

        from pstar_plugins.testing import save_tiny_pretrained

        _TINY_FOLDER.append(save_tiny_pretrained(Path(tempfile.mkdtemp(prefix="pstar-tiny-"))))
    return _TINY_FOLDER[0]


def _train_tiny(*argv):
    """Like :func:`_train` on the tiny model folder: for checks that need the tokenizer."""

    def run(tmp):
        _train("--model", str(_tiny_folder()), "--max-steps", "2", "--no-zero-shot", *argv)(tmp)

    return run


def _before_model_load(run):
    """``run`` with loading a model made an error: the refusal must come before any model loads."""

    def wrapped(tmp):
        from pstar_plugins import models

        def refuse(*args, **kwargs):
            raise AssertionError("the model was loaded before the input was refused")

        kept, models.load = models.load, refuse
        try:
            run(tmp)
        finally:
            models.load = kept

    return wrapped


def _pstar(*argv):
    """A ``pstar`` subcommand (export, import, ...) with ``{tmp}`` in its arguments filled in."""

    def run(tmp):
        from pstar_plugins.cli import _dispatch

        _dispatch([a.format(tmp=tmp) for a in argv])

    return run


def _with_env(name, value, run):
    def wrapped(tmp):
        import os

        old = os.environ.get(name)
        os.environ[name] = value
        try:
            run(tmp)
        finally:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old

    return wrapped


def _encoder_folder_as_causal_lm(tmp):
    import transformers as tf

    tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64).save_pretrained(
        tmp / "bert"
    )
    _train(
        "--method",
        "prompt-tuning",
        "--model",
        str(tmp / "bert"),
        "--task",
        "generation",
        "--template",
        "D: {sentence} T:{answer}",
        "--target-column",
        "label",
    )(tmp)


def _output_dir_under_a_file(tmp):
    (tmp / "a-file").write_text("x")
    _train("--method", "prompt-tuning", "--output-dir", str(tmp / "a-file" / "out"))(tmp)


def _checkpoint(tmp, method, step):
    ckpt = tmp / "out" / f"checkpoint-{step}"
    (ckpt / "adapter").mkdir(parents=True)
    (ckpt / "adapter" / "adapter_config.json").write_text(json.dumps({"method": method}))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))


def _resume_other_method(tmp):
    _checkpoint(tmp, "p-tuning", 4)
    _train("--method", "prompt-tuning", "--resume-from-checkpoint", "latest")(tmp)


def _resume_past_max_steps(tmp):
    _checkpoint(tmp, "prompt-tuning", 60)
    _train("--method", "prompt-tuning", "--resume-from-checkpoint", "latest", "--max-steps", "12")(tmp)


def _finished_run(tmp):
    out = tmp / "out"
    out.mkdir()
    (out / "run.json").write_text(
        json.dumps({"method": "prompt-tuning", "model": "smollm2", "train_file": _packaged("sst2_train_sample.tsv")})
    )
    (out / "metrics.json").write_text("{}")
    _train("--method", "prompt-tuning")(tmp)


def _packaged(name):
    from pstar_plugins.models import packaged_data

    return packaged_data(name)


def _pair_data(tmp):
    """A small sentence-pair file shaped like GLUE RTE (two text columns, an int label, an idx)."""
    rows = [{"sentence1": f"premise {i}", "sentence2": f"hypothesis {i}", "label": i % 2, "idx": i} for i in range(8)]
    path = tmp / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _train_on_pairs(*argv):
    def run(tmp):
        data = _pair_data(tmp)
        _train("--train-file", data, "--validation-file", data, *argv)(tmp)

    return run


def _continue_head_adapter_with_more_classes(tmp):
    adapter = _saved_adapter(tmp, method="p-tuning-v2")  # a linear head for 2 classes
    _train("--method", "p-tuning-v2", "--init-from-adapter", str(adapter), "--label-words", "bad", "fine", "good")(tmp)


def _locked_output_dir(tmp):
    import os
    import socket

    out = tmp / "out"
    out.mkdir()
    (out / ".pstar-run.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    _train("--method", "prompt-tuning")(tmp)


def _plugin_module_for_train(tmp, name, source):
    """Write ``source`` as module ``name`` on sys.path and pass it to ``pstar train -p name``."""
    from pstar_plugins.assembly.registry import get_plugin_manager
    from pstar_plugins.train.cli import parse_args

    (tmp / f"{name}.py").write_text(source)
    sys.path.insert(0, str(tmp))
    try:
        parse_args(["-p", name, "--method", "prompt-tuning", "--output-dir", str(tmp / "out")])
    finally:
        sys.path.remove(str(tmp))
        sys.modules.pop(name, None)
        pm = get_plugin_manager()
        for plugin_name, _ in list(pm.list_name_plugin()):
            if plugin_name.startswith(name + ":"):
                pm.unregister_plugin(plugin_name)


def _plugin_module(tmp, name, source):
    """Write ``source`` as module ``name`` on sys.path and load it with ``-p name``."""
    from pstar_plugins.assembly.registry import create_plugin_manager

    (tmp / f"{name}.py").write_text(source)
    sys.path.insert(0, str(tmp))
    try:
        create_plugin_manager(autoload=False).load_module(name)
    finally:
        sys.path.remove(str(tmp))
        sys.modules.pop(name, None)


_RAISING_MODULE = "import json\nsettings = json.loads('{not json')\n"
_MISSPELT_OBJECT_MODULE = (
    "from pstar_plugins import hookimpl\n\n"
    "class Typo:\n    @hookimpl\n    def pstar_fold_prefix(self, model):\n        return True\n\n"
    "plugin = Typo()\n"
)
_NO_HOOK_MODULE = "def pstar_fold_prefix(model):\n    return True\n"
_SEED_FIELD_MODULE = (
    "from dataclasses import dataclass, field\n"
    "from pstar_plugins.contract.method import MethodConfig, MethodPlugin, MethodSpec\n\n"
    "@dataclass\nclass SeedConfig(MethodConfig):\n    seed: int = field(default=0, metadata={'help': 'init seed'})\n\n"
    "class SeedPlugin(MethodPlugin):\n    spec = MethodSpec('seeded', SeedConfig, 'a method whose field shadows "
    "--seed',\n"
    "                      method_class='pstar_plugins.contract.method:PromptMethod')\n\n"
    "plugin = SeedPlugin()\n"
)


def _eval_adapter_on_a_model_of_another_size(tmp):
    import transformers as tf

    from pstar_plugins.evaluate import _main

    _saved_adapter(tmp, method="prompt-tuning")
    tf.LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
        tmp / "wide"
    )
    _main(["--adapter", str(tmp / "adapter"), "--model", str(tmp / "wide")])


def _eval_generation_on_flex(tmp):
    from pstar_plugins.evaluate import _main

    _main(
        [
            "--model",
            str(_tiny_folder()),
            "--task",
            "generation",
            "--attn-implementation",
            "flex_attention",
            "--template",
            "Data: {mr}\\nText:{answer}",
        ]
    )


def _eval_on_flex(tmp):
    from pstar_plugins.evaluate import _main

    _main(["--model", str(_tiny_folder()), "--attn-implementation", "flex_attention"])


def _export_into_non_empty_folder(tmp):
    from pstar_plugins.cli import _export_target

    (tmp / "other").mkdir()
    (tmp / "other" / "notes.txt").write_text("another run's file")
    _export_target(str(tmp / "other"), overwrite=False)


CASES = [
    Case(
        "unknown method name",
        _train("--method", "prefix-tunning"),
        UnknownMethodError,
        "unknown method 'prefix-tunning'; known methods: p-tuning, p-tuning-v2, prefix-tuning, prompt-tuning",
        exits=True,
    ),
    Case(
        "prompt length 0",
        _build("prompt-tuning", num_virtual_tokens=0),
        ConfigError,
        "num_virtual_tokens=0: expected a positive integer",
    ),
    Case(
        "unknown method option",
        _build("prefix-tuning", num_virtual_token=4),
        ConfigError,
        "unknown option(s) ['num_virtual_token']",
    ),
    Case(
        "template without a text slot",
        _template("Sentiment:{answer}"),
        ConfigError,
        "has no text slot; add one such as {sentence}",
    ),
    Case(
        "template with an unknown slot",
        _template("{sentence} {label words}"),
        ConfigError,
        "unknown slot {label words}",
    ),
    Case(
        "p-tuning template without soft tokens",
        _build("p-tuning", template="{sentence}{answer}"),
        ConfigError,
        "has no {soft} token",
    ),
    Case(
        "classification head with fewer than 2 labels",
        _build("p-tuning-v2", num_labels=1),
        ConfigError,
        "num_labels=1: a classification head needs at least 2 labels",
    ),
    Case(
        "prefix tuning on a model without attention layers",
        _no_attention,
        IncompatibleModelError,
        "not through transformers' attention interface",
    ),
    Case(
        "prefix methods on a flash-attention model (not yet verified on a GPU)",
        _flash,
        IncompatibleModelError,
        "prefix methods on flash_attention_2 are written but not yet verified on a GPU: load the model with "
        "attn_implementation='sdpa'",
    ),
    Case(
        "mixed-task adapter called without task_ids",
        _mixed_without_task_ids,
        ConfigError,
        "holds 3 task prompts; pass task_ids",
    ),
    Case(
        "adapter trained for a different model",
        _adapter_for_other_model,
        AdapterError,
        "the adapter was trained for a model with attention={'self': {'head_dim': 8, 'n_kv_heads': 2",
    ),
    Case(
        "adapter of another method passed to --init-from-adapter",
        _adapter_of_another_method,
        ConfigError,
        "holds a 'prefix-tuning' adapter, but --method is 'prompt-tuning'",
        exits=True,
    ),
    Case("truncated or corrupt safetensors file", _truncated_adapter, AdapterError, "is truncated or corrupt"),
    Case(
        "adapter config missing fields",
        lambda tmp: _rewrite_embedded_config(tmp, lambda m: m.pop("folded")),
        AdapterError,
        "lacks field(s) ['folded']",
    ),
    Case(
        "adapter config from a newer format version",
        lambda tmp: _rewrite_embedded_config(tmp, lambda m: m.update(format_version=7)),
        AdapterError,
        "has format_version 7; this pstar-plugins reads up to 2",
    ),
    Case(
        "adapter config with a malformed task record",
        lambda tmp: _rewrite_embedded_config(tmp, lambda m: m.update(task={"kind": "regression", "template": "x"})),
        AdapterError,
        "has task {'kind': 'regression', 'template': 'x'}; expected an object with kind classification or generation",
    ),
    Case(
        "eval: generation without a template",
        lambda tmp: _eval("--task", "generation"),
        ConfigError,
        "--task generation needs --template",
    ),
    Case(
        "eval: generation demonstrations without a file",
        lambda tmp: _eval("--task", "generation", "--template", "D: {mr} T:{answer}", "--shots", "2"),
        ConfigError,
        "--shots 2 with --task generation needs --demonstration-file",
    ),
    Case(
        "data: generation row without the target column",
        _generation_rows([{"mr": "a"}], "ref"),
        DataError,
        "evaluation row 1 has no target column 'ref' (columns: ['mr']); set --target-column",
    ),
    Case(
        "data: missing label column",
        _data_file("a.tsv", b"sentence\tgold\nfine\t1\n"),
        DataError,
        "row 1 has no column 'label'",
    ),
    Case(
        "data: unknown label",
        _data_file("b.tsv", b"sentence\tlabel\nfine\tmaybe\n"),
        DataError,
        "row 1 has label 'maybe'; expected one of ['negative', 'positive'] or an index below 2. Set --label-words "
        "to the data's labels",
    ),
    Case(
        "data: template slot missing from an example",
        lambda tmp: _encode_missing_slot(),
        DataError,
        "template field {review} is not a column of the example (columns: ['text']); change the slot with "
        "--template or map a column to it with --column DATA_COLUMN=review",
    ),
    Case("data: empty file", _data_file("c.csv", b""), DataError, "is empty; expected a header row"),
    Case(
        "data: invalid UTF-8",
        _data_file("d.tsv", b"sentence\tlabel\nok\t1\n\xff\t0\n"),
        DataError,
        "line 3 is not valid UTF-8",
    ),
    Case(
        "data: malformed JSON line",
        _data_file("e.jsonl", b'{"sentence": "a", "label": 1}\n{"sentence": \n'),
        DataError,
        "row 2 is not valid JSON",
    ),
    Case(
        "data: dataset split that does not exist", _dataset("test"), DataError, "could not load split 'test' of dataset"
    ),
    Case(
        "data: --column names no column of the data",
        _dataset(mapping={"sentence": "text"}),
        DataError,
        "--column sentence=... names no column (columns: ['label', 'text'])",
    ),
    Case(
        "data: --column without '='",
        lambda tmp: __import__("pstar_plugins.tasks.data", fromlist=["x"]).parse_column_mapping(["text"]),
        ConfigError,
        "--column 'text': expected DATA_COLUMN=NAME",
    ),
    Case(
        "output directory holds a different run",
        _other_run_in_output_dir,
        ConfigError,
        "holds a different run (p-tuning); choose another directory or pass --overwrite",
        exits=True,
    ),
    Case(
        "train: {answer} before the end of the template (causal LM)",
        _train("--method", "prompt-tuning", "--template", "{answer} is the sentiment of: {sentence}"),
        ConfigError,
        "{sentence} comes after {answer}, but a causal LM predicts the answer from the text before it; move "
        "{answer} to the end",
        exits=True,
    ),
    Case(
        "train: negative learning rate",
        _train("--method", "prompt-tuning", "--learning-rate", "-0.1"),
        ConfigError,
        "--learning-rate -0.1: expected a finite number above 0",
        exits=True,
    ),
    Case(
        "train: learning rate nan",
        _train("--method", "prompt-tuning", "--learning-rate", "nan"),
        ConfigError,
        "--learning-rate nan: expected a finite number above 0",
        exits=True,
    ),
    Case(
        "train: learning rate 0 (was silently the preset)",
        _train("--method", "prompt-tuning", "--learning-rate", "0"),
        ConfigError,
        "--learning-rate 0.0: expected a finite number above 0",
        exits=True,
    ),
    Case(
        "train: --batch-size 0",
        _train("--method", "prompt-tuning", "--batch-size", "0"),
        ConfigError,
        "--batch-size 0: expected a positive integer",
        exits=True,
    ),
    Case(
        "train: --eval-batch-size 0",
        _train("--method", "prompt-tuning", "--eval-batch-size", "0"),
        ConfigError,
        "--eval-batch-size 0: expected a positive integer",
        exits=True,
    ),
    Case(
        "train: --max-steps -1",
        _train("--method", "prompt-tuning", "--max-steps", "-1"),
        ConfigError,
        "--max-steps -1: expected a positive integer",
        exits=True,
    ),
    Case(
        "train: --max-steps 0 (would save an untrained adapter)",
        _train("--method", "prompt-tuning", "--max-steps", "0"),
        ConfigError,
        "(0 would save an untrained adapter)",
        exits=True,
    ),
    Case(
        "train: --warmup-steps more than --max-steps",
        _train("--method", "prompt-tuning", "--max-steps", "5", "--warmup-steps", "20"),
        ConfigError,
        "--warmup-steps 20 is more than --max-steps 5",
        exits=True,
    ),
    Case(
        "train: a flag value of the wrong type",
        _train("--method", "prompt-tuning", "--batch-size", "sixteen"),
        ConfigError,
        "argument --batch-size: invalid int value: 'sixteen'. See pstar train --help",
        exits=True,
    ),
    Case(
        "train: abbreviated method flag (was taken as --num-virtual-tokens)",
        _train("--method", "prompt-tuning", "--num-virtual-token", "5"),
        ConfigError,
        "unknown option --num-virtual-token; did you mean --num-virtual-tokens?",
        exits=True,
    ),
    Case(
        "train: prompt longer than the model's positions (--num-virtual-tokens 1000000000)",
        _before_model_load(_train_tiny("--method", "prompt-tuning", "--num-virtual-tokens", "1000000000")),
        ConfigError,
        "--num-virtual-tokens 1,000,000,000 leaves no position for the input: the model has 128 "
        "(max_position_embeddings)",
        exits=True,
    ),
    Case(
        "train: prefix larger than the memory left (--num-virtual-tokens 1000000000)",
        _before_model_load(_train_tiny("--method", "prefix-tuning", "--num-virtual-tokens", "1000000000")),
        ConfigError,
        "Use fewer virtual tokens, a smaller --batch-size or a shorter --max-length",
        exits=True,
    ),
    Case(
        "train: flex_attention training on the CPU",
        _before_model_load(_train_tiny("--method", "prompt-tuning", "--attn-implementation", "flex_attention")),
        ConfigError,
        "--attn-implementation flex_attention cannot train on the CPU",
        exits=True,
    ),
    Case(
        "train: a 4-bit option without --load-in-4bit",
        _before_model_load(_train_tiny("--method", "prompt-tuning", "--bnb-4bit-quant-type", "fp4")),
        ConfigError,
        "--bnb-4bit-quant-type fp4 sets up 4-bit layers; add --load-in-4bit",
        exits=True,
    ),
    Case(
        "train: --load-in-4bit and --load-in-8bit together",
        _train("--method", "prompt-tuning", "--load-in-4bit", "--load-in-8bit"),
        ConfigError,
        "argument --load-in-8bit: not allowed with argument --load-in-4bit",
        exits=True,
    ),
    Case(
        "train: a quantized base under DeepSpeed",
        _with_env(
            "ACCELERATE_USE_DEEPSPEED",
            "true",
            _before_model_load(_train_tiny("--method", "prompt-tuning", "--load-in-4bit")),
        ),
        ConfigError,
        "--load-in-4bit under DeepSpeed: the engine casts the module to its precision",
        exits=True,
    ),
    Case(
        "eval: generation on flex_attention on the CPU",
        _before_model_load(_eval_generation_on_flex),
        ConfigError,
        "--attn-implementation flex_attention cannot decode on the CPU",
        exits=True,
    ),
    Case(
        "eval: classification on flex_attention on the CPU",
        _before_model_load(_eval_on_flex),
        ConfigError,
        "--attn-implementation flex_attention cannot evaluate on the CPU",
        exits=True,
    ),
    Case(
        "train: abbreviated flag (was taken as --learning-rate)",
        _train("--method", "prompt-tuning", "--learning-rat", "0.1"),
        ConfigError,
        "unknown option --learning-rat; did you mean --learning-rate?",
        exits=True,
    ),
    Case(
        "train: misspelt flag",
        _train("--method", "prompt-tuning", "--learnig-rate", "0.1"),
        ConfigError,
        "unknown option --learnig-rate; did you mean --learning-rate?",
        exits=True,
    ),
    Case(
        "train: empty label word",
        _train("--method", "prompt-tuning", "--label-words", "bad", ""),
        ConfigError,
        "1 empty or blank word(s); give one real word per class",
        exits=True,
    ),
    Case(
        "train: blank label word",
        _train("--method", "prompt-tuning", "--label-words", "bad", "  "),
        ConfigError,
        "1 empty or blank word(s); give one real word per class",
        exits=True,
    ),
    Case(
        "train: repeated label word",
        _train("--method", "prompt-tuning", "--label-words", "good", "good", "meh"),
        ConfigError,
        "['good'] appear more than once, so two classes could not be told apart",
        exits=True,
    ),
    Case(
        "train: p-tuning-v2 --head-init label-words with label words that start with the same token (refused from "
        "the tokenizer, before the model loads)",
        _before_model_load(
            _train_tiny(
                "--method", "p-tuning-v2", "--head-init", "label-words", "--label-words", "entail", "entailment"
            )
        ),
        ConfigError,
        "label words ['entail', 'entailment'] share first tokens, so their head rows would start equal",
        exits=True,
    ),
    Case(
        "pstar export: --model folder that does not exist (checked before loading)",
        lambda tmp: (
            _saved_adapter(tmp, method="prompt-tuning"),
            _pstar("export", "{tmp}/adapter", "--model", "/no/such/model", "--output", "{tmp}/peft")(tmp),
        ),
        ConfigError,
        "--model /no/such/model: no such folder. Pass an existing model folder, an offline alias",
        exits=True,
    ),
    Case(
        "train: --max-length shorter than the template and its soft tokens",
        _train_tiny(
            "--method", "p-tuning", "--template", "{soft:8} Review: {sentence} Sentiment:{answer}", "--max-length", "8"
        ),
        ConfigError,
        "--max-length 8 leaves no room for the text: the template",
        exits=True,
    ),
    Case(
        "train: --model folder that does not exist",
        _train("--method", "prompt-tuning", "--model", "/no/such/folder"),
        ConfigError,
        "--model /no/such/folder: no such folder. Pass an existing model folder, an offline alias (smollm2, minilm)",
        exits=True,
    ),
    Case(
        "train: hub id while offline and not cached",
        _with_env("HF_HUB_OFFLINE", "1", _train("--method", "prompt-tuning", "--model", "someone/not-a-cached-model")),
        ConfigError,
        "HF_HUB_OFFLINE is set and it is not in the local cache. Unset HF_HUB_OFFLINE to download it, or use an "
        "offline alias (smollm2, minilm)",
        exits=True,
    ),
    Case(
        "train: --model-kind masked-lm with --task generation",
        _train(
            "--method",
            "prompt-tuning",
            "--model-kind",
            "masked-lm",
            "--task",
            "generation",
            "--template",
            "D: {sentence} T:{answer}",
        ),
        ConfigError,
        "--task generation decodes text with a causal LM, which --model-kind masked-lm is not",
        exits=True,
    ),
    Case(
        "train: an encoder (BERT) as the causal LM of a generation task",
        _encoder_folder_as_causal_lm,
        ConfigError,
        "is an encoder-only bert model, which cannot generate text; use a decoder model",
        exits=True,
    ),
    Case(
        "train: --output-dir that cannot be created",
        _output_dir_under_a_file,
        ConfigError,
        "is a file, so the folder cannot be created; choose another --output-dir",
        exits=True,
    ),
    Case(
        "train: only --train-file (was: validation silently on SST-2 dev)",
        _train("--method", "prompt-tuning", "--train-file", _packaged("sst2_train_sample.tsv")),
        ConfigError,
        "without --validation-file: pass --validation-file, or --validation-split-percentage 10",
        exits=True,
    ),
    Case(
        "train: --select-best best without a selection split",
        _train("--method", "prompt-tuning", "--select-best", "best"),
        ConfigError,
        "--select-best best choose on a selection split carved out of the training rows; pass "
        "--validation-split-percentage 10",
        exits=True,
    ),
    Case(
        "train: --early-stopping-patience without a selection split",
        _train("--method", "prompt-tuning", "--early-stopping-patience", "3"),
        ConfigError,
        "--early-stopping-patience 3 choose on a selection split carved out of the training rows",
        exits=True,
    ),
    Case(
        "train: --select-best best with --eval-steps 0",
        _train(
            "--method",
            "prompt-tuning",
            "--select-best",
            "best",
            "--validation-split-percentage",
            "10",
            "--eval-steps",
            "0",
        ),
        ConfigError,
        "with --eval-steps 0 would never evaluate on the selection split; pass --eval-steps 25",
        exits=True,
    ),
    Case(
        "train: --validation-split-percentage 0",
        _train("--method", "prompt-tuning", "--validation-split-percentage", "0"),
        ConfigError,
        "--validation-split-percentage 0: expected 1 to 99",
        exits=True,
    ),
    Case(
        "train: --validation-split-percentage 100 (nothing left to train on)",
        _train("--method", "prompt-tuning", "--validation-split-percentage", "100"),
        ConfigError,
        "--validation-split-percentage 100: expected 1 to 99",
        exits=True,
    ),
    Case(
        "train: a selection split that holds out no row",
        _train("--method", "prompt-tuning", "--validation-split-percentage", "5", "--max-train-samples", "10"),
        ConfigError,
        "--validation-split-percentage 5 of the 10 rows of",
        exits=True,
    ),
    Case(
        "train: --select-best best on the evaluation rows themselves (only --train-file)",
        _train(
            "--method",
            "prompt-tuning",
            "--train-file",
            _packaged("sst2_train_sample.tsv"),
            "--validation-split-percentage",
            "10",
            "--select-best",
            "best",
        ),
        ConfigError,
        "the held-out rows are the evaluation set, so choosing the step on them would report a score tuned on its "
        "own rows",
        exits=True,
    ),
    Case(
        "train: fewer training rows than one step takes",
        _train("--method", "prompt-tuning", "--max-train-samples", "10", "--batch-size", "16"),
        ConfigError,
        "the training split has 10 rows (what --max-train-samples 10 left), fewer than the 16 one step takes "
        "(--batch-size 16); pass --batch-size 10 or fewer, or train on more rows (a larger --max-train-samples).",
        exits=True,
    ),
    Case(
        "train: --max-steps and --num-train-epochs",
        _train("--method", "prompt-tuning", "--max-steps", "10", "--num-train-epochs", "2"),
        ConfigError,
        "--max-steps 10 and --num-train-epochs 2 both set the length of the run; keep one of them",
        exits=True,
    ),
    Case(
        "train: --num-train-epochs 0",
        _train("--method", "prompt-tuning", "--num-train-epochs", "0"),
        ConfigError,
        "--num-train-epochs 0: expected a finite number above 0",
        exits=True,
    ),
    Case(
        "train: --warmup-steps and --warmup-ratio",
        _train("--method", "prompt-tuning", "--warmup-steps", "5", "--warmup-ratio", "0.1"),
        ConfigError,
        "--warmup-steps 5 and --warmup-ratio 0.1 both set the warm-up; keep one of them",
        exits=True,
    ),
    Case(
        "train: --warmup-ratio above 1",
        _train("--method", "prompt-tuning", "--warmup-ratio", "1.5"),
        ConfigError,
        "--warmup-ratio 1.5: expected a fraction of the run's steps from 0 to 1",
        exits=True,
    ),
    Case(
        "train: --num-train-epochs whose steps are fewer than --warmup-steps",
        _train(
            "--method", "prompt-tuning", "--num-train-epochs", "0.1", "--max-train-samples", "32", "--warmup-steps", "5"
        ),
        ConfigError,
        "--warmup-steps 5 is more than --max-steps 1",
        exits=True,
    ),
    Case(
        "train: two text columns and a method without a template of its own",
        _train_on_pairs("--method", "prompt-tuning"),
        ConfigError,
        "has 2 text columns ['sentence1', 'sentence2'], and the default template 'Review: {sentence} "
        "Sentiment:{answer}' is worded for one; pass a template that places each, e.g. --template 'sentence1: "
        "{sentence1}\\nsentence2: {sentence2}\\nAnswer:{answer}'",
        exits=True,
    ),
    Case(
        "train: --init-from-adapter whose head has other classes than --label-words",
        _continue_head_adapter_with_more_classes,
        ConfigError,
        "was trained with another number of classes than the 3 --label-words; pass the label words it was trained with",
        exits=True,
    ),
    Case(
        "train: only --validation-file",
        _train("--method", "prompt-tuning", "--validation-file", _packaged("sst2_dev.tsv")),
        ConfigError,
        "without --train-file would train on the packaged SST-2 sample; pass --train-file too",
        exits=True,
    ),
    Case(
        "train: rerun into a finished run's --output-dir",
        _finished_run,
        ConfigError,
        "holds a finished run (metrics.json); pass --overwrite to replace it",
        exits=True,
    ),
    Case(
        "train: --output-dir in use by a running process",
        _locked_output_dir,
        ConfigError,
        "is in use by another run (PID",
        exits=True,
    ),
    Case(
        "train: --resume-from-checkpoint of another method's run",
        _resume_other_method,
        ConfigError,
        "is a 'p-tuning' run, but --method is 'prompt-tuning'",
        exits=True,
    ),
    Case(
        "train: resume with a --max-steps below the checkpoint's step",
        _resume_past_max_steps,
        ConfigError,
        "is at step 60, past --max-steps 12; pass --max-steps 60 or more",
        exits=True,
    ),
    Case(
        "-p module that raises on import",
        lambda tmp: _plugin_module(tmp, "pstar_raising_plugin", _RAISING_MODULE),
        PluginError,
        "plugin module 'pstar_raising_plugin' raised JSONDecodeError on import: Expecting property name enclosed "
        "in double quotes",
    ),
    Case(
        "-p module whose plugin object has a misspelt hook",
        lambda tmp: _plugin_module(tmp, "pstar_typo_plugin", _MISSPELT_OBJECT_MODULE),
        PluginError,
        "plugin 'pstar_typo_plugin:plugin' implements an unknown hook",
    ),
    Case(
        "-p module that implements no hook",
        lambda tmp: _plugin_module(tmp, "pstar_hookless_plugin", _NO_HOOK_MODULE),
        PluginError,
        "-p pstar_hookless_plugin: the module implements no pstar hook",
    ),
    Case(
        "method config field named like a pstar train flag",
        lambda tmp: _plugin_module_for_train(tmp, "pstar_seed_plugin", _SEED_FIELD_MODULE),
        PluginError,
        "plugin 'pstar_seed_plugin:plugin': method 'seeded' has a config field 'seed', whose flag --seed is "
        "already a flag of pstar train",
    ),
    Case(
        "eval: --adapter on a model of another hidden size (checked from its config, before loading weights)",
        _eval_adapter_on_a_model_of_another_size,
        AdapterError,
        "--adapter was trained on a model with hidden size 32",
        exits=True,
    ),
    Case(
        "export: --output into a non-empty folder",
        _export_into_non_empty_folder,
        ConfigError,
        "is not empty (notes.txt); choose an empty or new folder, or pass --overwrite",
    ),
    Case(
        "misspelt hook implementation in a plugin",
        _misspelt_hook,
        PluginError,
        "plugin 'typo-plugin' implements an unknown hook",
    ),
    Case(
        "plugin implementing a hook of earlier versions",
        _removed_hook,
        PluginError,
        "plugin 'old-plugin' implements pstar_fold, which no longer exists: the core asks the method class "
        "directly. Instead, override PromptMethod.fold()",
    ),
    Case(
        "exception inside a plugin's hook",
        _raising_hook,
        PluginError,
        "plugin 'broken-plugin' raised ZeroDivisionError in pstar_param_groups",
    ),
    Fault(
        "adapter_config.json edited by hand (the config inside the tensor file is the one used)",
        "UserWarning, embedded config used",
        "adapter_config.json differs in [...] from the config stored inside adapter.safetensors, which is the one used",
        "tests/test_adapter_file_modes.py::test_an_edited_adapter_config_json_is_reported_and_the_embedded_one_used",
    ),
    Fault(
        "two runs into one --output-dir at once; a lock left by a killed run",
        "second run: exit 2 naming the first's PID; stale lock taken over",
        "--output-dir ... is in use by another run (PID N on HOST ...)",
        "tests/test_train_runs.py::test_a_second_run_into_a_busy_folder_exits_2_naming_the_first_ones_pid",
    ),
    Fault(
        "rerun into a finished run, resume below its step, --overwrite",
        "exit 2, nothing lost; --overwrite removes the old checkpoints",
        "holds a finished run (adapter, metrics.json); pass --overwrite",
        "tests/test_train_runs.py::test_reruns_overwrite_checkpoint_limit_and_resume_bounds",
    ),
    Fault(
        "loss becomes NaN/inf",
        "exit 2, earlier checkpoints kept",
        "loss became nan at step N; lower --learning-rate. Checkpoints so far are kept.",
        "tests/test_faults.py::test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint",
    ),
    Fault(
        "SIGKILL while an adapter is being saved",
        "previous or new adapter loads, never a mix",
        "(atomic rename; config embedded in the tensor file)",
        "tests/test_adapter_files.py::test_sigkill_during_saves_leaves_a_consistent_adapter",
    ),
    Fault(
        "process died while writing a checkpoint",
        "resume takes the newest complete checkpoint",
        "(trainer_state.json is written last)",
        "tests/test_faults.py::test_resume_picks_the_latest_complete_checkpoint",
    ),
    Fault(
        "one rank of a 2-process run killed",
        "launcher exits non-zero within seconds",
        "ChildFailedError ... rank : 1 (exitcode -9); collectives time out after --dist-timeout",
        "tests/test_faults.py::test_killing_one_rank_ends_the_other_quickly_naming_the_lost_rank",
    ),
    Fault(
        "random text as a template / random bytes as a data file",
        "only PStarError subclasses",
        "(Hypothesis fuzzing)",
        "tests/test_tasks.py::test_template_parser_raises_only_library_errors, "
        "tests/test_tasks.py::test_data_reader_raises_only_library_errors",
    ),
]


def render() -> str:
    lines = [
        "# Bad input and faults: what the user gets",
        "",
        "Generated from `tests/error_cases.py` by `python -m tests.error_cases --write`; `tests/test_error_table.py`",
        "runs every input row and fails when this file is out of date. All errors derive from",
        "`pstar_plugins.contract.errors.PStarError`; the training script prints them as `error: ...` and exits 2 "
        "before",
        "loading a model or writing anything.",
        "",
        "| bad input or fault | what happens | message (fragment) | checked by |",
        "|---|---|---|---|",
    ]
    for c in CASES:
        lines.append(f"| {c.what} | {c.outcome} | `{c.message.replace('|', '/')}` | `{c.test}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if "--write" in sys.argv:
        DOC.write_text(render())
        print(f"wrote {DOC}")
    else:
        print(render())
