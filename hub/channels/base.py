"""The adapter contract: what every channel module provides to the hub.

An adapter knows its wire format and nothing else: it turns payloads into `Inbound`
values handed to `HubServices.ingestor`, and turns an `Outbound` into a wire call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from hub.bus import Bus
from hub.ingest import Ingestor
from hub.model import ChannelType, DeliveryState, Outbound
from hub.timeline.store import TimelineStore

if TYPE_CHECKING:
    from hub.config import Config


@dataclass(frozen=True, slots=True)
class HubServices:
    """What an adapter may use: handed over at start, never imported as globals."""

    config: Config
    store: TimelineStore
    bus: Bus
    ingestor: Ingestor


class PermanentSendError(Exception):
    """The provider refused for good (4xx/5xx reply, opted-out customer): do not retry."""


class TemporarySendError(Exception):
    """Worth retrying later (timeouts, 429, 5xx, connection refused)."""


@dataclass(frozen=True, slots=True)
class SendResult:
    state: DeliveryState  # usually SENT; QUEUED when the provider only queued it
    provider_id: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


class ChannelAdapter(Protocol):
    name: str
    type: ChannelType

    def routes(self) -> list[web.AbstractRouteDef]:
        """HTTP routes this channel serves (webhooks, WebSocket, widget)."""

    async def start(self, services: HubServices) -> None:
        """Open connections, start background tasks (IMAP fetch...)."""

    async def stop(self) -> None: ...

    async def send(self, outbound: Outbound) -> SendResult:
        """Deliver one message or raise Temporary/PermanentSendError."""

    def status(self) -> dict[str, Any]:
        """For /readyz and admins: {"ok": bool, ...details}."""
