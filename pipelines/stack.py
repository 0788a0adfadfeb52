"""A team stack on one machine, for trying team mode and for the tests: PostgreSQL, an S3
server (moto), the MLflow server (runs and registry in PostgreSQL, artifacts proxied to
S3: clients hold no bucket credentials) and the Prefect server (on PostgreSQL), all on
127.0.0.1, in one temporary folder.

    python -m pipelines.stack          # starts them, prints what to export; Ctrl-C or SIGTERM stops them all

A team points the same variables at its own servers (README, "Team mode"). Every server is
a child process of this one (moto a thread), never a daemon: stopping it stops them all.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
BUCKET = "kdas"
# moto takes any key; these stand for the credentials a real bucket would need, held by the
# MLflow server and by DVC's .dvc/config.local, never by an MLflow client
S3_KEY_ID, S3_SECRET = "kdas-team", "kdas-team-secret"
S3_REGION = "us-east-1"
START_TIMEOUT_S = 180  # migrations of a fresh database, on a busy 2-core machine
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


class StackError(RuntimeError):
    """A service of the stack cannot start."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with contextlib.suppress(OSError):
        with opener.open(url, timeout=2) as resp:
            return resp.status == 200
    return False


def _postgres_bin() -> Path:
    """The PostgreSQL server programs: on PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # (a link on PATH: its siblings are not)
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not versions:
        raise StackError("no PostgreSQL server programs (initdb): install them, e.g. `apt-get install postgresql`")
    return Path(versions[-1]).parent


class Process:
    """One server as a child process (its own session: a stop reaches the workers it forks)."""

    def __init__(self, name: str, cmd: list[str], log: Path, health: str | None = None, env: dict[str, str] | None = None,
                 user: str | None = None):
        self.name, self.cmd, self.log, self.health, self.env, self.user = name, cmd, log, health, env, user
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, user=self.user, cwd=self.log.parent)

    def wait_ready(self, ready=None, timeout: float = START_TIMEOUT_S) -> None:
        ready = ready or (lambda: _answers(self.health))
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise StackError(f"{self.name} exited with {self.proc.returncode}: see {self.log}\n{self._tail()}")
            if time.monotonic() > deadline:
                raise StackError(f"{self.name} did not start in {timeout} s: see {self.log}\n{self._tail()}")
            time.sleep(0.3)

    def _tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])

    def stop(self, sig: int = signal.SIGTERM, grace: float = 20.0) -> None:
        """`sig` to the whole process group, then SIGKILL after `grace` seconds."""
        if self.proc is None:
            return
        for signum, wait in ((sig, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()
                try:
                    os.killpg(self.proc.pid, 0)  # anyone of the group left?
                except ProcessLookupError:
                    self.proc = None
                    return
                time.sleep(0.1)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Postgres(Process):
    """A PostgreSQL cluster in `data`, trust authentication on 127.0.0.1 only. PostgreSQL
    refuses to run as root: as root, the cluster belongs to the `postgres` user."""

    def __init__(self, data: Path, log: Path, port: int):
        self.bin = _postgres_bin()
        user = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise StackError("PostgreSQL refuses to run as root and there is no `postgres` user: "
                                 "install Debian's postgresql package (it creates one) or run as another user") from None
            user = "postgres"
        self.data, self.port = data, port
        # fsync off: a throw-away cluster; a stop (fast shutdown) still writes everything out
        cmd = [str(self.bin / "postgres"), "-D", str(data), "-p", str(port), "-k", str(data),
               "-c", f"listen_addresses={HOST}", "-c", "fsync=off"]
        super().__init__("PostgreSQL", cmd, log, user=user)

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://postgres@{HOST}:{self.port}/{database}"

    def init(self, databases: list[str]) -> None:
        self.data.mkdir(mode=0o700)
        if self.user:
            shutil.chown(self.data, self.user, self.user)
        self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        self.start()
        for database in databases:
            self._run("createdb", "-h", HOST, "-p", str(self.port), "-U", "postgres", database)

    def start(self) -> None:
        super().start()
        self.wait_ready(lambda: subprocess.run([str(self.bin / "pg_isready"), "-q", "-h", HOST, "-p", str(self.port)]).returncode == 0,
                        timeout=60)

    def stop(self, sig: int = signal.SIGINT, grace: float = 20.0) -> None:  # SIGINT: PostgreSQL's fast shutdown
        super().stop(sig, grace)

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run([str(self.bin / program), *args], user=self.user, cwd=self.data.parent, capture_output=True, text=True)
        if done.returncode != 0:
            raise StackError(f"{program} failed: {(done.stderr or done.stdout).strip().splitlines()[-1]}")


class S3:
    """moto's S3 server in a thread of this process. Its buckets live in this process's
    memory, so a stop and start on the same port keeps them (a fault, then the service back)."""

    def __init__(self, port: int = 0):
        self.port = port
        self.server = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
        self.server = ThreadedMotoServer(HOST, self.port, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            # stop() leaves the socket listening: clients would hang instead of being refused
            self.server._server.server_close()
            self.server = None

    @property
    def running(self) -> bool:
        return self.server is not None

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.url, aws_access_key_id=S3_KEY_ID, aws_secret_access_key=S3_SECRET,
                     region_name=S3_REGION).create_bucket(Bucket=name)


class TeamStack:
    """PostgreSQL, S3, the MLflow server and the Prefect server; a context manager.

    `env`: what a client exports (no bucket credentials); `dvc_remote`: the DVC remote's
    settings. Each service has start() and stop(), to inject a fault and bring it back.
    """

    def __init__(self, root: Path | None = None, ui: bool = False):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="kdas-stack-"))
        self._own_root = root is None
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the postgres user reaches its cluster inside
        self.logs = self.root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.postgres = Postgres(self.root / "postgres", self.logs / "postgres.log", free_port())
        self.s3 = S3()
        mlflow_port, prefect_port = free_port(), free_port()
        self.mlflow_url = f"http://{HOST}:{mlflow_port}"
        self.prefect_api = f"http://{HOST}:{prefect_port}/api"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))} | QUIET
        self.mlflow = Process("MLflow server", [
            sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.postgres.url("mlflow"),
            "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--host", HOST, "--port", str(mlflow_port), "--workers", "1",
        ], self.logs / "mlflow.log", f"{self.mlflow_url}/health", env={
            **base, "AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": S3_REGION,
            "MLFLOW_S3_ENDPOINT_URL": "",  # set in start(): the S3 port is known once it runs
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # GenAI job consumers: not used by kdas
        })  # fmt: skip
        self.prefect = Process("Prefect server", [
            str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port),
            "--analytics-off", *([] if ui else ["--no-ui"]),
        ], self.logs / "prefect.log", f"{self.prefect_api}/health", env={
            **base, "PREFECT_HOME": str(self.root / "prefect-home"),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": self.postgres.url("prefect", "postgresql+asyncpg"),
        })  # fmt: skip

    @property
    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.mlflow_url, "PREFECT_API_URL": self.prefect_api}

    @property
    def dvc_remote(self) -> dict[str, str]:
        return {"url": f"s3://{BUCKET}/dvc", "endpointurl": self.s3.url, "access_key_id": S3_KEY_ID,
                "secret_access_key": S3_SECRET}

    def start(self) -> TeamStack:
        try:
            self.postgres.init(["mlflow", "prefect"])
            self.s3.start()
            self.s3.create_bucket(BUCKET)
            self.mlflow.env["MLFLOW_S3_ENDPOINT_URL"] = self.s3.url
            self.mlflow.start()  # both migrate their database meanwhile
            self.prefect.start()
            self.mlflow.wait_ready()
            self.prefect.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for service in (self.prefect, self.mlflow, self.s3, self.postgres):
            service.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> TeamStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def describe(self) -> str:
        remote = self.dvc_remote
        return "\n".join([
            f"Team stack up (data and logs in {self.root}):",
            f"  PostgreSQL  {HOST}:{self.postgres.port}  databases mlflow, prefect",
            f"  S3 (moto)   {self.s3.url}  bucket {BUCKET}",
            f"  MLflow      {self.mlflow_url}  artifacts proxied to s3://{BUCKET}/mlflow",
            f"  Prefect     {self.prefect_api}",
            "",
            "# clients (kdas, dvc, prefect workers): no bucket credentials needed for MLflow",
            *(f"export {k}={v}" for k, v in self.env.items()),
            "",
            "# the DVC remote, in a clone of the project (credentials in .dvc/config.local, not in git)",
            f"dvc remote add -d team {remote['url']}",
            f"dvc remote modify team endpointurl {remote['endpointurl']}",
            f"dvc remote modify --local team access_key_id {remote['access_key_id']}",
            f"dvc remote modify --local team secret_access_key {remote['secret_access_key']}",
        ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="keep data and logs here (default: a temporary folder, removed at the stop)")
    parser.add_argument("--ui", action="store_true", help="serve Prefect's UI too (slower start)")
    args = parser.parse_args(argv)
    stopping = threading.Event()
    # a signal only sets the event: the stop runs in the main thread, outside the handler
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    stack = TeamStack(args.dir, ui=args.ui)
    try:
        stack.start()
    except StackError as exc:
        raise SystemExit(f"team stack: {exc}") from None
    try:
        print(stack.describe(), "\n\nCtrl-C (or SIGTERM) stops them all.", flush=True)
        while not stopping.wait(1):
            for service in (stack.postgres, stack.mlflow, stack.prefect):
                if not service.running:
                    raise SystemExit(f"team stack: {service.name} stopped (see {service.log}); stopping the others")
    finally:
        stack.stop()
        print("team stack stopped", flush=True)


if __name__ == "__main__":
    main()
