"""Handing one message to the SMTP server, with the outbox's notion of failure.

5xx replies are the server saying "never": PermanentSendError with its reply, shown on
the event. 4xx replies, refused or dropped connections and timeouts are "not now":
TemporarySendError, retried by the outbox with backoff.
"""

from __future__ import annotations

from email.message import EmailMessage

import aiosmtplib

from hub.channels.base import PermanentSendError, TemporarySendError
from hub.config import SmtpSettings


async def smtp_send(
    settings: SmtpSettings,
    *,
    sender: str,
    recipient: str,
    message: EmailMessage,
    seconds: float,  # timeout of each step of the SMTP conversation
) -> None:
    try:
        await aiosmtplib.send(
            message,
            sender=sender,
            recipients=[recipient],
            hostname=settings.host,
            port=settings.port,
            username=settings.username,
            password=settings.password,
            use_tls=settings.tls == "ssl",
            start_tls=settings.tls == "starttls",
            timeout=seconds,
        )
    except aiosmtplib.SMTPRecipientsRefused as exc:
        text = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
        if exc.recipients and all(500 <= r.code < 600 for r in exc.recipients):
            raise PermanentSendError(text) from None
        raise TemporarySendError(text) from None
    except aiosmtplib.SMTPAuthenticationError as exc:
        # A wrong password is fixed by an admin; keep retrying until then.
        raise TemporarySendError(
            f"SMTP login refused: {exc.code} {exc.message} (check smtp.username/password)"
        ) from None
    except aiosmtplib.SMTPResponseException as exc:
        reply = f"{exc.code} {exc.message}"
        if 500 <= exc.code < 600:
            raise PermanentSendError(reply) from None
        raise TemporarySendError(reply) from None
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        raise TemporarySendError(f"{type(exc).__name__}: {exc}") from None
