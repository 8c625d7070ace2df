"""PIE-Bench: format reader, metrics and runner."""
