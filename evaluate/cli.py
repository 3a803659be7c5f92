"""``boxrefine evaluate``: not built yet (its issue has not landed)."""

from __future__ import annotations

import typer

from shared.console import console

app = typer.Typer(help="(evaluate stage: not built yet)")


@app.callback(invoke_without_command=True)
def evaluate() -> None:
    """Not built yet: exits non-zero."""
    console.print("[bold red]boxrefine evaluate is not built yet[/bold red] (see the evaluate-stage issue).")
    raise typer.Exit(3)
