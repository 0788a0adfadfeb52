"""Every benchmark script runs (a benchmark that does not run is a defect): once each, on tiny
models and inputs. What they measure is read from their tables, not asserted here; that each
table is there, whole, is.

real_cpu.py's full run (the PraNet data from ../shared, hours of training) has no tiny mode: its
planning and report run here, on a results file of made-up students."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import DATASETS, ROOT, SHARED

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


def _bench_run(mean: float, val: float, seconds: float = 100.0) -> dict:
    """One student of real-cpu.json, its scores made up (the report's arithmetic is what is tested)."""
    return {"mean": mean, "published": {"kvasir-seg": mean + 0.05, "cvc-clinicdb": mean, "cvc-colondb": mean - 0.05}, "best_val_meanDic": val,
            "best_epoch": 10, "epochs_run": 14, "train_seconds": seconds, "machine": "test", "settings": []}


def test_real_cpu_plans_on_val_and_reports_paired_differences(tmp_path, monkeypatch):
    """real_cpu.py's logic on a results file of made-up students (a copy of the script reads the
    real-cpu.json beside it): with two variants of a method, seeds 1 and 2 get the one with the
    best val meanDic on seed 0 (never the best test score); the equal-time arm is as many times
    longer as the slowest method is slower; the paired table's mean, std, t and gap share follow
    from the numbers."""
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "real_cpu.py", tmp_path / "benchmarks" / "real_cpu.py")
    sys.path.insert(0, str(tmp_path / "benchmarks"))
    try:
        import real_cpu
    finally:
        sys.path.pop(0)
    monkeypatch.setitem(real_cpu.GRID, "kd", {"kd-w1-t1": {"weight": 1.0}, "kd-w1-t4": {"weight": 1.0, "temperature": 4.0}})
    runs = {f"{name}-seed0": _bench_run(0.80, 0.85) for name in real_cpu.variants()}
    runs["kd-w1-t4-seed0"] = _bench_run(0.70, 0.90)  # best on val, worse on test: it is the one chosen
    teacher = {**_bench_run(0.90, 0.95, seconds=3600.0), "headroom": {"train": 0.97, "val": 0.95}, "note": "retrained"}
    speed = {"none": 3.0, "kd": 2.5, "sgm": 2.0, "kdas": 2.4}  # images/s: sgm is the slowest, 1.5x slower than none
    results = {"runs": runs, "teachers": {"ab" * 32: teacher}, "speed": {"images_per_s": speed, "machine": "test", "recipe": real_cpu.SPEED}}
    todo = [name for name, _ in real_cpu.plan(results) if name not in runs]
    assert "kd-w1-t4-seed1" in todo and "kd-w1-t1-seed1" not in todo and {"none-seed1", "none-seed2"} <= set(todo)
    eq = dict(s.split("=") for s in dict(real_cpu.plan(results))["none-equal-time-seed0"])
    assert eq["train.epochs"] == str(round(real_cpu.SCHEDULE["train.epochs"] * 1.5))
    for seed, kd in ((1, 0.83), (2, 0.84)):
        runs[f"none-seed{seed}"] = _bench_run(0.80 + 0.01 * seed, 0.85)
        runs[f"kd-w1-t4-seed{seed}"] = _bench_run(kd, 0.9)
    real_cpu.save(results)
    _run(str(tmp_path / "benchmarks" / "real_cpu.py"), "--report-only", cwd=tmp_path)
    table = (tmp_path / "benchmarks" / "results" / "real-cpu.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| kd-w1-t4 |") and "+" in line)
    # diffs -0.10, +0.02, +0.02: mean -0.02, std 0.0693, t -0.50; gap share -0.02 / (0.90 - 0.81)
    assert "-0.1000, +0.0200, +0.0200 | -0.0200 | 0.0693 | -0.50 |" in row and row.endswith("| -0.22 |")
    assert "| `abababab` | 0.9700 | 0.9500 | 0.9000 |" in table and "\n- `abababab`: retrained.\n" in table
    assert "sgm 2.00 (1.50x slower)" in table and "across loads): kd-w1-t1 7, kd-w1-t4 7," in table  # seconds per epoch: 100 over 14


def test_real_gpu_smoke_runs_its_three_arms_and_writes_its_table(tmp_path):
    """The GPU script's own code on the CPU (tiny data and models): it cannot rot unseen."""
    out = _run("benchmarks/real_gpu.py", str(tmp_path / "gpu"), "--smoke")
    table = (tmp_path / "gpu" / "gpu.md").read_text()
    assert out.strip() == table.strip() and all(f"| {arm} |" in table for arm in ("teacher", "student", "distilled"))
    for arm in ("teacher", "student", "distilled"):
        assert (tmp_path / "gpu" / arm / "best.pt").exists()


@pytest.mark.skipif(not DATASETS.is_dir(), reason=f"monitoring.py needs the real datasets in {DATASETS}")
def test_monitoring_benchmark_measures_separation_speed_and_the_frame_log():
    out = _run("benchmarks/monitoring.py", "--smoke")
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "score_mean" not in line]
    assert rows == ["kvasir-seg held out", "cvc-clinicdb", "cvc-colondb"]
    assert "on a folder of 8 frames" in out and "with the frame log off" in out
