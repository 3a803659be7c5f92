"""boxrefine train stage."""
