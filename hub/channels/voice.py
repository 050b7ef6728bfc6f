"""Phone calls through Twilio Voice: TwiML answers, IVR, dial to an agent, voicemail.

Routes below /twilio/{channel}/voice (see docs/twilio.md for the console set-up):
  (itself)       an incoming call: greeting, optional IVR menu, then dial an agent
  /gather        the IVR digit the caller pressed
  /dial-result   how dialing the agent ended (answered, busy, no answer...)
  /status        call status callback (completed, with its duration)
  /recording     a voicemail (the <Record> action) or a call recording
  /transcription the voicemail's transcription, when Twilio sends it
  /wait          what a queued caller hears (their position)
  /connect       TwiML for an agent's call-back: once the agent answers, dial the customer

Each call event is stored once per (CallSid, event): Twilio's retries and our own
re-requests never add a second one. Events of an incoming call go through the ingestor
with the caller's number, so they join the caller's conversation like any contact.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import aiohttp
import structlog
from aiohttp import web
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.twiml.voice_response import VoiceResponse

from hub.channels.base import PermanentSendError, SendResult
from hub.channels.twilio import (
    TWIML_CONTENT_TYPE,
    TwilioChannel,
    send_error,
)
from hub.identities import InvalidIdentity, normalize
from hub.model import (
    Agent,
    Attachment,
    ChannelType,
    Direction,
    EventDraft,
    EventKind,
    Identity,
    IdentityKind,
    Inbound,
    Outbound,
    Recorded,
    agent_author,
)

if TYPE_CHECKING:
    from hub.config import Config, VoiceChannel

log = structlog.get_logger(__name__)

VOICEMAIL_MAX_SECONDS = 120  # Twilio transcribes recordings of up to 2 minutes
GATHER_TIMEOUT_SECONDS = 5
WAIT_PAUSE_SECONDS = 20  # between queue position announcements
ANSWERED = frozenset({"completed", "answered"})
ENDED_UNANSWERED = frozenset({"busy", "no-answer", "failed", "canceled"})


@dataclass(frozen=True, slots=True)
class CallContext:
    """What an agent chooser knows about the call it must place."""

    app: web.Application
    call_sid: str
    caller: Identity | None
    customer_id: str | None
    conversation_id: str | None
    queue: str | None  # the IVR choice, if any


AgentChooser = Callable[[CallContext], Awaitable[Agent | None]]


def presence_registry(app: web.Application) -> Any | None:
    """The inbox's presence registry, when the inbox is installed in `app`.

    Found through the AppKey hub.inbox.presence defines, imported lazily: voice works
    without the inbox.
    """
    try:
        module = import_module("hub.inbox.presence")
    except ModuleNotFoundError:
        return None
    key = getattr(module, "PRESENCE_KEY", None)
    if isinstance(key, web.AppKey) and key in app:
        return app[key]
    return None


def spoken_duration(seconds: int) -> str:
    minutes, rest = divmod(max(seconds, 0), 60)
    return f"{minutes}m {rest:02d}s" if minutes else f"{rest}s"


def twiml(response: VoiceResponse) -> web.Response:
    return web.Response(text=str(response), content_type=TWIML_CONTENT_TYPE)


def _int(form: Mapping[str, str], key: str) -> int:
    try:
        return max(int(form.get(key) or 0), 0)
    except ValueError:
        return 0


class VoiceAdapter(TwilioChannel):
    type = ChannelType.VOICE
    channel: VoiceChannel

    def __init__(self, channel: VoiceChannel, config: Config) -> None:
        super().__init__(channel, config)
        self._config = config

    # --- lifecycle -------------------------------------------------------------------

    def routes(self) -> list[web.AbstractRouteDef]:
        base = f"/twilio/{self.name}/voice"
        return [
            web.post(base, self.handle_incoming),
            web.post(f"{base}/gather", self.handle_gather),
            web.post(f"{base}/dial-result", self.handle_dial_result),
            web.post(f"{base}/status", self.handle_status),
            web.post(f"{base}/recording", self.handle_recording),
            web.post(f"{base}/transcription", self.handle_transcription),
            web.post(f"{base}/wait", self.handle_wait),
            web.post(f"{base}/connect", self.handle_connect),
        ]

    async def send(self, outbound: Outbound) -> SendResult:
        raise PermanentSendError(
            "a voice channel cannot carry text; reply by SMS or call the customer back"
        )

    def url(self, path: str, **query: str) -> str:
        """Public URL of one of this channel's routes, as Twilio must call it."""
        url = self.verifier.public(f"/twilio/{self.name}/voice{path}")
        return f"{url}?{urlencode(query)}" if query else url

    # --- choosing an agent -----------------------------------------------------------

    async def choose_agent(self, call: CallContext) -> Agent | None:
        """Who to ring. Replace on the instance (`adapter.choose_agent = fn`) to plug in
        the router; it must answer fast, the caller is waiting for our TwiML.

        Default: the first agent with a phone (eligible for the IVR queue when one was
        chosen) who is online, if the inbox's presence registry is running.
        """
        candidates = [a for a in self._config.agents if a.phone]
        if call.queue:
            candidates = self._eligible(candidates, call.queue)
        registry = presence_registry(call.app)
        if registry is not None:
            online = set(await registry.online_agents())
            candidates = [a for a in candidates if a.id in online]
        return candidates[0] if candidates else None

    def _eligible(self, agents: list[Agent], queue_name: str) -> list[Agent]:
        try:
            queue = self._config.queue(queue_name)
        except KeyError:
            return agents
        if queue.agents:
            agents = [a for a in agents if a.id in queue.agents]
        return [a for a in agents if set(queue.skills) <= set(a.skills)]

    def _agent(self, agent_id: str | None) -> Agent | None:
        if not agent_id:
            return None
        try:
            return self._config.agent(agent_id)
        except KeyError:
            return None

    # --- storing call events ---------------------------------------------------------

    def _caller(self, form: Mapping[str, str]) -> Identity | None:
        try:
            return normalize(IdentityKind.PHONE, form.get("From", ""), default_region=self._region)
        except InvalidIdentity:
            return None  # withheld or anonymous numbers

    async def _record(
        self,
        form: Mapping[str, str],
        event: str,
        kind: EventKind,
        text: str,
        data: Mapping[str, Any],
        *,
        routable: bool = False,
        attachments: tuple[Attachment, ...] = (),
    ) -> Recorded | None:
        """Store one call event, once per (CallSid, event).

        An agent's call-back (outbound) appends to the conversation its first event was
        put in; an incoming call goes through the ingestor with the caller's number.
        """
        call_sid = form.get("CallSid", "")
        external_id = f"{call_sid}:{event}"
        payload = {"call_sid": call_sid, **data}
        bound = self._log.bind(call_sid=call_sid, call_event=event)
        if form.get("Direction", "").startswith("outbound"):
            store = self.services.store
            anchor = await store.find_event(self.name, f"{call_sid}:callback")
            if anchor is None or anchor.conversation_id is None:
                bound.info("voice.event_without_conversation")
                return None
            recorded = await store.append(
                anchor.conversation_id,
                EventDraft(
                    kind=kind,
                    direction=Direction.OUT,
                    author=anchor.author,
                    channel=self.name,
                    channel_type=ChannelType.VOICE,
                    text=text,
                    attachments=attachments,
                    external_id=external_id,
                    data=payload,
                ),
            )
            if recorded.created:
                await self.services.bus.publish([*recorded.side_events, recorded.event])
            return recorded
        caller = self._caller(form)
        if caller is None:
            # Nobody to file it under; the call itself still goes ahead.
            bound.warning("voice.caller_unknown", caller=form.get("From", "")[:40])
            return None
        return await self.services.ingestor.ingest(
            Inbound(
                channel=self.name,
                channel_type=ChannelType.VOICE,
                external_id=external_id,
                identity=caller,
                text=text,
                kind=kind,
                attachments=attachments,
                routable=routable,
                data=payload,
            )
        )

    # --- TwiML pieces ----------------------------------------------------------------

    def _menu(self, response: VoiceResponse) -> None:
        gather = response.gather(
            num_digits=1,
            action=self.url("/gather"),
            method="POST",
            timeout=GATHER_TIMEOUT_SECONDS,
        )
        for option in self.channel.ivr:
            gather.say(f"For {option.label}, press {option.digit}.")

    def _leave_message(self, response: VoiceResponse, apology: str, queue: str | None) -> None:
        """Voicemail when enabled, else wait in the queue hearing one's position."""
        if self.channel.voicemail:
            response.say(f"{apology} Please leave a message after the tone.")
            response.record(
                action=self.url("/recording"),
                method="POST",
                max_length=VOICEMAIL_MAX_SECONDS,
                play_beep=True,
                transcribe_callback=self.url("/transcription"),
            )
            # Reached only when nothing was recorded.
            response.say("We did not get a message. Goodbye.")
            response.hangup()
        else:
            response.say(f"{apology} Please hold.")
            response.enqueue(queue or self.name, wait_url=self.url("/wait"), wait_url_method="POST")

    async def _connect(
        self,
        response: VoiceResponse,
        request: web.Request,
        form: Mapping[str, str],
        recorded: Recorded | None,
        queue: str | None,
    ) -> None:
        call = CallContext(
            app=request.app,
            call_sid=form.get("CallSid", ""),
            caller=self._caller(form),
            customer_id=recorded.event.customer_id if recorded else None,
            conversation_id=recorded.event.conversation_id if recorded else None,
            queue=queue,
        )
        agent = await self.choose_agent(call)
        if agent is None or not agent.phone:
            self._log.info("voice.no_agent", call_sid=call.call_sid, queue=queue)
            self._leave_message(response, "Sorry, nobody can take your call right now.", queue)
            return
        extra: dict[str, Any] = {}
        if self.channel.record_calls:
            extra = {
                "record": "record-from-answer-dual",
                "recording_status_callback": self.url("/recording", kind="call"),
                "recording_status_callback_method": "POST",
            }
        dial = response.dial(
            timeout=self.channel.ring_timeout_seconds,
            action=self.url("/dial-result", agent=agent.id, **({"queue": queue} if queue else {})),
            method="POST",
            **extra,
        )
        # An agent's "phone" may be a Twilio Client identity (softphone in a browser).
        if agent.phone.startswith("client:"):
            dial.client(agent.phone.removeprefix("client:"))
        else:
            dial.number(agent.phone)
        self._log.info("voice.dialing", call_sid=call.call_sid, agent=agent.id, queue=queue)

    # --- handlers --------------------------------------------------------------------

    async def handle_incoming(self, request: web.Request) -> web.StreamResponse:
        form = await self.verifier.verified_form(request)
        call_sid = form.get("CallSid", "")
        if not call_sid:
            return web.json_response({"error": "CallSid is missing"}, status=400)
        caller = self._caller(form)
        recorded = await self._record(
            form,
            "ringing",
            EventKind.CALL,
            "Incoming call",
            {"status": "ringing", "from": caller.value if caller else "", "to": form.get("To")},
            routable=True,
        )
        response = VoiceResponse()
        response.say(self.channel.greeting)
        if self.channel.ivr:
            # Without a key press Twilio carries on with the verbs after <Gather>.
            self._menu(response)
        await self._connect(response, request, form, recorded, None)
        return twiml(response)

    async def handle_gather(self, request: web.Request) -> web.StreamResponse:
        form = await self.verifier.verified_form(request)
        digits = form.get("Digits", "")[:8]
        option = next((o for o in self.channel.ivr if o.digit == digits), None)
        response = VoiceResponse()
        if option is None:
            response.say("Sorry, that is not an option.")
            self._menu(response)
            await self._connect(response, request, form, None, None)
            return twiml(response)
        recorded = await self._record(
            form,
            f"ivr:{digits}",
            EventKind.CALL,
            f"Caller chose {option.label} ({digits})",
            {"status": "ivr", "digits": digits, "queue": option.queue},
        )
        await self._connect(response, request, form, recorded, option.queue)
        return twiml(response)

    async def handle_dial_result(self, request: web.Request) -> web.StreamResponse:
        form = await self.verifier.verified_form(request)
        dial_status = form.get("DialCallStatus", "").lower()
        agent_id = request.query.get("agent")
        agent = self._agent(agent_id)
        agent_name = agent.name if agent else (agent_id or "an agent")
        response = VoiceResponse()
        if dial_status in ANSWERED:
            duration = _int(form, "DialCallDuration")
            await self._record(
                form,
                "answered",
                EventKind.CALL,
                f"Answered by {agent_name}",
                {
                    "status": "answered",
                    "agent": agent_id,
                    "dial_call_sid": form.get("DialCallSid"),
                    "duration": duration,
                },
            )
            response.hangup()
            return twiml(response)
        # Nobody picked up: a missed call, and a task to call the customer back.
        await self._record(
            form,
            "missed",
            EventKind.CALL,
            f"Missed call ({dial_status or 'not answered'})",
            {
                "status": "missed",
                "reason": dial_status,
                "agent": agent_id,
                "callback_requested": True,
            },
            routable=True,
        )
        self._leave_message(
            response, "Sorry, nobody could take your call.", request.query.get("queue")
        )
        return twiml(response)

    async def handle_status(self, request: web.Request) -> web.StreamResponse:
        form = await self.verifier.verified_form(request)
        status = form.get("CallStatus", "").lower()
        if status == "completed":
            duration = _int(form, "CallDuration")
            await self._record(
                form,
                "completed",
                EventKind.CALL,
                f"Call ended after {spoken_duration(duration)}",
                {"status": "completed", "duration": duration},
            )
        elif status in ENDED_UNANSWERED:
            await self._record(form, status, EventKind.CALL, f"Call {status}", {"status": status})
        # Progress states (initiated, ringing, in-progress) add nothing to the timeline.
        return twiml(VoiceResponse())

    async def handle_recording(self, request: web.Request) -> web.StreamResponse:
        form = await self.verifier.verified_form(request)
        recording_url = form.get("RecordingUrl", "")
        recording_sid = form.get("RecordingSid", "")
        duration = _int(form, "RecordingDuration")
        attachments = (
            (
                Attachment(
                    filename=f"{recording_sid or 'recording'}.wav",
                    content_type="audio/wav",
                    size=0,
                    url=recording_url,
                ),
            )
            if recording_url
            else ()
        )
        data = {
            "recording_url": recording_url,
            "recording_sid": recording_sid,
            "duration": duration,
        }
        if request.query.get("kind") == "call":
            # A recorded conversation with an agent (record_calls), not a voicemail.
            await self._record(
                form,
                f"recording:{recording_sid}",
                EventKind.CALL,
                f"Call recording ({spoken_duration(duration)})",
                {"status": "recorded", **data},
                attachments=attachments,
            )
            return twiml(VoiceResponse())
        await self._record(
            form,
            "voicemail",
            EventKind.VOICEMAIL,
            f"Voicemail ({spoken_duration(duration)})",
            data,
            routable=True,
            attachments=attachments,
        )
        response = VoiceResponse()
        response.say("Thank you, we will call you back. Goodbye.")
        response.hangup()
        return twiml(response)

    async def handle_transcription(self, request: web.Request) -> web.StreamResponse:
        form = await self.verifier.verified_form(request)
        status = form.get("TranscriptionStatus", "").lower()
        text = form.get("TranscriptionText", "")
        voicemail = await self.services.store.find_event(
            self.name, f"{form.get('CallSid', '')}:voicemail"
        )
        data = {
            "transcription": text,
            "transcription_status": status,
            "transcription_sid": form.get("TranscriptionSid", ""),
            "recording_sid": form.get("RecordingSid", ""),
            "voicemail_event": voicemail.id if voicemail else None,
        }
        summary = (
            f"Voicemail transcription: {text}"
            if status == "completed" and text
            else "The voicemail could not be transcribed."
        )
        await self._record(form, "transcription", EventKind.VOICEMAIL, summary, data)
        return twiml(VoiceResponse())

    async def handle_wait(self, request: web.Request) -> web.StreamResponse:
        form = await self.verifier.verified_form(request)
        position = _int(form, "QueuePosition")
        response = VoiceResponse()
        if position:
            response.say(f"You are number {position} in the queue.")
        response.say("An agent will be with you as soon as possible.")
        # Twilio requests the wait URL again when this TwiML ends: one announcement per pause.
        response.pause(length=WAIT_PAUSE_SECONDS)
        return twiml(response)

    async def handle_connect(self, request: web.Request) -> web.StreamResponse:
        """The agent took our call-back call: now ring the customer, from our number."""
        await self.verifier.verified_form(request)
        response = VoiceResponse()
        try:
            to = normalize(
                IdentityKind.PHONE, request.query.get("to", ""), default_region=self._region
            )
        except InvalidIdentity:
            response.say("Sorry, the customer's number is not valid.")
            response.hangup()
            return twiml(response)
        response.say("Connecting you to the customer.")
        dial = response.dial(
            caller_id=self.channel.phone_number, timeout=self.channel.ring_timeout_seconds
        )
        dial.number(to.value)
        return twiml(response)

    # --- call-back -------------------------------------------------------------------

    async def call_back(
        self, customer_phone: str, agent: Agent, *, conversation_id: str | None = None
    ) -> str:
        """Ring the agent's phone; when they answer, Twilio dials the customer. Returns
        the call SID. The call-back is noted on the customer's conversation (the given
        one, else their active one) and its later events join it.

        Raises InvalidIdentity for a bad number, PermanentSendError/TemporarySendError
        when Twilio refuses or cannot be reached.
        """
        if not agent.phone:
            raise PermanentSendError(f"agent {agent.name} has no phone number")
        if self._client is None:
            raise PermanentSendError(f"channel {self.name!r} is not started")
        customer_identity = normalize(
            IdentityKind.PHONE, customer_phone, default_region=self._region
        )
        to_customer = customer_identity.value
        try:
            call = await self._client.calls.create_async(
                to=agent.phone,
                from_=self.channel.phone_number,
                url=self.url("/connect", to=to_customer),
                method="POST",
                status_callback=self.url("/status"),
                status_callback_method="POST",
                timeout=self.channel.ring_timeout_seconds,
            )
        except (
            TwilioRestException,
            TwilioServiceException,
            aiohttp.ClientError,
            OSError,
            TimeoutError,
        ) as exc:
            raise send_error(exc, "call-back") from exc
        call_sid = str(call.sid)
        store = self.services.store
        if conversation_id is None:
            customer = await store.find_customer(customer_identity)
            active = await store.active_conversation(customer.id) if customer else None
            conversation_id = active.id if active else None
        bound = self._log.bind(call_sid=call_sid, agent=agent.id, conversation=conversation_id)
        if conversation_id is None:
            bound.info("voice.callback_without_conversation")
            return call_sid
        recorded = await store.append(
            conversation_id,
            EventDraft(
                kind=EventKind.CALL,
                direction=Direction.OUT,
                author=agent_author(agent.id),
                channel=self.name,
                channel_type=ChannelType.VOICE,
                text=f"Call-back to {to_customer} by {agent.name}",
                external_id=f"{call_sid}:callback",
                data={
                    "status": "callback",
                    "call_sid": call_sid,
                    "agent": agent.id,
                    "to": to_customer,
                },
            ),
        )
        if recorded.created:
            await self.services.bus.publish([*recorded.side_events, recorded.event])
        bound.info("voice.callback_started", customer=recorded.event.customer_id)
        return call_sid
