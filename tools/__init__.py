"""Command-line tools; each module is also importable, e.g. `from tools import extract_concepts`."""
