"""The Quick start demo: ecr-deploy rolling a real Swarm service, with no AWS account.

Everything is real but the endpoints: moto_server plays SQS and ECR, a TLS docker-registry
answers as the ECR hostname and demands the ECR token, a private dockerd runs the swarm. The
deployer is ecr_deploy.py itself in loop mode, exactly as under systemd. Ctrl-C stops it all and
removes every trace (processes, /etc/hosts lines, CA certificates, temporary files).
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import sys
import tempfile
import threading

from rig.aws import Aws, event
from rig.common import mounts_under
from rig.deployer import Running, deployer_env
from rig.registry import Images, Registry, serving_registries
from rig.swarm import Swarm

REGISTRY = Registry("111122223333", "eu-central-1", "127.0.0.9")  # apart from the tests' registries
REPOSITORY = "demo/web"
SERVICE = "web"  # staging: follows :latest, promotes each digest that soaked to :prod
PRODUCTION = "web-prod"  # follows :prod (in life: another swarm, account or region)
MIGRATION = "web-migrate"  # a Swarm job that runs on each new digest of web before web rolls (ecr-deploy.before)
MIGRATE_CMD = ["/bin/busybox", "sh", "-c", 'echo "migrating the database schema to $(cat /version)"; echo done']
VERSIONED_REPOSITORY = "demo/api"  # tags that never move: 1.0.0, 1.1.0, …
VERSIONED = "api"  # follows versions: the newest 1.x release (ecr-deploy.versions=semver:^1)
POLICY = "semver:^1"
SEMVER_TAG = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+")
SOAK = "5s"
QUEUE = "ecr-deploy-demo"
STATE = pathlib.Path("/run/ecr-deploy-demo.json")  # how `python3 -m rig push` finds the running demo
PUSH_COMMAND = "python3 -m rig push"
BROKEN_CMD = ["/bin/busybox", "sh", "-c", "echo this build is broken; exit 1"]


def say(text: str) -> None:
    print(f"\n>>> {text}", flush=True)


def show_deployer_line(line: str) -> None:
    print(f"    ecr_deploy.py | {line.rstrip()}", flush=True)


def terminal_target() -> tuple[str, object]:
    """A notification target that prints what the deployer tells it, as a chat channel would show it: a
    local endpoint for Apprise's json:// (the deployer's Apprise targets work as for Slack or Teams)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            message = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            print(f"    notification  | {message['title']}", flush=True)
            for line in message["message"].splitlines()[1:]:
                print(f"                  | {line}", flush=True)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"json://127.0.0.1:{server.server_address[1]}/demo", server


def emulate_eventbridge(aws: Aws, queue_url: str):
    """ECR sends a push event for every tag put on an image, the deployer's promotions included;
    moto does not, so the demo sends the event of each promotion it sees in the deployer's log."""
    promoted = re.compile(rf"Promoted \S+/{REPOSITORY}:(\S+)@(sha256:[0-9a-f]{{64}})")

    def on_line(line: str) -> None:
        show_deployer_line(line)
        if match := promoted.search(line):
            aws.send(queue_url, event(account=REGISTRY.account, region=REGISTRY.region, repository=REPOSITORY,
                                      tag=match[1], digest=match[2], time=utc_now()))
    return on_line


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def push_and_notify(aws: Aws, images: Images, queue_url: str, version: str, broken: bool = False,
                    repository: str = REPOSITORY, tag: str = "latest") -> str:
    """What a `docker push` to ECR causes: the image lands in the registry, ECR records the tag,
    and EventBridge sends an "ECR Image Action" event to the queue."""
    digest = images.push(repository, tag, version, account=REGISTRY.account, cmd=BROKEN_CMD if broken else None)
    aws.send(queue_url, event(account=REGISTRY.account, region=REGISTRY.region, repository=repository,
                              tag=tag, digest=digest, time=utc_now()))
    return digest


def push_version(aws: Aws, images: Images, queue_url: str, version: str, broken: bool = False) -> str:
    """CI's push of a release that never moves: demo/api:VERSION."""
    return push_and_notify(aws, images, queue_url, version, broken, VERSIONED_REPOSITORY, version)


def main() -> int:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="ecrd-demo-", dir="/tmp"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        cleanup.callback(STATE.unlink, missing_ok=True)
        say("Starting moto_server: SQS and ECR on 127.0.0.1, no AWS account needed")
        aws = Aws(workdir, region=REGISTRY.region)
        cleanup.callback(aws.stop)
        say(f"Starting a TLS registry that answers as {REGISTRY.host} and, like ECR, wants the ECR token")
        registries = cleanup.enter_context(serving_registries(workdir, [REGISTRY], instance="demo"))
        say("Starting a private dockerd in swarm mode (its own socket and data; your Docker is not touched)")
        swarm = Swarm(workdir, instance="demo")
        cleanup.callback(swarm.close)
        cleanup.callback(swarm.remove_all_services)  # first: tasks stop before dockerd does
        images = Images(aws, registries)
        images.new_repository(account=REGISTRY.account, name=REPOSITORY)
        v1 = images.push(REPOSITORY, "latest", "v1", account=REGISTRY.account)
        ecr = aws.client("ecr", REGISTRY.region)  # :prod is v1 too, in ECR (pulls go by digest)
        manifest = ecr.batch_get_image(registryId=REGISTRY.account, repositoryName=REPOSITORY,
                                       imageIds=[{"imageDigest": v1}])["images"][0]["imageManifest"]
        ecr.put_image(registryId=REGISTRY.account, repositoryName=REPOSITORY, imageManifest=manifest,
                      imageTag="prod", imageDigest=v1)
        image, production = f"{REGISTRY.host}/{REPOSITORY}:latest", f"{REGISTRY.host}/{REPOSITORY}:prod"
        service_id = swarm.create_service(SERVICE, f"{image}@{v1}", registry=REGISTRY, replicas=2,
                                          update_config={"Parallelism": 1, "Monitor": 3_000_000_000},
                                          labels={"ecr-deploy.promote": "prod", "ecr-deploy.soak": SOAK,
                                                  "ecr-deploy.before": MIGRATION})
        migration_id = swarm.create_service(MIGRATION, f"{image}@{v1}", registry=REGISTRY,
                                            mode={"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}},
                                            RestartPolicy={"Condition": "none"},
                                            ContainerSpec={"Image": f"{image}@{v1}", "Init": True, "Command": MIGRATE_CMD})
        production_id = swarm.create_service(PRODUCTION, f"{production}@{v1}", registry=REGISTRY, replicas=1)
        images.new_repository(account=REGISTRY.account, name=VERSIONED_REPOSITORY)
        ecr.put_image_tag_mutability(registryId=REGISTRY.account, repositoryName=VERSIONED_REPOSITORY,
                                     imageTagMutability="IMMUTABLE")  # (Security Hub's ECR.2)
        api = f"{REGISTRY.host}/{VERSIONED_REPOSITORY}:1.0.0@" + images.push(VERSIONED_REPOSITORY, "1.0.0", "1.0.0",
                                                                             account=REGISTRY.account)
        api_id = swarm.create_service(VERSIONED, api, registry=REGISTRY, replicas=1,
                                      labels={"ecr-deploy.versions": POLICY})
        say(f"Service {SERVICE} (staging) runs {image}@{v1[:19]}… (2 replicas), labelled ecr-deploy.promote=prod "
            f"ecr-deploy.soak={SOAK}\n    and ecr-deploy.before={MIGRATION} (a Swarm job, its migration, runs on each "
            f"new digest before it rolls);\n    service {PRODUCTION} runs {production} (1 replica);\n    service "
            f"{VERSIONED} runs {api.partition('@')[0]} from a tag-immutable repository, labelled "
            f"ecr-deploy.versions={POLICY}:\n    it follows versions, the newest 1.x release; waiting for their tasks")
        swarm.wait_running(service_id, f"{image}@{v1}", replicas=2)
        swarm.wait_running(production_id, f"{production}@{v1}")
        swarm.wait_running(api_id, api)
        queue_url = aws.new_queue(QUEUE)
        STATE.write_text(json.dumps({"aws": aws.url, "ca": REGISTRY.ca, "queue": queue_url}))

        say(f"Starting ecr_deploy.py in loop mode on queue {QUEUE}; its own log follows")
        env = deployer_env(aws, swarm, DEPLOYER_QUEUE=QUEUE, DEPLOYER_LOG_FORMAT="text")
        if importlib.util.find_spec("apprise"):  # (optional, as for operators): notifications in this terminal
            env["DEPLOYER_NOTIFY_URL"], server = terminal_target()
            cleanup.callback(server.shutdown)
        deployer = Running(env, echo=emulate_eventbridge(aws, queue_url))
        cleanup.callback(deployer.kill)
        cleanup.callback(deployer.stop)
        deployer.wait_line(" watching ")
        say(f"docker push {image} (v2): the image goes to the registry, ECR records the tag, "
            "EventBridge sends the push event to the queue")
        v2 = push_and_notify(aws, images, queue_url, "v2")
        say(f"CI pushes {VERSIONED_REPOSITORY}:2.0.0 and {VERSIONED_REPOSITORY}:1.1.0: {VERSIONED} takes 1.1.0, the "
            f"newest release {POLICY} admits")
        push_version(aws, images, queue_url, "2.0.0")
        push_version(aws, images, queue_url, "1.1.0")
        deployer.wait_line(f"Started the pre-rollout job {MIGRATION} ")
        say(f"The migration job {MIGRATION} runs on …@{v2[:19]}… first; {SERVICE} rolls once it has completed")
        deployer.wait_line(f"Updated service {SERVICE} ")
        migrated = [t for t in swarm.tasks(migration_id) if t["Spec"]["ContainerSpec"]["Image"].endswith(v2)]
        say(f"{MIGRATION} on …@{v2[:19]}… {migrated[0]['Status']['State'] if migrated else '?'}; "
            f"{SERVICE} is rolling to it")
        deployer.wait_line(f"Updated service {VERSIONED} ")
        deployer.wait_line(f"Rollout of {SERVICE} ", timeout=120)
        deployer.wait_line(f"Rollout of {VERSIONED} ", timeout=120)
        say(f"{VERSIONED} now runs {VERSIONED_REPOSITORY}:1.1.0 (`docker service ls` shows the version); 2.0.0 is "
            f"not a version {POLICY} admits, so it stays on 1.x")
        tasks = swarm.running_images(service_id)
        say(f"{len(tasks)} task(s) of {SERVICE} now run …@{v2[:19]}… — ECR push to running service, for real.\n"
            f"    Once the rollout has run for {SOAK} without a failure, the deployer tags that digest :prod in ECR, "
            f"and ECR's push event for :prod rolls {PRODUCTION}")
        deployer.wait_line(f"Promoted {production}@{v2}", timeout=60)
        deployer.wait_line(f"Rollout of {PRODUCTION} ", timeout=120)
        say(f"Done: {PRODUCTION} runs …@{v2[:19]}… too, promoted from staging.\n"
            f"    Push another version from a second terminal (as root, in this directory):\n\n"
            f"        {PUSH_COMMAND} v3\n\n"
            f"    or a build that crashes, and watch the rollout pause:  {PUSH_COMMAND} v4 --broken\n"
            f"    or a release of {VERSIONED_REPOSITORY} (a version: {VERSIONED} takes it if {POLICY} admits it and it "
            f"is newer):  {PUSH_COMMAND} 1.2.0\n"
            f"    Ctrl-C stops the demo and removes everything it made.")
        stop.wait()
        say("Stopping: the deployer, the swarm, the registry and moto_server; removing their files")
    left = mounts_under(workdir) or ([str(workdir)] if workdir.exists() else [])
    print(f"Stopped; left behind: {', '.join(left)}" if left else "Stopped; nothing left behind.", flush=True)
    return 1 if left else 0


def push(args: list[str]) -> int:
    """`python3 -m rig push VERSION [--broken]`, from a second terminal while the demo runs."""
    broken = "--broken" in args
    versions = [a for a in args if a != "--broken"]
    if len(versions) > 1 or any(a.startswith("-") for a in versions):
        sys.exit(f"usage: {PUSH_COMMAND} [VERSION] [--broken]")
    if not STATE.exists():
        sys.exit("[rig] no demo is running: start it with `python3 -m rig demo`")
    state = json.loads(STATE.read_text())
    version = versions[0] if versions else f"v{os.getpid()}"
    aws = Aws.attach(state["aws"], REGISTRY.region)
    REGISTRY.ca = state["ca"]
    if SEMVER_TAG.fullmatch(version):  # a release: demo/api:VERSION
        digest = push_version(aws, Images(aws, [REGISTRY]), state["queue"], version, broken)
        pushed = f"{REGISTRY.host}/{VERSIONED_REPOSITORY}:{version}{' (broken)' if broken else ''}"
    else:
        digest = push_and_notify(aws, Images(aws, [REGISTRY]), state["queue"], version, broken)
        pushed = f"{REGISTRY.host}/{REPOSITORY}:latest ({version}{', broken' if broken else ''})"
    print(f"Pushed {pushed} = {digest}\nand sent its ECR push event; watch the demo's terminal.")
    return 0
