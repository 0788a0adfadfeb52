"""The `retrain` Prefect flow: the DVC stages of dvc.yaml, one task each, plus what DVC
lacks: retries on registry calls, a stop at a broken data contract with its report as an
artifact, the promotion gate, a run summary, one run at a time per workspace.

Run it once (an ephemeral Prefect server starts by itself):

    python -m pipelines.retrain                      # params.yaml as it is
    python -m pipelines.retrain --profile paper --datasets kvasir-seg cvc-clinicdb cvc-colondb

Stages are never defined here: each task runs `dvc repro --single-item <stage>`, so DVC
keeps its cache and lineage and skips a stage whose inputs did not change. SIGTERM or
SIGINT to the flow (or a cancellation by a Prefect worker) is passed on to the running stage
(and all it started) and waited for, so DVC's lock is released before the flow stops; after a
SIGKILL, a watcher stops the stage and Prefect's temporary server (README "Limits": what stays).

Several runs at once (two clones, a worker with --limit 2): register -> promote of one
model is one run at a time, under a global concurrency limit held by the Prefect server,
and each run promotes exactly the version it registered.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

# Prefect's server telemetry is noise here (and, on the ephemeral server's sqlite, a
# "database is locked" traceback at start): off at its source, before prefect is imported
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")  # Prefect's client-side SDK telemetry
# the ephemeral Prefect server (no PREFECT_API_URL) may take more than its default 20 s to
# start on a busy 2-core machine: the main job then failed before its first stage
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import Task, flow, get_client, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate  # noqa: E402
from prefect.concurrency.sync import concurrency  # noqa: E402
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound  # noqa: E402

from kdas.config import Params, load_params, profile_updates, set_params  # noqa: E402
from kdas.io import exclusive  # noqa: E402
from kdas.provenance import dvc_hashes  # noqa: E402
from kdas.tracking.references import resolve_model_file  # noqa: E402
from kdas.tracking.registry import CHAMPION, RegistryError, champion_metrics, check_registered  # noqa: E402
from kdas.tracking.rules import gate_rules  # noqa: E402
from kdas.tracking.runs import pipeline_run  # noqa: E402

LOCK = Path(".dvc/tmp/kdas-retrain.lock")
STOP_GRACE_S = 30  # how long a signalled stage may take to exit before it is killed
# the lease of the registry lock: renewed while held, so it only bounds how long a run that
# died (SIGKILL, a lost machine) keeps the lock before the server frees it
REGISTRY_LEASE_S = 120

_git_hints: set[str] = set()  # files DVC asks to `git add`, said once at the end of the flow

# a `kdas` command's own log line ("INFO kdas.x: message"): Prefect adds its own prefix and level
_KDAS_LOG = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: (.*)$")
# DVC's per-stage chatter; what matters of it is said once at the end (see _dvc_line)
_DVC_NOISE = ("Updating lock file", "To track the changes with git, run:", "To enable auto staging, run:",
              "dvc config core.autostage true", "Use `dvc push` to send your updates to remote storage.")


class WorkspaceBusy(RuntimeError):
    pass


def workspace_lock(workspace: Path) -> contextlib.AbstractContextManager[None]:
    """One flow run per workspace: a second one is refused at once (instead of failing
    half-way on DVC's own lock)."""
    path = workspace / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    return exclusive(path, "retrain flow", lambda who: WorkspaceBusy(
        f"another retrain flow is running in {workspace.resolve()} ({who}); wait for it to finish, or run in another clone"))


def _env() -> dict[str, str]:
    """kdas and dvc from this interpreter's environment, whatever PATH says; MLflow's
    per-download progress bars off (each stage's output is the flow's log: they were 24
    lines of a main job, each twice), unless the caller set them."""
    return {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _run(cmd: list[str], workspace: Path) -> list[str]:
    """Run a command, its output streamed to the flow's log; returns that output."""
    logger = get_run_logger()
    # its own process group: a signal forwarded to it reaches dvc and the stage it runs
    proc = subprocess.Popen(cmd, cwd=workspace, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            line = line.rstrip()
            if line and "\r" not in line:  # progress bars redraw with \r: keep the log readable
                lines.append(line)
                level, message = _log_level(line)
                if message is not None:
                    logger.log(level, message)
        proc.wait()
    except BaseException as exc:
        # the flow is stopping: a signal (as an exception: ours, or Prefect's TerminationSignal,
        # whose handler replaces ours during a flow run) or a cancellation; its command stops first
        _stop(proc, signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM)
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n" + "\n".join(lines[-15:]))
    return lines


def _log_level(line: str) -> tuple[int, str | None]:
    """How a command's output line goes to the flow's log: its level and message (one prefix,
    Prefect's), or None for DVC's per-stage hints (the files to `git add` are kept for the end)."""
    stripped = line.strip()
    if stripped.startswith("git add "):
        _git_hints.update(stripped.split()[2:])
        return logging.INFO, None
    if (stripped in _DVC_NOISE or stripped.startswith(("Updating lock file", "Running stage '"))
            or stripped.endswith("didn't change, skipping")):
        return logging.INFO, None
    match = _KDAS_LOG.match(line)
    if match:
        return logging.getLevelName(match[1]), match[2]
    if stripped.startswith("> "):  # DVC echoes the stage's command
        return logging.INFO, f"$ {stripped[2:]}"
    return logging.INFO, line


def _stop(child: subprocess.Popen, signum: int) -> None:
    """Pass the signal on to a command's process group, wait until all of it has exited (DVC
    then no longer holds its lock), and kill what is left after STOP_GRACE_S."""
    procs = []
    with contextlib.suppress(psutil.NoSuchProcess):
        procs = [psutil.Process(child.pid), *psutil.Process(child.pid).children(recursive=True)]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signum)
    deadline = time.monotonic() + STOP_GRACE_S
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(STOP_GRACE_S)

    def alive(p: psutil.Process) -> bool:  # an exited orphan may stay a zombie where nothing reaps it
        with contextlib.suppress(psutil.NoSuchProcess):
            return p.status() != psutil.STATUS_ZOMBIE
        return False

    while any(alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in filter(alive, procs):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@contextlib.contextmanager
def children_die_with_this_process() -> Iterator[None]:
    """Within: what this process starts is stopped if it is killed (SIGKILL included), by a
    watcher in a session of its own (a Ctrl-C at the terminal reaches the flow alone, which stops
    its stages itself); an orderly end stops the watcher."""
    watcher = subprocess.Popen([sys.executable, "-m", "pipelines.orphan_watch", str(os.getpid()), str(os.getpgrp()), str(STOP_GRACE_S)],
                               start_new_session=True)
    try:
        yield
    finally:
        watcher.terminate()
        watcher.wait()


def _raise_on_signal(signum: int, frame: object) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def forwarding_signals() -> Iterator[None]:
    """Within: SIGTERM and SIGINT raise in the main thread, so the running stage is stopped
    cleanly (see _run), then the flow. Prefect's engine puts its own SIGTERM handler over this
    one during a flow run; it raises too, with the same effect."""
    previous = {sig: signal.signal(sig, _raise_on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def registry_lock(name: str) -> Iterator[None]:
    """Register -> promote of model `name`, one flow run at a time across clones and workers:
    a global concurrency limit of 1 on the Prefect server (a team creates it with its work
    pools, `prefect gcl create kdas-registry-NAME --limit 1`; a first run creates it where it
    is missing), held under a lease, so a run that dies frees it. A file lock would hold on
    one machine only."""
    lock = f"kdas-registry-{name}"
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(lock)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # made by another run meanwhile
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=lock, limit=1))
            limit = client.read_global_concurrency_limit_by_name(lock)
    if limit.limit != 1 or not limit.active:
        raise RuntimeError(f"Prefect global concurrency limit {lock} is {'inactive' if not limit.active else f'at {limit.limit}'}; "
                           f"registrations of {name} need it active at 1: `prefect gcl update {lock} --limit 1 --enable`")
    logger = get_run_logger()
    started = time.monotonic()
    with concurrency(lock, occupy=1, strict=True, lease_duration=REGISTRY_LEASE_S):
        logger.info("registry lock %s held (waited %.0f s)", lock, time.monotonic() - started)
        yield


@task(name="stage", task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(stage: str, workspace: Path) -> bool:
    """`dvc repro --single-item STAGE`; True if it ran, False if DVC found it up to date."""
    started = time.monotonic()
    output = _run([sys.executable, "-m", "dvc", "repro", "--single-item", stage], workspace)
    ran = f"Running stage '{stage}':" in output
    get_run_logger().info("%s: %s", stage, f"ran in {time.monotonic() - started:.0f} s" if ran else "up to date, skipped")
    return ran


def retried(registry_call: Task, params: Params) -> Task:
    """A registry call (the tasks below), retried as params.yaml's register section says."""
    return registry_call.with_options(retries=params.register.retries, retry_delay_seconds=params.register.retry_delay)


@task(name="register", task_run_name="register@{role}", cache_policy=NO_CACHE)
def register(role: str, workspace: Path) -> bool:
    """The register stage; registered again where DVC finds it up to date but the tracking
    store does not hold this workspace's model under the version it recorded (a workspace run
    against another store: its record names another model's number there)."""
    ran = run_stage.fn(f"register@{role}", workspace)
    if not ran and (why := not_registered_here(role, workspace)):
        get_run_logger().warning("register@%s is up to date in DVC, but %s: registering again", role, why)
        _run([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", f"register@{role}"], workspace)
        return True
    return ran


def not_registered_here(role: str, workspace: Path) -> str | None:
    """Why this workspace's register record does not name its model in this store (None: it does)."""
    record = json.loads((workspace / "reports" / "register" / f"{role}.json").read_text())
    if "sha256" not in record:
        return "its record was written by an older kdas"
    try:
        check_registered(record["name"], str(record["version"]), record["sha256"], record.get("run_id"))
    except RegistryError as exc:
        return str(exc)
    return None


def registered_version(role: str, workspace: Path) -> str:
    """The version this workspace's register stage recorded (reports/register/<role>.json)."""
    return str(json.loads((workspace / "reports" / "register" / f"{role}.json").read_text())["version"])


@task(name="promote", task_run_name="promote@{role}", cache_policy=NO_CACHE)
def promote(role: str, version: str, workspace: Path) -> dict:
    _run([sys.executable, "-m", "kdas", "promote", "--role", role, "--version", version], workspace)
    return json.loads((workspace / "reports" / "promotion" / f"{role}.json").read_text())


@task(name="champion", task_run_name="champion@{name}", cache_policy=NO_CACHE)
def champion(name: str) -> dict | None:
    """The version in production before this run, with its metrics (for the summary)."""
    return champion_metrics(name)


@task(name="reuse teacher", cache_policy=NO_CACHE)
def reuse_teacher(workspace: Path, uri: str) -> None:
    """Put the registered teacher where the distill stage reads it."""
    with contextlib.chdir(workspace):
        source = resolve_model_file(uri)
        target = Path("models/teacher/best.pt")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    get_run_logger().info("teacher: %s -> %s", uri, target)


def _publish_validation(workspace: Path) -> dict | None:
    path = workspace / "reports" / "validation.json"
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    rows = [f"| {f['severity']} | {f['rule']} | `{f['file']}` | {f['detail']} |" for f in report["findings"] if f["severity"] == "error"][:50]
    create_markdown_artifact(
        key="data-contract",
        markdown=f"# Data contract {'passed' if report['success'] else 'FAILED'}\n\n{report['n_pairs']} pairs, "
                 f"{report['n_errors']} errors, {report['n_warnings']} warnings.\n\n"
                 + ("| severity | rule | file | detail |\n|---|---|---|---|\n" + "\n".join(rows) if rows else ""),
        description="kdas validate: the data contract",
    )
    return report


def _summary(workspace: Path, params: Params, decisions: dict[str, dict], champions: dict[str, dict | None], skipped: list[str]) -> str:
    manifest = dvc_hashes(workspace).get("data/manifest.parquet", "?")
    lines = ["# kdas retrain\n", f"- data: `data/manifest.parquet` md5 `{manifest}` ({', '.join(params.data.datasets)})",
             f"- teacher: {params.model.teacher.backbone}, student: {params.model.student.backbone}, "
             f"{params.train.image_size} px, {params.train.epochs} epochs, distillation: `{params.distill.method}`",
             f"- up to date, skipped: {', '.join(skipped) or 'none'}\n"]
    for role, decision in decisions.items():
        metrics = json.loads((workspace / "reports" / "evaluate" / role / "metrics.json").read_text())["datasets"]
        before = champions[role]
        versus = f"champion before (version {before['version']}, scored on {before['data']})" if before else "champion before (none)"
        verdict = ("promoted to champion" if decision["promoted"] else
                   "already champion" if decision["challenger"] == decision["champion_before"] else "not promoted")
        lines += [f"## {role}: {verdict}\n", f"{decision['reason']}\n",
                  f"| test set | meanDic | {versus} meanDic | meanIoU | wFm | Sm | MAE |", "|---|---|---|---|---|---|---|"]
        for d, m in metrics.items():
            old = before["metrics"].get("meanDic" if d == "mean" else f"{d}/meanDic") if before else None
            lines.append(f"| {d} | {m['meanDic']:.4f} | {'-' if old is None else f'{old:.4f}'} | {m['meanIoU']:.4f} | {m['wFm']:.4f} "
                         f"| {m['Sm']:.4f} | {m['mae']:.4f} |")
        lines.append("")
    return "\n".join(lines)


@flow(name="retrain", log_prints=True)
def retrain(workspace: str = ".", profile: str | None = None, datasets: list[str] | None = None, retrain_teacher: bool = True,
            teacher_uri: str | None = None, nproc_per_node: int | None = None) -> dict:
    """Validate the data, train (or reuse) the teacher, distil the student, evaluate, register,
    and promote what passes the gate.

    profile: a named profile of params.yaml (paper, real-cpu); datasets: data.datasets; nproc_per_node:
    train.nproc_per_node (> 1 trains under torchrun, e.g. one process per GPU); each is
    written to params.yaml, as `dvc exp run -S` would. retrain_teacher=False distils from
    the registered teacher_uri instead of training a teacher (default: the teacher's champion,
    models:/<register.teacher_name>@champion).
    """
    root = Path(workspace).resolve()
    params = load_params(root / "params.yaml")
    updates = profile_updates(params, profile) if profile else {}
    updates |= {k: v for k, v in {"data.datasets": datasets, "train.nproc_per_node": nproc_per_node}.items() if v is not None}
    with workspace_lock(root), contextlib.chdir(root), children_die_with_this_process():
        if updates and set_params(updates, root / "params.yaml"):
            get_run_logger().info("params.yaml updated: %s", updates)
            params = load_params(root / "params.yaml")
        gate_rules(params.register.gate, str(root / "params.yaml"))  # a bad gate rule stops the flow before it trains
        with pipeline_run("retrain", {"profile": profile or "", "datasets": params.data.datasets,
                                      "retrain_teacher": retrain_teacher}):
            stages = (["synth"] if "synth" in params.data.datasets else []) + ["manifest"]
            ran = {s: run_stage(s, root) for s in stages}
            try:
                ran["validate"] = run_stage("validate", root)
            finally:
                _publish_validation(root)
            roles = ["teacher", "student"] if retrain_teacher else ["student"]
            if retrain_teacher:
                ran["train_teacher"] = run_stage("train_teacher", root)
            else:
                retried(reuse_teacher, params)(root, teacher_uri or f"models:/{params.register.teacher_name}@{CHAMPION}")
            ran["distill"] = run_stage("distill", root)
            for role in roles:
                ran[f"evaluate@{role}"] = run_stage(f"evaluate@{role}", root)
            names = {"teacher": params.register.teacher_name, "student": params.register.student_name}
            champions, decisions = {}, {}
            for role in roles:
                with registry_lock(names[role]):
                    ran[f"register@{role}"] = retried(register, params)(role, root)
                    champions[role] = retried(champion, params)(names[role])
                    decisions[role] = retried(promote, params)(role, registered_version(role, root), root)
        summary = _summary(root, params, decisions, champions, [s for s, r in ran.items() if not r])
        create_markdown_artifact(key="retrain-summary", markdown=summary, description="kdas retrain: data, metrics, promotion")
        print(summary)
    return {"ran": ran, "decisions": decisions}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.retrain", description=retrain.__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", default=".", help="project folder (default: here)")
    parser.add_argument("--profile", help="write a named profile of params.yaml first: paper or real-cpu (kdas params use)")
    parser.add_argument("--datasets", nargs="+", help="data.datasets, e.g. kvasir-seg cvc-clinicdb cvc-colondb")
    parser.add_argument("--nproc-per-node", type=int, help="train.nproc_per_node: train data-parallel under torchrun")
    parser.add_argument("--reuse-teacher", action="store_true", help="distil from the registered teacher instead of training one")
    parser.add_argument("--teacher-uri", help="with --reuse-teacher (default: models:/<register.teacher_name>@champion)")
    args = parser.parse_args(argv)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
    with forwarding_signals():
        retrain(workspace=args.workspace, profile=args.profile, datasets=args.datasets, retrain_teacher=not args.reuse_teacher,
                teacher_uri=args.teacher_uri, nproc_per_node=args.nproc_per_node)
    print("\nWhere to look:\n"
          f"  reports:  {Path(args.workspace, 'reports').resolve()}/ (validation.html, evaluate/*/grid.png ...)\n"
          "  DVC:      dvc metrics show; kdas plots (dvc_plots/index.html, offline, and reports/plots/*.png)\n"
          "  MLflow:   mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db  ->  http://127.0.0.1:5000\n"
          "  Prefect:  prefect server start  ->  http://127.0.0.1:4200 (flow runs are kept in the local Prefect "
          "database and show there)")
    if _git_hints:
        print(f"  git:      git add {' '.join(sorted(_git_hints))}  (DVC's lock of this run; `dvc push` sends the data)")


if __name__ == "__main__":
    main()
