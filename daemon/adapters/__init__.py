"""harkd."""
