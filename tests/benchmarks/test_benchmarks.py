"""Every benchmark script runs (a benchmark that does not run is a defect): once each, on tiny
models and inputs. What they measure is read from their tables, not asserted here; that each
table is there, whole, is.

real_cpu.py's full run (the PraNet data from ../shared, hours of training) has no tiny mode: its
--report-only half runs here, on a DVC repository of two made-up experiments."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import DATASETS, ROOT, SHARED, tool_environ

pytestmark = pytest.mark.slow


def _run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_bench_training_prints_the_epoch_beside_the_bare_model_and_its_phases():
    out = _run("benchmarks/bench_training.py", "--tiny", "--size", "64", "--batch", "2", "--steps", "2", "--bare-steps", "1",
               "--val-images", "2", "--settings", "student-kdas", "--workers", "0")
    row = next(line for line in out.splitlines() if line.startswith("| after | student-kdas | 0 |"))
    assert row.count("|") == 12
    phases = next(line for line in out.splitlines() if line.startswith("| after | student-kdas | 0 |") and line != row)
    assert all(float(cell.strip().rstrip("%")) >= 0 for cell in phases.split("|")[4:-1])


def test_bench_cuda_runs_its_variants_on_the_cpu():
    out = _run("benchmarks/bench_cuda.py", "--device", "cpu", "--tiny", "--size", "64", "--batch", "2", "--steps", "1",
               "--warmup-steps", "1", "--workers", "0", "--variants", "V3 this engine")
    assert "| teacher-none | V3 this engine |" in out and "| student-kdas | V3 this engine |" in out
    assert "paper recipe, teacher then KDAS student: V3 this engine" in out


def test_bench_inference_times_each_runtime_of_teacher_and_student():
    out = _run("benchmarks/bench_inference.py", "--tiny", "--size", "64", "--repeats", "1", "--calibration-images", "2",
               "--dice-images", "2", "--threads", "1")
    rows = [line.split()[:3] for line in out.splitlines() if line.startswith(("teacher ", "student "))]
    assert rows == [[model, runtime, "64"] for model in ("teacher", "student") for runtime in ("torch", "ort-fp32", "ort-int8")]


@pytest.mark.skipif(not (SHARED / "metric-vectors").is_dir() and not DATASETS.is_dir(),
                    reason=f"bench_metrics.py needs {SHARED / 'metric-vectors'} or {DATASETS}")
def test_bench_metrics_sets_the_vectorised_curves_beside_the_loop():
    out = _run("benchmarks/bench_metrics.py", "--real", "2", "--repeat", "1")
    sets = ("metric-vectors", "real, 8-bit", "real, float")
    parts = [(line[:15].strip(), line[15:].split()[0]) for line in out.splitlines() if line[:15].strip() in sets]
    assert parts and parts == [(name, part) for name in dict(parts) for part in ("curves", "all")]


def test_bench_serving_budget_serves_the_budgeted_model():
    out = _run("benchmarks/bench_serving_budget.py", "--skip-unbounded")
    rows = [line.rsplit(maxsplit=3) for line in out.splitlines() if line.startswith("budget (params.yaml)")]
    assert [(row[0].split(")", 1)[1].strip(), row[1]) for row in rows] == [
        ("50 x 4096^2 (the probe)", "400"), ("8 x 4096^2", "400"), ("2 x 320x240 frames", "200")]


def test_bench_suite_times_each_test_module():
    out = _run("benchmarks/bench_suite.py", "tests/test_io.py", "tests/test_config.py", "-n", "0")
    summary, *lines = out.splitlines()
    rows = {cells[0]: cells[1:] for cells in (line.strip("| ").split(" | ") for line in lines if line.startswith("| tests/"))}
    assert set(rows) == {"tests/test_io.py", "tests/test_config.py"}
    assert summary.startswith(f"{sum(int(cells[0]) for cells in rows.values())} passed in ") and "cores busy" in summary
    assert all(float(cells[2]) > 0 and cells[-1] == "main" for cells in rows.values())  # CPU seconds, in the one pytest process


# the `evaluate` stage of the repository below: the metrics files of a real run, their figures made up
FAKE_EVALUATE = textwrap.dedent("""\
    import json, pathlib, yaml
    distill = yaml.safe_load(open("params.yaml"))["distill"]
    dice = 0.5 + 0.01 * distill["seed"] + (0.02 if distill["method"] == "sgm" else 0.0)
    scores = {"meanDic": dice, "meanIoU": dice - 0.1, "wFm": dice - 0.05, "Sm": dice + 0.1, "mae": 0.05, "maxDic": dice + 0.01}
    report = {"published": {"kvasir-seg": scores, "mean": scores}, "datasets": {"kvasir-seg": {"meanDic": dice}, "mean": {"meanDic": dice}},
              "efficiency": {"params_m": 3.5, "gmacs": 1.2, "latency_ms": 20.0}}
    for role in ("student", "teacher"):
        pathlib.Path(f"reports/evaluate/{role}").mkdir(parents=True, exist_ok=True)
        pathlib.Path(f"reports/evaluate/{role}/metrics.json").write_text(json.dumps(report))
    pathlib.Path("models/student").mkdir(parents=True, exist_ok=True)
    pathlib.Path("models/student/metrics.json").write_text(json.dumps({"best_val_meanDic": dice, "best_epoch": 3, "epochs_run": 5,
                                                                       "train_seconds": 60.0}))
""")
FAKE_DAG = """\
stages:
  evaluate:
    cmd: python evaluate.py
    deps: [evaluate.py]
    params: [distill]
    metrics:
      - reports/evaluate/student/metrics.json: {cache: false}
      - reports/evaluate/teacher/metrics.json: {cache: false}
      - models/student/metrics.json: {cache: false}
"""


def test_real_cpu_report_only_rebuilds_its_table_from_the_dvc_experiments(tmp_path):
    """A copy of the script (it reads the experiments of, and writes its table into, the
    repository it lies in) in a git + DVC repository of two experiments, `dvc exp run -n
    real-cpu-{none,sgm}-seed0`, as the full run names them."""
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "real_cpu.py", tmp_path / "benchmarks" / "real_cpu.py")
    (tmp_path / "evaluate.py").write_text(FAKE_EVALUATE)
    (tmp_path / "dvc.yaml").write_text(FAKE_DAG)
    (tmp_path / "params.yaml").write_text("distill:\n  method: none\n  seed: 0\n")
    env = {**tool_environ(), **{f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
                                for what, value in (("NAME", "kdas"), ("EMAIL", "kdas@example.org"))}}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "baseline"],
                *([sys.executable, "-m", "dvc", "exp", "run", "-q", "-n", f"real-cpu-{method}-seed0", "-S", f"distill.method={method}",
                   "-S", "distill.seed=0"] for method in ("none", "sgm"))):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    out = _run("benchmarks/real_cpu.py", "--report-only", "--seeds", "0", cwd=tmp_path, env=env)
    table = (tmp_path / "benchmarks" / "results" / "real-cpu.md").read_text()
    assert out.strip() == table.strip()
    assert "| sgm | +0.0200 | +0.0200 | - | 1 |" in table  # the paired difference, sgm - none on seed 0
    for name, dice in (("real-cpu-none-seed0", "0.5000"), ("real-cpu-sgm-seed0", "0.5200")):
        assert f"| {name} | kvasir-seg | {dice} |" in table
