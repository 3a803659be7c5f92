"""``boxrefine train``: fit the box refiner from the feature store (no images, no image encoder)."""

from __future__ import annotations

from pathlib import Path

import typer

from shared.cli_common import fail, load_cli_config, set_option

app = typer.Typer(help="Train the box refiner from cached features.")


@app.callback(invoke_without_command=True)
def train(
    config: Path = typer.Option(None, "--config", "-c",
                                help="Pipeline YAML (default pipeline.yaml; with --resume, the run's config.yaml)."),
    fast: bool = typer.Option(False, "--fast", help="Apply the fast: block of the config (FAST=1)."),
    resume: Path = typer.Option(None, "--resume", help="Continue a run folder (or a checkpoint file) exactly."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="train.epochs"),
    name: str = typer.Option(None, "--name", help="train.name: the run folder under train.runs_dir"),
    sample_ratio: float = typer.Option(None, "--sample-ratio", help="train.sample_ratio"),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N"),
    set_: list[str] = set_option(),
) -> None:
    """Train; writes runs/<name>/ with config, metrics.jsonl, checkpoints and curves.png."""
    if config is None:
        if resume is not None:
            run = resume if resume.is_dir() else resume.parent
            config = run / "config.yaml"
        else:
            config = Path("pipeline.yaml")
    cfg = load_cli_config(config, set_, {"train.epochs": epochs, "train.name": name,
                                         "train.sample_ratio": sample_ratio, "model.device": device}, fast=fast)
    from shared.records import DataError
    from shared.sam import CheckpointError
    from shared.store import StoreError
    from train.run import TrainError, run_train

    try:
        result = run_train(cfg, resume=resume)
    except (TrainError, StoreError, DataError, CheckpointError, ValueError) as e:
        fail(str(e))
    if result.interrupted:
        raise typer.Exit(130)
