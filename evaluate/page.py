"""``eval/report.html``: one self-contained page (inline PNGs and CSS, no script, nothing fetched) that
opens from disk and shows where the refiner gains and where it loses.

Every number in its tables is read from the metrics.json document it is written with, and each number
cell names its place there (``data-metric="checkpoints/0/by_size/small/AP"``) and its digits
(``data-digits``), so a test can check the page against the file. User data (file names, paths, the
config) is escaped.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:22px} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd} h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0} th,td{padding:3px 9px;border-bottom:1px solid #eee}
td.n{text-align:right;font-variant-numeric:tabular-nums} th{background:#f5f5f5;text-align:right}
th.l,td.l{text-align:left} tr.best td{font-weight:bold} tr.base td{color:#666}
.meta,.note{color:#555} .figs{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.gallery{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0;width:232px}
img{max-width:100%;height:auto} figure img{border:1px solid #ccc;image-rendering:pixelated} figcaption{font-size:12px}
.gt{color:#00c800} .coarse{color:#e61e1e} .refined{color:#1e5aff} .up{color:#1a9641} .down{color:#d7191c}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}
"""

BOX_COLUMNS = (("mean_iou", "IoU", 3), ("acc@0.5", "≥.5", 3), ("acc@0.75", "≥.75", 3), ("acc@0.9", "≥.9", 3),
               ("side_err_px", "side px", 1), ("AP", "AP", 3), ("AP50", "AP50", 3), ("AP75", "AP75", 3),
               ("mask_iou", "mask", 3))
SPLIT_TITLES = {"by_size": "By COCO object size (GT area: small < 32², medium < 96², large)",
                "by_coarse_iou": "By the coarse box's IoU band"}


@dataclass
class GalleryEntry:
    png: bytes | None
    caption: str  # plain text: escaped when written
    coarse_iou: float
    refined_iou: float


@dataclass
class ReportParts:
    """What the page shows besides metrics.json: figures (PNG bytes), galleries, training history."""

    run_name: str
    figures: dict[str, bytes] = field(default_factory=dict)  # "scatter", "gain", "curves", "robustness"
    gained: list[GalleryEntry] = field(default_factory=list)
    lost: list[GalleryEntry] = field(default_factory=list)
    gallery_note: str = ""  # why a gallery is missing or incomplete
    curves_note: str = ""
    config_text: str | None = None


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def cell(doc: dict[str, Any], path: str, digits: int) -> str:
    """A number cell: the value at ``path`` ("a/b/0/c") of ``doc``, formatted with ``digits``."""
    v: Any = doc
    for part in path.split("/"):
        v = v[int(part)] if isinstance(v, list) else v.get(part) if isinstance(v, dict) else None
    text = "—" if v is None else f"{v:.{digits}f}" if digits else str(v)
    return f'<td class="n" data-metric="{esc(path)}" data-digits="{digits}">{text}</td>'


def _models(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, metrics.json path, row class) of the baselines and every checkpoint."""
    out = [("coarse", "baselines/coarse", "base"), ("zero-shot HQ-SAM", "baselines/zero_shot", "base")]
    for i, r in enumerate(doc["checkpoints"]):
        label = r["checkpoint"] + (f" (= {', '.join(r['aliases'])})" if r.get("aliases") else "")
        out.append((label, f"checkpoints/{i}", "best" if r["checkpoint"] == doc.get("best") else ""))
    return out


def scores_table(doc: dict[str, Any]) -> str:
    head = "".join(f"<th>{esc(t)}</th>" for _, t, _ in BOX_COLUMNS)
    rows = [f'<tr class="{c}"><td class="l">{esc(label)}</td>' + "".join(cell(doc, f"{p}/{k}", d)
                                                                       for k, _, d in BOX_COLUMNS) + "</tr>"
            for label, p, c in _models(doc)]
    return f'<table id="scores"><tr><th class="l">boxes</th>{head}</tr>{"".join(rows)}</table>'


def split_table(doc: dict[str, Any], kind: str) -> str:
    """One row per model, per group its box count and mean IoU (and AP/AP50/AP75 by size)."""
    groups = list(doc["baselines"]["coarse"].get(kind, {}))
    keys = [("mean_iou", "IoU", 3)] + ([("AP", "AP", 3), ("AP50", "AP50", 3), ("AP75", "AP75", 3)]
                                       if kind == "by_size" else [])
    top = "".join(f'<th colspan="{len(keys)}">{esc(g)} ({cell_count(doc, kind, g)} boxes)</th>' for g in groups)
    sub = "".join(f"<th>{t}</th>" for _ in groups for _, t, _ in keys)
    rows = [f'<tr class="{c}"><td class="l">{esc(label)}</td>'
            + "".join(cell(doc, f"{p}/{kind}/{g}/{k}", d) for g in groups for k, _, d in keys) + "</tr>"
            for label, p, c in _models(doc)]
    return (f'<h3>{esc(SPLIT_TITLES[kind])}</h3><table id="{kind}"><tr><th class="l" rowspan="2">boxes</th>{top}'
            f'</tr><tr>{sub}</tr>{"".join(rows)}</table>')


def cell_count(doc: dict[str, Any], kind: str, group: str) -> int:
    return int(doc["baselines"]["coarse"][kind][group]["boxes"])


def img(data: bytes, alt: str, cls: str = "") -> str:
    return (f'<img class="{cls}" alt="{esc(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode("ascii")}">')


def gallery(title: str, entries: list[GalleryEntry], empty: str) -> str:
    figs = []
    for e in entries:
        sign = "up" if e.refined_iou > e.coarse_iou else "down"
        pic = img(e.png, e.caption, "crop") if e.png is not None else "<p class='note'>(image not readable)</p>"
        figs.append(f"<figure>{pic}<figcaption>{esc(e.caption)}<br><span class='coarse'>coarse "
                    f"{e.coarse_iou:.3f}</span> → <span class='refined'>refined {e.refined_iou:.3f}</span> "
                    f"<span class='{sign}'>({e.refined_iou - e.coarse_iou:+.3f})</span></figcaption></figure>")
    body = "".join(figs) if figs else f"<p class='note'>{esc(empty)}</p>"
    return f"<h3>{esc(title)}</h3><div class='gallery'>{body}</div>"


def robustness_table(doc: dict[str, Any]) -> str:
    rows = "".join(f"<tr>{cell(doc, f'noise/{i}/noise', 2)}{cell(doc, f'noise/{i}/boxes', 0)}"
                   f"{cell(doc, f'noise/{i}/coarse_mean_iou', 3)}{cell(doc, f'noise/{i}/refined_mean_iou', 3)}</tr>"
                   for i in range(len(doc.get("noise") or [])))
    return (f'<table id="noise"><tr><th>noise r</th><th>boxes</th><th>coarse IoU</th><th>refined IoU</th></tr>'
            f"{rows}</table>")


def render(doc: dict[str, Any], parts: ReportParts) -> str:
    """The whole page."""
    f = parts.figures
    s = doc
    meta = (f"split {s['split']}: {s.get('images')} images, {s.get('boxes')} boxes matched to GT "
            f"({s.get('unmatched') or 0} unmatched); evaluation boxes: {s['eval_boxes']['source']}; AP: {s['ap']}; "
            f"best checkpoint (refined mean IoU): {s.get('best')}; device {s.get('device')}, "
            f"precision {s.get('amp') or 'float32'}; store {s.get('store')}")
    legend = ("IoU: mean box IoU to GT; ≥t: share of boxes with IoU ≥ t; side px: mean |side error| in pixels; "
              "AP: COCO box AP (needs scored detections); mask: IoU of HQ-SAM's mask prompted by the box")
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>boxrefine evaluation: "
           f"{esc(parts.run_name)}</title><style>{CSS}</style></head><body>",
           f"<h1>boxrefine evaluation — {esc(parts.run_name)}</h1><p class='meta'>{esc(meta)}</p>",
           "<h2 id='scores-title'>Scores</h2>", scores_table(doc), f"<p class='note'>{esc(legend)}</p>",
           split_table(doc, "by_size"), split_table(doc, "by_coarse_iou"),
           "<h2>Per box: coarse vs refined IoU</h2><div class='figs'>"]
    out += [img(f[k], alt) for k, alt in (("scatter", "coarse vs refined IoU"), ("gain", "IoU gain histogram"))
            if k in f]
    out.append("</div>")
    out += ["<h2>The boxes that gained and lost most</h2><p class='note'>Crops enlarged around each box: "
            "<span class='gt'>ground truth</span>, <span class='coarse'>coarse</span>, "
            "<span class='refined'>refined</span>.</p>"]
    if parts.gallery_note:
        out.append(f"<p class='note' id='gallery-note'>{esc(parts.gallery_note)}</p>")
    out += [gallery("Gained most", parts.gained, "no box gained IoU"),
            gallery("Lost most", parts.lost, "no box lost IoU")]
    out.append("<h2>Training</h2>")
    out.append(img(f["curves"], "training curves") if "curves" in f
               else f"<p class='note'>{esc(parts.curves_note)}</p>")
    if parts.config_text is not None:
        out.append(f"<details><summary>resolved config of the run</summary><pre>{esc(parts.config_text)}</pre>"
                   "</details>")
    out.append("<h2>Robustness to box noise</h2>")
    if doc.get("noise"):
        out += [f"<div class='figs'>{img(f['robustness'], 'robustness curve')}{robustness_table(doc)}</div>",
                "<p class='note'>The best checkpoint on GT boxes jittered at each level, seeded per image "
                "(evaluate.seed).</p>"]
    else:
        out.append("<p class='note'>Not measured: run <code>boxrefine evaluate --noise 0.1,0.2,0.3,0.4</code>.</p>")
    out.append("</body></html>\n")
    return "\n".join(out)
