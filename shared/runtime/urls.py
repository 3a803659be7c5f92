"""Store and file locations given as text: a local path, or a URL that fsspec / obstore open."""

from __future__ import annotations


def is_url(path: str) -> bool:
    """A URL (``s3://``, ``gs://``, ``memory://``, …) rather than a local path (``file://`` counts as local)."""
    return "://" in path and not path.startswith("file://")


def is_s3(path: str) -> bool:
    return path.startswith("s3://")
