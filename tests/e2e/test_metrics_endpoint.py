"""`serve --metrics-exporter prometheus` serves the service's metrics for a scrape."""

from __future__ import annotations

import re
import socket
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.conftest import Serve, cli, refusal


def test_a_scrape_shows_calls_by_method_and_status_and_the_health(
    data_dir: Path, database_url: str
) -> None:
    serve = Serve(
        data_dir,
        env={
            "OPENVPP_DATABASE_URL": database_url,
            "OPENVPP_METRICS_EXPORTER": "prometheus",
            "OPENVPP_METRICS_ADDRESS": "127.0.0.1:0",
            "OPENVPP_LOG_LEVEL": "INFO",
        },
    )
    try:
        where = serve.wait_for(r"serving metrics on (http://\S+/metrics)").group(1)
        with grpc.insecure_channel(f"127.0.0.1:{serve.port}") as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        with urllib.request.urlopen(where, timeout=10) as answer:
            text = answer.read().decode()
        check = [
            line
            for line in text.splitlines()
            if line.startswith("rpc_server_duration_milliseconds_count{")
            and 'rpc_method="Check"' in line
        ]
        assert len(check) == 1, text
        assert 'rpc_grpc_status_code="0"' in check[0]
        assert check[0].endswith(" 1.0")
        assert re.search(r"^openvpp_health_serving(\{[^}]*\})? 1\.0$", text, re.MULTILINE), text
    finally:
        assert serve.stop() == 0


def test_a_metrics_address_in_use_stops_serve_with_one_line(
    data_dir: Path, database_url: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli(
            data_dir,
            "--database-url",
            database_url,
            "serve",
            "--metrics-exporter",
            "prometheus",
            "--metrics-address",
            f"127.0.0.1:{port}",
        )
    line = refusal(result)
    assert line.startswith(f"cannot serve metrics on '127.0.0.1:{port}': ")
