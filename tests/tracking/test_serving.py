"""The champion served by `mlflow models serve` (a real subprocess on 127.0.0.1); the served
model's budget per request (rows and decoded pixels), checked by the pyfunc itself from the
image headers before any pixel is decoded."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from helpers import MLFLOW_QUIET, PARAMS, SERVE, free_port, stop, wait_for_http
from kdas.checkpoint import save_model
from kdas.config import check_serving_config
from kdas.models import create_model
from kdas.serving.codec import decode_mask
from kdas.tracking.promote import promote
from kdas.tracking.registry import register_model
from kdas.tracking.rules import gate_rules
from kdas.tracking.runs import PARENT_RUN_ENV
from kdas.tracking.served import SegmenterModel
from kdas.tracking.store import EXPERIMENT_ENV

TINY = "polyp_pvt_tiny"
NAME = "student-served"
CONCURRENCY = 3  # connections the server takes at once (uvicorn's limit, as mlflow/README.md sets it)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, mlflow_template_db: Path) -> Iterator[str]:
    """A sqlite store whose model NAME has a champion: the tiny model, registered and promoted."""
    root = tmp_path_factory.mktemp("serving")
    db = root / "mlflow" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for key, value in MLFLOW_QUIET.items():
            mp.setenv(key, value)
        mp.delenv(PARENT_RUN_ENV, raising=False)
        mp.delenv(EXPERIMENT_ENV, raising=False)
        model_file = save_model(root / "student.pt", create_model(TINY), image_size=64, info={})
        register_model(model_file, NAME, {"kvasir/meanDic": 0.7}, evaluation_data="synthetic-test", serving_config={**SERVE, "max_side": 1024},
                       onnx=False)  # served on torch here; tests/serving/test_export.py serves the ONNX export
        assert promote(NAME, gate_rules(PARAMS.register.gate)).promoted
        yield uri


@pytest.fixture(scope="module")
def endpoint(store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("serve")
    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1",
    ]  # fmt: skip
    # no PYTHONPATH: the served model runs the kdas code it was logged with
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_QUIET, MLFLOW_TRACKING_URI=store)
    # the CLI execs `uvicorn` by name: put this environment's scripts first, as activating it would
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["UVICORN_LIMIT_CONCURRENCY"] = str(CONCURRENCY)
    log = root / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/ping", proc, log, timeout=180)
        yield url
    finally:
        stop(proc)


def invoke(url: str, columns: list[str], rows: list[list]) -> tuple[int, dict]:
    body = json.dumps({"dataframe_split": {"columns": columns, "data": rows}}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def encoded(width: int, height: int, fmt: str = "PNG", mode: str = "RGB") -> str:
    rng = np.random.default_rng(width * height)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_masks_come_back_at_each_image_size(endpoint: str) -> None:
    status, body = invoke(endpoint, ["image"], [[encoded(70, 50)], [encoded(40, 30, "JPEG", "L")]])
    assert status == 200, body
    predictions = body["predictions"]
    assert len(predictions) == 2
    for pred, size in zip(predictions, [(70, 50), (40, 30)]):
        with Image.open(io.BytesIO(base64.b64decode(pred["mask"]))) as mask:
            assert mask.format == "PNG" and mask.size == size
            values = set(np.unique(np.asarray(mask)).tolist())
        assert values <= {0, 255}
        assert pred["foreground_fraction"] == pytest.approx(float(np.mean(decode_mask(pred["mask"]))))


_TRUNCATED_PNG = base64.b64encode(base64.b64decode(encoded(64, 64))[:100]).decode()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (base64.b64encode(b"this is no image").decode(), "row 1: not a decodable PNG or JPEG image"),
        (_TRUNCATED_PNG, "row 1: not a decodable PNG or JPEG image"),  # header fine, pixels not
        ("%%% not base64 %%%", "row 1: 'image' is not valid base64"),
        (encoded(1025, 2), "row 1: image too large: 1025x2 px (at most 1024 px a side"),  # the logged limit
        (encoded(8, 8, "GIF", "L"), "row 1: not a decodable PNG or JPEG image"),
    ],
    ids=["not-an-image", "truncated", "not-base64", "too-large", "gif"],
)
def test_bad_image_is_a_400_naming_the_row(endpoint: str, value: str, message: str) -> None:
    status, body = invoke(endpoint, ["image"], [[encoded(32, 32)], [value]])
    assert status == 400
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert message in body["message"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_over_budget_request_is_a_quick_400(endpoint: str) -> None:
    """The probe's request: 50 rows of tiny PNGs that each declare 4096 x 4096."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4096, 4096), np.uint8)).save(buf, format="PNG", optimize=True)
    big = base64.b64encode(buf.getvalue()).decode("ascii")
    start = time.monotonic()
    status, body = invoke(endpoint, ["image"], [[big]] * 50)
    assert status == 400 and time.monotonic() - start < 2
    assert "request too large: 50 rows (at most 32 per request)" in body["message"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("columns", "rows", "message"),
    [
        (["image"], [[12345]], "row 0: 'image' must be a base64-encoded PNG or JPEG string, got int"),
        (["picture"], [[encoded(8, 8)]], "missing inputs ['image']"),
    ],
    ids=["int", "no-image-column"],
)
def test_wrong_type_or_column_is_a_4xx(endpoint: str, columns: list[str], rows: list[list], message: str) -> None:
    status, body = invoke(endpoint, columns, rows)
    assert 400 <= status < 500
    assert message in body["message"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_connections_past_the_limit_get_503_in_milliseconds(endpoint: str) -> None:
    host, port = endpoint.removeprefix("http://").split(":")
    held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(CONCURRENCY)]  # three clients, mid-request
    try:
        time.sleep(0.5)  # the server has accepted them
        request = urllib.request.Request(f"{endpoint}/invocations", data=b"{}", headers={"Content-Type": "application/json"})
        start = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as err:
            _OPENER.open(request, timeout=60)
        assert err.value.code == 503 and time.monotonic() - start < 0.5
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)
    status, body = invoke(endpoint, ["image"], [[encoded(70, 50)]])
    assert status == 200, body


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pyfunc_in_process(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)  # an earlier set_tracking_uri would win over the variable
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert model.metadata.get_input_schema().input_names() == ["image"]
    out = model.predict(pd.DataFrame({"image": ["data:image/png;base64," + encoded(20, 10), encoded(9, 9, "JPEG")]}))
    assert list(out.columns) == ["mask", "foreground_fraction"]
    assert decode_mask(out["mask"][0]).shape == (10, 20)
    assert model.predict(pd.DataFrame({"image": pd.Series([], dtype=str)})).empty
    raw = model.unwrap_python_model()  # bypasses MLflow's schema check: our own checks answer
    with pytest.raises(MlflowException, match="row 0: 'image' must be a base64-encoded .* got NoneType") as err:
        raw.predict(None, pd.DataFrame({"image": [None]}))
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException, match="expected a column 'image'"):
        raw.predict(None, pd.DataFrame({"img": ["x"]}))


# --------------------------------------------------------------------------- the budget per request, in the pyfunc alone


def declared(width: int, height: int) -> str:
    """A real, tiny PNG of width x height black pixels (~10 KB for 4096 x 4096)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((height, width), np.uint8)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def big() -> str:
    return declared(4096, 4096)


def pyfunc(**config) -> SegmenterModel:
    """The pyfunc as `load_context` leaves it, minus the network: every refusal below comes
    before the model would be used."""
    served = SegmenterModel()
    served.config = check_serving_config({**SERVE, **config})
    return served


def refused(served: SegmenterModel, images: list[str]) -> tuple[str, float, float]:
    proc = psutil.Process()
    rss = proc.memory_info().rss
    start = time.monotonic()
    with pytest.raises(MlflowException) as err:
        served.predict(None, pd.DataFrame({"image": images}))
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"  # HTTP 400 when served
    return err.value.message, time.monotonic() - start, (proc.memory_info().rss - rss) / 2**20


def test_the_probes_50_rows_of_4096_px_pngs_are_refused_at_once(big):
    assert len(base64.b64decode(big)) < 20_000
    message, seconds, grown_mib = refused(pyfunc(), [big] * 50)
    assert f"request too large: 50 rows (at most {SERVE['max_rows']} per request)" in message
    assert seconds < 2 and grown_mib < 200


def test_decoded_pixels_are_budgeted_per_request(big):
    message, seconds, grown_mib = refused(pyfunc(), [big] * 8)  # 8 rows: under max_rows
    assert SERVE["max_pixels"] == 4 * 4096 * 4096  # the numbers below
    assert f"rows 0 to 4 declare {5 * 4096 * 4096} pixels (at most {4 * 4096 * 4096} per request)" in message
    assert seconds < 2 and grown_mib < 200
    small = declared(100, 100)
    message, _, _ = refused(pyfunc(max_pixels=25_000), [small, small, small])
    assert "rows 0 to 2 declare 30000 pixels (at most 25000 per request)" in message


def test_budget_keys_are_serving_config_keys():
    config = check_serving_config({**SERVE, "max_rows": 4, "max_pixels": 10**6})
    assert config["max_rows"] == 4 and config["max_pixels"] == 10**6 and config["max_side"] == PARAMS.validation.max_size
    assert config["runtime"] == "torch"  # how it runs has a default; what it enforces comes from params.yaml
    with pytest.raises(ValueError, match=r"serving_config: unknown key\(s\) \[.max_request_rows.\]"):
        check_serving_config({**SERVE, "max_request_rows": 4})
    with pytest.raises(ValueError, match="^serving_config: missing key 'threshold'$"):
        check_serving_config({k: v for k, v in SERVE.items() if k != "threshold"})
    with pytest.raises(ValueError, match=r"^serving_config: runtime must be one of torch, onnxruntime, not 'tensorrt'$"):
        check_serving_config({**SERVE, "runtime": "tensorrt"})
    with pytest.raises(ValueError, match=r"^serving_config: max_rows = 0 is out of range \[1, 10000\]$"):
        check_serving_config({**SERVE, "max_rows": 0})
