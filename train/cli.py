"""``boxrefine train``: fit the box refiner from the feature store (no images, no image encoder)."""

from __future__ import annotations

from pathlib import Path

import typer

from boxrefine.shared.cli.common import device_option, fail, load_cli_config, set_option, stage_command

app = typer.Typer(help="Train the box refiner from cached features.")


@stage_command(app)
def train(
    config: Path = typer.Option(None, "--config", "-c",
                                help="Pipeline YAML (default pipeline.yaml; with --resume, the run's config.yaml)."),
    fast: bool = typer.Option(False, "--fast", help="Apply the fast: block of the config (FAST=1)."),
    resume: Path = typer.Option(None, "--resume", help="Continue a run folder (or a checkpoint file) exactly."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="train.epochs"),
    name: str = typer.Option(None, "--name", help="train.name: the run folder under train.runs_dir"),
    sample_ratio: float = typer.Option(None, "--sample-ratio", help="train.sample_ratio"),
    follow: bool = typer.Option(False, "--follow", help="train.follow: each epoch uses the rows complete when it "
                                "starts (train while extract --watch fills the store)."),
    device: str = device_option(),
    set_: list[str] = set_option(),
) -> None:
    """Train; writes runs/<name>/ with config, metrics.jsonl, checkpoints and curves.png."""
    if resume is not None and not resume.exists():
        fail(f"{resume}: no such run folder or checkpoint to resume")
    if config is None:
        if resume is not None:
            run = resume if resume.is_dir() else resume.parent
            config = run / "config.yaml"
        else:
            config = Path("pipeline.yaml")
    cfg = load_cli_config(config, set_, {"train.epochs": epochs, "train.name": name,
                                         "train.sample_ratio": sample_ratio, "model.device": device,
                                         "train.follow": follow or None}, fast=fast)
    from boxrefine.train.recipe import run_train

    result = run_train(cfg, resume=resume)
    if result.interrupted:
        raise typer.Exit(130)
