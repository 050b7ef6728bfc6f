"""Helpers for tests that start real servers on free loopback ports."""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_binary(name: str, *candidates: str) -> str:
    """Path of a server binary; under CI a missing one fails the test, never skips it."""
    for candidate in (name, *candidates):
        path = shutil.which(candidate) or (candidate if os.path.exists(candidate) else None)
        if path:
            return path
    message = f"{name} not installed (the test command installs it: scripts/test)"
    if under_ci():
        pytest.fail(message)
    pytest.skip(message)  # only outside CI, on a machine set up by hand
    raise AssertionError  # unreachable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")
