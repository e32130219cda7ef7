"""compress.search.execute: serial and Ray executors, error capture, exclusivity, fallbacks."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compress.errors import ConfigError, MissingDependencyError
from compress.search.execute import (
    NO_RAY_NOTE,
    Outcome,
    RayExecutor,
    SerialExecutor,
    Task,
    make_executor,
)

# --- task functions (module level, as the contract requires) ---------------------------------


def double(x: int) -> dict:
    return {"x": x, "double": 2 * x}


def user_error(name: str) -> dict:
    raise ConfigError(f"bad candidate {name!r}", hint="drop it from the space")


def bug(name: str) -> dict:
    raise ValueError(f"broken {name}")


def nap(seconds: float) -> dict:
    time.sleep(seconds)
    return {}


def crash() -> dict:
    os._exit(3)  # the worker process dies: Ray, not _call, reports it


def sleep_and_log(folder: str, key: str, seconds: float) -> dict:
    """Sleep; write (start, end, key) to folder/key.json (wall clock: comparable across processes)."""
    start = time.time()
    time.sleep(seconds)
    end = time.time()
    Path(folder, f"{key.replace('/', '_')}.json").write_text(json.dumps([start, end, key]))
    return {"key": key}


def _check_errors(outcomes: list[Outcome]) -> None:
    """The outcomes of [double(1), user_error, bug, double(4)], in task order."""
    ok, user, crash, last = outcomes
    assert ok.value == {"x": 1, "double": 2}
    assert ok.error is None
    assert user.value is None
    assert user.error == {"kind": "user", "message": "bad candidate 'r1'", "hint": "drop it from the space",
                          "type": "ConfigError"}
    assert crash.value is None
    assert crash.error is not None
    assert crash.error["kind"] == "bug"
    assert crash.error["type"] == "ValueError"
    assert crash.error["message"] == "ValueError: broken r2"
    assert crash.error["hint"] is None
    assert "Traceback (most recent call last)" in crash.error["traceback"]
    assert "in bug" in crash.error["traceback"]
    assert last.value == {"x": 4, "double": 8}
    for o in outcomes:
        assert o.seconds >= 0.0
        assert set(o.where) == {"node", "host", "pid"}
        assert isinstance(o.where["pid"], int)


ERROR_TASKS = [Task("a", double, (1,)), Task("b", user_error, ("r1",)), Task("c", bug, ("r2",)), Task("d", double, (4,))]


# --- serial ------------------------------------------------------------------------------------


def test_serial_runs_in_order_and_captures_errors() -> None:
    ex = make_executor("serial")
    assert isinstance(ex, SerialExecutor)
    outcomes = list(ex.run(ERROR_TASKS))
    assert [o.task.key for o in outcomes] == ["a", "b", "c", "d"]
    _check_errors(outcomes)
    assert all(o.where["node"] == "local" and o.where["pid"] == os.getpid() for o in outcomes)
    assert ex.describe()["kind"] == "serial"
    assert ex.describe()["address"] is None
    assert ex.describe()["note"] is None
    ex.close()


def test_serial_propagates_keyboard_interrupt() -> None:
    def interrupt() -> dict:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(SerialExecutor().run([Task("i", interrupt)]))


def test_unknown_mode_and_serial_with_address() -> None:
    with pytest.raises(ConfigError, match="unknown executor mode 'fast'; available: auto, serial, ray"):
        make_executor("fast")
    with pytest.raises(ConfigError, match="serial executor"):
        make_executor("serial", address="ray://head:10001")


# --- without Ray -------------------------------------------------------------------------------


def test_auto_without_ray_falls_back_to_serial(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with caplog.at_level("WARNING", logger="compress"):
        ex = make_executor("auto")
    assert isinstance(ex, SerialExecutor)
    assert ex.describe()["note"] == NO_RAY_NOTE
    assert "pip install 'onnx-compress[ray]'" in NO_RAY_NOTE
    assert NO_RAY_NOTE in caplog.messages
    assert [o.value for o in ex.run([Task("a", double, (3,))])] == [{"x": 3, "double": 6}]


def test_ray_mode_without_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError) as info:
        make_executor("ray")
    assert info.value.message == "ray is required for running search candidates on Ray but is not installed"
    assert info.value.hint == "pip install 'onnx-compress[ray]'"


# --- on a local Ray with 2 CPUs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_executor() -> Iterator[RayExecutor]:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray is already initialized in this process")
    # Ray workers import a task function by its module name, but this module is imported as
    # `test_search_execute` from tests/ (pytest's rootdir insertion), which is not on the
    # workers' sys.path (Ray passes them only the driver's cwd and script folder). Pickling
    # this module's functions by value ships them with each task instead: the simplest way,
    # no runtime_env or PYTHONPATH needed. Library task functions (compress.*) are importable.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    os.environ.pop("RAY_ADDRESS", None)
    ex = make_executor("ray", workers=2)
    assert isinstance(ex, RayExecutor)
    try:
        # Warm up both workers (their first task imports compress), so timings below are fair.
        list(ex.run([Task(f"warm{i}", nap, (0.3,)) for i in range(2)]))
        yield ex
    finally:
        ex.close()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        assert not ray.is_initialized()


def test_ray_describe(ray_executor: RayExecutor) -> None:
    d = ray_executor.describe()
    assert d == {"kind": "ray", "address": "local", "nodes": 1, "cpus": 2.0, "gpus": 0.0, "note": None}
    assert ray_executor.exclusive_cpus == 2.0


def test_ray_runs_tasks_in_parallel(ray_executor: RayExecutor, tmp_path: Path) -> None:
    tasks = [Task(f"t{i}", sleep_and_log, (str(tmp_path), f"t{i}", 1.0)) for i in range(4)]
    start = time.perf_counter()
    outcomes = list(ray_executor.run(tasks))
    wall = time.perf_counter() - start
    assert wall < 3.5  # 4 x 1 s on 2 CPUs: ~2 s in parallel, 4 s serially
    assert sorted(o.task.key for o in outcomes) == ["t0", "t1", "t2", "t3"]
    assert all(o.value == {"key": o.task.key} and o.error is None for o in outcomes)
    assert all(o.seconds == pytest.approx(1.0, abs=0.3) for o in outcomes)
    assert all(o.where["pid"] != os.getpid() and len(o.where["node"]) == 8 for o in outcomes)


def test_ray_exclusive_tasks_run_alone(ray_executor: RayExecutor, tmp_path: Path) -> None:
    tasks = [Task(f"n{i}", sleep_and_log, (str(tmp_path), f"n{i}", 0.3)) for i in range(4)]
    tasks[1:1] = [Task("x0", sleep_and_log, (str(tmp_path), "x0", 0.3), exclusive=True)]
    tasks[4:4] = [Task("x1", sleep_and_log, (str(tmp_path), "x1", 0.3), exclusive=True)]
    outcomes = list(ray_executor.run(tasks))
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
    intervals = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert len(intervals) == 6
    # Whether normal tasks overlap here depends on Ray's scheduling order; that they can run
    # in parallel is test_ray_runs_tasks_in_parallel's job.
    for x in (iv for iv in intervals if iv[2].startswith("x")):
        for other in intervals:
            if other is not x:
                assert x[1] <= other[0] or other[1] <= x[0], f"{x} overlaps {other}"


def test_ray_errors_come_back_as_in_serial(ray_executor: RayExecutor) -> None:
    outcomes = sorted(ray_executor.run(ERROR_TASKS), key=lambda o: o.task.key)
    _check_errors(outcomes)


def test_ray_gpu_task_without_gpu_fails_at_once(ray_executor: RayExecutor) -> None:
    [o] = ray_executor.run([Task("trt/r1", double, (1,), gpu=True)])
    assert o.value is None
    assert o.error is not None
    assert o.error["kind"] == "user"
    assert o.error["message"] == "task 'trt/r1' needs a GPU but the Ray cluster has none"


def test_ray_worker_death_is_a_bug_outcome(ray_executor: RayExecutor) -> None:
    outcomes = {o.task.key: o for o in ray_executor.run([Task("crash", crash), Task("ok", double, (2,))])}
    assert outcomes["ok"].value == {"x": 2, "double": 4}
    error = outcomes["crash"].error
    assert error is not None
    assert error["kind"] == "bug"
    assert error["type"] == "WorkerCrashedError"
    assert error["message"].startswith("Ray could not run the task: WorkerCrashedError: ")
    assert outcomes["crash"].where == {"node": None, "host": None, "pid": None}


def test_ray_executor_leaves_the_callers_ray_running(ray_executor: RayExecutor) -> None:
    import ray

    other = make_executor("ray", workers=7)  # Ray is initialized: used as is, workers ignored
    assert isinstance(other, RayExecutor)
    assert other.describe()["cpus"] == 2.0
    assert [o.value for o in other.run([Task("a", double, (5,))])] == [{"x": 5, "double": 10}]
    other.close()
    assert ray.is_initialized()
