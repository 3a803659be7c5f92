"""Helpers shared by the stage CLIs: the --config/--set options and one-line error exits."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.text import Text

from boxrefine.shared.config import PipelineConfig, load_config, parse_set_option
from boxrefine.shared.errors import BoxrefineError
from boxrefine.shared.runtime.console import console

F = TypeVar("F", bound=Callable[..., Any])


def config_option() -> Any:
    return typer.Option(Path("pipeline.yaml"), "--config", "-c", help="The pipeline YAML file.")


def device_option() -> Any:
    return typer.Option(None, "--device", help="model.device: auto | cpu | cuda | cuda:N")


def stage_command(app: typer.Typer) -> Callable[[F], F]:
    """Register a stage's command as its typer app's one command, with :func:`one_line_errors`; the
    composition root mounts it as a leaf command (``boxrefine <stage> [OPTIONS]``: no sub-commands, so
    a stray argument is an error about that argument, not "No such command")."""
    def register(command: F) -> F:
        app.command()(one_line_errors(command))
        return command

    return register


def set_option() -> Any:
    return typer.Option(None, "--set", help="Override any config key, e.g. --set extract.batch_size=4. "
                        "Repeatable.")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: <message>`` (verbatim: paths and values are never read as rich markup) and exit."""
    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    raise typer.Exit(code)


def one_line_errors(command: F) -> F:
    """Decorate a CLI command: a :class:`BoxrefineError` becomes ``error: <message>`` and its exit
    code; anything else (a bug) keeps its traceback."""
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BoxrefineError as e:
            fail(str(e), code=e.exit_code)

    return wrapper  # type: ignore[return-value]


def load_cli_config(path: Path, sets: list[str] | None, flags: dict[str, Any], fast: bool = False) -> PipelineConfig:
    """Config file (+ its ``fast:`` block) + ``--set`` overrides + explicit flags (flags win); a
    ConfigError lists every problem. A flag left at None was not given and changes nothing, while
    ``--set KEY=null`` sets the key to null (e.g. ``train.grad_clip=null`` turns clipping off)."""
    overrides = dict(parse_set_option(s) for s in (sets or []))
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return load_config(path, overrides, fast=fast)
