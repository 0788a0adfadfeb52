"""What the tests share besides fixtures (those are in conftest.py): the project's paths and
limits, writers of real image files, the tiny profile, DVC projects, local servers.

Importable from every folder under tests/ as `from helpers import ...` (pyproject.toml's
[tool.pytest.ini_options] pythonpath puts tests/ on sys.path)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from kdas.config import load_params, serving_limits

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASETS = SHARED / "datasets"
PARAMS = load_params(ROOT / "params.yaml")
# the importer's soft-mask limit, and what a served model enforces, as params.yaml sets them
MAX_NONBINARY = PARAMS.validation.max_nonbinary_fraction
SERVE = serving_limits(PARAMS.serve, PARAMS.validation.max_size)

# no telemetry, and never a proxy between a test and its local server
MLFLOW_QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "NO_PROXY": "127.0.0.1,localhost"}
# and for an `mlflow server`: no huey job consumers (faster, lighter)
MLFLOW_SERVER_QUIET = {**MLFLOW_QUIET, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

# the tiny profile of the DAG's end-to-end tests: {params.yaml key path: value}
TINY = {
    ("data", "synth"): {"n_images": 24, "size": 64, "empty_fraction": 0.1, "seed": 0},
    ("model", "teacher"): {"arch": "polyp_pvt_tiny", "backbone": None, "weights": "none", "drop_path_rate": 0.0},
    ("model", "student"): {"arch": "polyp_pvt_tiny", "backbone": None, "weights": "none", "drop_path_rate": 0.0},
    ("train", "image_size"): 64,
    ("train", "epochs"): 2,
    ("train", "workers"): 0,
    ("evaluate", "grid_size"): 2,
    ("register", "gate", "floor", "min"): 0.0,
    ("register", "onnx"): False,  # the export costs seconds per version; tests/serving/test_export.py registers one with it
}


# --------------------------------------------------------------------------- image files


def write_pair(images: Path, masks: Path, stem: str, *, size=(96, 80), img_ext=".png", mask_ext=".png", seed=0, fg=True, mode="RGB") -> tuple[Path, Path]:
    """A random image and a mask with an ellipse-ish square polyp, in the given formats."""
    rng = np.random.default_rng(seed)
    w, h = size
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert(mode)
    img_path = images / f"{stem}{img_ext}"
    img.save(img_path, **({"quality": 95} if img_ext == ".jpg" else {}))
    mask = np.zeros((h, w), np.uint8)
    if fg:
        mask[h // 4 : h // 2, w // 4 : w // 2] = 255
    mask_path = masks / f"{stem}{mask_ext}"
    Image.fromarray(mask).save(mask_path, **({"quality": 90} if mask_ext == ".jpg" else {}))
    return img_path, mask_path


def make_dataset(root: Path, n: int = 6, **kw) -> Path:
    """A plain images/ + masks/ dataset of n distinct pairs."""
    for i in range(n):
        write_pair(root / "images", root / "masks", f"img{i:02d}", seed=i, **kw)
    return root


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height (8-bit grey) over a few rows of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(width + 1) * 4)) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- subprocesses and projects


def tool_environ() -> dict[str, str]:
    """Environment for subprocesses: this interpreter's scripts (kdas, dvc) first on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def set_key(tree: dict, path: tuple, value) -> None:
    """tree[path[0]][path[1]]... = value: one key of a loaded params.yaml."""
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def dvc_project(folder: Path, mlflow_template_db: Path, params: dict[tuple, object]) -> Path:
    """The project's dvc.yaml, params.yaml (with `params`, {key path: value}, set) and kdas code
    in `folder`, with its own MLflow store, in git + DVC: DVC hashes this copy of the code,
    the stages run the installed kdas."""
    import yaml

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, folder / name)
    shutil.copytree(ROOT / "kdas", folder / "kdas", ignore=shutil.ignore_patterns("__pycache__"))
    tree = yaml.safe_load((folder / "params.yaml").read_text())
    for path, value in params.items():
        set_key(tree, path, value)
    (folder / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    (folder / "mlflow").mkdir()
    shutil.copy(mlflow_template_db, folder / "mlflow" / "mlflow.db")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=folder, check=True, env=tool_environ())
    return folder


def tiny_teacher_project(project: Path, **train) -> None:
    """`project` (the cwd, holding the project's params.yaml) set to train the tiny teacher on 12
    synthetic 64-px frames with no loader workers and the `train` keys given (epochs, patience),
    its data made by `kdas data synth` and `kdas data manifest`."""
    import yaml
    from click.testing import CliRunner

    from kdas.cli import main

    assert Path.cwd().resolve() == project.resolve(), "kdas runs in the project: chdir there first"
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["synth"].update(n_images=12, size=64)
    params["model"]["teacher"] = dict(TINY[("model", "teacher")])
    params["train"].update(image_size=64, workers=0, **train)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["data", "synth"], ["data", "manifest"]):
        assert CliRunner().invoke(main, args).exit_code == 0


# --------------------------------------------------------------------------- local servers


def prefect_env(home: Path, **extra: str) -> dict[str, str]:
    """A private Prefect home and database, no telemetry, never a proxy to 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    )
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll `url` until it answers 200; fail early, with `log`'s tail, if `proc` exits."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with opener.open(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not up after {timeout} s:\n{log.read_text()[-3000:]}")


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on root/mlflow.db (kept across restarts) with proxied artifacts in
    root/artifacts, at 127.0.0.1:port, in its own session; returns once it answers (its log:
    root/server.log). Stop it with `stop`."""
    log = root / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, **MLFLOW_SERVER_QUIET}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc, log)
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started in its own session (``start_new_session=True``), workers included."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)  # anyone of the group left?
            except ProcessLookupError:
                return
            time.sleep(0.1)


def kdas_cli(*args: str) -> tuple[int, str]:
    """`kdas ARGS` in this process (click's runner): its exit code and its output."""
    from click.testing import CliRunner

    from kdas.cli import main

    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def left_in(folder: Path) -> list[str]:
    """The names in `folder`, sorted; none where it does not exist."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- prediction maps (losses)

MAP_SIZE = 64


def disc_mask(batch: int = 2, size: int = MAP_SIZE):
    """B x 1 x size x size: one off-centre disc, a polyp's shape."""
    import torch

    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size * 0.45) ** 2 + (xx - size * 0.55) ** 2 < (size * 0.25) ** 2).float()
    return disc.expand(batch, 1, size, size).clone()


def extreme_masks() -> dict:
    import torch

    return {"disc": disc_mask(), "zeros": torch.zeros(2, 1, MAP_SIZE, MAP_SIZE), "ones": torch.ones(2, 1, MAP_SIZE, MAP_SIZE)}


def extreme_logits() -> dict:
    import torch

    torch.manual_seed(1)
    shape = (2, 1, MAP_SIZE, MAP_SIZE)
    return {"random": torch.randn(shape) * 3, "+50": torch.full(shape, 50.0), "-50": torch.full(shape, -50.0),
            "+-50": torch.randn(shape).sign() * 50}


def distill_params(method: str, **settings):
    """params.yaml's distill section with `method`, and that method's settings updated by `settings`."""
    import dataclasses

    sections = {**PARAMS.distill.settings, method: {**PARAMS.distill.settings.get(method, {}), **settings}}
    return dataclasses.replace(PARAMS.distill, method=method, settings=sections)
