"""``pstar`` command line: ``pstar plugins``, ``pstar methods``, ``pstar train ...``."""

from __future__ import annotations

import sys
from pathlib import Path

from pstar_plugins.arguments import StrictParser, add_plugin_argument, load_plugins
from pstar_plugins.contract.errors import run_reporting_errors


def _plugins(args) -> int:
    from pstar_plugins.assembly.registry import get_plugin_manager

    pm = get_plugin_manager()
    for info in pm.describe():
        print(f"{info.name} {info.version or '-'} ({info.source or 'registered'})")
        for hook in info.hooks:
            print(f"    {hook}")
    return 0


def _methods(args) -> int:
    from pstar_plugins.assembly.registry import get_plugin_manager

    pm = get_plugin_manager()
    width = max(len(n) for n in pm.methods) if pm.methods else 0
    for name in sorted(pm.methods):
        spec = pm.methods[name]
        print(f"{name:<{width}}  {spec.help}  [plugin: {spec.plugin}]")
        if args.verbose:
            _print_method_options(name)
    if not args.verbose:
        print("\nEach method's options: pstar methods --verbose, or pstar train --method NAME --help.")
    return 0


def _print_method_options(method: str) -> None:
    """The method's flags as ``pstar train --method NAME --help`` shows them."""
    import contextlib
    import io

    from pstar_plugins.train.cli import parse_args

    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        parse_args(["--method", method, "--help"])
    lines = text.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"{method} options")), None)
    if start is None:
        return
    for line in lines[start + 1 :]:
        if line and not line.startswith(" "):
            break
        print("  " + line if line else "")


def _export_target(output: str, overwrite: bool) -> None:
    """Refuse to write an adapter over another folder's files."""
    from pstar_plugins.contract.errors import ConfigError

    path = Path(output)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output {path} is a file; choose a folder.")
    if path.is_dir() and not overwrite:
        present = sorted(p.name for p in path.iterdir())
        if present:
            shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
            raise ConfigError(
                f"--output {path} is not empty ({shown}); choose an empty or new folder, or pass --overwrite "
                "to write the adapter's files into it."
            )


def _load_base(name: str, gguf_file: str | None):
    from pstar_plugins.models import check_source, load

    check_source(name, "causal-lm", gguf_file)  # a missing folder or uncached hub id: the fix, not a traceback
    return load(name, gguf_file=gguf_file)


def _export(args) -> int:
    from pstar_plugins.assembly.registry import get_plugin_manager
    from pstar_plugins.interop.peft import export_peft
    from pstar_plugins.mechanisms.adapter_io import read_adapter

    load_plugins(args.plugin)
    contents = read_adapter(args.adapter)  # a bad adapter, or one of an unknown method, fails before the model loads
    get_plugin_manager().adapter_method(contents[0], args.adapter)
    _export_target(args.output, args.overwrite)
    base, _ = _load_base(args.model, args.gguf_file)
    config = export_peft(args.adapter, base, args.output, contents=contents)
    print(f"wrote a PEFT {config['peft_type']} adapter to {args.output}")
    return 0


def _import(args) -> int:
    from pstar_plugins.interop.peft import import_peft, read_peft

    load_plugins(args.plugin)
    contents = read_peft(args.peft_adapter)  # an unreadable or unknown adapter fails before the model loads
    _export_target(args.output, args.overwrite)
    base, tokenizer = _load_base(args.model, args.gguf_file)
    model = import_peft(args.peft_adapter, base, tokenizer, contents=contents)
    model.save_adapter(args.output)
    print(
        f"wrote a pstar {model.method_name} adapter to {args.output}; continue training with --init-from-adapter "
        f"{args.output}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from pstar_plugins import train

        return train.main(argv[1:], prog="pstar train")
    if argv and argv[0] == "eval":
        from pstar_plugins import evaluate

        return evaluate.main(argv[1:], prog="pstar eval")
    return run_reporting_errors(_dispatch, argv)


def _dispatch(argv: list[str]) -> int:
    parser = StrictParser(
        prog="pstar",
        description="P*-tuning plugins for transformers/Accelerate/DeepSpeed",
        epilog="pstar train --help lists the training flags; pstar train --method NAME --help adds "
        "that method's options (pstar methods --verbose lists all of them).",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=StrictParser)
    sub.add_parser("plugins", help="list loaded plugins with their hooks and versions").set_defaults(func=_plugins)
    methods = sub.add_parser("methods", help="list method names with their help (--verbose: and their options)")
    methods.add_argument(
        "--verbose", "-v", action="store_true", help="also list each method's options with their defaults"
    )
    methods.set_defaults(func=_methods)
    sub.add_parser("train", help="train a method (pstar train --help; same flags as python -m pstar_plugins.train)")
    sub.add_parser("eval", help="zero-shot / in-context baselines or a tuned adapter (pstar eval --help)")
    export = sub.add_parser("export", help="write an adapter in another library's layout")
    export.add_argument("adapter", help="a pstar adapter directory")
    export.add_argument("--format", default="peft", choices=["peft"], help="target layout")
    export.add_argument(
        "--model", required=True, help="the base model the adapter was trained on (alias, folder or hub id)"
    )
    export.add_argument("--gguf-file", default=None, help="GGUF file inside --model's folder")
    export.add_argument("--output", required=True, help="directory to write (new or empty)")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    add_plugin_argument(export)
    export.set_defaults(func=_export)
    imp = sub.add_parser("import", help="read a PEFT prompt-learning adapter as a trainable pstar adapter")
    imp.add_argument("peft_adapter", help="a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    imp.add_argument("--model", required=True, help="its base model (alias, folder or hub id)")
    imp.add_argument("--gguf-file", default=None, help="GGUF file inside --model's folder")
    imp.add_argument("--output", required=True, help="directory for the pstar adapter (new or empty)")
    imp.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    add_plugin_argument(imp)
    imp.set_defaults(func=_import)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
