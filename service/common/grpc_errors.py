"""Turns domain errors into gRPC statuses with ``google.rpc`` error details."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.common.errors import (
    AlreadyExistsError,
    ConcurrentChangeError,
    DomainError,
    FailedPreconditionError,
    FieldViolation,
    MalformedRequestError,
    NotFoundError,
    ValidationError,
)

log = logging.getLogger(__name__)

ERROR_DOMAIN = "openvpp.io"

# Errors that mean "the database is not reachable right now": the caller may retry.
DATABASE_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    # SQLSTATE 53300: the server is at max_connections; a connection opens once others close.
    asyncpg.exceptions.TooManyConnectionsError,
)

# A statement prepared on a connection before a migration changed its tables (a newer
# replica's, during a rolling upgrade): asyncpg prepares it afresh by itself only outside a
# transaction. Inside one, the transaction rolled back, and the same call again succeeds.
# (Not asyncpg's OutdatedSchemaCacheError: it is raised after its statement ran, so a write
# may have committed, and a retry could apply it twice.)
SCHEMA_CHANGED = (asyncpg.exceptions.InvalidCachedStatementError,)

# Transaction aborted by PostgreSQL to resolve a conflict with another one: retryable.
CONCURRENT_CONFLICT = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    ConcurrentChangeError,
)


# Clients refuse trailers past a soft limit of 8 KiB (gRPC core: at random between 8 and
# 16 KiB, always beyond): a BadRequest of thousands of violations arrives as
# RESOURCE_EXHAUSTED with no details at all. It carries the first ones that fit in this many
# bytes (base64 in grpc-status-details-bin), the message saying how many there were.
MAX_FIELD_VIOLATION_BYTES = 3072
# One violation's field path or rule is cut at this length, so that one long rule (quoting
# a client's value) cannot crowd out all the others.
MAX_VIOLATION_TEXT_CHARS = 300


def _clipped(text: str) -> str:
    if len(text) <= MAX_VIOLATION_TEXT_CHARS:
        return text
    return text[: MAX_VIOLATION_TEXT_CHARS - 3] + "..."


def _bad_request(violations: list[FieldViolation]) -> error_details_pb2.BadRequest:
    bad_request = error_details_pb2.BadRequest()
    for violation in violations:
        bad_request.field_violations.add(
            field=_clipped(violation.field), description=_clipped(violation.rule)
        )
        if bad_request.ByteSize() > MAX_FIELD_VIOLATION_BYTES:
            del bad_request.field_violations[-1]
            break
    return bad_request


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def status_for(error: DomainError) -> grpc.Status:
    """The gRPC status (code, message and details) that tells the caller what went wrong."""
    code: int
    details: list[any_pb2.Any] = []
    message = error.message
    if isinstance(error, ValidationError):
        code = code_pb2.INVALID_ARGUMENT
        bad_request = _bad_request(error.violations)
        details.append(_packed(bad_request))
        reported = len(bad_request.field_violations)
        if reported < len(error.violations):
            message = (
                f"{message} ({len(error.violations)} violations, the first {reported} "
                "in the details)"
            )
    elif isinstance(error, NotFoundError):
        code = code_pb2.NOT_FOUND
        details.append(
            _packed(
                error_details_pb2.ResourceInfo(
                    resource_type=error.kind, resource_name=error.entity_id
                )
            )
        )
    elif isinstance(error, AlreadyExistsError):
        code = code_pb2.ALREADY_EXISTS
        details.append(
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=error.field, description=error.message
                        )
                    ]
                )
            )
        )
    elif isinstance(error, FailedPreconditionError):
        code = code_pb2.FAILED_PRECONDITION
        details.append(
            _packed(
                error_details_pb2.PreconditionFailure(
                    violations=[
                        error_details_pb2.PreconditionFailure.Violation(
                            type=error.precondition_type,
                            subject=error.subject,
                            description=error.message,
                        )
                    ]
                )
            )
        )
    elif isinstance(error, MalformedRequestError):
        code = code_pb2.INVALID_ARGUMENT
        details.append(
            _packed(error_details_pb2.ErrorInfo(reason="MALFORMED_REQUEST", domain=ERROR_DOMAIN))
        )
    else:
        code = code_pb2.INVALID_ARGUMENT
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code, message=message, details=details)
    )
    return status


def status_with_reason(code: grpc.StatusCode, message: str, reason: str) -> grpc.Status:
    """A status with a machine-readable ``ErrorInfo`` reason (e.g. for auth failures)."""
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(
            code=code.value[0],
            message=message,
            details=[_packed(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))],
        )
    )
    return status


def plain_status(code: grpc.StatusCode, message: str) -> grpc.Status:
    """A status without details."""
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message)
    )
    return status
