"""Every benchmark script runs (a benchmark that does not run is a defect): once each, on tiny
models and inputs. What they measure is read from their tables, not asserted here."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
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
