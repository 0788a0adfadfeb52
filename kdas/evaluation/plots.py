"""`dvc plots show` without network, and the same charts as PNG files.

DVC's HTML page loads Vega, Vega-Lite and Vega-Embed from a CDN: offline, every chart is
blank. Here the page gets a template with the three libraries inlined (the bundle that
the vl-convert package ships), and each chart is also rendered to PNG (vl-convert too), for
people and for MLflow.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from kdas.io import atomic_path, write_text

TEMPLATE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <title>DVC plots (kdas, offline)</title>
    <script type="text/javascript">
%s
    </script>
    <style>table { border-spacing: 15px; }</style>
</head>
<body>
    {plot_divs}
</body>
</html>"""


def offline_template(path: Path) -> Path:
    """An HTML template for `dvc plots show --html-template` with the chart libraries inlined
    (no {scripts} placeholder: DVC's CDN tags are left out)."""
    import vl_convert

    write_text(path, TEMPLATE % vl_convert.javascript_bundle())
    return path


def _dvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", "plots", *args], capture_output=True, text=True)


def show(out: Path, png: Path | None, targets: list[str]) -> list[Path]:
    """`dvc plots show` into `out` (index.html, offline), and each chart as PNG into `png`."""
    template = offline_template(out.parent / f".{out.name}-template.html")
    try:
        page = _dvc("show", "--html-template", str(template), "-o", str(out), *targets)
    finally:
        template.unlink(missing_ok=True)
    if page.returncode != 0:
        raise RuntimeError(f"dvc plots show failed: {page.stderr.strip().splitlines()[-1] if page.stderr.strip() else page.returncode}")
    if png is None:
        return [out / "index.html"]
    import vl_convert

    specs = _dvc("show", "--json", *targets)
    if specs.returncode != 0:
        raise RuntimeError(f"dvc plots show --json failed: {specs.stderr.strip()}")
    written = [out / "index.html"]
    for name, renders in json.loads(specs.stdout).get("data", {}).items():
        for k, render in enumerate(renders):
            if render.get("type") != "vega":  # image plots are PNGs already
                continue
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") + (f"-{k}" if len(renders) > 1 else "")
            target = png / f"{stem}.png"
            with atomic_path(target) as tmp:
                tmp.write_bytes(vl_convert.vegalite_to_png(render["content"], scale=1.5))
            written.append(target)
    return written
