"""The shipped systemd unit, installed as the README says, in a Debian bookworm booted by a real systemd.

A minimal bookworm root file system (debootstrap: systemd, python3, CA certificates; about 50 s and
300 MB, built once and kept) boots with `systemd-nspawn --boot`. Nothing in it is changed: each boot
is volatile (a tmpfs over it), and what an installation adds is bind-mounted in:

    /etc/systemd/system/ecr-deploy.service   systemd/ecr-deploy.service, byte for byte, enabled
    /opt/ecr-deploy/ecr_deploy.py            this checkout's module, compiled (the README's compileall step)
    /opt/ecr-deploy/venv                     the rig's virtual environment (boto3, requests-unixsocket)
    /etc/ecr-deploy/                         env (the EnvironmentFile), notation/, the cosign key, the CA
    /usr/local/bin/{notation,cosign}         the rig's verifiers
    /run/docker.sock                         the rig's dockerd, group docker as on the host
    /var/log/journal                         a folder of the test's, read with journalctl --directory

The container shares the rig's network namespace (no --private-network), so moto, the registries and
the webhook answer at the addresses the tests use. The unit's own sandbox (DynamicUser, ProtectSystem,
PrivateTmp, MemoryMax, the system-call filter, no HOME) is applied by the container's systemd.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys

from rig import unstable
from rig.common import ROOT, wait_for

ROOTFS = pathlib.Path(os.environ.get("ECR_DEPLOY_NSPAWN_ROOTFS", "/var/tmp/ecr-deploy-nspawn-bookworm"))
PACKAGES = "systemd,systemd-sysv,dbus,python3,ca-certificates"
UNIT = ROOT / "systemd" / "ecr-deploy.service"
SITE_PACKAGES = "lib/python3.11/site-packages"  # bookworm's Python is 3.11, as is the rig's


def tools_missing() -> list[str]:
    return [name for name in ("systemd-nspawn", "debootstrap", "script", "journalctl") if not shutil.which(name)]


def rootfs_ready() -> bool:
    return (ROOTFS / "usr" / "lib" / "systemd" / "systemd").exists()


def bookworm_rootfs() -> pathlib.Path:
    """The root file system, built on first use (debootstrap from the Debian archive the rig fetches from):
    by `python3 -m rig test` before the tests start, since a test's namespace may have no network."""
    if rootfs_ready():
        return ROOTFS
    building = ROOTFS.with_name(ROOTFS.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    mirror = unstable.debian_archive()  # the machine's own Debian archive, or $ECR_DEPLOY_DEBIAN_ARCHIVE
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(building), mirror],
                   check=True, capture_output=True, timeout=900)
    building.rename(ROOTFS)
    return ROOTFS


class Installed:
    """The unit installed and booted; `journal()` is what it logged."""

    def __init__(self, folder: pathlib.Path, env: dict[str, str], docker_socket: str, files: dict[str, bytes],
                 venv: pathlib.Path):
        self.folder = folder
        etc = folder / "etc-ecr-deploy"
        opt = folder / "opt"
        wants = folder / "wants"
        self.journal_dir = folder / "journal"
        for directory in (etc, opt, wants, self.journal_dir):
            directory.mkdir(parents=True)
        (etc / "env").write_text("".join(f"{name}={value}\n" for name, value in env.items()))
        for relative, data in files.items():
            path = etc / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        shutil.copy(ROOT / "ecr_deploy.py", opt / "ecr_deploy.py")
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(opt / "ecr_deploy.py")], check=True)
        # The virtual environment as `python3 -m venv` makes it with bookworm's Python, its packages the
        # rig's own (pure Python, or built for CPython 3.11's stable ABI), bound read-only into it.
        (opt / "venv" / "bin").mkdir(parents=True)
        (opt / "venv" / "bin" / "python3").symlink_to("/usr/bin/python3")
        (opt / "venv" / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n")
        (opt / "venv" / SITE_PACKAGES).mkdir(parents=True)
        (wants / "ecr-deploy.service").symlink_to("/etc/systemd/system/ecr-deploy.service")
        rootfs = bookworm_rootfs()
        group = (rootfs / "etc" / "group").read_text()
        docker_gid = os.stat(docker_socket).st_gid
        (folder / "group").write_text(group + f"docker:x:{docker_gid}:\n")
        for path in [folder, *folder.rglob("*")]:  # readable by the unit's dynamic user, as an install leaves them
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() else 0o644)
        (etc / "env").chmod(0o600)  # root's: systemd reads the EnvironmentFile before dropping privileges
        self.journal_dir.chmod(0o2755)
        binds = {
            str(UNIT): "/etc/systemd/system/ecr-deploy.service",
            str(wants): "/etc/systemd/system/multi-user.target.wants",
            str(etc): "/etc/ecr-deploy",
            str(opt): "/opt/ecr-deploy",
            str(venv.resolve() / SITE_PACKAGES): f"/opt/ecr-deploy/venv/{SITE_PACKAGES}",
            str(folder / "group"): "/etc/group",
            "/etc/hosts": "/etc/hosts",
        }
        from rig import unstable
        for tool in ("notation", "cosign"):
            binds[str(unstable.program(tool))] = f"/usr/local/bin/{tool}"
        command = ["systemd-nspawn", "-D", str(rootfs), "--volatile=overlay", "--register=no", "--keep-unit",
                   f"--machine=ecr-deploy-rig-{os.getpid()}",
                   *(f"--bind-ro={source}:{target}" for source, target in binds.items()),
                   f"--bind={docker_socket}:/run/docker.sock", f"--bind={self.journal_dir}:/var/log/journal",
                   "--boot"]
        # systemd as PID 1 wants a terminal for its console: script(1) gives it one, logged to a file
        self.console = folder / "console.log"
        self.proc = subprocess.Popen(["script", "-qfec", subprocess.list2cmdline(command), str(self.console)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def journal(self, *args: str) -> str:
        done = subprocess.run(["journalctl", "--directory", str(self.journal_dir), "--no-pager", "-o", "cat", *args],
                              capture_output=True, text=True, timeout=30)
        return done.stdout

    def unit_log(self) -> str:
        return self.journal("-t", "ecr-deploy")

    def wait_until_ready(self, timeout: float = 120.0) -> None:
        wait_for(lambda: "watching" in self.unit_log() or self.proc.poll() is not None, timeout,
                 what=lambda: f"the unit to start; console:\n{self.console_text()[-3000:]}\njournal:\n"
                              f"{self.journal('-n', '60')}")
        assert self.proc.poll() is None, self.console_text()[-3000:]

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def stop(self) -> None:
        """Power the container off (SIGTERM to nspawn halts it), then make sure it is gone."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
