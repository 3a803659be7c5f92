"""The ``boxrefine`` command: the composition root that mounts each stage's typer app.

This is the one module of ``shared`` that imports the stages (it has to, to mount them); no other
shared module does, and stages never import each other.
"""

from __future__ import annotations

import typer

from boxrefine.evaluate.cli import app as evaluate_app
from boxrefine.extract.cli import app as extract_app
from boxrefine.extract.refine.cli import app as refine_app
from boxrefine.shared.cli.dev_cmd import demo_app, dev_app
from boxrefine.shared.cli.store_cmd import app as store_app
from boxrefine.train.cli import app as train_app

app = typer.Typer(name="boxrefine", help="Box refinement on frozen HQ-SAM features cached once in Zarr.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.add_typer(demo_app, name="demo-data")
app.add_typer(extract_app, name="extract")
app.add_typer(train_app, name="train")
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(refine_app, name="refine")
app.add_typer(store_app, name="store")
# developer tooling (DEVELOPERS.md), not a pipeline stage: kept out of --help
app.add_typer(dev_app, name="dev", hidden=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
