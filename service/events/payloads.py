"""The payloads of the NOTIFY channels in :mod:`service.events.channels`, built in one place.

Each ``notify_*`` publishes inside the caller's transaction, so the event is delivered only
if (and once) the change commits. Capabilities call these instead of each other: the
upstream registry publishes a site's UPSTREAM_STATUS_CHANGED without importing the site
registry, and telemetry listens to site events without importing it either.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from datetime import datetime
from uuid import UUID

import asyncpg

from service.events.channels import (
    METER_CHANGED_CHANNEL,
    SITE_EVENTS_CHANNEL,
    TOKEN_REVOKED_CHANNEL,
)

# NOTIFY payloads must stay below 8000 bytes: above this many sites, watchers of any site
# of the organization look at the batch.
MAX_NOTIFIED_SITES = 100


class SiteEventType:
    """``event_type`` of a site event (SiteRegistry's ``SITE_EVENT_TYPE_*`` in lower case)."""

    CREATED = "created"
    UPDATED = "updated"
    STATUS_CHANGED = "status_changed"
    UPSTREAM_STATUS_CHANGED = "upstream_status_changed"
    DELETED = "deleted"


async def notify_site_event(conn: asyncpg.Connection, site_id: UUID, event_type: str) -> None:
    """Publishes the site as it is in this transaction (``{key, event_type, at, site}``,
    ``site`` the row as JSON); delivered only if it commits."""
    await conn.execute(
        """
        SELECT pg_notify($3, json_build_object(
            'key', s.org_id, 'event_type', $2::text, 'at', clock_timestamp(),
            'site', to_jsonb(s))::text)
        FROM sites s WHERE s.id = $1
        """,
        site_id,
        event_type,
        SITE_EVENTS_CHANNEL,
    )


async def notify_meter_changed(conn: asyncpg.Connection, org_id: UUID) -> None:
    """Tells every replica that a meter of ``org_id`` changed (its caches drop the org)."""
    await conn.execute("SELECT pg_notify($1, $2)", METER_CHANGED_CHANNEL, str(org_id))


async def notify_token_revoked(conn: asyncpg.Connection, token_hash: bytes) -> None:
    """Tells every replica that the token with this SHA-256 was revoked (payload: its hex)."""
    await conn.execute("SELECT pg_notify($1, $2)", TOKEN_REVOKED_CHANNEL, token_hash.hex())


def readings_batch_payload(
    org_id: UUID, ingest_id: int, sites: Collection[UUID], first: datetime, last: datetime
) -> str:
    """The READINGS_CHANNEL payload of a committed batch: ``{key, ingest, sites, from, to}``.

    ``sites`` is None when the batch touched more than :data:`MAX_NOTIFIED_SITES` sites
    (watchers of every site then look); ``from`` and ``to`` bound its readings' timestamps.
    """
    payload = {
        "key": str(org_id),
        "ingest": ingest_id,
        "sites": sorted(str(s) for s in sites) if len(sites) <= MAX_NOTIFIED_SITES else None,
        "from": first.isoformat(),
        "to": last.isoformat(),
    }
    return json.dumps(payload, separators=(",", ":"))


def event_org(payload: str) -> str | None:
    """The organization (``key``) of a JSON event payload; None when it cannot be read."""
    try:
        return str(json.loads(payload)["key"])
    except (ValueError, KeyError, TypeError):
        return None
