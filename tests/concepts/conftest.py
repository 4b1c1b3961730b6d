"""Fixtures for the concept tests: the tiny trained checkpoints and their exports of the Hugging Face tests (one
cache for the session, whichever folder asks first), used by tools/inspect_concepts.py's tests."""

from tests.hf.conftest import checkpoints, export_root  # noqa: F401
