"""`kdas plots`: DVC's plots page without network, and the charts as PNG."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from helpers import tool_environ


@pytest.mark.slow
def test_the_plots_page_carries_its_chart_libraries_and_pngs_are_written(tmp_path):
    run = lambda *cmd: subprocess.run(cmd, cwd=tmp_path, env=tool_environ(), capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    (tmp_path / "history.csv").write_text("epoch,val_meanDic\n1,0.5\n2,0.7\n")
    (tmp_path / "dvc.yaml").write_text("plots:\n  - history.csv:\n      x: epoch\n      y: val_meanDic\n")
    out = run(sys.executable, "-m", "kdas", "plots")
    assert out.returncode == 0, out.stderr[-2000:]
    page = (tmp_path / "dvc_plots" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "<script src=" not in page  # nothing to fetch
    assert "vegaEmbed" in page and "val_meanDic" in page
    with Image.open(tmp_path / "reports" / "plots" / "history.csv.png") as png:
        assert png.width > 200 and png.height > 200
