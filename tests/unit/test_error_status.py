"""The status a ValidationError becomes stays within what gRPC clients accept, however many
rules a request breaks and however long a rule is."""

from __future__ import annotations

from google.rpc import error_details_pb2, status_pb2

from service.common.errors import SUMMARY_MAX_BYTES, FieldViolation, ValidationError
from service.common.grpc_errors import MAX_FIELD_VIOLATION_BYTES, status_for


def reported(error: ValidationError) -> tuple[str, list[tuple[str, str]]]:
    """The status's message and the field violations of its BadRequest detail."""
    trailers = dict(status_for(error).trailing_metadata)
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    return status.message, [(v.field, v.description) for v in bad_request.field_violations]


def test_a_few_violations_are_all_reported() -> None:
    error = ValidationError([FieldViolation("name", "required"), FieldViolation("a.b", "x")])
    message, violations = reported(error)
    assert message == "invalid request: name: required; a.b: x"
    assert violations == [("name", "required"), ("a.b", "x")]


def test_thousands_of_violations_report_the_first_that_fit() -> None:
    many = [FieldViolation(f"items[{i}].grid_identifier", "must be set") for i in range(5000)]
    message, violations = reported(ValidationError(many))
    assert violations == [(v.field, v.rule) for v in many[: len(violations)]]
    encoded = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
            for f, d in violations
        ]
    )
    assert MAX_FIELD_VIOLATION_BYTES - 60 < encoded.ByteSize() <= MAX_FIELD_VIOLATION_BYTES
    assert message.endswith(f"(5000 violations, the first {len(violations)} in the details)")
    summary = message.removeprefix("invalid request: ").split(" (5000 violations")[0]
    assert len(summary.encode()) <= SUMMARY_MAX_BYTES + len("; and 9999 more")
    shown = summary.count("must be set")
    assert summary.endswith(f"; and {5000 - shown} more")


def test_a_long_rule_is_cut_in_the_details_and_in_the_message() -> None:
    rule = "must not be " + "é" * 2000
    message, violations = reported(ValidationError([FieldViolation("name", rule)] * 3))
    assert len(violations) == 3
    assert all(field == "name" and len(d) == 300 and d.endswith("...") for field, d in violations)
    assert message.endswith("...; and 2 more")
    assert len(message.encode()) <= len("invalid request: ") + SUMMARY_MAX_BYTES + 20
