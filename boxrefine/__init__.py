"""boxrefine: a box-refinement head trained on frozen HQ-SAM features cached once in a Zarr store.

The Python API::

    from boxrefine import RefinePredictor

    predictor = RefinePredictor.from_run("runs/demo")      # best.pt + the HQ-SAM weights it was trained with
    predictor.set_image(rgb)                               # H×W×3 uint8 RGB
    boxes, deltas = predictor.refine([[x0, y0, x1, y1]])   # original pixels, xyxy

The package's parts are installed from the repository's folders (``boxrefine.shared``,
``boxrefine.extract``, ``boxrefine.train``, ``boxrefine.evaluate``; pyproject.toml maps them). This
module names the public API and loads it lazily, so ``import boxrefine`` (and the CLI, which imports a
sub-package and so this module first) stays cheap: torch loads only when ``RefinePredictor`` is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from boxrefine.shared import __version__

if TYPE_CHECKING:
    from boxrefine.shared.scoring.predictor import ImageFeatures, RefineError, RefinePredictor

__all__ = ["ImageFeatures", "RefineError", "RefinePredictor", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("ImageFeatures", "RefineError", "RefinePredictor"):
        from boxrefine.shared.scoring import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'boxrefine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
