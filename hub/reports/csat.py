"""CSAT: after a conversation is resolved, ask the customer how it went; take the answer.

Asking (leader process only). A STATUS event to "resolved" schedules a survey
`csat.delay_seconds` later; the schedule is kept in the store's state
(`csat.schedule`), so a restart in between still asks. When due, and only if the
conversation is still resolved, had an agent's answer (nothing to rate otherwise), and
its customer can be reached on a text channel allowed by `csat.channels` (a call is
surveyed by SMS, like replies after a call), the hub appends an outbound message, author
system, through the outbox: text `csat.question`, data
`{"to": ..., "csat_request": {"scale": 5, "question": ...}}`. Its event id is the
survey id. The customer's open survey is remembered in state `csat.survey.<customer>`.

Answering. Within `csat.window_seconds` of the ask, while the customer has no other
active conversation:

- SMS or email: an inbound message whose text starts with a digit 1-5 (optionally
  "/5" or "out of 5"), the rest being a comment. A comment with a question mark is
  taken for a new request and is routed as usual. Out-of-office mails and other
  non-routable contacts are never answers.
- web chat: the widget shows buttons under the question and sends a `csat` frame (see
  hub/channels/webchat.py).

The answer is appended to the surveyed (resolved) conversation as an inbound MESSAGE
with `data = {"csat": {"score": 1-5, "comment": str, "survey": <survey id>,
"asked_at": ISO}, "routable": false}`: it stays resolved, no agent is offered it, and
the survey closes (one answer per survey). A provider's redelivery is the same event
(the answer keeps the inbound external id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from hub.bus import Bus, BusItem, Subscription
from hub.channels.sms import OPT_OUT_TAG
from hub.config import Config
from hub.inbox.replies import ReplyRefused, choose_route
from hub.model import (
    CUSTOMER,
    SYSTEM,
    ChannelType,
    ConversationStatus,
    DeliveryState,
    Direction,
    Event,
    EventDraft,
    EventKind,
    Inbound,
    Recorded,
    iso,
    utcnow,
)
from hub.timeline.store import StoreError, StoreUnavailable, TimelineStore

log = structlog.get_logger(__name__)

SCHEDULE_KEY = "csat.schedule"
SURVEY_PREFIX = "csat.survey."
SCALE = 5
MAX_COMMENT_CHARS = 2000

# "5", "4 - slow but fine", "5/5 great", "3 out of 5", "2. meh". The digit must stand
# alone ("10", "1234 Main St" are not answers).
_ANSWER = re.compile(
    r"\s*([1-5])(?![0-9])(?:\s*(?:/|out\s+of|of)\s*5(?![0-9]))?(?:[\s.,;:!)\-\u2013\u2014]+|$)(.*)",
    re.DOTALL | re.IGNORECASE,
)


def parse_answer(text: str) -> tuple[int, str] | None:
    """(score, comment) when `text` reads as a 1-5 rating, else None."""
    match = _ANSWER.fullmatch(text)
    if match is None:
        return None
    comment = match.group(2).strip()
    if "?" in comment:
        return None  # a question is a new request, not feedback
    return int(match.group(1)), comment[:MAX_COMMENT_CHARS]


@dataclass(frozen=True, slots=True)
class Survey:
    survey_id: str  # the event id of the question
    conversation_id: str
    customer_id: str
    channel: str
    asked_at: datetime

    def to_json(self) -> str:
        return json.dumps(
            {
                "survey_id": self.survey_id,
                "conversation_id": self.conversation_id,
                "customer_id": self.customer_id,
                "channel": self.channel,
                "asked_at": iso(self.asked_at),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Survey | None:
        try:
            data = json.loads(text)
            return cls(
                survey_id=str(data["survey_id"]),
                conversation_id=str(data["conversation_id"]),
                customer_id=str(data["customer_id"]),
                channel=str(data["channel"]),
                asked_at=datetime.fromisoformat(str(data["asked_at"])),
            )
        except (ValueError, KeyError, TypeError):
            return None


class CsatService:
    def __init__(
        self,
        config: Config,
        store: TimelineStore,
        bus: Bus,
        *,
        nudge_outbox: Callable[[], None] | None = None,
        clock: Callable[[], datetime] = utcnow,
        tick_seconds: float = 1.0,
    ) -> None:
        self.config = config
        self.settings = config.csat
        self.store = store
        self.bus = bus
        self.clock = clock
        self.tick_seconds = tick_seconds
        self._nudge_outbox = nudge_outbox
        self._schedule_lock = asyncio.Lock()
        # One run at a time: two concurrent runs would both ask the same survey.
        self._run_lock = asyncio.Lock()
        self._subscription: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # For /metrics.
        self.asked = 0
        self.responses: Counter[int] = Counter()

    # --- lifecycle (leader only) ------------------------------------------------------

    async def start(self) -> None:
        self._subscription = self.bus.subscribe("csat", maxsize=10_000)
        self._tasks = [
            asyncio.create_task(self._consume(self._subscription), name="csat-bus"),
            asyncio.create_task(self._ticking(), name="csat-clock"),
        ]

    async def stop(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _consume(self, subscription: Subscription) -> None:
        async for item in subscription:
            try:
                await self.on_item(item)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("csat.item_failed")

    async def _ticking(self) -> None:
        while True:
            try:
                await self.run_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("csat.tick_failed")
            await asyncio.sleep(self.tick_seconds)

    # --- scheduling -----------------------------------------------------------------------

    async def on_item(self, item: BusItem) -> None:
        if not isinstance(item, Event) or item.kind is not EventKind.STATUS:
            return
        if item.data.get("to") != ConversationStatus.RESOLVED.value or not item.conversation_id:
            return
        if item.data.get("reason") == "merge":
            return  # closed because its customer joined another one: nothing to rate
        due = self.clock() + timedelta(seconds=self.settings.delay_seconds)
        async with self._schedule_lock:
            schedule = await self._schedule()
            schedule[item.conversation_id] = iso(due) or ""
            await self.store.set_state(SCHEDULE_KEY, json.dumps(schedule))
        log.info("csat.scheduled", conversation=item.conversation_id, due_at=iso(due))

    async def _schedule(self) -> dict[str, str]:
        raw = await self.store.get_state(SCHEDULE_KEY)
        try:
            value = json.loads(raw) if raw else {}
        except ValueError:
            value = {}
        return value if isinstance(value, dict) else {}

    async def run_due(self) -> int:
        """Ask every survey whose time has come; returns how many were asked."""
        async with self._run_lock:
            return await self._run_due()

    async def _run_due(self) -> int:
        now = self.clock()
        async with self._schedule_lock:
            schedule = await self._schedule()
        due = [cid for cid, at in schedule.items() if _parse_time(at) <= now]
        asked = 0
        for conversation_id in due:
            try:
                if await self.ask(conversation_id) is not None:
                    asked += 1
            except StoreUnavailable:
                return asked  # keep it scheduled; the next tick tries again
            except StoreError:
                log.exception("csat.ask_failed", conversation=conversation_id)
            async with self._schedule_lock:
                schedule = await self._schedule()
                schedule.pop(conversation_id, None)
                await self.store.set_state(SCHEDULE_KEY, json.dumps(schedule))
        return asked

    async def ask(self, conversation_id: str) -> Event | None:
        """Send the survey of a resolved conversation now; None when it should not be."""
        conv = await self.store.get_conversation(conversation_id)
        bound = log.bind(conversation=conversation_id)
        if conv is None or conv.status is not ConversationStatus.RESOLVED:
            bound.info("csat.skipped", reason="not resolved")
            return None
        bound = bound.bind(customer=conv.customer_id)
        if conv.first_response_at is None:
            bound.info("csat.skipped", reason="never answered")
            return None
        customer = await self.store.get_customer(conv.customer_id)
        if customer is None or customer.merged_into is not None:
            return None
        pending = await self.open_survey(customer.id)
        if pending is not None and pending.conversation_id == conv.id:
            bound.info("csat.skipped", reason="already asked")  # resolved again meanwhile
            return None
        try:
            channel, to = choose_route(conv, customer, self.config.channels, None)
        except ReplyRefused as exc:
            bound.info("csat.skipped", reason=str(exc))
            return None
        bound = bound.bind(channel=channel.name)
        if self.settings.channels and channel.name not in self.settings.channels:
            bound.info("csat.skipped", reason="channel not surveyed")
            return None
        if channel.type == ChannelType.SMS and OPT_OUT_TAG in customer.tags:
            bound.info("csat.skipped", reason="opted out of SMS")
            return None
        question = self.settings.question
        recorded = await self.store.append(
            conv.id,
            EventDraft(
                kind=EventKind.MESSAGE,
                direction=Direction.OUT,
                author=SYSTEM,
                channel=channel.name,
                channel_type=ChannelType(channel.type),
                text=question,
                delivery_state=DeliveryState.QUEUED,
                data={
                    "to": {"kind": to.kind.value, "value": to.value},
                    "csat_request": {"scale": SCALE, "question": question},
                },
            ),
        )
        event = recorded.event
        survey = Survey(event.id, conv.id, conv.customer_id, channel.name, event.created_at)
        await self.store.set_state(SURVEY_PREFIX + conv.customer_id, survey.to_json())
        self.asked += 1
        bound.info("csat.asked", survey=event.id)
        await self.bus.publish([event])
        if self._nudge_outbox is not None:
            self._nudge_outbox()
        return event

    # --- answers (any process) --------------------------------------------------------

    async def open_survey(self, customer_id: str) -> Survey | None:
        raw = await self.store.get_state(SURVEY_PREFIX + customer_id)
        survey = Survey.from_json(raw) if raw else None
        if survey is None:
            return None
        if self.clock() - survey.asked_at > timedelta(seconds=self.settings.window_seconds):
            return None
        return survey

    async def intercept(self, inbound: Inbound) -> Recorded | None:
        """Take an inbound SMS/email that answers an open survey; None: not an answer
        (ingest then stores and routes it as usual)."""
        if inbound.kind is not EventKind.MESSAGE or not inbound.routable:
            return None
        if inbound.channel_type not in (ChannelType.SMS, ChannelType.EMAIL):
            return None  # web chat answers come as csat frames, not text
        answer = parse_answer(inbound.text)
        if answer is None:
            return None  # the cheap test first: most messages are not ratings
        customer = await self.store.find_customer(inbound.identity)
        if customer is None:
            return None
        survey = await self.open_survey(customer.id)
        if survey is None or await self.store.active_conversation(customer.id) is not None:
            return None
        score, comment = answer
        return await self._record(
            survey,
            score,
            comment,
            EventDraft(
                kind=EventKind.MESSAGE,
                direction=Direction.IN,
                author=CUSTOMER,
                channel=inbound.channel,
                channel_type=inbound.channel_type,
                text=inbound.text,
                html=inbound.html,
                attachments=inbound.attachments,
                external_id=inbound.external_id,
                thread_key=inbound.thread_key,
                data=dict(inbound.data),
            ),
        )

    async def record_widget_answer(
        self, customer_id: str, channel: str, survey_id: str, score: int, comment: str
    ) -> Event | None:
        """A web chat visitor pressed a rating button; None when that survey is not open."""
        survey = await self.open_survey(customer_id)
        if survey is None or survey.survey_id != survey_id or not 1 <= score <= SCALE:
            return None
        comment = comment.strip()[:MAX_COMMENT_CHARS]
        text = f"{score}/{SCALE}" + (f" {comment}" if comment else "")
        recorded = await self._record(
            survey,
            score,
            comment,
            EventDraft(
                kind=EventKind.MESSAGE,
                direction=Direction.IN,
                author=CUSTOMER,
                channel=channel,
                channel_type=ChannelType.WEBCHAT,
                text=text,
                external_id=f"csat:{survey_id}",
            ),
        )
        return recorded.event

    async def _record(
        self, survey: Survey, score: int, comment: str, draft: EventDraft
    ) -> Recorded:
        data: dict[str, Any] = {
            **draft.data,
            "csat": {
                "score": score,
                "comment": comment,
                "survey": survey.survey_id,
                "asked_at": iso(survey.asked_at),
            },
            "routable": False,
        }
        draft = EventDraft(
            kind=draft.kind,
            direction=draft.direction,
            author=draft.author,
            channel=draft.channel,
            channel_type=draft.channel_type,
            text=draft.text,
            html=draft.html,
            attachments=draft.attachments,
            external_id=draft.external_id,
            thread_key=draft.thread_key,
            data=data,
        )
        recorded = await self.store.append(survey.conversation_id, draft)
        # Closed after the answer is stored: a crash in between leaves it open, and the
        # redelivered answer finds the stored event by its external id.
        await self.store.set_state(SURVEY_PREFIX + survey.customer_id, "")
        if recorded.created:
            self.responses[score] += 1
            log.info(
                "csat.answered",
                conversation=survey.conversation_id,
                customer=survey.customer_id,
                channel=draft.channel,
                score=score,
            )
            await self.bus.publish([recorded.event])
        return recorded


def latest_score(events: list[Event]) -> int | None:
    """The newest CSAT score among `events` (any order), or None."""
    best: tuple[str, int] | None = None
    for event in events:
        csat = event.data.get("csat")
        if isinstance(csat, dict) and isinstance(csat.get("score"), int):
            if best is None or event.id > best[0]:
                best = (event.id, csat["score"])
    return best[1] if best else None


def _parse_time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return utcnow()


__all__ = ["CsatService", "Survey", "latest_score", "parse_answer"]
