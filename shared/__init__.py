"""Code that more than one boxrefine stage uses. Never imports a stage (except the root CLI)."""

__version__ = "0.1.0"
