"""Version lifecycle: loading, warming, residency, serving-version choice, drain before unload."""
