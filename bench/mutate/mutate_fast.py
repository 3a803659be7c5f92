"""pytest plugin of ``make mutate`` (``-p mutate_fast``): leaves out the tests that are marked slow or build
the session's encoder or reference store (``sam``, ``reference_store``: 15-30 s each time a mutant's
tests start) or need the S3 server, so that each mutant runs only its module's fast tests."""

from __future__ import annotations

import pytest

SLOW_FIXTURES = {"sam", "reference_store", "store_only", "s3", "s3_server"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        slow = item.get_closest_marker("slow") is not None or item.get_closest_marker("gpu") is not None
        uses = set(getattr(item, "fixturenames", ()))
        (drop if slow or uses & SLOW_FIXTURES else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
