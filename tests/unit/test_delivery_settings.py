"""Delivery settings come from OPENVPP_* variables and refuse values that would stall sends."""

from __future__ import annotations

import pytest

from service.config import Settings
from service.dispatch.delivery import DeliverySettings


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
