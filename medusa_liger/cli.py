"""The ``medusa-liger`` command: ``train``, ``export``, ``eval``, ``generate`` and ``distill`` subcommands.

Each subcommand lives with the code it drives and provides two functions,
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them together, importing
each lazily so ``medusa-liger --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from medusa_liger import __version__

# subcommand -> (module providing add_arguments/run, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("medusa_liger.train.cli", "train Medusa heads (and optionally the backbone) from a YAML config"),
    "export": ("medusa_liger.train.export_cli", "export trained heads in the formats serving engines read"),
    "eval": ("medusa_liger.inference.cli", "measure head accuracy, search a tree, time Medusa decoding"),
    "generate": ("medusa_liger.inference.generate_cli", "answer a prompt with Medusa decoding: reply, tokens/step"),
    "distill": ("medusa_liger.inference.distill", "regenerate a dataset's answers with the backbone (self-distillation)"),
}


def launched_as_main() -> bool:
    """Whether the launcher started this process as rank 0 (``RANK`` as torchrun sets it; a plain run is
    rank 0), known before any process group and without importing torch: every rank of one launch meets
    the same config error or interrupt, which the first says for all."""
    return os.environ.get("RANK", "0") == "0"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (all of them when ``command`` is None)."""
    return _build_parsers(command)[0]


def _build_parsers(command: str | None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """(top-level parser, subcommand name -> its parser)."""
    parser = argparse.ArgumentParser(
        prog="medusa-liger", description="Train and evaluate Medusa heads with fused Triton kernels."
    )
    parser.add_argument("--version", action="version", version=f"medusa-liger {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    sub_parsers = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if command in (None, name):
            importlib.import_module(module_name).add_arguments(sub_parser)
        sub_parser.set_defaults(_module=module_name)
        sub_parsers[name] = sub_parser
    return parser, sub_parsers


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the subcommand being run: `medusa-liger --help` needs none of torch or transformers.
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else ""
    parser, sub_parsers = _build_parsers(command)
    if command:
        # The subcommand's own parser reads the rest, flags and positionals in any order
        # (`train CONFIG --print-config train.steps=5`): through the top-level parser, argparse fills
        # the positionals at their first run and calls anything after a flag unrecognized.
        args = sub_parsers[command].parse_intermixed_args(argv[1:])
        args.command = command
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; what was saved stays saved
        hint = {"train": "rerun with train.resume=auto to continue from the last checkpoint",
                "distill": "run the same command again to continue after the last written block"}
        if launched_as_main():  # under torchrun every rank is interrupted: said once
            said = f"; {hint[args.command]}" if args.command in hint else ""
            print(f"medusa-liger {args.command}: interrupted{said}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
