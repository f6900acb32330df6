"""Logging, OpenTelemetry tracing and metrics setup, the service's instruments, and the trace
context of the RPC being handled."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import secrets
import sys
from collections.abc import Callable, Iterable, Mapping

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
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
    provider = TracerProvider(resource=_resource())
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


def _resource() -> Resource:
    resource = Resource.create()  # reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "openvpp"}))
    return resource


log = logging.getLogger(__name__)


def setup_metrics(exporter: str, address: str) -> None:
    """The global meter provider for ``exporter`` ("" = none: the service records nothing).

    "prometheus": an HTTP endpoint at ``address`` (HOST:PORT) serving /metrics, in a thread
    of its own (a scrape never waits for the event loop); "otlp": pushed by OTLP/gRPC every
    OTEL_METRIC_EXPORT_INTERVAL ms (60 s), where OTEL_EXPORTER_OTLP_* say."""
    if not exporter:
        return
    # Imported only when chosen: each loads a client library of its own.
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader

    if exporter == "prometheus":
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        host, _, port = address.rpartition(":")
        try:
            server, _thread = start_http_server(int(port), addr=host.strip("[]"))
        except OSError as error:
            raise SystemExit(
                f"cannot serve metrics on {address!r}: {error.strerror or error}"
            ) from None
        bound_host, bound_port = server.server_address[:2]
        log.info("serving metrics on http://%s:%d/metrics", bound_host, bound_port)
        reader: MetricReader = PrometheusMetricReader()
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        reader = PeriodicExportingMetricReader(OTLPMetricExporter())
    else:
        raise SystemExit(f"OPENVPP_METRICS_EXPORTER: unknown exporter {exporter!r}")
    metrics.set_meter_provider(SdkMeterProvider(resource=_resource(), metric_readers=[reader]))


Gauge = Callable[[], Mapping[tuple[tuple[str, str], ...], float]]


class ServiceMetrics:
    """The service's instruments: recorded where the work happens, exported by the provider
    ``setup_metrics`` made. Only made while metrics are on, so nothing is recorded (and no
    attributes are built) on the hot paths otherwise."""

    def __init__(self, provider: MeterProvider | None = None) -> None:
        meter: Meter = (provider or metrics.get_meter_provider()).get_meter("openvpp")
        self._meter = meter
        # OpenTelemetry's semantic convention for RPC servers.
        self.rpc_duration = meter.create_histogram(
            "rpc.server.duration",
            unit="ms",
            description="Duration of gRPC calls, by service, method and status code",
        )
        self.readings = meter.create_counter(
            "openvpp.telemetry.readings",
            unit="{reading}",
            description="Readings of ingested batches, by outcome (accepted, corrected,"
            " duplicate, rejected)",
        )
        self.delivery_attempts = meter.create_counter(
            "openvpp.dispatch.delivery.attempts",
            unit="{attempt}",
            description="Webhook delivery attempts of setpoints and cancellations, by outcome",
        )

    def gauge(self, name: str, description: str, read: Gauge, unit: str = "1") -> None:
        """An observable gauge: ``read()`` gives value by attribute pairs, at each export."""

        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, dict(pairs)) for pairs, value in read().items()]

        self._meter.create_observable_gauge(name, [observe], unit=unit, description=description)

    def counter(self, name: str, description: str, read: Gauge, unit: str = "1") -> None:
        """An observable monotonic counter: ``read()`` gives its running totals."""

        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, dict(pairs)) for pairs, value in read().items()]

        self._meter.create_observable_counter(name, [observe], unit=unit, description=description)


# The server span of the RPC being handled, while tracing is on (set by the call guard; not
# made OpenTelemetry's current span, see service.edge.call_guard).
_call_span: contextvars.ContextVar[trace.Span | None] = contextvars.ContextVar(
    "openvpp_call_span", default=None
)

# W3C trace context: version 00 exactly; a later version is read as far as 00 defines it
# (its first four fields), and ff is invalid.
_TRACEPARENT = re.compile(
    r"^(?:00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})"
    r"|(?!00|ff)[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?)$"
)


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
            if match is None:
                continue
            trace_id, parent_id, flags = (
                match.groups()[:3] if match.group(1) is not None else match.groups()[3:]
            )
            if trace_id != "0" * 32 and parent_id != "0" * 16:
                return f"00-{trace_id}-{parent_id}-{flags}"
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
