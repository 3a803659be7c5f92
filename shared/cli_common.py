"""Helpers shared by the stage CLIs: the --config/--set options and one-line error exits."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import typer

from shared.config import ConfigError, PipelineConfig, load_config, parse_set_option
from shared.console import console


def config_option() -> Any:
    return typer.Option(Path("pipeline.yaml"), "--config", "-c", help="The pipeline YAML file.")


def set_option() -> Any:
    return typer.Option(None, "--set", help="Override any config key, e.g. --set extract.batch_size=4. "
                        "Repeatable.")


def fail(message: str, code: int = 1) -> NoReturn:
    console.print(f"[bold red]error:[/bold red] {message}", soft_wrap=True)
    raise typer.Exit(code)


def load_cli_config(path: Path, sets: list[str] | None, flags: dict[str, Any], fast: bool = False) -> PipelineConfig:
    """Config file (+ its ``fast:`` block) + ``--set`` overrides + explicit flags (flags win); exits
    with every error listed."""
    try:
        overrides = dict(parse_set_option(s) for s in (sets or []))
        overrides.update({k: v for k, v in flags.items() if v is not None})
        return load_config(path, overrides, fast=fast)
    except ConfigError as e:
        fail(str(e), code=2)
