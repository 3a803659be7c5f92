"""``boxrefine train``: not built yet (its issue has not landed)."""

from __future__ import annotations

import typer

from shared.console import console

app = typer.Typer(help="(train stage: not built yet)")


@app.callback(invoke_without_command=True)
def train() -> None:
    """Not built yet: exits non-zero."""
    console.print("[bold red]boxrefine train is not built yet[/bold red] (see the train-stage issue).")
    raise typer.Exit(3)
