"""A real Dovecot IMAP server for tests: its own config, users and maildirs in a temp dir.

The system's Dovecot is never touched: this instance has its own base_dir, a unique
instance name and one plaintext loopback listener on a free port. Mail is delivered by
IMAP APPEND, the way any client would put it there.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aioimaplib import aioimaplib

from tests.servers.common import free_port, require_binary, wait_for_port

USER = "support@example.test"
PASSWORD = "imap-test-password"

_CONF = """\
instance_name = hub-test-{port}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
first_valid_uid = 1
mail_location = maildir:{root}/mail/%u
mail_uid = {mail_user}
mail_gid = {mail_group}
# Generous for tests that open many sessions (fixture + hub + test clients).
mail_max_userip_connections = 200
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = home={root}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {ssl_port}
  }}
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
"""


def _users() -> tuple[str, str, str, str]:
    """(internal user, its group, login user, mail user) that Dovecot will run as.

    Dovecot refuses root for its internal and login processes; the Debian package made
    "dovecot" and "dovenull". Run by an ordinary user, everything runs as that user.
    """
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name
        return me, me, me, me
    for name in ("dovecot", "dovenull"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            pytest.fail(f"user {name!r} missing: install the dovecot-core package")
    return "dovecot", "dovecot", "dovenull", "dovecot"


class DovecotServer:
    def __init__(self, binary: str, *, tls: bool = False) -> None:
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = free_port()
        # With tls: STARTTLS on `port`, implicit TLS on `ssl_port`, and `cert` (a
        # self-signed certificate for 127.0.0.1) for clients to trust.
        self.tls = tls
        self.ssl_port = free_port() if tls else 0
        self.cert: Path | None = None
        self.user = USER
        self.password = PASSWORD
        # Not under pytest's tmp_path: that tree is private to root, and Dovecot's mail
        # processes run as another user who must reach the maildir.
        self.root = Path(tempfile.mkdtemp(prefix="hub-dovecot-"))
        self.root.chmod(0o755)
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        internal_user, internal_group, login_user, mail_user = _users()
        for sub in ("run", "state", "mail", "home"):
            (self.root / sub).mkdir(exist_ok=True)
        self.conf = self.root / "dovecot.conf"
        ssl = "ssl = no"
        if self.tls:
            self.cert, key = self._make_certificate()
            ssl = f"ssl = yes\nssl_cert = <{self.cert}\nssl_key = <{key}"
        self.conf.write_text(
            _CONF.format(
                root=self.root,
                port=self.port,
                ssl=ssl,
                ssl_port=self.ssl_port,
                internal_user=internal_user,
                internal_group=internal_group,
                login_user=login_user,
                mail_user=mail_user,
                mail_group=internal_group if mail_user == internal_user else mail_user,
            )
        )
        (self.root / "passwd").write_text(f"{self.user}:{{PLAIN}}{self.password}\n")
        if os.geteuid() == 0:
            entry = pwd.getpwnam(mail_user)
            for sub in ("mail", "home"):
                os.chown(self.root / sub, entry.pw_uid, entry.pw_gid)

    def _make_certificate(self) -> tuple[Path, Path]:
        openssl = require_binary("openssl")  # a dependency of the dovecot-core package
        cert, key = self.root / "cert.pem", self.root / "key.pem"
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
        key.chmod(0o644)  # read by Dovecot's processes, which aren't root
        return cert, key

    @property
    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [self.binary, "-F", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own process group: stop() can end the children the master leaves
            # behind (a mail process outlives its master for ~10 s otherwise).
            start_new_session=True,
        )
        try:
            wait_for_port(self.port, timeout=15)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"dovecot did not start:\n{self.log[-3000:]}") from None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        # Dovecot's master can take seconds to reap its children on SIGTERM, and mail
        # processes outlive it for ~10 s: give it a moment, then end the whole group.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        # The port is released with the master; wait so that a restart can bind it again.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                wait_for_port(self.port, timeout=0.05)
            except TimeoutError:
                break

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- a test client ---------------------------------------------------------------

    @asynccontextmanager
    async def client(self, mailbox: str | None = "INBOX") -> AsyncIterator[aioimaplib.IMAP4]:
        imap = aioimaplib.IMAP4(host=self.host, port=self.port, timeout=30)
        await imap.wait_hello_from_server()
        response = await imap.login(self.user, self.password)
        assert response.result == "OK", response
        if mailbox is not None:
            response = await imap.select(mailbox)
            assert response.result == "OK", response
        try:
            yield imap
        finally:
            try:
                await imap.logout()
            except Exception:  # the test is over; a closed socket is fine
                pass

    async def append(
        self, messages: Iterable[bytes], mailbox: str = "INBOX", flags: str | None = None
    ) -> int:
        """Deliver messages through one IMAP connection; returns how many.

        One MULTIAPPEND (RFC 3502) with non-synchronizing literals (LITERAL+) per 200
        messages: a thousand mails take one round trip each 200, not one each.
        """
        batch = list(messages)
        return await asyncio.to_thread(self._append_sync, batch, mailbox, flags)

    def _append_sync(self, messages: list[bytes], mailbox: str, flags: str | None) -> int:
        with socket.create_connection((self.host, self.port), timeout=30) as sock:
            reader = sock.makefile("rb")
            reader.readline()  # greeting

            def command(tag: bytes, payload: bytes) -> None:
                sock.sendall(payload)
                while True:
                    line = reader.readline()
                    if not line:
                        raise ConnectionError("dovecot closed the connection")
                    if line.startswith(tag + b" "):
                        if not line.startswith(tag + b" OK"):
                            raise AssertionError(line.decode(errors="replace"))
                        return

            command(b"a0", f'a0 LOGIN "{self.user}" "{self.password}"\r\n'.encode())
            flag_part = f" ({flags})" if flags else ""
            for start in range(0, len(messages), 200):
                tag = f"a{start + 1}".encode()
                payload = bytearray(tag + b' APPEND "' + mailbox.encode() + b'"')
                for raw in messages[start : start + 200]:
                    payload += f"{flag_part} {{{len(raw)}+}}\r\n".encode() + raw
                payload += b"\r\n"
                command(tag, bytes(payload))
            command(b"z", b"z LOGOUT\r\n")
        return len(messages)

    async def create_mailbox(self, name: str) -> None:
        async with self.client(mailbox=None) as imap:
            response = await imap.create(name)
            assert response.result == "OK", response

    async def delete_mailbox(self, name: str) -> None:
        async with self.client(mailbox=None) as imap:
            response = await imap.delete(name)
            assert response.result == "OK", response

    async def set_flag(self, flag: str, mailbox: str = "INBOX") -> None:
        """Flag every mail (someone else reading the mailbox with another client)."""
        async with self.client(mailbox) as imap:
            response = await imap.store("1:*", "+FLAGS", f"({flag})")
            assert response.result == "OK", response

    async def count(self, mailbox: str = "INBOX") -> int:
        async with self.client(mailbox=None) as imap:
            response = await imap.status(mailbox, "(MESSAGES)")
            assert response.result == "OK", response
            text = b" ".join(line for line in response.lines if isinstance(line, bytes))
            return int(text.split(b"MESSAGES ")[1].split(b")")[0])


@pytest.fixture
def dovecot() -> Iterator[DovecotServer]:
    binary = require_binary("dovecot", "/usr/sbin/dovecot")
    server = DovecotServer(binary)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


async def wait_until(
    predicate: Callable[[], object], within: float = 10.0, interval: float = 0.05
) -> None:
    """Poll an async or sync predicate until it is true (or fail with a clear message)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


@pytest.fixture
def dovecot_tls() -> Iterator[DovecotServer]:
    binary = require_binary("dovecot", "/usr/sbin/dovecot")
    server = DovecotServer(binary, tls=True)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()
