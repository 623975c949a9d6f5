"""Method config fields as ``pstar train`` flags, the strict parser, and ``-p module``."""

from dataclasses import dataclass, field
from typing import Optional

import pytest

from pstar_plugins.assembly.registry import create_plugin_manager, get_plugin_manager
from pstar_plugins.contract.errors import ConfigError, PluginError
from pstar_plugins.contract.spec import MethodConfig, MethodPlugin, MethodSpec
from pstar_plugins.testing import registered_plugin
from pstar_plugins.train.cli import parse_args
from pstar_plugins.train.plan import method_config_of


@dataclass
class OptionalFieldsConfig(MethodConfig):
    width: int | None = field(default=None, metadata={"help": "hidden width (none: the model's)"})
    depth: Optional[int] = field(default=2, metadata={"help": "layers"})
    scale: float | str = field(default="auto", metadata={"help": "a number or 'auto'"})
    flags: list[int] = field(default_factory=list, metadata={"help": "several ints"})
    tied: bool = field(default=False, metadata={"help": "tie weights"})


class OptionalFieldsPlugin(MethodPlugin):
    spec = MethodSpec(
        "optional-fields",
        OptionalFieldsConfig,
        "a method with optional and union fields (test)",
        method_class="pstar_plugins.contract.method:PromptMethod",
    )


def _args(*argv):
    return parse_args(["--method", "optional-fields", "--output-dir", "unused", *argv])


def test_optional_and_union_fields_are_flags_that_take_their_values():
    with registered_plugin(OptionalFieldsPlugin()):
        assert _args().method_options == {}  # unset flags leave the config's defaults
        given = _args(
            "--width", "64", "--depth", "none", "--scale", "0.5", "--flags", "1", "2", "--tied", "true"
        ).method_options
        assert given == {"width": 64, "depth": None, "scale": 0.5, "flags": [1, 2], "tied": True}
        assert type(given["width"]) is int and type(given["scale"]) is float
        assert _args("--scale", "auto", "--width", "none").method_options == {"scale": "auto", "width": None}
        with pytest.raises(ConfigError, match=r"argument --width: expected int or none, got 'wide'"):
            _args("--width", "wide")
        with pytest.raises(ConfigError, match=r"argument --tied: expected true or false, got 'maybe'"):
            _args("--tied", "maybe")


def test_help_of_a_method_with_optional_fields_lists_them(capsys):
    with registered_plugin(OptionalFieldsPlugin()), pytest.raises(SystemExit) as exit_info:
        parse_args(["--method", "optional-fields", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--width N|none hidden width (none: the model's) (default: None)" in out
    assert "--scale X|TEXT" in out and "usage: pstar train" in out


@pytest.mark.parametrize("name", ["seed", "max_length", "output_dir"])
def test_a_field_named_like_a_script_flag_is_refused_by_pstar_train(name):
    """Whatever method is asked for: a plugin loaded for the run must not carry a field that a
    flag of the script shadows (it would silently keep its default)."""
    config = dataclass(type("Clashing", (MethodConfig,), {"__annotations__": {name: int}, name: field(default=1)}))

    class Clashing(MethodPlugin):
        spec = MethodSpec(
            "clashing", config, "shadows a flag", method_class="pstar_plugins.contract.method:PromptMethod"
        )

    flag = "--" + name.replace("_", "-")
    with registered_plugin(Clashing(), name="clash-plugin"):
        with pytest.raises(
            PluginError,
            match=f"plugin 'clash-plugin': method 'clashing' has a config field '{name}', whose flag {flag}",
        ):
            parse_args(["--method", "prompt-tuning", "--output-dir", "unused"])


def test_task_flags_fill_the_fields_they_share_on_purpose():
    from pstar_plugins.assembly.registry import get_plugin_manager

    pm = get_plugin_manager()
    args = parse_args(
        ["--method", "p-tuning", "--template", "{soft:2} T: {sentence}\\nS:{answer}", "--output-dir", "x"]
    )
    config, _ = method_config_of(args, pm.method("p-tuning"))
    assert config.template == "{soft:2} T: {sentence}\nS:{answer}"  # converted once, here
    args = parse_args(["--method", "prompt-tuning", "--label-words", "bad", "good", "--output-dir", "x"])
    config, _ = method_config_of(args, pm.method("prompt-tuning"))
    assert config.label_words == ["bad", "good"]


def test_p_flag_with_a_module_registers_its_plugin_object():
    pm = create_plugin_manager(autoload=False)
    assert pm.load_module("tests.plugin_fixture") == "tests.plugin_fixture:plugin"
    assert pm.methods["temperature"].plugin == "tests.plugin_fixture:plugin"


def test_argument_errors_exit_2_without_a_traceback(capsys, tmp_path):
    from pstar_plugins.cli import main

    assert main(["train", "--method", "prompt-tuning", "--learnig-rate", "1", "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == "error: unknown option --learnig-rate; did you mean --learning-rate?\n"
    assert main(["export", "adapter", "--model", "m", "--output", str(tmp_path), "--format", "lora"]) == 2
    assert (
        "argument --format: invalid choice: 'lora' (choose from 'peft'). See pstar export --help."
        in capsys.readouterr().err
    )
    assert not (tmp_path / "o").exists()


def test_help_shows_the_defaults_a_method_uses(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--method", "prompt-tuning", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    options = out.split("prompt-tuning options (PromptTuningConfig):", 1)[1]
    assert (
        "--num-virtual-tokens N prompt length m (Lester et al. use 20-100) (default: 10)" in options
    )  # the preset, not 20
    assert "base learning rate (default: 0.03, this method's preset)" in out
    assert "--batch-size N per-process training batch size (default: 16)" in out
    assert "pstar train --method NAME --help lists them" in out


def test_methods_verbose_lists_each_methods_options(capsys):
    from pstar_plugins.cli import main

    assert main(["methods", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "--num-virtual-tokens N" in out and "--encoder-hidden-size N" in out and "--projection {true,false}" in out


def test_generation_summary_gives_both_scores_with_their_scale_a_sample_and_the_files(tmp_path):
    from argparse import Namespace

    from pstar_plugins.train.report import smooth, summary_text

    results = {
        "generation_scores": {
            "zero-shot eval": {"bleu": 1.234, "rouge_l": 10.0, "example": ["x"]},
            "final eval": {"bleu": 12.345, "rouge_l": 40.5, "example": ["a pub near the river", "b"]},
        }
    }
    (tmp_path / "adapter").mkdir()
    text = summary_text(
        Namespace(method="prefix-tuning", model="m"), results, "bleu", [tmp_path / "adapter", tmp_path / "metrics.json"]
    )
    assert "  zero-shot dev  : BLEU 1.23, ROUGE-L 10.00 (both 0-100)" in text
    assert "  tuned dev      : BLEU 12.35, ROUGE-L 40.50 (both 0-100)" in text
    assert "sample output          : 'a pub near the river'" in text
    assert f"files written:\n    {tmp_path / 'adapter'}/\n    {tmp_path / 'metrics.json'}\n" in text
    assert smooth([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])  # bias-corrected: no pull towards 0
    assert smooth([0.0, 10.0], weight=0.5) == pytest.approx([0.0, 5 / 0.75])


def test_a_default_template_follows_the_datas_one_text_column():
    from argparse import Namespace

    from pstar_plugins.train.data import default_template_for

    args = Namespace(label_column="label", target_column="ref", task="classification")
    preset = "{soft:3} Review: {sentence} {soft:3} Sentiment:{answer}"
    assert (
        default_template_for(preset, {"text": "fine", "label": "1"}, args)
        == "{soft:3} Review: {text} {soft:3} Sentiment:{answer}"
    )
    assert default_template_for(preset, {"sentence": "fine", "label": "1"}, args) == preset  # already fits
    # two candidate columns: no guess, the slot check then names --template and --column
    assert default_template_for(preset, {"title": "a", "body": "b", "label": "1"}, args) == preset


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["methods"],
        ["train", "--method", "p-tuning", "--help"],
        ["train", "--method", "prompt-tuning", "--batch-size", "0", "--output-dir", "unused"],
    ],
)
def test_help_listing_and_argument_errors_never_import_torch(argv):
    """What keeps these commands well under two seconds (bench/cli_latency.py measures it)."""
    import subprocess
    import sys

    code = (
        "import sys; from pstar_plugins.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed', 'accelerate') if m in sys.modules)\n"
        "print('heavy:', heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert result.stdout.strip().endswith("heavy: []"), result.stdout[-500:] + result.stderr[-2000:]


def test_the_typed_config_holds_exactly_the_flags_of_pstar_train():
    """``TrainConfig`` is what a run is asked for: one field per flag of the parser (which keeps the
    defaults and the help), the method's own flags in ``method_options``."""
    import dataclasses

    from pstar_plugins.train.cli import TrainConfig, build_parser

    parser = build_parser(get_plugin_manager().methods, "p-tuning")
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests | {"method_options"} == {f.name for f in dataclasses.fields(TrainConfig)}
    args = parse_args(
        ["--method", "prompt-tuning", "--output-dir", "out", "--num-virtual-tokens", "7", "--batch-size", "4"]
    )
    assert isinstance(args, TrainConfig) and args.method_options == {"num_virtual_tokens": 7} and args.batch_size == 4
