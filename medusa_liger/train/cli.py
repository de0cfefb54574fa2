"""``medusa-liger train CONFIG.yaml [section.key=value ...]``: the training subcommand.

The config file gives the run; every ``section.key=value`` after it overrides one key (parsed as
YAML). The whole config is validated before any work starts, so a typo stops the command at once
with a message naming the key. ``--print-config`` shows the resolved config and exits.

Data-parallel training: launch the same command under ``torchrun`` (one process per GPU); see
``distributed.py``. Without torchrun's ``WORLD_SIZE`` the command runs in one process as before.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from medusa_liger.cli import launched_as_main

EPILOG = """examples:
  medusa-liger train configs/tiny.yaml
  medusa-liger train configs/tiny.yaml name=tiny4 train.steps=200 train.lr=1e-3 heads.num_heads=4
  medusa-liger train configs/llama3-8b-medusa1.yaml data.paths=[my_chats.jsonl] train.resume=auto

data parallel over 8 GPUs (each rank reads its own rows; rank 0 logs, checkpoints and exports):
  torchrun --nproc_per_node 8 -m medusa_liger train configs/llama3-8b-medusa1.yaml
  torchrun --nproc_per_node 8 $(which medusa-liger) train configs/llama3-8b-medusa1.yaml
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``medusa-liger train``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("config", help="YAML config file (see configs/)")
    # default=[]: without one, argparse lists a "*" positional as required when none is given.
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted overrides of config keys, e.g. train.lr=1e-3 logging.wandb=disabled")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    """Load and validate the config, then train; 2 on a config or data error, 0 on success."""
    from medusa_liger.train.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as error:
        if launched_as_main():  # the same on every rank under torchrun: said once
            print(f"medusa-liger train: config error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        try:
            yaml.safe_dump(cfg.to_dict(), sys.stdout, sort_keys=False)
            sys.stdout.flush()
        except BrokenPipeError:  # `--print-config | head`: the reader has what it wanted
            # Python flushes stdout again at exit: point it at devnull so that flush cannot fail too.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    from medusa_liger.train.checkpoint import CheckpointError, ResumeError, RunDirBusyError
    from medusa_liger.train.config import ConfigError
    from medusa_liger.train.data import DataError
    from medusa_liger.train.loop import DivergedError, train

    try:
        train(cfg)
    except ConfigError as error:  # a setting that does not fit the model found at run time
        if not isinstance(error, RunDirBusyError) or launched_as_main():  # (that one: every rank)
            print(f"medusa-liger train: config error: {error}", file=sys.stderr)
        return 2
    except DataError as error:  # unusable data files: the user's input, reported without a traceback
        print(f"medusa-liger train: data error: {error}", file=sys.stderr)
        return 2
    except ResumeError as error:  # a checkpoint this config cannot continue from, likewise
        print(f"medusa-liger train: resume error: {error}", file=sys.stderr)
        return 2
    except (DivergedError, CheckpointError) as error:  # said in one line: the traceback would only show the loop
        print(f"medusa-liger train: error: {error}", file=sys.stderr)
        return 1
    return 0  # any other exception is a bug (or a failure mid-run): it propagates with its traceback
