"""feedback: see the README's layout table."""
