"""The served model's budget per request: rows and decoded pixels, checked from the image
headers before any pixel is decoded (the pyfunc itself; test_serving.py asks a real server)."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pandas as pd
import psutil
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from helpers import PARAMS, SERVE
from kdas.tracking.served import SegmenterModel
from kdas.config import check_serving_config


def declared(width: int, height: int) -> str:
    """A real, tiny PNG of width x height black pixels (~10 KB for 4096 x 4096)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((height, width), np.uint8)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def big() -> str:
    return declared(4096, 4096)


def model(**config) -> SegmenterModel:
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
    message, seconds, grown_mib = refused(model(), [big] * 50)
    assert f"request too large: 50 rows (at most {SERVE['max_rows']} per request)" in message
    assert seconds < 2 and grown_mib < 200


def test_decoded_pixels_are_budgeted_per_request(big):
    message, seconds, grown_mib = refused(model(), [big] * 8)  # 8 rows: under max_rows
    assert SERVE["max_pixels"] == 4 * 4096 * 4096  # the numbers below
    assert f"rows 0 to 4 declare {5 * 4096 * 4096} pixels (at most {4 * 4096 * 4096} per request)" in message
    assert seconds < 2 and grown_mib < 200
    small = declared(100, 100)
    message, _, _ = refused(model(max_pixels=25_000), [small, small, small])
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
