"""The ``compress`` command line: a thin layer over the public API.

Each subcommand lives in ``compress/cli/<name>.py`` and registers itself with
:data:`COMMANDS` through :func:`command`. :func:`main` is the one place that turns
exceptions into exit codes, each with one ``error:`` and one ``hint:`` line on stderr:

==========  =================================================================
exit code   meaning
==========  =================================================================
0           success
1           a user error (:class:`~compress.errors.CompressError`)
2           a usage error (argparse), or an internal error: anything else that
            reaches :func:`main` is a bug in compress; its traceback is printed
            only with ``-v``
3-6         a failed gate (``compress build`` / ``compress run``; see
            :data:`compress.gates.GATE_EXIT_CODES`)
7           ``compress build``: a pass cannot meet its fidelity target
            (:data:`compress.build.TARGET_EXIT_CODE`)
130         interrupted (SIGINT, Ctrl-C)
143         terminated (SIGTERM); handled like SIGINT: temporary files are removed
==========  =================================================================
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Protocol, TypeVar

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
_COMMAND_MODULES = ("export", "inspect", "calib", "prune", "build", "run", "search")


class _CommandClass(Protocol):
    """A class decorated with :func:`command`: static ``add_arguments`` and ``run``."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, /) -> None: ...

    @staticmethod
    def run(args: argparse.Namespace, /) -> int: ...


C = TypeVar("C", bound=_CommandClass)


def command(name: str, *, help: str, description: str | None = None) -> Callable[[C], C]:
    """Class decorator: register a class with static ``add_arguments`` and ``run`` as a subcommand."""

    def decorate(cls: C) -> C:
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


#: Exit codes of :func:`main` besides 0 and the gates' (see the module docstring).
EXIT_USER_ERROR, EXIT_INTERNAL_ERROR, EXIT_SIGINT, EXIT_SIGTERM = 1, 2, 130, 143

#: Longest exception text an internal-error line shows.
_MAX_INTERNAL_MESSAGE = 300


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM arrives, so that cleanup runs as for Ctrl-C.

    A subclass of KeyboardInterrupt: code that removes temporary files in ``finally``
    blocks or ``except BaseException`` handlers treats both signals alike, and ``except
    Exception`` (library code wrapping errors) never swallows it.
    """


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While active (main thread only), SIGTERM raises :class:`Terminated`; the old handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _internal_error(exc: BaseException, *, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    text = " ".join(str(exc).split()) or "(no message)"
    if len(text) > _MAX_INTERNAL_MESSAGE:
        text = text[: _MAX_INTERNAL_MESSAGE - 3] + "..."
    print(f"error: internal error (a bug in compress): {type(exc).__name__}: {text}", file=sys.stderr)
    print("hint: re-run with -v for the traceback and report it" if not verbose
          else "hint: the traceback is above; please report it", file=sys.stderr)
    return EXIT_INTERNAL_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``compress`` console script; returns the exit code.

    0 success; 1 user error (one ``error:`` and one ``hint:`` line); 2 usage error or
    internal error (a bug: ``error: internal error (a bug in compress): TYPE: MESSAGE``,
    the traceback only with ``-v``); 3-6 failed gates; 7 a missed pass fidelity target; 130 SIGINT; 143 SIGTERM.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    verbose = getattr(args, "verbose", 0) > 0
    configure_logging(getattr(args, "verbose", 0) - getattr(args, "quiet", 0))
    try:
        with _sigterm_raises():
            return int(args._run(args) or 0)
    except CompressError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        print(f"hint: {exc.hint}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Terminated:
        print("error: terminated (SIGTERM)", file=sys.stderr)
        print("hint: temporary files were removed; outputs not yet complete were not written", file=sys.stderr)
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        print("hint: temporary files were removed; outputs not yet complete were not written", file=sys.stderr)
        return EXIT_SIGINT
    except BaseException as exc:  # noqa: BLE001 - anything else is a bug (SystemExit from a command included)
        return _internal_error(exc, verbose=verbose)
