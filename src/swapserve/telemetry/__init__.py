"""telemetry: see the README's layout table."""
