"""The test suite; shared helpers are in tests/helpers/, pytest fixtures in conftest.py files."""
