"""`serve --trace-exporter otlp` sends its spans by OTLP/gRPC where the standard
OTEL_EXPORTER_OTLP_* variables say, under the OTEL_SERVICE_NAME it is given."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.e2e.conftest import Serve


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(service.name, span name, attributes) of every span received."""
        found = []
        with self.lock:
            for request in self.requests:
                for resource_spans in request.resource_spans:
                    resource = {
                        a.key: a.value.string_value for a in resource_spans.resource.attributes
                    }
                    for scope in resource_spans.scope_spans:
                        for span in scope.spans:
                            attributes = {
                                a.key: a.value.string_value or a.value.int_value
                                for a in span.attributes
                            }
                            found.append((resource.get("service.name", ""), span.name, attributes))
        return found


def test_spans_go_to_the_otlp_endpoint_under_the_configured_service_name(
    data_dir: Path, database_url: str
) -> None:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    serve = Serve(
        data_dir,
        env={
            "OPENVPP_DATABASE_URL": database_url,
            "OPENVPP_TRACE_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_SERVICE_NAME": "vpp-eu1",
        },
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{serve.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            health.Check(health_pb2.HealthCheckRequest())
        deadline = time.monotonic() + 20
        wanted = ("vpp-eu1", "/grpc.health.v1.Health/Check")
        while time.monotonic() < deadline:
            checks = [s for s in collector.spans() if s[:2] == wanted]
            if checks:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"no health check span in {collector.spans()}")
        assert checks[0][2] == {
            "rpc.system": "grpc",
            "rpc.service": "grpc.health.v1.Health",
            "rpc.method": "Check",
            "rpc.grpc.status_code": 0,
        }
    finally:
        assert serve.stop() == 0
        server.stop(0)
