"""Small helpers every part of the rig uses."""
from __future__ import annotations

import pathlib
import socket
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent  # the project's checkout
DEPLOYER = str(ROOT / "ecr_deploy.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=60.0, interval=0.2, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)
