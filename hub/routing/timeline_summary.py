"""What an agent is handed with an assignment: the customer's whole cross-channel timeline.

The first page (newest first) travels in the signal itself, with the cursor for the rest
and the total, so the agent's page can show the history at once and page back on demand
through GET /api/v1/customers/{id}/timeline. The signal is published after the
ASSIGNMENT event, so the page already shows it.
"""

from __future__ import annotations

from typing import Any

from hub.bus import Signal
from hub.model import event_to_dict
from hub.timeline.store import TimelineStore

FIRST_PAGE = 50


async def timeline_page(
    store: TimelineStore, customer_id: str, limit: int = FIRST_PAGE
) -> dict[str, Any]:
    page = await store.customer_timeline(customer_id, limit=limit)
    return {
        "items": [event_to_dict(e) for e in page.items],
        "next_cursor": page.next_cursor,
        "total": page.total,
    }


async def assigned_signal(
    store: TimelineStore,
    *,
    conversation_id: str,
    customer_id: str,
    agent_id: str,
    queue: str | None,
    limit: int = FIRST_PAGE,
) -> Signal:
    return Signal(
        kind="assigned",
        conversation_id=conversation_id,
        customer_id=customer_id,
        data={
            "agent_id": agent_id,
            "conversation_id": conversation_id,
            "customer_id": customer_id,
            "queue": queue,
            "timeline": await timeline_page(store, customer_id, limit),
        },
    )
