"""A hub with the inbox API and reports, over a real SQLite file, filled the way the
channels, the router and agents fill it: ingest, assign, append, set_status.

Without the router (it would assign on its own): the story decides who gets what.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from hub.app import CONFIG, INGESTOR, STORE, create_app
from hub.config import Config, parse_config
from hub.inbox import api as inbox_api
from hub.inbox import page as inbox_page
from hub.inbox.auth import TOKENS
from hub.model import (
    SYSTEM,
    ChannelType,
    ConversationStatus,
    Direction,
    Event,
    EventDraft,
    EventKind,
    Identity,
    IdentityKind,
    Inbound,
    Recorded,
    agent_author,
    utcnow,
)
from hub.passwords import hash_password
from hub.reports import api as reports_api
from hub.timeline.sqlite import SqliteStore

# login -> (agent id, role, password)
AGENTS = {
    "alice": ("alice", "agent", "alice-secret-pw"),
    "sam": ("sam", "supervisor", "sam-secret-pw"),
    "root": ("root", "admin", "root-secret-pw"),
}


@pytest.fixture(scope="session")
def password_hashes() -> dict[str, str]:
    return {login: hash_password(pw) for login, (_, _, pw) in AGENTS.items()}


def hub_yaml(data_dir: Path, hashes: dict[str, str]) -> str:
    agents = "".join(
        f"""
  - id: {agent_id}
    name: {agent_id.title()} Example
    login: {login}
    role: {role}
    password_hash: "{hashes[login]}"
"""
        for login, (agent_id, role, _) in AGENTS.items()
    )
    always = "".join(f"\n      {d}: ['00:00-24:00']" for d in ("mon", "tue", "wed", "thu", "fri"))
    always += "".join(f"\n      {d}: ['00:00-24:00']" for d in ("sat", "sun"))
    return f"""
hub:
  data_dir: {data_dir}
storage:
  backend: sqlite
  path: {data_dir / "hub.db"}
channels:
  - name: web
    type: webchat
  - name: shop
    type: webchat
routing:
  queues:
    - name: general
    - name: billing
business_hours:
  - name: always
    timezone: Europe/Paris
    weekly:{always}
  - name: never
    timezone: UTC
    weekly: {{}}
agents:{agents}
"""


@pytest.fixture
def config(tmp_path: Path, password_hashes: dict[str, str]) -> Config:
    return parse_config(hub_yaml(tmp_path, password_hashes), "reports-test.yaml", {}, tmp_path)


def build_app(config: Config, tmp_path: Path) -> web.Application:
    extensions = (inbox_api.install, inbox_page.install, reports_api.install)
    return create_app(config, store=SqliteStore(tmp_path / "hub.db"), extensions=extensions)


@pytest.fixture
async def client(
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient]],
    config: Config,
    tmp_path: Path,
) -> TestClient:
    return await aiohttp_client(build_app(config, tmp_path))


async def token(app: web.Application, agent_id: str) -> str:
    """A signed-in session, issued directly (argon2 login has its own tests)."""
    return (await app[TOKENS].issue(app[CONFIG].agent(agent_id)))[0]


def auth(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


_ids = itertools.count(1)


@dataclass
class Story:
    """What `tell` stored, so that tests can work out the expected figures."""

    recorded: dict[str, list[Event]] = field(default_factory=dict)  # name -> events
    conversations: dict[str, str] = field(default_factory=dict)  # name -> conversation id

    def first(self, name: str, kind: EventKind, direction: Direction, **data: Any) -> Event:
        return next(
            e
            for e in self.recorded[name]
            if e.kind == kind
            and e.direction == direction
            and all(e.data.get(k) == v for k, v in data.items())
        )

    def last(self, name: str, kind: EventKind, direction: Direction) -> Event:
        return [e for e in self.recorded[name] if e.kind == kind and e.direction == direction][-1]


class Teller:
    """Writes a conversation through the real store and ingest calls."""

    def __init__(self, app: web.Application, story: Story) -> None:
        self.app = app
        self.store = app[STORE]
        self.story = story

    def _keep(self, name: str, recorded: Recorded) -> Recorded:
        events = self.story.recorded.setdefault(name, [])
        events.extend([*recorded.side_events, recorded.event])
        if recorded.conversation is not None:
            self.story.conversations[name] = recorded.conversation.id
        return recorded

    async def inbound(
        self,
        name: str,
        who: str,
        *,
        channel: str = "web",
        kind: EventKind = EventKind.MESSAGE,
        data: dict[str, Any] | None = None,
        ago: timedelta | None = None,
    ) -> Recorded:
        voice = channel == "phone"
        identity = Identity(IdentityKind.PHONE if voice else IdentityKind.CHAT, who)
        recorded = await self.app[INGESTOR].ingest(
            Inbound(
                channel=channel,
                channel_type=ChannelType.VOICE if voice else ChannelType.WEBCHAT,
                external_id=f"report-test-{next(_ids)}",
                identity=identity,
                text="hello",
                kind=kind,
                data=data or {},
                received_at=utcnow() - ago if ago else None,
            )
        )
        return self._keep(name, recorded)

    async def call(self, name: str, who: str, sid: str, status: str, **data: Any) -> Recorded:
        return await self.inbound(
            name,
            who,
            channel="phone",
            kind=EventKind.CALL,
            data={"call_sid": sid, "status": status, **data},
        )

    async def reply(self, name: str, agent: str = "alice", channel: str = "web") -> Recorded:
        draft = EventDraft(
            kind=EventKind.MESSAGE,
            direction=Direction.OUT,
            author=agent_author(agent),
            channel=channel,
            channel_type=ChannelType.WEBCHAT,
            text="on it",
        )
        return self._keep(name, await self.store.append(self.story.conversations[name], draft))

    async def assign(self, name: str, agent: str | None, queue: str) -> Recorded:
        conv = self.story.conversations[name]
        return self._keep(name, await self.store.assign(conv, agent, SYSTEM, queue=queue))

    async def resolve(self, name: str, agent: str = "alice") -> Recorded:
        conv = self.story.conversations[name]
        status = ConversationStatus.RESOLVED
        return self._keep(name, await self.store.set_status(conv, status, agent_author(agent)))

    async def tag(self, name: str, *tags: str) -> None:
        await self.store.set_conversation_tags(self.story.conversations[name], tags)


async def tell(app: web.Application) -> Story:
    """Five conversations:
    - "chat": web chat, queued then assigned to alice in general, answered, a second
      turn answered, tagged vip, resolved;
    - "shop": the shop chat, assigned to root in billing, answered, still open;
    - "left": web chat an hour ago, never answered, waiting in general (abandoned);
    - "missed": a call nobody answered (voicemail), waiting in billing;
    - "answered": a call alice answered, resolved.
    """
    story = Story()
    t = Teller(app, story)
    await t.inbound("chat", "visitor-chat")
    await t.assign("chat", None, "general")
    await t.assign("chat", "alice", "general")
    await t.reply("chat")
    await t.inbound("chat", "visitor-chat")
    await t.reply("chat")
    await t.tag("chat", "vip", "refund")
    await t.resolve("chat")

    await t.inbound("shop", "visitor-shop", channel="shop")
    await t.assign("shop", "root", "billing")
    await t.reply("shop", agent="root", channel="shop")

    await t.inbound("left", "visitor-left", ago=timedelta(hours=1))
    await t.assign("left", None, "general")

    await t.call("missed", "+14155550101", "CA1", "ringing")
    await t.assign("missed", None, "billing")
    await t.call("missed", "+14155550101", "CA1", "missed", reason="no-answer")
    await t.inbound("missed", "+14155550101", channel="phone", kind=EventKind.VOICEMAIL)
    await t.call("missed", "+14155550101", "CA1", "completed", duration=40)

    await t.call("answered", "+14155550102", "CA2", "ringing")
    await t.assign("answered", "alice", "general")
    await t.call("answered", "+14155550102", "CA2", "answered", agent="alice", duration=60)
    await t.call("answered", "+14155550102", "CA2", "completed", duration=65)
    await t.resolve("answered")
    return story
