"""ecr_deploy.py run as operators run it: a separate process, its log read line by line."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from rig.common import DEPLOYER, ROOT, wait_for


def deployer_env(aws, swarm=None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEPLOYER_", "AWS_", "DOCKER_"))}
    env.update(aws.env)
    env["DOCKER_HOST"] = swarm.docker_host if swarm else "unix:///nonexistent/docker.sock"
    env.update(extra)
    return env


def run_once(env: dict, *args: str, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, DEPLOYER, "--once", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def updated_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " Updated service " in line]


class Running:
    """A loop-mode deployer process whose log is collected line by line as it runs."""

    def __init__(self, env: dict, *args: str, echo=None, as_installed=False):
        # as_installed: as the systemd unit runs it, a module whose bytecode compileall wrote at install.
        command = [sys.executable, "-m", "ecr_deploy"] if as_installed else [sys.executable, DEPLOYER]
        if as_installed:
            subprocess.run([sys.executable, "-m", "compileall", "-q", DEPLOYER], check=True)
        self.proc = subprocess.Popen([*command, *args], env=env, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, cwd=ROOT)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, args=(echo,), daemon=True)
        self.reader.start()

    def _read(self, echo) -> None:
        for line in iter(self.proc.stderr.readline, ""):
            self.lines.append(line)
            if echo:
                echo(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_line(self, text: str, timeout=60, count=1):
        wait_for(lambda: self.log.count(text) >= count, timeout,
                 what=lambda: f"{count}x {text!r} in the deployer's log:\n{self.log}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=15)
        self.reader.join(5)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
