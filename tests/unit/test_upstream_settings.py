from __future__ import annotations

from service.config import Settings


def test_scheduler_interval_from_environment() -> None:
    assert Settings().upstream_scheduler_interval_seconds == 60.0
    env = {"OPENVPP_UPSTREAM_SCHEDULER_INTERVAL_SECONDS": "2.5"}
    assert Settings.from_env(env).upstream_scheduler_interval_seconds == 2.5
