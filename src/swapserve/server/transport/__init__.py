"""server.transport: see the README's layout table."""
