"""``boxrefine extract``: run the HQ-SAM image encoder once per image into the feature store."""

from __future__ import annotations

from pathlib import Path

import typer

from boxrefine.shared.cli.common import config_option, device_option, load_cli_config, set_option, stage_command

app = typer.Typer(help="Encode images once with HQ-SAM into the Zarr feature store.")


@stage_command(app)
def extract(
    config: Path = config_option(),
    split: list[str] = typer.Option(None, "--split", help="Split(s) to extract (default: all). Repeatable."),
    shard: str = typer.Option(None, "--shard", help="Process rows i, i+n, ... ('i/n'); torchrun sets it."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Images per encoder batch."),
    num_workers: int = typer.Option(None, "--num-workers", min=0, help="DataLoader decode workers."),
    store: str = typer.Option(None, "--store", help="Store path or fsspec URL (store.path)."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="HQ-SAM checkpoint file (model.checkpoint)."),
    device: str = device_option(),
    strict: bool = typer.Option(None, "--strict/--no-strict", help="Make bad images fatal."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Delete the store and rebuild it (with --split: only those splits)."),
    reuse_features: str = typer.Option(
        None, "--reuse-features",
        help="Another store (e.g. an older schema): copy the features of unchanged images instead of encoding."),
    watch: bool = typer.Option(False, "--watch", help="Run as a service until SIGTERM/SIGINT (extract.watch)."),
    interval: float = typer.Option(None, "--interval", help="Seconds between two --watch cycles "
                                   "(extract.watch_interval)."),
    set_: list[str] = set_option(),
) -> None:
    """Extract features for every image of the configured splits (incremental, crash-safe).

    With --watch, a service: every cycle picks up new or changed images and annotations; SIGTERM
    commits the rows in flight and exits 0, a second signal exits at once."""
    cfg = load_cli_config(config, set_, {
        "extract.splits": split or None, "extract.shard": shard, "extract.batch_size": batch_size,
        "extract.num_workers": num_workers, "store.path": store,
        "model.checkpoint": str(checkpoint) if checkpoint else None, "model.device": device,
        "extract.strict": strict, "extract.overwrite": overwrite or None, "extract.reuse_features": reuse_features,
        "extract.watch": watch or None, "extract.watch_interval": interval,
    })
    if not cfg.extract.watch:
        from boxrefine.extract.run import run_extract

        run_extract(cfg)
        return
    from boxrefine.extract.watch import exit_at_once, run_watch

    try:
        run_watch(cfg, cfg.extract.watch_interval)
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were set: exit now
        exit_at_once()
