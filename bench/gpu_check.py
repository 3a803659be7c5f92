"""``make gpu-check``: the CUDA paths tested, then one table of what a GPU does with boxrefine.

On a CUDA machine (one script, nothing downloaded; a few minutes on one H100):

1. the GPU-marked tests (``tests/test_gpu.py``: train / evaluate / refine under float16 + GradScaler
   and bfloat16, extract with a float16 encoder, a DDP step over a 1-rank NCCL group, pinned-memory
   loading);
2. encoder images/s (vit_tiny, vit_b; random init; float32 / float16 / bfloat16 autocast; batch 8);
3. one training step (fast HQ decoder + head, 8 images × 8 boxes; float32 vs bfloat16 vs float16 +
   GradScaler), in ms, with peak GPU memory;
4. the store loader's images/s (the training DataLoader: workers, pinned memory) beside the images/s
   that the step consumes;
5. evaluate's wall time on the demo val split.

The card, driver, CUDA and torch versions head the table. Without CUDA it prints "no CUDA device:
nothing measured" and exits 0: that is not a pass of anything. Usage::

    python bench/gpu_check.py [--json bench/out/gpu_check.json] [--no-tests]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Plan:
    """What is measured: the full check on CUDA, or ``--smoke`` (the same code on the CPU at a tiny size,
    so that the suite runs this script where no GPU is)."""

    def __init__(self, smoke: bool):
        self.device = torch.device("cpu" if smoke else "cuda")
        self.models = ("vit_tiny",) if smoke else ("vit_tiny", "vit_b")
        self.precisions = {k: v for k, v in PRECISIONS.items() if not (smoke and k == "float16")}  # slow on CPU
        self.images, self.boxes = (1, 2) if smoke else (8, 8)
        self.train_images, self.val_images, self.workers = (4, 1, 0) if smoke else (16, 4, 4)


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def sync_time(fn, dev: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` (the GPU synchronised), after ``warmup`` untimed calls."""
    times = []
    for i in range(warmup + repeats):
        synchronize(dev)
        t0 = time.perf_counter()
        fn()
        synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def card(dev: torch.device) -> dict[str, Any]:
    if dev.type != "cuda":
        return {"gpu": "none (--smoke on the CPU)", "memory_gib": 0, "driver": "-", "cuda": "-",
                "torch": torch.__version__, "bf16": False}
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = "unknown"
    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "driver": driver,
            "cuda": torch.version.cuda, "torch": torch.__version__, "bf16": torch.cuda.is_bf16_supported()}


def run_tests() -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py",
                           "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True)
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    if proc.returncode:
        print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n")
    return {"returncode": proc.returncode, "summary": last, "seconds": time.perf_counter() - t0}


def encoder_rates(plan: Plan, repeats: int) -> dict[str, dict[str, float]]:
    from boxrefine.shared.model.sam import build_hq_sam, encode

    dev = plan.device
    images = [torch.randint(0, 256, (1, 3, 1024, 1024), dtype=torch.uint8, device=dev) for _ in range(plan.images)]
    out: dict[str, dict[str, float]] = {}
    for model in plan.models:
        sam = build_hq_sam(model, None, 0, dev, announce=False)
        for name in plan.precisions:
            reset_peak(dev)
            s = sync_time(lambda sam=sam, name=name: encode(sam, images, name), dev, repeats)
            out[f"{model} {name}"] = {"images_per_s": plan.images / s, "peak_gib": peak_gib(dev)}
        del sam
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def demo_config(plan: Plan, work: Path):
    from bench.workdir import bench_config
    from boxrefine.extract.run import run_extract

    cfg = bench_config(work, plan.train_images, num_val=plan.val_images, overrides={
        "model.device": plan.device.type, "train.batch_images": plan.images, "train.boxes_per_image": plan.boxes,
        "train.num_workers": plan.workers, "train.runs_dir": str(work / "runs"), "train.epochs": 2,
        "train.amp": "auto", "refiner.use_mask": True, "extract.num_workers": plan.workers})
    run_extract(cfg, announce=False)
    return cfg


def step_times(plan: Plan, cfg, repeats: int) -> dict[str, dict[str, float]]:
    from boxrefine.shared.model.heads import build_refiner
    from boxrefine.shared.model.sam import INTERM_CHANNELS, build_sam_heads
    from boxrefine.shared.store.rows import StoreRows, collate_rows
    from boxrefine.train.steps import batch_loss

    dev = plan.device
    ds = StoreRows.from_store(cfg.store.path, "train")
    batch = collate_rows([ds[i] for i in range(plan.images)])
    heads = build_sam_heads(cfg.model.type, None, cfg.model.seed, dev, announce=False)
    out = {}
    for name, dtype in plan.precisions.items():
        refiner = build_refiner(INTERM_CHANNELS[cfg.model.type], **cfg.refiner.model_dump()).to(dev)
        opt = torch.optim.AdamW(refiner.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)

        def step():
            loss, _, _ = batch_loss(batch, refiner, heads, dev, dtype, cfg.train, {}, 0)  # noqa: B023
            opt.zero_grad(set_to_none=True)  # noqa: B023
            scaler.scale(loss).backward()  # noqa: B023
            scaler.step(opt)  # noqa: B023
            scaler.update()  # noqa: B023

        reset_peak(dev)
        s = sync_time(step, dev, repeats, warmup=2)
        out[name] = {"ms": 1000 * s, "images_per_s": plan.images / s, "peak_gib": peak_gib(dev)}
    return out


def loader_rate(plan: Plan, cfg, epochs: int = 3) -> float:
    """Images/s of the training DataLoader alone (the step replaced by a copy to the GPU)."""
    from boxrefine.shared.store.feature_store import open_store
    from boxrefine.train.data import TrainData

    data = TrainData(cfg, open_store(cfg.store.path), pin_memory=plan.device.type == "cuda")
    n, t0 = 0, None
    for epoch in range(epochs + 1):  # epoch 0 starts the persistent workers and is not counted
        if epoch == 1:
            t0 = time.perf_counter()
        data.sampler.set_epoch(epoch, 0)
        for b in data.loader:
            b["image_embeddings"].to(plan.device, non_blocking=True)
            b["interm_embeddings"].to(plan.device, non_blocking=True)
            n += len(b["row"]) if epoch else 0
    synchronize(plan.device)
    return n / (time.perf_counter() - t0)


def evaluate_seconds(cfg) -> dict[str, float]:
    from boxrefine.evaluate.run import run_evaluate
    from boxrefine.train.recipe import run_train

    cfg.train.name = f"gpucheck-{time.strftime('%H%M%S')}"
    t0 = time.perf_counter()
    run = run_train(cfg).run_dir
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_evaluate(cfg, run / "best.pt")
    return {"train_s": train_s, "evaluate_s": time.perf_counter() - t0}


def table(res: dict[str, Any]) -> str:
    c, p = res["card"], res["plan"]
    precisions = p["precisions"]

    def cell(x: dict[str, float] | None, key: str, fmt: str) -> str:
        return "–" if x is None or x[key] is None else format(x[key], fmt)

    lines = [f"GPU check on {c['gpu']} ({c['memory_gib']} GiB), driver {c['driver']}, CUDA {c['cuda']}, "
             f"torch {c['torch']}; GPU tests: {res['tests']['summary']}", "",
             "| measure | " + " | ".join(PRECISIONS) + " |", "|---|" + "---:|" * len(PRECISIONS)]
    for model in p["models"]:
        e = [res["encoder"].get(f"{model} {q}") for q in PRECISIONS]
        lines.append(f"| encoder {model}, images/s (batch {p['images']}) | "
                     + " | ".join(cell(x, "images_per_s", ".1f") for x in e) + " |")
        lines.append(f"| encoder {model}, peak GiB | " + " | ".join(cell(x, "peak_gib", ".2f") for x in e) + " |")
    st = [res["step"].get(q) for q in PRECISIONS]
    lines += [f"| training step ms ({p['images']} images × {p['boxes']} boxes, fast decoder + head) | "
              + " | ".join(cell(x, "ms", ".1f") for x in st) + " |",
              "| training step images/s | " + " | ".join(cell(x, "images_per_s", ".0f") for x in st) + " |",
              "| training step peak GiB | " + " | ".join(cell(x, "peak_gib", ".2f") for x in st) + " |", "",
              f"Store loader (the train DataLoader, {p['workers']} workers, pinned memory on CUDA): "
              f"{res['loader_images_per_s']:.0f} images/s beside the step's "
              + " / ".join(f"{res['step'][q]['images_per_s']:.0f} ({q})" for q in precisions)
              + f" images/s. Train 2 epochs ({res['eval']['train_s']:.1f} s), then evaluate on the "
              f"{p['val_images']} val images: {res['eval']['evaluate_s']:.1f} s."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "gpu_check")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-tests", action="store_true", help="measure only")
    ap.add_argument("--smoke", action="store_true", help="the same code on the CPU at a tiny size (for the suite)")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return 0
    from bench.machine import machine, write_json

    plan = Plan(args.smoke)
    repeats = 1 if args.smoke else args.repeats
    t0 = time.perf_counter()
    res: dict[str, Any] = {"card": card(plan.device), "machine": machine(), "plan": {
        "models": plan.models, "precisions": list(plan.precisions), "images": plan.images, "boxes": plan.boxes,
        "workers": plan.workers, "val_images": plan.val_images}}
    res["tests"] = {"summary": "not run", "returncode": 0} if args.no_tests or args.smoke else run_tests()
    res["encoder"] = encoder_rates(plan, repeats)
    cfg = demo_config(plan, args.work)
    res["step"] = step_times(plan, cfg, repeats * 2)
    res["loader_images_per_s"] = loader_rate(plan, cfg)
    res["eval"] = evaluate_seconds(cfg)
    res["seconds"] = time.perf_counter() - t0
    print(table(res))
    print(f"({res['seconds']:.0f} s in all)")
    if args.json:
        write_json(args.json, res)
    return 1 if res["tests"]["returncode"] else 0


if __name__ == "__main__":
    sys.exit(main())
