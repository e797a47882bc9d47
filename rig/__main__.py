"""python3 -m rig demo | test [PYTEST ARGS] | push [VERSION] [--broken] | bench [ARGS]

Run as root from the checkout, on a fresh Debian 12 / Ubuntu 24.04. With the standard library
only, it installs what the rig needs and is missing — Debian packages (Debian's docker.io only
where no dockerd is installed: docker-ce hosts keep theirs), and Python packages into .venv
(Debian's python3 refuses system-wide pip, PEP 668); for `test` and `bench` also the current
Docker engine and the signature verifiers, unpacked from Debian's unstable archive into .rig/
(rig/unstable.py) — then runs the command inside that venv.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import time

from rig import nspawn, unstable

ROOT = pathlib.Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
REQUIREMENTS = [ROOT / "requirements.txt", ROOT / "rig" / "requirements.txt"]
TEST_COMMAND = ["python3", "-m", "pytest", "-q", "test_ecr_deploy.py"]

# What the rig runs -> the Debian package that provides it.
DEBIAN_PACKAGES = {
    "dockerd": "docker.io",  # the swarm nodes (skipped where Docker's own docker-ce is installed)
    "docker-registry": "docker-registry",  # the TLS registries posing as ECR
    "/bin/busybox": "busybox-static",  # the one binary in every test image
    "faketime": "faketime",  # a deployer whose clock is off
    "systemd-analyze": "systemd",  # checks of the unit file
    "systemd-nspawn": "systemd-container",  # the unit booted by a real systemd (rig/nspawn.py)
    "debootstrap": "debootstrap",  # ... in a Debian bookworm made for it
    "ip": "iproute2",  # network namespaces of multi-node swarms
    "iptables": "iptables",
    "/usr/share/zoneinfo/Europe/Berlin": "tzdata",
    "/usr/share/keyrings/debian-archive-keyring.gpg": "debian-archive-keyring",  # rig/unstable.py (Ubuntu lacks it)  # deploy windows' time zones (zoneinfo reads the system's)
}


def say(text: str) -> None:
    print(f"[rig] {text}", flush=True)


def missing_debian_packages() -> list[str]:
    missing = [package for what, package in DEBIAN_PACKAGES.items()
               if not (pathlib.Path(what).exists() if what.startswith("/") else shutil.which(what))]
    if importlib.util.find_spec("ensurepip") is None:  # Debian splits `python3 -m venv` out
        missing.append("python3-venv")
    return missing


def apt_install(packages: list[str]) -> None:
    say(f"Installing Debian packages: {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in range(1, 4):  # a mirror's bad minute should not fail the run
        if subprocess.run(["apt-get", "update", "-qq"], env=env).returncode == 0 and subprocess.run(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], env=env,
                stdout=subprocess.DEVNULL).returncode == 0:
            return
        if attempt < 3:
            time.sleep(10)
    sys.exit("[rig] apt-get failed three times; see its output above")


def run_or_exit(command: list[str], what: str) -> None:
    if subprocess.run(command).returncode != 0:
        sys.exit(f"[rig] {what} failed; see its output above")


def requirements_stamp() -> str:
    return hashlib.sha256(b"".join(path.read_bytes() for path in REQUIREMENTS)).hexdigest()


def enter_venv(command: str) -> None:
    """Install what is missing, then re-run this command with the venv's python (never returns)."""
    if os.geteuid() != 0:
        sys.exit("[rig] run as root: the rig starts dockerd, binds port 443 and edits /etc/hosts")
    packages = missing_debian_packages()
    if packages:
        apt_install(packages)
    if command in ("test", "bench"):  # the current engine and the verifiers; the demo runs on the host's Docker
        try:
            unstable.fetch(say=say)
        except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
            sys.exit(f"[rig] fetching from Debian's unstable archive failed: {e}")
    if command == "test" and not nspawn.tools_missing():  # the unit under a real systemd: built once, kept
        try:
            if not nspawn.rootfs_ready():
                say(f"Building a Debian bookworm root file system for systemd-nspawn in {nspawn.ROOTFS} (once)")
            nspawn.bookworm_rootfs()
        except (OSError, RuntimeError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            sys.exit(f"[rig] building the bookworm root file system failed: {e}")
    python = VENV / "bin" / "python3"
    stamp = VENV / ".rig-requirements"
    if not python.exists():
        say(f"Creating a virtual environment in {VENV}")
        run_or_exit([sys.executable, "-m", "venv", str(VENV)], "creating the venv")
    if not stamp.exists() or stamp.read_text() != requirements_stamp():
        say("Installing Python packages into it: " + ", ".join(
            line.strip() for line in REQUIREMENTS[1].read_text().splitlines() if line[:1].isalpha()))
        run_or_exit([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                     "-r", str(REQUIREMENTS[1])], "pip install")
        stamp.write_text(requirements_stamp())
    env = {**os.environ, "PATH": f"{VENV / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "VIRTUAL_ENV": str(VENV)}
    os.chdir(ROOT)
    os.execve(python, [str(python), "-m", "rig", *sys.argv[1:]], env)


def in_venv() -> bool:
    return pathlib.Path(sys.prefix).resolve() == VENV.resolve()


def main(argv: list[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command not in ("demo", "test", "push", "bench"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    if not in_venv():
        enter_venv(command)
    os.chdir(ROOT)
    if command == "test":  # the whole suite, the real rig required: rig tests fail, never skip
        env = {**os.environ, "ECR_DEPLOY_REQUIRE_RIG": "1"}
        return subprocess.run([sys.executable, *TEST_COMMAND[1:], *args], env=env).returncode
    if command == "bench":
        return subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), *args]).returncode
    sys.path.insert(0, str(ROOT))
    from rig import demo
    return demo.main() if command == "demo" else demo.push(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
