"""Authentication, role checks, decoding and error mapping around every RPC the server
offers (ours, health and reflection).

Handlers stay free of this plumbing: they read ``current_principal()`` and raise domain
errors; what the client sees is decided here, once.

This is applied when a service is registered, by wrapping each method's handler, rather
than as a ``grpc.aio.ServerInterceptor``: an interceptor runs an extra coroutine and
handler lookup on every call, which measured at about a fifth of GetSite's throughput.

Requests are decoded here too, after the caller is admitted: handlers are registered with
gRPC without a request deserializer (gRPC hands over the raw bytes) and the guard parses
them, so an undecodable request from a caller without a token is UNAUTHENTICATED, and from
one with a token INVALID_ARGUMENT, never the UNKNOWN (and the logged stack trace) gRPC makes
of a failing deserializer. On a client stream each message is parsed as the handler reads
it, so a bad one ends the stream after the responses already sent.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from opentelemetry import propagate, trace
from opentelemetry.trace import Span

from service.auth.authenticator import Authenticator
from service.auth.principal import (
    Principal,
    Role,
    bind_principal,
    current_principal,
    unbind_principal,
)
from service.auth.tokens import bearer_token
from service.common.errors import DomainError, MalformedRequestError
from service.common.grpc_errors import (
    CONCURRENT_CONFLICT,
    DATABASE_UNAVAILABLE,
    SCHEMA_CHANGED,
    plain_status,
    status_for,
    status_with_reason,
)
from service.common.loglimit import LogLimiter, OutageLog, error_key, held_back
from service.common.request_limits import check_request
from service.events.hub import EventsInterrupted, SubscriberTooSlow
from service.identifiers.ids import OrgId
from service.observability import ServiceMetrics, bind_call_span, unbind_call_span

log = logging.getLogger(__name__)

# One line per (method, status) of rejected calls, and one stack trace per distinct bug, per
# this many seconds.
REJECTION_LOG_SECONDS = 60.0
INTERNAL_TRACE_SECONDS = 60.0
# Longest client-supplied text quoted in a log line.
_LOGGED_TEXT = 200

Admit = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[Principal | None]]
Decode = Callable[[Any], Any]
Fail = Callable[[Exception, Span | None], grpc.Status]
SpanFactory = Callable[[grpc.aio.ServicerContext[Any, Any]], Span | None]
Record = Callable[[float, int | None], None]
WatchRevocation = Callable[[grpc.aio.ServicerContext[Any, Any]], "_Revocation"]


class _Steps:
    """What the guard does around every call of one method."""

    __slots__ = ("admit", "decode", "fail", "record", "span_for", "watch", "watch_streams")

    def __init__(
        self,
        admit: Admit,
        decode: Decode,
        fail: Fail,
        span_for: SpanFactory,
        watch: WatchRevocation | None,
        watch_streams: StreamQuota | None,
        record: Record | None,
    ) -> None:
        self.admit = admit
        self.decode = decode
        self.fail = fail
        self.span_for = span_for
        self.watch = watch
        self.watch_streams = watch_streams
        # The call's duration (ms) and status code, while metrics are on.
        self.record = record


class StreamQuota:
    """How many server streams (the Watch* RPCs) each organization has open on this
    replica, refused beyond ``limit`` with RESOURCE_EXHAUSTED: every one holds a buffer, and
    some a database read per event, so one tenant's thousands would slow every other's."""

    __slots__ = ("_open", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[OrgId, int] = {}

    def take(self, org_id: OrgId) -> None:
        held = self._open.get(org_id, 0)
        if held >= self.limit:
            raise _Refused(
                status_with_reason(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this organization has {held} watch streams open on this server, the"
                    f" most it may (OPENVPP_MAX_WATCH_STREAMS_PER_ORG); close one first",
                    "TOO_MANY_WATCH_STREAMS",
                )
            )
        self._open[org_id] = held + 1

    def give_back(self, org_id: OrgId) -> None:
        held = self._open[org_id] - 1
        if held:
            self._open[org_id] = held
        else:
            del self._open[org_id]

    def open_streams(self, org_id: OrgId) -> int:
        return self._open.get(org_id, 0)

    def total_open(self) -> int:
        return sum(self._open.values())


class _RevocableContext:
    """The call's context as its handler sees it: while gRPC sends the response headers a
    revocation must not cancel the call (the status could then never be sent), so that send
    counts as a write, and a revocation during it ends the call right after it."""

    __slots__ = ("_context", "_revocation")

    def __init__(self, context: Any, revocation: _Revocation) -> None:
        self._context = context
        self._revocation = revocation

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def send_initial_metadata(self, metadata: Any) -> None:
        self._revocation.sending = True
        try:
            await self._context.send_initial_metadata(metadata)
        finally:
            self._revocation.sending = False
        self._revocation.check()


TOKEN_REVOKED_STATUS = status_with_reason(
    grpc.StatusCode.UNAUTHENTICATED,
    "the token of this call was revoked while it ran; call again with a valid token",
    "TOKEN_REVOKED",
)


class _Revocation:
    """Ends a streaming call whose token is revoked while it runs, with UNAUTHENTICATED.

    Watched from before admission, so a revocation during the token's lookup is not missed;
    armed once admitted. An armed call waiting inside its handler (for an event, the next
    request, the database) is cancelled there and ends with the status; one whose response
    is being written ends once the write is done, so that gRPC's own writing is never cut
    off."""

    __slots__ = ("_cancelled", "_task", "_unwatch", "revoked", "sending")

    def __init__(self, authenticator: Authenticator, token: str) -> None:
        self.revoked = False
        self.sending = False
        self._cancelled = False
        self._task: asyncio.Task[Any] | None = None
        self._unwatch = authenticator.on_revoked(token, self._on_revoked)

    def arm(self) -> None:
        self.check()
        self._task = asyncio.current_task()

    def check(self) -> None:
        if self.revoked:
            raise _Refused(TOKEN_REVOKED_STATUS)

    def __enter__(self) -> _Revocation:
        self.arm()
        return self

    def __exit__(self, _type: object, error: BaseException | None, _tb: object) -> None:
        """Disarmed whatever happened; this revocation's cancellation becomes its status."""
        ours = isinstance(error, asyncio.CancelledError) and self.cancelled_by_us()
        self.close()
        if ours:
            raise _Refused(TOKEN_REVOKED_STATUS) from None

    def cancelled_by_us(self) -> bool:
        """Whether the CancelledError being handled is this revocation's (not the client's
        going away); if so the task's cancellation is taken back, the call goes on to end."""
        if self._cancelled and self._task is not None:
            self._task.uncancel()
            self._task = None
            return True
        return False

    def close(self) -> None:
        self._task = None
        self._unwatch()

    def _on_revoked(self) -> None:
        self.revoked = True
        if self._task is not None and not self.sending:
            self._cancelled = True
            self._task.cancel()


class _Guarded:
    """One call inside the guard: admitted on entry, its error turned into a status on exit.

    A class rather than ``@asynccontextmanager``: the generator behind that one cost about
    as much per call as everything else the guard does."""

    __slots__ = ("_bound", "_context", "_span", "_span_bound", "_started", "_steps")

    def __init__(self, steps: _Steps, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._steps = steps
        self._context = context
        self._span: Span | None = None
        self._bound: contextvars.Token[Principal] | None = None
        self._span_bound: contextvars.Token[Span | None] | None = None
        self._started = 0.0

    async def __aenter__(self) -> None:
        if self._steps.record is not None:
            self._started = time.perf_counter()
        self._span = self._steps.span_for(self._context)
        if self._span is not None:
            # What the handler hands on (a dispatch's traceparent) continues this span.
            self._span_bound = bind_call_span(self._span)
        try:
            principal = await self._steps.admit(self._context)
        except BaseException as error:
            if self._span_bound is not None:
                unbind_call_span(self._span_bound)
            await self._leave(error)
            raise
        if principal is not None:
            self._bound = bind_principal(principal)

    async def __aexit__(self, _type: object, error: BaseException | None, _tb: object) -> None:
        if self._bound is not None:
            unbind_principal(self._bound)
        if self._span_bound is not None:
            unbind_call_span(self._span_bound)
        await self._leave(error)

    async def _leave(self, error: BaseException | None) -> None:
        status: grpc.Status | None = None
        try:
            if isinstance(error, Exception) and not isinstance(error, grpc.aio.AbortError):
                status = self._steps.fail(error, self._span)
        finally:
            span, record = self._span, self._steps.record
            if span is not None or record is not None:
                code = _status_code(error, status, self._context)
                # Ended before the status goes out: whoever sees the status sees the span.
                if span is not None:
                    if code is not None:
                        span.set_attribute("rpc.grpc.status_code", code)
                    span.end()
                if record is not None:
                    record((time.perf_counter() - self._started) * 1000.0, code)
        if status is not None:
            await self._context.abort_with_status(status)


def _duration_recorder(metrics: ServiceMetrics, attributes: dict[str, str]) -> Record:
    histogram = metrics.rpc_duration
    # One attribute set per status code of the method, made once.
    by_code: dict[int | None, dict[str, str | int]] = {}

    def record(milliseconds: float, code: int | None) -> None:
        labelled = by_code.get(code)
        if labelled is None:
            labelled = by_code[code] = dict(attributes)
            if code is not None:
                labelled["rpc.grpc.status_code"] = code
        histogram.record(milliseconds, labelled)

    return record


def _status_code(
    error: BaseException | None, status: grpc.Status | None, context: Any
) -> int | None:
    """The numeric status a call ends with, where it is known here."""
    if error is None:
        return 0
    if status is not None:
        code: grpc.StatusCode = status.code
        return int(code.value[0])
    if isinstance(error, grpc.aio.AbortError):
        # The handler aborted with a status of its own (context.abort).
        aborted = context.code()
        if isinstance(aborted, grpc.StatusCode):
            return int(aborted.value[0])
        return aborted if isinstance(aborted, int) else None
    if isinstance(error, asyncio.CancelledError):
        return int(grpc.StatusCode.CANCELLED.value[0])
    return None


class _Refused(Exception):
    """The caller may not make this call; ``status`` says why."""

    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status


async def _decoded(raw_requests: AsyncIterator[bytes], decode: Decode) -> AsyncIterator[Any]:
    async for raw in raw_requests:
        yield decode(raw)


def _wrap(handler: Any, steps: _Steps) -> Any:
    """The same handler, its behaviour run inside the guard, which decodes its requests."""
    kind = (handler.request_streaming, handler.response_streaming)
    inner = getattr(handler, _BEHAVIOURS[kind])
    decode = steps.decode
    watch = steps.watch
    guarded: Any
    arguments: Decode = decode
    if handler.request_streaming:
        # Each message is decoded when the handler reads it, inside the guard.
        def arguments(raw: Any) -> Any:
            return _decoded(raw, decode)

    if handler.response_streaming:

        async def guarded_stream(raw: Any, context: Any) -> AsyncIterator[Any]:
            revocation = watch(context) if watch is not None else None
            try:
                async with _Guarded(steps, context):
                    if revocation is None:
                        produced = inner(arguments(raw), context)
                        if inspect.isawaitable(produced):
                            # A handler that sends with context.write (grpc's Health/Watch).
                            await produced
                            return
                        async for response in produced:
                            yield response
                        return
                    # Decoded (and refused, if it must be) before a place is taken.
                    request = arguments(raw)
                    quota = steps.watch_streams if not handler.request_streaming else None
                    org_id = current_principal().org_id
                    if quota is not None:
                        quota.take(org_id)
                    try:
                        with revocation:
                            responses = inner(request, _RevocableContext(context, revocation))
                            async for response in responses:
                                revocation.sending = True
                                yield response
                                revocation.sending = False
                                if revocation.revoked:
                                    # Its clean-up (a subscription, a reader task) runs now.
                                    await responses.aclose()
                                    revocation.check()
                    finally:
                        if quota is not None:
                            quota.give_back(org_id)
            finally:
                if revocation is not None:
                    revocation.close()

        guarded = guarded_stream
    elif handler.request_streaming and watch is not None:

        async def guarded_client_stream(raw: Any, context: Any) -> Any:
            revocation = watch(context)
            try:
                async with _Guarded(steps, context):
                    request = arguments(raw)
                    with revocation:
                        return await inner(request, _RevocableContext(context, revocation))
            finally:
                revocation.close()

        guarded = guarded_client_stream
    else:

        async def guarded_unary(raw: Any, context: Any) -> Any:
            async with _Guarded(steps, context):
                return await inner(arguments(raw), context)

        guarded = guarded_unary
    factory: Any = _HANDLER_FACTORIES[kind]
    return factory(guarded, None, handler.response_serializer)


def _decoder(deserializer: Callable[[bytes], Any] | None, type_name: str) -> Decode:
    """Parses a request, an undecodable one being the caller's error."""
    if deserializer is None:
        return lambda raw: raw

    def decode(raw: bytes) -> Any:
        try:
            request = deserializer(raw)
        except Exception:
            # DecodeError, but also a deserializer's own failure (e.g. recursion limit).
            raise MalformedRequestError(type_name) from None
        if isinstance(request, Message):
            check_request(request)
        return request

    return decode


def _request_type_name(deserializer: Callable[[bytes], Any] | None) -> str:
    """``openvpp.v1.GetSiteRequest`` for ``GetSiteRequest.FromString``."""
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request message"))


class CallGuard:
    """Wraps our services' handlers so every call is authenticated and role-checked, and its
    errors are mapped to statuses.

    The caller's bearer token must belong to an organization whose role may call the method:
    ``method_roles`` maps every full method name ("/openvpp.v1.SiteRegistry/GetSite") to the
    roles allowed to call it, and a method without an entry is refused, so new RPCs are closed
    until someone decides who may call them.

    A ``public`` service (health, reflection) takes no token; its calls are decoded and
    their errors mapped the same way.

    Domain errors become statuses with details and at most one log line per method and
    status a minute; a database outage is logged as one (``database_outage``: its start, a
    summary of refused calls, its end); anything unexpected becomes INTERNAL with a generic
    message, its stack trace logged once per distinct error a minute, never sent to the
    client.

    With a ``tracer``, every call is a server span named by its method; without one (no
    exporter configured) no span is made at all, as nobody would see it.
    """

    def __init__(
        self,
        authenticator: Authenticator,
        tracer: trace.Tracer | None = None,
        database_outage: OutageLog | None = None,
        max_watch_streams_per_org: int = 100,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._tracer = tracer
        self._metrics = metrics
        self.database_outage = database_outage or OutageLog("database", log)
        self.watch_streams = StreamQuota(max_watch_streams_per_org)
        self._rejections = LogLimiter(REJECTION_LOG_SECONDS)
        self._internal_traces = LogLimiter(INTERNAL_TRACE_SECONDS)
        self._conflicts = LogLimiter(REJECTION_LOG_SECONDS)

    def register(
        self,
        server: grpc.aio.Server,
        service: ServiceDescriptor,
        servicer: object,
        method_roles: Mapping[str, frozenset[Role]],
        *,
        public: bool = False,
    ) -> None:
        """Serves ``servicer``'s implementation of ``service``, every method guarded."""
        handlers = {
            method.name: self.guarded(
                f"/{service.full_name}/{method.name}",
                _method_handler(method, getattr(servicer, method.name)),
                method_roles,
                public=public,
            )
            for method in service.methods
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service.full_name, handlers),)
        )
        server.add_registered_method_handlers(service.full_name, handlers)

    def guarded(
        self,
        method: str,
        handler: Any,
        method_roles: Mapping[str, frozenset[Role]],
        *,
        public: bool = False,
    ) -> Any:
        """``handler`` guarded; its ``request_deserializer`` runs inside the guard."""
        allowed = method_roles.get(method, frozenset())
        authenticator = self._authenticator
        tracer = self._tracer
        outage = self.database_outage
        rejections = self._rejections
        internal_traces = self._internal_traces
        conflicts = self._conflicts
        deserializer = handler.request_deserializer
        decode = _decoder(deserializer, _request_type_name(deserializer))
        # OpenTelemetry's semantic conventions for RPC server spans.
        service_name, _, method_name = method.strip("/").rpartition("/")
        span_attributes = {
            "rpc.system": "grpc",
            "rpc.service": service_name,
            "rpc.method": method_name,
        }

        def span_for(context: grpc.aio.ServicerContext[Any, Any]) -> Span | None:
            # A child of the caller's span when it sends W3C trace context (traceparent).
            # Not made the current span: a stream's guard may be closed from another context
            # (the client went away), where detaching an attached context fails noisily.
            if tracer is None:
                return None
            caller = propagate.extract(_text_metadata(context.invocation_metadata()))
            return tracer.start_span(
                method, context=caller, kind=trace.SpanKind.SERVER, attributes=span_attributes
            )

        async def admit(context: grpc.aio.ServicerContext[Any, Any]) -> Principal | None:
            if public:
                return None
            token = _authorization_token(context.invocation_metadata())
            principal = await authenticator.authenticate(token) if token else None
            if principal is None:
                rejected(grpc.StatusCode.UNAUTHENTICATED, "no valid token")
                raise _Refused(
                    status_with_reason(
                        grpc.StatusCode.UNAUTHENTICATED,
                        "missing, unknown or revoked token; send 'authorization: Bearer <token>'",
                        "INVALID_TOKEN",
                    )
                )
            if principal.role not in allowed:
                roles = ", ".join(sorted(allowed)) or "none"
                rejected(grpc.StatusCode.PERMISSION_DENIED, f"role {principal.role}")
                raise _Refused(
                    status_with_reason(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"role {principal.role} may not call {method} (allowed: {roles})",
                        "ROLE_NOT_ALLOWED",
                    )
                )
            return principal

        def rejected(code: grpc.StatusCode, why: str) -> None:
            """One line per method and status a minute: who sends what is not ours to fix."""
            dropped = rejections.admit((method, code))
            if dropped is not None:
                log.info("rejected %s: %s %s%s", method, code.name, why, held_back(dropped))

        def fail(error: Exception, span: Span | None) -> grpc.Status:
            """The status the call ends with for ``error``."""
            if isinstance(error, _Refused):
                return error.status
            if isinstance(error, DomainError):
                if span is not None:
                    span.set_attribute("rpc.grpc.error", type(error).__name__)
                status = status_for(error)
                rejected(status.code, _loggable(error.message))
                return status
            if isinstance(error, NotImplementedError):
                # A generated servicer base method nobody overrode (e.g. Health/List).
                return plain_status(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
            if isinstance(error, SubscriberTooSlow):
                return plain_status(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"stream ended: the client read too slowly ({error}); reconnect",
                )
            if isinstance(error, EventsInterrupted):
                return plain_status(
                    grpc.StatusCode.UNAVAILABLE, f"stream ended: {error}; reconnect"
                )
            if isinstance(error, SCHEMA_CHANGED):
                dropped = conflicts.admit(type(error).__name__)
                if dropped is not None:
                    log.info(
                        "%s found a statement prepared before a schema change (%s)%s",
                        method,
                        type(error).__name__,
                        held_back(dropped),
                    )
                return plain_status(
                    grpc.StatusCode.ABORTED,
                    "the database schema changed during the call (a migration); retry the call",
                )
            if isinstance(error, CONCURRENT_CONFLICT):
                # PostgreSQL aborted this transaction for another's sake; nothing of it was
                # written, and the same call again will normally succeed.
                dropped = conflicts.admit(type(error).__name__)
                if dropped is not None:
                    log.info(
                        "concurrency conflict during %s (%s)%s",
                        method,
                        type(error).__name__,
                        held_back(dropped),
                    )
                return plain_status(
                    grpc.StatusCode.ABORTED, "conflicting concurrent change; retry the call"
                )
            if isinstance(error, DATABASE_UNAVAILABLE):
                # Also a token lookup that cannot reach the database: retryable.
                outage.refused(error)
                return plain_status(
                    grpc.StatusCode.UNAVAILABLE, "database unavailable; retry later"
                )
            dropped = internal_traces.admit(error_key(error))
            if dropped is not None:
                log.error("unexpected error in %s%s", method, held_back(dropped), exc_info=error)
            if span is not None:
                span.set_status(trace.StatusCode.ERROR)
            return plain_status(grpc.StatusCode.INTERNAL, "internal error")

        watch: WatchRevocation | None = None
        if not public:

            def watch(context: grpc.aio.ServicerContext[Any, Any]) -> _Revocation:
                # Admission refuses a call without one before the handler runs.
                token = _authorization_token(context.invocation_metadata()) or ""
                return _Revocation(authenticator, token)

        metrics = self._metrics
        record = None if metrics is None else _duration_recorder(metrics, span_attributes)
        quota = None if public else self.watch_streams
        return _wrap(handler, _Steps(admit, decode, fail, span_for, watch, quota, record))


# (request streaming, response streaming) -> the RpcMethodHandler attribute holding the
# behaviour, and the factory that builds such a handler.
_BEHAVIOURS = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}
_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _method_handler(method: MethodDescriptor, behavior: Any) -> Any:
    """The handler the generated ``add_*Servicer_to_server`` would build for ``method``."""
    request = message_factory.GetMessageClass(method.input_type)
    response = message_factory.GetMessageClass(method.output_type)
    factory: Any = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
    return factory(
        behavior,
        request_deserializer=request.FromString,
        response_serializer=response.SerializeToString,
    )


def _loggable(text: str) -> str:
    """Client-supplied text fit for one log line: bounded, control characters escaped."""
    if len(text) > _LOGGED_TEXT:
        text = text[:_LOGGED_TEXT] + "..."
    return text if text.isprintable() else repr(text)


def _text_metadata(metadata: Any) -> dict[str, str]:
    return {key: value for key, value in metadata or () if isinstance(value, str)}


def _authorization_token(metadata: Any) -> str | None:
    """The bearer token of the one ``authorization`` entry; None without one, or with more
    than one (a proxy's next to the client's): which of them counts is not ours to guess."""
    found: str | bytes | None = None
    for key, value in metadata or ():
        if key == "authorization":
            if found is not None:
                return None
            found = value
    return None if found is None else bearer_token(_as_text(found))


def _as_text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value
