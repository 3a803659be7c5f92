"""1 process vs 2 torchrun ranks: extraction (images/s) and DDP training (images/s), side by side.

    python bench/scaleout.py [--images 8] [--epochs 3] [--repeats 2] [--out bench/out/scaleout]

Each repeat runs, in alternation on the same demo images, ``boxrefine extract`` as one process and as
``torchrun --standalone --nproc_per_node 2`` (each rank encodes every other row into one store), then
``boxrefine train`` (FAST recipe, use_mask false) as one process and as 2 DDP ranks (gloo on CPU) with
the same global batch. The CPU threads are split fairly: one process gets all cores
(``OMP_NUM_THREADS`` = cores), each of 2 ranks half of them. On a machine with fewer cores than a real
node this measures the overhead of the launch and of DDP's all-reduce, not a speed-up: 2 ranks on 2
cores do the same arithmetic on the same cores. Reports medians and the 2-rank ÷ 1-process ratio, and
names the machine (CPU model, cores, GPU if any, load average).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import describe as machine  # noqa: E402
from boxrefine.shared.dev.demo import generate_demo  # noqa: E402


def write_config(path: Path, data: Path, store: Path, runs: Path, epochs: int) -> Path:
    cfg = {
        "data": {"splits": {
            split: {"images": str(data / "images" / split),
                    "annotations": str(data / "annotations" / f"instances_{split}.json")}
            for split in ("train", "val")}},
        "model": {"type": "vit_tiny", "device": "cpu"},
        "store": {"path": str(store)},
        "refiner": {"use_mask": False},
        "train": {"runs_dir": str(runs), "epochs": epochs, "batch_images": 2, "boxes_per_image": 8,
                  "num_workers": 0, "eval_every": epochs, "keep_top_k": 0},
    }
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore", "CI": "true"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="train images (val: a quarter of them, at least 2)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "scaleout")
    a = ap.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    data = a.out / "data"
    n_val = max(2, a.images // 4)
    generate_demo(data, num_train=a.images, num_val=n_val, seed=0)
    cores = os.cpu_count() or 2
    py = [sys.executable]
    torchrun = py + ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cli = ["-m", "boxrefine.shared.cli"]
    where = machine()
    print(f"machine: {where}", flush=True)
    times: dict[str, list[float]] = {k: [] for k in ("extract 1", "extract 2", "train 1", "train 2")}
    for r in range(a.repeats):
        for ranks in (1, 2):
            base = a.out / f"r{r}-{ranks}"
            cfg = write_config(base.with_suffix(".yaml"), data, base / "features.zarr", base / "runs", a.epochs)
            launch = (torchrun if ranks == 2 else py) + cli
            threads = cores // ranks
            times[f"extract {ranks}"].append(run(launch + ["extract", "--config", str(cfg)], threads))
            times[f"train {ranks}"].append(run(launch + ["train", "--config", str(cfg), "--name", "run"], threads))
            print(f"repeat {r + 1}: {ranks} rank(s): extract {times[f'extract {ranks}'][-1]:.1f} s, "
                  f"train {times[f'train {ranks}'][-1]:.1f} s", flush=True)
    n_extract = a.images + n_val
    n_train = a.images * a.epochs
    rows = []
    for stage, n in (("extract", n_extract), ("train", n_train)):
        one, two = statistics.median(times[f"{stage} 1"]), statistics.median(times[f"{stage} 2"])
        rows.append(f"| {stage} ({n} images{' × epochs' if stage == 'train' else ''}) | {one:.1f} s, "
                    f"{n / one:.2f} img/s | {two:.1f} s, {n / two:.2f} img/s | {one / two:.2f}× |")
    report = "\n".join([
        f"machine: {where}; load average {os.getloadavg()[0]:.1f} at the end",
        f"command: python bench/scaleout.py --images {a.images} --epochs {a.epochs} --repeats {a.repeats}"
        " (wall time of the whole command, process start and model build included; medians)",
        "", "| stage | 1 process | 2 torchrun ranks | speed-up |", "|---|---|---|---|", *rows])
    (a.out / "report.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
