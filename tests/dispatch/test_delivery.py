"""WebhookSender against real aiohttp receivers on 127.0.0.1: every response class, Standard
Webhooks signatures verified by the receiver's side of the package, the address policy after
DNS resolution, the circuit breaker on a moved clock, and the concurrency limits."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import trustme
from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from service.auth.signing import new_signing_secret, signing_key
from service.common.clock import ManualClock
from service.dispatch.delivery import (
    AddressRefusedError,
    AttemptOutcome,
    Delivery,
    DeliverySettings,
    OutcomeKind,
    PolicyResolver,
    WebhookSender,
    signature_header,
)
from tests.dispatch.receiver import Receiver, running_receiver

LOCAL = DeliverySettings(allow_private_networks=True, timeout_seconds=2.0)
BODY = json.dumps({"setpoint_id": "s-1", "power_kw": "-3.5"}).encode()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as running:
        yield running


@pytest.fixture
def clock() -> ManualClock:
    # Near the real time: receivers check that the signed timestamp is fresh.
    return ManualClock(datetime.now(UTC))


@pytest.fixture
async def sender(clock: ManualClock) -> AsyncIterator[WebhookSender]:
    async with WebhookSender(LOCAL, clock) as started:
        yield started


def delivery(url: str, secrets: tuple[str, ...] | None = None, **changes: object) -> Delivery:
    made = Delivery(
        delivery_id="msg_" + new_signing_secret()[6:18],
        url=url,
        body=BODY,
        signing_secrets=secrets or (new_signing_secret(),),
    )
    return replace(made, **changes)  # type: ignore[arg-type]


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def eventually(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5.0
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/status/200", OutcomeKind.ACCEPTED),
        ("/status/202", OutcomeKind.ACCEPTED),
        ("/status/204", OutcomeKind.ACCEPTED),
        ("/status/406", OutcomeKind.REJECTED),
        ("/status/422", OutcomeKind.REJECTED),
        ("/status/408", OutcomeKind.RETRYABLE),
        ("/status/429", OutcomeKind.RETRYABLE),
        ("/status/500", OutcomeKind.RETRYABLE),
        ("/status/502", OutcomeKind.RETRYABLE),
        ("/status/503", OutcomeKind.RETRYABLE),
        # Decided: other 4xx are failed attempts, retried within the attempt limit.
        ("/status/400", OutcomeKind.RETRYABLE),
        ("/status/404", OutcomeKind.RETRYABLE),
        ("/big", OutcomeKind.ACCEPTED),
    ],
)
async def test_response_classes(
    sender: WebhookSender, receiver: Receiver, path: str, kind: OutcomeKind
) -> None:
    outcome = await sender.send(delivery(receiver.url(path)))
    assert outcome.kind is kind
    assert outcome.http_status == int(path.split("/")[-1]) if "status" in path else 200
    assert (outcome.error is None) == (kind is OutcomeKind.ACCEPTED)
    assert outcome.latency_ms > 0
    assert outcome.retry_after_seconds is None
    assert len(receiver.requests) == 1


async def test_redirect_is_not_followed(sender: WebhookSender, receiver: Receiver) -> None:
    outcome = await sender.send(
        delivery(receiver.url("/status/307?location=" + receiver.url("/status/200")))
    )
    assert (outcome.kind, outcome.http_status) == (OutcomeKind.RETRYABLE, 307)
    assert [r.path for r in receiver.requests] == ["/status/307"]


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_in_seconds_and_as_http_date(
    sender: WebhookSender, receiver: Receiver, clock: ManualClock, status: int
) -> None:
    in_seconds = await sender.send(delivery(receiver.url(f"/status/{status}?retry_after=7")))
    assert in_seconds.kind is OutcomeKind.RETRYABLE
    assert in_seconds.retry_after_seconds == 7.0

    when = format_datetime(clock.now() + timedelta(seconds=120), usegmt=True)
    as_date = await sender.send(delivery(receiver.url(f"/status/{status}?retry_after={when}")))
    assert as_date.retry_after_seconds is not None
    assert 119.0 <= as_date.retry_after_seconds <= 120.0  # HTTP-dates have whole seconds

    past = format_datetime(clock.now() - timedelta(hours=1), usegmt=True)
    in_past = await sender.send(delivery(receiver.url(f"/status/{status}?retry_after={past}")))
    assert in_past.retry_after_seconds == 0.0
    garbage = await sender.send(delivery(receiver.url(f"/status/{status}?retry_after=soon")))
    assert garbage.retry_after_seconds is None
    huge = await sender.send(delivery(receiver.url(f"/status/{status}?retry_after=99999999")))
    assert huge.retry_after_seconds == 86400.0


@pytest.mark.parametrize("status", [429, 503])
async def test_a_retry_after_in_another_script_s_digits_is_ignored(
    sender: WebhookSender, receiver: Receiver, status: int
) -> None:
    # str.isdigit() says yes to "²", float() does not: the answer is still the receiver's.
    outcome = await sender.send(delivery(receiver.url(f"/status/{status}?retry_after=²")))
    assert outcome.kind is OutcomeKind.RETRYABLE
    assert outcome.http_status == status
    assert outcome.error == f"HTTP {status}"
    assert outcome.retry_after_seconds is None


async def test_retry_after_of_other_statuses_is_ignored(
    sender: WebhookSender, receiver: Receiver
) -> None:
    outcome = await sender.send(delivery(receiver.url("/status/500?retry_after=7")))
    assert outcome.retry_after_seconds is None


async def test_timeout(clock: ManualClock, receiver: Receiver) -> None:
    async with WebhookSender(replace(LOCAL, timeout_seconds=0.2), clock) as sender:
        started = time.monotonic()
        outcome = await sender.send(delivery(receiver.url("/slow")))
    assert outcome.kind is OutcomeKind.RETRYABLE
    assert outcome.http_status is None
    assert outcome.error == "timed out after 0.2 s"
    assert 150 <= outcome.latency_ms < 2000
    assert time.monotonic() - started < 2


async def test_connection_refused(sender: WebhookSender) -> None:
    outcome = await sender.send(delivery(f"http://127.0.0.1:{unused_port()}/hook"))
    assert outcome.kind is OutcomeKind.RETRYABLE
    assert outcome.http_status is None
    assert outcome.error is not None
    assert "cannot connect to 127.0.0.1" in outcome.error


async def test_connection_closed_without_an_answer(
    sender: WebhookSender, receiver: Receiver
) -> None:
    outcome = await sender.send(delivery(receiver.url("/drop")))
    assert outcome.kind is OutcomeKind.RETRYABLE
    assert outcome.http_status is None
    assert outcome.error is not None
    assert "Disconnected" in outcome.error


async def test_time_waiting_for_a_slot_is_not_part_of_the_timeout(
    receiver: Receiver, clock: ManualClock
) -> None:
    settings = replace(LOCAL, timeout_seconds=0.5, max_concurrency_per_host=1)
    async with WebhookSender(settings, clock) as sender:
        stuck = asyncio.create_task(sender.send(delivery(receiver.url("/slow"))))
        queued = asyncio.create_task(sender.send(delivery(receiver.url("/hold"))))
        # The queued send reaches the receiver only once the stuck one timed out (0.5 s);
        # had its own timeout started when it was called, it would have expired with it.
        await eventually(lambda: [r.path for r in receiver.requests] == ["/slow", "/hold"])
        receiver.gate.set()
        assert (await queued).kind is OutcomeKind.ACCEPTED
        assert (await stuck).error == "timed out after 0.5 s"


async def test_https_certificates_are_verified(clock: ManualClock) -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    async with running_receiver(server_context) as secure:
        async with WebhookSender(LOCAL, clock) as sender:
            untrusted = await sender.send(delivery(secure.url()))
        assert untrusted.kind is OutcomeKind.RETRYABLE
        assert untrusted.error is not None
        assert "certificate" in untrusted.error.lower()
        assert secure.requests == []
        # With the authority trusted, the same receiver gets it.
        client_context = ssl.create_default_context()
        authority.configure_trust(client_context)
        async with WebhookSender(LOCAL, clock, ssl_context=client_context) as sender:
            trusted = await sender.send(delivery(secure.url()))
        assert trusted.kind is OutcomeKind.ACCEPTED
        assert len(secure.requests) == 1


@given(
    delivery_id=st.from_regex(r"[\x21-\x7e]{1,128}", fullmatch=True),
    at=st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
    body=st.text().map(str.encode),
    secret_count=st.integers(1, 3),
)
def test_signature_header_is_what_standardwebhooks_signs(
    delivery_id: str, at: datetime, body: bytes, secret_count: int
) -> None:
    secrets = [new_signing_secret() for _ in range(secret_count)]
    expected = " ".join(Webhook(secret).sign(delivery_id, at, body.decode()) for secret in secrets)
    assert signature_header(delivery_id, int(at.timestamp()), body, secrets) == expected


@given(key=st.binary(min_size=1, max_size=64))
def test_signing_key_is_the_key_standardwebhooks_reads(key: bytes) -> None:
    secret = "whsec_" + base64.b64encode(key).decode()
    assert signing_key(secret) == key
    # What the package signs with, to the byte.
    assert Webhook(secret).sign("id", datetime(2026, 1, 1, tzinfo=UTC), "{}") == (
        signature_header("id", int(datetime(2026, 1, 1, tzinfo=UTC).timestamp()), b"{}", [secret])
    )


@pytest.mark.parametrize("secret", ["whsec_", "whsec_not base64!", "whsec_QQ"])
def test_a_malformed_signing_secret_is_refused_not_used(secret: str) -> None:
    # Never a signature made with a key nobody registered.
    with pytest.raises(ValueError, match="a signing secret must"):
        signing_key(secret)


async def test_receiver_verifies_every_secret_of_a_rotation(
    sender: WebhookSender, receiver: Receiver
) -> None:
    new, old, stranger = new_signing_secret(), new_signing_secret(), new_signing_secret()
    outcome = await sender.send(delivery(receiver.url(), (new, old), traceparent=None))
    assert outcome.kind is OutcomeKind.ACCEPTED
    [got] = receiver.requests
    assert got.headers["Content-Type"] == "application/json"
    signatures = got.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    assert all(s.startswith("v1,") for s in signatures)
    assert "traceparent" not in got.headers
    for secret in (new, old):
        assert Webhook(secret).verify(got.body, got.headers) == json.loads(BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(stranger).verify(got.body, got.headers)
    tampered = got.body.replace(b"-3.5", b"-35")
    assert tampered != got.body
    for secret in (new, old):
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(tampered, got.headers)


async def test_id_stays_while_timestamp_and_signature_change_per_attempt(
    sender: WebhookSender, receiver: Receiver, clock: ManualClock
) -> None:
    secret = new_signing_secret()
    first = await sender.send(delivery(receiver.url("/status/503"), (secret,), delivery_id="d1"))
    clock.advance(timedelta(seconds=3))
    second = await sender.send(delivery(receiver.url("/status/200"), (secret,), delivery_id="d1"))
    assert (first.kind, second.kind) == (OutcomeKind.RETRYABLE, OutcomeKind.ACCEPTED)
    one, two = receiver.requests
    assert one.headers["webhook-id"] == two.headers["webhook-id"] == "d1"
    assert int(two.headers["webhook-timestamp"]) - int(one.headers["webhook-timestamp"]) == 3
    assert one.headers["webhook-signature"] != two.headers["webhook-signature"]
    assert first.attempted_at is not None
    assert second.attempted_at is not None
    assert int(one.headers["webhook-timestamp"]) == int(first.attempted_at.timestamp())
    for got in (one, two):
        Webhook(secret).verify(got.body, got.headers)


async def test_traceparent_is_passed(sender: WebhookSender, receiver: Receiver) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await sender.send(delivery(receiver.url(), traceparent=traceparent))
    assert receiver.requests[0].headers["traceparent"] == traceparent


async def test_a_malformed_traceparent_is_left_out(
    sender: WebhookSender, receiver: Receiver
) -> None:
    for bad in ("00-abc\r\nX-Injected: 1", "not-a-trace", "00-" + "0" * 31 + "-x-01"):
        outcome = await sender.send(delivery(receiver.url(), traceparent=bad))
        assert outcome.kind is OutcomeKind.ACCEPTED
    assert all("traceparent" not in r.headers for r in receiver.requests)
    assert all("X-Injected" not in r.headers for r in receiver.requests)


def test_a_delivery_is_always_signed_and_has_a_plain_id() -> None:
    with pytest.raises(ValueError, match="signing secret"):
        Delivery("msg_1", "https://h.example/", b"{}", ())
    for bad_id in ("", "a b", "x\r\ny", "é", "x" * 129):
        with pytest.raises(ValueError, match="delivery_id"):
            Delivery(bad_id, "https://h.example/", b"{}", (new_signing_secret(),))


async def test_secrets_are_not_logged(
    sender: WebhookSender, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    secret = new_signing_secret()
    with caplog.at_level(logging.DEBUG):
        for path in ("/hook", "/status/500", "/drop"):
            await sender.send(delivery(receiver.url(path), (secret,)))
    assert caplog.records, "debug logging was captured"
    assert secret not in caplog.text
    assert secret.removeprefix("whsec_") not in caplog.text


async def test_secrets_are_not_in_the_repr() -> None:
    secret = new_signing_secret()
    assert secret not in repr(delivery("http://h.example/", (secret,)))


# --- address policy -------------------------------------------------------------------


async def test_loopback_is_refused_unless_private_networks_are_allowed(
    receiver: Receiver, clock: ManualClock
) -> None:
    strict = replace(LOCAL, allow_private_networks=False)
    async with WebhookSender(strict, clock) as sender:
        literal = await sender.send(delivery(receiver.url(host="127.0.0.1")))
        # A name is judged by what it resolves to: localhost is 127.0.0.1 / ::1.
        by_name = await sender.send(delivery(receiver.url(host="localhost")))
        mapped = await sender.send(delivery(receiver.url(host="[::ffff:127.0.0.1]")))
    assert literal.kind is by_name.kind is mapped.kind is OutcomeKind.REFUSED
    assert literal.error == "loopback address 127.0.0.1"
    assert by_name.error is not None
    assert "localhost resolves to" in by_name.error
    assert by_name.error.endswith("(loopback)")
    assert receiver.requests == []

    async with WebhookSender(LOCAL, clock) as sender:
        assert (await sender.send(delivery(receiver.url(host="localhost")))).kind is (
            OutcomeKind.ACCEPTED
        )
    assert len(receiver.requests) == 1


async def test_metadata_address_is_refused_even_when_private_networks_are_allowed(
    sender: WebhookSender,
) -> None:
    outcome = await sender.send(delivery("http://169.254.169.254/latest/meta-data/"))
    assert outcome.kind is OutcomeKind.REFUSED
    assert outcome.error == "cloud metadata address 169.254.169.254"


class FixedAnswers(AbstractResolver):
    """A DNS that answers every name with the given addresses (and counts the questions)."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses
        self.questions = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.questions += 1
        return [
            ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET, proto=0, flags=0)
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


async def test_a_public_looking_name_resolving_to_a_private_address_is_refused(
    receiver: Receiver, clock: ManualClock
) -> None:
    dns = FixedAnswers("127.0.0.1")
    url = f"http://partner.example:{receiver.port}/hook"
    async with WebhookSender(
        replace(LOCAL, allow_private_networks=False), clock, resolver=dns
    ) as s:
        outcome = await s.send(delivery(url))
    assert outcome.kind is OutcomeKind.REFUSED
    assert outcome.error == "partner.example resolves to 127.0.0.1 (loopback)"
    assert dns.questions == 1
    assert receiver.requests == []
    # The connection goes to the address that was checked: allowed, it reaches the receiver.
    async with WebhookSender(LOCAL, clock, resolver=dns) as allowed:
        assert (await allowed.send(delivery(url))).kind is OutcomeKind.ACCEPTED
    assert receiver.requests[0].headers["Host"] == f"partner.example:{receiver.port}"


async def test_one_refused_address_among_the_answers_refuses_the_name() -> None:
    resolver = PolicyResolver(
        allow_private_networks=False, inner=FixedAnswers("93.184.216.34", "10.1.2.3")
    )
    with pytest.raises(AddressRefusedError, match=r"resolves to 10.1.2.3 \(private\)"):
        await resolver.resolve("partner.example", 443)
    fine = PolicyResolver(allow_private_networks=False, inner=FixedAnswers("93.184.216.34"))
    assert [r["host"] for r in await fine.resolve("partner.example", 443)] == ["93.184.216.34"]


async def test_legacy_numeric_forms_and_trailing_dots_are_refused(
    receiver: Receiver, clock: ManualClock
) -> None:
    async with WebhookSender(replace(LOCAL, allow_private_networks=False), clock) as strict:
        dotted = await strict.send(delivery(receiver.url(host="127.0.0.1.")))
        legacy = await strict.send(delivery(receiver.url(host="2130706433")))
    assert dotted.kind is legacy.kind is OutcomeKind.REFUSED
    assert legacy.error == "legacy numeric IPv4 form 2130706433 (of 127.0.0.1)"
    async with WebhookSender(LOCAL, clock) as lenient:
        assert (await lenient.send(delivery(receiver.url(host="127.1")))).kind is (
            OutcomeKind.REFUSED
        )
    assert receiver.requests == []


@pytest.mark.parametrize("host", ["１２７.０.０.１", "127。0。0。1", "①②⑦.0.0.1"])
async def test_an_address_in_other_digits_is_judged_as_the_address_connected_to(
    receiver: Receiver, clock: ManualClock, host: str
) -> None:
    # The HTTP client's URL parser (yarl) turns these into 127.0.0.1 and connects there
    # without a lookup: the rule must judge that address, not the text.
    url = f"http://{host}:{receiver.port}/hook"
    async with WebhookSender(replace(LOCAL, allow_private_networks=False), clock) as strict:
        refused = await strict.send(delivery(url))
    assert refused.kind is OutcomeKind.REFUSED
    assert refused.error == "loopback address 127.0.0.1"
    assert receiver.requests == []
    async with WebhookSender(LOCAL, clock) as lenient:
        assert (await lenient.send(delivery(url))).kind is OutcomeKind.ACCEPTED
    assert len(receiver.requests) == 1


async def test_metadata_in_other_digits_or_with_a_zone_id_is_refused_always(
    sender: WebhookSender,
) -> None:
    circled = await sender.send(delivery("http://①⑥⑨.②⑤④.①⑥⑨.②⑤④/latest/meta-data/"))
    zoned = await sender.send(delivery("http://[fd00:ec2::254%25eth0]/latest/meta-data/"))
    assert circled.kind is zoned.kind is OutcomeKind.REFUSED
    assert circled.error == "cloud metadata address 169.254.169.254"
    assert zoned.error is not None
    assert zoned.error.startswith("cloud metadata address fd00:ec2::254")


async def test_not_an_http_url_is_refused(sender: WebhookSender) -> None:
    for url in ("ftp://h.example/x", "http:///x", "not a url", "http://h.example:99999/"):
        assert (await sender.send(delivery(url))).kind is OutcomeKind.REFUSED


# --- circuit breaker ------------------------------------------------------------------


async def test_breaker_opens_after_consecutive_failures_and_closes_after_a_probe(
    receiver: Receiver, clock: ManualClock
) -> None:
    settings = replace(LOCAL, breaker_failure_threshold=3, breaker_reset_seconds=30)
    async with WebhookSender(settings, clock) as sender:

        async def send(path: str) -> AttemptOutcome:
            return await sender.send(delivery(receiver.url(path)))

        # A success in between resets the count: 2 failures, success, 2 failures stays closed.
        for path in ("/status/500", "/status/500", "/status/200", "/status/500"):
            await send(path)
        assert (await send("/status/500")).kind is OutcomeKind.RETRYABLE
        assert (await send("/status/500")).kind is OutcomeKind.RETRYABLE
        sent = len(receiver.requests)
        # Open: nothing reaches the endpoint, whatever the path.
        blocked = await send("/status/200")
        assert blocked.kind is OutcomeKind.CIRCUIT_OPEN
        assert blocked.http_status is None
        assert blocked.retry_after_seconds == 30.0  # when a probe may go
        assert len(receiver.requests) == sent
        # Another endpoint is not affected.
        async with running_receiver() as other:
            assert (await sender.send(delivery(other.url()))).kind is OutcomeKind.ACCEPTED

        clock.advance(timedelta(seconds=29))
        still = await send("/status/200")
        assert still.kind is OutcomeKind.CIRCUIT_OPEN
        assert still.retry_after_seconds == 1.0
        clock.advance(timedelta(seconds=2))
        # Half-open: one probe; it fails, so the circuit opens again for the full time.
        assert (await send("/status/502")).kind is OutcomeKind.RETRYABLE
        assert (await send("/status/200")).kind is OutcomeKind.CIRCUIT_OPEN
        clock.advance(timedelta(seconds=31))
        # The probe succeeds: closed, and requests flow again.
        assert (await send("/status/200")).kind is OutcomeKind.ACCEPTED
        assert (await send("/status/500")).kind is OutcomeKind.RETRYABLE
        assert (await send("/status/200")).kind is OutcomeKind.ACCEPTED
        assert len(receiver.requests) == sent + 4


async def test_half_open_lets_one_probe_through_at_a_time(
    receiver: Receiver, clock: ManualClock
) -> None:
    settings = replace(LOCAL, breaker_failure_threshold=1, breaker_reset_seconds=10)
    async with WebhookSender(settings, clock) as sender:
        await sender.send(delivery(receiver.url("/status/500")))
        clock.advance(timedelta(seconds=11))
        probe = asyncio.create_task(sender.send(delivery(receiver.url("/hold"))))
        await eventually(lambda: receiver.in_flight == 1)
        during_probe = await sender.send(delivery(receiver.url()))
        assert during_probe.kind is OutcomeKind.CIRCUIT_OPEN
        assert during_probe.retry_after_seconds == LOCAL.timeout_seconds
        receiver.gate.set()
        assert (await probe).kind is OutcomeKind.ACCEPTED
        assert (await sender.send(delivery(receiver.url()))).kind is OutcomeKind.ACCEPTED


async def test_rejections_count_as_an_answering_endpoint(
    receiver: Receiver, clock: ManualClock
) -> None:
    settings = replace(LOCAL, breaker_failure_threshold=2)
    async with WebhookSender(settings, clock) as sender:
        kinds = [
            (await sender.send(delivery(receiver.url(path)))).kind
            for path in ("/status/500", "/status/422", "/status/500", "/status/200")
        ]
    # Without the 422 resetting the count, the two 500s would have opened the circuit.
    assert kinds == [
        OutcomeKind.RETRYABLE,
        OutcomeKind.REJECTED,
        OutcomeKind.RETRYABLE,
        OutcomeKind.ACCEPTED,
    ]


# --- concurrency ----------------------------------------------------------------------


async def test_per_host_and_global_concurrency_limits(clock: ManualClock) -> None:
    settings = replace(LOCAL, max_concurrency=5, max_concurrency_per_host=3, timeout_seconds=10)
    async with (
        running_receiver() as first,
        running_receiver() as second,
        WebhookSender(settings, clock) as sender,
    ):
        one_host = [
            asyncio.create_task(sender.send(delivery(first.url("/hold")))) for _ in range(8)
        ]
        await eventually(lambda: first.in_flight == 3)
        await asyncio.sleep(0.2)  # time for a fourth to arrive if the limit did not hold
        assert first.in_flight == 3

        both = [asyncio.create_task(sender.send(delivery(second.url("/hold")))) for _ in range(8)]
        await eventually(lambda: first.in_flight + second.in_flight == 5)
        await asyncio.sleep(0.2)
        assert first.in_flight + second.in_flight == 5
        assert second.in_flight == 2

        # Slots freed by the first endpoint go to the second, up to its own limit.
        first.gate.set()
        await eventually(lambda: second.in_flight == 3)
        second.gate.set()
        outcomes = await asyncio.gather(*one_host, *both)
    assert all(o.kind is OutcomeKind.ACCEPTED for o in outcomes)
    assert first.peak_in_flight == 3
    assert second.peak_in_flight == 3
    assert len(first.requests) == len(second.requests) == 8


async def test_a_send_is_withdrawn_only_once_it_holds_its_slot(clock: ManualClock) -> None:
    settings = replace(LOCAL, max_concurrency=1, timeout_seconds=10)
    asked: list[int] = []

    async with running_receiver() as receiver, WebhookSender(settings, clock) as sender:

        async def withdrawn() -> bool:
            # Asked when the held request no longer has the one slot.
            asked.append(receiver.in_flight)
            return True

        held = asyncio.create_task(sender.send(delivery(receiver.url("/hold"))))
        await eventually(lambda: receiver.in_flight == 1)
        waiting = asyncio.create_task(
            sender.send_unless_withdrawn(delivery(receiver.url("/hold")), withdrawn)
        )
        await asyncio.sleep(0.2)
        assert asked == []  # still waiting for the slot
        receiver.gate.set()
        assert (await held).kind is OutcomeKind.ACCEPTED
        assert await waiting is None
        # Withdrawn before the request: nothing was sent, and its slot is free again.
        assert asked == [0]
        assert len(receiver.requests) == 1
        after = await asyncio.wait_for(sender.send(delivery(receiver.url("/status/200"))), 5)
        assert after.kind is OutcomeKind.ACCEPTED
