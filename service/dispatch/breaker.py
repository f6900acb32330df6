"""A circuit breaker per webhook endpoint, driven by the injected Clock.

Why not a library: ``purgatory``, ``aiobreaker`` and ``pybreaker`` all read the wall clock
themselves (``time.time()`` / ``datetime.now()``), so tests could not move time, and they
count raised exceptions while a webhook failure is an outcome we return. What we need is
small:

- CLOSED: requests flow; ``failure_threshold`` consecutive failures open the circuit.
- OPEN: no request for ``reset_seconds`` (callers get "circuit open", nothing is sent).
- HALF-OPEN: after that, exactly one probe request is let through at a time; its success
  closes the circuit, its failure opens it again for another ``reset_seconds``.

A success anywhere resets the consecutive-failure count. Only endpoints with failures are
kept in memory, so the table stays as small as the set of currently failing endpoints.
Not shared between replicas: each replica learns about a dead endpoint by itself, which
costs at most ``failure_threshold`` attempts per replica.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from service.common.clock import Clock


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class _Endpoint:
    failures: int = 0
    opened_at: datetime | None = None
    probing: bool = False


class CircuitBreakers:
    """One breaker per endpoint key (scheme, host and port of a webhook URL)."""

    def __init__(self, failure_threshold: int, reset_seconds: float, clock: Clock) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self._threshold = failure_threshold
        self._reset = timedelta(seconds=reset_seconds)
        self._clock = clock
        self._endpoints: dict[str, _Endpoint] = {}

    def state(self, key: str) -> BreakerState:
        endpoint = self._endpoints.get(key)
        if endpoint is None or endpoint.opened_at is None:
            return BreakerState.CLOSED
        if endpoint.probing or self._clock.now() >= endpoint.opened_at + self._reset:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def seconds_until_probe(self, key: str) -> float | None:
        """While OPEN: the seconds until a probe may go; None when not OPEN."""
        endpoint = self._endpoints.get(key)
        if endpoint is None or endpoint.opened_at is None or endpoint.probing:
            return None
        left = (endpoint.opened_at + self._reset - self._clock.now()).total_seconds()
        return left if left > 0 else None

    def reject_now(self, key: str) -> bool:
        """Whether a request to ``key`` would be refused right now (no state change)."""
        state = self.state(key)
        return state is BreakerState.OPEN or (
            state is BreakerState.HALF_OPEN and self._endpoints[key].probing
        )

    def try_acquire(self, key: str) -> Permit | None:
        """Asks to send one request to ``key``: a permit to report its result on, or None.

        In HALF-OPEN the first caller's permit is the probe and the others get None until it
        reports; a permit released without a result (no request was made) changes nothing.
        """
        state = self.state(key)
        if state is BreakerState.CLOSED:
            return Permit(self, key, probe=False)
        if state is BreakerState.OPEN:
            return None
        endpoint = self._endpoints[key]
        if endpoint.probing:
            return None
        endpoint.probing = True
        return Permit(self, key, probe=True)

    def _succeeded(self, key: str) -> None:
        self._endpoints.pop(key, None)

    def _failed(self, key: str, probe: bool) -> None:
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            # Closed: by no failure yet, or by a request admitted while closed that
            # succeeded while this probe was out. Either way a first failure, not a failed
            # probe: the circuit opens only at the threshold.
            endpoint = self._endpoints[key] = _Endpoint()
            probe = False
        endpoint.failures += 1
        if probe:
            endpoint.probing = False
            endpoint.opened_at = self._clock.now()
        elif endpoint.opened_at is None and endpoint.failures >= self._threshold:
            endpoint.opened_at = self._clock.now()
        # Else a request admitted while closed failed after the circuit opened: it stays
        # open on its first timer.

    def _released(self, key: str, probe: bool) -> None:
        endpoint = self._endpoints.get(key)
        if probe and endpoint is not None:
            endpoint.probing = False


class Permit:
    """Leave to send one request; exactly one of its methods is called when it is done."""

    __slots__ = ("_breakers", "_done", "key", "probe")

    def __init__(self, breakers: CircuitBreakers, key: str, *, probe: bool) -> None:
        self._breakers = breakers
        self.key = key
        self.probe = probe
        self._done = False

    def succeeded(self) -> None:
        if not self._done:
            self._done = True
            self._breakers._succeeded(self.key)

    def failed(self) -> None:
        if not self._done:
            self._done = True
            self._breakers._failed(self.key, self.probe)

    def release(self) -> None:
        """No request was made (refused address, cancelled): nothing to learn from."""
        if not self._done:
            self._done = True
            self._breakers._released(self.key, self.probe)
