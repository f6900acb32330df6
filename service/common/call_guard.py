"""Authentication, role checks and error mapping around every RPC of ours.

Handlers stay free of this plumbing: they read ``current_principal()`` and raise domain
errors; what the client sees is decided here, once.

This is applied when a service is registered, by wrapping each method's handler, rather
than as a ``grpc.aio.ServerInterceptor``: an interceptor runs an extra coroutine and
handler lookup on every call, which measured at about a fifth of GetSite's throughput.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from opentelemetry import propagate, trace
from opentelemetry.trace import Span

from service.auth.authenticator import Authenticator
from service.auth.principal import Principal, Role, bind_principal, unbind_principal
from service.auth.tokens import bearer_token
from service.common.errors import DomainError
from service.common.grpc_errors import (
    CONCURRENT_CONFLICT,
    DATABASE_UNAVAILABLE,
    status_for,
    status_with_reason,
)
from service.events.hub import EventsInterrupted, SubscriberTooSlow

log = logging.getLogger(__name__)

Admit = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[Principal]]
Fail = Callable[[grpc.aio.ServicerContext[Any, Any], Exception, Span | None], Awaitable[None]]
SpanFactory = Callable[[grpc.aio.ServicerContext[Any, Any]], Span | None]


class _Steps:
    """What the guard does around every call of one method."""

    __slots__ = ("admit", "fail", "span_for")

    def __init__(self, admit: Admit, fail: Fail, span_for: SpanFactory) -> None:
        self.admit = admit
        self.fail = fail
        self.span_for = span_for


class _Guarded:
    """One call inside the guard: admitted on entry, its error turned into a status on exit.

    A class rather than ``@asynccontextmanager``: the generator behind that one cost about
    as much per call as everything else the guard does."""

    __slots__ = ("_bound", "_context", "_span", "_steps")

    def __init__(self, steps: _Steps, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._steps = steps
        self._context = context
        self._span: Span | None = None
        self._bound: contextvars.Token[Principal] | None = None

    async def __aenter__(self) -> None:
        self._span = self._steps.span_for(self._context)
        try:
            principal = await self._steps.admit(self._context)
        except BaseException as error:
            await self._leave(error)
            raise
        self._bound = bind_principal(principal)

    async def __aexit__(self, _type: object, error: BaseException | None, _tb: object) -> None:
        if self._bound is not None:
            unbind_principal(self._bound)
        await self._leave(error)

    async def _leave(self, error: BaseException | None) -> None:
        try:
            if isinstance(error, Exception) and not isinstance(error, grpc.aio.AbortError):
                await self._steps.fail(self._context, error, self._span)
        finally:
            if self._span is not None:
                self._span.end()


def _wrap(handler: Any, steps: _Steps) -> Any:
    """The same handler, its behaviour run inside the guard."""
    kind = (handler.request_streaming, handler.response_streaming)
    inner = getattr(handler, _BEHAVIOURS[kind])
    guarded: Any
    if handler.response_streaming:

        async def guarded_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            async with _Guarded(steps, context):
                async for response in inner(request, context):
                    yield response

        guarded = guarded_stream
    else:

        async def guarded_unary(request: Any, context: Any) -> Any:
            async with _Guarded(steps, context):
                return await inner(request, context)

        guarded = guarded_unary
    factory: Any = _HANDLER_FACTORIES[kind]
    return factory(guarded, handler.request_deserializer, handler.response_serializer)


class CallGuard:
    """Wraps our services' handlers so every call is authenticated and role-checked, and its
    errors are mapped to statuses.

    The caller's bearer token must belong to an organization whose role may call the method:
    ``method_roles`` maps every full method name ("/openvpp.v1.SiteRegistry/GetSite") to the
    roles allowed to call it, and a method without an entry is refused, so new RPCs are closed
    until someone decides who may call them.

    Domain errors become statuses with details; anything unexpected becomes INTERNAL with a
    generic message, logged here with its stack trace, never sent to the client.

    With a ``tracer``, every call is a server span named by its method; without one (no
    exporter configured) no span is made at all, as nobody would see it.
    """

    def __init__(self, authenticator: Authenticator, tracer: trace.Tracer | None = None) -> None:
        self._authenticator = authenticator
        self._tracer = tracer

    def register(
        self,
        server: grpc.aio.Server,
        service: ServiceDescriptor,
        servicer: object,
        method_roles: Mapping[str, frozenset[Role]],
    ) -> None:
        """Serves ``servicer``'s implementation of ``service``, every method guarded."""
        handlers = {
            method.name: self.guarded(
                f"/{service.full_name}/{method.name}",
                _method_handler(method, getattr(servicer, method.name)),
                method_roles,
            )
            for method in service.methods
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service.full_name, handlers),)
        )
        server.add_registered_method_handlers(service.full_name, handlers)

    def guarded(
        self, method: str, handler: Any, method_roles: Mapping[str, frozenset[Role]]
    ) -> Any:
        allowed = method_roles.get(method, frozenset())
        authenticator = self._authenticator
        tracer = self._tracer

        def span_for(context: grpc.aio.ServicerContext[Any, Any]) -> Span | None:
            # A child of the caller's span when it sends W3C trace context (traceparent).
            # Not made the current span: a stream's guard may be closed from another context
            # (the client went away), where detaching an attached context fails noisily.
            if tracer is None:
                return None
            caller = propagate.extract(_text_metadata(context.invocation_metadata()))
            return tracer.start_span(method, context=caller, kind=trace.SpanKind.SERVER)

        async def admit(context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
            token = _authorization_token(context.invocation_metadata())
            principal = await authenticator.authenticate(token) if token else None
            if principal is None:
                await context.abort_with_status(
                    status_with_reason(
                        grpc.StatusCode.UNAUTHENTICATED,
                        "missing, unknown or revoked token; send 'authorization: Bearer <token>'",
                        "INVALID_TOKEN",
                    )
                )
            assert principal is not None
            if principal.role not in allowed:
                roles = ", ".join(sorted(allowed)) or "none"
                await context.abort_with_status(
                    status_with_reason(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"role {principal.role} may not call {method} (allowed: {roles})",
                        "ROLE_NOT_ALLOWED",
                    )
                )
            return principal

        async def fail(
            context: grpc.aio.ServicerContext[Any, Any], error: Exception, span: Span | None
        ) -> None:
            """Aborts the call with the status ``error`` stands for."""
            if isinstance(error, DomainError):
                if span is not None:
                    span.set_attribute("rpc.grpc.error", type(error).__name__)
                await context.abort_with_status(status_for(error))
            if isinstance(error, SubscriberTooSlow):
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"stream ended: the client read too slowly ({error}); reconnect",
                )
            if isinstance(error, EventsInterrupted):
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, f"stream ended: {error}; reconnect"
                )
            if isinstance(error, CONCURRENT_CONFLICT):
                # PostgreSQL aborted this transaction for another's sake; nothing of it was
                # written, and the same call again will normally succeed.
                log.info("concurrency conflict during %s", method, exc_info=error)
                await context.abort(
                    grpc.StatusCode.ABORTED, "conflicting concurrent change; retry the call"
                )
            if isinstance(error, DATABASE_UNAVAILABLE):
                # Also a token lookup that cannot reach the database: retryable.
                log.warning("database unavailable during %s", method, exc_info=error)
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, "database unavailable; retry later"
                )
            log.error("unexpected error in %s", method, exc_info=error)
            if span is not None:
                span.set_status(trace.StatusCode.ERROR)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

        return _wrap(handler, _Steps(admit, fail, span_for))


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


def _text_metadata(metadata: Any) -> dict[str, str]:
    return {key: value for key, value in metadata or () if isinstance(value, str)}


def _authorization_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return bearer_token(_as_text(value))
    return None


def _as_text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value
