#!/usr/bin/env python3
"""ecr-deploy benchmark: latency, latency with 1 vs N services in the swarm, burst cost, idle cost, the
reconcile pass over services that follow tags and over services that follow versions,
the docker CLI way side by side, cold start and memory (beside a floor process, bench/floor.py), and
latency and memory without and with a notification target (Apprise's json:// to a slow local sink) —
measured on the same real rig as the tests (moto_server, a private dockerd swarm, TLS registries
posing as ECR), with counting proxies in front of the AWS endpoint (calls per API action) and the
Docker socket (calls per method + path).

    python3 bench/bench.py           # the full run, as a table (as root: it starts dockerd)
    python3 bench/bench.py --json    # the same as JSON
    python3 bench/bench.py --short   # a few iterations each: what CI runs so that it cannot rot
    python3 bench/bench.py --engine bookworm   # on the host's dockerd (20.10) instead of Docker 28

Timings are reported, not asserted; only counts that must be exact (updates made) fail the run.
"""
from __future__ import annotations

import argparse
import base64
import collections
import concurrent.futures
import http.server
import json
import os
import pathlib
import platform
import queue as queues
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import requests

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ecr_deploy as ed  # noqa: E402
from rig.aws import Aws, event  # noqa: E402  (the rig the tests use)
from rig.common import wait_for  # noqa: E402
from rig.deployer import Running, deployer_env, run_once, updated_lines  # noqa: E402
from rig.faults import FaultProxy  # noqa: E402
from rig.registry import REGISTRIES, Images, service_on_new_repo, serving_registries  # noqa: E402
from rig.swarm import Swarm, current_engine, host_engine, service_image_of  # noqa: E402

FULL = {"latency_pushes": 30, "latency_interval": 1.0, "scale_services": 1000, "burst_images": 25,
        "burst_pushes_per_image": 20, "idle_seconds": 60, "side_services": 20, "fan_out_rounds": 7, "cold_runs": 10,
        "memory_messages": 5000, "notify_pushes": 10, "notify_rounds": 3,
        "reconcile_services": 1000, "reconcile_repositories": 100,
        "versions": ((1000, 100, 100), (1000, 10, 1000)), "push_cost_tags": 1000}
SHORT = {"latency_pushes": 5, "latency_interval": 0.3, "scale_services": 50, "burst_images": 5,
         "burst_pushes_per_image": 4, "idle_seconds": 21, "side_services": 5, "fan_out_rounds": 2, "cold_runs": 2,
         "memory_messages": 200, "notify_pushes": 3, "notify_rounds": 1,
         "reconcile_services": 50, "reconcile_repositories": 5,
         "versions": ((20, 2, 10), (4, 1, 30)), "push_cost_tags": 10}
FILLER_REPOSITORIES = 10  # the scale measurement's other services run images of this many repositories
CREATE_WORKERS = 8  # concurrent service creates: dockerd commits them about twice as fast as one by one
SERVICE_ID = re.compile(r"/(services|tasks)/[^/?]+")


def call_name(key: str) -> str:
    """A proxy key -> the AWS action, or the Docker method + path (ids folded)."""
    parts = key.split()
    if len(parts) == 3:  # AWS: "POST / Service.Action"
        return parts[2].rpartition(".")[2]
    path = SERVICE_ID.sub(r"/\1/{id}", parts[1].split("?")[0])  # Docker: "GET /v1.41/services/ID?x=y"
    return f"{parts[0]} {re.sub(r'^/v[0-9.]+', '', path)}"


def counted(keys: list[str]) -> collections.Counter:
    return collections.Counter(call_name(key) for key in keys)


def seconds_by_call(timings: list[tuple[str, float]]) -> dict:
    """Where the wall time went: upstream seconds per call kind (moto's or dockerd's own time)."""
    total = collections.defaultdict(float)
    for key, seconds in timings:
        total[call_name(key)] += seconds
    return {name: round(value, 2) for name, value in sorted(total.items(), key=lambda kv: -kv[1])}


class ServiceEvents:
    """Docker's event stream: when each service update was committed, as Swarm reports it."""

    def __init__(self, swarm):
        self.updates: queues.Queue = queues.Queue()
        filters = json.dumps({"type": ["service"], "event": ["update"]})
        self.reply = swarm.http.get(swarm.base + "/events", params={"filters": filters}, stream=True, timeout=None)

        def read():
            try:
                for line in self.reply.iter_lines():
                    if line:
                        self.updates.put((time.monotonic(), json.loads(line)["Actor"]["ID"]))
            except requests.RequestException:
                pass  # dockerd stopped: the stream is over

        threading.Thread(target=read, daemon=True).start()

    def wait(self, service_ids: set[str], after: float, timeout=60.0) -> float:
        """Monotonic time at which every one of service_ids had an update committed after `after`."""
        remaining, last = set(service_ids), after
        deadline = time.monotonic() + timeout
        while remaining:
            at, sid = self.updates.get(timeout=max(0.01, deadline - time.monotonic()))
            if at >= after and sid in remaining:
                remaining.discard(sid)
                last = at
        return last


def deployer(env: dict, *args: str, as_installed=False) -> Running:
    running = Running(env, *args, as_installed=as_installed)
    running.wait_line("watching")
    return running


def image_of(swarm, sid: str) -> str:
    return swarm.service(sid)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# --------------------------------------------------------------------------- the measurements

def push_latencies_ms(aws, push_image, swarm, events, repo: str, sid: str, n: int, interval: float,
                      **env) -> list[float]:
    """A loop-mode deployer started afresh (env: more of its environment); per push (push_image(repo,
    content) -> digest), from SendMessage until Swarm commits the update."""
    registry = REGISTRIES[0]
    queue = aws.new_queue()
    running = deployer(deployer_env(aws, swarm, **env), "--queue", queue, "--auth-refresh", "0")
    latencies = []
    try:
        time.sleep(1.5)  # past the first (short) poll: now in the 20 s long poll, as in production
        for i in range(n):
            digest = push_image(repo, uuid.uuid4().hex)
            started = time.monotonic()
            aws.send(queue, event(repository=repo, digest=digest))
            latencies.append((events.wait({sid}, started) - started) * 1000)
            assert image_of(swarm, sid) == f"{registry.host}/{repo}:latest@{digest}"
            time.sleep(interval)
    finally:
        running.stop()
    return latencies


def measure_latency(aws, images, swarm, events, n: int, interval: float) -> dict:
    repo, _, sid = service_on_new_repo(images, swarm, "latency", contents=("v0",))
    ms = push_latencies_ms(aws, lambda repo, content: images.push(repo, "latest", content), swarm, events,
                           repo, sid, n, interval)
    return {"pushes": n, "p50_ms": round(percentile(ms, 50), 1), "p95_ms": round(percentile(ms, 95), 1),
            "max_ms": round(max(ms), 1)}


class NotifySink:
    """A plain HTTP server on loopback that Apprise's `json://` target posts to, answering after `delay`
    seconds (a slow chat service): what it received, in order."""

    def __init__(self, delay: float):
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(delay)
                received.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"json://127.0.0.1:{self.server.server_address[1]}/notify"

    def said(self) -> str:
        return "\n".join(f"{message.get('title', '')}\n{message.get('message', '')}" for message in self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


NOTIFY_SINK_DELAY = 0.25  # s: the target answers this late; a send on the deploy path would add it to every push


def measure_notify(aws, images, swarm, events, pushes: int, interval: float, rounds: int) -> dict:
    """Push latency without notification targets and with one Apprise target (json:// to NotifySink), in
    turns (`rounds` deployers of each, `pushes` pushes each; a deployer's first push, which fills its
    service index, is left out), then whether the target was told of every push."""
    registry = REGISTRIES[0]
    repo, _, sid = service_on_new_repo(images, swarm, "notify", contents=("v0",))
    sink = NotifySink(NOTIFY_SINK_DELAY)
    pushed: list[str] = []

    def push(repository: str, content: str) -> str:
        pushed.append(images.push(repository, "latest", content))
        return pushed[-1]

    none_ms, one_ms, with_target = [], [], []
    try:
        for _ in range(rounds):
            none_ms += push_latencies_ms(aws, push, swarm, events, repo, sid, pushes + 1, interval)[1:]
            first = len(pushed)
            one_ms += push_latencies_ms(aws, push, swarm, events, repo, sid, pushes + 1, interval,
                                        DEPLOYER_NOTIFY_URL=sink.url)[1:]
            with_target += pushed[first:]
        told = lambda: sum(digest[:19] in sink.said() for digest in with_target)  # noqa: E731 (Event.line's)
        try:
            wait_for(lambda: told() == len(with_target), 30, interval=0.2)
        except AssertionError:
            pass  # reported below as a count short of its target
        messages, pushes_told = len(sink.received), told()
    finally:
        sink.close()
    assert image_of(swarm, sid) == f"{registry.host}/{repo}:latest@{pushed[-1]}"
    p50_none, p50_one = statistics.median(none_ms), statistics.median(one_ms)
    return {"pushes": len(one_ms), "rounds": rounds, "sink_delay_s": NOTIFY_SINK_DELAY,
            "p50_none_ms": round(p50_none, 1), "p50_one_ms": round(p50_one, 1),
            "max_none_ms": round(max(none_ms), 1), "max_one_ms": round(max(one_ms), 1),
            "one_over_none": round(p50_one / p50_none, 2), "pushes_with_target": len(with_target),
            "pushes_told": pushes_told, "messages": messages}


def in_parallel(swarm, work, items: list) -> list:
    """work(swarm, item) for every item, CREATE_WORKERS at a time, each thread with its own session."""
    def run_share(share: list) -> list:
        own = swarm.for_another_thread()
        return [work(own, item) for item in share]

    with concurrent.futures.ThreadPoolExecutor(CREATE_WORKERS) as pool:
        shares = pool.map(run_share, [items[i::CREATE_WORKERS] for i in range(CREATE_WORKERS)])
        return [result for share in shares for result in share]


def measure_scale(aws, images, swarm, events, n: int, pushes: int, interval: float) -> dict:
    """Push latency with 1 service in the swarm, then with n (the others run images of other repositories,
    without replicas), side by side in one run. Each deployer starts afresh: its first push lists the
    services (loop mode's index fills then), reported apart; the p50s are of the pushes after it.
    Every image is put in ECR only, never pushed to a registry (a second, with bcrypt on every request):
    services without replicas never pull, and each latency is timed from after the push anyway."""
    registry = REGISTRIES[0]

    def put_image(repository: str, content: str) -> str:
        return aws.put_image(registry.account, registry.region, repository, "latest", content)

    repo = images.new_repository()
    sid = swarm.create_service("scale", f"{registry.host}/{repo}:latest@{put_image(repo, 'v0')}", replicas=0)
    one = push_latencies_ms(aws, put_image, swarm, events, repo, sid, pushes + 1, interval)
    fillers = []
    for _ in range(FILLER_REPOSITORIES):
        filler_repo = images.new_repository()
        fillers.append(f"{registry.host}/{filler_repo}:latest@{put_image(filler_repo, filler_repo)}")
    started = time.monotonic()
    filler_ids = in_parallel(swarm, lambda own, i: own.create_service(f"filler-{i}", fillers[i % len(fillers)],
                                                                      replicas=0), list(range(n - 1)))
    created_s = time.monotonic() - started
    try:
        many = push_latencies_ms(aws, put_image, swarm, events, repo, sid, pushes + 1, interval)
    finally:
        in_parallel(swarm, lambda own, filler: own.call("DELETE", f"/services/{filler}"), filler_ids)
    p50_one, p50_many = percentile(one[1:], 50), percentile(many[1:], 50)
    return {"services": n, "pushes": pushes, "create_others_s": round(created_s, 1),
            "p50_1_ms": round(p50_one, 1), "p50_n_ms": round(p50_many, 1), "n_over_1": round(p50_many / p50_one, 2),
            "first_push_1_ms": round(one[0], 1), "first_push_n_ms": round(many[0], 1)}


def measure_burst(aws, images, swarm, workdir, n_images: int, per_image: int) -> dict:
    registry = REGISTRIES[0]
    services, events = [], []
    for i in range(n_images):
        repo, (v1, v2), sid = service_on_new_repo(images, swarm, f"burst-{i}")
        services.append((sid, f"{registry.host}/{repo}:latest@{v2}"))
        # Earlier pushes of the burst name older digests; ECR's tag is at the last (v2).
        digests = ["sha256:" + uuid.uuid4().hex * 2 for _ in range(per_image - 1)] + [v2]
        events.append([event(repository=repo, digest=d) for d in digests])
    bodies = [json.dumps(e) for round_ in zip(*events) for e in round_]  # interleaved, as CI pushes them
    queue = aws.new_queue()
    for start in range(0, len(bodies), 10):
        aws.sqs.send_message_batch(QueueUrl=queue, Entries=[
            {"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies[start:start + 10])])
    aws_proxy = FaultProxy(aws.url)
    docker_proxy = FaultProxy(swarm.base, unix_path=str(workdir / f"bench-{uuid.uuid4().hex[:6]}.sock"))
    try:
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        run = run_once(deployer_env(aws, swarm, AWS_ENDPOINT_URL=aws_proxy.url,
                                            DOCKER_HOST=docker_proxy.url), "--queue", queue)
        wall = time.monotonic() - started
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        aws_proxy.close()
        docker_proxy.close()
    assert run.returncode == 0, run.stderr
    updates = len(updated_lines(run.stderr))
    for sid, image in services:
        assert service_image_of(swarm, sid) == (image, 1), sid
    aws_calls, docker_calls = counted(aws_proxy.seen), counted(docker_proxy.seen)
    sqs_calls = sum(v for k, v in aws_calls.items() if k in ("ReceiveMessage", "DeleteMessageBatch", "GetQueueUrl"))
    return {"events": len(bodies), "images": n_images, "services": n_images, "updates": updates,
            "wall_s": round(wall, 2),
            "deployer_cpu_s": round(cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime, 2),
            "sqs_calls": sqs_calls, "sqs_calls_per_message": round(sqs_calls / len(bodies), 3),
            "aws_calls": dict(aws_calls), "docker_calls": dict(docker_calls),
            "upstream_seconds": {**seconds_by_call(aws_proxy.seconds), **seconds_by_call(docker_proxy.seconds)},
            "get_authorization_token_per_registry": aws_calls["GetAuthorizationToken"]}


def measure_idle(aws, swarm, workdir, seconds: float) -> dict:
    queue = aws.new_queue()
    aws_proxy = FaultProxy(aws.url)
    docker_proxy = FaultProxy(swarm.base, unix_path=str(workdir / f"bench-{uuid.uuid4().hex[:6]}.sock"))
    running = deployer(deployer_env(aws, swarm, AWS_ENDPOINT_URL=aws_proxy.url, DOCKER_HOST=docker_proxy.url),
                       "--queue", queue, "--auth-refresh", "0")
    try:
        time.sleep(2)  # start-up (queue lookup, Docker ping, the first short poll) is not idling
        aws_before, docker_before = len(aws_proxy.seen), len(docker_proxy.seen)
        time.sleep(seconds)
        aws_window, docker_window = aws_proxy.seen[aws_before:], docker_proxy.seen[docker_before:]
    finally:
        running.stop()
        aws_proxy.close()
        docker_proxy.close()
    return {"seconds": seconds, "sqs_calls": len(aws_window),
            "sqs_calls_per_minute": round(len(aws_window) * 60 / seconds, 2), "docker_calls": len(docker_window)}


def measure_reconcile(aws, images, swarm, workdir, n_services: int, n_repositories: int) -> dict:
    """One `--reconcile` pass over n services following a tag each, in n_repositories repositories
    (images in ECR only: services without replicas never pull): first all current, then with every
    tag of a tenth of the repositories moved, as if their push events had been lost."""
    registry = REGISTRIES[0]
    account, region = registry.account, registry.region
    tags_per_repository = max(1, n_services // n_repositories // 2)  # two services per tag
    specs, moved = [], []
    for r in range(n_repositories):
        repo = images.new_repository(prefix="reconcile")
        for t in range(tags_per_repository):
            digest = aws.put_image(account, region, repo, f"t{t}", f"{repo}-{t}-v1")
            specs += [(f"rc-{r}-{t}-{n}", f"{registry.host}/{repo}:t{t}@{digest}") for n in range(2)]
            if r % 10 == 0:
                moved.append((repo, f"t{t}"))
    created = in_parallel(swarm, lambda own, spec: own.create_service(*spec, replicas=0), specs)
    result = {"services": len(specs), "repositories": n_repositories, "tags": n_repositories * tags_per_repository}

    def one_pass(mode: str = "--reconcile", expect: int = 0, **env) -> dict:
        aws_proxy = FaultProxy(aws.url)
        docker_proxy = FaultProxy(swarm.base, unix_path=str(workdir / f"bench-{uuid.uuid4().hex[:6]}.sock"))
        try:
            started = time.monotonic()
            run = subprocess.run([sys.executable, str(ROOT / "ecr_deploy.py"), mode], capture_output=True,
                                 text=True, timeout=600, env=deployer_env(aws, swarm, AWS_ENDPOINT_URL=aws_proxy.url,
                                                                          DOCKER_HOST=docker_proxy.url, **env))
            wall = time.monotonic() - started
        finally:
            aws_proxy.close()
            docker_proxy.close()
        assert run.returncode == expect, run.stdout + run.stderr
        aws_calls, docker_calls = counted(aws_proxy.seen), counted(docker_proxy.seen)
        return {"wall_s": round(wall, 2), "describe_images": aws_calls["DescribeImages"],
                "aws_calls": sum(aws_calls.values()), "aws_calls_by_kind": dict(aws_calls),
                "docker_calls": sum(docker_calls.values()),
                "docker_calls_by_kind": dict(docker_calls), "updates": len(updated_lines(run.stderr))}

    result["current"] = one_pass()
    # Protection tags: the first pass tags every running digest (a PutImage and its BatchGetImage each), the
    # next ones find them in place (one ListImages per repository, shared with the tag lookups).
    result["protect_first"] = one_pass(DEPLOYER_PROTECT_TAG_PREFIX="bench")
    result["protect_steady"] = one_pass(DEPLOYER_PROTECT_TAG_PREFIX="bench")
    # The lifecycle lint (on request, not a pass): a policy on every repository that would expire none of
    # the digests in use, so that ECR's preview is asked and answers with nothing to say.
    ecr = aws.client("ecr", region)
    policy = json.dumps({"rules": [{"rulePriority": 1, "description": "untagged after 30 days", "action": {
        "type": "expire"}, "selection": {"tagStatus": "untagged", "countType": "sinceImagePushed",
                                         "countUnit": "days", "countNumber": 30}}]})
    for repo in {spec[1].split("/", 1)[1].split(":")[0] for spec in specs}:
        ecr.put_lifecycle_policy(registryId=account, repositoryName=repo, lifecyclePolicyText=policy)
    result["lint"] = one_pass("--lint-lifecycle")
    for repo, tag in moved:
        aws.put_image(account, region, repo, tag, f"{repo}-{tag}-v2")
    result["behind"] = one_pass()
    result["behind"]["services_behind"] = 2 * len(moved)
    in_parallel(swarm, lambda own, sid: own.call("DELETE", f"/services/{sid}"), created)
    return result


def counted_run(aws, swarm, workdir, *args: str) -> tuple[subprocess.CompletedProcess, float, collections.Counter,
                                                         collections.Counter]:
    """ecr_deploy.py ARGS behind the counting proxies: the run, its wall time, its AWS and Docker calls by kind."""
    aws_proxy = FaultProxy(aws.url)
    docker_proxy = FaultProxy(swarm.base, unix_path=str(workdir / f"bench-{uuid.uuid4().hex[:6]}.sock"))
    try:
        started = time.monotonic()
        run = subprocess.run([sys.executable, str(ROOT / "ecr_deploy.py"), *args], capture_output=True, text=True,
                             timeout=600, env=deployer_env(aws, swarm, AWS_ENDPOINT_URL=aws_proxy.url,
                                                           DOCKER_HOST=docker_proxy.url))
        wall = time.monotonic() - started
    finally:
        aws_proxy.close()
        docker_proxy.close()
    assert run.returncode == 0, run.stderr
    return run, wall, counted(aws_proxy.seen), counted(docker_proxy.seen)


def measure_reconcile_versions(aws, images, swarm, workdir, n_services: int, n_repositories: int,
                               n_tags: int) -> dict:
    """One `--reconcile` pass over n services that follow versions (semver:^1), in n_repositories repositories
    of n_tags releases each (1.0.0, 1.0.1, …; images in ECR only, services without replicas): first each at
    its newest, then with a newer release in a tenth of the repositories, as if their push events had been
    lost. ListImages pages by 1,000 tags: a repository of more is listed in more calls."""
    registry = REGISTRIES[0]
    account, region = registry.account, registry.region
    specs, moved = [], []
    per_repository = max(1, n_services // n_repositories)
    for r in range(n_repositories):
        repo = images.new_repository(prefix="versions")
        newest = [aws.put_image(account, region, repo, f"1.0.{t}", f"{repo}-{t}") for t in range(n_tags)][-1]
        specs += [(f"vr-{r}-{n}", f"{registry.host}/{repo}:1.0.{n_tags - 1}@{newest}") for n in range(per_repository)]
        if r % 10 == 0:
            moved.append(repo)
    created = in_parallel(swarm, lambda own, spec: own.create_service(*spec, replicas=0, labels={
        ed.VERSIONS_LABEL: "semver:^1"}), specs)
    result = {"services": len(specs), "repositories": n_repositories, "tags_per_repository": n_tags}

    def one_pass() -> dict:
        run, wall, aws_calls, docker_calls = counted_run(aws, swarm, workdir, "--reconcile")
        return {"wall_s": round(wall, 2), "list_images": aws_calls["ListImages"],
                "describe_images": aws_calls["DescribeImages"], "aws_calls": sum(aws_calls.values()),
                "docker_calls": sum(docker_calls.values()), "updates": len(updated_lines(run.stderr))}

    result["current"] = one_pass()
    for repo in moved:
        aws.put_image(account, region, repo, "1.1.0", f"{repo}-1.1.0")
    result["behind"] = one_pass()
    result["behind"]["services_behind"] = per_repository * len(moved)
    result["list_images_expected"] = n_repositories * -(-n_tags // ed.LIST_IMAGES_MAX_RESULTS)  # (all current)
    in_parallel(swarm, lambda own, sid: own.call("DELETE", f"/services/{sid}"), created)
    return result


def measure_push_cost(aws, images, swarm, workdir, n_tags: int) -> dict:
    """The ECR calls of one push event that rolls one service: one that follows :latest, one that follows
    versions (semver:^1, its repository holding n_tags releases); --once with the reconcile pass off."""
    registry = REGISTRIES[0]
    account, region = registry.account, registry.region
    result = {}
    releases = [f"1.0.{t}" for t in range(n_tags)]
    for kind, tags, label, pushed in (("tag", ["latest"], {}, "latest"),
                                      ("versions", releases, {ed.VERSIONS_LABEL: "semver:^1"}, "1.1.0")):
        repo = images.new_repository(prefix="push")
        digest = [aws.put_image(account, region, repo, tag, f"{repo}-{tag}") for tag in tags][-1]
        sid = swarm.create_service(f"push-{kind}", f"{registry.host}/{repo}:{tags[-1]}@{digest}", replicas=0,
                                   labels=label)
        queue = aws.new_queue()
        aws.send(queue, event(account=account, region=region, repository=repo, tag=pushed,
                              digest=aws.put_image(account, region, repo, pushed, f"{repo}-{pushed}-2")))
        run, wall, aws_calls, _ = counted_run(aws, swarm, workdir, "--once", "--queue", queue, "--reconcile-every", "0")
        ecr_calls = {k: v for k, v in aws_calls.items() if k not in ("ReceiveMessage", "DeleteMessageBatch",
                                                                      "GetQueueUrl", "GetQueueAttributes")}
        result[kind] = {"ecr_calls": sum(ecr_calls.values()), "by_kind": ecr_calls,
                        "updates": len(updated_lines(run.stderr))}
        swarm.call("DELETE", f"/services/{sid}")
    result.update(ecr_calls_tag=result["tag"]["ecr_calls"], ecr_calls_versions=result["versions"]["ecr_calls"],
                  updates=result["tag"]["updates"] + result["versions"]["updates"])
    return result


def measure_side_by_side(aws, images, swarm, events, workdir, n: int, rounds: int) -> dict:
    registry = REGISTRIES[0]
    repo = images.new_repository()
    v1 = images.push(repo, "latest", "side-v1")
    names = [f"side-{i}" for i in range(n)]
    ids = {swarm.create_service(name, f"{registry.host}/{repo}:latest@{v1}", registry=registry, replicas=0): name
           for name in names}
    token = base64.b64decode(aws.client("ecr").get_authorization_token()["authorizationData"][0]
                             ["authorizationToken"]).decode().partition(":")[2]
    result = {"services": n}

    # (a) the docker CLI way, as shepherd-style tools do it: login, then one CLI call per service
    digest = images.push(repo, "latest", "side-cli")
    cli_env = {**os.environ, "DOCKER_HOST": swarm.docker_host, "DOCKER_CONFIG": str(workdir / "docker-cli")}
    docker = swarm.engine.docker  # the CLI of the daemon's own release
    subprocess.run([docker, "login", "-u", "AWS", "--password-stdin", registry.host], input=token, text=True,
                   env=cli_env, check=True, capture_output=True)
    started = time.monotonic()
    for name in names:
        subprocess.run([docker, "service", "update", "--detach", "--force", "--with-registry-auth",
                        "--image", f"{registry.host}/{repo}:latest@{digest}", name],
                       env=cli_env, check=True, capture_output=True)
    result["cli_s"] = round(events.wait(set(ids), started) - started, 3)

    # (b) ecr_deploy.py, already running: from SendMessage of one event until all specs show the digest,
    # and (c) the floor: the same inspect + update calls against the Engine API in a bare loop; in turns,
    # `rounds` of each, so that both see the same machine (medians: one push is at the mercy of a hiccup)
    auth = ed.registry_auth_header("AWS", token, registry.host)
    queue = aws.new_queue()
    running = deployer(deployer_env(aws, swarm), "--queue", queue, "--auth-refresh", "0")
    deployer_ms, floor_ms = [], []
    try:
        time.sleep(1.5)  # past its first reconcile pass, which would otherwise find the new digest first
        for _ in range(rounds):
            digest = images.push(repo, "latest", f"side-deployer-{uuid.uuid4().hex}")
            started = time.monotonic()
            aws.send(queue, event(repository=repo, digest=digest))
            deployer_ms.append((events.wait(set(ids), started) - started) * 1000)
            assert all(image_of(swarm, sid).endswith(digest) for sid in ids)
            time.sleep(1.0)  # its rollouts followed to their end, as between two pushes
            digest = images.push(repo, "latest", f"side-floor-{uuid.uuid4().hex}")
            started = time.monotonic()
            for sid in ids:
                service = swarm.get(f"/v1.41/services/{sid}")
                swarm.post(f"/v1.41/services/{sid}/update", params={"version": service["Version"]["Index"]},
                           json=ed.updated_spec(service["Spec"], f"{registry.host}/{repo}:latest@{digest}"),
                           headers={"X-Registry-Auth": auth})
            floor_ms.append((events.wait(set(ids), started) - started) * 1000)
            time.sleep(0.5)
    finally:
        running.stop()
    result["deployer_s"] = round(statistics.median(deployer_ms) / 1000, 3)
    result["floor_s"] = round(statistics.median(floor_ms) / 1000, 3)
    result["rounds"], result["deployer_ms"], result["floor_ms"] = rounds, \
        [round(ms, 1) for ms in deployer_ms], [round(ms, 1) for ms in floor_ms]
    result["cli_over_deployer"] = round(result["cli_s"] / result["deployer_s"], 2)
    result["deployer_over_floor"] = round(result["deployer_s"] / result["floor_s"], 2)
    return result


def measure_cold_start(aws, swarm, runs: int) -> dict:
    queue = aws.new_queue()
    env = deployer_env(aws, swarm)
    walls = []
    for _ in range(runs):
        started = time.monotonic()
        run = run_once(env, "--queue", queue)
        walls.append(time.monotonic() - started)
        assert run.returncode == 0, run.stderr
    importtime = subprocess.run([sys.executable, "-X", "importtime", "-c", "import ecr_deploy"], cwd=ROOT,
                                capture_output=True, text=True).stderr
    top = []
    for line in importtime.splitlines():  # "import time: self [us] | cumulative | imported package"
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)$", line)
        if match and len(match[3]) == 2:  # what ecr_deploy imports directly, with all it pulls in
            top.append((int(match[2]), match[4]))
    top.sort(reverse=True)
    return {"runs": runs, "median_s": round(statistics.median(walls), 3),
            "startup_s": round(statistics.median(walls) - ed.FIRST_WAIT_ONCE, 3),
            "import_top_ms": {name: round(us / 1000, 1) for us, name in top[:6]}}


def rss_kib(pid: int) -> tuple[int, int]:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    value = lambda key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M)[1])  # noqa: E731
    return value("VmRSS"), value("VmHWM")


def start_floor(aws, swarm, queue_url: str) -> subprocess.Popen:
    """bench/floor.py: botocore and requests-unixsocket imported, the deployer's four calls made."""
    floor = subprocess.Popen([sys.executable, str(ROOT / "bench" / "floor.py"), queue_url.rpartition("/")[2],
                              swarm.socket], env=deployer_env(aws, swarm), stdout=subprocess.PIPE, text=True)
    assert floor.stdout.readline().strip() == "ready", "bench/floor.py did not start"
    return floor


def measure_memory(aws, images, swarm, messages: int, **env) -> dict:
    """A steady stream (moto slows down on deep queues): pushes for 5 images, every 10th message junk.
    The deployer runs as installed (a module, compiled at install; env: more of its environment); the
    floor runs beside it."""
    repos = []
    for i in range(5):
        repo, (v1, v2), sid = service_on_new_repo(images, swarm, f"memory-{i}")
        repos.append((repo, v2))
    queue = aws.new_queue()
    floor = start_floor(aws, swarm, queue)
    running = deployer(deployer_env(aws, swarm, **env), "--queue", queue, "--auth-refresh", "0", as_installed=True)
    time.sleep(1.5)
    rss_start, _ = rss_kib(running.proc.pid)
    checkpoint, rss_early = max(100, min(1000, messages // 5) // 100 * 100), None
    try:
        for sent in range(0, messages, 100):
            for start in range(sent, sent + 100, 10):
                aws.sqs.send_message_batch(QueueUrl=queue, Entries=[
                    {"Id": str(i), "MessageBody": json.dumps(event(repository=repos[i % 5][0],
                                                                       digest=repos[i % 5][1])) if i % 10 else "junk"}
                    for i in range(start, start + 10)])
            wait_for(lambda: aws.queue_depth(queue) == 0, 120, interval=0.05)
            if rss_early is None and sent + 100 >= checkpoint:
                rss_early, _ = rss_kib(running.proc.pid)
        time.sleep(1)
        rss_late, peak = rss_kib(running.proc.pid)
        floor_rss, _ = rss_kib(floor.pid)
    finally:
        running.stop()
        floor.kill()
        floor.wait()
    return {"messages": messages, "checkpoint": checkpoint, "rss_idle_after_start_mib": round(rss_start / 1024, 1),
            "rss_at_checkpoint_mib": round(rss_early / 1024, 1),
            "rss_at_end_mib": round(rss_late / 1024, 1), "peak_rss_mib": round(peak / 1024, 1),
            "growth_mib": round((rss_late - rss_early) / 1024, 2), "floor_rss_mib": round(floor_rss / 1024, 1),
            "share_above_floor_mib": round((rss_late - floor_rss) / 1024, 1)}


# --------------------------------------------------------------------------- run and report

TARGETS = [  # (section, key, comparison, target, label)
    ("latency", "p50_ms", "<=", 30, "latency p50 (ms)"),
    ("latency", "p95_ms", "<=", 60, "latency p95 (ms)"),
    ("latency", "max_ms", None, None, "latency max (ms)"),
    ("scale", "services", None, None, "scale: N services in the swarm"),
    ("scale", "p50_1_ms", None, None, "scale: push p50, 1 service (ms)"),
    ("scale", "p50_n_ms", None, None, "scale: push p50, N services (ms)"),
    ("scale", "n_over_1", "<=", 1.5, "scale: p50 N services / 1 service"),
    ("scale", "first_push_n_ms", None, None, "scale: first push, N services (ms)"),
    ("burst", "updates", "==", "services", "burst: updates"),
    ("burst", "wall_s", "<=", 5, "burst: wall (s)"),
    ("burst", "sqs_calls_per_message", "<=", 0.25, "burst: SQS calls per message"),
    ("burst", "get_authorization_token_per_registry", "<=", 1, "burst: GetAuthorizationToken"),
    ("idle", "sqs_calls_per_minute", "<=", 3.1, "idle: SQS calls per minute"),
    ("idle", "docker_calls", "==", 0, "idle: Docker calls"),
    # one call per repository for the tags its services follow, one for the images they run and roll back to
    ("reconcile", "describe_images_current", "==", "describe_images_expected", "reconcile pass: DescribeImages"),
    ("reconcile", "docker_calls_current", "<=", 3, "reconcile pass, all current: Docker calls (all of start-up)"),
    ("reconcile", "wall_current_s", None, None, "reconcile pass, all current: wall (s)"),
    ("reconcile", "updates_behind", "==", "services_behind", "reconcile pass, a tenth moved: updates"),
    ("reconcile", "wall_behind_s", None, None, "reconcile pass, a tenth moved: wall (s)"),
    ("reconcile", "protect_first_puts", "==", "services", "protection tags, first pass: PutImage"),
    ("reconcile", "protect_first_wall_s", None, None, "protection tags, first pass: wall (s)"),
    # in place: one ListImages per repository more, nothing put
    ("reconcile", "protect_steady_extra_calls", "==", "repositories", "protection tags, in place: AWS calls more"),
    ("reconcile", "protect_steady_wall_s", None, None, "protection tags, in place: wall (s)"),
    ("reconcile", "lint_calls", "==", "lint_calls_expected", "--lint-lifecycle: ECR calls"),
    ("reconcile", "lint_wall_s", None, None, "--lint-lifecycle: wall (s)"),
    # services that follow versions: one paged ListImages per repository, whatever the number of services
    ("versions_many", "list_images_current", "==", "list_images_expected", "versions pass A: ListImages"),
    ("versions_many", "describe_images_current", "==", "repositories", "versions pass A, current: DescribeImages"),
    ("versions_many", "wall_current_s", None, None, "versions pass A, all current: wall (s)"),
    ("versions_many", "updates_behind", "==", "services_behind", "versions pass A, a tenth moved: updates"),
    ("versions_many", "wall_behind_s", None, None, "versions pass A, a tenth moved: wall (s)"),
    ("versions_long", "list_images_current", "==", "list_images_expected", "versions pass B: ListImages"),
    ("versions_long", "wall_current_s", None, None, "versions pass B, all current: wall (s)"),
    ("versions_long", "updates_behind", "==", "services_behind", "versions pass B, a tenth moved: updates"),
    ("versions_long", "wall_behind_s", None, None, "versions pass B, a tenth moved: wall (s)"),
    ("push_cost", "ecr_calls_versions", "<=", "ecr_calls_tag", "push: ECR calls, versions (<= tag's)"),
    ("push_cost", "updates", "==", 2, "push: updates, one of each"),
    ("side_by_side", "cli_s", None, None, "(a) docker CLI, N services (s)"),
    ("side_by_side", "deployer_s", None, None, "(b) ecr-deploy, N services (s, median)"),
    ("side_by_side", "floor_s", None, None, "(c) bare Engine API calls (s, median)"),
    ("side_by_side", "cli_over_deployer", ">=", 5, "(a)/(b)"),
    ("side_by_side", "deployer_over_floor", "<=", 1.2, "fan-out: (b)/(c), one push to N"),
    ("cold_start", "median_s", "<=", 1.5, "cold start, median wall (s)"),
    ("memory", "peak_rss_mib", "<=", 50, "memory: peak RSS (MiB)"),
    ("memory", "growth_mib", "<=", 2, "memory: growth checkpoint..end (MiB)"),
    ("memory", "floor_rss_mib", None, None, "memory: floor, bench/floor.py (MiB)"),
    ("memory", "share_above_floor_mib", "<", 2, "memory: deployer's share above it (MiB)"),
    ("notify", "p50_none_ms", None, None, "notify: push p50, no target (ms)"),
    ("notify", "p50_one_ms", None, None, "notify: push p50, one Apprise target (ms)"),
    ("notify", "one_over_none", "<=", 1.2, "notify: p50 one target / no target"),
    ("notify", "pushes_told", "==", "pushes_with_target", "notify: pushes the target was told of"),
    ("notify", "memory_one_rss_at_end_mib", None, None, "notify: memory, one Apprise target (MiB)"),
    ("notify", "memory_one_over_none_mib", None, None, "notify: memory, one target minus none (MiB)"),
]


def verdicts(report: dict) -> list[tuple[str, object, str, str]]:
    rows = []
    for section, key, op, target, label in TARGETS:
        if section not in report:  # (--only-reconcile)
            continue
        value = report[section][key]
        if isinstance(target, str):
            target = report[section][target]
        ok = {"<=": lambda: value <= target, "<": lambda: value < target, ">=": lambda: value >= target,
              "==": lambda: value == target,
              None: lambda: True}[op]()
        rows.append((label, value, f"{op} {target}" if op else "", "ok" if ok else "MISSED"))
    return rows


def reconcile_report(aws, images, swarm, workdir, sizes: dict) -> dict:
    reconcile = measure_reconcile(aws, images, swarm, workdir, sizes["reconcile_services"],
                                  sizes["reconcile_repositories"])
    return {**reconcile, "describe_images_current": reconcile["current"]["describe_images"],
            "describe_images_expected": 2 * reconcile["repositories"],
            "docker_calls_current": reconcile["current"]["docker_calls"],
            "wall_current_s": reconcile["current"]["wall_s"],
            "updates_behind": reconcile["behind"]["updates"],
            "services_behind": reconcile["behind"]["services_behind"],
            "wall_behind_s": reconcile["behind"]["wall_s"],
            "protect_first_puts": reconcile["protect_first"]["aws_calls_by_kind"].get("PutImage", 0),
            "protect_first_wall_s": reconcile["protect_first"]["wall_s"],
            "protect_steady_extra_calls": reconcile["protect_steady"]["aws_calls"]
            - reconcile["current"]["aws_calls"],
            "protect_steady_wall_s": reconcile["protect_steady"]["wall_s"],
            # per repository: GetLifecyclePolicy, StartLifecyclePolicyPreview, GetLifecyclePolicyPreview twice
            # (the rig's preview, as ECR's, is IN_PROGRESS when first asked; a second later COMPLETE)
            "lint_calls": reconcile["lint"]["aws_calls"],
            "lint_calls_expected": 4 * reconcile["repositories"],
            "lint_wall_s": reconcile["lint"]["wall_s"]}


def run_reconcile(aws, registries, images, swarm, workdir, sizes: dict) -> dict:
    """--only-reconcile: the machine, the reconcile section, its targets."""
    version = swarm.get("/version")
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                          "docker": {"engine": swarm.engine.name, "version": version["Version"],
                                     "api": version["ApiVersion"]}},
              "sizes": sizes, "reconcile": reconcile_report(aws, images, swarm, workdir, sizes)}
    report["targets"] = [dict(zip(("measure", "value", "target", "verdict"), row)) for row in verdicts(report)]
    return report


def run(aws, registries, images, swarm, workdir, sizes: dict) -> dict:
    events = ServiceEvents(swarm)  # the stream ends when dockerd stops
    version = swarm.get("/version")
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                          "docker": {"engine": swarm.engine.name, "version": version["Version"],
                                     "api": version["ApiVersion"]}},
              "sizes": sizes}
    report["latency"] = measure_latency(aws, images, swarm, events, sizes["latency_pushes"], sizes["latency_interval"])
    swarm.remove_all_services()
    report["notify"] = measure_notify(aws, images, swarm, events, sizes["notify_pushes"], sizes["latency_interval"],
                                      sizes["notify_rounds"])
    swarm.remove_all_services()
    report["scale"] = measure_scale(aws, images, swarm, events, sizes["scale_services"], sizes["latency_pushes"],
                                    sizes["latency_interval"])
    swarm.remove_all_services()
    report["burst"] = measure_burst(aws, images, swarm, workdir, sizes["burst_images"], sizes["burst_pushes_per_image"])
    swarm.remove_all_services()
    report["idle"] = measure_idle(aws, swarm, workdir, sizes["idle_seconds"])
    report["side_by_side"] = measure_side_by_side(aws, images, swarm, events, workdir, sizes["side_services"],
                                                  sizes["fan_out_rounds"])
    swarm.remove_all_services()
    report["reconcile"] = reconcile_report(aws, images, swarm, workdir, sizes)
    swarm.remove_all_services()
    report.update(versions_report(aws, images, swarm, workdir, sizes))
    swarm.remove_all_services()
    report["cold_start"] = measure_cold_start(aws, swarm, sizes["cold_runs"])
    report["memory"] = measure_memory(aws, images, swarm, sizes["memory_messages"])
    swarm.remove_all_services()
    sink = NotifySink(NOTIFY_SINK_DELAY)
    try:
        with_target = measure_memory(aws, images, swarm, sizes["memory_messages"], DEPLOYER_NOTIFY_URL=sink.url)
    finally:
        sink.close()
    swarm.remove_all_services()
    report["notify"].update({"memory_one_" + key: value for key, value in with_target.items()},
                            memory_one_over_none_mib=round(with_target["rss_at_end_mib"]
                                                           - report["memory"]["rss_at_end_mib"], 1))
    report["targets"] = [dict(zip(("measure", "value", "target", "verdict"), row)) for row in verdicts(report)]
    return report


def versions_report(aws, images, swarm, workdir, sizes: dict) -> dict:
    """The passes over services that follow versions (many repositories of few tags, few of many), and a push."""
    report = {}
    for name, (services, repositories, tags) in zip(("versions_many", "versions_long"), sizes["versions"]):
        measured = measure_reconcile_versions(aws, images, swarm, workdir, services, repositories, tags)
        report[name] = {**measured, "list_images_current": measured["current"]["list_images"],
                        "describe_images_current": measured["current"]["describe_images"],
                        "wall_current_s": measured["current"]["wall_s"],
                        "updates_behind": measured["behind"]["updates"],
                        "services_behind": measured["behind"]["services_behind"],
                        "wall_behind_s": measured["behind"]["wall_s"]}
        swarm.remove_all_services()
    report["push_cost"] = measure_push_cost(aws, images, swarm, workdir, sizes["push_cost_tags"])
    return report


def table(report: dict) -> str:
    m = report["machine"]
    docker = m["docker"]
    lines = [f"ecr-deploy benchmark — {m['cpus']} cores, Python {m['python']}, Linux {m['kernel']}, "
             f"dockerd {docker['version']} (API {docker['api']}, the {docker['engine']} engine)",
             f"{'measure':42} {'value':>10}  {'target':>10}  verdict"]
    for row in report["targets"]:
        lines.append(f"{row['measure']:42} {row['value']!s:>10}  {row['target']:>10}  {row['verdict']}")
    if "burst" not in report:  # (--only-reconcile)
        return "\n".join(lines + [reconcile_line(report["reconcile"])])
    burst = report["burst"]
    lines.append(f"burst calls: AWS {burst['aws_calls']}; Docker {burst['docker_calls']}")
    lines.append(f"burst time upstream (s): {burst['upstream_seconds']}; deployer CPU {burst['deployer_cpu_s']} s")
    lines.append(f"memory (MiB): idle after start {report['memory']['rss_idle_after_start_mib']}, "
                 f"after {report['memory']['checkpoint']} messages {report['memory']['rss_at_checkpoint_mib']}, "
                 f"at the end {report['memory']['rss_at_end_mib']}; the floor beside it "
                 f"{report['memory']['floor_rss_mib']}")
    lines.append(f"import time, top (ms): {report['cold_start']['import_top_ms']}")
    notify = report["notify"]
    lines.append(f"notify: {notify['pushes']} pushes each, in {notify['rounds']} turn(s); max {notify['max_none_ms']} "
                 f"ms without a target, {notify['max_one_ms']} ms with one answering after {notify['sink_delay_s']} s; "
                 f"{notify['messages']} message(s) to it; memory at the end {notify['memory_one_rss_at_end_mib']} MiB "
                 f"with it, {report['memory']['rss_at_end_mib']} MiB without")
    lines.append(reconcile_line(report["reconcile"]))
    for name in ("versions_many", "versions_long"):
        versions = report[name]
        lines.append(f"versions pass over {versions['services']} services, {versions['repositories']} repositories of "
                     f"{versions['tags_per_repository']} tags: all current {versions['current']}; a tenth moved "
                     f"{versions['behind']}")
    push = report["push_cost"]
    lines.append(f"push ECR calls: tag-following {push['tag']['by_kind']}; "
                 f"version-following {push['versions']['by_kind']}")
    return "\n".join(lines)


def reconcile_line(reconcile: dict) -> str:
    return (f"reconcile pass over {reconcile['services']} services, {reconcile['tags']} tags in "
            f"{reconcile['repositories']} repositories: all current {reconcile['current']}; "
            f"a tenth moved {reconcile['behind']}; protection tags, first pass {reconcile['protect_first']}, "
            f"in place {reconcile['protect_steady']}; --lint-lifecycle {reconcile['lint']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="few iterations (CI)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--only-reconcile", action="store_true",
                        help="only the reconcile pass's measures (the checks of the images services run)")
    parser.add_argument("--engine", choices=("current", "bookworm"), default="current",
                        help="the Docker to run on: Debian unstable's (28, unpacked in .rig/) or the host's own "
                             "dockerd (bookworm's 20.10); default: %(default)s")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: the rig starts dockerd and registries on port 443")
    engine = current_engine() if args.engine == "current" else host_engine()
    if engine is None:
        parser.error(f"the {args.engine} engine is not here: `python3 -m rig bench` fetches the current one "
                     "from Debian's unstable archive; the host's is Debian's docker.io")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="ecrb-", dir="/tmp"))
    aws = swarm = None
    try:
        aws = Aws(workdir)
        with serving_registries(workdir) as registries:
            swarm = Swarm(workdir, engine=engine)
            report = (run_reconcile if args.only_reconcile else run)(aws, registries, Images(aws, registries), swarm,
                                                                      workdir, SHORT if args.short else FULL)
    finally:
        if swarm:
            swarm.close()
        if aws:
            aws.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
