"""The ``boxrefine`` command: the composition root that mounts each stage's command (a leaf: its
usage line takes options, never a sub-command) and the ``store`` and ``dev`` groups; ``--version``,
``-h``.

This is the one module of ``shared`` that imports the stages (it has to, to mount them); no other
shared module does, and stages never import each other.
"""

from __future__ import annotations

import typer

from boxrefine.evaluate.cli import app as evaluate_app
from boxrefine.extract.cli import app as extract_app
from boxrefine.extract.refine.cli import app as refine_app
from boxrefine.shared import __version__
from boxrefine.shared.cli.dev_cmd import demo_app, dev_app
from boxrefine.shared.cli.store_cmd import app as store_app
from boxrefine.shared.runtime.console import result_console
from boxrefine.train.cli import app as train_app

app = typer.Typer(name="boxrefine", help="Box refinement on frozen HQ-SAM features cached once in Zarr.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]})  # sub-commands inherit -h


def _version(value: bool) -> None:
    if value:
        result_console.print(f"boxrefine {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Box refinement on frozen HQ-SAM features cached once in Zarr."""


def mount(sub: typer.Typer, name: str) -> None:
    """A stage's one command as a leaf command of ``boxrefine`` (its usage line: ``boxrefine NAME
    [OPTIONS]``), listed with its app's help."""
    (info,) = sub.registered_commands
    app.command(name, short_help=sub.info.help)(info.callback)


mount(demo_app, "demo-data")
mount(extract_app, "extract")
mount(train_app, "train")
mount(evaluate_app, "evaluate")
mount(refine_app, "refine")
app.add_typer(store_app, name="store")
app.add_typer(dev_app, name="dev")  # developer tooling (DEVELOPERS.md), not a pipeline stage


def main() -> None:
    app()


if __name__ == "__main__":
    main()
