"""The Redis timeline store: many hub processes on one Redis, or on a Redis Cluster.

Layout (the full key list is in hub/timeline/redis_scripts.py)

- A customer's keys share one hash tag, `{c:<tag>}`, where the tag is the last four
  characters of the customer id. Every conversation and event id minted for that
  customer ends with the same four characters, so any id alone names the slot its data
  lives in: no global id -> customer index to keep in step on every write. Several
  customers may share a tag (that only co-locates them).
- Global lookups live under their own tags, one key per value so a cluster spreads
  them: `{iv:<kind>:<value>}` verified identity -> customer, `{iu:...}` the customers
  holding an unverified claim (the first one resolves it), `{x:<channel>:<external id>}`
  -> event id (find_event, provider ids), `{ix}:act` customers by activity,
  `{ob}:due`/`{ob}:att` the outbox, `{st}` channel state.

Atomicity

- Each write to a customer's data is one Lua script on its slot: idempotency check,
  identity-owner check, threading, appends and the conversation update commit together.
- Writes to global keys never depend on a read from another round trip: the identity
  claim is one `SET NX GET`; ids are minted by the client (monotonic prefix + tag) and
  a script refuses a candidate that does not sort after the tag's newest id, so the
  client can write global entries for that id *ahead* of the script, in the same
  pipeline. A global entry whose script did not commit is an orphan that readers
  verify and ignore (outbox claimers drop it): nothing is ever committed without its
  index entry, which a write-after would not guarantee across a crash.
- record_inbound costs two round trips, new or duplicate: [identity claim, idempotency
  lookup], then [activity index, idempotency entry, ingest script] (or [read event]).
  What concurrent tasks ask for during one event-loop tick shares one pipeline, since
  redis-py's cost per pipeline, not Redis, is what limits a busy hub process.

Merges

A merge moves the source's data into the target's slot, so that the hot path of a
merged customer stays a single-slot script. Source and target are locked for the
few milliseconds it takes (writers wait; the lock names the operation), the target
script imports everything and records what it moved (`mg:`), then the source script
leaves forwarding entries ("@<customer>") behind for ids that still name its slot. Each
step is idempotent and checks the lock it runs under, so a merge interrupted by a crash
is finished by repeating it, which any writer blocked on a stale lock does by itself.
The source's idempotency markers move with its events, so a retried delivery of a
message stored before the merge is still recognised; identities keep pointing at the
source, and the source's `merged_into` leads to the target (unmerge then only has to
clear it). Unmerge moves the recorded conversations (with every event they gained
meanwhile) back the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from hub.ids import id_time_ms, is_id
from hub.lease import Lease, RedisLease
from hub.model import (
    CUSTOMER,
    Attachment,
    ChannelType,
    Conversation,
    ConversationQuery,
    ConversationStatus,
    Customer,
    DeliveryState,
    Direction,
    Event,
    EventDraft,
    EventKind,
    Identity,
    IdentityKind,
    Inbound,
    Page,
    Recorded,
    attachment_to_dict,
    iso,
    utcnow,
)
from hub.timeline import redis_scripts
from hub.timeline.store import (
    IdentityConflict,
    InvalidOperation,
    NotFound,
    OutboxItem,
    StoreError,
    StoreUnavailable,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Events that move a conversation up the inbox; status and assignment changes do not.
_ACTIVITY_KINDS = frozenset(
    {EventKind.MESSAGE, EventKind.NOTE, EventKind.CALL, EventKind.VOICEMAIL}
)
_FINAL_STATES = ",".join(s.value for s in DeliveryState if s.final)
# Redirects (merged customers, moved conversations) and id races settle in a few steps;
# more means the data is inconsistent, which must surface instead of looping.
_MAX_STEPS = 16
LOCK_STALE_MS = 30_000  # a merge holding a lock longer than this died mid-way
LOCK_WAIT_SECONDS = 10.0
# An outbox entry without its event may belong to a write still in flight; only one
# this old is an orphan of a write that never committed.
_ORPHAN_GRACE_MS = 60_000
_SEP = "\x1f"
_UNAVAILABLE = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.ClusterError,
    rexc.RedisClusterException,
    rexc.TryAgainError,
    rexc.ReadOnlyError,
    rexc.OutOfMemoryError,
    ConnectionError,
    TimeoutError,
    OSError,
)

_MAX_BATCH = 1000  # calls per pipeline, however many tasks asked in one tick

# --- ids ----------------------------------------------------------------------------------

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
TAG_LENGTH = 4
PREFIX_LENGTH = 26 - TAG_LENGTH


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def _inc(prefix: str) -> str:
    """The next base32 string of the same length (the Lua `inc` does the same)."""
    chars = list(prefix)
    for i in range(len(chars) - 1, -1, -1):
        pos = _ALPHABET.index(chars[i])
        if pos < 31:
            chars[i] = _ALPHABET[pos + 1]
            return "".join(chars)
        chars[i] = "0"
    raise OverflowError("id space exhausted")


class _Prefixes:
    """Monotonic 22-character id prefixes (ms time + random), to which a tag is appended.

    Strictly increasing within this process; across processes the scripts refuse a
    prefix that does not sort after the tag's newest one, and `floor` moves past it.
    """

    def __init__(self) -> None:
        self._last = ""

    def next(self, floor: str = "") -> str:
        ms = int(time.time() * 1000)
        # The top bit stays clear so a run within one ms has room to count up.
        rnd = int.from_bytes(os.urandom(8), "big") >> 5
        cand = _encode(ms, 10) + _encode(rnd, PREFIX_LENGTH - 10)
        for bound in (self._last, floor):
            if bound and cand <= bound:
                cand = _inc(bound)
        self._last = cand
        return cand


def tag_of(any_id: str) -> str:
    return any_id[-TAG_LENGTH:]


# --- values <-> Redis -------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_us(value: datetime) -> int:
    if value.tzinfo is None:  # a naive datetime is UTC, never local time
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _MICROSECOND


def from_us(value: int | str) -> datetime:
    return _EPOCH + int(value) * _MICROSECOND


def _opt_time(value: str | None) -> datetime | None:
    return None if value in (None, "") else from_us(value)  # type: ignore[arg-type]


def _opt(value: str | None) -> str:
    return "" if value is None else "=" + value


def _hash(flat: Sequence[str] | None) -> dict[str, str]:
    if not flat:
        return {}
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _entry(identity: Identity) -> str:
    return f"{int(identity.verified)}|{identity.kind.value}|{identity.value}"


def _identity(entry: str) -> Identity:
    verified, kind, value = entry.split("|", 2)
    return Identity(IdentityKind(kind), value, verified == "1")


def _customer(customer_id: str, pack: Sequence[Any]) -> Customer | None:
    fields = _hash(pack[0])
    if "nm" not in fields:
        return None
    entries = [_identity(e) for e in pack[1]]
    # A claim the customer also holds verified adds nothing a reader needs.
    verified = {(i.kind, i.value) for i in entries if i.verified}
    identities = tuple(
        dict.fromkeys(i for i in entries if i.verified or (i.kind, i.value) not in verified)
    )
    return Customer(
        id=customer_id,
        display_name=fields["nm"],
        identities=identities,
        tags=tuple(json.loads(fields.get("tg", "[]"))),
        created_at=from_us(fields["ca"]),
        merged_into=fields.get("mi") or None,
    )


def _conversation(conversation_id: str, fields: Mapping[str, str]) -> Conversation:
    return Conversation(
        id=conversation_id,
        customer_id=fields["cu"],
        status=ConversationStatus(fields["st"]),
        channel=fields.get("ch", ""),
        created_at=from_us(fields["ca"]),
        last_activity_at=from_us(fields["la"]),
        assignee=fields.get("as"),
        queue=fields.get("q"),
        priority=int(fields.get("pr", "0")),
        tags=tuple(json.loads(fields.get("tg", "[]"))),
        first_response_at=_opt_time(fields.get("fr")),
        resolved_at=_opt_time(fields.get("ra")),
        snoozed_until=_opt_time(fields.get("su")),
    )


def _body(
    *,
    kind: EventKind,
    direction: Direction,
    author: str,
    created_at: datetime,
    channel: str = "",
    channel_type: ChannelType | None = None,
    text: str = "",
    html: str | None = None,
    attachments: Iterable[Attachment] = (),
    external_id: str | None = None,
    delivery_state: DeliveryState | None = None,
    data: Mapping[str, Any] | None = None,
) -> str:
    """The stored JSON of an event, everything but its ids (the script places those)."""
    body: dict[str, Any] = {
        "channel": channel,
        "direction": direction.value,
        "kind": kind.value,
        "author": author,
        "created_at": to_us(created_at),
        "text": text,
    }
    if channel_type is not None:
        body["channel_type"] = channel_type.value
    if html is not None:
        body["html"] = html
    if attachments:
        body["attachments"] = [attachment_to_dict(a) for a in attachments]
    if external_id is not None:
        body["external_id"] = external_id
    if delivery_state is not None:
        body["delivery_state"] = delivery_state.value
    if data:
        body["data"] = dict(data)
    return _dump(body)


def _split_stored(stored: str) -> tuple[str, str, str]:
    customer_id, conversation_id, body = stored.split(_SEP, 2)
    return customer_id, conversation_id, body


def _event(pack: Sequence[Any]) -> Event:
    """An event from [id, stored, delivery override]; the stored value is not a forward."""
    event_id, stored, delivery = pack[0], pack[1], pack[2] if len(pack) > 2 else None
    customer_id, conversation_id, text = _split_stored(stored)
    body = json.loads(text)
    state, error, external_id = (
        body.get("delivery_state"),
        body.get("delivery_error"),
        body.get("external_id"),
    )
    if delivery:
        override = json.loads(delivery)
        state, error, external_id = override.get("s"), override.get("e"), override.get("x")
    # cjson writes an empty list as {}: an empty mapping here means "none".
    attachments = body.get("attachments") or []
    data = body.get("data") or {}
    channel_type = body.get("channel_type")
    return Event(
        id=event_id,
        customer_id=customer_id,
        conversation_id=conversation_id or None,
        channel=body.get("channel", ""),
        channel_type=ChannelType(channel_type) if channel_type else None,
        direction=Direction(body["direction"]),
        kind=EventKind(body["kind"]),
        author=body["author"],
        created_at=from_us(body["created_at"]),
        text=body.get("text", ""),
        html=body.get("html"),
        attachments=tuple(Attachment(**a) for a in attachments),
        external_id=external_id,
        delivery_state=DeliveryState(state) if state else None,
        delivery_error=error or None,
        data=dict(data),
    )


def _forward(stored: str | None) -> str | None:
    """The customer an event moved to, if `stored` is a forwarding entry."""
    if stored and stored.startswith("@"):
        return stored[1:]
    return None


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise InvalidOperation(f"limit must be at least 1, not {limit}")


def _check_event_cursor(cursor: str | None) -> None:
    if cursor is not None and not is_id(cursor):
        raise InvalidOperation(f"not an event cursor: {cursor[:60]!r}")


def safe_url(url: str) -> str:
    """The URL without its password, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True, slots=True)
class _Script:
    name: str
    key: str
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class _Command:
    args: tuple[Any, ...]
    options: Mapping[str, Any] | None = None


def _set_nx_get(key: str, value: str) -> _Command:
    # get=True makes redis-py hand back the old value instead of a bool.
    return _Command(("SET", key, value, "NX", "GET"), {"get": True})


_Call = _Script | _Command


class _Retry(Exception):
    """Internal: a merge step has to be prepared again (an id race)."""

    def __init__(self, floor: str) -> None:
        self.floor = floor


class RedisStore:
    """The TimelineStore on Redis or Redis Cluster; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        cluster: bool = False,
        key_prefix: str = "hub",
        socket_timeout: float = 5.0,
        max_connections: int = 64,
    ) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must not contain { or }: they delimit hash tags")
        self.url = url
        self.cluster = cluster
        self._where = safe_url(url)
        self._prefix = key_prefix
        self._socket_timeout = socket_timeout
        self._max_connections = max_connections
        # redis-py's pool refuses (rather than queues) a request past its size; this
        # makes a burst of webhooks wait for a connection instead of failing.
        self._in_flight = asyncio.Semaphore(max_connections)
        self._queued: list[tuple[list[_Call], asyncio.Future[list[Any]]]] = []
        self._flush_scheduled = False
        self._sending: set[asyncio.Task[None]] = set()
        self._redis: Any = None
        self._shas = {
            name: hashlib.sha1(redis_scripts.source(name).encode()).hexdigest()
            for name in redis_scripts.SCRIPTS
        }
        self._prefixes = _Prefixes()
        # Where a merged customer's data lives now; a wrong guess costs one redirect.
        self._roots: dict[str, str] = {}

    # --- keys -----------------------------------------------------------------------------

    def _base(self, tag: str) -> str:
        return f"{self._prefix}:{{c:{tag}}}"

    def _base_of(self, any_id: str) -> str:
        return self._base(tag_of(any_id))

    def _identity_key(self, identity: Identity) -> str:
        kind = "iv" if identity.verified else "iu"
        return f"{self._prefix}:{{{kind}:{identity.kind.value}:{identity.value}}}"

    def _external_key(self, channel: str, external_id: str) -> str:
        return f"{self._prefix}:{{x:{channel}:{external_id}}}"

    @property
    def _activity_key(self) -> str:
        return f"{self._prefix}:{{ix}}:act"

    @property
    def _outbox(self) -> str:
        return f"{self._prefix}:{{ob}}"

    @property
    def _state_key(self) -> str:
        return f"{self._prefix}:{{st}}"

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if self._redis is not None:
            return
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": self._socket_timeout,
            "socket_connect_timeout": min(self._socket_timeout, 2.0),
            # One immediate retry covers a pooled connection that died with a restart;
            # more would only delay the 503 that makes the provider retry.
            "retry": Retry(NoBackoff(), 1),
            "max_connections": self._max_connections,
        }
        try:
            if self.cluster:
                client: Any = RedisCluster.from_url(self.url, **options)
                await client.initialize()
            else:
                client = aioredis.Redis.from_url(self.url, **options)
                await client.ping()
            self._redis = client
            await self._load_scripts()
        except (*_UNAVAILABLE, rexc.RedisError) as exc:
            redis_client, self._redis = self._redis, None
            if redis_client is not None:
                await redis_client.aclose()
            raise StoreUnavailable(f"cannot reach Redis at {self._where}: {exc}") from None

    async def close(self) -> None:
        if self._sending:  # let round trips already on the wire answer their callers
            await asyncio.gather(*self._sending, return_exceptions=True)
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()

    async def ping(self) -> None:
        await self._guard(self._client().ping())

    async def persistence_warning(self, durability: str) -> str | None:
        """Why this Redis cannot give `durability` ("always", "everysec", "none"), or None.

        always: appendonly yes + appendfsync always (an acknowledged write survives a
        Redis crash); everysec: appendonly yes (up to a second lost); none: anything.
        """
        if durability == "none":
            return None
        try:
            if self.cluster:  # every primary: the weakest node decides
                query = self._client().config_get("append*", target_nodes=RedisCluster.PRIMARIES)
            else:
                query = self._client().config_get("append*")
            settings = await self._guard(query)
        except StoreUnavailable:
            raise
        except rexc.ResponseError as exc:  # CONFIG renamed or forbidden (managed Redis)
            return (
                f"cannot read the persistence settings of Redis at {self._where} ({exc}); "
                f"check yourself that it gives durability {durability!r}"
            )
        if self.cluster and settings and isinstance(next(iter(settings.values())), dict):
            per_node = list(settings.values())
        else:
            per_node = [settings]
        for node in per_node:
            appendonly = str(node.get("appendonly", "no")).lower()
            fsync = str(node.get("appendfsync", "everysec")).lower()
            if appendonly != "yes":
                return (
                    f"Redis at {self._where} runs with appendonly {appendonly}: a crash of "
                    f"Redis loses acknowledged messages (durability {durability!r} needs "
                    f"appendonly yes"
                    + (" and appendfsync always)" if durability == "always" else ")")
                )
            if durability == "always" and fsync != "always":
                return (
                    f"Redis at {self._where} runs with appendfsync {fsync}: a crash of Redis "
                    f"may lose the last second of acknowledged messages (durability "
                    f"'always' needs appendfsync always)"
                )
            if durability == "everysec" and fsync == "no":
                return (
                    f"Redis at {self._where} runs with appendfsync no: the OS decides when "
                    f"writes reach disk (durability 'everysec' needs everysec or always)"
                )
        return None

    # --- plumbing -------------------------------------------------------------------------

    def _client(self) -> Any:
        if self._redis is None:
            raise StoreUnavailable("the Redis store is not started (or closed)")
        return self._redis

    async def _guard(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"Redis at {self._where} is unavailable: {exc}") from exc

    async def _load_scripts(self) -> None:
        client = self._client()
        names = list(redis_scripts.SCRIPTS)
        shas = await asyncio.gather(
            *(client.script_load(redis_scripts.source(name)) for name in names)
        )
        for name, sha in zip(names, shas, strict=True):
            if sha != self._shas[name]:  # pragma: no cover - would be a hashing bug
                raise StoreError(f"script {name} loaded as {sha}, expected {self._shas[name]}")

    async def _pipeline(self, calls: Sequence[_Call]) -> list[Any]:
        """Run `calls` in one round trip (one per node on a cluster, in parallel).

        Calls requested by all tasks during one event-loop tick travel together in one
        redis-py pipeline: its per-execute cost, not Redis, is what limits a busy hub.
        """
        self._client()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._queued.append((list(calls), future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        results = await future
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Python 3.11's asyncio.wait_for, around every redis-py send, may have
            # swallowed a cancellation of this task: honour it now.
            raise asyncio.CancelledError
        for result in results:
            if isinstance(result, _UNAVAILABLE):
                raise StoreUnavailable(f"Redis at {self._where} is unavailable: {result}")
            if isinstance(result, Exception):
                raise result
        return results

    def _flush(self) -> None:
        self._flush_scheduled = False
        queued, self._queued = self._queued, []
        batch: list[tuple[list[_Call], asyncio.Future[list[Any]]]] = []
        size = 0
        for item in queued:
            batch.append(item)
            size += len(item[0])
            if size >= _MAX_BATCH:
                self._spawn(batch)
                batch, size = [], 0
        if batch:
            self._spawn(batch)

    def _spawn(self, batch: list[tuple[list[_Call], asyncio.Future[list[Any]]]]) -> None:
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[list[_Call], asyncio.Future[list[Any]]]]) -> None:
        calls = [call for item, _ in batch for call in item]
        try:
            async with self._in_flight:
                results = await self._execute(calls)
        except BaseException as exc:
            error = exc
            if isinstance(exc, _UNAVAILABLE):
                error = StoreUnavailable(f"Redis at {self._where} is unavailable: {exc}")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for item, future in batch:
            if not future.done():  # the caller may have given up (cancelled)
                future.set_result(results[start : start + len(item)])
            start += len(item)

    async def _execute(self, calls: Sequence[_Call]) -> list[Any]:
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            pipe = self._client().pipeline(transaction=False)
            for index in todo:
                call = calls[index]
                if isinstance(call, _Script):
                    pipe.execute_command("EVALSHA", self._shas[call.name], 1, call.key, *call.args)
                else:
                    pipe.execute_command(*call.args, **(call.options or {}))
            answers = await pipe.execute(raise_on_error=False)
            for index, answer in zip(todo, answers, strict=True):
                results[index] = answer
            missing = [i for i in todo if isinstance(results[i], rexc.NoScriptError)]
            if attempt == 1 or not missing:
                break
            # Redis restarted or failed over without our scripts: load them and run
            # again exactly the calls that did not run.
            await self._load_scripts()
            todo = missing
        return results

    async def _script(self, name: str, key: str, *args: Any) -> Any:
        return (await self._pipeline([_Script(name, key, args)]))[0]

    async def _command(self, *args: Any) -> Any:
        return (await self._pipeline([_Command(args)]))[0]

    async def _set_nx(self, key: str, value: str) -> str | None:
        """SET NX GET: None when `value` was stored, else the value already there."""
        return (await self._pipeline([_set_nx_get(key, value)]))[0]

    async def _wait_for_lock(self, token: str, deadline: float) -> None:
        """A merge holds the customer: wait for it, or finish it if its process died."""
        age = int(time.time() * 1000) - int(token.rsplit("|", 1)[-1])
        if age > LOCK_STALE_MS:
            log.warning("redis_store.resume_stale_lock", lock=token, age_ms=age)
            try:
                await self._resume(token)
            except StoreError as exc:
                log.warning("redis_store.resume_failed", lock=token, error=str(exc))
                await asyncio.sleep(0.1)
        else:
            await asyncio.sleep(0.005)
        if time.monotonic() > deadline:
            raise StoreUnavailable(f"a customer stayed locked by an unfinished merge ({token})")

    async def _resume(self, token: str) -> None:
        parts = token.split("|")
        if parts[0] == "merge":
            await self.merge_customers(parts[1], parts[2], "|".join(parts[3:-1]))
        elif parts[0] == "unmerge":
            await self.unmerge_customers(parts[1], "|".join(parts[2:-1]))

    # --- reads shared by many operations ----------------------------------------------------

    async def _read_customer(self, customer_id: str) -> Customer | None:
        if not is_id(customer_id):
            return None
        pack = await self._script("read_customer", self._base_of(customer_id), customer_id)
        return _customer(customer_id, pack)

    async def _live(self, customer_id: str) -> Customer | None:
        """The customer, or the one it was merged into (transitively)."""
        for _ in range(_MAX_STEPS):
            customer = await self._read_customer(customer_id)
            if customer is None or customer.merged_into is None:
                return customer
            customer_id = customer.merged_into
        raise StoreError(f"merge chain of customer {customer_id} is too long")

    async def _read_events(
        self, event_ids: Iterable[str], *, context: bool = False
    ) -> dict[str, list[Any]]:
        """Event packs by id (following forwards); with context, [pack, conv, customer]."""
        pending: dict[str, list[str]] = {}
        for event_id in dict.fromkeys(event_ids):
            if is_id(event_id):
                pending.setdefault(self._base_of(event_id), []).append(event_id)
        found: dict[str, list[Any]] = {}
        for _ in range(_MAX_STEPS):
            if not pending:
                return found
            calls = [
                _Script("read_events", base, ("1" if context else "0", *pending[base]))
                for base in pending
            ]
            results = await self._pipeline(calls)
            pending = {}
            for items in results:
                for item in items:
                    pack = item[0]
                    moved = _forward(pack[1])
                    if moved is not None:
                        pending.setdefault(self._base_of(moved), []).append(pack[0])
                    elif pack[1]:
                        found[pack[0]] = item
        raise StoreError("event forwards are too deep")

    async def _event_recorded(self, event_id: str, created: bool = False) -> Recorded | None:
        item = (await self._read_events([event_id], context=True)).get(event_id)
        return None if item is None else self._recorded_from(item, created)

    def _recorded_from(self, item: Sequence[Any], created: bool) -> Recorded:
        event = _event(item[0])
        fields = _hash(item[1])
        conversation = (
            _conversation(event.conversation_id, fields)
            if event.conversation_id and fields
            else None
        )
        customer = _customer(event.customer_id, item[2])
        if customer is None:
            raise StoreError(f"event {event.id} has no customer {event.customer_id}")
        return Recorded(event=event, conversation=conversation, customer=customer, created=created)

    async def _fix_external(self, key: str, now_there: str | None, event_id: str) -> None:
        """Point an external-id entry at the event that committed, if a retried
        attempt (or a concurrent duplicate) left it naming another id."""
        if now_there != event_id:
            await self._command("SET", key, event_id)

    # --- ingest ----------------------------------------------------------------------------

    async def record_inbound(self, inbound: Inbound) -> Recorded:
        now = utcnow()
        at = inbound.received_at or now
        identity = inbound.identity
        new_customer = self._customer_id()
        ident_key = self._identity_key(identity)
        ext_key = self._external_key(inbound.channel, inbound.external_id)
        claim: _Call = (
            _set_nx_get(ident_key, new_customer)
            if identity.verified
            else _Script("claim_list", ident_key, (new_customer,))
        )
        owner_found, known = await self._pipeline([claim, _Command(("GET", ext_key))])
        if known is not None:
            existing = await self._event_recorded(known)
            if (
                existing is not None
                and existing.event.channel == inbound.channel
                and existing.event.external_id == inbound.external_id
            ):
                return existing
        owner: str = owner_found or new_customer
        body = _body(
            kind=inbound.kind,
            direction=Direction.IN,
            author=CUSTOMER,
            created_at=at,
            channel=inbound.channel,
            channel_type=inbound.channel_type,
            text=inbound.text,
            html=inbound.html,
            attachments=inbound.attachments,
            external_id=inbound.external_id,
            data=inbound.data,
        )
        fixed_args = (
            inbound.channel,
            inbound.external_id,
            str(to_us(at)),
            str(to_us(now)),
            body,
            inbound.display_name or identity.value,
            _entry(identity),
            "1" if inbound.routable else "0",
            _opt(inbound.thread_key),
            *inbound.thread_refs,
        )
        root = self._roots.get(owner, owner)
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        redirects = 0
        while True:
            tag = tag_of(root)
            cand = self._prefixes.next()
            main_id = _inc(cand) + tag
            _, ext_was, result = await self._pipeline(
                [
                    _Command(("ZADD", self._activity_key, "GT", to_us(at), root)),
                    _set_nx_get(ext_key, main_id),
                    _Script("ingest", self._base(tag), (owner, root, cand, tag, *fixed_args)),
                ]
            )
            status = result[0]
            if status == "ok":
                # cjson writes an empty list as {} and a missing value as false.
                done = json.loads(result[1])
                event_pack, side_pack = done["ev"], done["side"]
                await self._fix_external(ext_key, ext_was or main_id, event_pack[0])
                customer_pack = [done["cu"][0] or [], done["cu"][1] or []]
                customer = _customer(root, customer_pack)
                assert customer is not None
                return Recorded(
                    event=_event([event_pack[0], event_pack[1], event_pack[2] or None]),
                    conversation=_conversation(done["conv"], _hash(done["cv"])),
                    customer=customer,
                    created=True,
                    side_events=(_event([side_pack[0], side_pack[1], None]),) if side_pack else (),
                )
            if status == "dup":
                recorded = self._recorded_from(result[1], created=False)
                await self._fix_external(ext_key, ext_was or main_id, recorded.event.id)
                return recorded
            if status == "locked":
                await self._wait_for_lock(result[1], deadline)
                continue
            redirects += 1
            if redirects > _MAX_STEPS:
                raise StoreError(f"customer {owner} redirects in a loop")
            if status == "redirect":
                root = self._roots[owner] = result[1]
            elif status == "stale":
                self._roots.pop(owner, None)
                root = owner
            else:
                raise StoreError(f"unexpected ingest answer {status!r}")

    def _customer_id(self) -> str:
        # A customer's tag is random; conversation and event ids then inherit it.
        return self._prefixes.next() + _encode(int.from_bytes(os.urandom(3), "big"), TAG_LENGTH)

    # --- customers ---------------------------------------------------------------------------

    async def get_customer(self, customer_id: str) -> Customer | None:
        return await self._read_customer(customer_id)

    async def _owner_of(self, identity: Identity) -> str | None:
        key = self._identity_key(identity)
        if identity.verified:
            return await self._command("GET", key)
        return await self._command("LINDEX", key, 0)

    async def find_customer(self, identity: Identity) -> Customer | None:
        owner = await self._owner_of(identity)
        return None if owner is None else await self._live(owner)

    async def _claim_verified(self, identity: Identity, customer_id: str) -> str | None:
        """Claim a verified identity; the live owner's id if somebody else holds it."""
        key = self._identity_key(identity)
        for _ in range(_MAX_STEPS):
            holder = await self._set_nx(key, customer_id)
            if holder is None or holder == customer_id:
                return None
            owner = await self._live(holder)
            if owner is not None:
                return None if owner.id == customer_id else owner.id
            if id_time_ms(holder) > time.time() * 1000 - _ORPHAN_GRACE_MS:
                return holder  # a first contact being recorded right now: it is theirs
            # Claimed long ago for a customer whose first write never happened: free.
            if await self._script("compare_and_set", key, holder, customer_id):
                return None
        raise StoreUnavailable(f"identity {identity.key} keeps changing hands")

    async def create_customer(
        self, display_name: str, identities: tuple[Identity, ...] = (), tags: tuple[str, ...] = ()
    ) -> Customer:
        customer_id = self._customer_id()
        identities = tuple(dict.fromkeys(identities))
        claimed: list[Identity] = []
        try:
            for identity in identities:
                if not identity.verified:
                    continue
                owner = await self._claim_verified(identity, customer_id)
                if owner is not None:
                    raise IdentityConflict(identity, owner)
                claimed.append(identity)
        except BaseException:
            for identity in claimed:
                await self._script("compare_and_set", self._identity_key(identity), customer_id, "")
            raise
        calls: list[_Call] = [
            _Script("claim_list", self._identity_key(i), (customer_id,))
            for i in identities
            if not i.verified
        ]
        calls.append(
            _Script(
                "create_customer",
                self._base_of(customer_id),
                (
                    customer_id,
                    display_name,
                    _dump(list(dict.fromkeys(tags))),
                    str(to_us(utcnow())),
                    *(_entry(i) for i in identities),
                ),
            )
        )
        pack = (await self._pipeline(calls))[-1]
        customer = _customer(customer_id, pack)
        assert customer is not None
        return customer

    async def _customer_write(self, customer_id: str, name: str, *args: str) -> list[Any]:
        """Run a customer script, waiting out merges; raises NotFound for no customer."""
        if not is_id(customer_id):
            raise NotFound(f"no customer {customer_id}")
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        for _ in range(10_000):
            result = await self._script(name, self._base_of(customer_id), customer_id, *args)
            if result[0] == "missing":
                raise NotFound(f"no customer {customer_id}")
            if result[0] == "locked":
                await self._wait_for_lock(result[1], deadline)
                continue
            return list(result)
        raise StoreUnavailable(f"customer {customer_id} stayed locked")

    async def link_identity(self, customer_id: str, identity: Identity) -> Customer:
        customer = await self._read_customer(customer_id)
        if customer is None:
            raise NotFound(f"no customer {customer_id}")
        if customer.merged_into is not None:
            raise InvalidOperation(f"customer {customer_id} was merged into {customer.merged_into}")
        if identity.verified:
            # Held through a merge counts as this customer's (its entry moved here).
            owner_id = await self._claim_verified(identity, customer_id)
            if owner_id is not None:
                raise IdentityConflict(identity, owner_id)
        else:
            await self._script("claim_list", self._identity_key(identity), customer_id)
        result = await self._customer_write(customer_id, "add_identity", _entry(identity))
        if result[0] == "merged":
            raise InvalidOperation(f"customer {customer_id} was merged into {result[1]}")
        linked = _customer(customer_id, result[1])
        assert linked is not None
        return linked

    async def set_customer_tags(self, customer_id: str, tags: tuple[str, ...]) -> Customer:
        result = await self._customer_write(
            customer_id, "set_customer_tags", _dump(list(dict.fromkeys(tags)))
        )
        customer = _customer(customer_id, result[1])
        assert customer is not None
        return customer

    # --- merges ------------------------------------------------------------------------------

    async def _lock(self, customer_id: str, token: str) -> list[str]:
        return list(
            await self._script(
                "lock",
                self._base_of(customer_id),
                customer_id,
                token,
                int(time.time() * 1000),
                LOCK_STALE_MS,
            )
        )

    async def _unlock(self, customer_id: str, token: str) -> None:
        try:
            await self._script("unlock", self._base_of(customer_id), customer_id, token)
        except StoreUnavailable:
            # The lock then goes stale and the next writer finishes the operation.
            log.warning("redis_store.unlock_failed", customer=customer_id)

    async def _apply(
        self, customer_id: str, token: str, ops: Sequence[tuple[Any, ...]], min_prefix: str = ""
    ) -> None:
        args: list[Any] = [customer_id, token, min_prefix]
        for op in ops:
            name, suffix, *values = op
            args.extend((name, len(values), suffix, *values))
        result = await self._script("apply", self._base_of(customer_id), *args)
        if result[0] == "retry":
            raise _Retry(result[1])
        if result[0] == "lost":
            raise StoreUnavailable(
                f"lost the lock on customer {customer_id} mid-merge (took too long); "
                "repeat the operation to finish it"
            )

    async def _members_through(
        self, members: Iterable[str], source_id: str, root_id: str
    ) -> list[str]:
        """The members of `root_id` whose merges lead into it through `source_id`: they
        leave with the source when it is unmerged. Read now, not remembered from the
        merge, since some of them may have been unmerged meanwhile."""
        members = [m for m in members if m != source_id and is_id(m)]
        if not members:
            return []
        packs = await self._pipeline(
            [_Script("read_customer", self._base_of(m), (m,)) for m in members]
        )
        merged_into = {m: _hash(pack[0]).get("mi") for m, pack in zip(members, packs, strict=True)}
        leaving: list[str] = []
        for member in members:
            step: str | None = member
            for _ in range(len(members) + 1):
                step = merged_into.get(step) if step is not None else None
                if step is None or step == root_id:
                    break
                if step == source_id:
                    leaving.append(member)
                    break
        return leaving

    async def _entry_owners(self, entries: Iterable[str]) -> dict[str, set[str]]:
        """Who holds each identity entry, by the identity's own key."""
        entries = list(dict.fromkeys(entries))
        if not entries:
            return {}
        calls: list[_Call] = []
        for entry in entries:
            identity = _identity(entry)
            key = self._identity_key(identity)
            calls.append(
                _Command(("GET", key)) if identity.verified else _Command(("LRANGE", key, 0, -1))
            )
        answers = await self._pipeline(calls)
        owners: dict[str, set[str]] = {}
        for entry, answer in zip(entries, answers, strict=True):
            if answer is None:
                owners[entry] = set()
            elif isinstance(answer, str):
                owners[entry] = {answer}
            else:
                owners[entry] = set(answer)
        return owners

    async def _export(self, customer_id: str) -> _Export:
        raw = await self._script("export", self._base_of(customer_id), customer_id)
        return _Export.parse(raw)

    async def _locked_pair(
        self, first: str, token: str, second_of: Callable[[list[str]], Awaitable[str]]
    ) -> tuple[list[str], str, list[str]]:
        """Lock `first`, then the customer `second_of` names; waits out other merges."""
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            first_state = await self._lock(first, token)
            if first_state[0] == "missing":
                raise NotFound(f"no customer {first}")
            if first_state[0] == "busy":
                await self._wait_for_lock(first_state[1], deadline)
                continue
            try:
                second = await second_of(first_state)
                second_state = await self._lock(second, token)
            except BaseException:
                await self._unlock(first, token)
                raise
            if second_state[0] == "missing":
                await self._unlock(first, token)
                raise NotFound(f"no customer {second}")
            if second_state[0] == "busy":
                # Never wait while holding a lock: two merges in opposite directions
                # would wait for each other.
                await self._unlock(first, token)
                await self._wait_for_lock(second_state[1], deadline)
                continue
            return first_state, second, second_state

    def _token(self, *parts: str) -> str:
        return "|".join((*parts, str(int(time.time() * 1000))))

    async def merge_customers(self, source_id: str, target_id: str, actor: str) -> Recorded:
        if source_id == target_id:
            raise InvalidOperation("cannot merge a customer into itself")
        for customer_id in (source_id, target_id):
            if not is_id(customer_id):
                raise NotFound(f"no customer {customer_id}")
        token = self._token("merge", source_id, target_id, actor)

        async def target(source_state: list[str]) -> str:
            if await self._read_customer(target_id) is None:
                raise NotFound(f"no customer {target_id}")
            merged_into, merge_event = source_state[1], source_state[2]
            if merged_into == target_id and merge_event:
                raise _AlreadyMerged(merge_event)
            if merged_into:
                raise InvalidOperation(
                    f"customer {source_id} was already merged into {merged_into}"
                )
            return target_id

        try:
            _, _, target_state = await self._locked_pair(source_id, token, target)
        except _AlreadyMerged as done:
            existing = await self._event_recorded(done.event_id)
            if existing is None:
                raise StoreError(f"merge event {done.event_id} is missing") from None
            return existing
        started: list[str] = []
        try:
            if target_state[1]:
                raise InvalidOperation(
                    f"customer {target_id} was merged into {target_state[1]}; merge into that"
                )
            return await self._merge_locked(source_id, target_id, actor, token, started)
        except BaseException:
            await self._abandon(started, token)
            raise
        finally:
            await self._unlock(target_id, token)
            await self._unlock(source_id, token)

    async def _abandon(self, customer_ids: Iterable[str], token: str) -> None:
        """A merge failed half-way: instead of unlocking (which would expose a half-moved
        customer), date its lock back so that the next writer finishes it at once."""
        abandoned = token.rsplit("|", 1)[0] + "|0"
        for customer_id in customer_ids:
            op = ("HSET", f":cu:{customer_id}", "lock", abandoned)
            try:
                await self._apply(customer_id, token, [op])
            except StoreError as exc:
                log.warning("redis_store.abandon_failed", customer=customer_id, error=str(exc))
            else:
                log.warning("redis_store.merge_abandoned", customer=customer_id, lock=token)

    async def _merge_locked(
        self, source_id: str, target_id: str, actor: str, token: str, started: list[str]
    ) -> Recorded:
        info = await self._script("merge_info", self._base_of(target_id), target_id, source_id)
        target_customer_pack, target_active, _, record_json = info
        source = await self._export(source_id)
        target_tag = tag_of(target_id)
        now = utcnow()
        side: Event | None = None
        if record_json and "undo" not in json.loads(record_json):
            # A previous attempt imported already and died before the source's step.
            record = json.loads(record_json)
            started[:] = [source_id]
        else:
            target_entries = set(target_customer_pack[1])
            floor = ""
            for _ in range(_MAX_STEPS):
                cand = self._prefixes.next(max(floor, source.seq))
                plan = _MergePlan.build(
                    source=source,
                    source_id=source_id,
                    target_id=target_id,
                    target_tag=target_tag,
                    target_active=target_active or None,
                    target_entries=target_entries,
                    actor=actor,
                    now=now,
                    cand=cand,
                )
                # From here on the source may be half moved: on failure it stays locked.
                started[:] = [source_id]
                try:
                    await self._apply(target_id, token, plan.target_ops, min_prefix=cand)
                except _Retry as retry:
                    floor = retry.floor
                    continue
                break
            else:
                raise StoreUnavailable("could not mint ids for the merge")
            record = plan.record
            side = plan.side_event
        await self._apply(
            source_id, token, _finish_source_ops(source, source_id, target_id, record)
        )
        index: list[_Call] = [_Command(("ZREM", self._activity_key, source_id))]
        if source.max_activity is not None:
            index.append(
                _Command(("ZADD", self._activity_key, "GT", source.max_activity, target_id))
            )
        await self._pipeline(index)
        for member in (source_id, *source.members):
            self._roots[member] = target_id
        merged = await self._event_recorded(record["event"], created=True)
        if merged is None:
            raise StoreError(f"merge event {record['event']} is missing")
        return Recorded(
            event=merged.event,
            conversation=None,
            customer=merged.customer,
            created=True,
            side_events=(side,) if side is not None else (),
        )

    async def unmerge_customers(self, source_id: str, actor: str) -> Recorded:
        if not is_id(source_id):
            raise NotFound(f"no customer {source_id}")
        token = self._token("unmerge", source_id, actor)
        merged_into = ""

        async def root(source_state: list[str]) -> str:
            nonlocal merged_into
            merged_into = source_state[1]
            if not merged_into:
                raise InvalidOperation(f"customer {source_id} is not merged into another")
            live = await self._live(merged_into)
            if live is None:
                raise StoreError(f"customer {source_id} was merged into a missing customer")
            return live.id

        _, root_id, _ = await self._locked_pair(source_id, token, root)
        started: list[str] = []
        try:
            return await self._unmerge_locked(
                source_id, merged_into, root_id, actor, token, started
            )
        except BaseException:
            await self._abandon(started, token)
            raise
        finally:
            await self._unlock(root_id, token)
            await self._unlock(source_id, token)

    async def _unmerge_locked(
        self,
        source_id: str,
        target_id: str,
        root_id: str,
        actor: str,
        token: str,
        started: list[str],
    ) -> Recorded:
        info = await self._script("merge_info", self._base_of(root_id), root_id, source_id)
        record_json = info[3]
        if not record_json:
            raise InvalidOperation(
                f"customer {source_id} is merged into {target_id} but no record of that "
                f"merge is left at {root_id}"
            )
        record = json.loads(record_json)
        if "undo" not in record:
            root = await self._export(root_id)
            source_pack = await self._script("read_customer", self._base_of(source_id), source_id)
            members = await self._members_through(root.members, source_id, root_id)
            entry_owners = await self._entry_owners(root.entries)
            floor = ""
            for _ in range(_MAX_STEPS):
                cand = self._prefixes.next(max(floor, root.seq))
                plan = _UnmergePlan.build(
                    root=root,
                    root_id=root_id,
                    source_id=source_id,
                    target_id=target_id,
                    source_entries=set(source_pack[1]),
                    record=record,
                    members=members,
                    entry_owners=entry_owners,
                    actor=actor,
                    now=utcnow(),
                    cand=cand + tag_of(root_id),
                )
                started[:] = [source_id, root_id]
                await self._apply(source_id, token, plan.source_ops)
                try:
                    await self._apply(root_id, token, plan.root_ops, min_prefix=cand)
                except _Retry as retry:
                    floor = retry.floor
                    continue
                started[:] = [source_id]
                break
            else:
                raise StoreUnavailable("could not mint ids for the unmerge")
            undo_id = plan.undo_id
            if plan.max_activity is not None:
                await self._command("ZADD", self._activity_key, plan.max_activity, source_id)
            for member in (source_id, *members):
                self._roots.pop(member, None)
        else:
            undo_id = record["undo"]
            started[:] = [source_id]
        await self._apply(source_id, token, [("HDEL", f":cu:{source_id}", "mi", "mev")])
        undone = await self._event_recorded(undo_id, created=True)
        if undone is None:
            raise StoreError(f"unmerge event {undo_id} is missing")
        return Recorded(
            event=undone.event, conversation=None, customer=undone.customer, created=True
        )

    # --- conversations -------------------------------------------------------------------------

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        if not is_id(conversation_id):
            return None
        base = self._base_of(conversation_id)
        for _ in range(_MAX_STEPS):
            fields = _hash(await self._script("read_conversation", base, conversation_id))
            if "mv" in fields:
                base = self._base_of(fields["mv"])
                continue
            return _conversation(conversation_id, fields) if fields else None
        raise StoreError(f"conversation {conversation_id} forwards too deep")

    async def active_conversation(self, customer_id: str) -> Conversation | None:
        if not is_id(customer_id):
            return None
        found = await self._script("active", self._base_of(customer_id), customer_id)
        if not found:
            return None
        return _conversation(found[0], _hash(found[1]))

    async def list_conversations(
        self, query: ConversationQuery, limit: int = 50, before: str | None = None
    ) -> Page[Conversation]:
        _check_limit(limit)
        cursor = _parse_cursor(before) if before is not None else None
        if query.customer_id is not None:
            customers = [query.customer_id] if is_id(query.customer_id) else []
        else:
            # Every customer with conversations, filtered here: O(customers) per call,
            # which is fine for an inbox of thousands and the known next step beyond.
            customers = await self._command("ZRANGE", self._activity_key, 0, -1)
        by_base: dict[str, list[str]] = {}
        for customer_id in customers:
            by_base.setdefault(self._base_of(customer_id), []).append(customer_id)
        bases = list(by_base)
        matches: list[Conversation] = []
        chunk = 256
        for start in range(0, len(bases), chunk):
            part = bases[start : start + chunk]
            results = await self._pipeline(
                [_Script("customer_conversations", b, tuple(by_base[b])) for b in part]
            )
            for base, per_customer in zip(part, results, strict=True):
                for customer_id, convs in zip(by_base[base], per_customer, strict=True):
                    for flat in convs:
                        fields = _hash(flat)
                        if fields.get("cu") != customer_id:
                            continue
                        conv = _conversation(fields["id"], fields)
                        if _matches(conv, query):
                            matches.append(conv)
        matches.sort(key=lambda c: (to_us(c.last_activity_at), c.id), reverse=True)
        total = len(matches)
        if cursor is not None:
            matches = [c for c in matches if (to_us(c.last_activity_at), c.id) < cursor]
        items = tuple(matches[:limit])
        next_cursor = (
            f"{to_us(items[-1].last_activity_at)}.{items[-1].id}" if len(matches) > limit else None
        )
        return Page(items=items, next_cursor=next_cursor, total=total)

    async def _conversation_write(
        self,
        conversation_id: str,
        name: str,
        args: Callable[[str, str], tuple[Any, ...]],
        ahead: Callable[[str], list[_Call]] | None = None,
    ) -> tuple[list[Any], str, list[Any]]:
        """Run a conversation script where the conversation lives now, minting ids there.

        Returns the script's answer, the event id it was offered, and the answers of the
        `ahead` calls (global entries written in the same round trip for that id).
        """
        if not is_id(conversation_id):
            raise NotFound(f"no conversation {conversation_id}")
        tag = tag_of(conversation_id)
        floor = ""
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        for _ in range(10_000):
            cand = self._prefixes.next(floor)
            event_id = cand + tag
            calls = list(ahead(event_id)) if ahead is not None else []
            calls.append(_Script(name, self._base(tag), (conversation_id, *args(cand, tag))))
            answers = await self._pipeline(calls)
            result = answers[-1]
            status = result[0]
            if status == "moved":
                tag = tag_of(result[1])
            elif status == "missing":
                raise NotFound(f"no conversation {conversation_id}")
            elif status == "locked":
                await self._wait_for_lock(result[1], deadline)
            elif status == "retry":
                floor = result[1]
                # Strict writers racing for one customer: spread them out a little.
                await asyncio.sleep(random.random() / 1000)
            else:
                return list(result), event_id, answers[:-1]
        raise StoreUnavailable(f"conversation {conversation_id} stayed busy")

    def _recorded(self, result: Sequence[Any], conversation_id: str, created: bool) -> Recorded:
        customer_id = _split_stored(result[1][1])[0]
        customer = _customer(customer_id, result[3])
        assert customer is not None
        return Recorded(
            event=_event(result[1]),
            conversation=_conversation(conversation_id, _hash(result[2])),
            customer=customer,
            created=created,
        )

    async def set_status(
        self,
        conversation_id: str,
        status: ConversationStatus,
        actor: str,
        snoozed_until: datetime | None = None,
    ) -> Recorded:
        until = snoozed_until if status is ConversationStatus.SNOOZED else None
        until_us = None if until is None else str(to_us(until))

        def args(cand: str, tag: str) -> tuple[Any, ...]:
            return (
                status.value,
                actor,
                _opt(until_us),
                _opt(iso(until)),
                cand,
                tag,
                str(to_us(utcnow())),
            )

        result, _, _ = await self._conversation_write(conversation_id, "set_status", args)
        if result[0] == "conflict":
            raise InvalidOperation(
                f"the customer already has an active conversation {result[1]}; "
                f"resolve it before reopening {conversation_id}"
            )
        if result[0] == "same" and not result[1][1]:
            raise InvalidOperation(f"conversation {conversation_id} has no events")
        return self._recorded(result, conversation_id, created=result[0] == "ok")

    async def assign(
        self,
        conversation_id: str,
        agent_id: str | None,
        actor: str,
        queue: str | None = None,
    ) -> Recorded:
        def args(cand: str, tag: str) -> tuple[Any, ...]:
            return (_opt(agent_id), actor, _opt(queue), cand, tag, str(to_us(utcnow())))

        result, _, _ = await self._conversation_write(conversation_id, "assign", args)
        return self._recorded(result, conversation_id, created=result[0] == "ok")

    async def set_conversation_tags(
        self, conversation_id: str, tags: tuple[str, ...]
    ) -> Conversation:
        tags_json = _dump(list(dict.fromkeys(tags)))
        result, _, _ = await self._conversation_write(
            conversation_id, "set_conversation_tags", lambda cand, tag: (tags_json,)
        )
        return _conversation(conversation_id, _hash(result[1]))

    async def append(self, conversation_id: str, draft: EventDraft) -> Recorded:
        ext_key = (
            self._external_key(draft.channel, draft.external_id)
            if draft.external_id is not None
            else None
        )
        if ext_key is not None:
            known = await self._command("GET", ext_key)
            if known is not None:
                existing = await self._event_recorded(known)
                if (
                    existing is not None
                    and existing.event.channel == draft.channel
                    and existing.event.external_id == draft.external_id
                ):
                    return existing
        now = utcnow()
        body = _body(
            kind=draft.kind,
            direction=draft.direction,
            author=draft.author,
            created_at=now,
            channel=draft.channel,
            channel_type=draft.channel_type,
            text=draft.text,
            html=draft.html,
            attachments=draft.attachments,
            external_id=draft.external_id,
            delivery_state=draft.delivery_state,
            data=draft.data,
        )
        first_response = draft.direction is Direction.OUT and draft.kind is EventKind.MESSAGE

        def args(cand: str, tag: str) -> tuple[Any, ...]:
            return (
                cand,
                tag,
                str(to_us(now)),
                body,
                "1" if draft.kind in _ACTIVITY_KINDS else "0",
                "1" if first_response else "0",
                draft.channel,
                _opt(draft.external_id),
                _opt(draft.thread_key),
                # The outbox entry written ahead must name the very id that commits.
                "1" if draft.delivery_state is DeliveryState.QUEUED else "0",
            )

        def ahead(event_id: str) -> list[_Call]:
            # Written before the script commits, so a crash cannot leave a queued
            # message out of the outbox; orphans are dropped by the claimer.
            calls: list[_Call] = []
            if ext_key is not None:
                calls.append(_set_nx_get(ext_key, event_id))
            if draft.delivery_state is DeliveryState.QUEUED:
                calls.append(_Command(("ZADD", f"{self._outbox}:due", to_us(now), event_id)))
            return calls

        result, offered, answers = await self._conversation_write(
            conversation_id, "append", args, ahead
        )
        if result[0] == "dup":
            recorded = self._recorded_from(result[1], created=False)
        else:
            recorded = self._recorded(result, conversation_id, created=True)
        if ext_key is not None:
            await self._fix_external(ext_key, answers[0] or offered, recorded.event.id)
        return recorded

    # --- timeline ----------------------------------------------------------------------------

    async def get_event(self, event_id: str) -> Event | None:
        item = (await self._read_events([event_id])).get(event_id)
        return None if item is None else _event(item[0])

    async def find_event(self, channel: str, external_id: str) -> Event | None:
        event_id = await self._command("GET", self._external_key(channel, external_id))
        if event_id is None:
            return None
        event = await self.get_event(event_id)
        if event is None or event.channel != channel or event.external_id != external_id:
            return None  # an entry written ahead of a write that never committed
        return event

    async def _event_page(
        self, kind: str, owner_id: str, direction: str, cursor: str | None, limit: int
    ) -> tuple[int, list[Event]]:
        if not is_id(owner_id):
            return 0, []
        base = self._base_of(owner_id)
        for _ in range(_MAX_STEPS):
            result = await self._script(
                "event_page", base, kind, owner_id, direction, _opt(cursor), limit
            )
            if result[0] == "moved":
                base = self._base_of(result[1])
                continue
            return int(result[1]), [_event(pack) for pack in result[2] if pack[1]]
        raise StoreError(f"{owner_id} forwards too deep")

    async def customer_timeline(
        self, customer_id: str, limit: int = 50, before: str | None = None
    ) -> Page[Event]:
        _check_limit(limit)
        _check_event_cursor(before)
        total, events = await self._event_page("tl", customer_id, "desc", before, limit + 1)
        return _page(events, limit, total)

    async def conversation_events(
        self, conversation_id: str, limit: int = 50, before: str | None = None
    ) -> Page[Event]:
        _check_limit(limit)
        _check_event_cursor(before)
        total, events = await self._event_page("ce", conversation_id, "desc", before, limit + 1)
        return _page(events, limit, total)

    async def events_after(
        self, conversation_id: str, after_id: str | None, limit: int = 500
    ) -> list[Event]:
        _check_limit(limit)
        _, events = await self._event_page("ce", conversation_id, "asc", after_id, limit)
        return events

    # --- outbox --------------------------------------------------------------------------------

    async def claim_outbound(self, now: datetime, limit: int, lease: timedelta) -> list[OutboxItem]:
        now_us = to_us(now)
        claimed = await self._script(
            "outbox_claim", self._outbox, now_us, limit, to_us(now + lease)
        )
        if not claimed:
            return []
        events = await self._read_events(eid for eid, _ in claimed)
        items: list[OutboxItem] = []
        cleanup: list[_Call] = []
        due, attempts = f"{self._outbox}:due", f"{self._outbox}:att"
        for event_id, before in claimed:
            item = events.get(event_id)
            if item is None:
                if id_time_ms(event_id) < now_us // 1000 - _ORPHAN_GRACE_MS:
                    cleanup += [
                        _Command(("ZREM", due, event_id)),
                        _Command(("HDEL", attempts, event_id)),
                    ]
                else:  # its append may still be in flight: look again shortly
                    cleanup += [
                        _Command(("ZADD", due, now_us + 2_000_000, event_id)),
                        _Command(("HINCRBY", attempts, event_id, -1)),
                    ]
                continue
            event = _event(item[0])
            if event.delivery_state is DeliveryState.QUEUED:
                items.append(OutboxItem(event=event, attempts=int(before)))
            else:  # delivered or failed meanwhile; the entry outlived its removal
                cleanup += [
                    _Command(("ZREM", due, event_id)),
                    _Command(("HDEL", attempts, event_id)),
                ]
        if cleanup:
            await self._pipeline(cleanup)
        return items

    async def record_delivery(
        self,
        event_id: str,
        state: DeliveryState,
        *,
        error: str | None = None,
        provider_id: str | None = None,
        retry_at: datetime | None = None,
        attempts: int | None = None,
    ) -> Event:
        if not is_id(event_id):
            raise NotFound(f"no event {event_id}")
        if provider_id is not None:
            event = await self.get_event(event_id)
            if event is None:
                raise NotFound(f"no event {event_id}")
            key = self._external_key(event.channel, provider_id)
            holder = await self._set_nx(key, event_id)
            if holder is not None and holder != event_id:
                other = await self.get_event(holder)
                if (
                    other is not None
                    and other.channel == event.channel
                    and other.external_id == provider_id
                ):
                    raise InvalidOperation(
                        f"provider id {provider_id} already belongs to another event on "
                        f"channel {event.channel!r}"
                    )
                await self._command("SET", key, event_id)
        base = self._base_of(event_id)
        for _ in range(_MAX_STEPS):
            result = await self._script(
                "delivery",
                base,
                event_id,
                state.value,
                _opt(error),
                _opt(provider_id),
                _FINAL_STATES,
            )
            if result[0] == "moved":
                base = self._base_of(result[1])
                continue
            break
        else:
            raise StoreError(f"event {event_id} forwards too deep")
        if result[0] == "missing":
            raise NotFound(f"no event {event_id}")
        if result[0] == "nodelivery":
            raise InvalidOperation(f"event {event_id} has no delivery to update")
        updated = _event(result[1])
        due, att = f"{self._outbox}:due", f"{self._outbox}:att"
        if updated.delivery_state is DeliveryState.QUEUED and state is DeliveryState.QUEUED:
            at = retry_at if retry_at is not None else utcnow()
            calls: list[_Call] = [_Command(("ZADD", due, to_us(at), event_id))]
            if attempts is not None:
                calls.append(_Command(("HSET", att, event_id, attempts)))
            await self._pipeline(calls)
        elif updated.delivery_state is not DeliveryState.QUEUED:
            await self._pipeline(
                [_Command(("ZREM", due, event_id)), _Command(("HDEL", att, event_id))]
            )
        return updated

    # --- channel state -----------------------------------------------------------------------

    def lease(self, name: str, owner: str, ttl_seconds: float) -> Lease:
        if self._redis is None:
            raise StoreUnavailable("the Redis store is not started")
        return RedisLease(self._redis, name, owner, ttl_seconds, key_prefix=self._prefix)

    async def get_state(self, key: str) -> str | None:
        return await self._command("HGET", self._state_key, key)

    async def set_state(self, key: str, value: str) -> None:
        await self._command("HSET", self._state_key, key, value)


# --- helpers of reads ---------------------------------------------------------------------


def _page(events: list[Event], limit: int, total: int) -> Page[Event]:
    items = tuple(events[:limit])
    next_cursor = items[-1].id if len(events) > limit else None
    return Page(items=items, next_cursor=next_cursor, total=total)


def _parse_cursor(cursor: str) -> tuple[int, str]:
    at, _, conversation_id = cursor.partition(".")
    try:
        return int(at), conversation_id
    except ValueError:
        raise InvalidOperation(f"not a conversation cursor: {cursor[:60]!r}") from None


def _matches(conv: Conversation, query: ConversationQuery) -> bool:
    if query.statuses and conv.status not in query.statuses:
        return False
    if query.unassigned and conv.assignee is not None:
        return False
    if query.assignee is not None and conv.assignee != query.assignee:
        return False
    if query.channel is not None and conv.channel != query.channel:
        return False
    if query.queue is not None and conv.queue != query.queue:
        return False
    return query.customer_id is None or conv.customer_id == query.customer_id


# --- merge planning -----------------------------------------------------------------------


class _AlreadyMerged(Exception):
    def __init__(self, event_id: str) -> None:
        self.event_id = event_id


@dataclass(slots=True)
class _ExportedConversation:
    id: str
    fields: dict[str, str]
    event_ids: list[str]


@dataclass(slots=True)
class _Export:
    """Everything stored for one customer in its slot (see the EXPORT script)."""

    customer: dict[str, str]
    entries: list[str]
    conversations: list[_ExportedConversation]
    events: list[list[Any]]  # packs; no forwards (a customer's timeline is local)
    external: dict[str, str]
    threads: dict[str, str]
    members: list[str]
    records: dict[str, str]
    seq: str

    @classmethod
    def parse(cls, raw: Sequence[Any]) -> _Export:
        pack, convs, events, external, threads, members, records, seq = raw
        return cls(
            customer=_hash(pack[0]),
            entries=list(pack[1]),
            conversations=[_ExportedConversation(c[0], _hash(c[1]), list(c[2])) for c in convs],
            events=[list(e) for e in events if e[1] and not _forward(e[1])],
            external=_hash(external),
            threads=_hash(threads),
            members=list(members),
            records=_hash(records),
            seq=seq or "",
        )

    @property
    def max_activity(self) -> int | None:
        values = [int(c.fields["la"]) for c in self.conversations if "la" in c.fields]
        return max(values) if values else None


def _rehome(stored: str, customer_id: str) -> str:
    _, conversation_id, body = _split_stored(stored)
    return f"{customer_id}{_SEP}{conversation_id}{_SEP}{body}"


def _flat(fields: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for name, value in fields.items():
        out += [name, value]
    return out


def _import_ops(
    conversations: Iterable[_ExportedConversation],
    events: Iterable[list[Any]],
    owner: str,
) -> list[tuple[Any, ...]]:
    """Writes that make conversations and events (with their delivery) `owner`'s."""
    ops: list[tuple[Any, ...]] = []
    top = ""
    for conv in conversations:
        fields = {k: v for k, v in conv.fields.items() if k not in ("mv", "id")}
        fields["cu"] = owner
        ops += [
            ("DEL", f":cv:{conv.id}"),
            ("HSET", f":cv:{conv.id}", *_flat(fields)),
            ("DEL", f":ce:{conv.id}"),
            ("SADD", f":cc:{owner}", conv.id),
        ]
        if conv.event_ids:
            ops.append(("ZADD0", f":ce:{conv.id}", *conv.event_ids))
    ev_fields: list[str] = []
    dl_fields: list[str] = []
    timeline: list[str] = []
    for event_id, stored, delivery in events:
        ev_fields += [event_id, _rehome(stored, owner)]
        if delivery:
            dl_fields += [event_id, delivery]
        timeline.append(event_id)
        top = max(top, event_id[:PREFIX_LENGTH])
    if ev_fields:
        ops.append(("HSET", ":ev", *ev_fields))
        ops.append(("ZADD0", f":tl:{owner}", *timeline))
    if dl_fields:
        ops.append(("HSET", ":dl", *dl_fields))
    if top:
        # Ids minted here from now on must sort after every id that moved in.
        ops.append(("SEQ", "", top))
    return ops


def _forward_ops(
    conversation_ids: Iterable[str], event_ids: Iterable[str], owner: str, to: str
) -> list[tuple[Any, ...]]:
    """Writes that leave forwards to `to` for conversations and events moving away."""
    ops: list[tuple[Any, ...]] = []
    event_ids = list(event_ids)
    for conv_id in conversation_ids:
        ops += [
            ("DEL", f":cv:{conv_id}"),
            ("HSET", f":cv:{conv_id}", "mv", to),
            ("DEL", f":ce:{conv_id}"),
            ("SREM", f":cc:{owner}", conv_id),
        ]
    if event_ids:
        forwards: list[str] = []
        for event_id in event_ids:
            forwards += [event_id, "@" + to]
        ops += [
            ("HSET", ":ev", *forwards),
            ("HDEL", ":dl", *event_ids),
            ("ZREM", f":tl:{owner}", *event_ids),
        ]
    return ops


def _internal_body(
    kind: EventKind,
    author: str,
    now: datetime,
    data: Mapping[str, Any],
    origin: str | None = None,
) -> str:
    body = _body(kind=kind, direction=Direction.INTERNAL, author=author, created_at=now, data=data)
    if origin is None:
        return body
    # Events outside any conversation remember the customer they were made for: unmerge
    # moves them by it (readers ignore the extra key).
    return body[:-1] + f',"og":{_dump(origin)}}}'


def _loose_origin(stored: str) -> str | None:
    _, conversation_id, body = _split_stored(stored)
    if conversation_id:
        return None
    origin = json.loads(body).get("og")
    return origin if isinstance(origin, str) else None


@dataclass(slots=True)
class _MergePlan:
    target_ops: list[tuple[Any, ...]]
    record: dict[str, Any]
    side_event: Event | None

    @classmethod
    def build(
        cls,
        *,
        source: _Export,
        source_id: str,
        target_id: str,
        target_tag: str,
        target_active: str | None,
        target_entries: set[str],
        actor: str,
        now: datetime,
        cand: str,
    ) -> _MergePlan:
        side_id = cand + target_tag
        merge_id = _inc(cand) + target_tag
        now_us = str(to_us(now))
        source_active = source.customer.get("act")
        # Copies: a plan may be built again (id race) from the same export.
        conversations = [
            _ExportedConversation(c.id, dict(c.fields), list(c.event_ids))
            for c in source.conversations
        ]
        events = list(source.events)
        ops: list[tuple[Any, ...]] = []
        side_event: Event | None = None
        if source_active and target_active:
            # Both active: the target's stays; the source's is resolved, on record.
            for conv in conversations:
                if conv.id == source_active:
                    old = conv.fields["st"]
                    conv.fields = {**conv.fields, "st": "resolved", "ra": now_us}
                    conv.fields.pop("su", None)
                    conv.event_ids = [*conv.event_ids, side_id]
                    body = _internal_body(
                        EventKind.STATUS,
                        actor,
                        now,
                        {"from": old, "to": "resolved", "reason": "merge"},
                    )
                    stored = f"{target_id}{_SEP}{conv.id}{_SEP}{body}"
                    events.append([side_id, stored, None])
                    side_event = _event([side_id, stored, None])
        elif source_active:
            ops.append(("HSET", f":cu:{target_id}", "act", source_active))
        merge_body = _internal_body(
            EventKind.MERGE, actor, now, {"source": source_id, "target": target_id}, target_id
        )
        events.append([merge_id, f"{target_id}{_SEP}{_SEP}{merge_body}", None])
        ops = _import_ops(conversations, events, target_id) + ops
        if source.external:
            ops.append(("HSET", f":x:{target_id}", *_flat(source.external)))
        for key, convs in source.threads.items():
            for conv_id in convs.split():
                ops.append(("ADDWORD", f":th:{target_id}", key, conv_id))
        moved_entries = [e for e in dict.fromkeys(source.entries) if e not in target_entries]
        if moved_entries:
            ops.append(("RPUSH", f":ci:{target_id}", *moved_entries))
        ops.append(("SADD", f":mb:{target_id}", source_id, *source.members))
        # What unmerge needs is found from origins when it runs; `identities` only lets
        # a resumed merge finish the source's side.
        record = {"into": target_id, "event": merge_id, "identities": moved_entries}
        # Records of merges into the source travel with their customers; records of
        # merges undone since are history and must not overwrite the target's.
        carried = {m: r for m, r in source.records.items() if m in set(source.members)}
        ops.append(("HSET", f":mg:{target_id}", *_flat(carried), source_id, _dump(record)))
        ops.append(("UNLOCK", ""))
        return cls(target_ops=ops, record=record, side_event=side_event)


def _finish_source_ops(
    source: _Export, source_id: str, target_id: str, record: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    ops = _forward_ops(
        [c.id for c in source.conversations], [e[0] for e in source.events], source_id, target_id
    )
    ops += [
        ("DEL", f":tl:{source_id}"),
        ("DEL", f":cc:{source_id}"),
        ("DEL", f":x:{source_id}"),
        ("DEL", f":th:{source_id}"),
        ("DEL", f":mb:{source_id}"),
        ("DEL", f":mg:{source_id}"),
        ("HSET", f":cu:{source_id}", "mi", target_id, "mev", record["event"]),
        ("HDEL", f":cu:{source_id}", "act"),
    ]
    if record["identities"]:
        # Claims the target already had stay behind; the rest now belong to the target.
        ops.append(("LREM", f":ci:{source_id}", *record["identities"]))
    return ops


@dataclass(slots=True)
class _UnmergePlan:
    source_ops: list[tuple[Any, ...]]
    root_ops: list[tuple[Any, ...]]
    undo_id: str
    max_activity: int | None

    @classmethod
    def build(
        cls,
        *,
        root: _Export,
        root_id: str,
        source_id: str,
        target_id: str,
        source_entries: set[str],
        record: dict[str, Any],
        members: list[str],
        entry_owners: Mapping[str, set[str]],
        actor: str,
        now: datetime,
        cand: str,
    ) -> _UnmergePlan:
        # Who leaves: the source and whoever is merged into it. What leaves is decided by
        # origin (the customer a conversation or loose event was made for, the holder of
        # an identity), never by what the merge moved: later merges and unmerges of
        # others may have moved things in and out since.
        leaving = {source_id, *members}
        staying = ({root_id} | set(root.members)) - leaving
        conversations = [c for c in root.conversations if c.fields.get("og") in leaving]
        moving_ids = {eid for c in conversations for eid in c.event_ids}
        moving_ids |= {e[0] for e in root.events if _loose_origin(e[1]) in leaving}
        events = [e for e in root.events if e[0] in moving_ids]
        moving_ids = {e[0] for e in events}
        conv_ids = {c.id for c in conversations}
        identities = [e for e in root.entries if entry_owners.get(e, set()) & leaving]
        # A claim held on both sides (unverified) stays here as well.
        dropped = [e for e in identities if not entry_owners.get(e, set()) & staying]

        source_ops = _import_ops(conversations, events, source_id)
        external = {f: eid for f, eid in root.external.items() if eid in moving_ids}
        if external:
            source_ops.append(("HSET", f":x:{source_id}", *_flat(external)))
        staying_threads: dict[str, list[str]] = {}
        for key, convs in root.threads.items():
            for conv_id in convs.split():
                if conv_id in conv_ids:
                    source_ops.append(("ADDWORD", f":th:{source_id}", key, conv_id))
                else:
                    staying_threads.setdefault(key, []).append(conv_id)
        entries = [e for e in identities if e not in source_entries]
        if entries:
            source_ops.append(("RPUSH", f":ci:{source_id}", *entries))
        if members:
            source_ops.append(("SADD", f":mb:{source_id}", *members))
        records = {m: root.records[m] for m in members if m in root.records}
        if records:
            source_ops.append(("HSET", f":mg:{source_id}", *_flat(records)))
        root_active = root.customer.get("act")
        if root_active in conv_ids:
            source_ops.append(("HSET", f":cu:{source_id}", "act", root_active))

        undo_body = _internal_body(
            EventKind.MERGE,
            actor,
            now,
            {"undo": True, "source": source_id, "target": target_id},
            root_id,
        )
        root_ops = _forward_ops(conv_ids, moving_ids, root_id, source_id)
        if external:
            root_ops.append(("HDEL", f":x:{root_id}", *external))
        for key, convs in root.threads.items():
            staying = staying_threads.get(key)
            if staying is None:
                root_ops.append(("HDEL", f":th:{root_id}", key))
            elif len(staying) != len(convs.split()):
                root_ops.append(("HSET", f":th:{root_id}", key, " ".join(staying)))
        if dropped:
            root_ops.append(("LREM", f":ci:{root_id}", *dropped))
        root_ops.append(("SREM", f":mb:{root_id}", source_id, *members))
        if records:
            root_ops.append(("HDEL", f":mg:{root_id}", *records))
        if root_active in conv_ids:
            root_ops.append(("HDEL", f":cu:{root_id}", "act"))
        root_ops += [
            ("HSET", ":ev", cand, f"{root_id}{_SEP}{_SEP}{undo_body}"),
            ("ZADD0", f":tl:{root_id}", cand),
            ("HSET", f":mg:{root_id}", source_id, _dump({**record, "undo": cand})),
            ("SEQ", "", cand[:PREFIX_LENGTH]),
            ("UNLOCK", ""),
        ]
        activity = [int(c.fields["la"]) for c in conversations if "la" in c.fields]
        return cls(
            source_ops=source_ops,
            root_ops=root_ops,
            undo_id=cand,
            max_activity=max(activity) if activity else None,
        )


__all__ = ["RedisStore", "from_us", "safe_url", "tag_of", "to_us"]
