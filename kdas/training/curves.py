"""The training-curve picture beside history.csv: loss components and val meanDic per epoch."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from kdas.io import atomic_path  # noqa: E402


def plot_history(history: list[dict], path: str | Path) -> None:
    """Left: every train_* loss component per epoch; right: val meanDic, the best epoch marked."""
    frame = pd.DataFrame(history)
    fig, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for column in [c for c in frame.columns if c.startswith("train_")]:
        loss_ax.plot(frame["epoch"], frame[column], marker="o", ms=3, label=column.removeprefix("train_"))
    loss_ax.set(xlabel="epoch", ylabel="training loss (mean per image)", title="loss components")
    loss_ax.legend(fontsize=8)
    if "val_meanDic" in frame:
        dice_ax.plot(frame["epoch"], frame["val_meanDic"], marker="o", ms=3, color="tab:green")
        best = frame.loc[frame["val_meanDic"].idxmax()]
        dice_ax.scatter([best["epoch"]], [best["val_meanDic"]], s=80, facecolors="none", edgecolors="tab:red", zorder=3,
                        label=f"best: epoch {int(best['epoch'])}, {best['val_meanDic']:.4f}")
        dice_ax.legend(fontsize=8)
    dice_ax.set(xlabel="epoch", ylabel="val meanDic", title="validation (model selection)", ylim=(0, 1))
    for ax in (loss_ax, dice_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
