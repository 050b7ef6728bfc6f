"""The routing rules that need no state: who an agent is to the router, which queue a
contact belongs to, whether a queue is open, and how each strategy ranks agents.

Everything here is a pure function of configuration and the values passed in, so the
router can call it per decision without I/O and tests can check it directly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from hub.config import BusinessHours, QueueConfig, QueueMatch
from hub.model import Agent, ChannelType

CHANNEL_TYPES: tuple[str, ...] = tuple(t.value for t in ChannelType)
VOICE = ChannelType.VOICE.value
WEBCHAT = ChannelType.WEBCHAT.value


@dataclass(frozen=True, slots=True)
class AgentProfile:
    """The parts of an agent that routing reads, indexed for speed."""

    id: str
    order: int  # position in the configuration: the final tie-breaker everywhere
    skills: frozenset[str]
    capacity: Mapping[str, int]
    has_phone: bool = False

    @classmethod
    def of(cls, agent: Agent, order: int) -> AgentProfile:
        return cls(
            id=agent.id,
            order=order,
            skills=frozenset(agent.skills),
            capacity=dict(agent.capacity),
            has_phone=bool(agent.phone),
        )

    def takes(self, channel_type: str) -> bool:
        """Whether this agent can ever take this channel type.

        A call is put through to the agent's phone, so an agent without a number cannot
        take one whatever their voice capacity says.
        """
        if self.capacity.get(channel_type, 0) <= 0:
            return False
        return channel_type != VOICE or self.has_phone


def eligible(agent: AgentProfile, queue: QueueConfig) -> bool:
    """Whether the queue may give this agent work at all (ignoring load and presence)."""
    if queue.agents and agent.id not in queue.agents:
        return False
    return agent.skills.issuperset(queue.skills)


# --- which queue --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Contact:
    """What is known about a conversation when it needs an agent."""

    conversation_id: str
    customer_id: str
    channel: str
    channel_type: str
    text: str = ""
    customer_tags: tuple[str, ...] = ()
    language: str | None = None
    priority: int = 0
    queue: str | None = None  # set: already decided (IVR choice, transfer, earlier routing)
    sticky_agent: str | None = None  # who served this customer last, within the window


class QueueMatcher:
    """Picks a contact's queue: the first queue in file order whose rules all match.

    Within one rule any listed value matches (any keyword, any tag); a rule left empty
    matches everything. A queue restricted to languages does not take a contact whose
    language is unknown: guessing would send everyone to the first language queue.
    """

    def __init__(self, queues: Sequence[QueueConfig], default_queue: str) -> None:
        self._queues = tuple(queues)
        self._default = default_queue
        self._keywords = {q.name: _keyword_pattern(q.match.keywords) for q in queues}

    def select(self, contact: Contact) -> str:
        for queue in self._queues:
            if self.matches(queue, contact):
                return queue.name
        return self._default

    def matches(self, queue: QueueConfig, contact: Contact) -> bool:
        rules: QueueMatch = queue.match
        if rules.channel_types and contact.channel_type not in rules.channel_types:
            return False
        if rules.channels and contact.channel not in rules.channels:
            return False
        pattern = self._keywords[queue.name]
        if pattern is not None and not pattern.search(contact.text):
            return False
        if rules.customer_tags:
            wanted = {t.casefold() for t in rules.customer_tags}
            if not wanted.intersection(t.casefold() for t in contact.customer_tags):
                return False
        if rules.languages:
            if contact.language is None:
                return False
            primary = contact.language.lower().split("-")[0]
            if not any(
                lang == contact.language.lower() or lang == primary for lang in rules.languages
            ):
                return False
        return True


def _keyword_pattern(keywords: Sequence[str]) -> re.Pattern[str] | None:
    if not keywords:
        return None
    # Whole words only, so that "bill" does not catch "billion"; phrases keep their spaces.
    words = "|".join(re.escape(k.strip()) for k in sorted(keywords, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.IGNORECASE)


# --- business hours ---------------------------------------------------------------------


class HoursBook:
    """Whether each queue is open at a time; a queue without business hours always is."""

    def __init__(self, queues: Sequence[QueueConfig], hours: Sequence[BusinessHours]) -> None:
        by_name = {h.name: h for h in hours}
        self._of: dict[str, BusinessHours] = {
            q.name: by_name[q.business_hours] for q in queues if q.business_hours in by_name
        }

    def has_hours(self, queue: str) -> bool:
        return queue in self._of

    def is_open(self, queue: str, now: float) -> bool:
        hours = self._of.get(queue)
        return hours is None or hours.is_open(datetime.fromtimestamp(now, UTC))


# --- strategies ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentStats:
    """What strategies rank on; built by the state for one agent at one moment."""

    order: int
    load: Mapping[str, int]
    capacity: Mapping[str, int]
    last_assigned: int  # global assignment stamp; 0 = never
    queue_turn: int  # stamp of this agent's last assignment from the queue being ranked


StrategyKey = tuple[float | int, ...]


def strategy_key(strategy: str, channel_type: str, stats: AgentStats) -> StrategyKey:
    """Smaller ranks first.

    - round_robin: whoever got work from this queue least recently, so agents take turns
      in configuration order; with a stable team that is the classic rotation, and an
      agent who joins later simply takes the next turn.
    - least_busy: the lowest open load relative to capacity for this channel type, then
      over all channel types, then longest idle.
    - longest_idle: whoever was assigned anything least recently.
    """
    if strategy == "least_busy":
        cap = stats.capacity.get(channel_type, 0) or 1
        total_cap = sum(v for v in stats.capacity.values() if v > 0) or 1
        total = sum(stats.load.values())
        return (
            stats.load.get(channel_type, 0) / cap,
            total / total_cap,
            stats.last_assigned,
            stats.order,
        )
    if strategy == "longest_idle":
        return (stats.last_assigned, stats.order)
    return (stats.queue_turn, stats.order)
