"""Test helpers importable from test modules (conftest.py holds the fixtures)."""
from conftest import assert_close, poison_like  # noqa: F401
