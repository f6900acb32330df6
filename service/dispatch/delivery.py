"""Webhook delivery of setpoints: one signed HTTP POST per attempt, and what it came to.

This is the transport only. Which setpoint to send, when to retry and when to give up
belong to the outbox worker; it builds a ``Delivery``, calls ``WebhookSender.send`` and
stores the ``AttemptOutcome`` (and, for a retry, ``retry_delay_seconds``).

**Request.** ``POST`` of ``Delivery.body`` (JSON) to ``Delivery.url`` with the Standard
Webhooks headers: ``webhook-id`` (the delivery id, the same on every retry, so receivers
deduplicate), ``webhook-timestamp`` (unix seconds, fresh per attempt) and
``webhook-signature`` (``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` for each signing
secret, space-separated: during a rotation's grace period both the new and the old secret
sign), ``content-type: application/json``, ``user-agent: openvpp-dispatch`` and
``traceparent`` when the delivery carries one. Redirects are not followed (a 3xx is a
failed attempt: following it would reach a host nobody registered), no cookies are kept,
no proxy from the environment is used.

**Response classes** (``classify_status``): 2xx ACCEPTED. 406 and 422 REJECTED, final: the
receiver understood and refuses this setpoint. Everything else is RETRYABLE: timeouts,
connection errors, 408, 429, 5xx, and also the other 3xx/4xx (401 during a secret roll-over,
404 during a partner's deployment, ...), as the Standard Webhooks convention treats every
non-2xx as a failed attempt; the attempt limit and the setpoint's window bound those
retries. ``Retry-After`` of a 429 or 503 (seconds or an HTTP-date) is returned as
``retry_after_seconds`` (at most one day).

**Address policy** (``service/common/network_policy.py``): a literal address in the URL is
checked before anything is sent (the host as aiohttp reads it, from the very URL object the
request then goes to: ``webhook_target``), and every host name is resolved by our own
resolver, which checks every address it returns; aiohttp connects only to addresses the resolver
returned, so a DNS answer that changes between a check and the connect (rebinding) cannot
slip through. A name any of whose addresses is refused is refused whole: REFUSED, final,
no connection made.

**Circuit breaker** per endpoint (scheme, host, port), see ``breaker.py``: after
``breaker_failure_threshold`` consecutive RETRYABLE outcomes no request is made for
``breaker_reset_seconds`` (CIRCUIT_OPEN, try later), then one probe decides. ACCEPTED and
REJECTED count as successes (the endpoint answers); REFUSED counts as nothing.

**Concurrency**: at most ``max_concurrency`` requests in flight and ``max_concurrency_per_host``
per endpoint; a send waits for a slot before its timeout starts.

**Fields added to the brief's interface**: ``AttemptOutcome.attempted_at`` (the clock time of
the attempt, also the signed ``webhook-timestamp``); a CIRCUIT_OPEN outcome's
``retry_after_seconds`` is the time until the breaker lets a probe through (or, while another
send is the probe, ``timeout_seconds``); ``DeliverySettings.from_settings`` and
``WebhookSender.breakers`` (for inspection in tests and metrics).
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hashlib
import hmac
import ipaddress
import random
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any, NamedTuple

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from service.auth.signing import signing_key
from service.common.backoff import doubling_delay
from service.common.clock import Clock
from service.common.network_policy import (
    WebhookTarget,
    legacy_ipv4,
    literal_address,
    refusal_reason,
    webhook_target,
)
from service.config import Settings, refuse_broken_values
from service.dispatch.breaker import CircuitBreakers, Permit

USER_AGENT = "openvpp-dispatch"
# Bodies of responses are read (so the connection can be reused) up to this much, then
# the connection is dropped instead; nothing of it is stored.
MAX_RESPONSE_BODY_BYTES = 64 * 1024
# A Retry-After longer than this is taken as this: no dispatch window is longer.
MAX_RETRY_AFTER_SECONDS = 86400.0
MAX_ERROR_LENGTH = 200
# Printable ASCII without spaces: it is a header value and part of the signed content.
_DELIVERY_ID = re.compile(r"[\x21-\x7e]{1,128}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


@dataclass(frozen=True)
class Delivery:
    delivery_id: str
    url: str
    # UTF-8 JSON; signed as it is, byte for byte.
    body: bytes
    # "whsec_<base64>", current first; every one signs. Never shown in a repr or a log.
    signing_secrets: Sequence[str] = field(repr=False)
    # W3C trace context; one that is not well-formed is left out rather than sent.
    traceparent: str | None = None

    def __post_init__(self) -> None:
        # Our own mistakes, not a receiver's: an unsigned webhook is never sent.
        if not self.signing_secrets:
            raise ValueError("a delivery needs at least one signing secret")
        if not _DELIVERY_ID.fullmatch(self.delivery_id):
            raise ValueError("delivery_id must be 1-128 printable ASCII characters, no spaces")


class OutcomeKind(enum.Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RETRYABLE = "retryable"
    REFUSED = "refused"
    CIRCUIT_OPEN = "circuit_open"

    @property
    def final(self) -> bool:
        """Whether the setpoint's delivery is over (no retry follows)."""
        return self in (OutcomeKind.ACCEPTED, OutcomeKind.REJECTED, OutcomeKind.REFUSED)


class AttemptOutcome(NamedTuple):
    # A tuple rather than a frozen dataclass: one per attempt, and made several times faster.
    kind: OutcomeKind
    http_status: int | None
    error: str | None
    latency_ms: float
    retry_after_seconds: float | None
    attempted_at: datetime | None = None


@dataclass(frozen=True)
class DeliverySettings:
    """Every field is an ``OPENVPP_DISPATCH_*`` variable (``allow_private_networks`` is
    ``OPENVPP_WEBHOOK_ALLOW_PRIVATE_NETWORKS``); see ``Settings`` and the README."""

    timeout_seconds: float = 5.0
    max_concurrency: int = 256
    max_concurrency_per_host: int = 32
    breaker_failure_threshold: int = 5
    breaker_reset_seconds: float = 30.0
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 300.0
    allow_private_networks: bool = False

    def __post_init__(self) -> None:
        # Checked at start-up, not at the first delivery: a zero limit would block every send.
        refuse_broken_values(
            "DISPATCH",
            (
                ("timeout_seconds", not self.timeout_seconds > 0, "> 0"),
                ("max_concurrency", self.max_concurrency < 1, ">= 1"),
                ("max_concurrency_per_host", self.max_concurrency_per_host < 1, ">= 1"),
                ("breaker_failure_threshold", self.breaker_failure_threshold < 1, ">= 1"),
                ("breaker_reset_seconds", not self.breaker_reset_seconds >= 0, ">= 0"),
                ("backoff_initial_seconds", not self.backoff_initial_seconds >= 0, ">= 0"),
                (
                    "backoff_max_seconds",
                    not self.backoff_max_seconds >= self.backoff_initial_seconds,
                    ">= OPENVPP_DISPATCH_BACKOFF_INITIAL_SECONDS",
                ),
            ),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliverySettings:
        return cls(
            timeout_seconds=settings.dispatch_timeout_seconds,
            max_concurrency=settings.dispatch_max_concurrency,
            max_concurrency_per_host=settings.dispatch_max_concurrency_per_host,
            breaker_failure_threshold=settings.dispatch_breaker_failure_threshold,
            breaker_reset_seconds=settings.dispatch_breaker_reset_seconds,
            backoff_initial_seconds=settings.dispatch_backoff_initial_seconds,
            backoff_max_seconds=settings.dispatch_backoff_max_seconds,
            allow_private_networks=settings.webhook_allow_private_networks,
        )


def classify_status(status: int) -> OutcomeKind:
    if 200 <= status < 300:
        return OutcomeKind.ACCEPTED
    if status in (406, 422):
        return OutcomeKind.REJECTED
    return OutcomeKind.RETRYABLE


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or HTTP-date), or None."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    # isdigit() alone admits other scripts' digits ("²", "٣"), which float() refuses.
    if text.isascii() and text.isdigit():
        seconds = float(text)
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def retry_delay_seconds(
    attempt_number: int,
    settings: DeliverySettings,
    retry_after: float | None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait after failed attempt ``attempt_number`` (1 = the first) before the next.

    Capped exponential back-off with full jitter: uniform in [0, min(max, initial * 2^(n-1))],
    so retries of many setpoints to one recovering endpoint spread out instead of arriving
    together. A ``Retry-After`` is a floor: never earlier than the receiver asked.

    Written here rather than taken from ``tenacity``/``backoff``: those drive a retry loop
    in-process, while the outbox stores the next attempt's time in the database and any
    replica may make it; the arithmetic is the part we need, and it is these lines.
    """
    ceiling = doubling_delay(
        attempt_number, settings.backoff_initial_seconds, settings.backoff_max_seconds
    )
    delay = (rng or random).uniform(0.0, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def endpoint_key(target: WebhookTarget) -> str:
    """scheme://host:port of a URL: the unit of the breaker and the per-host limit."""
    return f"{target.scheme}://{target.host}:{target.port}"


class _Judged(NamedTuple):
    # "" when refused.
    endpoint: str
    # Why the URL is refused before any lookup, or None.
    refused: str | None
    # What the request is sent to: the URL as judged (None when refused).
    target: URL | None


@lru_cache(maxsize=4096)
def _judge_url(url: str, allow_private_networks: bool) -> _Judged:
    """The URL judged by the address rule, parsed once (cached per URL)."""
    target = webhook_target(url)
    if target is None:
        return _Judged("", "not an http(s) URL with a host", None)
    host = target.host
    legacy = legacy_ipv4(host)
    if legacy is not None:
        return _Judged("", f"legacy numeric IPv4 form {host} (of {legacy})", None)
    literal = literal_address(host)
    if literal is not None:
        reason = refusal_reason(literal, allow_private_networks=allow_private_networks)
        if reason is not None:
            return _Judged("", f"{reason} address {literal}", None)
    return _Judged(endpoint_key(target), None, target.url)


@lru_cache(maxsize=4096)
def _keyed_hmac(secret: str) -> hmac.HMAC:
    # One decode and one keyed HMAC per secret: each attempt copies it (the key's padding
    # and first block already hashed) instead of keying a new one.
    return hmac.new(signing_key(secret), digestmod=hashlib.sha256)


def signature_header(delivery_id: str, seconds: int, body: bytes, secrets: Sequence[str]) -> str:
    """The ``webhook-signature`` value for unix time ``seconds``: one ``v1,<signature>`` per
    secret, space-separated.

    The Standard Webhooks signature, base64 of HMAC-SHA256 over ``id.timestamp.body``, made
    with a copy of the secret's keyed ``hmac`` object rather than ``Webhook.sign`` (which
    keys a new HMAC per call and wants the body as text): the same bytes in a fraction of
    the time, once per delivery attempt.
    ``test_signature_header_is_what_standardwebhooks_signs`` checks them against the package.
    """
    signed = f"{delivery_id}.{seconds}.".encode() + body
    signatures = []
    for secret in secrets:
        mac = _keyed_hmac(secret).copy()
        mac.update(signed)
        signatures.append("v1," + base64.b64encode(mac.digest()).decode())
    return " ".join(signatures)


def signed_headers(delivery: Delivery, at: datetime) -> dict[str, str]:
    # The unix seconds of the instant, whatever its zone: what standardwebhooks signs.
    seconds = int(at.timestamp())
    headers = {
        "webhook-id": delivery.delivery_id,
        "webhook-timestamp": str(seconds),
        "webhook-signature": signature_header(
            delivery.delivery_id, seconds, delivery.body, delivery.signing_secrets
        ),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
    # It comes from a caller's request metadata: only a well-formed one goes into a header.
    if delivery.traceparent and _TRACEPARENT.fullmatch(delivery.traceparent):
        headers["traceparent"] = delivery.traceparent
    return headers


class AddressRefusedError(OSError):
    """A webhook host resolved to an address the network policy refuses."""

    def __init__(self, host: str, address: str, reason: str) -> None:
        super().__init__(f"{host} resolves to {address} ({reason})")
        self.host = host
        self.address = address
        self.reason = reason


class PolicyResolver(AbstractResolver):
    """Resolves with aiohttp's default resolver, then refuses a name if any address is refused."""

    def __init__(
        self, *, allow_private_networks: bool, inner: AbstractResolver | None = None
    ) -> None:
        self._inner = inner or DefaultResolver()
        self._allow = allow_private_networks

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            address = ipaddress.ip_address(result["host"].split("%", 1)[0])
            reason = refusal_reason(address, allow_private_networks=self._allow)
            if reason is not None:
                raise AddressRefusedError(host, result["host"], reason)
        return results

    async def close(self) -> None:
        await self._inner.close()


class _KeyedLimiter:
    """A semaphore per key, kept only while someone holds or waits for it."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._slots: dict[str, _Slot] = {}

    def hold(self, key: str) -> _Slot:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(self, key, asyncio.Semaphore(self._limit))
        slot.users += 1
        return slot

    def _left(self, slot: _Slot) -> None:
        slot.users -= 1
        if slot.users == 0:
            del self._slots[slot.key]


class _Slot:
    """``async with`` one key's semaphore. A class, not a generator-based context manager:
    it is entered once per delivery attempt."""

    __slots__ = ("_limiter", "key", "semaphore", "users")

    def __init__(self, limiter: _KeyedLimiter, key: str, semaphore: asyncio.Semaphore) -> None:
        self._limiter = limiter
        self.key = key
        self.semaphore = semaphore
        self.users = 0

    async def __aenter__(self) -> None:
        try:
            await self.semaphore.acquire()
        except BaseException:
            self._limiter._left(self)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.semaphore.release()
        self._limiter._left(self)


class WebhookSender:
    """Sends ``Delivery``s over one aiohttp session; ``start`` before, ``close`` after."""

    def __init__(
        self,
        settings: DeliverySettings,
        clock: Clock,
        *,
        resolver: AbstractResolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        # ``resolver``: where names are looked up (default: the system's); every answer is
        # checked by the address policy whatever it is. ``ssl_context``: which certificate
        # authorities HTTPS receivers are verified against (default: the system's trust
        # store as aiohttp loads it at import, which honours SSL_CERT_FILE). Certificates
        # are always verified.
        self._settings = settings
        self._resolver = resolver
        self._ssl_context = ssl_context
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._all = asyncio.Semaphore(settings.max_concurrency)
        self._per_host = _KeyedLimiter(settings.max_concurrency_per_host)
        self.breakers = CircuitBreakers(
            settings.breaker_failure_threshold, settings.breaker_reset_seconds, clock
        )

    async def start(self) -> None:
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(
            resolver=PolicyResolver(
                allow_private_networks=self._settings.allow_private_networks,
                inner=self._resolver,
            ),
            # Our semaphores admit requests; these are the same bounds as a backstop.
            limit=self._settings.max_concurrency,
            limit_per_host=self._settings.max_concurrency_per_host,
            ssl=self._ssl_context if self._ssl_context is not None else True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout_seconds),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> WebhookSender:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def endpoint(self, url: str) -> str:
        """The endpoint key (scheme://host:port) a URL's sends share limits and breaker
        under; "" for a URL refused before any lookup."""
        return _judge_url(url, self._settings.allow_private_networks).endpoint

    async def send(self, delivery: Delivery) -> AttemptOutcome:
        """One attempt. Never raises for anything a receiver (or its DNS) does."""
        outcome = await self.send_unless_withdrawn(delivery, None)
        assert outcome is not None  # nothing can withdraw it
        return outcome

    async def send_unless_withdrawn(
        self, delivery: Delivery, withdrawn: Callable[[], Awaitable[bool]] | None
    ) -> AttemptOutcome | None:
        """One attempt, as ``send``; ``withdrawn`` is awaited once the attempt holds its
        slots, right before the request, and when it answers True nothing is sent and None
        is returned. A send may wait for its slots for long (others' timeouts): what was
        true when it began waiting is looked at again only then."""
        session = self._session
        if session is None:
            raise RuntimeError("WebhookSender.start() was not called")
        key, refused, target = _judge_url(delivery.url, self._settings.allow_private_networks)
        if target is None:
            assert refused is not None
            return _outcome(OutcomeKind.REFUSED, error=refused)
        if self.breakers.reject_now(key):
            return self._circuit_open(key)
        # The endpoint's slot first: sends queued for one busy endpoint must not hold
        # global slots that other endpoints' sends could use.
        async with self._per_host.hold(key), self._all:
            if withdrawn is not None and await withdrawn():
                return None
            # The breaker may have opened while this send waited for a slot.
            permit = self.breakers.try_acquire(key)
            if permit is None:
                return self._circuit_open(key)
            try:
                outcome = await self._post(session, delivery, target)
            except BaseException:
                permit.release()
                raise
            _report(permit, outcome)
            return outcome

    def _circuit_open(self, key: str) -> AttemptOutcome:
        # When to try again: once the breaker lets a probe through, or, while another
        # send is the probe, once that probe has had its time.
        wait = self.breakers.seconds_until_probe(key)
        return AttemptOutcome(
            kind=OutcomeKind.CIRCUIT_OPEN,
            http_status=None,
            error="circuit open for " + key,
            latency_ms=0.0,
            retry_after_seconds=wait if wait is not None else self._settings.timeout_seconds,
            attempted_at=self._clock.now(),
        )

    async def _post(
        self, session: aiohttp.ClientSession, delivery: Delivery, target: URL
    ) -> AttemptOutcome:
        at = self._clock.now()
        headers = signed_headers(delivery, at)
        started = time.perf_counter()

        def elapsed_ms() -> float:
            return (time.perf_counter() - started) * 1000.0

        try:
            # The URL object the address rule judged: aiohttp connects to its host as it is.
            async with session.post(
                target, data=delivery.body, headers=headers, allow_redirects=False
            ) as response:
                await _drain(response)
                status = response.status
                kind = classify_status(status)
                retry_after = None
                if status in (429, 503):
                    retry_after = parse_retry_after(
                        response.headers.get("Retry-After"), self._clock.now()
                    )
                return AttemptOutcome(
                    kind=kind,
                    http_status=status,
                    error=None if kind is OutcomeKind.ACCEPTED else f"HTTP {status}",
                    latency_ms=elapsed_ms(),
                    retry_after_seconds=retry_after,
                    attempted_at=at,
                )
        except aiohttp.ClientConnectorError as error:
            if isinstance(error.os_error, AddressRefusedError):
                return _outcome(
                    OutcomeKind.REFUSED, error=str(error.os_error), latency=elapsed_ms(), at=at
                )
            return _outcome(
                OutcomeKind.RETRYABLE, error=_describe(error), latency=elapsed_ms(), at=at
            )
        except TimeoutError:
            return _outcome(
                OutcomeKind.RETRYABLE,
                error=f"timed out after {self._settings.timeout_seconds:g} s",
                latency=elapsed_ms(),
                at=at,
            )
        except (aiohttp.ClientError, OSError, ValueError) as error:
            return _outcome(
                OutcomeKind.RETRYABLE, error=_describe(error), latency=elapsed_ms(), at=at
            )


async def _drain(response: aiohttp.ClientResponse) -> None:
    length = response.content_length
    if length is not None and length <= MAX_RESPONSE_BODY_BYTES:
        # The usual answer: a short body of a declared length, read in one go.
        await response.read()
        return
    remaining = MAX_RESPONSE_BODY_BYTES
    while remaining > 0:
        chunk = await response.content.read(remaining)
        if not chunk:
            return
        remaining -= len(chunk)
    # Still more: the connection is closed rather than reading an unbounded body.
    response.close()


def _report(permit: Permit, outcome: AttemptOutcome) -> None:
    if outcome.kind in (OutcomeKind.ACCEPTED, OutcomeKind.REJECTED):
        permit.succeeded()
    elif outcome.kind is OutcomeKind.RETRYABLE:
        permit.failed()
    else:
        permit.release()


def _outcome(
    kind: OutcomeKind, *, error: str, latency: float = 0.0, at: datetime | None = None
) -> AttemptOutcome:
    return AttemptOutcome(
        kind=kind,
        http_status=None,
        error=error[:MAX_ERROR_LENGTH],
        latency_ms=latency,
        retry_after_seconds=None,
        attempted_at=at,
    )


def _describe(error: BaseException) -> str:
    if isinstance(error, aiohttp.ClientConnectorError):
        cause: Any = error.os_error
        reason = getattr(cause, "strerror", None) or type(cause).__name__
        return f"cannot connect to {error.host}:{error.port}: {reason}"
    if isinstance(error, aiohttp.InvalidURL):
        # Its text is the URL, which may carry credentials.
        return "invalid URL"
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:MAX_ERROR_LENGTH]
