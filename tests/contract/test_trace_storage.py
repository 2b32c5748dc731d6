"""Every store keeps a command's W3C trace context with its outbox and courier rows and hands
it back to the relay (so a relay that runs later, or in another worker, still sends it);
checked on the in-memory store and on PostgreSQL alike."""

from __future__ import annotations

from stores import IdentityStore
from tests.contract.builders import event, idempotency
from tests.contract.test_code_store import commit_account, drain_mail, issue, mail

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
STATE = "congo=t61rcWkgMzE"


async def test_an_events_trace_context_comes_back_with_its_claim(store: IdentityStore) -> None:
    traced = event(traceparent=PARENT, tracestate=STATE)
    plain = event()
    async with store.unit_of_work() as uow:
        await uow.record_outcome([traced, plain], idempotency())

    async with store.claim_events(10_000, per_command=10_000) as batch:
        claimed = {e.event_id: e for e in batch.events}
    assert (claimed[traced.event_id].traceparent, claimed[traced.event_id].tracestate) == (
        PARENT,
        STATE,
    )
    assert (claimed[plain.event_id].traceparent, claimed[plain.event_id].tracestate) == (
        None,
        None,
    )


async def test_a_courier_rows_trace_context_comes_back_with_its_claim(
    store: IdentityStore,
) -> None:
    await drain_mail(store)
    traced = mail(traceparent=PARENT, tracestate=STATE)
    plain = mail()
    async with store.unit_of_work() as uow:
        await uow.add_mail([traced, plain])

    async with store.claim_mail(100) as batch:
        claimed = {m.message_id: m for m in batch.mails}
        batch.mark_relayed([m.seq for m in batch.mails])
    assert (claimed[traced.message_id].traceparent, claimed[traced.message_id].tracestate) == (
        PARENT,
        STATE,
    )
    assert claimed[plain.message_id].traceparent is None


async def test_an_issued_code_carries_its_trace_context_to_its_mail_and_event(
    store: IdentityStore,
) -> None:
    _, email = await commit_account(store)
    await drain_mail(store)
    request = issue(email, traceparent=PARENT, tracestate=None)
    assert request.event is not None
    assert await store.issue_code(request, None) is True

    async with store.claim_mail(100) as batch:
        (sent,) = batch.mails
        batch.mark_relayed([sent.seq])
    assert sent.traceparent == PARENT
    assert sent.tracestate is None
    async with store.claim_events(10_000, per_command=10_000) as events:
        (written,) = [e for e in events.events if e.event_id == request.event.event_id]
    assert written.traceparent == PARENT
