"""Benchmark: the served model's budget per request (params.yaml's serve: max_rows,
max_pixels), against the same model served without one.

Logs the tiny test model twice in a temporary MLflow store (params.yaml's budget, and a budget
too large to bind), serves each with `mlflow models serve` on 127.0.0.1 (one worker), and
sends: the probe's request (50 rows of ~10 KB PNGs that each declare 4096 x 4096), 8 such rows
(under max_rows, over max_pixels) and a normal request (2 small frames). Prints, per server and
request: HTTP status, seconds, and the growth of the server's resident memory (all its
processes, sampled every 20 ms) over its level before the request.

    PYTHONPATH=. python benchmarks/bench_serving_budget.py [--skip-unbounded]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "NO_PROXY": "127.0.0.1,localhost"}
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# the largest budget kdas.config.ServingConfig allows: far above the probe (50 rows, 839 Mpx declared)
UNBOUNDED = {"max_rows": 10**4, "max_pixels": 10**10}


def png(width: int, height: int, seed: int | None = None) -> str:
    pixels = np.zeros((height, width), np.uint8) if seed is None else np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def log_models(root: Path) -> dict[str, str]:
    """The tiny model logged with each serving config; returns runs:/ URIs."""
    import mlflow

    from kdas.checkpoint import save_model
    from kdas.config import load_params, serving_limits
    from kdas.models import create_model
    from kdas.tracking.served import log_segmenter

    model_file = save_model(root / "tiny.pt", create_model("polyp_pvt_tiny"), image_size=64, info={})
    uris = {}
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    limits = serving_limits(params.serve, params.validation.max_size)
    for label, config in (("budget (params.yaml)", limits), ("no budget", limits | UNBOUNDED)):
        with mlflow.start_run():
            info = log_segmenter(model_file, serving_config=config)
            uris[label] = info.model_uri
    return uris


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def serve(uri: str, root: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
           "-p", str(port), "-w", "1"]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with OPENER.open(f"{url}/ping", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{uri}: server not up")


def invoke(url: str, images: list[str], server: psutil.Process) -> tuple[int, float, float]:
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    base, peak, done = tree_rss(server), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(server))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.monotonic()
    try:
        with OPENER.open(request, timeout=600) as resp:
            status = resp.status
            resp.read()
    except urllib.error.HTTPError as err:
        status = err.code
    seconds = time.monotonic() - start
    done.set()
    sampler.join()
    return status, seconds, max(0, peak[0] - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-unbounded", action="store_true", help="serve only the default budget (the unbounded run is slow)")
    args = parser.parse_args()
    big = png(4096, 4096)
    requests = {"50 x 4096^2 (the probe)": [big] * 50, "8 x 4096^2": [big] * 8, "2 x 320x240 frames": [png(320, 240, s) for s in (1, 2)]}
    with tempfile.TemporaryDirectory(prefix="kdas-bench-serving-") as tmp:
        root = Path(tmp)
        (root / "mlflow").mkdir()
        env = {**os.environ, **QUIET, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"}
        env.pop("PYTHONPATH", None)  # the served model runs the kdas code it was logged with
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        os.environ.update(QUIET, MLFLOW_TRACKING_URI=env["MLFLOW_TRACKING_URI"])
        os.chdir(root)
        uris = log_models(root)
        print(f"request body: {len(big) * 3 // 4 // 1024} KB per 4096 x 4096 PNG\n")
        print(f"{'server':<18} {'request':<26} {'status':>6} {'seconds':>8} {'RSS growth MB':>14}")
        for label, uri in uris.items():
            if args.skip_unbounded and label == "no budget":
                continue
            proc, url = serve(uri, root, env)
            try:
                server = psutil.Process(proc.pid)
                invoke(url, requests["2 x 320x240 frames"], server)  # warm up: model loaded, first batch run
                for name, images in requests.items():
                    status, seconds, grown = invoke(url, images, server)
                    print(f"{label:<18} {name:<26} {status:>6} {seconds:>8.2f} {grown:>14.1f}", flush=True)
            finally:
                os.killpg(proc.pid, 15)
                proc.wait(30)


if __name__ == "__main__":
    main()
