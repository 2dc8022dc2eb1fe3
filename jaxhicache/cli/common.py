"""What every ``jaxhicache`` subcommand shares: the one-line error, the parser class
and the argument types (each names the bad text in its message)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["ENUM_CHOICES", "CliError", "Parser", "count", "one_line", "ratio", "seed"]

ENUM_CHOICES = {
    "write_policy": ("write_through", "write_through_selective", "write_back"),
    "prefetch_policy": ("best_effort", "wait_complete", "timeout"),
}
"""The ``--write-policy`` / ``--prefetch-policy`` choices (the enums' values)."""


class CliError(Exception):
    """A bad argument or an unusable input: one line on stderr, exit status 2.

    Raised by the subcommands' handlers with a message naming the bad value;
    :func:`jaxhicache.cli.main` prints it as ``jaxhicache: error: <message>``.
    """


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``jaxhicache: error: ...``.

    Takes ``argparse.ArgumentParser``'s arguments.
    """

    def error(self, message: str) -> NoReturn:
        """Prints ``jaxhicache: error: <message>`` to stderr and exits with status 2.

        Args:
          message: argparse's description of the usage error.

        Raises:
          SystemExit: always, with code 2.
        """
        print(f"jaxhicache: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _int_at_least(lo: int, what: str):
    """An argparse type: an int ``>= lo``; the message names the bad text."""

    def parse(text: str) -> int:
        """Parses one argument value: an integer ``>= lo``.

        Args:
          text: the value as given on the command line.

        Returns:
          The integer.

        Raises:
          ArgumentTypeError: (argparse's) ``text`` is not an integer or is
            too small; the message names it.
        """
        try:
            n = int(text)
        except ValueError:
            n = lo - 1
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return n

    return parse


count = _int_at_least(1, "a positive integer")
"""An argparse type: an integer ``>= 1`` (``ArgumentTypeError`` naming the text otherwise)."""
seed = _int_at_least(0, "an integer >= 0")
"""An argparse type: an integer ``>= 0`` (``ArgumentTypeError`` naming the text otherwise)."""


def ratio(text: str) -> float:
    """An argparse type: a finite number ``> 0``.

    Args:
      text: the value as given on the command line.

    Returns:
      The number as a float.

    Raises:
      ArgumentTypeError: (argparse's) ``text`` is not a number, is not
        positive, or is infinite; the message names it.
    """
    try:
        r = float(text)
    except ValueError:
        r = float("nan")
    if not r > 0 or r == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return r


def one_line(e: BaseException) -> str:
    """An exception's text on one line (its type name when it has none).

    Args:
      e: the exception.

    Returns:
      ``str(e)`` with every run of whitespace (newlines included) collapsed to
      one space, or ``type(e).__name__`` when that is empty.
    """

    return " ".join(str(e).split()) or type(e).__name__
