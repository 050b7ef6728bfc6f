"""Soak: mixed traffic on all four channels against one hub process, for 30 minutes.

    python benchmarks/soak.py                # full profile: 30 minutes of traffic
    python benchmarks/soak.py --quick        # CI smoke profile: 1 minute
    python benchmarks/soak.py --minutes 5    # any length

One `hub serve` subprocess (SQLite in a temp dir, log level info, JSON log lines to a
file) with four channels and two agents, beside a real Dovecot (the tests'
`tests/servers/dovecot.py`), an aiosmtpd capture server (`tests/servers/smtp.py`) and a
loopback fake Twilio (`tests/twilio/fake_twilio.py`), all on 127.0.0.1. For `--minutes`
this process sends, open loop (a slow hub does not slow the arrivals):

- web chat: 20 messages/s round-robin over 50 visitor sockets (`/chat/web/ws`);
- SMS: 10 signed inbound-SMS webhooks/s, a new MessageSid each, from 500 numbers;
- voice: 1 incoming call/s from 100 of those numbers, each played as Twilio would: the
  incoming-call webhook, then the <Dial> action (answered, or 1 in 5 not answered and
  then the <Record> action of a voicemail), then the completed status callback;
- email: 2 mails/s APPENDed to the Dovecot INBOX the hub watches (IMAP IDLE), from 200
  senders, every third one a reply to the sender's previous mail.

Agent `ada` (who has a phone, so calls are dialed to her) and agent `ben` sign in and hold
the agents' WebSocket (`/api/v1/ws`); every stored event must reach both. Every
`--reply-every` seconds ada replies through the API (`POST .../replies`) to a recent
conversation of each channel in turn: web chat replies must reach the visitor's socket,
SMS replies the fake Twilio (which then posts a signed "delivered" status callback),
email replies the SMTP capture; callers are answered by SMS.

The hub's RSS is sampled every `--sample-seconds` (10; quick: 2). After the warm-up (the
first 20% of the run, at least 1 minute; quick: 20 s), memory must stay flat: the median
of the last 10% of the samples may exceed the median right after the warm-up (the next
10% of the run) by at most 10%.

When the traffic stops the script waits up to `--settle` seconds for stragglers, stops the
hub (SIGTERM) and then accounts for every message: sent by this script = acknowledged by
the hub (HTTP 200, widget ack, APPEND OK) = stored (the SQLite file, opened read-only) =
delivered to each agent socket (matched by channel and external id); agent replies sent =
delivered where they should land, each stored as sent or delivered. The hub's log is
scanned for lines at level error or critical (and any traceback).

Exit status 1 with a line starting with FAIL when a message is missing anywhere, a reply
was not delivered, an error was logged, or the hub did not exit cleanly; exit status 1
without one when memory grew more than 10% (a missed target, as run_all reports it).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import email
import email.policy
import json
import os
import random
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    HOST,
    HttpPool,
    Server,
    WsClient,
    free_port,
    gather_limited,
    http_post_bytes,
    machine_note,
    open_loop,
    post_json,
    print_table,
)

ACCOUNT_SID = "AC7d3e9b1f5a2c8e4d6b0a9f3c1e7d5b2a"
AUTH_TOKEN = "5c8e2a7f1d9b3e6a0c4f8d2b7e1a9c3f"
SMS_NUMBER = "+14155550100"
VOICE_NUMBER = "+14155550199"
ADA_PHONE = "+14155550123"
MAILBOX_USER = "support@example.test"  # the Dovecot user, and the channel's address
MAIL_DOMAIN = "customers.example"
CHANNELS = {"web": "web", "sms": "sms", "voice": "voice", "email": "mail"}  # flow: channel
# Replies to callers leave by SMS: a call cannot carry text.
REPLY_VIA = {"web": "web", "sms": "sms", "voice": "sms", "email": "mail"}
AGENTS = (("ada", "Ada Agent", ADA_PHONE), ("ben", "Ben Agent", None))
AGENT_PASSWORD = "soak-agent-password"
SMS_SENDERS = 500
CALLERS = 100  # the first 100 SMS numbers also call: one customer, two channels
MAIL_SENDERS = 200
REQUEST_TIMEOUT = 30.0
MEMORY_LIMIT = 0.10
MIB = 1024
ERROR_LEVELS = frozenset({"error", "critical", "exception", "fatal"})
_REPLY_TAG = re.compile(r"Soak reply (\w+)-(\d+):")

# --- the hub -----------------------------------------------------------------------------


def hub_yaml(
    data_dir: Path,
    port: int,
    twilio_url: str,
    imap: tuple[int, str],
    smtp_port: int,
    pw_hash: str,
) -> str:
    imap_port, imap_password = imap
    agents = "".join(
        f"""
  - id: {agent_id}
    name: {name}
    login: {agent_id}
    role: agent
    password_hash: "{pw_hash}"
"""
        + (f'    phone: "{phone}"\n' if phone else "")
        for agent_id, name, phone in AGENTS
    )
    twilio = f"""
    twilio:
      account_sid: {ACCOUNT_SID}
      auth_token: {AUTH_TOKEN}
      api_base_url: {twilio_url}"""
    return f"""
hub:
  public_url: http://{HOST}:{port}
  data_dir: {data_dir}
  log_level: info
storage:
  backend: sqlite
  path: {data_dir / "hub.db"}
channels:
  - name: {CHANNELS["web"]}
    type: webchat
    rate_limit_per_minute: 600
  - name: {CHANNELS["sms"]}
    type: sms
    phone_number: "{SMS_NUMBER}"{twilio}
  - name: {CHANNELS["voice"]}
    type: voice
    phone_number: "{VOICE_NUMBER}"{twilio}
  - name: {CHANNELS["email"]}
    type: email
    address: {MAILBOX_USER}
    imap:
      host: {HOST}
      port: {imap_port}
      username: {MAILBOX_USER}
      password: {imap_password}
      tls: none
    smtp:
      host: {HOST}
      port: {smtp_port}
      tls: none
agents:{agents}"""


class LoggedHub(Server):
    """`hub serve` whose output (JSON log lines, as it writes them off a TTY) goes to a
    file kept beside its database, to be scanned at the end."""

    def __init__(self, config: Path, port: int, log_path: Path) -> None:
        argv = [sys.executable, "-m", "hub.cli", "serve", "--config", str(config)]
        super().__init__("hub", [*argv, "--port", str(port)], port, nofile=4096)
        self._log.close()
        self._log = log_path.open("w+b")


# --- what was sent, and what came back ---------------------------------------------------


@dataclass
class Flow:
    """One channel's inbound messages, by the external id the hub stores them under."""

    name: str
    channel: str
    sent: dict[str, None] = field(default_factory=dict)  # external ids, in order
    acked: set[str] = field(default_factory=set)
    errors: int = 0
    first_error: str = ""
    stored: int = 0
    missing_stored: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or message[:300]


@dataclass
class Reply:
    n: int
    flow: str  # the conversation's channel (flow name)
    via: str  # the channel it leaves on
    text: str
    event_id: str | None = None
    error: str = ""
    delivered: bool = False
    state: str | None = None  # its delivery state in the store at the end


class AgentSocket:
    """An agent's realtime socket: which inbound events reached it, recent conversations."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.ws: WsClient | None = None
        self.seen: set[tuple[str, str]] = set()
        self.recent: dict[str, collections.deque[str]] = collections.defaultdict(
            lambda: collections.deque(maxlen=100)
        )
        self.token = ""
        self.mine: dict[str, str] = {}  # conversations assigned to this agent: their channel
        self.frames = 0
        self.resyncs = 0
        self.errors: list[str] = []

    def on_text(self, text: str, now: float) -> None:
        self.frames += 1
        frame = json.loads(text)
        kind = frame.get("type")
        if kind == "event":
            event = frame["event"]
            if event.get("direction") == "in" and event.get("external_id"):
                self.seen.add((event["channel"], event["external_id"]))
                if event.get("conversation_id"):
                    self.recent[event["channel"]].append(event["conversation_id"])
        elif kind == "conversation":
            conversation = frame["conversation"]
            active = conversation.get("status") in ("open", "pending")
            if active and conversation.get("assignee") == self.agent_id:
                self.mine[conversation["id"]] = conversation["channel"]
            else:
                self.mine.pop(conversation["id"], None)
        elif kind == "resync":
            self.resyncs += 1
        elif kind == "error":
            self.errors.append(text[:300])

    async def open(self, url: str, port: int) -> AgentSocket:
        status, body = await post_json(
            f"{url}/api/v1/auth/login", {"login": self.agent_id, "password": AGENT_PASSWORD}
        )
        if status != 200:
            raise RuntimeError(f"agent {self.agent_id} login failed: {status} {body}")
        self.token = str(body["token"])
        path = f"/api/v1/ws?token={self.token}"
        self.ws = await WsClient.connect(HOST, port, path, self.on_text)
        return self

    @property
    def open_now(self) -> bool:
        return self.ws is not None and not self.ws.closed.done()


class Visitor:
    """One widget socket: hello, welcome, messages and their acks, agents' replies."""

    def __init__(self, flow: Flow, on_reply: Callable[[str], None]) -> None:
        self.flow = flow
        self.on_reply = on_reply
        self.ws: WsClient | None = None
        self.visitor_id = ""
        self.welcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_text(self, text: str, now: float) -> None:
        frame = json.loads(text)
        kind = frame.get("type")
        if kind == "welcome" and not self.welcome.done():
            self.visitor_id = frame["visitor_id"]
            self.welcome.set_result(None)
        elif kind == "ack":
            self.flow.acked.add(f"{self.visitor_id}:{frame['client_id']}")
        elif kind == "event":
            event = frame["event"]
            if event.get("direction") == "out":
                self.on_reply(event.get("text") or "")
        elif kind == "error":
            if not self.welcome.done():
                self.welcome.set_exception(RuntimeError(f"refused: {text[:200]}"))
            self.flow.fail(f"widget error frame: {text}")

    async def open(self, port: int) -> Visitor:
        self.ws = await WsClient.connect(HOST, port, f"/chat/{self.flow.channel}/ws", self.on_text)
        self.ws.send_text('{"type":"hello"}')
        async with asyncio.timeout(60):
            await self.welcome
        return self

    def send(self, client_id: str, text: str) -> None:
        assert self.ws is not None
        self.flow.sent[f"{self.visitor_id}:{client_id}"] = None
        try:
            self.ws.send_text(json.dumps({"type": "message", "client_id": client_id, "text": text}))
        except Exception as exc:  # a closed socket: the message is missing, say why
            self.flow.fail(f"visitor {self.visitor_id}: {type(exc).__name__}: {exc}")


# --- webhooks as Twilio sends them -------------------------------------------------------


class Twilio:
    """Signed form posts to the hub, as Twilio makes them, over one keep-alive pool."""

    def __init__(self, pool: HttpPool, port: int) -> None:
        from twilio.request_validator import RequestValidator

        self.pool = pool
        self.port = port
        self.public = f"http://{HOST}:{port}"
        self.validator = RequestValidator(AUTH_TOKEN)

    async def post(self, path_qs: str, params: dict[str, str]) -> tuple[int, bytes]:
        signature = self.validator.compute_signature(self.public + path_qs, params)
        data = http_post_bytes(
            HOST,
            self.port,
            path_qs,
            urlencode(params).encode(),
            {
                "Content-Type": "application/x-www-form-urlencoded; charset=UTF-8",
                "X-Twilio-Signature": signature,
                "User-Agent": "TwilioProxy/1.1",
            },
        )
        return await self.pool.request(data, REQUEST_TIMEOUT)

    def path_of(self, url: str) -> str:
        parts = urlsplit(url)
        return parts.path + (f"?{parts.query}" if parts.query else "")


def phone(n: int) -> str:
    return f"+1202555{1000 + n:04d}"


def sid(prefix: str, tag: str, n: int) -> str:
    return f"{prefix}{tag}{n:024x}"


def twiml_actions(body: bytes) -> dict[str, str]:
    """The action URL of each verb of a TwiML answer that has one ({"Dial": url, ...})."""
    root = ElementTree.fromstring(body)
    return {el.tag: el.attrib["action"] for el in root.iter() if "action" in el.attrib}


# --- mail --------------------------------------------------------------------------------


def make_mail(tag: str, n: int, sender: int, parent: str | None) -> tuple[str, bytes]:
    message_id = f"<soak-{tag}-{n:07d}@{MAIL_DOMAIN}>"
    subject = f"Order {1000 + sender}: question {n}"
    fields = [
        f"Message-ID: {message_id}",
        f'From: "Customer {sender}" <customer{sender:04d}@{MAIL_DOMAIN}>',
        f"To: Support <{MAILBOX_USER}>",
        f"Subject: {'Re: ' if parent else ''}{subject}",
        f"Date: {format_datetime(datetime.now(UTC))}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    if parent:
        fields += [f"In-Reply-To: {parent}", f"References: {parent}"]
    body = (
        f"Hello,\n\nthis is mail {n} about order {1000 + sender}: where is it?\n"
        f"Thank you.\n\n-- \nCustomer {sender}\n"
    )
    raw = "\r\n".join(fields) + "\r\n\r\n" + body.replace("\n", "\r\n")
    return message_id, raw.encode()


def mail_text(raw: bytes) -> str:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    part = message.get_body(("plain",)) if isinstance(message, EmailMessage) else None
    if part is None:
        return raw.decode(errors="replace")
    return str(part.get_content())


# --- the run -----------------------------------------------------------------------------


@dataclass
class Profile:
    seconds: float
    warmup: float
    sample_every: float
    progress_every: float
    settle: float
    web_rate: float
    visitors: int
    sms_rate: float
    call_rate: float
    mail_rate: float
    reply_every: float


@dataclass
class Outcome:
    flows: dict[str, Flow]
    agents: list[AgentSocket]
    replies: list[Reply]
    samples: list[tuple[float, int]]  # (seconds since traffic began, RSS KiB)
    status_callbacks: int = 0
    resolved: int = 0
    resolve_errors: list[str] = field(default_factory=list)
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    status_callback_errors: list[str] = field(default_factory=list)
    settled_in: float | None = None
    hub_cpu: float = 0.0
    hub_died: str = ""
    notes: list[str] = field(default_factory=list)


class Soak:
    def __init__(
        self, profile: Profile, hub: Server, smtp: Any, fake: Any, dovecot: Any, tag: str
    ) -> None:
        self.p = profile
        self.hub = hub
        self.smtp = smtp
        self.fake = fake
        self.dovecot = dovecot
        self.tag = tag
        self.flows = {name: Flow(name, channel) for name, channel in CHANNELS.items()}
        self.agents = [AgentSocket(agent_id) for agent_id, _, _ in AGENTS]
        self.replies: dict[int, Reply] = {}
        self.samples: list[tuple[float, int]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.outcome = Outcome(self.flows, self.agents, [], self.samples)
        self._mail_parent: dict[int, str] = {}
        self._smtp_seen = 0
        self._twilio_seen: set[str] = set()
        self.t0 = 0.0
        self.rng = random.Random(tag)

    # --- helpers ---------------------------------------------------------------------

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def reply_landed(self, text: str, via: str) -> None:
        match = _REPLY_TAG.search(text)
        if match is None or match.group(1) != self.tag:
            return
        reply = self.replies.get(int(match.group(2)))
        if reply is not None and reply.via == via:
            reply.delivered = True

    # --- streams ---------------------------------------------------------------------

    async def web(self, visitors: list[Visitor]) -> None:
        count = int(self.p.web_rate * self.p.seconds)

        def fire(i: int, _: float) -> None:
            visitors[i % len(visitors)].send(f"s{i}", f"Soak web message {i}: is anyone there?")

        await open_loop(self.p.web_rate, count, fire, start=self.t0)

    async def sms(self, twilio: Twilio) -> None:
        flow = self.flows["sms"]
        path = f"/twilio/{flow.channel}/sms"
        count = int(self.p.sms_rate * self.p.seconds)

        async def one(i: int) -> None:
            message_sid = sid("SM", self.tag, i)
            params = {
                "ToCountry": "US",
                "ToState": "CA",
                "SmsMessageSid": message_sid,
                "NumMedia": "0",
                "ToCity": "SAN FRANCISCO",
                "FromZip": "20001",
                "SmsSid": message_sid,
                "FromState": "DC",
                "SmsStatus": "received",
                "FromCity": "WASHINGTON",
                "Body": f"Soak text {i}: my parcel has not arrived",
                "FromCountry": "US",
                "To": SMS_NUMBER,
                "ToZip": "94103",
                "NumSegments": "1",
                "MessageSid": message_sid,
                "AccountSid": ACCOUNT_SID,
                "From": phone(i % SMS_SENDERS),
                "ApiVersion": "2010-04-01",
            }
            flow.sent[message_sid] = None
            await self._webhook(flow, message_sid, path, params)

        await open_loop(self.p.sms_rate, count, lambda i, _: self.spawn(one(i)), start=self.t0)

    async def _webhook(
        self, flow: Flow, external_id: str, path_qs: str, params: dict[str, str]
    ) -> bytes | None:
        try:
            status, body = await self.twilio.post(path_qs, params)
        except Exception as exc:
            flow.fail(f"{path_qs}: {type(exc).__name__}: {exc}")
            return None
        if status != 200:
            flow.fail(f"{path_qs}: HTTP {status}: {body[:200]!r}")
            return None
        flow.acked.add(external_id)
        return body

    async def calls(self) -> None:
        count = int(self.p.call_rate * self.p.seconds)
        await open_loop(
            self.p.call_rate, count, lambda i, _: self.spawn(self.call(i)), start=self.t0
        )

    async def call(self, i: int) -> None:
        """One incoming call, as Twilio drives it: answer, dial action, status callback."""
        flow = self.flows["voice"]
        call_sid = sid("CA", self.tag, i)
        caller = phone((i * 7) % CALLERS)
        base = {
            "AccountSid": ACCOUNT_SID,
            "ApiVersion": "2010-04-01",
            "CallSid": call_sid,
            "Called": VOICE_NUMBER,
            "Caller": caller,
            "Direction": "inbound",
            "From": caller,
            "FromCountry": "US",
            "To": VOICE_NUMBER,
            "ToCountry": "US",
        }
        path = f"/twilio/{flow.channel}/voice"
        flow.sent[f"{call_sid}:ringing"] = None
        twiml = await self._webhook(
            flow, f"{call_sid}:ringing", path, {**base, "CallStatus": "ringing"}
        )
        if twiml is None:
            return
        actions = twiml_actions(twiml)
        self.outcome.calls["dialed to ada" if "Dial" in actions else "no agent free"] += 1
        await asyncio.sleep(self.rng.uniform(0.5, 2.0))  # ringing the agent
        record_url = actions.get("Record")
        duration = 0
        if "Dial" in actions:
            answered = i % 5 != 4
            event = "answered" if answered else "missed"
            duration = self.rng.randint(20, 300) if answered else 0
            params = {
                **base,
                "CallStatus": "in-progress",
                "DialCallSid": sid("CA", self.tag + "d", i),
                "DialCallStatus": "completed" if answered else "no-answer",
                "DialCallDuration": str(duration),
            }
            flow.sent[f"{call_sid}:{event}"] = None
            self.outcome.calls[event] += 1
            twiml = await self._webhook(
                flow, f"{call_sid}:{event}", self.twilio.path_of(actions["Dial"]), params
            )
            if twiml is None:
                return
            record_url = twiml_actions(twiml).get("Record")
        if record_url is not None:  # voicemail: nobody free, or nobody answered
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))
            recording_sid = sid("RE", self.tag, i)
            params = {
                **base,
                "CallStatus": "completed",
                "RecordingSid": recording_sid,
                "RecordingUrl": f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}"
                f"/Recordings/{recording_sid}",
                "RecordingDuration": "7",
                "Digits": "hangup",
            }
            flow.sent[f"{call_sid}:voicemail"] = None
            self.outcome.calls["voicemail"] += 1
            await self._webhook(
                flow, f"{call_sid}:voicemail", self.twilio.path_of(record_url), params
            )
            duration += 9
        await asyncio.sleep(self.rng.uniform(0.1, 0.5))
        params = {
            **base,
            "CallStatus": "completed",
            "CallDuration": str(duration + 4),
            "Duration": str((duration + 4 + 59) // 60),
            "CallbackSource": "call-progress-events",
            "SequenceNumber": "0",
            "Timestamp": format_datetime(datetime.now(UTC)),
        }
        flow.sent[f"{call_sid}:completed"] = None
        await self._webhook(flow, f"{call_sid}:completed", f"{path}/status", params)

    async def mails(self) -> None:
        count = int(self.p.mail_rate * self.p.seconds)
        await open_loop(
            self.p.mail_rate, count, lambda i, _: self.spawn(self.mail(i)), start=self.t0
        )

    async def mail(self, i: int) -> None:
        flow = self.flows["email"]
        sender = (i * 13) % MAIL_SENDERS
        parent = self._mail_parent.get(sender) if i % 3 == 2 else None
        message_id, raw = make_mail(self.tag, i, sender, parent)
        self._mail_parent[sender] = message_id
        flow.sent[message_id] = None
        try:
            await self.dovecot.append([raw])
        except Exception as exc:
            flow.fail(f"APPEND: {type(exc).__name__}: {exc}")
            return
        flow.acked.add(message_id)

    async def api(
        self, pool: HttpPool, agent: AgentSocket, path: str, payload: dict[str, str]
    ) -> tuple[int, bytes]:
        request = http_post_bytes(
            HOST,
            self.hub.port,
            path,
            json.dumps(payload).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {agent.token}"},
        )
        return await pool.request(request, REQUEST_TIMEOUT)

    async def replier(self, pool: HttpPool) -> None:
        """The agents at work, taking turns: each answers one of the conversations the
        router assigned to them, of each channel in turn (any recent one of that channel
        when they hold none there), and resolves about every other one they answer, which
        frees their capacity for the next conversation (and ada's for the next call)."""
        order = list(CHANNELS)
        n = 0
        end = self.t0 + self.p.seconds
        while True:
            await asyncio.sleep(self.p.reply_every)
            if time.perf_counter() >= end:
                return
            agent = self.agents[n % len(self.agents)]
            flow = self.flows[order[(n // len(self.agents)) % len(order)]]
            n += 1
            mine = [c for c, channel in agent.mine.items() if channel == flow.channel]
            choices = mine or list(agent.recent.get(flow.channel, ()))
            if not choices:
                continue
            conversation = self.rng.choice(choices)
            via = REPLY_VIA[flow.name]
            reply = Reply(n, flow.name, via, f"Soak reply {self.tag}-{n}: we are on it.")
            self.replies[n] = reply
            path = f"/api/v1/conversations/{conversation}"
            try:
                status, answer = await self.api(
                    pool, agent, f"{path}/replies", {"text": reply.text, "channel": via}
                )
            except Exception as exc:
                reply.error = f"{type(exc).__name__}: {exc}"
                continue
            if status != 202:
                reply.error = f"HTTP {status}: {answer[:200]!r}"
                continue
            reply.event_id = json.loads(answer)["event"]["id"]
            if not mine or self.rng.random() < 0.5:
                continue
            try:
                status, answer = await self.api(
                    pool, agent, f"{path}/status", {"status": "resolved"}
                )
            except Exception as exc:
                status, answer = 0, f"{type(exc).__name__}: {exc}".encode()
            if status == 200:
                self.outcome.resolved += 1
                agent.mine.pop(conversation, None)
            else:
                self.outcome.resolve_errors.append(f"HTTP {status}: {answer[:200]!r}")

    async def twilio_side(self) -> None:
        """The fake Twilio's half: each SMS the hub sent is "delivered" a moment later."""
        while True:
            await asyncio.sleep(1.0)
            self.check_replies()
            for message in list(self.fake.messages.values()):
                if message.sid in self._twilio_seen:
                    continue
                self._twilio_seen.add(message.sid)
                if not message.status_callback:
                    self.outcome.status_callback_errors.append(f"{message.sid}: no callback URL")
                    continue
                try:
                    status, text = await self.fake.send_status(message.sid, "delivered")
                except Exception as exc:
                    status, text = 0, f"{type(exc).__name__}: {exc}"
                if status == 200:
                    self.outcome.status_callbacks += 1
                else:
                    self.outcome.status_callback_errors.append(f"{status}: {text[:200]}")

    def check_replies(self) -> None:
        """Replies that reached the fake Twilio or the SMTP capture."""
        for message in self.fake.messages.values():
            self.reply_landed(message.body, CHANNELS["sms"])
        captured = self.smtp.messages
        while self._smtp_seen < len(captured):
            self.reply_landed(mail_text(captured[self._smtp_seen].raw), CHANNELS["email"])
            self._smtp_seen += 1

    async def sampler(self) -> None:
        end = self.t0 + self.p.seconds
        next_at = self.t0
        while next_at <= end:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            try:
                self.samples.append((self.elapsed(), self.hub.rss_kib()))
            except (OSError, RuntimeError) as exc:
                self.outcome.hub_died = f"hub process gone: {exc}"
                return
            next_at += self.p.sample_every

    async def progress(self) -> None:
        end = self.t0 + self.p.seconds
        while time.perf_counter() < end:
            await asyncio.sleep(min(self.p.progress_every, max(0.1, end - time.perf_counter())))
            self.check_replies()
            print(f"  [{self.elapsed():6.0f} s] {self.status_line()}", flush=True)

    def status_line(self) -> str:
        parts = []
        for flow in self.flows.values():
            seen = min(self.seen_count(flow, agent) for agent in self.agents)
            parts.append(f"{flow.name} {len(flow.acked)}/{len(flow.sent)} acked {seen} seen")
        rss = f"{self.samples[-1][1] / MIB:.1f} MiB" if self.samples else "-"
        replies = list(self.replies.values())
        done = sum(1 for r in replies if r.delivered)
        return f"{', '.join(parts)}; replies {done}/{len(replies)}; RSS {rss}"

    @staticmethod
    def seen_count(flow: Flow, agent: AgentSocket) -> int:
        return sum(1 for x in flow.sent if (flow.channel, x) in agent.seen)

    def outstanding(self) -> int:
        """Messages or replies not yet where they should be (0: everything arrived)."""
        self.check_replies()
        left = 0
        for flow in self.flows.values():
            left += max(0, len(flow.sent) - len(flow.acked) - flow.errors)
            for agent in self.agents:
                left += len(flow.sent) - self.seen_count(flow, agent)
        left += sum(1 for r in self.replies.values() if r.event_id and not r.delivered)
        return left

    # --- the whole run ---------------------------------------------------------------

    async def run(self) -> Outcome:
        port = self.hub.port
        pool = HttpPool(HOST, port, max_conns=64)
        api_pool = HttpPool(HOST, port, max_conns=4)
        self.twilio = Twilio(pool, port)
        for agent in self.agents:
            await agent.open(self.hub.url, port)
        web_flow = self.flows["web"]
        visitors = [
            Visitor(web_flow, lambda text: self.reply_landed(text, CHANNELS["web"]))
            for _ in range(self.p.visitors)
        ]
        opened = await gather_limited([v.open(port) for v in visitors], 50)
        failed = [o for o in opened if isinstance(o, BaseException)]
        if failed:
            raise RuntimeError(f"{len(failed)} visitor sockets failed to open: {failed[0]}")
        cpu_before = self.hub.cpu_seconds()
        self.t0 = time.perf_counter() + 0.1
        background = [
            asyncio.create_task(self.sampler()),
            asyncio.create_task(self.progress()),
            asyncio.create_task(self.twilio_side()),
        ]
        try:
            streams = [
                self.web(visitors),
                self.sms(self.twilio),
                self.calls(),
                self.mails(),
                self.replier(api_pool),
            ]
            await asyncio.gather(*streams)
            while self.tasks:  # calls and mails still under way
                await asyncio.gather(*tuple(self.tasks), return_exceptions=True)
            print(f"  traffic done at {self.elapsed():.0f} s; settling", flush=True)
            settle_start = time.perf_counter()
            while time.perf_counter() - settle_start < self.p.settle:
                if self.outstanding() == 0:
                    self.outcome.settled_in = time.perf_counter() - settle_start
                    break
                await asyncio.sleep(0.5)
            print(f"  [{self.elapsed():6.0f} s] {self.status_line()}", flush=True)
            self.outcome.hub_cpu = self.hub.cpu_seconds() - cpu_before
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            for visitor in visitors:
                if visitor.ws is not None:
                    visitor.ws.close()
            for agent in self.agents:
                if not agent.open_now:
                    self.outcome.notes.append(f"agent {agent.agent_id}'s socket was closed")
                if agent.ws is not None:
                    agent.ws.close()
            pool.close()
            api_pool.close()
            await asyncio.sleep(0.3)
        self.outcome.replies = [self.replies[n] for n in sorted(self.replies)]
        return self.outcome


async def drive(
    profile: Profile, hub: Server, smtp: Any, dovecot: Any, twilio_port: int, tag: str
) -> Outcome:
    from tests.twilio.fake_twilio import FakeTwilio

    fake = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN)
    await fake.start(twilio_port)
    try:
        return await Soak(profile, hub, smtp, fake, dovecot, tag).run()
    finally:
        await fake.close()


# --- accounting ----------------------------------------------------------------------------


def check_store(db: Path, outcome: Outcome) -> None:
    """Count what the SQLite file holds (read-only): each flow's messages, replies' states."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        for flow in outcome.flows.values():
            rows = conn.execute(
                "SELECT external_id FROM events WHERE channel = ? AND external_id IS NOT NULL",
                (flow.channel,),
            ).fetchall()
            stored = {r[0] for r in rows}
            flow.stored = sum(1 for x in flow.sent if x in stored)
            flow.missing_stored = [x for x in flow.sent if x not in stored][:5]
        ids = [r.event_id for r in outcome.replies if r.event_id]
        states: dict[str, str] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT id, delivery_state FROM events WHERE id IN ({marks})"
            states.update({row[0]: row[1] for row in conn.execute(query, chunk)})
        for reply in outcome.replies:
            if reply.event_id:
                reply.state = states.get(reply.event_id)


@dataclass
class LogScan:
    lines: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: collections.Counter[str] = field(default_factory=collections.Counter)


def scan_log(path: Path) -> LogScan:
    """Lines at level error/critical (JSON log lines), and any other line that looks like
    an error (a traceback, the stdlib logger's plain text)."""
    scan = LogScan()
    with path.open(errors="replace") as log:
        for line in log:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            scan.lines += 1
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                level = str(record.get("level", "")).lower()
                if level in ERROR_LEVELS:
                    scan.errors.append(line[:400])
                elif level == "warning":
                    scan.warnings[str(record.get("event", "?"))] += 1
            elif line.startswith("hub: serving on "):
                continue
            elif re.search(r"error|exception|traceback|critical", line, re.I):
                scan.errors.append(line[:400])
            else:
                scan.warnings[f"non-JSON line: {line[:60]}"] += 1
    return scan


def memory(
    samples: list[tuple[float, int]], profile: Profile
) -> tuple[float, float, float, list[int]]:
    """(median KiB right after the warm-up, median KiB over the last 10%, growth, all after
    the warm-up). Each window is 10% of the run, and at least three samples long."""
    window = max(0.1 * profile.seconds, 3 * profile.sample_every)
    after = [kib for t, kib in samples if profile.warmup <= t < profile.warmup + window]
    end = [kib for t, kib in samples if t >= profile.seconds - window]
    if not after or not end:
        return float("nan"), float("nan"), float("nan"), []
    base, last = statistics.median(after), statistics.median(end)
    return base, last, last / base - 1, [kib for t, kib in samples if t >= profile.warmup]


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def fmt_seen(flow: Flow, agents: Iterable[AgentSocket]) -> str:
    return " / ".join(f"{Soak.seen_count(flow, a):,}" for a in agents)


def report(
    outcome: Outcome, profile: Profile, scan: LogScan, exit_code: int | None, loads: list[str]
) -> int:
    flows, agents, replies = outcome.flows, outcome.agents, outcome.replies
    labels = {
        "web": f"web chat: {profile.web_rate:g} msg/s over {profile.visitors} widget sockets",
        "sms": f"SMS: signed webhooks, {profile.sms_rate:g}/s",
        "voice": f"voice: {profile.call_rate:g} call/s (ringing, dial result, voicemail, "
        "completed webhooks)",
        "email": f"email: {profile.mail_rate:g} mails/s APPENDed to Dovecot (IMAP IDLE)",
    }
    rows = []
    for name, flow in flows.items():
        mine = [r for r in replies if r.flow == name]
        via = REPLY_VIA[name]
        rows.append(
            [
                labels[name],
                f"{len(flow.sent):,}",
                f"{len(flow.acked):,}",
                f"{flow.stored:,}",
                fmt_seen(flow, agents),
                f"{len(mine):,}" + (f" (by {via})" if via != flow.channel else ""),
                f"{sum(1 for r in mine if r.delivered):,}",
            ]
        )
    total = sum(len(f.sent) for f in flows.values())
    rows.append(
        [
            "**total**",
            f"{total:,}",
            f"{sum(len(f.acked) for f in flows.values()):,}",
            f"{sum(f.stored for f in flows.values()):,}",
            " / ".join(f"{sum(Soak.seen_count(f, a) for f in flows.values()):,}" for a in agents),
            f"{len(replies):,}",
            f"{sum(1 for r in replies if r.delivered):,}",
        ]
    )
    agent_names = " / ".join(a.agent_id for a in agents)
    print_table(
        [
            "channel",
            "sent",
            "acknowledged",
            "stored",
            f"on agent sockets ({agent_names})",
            "agent replies",
            "replies delivered",
        ],
        rows,
    )
    print()

    base, last, growth, after = memory(outcome.samples, profile)
    window = max(0.1 * profile.seconds, 3 * profile.sample_every)
    grew = not (growth <= MEMORY_LIMIT)  # nan (no samples) counts as grown
    states = collections.Counter(r.state or "-" for r in replies if r.event_id)
    stored_total = sum(f.stored for f in flows.values())
    cpu_us = outcome.hub_cpu / max(1, stored_total) * 1e6
    warn = ", ".join(f"{k}: {v}" for k, v in scan.warnings.most_common(4))
    print_table(
        ["memory, log and process", "figure"],
        [
            [
                f"hub RSS right after warm-up (**baseline**: median of {profile.warmup:.0f}-"
                f"{profile.warmup + window:.0f} s)",
                f"{base / MIB:.1f} MiB",
            ],
            [
                f"hub RSS at the end (median of the last {window:.0f} s)",
                f"{last / MIB:.1f} MiB",
            ],
            [
                "growth: ratio end / baseline (limit +10%)",
                f"**{growth * 100:+.1f}%** ({last / base:.3f}): "
                + ("MISSED" if grew else "flat"),
            ],
            [
                "RSS min / max after warm-up",
                f"{min(after) / MIB:.1f} / {max(after) / MIB:.1f} MiB" if after else "-",
            ],
            ["RSS samples", f"{len(outcome.samples)}, every {profile.sample_every:g} s"],
            ["error lines in the hub's log (error, critical, tracebacks)", f"{len(scan.errors)}"],
            ["warning lines", f"{sum(scan.warnings.values())}" + (f" ({warn})" if warn else "")],
            ["log lines (JSON, level info)", f"{scan.lines:,}"],
            ["reply delivery states in the store", ", ".join(f"{k} {v}" for k, v in states.items())
             or "-"],
            ["SMS status callbacks posted by the fake Twilio (200)",
             f"{outcome.status_callbacks}"],
            ["conversations the agents resolved", f"{outcome.resolved}"],
            ["calls", ", ".join(f"{k} {v}" for k, v in outcome.calls.items()) or "-"],
            ["hub CPU during the run", f"{outcome.hub_cpu:.0f} s ({cpu_us:.0f} us per message)"],
            ["hub exit status (SIGTERM)", f"{exit_code}"],
            ["settled after the traffic in",
             f"{outcome.settled_in:.1f} s" if outcome.settled_in is not None
             else f"NOT within {profile.settle:.0f} s"],
            ["load average at start / end", f"{loads[0]} / {loads[1]}"],
        ],
    )  # fmt: skip
    trace_every = max(1, len(outcome.samples) // 12)
    trace = ", ".join(
        f"{int(t) // 60}:{int(t) % 60:02d} {kib / MIB:.0f}"
        for t, kib in outcome.samples[::trace_every]
    )
    print(f"\nRSS trace (m:ss MiB): {trace}")
    for note in outcome.notes:
        print(f"note: {note}")

    failures: list[str] = []
    for flow in flows.values():
        sent = len(flow.sent)
        if flow.errors:
            failures.append(
                f"{flow.name}: {flow.errors} refused or failed; first: {flow.first_error}"
            )
        if len(flow.acked) != sent or flow.stored != sent:
            failures.append(
                f"{flow.name}: sent {sent}, acknowledged {len(flow.acked)}, stored {flow.stored}"
                + (f"; not stored e.g. {flow.missing_stored}" if flow.missing_stored else "")
            )
        for agent in agents:
            seen = Soak.seen_count(flow, agent)
            if seen != sent:
                missing = [x for x in flow.sent if (flow.channel, x) not in agent.seen][:3]
                failures.append(
                    f"{flow.name}: sent {sent}, on {agent.agent_id}'s socket {seen}; e.g. {missing}"
                )
    for agent in agents:
        if agent.resyncs or agent.errors:
            failures.append(
                f"agent {agent.agent_id}: {agent.resyncs} resync frames, errors {agent.errors[:2]}"
            )
    for reply in replies:
        if reply.error:
            failures.append(f"reply {reply.n} ({reply.flow}) refused: {reply.error}")
        elif not reply.delivered or reply.state not in ("sent", "delivered"):
            failures.append(
                f"reply {reply.n} ({reply.flow} by {reply.via}): delivered {reply.delivered}, "
                f"stored state {reply.state}"
            )
    failures += [f"SMS status callback: {e}" for e in outcome.status_callback_errors[:3]]
    failures += [f"resolving a conversation: {e}" for e in outcome.resolve_errors[:3]]
    for line in scan.errors[:5]:
        # Quoted, not raised here: run_all takes that phrase for this script's own crash.
        failures.append(
            "logged: " + line.replace("Traceback (most recent", "traceback (most recent")
        )
    if len(scan.errors) > 5:
        failures.append(f"... and {len(scan.errors) - 5} more error lines in the log")
    if outcome.hub_died:
        failures.append(outcome.hub_died)
    if exit_code not in (0, -15):
        failures.append(f"the hub exited with {exit_code} on SIGTERM")
    print()
    for failure in failures[:30]:
        print(f"FAIL: {failure}")
    if len(failures) > 30:
        print(f"FAIL: ... and {len(failures) - 30} more")
    if grew:
        print(f"memory: grew {growth * 100:+.1f}% after warm-up, over the 10% limit")
    verdict = "OK" if not failures and not grew else "NOT OK"
    print(
        f"soak: {verdict}: {total:,} messages sent, {stored_total:,} stored, "
        f"{sum(1 for r in replies if r.delivered)}/{len(replies)} replies delivered, "
        f"RSS {growth * 100:+.1f}%, {len(scan.errors)} error lines"
    )
    return 1 if failures or grew else 0


# --- main --------------------------------------------------------------------------------


def make_profile(args: argparse.Namespace) -> Profile:
    quick = args.quick
    minutes = args.minutes if args.minutes is not None else (1.0 if quick else 30.0)
    seconds = minutes * 60
    warmup = 20.0 if quick else max(0.2 * seconds, 60.0)
    if warmup >= 0.8 * seconds:
        warmup = 0.2 * seconds  # short runs by hand: still leave room to compare
    return Profile(
        seconds=seconds,
        warmup=warmup,
        sample_every=args.sample_seconds or (2.0 if quick else 10.0),
        progress_every=15.0 if quick else 60.0,
        settle=args.settle or (60.0 if quick else 180.0),
        web_rate=args.web_rate,
        visitors=args.visitors,
        sms_rate=args.sms_rate,
        call_rate=args.call_rate,
        mail_rate=args.mail_rate,
        reply_every=args.reply_every,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke profile (1 minute)")
    parser.add_argument("--minutes", type=float, help="length of the traffic (30; quick: 1)")
    parser.add_argument("--web-rate", type=float, default=20.0, help="chat messages/s (20)")
    parser.add_argument("--visitors", type=int, default=50, help="visitor sockets (50)")
    parser.add_argument("--sms-rate", type=float, default=10.0, help="SMS webhooks/s (10)")
    parser.add_argument("--call-rate", type=float, default=1.0, help="incoming calls/s (1)")
    parser.add_argument("--mail-rate", type=float, default=2.0, help="mails/s (2)")
    parser.add_argument("--reply-every", type=float, default=2.0, help="s between replies (2)")
    parser.add_argument("--sample-seconds", type=float, help="RSS sampling period (10; quick: 2)")
    parser.add_argument("--settle", type=float, help="s to wait for stragglers (180; quick: 60)")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the hub's data here")
    args = parser.parse_args()
    profile = make_profile(args)

    from hub.passwords import hash_password
    from tests.servers.dovecot import PASSWORD, DovecotServer
    from tests.servers.smtp import SmtpServer

    binary = shutil.which("dovecot") or ("/usr/sbin/dovecot" if os.path.exists(
        "/usr/sbin/dovecot") else None)  # fmt: skip
    if binary is None:
        print("dovecot not installed (apt-get install dovecot-imapd)", file=sys.stderr)
        return 2
    print(f"machine: {machine_note()}; load average {load_average()}")
    print(
        f"profile: {'quick' if args.quick else 'full'}, {profile.seconds / 60:g} min of traffic: "
        f"web chat {profile.web_rate:g}/s over {profile.visitors} sockets, SMS "
        f"{profile.sms_rate:g}/s, calls {profile.call_rate:g}/s, mail {profile.mail_rate:g}/s, "
        f"a reply every {profile.reply_every:g} s; warm-up {profile.warmup:.0f} s, RSS every "
        f"{profile.sample_every:g} s",
        flush=True,
    )
    tag = os.urandom(3).hex()
    loads = [load_average()]
    with contextlib.ExitStack() as stack:
        if args.keep:
            data_dir = args.keep.resolve()
            data_dir.mkdir(parents=True, exist_ok=True)
        else:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hub-soak-")))
        dovecot = DovecotServer(binary)
        stack.callback(dovecot.cleanup)
        dovecot.start()
        smtp = SmtpServer()
        smtp.start()
        stack.callback(smtp.stop)
        port, twilio_port = free_port(), free_port()
        config = data_dir / "hub.yaml"
        text = hub_yaml(
            data_dir,
            port,
            f"http://{HOST}:{twilio_port}",
            (dovecot.port, PASSWORD),
            smtp.port,
            hash_password(AGENT_PASSWORD),
        )
        config.write_text(text)
        log_path = data_dir / "hub.log"
        hub = LoggedHub(config, port, log_path)
        stack.callback(hub._log.close)
        hub.start(timeout=60)
        try:
            outcome = asyncio.run(drive(profile, hub, smtp, dovecot, twilio_port, tag))
        finally:
            exit_code = hub.stop()
        loads.append(load_average())
        check_store(data_dir / "hub.db", outcome)
        scan = scan_log(log_path)
        print()
        code = report(outcome, profile, scan, exit_code, loads)
        if args.keep:
            print(f"hub data, config and log kept in {data_dir}")
        return code


if __name__ == "__main__":
    sys.exit(main())
