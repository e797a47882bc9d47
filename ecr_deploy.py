#!/usr/bin/env python3
"""ecr-deploy: roll Docker Swarm services to the image just pushed to Amazon ECR.

EventBridge sends "ECR Image Action" events to an SQS queue (directly, or through an SNS
topic). This program long-polls that queue and, for every push of REPO:TAG, updates every
Swarm service running that tag to the digest ECR says the tag points to *now*, pinned by
digest, with fresh ECR credentials forwarded to Swarm.

Read top-down: configuration, events (pure), images (pure), specs (pure), AWS shell,
Docker shell, the drain cycle, main.
"""
from __future__ import annotations

import argparse
import base64
import copy
import json
import logging
import os
import random
import re
import signal
import sys
import time
import urllib.parse
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import boto3
import botocore.config
import botocore.exceptions
import requests
import requests_unixsocket

__version__ = "0.1.0"

log = logging.getLogger("ecr-deploy")

# --------------------------------------------------------------------------- configuration

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TRUE_WORDS = ("1", "true", "yes", "on")

EPILOG = """\
environment:
  DOCKER_HOST      Docker endpoint, unix:///path (default unix:///var/run/docker.sock)
  AWS_REGION, AWS_PROFILE, AWS_ENDPOINT_URL, ...
                   boto3's standard chain: region, credentials (instance role preferred)

exit codes: 0 every received message handled; 1 something left on the queue for retry,
            or a runtime failure (unknown queue, unreachable Docker); 2 usage error
"""


class LabelFilter(NamedTuple):
    key: str
    value: str | None  # None: any value

    def admits(self, labels: dict | None) -> bool:
        labels = labels or {}
        return self.key in labels and (self.value is None or labels[self.key] == self.value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="ecr_deploy.py",
        description="Update every Docker Swarm service running an ECR image tag to the digest "
        "just pushed, driven by ECR push events on an SQS queue.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--queue", metavar="NAME_OR_URL", default=env("DEPLOYER_QUEUE"),
                        help="SQS queue name (resolved once) or full queue URL (env DEPLOYER_QUEUE)")
    parser.add_argument("--once", action="store_true",
                        help="drain the queue once and exit (for cron); default: poll forever")
    parser.add_argument("--filter-label", metavar="KEY[=VALUE]", default=env("DEPLOYER_FILTER_LABEL"),
                        help="only update services carrying this label, with any value if only KEY "
                        "is given (env DEPLOYER_FILTER_LABEL)")
    parser.add_argument("--log-level", type=str.upper, default=env("DEPLOYER_LOG_LEVEL", "INFO"),
                        help=f"one of {', '.join(LOG_LEVELS)} (env DEPLOYER_LOG_LEVEL; default INFO)")
    parser.add_argument("--trust-events", action="store_true",
                        default=env("DEPLOYER_TRUST_EVENTS", "").lower() in TRUE_WORDS,
                        help="deploy the digest named in the event instead of asking ECR which digest "
                        "the tag points to now; saves the ecr:DescribeImages permission but lets stale, "
                        "replayed or forged events roll services back (env DEPLOYER_TRUST_EVENTS=1)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)

    args.queue = (args.queue or "").strip()
    if not args.queue:
        parser.error("no queue given: use --queue NAME_OR_URL or set DEPLOYER_QUEUE")
    if args.log_level not in LOG_LEVELS:
        parser.error(f"log level must be one of {', '.join(LOG_LEVELS)}, not {args.log_level!r}")
    if args.filter_label:
        key, sep, value = args.filter_label.partition("=")
        if not key.strip():
            parser.error(f"filter label must be KEY or KEY=VALUE, not {args.filter_label!r}")
        args.filter_label = LabelFilter(key.strip(), value if sep else None)
    return args


# --------------------------------------------------------------------------- events (pure)

# Strict grammars for every event field that ends up in an image reference.
ACCOUNT = re.compile(r"[0-9]{12}")
REGION = re.compile(r"[a-z]{2}(?:-[a-z]+){1,2}-[0-9]{1,2}")
REPOSITORY = re.compile(r"(?:[a-z0-9]+(?:[._-][a-z0-9]+)*/)*[a-z0-9]+(?:[._-][a-z0-9]+)*")
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
FIELD_GRAMMARS = {"account": ACCOUNT, "region": REGION, "repository": REPOSITORY,
                  "tag": TAG, "digest": DIGEST}
MAX_REPOSITORY_LENGTH = 256


@dataclass(frozen=True)
class Push:
    """A validated ECR push of REPOSITORY:TAG (digest as the event named it)."""
    account: str
    region: str
    repository: str
    tag: str
    digest: str
    time: str = ""  # the event's time, for ordering pushes under --trust-events

    @property
    def image_key(self) -> tuple[str, str, str, str]:
        return (self.account, self.region, self.repository, self.tag)

    @property
    def image(self) -> str:
        suffix = ".cn" if self.region.startswith("cn-") else ""
        return f"{self.account}.dkr.ecr.{self.region}.amazonaws.com{suffix}/{self.repository}:{self.tag}"


class Ignored(NamedTuple):
    """Why a message is not a deployable push; suspicious ones are logged as warnings."""
    reason: str
    suspicious: bool = False


def parse_message(body: object) -> Push | Ignored:
    """Any SQS message body -> a validated Push or the reason to ignore it. Never raises."""
    event = load_json_object(body, "body")
    if isinstance(event, Ignored):
        return event
    if event.get("Type") == "Notification" and "Message" in event:  # SNS envelope
        event = load_json_object(event["Message"], "SNS Message")
        if isinstance(event, Ignored):
            return event
    return parse_event(event)


def load_json_object(text: object, what: str) -> dict | Ignored:
    if not isinstance(text, str) or not text.strip():
        return Ignored(f"{what} is empty or not text", suspicious=True)
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return Ignored(f"{what} is not valid JSON", suspicious=True)
    if not isinstance(value, dict):
        return Ignored(f"{what} is a JSON {type(value).__name__}, not an object", suspicious=True)
    return value


def parse_event(event: dict) -> Push | Ignored:
    if event.get("source") != "aws.ecr":
        return Ignored(f"source is {shown(event.get('source'))}, not aws.ecr")
    if event.get("detail-type") != "ECR Image Action":
        return Ignored(f"detail-type is {shown(event.get('detail-type'))}, not ECR Image Action")
    detail = event.get("detail")
    if not isinstance(detail, dict):
        return Ignored("event has no detail object", suspicious=True)
    if detail.get("action-type") != "PUSH":
        return Ignored(f"action-type is {shown(detail.get('action-type'))}, not PUSH")
    if detail.get("result") != "SUCCESS":
        return Ignored(f"result is {shown(detail.get('result'))}, not SUCCESS")
    if detail.get("image-tag") in (None, ""):
        return Ignored("push of an untagged image")
    fields = {"account": event.get("account"), "region": event.get("region"),
              "repository": detail.get("repository-name"), "tag": detail.get("image-tag"),
              "digest": detail.get("image-digest")}
    for name, value in fields.items():
        if not is_valid(name, value):
            return Ignored(f"invalid {name} {shown(value)}", suspicious=True)
    event_time = event.get("time")
    return Push(**fields, time=event_time if isinstance(event_time, str) else "")


def is_valid(name: str, value: object) -> bool:
    if not isinstance(value, str):
        return False
    if name == "repository" and len(value) > MAX_REPOSITORY_LENGTH:
        return False
    return FIELD_GRAMMARS[name].fullmatch(value) is not None


def shown(value: object) -> str:
    """A value safe to put in a log line: repr (escapes newlines), cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- images (pure)

STACK_IMAGE_LABEL = "com.docker.stack.image"

# Every spelling of an ECR registry host: standard, FIPS, dual-stack, China.
ECR_HOST = re.compile(r"([0-9]{12})\.(?:dkr\.ecr(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?"
                      r"|dkr-ecr(?:-fips)?\.([a-z0-9-]+)\.on\.aws)")


class ImageRef(NamedTuple):
    name: str  # HOST/REPOSITORY exactly as written: the part kept when pinning
    host: str  # lower-cased
    repository: str
    tag: str  # "latest" when none is written
    digest: str | None


def parse_image_ref(ref: object) -> ImageRef | None:
    if not isinstance(ref, str) or not ref:
        return None
    name, _, digest = ref.partition("@")
    tag = "latest"
    if name.rfind(":") > name.rfind("/"):
        name, _, tag = name.rpartition(":")
    host, slash, repository = name.partition("/")
    if not slash or not ("." in host or ":" in host or host == "localhost"):
        host, repository = "docker.io", name  # Docker Hub: never an ECR image
    return ImageRef(name, host.lower(), repository, tag, digest or None)


def ecr_registry(host: str) -> tuple[str, str] | None:
    """(account, region) of an ECR registry host, whatever its spelling; None if not ECR."""
    match = ECR_HOST.fullmatch(host.lower())
    return (match[1], match[2] or match[3]) if match else None


def service_image(service: dict) -> ImageRef | None:
    """The image a service is meant to run: the stack label if set, else the spec's image."""
    spec = service.get("Spec") or {}
    label = (spec.get("Labels") or {}).get(STACK_IMAGE_LABEL)
    if label:
        return parse_image_ref(label)
    return parse_image_ref(spec.get("TaskTemplate", {}).get("ContainerSpec", {}).get("Image"))


def running_image(service: dict) -> ImageRef | None:
    return parse_image_ref(service["Spec"].get("TaskTemplate", {}).get("ContainerSpec", {}).get("Image"))


def uses_image(service: dict, push: Push) -> ImageRef | None:
    """The service's reference to the pushed REPOSITORY:TAG, or None if it runs something else."""
    ref = service_image(service)
    if ref and ecr_registry(ref.host) == (push.account, push.region) \
            and ref.repository == push.repository and ref.tag == push.tag:
        return ref
    return None


def services_using(services: list[dict], push: Push, label_filter: LabelFilter | None) -> list[dict]:
    return [s for s in services
            if uses_image(s, push) and (label_filter is None or label_filter.admits(s["Spec"].get("Labels")))]


# --------------------------------------------------------------------------- specs (pure)

def pinned_image(ref: ImageRef, tag: str, digest: str) -> str:
    """HOST/REPO spelled as the service spells them, the pushed tag, pinned to the digest."""
    return f"{ref.name}:{tag}@{digest}"


def updated_spec(spec: dict, image: str) -> dict:
    """The service's own spec with only the image and ForceUpdate changed."""
    new = copy.deepcopy(spec)
    task = new.setdefault("TaskTemplate", {})
    task.setdefault("ContainerSpec", {})["Image"] = image
    task["ForceUpdate"] = task.get("ForceUpdate", 0) + 1
    return new


def registry_auth_header(username: str, password: str, server: str) -> str:
    """Docker's X-Registry-Auth: base64url JSON credentials. Never log it."""
    document = {"username": username, "password": password, "serveraddress": server}
    return base64.urlsafe_b64encode(json.dumps(document).encode()).decode()


# --------------------------------------------------------------------------- AWS shell

# botocore does retries with backoff ("standard" mode) and credentials; the read timeout
# must outlast a 20 s long poll.
BOTO_CONFIG = botocore.config.Config(retries={"mode": "standard", "max_attempts": 4},
                                     connect_timeout=5, read_timeout=30)
SQS_MAX_MESSAGES = 10
SQS_URL_REGION = re.compile(r"https?://(?:sqs\.([a-z0-9-]+)\.amazonaws\.com|([a-z0-9-]+)\.queue\.amazonaws\.com)")


class AwsError(Exception):
    """An AWS call failed after botocore's retries; the message is one line."""

    @classmethod
    def wrap(cls, error: Exception, doing: str) -> AwsError:
        if isinstance(error, botocore.exceptions.ClientError):
            err = error.response.get("Error", {})
            return cls(f"{doing}: {err.get('Code')}: {err.get('Message')}")
        return cls(f"{doing}: {error}")


def error_code(error: Exception) -> str | None:
    if isinstance(error, botocore.exceptions.ClientError):
        return error.response.get("Error", {}).get("Code")
    return None


class QueueNotFound(AwsError):
    """Fatal in every mode: waiting will not make a wrong queue name right."""


AWS_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)


class Queue:
    def __init__(self, session: boto3.Session, name_or_url: str):
        url_region = SQS_URL_REGION.match(name_or_url)
        region = (url_region[1] or url_region[2]) if url_region else None
        self.name = name_or_url
        self._sqs = session.client("sqs", config=BOTO_CONFIG, region_name=session.region_name or region)
        self.url = name_or_url if name_or_url.startswith(("https://", "http://")) else None

    def resolve(self) -> None:
        """GetQueueUrl, once per process; an unknown queue is a fatal error."""
        if self.url:
            return
        try:
            self.url = self._sqs.get_queue_url(QueueName=self.name)["QueueUrl"]
        except AWS_ERRORS as e:
            if error_code(e) in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                raise QueueNotFound(f"SQS queue {self.name!r} does not exist "
                                    f"in {self._sqs.meta.region_name}") from None
            raise AwsError.wrap(e, f"cannot find SQS queue {self.name!r}") from None

    def receive(self, wait_seconds: int) -> list[dict]:
        try:
            reply = self._sqs.receive_message(
                QueueUrl=self.url, MaxNumberOfMessages=SQS_MAX_MESSAGES, WaitTimeSeconds=wait_seconds,
                MessageSystemAttributeNames=["ApproximateReceiveCount"])
        except AWS_ERRORS as e:
            raise AwsError.wrap(e, f"cannot receive from {self.url}") from None
        return reply.get("Messages", [])

    def delete(self, messages: list[dict]) -> set[str]:
        """DeleteMessageBatch in chunks of ten; returns the ids of messages not deleted."""
        failed: set[str] = set()
        for start in range(0, len(messages), SQS_MAX_MESSAGES):
            chunk = messages[start:start + SQS_MAX_MESSAGES]
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(chunk)]
            try:
                reply = self._sqs.delete_message_batch(QueueUrl=self.url, Entries=entries)
            except AWS_ERRORS as e:
                log.error("%s; %d handled message(s) will be redelivered", AwsError.wrap(e, "cannot delete"),
                          len(chunk))
                failed.update(m["MessageId"] for m in chunk)
                continue
            for failure in reply.get("Failed", []):
                message_id = chunk[int(failure["Id"])]["MessageId"]
                log.error("Cannot delete message %s: %s", message_id, failure.get("Message") or failure.get("Code"))
                failed.add(message_id)
        return failed


@dataclass
class Token:
    username: str
    password: str
    refresh_at: float  # half-way to expiry
    cycle: int  # drain cycle that fetched it: an already-expired token lives for that cycle only


class Ecr:
    def __init__(self, session: boto3.Session):
        self._session = session
        self._clients: dict[str, object] = {}
        self._tokens: dict[tuple[str, str], Token] = {}
        self.cycle = 0

    def _client(self, region: str):
        if region not in self._clients:
            self._clients[region] = self._session.client("ecr", region_name=region, config=BOTO_CONFIG)
        return self._clients[region]

    def current_digest(self, push: Push) -> str | None:
        """The digest REPOSITORY:TAG points to now (None if the tag or repository is gone)."""
        try:
            reply = self._client(push.region).describe_images(
                registryId=push.account, repositoryName=push.repository, imageIds=[{"imageTag": push.tag}])
        except AWS_ERRORS as e:
            if error_code(e) in ("ImageNotFoundException", "RepositoryNotFoundException"):
                return None
            raise AwsError.wrap(e, f"cannot look up {push.image} in ECR") from None
        digests = [d["imageDigest"] for d in reply.get("imageDetails", [])]
        if len(digests) != 1 or not DIGEST.fullmatch(digests[0]):
            raise AwsError(f"ECR answered {len(digests)} image(s) for {push.image}, expected one")
        return digests[0]

    def credentials(self, account: str, region: str) -> tuple[str, str]:
        """(username, password) for the registry, cached and refreshed at half its lifetime."""
        now = time.time()
        token = self._tokens.get((account, region))
        if token is None or (now >= token.refresh_at and token.cycle != self.cycle):
            try:
                data = self._client(region).get_authorization_token(registryIds=[account])["authorizationData"][0]
            except (*AWS_ERRORS, KeyError, IndexError) as e:
                raise AwsError.wrap(e, f"cannot get an ECR token for {account} in {region}") from None
            username, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
            expires = data["expiresAt"].timestamp()
            token = Token(username, password, now + max(0.0, (expires - now) / 2), self.cycle)
            self._tokens[(account, region)] = token
        return token.username, token.password


# --------------------------------------------------------------------------- Docker shell

NEWEST_KNOWN_API = (1, 47)
DOCKER_TIMEOUT = 30
ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


class DockerError(Exception):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status

    @property
    def out_of_sequence(self) -> bool:
        # dockerd 20.10 answers 500 "update out of sequence"; newer ones 409.
        return self.status == 409 or "out of sequence" in str(self).lower()


class Docker:
    """A thin Docker Engine API client over the unix socket."""

    def __init__(self, docker_host: str | None):
        docker_host = docker_host or "unix:///var/run/docker.sock"
        if not docker_host.startswith("unix://"):
            raise ValueError(f"DOCKER_HOST must be unix:///path, not {docker_host!r}")
        self.socket = docker_host[len("unix://"):]
        self._base = "http+unix://" + urllib.parse.quote(self.socket, safe="")
        self._session = requests_unixsocket.Session()
        self._prefix: str | None = None
        self.api_version: str | None = None

    def _request(self, method: str, path: str, **kwargs) -> object:
        try:
            reply = self._session.request(method, self._base + path, timeout=DOCKER_TIMEOUT, **kwargs)
        except requests.RequestException as e:
            reason = ERRNO_TEXT.search(str(e))
            raise DockerError(f"cannot reach Docker at {self.socket}: "
                              f"{reason[1] if reason else type(e).__name__}") from None
        if reply.status_code >= 400:
            try:
                message = reply.json().get("message")
            except ValueError:
                message = reply.text.strip()
            raise DockerError(f"{method} {path}: {reply.status_code} {message}", reply.status_code)
        return reply.json() if reply.content else None

    def api(self, method: str, path: str, **kwargs) -> object:
        if self._prefix is None:
            self.negotiate()
        return self._request(method, self._prefix + path, **kwargs)

    def negotiate(self) -> str:
        """Pick the API version once: the daemon's, capped at the newest this code knows."""
        version = str(self._request("GET", "/version").get("ApiVersion", "1.41"))
        major, minor = (int(part) for part in version.split(".")[:2])
        major, minor = min((major, minor), NEWEST_KNOWN_API)
        self.api_version = f"{major}.{minor}"
        self._prefix = f"/v{self.api_version}"
        return self.api_version

    def services(self) -> list[dict]:
        return self.api("GET", "/services")

    def service(self, service_id: str) -> dict:
        return self.api("GET", f"/services/{urllib.parse.quote(service_id)}")

    def update_service(self, service: dict, spec: dict, registry_auth: str) -> list[str]:
        reply = self.api("POST", f"/services/{urllib.parse.quote(service['ID'])}/update",
                         params={"version": service["Version"]["Index"]}, json=spec,
                         headers={"X-Registry-Auth": registry_auth})
        return (reply or {}).get("Warnings") or []


# --------------------------------------------------------------------------- the drain cycle

FIRST_WAIT_LOOP = 20  # seconds: SQS's longest long poll
FIRST_WAIT_ONCE = 1  # never 0: a short poll samples only some SQS servers
FOLLOW_UP_WAIT = 1
BATCH_CAP = 300  # messages per cycle: bounds memory and the time a message waits unacked
UPDATE_ATTEMPTS = 5


@dataclass
class CycleResult:
    received: int = 0
    ignored: int = 0
    deployed: int = 0  # messages whose push is fully handled
    kept: list[str] = field(default_factory=list)  # ids of messages left on the queue for retry
    updated: list[str] = field(default_factory=list)  # "name (id)" per service update


class Deployer:
    def __init__(self, queue: Queue, ecr: Ecr, docker: Docker, label_filter: LabelFilter | None,
                 trust_events: bool = False):
        self.queue, self.ecr, self.docker = queue, ecr, docker
        self.label_filter = label_filter
        self.trust_events = trust_events

    def receive_batch(self, first_wait: int, interruptible=nullcontext) -> list[dict]:
        """First receive long-polls; follow-ups drain a burst into one batch (deduplicated)."""
        with interruptible():
            last = self.queue.receive(first_wait)
        batch = {m["MessageId"]: m for m in last}
        while len(last) == SQS_MAX_MESSAGES and len(batch) < BATCH_CAP:
            last = self.queue.receive(FOLLOW_UP_WAIT)
            batch.update((m["MessageId"], m) for m in last)
        return list(batch.values())

    def handle(self, messages: list[dict]) -> CycleResult:
        """Do what the messages ask, then delete exactly the ones whose work is done."""
        self.ecr.cycle += 1
        result = CycleResult(received=len(messages))
        done: list[dict] = []
        pushes: dict[tuple, list[tuple[dict, Push]]] = defaultdict(list)
        for message in messages:
            receive_count = int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
            if receive_count > 1:
                log.info("Retrying message %s (received %d times)", message["MessageId"], receive_count)
            what = parse_message(message.get("Body"))
            if isinstance(what, Ignored):
                log.log(logging.WARNING if what.suspicious else logging.INFO,
                        "Ignoring message %s: %s", message["MessageId"], what.reason)
                result.ignored += 1
                done.append(message)
            else:
                pushes[what.image_key].append((message, what))

        targets = self.resolve_targets(pushes, done)
        if targets:
            try:
                services = self.docker.services()
            except DockerError as e:
                log.error("%s; %d message(s) kept for retry", e, sum(len(pushes[k]) for k in targets))
                targets = {}
            for key, (push, digest) in targets.items():
                if self.deploy(push, digest, services, result):
                    done.extend(message for message, _ in pushes[key])
        result.deployed = len(done) - result.ignored
        done_ids = {m["MessageId"] for m in done} - self.queue.delete(done)
        result.kept = [m["MessageId"] for m in messages if m["MessageId"] not in done_ids]
        return result

    def resolve_targets(self, pushes: dict, done: list[dict]) -> dict[tuple, tuple[Push, str]]:
        """One ECR lookup per image: the digest its tag points to now (stale events lose)."""
        targets = {}
        for key, group in pushes.items():
            push = max((p for _, p in group), key=lambda p: p.time)
            if self.trust_events:
                targets[key] = (push, push.digest)
                continue
            try:
                digest = self.ecr.current_digest(push)
            except AwsError as e:
                log.error("%s; %d message(s) kept for retry", e, len(group))
                continue
            if digest is None:
                log.info("%s no longer exists in ECR; nothing to deploy", push.image)
                done.extend(message for message, _ in group)
                continue
            if any(p.digest != digest for _, p in group):
                log.info("ECR says %s is now %s (an event named another digest); deploying that",
                         push.image, digest)
            targets[key] = (push, digest)
        return targets

    def deploy(self, push: Push, digest: str, services: list[dict], result: CycleResult) -> bool:
        """Roll every matching service to the digest; True when all of them are done."""
        users = services_using(services, push, self.label_filter)
        if not users:
            log.info("No service uses %s", push.image)
        return all([self.update_service(service, push, digest, result) for service in users])

    def update_service(self, listed: dict, push: Push, digest: str, result: CycleResult) -> bool:
        """Pin one service to the digest; retried when the service changed under us."""
        label = f"{listed['Spec'].get('Name', '?')} ({listed['ID'][:12]})"
        for attempt in range(1, UPDATE_ATTEMPTS + 1):
            try:
                service = self.docker.service(listed["ID"])  # fresh: version and spec as of now
            except DockerError as e:
                if e.status == 404:
                    log.info("Service %s was removed; skipped", label)
                    return True
                log.error("Cannot inspect service %s: %s", label, e)
                return False
            ref = uses_image(service, push)
            if ref is None:
                log.info("Service %s no longer uses %s; skipped", label, push.image)
                return True
            image = pinned_image(ref, push.tag, digest)
            current = running_image(service)
            if current and current.digest == digest:
                log.info("Service %s already runs %s; nothing to do", label, image)
                return True
            try:
                username, password = self.ecr.credentials(push.account, push.region)
                warnings = self.docker.update_service(
                    service, updated_spec(service["Spec"], image),
                    registry_auth_header(username, password, ref.name.partition("/")[0]))
            except DockerError as e:
                if e.out_of_sequence and attempt < UPDATE_ATTEMPTS:
                    log.info("Service %s changed while updating (attempt %d); retrying", label, attempt)
                    time.sleep(random.uniform(0.05, 0.25) * attempt)  # jitter: two deployers desynchronise
                    continue
                log.error("Cannot update service %s: %s", label, e)
                return False
            except AwsError as e:
                log.error("Cannot update service %s: %s", label, e)
                return False
            for warning in warnings:
                log.warning("Docker warns about service %s: %s", label, warning)
            log.info("Updated service %s to %s", label, image)
            result.updated.append(label)
            return True
        return False


# --------------------------------------------------------------------------- main

class Shutdown(BaseException):
    """Raised by the signal handler, only while the process is merely waiting. A BaseException,
    like KeyboardInterrupt, so that no library's `except Exception` swallows it."""


class Signals:
    """SIGTERM/SIGINT: finish the batch in hand, but do not wait out a 20 s long poll."""

    def __init__(self):
        self.requested = False
        self._interruptible = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, _frame):
        self.requested = True
        if self._interruptible:
            raise Shutdown

    @contextmanager
    def interruptible(self):
        if self.requested:
            raise Shutdown
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def sleep(self, seconds: float) -> None:
        with self.interruptible():
            time.sleep(seconds)


class Backoff:
    """Exponential, jittered, capped: for outages that outlast botocore's own retries."""

    def __init__(self, cap: float = 30.0):
        self.cap, self.failures = cap, 0

    def next(self) -> float:
        self.failures += 1
        return min(self.cap, 2.0 ** self.failures) * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.failures = 0


def drain_once(deployer: Deployer, signals: Signals) -> int:
    """Receive until the queue is empty; a message that failed is not retried in this run."""
    failed_ids: set[str] = set()
    while not signals.requested:
        fresh = [m for m in deployer.receive_batch(FIRST_WAIT_ONCE) if m["MessageId"] not in failed_ids]
        if not fresh:
            break
        failed_ids.update(deployer.handle(fresh).kept)
    if failed_ids:
        log.error("Some messages were left on the queue for retry")
    return 1 if failed_ids else 0


def poll_forever(deployer: Deployer, signals: Signals) -> int:
    backoff = Backoff()
    while not signals.requested:
        try:
            messages = deployer.receive_batch(FIRST_WAIT_LOOP, signals.interruptible)
            failed = len(deployer.handle(messages).kept) if messages else 0
        except AwsError as e:
            log.error("%s", e)
            failed = 1
        except Shutdown:
            break
        try:
            signals.sleep(backoff.next()) if failed else backoff.reset()
        except Shutdown:
            break
    log.info("Stopping")
    return 0


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])  # botocore/urllib3 stay quiet:
    log.setLevel(level)  # their debug output would carry ECR tokens


def start(args: argparse.Namespace, signals: Signals) -> Deployer:
    """Resolve the queue and reach Docker; in loop mode, wait out outages instead of failing."""
    session = boto3.Session()
    queue = Queue(session, args.queue)
    deployer = Deployer(queue, Ecr(session), Docker(os.environ.get("DOCKER_HOST")),
                        args.filter_label, args.trust_events)
    backoff = Backoff()
    while True:
        try:
            queue.resolve()
            deployer.docker.negotiate()
            return deployer
        except (AwsError, DockerError) as e:
            if args.once or isinstance(e, QueueNotFound):
                raise
            log.error("%s; retrying", e)
            signals.sleep(backoff.next())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    signals = Signals()
    try:
        deployer = start(args, signals)
        log.info("ecr-deploy %s watching %s (Docker at %s, API %s)", __version__, deployer.queue.url,
                 deployer.docker.socket, deployer.docker.api_version)
        return drain_once(deployer, signals) if args.once else poll_forever(deployer, signals)
    except (AwsError, DockerError, ValueError) as e:
        log.error("%s", e)
        return 1
    except Shutdown:
        return 0


if __name__ == "__main__":
    sys.exit(main())
