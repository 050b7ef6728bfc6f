"""Command line: `hub serve`, `hub check-config`, `hub hash-password`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import secrets
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from hub.config import Config, ConfigError, demo_config, load_config
from hub.passwords import hash_password, verify_password
from hub.process import quiet_collector

EXIT_INVALID_CONFIG = 2
EXIT_CANNOT_START = 1


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def demo_password(data_dir: Path) -> str:
    """The demo agent's password, made once per data dir so it survives restarts."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "demo-password"
    if path.exists():
        return path.read_text().strip()
    password = secrets.token_urlsafe(12)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    return password


def _load(args: argparse.Namespace) -> tuple[Config, str | None]:
    if args.demo:
        data_dir = Path(args.data_dir)
        password = demo_password(data_dir)
        env = dict(os.environ, HUB_DEMO_PASSWORD_HASH=hash_password(password))
        return demo_config(data_dir, env), password
    if not args.config:
        raise SystemExit("hub serve: give --config FILE, or --demo to try the hub")
    return load_config(args.config), None


async def _serve(app: web.Application, host: str, port: int, banner: list[str]) -> None:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        quiet_collector()
        for line in banner:
            print(line, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def cmd_serve(args: argparse.Namespace) -> int:
    from hub.app import create_app
    from hub.channels.registry import UnsupportedChannel
    from hub.log import configure_logging
    from hub.timeline.store import StoreError

    try:
        config, password = _load(args)
    except ConfigError as exc:
        _err(str(exc))
        _err("hub: not starting: fix the configuration above")
        return EXIT_INVALID_CONFIG
    configure_logging(config.hub.log_level)
    host = args.host or config.hub.host
    port = args.port if args.port is not None else config.hub.port
    try:
        app = create_app(config)
    except UnsupportedChannel as exc:
        _err(f"hub: not starting: {exc}")
        return EXIT_INVALID_CONFIG
    base = f"http://{host}:{port}"
    banner = [f"hub: serving on {base} (ready: {base}/readyz, inbox: {base}/inbox/)"]
    if password is not None:
        banner.append(f"hub: demo agent login 'demo', password '{password}'")
        banner.append(f"hub: demo website with the chat widget: {base}/demo")
    try:
        asyncio.run(_serve(app, host, port, banner))
    except StoreError as exc:
        _err(f"hub: cannot start: {exc}")
        return EXIT_CANNOT_START
    except OSError as exc:
        _err(f"hub: cannot listen on {host}:{port}: {exc.strerror or exc}")
        return EXIT_CANNOT_START
    return 0


async def _storage_warnings(config: Config) -> list[str]:
    if config.storage.backend != "redis":
        return []
    from hub.timeline.redis import RedisStore
    from hub.timeline.store import StoreError

    assert config.storage.url is not None
    store = RedisStore(config.storage.url, cluster=config.storage.cluster)
    try:
        await store.start()
    except StoreError as exc:
        return [f"storage: {exc}"]
    try:
        warning = await store.persistence_warning(config.storage.durability)
    finally:
        await store.close()
    return [f"storage.durability: {warning}"] if warning else []


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_INVALID_CONFIG
    except OSError as exc:
        _err(f"{args.file}: cannot read: {exc.strerror or exc}")
        return EXIT_INVALID_CONFIG
    for warning in asyncio.run(_storage_warnings(config)):
        _err(f"warning: {warning}")
    print(
        f"{args.file}: ok ({len(config.channels)} channels, {len(config.agents)} agents, "
        f"{len(config.routing.queues)} queues)"
    )
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            _err("passwords differ")
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        _err("a password needs at least 8 characters")
        return 1
    hashed = hash_password(password)
    assert verify_password(hashed, password)
    print(hashed)
    return 0


def cmd_email_backfill(args: argparse.Namespace) -> int:
    """Re-read an email channel's mailbox since a date; stored mail is not stored twice."""
    from datetime import date

    from hub.channels.email import backfill_command
    from hub.log import configure_logging
    from hub.timeline.store import StoreError

    try:
        since = date.fromisoformat(args.since)
    except ValueError:
        _err(f"--since: not a date (YYYY-MM-DD): {args.since!r}")
        return EXIT_INVALID_CONFIG
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_INVALID_CONFIG
    configure_logging(config.hub.log_level)
    try:
        counts = asyncio.run(backfill_command(config, args.channel, since))
    except ValueError as exc:
        _err(f"hub email backfill: {exc}")
        return EXIT_INVALID_CONFIG
    except (StoreError, OSError) as exc:
        _err(f"hub email backfill: {exc}")
        return EXIT_CANNOT_START
    print(
        f"{args.channel}: {counts['found']} mails since {since}: {counts['stored']} stored, "
        f"{counts['duplicates']} already there, {counts['skipped']} skipped"
    )
    return 0


def _email_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    email = sub.add_parser("email", help="email channel tools")
    email_sub = email.add_subparsers(dest="email_command", required=True)
    backfill = email_sub.add_parser(
        "backfill", help="re-read a mailbox since a date (safe: nothing is stored twice)"
    )
    backfill.add_argument("channel", help="the email channel's name")
    backfill.add_argument("--since", required=True, metavar="DATE", help="YYYY-MM-DD")
    backfill.add_argument("--config", required=True, metavar="FILE", help="the YAML configuration")
    backfill.set_defaults(func=cmd_email_backfill)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hub", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the hub")
    source = serve.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="FILE", help="the YAML configuration")
    source.add_argument(
        "--demo", action="store_true", help="built-in demo: SQLite, web chat, a demo agent"
    )
    serve.add_argument("--data-dir", default="./data", help="demo data directory (./data)")
    serve.add_argument("--host", help="listen address (overrides hub.listen.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides hub.listen.port)")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    hashpw = sub.add_parser(
        "hash-password", help="hash an agent password for the YAML (reads stdin if not a TTY)"
    )
    hashpw.set_defaults(func=cmd_hash_password)
    _email_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return int(args.func(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
