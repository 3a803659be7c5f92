"""Developer tooling that is not a pipeline stage: the synthetic demo dataset."""
