"""``pstar`` command line: ``pstar plugins``, ``pstar methods``, ``pstar train ...``."""

from __future__ import annotations

import argparse
import sys


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from pstar_plugins import train

        return train.main(argv[1:])
    parser = argparse.ArgumentParser(prog="pstar", description="P*-tuning plugins for transformers/Accelerate/DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plugins", help="list loaded plugins with their hooks and versions").set_defaults(func=_plugins)
    sub.add_parser("methods", help="list method names with their help").set_defaults(func=_methods)
    sub.add_parser("train", help="train a method (same flags as python -m pstar_plugins.train)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
