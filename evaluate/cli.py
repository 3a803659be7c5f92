"""``boxrefine evaluate``: score checkpoints on the cached ground truth (no images except --vis)."""

from __future__ import annotations

from pathlib import Path

import typer

from boxrefine.shared.cli.common import config_option, fail, load_cli_config, set_option, stage_command

app = typer.Typer(help="Score checkpoints on cached ground truth: coarse vs zero-shot HQ-SAM vs refined.")


@stage_command(app)
def evaluate(
    config: Path = config_option(),
    checkpoint: Path = typer.Option(
        None, "--checkpoint",
        help="A checkpoint file, or a run folder (every *.pt, natural order). Default: evaluate.checkpoint, "
             "else best.pt of the latest run in train.runs_dir."),
    split: str = typer.Option(None, "--split", help="evaluate.split (default: train's validation split)"),
    vis: bool = typer.Option(None, "--vis/--no-vis", help="evaluate.vis: also draw overlays (reads images)."),
    missing_score: float = typer.Option(None, "--missing-score", help="evaluate.missing_score: the score of a "
                                        "detection that has none (default: such a detection is an error)."),
    noise: str = typer.Option(None, "--noise", metavar="R1,R2,...",
                              help="evaluate.noise: also score the best checkpoint on GT jittered at each level "
                                   "(a robustness curve in the report), e.g. 0.1,0.2,0.3,0.4."),
    set_: list[str] = set_option(),
) -> None:
    """Writes <run folder>/eval/: report.html (open it in a browser), metrics.json/.csv, refined_<split>.json,
    iou_hist.png (and vis/). The results table goes to stdout, progress to stderr."""
    levels = None
    if noise is not None:
        try:
            levels = [float(x) for x in noise.split(",") if x.strip()]
        except ValueError:
            fail(f"--noise {noise}: expected numbers separated by commas, e.g. 0.1,0.2,0.3")
    cfg = load_cli_config(config, set_, {"evaluate.split": split, "evaluate.vis": vis, "evaluate.noise": levels,
                                         "evaluate.missing_score": missing_score})
    from boxrefine.evaluate.run import run_evaluate

    run_evaluate(cfg, checkpoint=checkpoint, split=cfg.evaluate.split, vis=cfg.evaluate.vis)
