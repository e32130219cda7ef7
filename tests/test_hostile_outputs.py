"""Hostile input, part A: code execution, lost files, races, special files, signals, internal errors, hints.

Every case is judged on the exit code, the message (one ``error:`` and one ``hint:`` line,
no traceback), no temporary or partial files, and the inputs' sha256 unchanged (see
``tests/hostile.py``). Models are tiny and built in-test; most runs are in-process.
"""

from __future__ import annotations

import ast
import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import onnx
import pytest

import compress.onnx_io
from hostile import (
    Result,
    assert_internal_error,
    assert_no_leftovers,
    assert_user_error,
    cli_env,
    run_cli,
    run_cli_inprocess,
    tree_digest,
)

RANDOM = ["--random-calib", "4", "--batch-size", "2"]
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def work(tmp_path: Path, exported) -> Path:
    """``tmp/in/m.onnx`` (the tiny 4-block transformer) and an empty ``tmp/out``; cwd = tmp."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    compress.onnx_io.save_model(exported["transformer", "dynamo"], str(tmp_path / "in" / "m.onnx"))
    return tmp_path


def _run(args: list, capsys) -> Result:
    return run_cli_inprocess([str(a) for a in args], capsys)


def _judged(work: Path, result: Result, *, contains, absent=(), code: int = 1, before=None) -> None:
    assert_user_error(result, code=code, contains=contains)
    assert_no_leftovers(work, absent=absent)
    if before is not None:
        assert tree_digest(work / "in") == before


# --------------------------------------------------------------------------- .pt2 trust boundary


class _Evil:
    """Unpickling this writes the marker file named by its argument."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _save_program(path: Path) -> None:
    import torch

    torch.manual_seed(0)
    program = torch.export.export(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval(),
                                  (torch.randn(2, 4),))
    torch.export.save(program, str(path))


def _replace_member(path: Path, suffix: str, data: bytes) -> str:
    """Rewrite the member of zip ``path`` whose name ends with ``suffix``; return its name."""
    with zipfile.ZipFile(path) as zf:
        members = [(i, zf.read(i)) for i in zf.infolist()]
    (name,) = [i.filename for i, _ in members if i.filename.endswith(suffix)]
    with zipfile.ZipFile(path, "w") as zf:
        for info, content in members:
            zf.writestr(info, data if info.filename == name else content)
    return name


@pytest.fixture(scope="module")
def clean_pt2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "clean.pt2"
    _save_program(path)
    return path


def test_pt2_with_malicious_sample_inputs_is_refused_and_runs_nothing(tmp_path, clean_pt2, capsys) -> None:
    import torch

    marker = tmp_path / "marker"
    evil = tmp_path / "in" / "evil.pt2"
    evil.parent.mkdir()
    shutil.copy(clean_pt2, evil)
    buf = io.BytesIO()
    torch.save((_Evil(str(marker)),), buf)
    member = _replace_member(evil, "data/sample_inputs/model.pt", buf.getvalue())
    before = tree_digest(tmp_path / "in")
    result = _run(["export", evil, "-o", tmp_path / "o.onnx"], capsys)
    _judged(tmp_path, result, contains=[f"{evil}: {member} holds example inputs that torch.load(weights_only=True) "
                                        "refuses", "--trust-code"], absent=[tmp_path / "o.onnx"], before=before)
    assert not marker.exists()


def test_pt2_with_pickled_weights_is_refused(tmp_path, clean_pt2, capsys) -> None:
    import json

    evil = tmp_path / "evil.pt2"
    shutil.copy(clean_pt2, evil)
    with zipfile.ZipFile(evil) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith("model_weights_config.json")]
        config = json.loads(zf.read(name))
    first = sorted(config["config"])[0]
    config["config"][first]["use_pickle"] = True
    _replace_member(evil, "model_weights_config.json", json.dumps(config).encode())
    result = _run(["export", evil, "-o", tmp_path / "o.onnx"], capsys)
    _judged(tmp_path, result, contains=[f"holds pickled tensors ({first})", "--trust-code"],
            absent=[tmp_path / "o.onnx"])


def test_pt2_unpickling_is_blocked_even_past_the_archive_check(tmp_path, clean_pt2, monkeypatch) -> None:
    """Second line of defence: with the zip check skipped, torch.export.load still cannot unpickle."""
    import torch

    from compress import export as ex
    from compress.errors import TrustError

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt2"
    shutil.copy(clean_pt2, evil)
    buf = io.BytesIO()
    torch.save((_Evil(str(marker)),), buf)
    _replace_member(evil, "data/sample_inputs/model.pt", buf.getvalue())
    monkeypatch.setattr(ex.loaders, "check_pt2_archive", lambda path: None)  # _load_pt2 looks it up there
    with pytest.raises(TrustError, match="asked to unpickle") as err:
        ex.load_torch_model(str(evil))
    assert "--trust-code" in err.value.hint
    assert not marker.exists()
    assert torch.load.__module__ == "torch.serialization"  # restored


def test_pt2_not_a_zip_is_a_user_error(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip")
    result = _run(["export", bad, "-o", tmp_path / "o.onnx"], capsys)
    _judged(tmp_path, result, contains=[f"{bad} is not a saved torch.export program", "torch.export.save"],
            absent=[tmp_path / "o.onnx"])


def test_clean_pt2_still_exports(tmp_path, clean_pt2, capsys) -> None:
    result = _run(["export", clean_pt2, "-o", tmp_path / "o.onnx"], capsys)
    assert result.rc == 0, result.stderr
    assert onnx.load(str(tmp_path / "o.onnx")).graph.node
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.blocks.json", "o.export.json", "o.onnx"]


# --------------------------------------------------------------------------- user code that exits


@pytest.mark.parametrize(("body", "message"), [
    ("def build():\n    raise SystemExit(0)\n",
     "calling build() failed: it raised SystemExit(0) (called sys.exit or exit) instead of returning"),
    ("raise SystemExit(0)\n",
     "importing net.py failed: it raised SystemExit(0)"),
    ("import torch\n"
     "class M(torch.nn.Module):\n"
     "    def forward(self, x):\n"
     "        raise SystemExit(0)\n"
     "def build():\n    return M(), (torch.zeros(1, 4),)\n",
     "running the model on the example inputs failed: it raised SystemExit(0)"),
])
def test_model_code_raising_systemexit_is_a_user_error(tmp_path, capsys, body, message) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "net.py").write_text(body)
    before = tree_digest(tmp_path / "in")
    out = tmp_path / "o.onnx"
    result = _run(["export", f"{tmp_path / 'in' / 'net.py'}:build", "-o", out], capsys)
    _judged(tmp_path, result, contains=message, absent=[out, tmp_path / "o.blocks.json", tmp_path / "o.export.json"],
            before=before)


# --------------------------------------------------------------------------- lost files


def test_prune_never_writes_its_block_map_over_the_input(work, capsys) -> None:
    """An ONNX model saved as net.blocks.json, pruned to -o net.onnx: the block map would replace the input."""
    src = work / "in" / "net.blocks.json"
    shutil.move(work / "in" / "m.onnx", src)
    before = tree_digest(work / "in")
    result = _run(["prune", src, *RANDOM, "-o", work / "in" / "net.onnx", "--remove", "1", "--no-latency"], capsys)
    _judged(work, result, contains=[f"output {src} is the input file", "inputs are never overwritten"],
            absent=[work / "in" / "net.onnx"], before=before)


def test_prune_refuses_an_existing_sidecar_without_force(work, capsys) -> None:
    (work / "out" / "p.blocks.json").write_text("mine")
    result = _run(["prune", work / "in" / "m.onnx", *RANDOM, "-o", work / "out" / "p.onnx", "--remove", "1",
                   "--no-latency"], capsys)
    _judged(work, result, contains=[f"output {work / 'out' / 'p.blocks.json'} already exists", "--force"],
            absent=[work / "out" / "p.onnx"])
    assert (work / "out" / "p.blocks.json").read_text() == "mine"


def test_prune_refuses_a_hard_link_of_the_input_even_with_force(work, capsys) -> None:
    os.link(work / "in" / "m.onnx", work / "out" / "p.onnx")
    before = tree_digest(work / "in")
    result = _run(["prune", work / "in" / "m.onnx", *RANDOM, "-o", work / "out" / "p.onnx", "--remove", "1",
                   "--no-latency", "--force"], capsys)
    _judged(work, result, contains="is the same file as the input", before=before,
            absent=[work / "out" / "p.blocks.json"])


def test_external_data_of_the_input_is_never_overwritten(work, capsys, exported) -> None:
    """The input a.onnx keeps its tensors in b.onnx.data; -o b.onnx --force would write b.onnx.data."""
    a = work / "in" / "a.onnx"
    model = onnx.ModelProto()
    model.CopyFrom(exported["transformer", "dynamo"])  # onnx.save moves the tensors out of the proto it is given
    onnx.save(model, str(a), save_as_external_data=True, location="b.onnx.data", size_threshold=0)
    before = tree_digest(work / "in")
    result = _run(["prune", a, *RANDOM, "-o", work / "in" / "b.onnx", "--remove", "1", "--no-latency", "--force"],
                  capsys)
    data = work / "in" / "b.onnx.data"
    _judged(work, result, contains=f"output {data} is the input file", before=before,
            absent=[work / "in" / "b.onnx", work / "in" / "b.blocks.json"])


def test_export_sidecar_that_is_an_input_is_refused(tmp_path, capsys) -> None:
    """-o net.onnx where net.export.json is the model file itself."""
    src = tmp_path / "net.export.json"
    src.write_text("import torch\ndef build():\n    return torch.nn.Linear(4, 4), (torch.zeros(1, 4),)\n")
    result = _run(["export", f"{src}:build", "-o", tmp_path / "net.onnx"], capsys)
    assert_user_error(result, contains=f"output {src} is the input file")
    assert src.read_text().startswith("import torch")
    assert not (tmp_path / "net.onnx").exists()


def test_report_colliding_with_the_block_map_is_refused(work, capsys) -> None:
    result = _run(["prune", work / "in" / "m.onnx", *RANDOM, "-o", work / "out" / "p.onnx", "--remove", "1",
                   "--no-latency", "--report", work / "out" / "p.blocks.json"], capsys)
    _judged(work, result, contains=["--report", "is also the output of -o"], absent=[work / "out" / "p.onnx"])


@pytest.mark.parametrize("kind", ["fifo", "device"])
@pytest.mark.parametrize("which", ["model", "sidecar", "report"])
def test_special_files_are_never_replaced_even_with_force(work, capsys, kind, which) -> None:
    target = {"model": work / "out" / "p.onnx", "sidecar": work / "out" / "p.blocks.json",
              "report": work / "out" / "r.md"}[which]
    if kind == "fifo":
        os.mkfifo(target)
    else:
        os.symlink("/dev/null", target)
    result = _run(["prune", work / "in" / "m.onnx", *RANDOM, "-o", work / "out" / "p.onnx", "--remove", "1",
                   "--no-latency", "--report", work / "out" / "r.json", "--force"], capsys)
    what = "a FIFO (named pipe)" if kind == "fifo" else "a device"
    assert_user_error(result, contains=[f"output {target} exists and is {what}", "even with --force"])
    assert (os.path.islink(target) if kind == "device" else os.path.exists(target))
    assert sorted(p.name for p in (work / "out").iterdir()) == [target.name]


def test_build_refuses_a_fifo_as_output_folder(work, capsys) -> None:
    os.mkfifo(work / "out" / "b")
    result = _run(["build", work / "in" / "m.onnx", "-o", work / "out" / "b", "--force"], capsys)
    _judged(work, result, contains=f"output {work / 'out' / 'b'} exists and is not a folder")


@pytest.mark.parametrize("command", ["prune", "inspect", "export"])
def test_output_naming_a_folder_is_refused(work, capsys, command) -> None:
    folder = work / "out" / "x.onnx"
    folder.mkdir()
    args = {"prune": ["prune", work / "in" / "m.onnx", *RANDOM, "-o", folder, "--remove", "1", "--no-latency"],
            "inspect": ["inspect", work / "in" / "m.onnx", "--write-blocks", folder],
            "export": ["export", "nosuch.py:build", "-o", folder]}[command]
    result = _run(args, capsys)
    _judged(work, result, contains=f"{folder} is a folder, but names a file to write")
    assert folder.is_dir()
    assert not list(folder.iterdir())


@pytest.mark.parametrize("command", ["prune", "build", "calib"])
def test_output_folder_that_is_a_file_or_missing(work, capsys, command) -> None:
    (work / "out" / "file").write_text("x")
    bad = work / "out" / "file" / "o.onnx"
    args = {"prune": ["prune", work / "in" / "m.onnx", *RANDOM, "-o", bad, "--remove", "1"],
            "build": ["build", work / "in" / "m.onnx", "-o", bad],
            "calib": ["calib", "images", work / "in", "-o", bad]}[command]
    result = _run(args, capsys)
    _judged(work, result, contains=[f"output folder is not a folder: {bad.parent}", "create it or choose another -o"])
    missing = work / "nosuch" / "o.onnx"
    args[args.index(bad)] = missing
    result = _run(args, capsys)
    _judged(work, result, contains=f"output folder does not exist: {missing.parent}")


def _can_write_readonly(folder: Path) -> bool:
    try:
        (folder / ".probe").write_text("x")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


@pytest.mark.parametrize("command", ["prune", "build", "export"])
def test_read_only_output_folder_is_refused_before_any_work(work, capsys, command) -> None:
    ro = work / "out" / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if _can_write_readonly(ro):
            pytest.skip("running with privileges that ignore folder permissions (root)")
        args = {"prune": ["prune", work / "in" / "m.onnx", *RANDOM, "-o", ro / "p.onnx", "--remove", "1"],
                "build": ["build", work / "in" / "m.onnx", "-o", ro / "b"],
                "export": ["export", "nosuch.py:build", "-o", ro / "o.onnx"]}[command]
        result = _run(args, capsys)
        _judged(work, result, contains=[f"output folder {ro} is not writable", "permissions"])
    finally:
        ro.chmod(0o755)


def test_unwritable_folder_is_refused_before_any_work(work, capsys, monkeypatch) -> None:
    """The writability probe (root ignores permissions, so the failure is injected at os.open)."""
    from compress import outputs

    real_open = os.open

    def deny(path, flags, *args):
        if ".compress-probe-" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(outputs.os, "open", deny)
    called = []
    monkeypatch.setattr("compress.cli.prune.load_model_and_blocks", lambda *a, **k: called.append(1))
    result = _run(["prune", work / "in" / "m.onnx", *RANDOM, "-o", work / "out" / "p.onnx", "--remove", "1"], capsys)
    _judged(work, result, contains=[f"output folder {work / 'out'} is not writable: Permission denied",
                                    "fix the folder's permissions"])
    assert not called  # nothing was loaded: the check comes before any work


# --------------------------------------------------------------------------- publishing races


def test_output_appearing_during_the_run_is_not_replaced(work, capsys, monkeypatch) -> None:
    """Check-then-write race: another process creates -o while this run works."""
    import compress.cli.prune as cli_prune

    real = cli_prune.prune
    out = work / "out" / "p.onnx"

    def racing(*args, **kwargs):
        result = real(*args, **kwargs)
        out.write_text("the other run's model")
        return result

    monkeypatch.setattr(cli_prune, "prune", racing)
    result = _run(["prune", work / "in" / "m.onnx", *RANDOM, "-o", out, "--remove", "1", "--no-latency"], capsys)
    _judged(work, result, contains=[f"output {out} appeared while compress was running", "--force"],
            absent=[work / "out" / "p.blocks.json"])
    assert out.read_text() == "the other run's model"


def test_output_folder_appearing_during_the_build_is_not_replaced(work, capsys, monkeypatch) -> None:
    import compress.build

    real = compress.build.build
    out = work / "out" / "b"

    def racing(*args, **kwargs):
        result = real(*args, **kwargs)
        out.mkdir()
        (out / "latency.json").write_text("the other run's report")
        return result

    monkeypatch.setattr(compress.build, "build", racing)
    result = _run(["build", work / "in" / "m.onnx", "-o", out, "--iterations", "1", "--duration", "0.01",
                   "--warmup-ms", "1"], capsys)
    _judged(work, result, contains=[f"output {out} appeared while compress was running", "--force"])
    assert sorted(os.listdir(out)) == ["latency.json"]
    assert (out / "latency.json").read_text() == "the other run's report"


def test_publishing_without_hard_links_still_refuses_a_new_file(tmp_path, monkeypatch) -> None:
    from compress import outputs
    from compress.errors import OutputError

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(outputs.os, "link", no_links)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_text("new")
    outputs.publish_file(src, dst, overwrite=False)
    assert dst.read_text() == "new"
    assert not src.exists()
    src.write_text("newer")
    with pytest.raises(OutputError, match="appeared while compress was running"):
        outputs.publish_file(src, dst, overwrite=False)
    assert dst.read_text() == "new"


def test_two_concurrent_runs_with_the_same_output_cannot_both_succeed(work) -> None:
    model, out = work / "in" / "m.onnx", work / "out" / "bm.json"
    cmd = [sys.executable, "-m", "compress", "inspect", str(model), "--write-blocks", str(out), "-q"]
    procs = [subprocess.Popen(cmd, cwd=work, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [Result(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert sorted(r.rc for r in results) == [0, 1], [r.stderr for r in results]
    for r in results:
        if r.rc:
            assert_user_error(r, contains=[str(out)])
            assert "already exists" in r.stderr or "appeared while compress was running" in r.stderr
    assert_no_leftovers(work)


def test_pipeline_output_folder_is_locked(tmp_path) -> None:
    from compress.errors import OutputError
    from compress.outputs import locked_folder

    with locked_folder(tmp_path), pytest.raises(OutputError, match="in use by another compress run"), \
            locked_folder(tmp_path):
        pass
    with locked_folder(tmp_path):  # released
        pass


# --------------------------------------------------------------------------- signals


_SLOW_WRITER = textwrap.dedent("""
    import pathlib, sys, time
    import compress.onnx_io as onnx_io
    ready = pathlib.Path(sys.argv[1])
    real = onnx_io.save_model
    def slow(model, path, **kw):
        files = real(model, path, **kw)
        ready.write_text(str(path))
        time.sleep(120)
        return files
    onnx_io.save_model = slow
    import compress.cli.prune, compress.build
    compress.cli.prune.save_model = slow
    compress.build.save_model = slow
    from compress.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize(("command", "sig", "code", "text"), [
    ("prune", signal.SIGTERM, 143, "error: terminated (SIGTERM)"),  # files staged beside -o
    ("build", signal.SIGTERM, 143, "error: terminated (SIGTERM)"),  # a staged folder
    ("prune", signal.SIGINT, 130, "error: interrupted"),
])
def test_signal_while_writing_leaves_no_temporary_files(work, command, sig, code, text) -> None:
    """The signal arrives while a model is being written into the staging folder."""
    ready = work / "ready"
    args = {"prune": ["prune", "in/m.onnx", *RANDOM, "-o", "out/p.onnx", "--remove", "1", "--no-latency"],
            "build": ["build", "in/m.onnx", "-o", "out/b", "--iterations", "1", "--duration", "0.01",
                      "--warmup-ms", "1"]}[command]
    before = tree_digest(work / "in")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(ready), *args], cwd=work, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), proc.communicate(timeout=5)
        assert "tmp" in ready.read_text()  # it was writing into a temporary folder
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    ready.unlink()
    result = Result(proc.returncode, out, err)
    assert_user_error(result, code=code, contains=text)
    assert sorted(os.listdir(work / "out")) == []
    assert_no_leftovers(work)
    assert tree_digest(work / "in") == before


def test_sigterm_handler_is_restored_after_main(work, capsys) -> None:
    before = signal.getsignal(signal.SIGTERM)
    _run(["inspect", work / "in" / "m.onnx"], capsys)
    assert signal.getsignal(signal.SIGTERM) is before


# --------------------------------------------------------------------------- user error / bug split


def test_unexpected_exception_is_an_internal_error_exit_2(work, capsys, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr("compress.cli.inspect.load_model_and_blocks", boom)
    result = _run(["inspect", work / "in" / "m.onnx"], capsys)
    assert_internal_error(result, exc_type="ZeroDivisionError")
    assert result.error_lines == ["error: internal error (a bug in compress): ZeroDivisionError: division by zero second line"]
    assert result.hint_lines == ["hint: re-run with -v for the traceback and report it"]
    verbose = _run(["inspect", work / "in" / "m.onnx", "-v"], capsys)
    assert verbose.rc == 2
    assert "Traceback (most recent call last)" in verbose.stderr
    assert "ZeroDivisionError: division by zero" in verbose.stderr


def test_systemexit_inside_a_command_is_not_success(work, capsys, monkeypatch) -> None:
    def leave(*args, **kwargs):
        raise SystemExit(0)

    monkeypatch.setattr("compress.cli.inspect.load_model_and_blocks", leave)
    result = _run(["inspect", work / "in" / "m.onnx"], capsys)
    assert_internal_error(result, exc_type="SystemExit")


def test_internal_error_in_a_subprocess_has_no_traceback(work) -> None:
    """A bug seen from outside: exit 2, the two lines, no traceback (here a TypeError from a bad hint)."""
    code = textwrap.dedent("""
        import sys
        import compress.cli.inspect as ins
        from compress.errors import ModelError
        def bad(*a, **k):
            raise ModelError("no hint given")
        ins.load_model_and_blocks = bad
        from compress.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    proc = subprocess.run([sys.executable, "-c", code, "inspect", "in/m.onnx"], cwd=work, env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    assert_internal_error(result, exc_type="TypeError")
    assert "missing 1 required keyword-only argument: 'hint'" in result.error_lines[0]


def test_usage_errors_exit_2(tmp_path) -> None:
    result = run_cli(["prune", "--remove", "x"], cwd=tmp_path, rlimit_as_gib=2)
    assert result.rc == 2
    assert "usage: compress prune" in result.stderr
    assert "Traceback" not in result.stderr


def test_compress_error_requires_a_hint() -> None:
    from compress.errors import CompressError, ModelError, OutputError

    with pytest.raises(TypeError):
        ModelError("x")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="needs a non-empty hint"):
        OutputError("x", hint=" ")
    assert str(CompressError("bad", hint="fix it")) == "bad (hint: fix it)"


def _compress_error_classes(trees: dict[Path, ast.Module]) -> tuple[set[str], set[str]]:
    """(all CompressError subclasses, those whose own __init__ sets the hint itself)."""
    from compress import errors

    names = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, errors.CompressError)}
    fixed = {"MissingDependencyError"}
    grew = True
    while grew:
        grew = False
        for tree in trees.values():
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and node.name not in names and any(
                        isinstance(b, ast.Name) and b.id in names for b in node.bases):
                    names.add(node.name)
                    grew = True
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name in names:
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                        params = {a.arg for a in item.args.args + item.args.kwonlyargs}
                        if "hint" not in params:
                            fixed.add(node.name)
    return names, fixed


def test_every_compress_error_raised_in_src_has_a_hint() -> None:
    """Static check: each construction of a CompressError subclass in src/ passes hint= (or **kwargs)."""
    trees = {p: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(SRC.rglob("*.py"))}
    names, fixed = _compress_error_classes(trees)
    missing = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name not in names or name in fixed:
                continue
            if any(k.arg == "hint" or k.arg is None for k in node.keywords):
                continue
            missing.append(f"{path.relative_to(SRC)}:{node.lineno}: {name}(...) without hint=")
    assert not missing, "\n".join(missing)


# --------------------------------------------------------------------------- compress run


def _pipeline(work: Path) -> Path:
    cfg = work / "in" / "p.yaml"
    cfg.write_text("model:\n  source: m.onnx\ncalibration:\n  random:\n    batches: 2\n    batch_size: 2\n"
                   "prune:\n  remove: 1\nbuild:\n  backend: ort\n")
    return cfg


def test_run_output_that_is_a_file_or_fifo(work, capsys) -> None:
    pytest.importorskip("yaml")
    pytest.importorskip("matplotlib")
    cfg = _pipeline(work)
    before = tree_digest(work / "in")
    (work / "out" / "file").write_text("x")
    result = _run(["run", cfg, "-o", work / "out" / "file"], capsys)
    _judged(work, result, contains=f"output {work / 'out' / 'file'} exists and is not a folder", before=before)
    os.mkfifo(work / "out" / "fifo")
    result = _run(["run", cfg, "-o", work / "out" / "fifo"], capsys)
    _judged(work, result, contains="exists and is not a folder (a FIFO (named pipe))", before=before)
    result = _run(["run", cfg, "-o", work / "out" / "file" / "sub"], capsys)
    _judged(work, result, contains="is not a folder", before=before)


def test_run_refuses_a_folder_that_is_in_use(work, capsys) -> None:
    pytest.importorskip("yaml")
    pytest.importorskip("matplotlib")
    from compress.outputs import locked_folder

    cfg = _pipeline(work)
    out = work / "out" / "run"
    out.mkdir()
    with locked_folder(out):
        result = _run(["run", cfg, "-o", out], capsys)
    _judged(work, result, contains=[f"output folder {out} is in use by another compress run", "wait for it"])
    assert not list(out.iterdir())


# --------------------------------------------------------------------------- every command, one table


_NET = "import torch\ndef build():\n    return torch.nn.Linear(4, 4), (torch.zeros(1, 4),)\n"

#: command -> (argv with {in}/{out} placeholders, the output pre-created, whether it is a file output)
_COMMANDS = {
    "export": (["export", "{in}/net.py:build", "-o", "{out}/o.onnx"], "o.export.json", True),
    "prune": (["prune", "{in}/m.onnx", *RANDOM, "-o", "{out}/p.onnx", "--remove", "1", "--no-latency"],
              "p.onnx.data", True),
    "prune-scores": (["prune", "{in}/m.onnx", *RANDOM, "--scores-only", "--report", "{out}/s.json"], "s.png", True),
    "inspect": (["inspect", "{in}/m.onnx", "--write-blocks", "{out}/bm.json"], "bm.json", True),
    "build": (["build", "{in}/m.onnx", "-o", "{out}/b"], "b/mine.txt", False),
    "calib-text": (["calib", "text", "{in}/t.txt", "--tokenizer", "{in}", "-o", "{out}/c"], "c/mine.txt", False),
    "calib-images": (["calib", "images", "{in}", "-o", "{out}/c"], "c/a.npz", False),
}


def _argv(work: Path, template: list[str]) -> list[str]:
    return [a.replace("{in}", str(work / "in")).replace("{out}", str(work / "out")) for a in template]


@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_existing_output_is_kept_without_force(work, capsys, command) -> None:
    (work / "in" / "net.py").write_text(_NET)
    (work / "in" / "t.txt").write_text("hello\n")
    template, existing, _ = _COMMANDS[command]
    target = work / "out" / existing
    target.parent.mkdir(exist_ok=True)
    target.write_text("keep")
    before_in, before_out = tree_digest(work / "in"), tree_digest(work / "out")
    result = _run(_argv(work, template), capsys)
    folder = target.parent if target.parent != work / "out" else None
    expected = f"output folder {folder} is not empty" if folder else f"output {target} already exists"
    _judged(work, result, contains=[expected, "--force"], before=before_in)
    assert tree_digest(work / "out") == before_out


@pytest.mark.parametrize("command", sorted(c for c, (_, _, is_file) in _COMMANDS.items() if is_file))
def test_fifo_output_is_refused_with_force(work, capsys, command) -> None:
    (work / "in" / "net.py").write_text(_NET)
    template, existing, _ = _COMMANDS[command]
    target = work / "out" / existing
    os.mkfifo(target)
    before = tree_digest(work / "in")
    result = _run([*_argv(work, template), "--force"], capsys)
    _judged(work, result, contains=f"output {target} exists and is a FIFO (named pipe)", before=before)
    assert sorted(os.listdir(work / "out")) == [existing]


def test_run_refuses_a_folder_with_foreign_files_even_with_force(work, capsys) -> None:
    pytest.importorskip("yaml")
    pytest.importorskip("matplotlib")
    cfg = _pipeline(work)
    out = work / "out" / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    result = _run(["run", cfg, "-o", out, "--force"], capsys)
    _judged(work, result, contains=f"output folder {out} holds files other than an earlier 'compress run' output "
                                   "(notes.txt)")
    assert (out / "notes.txt").read_text() == "keep"
