"""Names of the PostgreSQL NOTIFY channels that carry events between replicas.

Every payload is JSON with ``"key"``: the owning organization's id, which the event hub uses
to route it to that organization's subscribers only.
"""

from __future__ import annotations

# A commit appended rows to balancing_queue: wakes the balancing workers of every replica.
BALANCING_QUEUE_CHANNEL = "openvpp_balancing_queue"
