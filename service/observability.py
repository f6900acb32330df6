"""Logging and OpenTelemetry tracing setup."""

from __future__ import annotations

import logging
import sys

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def setup_tracing(exporter: str) -> None:
    """One span per RPC (see interceptors); exported only when an exporter is configured."""
    if not exporter:
        # The API's default no-op tracer: recording spans nobody exports costs every call.
        return
    provider = TracerProvider(resource=Resource.create({"service.name": "openvpp"}))
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    elif exporter:
        raise SystemExit(f"OPENVPP_TRACE_EXPORTER: unknown exporter {exporter!r} (use 'console')")
    trace.set_tracer_provider(provider)
