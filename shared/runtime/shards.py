"""A process's share of the rows: ``--shard i/n`` (``extract.shard``) takes rows i, i+n, ... (extract/plan.py)."""

from __future__ import annotations

import re


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)`` with ``0 <= i < n``."""
    m = re.match(r"^\s*(\d+)\s*/\s*(\d+)\s*$", text)
    if not m:
        raise ValueError(f"shard must look like 'i/n', got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {text!r}: need 0 <= i < n")
    return i, n
