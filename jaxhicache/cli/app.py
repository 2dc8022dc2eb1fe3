"""The ``jaxhicache`` parser and :func:`main`: one subcommand per module
(``bench_cmd``, ``layer_map_cmd``, ``storage_cmd``); a ``CliError`` from any of them
ends with one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jaxhicache.cli.bench_cmd as bench_cmd
import jaxhicache.cli.layer_map_cmd as layer_map_cmd
import jaxhicache.cli.storage_cmd as storage_cmd
from jaxhicache.cli.common import CliError, Parser

__all__ = ["build_parser", "main"]


def build_parser() -> Parser:
    """The top-level parser with every subcommand.

    Returns:
      A :class:`~jaxhicache.cli.common.Parser` with the ``bench``, ``layer-map``
      and ``storage`` subcommands; a parsed command carries its handler as
      ``args.run`` (``args.command`` is ``None`` when none was given).
    """
    p = Parser(
        prog="jaxhicache",
        description=(
            "jaxhicache: a hierarchical prefix KV cache (device / host / storage) for JAX "
            "serving.\n\nThe main job: `jaxhicache bench multiturn` (`--quick`: about a minute)."
        ),
        epilog="`jaxhicache` alone prints this help; `jaxhicache COMMAND --help` for each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="{bench,layer-map,storage}")

    bench_cmd.add_parser(sub)
    layer_map_cmd.add_parser(sub)
    storage_cmd.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``jaxhicache`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Never calls ``sys.exit``: ``--help`` and usage errors end in the status argparse
    gives them. No command prints the help. A ``CliError`` from the command ends
    with one ``jaxhicache: error: ...`` line on stderr; a broken stdout pipe (output
    piped into ``head``) ends quietly. Any other exception propagates.

    Args:
      argv: the arguments after the program name; ``None``: ``sys.argv[1:]``.

    Returns:
      0 on success, ``--help`` or no command; 2 for a usage error or a
      ``CliError``; otherwise what the command's handler returned.
    """

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a one-line usage error (2)
        return e.code if isinstance(e.code, int) else 0
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except CliError as e:
        print(f"jaxhicache: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stdout = None
        return 0
