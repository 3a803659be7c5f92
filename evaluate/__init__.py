"""boxrefine evaluate stage."""
