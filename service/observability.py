"""Logging and OpenTelemetry tracing setup, and the trace context of the RPC being handled."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import secrets
import sys
from collections.abc import Iterable

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
    """One span per RPC (see the call guard); exported only when an exporter is configured.

    The SDK's standard variables apply: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (the
    service is named "openvpp" unless they name it), OTEL_EXPORTER_OTLP_* (where and how
    "otlp" exports), OTEL_BSP_* (batching), OTEL_TRACES_SAMPLER*."""
    if not exporter:
        # The API's default no-op tracer: recording spans nobody exports costs every call.
        return
    resource = Resource.create()  # reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "openvpp"}))
    provider = TracerProvider(resource=resource)
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    elif exporter == "otlp":
        # Imported only when chosen: it loads its own gRPC client and protos.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        raise SystemExit(
            f"OPENVPP_TRACE_EXPORTER: unknown exporter {exporter!r} (use 'otlp' or 'console')"
        )
    trace.set_tracer_provider(provider)


# The server span of the RPC being handled, while tracing is on (set by the call guard; not
# made OpenTelemetry's current span, see service.edge.call_guard).
_call_span: contextvars.ContextVar[trace.Span | None] = contextvars.ContextVar(
    "openvpp_call_span", default=None
)

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def bind_call_span(span: trace.Span) -> contextvars.Token[trace.Span | None]:
    return _call_span.set(span)


def unbind_call_span(token: contextvars.Token[trace.Span | None]) -> None:
    # A stream closed from another context raises ValueError; the RPC's context ends anyway.
    with contextlib.suppress(ValueError):
        _call_span.reset(token)


def outgoing_traceparent(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The W3C ``traceparent`` for work this RPC hands on (a dispatch's webhooks), so that
    the receiver's spans join the trace where it is: a child of this server's span when
    tracing is on; else the caller's context as it came (this hop records nothing), with its
    sampling decision; else a new trace."""
    span = _call_span.get()
    if span is not None:
        context = span.get_span_context()
        if context.is_valid:
            return (
                f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
            )
    for key, value in metadata or ():
        if key == "traceparent" and isinstance(value, str):
            match = _TRACEPARENT.match(value.strip().lower())
            if match and match.group(1) != "0" * 32 and match.group(2) != "0" * 16:
                return match.group(0)
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
