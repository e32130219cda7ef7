"""``compress search``: the fastest (or smallest) model that meets a fidelity target, over depth x precision x sparsity.

A pipeline config with a ``search`` section (:class:`~compress.search.space.SearchSection`)
spans candidates: blocks removed, selection rule, healing, precision pass, 2:4 method. The
search measures cheaply first and builds only what can still win:

1. export and calibration, as ``compress run`` does (the same stage folders);
2. round 1: every pruned model (one prune stage per depth, verified on held-out batches), each
   precision/sparsity setting on the unpruned model, the original's per-block CPU time, and the
   original's latency; round 2: the latency of those settings;
3. then, round after round: predict every remaining candidate
   (:mod:`compress.search.predict`), skip those that cannot meet the target or beat the best
   measured one (each skip recorded with its reason), build and time the best-predicted few
   (as many as the executor has workers), until none is left.

``exhaustive: true`` builds every candidate (the reference the prediction is tested against).
Candidates run as tasks of :mod:`compress.search.execute` (Ray when installed, else serially
here); latency is measured one task per device at a time. Every task writes a content-hashed
stage folder under ``OUT/search/``, so shared prefixes run once and a re-run (or a resumed,
interrupted search) redoes nothing finished. The winner's files go to ``OUT/best/`` with
``latency.json`` holding the comparison with the original; the pipeline's ``gates`` are
evaluated on it. ``OUT/search.json`` (schema :data:`SEARCH_SCHEMA`), ``search.md`` and
``search.png`` report every candidate.

One module of ~610 lines on purpose: two thirds of it is :class:`_Search`, the state of one
search (the candidate records, the executor, the stage folders, the measured numbers the
predictions read) and the rounds that change it; split over files, every method would
take and return that state. Prediction, the search space, task execution and rendering
live in their own modules (``predict``, ``space``, ``execute``/``tasks``,
:mod:`compress.reports.search`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from compress.build import TARGET_EXIT_CODE, compare
from compress.build.config import BuildConfig
from compress.config import read_section
from compress.errors import ConfigError
from compress.gates import GateResult, evaluate_gates, gate_entries
from compress.log import logger, progress
from compress.onnx_io import (
    atomic_folder,
    has_external_data,
    load_model,
    model_nbytes,
    read_json,
    save_model,
    write_json,
    write_text,
)
from compress.pipeline import check_dependencies, prepare_output, read_previous
from compress.pipeline.cache import Artifact, Digests, Run, hash_json
from compress.pipeline.config import PipelineConfig, read_config_file
from compress.pipeline.source import README_HINT
from compress.pipeline.stages import calib_stage, export_stage, load_with_blocks
from compress.search.execute import Executor, Outcome, Task, make_executor
from compress.search.predict import Depth, Numbers, best_measured, order_key, predict, skip_reason
from compress.search.space import Candidate, SearchSection, candidates
from compress.search.tasks import (
    artifact_of,
    bench_task,
    build_task,
    confirm_task,
    cost_task,
    prune_task,
    runoff_task,
)

#: Version of the ``search.json`` layout.
SEARCH_SCHEMA = 1
#: Exit code when no candidate meets the fidelity target (that of a pass that cannot meet its target).
NO_WINNER_EXIT_CODE = TARGET_EXIT_CODE
#: Entries of a search output folder (an earlier search's are updated in place).
_FOLDERS = ("export", "calib", "search", "best")
_FILES = ("search.json", "search.md", "search.png")
#: Near-tied contenders re-timed side by side at the end (:meth:`_Search._runoff`): at most this many ...
RUNOFF_MAX = 4
#: ... each timed this many times, alternating.
RUNOFF_ROUNDS = 3
#: ``prune`` keys the search sets itself, per candidate.
_AMOUNTS = ("remove", "ratio", "max_drop", "select", "heal")


@dataclass(frozen=True)
class SearchConfig:
    """A pipeline config (its ``prune`` section holds the base prune options) and its ``search`` section."""

    pipeline: PipelineConfig
    search: SearchSection


def load_search_config(path: str | os.PathLike[str]) -> SearchConfig:
    """Read a pipeline config with a ``search`` section.

    The ``prune`` section is optional and gives the options every pruned candidate shares
    (``metric``, ``keep``, ...); the search sets ``remove``, ``select`` and ``heal`` itself.

    Raises:
        ConfigError: no ``search`` section, a ``prune`` key the search sets, a bad key, or
            int8 / data-driven 2:4 with random calibration.
    """
    p = Path(path)
    data = read_config_file(p)
    source = str(p)
    if not isinstance(data, Mapping) or data.get("search") is None:
        raise ConfigError(f"{source}: no 'search' section: nothing to search",
                          hint="add e.g. search: {remove: [0, 2, 4], precision: [fp32, int8]} (deploy/README.md), "
                               "or run the pipeline with compress run")
    rest = {k: v for k, v in data.items() if k != "search"}
    prune = rest.get("prune") or {}
    if isinstance(prune, Mapping):
        given = next((k for k in _AMOUNTS if k in prune), None)
        if given is not None:
            raise ConfigError(f"{source}: prune.{given}: the search sets it per candidate (search.remove, search.select, "
                              "search.heal)", hint=f"remove prune.{given}; list the values to try under search:")
        rest["prune"] = {**prune, "remove": 0}
    pipeline = PipelineConfig.from_mapping(rest, source=source, base=p.resolve().parent, name=p.stem)
    search: SearchSection = read_section(SearchSection, data["search"], source=source, section="search", hint=README_HINT)
    if pipeline.calibration.random is not None:
        needs = [v for v in (*search.precision, *search.sparsity) if v in ("int8", "wanda", "sparsegpt")]
        if needs:
            raise ConfigError(f"{source}: search: {needs[0]} needs real calibration data, not calibration.random",
                              hint="use calibration npz, text or images")
    return SearchConfig(pipeline, search)


@dataclass(frozen=True)
class SearchResult:
    """The outcome of :func:`run_search`: ``search.json`` as data, the winner's gates and the exit code."""

    report: dict[str, Any]
    gates: tuple[GateResult, ...]

    @property
    def winner(self) -> str | None:
        """The chosen candidate's name, or None."""
        return self.report.get("winner")

    @property
    def exit_code(self) -> int:
        """0; a failed gate's code; or :data:`NO_WINNER_EXIT_CODE` when no candidate meets the target."""
        failed = [g for g in self.gates if not g.passed]
        if failed:
            return failed[0].exit_code
        if self.winner is None and self.report["goal"] != "pareto":
            return NO_WINNER_EXIT_CODE
        return 0


def _search_entry(entry: Path) -> bool:
    if entry.name in _FILES:
        return entry.is_file()
    if entry.name in _FOLDERS:
        return entry.is_dir()
    return entry.name.startswith(".") and entry.name[1:].split(".")[0] in _FOLDERS


def run_search(config: SearchConfig, out: str | os.PathLike[str], *, force: bool = False,
               executor: Executor | None = None) -> SearchResult:
    """Search ``config``'s space into ``out`` and write the reports (see the module docstring).

    ``executor``: where tasks run (default: :func:`~compress.search.execute.make_executor` from
    the ``search`` section, closed at the end). ``force`` re-runs every stage.

    Raises:
        CompressError: from export or calibration, or a ``search.remove`` above the number of
            removable blocks. A failing candidate does not raise: it is recorded.
    """
    from compress.outputs import locked_folder

    pc, sc = config.pipeline, config.search
    check_dependencies(pc)
    path = prepare_output(out, pc, replaceable=_search_entry, what="an earlier 'compress search' output")
    with locked_folder(path):
        own = executor is None
        ex = executor or make_executor(sc.executor, address=sc.ray_address, workers=sc.workers)
        try:
            return _Search(config, path, force, ex).run()
        finally:
            if own:
                ex.close()


def _build_config(base: BuildConfig, c: Candidate, pass_target: float) -> BuildConfig:
    """``base`` with the candidate's passes; the passes' own fidelity target is ``pass_target`` (None stays None)."""
    return replace(base, precision=c.precision, sparsity=None if c.sparsity == "none" else "2:4",
                   sparsity_method=base.sparsity_method if c.sparsity == "none" else c.sparsity,
                   target_fidelity=None if base.target_fidelity is None else pass_target)


class _Search:
    """The state of one search: every candidate's record, the measurements so far, and the rounds."""

    def __init__(self, config: SearchConfig, out: Path, force: bool, executor: Executor) -> None:
        self.pc, self.sc = config.pipeline, config.search
        self.out, self.executor = out, executor
        self.run_ = Run(self.pc, out, force, Digests())
        self.candidates = candidates(self.sc)
        self.records: dict[str, dict[str, Any]] = {c.name: _new_record(c) for c in self.candidates}
        self.depths: dict[str, Depth] = {}
        self.depth_artifacts: dict[str, Artifact] = {}
        self.depth_removed: dict[str, list[int]] = {}
        self.built: dict[str, Artifact] = {}
        self.fidelity: dict[str, dict[str, Any]] = {}
        self.cost: dict[str, Any] | None = None
        self.calib_hash: str | None = None
        self.original: Artifact | None = None
        self.ran: dict[str, list[str]] = {}
        self.start = time.perf_counter()

    # ------------------------------------------------------------------ the rounds

    def run(self) -> SearchResult:
        pc, sc = self.pc, self.sc
        previous = read_previous(pc)
        _, original = export_stage(self.run_)
        model, block_map = load_with_blocks(original, spec=pc.model.blocks if pc.model.source.kind == "onnx" else None)
        calib_run, _ = calib_stage(self.run_, original, model)
        self.original, self.calib_hash = original, calib_run.hash
        free = sum(1 for b in block_map.blocks if b.removable and b.index not in set(pc.prune.keep if pc.prune else ()))
        too_many = [k for k in sc.remove if k > free]
        if too_many:
            raise ConfigError(f"{pc.source}: search.remove: {too_many[0]} blocks asked for, but only {free} of the "
                              f"{len(block_map.blocks)} blocks can be removed",
                              hint=f"list counts up to {free} (compress inspect lists the blocks)")
        self.depths["r0"] = Depth(0.0, float(model_nbytes(model)), 0.0)
        self.depth_artifacts["r0"] = original
        self.depth_removed["r0"] = []
        del model
        for sub in ("prune", "build", "bench"):
            (self.out / "search" / sub).mkdir(parents=True, exist_ok=True)
        logger.info("search: %d candidates (%s)", len(self.candidates), self.executor.kind)
        self._round1()
        self._rounds()
        return self._finish(previous)

    def _round1(self) -> None:
        """Every pruned model, the passes on the unpruned model, the original's block cost and latency."""
        assert self.original is not None
        assert self.pc.prune is not None
        base = replace(self.pc.prune, latency=None)
        tasks: list[Task] = []
        seen: set[str] = set()
        for c in self.candidates:
            if c.remove and c.depth not in seen:
                seen.add(c.depth)
                section = replace(base, remove=c.remove, select=c.select, heal=c.heal)
                tasks.append(Task(f"prune/{c.depth}", prune_task,
                                  (self.run_, self.original, section, f"search/prune/{c.depth}", self.calib_hash)))
        refs = [c for c in self.candidates if c.remove == 0]
        tasks += [self._build(c) for c in refs if c.has_passes]
        spec = self.pc.model.blocks if self.pc.model.source.kind == "onnx" else None
        tasks.append(Task("cost", cost_task, (self.run_, self.original, spec, self.calib_hash), exclusive=True))
        fp32 = next(c for c in refs if not c.has_passes) if any(not c.has_passes for c in refs) else None
        if fp32 is not None:
            self.records[fp32.name].update(status="built")
            self.fidelity[fp32.name] = {"cosine": 1.0, "loss": 0.0, "note": "the original model"}
            self.records[fp32.name]["measured"] = {"fidelity": 1.0, "size_bytes": int(self.depths["r0"].size_bytes)}
            tasks.append(self._bench(fp32, self.original))
        self._execute(tasks, "search: round 1")
        self._execute([self._bench(c, self.built[c.name]) for c in refs if c.has_passes and c.name in self.built],
                      "search: round 2")

    def _rounds(self) -> None:
        width = len(self.candidates) if self.sc.exhaustive else max(1, int(self.executor.describe().get("cpus") or 1))
        n = 2
        while True:
            pending = [c for c in self.candidates if self.records[c.name]["status"] == "pending"]
            for c in pending:
                if not c.has_passes and c.depth in self.depths:  # the pruned model itself: measured by its prune stage
                    self._pruned_only(c)
            pending = [c for c in pending if self.records[c.name]["status"] == "pending"]
            if not pending:
                return
            preds = {c.name: self._predict(c) for c in pending}
            for c in pending:
                self.records[c.name]["predicted"] = _numbers(preds[c.name])
            best = None if self.sc.goal == "pareto" else best_measured(self._measured(), goal=self.sc.goal,
                                                                       target=self.sc.target_fidelity)
            ready = []
            for c in pending:
                ref = self.records.get(f"r0-{c.passes}")
                depth = self.depths.get(c.depth)
                if (self.sc.goal != "pareto" and c.has_passes and depth is not None
                        and 1.0 - depth.loss < self.sc.target_fidelity):
                    self.records[c.name].update(status="skipped", reason=(
                        f"its pruned model {c.depth} alone has fidelity {1.0 - depth.loss:.5f} < target "
                        f"{self.sc.target_fidelity:g}: no pass brings it back"))
                    continue
                if not self.sc.exhaustive and c.has_passes and ref is not None and ref["status"] == "failed":
                    self.records[c.name].update(status="skipped", reason=f"its passes failed on the unpruned model "
                                                                          f"({ref['name']}: {ref['reason']})")
                    continue
                reason = None if self.sc.exhaustive else skip_reason(
                    preds[c.name], self.sc, best=best, measured=list(self._measured().items()))
                if reason is not None:
                    self.records[c.name].update(status="skipped", reason=reason)
                else:
                    ready.append(c)
            ready.sort(key=lambda c: order_key(preds[c.name], self.sc.goal, c.name))
            batch = ready[:width]
            if not batch:
                return
            n += 1
            logger.info("search: round %d: %s", n, ", ".join(c.name for c in batch))
            self._execute([self._build(c) for c in batch if c.has_passes], f"search: round {n} (passes)")
            to_time = []
            for c in batch:
                rec = self.records[c.name]
                if not c.has_passes:
                    rec["status"] = "built"
                if rec["status"] != "built":
                    continue
                fid = rec["measured"]["fidelity"]
                if self.sc.goal == "pareto" or fid >= self.sc.target_fidelity:
                    to_time.append(self._bench(c, self.built.get(c.name) or self.depth_artifacts[c.depth]))
                else:
                    self._below_target(c)
            self._execute(to_time, f"search: round {n} (latency)")

    def _pruned_only(self, c: Candidate) -> None:
        """A candidate without passes is its pruned model: its fidelity and size are the prune stage's."""
        rec = self.records[c.name]
        if rec["measured"] is not None:
            return
        depth = self.depths[c.depth]
        self.fidelity[c.name] = self.fidelity.get(c.depth) or {}
        rec["measured"] = {"fidelity": 1.0 - depth.loss, "size_bytes": int(depth.size_bytes)}
        if self.sc.goal != "pareto" and 1.0 - depth.loss < self.sc.target_fidelity:
            self._below_target(c)

    def _below_target(self, c: Candidate) -> None:
        rec = self.records[c.name]
        fid = rec["measured"]["fidelity"]
        rec.update(status="measured", meets_target=False,
                   reason=f"measured fidelity {fid:.5f} < target {self.sc.target_fidelity:g}: not timed")

    # ------------------------------------------------------------------ tasks and their outcomes

    def _build(self, c: Candidate) -> Task:
        assert self.original is not None
        remaining = (1.0 - self.sc.target_fidelity) - self.depths[c.depth].loss
        target = min(1.0 - max(remaining, 0.0), 0.9999)  # the passes may lose what pruning left of the budget
        config = _build_config(self.pc.build, c, target)
        return Task(f"build/{c.name}", build_task, (self.run_, self.depth_artifacts[c.depth], self.original, config,
                                                   f"search/build/{c.name}", self.calib_hash))

    def _bench(self, c: Candidate, model: Artifact) -> Task:
        config = _build_config(self.pc.build, c, self.sc.target_fidelity)
        return Task(f"bench/{c.name}", bench_task, (self.run_, model, config, f"search/bench/{c.name}", self.calib_hash),
                    exclusive=True, gpu=self.pc.build.backend == "trt")

    def _execute(self, tasks: list[Task], desc: str) -> None:
        if not tasks:
            return
        for outcome in progress(self.executor.run(tasks), desc=desc, total=len(tasks)):
            self._apply(outcome)

    def _apply(self, o: Outcome) -> None:
        kind, _, name = o.task.key.partition("/")
        if o.error is not None:
            message = o.error["message"] + (" (a bug in compress)" if o.error.get("kind") == "bug" else "")
            logger.warning("search: %s failed: %s", o.task.key, message)
            if kind == "cost":
                self.cost = {"model_ms": None, "block_ms": {}}
                return
            affected = [c for c in self.candidates if c.depth == name] if kind == "prune" else [self._cand(name)]
            for c in affected:
                self.records[c.name].update(status="failed", reason=f"{kind}: {message}")
                self._note(c.name, o)
            return
        value = o.value or {}
        if kind == "cost":
            self.cost = value
            self._share()
            return
        if kind == "prune":
            self.depth_artifacts[name] = artifact_of(value["artifact"])
            self.depth_removed[name] = list(value["removed"])
            self.depths[name] = Depth(float(value["loss"]), float(value["size_bytes"]), None)
            self.fidelity[name] = read_json(self.out / "search" / "prune" / name / "prune.json",
                                            what="prune report")["fidelity"]
            self._share()
            for c in self.candidates:
                if c.depth == name:
                    self._note(c.name, o)
            return
        c = self._cand(name)
        rec = self.records[c.name]
        self._note(c.name, o)
        if kind == "build":
            self.built[c.name] = artifact_of(value["artifact"])
            self.fidelity[c.name] = read_json(self.out / "search" / "build" / c.name / "measure.json",
                                              what="candidate measurement")["fidelity"]
            rec.update(status="built", measured={"fidelity": 1.0 - float(value["loss"]),
                                                 "size_bytes": int(value["size_bytes"])})
        elif kind == "bench":
            fid = rec["measured"]["fidelity"]
            rec["measured"].update(median_ms=value["median_ms"], p99_ms=value["p99_ms"])
            rec.update(status="measured", meets_target=fid >= self.sc.target_fidelity,
                       where={"node": o.where.get("node"), "host": o.where.get("host"), "device": value["device"]})

    def _note(self, name: str, o: Outcome) -> None:
        """Record the task's stage status and time in the candidate's record."""
        rec = self.records[name]
        status = (o.value or {}).get("stage")
        self.ran.setdefault(name, []).append(status or "failed")
        rec["stage"] = "ran" if any(s != "skipped (unchanged)" for s in self.ran[name]) else "skipped (unchanged)"
        rec["seconds"] = round((rec["seconds"] or 0.0) + o.seconds, 3)

    def _share(self) -> None:
        """Fill each pruned model's share of the original's time, once both the cost and its prune are known."""
        if self.cost is None:
            return
        total = self.cost.get("model_ms")
        block_ms = self.cost.get("block_ms") or {}
        for d, depth in self.depths.items():
            if d == "r0" or depth.removed_share is not None:
                continue
            removed = [block_ms.get(str(i)) for i in self.depth_removed.get(d, [])]
            share = None if not total or any(v is None for v in removed) else sum(removed) / total  # type: ignore[arg-type]
            self.depths[d] = replace(depth, removed_share=share)

    def _cand(self, name: str) -> Candidate:
        return next(c for c in self.candidates if c.name == name)

    def _measured(self) -> dict[str, Numbers]:
        """The candidates measured so far (fidelity and, when timed, latency)."""
        out = {}
        for name, rec in self.records.items():
            m = rec["measured"]
            if rec["status"] == "measured" and m is not None:
                out[name] = Numbers(m.get("fidelity"), m.get("median_ms"), m.get("p99_ms"), m.get("size_bytes"))
        return out

    def _predict(self, c: Candidate) -> Numbers:
        ref = self.records.get(f"r0-{c.passes}")
        depth = self.depths.get(c.depth)
        original = self.records.get("r0-fp32")
        if ref is None or depth is None or ref["status"] != "measured":
            return Numbers(None if depth is None else 1.0 - depth.loss if not c.has_passes else None)
        om = (original or {}).get("measured") or {}
        o = Numbers(1.0, om.get("median_ms"), om.get("p99_ms"), om.get("size_bytes") or self.depths["r0"].size_bytes)
        r = ref["measured"]
        return predict(c, depth=depth, reference=Numbers(r.get("fidelity"), r.get("median_ms"), r.get("p99_ms"),
                                                         r.get("size_bytes")), original=o)

    # ------------------------------------------------------------------ the answer

    def _finish(self, previous: Mapping[str, Any] | None) -> SearchResult:
        from compress.prune.sweep import pareto_front
        from compress.reports.search import write_search_files

        sc = self.sc
        for rec in self.records.values():
            if rec["status"] in ("pending", "built"):  # never reached (a later round skipped it), or built, not timed
                rec.update(status="skipped", reason=rec["reason"] or "not reached")
        measured = self._measured()
        timed = [n for n, m in measured.items() if m.median_ms is not None]
        for i in pareto_front([(measured[n].median_ms, 1.0 - (measured[n].fidelity or 0.0)) for n in timed]):
            self.records[timed[i]]["front"] = True
        best = best_measured(measured, goal=sc.goal if sc.goal != "pareto" else "median", target=sc.target_fidelity)
        winner = best[0] if best is not None else None
        runoff = self._runoff(measured, best) if best is not None else None
        if runoff is not None:
            winner = runoff["winner"]
        gates: tuple[GateResult, ...] = ()
        confirmation = None
        if winner is not None:
            self.records[winner]["chosen"] = True
            confirmation = self._confirm(self._cand(winner))
            latency = self._write_best(self._cand(winner))
            gates = tuple(evaluate_gates(latency, self.pc.gates, previous=previous))
        elif (self.out / "best").is_dir():
            shutil.rmtree(self.out / "best")  # an earlier search's winner is not this one's
        baseline = (self.records.get("r0-fp32") or {}).get("measured") or {}
        for rec in self.records.values():
            m = rec["measured"]
            if m is not None and m.get("median_ms") and baseline.get("median_ms"):
                m["speedup"] = baseline["median_ms"] / m["median_ms"]
        records = list(self.records.values())
        report = {
            "schema_version": SEARCH_SCHEMA, "goal": sc.goal, "target_fidelity": sc.target_fidelity,
            "space": sc.space(), "exhaustive": sc.exhaustive, "executor": self.executor.describe(),
            "counts": {"candidates": len(records),
                       "built": sum(1 for r in records if r["status"] == "measured"),
                       "skipped": sum(1 for r in records if r["status"] == "skipped"),
                       "failed": sum(1 for r in records if r["status"] == "failed"),
                       "resumed": sum(1 for r in records if r["stage"] == "skipped (unchanged)")},
            "baseline": {k: baseline.get(k) for k in ("median_ms", "p99_ms", "size_bytes")},
            "candidates": records, "winner": winner, "runoff": runoff, "confirmation": confirmation,
            "gates": gate_entries(gates),
            "seconds": round(time.perf_counter() - self.start, 3),
        }
        write_search_files(self.out, report)
        logger.info("search: %s", f"winner {winner}" if winner else "no candidate meets the target")
        return SearchResult(report, gates)

    def _runoff(self, measured: Mapping[str, Numbers], best: tuple[str, float]) -> dict[str, Any] | None:
        """Re-time the near-tied candidates side by side and pick the winner from that; None when there is no tie.

        Contenders: the measured candidates that meet the target with a median within
        ``latency_margin`` of the best (at most :data:`RUNOFF_MAX`, closest first), latency
        goals and ONNX Runtime only. Each is timed :data:`RUNOFF_ROUNDS` times, alternating
        (:func:`~compress.search.tasks.runoff_task`). The fastest by the median of its rounds
        wins, unless a more faithful contender is within the measurement's own spread of it
        (the larger of the two contenders' spreads, at least 2 %): then the more faithful wins.
        """
        sc = self.sc
        if sc.goal not in ("median", "p99", "pareto") or self.pc.build.backend != "ort":
            return None
        near = sorted((m.median_ms, n) for n, m in measured.items()
                      if m.fidelity is not None and m.fidelity >= sc.target_fidelity and m.median_ms is not None
                      and m.median_ms <= best[1] * (1 + sc.latency_margin))
        names = [n for _, n in near[:RUNOFF_MAX]]
        if len(names) < 2:
            return None
        models = [(n, self.built.get(n) or self.depth_artifacts[self._cand(n).depth]) for n in names]
        config = _build_config(self.pc.build, self._cand(names[0]), sc.target_fidelity)
        (self.out / "search" / "runoff").mkdir(parents=True, exist_ok=True)
        key = "-".join(sorted(names))
        task = Task("runoff/" + key, runoff_task, (self.run_, models, config, RUNOFF_ROUNDS,
                                                   f"search/runoff/{hash_json(key)[:12]}", self.calib_hash),
                    exclusive=True)
        outcome = next(iter(self.executor.run([task])))
        if outcome.error is not None:
            logger.warning("search: the runoff of %s failed: %s", ", ".join(names), outcome.error["message"])
            return None
        times = (outcome.value or {})["models"]
        fastest = min(names, key=lambda n: (times[n]["median_ms"], n))
        winner, tie = fastest, False
        for n in names:
            if n == fastest or (measured[n].fidelity or 0) <= (measured[winner].fidelity or 0):
                continue
            noise = max(times[n]["spread"] or 0, times[fastest]["spread"] or 0, 0.02)
            if times[n]["median_ms"] <= times[fastest]["median_ms"] * (1 + noise):
                winner, tie = n, True
        logger.info("search: runoff of %s: %s", ", ".join(names), winner)
        return {"contenders": names, "rounds": RUNOFF_ROUNDS, "times": times, "fastest": fastest, "winner": winner,
                "tie_broken_by_fidelity": tie}

    def _confirm(self, c: Candidate) -> dict[str, Any] | None:
        """Time the winner and the original back to back (one exclusive task); None for the original itself or on failure."""
        if c.name == "r0-fp32":
            return None
        assert self.original is not None
        model = self.built.get(c.name) or self.depth_artifacts[c.depth]
        config = _build_config(self.pc.build, c, self.sc.target_fidelity)
        task = Task(f"confirm/{c.name}", confirm_task, (self.run_, model, self.original, config,
                                                       f"search/confirm/{c.name}", self.calib_hash),
                    exclusive=True, gpu=self.pc.build.backend == "trt")
        (self.out / "search" / "confirm").mkdir(parents=True, exist_ok=True)
        outcome = next(iter(self.executor.run([task])))
        if outcome.error is not None:
            logger.warning("search: timing %s against the original failed: %s", c.name, outcome.error["message"])
            return None
        value = dict(outcome.value or {})
        self.records[c.name]["confirmed_speedup"] = value["speedup_median"]
        return {"candidate": c.name, **{k: value[k] for k in ("median_ms", "baseline_median_ms", "speedup_median",
                                                               "device")},
                "where": {"node": outcome.where.get("node"), "host": outcome.where.get("host")}}

    def _write_best(self, c: Candidate) -> dict[str, Any]:
        """Copy the winner's model and reports to ``OUT/best``; returns its ``latency.json`` with the comparison.

        The comparison is the back-to-back one of :meth:`_confirm` where it ran; for the
        original itself, its own measurement (speedup 1).
        """
        model = self.built.get(c.name) or self.depth_artifacts[c.depth]
        bench = self.out / "search" / "bench" / c.name
        confirmed = self.out / "search" / "confirm" / c.name / "latency.json"
        if confirmed.is_file() and c.name != "r0-fp32":
            latency = read_json(confirmed, what="latency report")
        else:
            latency = read_json(bench / "latency.json", what="latency report")
            base = latency["candidate"]
            latency["baseline"] = {**base, "model": f"{self.pc.name} (original)"}
            latency["comparison"] = {**compare(latency["candidate"], base), "fidelity": self.fidelity.get(c.name)}
        with atomic_folder(self.out / "best") as tmp:
            written = load_model(model.path)  # saved, not copied: external data is renamed with the model
            save_model(written, tmp / "model.onnx", external_data=has_external_data(written) or None)
            del written
            if not c.has_passes and model.blocks is not None and model.blocks.is_file():
                shutil.copyfile(model.blocks, tmp / "model.blocks.json")
            passes = model.path.parent / "passes.json"
            if c.has_passes and passes.is_file():
                shutil.copyfile(passes, tmp / "passes.json")
            for name in ("latency.md", "trtexec.sh", "engine.plan", "engine.json"):
                if (bench / name).is_file():
                    shutil.copyfile(bench / name, tmp / name)
            write_json(tmp / "latency.json", latency)
            write_json(tmp / "candidate.json", self.records[c.name])
            write_text(tmp / "README.md", f"# {c.name}\n\nThe winner of `compress search` ({self.sc.goal}, target "
                                          f"fidelity {self.sc.target_fidelity:g}); search.md lists every candidate.\n")
        return latency


def _new_record(c: Candidate) -> dict[str, Any]:
    return {"name": c.name, "settings": c.settings(), "status": "pending", "reason": None,
            "predicted": {"fidelity": None, "median_ms": None, "size_bytes": None}, "measured": None,
            "meets_target": None, "front": False, "chosen": False, "where": None, "stage": None, "seconds": None}


def _numbers(n: Numbers) -> dict[str, Any]:
    return {"fidelity": n.fidelity, "median_ms": n.median_ms, "p99_ms": n.p99_ms, "size_bytes": n.size_bytes}


__all__ = ["NO_WINNER_EXIT_CODE", "SEARCH_SCHEMA", "Candidate", "SearchConfig", "SearchResult", "SearchSection",
           "candidates", "load_search_config", "run_search"]
