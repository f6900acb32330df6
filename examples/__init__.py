"""Runnable client scripts, one per seed flow; run by tests/e2e/test_examples.py."""
