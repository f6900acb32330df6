"""The order of stream batches' writes (:class:`WriteOrder`), without a server."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace

from service.telemetry.ingest import WriteOrder

METER = str(uuid.uuid4())
OTHER = str(uuid.uuid4())
ORG = str(uuid.uuid4())


def readings(*meter_ids: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(meter_id=meter_id) for meter_id in meter_ids]


async def ends_when_released(release: asyncio.Event) -> None:
    await release.wait()


async def test_a_turn_ending_before_the_one_it_waits_for_does_not_release_later_turns() -> None:
    order = WriteOrder()
    release_first = asyncio.Event()
    first = order.enter(ORG, readings(METER))
    first.finish_with(asyncio.create_task(ends_when_released(release_first)))
    # Ends at once without waiting (all of its readings rejected).
    skipped = order.enter(ORG, readings(METER))
    skipped.finish_with(asyncio.create_task(asyncio.sleep(0)))
    later = order.enter(ORG, readings(METER))
    waiting = asyncio.create_task(later.wait())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    release_first.set()
    await asyncio.wait_for(waiting, 1)
    assert skipped.finished.done()


async def test_turns_of_other_meters_do_not_wait_and_finished_turns_are_forgotten() -> None:
    order = WriteOrder()
    release = asyncio.Event()
    held = order.enter(ORG, readings(METER))
    task = asyncio.create_task(ends_when_released(release))
    held.finish_with(task)
    # Any spelling of an id is the one meter; a text that is no id names none.
    other = order.enter(ORG, readings(OTHER.upper(), "not-a-meter"))
    await asyncio.wait_for(other.wait(), 1)
    assert other.keys == {(ORG, uuid.UUID(OTHER))}
    release.set()
    await task
    await asyncio.sleep(0)
    assert order._latest == {(ORG, uuid.UUID(OTHER)): other}


async def test_another_organization_naming_a_meter_does_not_hold_up_its_owner() -> None:
    order = WriteOrder()
    release = asyncio.Event()
    intruder = order.enter(str(uuid.uuid4()), readings(METER))
    task = asyncio.create_task(ends_when_released(release))
    intruder.finish_with(task)
    owner = order.enter(ORG, readings(METER))
    await asyncio.wait_for(owner.wait(), 1)
    same_org = order.enter(ORG, readings(METER))
    assert same_org.after == {owner.finished}
    release.set()
    await task
