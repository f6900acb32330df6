"""The one order in which transactions lock several meters of a site.

Ingest holds a batch's register meters (FOR NO KEY UPDATE) and then its load-profile
meters (FOR KEY SHARE), each in id order, in one statement; DeleteSite takes every meter
of the site (FOR UPDATE) before the site, and a re-balancing of a site its participants
(FOR KEY SHARE). Taken in different orders, two of these could each hold a meter the other
waits for, and PostgreSQL aborts one (ABORTED to a client, a retried batch). So all of
them lock in this order: register meters first, then load-profile ones, by id within each.
A meter's measuring never changes, so the order is fixed, and a batch's meters come in it.
"""

from __future__ import annotations

# SQL: ORDER BY this, over rows of ``meters``.
METER_LOCK_ORDER = "measuring = 'load_profile_accurate', id"
