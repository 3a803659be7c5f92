"""CLI plumbing: the root ``boxrefine`` command (``main``), shared options and one-line error exits,
and ``boxrefine store``. Library code never imports this package."""
