"""Runtime settings, read from ``OPENVPP_*`` environment variables and CLI flags."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "OPENVPP_"
# The levels OPENVPP_LOG_LEVEL may name (any case). ``logging`` would also take NOTSET and
# the aliases WARN and FATAL, but refuses anything else only once it is set up, with a
# traceback; these are checked first.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Settings:
    """Every setting, with its environment variable named ``OPENVPP_<FIELD NAME UPPER>``."""

    grpc_address: str = "127.0.0.1:50051"
    # Unset: an embedded PostgreSQL is started with its data under ``data_dir``.
    database_url: str | None = None
    data_dir: Path = Path(".openvpp")
    db_pool_min_size: int = 2
    db_pool_max_size: int = 20
    # Pool connections kept checked out for single-statement reads (GetSite, GetResource),
    # at most half the pool; 0 sends those reads through the pool like everything else.
    db_read_connections: int = 4
    # Seconds that in-flight calls get to finish after SIGTERM/SIGINT.
    shutdown_grace_seconds: float = 10.0
    # Seconds between database probes that drive the gRPC health status.
    health_interval_seconds: float = 2.0
    # Events buffered per WatchSites subscriber before it is cut off as too slow.
    watch_buffer_size: int = 1000
    # Watch* streams one organization may have open on one replica: each costs a buffer,
    # and for WatchReadings and WatchSetpoints a database read per matching event.
    max_watch_streams_per_org: int = 100
    # Seconds an authenticated token stays cached; revocations also clear it at once.
    token_cache_seconds: float = 30.0
    # Telemetry: readings per batch above which the batch is refused (INVALID_ARGUMENT).
    max_batch_readings: int = 10000
    # Telemetry: readings later than now + this are rejected (TOO_FAR_IN_FUTURE).
    max_future_seconds: float = 3600.0
    # Telemetry: committed batches buffered per WatchReadings subscriber before it is cut off.
    readings_watch_buffer_size: int = 64
    # Telemetry: batches of one StreamReadings call processed concurrently (acks stay ordered).
    stream_pipeline_depth: int = 4
    # Telemetry: monthly readings partitions kept created ahead of the current month.
    partitions_ahead_months: int = 3
    # Telemetry: seconds a cached meter context lives; meter/site changes also clear it at once.
    meter_cache_seconds: float = 60.0
    # Telemetry: days around a batch searched for stored neighbours of a register value.
    register_check_window_days: int = 92
    # Dispatch outbox: seconds a delivery worker's claim on a setpoint lasts; after a crash
    # any worker takes an expired claim again. Keep it well above dispatch_timeout_seconds.
    dispatch_lease_seconds: float = 30.0
    # Dispatch outbox: attempts per setpoint (and per cancellation) before it is FAILED.
    dispatch_max_attempts: int = 10
    # Dispatch outbox: seconds between polls for due retries and expired claims (new
    # setpoints wake the workers at once by NOTIFY); > 0, since only a poll finds those.
    dispatch_poll_interval_seconds: float = 1.0
    # Dispatch outbox: setpoints claimed per transaction, and in flight per replica.
    dispatch_claim_batch_size: int = 500
    dispatch_max_in_flight: int = 512
    # Dispatch outbox: seconds after which a claimed setpoint still waiting for a slot
    # towards its endpoint is checked again (cancellation, eligibility, window) before it
    # is sent; 0 = before every send.
    dispatch_recheck_after_seconds: float = 1.0
    # Dispatch outbox: whether this replica runs a delivery worker at all.
    dispatch_delivery_enabled: bool = True
    log_level: str = "INFO"
    # "otlp" exports OpenTelemetry spans by OTLP/gRPC (OTEL_EXPORTER_OTLP_* say where),
    # "console" prints them to stderr; empty disables tracing.
    trace_exporter: str = ""
    # "prometheus" serves OpenTelemetry metrics at http://metrics_address/metrics, "otlp"
    # exports them by OTLP/gRPC; empty records none.
    metrics_exporter: str = ""
    metrics_address: str = "127.0.0.1:9464"
    # Seconds between ticks of the scheduler that applies date-driven upstream_status changes
    # (contracts starting or ending at local midnight); 0 disables it.
    upstream_scheduler_interval_seconds: float = 60.0
    # Balancing: seconds between polls of balancing_queue, a fallback for the NOTIFY that
    # wakes the worker at every commit; 0 = only on NOTIFY; negative = no balancing worker
    # in this process (another replica balances).
    balancing_poll_seconds: float = 10.0
    # Webhooks (dispatch): allow loopback, private, link-local and other non-public target
    # addresses, at registration and at delivery; for tests and local demos only. Cloud
    # metadata addresses stay refused. See service/common/network_policy.py.
    webhook_allow_private_networks: bool = False
    # Dispatch delivery: seconds one webhook attempt may take (connect, send, response).
    dispatch_timeout_seconds: float = 5.0
    # Dispatch delivery: webhook requests in flight at once, in all and per endpoint
    # (scheme, host, port).
    dispatch_max_concurrency: int = 256
    dispatch_max_concurrency_per_host: int = 32
    # Dispatch delivery: consecutive failed attempts that open an endpoint's circuit breaker,
    # and seconds it stays open before one probe is let through.
    dispatch_breaker_failure_threshold: int = 5
    dispatch_breaker_reset_seconds: float = 30.0
    # Dispatch delivery: retry back-off, capped exponential with full jitter.
    dispatch_backoff_initial_seconds: float = 1.0
    dispatch_backoff_max_seconds: float = 300.0
    # Dispatch: seconds a rotated-out signing secret keeps signing beside the new one.
    dispatch_signing_secret_grace_seconds: float = 86400.0
    # Create a partner organization and print its token when the database is empty.
    bootstrap: bool = True

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        unreadable: list[str] = []
        for spec in fields(cls):
            raw = env.get(ENV_PREFIX + spec.name.upper())
            if raw is None or raw == "":
                continue
            try:
                values[spec.name] = _coerce(spec.name, spec.type, raw)
            except ValueError as problem:
                unreadable.append(str(problem))
        if unreadable:
            # Every one at once: fixed one by one, each run would name only the next.
            raise SystemExit("; ".join(unreadable))
        settings = cls(**values)
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(settings, **given) if given else settings

    @property
    def uses_embedded_database(self) -> bool:
        return not self.database_url


def _coerce(name: str, type_name: Any, raw: str) -> Any:
    text = str(type_name)
    try:
        if "bool" in text:
            if raw.lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError("use true or false, yes or no, on or off, 1 or 0")
        if "int" in text:
            return int(raw)
        if "float" in text:
            value = float(raw)
            # float() takes "nan" and "inf", which no setting means: a NaN compares false
            # with every bound, and an infinity overflows the first timedelta made of it.
            if not math.isfinite(value):
                raise ValueError("not a finite number")
            return value
        if "Path" in text:
            return Path(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}: cannot use {raw!r} ({exc})") from None
    return raw


def refuse_broken_values(section: str, checks: Iterable[tuple[str, bool, str]]) -> None:
    """Raises ValueError naming every ``OPENVPP_<SECTION>_<NAME>`` whose value breaks its
    rule, from (name, broken, rule) checks: all of them in one message."""
    problems = [
        f"{ENV_PREFIX}{section}_{name.upper()} must be {rule}"
        for name, broken, rule in checks
        if broken
    ]
    if problems:
        raise ValueError("; ".join(problems))


def problems_of(settings: Settings, checks: Iterable[Callable[[Settings], object]]) -> list[str]:
    """What each of ``checks`` refuses in ``settings`` (the message of its ValueError), so
    that one line can name every value a command cannot run with."""
    problems = []
    for check in checks:
        try:
            check(settings)
        except ValueError as problem:
            problems.append(str(problem))
    return problems


def check_log_level(settings: Settings) -> None:
    """Raises ValueError naming the variable and the flag if the log level is not one of
    LOG_LEVELS; every command logs, so every command checks it before it starts anything."""
    if settings.log_level.upper() not in LOG_LEVELS:
        raise ValueError(
            f"{ENV_PREFIX}LOG_LEVEL (--log-level) must be one of {', '.join(LOG_LEVELS)},"
            f" not {settings.log_level!r}"
        )


def check_pool_sizes(settings: Settings) -> None:
    """Raises ValueError naming the pool sizes asyncpg would refuse (with a traceback,
    after the embedded database was started)."""
    low, high = settings.db_pool_min_size, settings.db_pool_max_size
    refuse_broken_values(
        "DB",
        (
            ("pool_min_size", low < 0, ">= 0"),
            ("pool_max_size", high < 1, ">= 1"),
            (
                "pool_min_size",
                1 <= high < low,
                f"<= {ENV_PREFIX}DB_POOL_MAX_SIZE ({low} > {high})",
            ),
        ),
    )


# The longest time any setting may name: beyond it a date computed from it (a rotated
# secret's end of grace, the latest reading accepted) leaves what a datetime can hold.
CENTURY_SECONDS = 100 * 365.25 * 86400


def check_limits(settings: Settings) -> None:
    """Raises ValueError naming every setting outside its range that no capability checks
    itself. Each was taken as it was: a zero buffer ended every watch stream at its first
    event, a zero health interval made the event connection reconnect in a loop, a NaN
    or a grace of 1e15 s failed the start-up after the migrations, 1e12 s every delivery
    of an organization that had rotated its secret."""
    for spec in fields(Settings):
        value = getattr(settings, spec.name)
        # Set directly (tests, embedding code), not through _coerce.
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{ENV_PREFIX}{spec.name.upper()} must be a finite number")
    century = f"at most {CENTURY_SECONDS:.0f} (100 years)"
    rules = (
        ("shutdown_grace_seconds", settings.shutdown_grace_seconds >= 0, ">= 0"),
        (
            "health_interval_seconds",
            0 < settings.health_interval_seconds <= CENTURY_SECONDS,
            f"> 0 (the database and the event connection are probed at it) and {century}",
        ),
        ("watch_buffer_size", settings.watch_buffer_size >= 1, ">= 1"),
        ("max_watch_streams_per_org", settings.max_watch_streams_per_org >= 1, ">= 1"),
        ("readings_watch_buffer_size", settings.readings_watch_buffer_size >= 1, ">= 1"),
        ("stream_pipeline_depth", settings.stream_pipeline_depth >= 1, ">= 1"),
        ("db_read_connections", settings.db_read_connections >= 0, ">= 0"),
        ("token_cache_seconds", settings.token_cache_seconds >= 0, ">= 0"),
        ("max_batch_readings", settings.max_batch_readings >= 1, ">= 1"),
        (
            "max_future_seconds",
            0 <= settings.max_future_seconds <= CENTURY_SECONDS,
            f">= 0 and {century}",
        ),
        (
            "partitions_ahead_months",
            0 <= settings.partitions_ahead_months <= 1200,
            ">= 0 and at most 1200 (each is created at start)",
        ),
        ("meter_cache_seconds", settings.meter_cache_seconds >= 0, ">= 0"),
        (
            "register_check_window_days",
            0 <= settings.register_check_window_days <= 36525,
            ">= 0 and at most 36525 (100 years)",
        ),
        (
            "upstream_scheduler_interval_seconds",
            settings.upstream_scheduler_interval_seconds >= 0,
            ">= 0 (0 disables the scheduler)",
        ),
        (
            "dispatch_signing_secret_grace_seconds",
            0 <= settings.dispatch_signing_secret_grace_seconds <= CENTURY_SECONDS,
            f">= 0 and {century}",
        ),
    )
    broken = [(name, rule) for name, ok, rule in rules if not ok]
    # Every other duration too, also those a capability checks otherwise: a lease or breaker
    # reset of 1e300 s overflowed once used (a timer, a datetime), after the migrations.
    named = {name for name, _ in broken}
    broken += [
        (spec.name, century)
        for spec in fields(Settings)
        if spec.name.endswith("_seconds")
        and spec.name not in named
        and getattr(settings, spec.name) > CENTURY_SECONDS
    ]
    problems = [
        f"{ENV_PREFIX}{name.upper()}{_flag_of(name)} must be {rule}" for name, rule in broken
    ]
    if problems:
        raise ValueError("; ".join(problems))


# Settings a flag of `serve` sets too: a refusal names both, as either may have set it.
_SERVE_FLAGS = frozenset({"shutdown_grace_seconds"})


def _flag_of(name: str) -> str:
    return f" (serve --{name.replace('_', '-')})" if name in _SERVE_FLAGS else ""


def check_grpc_address(settings: Settings) -> None:
    """Raises ValueError if the address is not HOST:PORT with a port from 0 to 65535 (or a
    unix socket, ``unix:PATH``): gRPC would listen on that number modulo 65536 instead
    (99999 on 34463), and on 443 when the port is left out, while the start-up line named
    what was given."""
    address = settings.grpc_address
    if address.startswith(("unix:", "unix-abstract:")):
        return
    host, colon, port = address.rpartition(":")
    if not (colon and host and port.lstrip("-").isdigit()):
        raise ValueError(
            f"{ENV_PREFIX}GRPC_ADDRESS (serve --grpc-address) must be HOST:PORT, e.g."
            f" 127.0.0.1:50051 (or unix:PATH), not {address!r}"
        )
    if not 0 <= int(port) <= 65535:
        raise ValueError(
            f"{ENV_PREFIX}GRPC_ADDRESS (serve --grpc-address) must name a port from 0 to"
            f" 65535, not {port}"
        )


TRACE_EXPORTERS = ("", "console", "otlp")


def check_trace_exporter(settings: Settings) -> None:
    """Raises ValueError for an exporter the service does not know (found only once the
    embedded database had started, before)."""
    if settings.trace_exporter not in TRACE_EXPORTERS:
        raise ValueError(
            f"{ENV_PREFIX}TRACE_EXPORTER (serve --trace-exporter): unknown exporter"
            f" {settings.trace_exporter!r} (use 'otlp' or 'console', or leave it empty for none)"
        )


METRICS_EXPORTERS = ("", "prometheus", "otlp")


def check_metrics(settings: Settings) -> None:
    """Raises ValueError for a metrics exporter the service does not know, or an address
    the Prometheus endpoint cannot listen on."""
    if settings.metrics_exporter not in METRICS_EXPORTERS:
        raise ValueError(
            f"{ENV_PREFIX}METRICS_EXPORTER (serve --metrics-exporter): unknown exporter"
            f" {settings.metrics_exporter!r} (use 'prometheus' or 'otlp', or leave it empty"
            " for none)"
        )
    if settings.metrics_exporter != "prometheus":
        return
    host, colon, port = settings.metrics_address.rpartition(":")
    if not (colon and host and port.isdigit() and int(port) <= 65535):
        raise ValueError(
            f"{ENV_PREFIX}METRICS_ADDRESS (serve --metrics-address) must be HOST:PORT with a"
            f" port from 0 to 65535, e.g. 127.0.0.1:9464, not {settings.metrics_address!r}"
        )


def check_database_url(settings: Settings) -> None:
    """Raises ValueError for a database URL that cannot be read as one (a port that is no
    number, a broken IPv6 host), which asyncpg reports with a traceback. The URL itself is
    not repeated: it may hold a password."""
    url = settings.database_url
    if not url:
        return
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("it must begin with postgresql:// (or postgres://)")
        # host:port, or several of them for a fail-over list, as libpq and asyncpg take.
        for host in parts.netloc.rpartition("@")[2].split(","):
            _ = urlsplit("//" + host).port
    except ValueError as error:
        raise ValueError(
            f"{ENV_PREFIX}DATABASE_URL (--database-url) is not a URL PostgreSQL can be reached"
            f" at: {error}"
        ) from None
