"""``curves.png`` of a run folder: training/validation loss and validation mean IoU per epoch."""

from __future__ import annotations

import json
from pathlib import Path

from boxrefine.shared.runtime.fileio import atomic_savefig


def plot_curves(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    lines = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    tr = [x for x in lines if x["kind"] == "epoch"]
    ev = [x for x in lines if x["kind"] == "eval"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot([x["epoch"] for x in tr], [x["loss"] for x in tr], "o-", label="train loss")
    if ev:
        ax[0].plot([x["epoch"] for x in ev], [x["val_loss"] for x in ev], "s-", label="val loss")
        ax[1].plot([x["epoch"] for x in ev], [x["refined"]["mean_iou"] for x in ev], "s-", label="refined")
        ax[1].plot([x["epoch"] for x in ev], [x["coarse"]["mean_iou"] for x in ev], "--", label="coarse boxes")
        ax[1].legend()
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("val mean IoU")
    for a in ax:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    fig.tight_layout()
    atomic_savefig(fig, out)
    plt.close(fig)
