"""The one configuration schema: YAML in, frozen settings out, every mistake reported at once.

The file is composed (not loaded) with PyYAML so that every value keeps its line number;
the schema below walks that node tree. Each section is a table of `_F` fields (key, reader,
default) plus a small build function for rules that span several keys. Names that other
parts refer to (channels, queues, skills, agents, business hours) are declared while reading
and the references are checked at the end, so a typo in one place never hides another.

Interpolation: `${VAR}` and `${VAR:-default}` are replaced from the environment inside
string scalars, so that secrets never need to sit in the file; `$$` is a literal `$`, and a
`$` followed by anything else is kept as is (argon2 hashes contain many). After
interpolation an unquoted scalar is typed again, so `port: ${PORT:-8080}` is an integer.

Relative paths (hub.data_dir, storage.path) are resolved against the current working
directory (the `base_dir` argument of `parse_config`), not the file's directory: that is
what a user typing `hub serve --config conf/hub.yaml` in a shell expects.
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import argon2
import phonenumbers
import yaml
from argon2.exceptions import InvalidHashError

from hub.identities import InvalidIdentity, normalize_email, normalize_phone
from hub.model import Agent, ChannelType, Role

__all__ = [
    "DEFAULT_CAPACITY",
    "WEBHOOK_EVENTS",
    "Agent",
    "BusinessHours",
    "ChannelConfig",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "CsatSettings",
    "EmailChannel",
    "HubSettings",
    "ImapSettings",
    "IvrOption",
    "QueueConfig",
    "QueueMatch",
    "RoutingSettings",
    "SegmentConfig",
    "SlaPolicy",
    "SlaSettings",
    "SmsChannel",
    "SmtpSettings",
    "StorageSettings",
    "TwilioSettings",
    "VoiceChannel",
    "WebchatChannel",
    "WebhookConfig",
    "demo_config",
    "load_config",
    "parse_config",
    "parse_duration",
]

# ---------------------------------------------------------------------------------------
# Errors


class ConfigIssue(NamedTuple):
    path: str  # e.g. "channels[2].twilio.auth_token"; "" for file-level problems
    line: int | None  # 1-based
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.path}: {self.message}" if self.path else f"{where}{self.message}"

    def located(self, source: str) -> str:
        """The issue as an editor-clickable `file:line: path: message`."""
        where = f"{source}:{self.line}: " if self.line is not None else f"{source}: "
        return f"{where}{self.path}: {self.message}" if self.path else f"{where}{self.message}"


class ConfigError(Exception):
    """Every problem found in one configuration, one line each in `str(err)`."""

    def __init__(self, issues: Sequence[ConfigIssue], source: str) -> None:
        self.issues = list(issues)
        self.source = source
        super().__init__("\n".join(issue.located(source) for issue in self.issues))


# ---------------------------------------------------------------------------------------
# The settings


DEFAULT_CAPACITY: Mapping[str, int] = {"voice": 1, "webchat": 3, "sms": 5, "email": 10}


@dataclass(frozen=True)
class HubSettings:
    public_url: str = "http://127.0.0.1:8080"  # no trailing slash
    host: str = "127.0.0.1"
    port: int = 8080
    default_region: str = "US"  # for phone numbers written without +country code
    data_dir: Path = Path("data")  # absolute after loading
    log_level: str = "info"
    max_body_bytes: int = 1_048_576
    # GET /metrics without a token (operators' scrapers); False: a supervisor's token.
    metrics_public: bool = True


@dataclass(frozen=True)
class StorageSettings:
    backend: Literal["sqlite", "redis"] = "sqlite"
    path: Path = Path("data/hub.db")  # sqlite file; data_dir/hub.db after loading
    url: str | None = None  # redis://, rediss:// or unix://; required for redis
    cluster: bool = False
    # What the operator expects Redis persistence to guarantee (checked at start-up).
    durability: Literal["always", "everysec", "none"] = "always"


@dataclass(frozen=True)
class TwilioSettings:
    account_sid: str
    auth_token: str
    api_base_url: str | None = None  # lets tests point the client at a loopback server


@dataclass(frozen=True, kw_only=True)
class WebchatChannel:
    name: str
    type: ChannelType = ChannelType.WEBCHAT
    allowed_origins: tuple[str, ...] = ()  # empty: any origin may embed the widget
    identity_secret: str | None = None  # HMAC key with which a website vouches for a user
    max_message_chars: int = 4000
    rate_limit_per_minute: int = 30
    offline_email_channel: str | None = None  # name of an email channel
    title: str = "Chat with us"


@dataclass(frozen=True, kw_only=True)
class SmsChannel:
    name: str
    type: ChannelType = ChannelType.SMS
    phone_number: str  # E.164
    twilio: TwilioSettings
    max_media_bytes: int = 5_242_880


@dataclass(frozen=True)
class IvrOption:
    digit: str  # one of 0-9
    label: str
    queue: str


@dataclass(frozen=True, kw_only=True)
class VoiceChannel:
    name: str
    type: ChannelType = ChannelType.VOICE
    phone_number: str  # E.164
    twilio: TwilioSettings
    greeting: str = "Thank you for calling."
    ivr: tuple[IvrOption, ...] = ()
    ring_timeout_seconds: int = 20
    voicemail: bool = True
    record_calls: bool = False


@dataclass(frozen=True, kw_only=True)
class ImapSettings:
    host: str
    port: int = 993
    username: str
    password: str
    tls: Literal["ssl", "starttls", "none"] = "ssl"
    mailbox: str = "INBOX"
    idle: bool = True
    poll_seconds: int = 60
    after_processing: Literal["leave", "seen", "move"] = "leave"
    move_to: str | None = None  # mailbox; required when after_processing is "move"


@dataclass(frozen=True, kw_only=True)
class SmtpSettings:
    host: str
    port: int = 587
    username: str | None = None
    password: str | None = None
    tls: Literal["ssl", "starttls", "none"] = "starttls"


@dataclass(frozen=True, kw_only=True)
class EmailChannel:
    name: str
    type: ChannelType = ChannelType.EMAIL
    address: str  # normalized (case-folded)
    display_name: str | None = None
    imap: ImapSettings
    smtp: SmtpSettings
    max_attachment_bytes: int = 10_485_760


ChannelConfig = WebchatChannel | SmsChannel | VoiceChannel | EmailChannel


@dataclass(frozen=True)
class QueueMatch:
    """Which conversations a queue takes: all-of across fields, any-of within one; empty
    fields match everything."""

    channel_types: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    customer_tags: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueueConfig:
    name: str
    match: QueueMatch = QueueMatch()
    skills: tuple[str, ...] = ()
    priority: int = 0
    strategy: Literal["round_robin", "least_busy", "longest_idle"] = "round_robin"
    business_hours: str | None = None  # name of a BusinessHours entry
    after_hours: Literal["queue", "auto_reply", "voicemail"] = "queue"
    after_hours_message: str | None = None
    require_accept: bool = False
    offer_timeout_seconds: int = 30
    max_offers: int = 3
    fallback: str | None = None  # another queue's name
    agents: tuple[str, ...] = ()  # restrict to these agent ids; empty: anyone with the skills


@dataclass(frozen=True)
class RoutingSettings:
    skills: tuple[str, ...] = ()
    # Never empty after loading: with no queues configured there is one named "default".
    queues: tuple[QueueConfig, ...] = ()
    default_queue: str = "default"
    sticky_window_seconds: int = 604_800
    away_grace_seconds: int = 60
    requeue_after_seconds: int = 300
    call_blocks_chat: bool = False


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class BusinessHours:
    name: str
    timezone: str  # a zoneinfo key
    # Every weekday key is present; () is closed. An end of time.max means "24:00".
    weekly: Mapping[str, tuple[tuple[time, time], ...]]
    holidays: tuple[date, ...] = ()

    def is_open(self, at: datetime) -> bool:
        """Whether `at` (naive means UTC) falls in these hours, in their own time zone."""
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        local = at.astimezone(ZoneInfo(self.timezone))
        if local.date() in self.holidays:
            return False
        now = local.time().replace(tzinfo=None)
        return any(
            start <= now and (now < end or end == time.max)
            for start, end in self.weekly.get(WEEKDAYS[local.weekday()], ())
        )


SLA_TARGETS = ("first_response", "next_response", "resolution")


@dataclass(frozen=True)
class SlaPolicy:
    """Response and resolution targets (seconds) for some queues; None: no such target."""

    name: str
    # Empty: every queue that no other policy names (at most one policy is such a default).
    queues: tuple[str, ...] = ()
    first_response: int | None = None
    next_response: int | None = None
    resolution: int | None = None
    # "calendar" (every hour counts), "queue" (the conversation's queue's business hours,
    # calendar when it has none), or the name of a business_hours entry.
    business_hours: str = "calendar"
    pause_while_pending: bool = True
    # Warn this long before a breach; None: when 80% of the target has passed.
    warn_before: int | None = None

    def target(self, sla: str) -> int | None:
        value: int | None = getattr(self, sla)
        return value


@dataclass(frozen=True)
class SlaSettings:
    policies: tuple[SlaPolicy, ...] = ()
    check_every_seconds: int = 30

    def policy_for(self, queue: str | None) -> SlaPolicy | None:
        """The policy naming `queue`, else the default policy (one without queues)."""
        fallback = None
        for policy in self.policies:
            if queue is not None and queue in policy.queues:
                return policy
            if not policy.queues and fallback is None:
                fallback = policy
        return fallback


DEFAULT_CSAT_QUESTION = (
    "How did we do? Reply with a number from 1 (poor) to 5 (excellent), and a comment if you like."
)


@dataclass(frozen=True)
class CsatSettings:
    enabled: bool = False
    # Channel names a survey may be sent on; empty: every text channel (not voice).
    channels: tuple[str, ...] = ()
    question: str = DEFAULT_CSAT_QUESTION
    delay_seconds: int = 60  # after the conversation is resolved
    window_seconds: int = 259_200  # how long an answer is taken as one (3 days)


# What an outgoing webhook may subscribe to (docs/webhooks.md); "*" is everything.
WEBHOOK_EVENTS = (
    "message.received",
    "message.sent",
    "message.delivery",
    "note.created",
    "call",
    "voicemail",
    "conversation.status",
    "conversation.assigned",
    "customer.merged",
    "csat.received",
    "sla.warning",
    "sla.breach",
    "*",
)


@dataclass(frozen=True)
class WebhookConfig:
    name: str
    url: str
    events: tuple[str, ...]
    secret: str  # HMAC-SHA256 key of the Hub-Webhook-Signature header
    timeout_seconds: int = 10
    max_attempts: int = 20

    def wants(self, event_type: str) -> bool:
        return "*" in self.events or event_type in self.events


@dataclass(frozen=True)
class SegmentConfig:
    """A saved filter over customers: every given field must hold; within a list, any
    value may (like queue match rules)."""

    name: str
    tags: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()  # channel names the customer contacted us on
    channel_types: tuple[str, ...] = ()
    last_contact_within: int | None = None  # seconds since the customer's last contact
    csat_at_most: int | None = None  # their latest CSAT score is this or lower
    has_open_conversation: bool | None = None  # an active (not resolved) conversation


@dataclass(frozen=True)
class Config:
    hub: HubSettings
    storage: StorageSettings
    channels: tuple[ChannelConfig, ...]
    agents: tuple[Agent, ...]
    routing: RoutingSettings
    business_hours: tuple[BusinessHours, ...]
    source: str = "<config>"
    sla: SlaSettings = SlaSettings()
    csat: CsatSettings = CsatSettings()
    webhooks: tuple[WebhookConfig, ...] = ()
    segments: tuple[SegmentConfig, ...] = ()

    def channel(self, name: str) -> ChannelConfig:
        for channel in self.channels:
            if channel.name == name:
                return channel
        raise KeyError(name)

    def agent(self, agent_id: str) -> Agent:
        for agent in self.agents:
            if agent.id == agent_id:
                return agent
        raise KeyError(agent_id)

    def agent_by_login(self, login: str) -> Agent | None:
        wanted = login.casefold()
        return next((a for a in self.agents if a.login.casefold() == wanted), None)

    def queue(self, name: str) -> QueueConfig:
        for queue in self.routing.queues:
            if queue.name == name:
                return queue
        raise KeyError(name)

    def hours(self, name: str) -> BusinessHours:
        for hours in self.business_hours:
            if hours.name == name:
                return hours
        raise KeyError(name)

    def segment(self, name: str) -> SegmentConfig:
        for segment in self.segments:
            if segment.name == name:
                return segment
        raise KeyError(name)


# ---------------------------------------------------------------------------------------
# Entry points


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML file; raises ConfigError listing every problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue("", None, "not UTF-8 text")], source) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError([ConfigIssue("", None, f"cannot read: {reason}")], source) from None
    return parse_config(text, source, env)


def parse_config(
    text: str,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Config:
    """Validate YAML text. Relative paths resolve against `base_dir` (default: the cwd)."""
    return _parse(text, source, os.environ if env is None else env, base_dir, None)


def demo_config(data_dir: Path, env: Mapping[str, str] | None = None) -> Config:
    """The built-in demo (hub/demo/demo.yaml) with everything stored under `data_dir`.

    Its agent's password hash comes from HUB_DEMO_PASSWORD_HASH in `env`.
    """
    text = resources.files("hub").joinpath("demo/demo.yaml").read_text(encoding="utf-8")
    return _parse(text, "hub/demo/demo.yaml", os.environ if env is None else env, None, data_dir)


def parse_duration(text: str) -> int:
    """Seconds in "45s", "30m", "12h", "7d" or combinations like "1h30m"; ValueError if not."""
    compact = text.strip().replace(" ", "")
    if not compact or not _DURATION.fullmatch(compact):
        raise ValueError(f"not a duration: {text!r}")
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(compact))


_DURATION = re.compile(r"(?:\d+[smhd])+")
_DURATION_PART = re.compile(r"(\d+)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# ---------------------------------------------------------------------------------------
# Reading YAML nodes with their lines

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
# Tags a value may carry; anything else (!!python/..., custom tags) is refused.
_PLAIN_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "timestamp")
)


class _Invalid:
    """The value of anything that failed validation (its issue is already recorded)."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID: Any = _Invalid()
_REQUIRED: Any = object()
_SECTION: Any = object()  # default: read the field as an empty mapping, so its defaults apply


class _Bad(Exception):
    """A value check failed; the message becomes the issue's message."""


class _Site(NamedTuple):
    path: str
    line: int | None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Ctx:
    """State of one validation run: issues, declared names, pending references."""

    def __init__(self, env: Mapping[str, str], base_dir: Path, data_dir: Path | None) -> None:
        self.env = env
        self.base_dir = base_dir
        self.data_dir_override = data_dir
        self.issues: list[ConfigIssue] = []
        self.region: str | None = "US"
        self.data_dir = base_dir / "data"
        self.symbols: dict[str, dict[str, _Site]] = {}
        self.refs: list[tuple[str, str, _Site]] = []
        self.channel_types: dict[str, str] = {}
        self.fallbacks: list[tuple[int, str, str, _Site]] = []
        # Keyed by id(node); each entry also holds the node so the id stays unique.
        self._owner_lines: dict[int, tuple[yaml.Node, int | None]] = {}
        self._scalars: dict[int, tuple[yaml.Node, tuple[str, str] | _Invalid]] = {}
        self._mappings: dict[int, tuple[yaml.Node, dict[str, tuple[yaml.Node, yaml.Node]]]] = {}
        self._resolver = yaml.resolver.Resolver()

    def error(self, path: str, line: int | None, message: str) -> Any:
        self.issues.append(ConfigIssue(path, line, message))
        return INVALID

    def line(self, node: yaml.Node) -> int | None:
        if node.start_mark is not None:
            return int(node.start_mark.line) + 1
        return self.owner_line(node)

    def owner_line(self, node: yaml.Node) -> int | None:
        """The line of the key that introduced `node`: where a missing key is reported."""
        entry = self._owner_lines.get(id(node))
        if entry is not None:
            return entry[1]
        return int(node.start_mark.line) + 1 if node.start_mark is not None else None

    def synthetic_mapping(self, line: int | None) -> yaml.MappingNode:
        node = yaml.MappingNode(_MAP, [], None, None)
        self._owner_lines[id(node)] = (node, line)
        return node

    def scalar(self, node: yaml.Node, path: str) -> tuple[str, str] | _Invalid:
        """(tag, text) of a scalar after interpolation, once per node (aliases share nodes)."""
        cached = self._scalars.get(id(node))
        if cached is None:
            cached = (node, self._resolve_scalar(node, path))
            self._scalars[id(node)] = cached
        return cached[1]

    def _resolve_scalar(self, node: yaml.Node, path: str) -> tuple[str, str] | _Invalid:
        assert isinstance(node, yaml.ScalarNode)
        tag, text = node.tag, node.value
        if tag not in _PLAIN_TAGS:
            return self.error(path, self.line(node), f"unsupported YAML tag {tag}")
        if tag != _STR or "$" not in text:
            return tag, text
        try:
            text = _interpolate(text, self.env)
        except _Bad as exc:
            return self.error(path, self.line(node), str(exc))
        if node.style is None and node.value != text:
            # Unquoted: type the substituted text as if it had been written there.
            tag = self._resolver.resolve(yaml.ScalarNode, text, (True, False))
        return tag, text

    def is_null(self, node: yaml.Node, path: str) -> bool:
        if not isinstance(node, yaml.ScalarNode):
            return False
        resolved = self.scalar(node, path)
        return not isinstance(resolved, _Invalid) and resolved[0] == _NULL

    def mapping(
        self, node: yaml.Node, path: str
    ) -> dict[str, tuple[yaml.Node, yaml.Node]] | _Invalid:
        """key -> (key node, value node), with `<<` merges applied and duplicates reported."""
        if not isinstance(node, yaml.MappingNode):
            return self.error(path, self.line(node), "must be a mapping")
        if node.tag != _MAP:
            return self.error(path, self.line(node), f"unsupported YAML tag {node.tag}")
        cached = self._mappings.get(id(node))
        if cached is not None:
            return cached[1]
        items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        merged: list[tuple[str, tuple[yaml.Node, yaml.Node]]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merged.extend(self._merge_sources(value_node, path))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.error(path, self.line(key_node), "keys must be plain names")
                continue
            key = key_node.value
            self._owner_lines.setdefault(id(value_node), (value_node, self.line(key_node)))
            if key in items:
                first = self.line(items[key][0])
                self.error(
                    _join(path, key), self.line(key_node), f"duplicate key (first at line {first})"
                )
                continue
            items[key] = (key_node, value_node)
        for key, pair in merged:
            items.setdefault(key, pair)  # explicit keys win over merged ones
        self._mappings[id(node)] = (node, items)
        return items

    def _merge_sources(
        self, node: yaml.Node, path: str
    ) -> list[tuple[str, tuple[yaml.Node, yaml.Node]]]:
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        pairs: list[tuple[str, tuple[yaml.Node, yaml.Node]]] = []
        for source in sources:
            items = self.mapping(source, _join(path, "<<"))
            if not isinstance(items, _Invalid):
                pairs.extend(items.items())
        return pairs

    def declare(self, kind: str, name: str, site: _Site, key: str | None = None) -> bool:
        table = self.symbols.setdefault(kind, {})
        key = name if key is None else key
        if key in table:
            first = table[key]
            what = _KINDS[kind][2]
            self.error(
                site.path,
                site.line,
                f"duplicate {what} {name!r} (first at {first.path}, line {first.line})",
            )
            return False
        table[key] = site
        return True

    def refer(self, kind: str, name: str, site: _Site) -> None:
        self.refs.append((kind, name, site))


# kind -> (one, many, what a duplicate is) for messages about declared names.
_KINDS = {
    "channel": ("channel", "channels", "channel name"),
    "email_channel": ("email channel", "email channels", "channel name"),
    "skill": ("skill", "skills", "skill"),
    "queue": ("queue", "queues", "queue name"),
    "agent": ("agent", "agents", "agent id"),
    "login": ("login", "logins", "login"),
    "hours": ("business hours", "business hours", "business hours name"),
    "sla_policy": ("SLA policy", "SLA policies", "SLA policy name"),
    "sla_queue": ("SLA queue", "SLA queues", "SLA queue"),
    "webhook": ("webhook", "webhooks", "webhook name"),
    "segment": ("segment", "segments", "segment name"),
}


def _interpolate(text: str, env: Mapping[str, str]) -> str:
    out: list[str] = []
    i = 0
    while (j := text.find("$", i)) >= 0:
        out.append(text[i:j])
        after = text[j + 1 : j + 2]
        if after == "$":
            out.append("$")
            i = j + 2
        elif after == "{":
            end = text.find("}", j + 2)
            if end < 0:
                raise _Bad("unterminated ${ (write $$ for a literal $)")
            out.append(_substitute(text[j + 2 : end], env))
            i = end + 1
        else:
            out.append("$")
            i = j + 1
    out.append(text[i:])
    return "".join(out)


_REFERENCE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


def _substitute(body: str, env: Mapping[str, str]) -> str:
    match = _REFERENCE.fullmatch(body)
    if not match:
        raise _Bad(f"invalid reference ${{{body}}} (write ${{VAR}} or ${{VAR:-default}})")
    name, default = match.group(1), match.group(2)
    if default is not None and "${" in default:
        raise _Bad(f"${{{name}:-...}}: a default cannot contain another ${{...}}")
    value = env.get(name)
    # Like the shell's ${VAR:-default}: an empty variable also takes the default.
    if value is None or (value == "" and default is not None):
        if default is None:
            raise _Bad(f"environment variable {name} is not set")
        return default.replace("$$", "$")
    return value


# ---------------------------------------------------------------------------------------
# Readers: (ctx, node, path) -> value, or INVALID after recording why

Reader = Callable[[_Ctx, yaml.Node, str], Any]
Check = Callable[[str], Any]  # raises _Bad(message); returns the (normalized) value


def _text(check: Check | None = None, *, allow_empty: bool = False) -> Reader:
    """Any scalar, as written (so `password: 0123` stays "0123"), optionally checked."""

    def read(ctx: _Ctx, node: yaml.Node, path: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return ctx.error(path, ctx.line(node), "must be a string")
        resolved = ctx.scalar(node, path)
        if isinstance(resolved, _Invalid):
            return INVALID
        tag, text = resolved
        if tag == _NULL:
            return ctx.error(path, ctx.line(node), "must be a string")
        if not text and not allow_empty:
            return ctx.error(path, ctx.line(node), "must not be empty")
        if check is None:
            return text
        try:
            return check(text)
        except _Bad as exc:
            return ctx.error(path, ctx.line(node), str(exc))

    return read


_CONSTRUCTOR = yaml.constructor.SafeConstructor()


def _typed(ctx: _Ctx, node: yaml.Node, path: str, want: str, tag: str) -> Any:
    if isinstance(node, yaml.ScalarNode):
        resolved = ctx.scalar(node, path)
        if isinstance(resolved, _Invalid):
            return INVALID
        if resolved[0] == tag:
            return _CONSTRUCTOR.construct_object(yaml.ScalarNode(tag, resolved[1]))
    return ctx.error(path, ctx.line(node), want)


def _int(lo: int | None = None, hi: int | None = None) -> Reader:
    def read(ctx: _Ctx, node: yaml.Node, path: str) -> Any:
        value = _typed(ctx, node, path, "must be an integer", _INT)
        return value if isinstance(value, _Invalid) else _bounded(ctx, node, path, value, lo, hi)

    return read


def _bounded(
    ctx: _Ctx, node: yaml.Node, path: str, value: int, lo: int | None, hi: int | None
) -> Any:
    if lo is not None and hi is not None and not lo <= value <= hi:
        return ctx.error(path, ctx.line(node), f"must be between {lo} and {hi}")
    if lo is not None and value < lo:
        return ctx.error(path, ctx.line(node), f"must be >= {lo}")
    if hi is not None and value > hi:
        return ctx.error(path, ctx.line(node), f"must be <= {hi}")
    return value


def _bool(ctx: _Ctx, node: yaml.Node, path: str) -> Any:
    return _typed(ctx, node, path, "must be true or false", _BOOL)


def _duration(lo: int = 0) -> Reader:
    """Seconds: an integer, or a string like "45s", "30m", "12h", "7d", "1h30m"."""

    def read(ctx: _Ctx, node: yaml.Node, path: str) -> Any:
        want = "must be a number of seconds or a duration like 45s, 30m, 12h, 7d"
        if not isinstance(node, yaml.ScalarNode):
            return ctx.error(path, ctx.line(node), want)
        resolved = ctx.scalar(node, path)
        if isinstance(resolved, _Invalid):
            return INVALID
        tag, text = resolved
        if tag == _INT:
            return _int(lo)(ctx, node, path)
        try:
            seconds = parse_duration(text) if tag == _STR else None
        except ValueError:
            seconds = None
        if seconds is None:
            return ctx.error(path, ctx.line(node), want)
        return _bounded(ctx, node, path, seconds, lo, None)

    return read


def _enum(*choices: str, fold: bool = False) -> Reader:
    def check(text: str) -> str:
        value = text.lower() if fold else text
        if value not in choices:
            raise _Bad(f"must be one of: {', '.join(choices)}")
        return value

    return _text(check, allow_empty=True)


def _list(item: Reader, *, unique: str | None = None) -> Reader:
    """A sequence of `item`s as a tuple; `unique` names an attribute that must not repeat."""

    def read(ctx: _Ctx, node: yaml.Node, path: str) -> Any:
        if not isinstance(node, yaml.SequenceNode):
            return ctx.error(path, ctx.line(node), "must be a list")
        if node.tag != _SEQ:
            return ctx.error(path, ctx.line(node), f"unsupported YAML tag {node.tag}")
        values = []
        seen: dict[Any, str] = {}
        for index, child in enumerate(node.value):
            child_path = f"{path}[{index}]"
            value = item(ctx, child, child_path)
            values.append(value)
            if unique is None or isinstance(value, _Invalid):
                continue
            key = getattr(value, unique)
            if key in seen:
                items = ctx.mapping(child, child_path)
                at = items[unique][1] if isinstance(items, dict) and unique in items else child
                ctx.error(
                    _join(child_path, unique),
                    ctx.line(at),
                    f"duplicate {unique} {key!r} (first at {seen[key]})",
                )
                values[-1] = INVALID
            else:
                seen[key] = child_path
        if any(isinstance(v, _Invalid) for v in values):
            return INVALID
        return tuple(values)

    return read


def _declared(kind: str, reader: Reader, *, fold: bool = False) -> Reader:
    """A name others may refer to; a second use of it is reported where it repeats."""

    def read(ctx: _Ctx, node: yaml.Node, path: str) -> Any:
        value = reader(ctx, node, path)
        if isinstance(value, _Invalid):
            return value
        key = value.casefold() if fold else value
        if not ctx.declare(kind, value, _Site(path, ctx.line(node)), key):
            return INVALID
        return value

    return read


def _ref(kind: str, reader: Reader | None = None) -> Reader:
    """A name declared elsewhere; checked once the whole file has been read."""
    inner = reader or _text()

    def read(ctx: _Ctx, node: yaml.Node, path: str) -> Any:
        value = inner(ctx, node, path)
        if not isinstance(value, _Invalid):
            ctx.refer(kind, value, _Site(path, ctx.line(node)))
        return value

    return read


@dataclass(frozen=True)
class _F:
    """One key of a mapping: how to read it and what it defaults to."""

    key: str
    read: Reader
    default: Any = _REQUIRED
    required_hint: str = ""


class _Values:
    """The fields read from one mapping, with where each came from, for build functions."""

    def __init__(self, ctx: _Ctx, node: yaml.Node, path: str) -> None:
        self.ctx, self.node, self.path = ctx, node, path
        self.values: dict[str, Any] = {}
        self.key_nodes: dict[str, yaml.Node] = {}

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def ok(self, *keys: str) -> bool:
        return not any(isinstance(self.values[k], _Invalid) for k in keys)

    def site(self, key: str) -> _Site:
        """Where `key` is written (its key's line), or where it is missing from."""
        node = self.key_nodes.get(key)
        line = self.ctx.line(node) if node is not None else self.ctx.owner_line(self.node)
        return _Site(_join(self.path, key), line)

    def fail(self, key: str, message: str, *, near: str | None = None) -> None:
        """Record a problem with `key`; if `key` is absent, point at `near`, the key that
        made it necessary."""
        site = self.site(key)
        if key not in self.key_nodes and near is not None:
            site = _Site(site.path, self.site(near).line)
        self.values[key] = self.ctx.error(site.path, site.line, message)

    def make(self, cls: Callable[..., Any], **overrides: Any) -> Any:
        """`cls` of the values (overrides replace some), or INVALID if any failed."""
        if any(isinstance(v, _Invalid) for v in (*self.values.values(), *overrides.values())):
            return INVALID
        return cls(**{**self.values, **overrides})


def _read_fields(
    ctx: _Ctx, node: yaml.Node, path: str, fields: Sequence[_F], *, strict: bool = True
) -> _Values | _Invalid:
    items = ctx.mapping(node, path)
    if isinstance(items, _Invalid):
        return INVALID
    known = [f.key for f in fields]
    if strict:
        for key, (key_node, _) in items.items():
            if key not in known:
                ctx.error(_join(path, key), ctx.line(key_node), _unknown_key(key, known))
    out = _Values(ctx, node, path)
    for f in fields:
        sub = _join(path, f.key)
        pair = items.get(f.key)
        if pair is not None:
            out.key_nodes[f.key] = pair[0]
        if pair is not None and not ctx.is_null(pair[1], sub):
            out.values[f.key] = f.read(ctx, pair[1], sub)
            continue
        # Absent or empty: an empty value's own mark can point past its line, so use the key's.
        line = ctx.line(pair[0]) if pair is not None else ctx.owner_line(node)
        if f.default is _REQUIRED:
            out.values[f.key] = ctx.error(sub, line, "required" + f.required_hint)
        elif f.default is _SECTION:
            out.values[f.key] = f.read(ctx, ctx.synthetic_mapping(line), sub)
        else:
            out.values[f.key] = f.default
    return out


def _unknown_key(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return f"unknown key (expected one of: {', '.join(known)})"


def _section(fields: Sequence[_F], build: Callable[[_Values], Any]) -> Reader:
    def read(ctx: _Ctx, node: yaml.Node, path: str) -> Any:
        values = _read_fields(ctx, node, path, fields)
        return INVALID if isinstance(values, _Invalid) else build(values)

    return read


# ---------------------------------------------------------------------------------------
# Value checks

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
_AGENT_ID = re.compile(r"[a-z0-9][a-z0-9_.-]{0,39}")
_LANGUAGE = re.compile(r"[a-z]{2,3}(-[a-z0-9]{2,8})*")
_RANGE = re.compile(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})")


def _pattern(regex: re.Pattern[str], message: str) -> Check:
    def check(text: str) -> str:
        if not regex.fullmatch(text):
            raise _Bad(message)
        return text

    return check


_name = _text(_pattern(_NAME, "must be 1-40 characters of a-z 0-9 _ -, starting with a-z or 0-9"))
_agent_id = _text(
    _pattern(_AGENT_ID, "must be 1-40 characters of a-z 0-9 _ . -, starting with a-z or 0-9")
)


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise _Bad("must be an http(s) URL like https://hub.example.com")
    return text.rstrip("/")


def _origin(text: str) -> str:
    if text == "*":
        return text
    parts = urlsplit(text)
    bad = parts.scheme not in ("http", "https") or not parts.hostname or parts.username
    if bad or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _Bad("must be an origin like https://example.com (scheme and host, no path) or *")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def _redis_url(text: str) -> str:
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise _Bad("must start with redis://, rediss:// or unix://")
    return text


def _region(text: str) -> str:
    code = text.upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise _Bad("must be a supported region code (ISO 3166 alpha-2) like US, GB, FR")
    return code


def _email(text: str) -> str:
    try:
        return normalize_email(text)
    except InvalidIdentity as exc:
        raise _Bad(str(exc)) from None


def _phone(ctx: _Ctx, node: yaml.Node, path: str) -> Any:
    text = _text()(ctx, node, path)
    if isinstance(text, _Invalid):
        return text
    if ctx.region is None and not text.strip().startswith("+"):
        return INVALID  # hub.default_region is already reported; nothing to read it with
    try:
        return normalize_phone(text, ctx.region)
    except InvalidIdentity:
        return ctx.error(
            path,
            ctx.line(node),
            f"not a valid phone number: {text!r} (write +14155550100, "
            f"or a national number of region {ctx.region})",
        )


def _twilio_sid(text: str) -> str:
    if not text.startswith("AC"):
        raise _Bad("must be a Twilio account SID (starts with AC)")
    return text


def _argon2_hash(text: str) -> str:
    hint = " (run `hub hash-password` to make one)"
    if not text.startswith("$argon2id$"):
        raise _Bad("must be an argon2id hash" + hint)
    try:
        argon2.extract_parameters(text)
    except InvalidHashError:
        raise _Bad("is not a well-formed argon2id hash" + hint) from None
    return text


def _digit(text: str) -> str:
    if len(text) != 1 or text not in "0123456789":
        raise _Bad("must be a single digit 0-9")
    return text


def _timezone(text: str) -> str:
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        close = difflib.get_close_matches(text, sorted(available_timezones()), n=1)
        hint = (
            f" (did you mean {close[0]!r}?)" if close else " (use an IANA name like Europe/Paris)"
        )
        raise _Bad(f"unknown time zone {text!r}{hint}") from None
    return text


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise _Bad("must be a date like 2025-12-25") from None


def _language(text: str) -> str:
    value = text.lower()
    if not _LANGUAGE.fullmatch(value):
        raise _Bad("must be a language code like en, fr or pt-br")
    return value


def _time_range(text: str) -> tuple[time, time]:
    match = _RANGE.fullmatch(text.strip())
    if not match:
        raise _Bad('must be a time range like "09:00-17:30"')
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2 != 0):
        raise _Bad(f"not a valid time range: {text!r}")
    start = time(h1, m1)
    end = time.max if h2 == 24 else time(h2, m2)
    if start >= end:
        raise _Bad(f"start must be before end in {text!r} (split overnight hours across days)")
    return start, end


def _fmt(span: tuple[time, time]) -> str:
    end = "24:00" if span[1] == time.max else span[1].strftime("%H:%M")
    return f"{span[0].strftime('%H:%M')}-{end}"


# ---------------------------------------------------------------------------------------
# The schema, section by section


def _listen(v: _Values) -> Any:
    return v.make(dict)


_LISTEN = [_F("host", _text(), "127.0.0.1"), _F("port", _int(1, 65535), 8080)]


def _hub(v: _Values) -> Any:
    ctx = v.ctx
    # Later sections read phone numbers and place files with these, even if others failed.
    ctx.region = v["default_region"] if v.ok("default_region") else None
    data_dir = ctx.data_dir_override or v["data_dir"]
    if not isinstance(data_dir, _Invalid):
        ctx.data_dir = (ctx.base_dir / Path(data_dir).expanduser()).resolve()
    listen = v.values.pop("listen")
    if isinstance(listen, _Invalid):
        return INVALID
    public_url = v["public_url"]
    if public_url is None:
        host = "127.0.0.1" if listen["host"] in ("0.0.0.0", "::") else listen["host"]
        host = f"[{host}]" if ":" in host else host
        public_url = f"http://{host}:{listen['port']}"
    return v.make(HubSettings, public_url=public_url, data_dir=ctx.data_dir, **listen)


_HUB = [
    # Default: http://<listen.host>:<listen.port> (127.0.0.1 for a wildcard host).
    _F("public_url", _text(_http_url), None),
    _F("listen", _section(_LISTEN, _listen), _SECTION),
    _F("default_region", _text(_region), "US"),
    _F("data_dir", _text(), "data"),
    _F("log_level", _enum("debug", "info", "warning", "error", fold=True), "info"),
    _F("max_body_bytes", _int(1024), 1_048_576),
    _F("metrics_public", _bool, True),
]


def _storage(v: _Values) -> Any:
    if v["backend"] == "redis" and v["url"] is None:
        v.fail("url", "required when backend is redis", near="backend")
    path = v["path"]
    if path is None:
        path = v.ctx.data_dir / "hub.db"
    elif not isinstance(path, _Invalid):
        path = (v.ctx.base_dir / Path(path).expanduser()).resolve()
    return v.make(StorageSettings, path=path)


_STORAGE = [
    _F("backend", _enum("sqlite", "redis"), "sqlite"),
    _F("path", _text(), None),
    _F("url", _text(_redis_url), None),
    _F("cluster", _bool, False),
    _F("durability", _enum("always", "everysec", "none"), "always"),
]


def _twilio(v: _Values) -> Any:
    return v.make(TwilioSettings)


_TWILIO = [
    _F("account_sid", _text(_twilio_sid)),
    _F("auth_token", _text()),
    _F("api_base_url", _text(_http_url), None),
]


def _imap(v: _Values) -> Any:
    if v["after_processing"] == "move" and v["move_to"] is None:
        v.fail("move_to", "required when after_processing is move", near="after_processing")
    return v.make(ImapSettings)


_TLS = ("ssl", "starttls", "none")
_IMAP = [
    _F("host", _text()),
    _F("port", _int(1, 65535), 993),
    _F("username", _text()),
    _F("password", _text()),
    _F("tls", _enum(*_TLS), "ssl"),
    _F("mailbox", _text(), "INBOX"),
    _F("idle", _bool, True),
    _F("poll_seconds", _duration(1), 60),
    _F("after_processing", _enum("leave", "seen", "move"), "leave"),
    _F("move_to", _text(), None),
]


def _smtp(v: _Values) -> Any:
    if v["username"] is not None and v["password"] is None:
        v.fail("password", "required when username is set", near="username")
    if v["password"] is not None and v["username"] is None:
        v.fail("username", "required when password is set", near="password")
    return v.make(SmtpSettings)


_SMTP = [
    _F("host", _text()),
    _F("port", _int(1, 65535), 587),
    _F("username", _text(), None),
    _F("password", _text(), None),
    _F("tls", _enum(*_TLS), "starttls"),
]


def _ivr_option(v: _Values) -> Any:
    return v.make(IvrOption)


_IVR = [
    _F("digit", _text(_digit)),
    _F("label", _text()),
    _F("queue", _ref("queue")),
]

_CHANNEL_TYPES = tuple(t.value for t in ChannelType)
_CHANNEL_COMMON = [
    _F("name", _declared("channel", _name)),
    _F("type", _enum(*_CHANNEL_TYPES)),
]

_CHANNEL_FIELDS: dict[str, tuple[type, list[_F]]] = {
    "webchat": (
        WebchatChannel,
        [
            _F("allowed_origins", _list(_text(_origin)), ()),
            _F("identity_secret", _text(), None),
            _F("max_message_chars", _int(1), 4000),
            _F("rate_limit_per_minute", _int(1), 30),
            _F("offline_email_channel", _ref("email_channel"), None),
            _F("title", _text(), "Chat with us"),
        ],
    ),
    "sms": (
        SmsChannel,
        [
            _F("phone_number", _phone),
            _F("twilio", _section(_TWILIO, _twilio)),
            _F("max_media_bytes", _int(0), 5_242_880),
        ],
    ),
    "voice": (
        VoiceChannel,
        [
            _F("phone_number", _phone),
            _F("twilio", _section(_TWILIO, _twilio)),
            _F("greeting", _text(), "Thank you for calling."),
            _F("ivr", _list(_section(_IVR, _ivr_option), unique="digit"), ()),
            _F("ring_timeout_seconds", _duration(1), 20),
            _F("voicemail", _bool, True),
            _F("record_calls", _bool, False),
        ],
    ),
    "email": (
        EmailChannel,
        [
            _F("address", _text(_email)),
            _F("display_name", _text(), None),
            _F("imap", _section(_IMAP, _imap)),
            _F("smtp", _section(_SMTP, _smtp)),
            _F("max_attachment_bytes", _int(0), 10_485_760),
        ],
    ),
}


def _channel(ctx: _Ctx, node: yaml.Node, path: str) -> Any:
    items = ctx.mapping(node, path)
    if isinstance(items, _Invalid):
        return INVALID
    type_pair = items.get("type")
    type_path = _join(path, "type")
    kind: Any = INVALID
    if type_pair is None or ctx.is_null(type_pair[1], type_path):
        line = ctx.line(type_pair[0]) if type_pair else ctx.owner_line(node)
        ctx.error(type_path, line, f"required (one of: {', '.join(_CHANNEL_TYPES)})")
    else:
        kind = _enum(*_CHANNEL_TYPES)(ctx, type_pair[1], type_path)
    if isinstance(kind, _Invalid):
        # Without a type the other keys can't be judged; the name still counts as taken.
        _read_fields(ctx, node, path, _CHANNEL_COMMON[:1], strict=False)
        return INVALID
    cls, fields = _CHANNEL_FIELDS[kind]
    v = _read_fields(ctx, node, path, _CHANNEL_COMMON + fields)
    if isinstance(v, _Invalid):
        return INVALID
    if v.ok("name"):
        ctx.channel_types[v["name"]] = kind
        if kind == ChannelType.EMAIL:
            ctx.symbols.setdefault("email_channel", {})[v["name"]] = v.site("name")
    return v.make(cls, type=ChannelType(kind))


def _capacity(ctx: _Ctx, node: yaml.Node, path: str) -> Any:
    """Per channel type, merged over DEFAULT_CAPACITY; "chat" is accepted for webchat."""
    items = ctx.mapping(node, path)
    if isinstance(items, _Invalid):
        return INVALID
    out: dict[str, Any] = dict(DEFAULT_CAPACITY)
    given: dict[str, str] = {}
    for key, (key_node, value_node) in items.items():
        sub = _join(path, key)
        kind = "webchat" if key == "chat" else key
        if kind not in DEFAULT_CAPACITY:
            out[key] = ctx.error(sub, ctx.line(key_node), _unknown_key(key, _CHANNEL_TYPES))
            continue
        if kind in given:
            out[kind] = ctx.error(sub, ctx.line(key_node), f"same as {given[kind]}, given twice")
            continue
        given[kind] = key
        out[kind] = _int(0)(ctx, value_node, sub)
    if any(isinstance(v, _Invalid) for v in out.values()):
        return INVALID
    return out


def _agent(v: _Values) -> Any:
    agent_id = v["id"]
    name = agent_id if v["name"] is None else v["name"]
    login = v["login"]
    if login is None and v.ok("id"):
        login = agent_id
        v.ctx.declare("login", login, v.site("id"), login.casefold())
    return v.make(Agent, name=name, login=login, role=Role(v["role"]) if v.ok("role") else INVALID)


_AGENT = [
    _F("id", _declared("agent", _agent_id)),
    _F("name", _text(), None),
    _F("login", _declared("login", _text(), fold=True), None),
    _F("role", _enum(*(r.value for r in Role)), "agent"),
    _F(
        "password_hash", _text(_argon2_hash), required_hint=" (run `hub hash-password` to make one)"
    ),
    _F("skills", _list(_ref("skill")), ()),
    _F("capacity", _capacity, _SECTION),
    _F("phone", _phone, None),
]


def _match(v: _Values) -> Any:
    return v.make(QueueMatch)


_MATCH = [
    _F("channel_types", _list(_enum(*_CHANNEL_TYPES)), ()),
    _F("channels", _list(_ref("channel")), ()),
    _F("keywords", _list(_text()), ()),
    _F("customer_tags", _list(_text()), ()),
    _F("languages", _list(_text(_language)), ()),
]


def _queue(v: _Values) -> Any:
    if v["after_hours"] not in ("queue", INVALID) and v["business_hours"] is None:
        v.fail("after_hours", "needs business_hours (it applies outside them)")
    if v["after_hours"] == "auto_reply" and v["after_hours_message"] is None:
        v.fail("after_hours_message", "required when after_hours is auto_reply", near="after_hours")
    if v.ok("name", "fallback") and v["fallback"] is not None:
        v.ctx.fallbacks.append((len(v.ctx.fallbacks), v["name"], v["fallback"], v.site("fallback")))
    return v.make(QueueConfig)


_QUEUE = [
    _F("name", _declared("queue", _name)),
    _F("match", _section(_MATCH, _match), _SECTION),
    _F("skills", _list(_ref("skill")), ()),
    _F("priority", _int(), 0),
    _F("strategy", _enum("round_robin", "least_busy", "longest_idle"), "round_robin"),
    _F("business_hours", _ref("hours"), None),
    _F("after_hours", _enum("queue", "auto_reply", "voicemail"), "queue"),
    _F("after_hours_message", _text(), None),
    _F("require_accept", _bool, False),
    _F("offer_timeout_seconds", _duration(1), 30),
    _F("max_offers", _int(1), 3),
    _F("fallback", _ref("queue"), None),
    _F("agents", _list(_ref("agent")), ()),
]


def _routing(v: _Values) -> Any:
    queues = v["queues"]
    default_queue = v["default_queue"]
    if queues == ():
        queues = (QueueConfig(name="default"),)
        v.ctx.declare("queue", "default", v.site("queues"))
    if default_queue is None:
        default_queue = queues[0].name if v.ok("queues") else INVALID
    return v.make(RoutingSettings, queues=queues, default_queue=default_queue)


_ROUTING = [
    _F("skills", _list(_declared("skill", _name)), ()),
    _F("queues", _list(_section(_QUEUE, _queue)), ()),
    _F("default_queue", _ref("queue"), None),
    _F("sticky_window_seconds", _duration(0), 604_800),
    _F("away_grace_seconds", _duration(0), 60),
    _F("requeue_after_seconds", _duration(0), 300),
    _F("call_blocks_chat", _bool, False),
]


def _weekly(ctx: _Ctx, node: yaml.Node, path: str) -> Any:
    items = ctx.mapping(node, path)
    if isinstance(items, _Invalid):
        return INVALID
    out: dict[str, Any] = {day: () for day in WEEKDAYS}
    for key, (key_node, value_node) in items.items():
        sub = _join(path, key)
        if key not in WEEKDAYS:
            out[key] = ctx.error(sub, ctx.line(key_node), _unknown_key(key, WEEKDAYS))
        elif not ctx.is_null(value_node, sub):
            out[key] = _day(ctx, value_node, sub)
    if any(isinstance(v, _Invalid) for v in out.values()):
        return INVALID
    return out


def _day(ctx: _Ctx, node: yaml.Node, path: str) -> Any:
    spans = _list(_text(_time_range))(ctx, node, path)
    if isinstance(spans, _Invalid):
        return INVALID
    order = sorted(range(len(spans)), key=lambda i: spans[i])
    for before, after in itertools.pairwise(order):
        if spans[after][0] < spans[before][1]:
            later, earlier = max(before, after), min(before, after)
            assert isinstance(node, yaml.SequenceNode)
            ctx.error(
                f"{path}[{later}]",
                ctx.line(node.value[later]),
                f"{_fmt(spans[later])} overlaps {_fmt(spans[earlier])}",
            )
            return INVALID
    return tuple(sorted(spans))


def _hours(v: _Values) -> Any:
    return v.make(BusinessHours)


_HOURS = [
    _F("name", _declared("hours", _name)),
    _F("timezone", _text(_timezone)),
    _F("weekly", _weekly),
    _F("holidays", _list(_text(_date)), ()),
]


# --- analytics and integrations: SLA policies, CSAT, outgoing webhooks, segments ---------


def _sla_hours(ctx: _Ctx, node: yaml.Node, path: str) -> Any:
    """`calendar`, `queue`, or a business_hours name (checked like any reference)."""
    value = _text()(ctx, node, path)
    if isinstance(value, _Invalid) or value in ("calendar", "queue"):
        return value
    return _ref("hours")(ctx, node, path)


def _sla_policy(v: _Values) -> Any:
    given = [v[key] for key in SLA_TARGETS if v[key] is not None]
    if not given and v.ok(*SLA_TARGETS):
        v.fail("first_response", "give at least one of: " + ", ".join(SLA_TARGETS), near="name")
    warn = v["warn_before"]
    if warn is not None and v.ok("warn_before", *SLA_TARGETS) and any(warn >= t for t in given):
        v.fail("warn_before", "must be shorter than every target of the policy")
    if v["queues"] == () and v.ok("name"):
        defaults = v.ctx.symbols.setdefault("sla_default", {})
        first = next(iter(defaults.values()), None)
        if first is not None:
            v.fail(
                "queues",
                f"only one policy may leave out queues (the one at {first.path}, "
                f"line {first.line}, already covers every other queue)",
                near="name",
            )
        else:
            defaults[v["name"]] = v.site("name")
    return v.make(SlaPolicy)


_SLA_POLICY = [
    _F("name", _declared("sla_policy", _name)),
    _F("queues", _list(_declared("sla_queue", _ref("queue"))), ()),
    _F("first_response", _duration(1), None),
    _F("next_response", _duration(1), None),
    _F("resolution", _duration(1), None),
    _F("business_hours", _sla_hours, "calendar"),
    _F("pause_while_pending", _bool, True),
    _F("warn_before", _duration(1), None),
]


def _sla(v: _Values) -> Any:
    return v.make(SlaSettings)


_SLA = [
    _F("policies", _list(_section(_SLA_POLICY, _sla_policy)), ()),
    _F("check_every_seconds", _duration(1), 30),
]


def _text_channel(ctx: _Ctx, node: yaml.Node, path: str) -> Any:
    """A channel name that can carry text (a survey cannot be asked on a voice line)."""
    value = _ref("channel")(ctx, node, path)
    if not isinstance(value, _Invalid) and ctx.channel_types.get(value) == ChannelType.VOICE:
        return ctx.error(
            path, ctx.line(node), f"channel {value!r} is a voice line: surveys go by text"
        )
    return value


def _csat(v: _Values) -> Any:
    return v.make(CsatSettings)


_CSAT = [
    _F("enabled", _bool, False),
    _F("channels", _list(_text_channel), ()),
    _F("question", _text(), DEFAULT_CSAT_QUESTION),
    _F("delay_seconds", _duration(0), 60),
    _F("window_seconds", _duration(60), 259_200),
]


def _webhook_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        raise _Bad("must be an http(s) URL like https://crm.example.com/hooks/hub")
    return text


def _secret(text: str) -> str:
    if len(text) < 16:
        raise _Bad("must be at least 16 characters (a long random string)")
    return text


def _webhook(v: _Values) -> Any:
    if v["events"] == ():
        v.fail("events", "list at least one event type (or * for all)")
    return v.make(WebhookConfig)


_WEBHOOK = [
    _F("name", _declared("webhook", _name)),
    _F("url", _text(_webhook_url)),
    _F("events", _list(_enum(*WEBHOOK_EVENTS))),
    _F("secret", _text(_secret), required_hint=" (e.g. secret: ${MY_WEBHOOK_SECRET})"),
    _F("timeout_seconds", _duration(1), 10),
    _F("max_attempts", _int(1, 1000), 20),
]

_SEGMENT_FILTERS = (
    "tags",
    "channels",
    "channel_types",
    "last_contact_within",
    "csat_at_most",
    "has_open_conversation",
)


def _segment(v: _Values) -> Any:
    if all(v[key] in ((), None) for key in _SEGMENT_FILTERS):
        v.fail("tags", "give at least one filter: " + ", ".join(_SEGMENT_FILTERS), near="name")
    return v.make(SegmentConfig)


_SEGMENT = [
    _F("name", _declared("segment", _name)),
    _F("tags", _list(_text()), ()),
    _F("channels", _list(_ref("channel")), ()),
    _F("channel_types", _list(_enum(*_CHANNEL_TYPES)), ()),
    _F("last_contact_within", _duration(1), None),
    _F("csat_at_most", _int(1, 5), None),
    _F("has_open_conversation", _bool, None),
]


_ROOT = [
    # Order matters: hub sets the phone region and data dir the later sections use.
    _F("hub", _section(_HUB, _hub), _SECTION),
    _F("storage", _section(_STORAGE, _storage), _SECTION),
    _F("channels", _list(_channel), ()),
    _F("routing", _section(_ROUTING, _routing), _SECTION),
    _F("business_hours", _list(_section(_HOURS, _hours)), ()),
    _F("agents", _list(_section(_AGENT, _agent)), ()),
    _F("sla", _section(_SLA, _sla), _SECTION),
    _F("csat", _section(_CSAT, _csat), _SECTION),
    _F("webhooks", _list(_section(_WEBHOOK, _webhook)), ()),
    _F("segments", _list(_section(_SEGMENT, _segment)), ()),
]


# ---------------------------------------------------------------------------------------
# Whole-file checks


def _check_references(ctx: _Ctx) -> None:
    for kind, name, site in ctx.refs:
        declared = ctx.symbols.get(kind, {})
        if name in declared:
            continue
        one, many, _ = _KINDS[kind]
        if kind == "email_channel" and name in ctx.channel_types:
            message = f"channel {name!r} is of type {ctx.channel_types[name]}, not email"
        elif declared:
            message = f"unknown {one} {name!r} (declared {many}: {', '.join(declared)})"
        else:
            message = f"unknown {one} {name!r} (no {many} are declared)"
        ctx.error(site.path, site.line, message)


def _check_fallback_cycles(ctx: _Ctx) -> None:
    """Report each cycle once, at the queue that closes it in file order."""
    fallback = {name: target for _, name, target, _ in ctx.fallbacks}
    order = {name: index for index, name, _, _ in ctx.fallbacks}
    sites = {name: site for _, name, _, site in ctx.fallbacks}
    reported: set[frozenset[str]] = set()
    for start in fallback:
        chain = [start]
        while (nxt := fallback.get(chain[-1])) is not None and nxt not in chain:
            chain.append(nxt)
        if nxt is None:
            continue
        cycle = chain[chain.index(nxt) :]
        if frozenset(cycle) in reported:
            continue
        reported.add(frozenset(cycle))
        last = max(cycle, key=order.__getitem__)
        at = cycle.index(last)
        names = [*cycle[at:], *cycle[:at], last]
        ctx.error(sites[last].path, sites[last].line, f"fallback cycle {' -> '.join(names)}")


def _parse(
    text: str,
    source: str,
    env: Mapping[str, str],
    base_dir: Path | None,
    data_dir: Path | None,
) -> Config:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else None
        problem = exc.problem or exc.context or "cannot parse"
        if problem.startswith("but ") and exc.context:
            problem = f"{exc.context} {problem}"  # "expected a single document ... but found"
        raise ConfigError(
            [ConfigIssue("", line, f"YAML syntax error: {problem}")], source
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue("", None, f"YAML syntax error: {exc}")], source) from None
    except RecursionError:
        # PyYAML composes recursively: thousands of nested [ or { exhaust the stack.
        message = "YAML nested too deeply to be a configuration"
        raise ConfigError([ConfigIssue("", None, message)], source) from None
    if root is None or (isinstance(root, yaml.ScalarNode) and root.tag == _NULL):
        message = "the file is empty (expected sections such as hub, channels, agents, routing)"
        raise ConfigError([ConfigIssue("", None, message)], source)
    ctx = _Ctx(env, base_dir if base_dir is not None else Path.cwd(), data_dir)
    if not isinstance(root, yaml.MappingNode):
        message = "the top level must be a mapping of sections (hub, storage, channels, ...)"
        raise ConfigError([ConfigIssue("", ctx.line(root), message)], source)
    values = _read_fields(ctx, root, "", _ROOT)
    _check_references(ctx)
    _check_fallback_cycles(ctx)
    if ctx.issues:
        issues = sorted(ctx.issues, key=lambda i: i.line or 0)
        raise ConfigError(issues, source)
    assert not isinstance(values, _Invalid)
    return values.make(Config, source=source)  # type: ignore[no-any-return]
