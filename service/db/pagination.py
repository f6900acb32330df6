"""Cursor pagination: opaque page tokens bound to the caller's organization and to the
filters they were issued for."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar
from uuid import UUID

from service.auth.principal import current_principal
from service.common.errors import ValidationError

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class Cursor:
    """Position after the last row of a page, in (created_at, id) order."""

    created_at: datetime
    id: UUID


def page_size_or_default(
    page_size: int,
    field: str = "page_size",
    *,
    default: int = DEFAULT_PAGE_SIZE,
    maximum: int = MAX_PAGE_SIZE,
) -> int:
    """0 means the default; above the maximum is lowered to it (AIP-158); negative is an error."""
    if page_size < 0:
        raise ValidationError.single(field, "must not be negative")
    if page_size == 0:
        return default
    return min(page_size, maximum)


def filters_fingerprint(*filters: object) -> str:
    """What a token is bound to: ``filters`` and the calling organization (when there is an
    authenticated caller, as in every RPC), so another organization's token is refused like
    a token of other filters, by every list of today or later."""
    return hashlib.sha256(repr((_caller_org(), filters)).encode()).hexdigest()[:16]


def _caller_org() -> str:
    try:
        return str(current_principal().org_id)
    except RuntimeError:
        return ""


def encode_token_body(body: dict[str, object], fingerprint: str) -> str:
    """An opaque page token carrying ``body`` (a list's own cursor) and the fingerprint of
    what it is bound to."""
    text = json.dumps({**body, "f": fingerprint}, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_token_body(
    token: str, fingerprint: str, field: str = "page_token"
) -> dict[str, Any] | None:
    """The cursor body of ``token``; None for an empty token (first page). A token that is
    not ours, or bound to other filters or another organization, is a field violation."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(body, dict) or "f" not in body:
            raise ValueError("not a page token")
    # RecursionError: JSON nested deeper than the parser goes, which a token of the allowed
    # length can be.
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValidationError.single(field, "must be a next_page_token this API returned") from exc
    if body["f"] != fingerprint:
        raise ValidationError.single(
            field,
            "must be used by the same organization with the same filters as the request that "
            "returned it",
        )
    return body


def encode_page_token(cursor: Cursor, fingerprint: str) -> str:
    return encode_token_body({"t": cursor.created_at.isoformat(), "i": str(cursor.id)}, fingerprint)


def decode_page_token(token: str, fingerprint: str, field: str = "page_token") -> Cursor | None:
    """The cursor in ``token``; None for an empty token (first page)."""
    body = decode_token_body(token, fingerprint, field)
    if body is None:
        return None
    # The fingerprint is no secret (a caller can compute its own), so a token's body is
    # checked as strictly as any other input: a forged one is a field violation too.
    created, row_id = body.get("t"), body.get("i")
    try:
        if not isinstance(created, str) or not isinstance(row_id, str):
            raise TypeError("not a cursor")
        at = datetime.fromisoformat(created)
        if at.tzinfo is None:
            raise ValueError("an instant without its offset")
        # Out of datetime's range once in UTC (OverflowError): not a time we ever wrote.
        return Cursor(at.astimezone(UTC), UUID(row_id))
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValidationError.single(field, "must be a next_page_token this API returned") from exc


class Pageable(Protocol):
    """A row listed in (created_at, id) order."""

    @property
    def created_at(self) -> datetime: ...

    @property
    def id(self) -> UUID: ...


RowT = TypeVar("RowT", bound=Pageable)


def trim_page(rows: Sequence[RowT], limit: int, fingerprint: str) -> tuple[list[RowT], str]:
    """The page and its next_page_token, from ``limit + 1`` rows fetched by a store: the extra
    row only tells that another page exists, so the last page never has a token."""
    if len(rows) <= limit:
        return list(rows), ""
    page = list(rows[:limit])
    last = page[-1]
    return page, encode_page_token(Cursor(last.created_at, last.id), fingerprint)


@dataclass(frozen=True)
class Page(Generic[RowT]):
    rows: list[RowT]
    next_page_token: str
    total_size: int


async def fetch_page(
    list_name: str,
    list_rows: Callable[[Cursor | None, int], Awaitable[tuple[Sequence[RowT], int]]],
    limit: int,
    page_token: str,
    *filters: object,
) -> Page[RowT]:
    """One page of the list RPC ``list_name``: the token is checked against the list and
    ``filters`` (two lists with one filter, ListResources and ListMeters of a site, must not
    take each other's tokens), then ``list_rows(after, limit + 1)`` gives the rows after its
    cursor and the total count."""
    fingerprint = filters_fingerprint(list_name, *filters)
    after = decode_page_token(page_token, fingerprint)
    rows, total = await list_rows(after, limit + 1)
    page, next_token = trim_page(rows, limit, fingerprint)
    return Page(page, next_token, total)
