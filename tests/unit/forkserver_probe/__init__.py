"""Modules a test forks from a real forkserver (tests/unit/test_forked.py)."""
