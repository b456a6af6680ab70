"""Thin entrypoints for `ray job submit ... -- python -m jobs.<name>`."""
