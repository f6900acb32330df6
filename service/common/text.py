"""The rule every piece of client text obeys before it is stored or looked up.

PostgreSQL ``text`` (and ``jsonb``, which carries our NOTIFY payloads) cannot hold U+0000;
every other character of a decoded protobuf string is storable (protobuf already refuses
invalid UTF-8, so there are no lone surrogates). Lengths are bounded so that no field can
carry megabytes into a row, an index or a log line, and free text holds no control
characters but tab, line feed and carriage return, so that a row's change event stays
within PostgreSQL's NOTIFY limit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from service.common.errors import ViolationCollector

# Maximum lengths (characters) of the free-text fields, by field name, wherever the field
# appears (a request, its nested message, or an RPC added later). The README lists them.
NAME_LENGTH = 200
ADDRESS_LENGTH = 1000
URL_LENGTH = 2048
MAX_TEXT_LENGTHS: Mapping[str, int] = {
    "name": NAME_LENGTH,
    "external_id": NAME_LENGTH,
    "address": ADDRESS_LENGTH,
    "webhook_url": URL_LENGTH,
    "identifier": NAME_LENGTH,
    "serial": NAME_LENGTH,
    "mpo": NAME_LENGTH,
    "agreed_by": NAME_LENGTH,
}
# Every other string field (ids, grid identifiers, codes, tokens, filters, mask paths) has
# its own rule (a UUID, a scheme, a list of values); none may be longer than this.
DEFAULT_MAX_TEXT_LENGTH = 4096
# Longer than this, or holding a NUL, a string is refused by the call guard before any other
# rule is checked (the request then reports only such fields); shorter ones that break their
# field's limit are reported by the domain rules together with every other violation.
UNREAD_LENGTH = DEFAULT_MAX_TEXT_LENGTH

NUL_RULE = "must not contain NUL characters (U+0000)"
CONTROL_RULE = (
    "must not contain control characters (U+0001 to U+001F other than tab, line feed and"
    " carriage return)"
)
# No name, id or address holds these, and JSON (the rows in our NOTIFY payloads) writes each
# as six bytes: a site's few hundred characters of them would take its change event past
# PostgreSQL's 8,000-byte limit, which no 4-byte character at the longest lengths reaches.
_CONTROL = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f]")


def text_rule(value: str, max_length: int) -> str | None:
    """The rule ``value`` breaks (its length first), or None."""
    if len(value) > max_length:
        return f"must be at most {max_length} characters"
    if "\x00" in value:
        return NUL_RULE
    if _CONTROL.search(value):
        return CONTROL_RULE
    return None


def max_text_length(field_name: str) -> int:
    return MAX_TEXT_LENGTHS.get(field_name, DEFAULT_MAX_TEXT_LENGTH)


def unreadable_rule(value: str, field_name: str) -> str | None:
    """The rule the call guard refuses ``value`` for before anything else, or None."""
    if len(value) <= UNREAD_LENGTH and "\x00" not in value:
        return None
    return text_rule(value, max_text_length(field_name)) or NUL_RULE


def check_text(
    errors: ViolationCollector, field: str, value: str, max_length: int | None = None
) -> bool:
    """Adds the violation of ``value`` (limit: ``max_length``, else the one of the field's
    name); whether it was fine."""
    limit = max_length if max_length is not None else max_text_length(field.rsplit(".", 1)[-1])
    rule = text_rule(value, limit)
    if rule is None:
        return True
    errors.add(field, rule)
    return False
