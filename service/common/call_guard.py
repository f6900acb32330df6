"""Authentication, role checks and error mapping around every RPC of ours.

Handlers stay free of this plumbing: they read ``current_principal()`` and raise domain
errors; what the client sees is decided here, once.

This is applied when a service is registered, by wrapping each method's handler, rather
than as a ``grpc.aio.ServerInterceptor``: an interceptor runs an extra coroutine and
handler lookup on every call, which measured at about a fifth of GetSite's throughput.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from opentelemetry import trace
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

Guard = Callable[[grpc.aio.ServicerContext[Any, Any]], Any]
Admit = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[Principal]]
Fail = Callable[[grpc.aio.ServicerContext[Any, Any], Exception, Span | None], Awaitable[None]]
SpanFactory = Callable[[], Span | None]


def _wrap(handler: Any, guard: Guard, admit: Admit, fail: Fail, span_for: SpanFactory) -> Any:
    """The same handler, its behaviour run inside ``guard(context)`` (an async context manager).

    Unary calls, the hot path, run the same steps inline: the context manager costs a
    generator and two more awaits per call."""
    if handler.request_streaming and handler.response_streaming:
        inner_ss = handler.stream_stream

        async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
            async with guard(context):
                async for response in inner_ss(requests, context):
                    yield response

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.response_streaming:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            async with guard(context):
                async for response in inner_us(request, context):
                    yield response

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.request_streaming:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            async with guard(context):
                return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    inner_uu = handler.unary_unary

    async def unary_unary(request: Any, context: Any) -> Any:
        span = span_for()
        try:
            bound = bind_principal(await admit(context))
            try:
                return await inner_uu(request, context)
            finally:
                unbind_principal(bound)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await fail(context, error, span)
            raise  # fail() always aborts
        finally:
            if span is not None:
                span.end()

    return grpc.unary_unary_rpc_method_handler(
        unary_unary, handler.request_deserializer, handler.response_serializer
    )


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

        def span_for() -> Span | None:
            # Not made the current span: a stream's guard may be closed from another context
            # (the client went away), where detaching an attached context fails noisily.
            if tracer is None:
                return None
            return tracer.start_span(method, kind=trace.SpanKind.SERVER)

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

        @asynccontextmanager
        async def guard(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
            span = span_for()
            try:
                bound = bind_principal(await admit(context))
                try:
                    yield
                finally:
                    unbind_principal(bound)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await fail(context, error, span)
            finally:
                if span is not None:
                    span.end()

        return _wrap(handler, guard, admit, fail, span_for)


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


def _authorization_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return bearer_token(_as_text(value))
    return None


def _as_text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value
