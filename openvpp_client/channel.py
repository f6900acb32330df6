"""Channels to an OpenVPP server: the token on every call, and gRPC's own retries.

The token: over TLS (``credentials=grpc.ssl_channel_credentials()``) it travels as call
credentials, which gRPC sends only on a secure channel. On a plaintext channel to a local
server (``127.0.0.1:50051``, how ``openvpp serve`` listens by default) gRPC refuses call
credentials, so a client interceptor adds the same ``authorization: Bearer <token>``
metadata to every call instead.

Retries: a ``retryPolicy`` in the channel's service config (``grpc.service_config``), so
gRPC core retries UNAVAILABLE and ABORTED with exponential backoff and jitter, per attempt
and transparently to the caller. Both codes mean the server wrote nothing (an unreachable
server or database, a transaction PostgreSQL aborted), so repeating a call is safe; a
status like INVALID_ARGUMENT is never retried. gRPC retries a call only until the first
response message arrived (a streaming call that already got answers fails as before).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retry policy (gRFC A6) for every method of the channel."""

    max_attempts: int = 5  # gRPC caps this at 5
    initial_backoff_seconds: float = 0.1
    max_backoff_seconds: float = 2.0
    backoff_multiplier: float = 2.0
    retryable_status_codes: tuple[grpc.StatusCode, ...] = (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.ABORTED,
    )

    def service_config(self) -> dict[str, Any]:
        return {
            "methodConfig": [
                {
                    # An empty name matches every service and method of the channel.
                    "name": [{}],
                    "retryPolicy": {
                        "maxAttempts": self.max_attempts,
                        "initialBackoff": f"{self.initial_backoff_seconds}s",
                        "maxBackoff": f"{self.max_backoff_seconds}s",
                        "backoffMultiplier": self.backoff_multiplier,
                        "retryableStatusCodes": [code.name for code in self.retryable_status_codes],
                    },
                }
            ]
        }


DEFAULT_RETRY = RetryPolicy()


def channel_options(
    retry: RetryPolicy | None = DEFAULT_RETRY, options: Sequence[tuple[str, Any]] = ()
) -> list[tuple[str, Any]]:
    """Channel options carrying ``retry`` as the service config (none: no retry policy)."""
    combined: list[tuple[str, Any]] = []
    if retry is not None:
        combined += [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(retry.service_config())),
        ]
    return combined + list(options)


def bearer(token: str) -> tuple[tuple[str, str]]:
    """The metadata of one call authenticated with ``token``."""
    return (("authorization", f"Bearer {token}"),)


def channel(
    target: str = DEFAULT_TARGET,
    token: str | None = None,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    retry: RetryPolicy | None = DEFAULT_RETRY,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A blocking channel; every call carries ``token`` and is retried per ``retry``."""
    all_options = channel_options(retry, options)
    if credentials is not None:
        if token is not None:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(token)
            )
        return grpc.secure_channel(target, credentials, options=all_options)
    plain = grpc.insecure_channel(target, options=all_options)
    if token is None:
        return plain
    return grpc.intercept_channel(plain, _BearerInterceptor(token))


def aio_channel(
    target: str = DEFAULT_TARGET,
    token: str | None = None,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    retry: RetryPolicy | None = DEFAULT_RETRY,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """The asyncio counterpart of :func:`channel` (use as ``async with``)."""
    all_options = channel_options(retry, options)
    if credentials is not None:
        if token is not None:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(token)
            )
        return grpc.aio.secure_channel(target, credentials, options=all_options)
    interceptors: list[grpc.aio.ClientInterceptor] = []
    if token is not None:
        interceptors = [
            _AioBearerUnaryUnary(token),
            _AioBearerUnaryStream(token),
            _AioBearerStreamUnary(token),
            _AioBearerStreamStream(token),
        ]
    return grpc.aio.insecure_channel(target, options=all_options, interceptors=interceptors)


def _with_token(metadata: Any, token: str) -> tuple[tuple[str, str | bytes], ...]:
    kept = [(key, value) for key, value in (metadata or ()) if key != "authorization"]
    return (*kept, *bearer(token))


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, token: str) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = _with_token(details.metadata, token)
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class _BearerInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_CallDetails(details, self._token), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_CallDetails(details, self._token), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(_CallDetails(details, self._token), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(_CallDetails(details, self._token), requests)


def _aio_details(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout,
        metadata=grpc.aio.Metadata(*_with_token(details.metadata, token)),
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


class _AioBearer:
    def __init__(self, token: str) -> None:
        self._token = token


class _AioBearerUnaryUnary(_AioBearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._token), request)


class _AioBearerUnaryStream(_AioBearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._token), request)


class _AioBearerStreamUnary(_AioBearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_aio_details(details, self._token), requests)


class _AioBearerStreamStream(_AioBearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_aio_details(details, self._token), requests)
