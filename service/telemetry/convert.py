"""Meter and telemetry records <-> protobuf messages."""

from __future__ import annotations

from openvpp.v1 import meter_registry_pb2 as mpb
from openvpp.v1 import telemetry_pb2 as tpb

from service.common.protoconv import enum_from_proto, enum_to_proto, from_timestamp, to_timestamp
from service.telemetry.domain import (
    Flow,
    Measuring,
    MeterDirection,
    MeterFields,
    RejectReason,
    reason_text,
)
from service.telemetry.ingest import IngestResult
from service.telemetry.meter_store import MeterRecord

# Stored flow codes (readings.flow) <-> domain/proto.
FLOW_CODES: dict[Flow, int] = {Flow.IMPORT: 1, Flow.EXPORT: 2}
PROTO_FLOW_BY_CODE: dict[int, tpb.Flow.ValueType] = {1: tpb.FLOW_IMPORT, 2: tpb.FLOW_EXPORT}
REASON_TO_PROTO: dict[RejectReason, tpb.RejectReason.ValueType] = {
    reason: tpb.RejectReason.Value("REJECT_REASON_" + reason.name) for reason in RejectReason
}
_REASON_TEXTS = {reason: reason_text(reason) for reason in RejectReason}


def ack_to_proto(batch_id: str, result: IngestResult) -> tpb.ReadingBatchAck:
    ack = tpb.ReadingBatchAck(
        batch_id=batch_id,
        accepted_count=result.accepted,
        corrected_count=result.corrected,
        duplicate_count=result.duplicates,
        rejected_count=len(result.rejected),
    )
    if result.rejected:
        ack.rejected.extend(
            tpb.RejectedReading(
                index=index, reason=REASON_TO_PROTO[reason], description=_REASON_TEXTS[reason]
            )
            for index, reason in result.rejected
        )
    return ack


def meter_to_proto(meter: MeterRecord) -> mpb.Meter:
    fields = meter.fields
    assert fields.direction is not None
    assert fields.measuring is not None
    assert fields.start_date is not None
    message = mpb.Meter(
        id=str(meter.id),
        site_id=str(meter.site_id),
        identifier=fields.identifier,
        serial=fields.serial,
        mpo=fields.mpo,
        direction=enum_to_proto(mpb.MeterDirection, "METER_DIRECTION_", fields.direction),
        measuring=enum_to_proto(mpb.Measuring, "MEASURING_", fields.measuring),
        start_date=to_timestamp(fields.start_date),
        transformer_factor=fields.transformer_factor or 1.0,
        create_time=to_timestamp(meter.created_at),
        update_time=to_timestamp(meter.updated_at),
    )
    if fields.end_date is not None:
        message.end_date.CopyFrom(to_timestamp(fields.end_date))
    return message


def direction_from_proto(number: int, field: str) -> MeterDirection | None:
    return enum_from_proto(mpb.MeterDirection, "METER_DIRECTION_", number, MeterDirection, field)


def measuring_from_proto(number: int, field: str) -> Measuring | None:
    return enum_from_proto(mpb.Measuring, "MEASURING_", number, Measuring, field)


def meter_fields_from_create(request: mpb.CreateMeterRequest) -> MeterFields:
    return MeterFields(
        identifier=request.identifier,
        serial=request.serial,
        mpo=request.mpo,
        direction=direction_from_proto(request.direction, "direction"),
        measuring=measuring_from_proto(request.measuring, "measuring"),
        start_date=from_timestamp(request.start_date, "start_date")
        if request.HasField("start_date")
        else None,
        end_date=from_timestamp(request.end_date, "end_date")
        if request.HasField("end_date")
        else None,
        transformer_factor=request.transformer_factor
        if request.HasField("transformer_factor")
        else None,
    )
