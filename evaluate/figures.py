"""evaluate's plots (matplotlib, Agg): ``iou_hist.png``, and the report's figures as PNG bytes — the
coarse vs refined IoU scatter, the gain histogram, the training curves and the robustness curve.

Colours: coarse red, refined blue, zero-shot grey, gain green, loss red, as the overlays draw them.
Histograms that share an axis are drawn as outlines, so no bar hides another and every colour on the
plot is one of the legend's.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from boxrefine.shared.runtime.fileio import atomic_write_bytes
from boxrefine.shared.scoring.metrics import IOU_THRESHOLDS

COARSE, REFINED, ZERO_SHOT, GAIN, LOSS = "#e61e1e", "#1e5aff", "#808080", "#1a9641", "#d7191c"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig: Any, dpi: int = 90) -> bytes:
    """A figure as PNG bytes (and closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    _plt().close(fig)
    return buf.getvalue()


def iou_hist(curves: list[tuple[str, np.ndarray | None, str]]) -> bytes:
    """Histogram of box IoU to GT, one outline per (label, IoUs, colour), its mean in the legend."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, 1, 41)
    for label, vals, colour in curves:
        if vals is not None and len(vals):
            ax.hist(vals, bins=bins, histtype="step", linewidth=2, color=colour,
                    label=f"{label}, mean {vals.mean():.3f}")
    for t in IOU_THRESHOLDS:
        ax.axvline(t, color="k", linestyle=":", linewidth=0.8)
    ax.set(xlabel="IoU to ground truth", ylabel="boxes", xlim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return png(fig)


def write_iou_hist(path: Path, curves: list[tuple[str, np.ndarray | None, str]]) -> None:
    atomic_write_bytes(path, iou_hist(curves))


def scatter(coarse: np.ndarray, refined: np.ndarray, name: str) -> bytes:
    """Per box: coarse IoU (x) vs refined IoU (y); above the diagonal gained, below lost."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    gained = refined > coarse
    ax.plot([0, 1], [0, 1], color="k", linewidth=0.8)
    ax.scatter(coarse[gained], refined[gained], s=10, color=GAIN, label=f"gained ({int(gained.sum())})")
    ax.scatter(coarse[~gained], refined[~gained], s=10, color=LOSS, label=f"lost or equal ({int((~gained).sum())})")
    ax.set(xlabel="coarse IoU", ylabel=f"refined IoU ({name})", xlim=(0, 1), ylim=(0, 1), aspect="equal")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return png(fig)


def gain_hist(coarse: np.ndarray, refined: np.ndarray) -> bytes:
    """Histogram of the per-box IoU gain (refined − coarse): losses red, gains green, zero marked."""
    plt = _plt()
    gain = refined - coarse
    fig, ax = plt.subplots(figsize=(5.4, 4.4))
    lim = max(0.05, float(np.abs(gain).max()) if len(gain) else 0.05)
    bins = np.linspace(-lim, lim, 31)
    ax.hist(gain[gain < 0], bins=bins, color=LOSS, label=f"lost ({int((gain < 0).sum())})")
    ax.hist(gain[gain >= 0], bins=bins, color=GAIN, label=f"gained or equal ({int((gain >= 0).sum())})")
    ax.axvline(0, color="k", linewidth=0.8)
    if len(gain):
        ax.axvline(float(gain.mean()), color="k", linestyle="--", linewidth=1, label=f"mean {gain.mean():+.3f}")
    ax.set(xlabel="IoU gain per box (refined − coarse)", ylabel="boxes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def training_curves(lines: list[dict[str, Any]]) -> bytes:
    """Loss, val mean IoU, learning rate and head health per epoch, from metrics.jsonl's lines."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    tr = [x for x in lines if x.get("kind") == "epoch"]
    ev = [x for x in lines if x.get("kind") == "eval"]
    fig, ax = plt.subplots(1, 4, figsize=(14, 3.4))
    e_tr = [x["epoch"] for x in tr]
    ax[0].plot(e_tr, [x["loss"] for x in tr], "o-", label="train loss")
    if ev:
        ax[0].plot([x["epoch"] for x in ev], [x.get("val_loss") for x in ev], "s-", label="val loss")
        ax[1].plot([x["epoch"] for x in ev], [x["refined"]["mean_iou"] for x in ev], "s-", color=REFINED,
                   label="refined")
        ax[1].plot([x["epoch"] for x in ev], [x["coarse"]["mean_iou"] for x in ev], "--", color=COARSE, label="coarse")
        ax[1].legend(fontsize=8)
    ax[2].plot(e_tr, [x.get("lr") for x in tr], "o-")
    if tr and "head_active_units" in tr[0]:
        ax[3].plot(e_tr, [x.get("head_active_units") for x in tr], "o-", label="units active")
        ax[3].set(ylim=(0, 1.05), ylabel="share of hidden units active")
        delta = ax[3].twinx()  # the corrections are ~0.01 box sizes: their own axis
        delta.plot(e_tr, [x.get("head_delta_abs") for x in tr], "s-", color="tab:orange", label="mean |delta|")
        delta.set_ylabel("mean |correction| (box sizes)")
        ax[3].legend(handles=ax[3].get_lines() + delta.get_lines(), fontsize=8, loc="lower right")
    for a, title in zip(ax, ("loss", "val mean IoU", "learning rate (last step)", "head health"), strict=True):
        a.set(xlabel="epoch", title=title)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def robustness(levels: list[dict[str, Any]]) -> bytes:
    """Mean IoU of coarse and refined boxes against the GT jitter level."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.4, 4))
    x = [lv["noise"] for lv in levels]
    ax.plot(x, [lv["coarse_mean_iou"] for lv in levels], "o--", color=COARSE, label="coarse (jittered GT)")
    ax.plot(x, [lv["refined_mean_iou"] for lv in levels], "s-", color=REFINED, label="refined")
    ax.set(xlabel="box noise r (centre ±r·w/h, sides ×(1±r))", ylabel="mean IoU to GT", ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)
