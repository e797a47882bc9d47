"""A real multi-node swarm on one machine: 3 managers and a worker, each its own dockerd in its
own network namespace, joined over a private bridge.

  root namespace                          one namespace per node (ip netns)
  ───────────────                         ─────────────────────────────────
  bridge ecrd-mn-br 10.213.77.1/24  ◄─veth─► eth0 10.213.77.11  manager-1 (dockerd, socket in the rig's dir)
  registry relays 10.213.77.2, .3   ◄─veth─► eth0 10.213.77.12  manager-2
  moto_server, the deployers        ◄─veth─► eth0 10.213.77.13  manager-3
                                    ◄─veth─► eth0 10.213.77.21  worker-1

Each node is started with `ip netns exec`, which bind-mounts /etc/netns/NAME/hosts and
/etc/netns/NAME/docker over /etc/hosts and /etc/docker: there the ECR hostnames name a relay
to the rig's registry on the bridge, and /etc/docker/certs.d trusts its CA, while the host's
/etc stays as it is. No node has credentials of its own: a node pulls only with the registry
auth Swarm hands it. The deployer stays in the root namespace and talks to a node through that
node's socket, as the unit on that manager would.

Everything made here is named ecrd-mn-* (namespaces, links, cgroups, /etc/netns entries) or
ECRD-MN-* (iptables chains), so a run killed before its teardown is cleaned up by the next.
"""
from __future__ import annotations

import concurrent.futures
import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time

from rig.common import wait_for
from rig.swarm import Engine, Swarm

PREFIX = "ecrd-mn"
SUBNET = "10.213.77"  # a private /24 of our own
BRIDGE = f"{PREFIX}-br"
CHAINS = {"INPUT": "ECRD-MN-INPUT", "FORWARD": "ECRD-MN-FORWARD"}
NETNS_ETC = pathlib.Path("/etc/netns")
CGROUPS = pathlib.Path("/sys/fs/cgroup")
SWARM_PORT = 2377


def running(pid: str) -> bool:
    """Is this process alive (neither gone nor a zombie)?"""
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text() if pid.isdigit() else ""
    except OSError:
        return False
    return bool(status) and "\nState:\tZ" not in status


def run(*command: str, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)}: {done.stderr.strip()}")
    return done


def cgroup_mounts_script() -> str:
    """Shell commands that mount the host's cgroup hierarchies again: `ip netns exec` mounts a
    fresh /sys for the namespace, without /sys/fs/cgroup's mounts, and dockerd needs them."""
    commands = []
    for line in pathlib.Path("/proc/self/mounts").read_text().splitlines():
        source, target, fstype, options = line.split()[:4]
        if target == str(CGROUPS) or target.startswith(f"{CGROUPS}/"):
            commands.append(f"mkdir -p {target} && mount -t {fstype} -o {options} {source} {target}")
    return " && ".join(commands) or "true"


class Relay:
    """Forwards TCP from an address on the bridge to a registry on the host's loopback, so
    nodes reach the ECR-lookalike registry (TLS passes through untouched)."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        self.target = target
        self.server = socket.create_server(listen, reuse_port=False)
        self.server.settimeout(0.5)
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed.is_set():
            try:
                client, _ = self.server.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.closed.set()
        self.server.close()


class Node(Swarm):
    """One swarm node: a dockerd in network namespace ecrd-mn-N, reached through its socket."""

    def __init__(self, workdir: pathlib.Path, index: int, hostname: str, ip: str, manager: bool, engine: Engine | None):
        self.netns, self.hostname, self.ip, self.manager = f"{PREFIX}-{index}", hostname, ip, manager
        (workdir / hostname).mkdir()
        super().__init__(workdir / hostname, instance=self.netns, start=False, engine=engine)
        self.made_gwbridge = False  # its docker_gwbridge lives and dies in its namespace
        self.node_id: str | None = None

    def dockerd_command(self) -> list[str]:
        # A hostname of its own (UTS namespace) names the node in `docker node ls` and in the
        # deployer's notifications; the cgroup parent keeps its containers findable for cleanup.
        inner = [*super().dockerd_command(), "--cgroup-parent", self.netns]
        script = f"hostname {self.hostname} && {cgroup_mounts_script()} && exec \"$@\""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", script, "sh", *inner]

    def kill(self):
        """SIGKILL this node's dockerd, as a crash or the OOM killer would. Its containerd dies with it
        but stays a zombie until PID 1 reaps it (slowly, in some containers), and a dockerd restarted
        meanwhile takes the zombie named in containerd.pid for a running containerd, waits a minute for
        its socket and gives up: so wait until it is dead, and forget its pid file."""
        self.proc.kill()
        self.proc.wait()
        pid_file = self.dir / "x" / "containerd" / "containerd.pid"
        pid = pid_file.read_text().strip() if pid_file.exists() else ""
        wait_for(lambda: not running(pid), 30, what=f"the containerd of {self.hostname} to die")
        pid_file.unlink(missing_ok=True)

    def info(self) -> dict:
        return self.get("/info")

    def is_leader(self) -> bool:
        try:
            node = self.get(f"/nodes/{self.node_id}")
        except (AssertionError, OSError):
            return False
        return bool((node.get("ManagerStatus") or {}).get("Leader"))

    def containers_running(self) -> list[str]:
        """Images of the containers this node's own dockerd runs (its view, not the manager's)."""
        return sorted(c["Config"]["Image"] for c in (self.get(f"/containers/{c['Id']}/json")
                                                     for c in self.get("/containers/json")))


class Cluster:
    """3 managers and a worker, started in parallel; see the module's docstring."""

    def __init__(self, workdir: pathlib.Path, registries, managers: int = 3, workers: int = 1,
                 engine: Engine | None = None):
        """engine: every node's Docker (rig/swarm.py; the host's by default)."""
        clean_leftovers()
        self.dir = workdir / "cluster"
        self.dir.mkdir()
        self.relays: list[Relay] = []
        self.nodes: list[Node] = []
        self.closed = False
        try:
            self._network(registries, managers + workers)
            roles = [True] * managers + [False] * workers
            names = [f"manager-{i + 1}" for i in range(managers)] + [f"worker-{i + 1}" for i in range(workers)]
            self.nodes = [Node(self.dir, i + 1, name, f"{SUBNET}.{11 + i}", manager, engine)
                          for i, (name, manager) in enumerate(zip(names, roles))]
            with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
                list(pool.map(Node.start, self.nodes))
            self._form_swarm()
        except BaseException:
            self.close()
            raise

    # ---- the network: bridge, namespaces, veths, hosts and CA per node, firewall

    def _network(self, registries, count: int):
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        hosts = ["127.0.0.1 localhost"]
        for i, registry in enumerate(registries):
            relay_ip = f"{SUBNET}.{2 + i}"
            run("ip", "addr", "add", f"{relay_ip}/24", "dev", BRIDGE)
            self.relays.append(Relay((relay_ip, 443), (registry.ip, 443)))
            hosts.append(f"{relay_ip} {' '.join(registry.hosts)}")
        # Nodes may talk to each other and to the bridge's addresses, and to nothing else.
        run("iptables", "-N", CHAINS["INPUT"])
        run("iptables", "-A", CHAINS["INPUT"], "-d", f"{SUBNET}.0/24", "-j", "ACCEPT")
        run("iptables", "-A", CHAINS["INPUT"], "-j", "DROP")
        run("iptables", "-I", "INPUT", "-i", BRIDGE, "-j", CHAINS["INPUT"])
        run("iptables", "-N", CHAINS["FORWARD"])
        run("iptables", "-A", CHAINS["FORWARD"], "-o", BRIDGE, "-j", "ACCEPT")  # node to node (bridged)
        run("iptables", "-A", CHAINS["FORWARD"], "-j", "DROP")
        run("iptables", "-I", "FORWARD", "-i", BRIDGE, "-j", CHAINS["FORWARD"])
        for index in range(1, count + 1):
            netns, ip = f"{PREFIX}-{index}", f"{SUBNET}.{10 + index}"
            run("ip", "netns", "add", netns)
            run("ip", "link", "add", f"{netns}h", "type", "veth", "peer", "name", f"{netns}n")
            run("ip", "link", "set", f"{netns}n", "netns", netns)
            run("ip", "link", "set", f"{netns}h", "master", BRIDGE, "up")
            run("ip", "-n", netns, "link", "set", f"{netns}n", "name", "eth0")
            run("ip", "-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
            run("ip", "-n", netns, "link", "set", "eth0", "up")
            run("ip", "-n", netns, "link", "set", "lo", "up")
            etc = NETNS_ETC / netns
            (etc / "docker").mkdir(parents=True)
            (etc / "hosts").write_text("\n".join(hosts) + "\n")
            for registry in registries:
                for host in registry.hosts:
                    (etc / "docker" / "certs.d" / host).mkdir(parents=True)
                    shutil.copy(registry.ca, etc / "docker" / "certs.d" / host / "ca.crt")

    def _form_swarm(self):
        first = self.nodes[0]
        first.post("/swarm/init", json={"ListenAddr": f"{first.ip}:{SWARM_PORT}", "AdvertiseAddr": first.ip})
        tokens = first.get("/swarm")["JoinTokens"]

        def join(node: Node):
            node.post("/swarm/join", json={"ListenAddr": f"{node.ip}:{SWARM_PORT}", "AdvertiseAddr": node.ip,
                                           "RemoteAddrs": [f"{first.ip}:{SWARM_PORT}"],
                                           "JoinToken": tokens["Manager" if node.manager else "Worker"]})

        # Managers join one at a time (each is a Raft membership change); workers alongside.
        workers = [n for n in self.nodes[1:] if not n.manager]
        with concurrent.futures.ThreadPoolExecutor(len(workers) or 1) as pool:
            joined = list(map(pool.submit, [join] * len(workers), workers))
            for node in self.nodes[1:]:
                if node.manager:
                    join(node)
            for future in joined:
                future.result()
        for node in self.nodes:
            node.node_id = node.info()["Swarm"]["NodeID"]
        wait_for(lambda: all(n["Status"]["State"] == "ready" for n in first.get("/nodes"))
                 and len(first.get("/nodes")) == len(self.nodes), 60, what="every node ready")

    # ---- roles

    @property
    def managers(self) -> list[Node]:
        return [n for n in self.nodes if n.manager]

    @property
    def workers(self) -> list[Node]:
        return [n for n in self.nodes if not n.manager]

    def leader(self, timeout=60) -> Node:
        return wait_for(lambda: next((n for n in self.managers if n.proc.poll() is None and n.is_leader()), None),
                        timeout, what="a swarm leader")

    def followers(self) -> list[Node]:
        leader = self.leader()
        return [n for n in self.managers if n is not leader]

    def restart(self, node: Node):
        """Start a killed node's dockerd again (systemd's Restart=always); it rejoins by itself."""
        node.start()
        wait_for(lambda: self.leader().get(f"/nodes/{node.node_id}")["Status"]["State"] == "ready", 90,
                 what=f"{node.hostname} back and ready")

    def remove_all_services(self):
        self.leader().remove_all_services()

    # ---- teardown

    def close(self):
        if self.closed:
            return
        self.closed = True
        for node in self.nodes:
            if node.proc and node.proc.poll() is None:
                node.proc.terminate()  # dockerd stops its containers on the way out
        for node in self.nodes:
            if node.proc:
                try:
                    node.proc.wait(20)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()
        for relay in self.relays:
            relay.close()
        clean_leftovers()


# ---- cleanup, also of a run killed before its teardown

def our_namespaces() -> list[str]:
    listed = run("ip", "netns", "list", check=False).stdout.split("\n")
    return [line.split()[0] for line in listed if line.startswith(f"{PREFIX}-")]


def our_links() -> list[str]:
    return [p.name for p in pathlib.Path("/sys/class/net").iterdir() if p.name.startswith(PREFIX)]


def our_cgroups() -> list[pathlib.Path]:
    """The cgroup directories of our nodes' containers, deepest first (the order rmdir needs)."""
    found = [path for hierarchy in CGROUPS.iterdir() if hierarchy.is_dir()
             for path in hierarchy.glob(f"{PREFIX}-*") if path.is_dir()]
    if (CGROUPS / "cgroup.procs").exists():  # a pure cgroup v2 host
        found = [path for path in CGROUPS.glob(f"{PREFIX}-*") if path.is_dir()]
    return sorted((d for top in found for d in [top, *top.rglob("*")] if d.is_dir()),
                  key=lambda d: len(d.parts), reverse=True)


def our_processes() -> list[int]:
    """Processes in our namespaces (dockerd, containerd, shims) or our cgroups (the containers)."""
    pids = {int(pid) for netns in our_namespaces()
            for pid in run("ip", "netns", "pids", netns, check=False).stdout.split()}
    for cgroup in our_cgroups():
        try:
            pids.update(int(pid) for pid in (cgroup / "cgroup.procs").read_text().split())
        except OSError:
            pass
    pids.discard(os.getpid())
    return sorted(pids)


def our_chains() -> list[str]:
    rules = run("iptables", "-S", check=False).stdout
    return [chain for chain in CHAINS.values() if f"-N {chain}" in rules]


def leftovers() -> list[str]:
    """What is left of a cluster on this machine: empty after a clean teardown."""
    etc = list(NETNS_ETC.glob(f"{PREFIX}-*")) if NETNS_ETC.exists() else []
    return ([f"process {pid}" for pid in our_processes()] + [f"netns {n}" for n in our_namespaces()]
            + [f"link {link}" for link in our_links()] + [f"iptables chain {c}" for c in our_chains()]
            + [f"cgroup {c}" for c in our_cgroups()] + [str(path) for path in etc])


def clean_leftovers():
    deadline = time.monotonic() + 30
    while (pids := our_processes()) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    for cgroup in our_cgroups():
        for _ in range(50):  # a killed process leaves its cgroup a moment later
            try:
                cgroup.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
    for netns in our_namespaces():
        run("ip", "netns", "delete", netns, check=False)
    for link in our_links():  # the host-side veth ends too: they outlive a namespace still in use
        run("ip", "link", "delete", link, check=False)
    for builtin, chain in CHAINS.items():
        while run("iptables", "-D", builtin, "-i", BRIDGE, "-j", chain, check=False).returncode == 0:
            pass
        run("iptables", "-F", chain, check=False)
        run("iptables", "-X", chain, check=False)
    for etc in NETNS_ETC.glob(f"{PREFIX}-*") if NETNS_ETC.exists() else []:
        shutil.rmtree(etc, ignore_errors=True)
    if NETNS_ETC.exists() and not any(NETNS_ETC.iterdir()):
        NETNS_ETC.rmdir()
