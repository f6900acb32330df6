"""Assembles the gRPC server: database pool, migrations, event hub, servicers, health."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import asyncpg
import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2
from opentelemetry import trace
from opentelemetry.metrics import MeterProvider

from service.auth.authenticator import Authenticator
from service.auth.principal import Role
from service.auth.store import IdentityStore, IssuedToken
from service.balancing import servicer as balancing
from service.balancing.worker import BalancingQueueConsumer
from service.common.clock import SYSTEM_CLOCK, Clock
from service.common.loglimit import OutageLog, quiet_library_retries
from service.common.worker import Worker
from service.config import (
    Settings,
    check_grpc_address,
    check_limits,
    check_metrics,
    check_pool_sizes,
    check_trace_exporter,
    problems_of,
)
from service.db.database import SESSION_SETTINGS, create_pool
from service.db.migrate import migrate_database
from service.db.reads import ReadLane
from service.dispatch import servicer as dispatch
from service.dispatch.delivery import DeliverySettings
from service.dispatch.outbox import OutboxDeliverer, OutboxSettings
from service.edge.call_guard import CallGuard
from service.edge.reflection import enable_server_reflection
from service.events.channels import (
    BALANCING_QUEUE_CHANNEL,
    DISPATCH_OUTBOX_CHANNEL,
    TOKEN_REVOKED_CHANNEL,
)
from service.events.hub import EventHub
from service.observability import ServiceMetrics
from service.registry import servicer as registry
from service.telemetry import meter_servicer as meters
from service.telemetry import servicer as telemetry
from service.upstream import servicer as upstream
from service.upstream.scheduler import UpstreamScheduler

log = logging.getLogger(__name__)

# Server-side limits that keep one client from exhausting the process.
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # gRPC shares a taken port by default (SO_REUSEPORT): a second server, e.g. one on another
    # data directory, would silently receive part of the calls. A taken port is an error.
    ("grpc.so_reuseport", 0),
]


HEALTH_DESCRIPTOR = health_pb2.DESCRIPTOR.services_by_name["Health"]


class GrpcAddressUnusableError(RuntimeError):
    """gRPC cannot listen on the configured address: it is taken, or not one it can bind."""

    def __init__(self, address: str) -> None:
        super().__init__(f"cannot bind {address} (in use, or not a valid HOST:PORT?)")
        self.address = address


def check_settings(settings: Settings) -> None:
    """Raises ValueError naming every ``OPENVPP_*`` value the service or a capability cannot
    run with; called before anything starts, so a bad value is one line, not a failed
    start-up."""
    problems = problems_of(
        settings,
        (
            check_grpc_address,
            check_pool_sizes,
            check_limits,
            check_trace_exporter,
            check_metrics,
            OutboxSettings.from_settings,
            DeliverySettings.from_settings,
        ),
    )
    if problems:
        raise ValueError("; ".join(problems))


@dataclass
class Capability:
    """A part of the service: its gRPC definition, implementation and who may call each
    method (all None/empty for a headless capability), and its background workers."""

    descriptor: ServiceDescriptor | None
    servicer: object | None
    method_roles: Mapping[str, frozenset[Role]]
    # Optional async set-up before serving and clean-up after the server stopped.
    start: Callable[[], Awaitable[None]] | None = None
    stop: Callable[[], Awaitable[None]] | None = None
    # Started after migrations and every capability's start hook, stopped after the server.
    workers: Sequence[Worker] = ()


@dataclass
class Service:
    settings: Settings
    dsn: str
    pool: asyncpg.Pool | None = None
    reads: ReadLane | None = None
    hub: EventHub | None = None
    server: grpc.aio.Server | None = None
    port: int = 0
    bootstrap_token: IssuedToken | None = None
    # Organizations, tokens and webhook signing secrets (with the configured grace period).
    identity: IdentityStore | None = None
    # Injectable so tests move time instead of sleeping.
    clock: Clock = SYSTEM_CLOCK
    # Where the instruments record: the global provider (setup_metrics) while
    # OPENVPP_METRICS_EXPORTER is set; injectable so tests read what was recorded.
    meter_provider: MeterProvider | None = None
    metrics: ServiceMetrics | None = None
    upstream_scheduler: UpstreamScheduler | None = None
    telemetry_servicer: telemetry.TelemetryServicer | None = None
    # This replica's dispatch delivery worker (None when dispatch_delivery_enabled is off).
    dispatch_deliverer: OutboxDeliverer | None = None
    dispatch_worker: Worker | None = None
    balancing_consumer: BalancingQueueConsumer | None = None
    _health: health.aio.HealthServicer | None = None
    # One record of a database outage, shared by the health probe and every refused call.
    database_outage: OutageLog = field(default_factory=lambda: OutageLog("database", log))
    _serving: bool = False
    _probe: Worker | None = None
    _authenticator: Authenticator | None = None
    call_guard: CallGuard | None = None
    _workers: list[Worker] = field(default_factory=list)
    _service_names: list[str] = field(default_factory=list)
    _capability_list: list[Capability] = field(default_factory=list)

    async def start(self) -> int:
        """Migrates, starts serving, returns the bound port."""
        try:
            return await self._start()
        except BaseException:
            # A half-started service (e.g. the port is taken) must not leave a pool behind.
            await self.stop(grace=0)
            raise

    async def _start(self) -> int:
        settings = self.settings
        if settings.metrics_exporter or self.meter_provider is not None:
            self.metrics = ServiceMetrics(self.meter_provider)
        # asyncpg logs every reconnect attempt of the pool with a stack trace.
        quiet_library_retries("asyncpg.pool")
        self.pool = await create_pool(
            self.dsn, settings.db_pool_min_size, settings.db_pool_max_size
        )
        await migrate_database(self.dsn)
        read_connections = min(settings.db_read_connections, settings.db_pool_max_size // 2)
        if read_connections > 0:
            self.reads = ReadLane(self.pool, read_connections)
        identity = IdentityStore(
            self.pool,
            signing_secret_grace=timedelta(seconds=settings.dispatch_signing_secret_grace_seconds),
        )
        self.identity = identity

        self.hub = EventHub(self.dsn, settings.health_interval_seconds, SESSION_SETTINGS)
        await self.hub.start()
        hub = self.hub
        authenticator = Authenticator(
            identity, settings.token_cache_seconds, cache_allowed=lambda: hub.connected
        )
        self._authenticator = authenticator
        await self.hub.listen(TOKEN_REVOKED_CHANNEL, authenticator.forget)
        self.hub.on_reset(authenticator.forget_all)

        capabilities = self._capabilities()
        self._capability_list = capabilities
        for capability in capabilities:
            if capability.start is not None:
                await capability.start()
        self._workers = [worker for capability in capabilities for worker in capability.workers]
        for worker in self._workers:
            await worker.start(self.hub)
        method_roles: dict[str, frozenset[Role]] = {}
        for capability in capabilities:
            method_roles.update(capability.method_roles)
        self.server = grpc.aio.server(options=GRPC_OPTIONS)
        tracer = trace.get_tracer("openvpp") if settings.trace_exporter else None
        guard = CallGuard(
            authenticator,
            tracer,
            self.database_outage,
            max_watch_streams_per_org=settings.max_watch_streams_per_org,
            metrics=self.metrics,
        )
        self.call_guard = guard
        if self.metrics is not None:
            self._observe(self.metrics, guard)
        served = [c for c in capabilities if c.descriptor is not None]
        for capability in served:
            assert capability.descriptor is not None
            guard.register(
                self.server, capability.descriptor, capability.servicer, capability.method_roles
            )
        self._service_names = [c.descriptor.full_name for c in served if c.descriptor is not None]

        # Health and reflection take no token (load balancers and grpcurl call them bare) but
        # go through the same guard, so a request they cannot decode is INVALID_ARGUMENT too.
        self._health = health.aio.HealthServicer()
        guard.register(self.server, HEALTH_DESCRIPTOR, self._health, {}, public=True)
        enable_server_reflection([*self._service_names, health.SERVICE_NAME], self.server, guard)
        try:
            self.port = self.server.add_insecure_port(settings.grpc_address)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise GrpcAddressUnusableError(settings.grpc_address)
        if settings.bootstrap:
            # Only once the address is ours: the token is shown once, by the start that
            # creates it, so a start that cannot listen must leave the database empty.
            self.bootstrap_token = await identity.bootstrap_partner("default-partner")
        await self.server.start()
        await self._set_health(serving=True)
        self._serving = True
        # The probe runs on real time even under a test clock: it watches a real database.
        self._probe = Worker(
            "health-probe",
            self._probe_database,
            interval_seconds=settings.health_interval_seconds,
            clock=SYSTEM_CLOCK,
        )
        await self._probe.start()
        return self.port

    def _capabilities(self) -> list[Capability]:
        assert self.pool is not None
        assert self.hub is not None
        registry_servicer = registry.SiteRegistryServicer(
            self.pool,
            self.hub,
            self.settings.watch_buffer_size,
            self.clock,
            self.reads,
            webhook_allow_private_networks=self.settings.webhook_allow_private_networks,
        )
        upstream_servicer = upstream.UpstreamRegistryServicer(self.pool, self.clock)
        self.upstream_scheduler = UpstreamScheduler(self.pool, self.clock)
        meter_servicer = meters.MeterRegistryServicer(self.pool)
        telemetry_servicer = telemetry.TelemetryServicer(
            self.pool, self.hub, self.settings, self.metrics
        )
        self.telemetry_servicer = telemetry_servicer
        self.balancing_consumer = BalancingQueueConsumer(self.pool)
        poll = self.settings.balancing_poll_seconds
        balancing_workers = (
            []
            if poll < 0
            else [
                Worker(
                    "balancing",
                    self.balancing_consumer.step,
                    interval_seconds=poll,
                    clock=self.clock,
                    wake_channels=[BALANCING_QUEUE_CHANNEL],
                )
            ]
        )
        return [
            Capability(
                registry.DESCRIPTOR,
                registry_servicer,
                registry.METHOD_ROLES,
            ),
            Capability(
                upstream.DESCRIPTOR,
                upstream_servicer,
                upstream.METHOD_ROLES,
                # Date-driven status transitions, applied whether or not anyone calls.
                workers=[
                    Worker(
                        "upstream-scheduler",
                        self.upstream_scheduler.tick,
                        interval_seconds=self.settings.upstream_scheduler_interval_seconds,
                        clock=self.clock,
                    )
                ],
            ),
            Capability(
                meters.DESCRIPTOR,
                meter_servicer,
                meters.METHOD_ROLES,
            ),
            Capability(
                telemetry.DESCRIPTOR,
                telemetry_servicer,
                telemetry.METHOD_ROLES,
                start=telemetry_servicer.start,
                stop=telemetry_servicer.stop,
                workers=[
                    Worker(
                        "readings-partitions",
                        telemetry_servicer.maintain_partitions,
                        interval_seconds=telemetry.PARTITION_CHECK_SECONDS,
                        clock=SYSTEM_CLOCK,
                    )
                ],
            ),
            Capability(
                balancing.DESCRIPTOR,
                balancing.BalancingServicer(self.pool, self.hub, self.settings.watch_buffer_size),
                balancing.METHOD_ROLES,
                # Keeps results current: wakes at every commit that queues intervals.
                workers=balancing_workers,
            ),
            self._dispatch_capability(),
        ]

    def _dispatch_capability(self) -> Capability:
        assert self.pool is not None
        assert self.hub is not None
        settings = self.settings
        servicer = dispatch.DispatchServicer(
            self.pool, self.hub, self.clock, settings.watch_buffer_size
        )
        if not settings.dispatch_delivery_enabled:
            return Capability(dispatch.DESCRIPTOR, servicer, dispatch.METHOD_ROLES)
        outbox_settings = OutboxSettings.from_settings(settings)
        deliverer = OutboxDeliverer(
            self.pool,
            IdentityStore(
                self.pool,
                signing_secret_grace=timedelta(
                    seconds=settings.dispatch_signing_secret_grace_seconds
                ),
            ),
            self.clock,
            outbox_settings,
            DeliverySettings.from_settings(settings),
            self.metrics,
        )
        # Woken at the commit of every dispatch (NOTIFY), so setpoints go out at once; the
        # timer brings due retries and claims whose lease expired.
        worker = Worker(
            "dispatch-delivery",
            deliverer.step,
            interval_seconds=outbox_settings.poll_interval_seconds,
            clock=self.clock,
            wake_channels=[DISPATCH_OUTBOX_CHANNEL],
        )
        self.dispatch_deliverer = deliverer
        self.dispatch_worker = worker
        return Capability(
            dispatch.DESCRIPTOR,
            servicer,
            dispatch.METHOD_ROLES,
            start=deliverer.start,
            stop=deliverer.stop,
            workers=[worker],
        )

    def _observe(self, metrics: ServiceMetrics, guard: CallGuard) -> None:
        """The gauges and totals read from state the service keeps anyway, at each export."""
        workers = self._workers
        metrics.counter(
            "openvpp.worker.passes",
            "Passes of each background worker that completed",
            lambda: {(("worker", w.name),): w.passes for w in workers},
            unit="{pass}",
        )
        metrics.counter(
            "openvpp.worker.failures",
            "Passes of each background worker that failed (each is retried)",
            lambda: {(("worker", w.name),): w.failures for w in workers},
            unit="{pass}",
        )
        metrics.gauge(
            "openvpp.health.serving",
            "1 while this replica reports SERVING (the database and the event listener"
            " answer), else 0",
            lambda: {(): 1.0 if self._serving else 0.0},
        )
        metrics.gauge(
            "openvpp.watch.streams",
            "Watch* streams open on this replica",
            lambda: {(): float(guard.watch_streams.total_open())},
            unit="{stream}",
        )
        deliverer = self.dispatch_deliverer
        if deliverer is not None:
            metrics.gauge(
                "openvpp.dispatch.in_flight",
                "Setpoints this replica claimed and has not finished (queued, being sent or"
                " being recorded)",
                lambda: {(): float(deliverer.in_flight)},
                unit="{setpoint}",
            )

    async def _set_health(self, serving: bool) -> None:
        assert self._health is not None
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self._service_names]:
            await self._health.set(name, status)

    async def _probe_database(self) -> bool:
        """SERVING only while the database answers."""
        pool = self.pool
        assert pool is not None
        interval = self.settings.health_interval_seconds
        cause = "the event listener is not connected"
        acquired = False
        try:
            async with asyncio.timeout(interval), pool.acquire() as conn:
                acquired = True
                await conn.fetchval("SELECT 1")
            healthy = self.hub is not None and self.hub.connected
        except Exception as error:
            healthy = False
            cause = f"health probe: {type(error).__name__}"
            if not acquired and isinstance(error, TimeoutError) and _all_in_use(pool):
                # Busy, not down: every pooled connection is at work. Load must not take a
                # replica out of rotation (its peers would then fill up the same way); the
                # hub's connection, probed every interval too, tells whether the database
                # answers.
                healthy = self.hub is not None and self.hub.connected
                cause = "the event listener is not connected"
        # Logged as one outage (start, summaries, end) with the calls it refused.
        if healthy:
            self.database_outage.up()
        else:
            self.database_outage.down(cause)
        if healthy != self._serving:
            self._serving = healthy
            await self._set_health(healthy)
        return False

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting calls, lets in-flight ones finish within the grace period, then
        closes the event hub and the pool. Safe to call more than once."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        if self._probe is not None:
            await self._probe.stop()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        self._serving = False
        stopping: asyncio.Task[None] | None = None
        if self.server is not None:
            stopping = asyncio.create_task(self.server.stop(grace))
            # Let the server refuse new calls before watch streams are ended below, so a
            # client reconnecting at once is refused rather than subscribed to a closing hub.
            await asyncio.sleep(0)
        # Watch streams never finish on their own: end them now rather than at the deadline.
        # Unary calls do not use the hub, so they still complete within the grace period.
        if self.hub is not None:
            await self.hub.close()
        if stopping is not None:
            await stopping
        for worker in reversed(self._workers):
            await worker.stop()
        self._workers.clear()
        for capability in self._capability_list:
            if capability.stop is not None:
                await capability.stop()
        if self._authenticator is not None:
            await self._authenticator.close()
        if self.reads is not None:
            await self.reads.close()
        if self.pool is not None:
            # Every call has ended, so connections come back; a stuck one must not hang exit.
            try:
                await asyncio.wait_for(self.pool.close(), timeout=max(grace, 1.0) + 5)
            except TimeoutError:
                log.warning("database pool did not close in time; terminating it")
                self.pool.terminate()


def _all_in_use(pool: asyncpg.Pool) -> bool:
    size: int = pool.get_size()
    idle: int = pool.get_idle_size()
    return size >= pool.get_max_size() and idle == 0
