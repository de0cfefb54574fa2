"""Argument types and checks shared by the ``eval``, ``generate`` and ``distill`` subcommands.

A bad value is an argparse error that names its flag, raised while the command line is parsed
(``number(int, minimum=1)`` as a flag's ``type``) or, for flags that only make sense together, by
``check_needs`` right after it, before any model loads. ``--help`` shows every flag's default.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable

from medusa_liger.devices import parse_device

# Namespace attributes: the flags given on the command line, and the parser (for its error()).
_GIVEN = "_given_flags"
_PARSER = "_parser"


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after each flag's help, unless the help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


class Given(argparse.Action):
    """Stores the value like the default action, and records that the flag was given."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, _GIVEN, {*getattr(namespace, _GIVEN, ()), option_string})


def add_revision_argument(parser: argparse.ArgumentParser,
                          default: str = "the commit the heads record, else its default branch") -> None:
    """``--revision``: which version of a hub backbone to load (a local directory refuses it at load)."""
    parser.add_argument("--revision", default=None, action=Given,
                        help=f"of a hub backbone: the branch, tag or commit to load (default: {default})")


def setup(parser: argparse.ArgumentParser) -> None:
    """Show defaults in ``--help`` and keep the parser for ``error`` (call first in add_arguments)."""
    parser.formatter_class = DefaultsHelpFormatter
    parser.set_defaults(**{_PARSER: parser})


def given(args: argparse.Namespace, flag: str) -> bool:
    """Whether ``flag`` (added with ``action=Given``) was on the command line."""
    return flag in getattr(args, _GIVEN, ())


def error(args: argparse.Namespace, message: str) -> None:
    """The parser's usage error (exit status 2); a ValueError when ``args`` was not parsed by it."""
    parser = getattr(args, _PARSER, None)
    if parser is None:
        raise ValueError(message)
    parser.error(message)


def check_needs(args: argparse.Namespace, flags: Iterable[str], needs: str, when: bool) -> None:
    """Refuse any of ``flags`` given without ``when`` holding: "--temperature needs --acceptance typical"."""
    if not when:
        for flag in flags:
            if given(args, flag):
                error(args, f"{flag} needs {needs} (without it the flag would be ignored)")


def number(kind: type = int, *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None) -> Callable[[str], int | float]:
    """An argparse ``type``: ``kind`` (int or float, finite) in [minimum, maximum], and > ``above``."""
    bounds = [f">= {minimum:g}" if minimum is not None else "", f"> {above:g}" if above is not None else "",
              f"<= {maximum:g}" if maximum is not None else ""]
    want = f"{'an integer' if kind is int else 'a number'} {' and '.join(b for b in bounds if b)}".strip()

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        if (not math.isfinite(value) or (minimum is not None and value < minimum)
                or (maximum is not None and value > maximum) or (above is not None and value <= above)):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse's fallback messages name the type
    return parse


POSITIVE_INT = number(int, minimum=1)


def device(text: str) -> str:
    """An argparse ``type`` for ``--device``: the name, checked by ``parse_device``."""
    try:
        parse_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


# Flags that only --acceptance typical reads (greedy decoding would ignore them).
TYPICAL_FLAGS = ("--temperature", "--posterior-threshold", "--posterior-alpha", "--seed")


def add_posterior_arguments(parser: argparse.ArgumentParser) -> None:
    """Typical acceptance's thresholds (``medusa_generate``'s posterior_threshold / posterior_alpha);
    the command refuses them without ``--acceptance typical`` (``check_needs``)."""
    parser.add_argument("--posterior-threshold", type=number(float, above=0, maximum=1), default=0.09, action=Given,
                        help="typical acceptance's epsilon (the largest probability a candidate must reach)")
    parser.add_argument("--posterior-alpha", type=number(float, above=0), default=0.3, action=Given,
                        help="typical acceptance's entropy factor (threshold alpha * exp(-entropy) below epsilon)")
