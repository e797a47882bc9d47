"""Small helpers every part of the rig uses."""
from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
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


def mounts_under(path) -> list[str]:
    """Mount points at or below `path` in this mount namespace (/proc/self/mountinfo, whose field 5
    is the mount point with space, tab, newline and backslash written as octal escapes), deepest first."""
    top = os.path.realpath(path)
    points = []
    for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split(" ")[4])
        if point == top or point.startswith(top.rstrip("/") + "/"):
            points.append(point)
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


def unmount_under(path) -> None:
    """Unmount whatever a daemon left mounted below `path` (dockerd leaves its ingress network
    namespace, an nsfs mount under its exec root), deepest first; lazily if it is still busy."""
    for point in mounts_under(path):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", point], capture_output=True)
