"""boxrefine extract stage."""
