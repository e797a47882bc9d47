"""A private dockerd in swarm mode: its own data root, exec root, socket and containerd
namespace, so it never touches the machine's own Docker; on one of two engines:

  the current one   Debian unstable's docker.io 28 (API 1.51) with its containerd 2, unpacked by
                    rig/unstable.py; the host's runc (unstable's needs a newer glibc) and the host's
                    tini as docker-init
  the host's        whatever `dockerd` is on PATH: bookworm's docker.io 20.10 (API 1.41)
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import urllib.parse

import requests
import requests_unixsocket

import ecr_deploy as ed
from rig import unstable
from rig.common import free_port, unmount_under, wait_for

GWBRIDGE = pathlib.Path("/sys/class/net/docker_gwbridge")
# A VXLAN port per swarm started by this process: two swarms on one host (one per engine) would both
# take 4789, and the second one's overlay networks then fail ("error creating vxlan interface").
DATA_PATH_PORTS = itertools.count(4790)


@dataclasses.dataclass(frozen=True)
class Engine:
    """A Docker engine the rig can start: its dockerd, the PATH dockerd finds its helpers on
    (containerd, containerd-shim-runc-v2, docker-proxy, runc), its docker-init, and the docker CLI
    of the same release (a CLI newer than its daemon refuses some commands)."""
    name: str  # what a test id or a report calls it: "current", "bookworm"
    dockerd: str
    docker: str | None
    path: str
    init: str | None = None  # None: dockerd finds docker-init itself


def current_engine() -> Engine | None:
    """Docker 28 from Debian unstable, or None until `python3 -m rig test` has fetched it. Its own
    folders go first on PATH (its containerd 2 and shim, its docker-proxy); runc comes from the host,
    and so does docker-init (the package's is a link to tini-static from another package)."""
    dockerd, docker = unstable.program("dockerd"), unstable.program("docker")
    if dockerd is None:
        return None
    own = [str(unstable.UNPACKED / folder) for folder in ("usr/sbin", "usr/bin")]
    return Engine("current", str(dockerd), str(docker) if docker else None, os.pathsep.join([*own, host_path()]),
                  init=shutil.which("docker-init") or shutil.which("tini-static"))


def host_engine() -> Engine | None:
    """The host's own dockerd (bookworm's docker.io 20.10 on the rig), or None if it has none."""
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        return None
    return Engine("bookworm", dockerd, shutil.which("docker"), host_path())


def host_path() -> str:
    return os.environ.get("PATH") or "/usr/sbin:/usr/bin:/sbin:/bin"


class Swarm:
    def __init__(self, workdir: pathlib.Path, instance: str = "tests", init: bool = True, start: bool = True,
                 engine: Engine | None = None):
        """init=False: a dockerd outside any swarm (what a deployer must refuse to start on);
        start=False: not started here (a cluster's node is started, and joined, by its Cluster);
        engine: which Docker (the host's by default)."""
        self.engine = engine or host_engine()
        self.instance = instance
        self.dir = workdir / "docker"
        self.dir.mkdir()
        self.socket = str(self.dir / "docker.sock")
        self.docker_host = f"unix://{self.socket}"
        self.base = "http+unix://" + urllib.parse.quote(self.socket, safe="")
        self.http = requests_unixsocket.Session()
        self.proc = None
        # Swarm mode makes a docker_gwbridge interface, and it outlives dockerd.
        self.made_gwbridge = init and start and not GWBRIDGE.exists()
        if start:
            self.start()
            if init:
                self.post("/swarm/init", json={"ListenAddr": f"127.0.0.1:{free_port()}", "AdvertiseAddr": "127.0.0.1",
                                               "DataPathPort": next(DATA_PATH_PORTS)})

    def dockerd_command(self) -> list[str]:
        return [self.engine.dockerd, "--data-root", str(self.dir / "data"), "--exec-root", str(self.dir / "x"),
                "--pidfile", str(self.dir / "pid"), "-H", self.docker_host,
                "--iptables=false", "--ip-masq=false", "--bridge=none",
                *(["--init-path", self.engine.init] if self.engine.init else []),
                # Where the machine runs containerd already (its own Docker), keep out of Docker's namespace.
                "--containerd-namespace", f"ecrd-{self.instance}",
                "--containerd-plugins-namespace", f"ecrd-{self.instance}-plugins"]

    def start(self):
        self.proc = subprocess.Popen(self.dockerd_command(), stdout=open(self.dir / "log", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "PATH": self.engine.path})
        wait_for(self._up, 60, what=f"dockerd {self.instance} ({self.engine.name})")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self):
        """Stop dockerd for good and remove what it left on the host: the docker_gwbridge link, and
        the mounts under its folder (its ingress network namespace stays mounted after it exits),
        which would keep the folder, and its mounts, on the host for ever."""
        self.stop()
        unmount_under(self.dir)
        if self.made_gwbridge and GWBRIDGE.exists():
            subprocess.run(["ip", "link", "delete", "docker_gwbridge"], check=False)

    def _up(self):
        try:
            return self.http.get(self.base + "/_ping", timeout=1).ok
        except requests.RequestException:
            return False

    def call(self, method, path, **kwargs):
        reply = self.http.request(method, self.base + path, timeout=30, **kwargs)
        assert reply.ok, f"{method} {path}: {reply.status_code} {reply.text}"
        return reply.json() if reply.content else None

    def get(self, path, **kwargs):
        return self.call("GET", path, **kwargs)

    def post(self, path, **kwargs):
        return self.call("POST", path, **kwargs)

    def create_service(self, name, image, labels=None, registry=None, replicas=1,
                       update_config=None, mode=None, rollback_config=None, **task_template):
        """A service as the tests need it; `mode` replaces Replicated (e.g. a job), `task_template`
        adds to the TaskTemplate (e.g. Placement)."""
        spec = {"Name": name, "Labels": labels or {},
                "TaskTemplate": {
                    "ContainerSpec": {"Image": image, "Init": True, "StopGracePeriod": 1_000_000_000,
                                      "Env": ["GREETING=hello"], "Mounts": [{"Type": "tmpfs", "Target": "/cache"}]},
                    "RestartPolicy": {"Condition": "any", "Delay": 1_000_000_000}, **task_template},
                "Mode": mode or {"Replicated": {"Replicas": replicas}},
                "UpdateConfig": {"Parallelism": 2, "Order": "stop-first", **(update_config or {})},
                **({"RollbackConfig": rollback_config} if rollback_config else {})}
        if ed.is_job(spec):
            del spec["UpdateConfig"]  # Swarm refuses one for jobs
        headers = {}
        if registry:
            headers["X-Registry-Auth"] = ed.registry_auth_header("AWS", registry.password, registry.host)
        return self.post("/services/create", json=spec, headers=headers)["ID"]

    def service(self, service_id):
        return self.get(f"/services/{service_id}")

    def update(self, service_id, change, registry=None):
        """As `docker service update` does: the current spec, as `change(spec)` edits it in place, posted
        at the version it was read at; with registry auth only for `registry` (--with-registry-auth)."""
        service = self.service(service_id)
        change(service["Spec"])
        headers = {"X-Registry-Auth": ed.registry_auth_header("AWS", registry.password, registry.host)} \
            if registry else {}
        self.post(f"/services/{service_id}/update", params={"version": service["Version"]["Index"]},
                  json=service["Spec"], headers=headers)

    def scale(self, service_id, replicas):
        """As `docker service scale` does: the spec re-posted with no registry auth."""
        self.update(service_id, lambda spec: spec["Mode"]["Replicated"].update(Replicas=replicas))

    def tasks(self, service_id):
        return self.get("/tasks", params={"filters": json.dumps({"service": [service_id]})})

    def running_images(self, service_id) -> list[str]:
        return sorted(t["Spec"]["ContainerSpec"]["Image"] for t in self.tasks(service_id)
                      if t["DesiredState"] == "running" and t["Status"]["State"] == "running")

    def wait_running(self, service_id, image, replicas=1, timeout=90):
        wait_for(lambda: self.running_images(service_id) == [image] * replicas, timeout,
                 what=lambda: f"{replicas} task(s) of {service_id} running {image}; tasks: {self.task_states(service_id)}")

    def task_states(self, service_id):
        return [(t["Spec"]["ContainerSpec"]["Image"][-8:], t["DesiredState"], t["Status"]["State"], t["Status"].get("Err"))
                for t in self.tasks(service_id)]

    def remove_all_services(self):
        for svc in self.get("/services"):
            self.call("DELETE", f"/services/{svc['ID']}")

    def for_another_thread(self) -> Swarm:
        """The same dockerd through a session of its own: a requests session is not thread-safe, and
        concurrent calls are how a thousand services are made (or removed) in seconds."""
        other = copy.copy(self)
        other.http = requests_unixsocket.Session()
        return other


def service_image_of(swarm, sid):
    spec = swarm.service(sid)["Spec"]["TaskTemplate"]
    return spec["ContainerSpec"]["Image"], spec.get("ForceUpdate", 0)
