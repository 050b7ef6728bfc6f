"""SMS and MMS through Twilio Messaging: webhooks in, the Messages API out, status callbacks.

Routes (paste them into the number's Messaging configuration, see docs/twilio.md):
  POST /twilio/{channel}/sms          an incoming SMS/MMS
  POST /twilio/{channel}/sms/status   delivery status of a message the hub sent

Each request does only: verify the signature, de-duplicate (MessageSid), store, answer.
Routing and fan-out hang off the bus, after the answer.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web
from twilio.base import values
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.twiml.messaging_response import MessagingResponse

from hub.channels.base import PermanentSendError, SendResult
from hub.channels.twilio import (
    TWIML_CONTENT_TYPE,
    TwilioChannel,
    describe_error,
    send_error,
)
from hub.identities import InvalidIdentity, normalize
from hub.model import (
    SYSTEM,
    Attachment,
    ChannelType,
    Customer,
    DeliveryState,
    Direction,
    EventDraft,
    EventKind,
    IdentityKind,
    Inbound,
    Outbound,
    Recorded,
)

if TYPE_CHECKING:
    from hub.config import Config, SmsChannel

log = structlog.get_logger(__name__)

OPT_OUT_TAG = "sms-opted-out"
OPT_OUT_REFUSAL = "customer opted out of SMS (replied STOP)"
UNSUBSCRIBED_ERROR = 21610  # Twilio: "Attempt to send to unsubscribed recipient"

# Twilio's default opt-out keywords: matched on the whole trimmed body, any case.
STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE"})
START_WORDS = frozenset({"START", "UNSTOP", "YES"})
HELP_WORDS = frozenset({"HELP", "INFO"})

# Twilio sends at most 10 media per MMS; never trust a larger NumMedia.
MAX_MEDIA = 10
ALLOWED_MEDIA_PREFIXES = ("image/", "audio/", "video/")
ALLOWED_MEDIA_TYPES = frozenset({"application/pdf", "text/vcard", "text/x-vcard"})

# MessageStatus -> what the timeline shows. Twilio's own "queued/accepted" mean it has
# the message, which the outbox already recorded as sent.
STATUS_STATES: Mapping[str, DeliveryState] = {
    "accepted": DeliveryState.QUEUED,
    "scheduled": DeliveryState.QUEUED,
    "queued": DeliveryState.QUEUED,
    "sending": DeliveryState.SENT,
    "sent": DeliveryState.SENT,
    "delivered": DeliveryState.DELIVERED,
    "read": DeliveryState.DELIVERED,
    "undelivered": DeliveryState.UNDELIVERED,
    "failed": DeliveryState.FAILED,
    "canceled": DeliveryState.FAILED,
}
_RANK: Mapping[DeliveryState, int] = {
    DeliveryState.QUEUED: 0,
    DeliveryState.SENT: 1,
    DeliveryState.DELIVERED: 2,
    DeliveryState.UNDELIVERED: 2,
    DeliveryState.FAILED: 2,
}


def advances(current: DeliveryState, new: DeliveryState) -> bool:
    """Whether a status callback moves the event forward (callbacks arrive out of order).

    Never backwards, and never to QUEUED: a queued state would put the event back in the
    outbox and send it again.
    """
    return _RANK[new] > _RANK[current]


def keyword_of(body: str, opt_out_type: str | None) -> str | None:
    """The keyword ("STOP", "START" or "HELP") when the message is one of Twilio's.

    Twilio's Advanced Opt-Out names the keyword itself (OptOutType); otherwise the
    whole trimmed body is compared with the default keyword lists.
    """
    if opt_out_type and opt_out_type.upper() in ("STOP", "START", "HELP"):
        return opt_out_type.upper()
    word = body.strip().upper()
    if word in STOP_WORDS:
        return "STOP"
    if word in START_WORDS:
        return "START"
    if word in HELP_WORDS:
        return "HELP"
    return None


def media_allowed(content_type: str) -> bool:
    return content_type.startswith(ALLOWED_MEDIA_PREFIXES) or content_type in ALLOWED_MEDIA_TYPES


def parse_media(
    form: Mapping[str, str], message_sid: str
) -> tuple[tuple[Attachment, ...], list[dict[str, str]]]:
    """MMS media as attachments (provider URLs), plus what was refused and why."""
    if form.get("NumMedia", "0") == "0":
        return (), []  # a plain SMS: most of them
    try:
        count = min(max(int(form.get("NumMedia") or 0), 0), MAX_MEDIA)
    except ValueError:
        count = 0
    accepted: list[Attachment] = []
    rejected: list[dict[str, str]] = []
    for index in range(count):
        url = form.get(f"MediaUrl{index}", "")
        raw_type = form.get(f"MediaContentType{index}", "")
        content_type = raw_type.split(";", 1)[0].strip().lower()
        if not url:
            continue
        if not media_allowed(content_type):
            rejected.append(
                {"url": url, "content_type": raw_type, "reason": "media type not accepted"}
            )
            continue
        # Twilio's media URLs end in the media SID (ME...): a stable, unique file name.
        stem = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1] or f"{message_sid}-{index}"
        extension = mimetypes.guess_extension(content_type) or ""
        if content_type in ("text/vcard", "text/x-vcard"):
            extension = ".vcf"
        # Size is unknown until someone fetches the bytes (Twilio does not say); 0 = unknown.
        accepted.append(
            Attachment(filename=stem + extension, content_type=content_type, size=0, url=url)
        )
    return tuple(accepted), rejected


# Built once: the answer to every inbound SMS is the same empty document.
_EMPTY_TWIML = str(MessagingResponse()).encode()


def empty_twiml() -> web.Response:
    return web.Response(body=_EMPTY_TWIML, content_type=TWIML_CONTENT_TYPE)


class SmsAdapter(TwilioChannel):
    type = ChannelType.SMS
    channel: SmsChannel

    def __init__(self, channel: SmsChannel, config: Config) -> None:
        super().__init__(channel, config)
        self.status_callback_url = self.verifier.public(f"/twilio/{self.name}/sms/status")

    # --- lifecycle -------------------------------------------------------------------

    def routes(self) -> list[web.AbstractRouteDef]:
        base = f"/twilio/{self.name}/sms"
        return [web.post(base, self.handle_sms), web.post(f"{base}/status", self.handle_status)]

    # --- inbound ---------------------------------------------------------------------

    async def handle_sms(self, request: web.Request) -> web.StreamResponse:
        form = await self.verifier.verified_form(request)
        sid = form.get("MessageSid") or form.get("SmsSid") or ""
        if not sid:
            return web.json_response({"error": "MessageSid is missing"}, status=400)
        try:
            identity = normalize(
                IdentityKind.PHONE, form.get("From", ""), default_region=self._region
            )
        except InvalidIdentity as exc:
            self._log.warning("sms.bad_sender", message_sid=sid, error=str(exc))
            return web.json_response({"error": f"From: {exc}"}, status=400)
        body = form.get("Body", "")
        attachments, rejected = parse_media(form, sid)
        keyword = keyword_of(body, form.get("OptOutType"))
        data: dict[str, Any] = {"message_sid": sid, "from": identity.value}
        if form.get("To"):
            data["to"] = form["To"]
        if rejected:
            data["rejected_media"] = rejected
        if keyword:
            data["sms_keyword"] = keyword
        recorded = await self.services.ingestor.ingest(
            Inbound(
                channel=self.name,
                channel_type=ChannelType.SMS,
                external_id=sid,
                identity=identity,
                text=body,
                attachments=attachments,
                # Twilio answers keywords itself; they need no agent.
                routable=keyword is None,
                data=data,
            )
        )
        if keyword in ("STOP", "START"):
            await self._record_opt(recorded, keyword, sid)
        return empty_twiml()

    async def _record_opt(self, recorded: Recorded, keyword: str, sid: str) -> None:
        """Tag the customer opted out (STOP) or back in (START), with a note saying so.

        Done again for a redelivered message only if its note is missing (a crash between
        the two writes), so an old STOP replayed after a START does not undo it.
        """
        store = self.services.store
        marker = f"{sid}:{keyword.lower()}"
        if not recorded.created and await store.find_event(self.name, marker) is not None:
            return
        customer = recorded.customer
        bound = self._log.bind(customer=customer.id, conversation=recorded.event.conversation_id)
        opted_out = keyword == "STOP"
        await self._set_opt_out(customer, opted_out)
        bound.info("sms.opt_out" if opted_out else "sms.opt_in", keyword=keyword)
        if recorded.event.conversation_id is None:
            return
        text = (
            "Customer replied STOP: opted out of SMS; the hub will not text them until START."
            if opted_out
            else "Customer replied START: opted back in to SMS."
        )
        note = await store.append(
            recorded.event.conversation_id,
            EventDraft(
                kind=EventKind.NOTE,
                direction=Direction.INTERNAL,
                author=SYSTEM,
                channel=self.name,
                channel_type=ChannelType.SMS,
                text=text,
                external_id=marker,
                data={"sms_opt_out": opted_out, "message_sid": sid},
            ),
        )
        if note.created:
            await self.services.bus.publish([note.event])

    async def _set_opt_out(self, customer: Customer, opted_out: bool) -> None:
        tags = set(customer.tags)
        if opted_out:
            tags.add(OPT_OUT_TAG)
        else:
            tags.discard(OPT_OUT_TAG)
        if tags != set(customer.tags):
            await self.services.store.set_customer_tags(customer.id, tuple(sorted(tags)))

    async def handle_status(self, request: web.Request) -> web.StreamResponse:
        form = await self.verifier.verified_form(request)
        sid = form.get("MessageSid") or form.get("SmsSid") or ""
        status = (form.get("MessageStatus") or form.get("SmsStatus") or "").lower()
        state = STATUS_STATES.get(status)
        bound = self._log.bind(message_sid=sid, twilio_status=status)
        if not sid or state is None:
            bound.info("sms.status_ignored")
            return empty_twiml()
        store = self.services.store
        event = await store.find_event(self.name, sid)
        if event is None or event.delivery_state is None:
            # Not ours, or the callback outran the outbox recording the SID; a later
            # status (delivered) will still find it.
            bound.warning("sms.status_unknown_message")
            return empty_twiml()
        bound = bound.bind(customer=event.customer_id, conversation=event.conversation_id)
        if not advances(event.delivery_state, state):
            bound.info("sms.status_stale", current=event.delivery_state.value)
            return empty_twiml()
        error = None
        if state in (DeliveryState.UNDELIVERED, DeliveryState.FAILED):
            error = describe_error(form.get("ErrorCode"), form.get("ErrorMessage")) or status
        updated = await store.record_delivery(event.id, state, error=error)
        bound.info("sms.status", state=updated.delivery_state, error=error)
        await self.services.bus.publish([updated])
        return empty_twiml()

    # --- outbound --------------------------------------------------------------------

    async def _live_customer(self, customer_id: str) -> Customer | None:
        store = self.services.store
        customer = await store.get_customer(customer_id) if customer_id else None
        # Follow merges: the opt-out lives on whichever record is current.
        for _ in range(8):
            if customer is None or customer.merged_into is None:
                break
            customer = await store.get_customer(customer.merged_into)
        return customer

    async def send(self, outbound: Outbound) -> SendResult:
        bound = self._log.bind(
            customer=outbound.customer_id,
            conversation=outbound.conversation_id,
            event=outbound.event_id,
        )
        if outbound.to.kind is not IdentityKind.PHONE:
            raise PermanentSendError(f"SMS needs a phone number, not {outbound.to.kind.value}")
        customer = await self._live_customer(outbound.customer_id)
        if customer is not None and OPT_OUT_TAG in customer.tags:
            bound.info("sms.refused_opted_out")
            raise PermanentSendError(OPT_OUT_REFUSAL)
        if self._client is None:
            raise PermanentSendError(f"channel {self.name!r} is not started")
        media = [a.url for a in outbound.attachments if a.url.startswith(("https://", "http://"))]
        try:
            message = await self._client.messages.create_async(
                to=outbound.to.value,
                from_=self.channel.phone_number,
                body=outbound.text,
                media_url=media or values.unset,
                status_callback=self.status_callback_url,
            )
        except (
            TwilioRestException,
            TwilioServiceException,
            aiohttp.ClientError,
            OSError,
            TimeoutError,
        ) as exc:
            if isinstance(exc, TwilioRestException) and exc.code == UNSUBSCRIBED_ERROR:
                # Twilio knows of an opt-out we missed (e.g. before the hub existed).
                if customer is not None:
                    await self._set_opt_out(customer, True)
                bound.info("sms.refused_by_twilio_opted_out")
            raise send_error(exc, "SMS") from exc
        status = str(message.status or "").lower()
        if status in ("failed", "undelivered", "canceled"):
            raise PermanentSendError(
                describe_error(message.error_code, message.error_message) or status
            )
        bound.info("sms.sent", message_sid=message.sid, twilio_status=status)
        # SENT, not QUEUED, even when Twilio says "queued": the message has left the hub,
        # and a QUEUED outcome would put it back in the outbox to be sent again.
        return SendResult(
            state=DeliveryState.SENT, provider_id=message.sid, data={"twilio_status": status}
        )
