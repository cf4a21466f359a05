"""Stand-alone programs run inside an allocation (preflight measurements)."""
