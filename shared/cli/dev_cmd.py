"""``boxrefine demo-data`` (the built-in synthetic data set) and the hidden ``boxrefine dev`` tools
(``signal-store``): the command lines over ``shared/dev``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from boxrefine.shared.cli.common import fail, one_line_errors
from boxrefine.shared.config import load_config
from boxrefine.shared.dev.demo import demo_root_of, generate_demo
from boxrefine.shared.dev.signal import make_signal_store
from boxrefine.shared.runtime.console import console

demo_app = typer.Typer(help="Generate the built-in synthetic demo dataset.", no_args_is_help=False)


@demo_app.command()
def demo_data(
    out: Path = typer.Option(None, "--out", help="Output folder (images/ and annotations/). Default: where "
                             "--config's train and val splits read it (data/demo for pipeline.yaml)."),
    config: Path = typer.Option(Path("pipeline.yaml"), "--config", "-c",
                                help="The pipeline YAML whose splits name the demo folder (when --out is not given)."),
    num_train: int = typer.Option(16, "--num-train", min=1, help="Number of training images."),
    num_val: int = typer.Option(8, "--num-val", min=1, help="Number of validation images."),
    seed: int = typer.Option(0, "--seed", help="Random seed; same seed, same dataset."),
    noise: float = typer.Option(0.25, "--noise", min=0.0, max=0.4, help="Jitter of the coarse boxes."),
) -> None:
    """Generate the synthetic mushroom dataset (COCO instances + coarse detections)."""
    if out is None:
        out = _demo_folder(config)
    summary = generate_demo(out, num_train=num_train, num_val=num_val, seed=seed, noise=noise)
    console = Console()
    console.print(Text.assemble(("Demo dataset written to ", "bold green"), str(summary["out"])), soft_wrap=True)
    for split, s in summary["splits"].items():
        console.print(Text.assemble("  ", (split, "bold"),
                                    f": {s['images']} images, {s['instances']} instances -> images/{split}/, "
                                    f"annotations/instances_{split}.json, annotations/detections_{split}.json"),
                      soft_wrap=True)


@one_line_errors
def _demo_folder(config: Path) -> Path:
    """The demo folder of a config (``demo_root_of``); the built-in data/demo without a config file."""
    if not config.exists() and config == Path("pipeline.yaml"):
        return Path("data/demo")
    cfg = load_config(config)
    try:
        return demo_root_of(cfg.data.splits)
    except ValueError as e:
        fail(f"{config}: {e}; pass --out")


dev_app = typer.Typer(help="Developer tools (not pipeline stages).", no_args_is_help=True)


@dev_app.command("signal-store")
@one_line_errors
def signal_store_cmd(
    src: str = typer.Argument(..., help="An extracted feature store (path or fsspec URL)."),
    dst: str = typer.Argument(..., help="Where to write the signal copy."),
    gain: float = typer.Option(3.0, "--gain", min=0.0, help="Multiplier of the GT channels."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists."),
) -> None:
    """Copy a store with its ground truth written into the image-embedding channels, to check that a
    refiner recipe learns (train/evaluate read it like any store; its numbers mean nothing for real data)."""
    if Path(src).resolve() == Path(dst).resolve() and "://" not in src:
        fail(f"{dst}: the signal store must not replace its source")
    summary = make_signal_store(src, dst, gain, overwrite)
    for name, s in summary.items():
        extra = f", {s['instances_dropped']} instance channel(s) dropped (over 254)" if s["instances_dropped"] else ""
        console.print(f"{name}: {s['rows']} rows with GT in image_embeddings{extra}", markup=False)
    console.print(f"signal store written to {dst} (for checking recipes only)", markup=False)
