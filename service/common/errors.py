"""Domain errors, free of any transport.

Domain and storage code raise these; the gRPC layer (``service.common.grpc_errors``)
maps them to status codes and ``google.rpc`` details, so the rules stay testable as plain
functions and no handler has to remember the mapping.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One broken rule: ``field`` is the request field path, ``rule`` says what it must be."""

    field: str
    rule: str


class DomainError(Exception):
    """Base of every error that is the caller's to fix or to know about."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationError(DomainError):
    """The request breaks one or more field rules; nothing was written."""

    def __init__(self, violations: Iterable[FieldViolation]) -> None:
        self.violations = list(violations)
        if not self.violations:
            raise ValueError("ValidationError needs at least one violation")
        super().__init__(f"invalid request: {_summary(self.violations)}")

    @classmethod
    def single(cls, field: str, rule: str) -> ValidationError:
        return cls([FieldViolation(field, rule)])


# The message names the first violations only, within this many UTF-8 bytes: it travels in
# the grpc-message trailer, whose size clients cap, and a request may break a rule in each
# of thousands of items. Every violation is in the error details (as far as they fit).
SUMMARY_MAX_BYTES = 400


def _summary(violations: list[FieldViolation]) -> str:
    parts: list[str] = []
    size = 0
    for shown, violation in enumerate(violations):
        part = f"{violation.field}: {violation.rule}"
        part_size = len(part.encode()) + 2
        if size + part_size > SUMMARY_MAX_BYTES:
            if not parts:  # the first one alone is too long: cut it, whole characters
                parts.append(part.encode()[:SUMMARY_MAX_BYTES].decode(errors="ignore") + "...")
                shown = 1
            left = len(violations) - shown
            return "; ".join(parts) + (f"; and {left} more" if left else "")
        parts.append(part)
        size += part_size
    return "; ".join(parts)


class NotFoundError(DomainError):
    """The entity does not exist, or is not visible to the caller (the two are not told apart)."""

    def __init__(self, kind: str, entity_id: str) -> None:
        super().__init__(f"{kind} {entity_id!r} not found")
        self.kind = kind
        self.entity_id = entity_id


class DeletedWhileWatchedError(NotFoundError):
    """What a watch stream ends with when the entity it watches is deleted: the same status
    as a watch opened on it afterwards."""

    def __init__(self, kind: str, entity_id: str) -> None:
        super().__init__(kind, entity_id)
        self.message = f"{kind} {entity_id!r} was deleted"
        self.args = (self.message,)


class AlreadyExistsError(DomainError):
    """A uniqueness rule forbids the write; ``field`` names what collides."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class FailedPreconditionError(DomainError):
    """The entity's current state forbids the call."""

    def __init__(self, message: str, subject: str = "", precondition_type: str = "STATE") -> None:
        super().__init__(message)
        self.subject = subject
        self.precondition_type = precondition_type


class ConcurrentChangeError(Exception):
    """What a call read kept changing under it; nothing of the call was written, and the
    same call again normally succeeds (ABORTED, like a serialization failure)."""


class MalformedRequestError(DomainError):
    """The request bytes are not an encoding of the method's request message."""

    def __init__(self, type_name: str) -> None:
        super().__init__(f"request is not a valid `{type_name}`")
        self.type_name = type_name


class ViolationCollector:
    """Collects every broken rule of one request so the caller sees them all at once."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def add(self, field: str, rule: str) -> None:
        self.violations.append(FieldViolation(field, rule))

    def has(self, field_prefix: str) -> bool:
        return any(v.field.startswith(field_prefix) for v in self.violations)

    def raise_if_any(self) -> None:
        if self.violations:
            raise ValidationError(self.violations)
