"""The ``compress`` command line: a thin layer over the public API.

Each subcommand lives in ``compress/cli/<name>.py`` and registers itself with
:data:`COMMANDS` through :func:`command`. :func:`main` is the one place that catches
:class:`~compress.errors.CompressError`: it prints ``error: ...`` / ``hint: ...`` on
stderr and returns 1. Failed quality gates return their own codes (see ``build``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from compress import __version__
from compress.errors import CompressError
from compress.log import configure_logging
from compress.registry import Registry


@dataclass(frozen=True)
class Command:
    """A subcommand: its help line, an argument adder and a runner returning an exit code."""

    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: Registry[Command] = Registry("command")

#: Modules under compress.cli that define subcommands, in the order --help lists them.
_COMMAND_MODULES = ("export", "inspect", "calib", "prune", "build", "run")


def command(name: str, *, help: str, description: str | None = None) -> Callable[[type], type]:
    """Class decorator: register a class with static ``add_arguments`` and ``run`` as a subcommand."""

    def decorate(cls: type) -> type:
        COMMANDS.register(name)(Command(help, description or help, cls.add_arguments, cls.run))
        return cls

    return decorate


def _load_commands() -> None:
    for mod in _COMMAND_MODULES:
        try:
            importlib.import_module(f"compress.cli.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"compress.cli.{mod}":
                raise


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    _load_commands()
    parser = argparse.ArgumentParser(
        prog="compress",
        description=(
            "Make a PyTorch/ONNX model smaller and faster for deployment: export it to ONNX with a "
            "block map, score its repeated blocks on calibration data with ONNX Runtime, remove the "
            "redundant ones, and benchmark the result."
        ),
        epilog="Run 'compress COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"compress {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS._entries:  # registration order
        cmd = COMMANDS.get(name)
        p = sub.add_parser(name, help=cmd.help, description=cmd.description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        verbosity = p.add_argument_group("output")
        verbosity.add_argument("-v", "--verbose", action="count", default=0, help="more log output (debug)")
        verbosity.add_argument("-q", "--quiet", action="count", default=0, help="less log output (repeat for errors only)")
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``compress`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    configure_logging(args.verbose - args.quiet)
    try:
        return int(args._run(args) or 0)
    except CompressError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
