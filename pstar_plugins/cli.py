"""``pstar`` command line: ``pstar plugins``, ``pstar methods``, ``pstar train ...``."""

from __future__ import annotations

import argparse
import sys

from pstar_plugins.errors import run_reporting_errors


def _plugins(args) -> int:
    from pstar_plugins.plugins import get_plugin_manager

    pm = get_plugin_manager()
    for info in pm.describe():
        print(f"{info.name} {info.version or '-'} ({info.source or 'registered'})")
        for hook in info.hooks:
            print(f"    {hook}")
    return 0


def _methods(args) -> int:
    from pstar_plugins.plugins import get_plugin_manager

    pm = get_plugin_manager()
    width = max(len(n) for n in pm.methods) if pm.methods else 0
    for name in sorted(pm.methods):
        spec = pm.methods[name]
        print(f"{name:<{width}}  {spec.help}  [plugin: {spec.plugin}]")
    return 0


def _load_base(name: str, gguf_file: str | None):
    from pstar_plugins.models import load

    return load(name, gguf_file=gguf_file)


def _export(args) -> int:
    from pstar_plugins.interop.peft import export_peft

    if args.format != "peft":
        raise SystemExit(f"--format {args.format!r}: only 'peft' is supported")
    base, _ = _load_base(args.model, args.gguf_file)
    config = export_peft(args.adapter, base, args.output)
    print(f"wrote a PEFT {config['peft_type']} adapter to {args.output}")
    return 0


def _import(args) -> int:
    from pstar_plugins.interop.peft import import_peft

    base, tokenizer = _load_base(args.model, args.gguf_file)
    model = import_peft(args.peft_adapter, base, tokenizer)
    model.save_adapter(args.output)
    print(f"wrote a pstar {model.method_name} adapter to {args.output}; continue training with --init-from-adapter {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from pstar_plugins import train

        return train.main(argv[1:])
    if argv and argv[0] == "eval":
        from pstar_plugins import evaluate

        return evaluate.main(argv[1:])
    parser = argparse.ArgumentParser(prog="pstar", description="P*-tuning plugins for transformers/Accelerate/DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plugins", help="list loaded plugins with their hooks and versions").set_defaults(func=_plugins)
    sub.add_parser("methods", help="list method names with their help").set_defaults(func=_methods)
    sub.add_parser("train", help="train a method (same flags as python -m pstar_plugins.train)")
    sub.add_parser("eval", help="zero-shot / in-context baselines or a tuned adapter (python -m pstar_plugins.evaluate)")
    export = sub.add_parser("export", help="write an adapter in another library's layout")
    export.add_argument("adapter", help="a pstar adapter directory")
    export.add_argument("--format", default="peft", help="target layout (peft)")
    export.add_argument("--model", required=True, help="the base model the adapter was trained on (alias, folder or hub id)")
    export.add_argument("--gguf-file", default=None, help="GGUF file inside --model's folder")
    export.add_argument("--output", required=True, help="directory to write")
    export.set_defaults(func=_export)
    imp = sub.add_parser("import", help="read a PEFT prompt-learning adapter as a trainable pstar adapter")
    imp.add_argument("peft_adapter", help="a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    imp.add_argument("--model", required=True, help="its base model (alias, folder or hub id)")
    imp.add_argument("--gguf-file", default=None, help="GGUF file inside --model's folder")
    imp.add_argument("--output", required=True, help="directory for the pstar adapter")
    imp.set_defaults(func=_import)
    args = parser.parse_args(argv)
    return run_reporting_errors(args.func, args)


if __name__ == "__main__":
    raise SystemExit(main())
