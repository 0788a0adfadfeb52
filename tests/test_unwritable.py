"""An output that cannot be written (a read-only folder or disk) is one line naming it, never
a traceback: `train --out`, `evaluate --out`, `data synth --out`, `data manifest --out`
(issue 32, low 11). The folder is a read-only tmpfs: as root, permission bits do not stop a
write, a read-only mount does (EROFS)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import MLFLOW_QUIET, tiny_teacher_project, tool_environ


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def kdas(*args: str) -> subprocess.CompletedProcess:
    """The real command line, in its own process: the traceback a user would see goes to its stderr."""
    return subprocess.run([sys.executable, "-m", "kdas", *args], env={**tool_environ(), **MLFLOW_QUIET}, capture_output=True,
                          text=True, timeout=300)


def assert_one_line(result: subprocess.CompletedProcess, named: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cannot write" in errors[0] and named in errors[0], result.stderr
    assert ".tmp" not in errors[0], errors[0]  # the output's name, not the temporary's


@pytest.mark.parametrize("out", ["ro", "ro/new"], ids=["the folder", "a folder inside"])
def test_synth_and_manifest_into_a_read_only_folder(workdir: Path, read_only: Path, out: str) -> None:
    assert_one_line(kdas("data", "synth", "--out", out), out)
    assert kdas("data", "synth").returncode == 0
    assert_one_line(kdas("data", "manifest", "--out", f"{out}/manifest.parquet"), f"{out}/manifest.parquet" if out == "ro" else out)


@pytest.mark.slow
def test_train_and_evaluate_into_a_read_only_folder(mlflow_store: Path, workdir: Path, read_only: Path) -> None:
    tiny_teacher_project(workdir, epochs=1)
    for out in ("ro", "ro/new"):
        assert_one_line(kdas("train", "teacher", "--out", out), out)
    assert kdas("train", "teacher").returncode == 0
    for out in ("ro", "ro/new"):
        assert_one_line(kdas("evaluate", "--role", "teacher", "--out", out), out)
