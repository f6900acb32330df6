"""Server interceptors: authentication, role checks and error mapping for every RPC.

Handlers stay free of this plumbing: they read ``current_principal()`` and raise domain
errors; what the client sees is decided here, once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import grpc
from opentelemetry import trace

from service.auth.authenticator import Authenticator
from service.auth.principal import Role, bind_principal, unbind_principal
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
tracer = trace.get_tracer("openvpp")

# Method prefixes that need no token: clients probe health and discover services freely.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

Guard = Callable[[grpc.aio.ServicerContext[Any, Any]], Any]


def _wrap(handler: Any, guard: Guard) -> Any:
    """The same handler, its behaviour run inside ``guard(context)`` (an async context manager)."""
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
        async with guard(context):
            return await inner_uu(request, context)

    return grpc.unary_unary_rpc_method_handler(
        unary_unary, handler.request_deserializer, handler.response_serializer
    )


class RpcInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, role check and error mapping for every RPC but health and reflection.

    The caller's bearer token must belong to an organization whose role may call the method:
    ``method_roles`` maps every full method name ("/openvpp.v1.SiteRegistry/GetSite") to the
    roles allowed to call it, and a method without an entry is refused, so new RPCs are closed
    until someone decides who may call them.

    Domain errors become statuses with details; anything unexpected becomes INTERNAL with a
    generic message, logged here with its stack trace, never sent to the client.

    One interceptor rather than two: each interceptor in grpc.aio's chain costs every call.
    """

    def __init__(
        self, authenticator: Authenticator, method_roles: Mapping[str, frozenset[Role]]
    ) -> None:
        self._authenticator = authenticator
        self._method_roles = method_roles
        # Wrapped handlers per method: building them on every call showed up in profiles.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Any,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        allowed = self._method_roles.get(method, frozenset())
        authenticator = self._authenticator

        @asynccontextmanager
        async def guard(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
            with tracer.start_as_current_span(method, kind=trace.SpanKind.SERVER) as span:
                try:
                    token = _authorization_token(context.invocation_metadata())
                    principal = await authenticator.authenticate(token) if token else None
                    if principal is None:
                        await context.abort_with_status(
                            status_with_reason(
                                grpc.StatusCode.UNAUTHENTICATED,
                                "missing, unknown or revoked token; "
                                "send 'authorization: Bearer <token>'",
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
                    bound = bind_principal(principal)
                    try:
                        yield
                    finally:
                        unbind_principal(bound)
                except grpc.aio.AbortError:
                    raise
                except DomainError as error:
                    span.set_attribute("rpc.grpc.error", type(error).__name__)
                    await context.abort_with_status(status_for(error))
                except SubscriberTooSlow as error:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"stream ended: the client read too slowly ({error}); reconnect",
                    )
                except EventsInterrupted as error:
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, f"stream ended: {error}; reconnect"
                    )
                except CONCURRENT_CONFLICT:
                    # PostgreSQL aborted this transaction for another's sake; nothing of it
                    # was written, and the same call again will normally succeed.
                    log.info("concurrency conflict during %s", method, exc_info=True)
                    await context.abort(
                        grpc.StatusCode.ABORTED, "conflicting concurrent change; retry the call"
                    )
                except DATABASE_UNAVAILABLE:
                    # Also a token lookup that cannot reach the database: retryable.
                    log.warning("database unavailable during %s", method, exc_info=True)
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, "database unavailable; retry later"
                    )
                except Exception:
                    log.exception("unexpected error in %s", method)
                    span.set_status(trace.StatusCode.ERROR)
                    await context.abort(grpc.StatusCode.INTERNAL, "internal error")

        wrapped = _wrap(handler, guard)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _authorization_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return bearer_token(_as_text(value))
    return None


def _as_text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value
