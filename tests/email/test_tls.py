"""IMAP over implicit TLS and STARTTLS (aioimaplib has no STARTTLS: the adapter adds it)."""

from __future__ import annotations

import pytest

from hub.channels.email_imap import ImapSession
from hub.config import ImapSettings
from tests.email.conftest import ADDRESS
from tests.servers.dovecot import DovecotServer
from tests.servers.dovecot import dovecot_tls as dovecot_tls  # fixture


@pytest.mark.parametrize("mode", ["ssl", "starttls"])
async def test_tls_modes_log_in_and_fetch(
    dovecot_tls: DovecotServer, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert dovecot_tls.cert is not None
    monkeypatch.setenv("SSL_CERT_FILE", str(dovecot_tls.cert))
    port = dovecot_tls.ssl_port if mode == "ssl" else dovecot_tls.port
    session = ImapSession(
        ImapSettings(
            host="127.0.0.1",
            port=port,
            username=ADDRESS,
            password=dovecot_tls.password,
            tls=mode,  # type: ignore[arg-type]
        ),
        timeout=10,
    )
    await session.open()
    try:
        transport = session.imap.protocol.transport
        assert transport.get_extra_info("ssl_object") is not None
        assert await session.select("INBOX") > 0
        assert await session.uids_after(0) == []
    finally:
        await session.close()


async def test_untrusted_certificate_is_refused(dovecot_tls: DovecotServer) -> None:
    session = ImapSession(
        ImapSettings(
            host="127.0.0.1",
            port=dovecot_tls.ssl_port,
            username=ADDRESS,
            password=dovecot_tls.password,
            tls="ssl",
        ),
        timeout=10,
    )
    with pytest.raises(OSError):
        await session.open()
    await session.close()
