"""``comfy-lowbit``: one entry point, one sub-command per job.

Sub-commands are declared in ``COMMANDS`` as (name, module, help); each module offers
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when chosen,
so ``comfy-lowbit --help`` stays fast and a broken optional part cannot break the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = (
    ("demo", ".demo", "quantize a small random transformer into every format and compare"),
    ("convert", ".convert.cli", "convert a safetensors checkpoint to NF4/FP4/INT8/W4A4, streaming"),
    ("inspect", ".convert.inspect_command", "show what a safetensors checkpoint holds, layer by layer"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comfy-lowbit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name, help_text in COMMANDS:
        module = importlib.import_module(module_name, __package__)
        command = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
