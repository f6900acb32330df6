"""Values no command can run with are refused at start-up, naming the variable (and flag)."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

import pytest

from service.app import Service, check_settings
from service.auth.principal import Role
from service.auth.store import IdentityStore
from service.config import (
    CENTURY_SECONDS,
    Settings,
    check_database_url,
    check_grpc_address,
    check_limits,
    check_log_level,
    check_metrics,
    check_pool_sizes,
)
from tests.conftest import MakeOrg


@pytest.mark.parametrize("level", ["DEBUG", "info", "Warning", "error", "CRITICAL"])
def test_the_log_levels_in_any_case_are_accepted(level: str) -> None:
    check_log_level(Settings(log_level=level))


@pytest.mark.parametrize("level", ["verbose", "TRACE", "10", "NOTSET"])
def test_any_other_log_level_is_refused_naming_the_variable_the_flag_and_the_levels(
    level: str,
) -> None:
    expected = (
        "OPENVPP_LOG_LEVEL (--log-level) must be one of DEBUG, INFO, WARNING, ERROR,"
        f" CRITICAL, not {level!r}"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        check_log_level(Settings(log_level=level))


@pytest.mark.parametrize(("low", "high"), [(0, 1), (2, 20), (5, 5)])
def test_pool_sizes_asyncpg_takes_are_accepted(low: int, high: int) -> None:
    check_pool_sizes(Settings(db_pool_min_size=low, db_pool_max_size=high))


@pytest.mark.parametrize(
    ("low", "high", "message"),
    [
        (5, 2, "OPENVPP_DB_POOL_MIN_SIZE must be <= OPENVPP_DB_POOL_MAX_SIZE (5 > 2)"),
        (-1, 20, "OPENVPP_DB_POOL_MIN_SIZE must be >= 0"),
        (2, 0, "OPENVPP_DB_POOL_MAX_SIZE must be >= 1"),
    ],
)
def test_pool_sizes_asyncpg_refuses_are_named(low: int, high: int, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_pool_sizes(Settings(db_pool_min_size=low, db_pool_max_size=high))


@pytest.mark.parametrize(
    "address", ["127.0.0.1:0", "0.0.0.0:65535", "[::]:50051", "localhost:50051", "unix:/tmp/s"]
)
def test_addresses_with_a_port_in_range_or_none_are_left_to_grpc(address: str) -> None:
    check_grpc_address(Settings(grpc_address=address))


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1:-1", "[::]:65536"])
def test_a_port_grpc_would_wrap_around_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match=r"^OPENVPP_GRPC_ADDRESS \(serve --grpc-address\)"):
        check_grpc_address(Settings(grpc_address=address))


# Without a port gRPC listened on 443; the others it could not bind.
@pytest.mark.parametrize("address", ["127.0.0.1", "[::1]", "", ":50051", "127.0.0.1:abc"])
def test_an_address_that_is_not_host_and_port_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match=r"must be HOST:PORT, e\.g\. 127\.0\.0\.1:50051"):
        check_grpc_address(Settings(grpc_address=address))


def test_an_unknown_trace_exporter_is_refused_before_anything_starts() -> None:
    with pytest.raises(ValueError, match=r"OPENVPP_TRACE_EXPORTER .*unknown exporter 'bogus'"):
        check_settings(Settings(trace_exporter="bogus"))
    check_settings(Settings(trace_exporter="console"))


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@host:abc/db",
        "postgresql://u:pw@[::1/db",
        "postgresql://u@h:1e3/d",
        "u:pw@host/db",
        "mysql://u:pw@host/db",
        "postgresql://u:pw@h1:5432,h2:x/db",
    ],
)
def test_a_database_url_that_is_not_one_is_refused_without_its_password(url: str) -> None:
    with pytest.raises(ValueError, match=r"^OPENVPP_DATABASE_URL \(--database-url\)") as caught:
        check_database_url(Settings(database_url=url))
    assert "pw" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@host:5432/db",
        "postgres://host/db",
        # A fail-over list, and a Unix socket directory: both are asyncpg's to take.
        "postgresql://u:pw@h1:5432,h2:5433/db?target_session_attrs=read-write",
        "postgresql:///db?host=/var/run/postgresql",
    ],
)
def test_a_database_url_postgresql_takes_passes(url: str) -> None:
    check_database_url(Settings(database_url=url))


def test_serve_names_every_broken_value_at_once() -> None:
    broken = Settings(
        grpc_address="127.0.0.1:70000",
        db_pool_min_size=30,
        db_pool_max_size=20,
        dispatch_max_in_flight=0,
    )
    with pytest.raises(ValueError, match="OPENVPP_") as refused:
        check_settings(broken)
    message = str(refused.value)
    for named in (
        "OPENVPP_GRPC_ADDRESS",
        "OPENVPP_DB_POOL_MIN_SIZE",
        "OPENVPP_DISPATCH_MAX_IN_FLIGHT",
    ):
        assert named in message


def test_the_defaults_pass_every_check() -> None:
    check_settings(Settings())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        # Each of these was taken and broke the service later (see check_limits).
        ("health_interval_seconds", 0.0),
        ("health_interval_seconds", -1.0),
        ("watch_buffer_size", 0),
        ("readings_watch_buffer_size", 0),
        ("max_batch_readings", 0),
        ("max_future_seconds", -1.0),
        ("max_future_seconds", 1e12),
        ("max_future_seconds", math.inf),
        ("dispatch_signing_secret_grace_seconds", -1.0),
        ("dispatch_signing_secret_grace_seconds", 1e12),
        ("dispatch_signing_secret_grace_seconds", math.nan),
        ("partitions_ahead_months", -1),
        ("partitions_ahead_months", 100_000),
        ("register_check_window_days", 10**6),
        ("shutdown_grace_seconds", -1.0),
        ("token_cache_seconds", -1.0),
        ("meter_cache_seconds", -1.0),
        ("upstream_scheduler_interval_seconds", -1.0),
        ("dispatch_lease_seconds", math.nan),
        # Durations past a century overflowed a timer or a datetime once used.
        ("dispatch_lease_seconds", 1e300),
        ("dispatch_recheck_after_seconds", 1e300),
        ("dispatch_breaker_reset_seconds", 1e300),
        ("dispatch_timeout_seconds", 1e300),
        ("dispatch_backoff_max_seconds", 1e300),
        ("balancing_poll_seconds", 1e300),
        ("stream_pipeline_depth", 0),
        ("db_read_connections", -1),
    ],
)
def test_a_value_out_of_its_range_is_refused_naming_it(field: str, value: float) -> None:
    with pytest.raises(
        ValueError, match=rf"OPENVPP_{field.upper()} (\(serve --[a-z-]+\) )?must be"
    ):
        check_settings(Settings(**{field: value}))  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_a_float_variable_that_is_not_finite_is_refused(raw: str) -> None:
    with pytest.raises(SystemExit, match="OPENVPP_HEALTH_INTERVAL_SECONDS: cannot use"):
        Settings.from_env({"OPENVPP_HEALTH_INTERVAL_SECONDS": raw})


def test_every_unreadable_variable_is_named_at_once() -> None:
    with pytest.raises(SystemExit) as stopped:
        Settings.from_env(
            {
                "OPENVPP_DB_POOL_MAX_SIZE": "many",
                "OPENVPP_WATCH_BUFFER_SIZE": "y",
                "OPENVPP_DISPATCH_DELIVERY_ENABLED": "perhaps",
                "OPENVPP_LOG_LEVEL": "loud",
            }
        )
    message = str(stopped.value)
    for named in (
        "OPENVPP_DB_POOL_MAX_SIZE: cannot use 'many'",
        "OPENVPP_WATCH_BUFFER_SIZE: cannot use 'y'",
        "OPENVPP_DISPATCH_DELIVERY_ENABLED: cannot use 'perhaps'",
    ):
        assert named in message
    assert "\n" not in message


async def test_a_grace_at_the_limit_still_signs(service: Service, make_org: MakeOrg) -> None:
    """1e12 s passed the checks and then overflowed rotated_at + grace on every delivery of
    an organization that had rotated its secret; the longest grace taken now signs."""
    check_limits(Settings(dispatch_signing_secret_grace_seconds=CENTURY_SECONDS))
    assert service.pool is not None
    store = IdentityStore(service.pool, signing_secret_grace=timedelta(seconds=CENTURY_SECONDS))
    org = await make_org(Role.PARTNER)
    old = await store.signing_secret(org.id)
    new = await store.rotate_signing_secret(org.id)
    assert await store.signing_secrets(org.id, datetime.now(UTC)) == [new, old]


@pytest.mark.parametrize(
    ("exporter", "address", "wrong"),
    [
        ("statsd", "127.0.0.1:9464", r"OPENVPP_METRICS_EXPORTER .*unknown exporter 'statsd'"),
        ("prometheus", "9464", r"OPENVPP_METRICS_ADDRESS .*must be HOST:PORT"),
        ("prometheus", "127.0.0.1:70000", r"OPENVPP_METRICS_ADDRESS .*must be HOST:PORT"),
        ("prometheus", "127.0.0.1:-1", r"OPENVPP_METRICS_ADDRESS .*must be HOST:PORT"),
    ],
)
def test_a_metrics_setting_that_cannot_serve_is_refused(
    exporter: str, address: str, wrong: str
) -> None:
    with pytest.raises(ValueError, match=wrong):
        check_metrics(Settings(metrics_exporter=exporter, metrics_address=address))


def test_the_metrics_address_matters_only_for_prometheus() -> None:
    for exporter in ("", "otlp"):
        check_metrics(Settings(metrics_exporter=exporter, metrics_address="nonsense"))
    check_metrics(Settings(metrics_exporter="prometheus", metrics_address="0.0.0.0:9464"))


def test_a_value_that_is_no_boolean_is_refused_naming_the_ones_that_are() -> None:
    with pytest.raises(SystemExit) as refused:
        Settings.from_env({"OPENVPP_BOOTSTRAP": "maybe"})
    assert str(refused.value.code) == (
        "OPENVPP_BOOTSTRAP: cannot use 'maybe' (use true or false, yes or no, on or off, 1 or 0)"
    )


def test_a_setting_a_flag_sets_too_is_refused_naming_the_flag() -> None:
    with pytest.raises(ValueError, match=r"\(serve --shutdown-grace-seconds\)") as refused:
        check_limits(Settings(shutdown_grace_seconds=-1))
    assert str(refused.value) == (
        "OPENVPP_SHUTDOWN_GRACE_SECONDS (serve --shutdown-grace-seconds) must be >= 0"
    )
