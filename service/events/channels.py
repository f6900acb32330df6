"""Names of the PostgreSQL NOTIFY channels that carry events between replicas.

Every payload is JSON with ``"key"``: the owning organization's id, which the event hub uses
to route it to that organization's subscribers only.
"""

from __future__ import annotations

# A commit appended rows to balancing_queue: wakes the balancing workers of every replica.
BALANCING_QUEUE_CHANNEL = "openvpp_balancing_queue"
# A commit put setpoints (or cancellations) to deliver in the dispatch outbox: wakes the
# delivery workers of every replica. Payload: empty.
DISPATCH_OUTBOX_CHANNEL = "openvpp_dispatch_outbox"
# Setpoint state changes and new dispatches, for WatchSetpoints (see service/dispatch/store.py).
SETPOINT_EVENTS_CHANNEL = "openvpp_setpoint_events"
