"""bench/out/report.md and its charts from the JSON the benches wrote (``make bench`` runs them first).

    python bench/report.py [--out bench/out]

Reads ``peers.json`` (bench/peers.py), ``step_profile.json`` (bench/step_profile.py),
``accuracy.json`` (bench/accuracy.py), ``precision.json`` (bench/precision.py), ``eval_gt_cache.json``
(bench/eval_gt_cache.py), ``eval_every.json`` (bench/eval_every.py) and ``loader.json`` (bench/loader.py);
a missing one leaves its rows out, with a line saying so.
The summary table is also written alone to ``summary.md``; ``--readme docs/performance.md`` pastes it
between that page's ``bench:summary`` markers (its summary is that table, regenerated, never typed; the
README's figures are quoted from it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from boxrefine.shared.runtime.fileio import atomic_savefig, atomic_write_text  # noqa: E402

START, END = "<!-- bench:summary start -->", "<!-- bench:summary end -->"
PEERS = ("npy float32", "zarr float32", "boxrefine", "no cache")
MIB = 2 ** 20
EXTRA = {"accuracy": "accuracy", "eval_gt": "eval_gt_cache", "eval_every": "eval_every",
         "precision": "precision", "loader": "loader"}  # key: <out>/<name>.json


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def machine_line(m: dict) -> str:
    return f"{m['summary']}"


def load_note(machines: list[dict]) -> str:
    """Whether other work shared the machine while the benches ran (1-min load above the core count)."""
    busy = [m for m in machines if m["load"].split()[0].replace(".", "", 1).isdigit()
            and float(m["load"].split()[0]) > (m.get("cores") or 1)]
    if not busy:
        return "The 1-minute load stayed at or below the core count while the benches ran."
    return ("The 1-minute load exceeded the core count while the benches ran (other jobs shared the machine): "
            "absolute times are inflated and noisy; ratios measured side by side in one run stay meaningful.")


def summary(peers: dict | None, step: dict | None, extra: dict) -> list[str]:
    lines = ["| measure | npy float32 | zarr float32 (micro-sam) | boxrefine store | no cache |",
             "|---|---:|---:|---:|---:|"]
    if peers:
        p = peers["peers"]["peers"]

        def row(label: str, key: str, fmt: str, scale: float = 1.0) -> None:
            cells = [fmt.format(p[n][key] * scale) if key in p[n] else "–" for n in PEERS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")

        row("MiB per image", "bytes_per_image", "{:.2f}", 1 / MIB)
        row("write s per image", "write_s_per_image", "{:.3f}")
        row("read, warm (img/s)", "read_warm_img_s", "{:.1f}")
        row("read, cold (img/s)", "read_cold_img_s", "{:.1f}")
        row("training epoch (s)", "epoch_s", "{:.2f}")
        ref = p["boxrefine"]["epoch_s"]
        lines.append("| epoch ÷ boxrefine epoch | " + " | ".join(f"{p[n]['epoch_s'] / ref:.2f}" for n in PEERS) + " |")
    out = ["| speed-up (one epoch, same images and boxes) | model | images | naive (s) | cached, store (s) | "
           "cached FAST (s) | naive ÷ cached | naive ÷ FAST |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in (peers or {}).get("speedup", []):
        m = s["median_s"]
        cached = m[f"store, {s['workers']} workers persistent"]  # as train/data.py reads the store
        out.append(f"| encoder in the loop vs store | {s['model']} | {s['images']} (FAST {s['fast_images']}) | "
                   f"{m['naive']:.1f} | {cached:.1f} | {m['fast']:.2f} | {m['naive'] / cached:.1f}× | "
                   f"{m['naive'] / m['fast']:.1f}× |")
    if step:
        b, a = step["median_s"]["before"], step["median_s"]["after"]
        lines.append("")
        lines.append(f"Training step ({step['images']} images, {step['boxes']} boxes, {step['model']}): "
                     f"{b['step']:.2f} s with the package's HQ decoder → {a['step']:.2f} s "
                     f"({b['step'] / a['step']:.1f}×); the frozen decoder alone {b['frozen HQ decoder']:.2f} s → "
                     f"{a['frozen HQ decoder']:.2f} s.")
    return (lines + [""] + out + [""] + accuracy_rows(extra.get("accuracy")) + precision_rows(extra.get("precision"))
            + evaluation_rows(extra))


def precision_rows(prec: dict | None) -> list[str]:
    """Autocast's cost per step and its agreement with float32 (bench/precision.py)."""
    if not prec:
        return ["Autocast on this machine: not measured in this run (bench/precision.py).", ""]
    from bench.precision import table

    a = prec["args"]
    return [f"Autocast on this machine (bench/precision.py; CPU native bf16: {prec['native_bf16']}): a refiner "
            f"(use_mask: true) trained {a['epochs']} epochs on a signal store of {a['num_train']} train demo images, "
            f"its {a['num_val']} val images scored at each precision; one training step of the same batch per "
            f"precision, medians of {a['repeats']} interleaved repeats.", "", *table(prec), ""]


def accuracy_rows(acc: dict | None) -> list[str]:
    """The accuracy cost of each speed-up (bench/accuracy.py), on the signal store."""
    if not acc:
        return ["Accuracy beside the speed-ups: not measured in this run (bench/accuracy.py).", ""]
    from bench.accuracy import table, verdict

    a = acc["args"]
    return [f"Accuracy beside the speed-ups (bench/accuracy.py): signal store of {a['num_train']} train / "
            f"{a['num_val']} val demo images, {a['epochs']} epochs, lr {a['lr']:g}, final epoch, medians over "
            f"train seeds {', '.join(map(str, a['seeds']))} (Δ per seed in brackets); goal: defaults within "
            f"{acc['goal_points']} points of the reference → **{verdict(acc.get('goal_met'))}**.", "",
            *table(acc), ""]


def evaluation_rows(extra: dict) -> list[str]:
    """Cached GT vs decoding it at every evaluation; every-N vs every-epoch validation over a run."""
    gt, ev = extra.get("eval_gt"), extra.get("eval_every")
    out = ["| evaluation | variant | s (median) | ÷ the boxrefine row (cached GT; every N) |", "|---|---|---:|---:|"]
    if gt:
        m = gt["median_eval_s"]
        out.append(f"| `evaluate`, one checkpoint, {gt['images']} images ({gt['boxes']} boxes), "
                   f"{gt['repeats']} repeats | GT decoded + resized each time | {m['recomputed']:.2f} | "
                   f"{m['recomputed'] / m['cached']:.2f}× |")
        out.append(f"| | GT cached in the store (boxrefine) | {m['cached']:.2f} | 1.00× |")
        g = gt["gt_step_ms_per_image"]
        out.append(f"| GT step alone, per image | decode + resize vs cached read | {g['recomputed_ms']:.1f} ms vs "
                   f"{g['cached_ms']:.2f} ms | {gt['gt_step_ratio']:.0f}× |")
    if ev:
        first = True
        for name, sec in ev["median_s"].items():
            label = (f"whole `train` run, {ev['train_images']} train / {ev['val_images']} val images, "
                     f"{ev['epochs']} epochs, {ev['repeats']} repeat(s)") if first else ""
            out.append(f"| {label} | {name} ({ev['validations'][name]} validations) | {sec:.1f} | "
                       f"{ev['ratio_over_every_n'][name]:.2f}× |")
            first = False
    if len(out) == 2:
        return ["Evaluation rows: not measured in this run (bench/eval_gt_cache.py, bench/eval_every.py).", ""]
    return out + [""]


def charts(out: Path, peers: dict | None, step: dict | None) -> list[str]:
    made = []
    if peers:
        p = peers["peers"]["peers"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        vals = [p[n]["epoch_s"] for n in PEERS]
        ax.bar(PEERS, vals, color=["#999", "#69c", "#2a7", "#c66"])
        ax.set_ylabel("training epoch (s, median)")
        ax.set_title(f"{peers['peers']['images']} images, vit_tiny; median of "
                     f"{peers['peers'].get('repeats', peers['repeats'])} repeats "
                     "(no cache: 1 run)", fontsize=9)
        fig.text(0.01, 0.01, machine_line(peers["machine_start"]), fontsize=6)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        atomic_savefig(fig, out / "epoch_per_peer.png", dpi=120)
        plt.close(fig)
        made.append("epoch_per_peer.png")
    if step:
        parts = ("feature read", "frozen HQ decoder", "refiner fwd+bwd", "optimizer")
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bottom = [0.0, 0.0]
        for part in parts:
            v = [step["median_s"][k][part] for k in ("before", "after")]
            ax.bar(["package decoder", "fast decoder"], v, bottom=bottom, label=part)
            bottom = [x + y for x, y in zip(bottom, v, strict=True)]
        ax.set_ylabel("s per training step (median)")
        ax.legend(fontsize=8)
        ax.set_title(f"{step['images']} images × {step['boxes'] // step['images']} boxes, {step['model']}, "
                     f"{step['repeats']} repeats", fontsize=9)
        fig.text(0.01, 0.01, machine_line(step["machine"]), fontsize=6)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        atomic_savefig(fig, out / "step_profile.png", dpi=120)
        plt.close(fig)
        made.append("step_profile.png")
    return made


def _stream_table(title: str, m: dict, runs: dict) -> list[str]:
    lines = [title, "", "| epoch | s (median) | each repeat (s) | in-memory ÷ this (throughput vs memory) |",
             "|---|---:|---:|---:|"]
    for k, v in m.items():
        if k.startswith(("memory", "store")):
            each = " / ".join(f"{x:.1f}" for x in runs[k])
            lines.append(f"| {k} | {v:.2f} | {each} | {m['memory'] / v:.3f} |")
    return lines + [""]


def streaming(peers: dict | None) -> list[str]:
    lines = []
    for s in (peers or {}).get("speedup", []):
        lines += _stream_table(f"**{s['model']}, full step** (HQ decoder + refiner), {s['images']} images, batch "
                               f"{s['batch_images']}, {s['boxes_per_image']} boxes/image:", s["median_s"], s["runs_s"])
    d = (peers or {}).get("datapath")
    if d:
        for size in ("small", "large"):
            lines += _stream_table(f"**{d['model']}, head alone** (`use_mask: false`: no HQ decoder in the step, "
                                   f"so the data path is a larger share), {size} epoch, {d[size]['images']} images, "
                                   f"batch {d['batch_images']}, {d['repeats']} repeats:", d[size]["median_s"],
                                   d[size]["runs_s"])
            n = d[size]["images"]
            lines += ["The store's loader alone (no training step) over the same epoch: " + "; ".join(
                f"{k} {v:.2f} s ({n / v:.1f} img/s)" for k, v in d[size]["loader_alone_s"].items()) + ".", ""]
    return lines


def _cells(e: dict, ref: dict, mode: str, gbs: bool = False) -> list[str]:
    s = e["s_per_image"][mode]
    out = [f"{1 / s:,.0f}", f"{ref['s_per_image'][mode] / s:.2f}×"]
    return out + [f"{e['decoded_feature_bytes'] / s / 1e9:.2f}"] if gbs else out


def loader_rows(res: dict) -> list[str]:
    """The loader section (bench/loader.py's figures): one process, DataLoader workers, S3, epoch, profile."""
    md = [f"Machine: {res['machine_start']['summary']}; load at the end {res['machine_end']['load']}.", ""]
    for model, m in res.get("models", {}).items():
        peers = m["peers"]
        ref = peers["npy float32"]
        md += [f"**{model}** rows (interm 64×64×{m['interm_channels']}), {m['rows']} rows per peer; load "
               f"{m['machine']['load']}. One process (the item read in a loop):", "",
               "| reader | warm img/s | × npy fp32 | GB/s | cold img/s | × npy fp32 | GB/s | MiB/image (features) "
               "| × npy fp32 | MiB/row (all arrays) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, e in peers.items():
            row = e.get("row_bytes_per_image")
            md.append(f"| {name} | " + " | ".join(
                _cells(e, ref, "process warm", True) + _cells(e, ref, "process cold", True)
                + [f"{e['bytes_per_image'] / MIB:.2f}", f"{e['bytes_per_image'] / ref['bytes_per_image']:.3f}",
                   f"{row / MIB:.2f}" if row else "–"]) + " |")
        md += ["", "DataLoader, persistent workers, batch 2 (img/s, × npy fp32, and 2 workers ÷ 1 worker):", "",
               "| reader | 1 worker warm | × | 2 workers warm | × | 2w ÷ 1w | 1 worker cold | × | 2 workers cold | × "
               "| 2w ÷ 1w |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, e in peers.items():
            s = e["s_per_image"]
            cells = []
            for temp in ("warm", "cold"):
                cells += _cells(e, ref, f"1 workers {temp}") + _cells(e, ref, f"2 workers {temp}")
                cells.append(f"{s[f'1 workers {temp}'] / s[f'2 workers {temp}']:.2f}")
            md.append(f"| {name} | " + " | ".join(cells) + " |")
        md.append("")
    if "s3" in res:
        md += [f"**S3** (moto on 127.0.0.1, loopback), vit_tiny, {res['s3']['rows']} rows, the training item:", "",
               "| store | img/s | requests per row |", "|---|---:|---:|"]
        md += [f"| {k} | {1 / v['s_per_image']:.1f} | {v['requests_per_row']:.1f} |"
               for k, v in res["s3"].items() if isinstance(v, dict)] + [""]
    if "epoch" in res:
        e = res["epoch"]
        md += [f"**An epoch** of {e['images']} vit_tiny images (store codec {e['codec']}): train's DataLoader alone "
               f"({e['workers']} workers, the step a no-op) {e['loader_only_epoch_s']:.3f} s; the CPU training "
               f"steps of the same batches {e['step_epoch_s']:.1f} s: the "
               f"{'step' if e['step_epoch_s'] > e['loader_only_epoch_s'] else 'loader'} bounds the epoch.", ""]
    for name, p in res.get("profile", {}).items():
        md.append(f"Profile of `StoreRows[k]`, {name}: {p['ms_per_item_profiled']:.2f} ms per item under cProfile; "
                  + "; ".join(f"{t['function']} {100 * t['share']:.0f} %" for t in p["top"]) + ".")
    return md + [""]


def peers_section(peers: dict) -> list[str]:
    """The caches-side-by-side section of the report."""
    md: list[str] = []
    pp = peers["peers"]
    md += ["## Caches side by side", "",
           f"{pp['images']} training images, vit_tiny (random init), encoder "
           f"{pp['encoder_s_per_image']:.2f} s per image. npy: two `.npy` files per image (embedding and "
           "early-layer feature). zarr float32: one chunk per image and array, zarr's default codecs "
           f"(zarr {peers.get('zarr', '')}: {pp.get('zarr_default_codecs', '?')}). "
           "boxrefine: the store `extract` wrote (float16, `store.codec` "
           "none: no compressor, crc32c), read through `StoreRows` (every read checksum-verified); "
           "its write time is the same arrays written with the store's codecs. Cold reads drop every "
           "file of the cache with `posix_fadvise(DONTNEED)` first; reads are medians of "
           f"{pp.get('read_repeats', '?')} shuffled epochs per cache, round robin over the caches. "
           "The training epoch reads each batch's "
           "features from the cache inside the loop (no DataLoader workers), same boxes and order.", "",
           "| cache | MiB per image | write s per image | read warm img/s | read cold img/s | epoch s |",
           "|---|---:|---:|---:|---:|---:|"]
    for name, v in pp["peers"].items():
        cells = [f"{v['bytes_per_image'] / MIB:.2f}" if "bytes_per_image" in v else "–",
                 f"{v['write_s_per_image']:.3f}" if "write_s_per_image" in v else "–"]
        cells += [f"{v[k]:.1f}" if k in v else "–" for k in ("read_warm_img_s", "read_cold_img_s")]
        cells.append(f"{v['epoch_s']:.2f}" if "epoch_s" in v else "–")
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    md += ["", "Training epochs per repeat (s): " + "; ".join(
        f"{k} " + " / ".join(f"{x:.1f}" for x in v) for k, v in pp["train_runs_s"].items())
        + f"; no cache (1 run) {pp['peers']['no cache']['epoch_s']:.1f}. Under this load the spread between "
        "repeats is larger than the differences between caches: the epoch row compares the caches only "
        "where they differ by more than that spread."]
    md += ["", "*boxrefine, zarr read*: the same arrays with the store's codecs read as plain zarr arrays "
           "(no GT, no row checksums): the codec's share of the store read. *boxrefine, zstd* / *lz4*: the "
           "same with `store.codec: zstd` / `lz4`.", "", "![epoch per peer](epoch_per_peer.png)", ""]
    return md


def report(out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    peers, step = _load(out / "peers.json"), _load(out / "step_profile.json")
    extra = {k: _load(out / f"{name}.json") for k, name in EXTRA.items()}
    summ = summary(peers, step, extra)
    atomic_write_text(out / "summary.md", "\n".join(summ) + "\n")
    made = charts(out, peers, step)
    machines = [x for x in ((peers or {}).get("machine_start"), (peers or {}).get("machine_end"),
                            (peers or {}).get("peers", {}).get("machine"), (step or {}).get("machine")) if x]
    md = ["# boxrefine benchmarks", "",
          "Machine: " + (machines[0]["summary"].rsplit(", load", 1)[0] if machines else "unknown") + ".",
          "Load averages (1/5/15 min) when the benches ran: " + "; ".join(m["load"] for m in machines) + ".",
          load_note(machines),
          "Medians of repeats: " + "; ".join(
              ([f"caches {peers['peers'].get('repeats', peers['repeats'])}",
                f"reads {peers['peers'].get('read_repeats', '?')}",
                f"streamed vs memory and naive vs cached {peers['repeats']} (vit_b 1)"] if peers else [])
              + ([f"step profile {step['repeats']}"] if step else [])) + ".", "",
          "## Summary", "", *summ, ""]
    if peers:
        md += peers_section(peers)
    if step:
        from bench.step_profile import table

        md += ["## Where a training step goes", "", f"{step['images']} images, {step['boxes']} boxes, "
               f"{step['model']}, precision {step['amp']}, medians of {step['repeats']} repeats. *Before*: the "
               "package's `MaskDecoderHQ.forward` per image, whole masks; *after*: `shared/model/hq_decoder.py` "
               "(per-image work once, one mask token, only the logits the refiner reads, all boxes of the step in one "
               "call; `tests/test_hq_decoder.py` checks the logits against the package).", "",
               table(step), "", "![step profile](step_profile.png)", ""]
    if extra["loader"]:
        md += ["## Reading the training item (bench/loader.py)", "", "`StoreRows[k]` (features + GT boxes and "
               "info, every chunk's crc32c, the row's value digests, the generation re-check) beside peers that "
               "read the two feature arrays and check nothing; medians of "
               f"{extra['loader']['repeats']} interleaved repeats; cold = the peer's files dropped from the page "
               "cache first; GB/s = decoded feature bytes per second.", "", *loader_rows(extra["loader"])]
    if peers:
        md += ["## Streamed from the store vs in memory", "",
               "Same epoch: batches already in memory, or read from the store by a DataLoader with no "
               "workers, with workers started anew for the epoch (what `bench/train_throughput.py` did), or "
               "with persistent workers started before (what `train/data.py` does).", "", *streaming(peers)]
    missing = [f"{name}.json" for k, name in EXTRA.items() if not extra[k]]
    if missing:
        md += ["## Not in this report", "", "Not found under the output folder (their bench did not run): "
               + ", ".join(missing) + "."]
    if made:
        md.append("")
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return "\n".join(summ)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    ap.add_argument("--readme", type=Path,
                    help="paste the summary into this file (docs/performance.md), between its bench:summary markers")
    args = ap.parse_args()
    summ = report(args.out)
    print(summ)
    if args.readme:
        text = args.readme.read_text()
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        machine_note = (args.out / "report.md").read_text().split("\n## Summary", 1)[0].split("\n", 2)[2].strip()
        atomic_write_text(args.readme, f"{head}{START}\n{machine_note}\n\n{summ}\n{END}{tail}")


if __name__ == "__main__":
    main()
