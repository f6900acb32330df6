"""Benchmarks. Importing ``service`` first sets gRPC core's environment (service/__init__.py)."""

import service  # noqa: F401
