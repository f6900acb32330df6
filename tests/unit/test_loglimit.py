"""Bounded logging: the rate limiter and the outage record, on a clock the test moves."""

from __future__ import annotations

import logging

import pytest

from service.common.loglimit import LogLimiter, OneLinePerPeriod, OutageLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_key_and_period_and_the_count_held_back() -> None:
    clock = Clock()
    limiter = LogLimiter(60, clock)
    assert limiter.admit("a") == 0
    assert limiter.admit("a") is None
    assert limiter.admit("a") is None
    assert limiter.admit("b") == 0  # keys are independent
    clock.now += 59.9
    assert limiter.admit("a") is None
    clock.now += 0.2
    assert limiter.admit("a") == 3  # three were dropped since the last line


def test_an_outage_is_a_start_summaries_and_an_end(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    outage = OutageLog("database", logging.getLogger("test.outage"), 10, clock)
    caplog.set_level(logging.INFO, "test.outage")
    outage.up()  # nothing ongoing: nothing to say
    for _ in range(1000):
        outage.refused(ConnectionRefusedError("refused\nsecond line"))
        clock.now += 0.025  # 1000 calls over 25 s
        outage.tick()
    outage.up()
    outage.up()
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == "database unavailable (ConnectionRefusedError: refused)"
    assert messages[1].startswith("database still unavailable after 10 s; ")
    assert messages[2].startswith("database still unavailable after 20 s; ")
    assert messages[3] == "database available again after 25.0 s; 1000 call(s) were refused"
    assert len(messages) == 4
    assert not [r for r in caplog.records if r.exc_info]
    assert not outage.ongoing


def test_a_library_trace_becomes_one_line_per_period(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.library")
    logger.addFilter(OneLinePerPeriod(60))
    caplog.set_level(logging.INFO, "test.library")
    for _ in range(50):
        try:
            raise OSError("connection refused")
        except OSError:
            logger.warning("Failed to reconnect; retrying", exc_info=True)
    [record] = caplog.records
    assert record.getMessage() == "Failed to reconnect; retrying (OSError: connection refused)"
    assert record.exc_info is None
    assert "Traceback" not in caplog.text
