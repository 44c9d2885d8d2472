"""Prometheus metrics and per-version inference statistics."""
