"""Run the candidates of ``compress search``: one at a time in this process, or as Ray tasks.

A candidate's work is a :class:`Task`: a module-level function (importable by a Ray worker)
and small picklable arguments (paths, frozen configs; never models or arrays). An
:class:`Executor` runs every task it is given and yields one :class:`Outcome` per task in
completion order; a failing task never stops the others.

- :class:`SerialExecutor` runs the tasks in order, in this process.
- :class:`RayExecutor` submits them all at once to a Ray cluster (a local one it starts,
  the one the caller already initialized, or one it joins by address) and yields each
  outcome as it finishes. Resources per task: a normal task holds 1 CPU; a ``gpu`` task
  holds 1 GPU and 1 CPU; an ``exclusive`` CPU task (a latency measurement) holds as many
  CPUs as the smallest CPU node has, so it holds every CPU of the node it lands on and no
  other task of ours runs there meanwhile.

:func:`make_executor` picks one (``"auto"``: Ray when it is installed, else serial).
Both executors run a task through the same wrapper, :func:`_call`, which turns a
:class:`~compress.errors.CompressError` into an error of kind ``"user"`` and any other
exception into one of kind ``"bug"`` (with its traceback).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from compress.errors import CompressError, ConfigError, MissingDependencyError
from compress.log import logger
from compress.runtime.session import default_threads

MODES = ("auto", "serial", "ray")
"""The values of ``make_executor(mode=...)``."""

NO_RAY_NOTE = (
    "Ray is not installed: candidates run one at a time in this process (pip install 'onnx-compress[ray]')"
)
"""``describe()["note"]`` of the serial executor that ``mode="auto"`` falls back to."""

MAX_RETRIES = 1
"""Ray reruns a task whose worker or node died once (a lost node); a task that crashes its
worker twice (a segfault in a build) is reported as failed instead of Ray's default 3 retries."""


@dataclass(frozen=True)
class Task:
    """One unit of work of a search (build, score or measure one candidate).

    Attributes:
        key: Unique name, e.g. ``"prune/r2-lowest"``.
        fn: A module-level function (a Ray worker imports it by name); returns JSON-ready data.
        args: Positional arguments of ``fn``: small picklable values (paths, frozen configs),
            never models or arrays.
        exclusive: A measurement: runs alone on its device. On CPU (ONNX Runtime) it holds
            every CPU of its node, so no other task of ours runs there meanwhile; with
            ``gpu=True`` it holds one whole GPU.
        gpu: Needs one GPU (a TensorRT build or benchmark).
    """

    key: str
    fn: Callable[..., dict]
    args: tuple = ()
    exclusive: bool = False
    gpu: bool = False


@dataclass(frozen=True)
class Outcome:
    """The result of one :class:`Task`.

    Attributes:
        task: The task.
        value: ``fn``'s return value, or None when it failed.
        error: None, or ``{"kind": "user" | "bug", "message": str, "hint": str | None,
            "type": exception class name}`` plus ``"traceback": str`` for kind ``"bug"``.
        where: ``{"node": short node id or "local", "host": host name, "pid": int}`` of the
            process that ran ``fn`` (all three None when Ray lost the task before it reported).
        seconds: Wall time of ``fn`` in that process, in seconds (0.0 when Ray lost the task).
    """

    task: Task
    value: dict | None
    error: dict | None
    where: dict
    seconds: float


class Executor(Protocol):
    """Runs tasks; :class:`SerialExecutor` and :class:`RayExecutor` implement it."""

    kind: str
    """``"serial"`` or ``"ray"``."""

    def run(self, tasks: Sequence[Task]) -> Iterator[Outcome]:
        """Run every task; yield one outcome per task, in completion order."""
        ...

    def describe(self) -> dict:
        """``{"kind", "address", "nodes", "cpus", "gpus", "note"}`` (the report's ``executor``)."""
        ...

    def close(self) -> None:
        """Release what the executor started itself (never a Ray the caller started)."""
        ...


def _call(fn: Callable[..., dict], args: tuple, threads: int | None = None) -> tuple[dict | None, dict | None, dict, float]:
    """Run ``fn(*args)`` and report instead of raising (in a Ray worker or in this process).

    Args:
        fn: The task function.
        args: Its positional arguments.
        threads: intra-op threads of the ONNX Runtime sessions it makes
            (:func:`compress.runtime.session.default_threads`; None: every core), so that
            tasks sharing a node do not oversubscribe it.

    Returns:
        ``(value, error, where, seconds)`` as in :class:`Outcome`: a
        :class:`~compress.errors.CompressError` gives error kind ``"user"`` with its message
        and hint; any other :class:`Exception` gives kind ``"bug"`` with the traceback text.
        ``KeyboardInterrupt`` and ``SystemExit`` propagate.
    """
    where = {"node": _node_id(), "host": socket.gethostname(), "pid": os.getpid()}
    start = time.perf_counter()
    value: dict | None = None
    error: dict | None = None
    try:
        with default_threads(threads):
            value = fn(*args)
    except CompressError as e:
        error = {"kind": "user", "message": e.message, "hint": e.hint, "type": type(e).__name__}
    except Exception as e:
        error = {"kind": "bug", "message": f"{type(e).__name__}: {e}", "hint": None,
                 "type": type(e).__name__, "traceback": traceback.format_exc()}
    return value, error, where, time.perf_counter() - start


def _node_id() -> str:
    """The short (8 hex digits) Ray node id inside a Ray task; ``"local"`` anywhere else."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return "local"
    context = ray.get_runtime_context()
    if context.get_task_id() is None:  # the driver, e.g. a serial run beside a caller's Ray
        return "local"
    return str(context.get_node_id())[:8]


class SerialExecutor:
    """Runs the tasks one at a time, in order, in this process (``exclusive``/``gpu`` need nothing more).

    Args:
        note: ``describe()["note"]``, e.g. why Ray is not used.
    """

    kind = "serial"

    def __init__(self, *, note: str | None = None) -> None:
        self.note = note

    def run(self, tasks: Sequence[Task]) -> Iterator[Outcome]:
        """Run every task in order; yield each outcome as soon as its task is done."""
        for task in tasks:
            yield Outcome(task, *_call(task.fn, task.args))

    def describe(self) -> dict:
        """``{"kind": "serial", "address": None, "nodes": 1, "cpus": os.cpu_count(), "gpus": 0.0, "note"}``."""
        return {"kind": self.kind, "address": None, "nodes": 1, "cpus": float(os.cpu_count() or 1),
                "gpus": 0.0, "note": self.note}

    def close(self) -> None:
        """Nothing to release."""


class RayExecutor:
    """Runs the tasks as Ray tasks, all submitted at once; yields outcomes as they finish.

    Use :func:`make_executor` to build one. If Ray is already initialized in this process
    (``ray.is_initialized()``) that Ray is used and never shut down here; otherwise it
    joins the cluster at ``address`` or, with ``address=None``, starts a local Ray with
    ``workers`` CPUs. :meth:`close` shuts down (or disconnects from) only a Ray this
    executor initialized.

    Args:
        address: A Ray cluster address (``"ray://HOST:10001"``, ``"HOST:6379"``, ``"auto"``),
            or None to start a local Ray.
        workers: CPUs of the local Ray (default: ``os.cpu_count()``); ignored, with a warning,
            when joining a cluster or using the caller's Ray.

    Raises:
        ConfigError: The cluster at ``address`` cannot be joined, or ``workers < 1``.
    """

    kind = "ray"

    def __init__(self, *, address: str | None = None, workers: int | None = None) -> None:
        import ray

        if workers is not None and workers < 1:
            raise ConfigError(f"workers must be at least 1, got {workers}", hint="pass --workers 2 (or leave it out)")
        self._ray = ray
        self._owned = False
        if ray.is_initialized():
            self.address = _current_address(ray)
            if workers is not None:
                logger.warning("workers=%d is ignored: Ray is already initialized in this process", workers)
        elif address is not None:
            if workers is not None:
                logger.warning("workers=%d is ignored: the nodes of the Ray cluster at %s decide", workers, address)
            try:
                ray.init(address=address, log_to_driver=False)
            except Exception as e:
                raise ConfigError(
                    f"cannot join the Ray cluster at {address!r}: {type(e).__name__}: {e}",
                    hint="check the address (ray://HOST:10001 or HOST:6379) and that `ray status` works on "
                         "that cluster, or unset RAY_ADDRESS to start a local Ray",
                ) from e
            self._owned = True
            self.address = address
        else:
            ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
            self._owned = True
            self.address = "local"
        self.exclusive_cpus = _smallest_cpu_node(ray.nodes())
        """CPUs an exclusive CPU task holds: those of the smallest alive node that has CPUs."""

    def run(self, tasks: Sequence[Task]) -> Iterator[Outcome]:
        """Submit every task, then yield each outcome as its task finishes.

        A task that Ray itself fails (its worker died twice: Ray retries a lost task once; it
        was cancelled; its function could not be loaded) yields an outcome with error kind
        ``"bug"``; the others keep going.
        A ``gpu`` task on a cluster without GPUs fails at once with kind ``"user"`` instead of
        waiting forever. If the caller stops iterating (or Ctrl-C arrives while waiting), the
        tasks still pending are cancelled and the exception propagates.
        """
        ray = self._ray
        remote = ray.remote(_call)
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        pending: dict[Any, Task] = {}
        refused: list[Task] = []
        for task in tasks:
            if task.gpu and gpus < 1:
                refused.append(task)
                continue
            resources = self._resources(task)
            options = {"name": task.key, "max_retries": MAX_RETRIES, **resources}
            threads = None if task.exclusive else max(1, int(resources["num_cpus"]))
            pending[remote.options(**options).remote(task.fn, task.args, threads)] = task
        try:
            for task in refused:
                error = {"kind": "user", "message": f"task {task.key!r} needs a GPU but the Ray cluster has none",
                         "hint": "join a Ray cluster with a GPU node (an address or RAY_ADDRESS), or leave "
                                 "TensorRT precisions out of the search", "type": "ConfigError"}
                yield Outcome(task, None, error, dict(_NOWHERE), 0.0)
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                task = pending.pop(ref)
                try:
                    value, error, where, seconds = ray.get(ref)
                except ray.exceptions.RayError as e:
                    yield Outcome(task, None, _ray_failure(e), dict(_NOWHERE), 0.0)
                else:
                    yield Outcome(task, value, error, where, seconds)
        finally:
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception as e:  # cancelling is best effort; the original exception matters
                    logger.debug("could not cancel a Ray task: %s", e)

    def _resources(self, task: Task) -> dict:
        """The Ray resource options of ``task``."""
        if task.gpu:
            return {"num_gpus": 1, "num_cpus": 1}
        if task.exclusive:
            return {"num_cpus": self.exclusive_cpus}
        return {"num_cpus": 1}

    def describe(self) -> dict:
        """``{"kind": "ray", "address", "nodes": alive nodes, "cpus", "gpus", "note": None}``."""
        ray = self._ray
        resources = ray.cluster_resources()
        return {"kind": self.kind, "address": self.address,
                "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
                "cpus": float(resources.get("CPU", 0.0)), "gpus": float(resources.get("GPU", 0.0)), "note": None}

    def close(self) -> None:
        """Shut down the local Ray this executor started, or disconnect from the cluster it joined.

        A Ray the caller initialized is left running. Calling it twice is harmless.
        """
        if self._owned:
            self._owned = False
            self._ray.shutdown()


_NOWHERE = {"node": None, "host": None, "pid": None}


def _ray_failure(e: BaseException) -> dict:
    """The ``error`` of a task that Ray itself failed."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return {"kind": "bug", "message": f"Ray could not run the task: {type(e).__name__}: {first}".rstrip(": "),
            "hint": None, "type": type(e).__name__, "traceback": str(e)}


def _smallest_cpu_node(nodes: Sequence[dict]) -> float:
    """The CPU count of the smallest alive node that has CPUs (1.0 when there is none)."""
    counts = [float(n["Resources"]["CPU"]) for n in nodes
              if n.get("Alive") and float(n.get("Resources", {}).get("CPU", 0.0)) > 0]
    return min(counts) if counts else 1.0


def _current_address(ray: Any) -> str:
    """The address of the Ray this process is already connected to (``"local"`` if unknown)."""
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:
        return "local"
    return str(address) if address else "local"


def make_executor(mode: str = "auto", *, address: str | None = None, workers: int | None = None) -> Executor:
    """Build the executor of a search.

    Args:
        mode: ``"serial"`` (in this process, in order), ``"ray"`` (Ray required) or ``"auto"``
            (Ray when it is installed; else serial, with a warning and ``describe()["note"]``
            = :data:`NO_RAY_NOTE`).
        address: The Ray cluster to join; defaults to the ``RAY_ADDRESS`` environment
            variable; None (and no variable) starts a local Ray. Ray only.
        workers: CPUs of a local Ray (default: ``os.cpu_count()``).

    Returns:
        A :class:`SerialExecutor` or :class:`RayExecutor`; call ``close()`` when done.

    Raises:
        ConfigError: ``mode`` is unknown, an address is given with ``mode="serial"``, or the
            Ray cluster cannot be joined.
        MissingDependencyError: ``mode="ray"`` (or an explicit ``address``) without Ray installed.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown executor mode {mode!r}; available: {', '.join(MODES)}",
                          hint="use 'auto' (Ray when installed), 'ray' or 'serial'")
    if mode == "serial":
        if address is not None:
            raise ConfigError(f"a Ray address ({address!r}) was given with the serial executor",
                              hint="drop the address, or use mode 'ray' or 'auto'")
        return SerialExecutor()
    resolved = address if address is not None else (os.environ.get("RAY_ADDRESS") or None)
    try:
        import ray  # noqa: F401
    except ImportError as e:
        if mode == "ray" or address is not None:
            raise MissingDependencyError("ray", purpose="running search candidates on Ray", extra="ray") from e
        logger.warning(NO_RAY_NOTE)
        return SerialExecutor(note=NO_RAY_NOTE)
    return RayExecutor(address=resolved, workers=workers)
