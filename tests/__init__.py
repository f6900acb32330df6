"""Tests. Importing ``service`` first sets gRPC core's environment (see service/__init__.py)."""

import service  # noqa: F401
