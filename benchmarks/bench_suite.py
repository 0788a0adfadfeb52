"""Where the test suite's time goes: per test module, its wall time and its CPU time (the
pytest process that ran it and every process it started and waited for: stages, servers,
DVC), beside the whole run's, on this machine.

The suite is CPU-bound here (its end-to-end tests start many processes, each importing torch,
timm and MLflow): the run's CPU seconds over the cores, not any one module, set its wall time.

    python benchmarks/bench_suite.py                        # the full suite as README runs it (~9 min here)
    python benchmarks/bench_suite.py -m "not slow"          # any pytest arguments: the fast tier
    python benchmarks/bench_suite.py tests/test_io.py -n 0  # a smoke run of this script

Loaded into each pytest process as a plugin (`-p bench_suite`), this same file records its
modules; the script then prints their table.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD_ENV = "KDAS_BENCH_SUITE_DIR"  # where each pytest process writes its modules' times


def cpu_seconds() -> float:
    """This process's CPU time and that of every child it has waited for (theirs included)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# --------------------------------------------------------------------------- the plugin, in each pytest process


class _Recorder:
    """Wall and CPU time per module. With pytest-xdist's --dist loadfile (pyproject.toml) a
    module runs whole on one worker, its fixtures torn down before the next module starts."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self.modules: dict[str, dict[str, float]] = {}
        self.current: str | None = None
        self.wall = self.cpu = 0.0

    def _close(self) -> None:
        if self.current is not None:
            row = self.modules[self.current]
            row["wall_s"] += time.monotonic() - self.wall
            row["cpu_s"] += cpu_seconds() - self.cpu

    def pytest_runtest_protocol(self, item, nextitem) -> None:
        module = item.nodeid.split("::")[0]
        if module != self.current:
            self._close()
            self.current, self.wall, self.cpu = module, time.monotonic(), cpu_seconds()
        self.modules.setdefault(module, {"tests": 0, "wall_s": 0.0, "cpu_s": 0.0})["tests"] += 1

    def pytest_sessionfinish(self) -> None:
        self._close()
        self.current = None
        (Path(os.environ[RECORD_ENV]) / f"{self.worker}.json").write_text(json.dumps({"worker": self.worker, "modules": self.modules}))


def pytest_configure(config) -> None:
    if os.environ.get(RECORD_ENV):  # an xdist worker's id from its config (the environment may be a parent run's)
        worker = getattr(config, "workerinput", {}).get("workerid", "main")
        config.pluginmanager.register(_Recorder(worker), "bench_suite_recorder")


# --------------------------------------------------------------------------- the script


def table(records: list[dict], wall: float, cpu: float, summary: str) -> str:
    rows = sorted(((module, row, record["worker"]) for record in records for module, row in record["modules"].items()),
                  key=lambda r: -r[1]["cpu_s"])
    cores = os.cpu_count() or 1
    lines = [f"{summary} | {wall:.1f} s wall, {cpu:.0f} CPU-s: {cpu / wall:.2f} of {cores} cores busy on average", "",
             "| module | tests | wall s | CPU s | CPU share | worker |", "|---|---|---|---|---|---|"]
    lines += [f"| {module} | {row['tests']:.0f} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | {row['cpu_s'] / cpu:.0%} | {worker} |"
              for module, row, worker in rows]
    outside = cpu - sum(row["cpu_s"] for _, row, _ in rows)
    lines.append(f"| (between tests: pytest's start and collection in each process) | | | {outside:.1f} | {outside / cpu:.0%} | |")
    lines += ["", "| worker | modules | wall s | CPU s |", "|---|---|---|---|"]
    lines += [f"| {r['worker']} | {len(r['modules'])} | {sum(m['wall_s'] for m in r['modules'].values()):.1f} "
              f"| {sum(m['cpu_s'] for m in r['modules'].values()):.1f} |" for r in sorted(records, key=lambda r: r["worker"])]
    return "\n".join(lines)


def main(pytest_args: list[str]) -> int:
    if pytest_args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    with tempfile.TemporaryDirectory(prefix="kdas-bench-suite-") as folder:
        env = {**os.environ, RECORD_ENV: folder, "PYTHONUNBUFFERED": "1",  # its progress as it comes, through the pipe
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))}
        summary, started, cpu = "", time.monotonic(), cpu_seconds()
        # pytest's own output goes to stderr as it comes (progress); the table alone to stdout
        with subprocess.Popen([sys.executable, "-m", "pytest", "-p", "bench_suite", *pytest_args], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:  # type: ignore[union-attr]
                sys.stderr.write(line)
                if re.search(r"\d+ (passed|failed|errors?|skipped|deselected).* in [\d.]+s", line):
                    summary = line.strip("=\n ")
        wall, cpu = time.monotonic() - started, cpu_seconds() - cpu
        records = [r for r in (json.loads(path.read_text()) for path in Path(folder).glob("*.json")) if r["modules"]]
    if proc.returncode != 0 or not records:
        print(f"error: pytest exited with {proc.returncode} (its output above): no table", file=sys.stderr)
        return 1
    print(table(records, wall, cpu, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
