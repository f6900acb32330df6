"""Delivery settings come from OPENVPP_* variables and refuse values that would stall sends."""

from __future__ import annotations

import pytest

from service.config import Settings
from service.dispatch.delivery import DeliverySettings
from service.dispatch.outbox import OutboxSettings


def test_every_field_comes_from_its_variable() -> None:
    settings = Settings.from_env(
        {
            "OPENVPP_WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
            "OPENVPP_DISPATCH_TIMEOUT_SECONDS": "2.5",
            "OPENVPP_DISPATCH_MAX_CONCURRENCY": "40",
            "OPENVPP_DISPATCH_MAX_CONCURRENCY_PER_HOST": "4",
            "OPENVPP_DISPATCH_BREAKER_FAILURE_THRESHOLD": "7",
            "OPENVPP_DISPATCH_BREAKER_RESET_SECONDS": "12",
            "OPENVPP_DISPATCH_BACKOFF_INITIAL_SECONDS": "0.5",
            "OPENVPP_DISPATCH_BACKOFF_MAX_SECONDS": "90",
            "OPENVPP_DISPATCH_SIGNING_SECRET_GRACE_SECONDS": "3600",
        }
    )
    assert DeliverySettings.from_settings(settings) == DeliverySettings(
        timeout_seconds=2.5,
        max_concurrency=40,
        max_concurrency_per_host=4,
        breaker_failure_threshold=7,
        breaker_reset_seconds=12,
        backoff_initial_seconds=0.5,
        backoff_max_seconds=90,
        allow_private_networks=True,
    )
    assert settings.dispatch_signing_secret_grace_seconds == 3600


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.webhook_allow_private_networks is False
    assert DeliverySettings.from_settings(settings) == DeliverySettings()
    # The classes' own defaults are the documented ones too (tests and tools build them).
    assert OutboxSettings.from_settings(settings) == OutboxSettings()
    assert DeliverySettings().timeout_seconds == 5.0
    assert settings.dispatch_signing_secret_grace_seconds == 86400


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"timeout_seconds": 0}, "OPENVPP_DISPATCH_TIMEOUT_SECONDS must be > 0"),
        ({"max_concurrency": 0}, "OPENVPP_DISPATCH_MAX_CONCURRENCY must be >= 1"),
        ({"max_concurrency_per_host": 0}, "OPENVPP_DISPATCH_MAX_CONCURRENCY_PER_HOST"),
        ({"breaker_failure_threshold": 0}, "OPENVPP_DISPATCH_BREAKER_FAILURE_THRESHOLD"),
        ({"breaker_reset_seconds": -1}, "OPENVPP_DISPATCH_BREAKER_RESET_SECONDS"),
        ({"backoff_initial_seconds": 10, "backoff_max_seconds": 5}, "BACKOFF_MAX_SECONDS"),
    ],
)
def test_values_that_would_stall_delivery_are_refused(
    changes: dict[str, float], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        DeliverySettings(**changes)  # type: ignore[arg-type]


def test_outbox_settings_come_from_their_variables() -> None:
    settings = Settings.from_env(
        {
            "OPENVPP_DISPATCH_LEASE_SECONDS": "12",
            "OPENVPP_DISPATCH_MAX_ATTEMPTS": "3",
            "OPENVPP_DISPATCH_CLAIM_BATCH_SIZE": "50",
            "OPENVPP_DISPATCH_MAX_IN_FLIGHT": "64",
            "OPENVPP_DISPATCH_RECHECK_AFTER_SECONDS": "0",
            "OPENVPP_DISPATCH_POLL_INTERVAL_SECONDS": "0.5",
        }
    )
    assert OutboxSettings.from_settings(settings) == OutboxSettings(
        lease_seconds=12,
        max_attempts=3,
        claim_batch_size=50,
        max_in_flight=64,
        recheck_after_seconds=0,
        poll_interval_seconds=0.5,
    )


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"lease_seconds": 0}, "OPENVPP_DISPATCH_LEASE_SECONDS must be > 0"),
        ({"max_attempts": 0}, "OPENVPP_DISPATCH_MAX_ATTEMPTS must be >= 1"),
        ({"claim_batch_size": 0}, "OPENVPP_DISPATCH_CLAIM_BATCH_SIZE must be >= 1"),
        ({"max_in_flight": 0}, "OPENVPP_DISPATCH_MAX_IN_FLIGHT must be >= 1"),
        ({"recheck_after_seconds": -1}, "OPENVPP_DISPATCH_RECHECK_AFTER_SECONDS must be >= 0"),
        ({"poll_interval_seconds": 0}, "OPENVPP_DISPATCH_POLL_INTERVAL_SECONDS must be > 0"),
        ({"lease_seconds": float("nan")}, "OPENVPP_DISPATCH_LEASE_SECONDS"),
    ],
)
def test_outbox_values_that_would_stall_delivery_are_refused(
    changes: dict[str, float], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        OutboxSettings(**changes)  # type: ignore[arg-type]
