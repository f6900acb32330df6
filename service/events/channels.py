"""Names of the PostgreSQL NOTIFY channels that carry events between replicas.

Every payload is JSON with ``"key"``: the owning organization's id, which the event hub uses
to route it to that organization's subscribers only (the token channel carries a token hash
and the meter channel the bare org id, both read by cache-invalidation callbacks). The
payload builders are in :mod:`service.events.payloads`.
"""

from __future__ import annotations

# A site was created, updated, changed status or upstream status, or was deleted: carries
# the site row as committed (SiteRegistry.WatchSites; telemetry drops its meter contexts).
SITE_EVENTS_CHANNEL = "openvpp_site_events"

# A meter was created, updated or deleted: payload is the org id (meter caches drop it).
METER_CHANGED_CHANNEL = "openvpp_meter_changed"

# A committed readings batch: org, ingest id, sites and time range (Telemetry.WatchReadings).
READINGS_CHANNEL = "openvpp_readings"

# A token was revoked: payload is its SHA-256 hex (authenticator caches drop it).
TOKEN_REVOKED_CHANNEL = "openvpp_token_revoked"

# A commit appended rows to balancing_queue: wakes the balancing workers of every replica.
BALANCING_QUEUE_CHANNEL = "openvpp_balancing_queue"
