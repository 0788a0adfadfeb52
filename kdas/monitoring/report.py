"""report.html: the verdict, each feature's distribution on both sides (drifted ones first),
a few frames from each side; Evidently's own interactive report beside it (evidently.html)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kdas.io import write_text
from kdas.maps import resize
from kdas.monitoring.drift import Verdict
from kdas.monitoring.profile import THUMBNAIL


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _distributions(reference: pd.DataFrame, current: pd.DataFrame, verdict: Verdict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(verdict.features, key=lambda n: (not verdict.features[n]["drift"], n))
    cols = 4
    fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, figsize=(3.2 * cols, 2.3 * ((len(names) + cols - 1) // cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        ref, cur = reference[name].to_numpy(), current[name].to_numpy()
        low, high = min(ref.min(), cur.min()), max(ref.max(), cur.max())
        bins = np.linspace(low, high if high > low else low + 1, 25)
        ax.hist(ref, bins=bins, density=True, alpha=0.55, label="reference", color="tab:blue")
        ax.hist(cur, bins=bins, density=True, alpha=0.55, label="current", color="tab:orange")
        f = verdict.features[name]
        ax.set_title(f"{name}{' - DRIFT' if f['drift'] else ''}\n{f['method']} {f['score']:.3g}", fontsize=8,
                     color="tab:red" if f["drift"] else "black")
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _strip(frames: Sequence[np.ndarray]) -> str:
    from PIL import Image

    if not len(frames):
        return ""
    strip = np.concatenate([resize(f, THUMBNAIL) for f in frames], axis=1)
    buffer = io.BytesIO()
    Image.fromarray(strip).save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()


def write_report(out: Path, verdict: Verdict, reference: pd.DataFrame, current: pd.DataFrame, *, model: str, source: str,
                 reference_frames: Sequence[np.ndarray], current_frames: Sequence[np.ndarray]) -> None:
    """DIR/report.html and DIR/evidently.html."""
    verdict.snapshot.save_html(str(out / "evidently.html"))
    drifted = [n for n, f in verdict.features.items() if f["drift"]]
    head = (f"<b style='color:{'#b00' if verdict.drift else '#070'}'>{'DRIFT' if verdict.drift else 'no drift'}</b>: "
            f"{len(drifted)} of {len(verdict.features)} features drifted (score {verdict.score:.2f})")
    pictures = "".join(f"<h3>{title}</h3><img src='data:image/jpeg;base64,{data}'>"
                       for title, data in (("reference (training frames)", _strip(reference_frames)), ("current", _strip(current_frames))) if data)
    page = f"""<!doctype html><meta charset="utf-8"><title>kdas monitor: {html.escape(model)}</title>
<body style="font-family:sans-serif;max-width:1400px">
<h1>kdas monitor</h1>
<p>{head}</p>
<p>model <code>{html.escape(model)}</code>; reference: {html.escape(source)} ({verdict.reference_frames} frames);
current: {verdict.frames} frames. Drifted: {html.escape(', '.join(drifted) or 'none')}.
Evidently's interactive report: <a href="evidently.html">evidently.html</a>.</p>
<h2>Each feature, both sides</h2><img src="data:image/png;base64,{_distributions(reference, current, verdict)}">
<h2>Frames</h2>{pictures}
</body>"""
    write_text(out / "report.html", page)
