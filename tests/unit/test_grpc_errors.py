"""Which database errors the call guard answers UNAVAILABLE (retry later) instead of INTERNAL."""

from __future__ import annotations

import asyncpg
import pytest

from service.common.grpc_errors import DATABASE_UNAVAILABLE


@pytest.mark.parametrize(
    "error",
    [
        # SQLSTATE 53300: PostgreSQL is at max_connections; a new connection succeeds later.
        asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
    ],
)
def test_errors_that_pass_once_the_database_is_reachable_again_are_unavailable(
    error: Exception,
) -> None:
    assert isinstance(error, DATABASE_UNAVAILABLE)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.UniqueViolationError("duplicate key"),
        asyncpg.exceptions.UndefinedColumnError("column does not exist"),
    ],
)
def test_errors_a_retry_would_repeat_are_not(error: Exception) -> None:
    assert not isinstance(error, DATABASE_UNAVAILABLE)
