"""The one output guard of compress: every file or folder a command writes is planned, checked and published here.

A command lists all its outputs before doing any work, then writes them through one
:class:`Outputs`::

    outs = Outputs(force=args.force)
    outs.add_model_input(args.model)              # the model, its .blocks.json, its external data
    model_path = outs.file(args.output, model=True)   # also plans MODEL.onnx.data
    blocks_path = outs.file(block_map_path(model_path))
    outs.check()                                  # every check below, before any work
    ...                                           # the work
    with outs.writing() as stage:                 # files go into private temporary folders
        save_model(model, stage.path(model_path))
        write_json(stage.path(blocks_path), block_map)
    # here every output is in place, or none of the new ones is

:meth:`Outputs.check` refuses (with :class:`~compress.errors.OutputError`, naming the path
and the flag) an output that

* is an input, by resolved path (symlinks followed) or by inode (a hard link);
* is planned twice (``-o`` and ``--report`` naming the same file);
* exists and ``force`` is not given;
* exists and is not a regular file (a FIFO, device or socket; refused even with ``force``),
  or is a folder where a file is expected (or a file where a folder is expected);
* lies in a folder that does not exist or cannot be written (probed by creating a file).

Publishing (the end of :meth:`Outputs.writing`) never replaces a file that appeared after
the check unless ``force`` was given: a file is hard-linked into place (``os.link`` fails
with EEXIST when the name is taken) and its temporary name removed; where the file system
has no hard links, the name is claimed with ``O_CREAT | O_EXCL`` and then replaced. So of
two concurrent runs writing the same output, one fails. SIGINT and SIGTERM are held back
while the outputs are published; an error or interruption before that leaves no temporary
file and no new output behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from compress.errors import OutputError

#: errno values meaning "this file system cannot make hard links here".
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}

#: A model file above this size is not parsed to find its external data files (such files
#: hold their tensors inline; a model with external data is a small protobuf).
_SCAN_LIMIT = 64 << 20


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


#: ``_Planned.what`` of the external data file planned beside a model output.
_DATA_SIDECAR = "external data of a model output"


@dataclass(frozen=True)
class _Planned:
    path: Path
    flag: str
    folder: bool
    replaceable: Callable[[Path], bool] | None
    what: str
    create_parents: bool


def external_data_files(model_path: str | os.PathLike[str]) -> list[Path]:
    """The external data files an ONNX model file refers to (empty when it has none or cannot be read).

    Only the protobuf is parsed (no tensor data is loaded); files above 64 MiB are not
    parsed (their tensors are inline).
    """
    p = Path(model_path)
    try:
        if not p.is_file() or p.stat().st_size > _SCAN_LIMIT:
            return []
        import onnx

        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # not a model: load_model reports it with its own message
        return []
    found: set[str] = set()
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        tensors = list(g.initializer) + [a.t for n in g.node for a in n.attribute if a.HasField("t")]
        for t in tensors:
            for entry in t.external_data:
                if entry.key == "location" and entry.value:
                    found.add(entry.value)
        graphs.extend(a.g for n in g.node for a in n.attribute if a.HasField("g"))
        graphs.extend(sg for n in g.node for a in n.attribute for sg in a.graphs)
    return [p.parent / name for name in sorted(found)]


def _sidecar(model_path: Path, suffix: str) -> Path:
    name = model_path.name
    stem = name[: -len(".onnx")] if name.endswith(".onnx") else name
    return model_path.with_name(stem + suffix)


class Outputs:
    """The outputs of one command: planned, checked before any work, then written and published together.

    Args:
        inputs: files (or folders) the command reads; no output may be one of them.
        force: existing regular files (and replaceable folders) may be replaced.
    """

    def __init__(self, *, inputs: Iterable[str | os.PathLike[str]] = (), force: bool = False) -> None:
        self.force = force
        self._inputs: list[Path] = []
        self._planned: list[_Planned] = []
        self._checked = False
        for p in inputs:
            self.add_input(p)

    # ------------------------------------------------------------------ planning

    def add_input(self, path: str | os.PathLike[str] | None) -> None:
        """Record a file or folder the command reads (None is ignored)."""
        if path is not None and str(path):
            self._inputs.append(Path(path))

    def add_model_input(self, path: str | os.PathLike[str] | None) -> None:
        """Record an ONNX model: the file, its ``.blocks.json`` sidecar (where one exists) and its external data files."""
        if path is None:
            return
        p = Path(path)
        self.add_input(p)
        if os.path.lexists(_sidecar(p, ".blocks.json")):
            self.add_input(_sidecar(p, ".blocks.json"))
        for data in external_data_files(p):
            self.add_input(data)

    def file(self, path: str | os.PathLike[str], *, flag: str = "-o", model: bool = False) -> Path:
        """Plan an output file; ``model``: also plan its external data file ``PATH.data``."""
        out = Path(path)
        self._planned.append(_Planned(out, flag, False, None, "", False))
        if model:
            self._planned.append(_Planned(out.with_name(out.name + ".data"), flag, False, None, _DATA_SIDECAR, False))
        return out

    def folder(self, path: str | os.PathLike[str], *, flag: str = "-o", replaceable: Callable[[Path], bool] | None = None,
               what: str = "files compress wrote", create_parents: bool = False) -> Path:
        """Plan an output folder, written whole and swapped into place.

        With ``force``, an existing folder is replaced only when every entry satisfies
        ``replaceable`` (``what`` names such entries in the error); without it, only an
        empty folder is. ``create_parents``: missing parent folders are created (by the caller).
        """
        out = Path(path)
        self._planned.append(_Planned(out, flag, True, replaceable, what, create_parents))
        return out

    @property
    def paths(self) -> list[Path]:
        """Every planned output, in planning order."""
        return [p.path for p in self._planned]

    # ------------------------------------------------------------------ checking

    def check(self) -> None:
        """Check every planned output (see the module docstring); raises OutputError on the first problem."""
        seen: dict[str, _Planned] = {}
        probed: set[str] = set()
        inputs = [(i, os.path.realpath(i)) for i in self._inputs]
        for p in self._planned:
            real = os.path.realpath(p.path)
            if real in seen:
                other = seen[real]
                raise OutputError(f"{p.flag} {p.path} is also the output of {other.flag} ({other.path})",
                                  hint="give every output its own path")
            seen[real] = p
            self._check_inputs(p, real, inputs)
            self._check_existing(p)
            parent = self._parent(p)
            if str(parent) not in probed:
                _probe_writable(parent, p.flag)
                probed.add(str(parent))
        self._checked = True

    def _check_inputs(self, p: _Planned, real: str, inputs: Sequence[tuple[Path, str]]) -> None:
        try:
            st = os.stat(p.path)
        except OSError:
            st = None
        for src, src_real in inputs:
            if real == src_real:
                what = ("input folder" if p.folder else "input file") if str(src) == str(p.path) else f"input {src}"
                raise OutputError(f"output {p.path} is the {what}",
                                  hint=f"choose another {p.flag}; inputs are never overwritten")
            if st is not None and not p.folder:
                with contextlib.suppress(OSError):
                    s = os.stat(src)
                    if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
                        raise OutputError(f"output {p.path} is the same file as the input {src} (a hard link)",
                                          hint=f"choose another {p.flag}; inputs are never overwritten")
            if p.folder and (src_real + os.sep).startswith(real.rstrip(os.sep) + os.sep):
                raise OutputError(f"{p.flag} {p.path}: the output folder holds the input {src}",
                                  hint=f"choose another {p.flag}; the folder is replaced when it is written")

    def _check_existing(self, p: _Planned) -> None:
        if not os.path.lexists(p.path):
            return
        try:
            mode = os.stat(p.path).st_mode
        except OSError:  # a broken symbolic link: replacing it loses nothing but needs --force
            if not self.force:
                raise OutputError(f"output {p.path} already exists (a broken symbolic link)",
                                  hint="pass --force to overwrite it") from None
            return
        if p.folder:
            self._check_existing_folder(p, mode)
            return
        if stat.S_ISDIR(mode):
            raise OutputError(f"{p.flag} {p.path} is a folder, but names a file to write",
                              hint=f"name the file, e.g. {p.flag} {p.path / ('model' + (p.path.suffix or '.onnx'))}")
        if not stat.S_ISREG(mode):
            raise OutputError(f"output {p.path} exists and is {_kind(mode)}",
                              hint=f"choose another {p.flag}; compress replaces only regular files, even with --force")
        if not self.force:
            raise OutputError(f"output {p.path} already exists", hint="pass --force to overwrite it")

    def _check_existing_folder(self, p: _Planned, mode: int) -> None:
        if not stat.S_ISDIR(mode):
            raise OutputError(f"output {p.path} exists and is not a folder ({_kind(mode)})"
                              if not stat.S_ISREG(mode) else f"output {p.path} exists and is not a folder",
                              hint=f"choose another {p.flag}")
        entries = sorted(p.path.iterdir())
        if entries and not self.force:
            raise OutputError(f"output folder {p.path} is not empty",
                              hint=f"pass --force to replace it, or choose another {p.flag}")
        others = [e.name for e in entries if p.replaceable is None or not p.replaceable(e)]
        if others:
            raise OutputError(f"output folder {p.path} holds files other than {p.what} ({others[0]}); refusing to replace it",
                              hint=f"choose another {p.flag}, or empty the folder yourself")

    @staticmethod
    def _parent(p: _Planned) -> Path:
        parent = p.path.parent if str(p.path.parent) else Path(".")
        if p.create_parents:
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
            if not parent.is_dir():
                raise OutputError(f"cannot create the output folder {p.path}: {parent} is not a folder",
                                  hint=f"choose another {p.flag}")
            return parent
        if not parent.is_dir():
            what = "does not exist" if not parent.exists() else "is not a folder"
            raise OutputError(f"output folder {what}: {parent}", hint=f"create it or choose another {p.flag}")
        return parent

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def writing(self) -> Iterator[Staging]:
        """Stage the outputs in temporary folders; publish them all when the block ends without error.

        On an error (or Ctrl-C / SIGTERM) inside the block, the temporary folders are
        removed and no output is touched. Raises OutputError when an output appeared since
        :meth:`check` (without ``force``) or cannot be published.
        """
        if not self._checked:
            self.check()
        staging = Staging(self)
        try:
            yield staging
            with _signals_held():
                staging.publish()
        finally:
            staging.cleanup()


class Staging:
    """Temporary paths of the planned outputs (see :meth:`Outputs.writing`)."""

    def __init__(self, outputs: Outputs) -> None:
        self._outputs = outputs
        self._dirs: dict[str, Path] = {}  # parent folder -> staging folder for files
        self._folders: dict[str, Path] = {}  # output folder -> staged folder
        self._planned = {str(p.path): p for p in outputs._planned}

    def path(self, out: str | os.PathLike[str]) -> Path:
        """Where to write the planned output ``out`` (a file with the same name, or a fresh folder)."""
        key = str(Path(out))
        p = self._planned.get(key)
        if p is None:
            raise ValueError(f"{out} is not a planned output (planned: {', '.join(self._planned)})")
        parent = p.path.parent if str(p.path.parent) else Path(".")
        if p.folder:
            if key not in self._folders:
                if p.create_parents:
                    parent.mkdir(parents=True, exist_ok=True)
                self._folders[key] = _fresh_dir(parent, f".{p.path.name}.", ".tmp")
            return self._folders[key]
        pkey = str(parent)
        if pkey not in self._dirs:
            self._dirs[pkey] = _fresh_dir(parent, ".compress-", ".tmp")
        return self._dirs[pkey] / p.path.name

    def publish(self) -> None:
        """Move every staged output into place (all or, on an error, none of the new ones)."""
        force = self._outputs.force
        done: list[Path] = []  # new outputs published so far (removed again on an error)
        try:
            for p in self._outputs._planned:
                if p.folder:
                    staged = self._folders.get(str(p.path))
                    if staged is not None:
                        existed = p.path.exists()
                        _publish_folder(staged, p, force=force)
                        if not existed:
                            done.append(p.path)
                    continue
                parent = p.path.parent if str(p.path.parent) else Path(".")
                staged_dir = self._dirs.get(str(parent))
                staged = staged_dir / p.path.name if staged_dir is not None else None
                if staged is None or not os.path.lexists(staged):
                    if p.what == _DATA_SIDECAR and force and os.path.lexists(p.path) and not os.path.isdir(p.path):
                        os.unlink(p.path)  # the new model has no external data: a stale MODEL.onnx.data would mislead
                    continue
                existed = os.path.lexists(p.path)
                publish_file(staged, p.path, overwrite=force, flag=p.flag)
                if not existed:
                    done.append(p.path)
            for d in self._dirs.values():
                left = sorted(x.name for x in d.iterdir()) if d.is_dir() else []
                if left:
                    raise RuntimeError(f"unplanned output(s) written: {', '.join(left)}")
        except BaseException:
            for path in reversed(done):
                with contextlib.suppress(OSError):
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            raise

    def cleanup(self) -> None:
        """Remove the temporary folders (whatever is left in them)."""
        for d in [*self._dirs.values(), *self._folders.values()]:
            with contextlib.suppress(OSError):
                if d.exists():
                    shutil.rmtree(d)


# ---------------------------------------------------------------------- primitives


def publish_file(src: Path, dst: Path, *, overwrite: bool, flag: str = "-o") -> None:
    """Move ``src`` to ``dst``; without ``overwrite`` never replace a file that exists now.

    Uses ``os.link`` + unlink (EEXIST when ``dst`` exists); where the file system has no
    hard links, claims ``dst`` with ``O_CREAT | O_EXCL`` first, then renames over the claim.
    With ``overwrite``, ``dst`` is replaced only when it is missing or a regular file.
    """
    if overwrite:
        with contextlib.suppress(FileNotFoundError):
            mode = os.stat(dst).st_mode
            if not stat.S_ISREG(mode):
                raise OutputError(f"output {dst} is {_kind(mode)}",
                                  hint=f"choose another {flag}; compress replaces only regular files, even with --force")
        os.replace(src, dst)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise _appeared(dst, flag) from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise OutputError(f"cannot write {dst}: {exc.strerror}", hint=f"choose another {flag}") from None
        try:
            fd = os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            raise _appeared(dst, flag) from None
        os.close(fd)
        os.replace(src, dst)
        return
    os.unlink(src)


def _appeared(dst: Path, flag: str) -> OutputError:
    return OutputError(f"output {dst} appeared while compress was running (another run writing the same output?)",
                       hint=f"pass --force to replace it, or choose another {flag}")


def _publish_folder(staged: Path, p: _Planned, *, force: bool) -> None:
    out = p.path
    parent = out.parent if str(out.parent) else Path(".")
    if force and os.path.lexists(out):
        if out.is_symlink() or not out.is_dir():
            raise OutputError(f"output {out} exists and is not a folder", hint=f"choose another {p.flag}")
        old = _fresh_dir(parent, f".{out.name}.", ".old")
        os.replace(out, old / out.name)
        try:
            os.replace(staged, out)
        except BaseException:
            os.replace(old / out.name, out)
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(staged, out)  # replaces only an empty folder (POSIX rename)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise _appeared(out, p.flag) from None
        raise OutputError(f"cannot write {out}: {exc.strerror}", hint=f"choose another {p.flag}") from None


def _fresh_dir(parent: Path, prefix: str, suffix: str) -> Path:
    """A new folder with the user's default permissions (mkdtemp would make it private)."""
    for _ in range(100):
        p = parent / f"{prefix}{uuid.uuid4().hex[:8]}{suffix}"
        try:
            p.mkdir()
            return p
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot write into {parent}: {exc.strerror}",
                              hint="choose another output folder, or fix its permissions") from None
    raise OutputError(f"cannot create a temporary folder in {parent}",
                      hint="remove the leftover .*.tmp folders there, or choose another output folder")


def _probe_writable(folder: Path, flag: str) -> None:
    """Create and remove a file in ``folder``: the one reliable writability test (ACLs, read-only mounts, root)."""
    probe = folder / f".compress-probe-{uuid.uuid4().hex[:8]}.tmp"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        raise OutputError(f"output folder {folder} is not writable: {exc.strerror}",
                          hint=f"choose another {flag}, or fix the folder's permissions") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (main thread) while outputs are published; delivered after."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def locked_folder(folder: Path, *, flag: str = "-o") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (flock on the folder itself); OutputError if another run holds it."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(f"output folder {folder} is in use by another compress run",
                              hint=f"wait for it to finish, or choose another {flag}") from None
        yield
    finally:
        os.close(fd)
