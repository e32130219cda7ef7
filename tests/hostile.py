"""Helpers for the hostile-input suites (``tests/test_hostile_*.py``).

Every hostile case is judged the same way: the exit code, the message (exactly one
``error:`` line and one ``hint:`` line for a user error, no traceback), no temporary or
partial files left beside the outputs, and the inputs' bytes unchanged. Two runners:

* :func:`run_cli` runs ``python -m compress`` in a subprocess, optionally under
  ``RLIMIT_AS`` (bounded memory) and always under a wall-clock timeout; use it where a
  limit, a signal or process isolation matters.
* :func:`run_cli_inprocess` calls :func:`compress.cli.main` in this process (fast); use it
  for everything else.
"""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Where the package lives, so a subprocess imports this checkout whatever its cwd.
_SRC = str(Path(__file__).resolve().parents[1] / "src")


@dataclass(frozen=True)
class Result:
    """Exit code and output of one ``compress`` run."""

    rc: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """The ``error:`` lines of stderr."""
        return [ln for ln in self.stderr.splitlines() if ln.startswith("error:")]

    @property
    def hint_lines(self) -> list[str]:
        """The ``hint:`` lines of stderr."""
        return [ln for ln in self.stderr.splitlines() if ln.startswith("hint:")]


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI subprocess: this checkout's ``src`` first on PYTHONPATH, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = _SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONHASHSEED", "0")
    env.update(extra or {})
    return env


def _limit_as(gib: float) -> Any:
    limit = int(gib * (1 << 30))

    def preexec() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return preexec


def run_cli(
    args: Sequence[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str],
    rlimit_as_gib: float | None = None,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> Result:
    """Run ``python -m compress ARGS`` in a subprocess in ``cwd``; return its exit code and output.

    ``rlimit_as_gib`` caps the child's address space (``RLIMIT_AS``): an allocation past it
    fails with MemoryError instead of swapping the machine. ``compress inspect`` runs in
    1 GiB; commands that import torch map more virtual memory, so measure before choosing a
    tight limit. A run past ``timeout`` seconds is killed and raises
    ``subprocess.TimeoutExpired`` (a hang is a failure).
    """
    proc = subprocess.run(
        [sys.executable, "-m", "compress", *[str(a) for a in args]],
        cwd=str(cwd), env=cli_env(env), capture_output=True, text=True, timeout=timeout,
        input=stdin, preexec_fn=_limit_as(rlimit_as_gib) if rlimit_as_gib else None,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run_cli_inprocess(args: Sequence[str | os.PathLike[str]], capsys: Any) -> Result:
    """Call ``compress.cli.main(ARGS)`` in this process; ``capsys`` is pytest's fixture.

    argparse usage errors (``SystemExit``) are returned as their exit code, like a
    subprocess would report them. Logging goes to the captured stderr (the autouse fixture
    in conftest.py resets the compress logger's handler for every test).
    """
    from compress.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    captured = capsys.readouterr()
    return Result(int(rc), captured.out, captured.err)


def tree_digest(folder: str | os.PathLike[str]) -> dict[str, str]:
    """{relative path: sha256} of every regular file under ``folder`` (symlinks not followed).

    Compare it before and after a run to prove that no input was modified; non-regular
    entries (FIFOs, sockets) are recorded by their kind, never opened.
    """
    root = Path(folder)
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "symlink:" + os.readlink(p)
            elif p.is_file():
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                out[rel] = h.hexdigest()
            else:
                out[rel] = "special"
    return out


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of one file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_user_error(result: Result, *, code: int = 1, contains: str | Sequence[str] = ()) -> None:
    """A clean user error: exit ``code``, exactly one ``error:`` and one ``hint:`` line, no traceback.

    ``contains``: text (or texts) that must appear in the ``error:`` + ``hint:`` lines.
    """
    msg = f"rc={result.rc}\nstderr:\n{result.stderr[-4000:]}"
    assert result.rc == code, msg
    assert "Traceback" not in result.stderr, msg
    assert "Traceback" not in result.stdout, msg
    assert len(result.error_lines) == 1, msg
    assert len(result.hint_lines) == 1, msg
    assert len(result.hint_lines[0]) > len("hint: "), msg
    text = result.error_lines[0] + "\n" + result.hint_lines[0]
    for part in [contains] if isinstance(contains, str) else contains:
        assert part in text, f"{part!r} not in:\n{text}\n{msg}"


def assert_internal_error(result: Result, *, exc_type: str | None = None) -> None:
    """A bug reported as such: exit 2, ``error: internal error (a bug in compress): ...``, a hint, no traceback."""
    msg = f"rc={result.rc}\nstderr:\n{result.stderr[-4000:]}"
    assert result.rc == 2, msg
    assert "Traceback" not in result.stderr, msg
    assert len(result.error_lines) == 1, msg
    assert len(result.hint_lines) == 1, msg
    assert result.error_lines[0].startswith("error: internal error (a bug in compress): "), msg
    if exc_type:
        assert result.error_lines[0].startswith(f"error: internal error (a bug in compress): {exc_type}: "), msg
    assert "-v" in result.hint_lines[0], msg


def leftovers(folder: str | os.PathLike[str]) -> list[str]:
    """Temporary files or folders compress may leave behind (``*.tmp``, ``*.old``, ``.*.tmp*``)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            if name.endswith((".tmp", ".old")) or (name.startswith(".") and (".tmp" in name or ".old" in name)):
                found.append(str(Path(dirpath, name).relative_to(folder)))
    return sorted(found)


def assert_no_leftovers(folder: str | os.PathLike[str], *, absent: Sequence[str | os.PathLike[str]] = ()) -> None:
    """No temporary files under ``folder``, and none of the ``absent`` paths exists (no partial output)."""
    left = leftovers(folder)
    assert not left, f"temporary files left in {folder}: {left}"
    present = [str(p) for p in absent if os.path.lexists(p)]
    assert not present, f"partial outputs written: {present}"


def residual_mlp(depth: int = 4, *, dim: int = 8, argmax: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x[batch, dim] -> depth x (x + tanh(x W)) -> logits[batch, 4] (-> ArgMax class[batch]); TorchScript-style names."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "x"
    for i in range(depth):
        w = numpy_helper.from_array((rng.standard_normal((dim, dim)) * 0.3).astype(np.float32), f"blocks.{i}.w")
        inits.append(w)
        p = f"/blocks/blocks.{i}"
        nodes += [helper.make_node("MatMul", [cur, w.name], [f"{p}/mm"], name=f"{p}/MatMul"),
                  helper.make_node("Tanh", [f"{p}/mm"], [f"{p}/t"], name=f"{p}/Tanh"),
                  helper.make_node("Add", [cur, f"{p}/t"], [f"{p}/out"], name=f"{p}/Add")]
        cur = f"{p}/out"
    inits.append(numpy_helper.from_array(rng.standard_normal((dim, 4)).astype(np.float32), "head.w"))
    nodes.append(helper.make_node("MatMul", [cur, "head.w"], ["logits"], name="/head/MatMul"))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])]
    if argmax:
        nodes.append(helper.make_node("ArgMax", ["logits"], ["cls"], name="/argmax", axis=1, keepdims=0))
        outputs.append(helper.make_tensor_value_info("cls", TensorProto.INT64, ["batch"]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model
