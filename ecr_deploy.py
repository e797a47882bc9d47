#!/usr/bin/env python3
"""ecr-deploy: roll Docker Swarm services to the image just pushed to Amazon ECR.

EventBridge sends "ECR Image Action" events to an SQS queue (directly, or through an SNS
topic). This program long-polls that queue and, for every push of REPO:TAG, updates every
Swarm service running that tag to the digest ECR says the tag points to *now*, pinned by
digest, with fresh ECR credentials forwarded to Swarm. Services may opt in to a scan gate:
rolled only to digests whose ECR scan is clean enough ("ECR Image Scan" events trigger them); an
image index (what `docker buildx build --push` pushes), which ECR does not scan, by the scans of
its platform images; and to a signature gate: rolled only to digests signed by an identity the
operator trusts, as notation or cosign verify it ("ECR Referrer Action" events trigger them).

Events are the fast path, not the truth: a reconcile pass compares every service that follows a
tag with what the tag points to in ECR now; the operator's release policy (windows, min-age, waves,
promotion) decides when; what must survive a restart lives on the service's labels.

Read top-down: configuration, events (pure), images (pure: references, which tag a service
follows), versions (pure: which tags a version policy admits, and the newest), a service's version (pure:
its policy, the version it should run, the deployer's own tags never versions), specs (pure), service labels
(pure: provenance, failure records), release policy (pure), Swarm's tasks (pure: completed, soaked), a
job before the rollout (pure: which image a service's pre-rollout job runs, how its run ended), status
(pure), rollouts (pure), checks after the rollout (pure: what proves a rollout good, what proves it
stuck), scan gate (pure), signature gate (pure), deciding (pure: a Hint,
"service S should run digest D of tag T, because of this event or a reconcile pass", and decide(), the
one answer to it: deploy, nothing, hold back, wait, block), AWS shell (SQS), ECR shell, ECR shell: images
kept (EcrKeptImages: storage classes, protection tags, lifecycle previews), Docker shell,
the service index (loop mode's ServiceIndex, kept current from Docker's events), the gates (ScanGate;
SignatureGate, which runs notation or cosign), the drain cycle (Deployer: messages in, hints converged,
the messages whose hints are decided acknowledged), hints from events (EventHints), converging
(Converger: reads the facts decide() asks for, then has them acted on; promotion), acting (Actor:
posts, records failures, says why not, blocks, promotes), checks after the rollout (Checker: CloudWatch
alarms, HTTP checks; RolloutChecks: a rollout's checks and progress), rollouts (Rollouts, which follows and
rolls back), the job before the rollout (BeforeJobs: starts a service's pre-rollout job, follows it,
blocks), the auth keeper (AuthKeeper), the reconcile pass (Reconciler: a hint for every service behind
its tag, or behind the newest version its policy admits), receiving (Receiver: batches bounded in time, held
invisible while worked on), reports,
notifications, logging and systemd, status (read-only), running once or in a loop (signals, drain_once,
poll_forever), starting (start, main).
"""
from __future__ import annotations

import argparse
import base64
import copy
import decimal
import email.utils
import functools
import hashlib
import json
import logging
import math
import os
import queue as queues  # the standard library's; Queue here is the SQS queue
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

import botocore.config
import botocore.exceptions
import botocore.session
import requests
import requests_unixsocket

__version__ = "0.1.0"

log = logging.getLogger("ecr-deploy")

# --------------------------------------------------------------------------- configuration

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("auto", "text", "journal", "json")
TRUE_WORDS = ("1", "true", "yes", "on")

EPILOG = """\
environment:
  DOCKER_HOST      Docker endpoint, unix:///path (default unix:///var/run/docker.sock)
  DEPLOYER_HEARTBEAT_URL
                   a healthchecks.io-style URL (a secret: environment only): loop mode pings it at most once a
                   minute while healthy and URL/fail when unhealthy; --once and --reconcile URL/start, then
                   URL or URL/fail
  AWS_REGION, AWS_PROFILE, AWS_ENDPOINT_URL, ...
                   boto3's standard chain: region, credentials (instance role preferred)

exit codes: 0 every received message handled; 1 something left on the queue for retry,
            or a runtime failure (unreachable Docker or AWS); 2 usage error; 3 misconfigured
            (no such queue, access denied, Docker not a swarm manager, bad DOCKER_HOST)
  --status: 0 every service current (or pinned); 4 some service behind or waiting (the deployer
            will roll it), or an image it runs or rolls back to being restored; 5 some service held
            back, blocked, failed or following a tag gone from ECR, or an image it runs or rolls back
            to gone or archived (the operator must act); 1 Docker or ECR could not be asked
  --lint-lifecycle: 0 no lifecycle rule would expire or archive an image a service runs or rolls back to;
            5 some rule would; 1 ECR could not be asked for some repository

examples:
  systemd (loop mode; see systemd/ecr-deploy.service):
    DEPLOYER_QUEUE=ecr-deploy AWS_REGION=eu-west-1 ecr_deploy.py
  cron, drain once, never overlapping, to syslog:
    * * * * * flock -n /run/ecr-deploy.lock ecr_deploy.py --once --queue ecr-deploy 2>&1 | logger -t ecr-deploy
  dry run: what would be updated, nothing changed, no message deleted:
    ecr_deploy.py --once --dry-run --queue ecr-deploy
  what runs where, what is behind and why (read-only):
    ecr_deploy.py --status
  a reconcile pass from cron, without a queue:
    */5 * * * * flock -n /run/ecr-deploy.lock ecr_deploy.py --reconcile 2>&1 | logger -t ecr-deploy

documentation (README.md, and in docs/):
  install.md          AWS setup, the systemd unit, cron     options.md          every option, exit codes
  which-tag.md        which tag a service follows           converging.md       reconcile pass, --status
  rollouts.md         outcomes, rollback, auth refresh      release-policy.md   windows, min-age, waves
  scan-gate.md        --scan-threshold                      signature-gate.md   --signature, notation
  troubleshooting.md  what a log line means, and the fix   notifications.md    Slack, Teams, ntfy, e-mail
  keeping-images.md   running and rollback images ECR must keep, --restore-archived, --protect-tag-prefix,
                      --lint-lifecycle
  around-a-rollout.md a job before the rollout (ecr-deploy.before: a migration), checks after a rollout
                      (alarms, HTTP), --progress-deadline
"""


class LabelFilter(NamedTuple):
    key: str
    value: str | None  # None: any value

    def admits(self, labels: dict | None) -> bool:
        labels = labels or {}
        return self.key in labels and (self.value is None or labels[self.key] == self.value)


DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)")
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '6h', '1d' -> seconds."""
    match = DURATION.fullmatch(str(text).strip().lower())
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 30m, 6h)")
    return float(match[1]) * DURATION_UNITS[match[2]]


def env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in TRUE_WORDS


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
    parser.add_argument("--wait", action="store_true",
                        help="with --once: wait for the rollouts this run started and exit 1 if any "
                        "did not complete")
    parser.add_argument("--filter-label", metavar="KEY[=VALUE]", default=env("DEPLOYER_FILTER_LABEL"),
                        help="only update services carrying this label, with any value if only KEY "
                        "is given (env DEPLOYER_FILTER_LABEL)")
    parser.add_argument("--log-level", type=str.upper, default=env("DEPLOYER_LOG_LEVEL", "INFO"),
                        help=f"one of {', '.join(LOG_LEVELS)} (env DEPLOYER_LOG_LEVEL; default INFO)")
    parser.add_argument("--trust-events", action="store_true",
                        default=env_true("DEPLOYER_TRUST_EVENTS"),
                        help="deploy the digest named in the event instead of asking ECR which digest "
                        "the tag points to now; saves the ecr:DescribeImages permission but lets stale, "
                        "replayed or forged events roll services back (env DEPLOYER_TRUST_EVENTS=1)")
    parser.add_argument("--rollout-timeout", metavar="DURATION", default=env("DEPLOYER_ROLLOUT_TIMEOUT"),
                        help="give up on a rollout after this long (e.g. 10m; env DEPLOYER_ROLLOUT_TIMEOUT); "
                        "default: from the service's UpdateConfig, at least 5m")
    parser.add_argument("--progress-deadline", metavar="DURATION", default=env("DEPLOYER_PROGRESS_DEADLINE", "5m"),
                        help="a rollout none of whose new tasks reaches running for this long is stuck: it "
                        "fails then, with the tasks' errors, not at the rollout timeout (label "
                        "ecr-deploy.progress-deadline per service; 0 = off; env DEPLOYER_PROGRESS_DEADLINE; "
                        "default 5m)")
    parser.add_argument("--rollback-on-failure", action="store_true",
                        default=env_true("DEPLOYER_ROLLBACK_ON_FAILURE"),
                        help="when a rollout of ours pauses, times out, is stuck or fails its checks, restore "
                        "the previous spec with fresh registry auth (env DEPLOYER_ROLLBACK_ON_FAILURE=1); a failed rollout of a "
                        "service whose UpdateConfig says FailureAction=rollback is left to Swarm")
    parser.add_argument("--auth-refresh", metavar="DURATION", default=env("DEPLOYER_AUTH_REFRESH", "6h"),
                        help="loop mode: this often, re-post every ECR service's unchanged spec with a "
                        "fresh registry token so Swarm can always pull; at most once per interval, also "
                        "across restarts ($STATE_DIRECTORY/auth-keeper.json) (0 = off; env "
                        "DEPLOYER_AUTH_REFRESH; default 6h, ECR tokens live 12h)")
    parser.add_argument("--refresh-auth", action="store_true",
                        help="run one registry-auth refresh pass and exit (for cron); needs no queue")
    parser.add_argument("--reconcile-every", metavar="DURATION", default=env("DEPLOYER_RECONCILE_EVERY", "5m"),
                        help="compare every service that follows an ECR tag with what the tag points to now, "
                        "and roll those behind as a push would: in loop mode after the first poll and then "
                        "this often; with --once, one pass after draining (0 = off; env "
                        "DEPLOYER_RECONCILE_EVERY; default 5m)")
    parser.add_argument("--restore-archived", action="store_true", default=env_true("DEPLOYER_RESTORE_ARCHIVED"),
                        help="each reconcile pass checks that ECR still has the digest every service runs and its "
                        "rollback target; with this, one that a lifecycle rule archived is restored to the "
                        "standard storage class, as is the archived digest a followed tag points to (which is "
                        "never rolled to) (ecr:UpdateImageStorageClass; env DEPLOYER_RESTORE_ARCHIVED=1)")
    parser.add_argument("--protect-tag-prefix", metavar="PREFIX", default=env("DEPLOYER_PROTECT_TAG_PREFIX"),
                        help="each reconcile pass keeps the tag PREFIX.SERVICE.running on the digest every service "
                        "runs and PREFIX.SERVICE.rollback on its rollback target, and removes those of services "
                        "gone, so that a lifecycle rule retaining them keeps the images; name the swarm (each swarm "
                        "sharing a repository its own prefix; env DEPLOYER_PROTECT_TAG_PREFIX; default: off)")
    parser.add_argument("--lint-lifecycle", action="store_true",
                        help="ask ECR to preview each repository's lifecycle policy and say which rule would expire "
                        "or archive an image a service runs or rolls back to; alone: exit 0 none, 5 some, 1 ECR "
                        "could not be asked; with --status: in each row, and in its exit code")
    parser.add_argument("--window", metavar="WINDOW", default=env("DEPLOYER_WINDOW"),
                        help=f"start rollouts only inside this window, e.g. 'Mon-Fri 09:00-16:00 Europe/Berlin' "
                        f"(several clauses separated by ';'); a service's label {WINDOW_LABEL} wins, 'always' "
                        "opts out (env DEPLOYER_WINDOW; default: any time)")
    parser.add_argument("--min-age", metavar="DURATION", default=env("DEPLOYER_MIN_AGE"),
                        help=f"roll only digests pushed at least this long ago by ECR's clock; a service's "
                        f"label {MIN_AGE_LABEL} wins (env DEPLOYER_MIN_AGE; default: none)")
    parser.add_argument("--reconcile", action="store_true",
                        help="run one reconcile pass and exit (for cron, also without a queue)")
    parser.add_argument("--status", action="store_true",
                        help="print one row per service that runs an ECR image: its tag, the digest it runs, "
                        "the digest the tag points to now, its state and its last rollout; read-only, needs "
                        "no queue; exit 0 all current, 4 some behind or waiting, 5 some held back, blocked "
                        "or failed, or an image a service runs or rolls back to gone or archived")
    parser.add_argument("--json", action="store_true", help="with --status: JSON instead of a table")
    parser.add_argument("--notify-url", metavar="URL", action="append",
                        default=env("DEPLOYER_NOTIFY_URL", "").split(),
                        help="an http(s) URL: POST a JSON document per rollout outcome (Slack/Teams incoming "
                        "webhooks show its 'text'); repeatable (env DEPLOYER_NOTIFY_URL, space separated, which "
                        "also takes Apprise URLs: slack://, workflows://, discord://, ntfys://, mailtos://, ...; "
                        "those carry credentials, so never on the command line: see docs/notifications.md)")
    parser.add_argument("--notify-file", metavar="PATH", default=env("DEPLOYER_NOTIFY_FILE"),
                        help="named notification targets, one per line: NAME EVENTS APPRISE_URL, EVENTS 'all' or "
                        f"some of {','.join(EVENT_CLASSES)}; a service's label {NOTIFY_LABEL}=NAME[,NAME] sends its "
                        "events only to those (env DEPLOYER_NOTIFY_FILE)")
    parser.add_argument("--unhealthy-after", metavar="DURATION", default=env("DEPLOYER_UNHEALTHY_AFTER", "2m"),
                        help="loop mode: notify 'unhealthy' once Docker or the queue stayed unreachable this long, "
                        "and 'recovered' when they answer again (env DEPLOYER_UNHEALTHY_AFTER; default 2m)")
    parser.add_argument("--summary-file", metavar="PATH", default=env("DEPLOYER_SUMMARY_FILE"),
                        help="write a JSON run summary here, atomically (env DEPLOYER_SUMMARY_FILE)")
    parser.add_argument("--metrics-file", metavar="PATH", default=env("DEPLOYER_METRICS_FILE"),
                        help="write Prometheus text metrics here, atomically, e.g. for node_exporter's "
                        "textfile collector (env DEPLOYER_METRICS_FILE)")
    parser.add_argument("--metrics-address", metavar="HOST:PORT", default=env("DEPLOYER_METRICS_ADDRESS"),
                        help="loop mode: serve the metrics over HTTP at /metrics here, for Prometheus to scrape, e.g. "
                        "127.0.0.1:9469 (env DEPLOYER_METRICS_ADDRESS; default: off)")
    parser.add_argument("--dry-run", action="store_true",
                        default=env_true("DEPLOYER_DRY_RUN"),
                        help="do everything up to the update call and log 'Would update ...'; delete no "
                        "message, so they come back after the visibility timeout (env DEPLOYER_DRY_RUN=1)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=env("DEPLOYER_LOG_FORMAT", "auto"),
                        help="auto (default): journal style under systemd, else timestamped text; "
                        "json: one object per line (env DEPLOYER_LOG_FORMAT)")
    parser.add_argument("--scan-threshold", metavar="SEVERITY", type=severity,
                        default=env("DEPLOYER_SCAN_THRESHOLD", "off"),
                        help=f"roll services only to digests whose ECR scan has no finding at or above this "
                        f"severity ({', '.join(SEVERITIES)}, or off: the default); a service's label "
                        f"{SCAN_THRESHOLD_LABEL} wins (env DEPLOYER_SCAN_THRESHOLD)")
    parser.add_argument("--scan-timeout", metavar="DURATION", default=env("DEPLOYER_SCAN_TIMEOUT", "30m"),
                        help="block a gated deployment whose ECR scan has not finished this long after the "
                        "push (env DEPLOYER_SCAN_TIMEOUT; default 30m)")
    parser.add_argument("--signature", metavar="TRUST", type=parse_trust, default=env("DEPLOYER_SIGNATURE", "off"),
                        help=f"roll services only to digests signed by an identity this trusts: notation (Notation's "
                        f"trust policy in --notation-dir decides), notation:STATEMENT (and it must be that statement), "
                        f"cosign:/path/to/key.pub, or off (the default); a service's label {SIGNATURE_LABEL} wins "
                        f"(env DEPLOYER_SIGNATURE)")
    parser.add_argument("--notation-dir", metavar="DIR", default=env("DEPLOYER_NOTATION_DIR", "/etc/ecr-deploy/notation"),
                        help="Notation's configuration for the signature gate: trustpolicy.json, truststore/, "
                        "plugins/ (env DEPLOYER_NOTATION_DIR; default /etc/ecr-deploy/notation)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)

    args.queue = (args.queue or "").strip()
    one_shot = [flag for flag in ("refresh_auth", "reconcile", "status") if getattr(args, flag)]
    if args.lint_lifecycle and not args.status:
        one_shot.append("lint_lifecycle")
    if len(one_shot) > 1 or one_shot and args.once:
        parser.error("--refresh-auth, --reconcile, --status, --lint-lifecycle (but with --status) and --once each "
                     "run alone")
    if args.protect_tag_prefix is not None:
        args.protect_tag_prefix = args.protect_tag_prefix.strip() or None
    if args.protect_tag_prefix and not PROTECT_PREFIX.fullmatch(args.protect_tag_prefix):
        parser.error(f"--protect-tag-prefix must be 1 to 40 of A-Z a-z 0-9 _ - (not starting with -), no '.': "
                     f"{shown(args.protect_tag_prefix)}")
    if not args.queue and not one_shot:
        parser.error("no queue given: use --queue NAME_OR_URL or set DEPLOYER_QUEUE")
    if args.json and not args.status:
        parser.error("--json goes with --status")
    if args.log_format not in LOG_FORMATS:
        parser.error(f"log format must be one of {', '.join(LOG_FORMATS)}, not {args.log_format!r}")
    if args.log_level not in LOG_LEVELS:
        parser.error(f"log level must be one of {', '.join(LOG_LEVELS)}, not {args.log_level!r}")
    if args.dry_run and not (args.once or args.reconcile):
        parser.error("--dry-run goes with --once or --reconcile: messages it does not delete come back, and in "
                     "a loop every pass would count towards the queue's maxReceiveCount")
    if args.wait and not (args.once or args.reconcile):
        parser.error("--wait goes with --once or --reconcile (loop mode always follows its rollouts)")
    if args.filter_label:
        key, sep, value = args.filter_label.partition("=")
        if not key.strip():
            parser.error(f"filter label must be KEY or KEY=VALUE, not {args.filter_label!r}")
        args.filter_label = LabelFilter(key.strip(), value if sep else None)
    try:
        args.auth_refresh = parse_duration(args.auth_refresh)
        args.scan_timeout = parse_duration(args.scan_timeout)
        args.reconcile_every = parse_duration(args.reconcile_every)
        if args.min_age:
            parse_duration(args.min_age)
        if args.window and args.window.strip().lower() != "always":
            parse_window(args.window)
        args.rollout_timeout = parse_duration(args.rollout_timeout) if args.rollout_timeout else None
        args.progress_deadline = parse_duration(args.progress_deadline)
    except ValueError as e:
        parser.error(str(e))
    try:
        args.unhealthy_after = parse_duration(args.unhealthy_after)
        args.notify_targets = notify_targets(args.notify_url, env("DEPLOYER_NOTIFY_URL", "").split(),
                                             args.notify_file)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    args.notify_url = [url for url in args.notify_url if url.startswith(("https://", "http://"))]
    return args


# Hosts of chat services whose incoming-webhook URL is itself the credential (a token in its path).
WEBHOOK_SECRET_HOSTS = re.compile(r"(hooks\.slack\.com|[a-z0-9-]+\.webhook\.office\.com|outlook\.office(365)?\.com"
                                  r"|[a-z0-9.-]+\.logic\.azure\.com|(ptb\.|canary\.)?discord(app)?\.com"
                                  r"|chat\.googleapis\.com)", re.I)


def webhook_secret_in(url: str) -> bool:
    """Does this http(s) webhook URL carry a credential: a user or password, a query (Teams workflows'
    sig=, Google Chat's key= and token=), or a chat service's webhook path (Slack, Teams, Discord)?"""
    parts = urllib.parse.urlsplit(url)
    return bool(parts.username or parts.password or parts.query
                or WEBHOOK_SECRET_HOSTS.fullmatch(parts.hostname or ""))


def notify_targets(urls: list[str], from_env: list[str], path: str | None) -> list[TargetConfig]:
    """The Apprise targets: DEPLOYER_NOTIFY_URL's (named url1, url2, ...; every event), then the file's.
    http(s) URLs stay the JSON webhook. Errors never quote a URL (it may carry credentials)."""
    targets = []
    for url in urls:
        scheme = url.partition("://")[0].lower()
        if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme) or "://" not in url:
            raise ValueError("--notify-url (or DEPLOYER_NOTIFY_URL) must be an http(s) or Apprise URL (SCHEME://...)")
        if scheme in ("http", "https"):
            if url not in from_env and webhook_secret_in(url):
                raise ValueError(f"--notify-url {scheme}://{urllib.parse.urlsplit(url).hostname}/...: this webhook URL "
                                 "carries its credential, which a process listing shows: give it in DEPLOYER_NOTIFY_URL")
            continue
        if url not in from_env:
            raise ValueError(f"--notify-url {scheme}://...: an Apprise URL carries credentials, which a process "
                             "listing shows: give it in DEPLOYER_NOTIFY_URL or --notify-file")
        targets.append(TargetConfig(f"url{len(targets) + 1}", frozenset(EVENT_CLASSES), url))
    if path:
        with open(path) as file:
            try:
                targets += parse_notify_file(file.read())
            except ValueError as e:
                raise ValueError(f"--notify-file {path}: {e}") from None
    return targets


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
EVENT_ID = re.compile(r"[A-Za-z0-9-]{1,64}")  # EventBridge writes a UUID; it only ever reaches a label


@dataclass(frozen=True)
class Push:
    """A validated ECR push of REPOSITORY:TAG (digest as the event named it)."""
    account: str
    region: str
    repository: str
    tag: str
    digest: str
    time: str = ""  # the event's time (a reconcile pass: ECR's imagePushedAt), for ordering and the scan wait
    trigger: str = "push"  # or "scan", "signature": an event about the digest; deploy only if the tag still points at it
    event_id: str = field(default="", compare=False)  # the EventBridge event's id: provenance only
    reconcile: bool = field(default=False, compare=False)  # made by a reconcile pass, not by an event
    received: float = field(default=0.0, compare=False)  # when SQS first handed its message to any deployer (epoch s)

    @property
    def image_key(self) -> tuple[str, str, str, str]:
        return (self.account, self.region, self.repository, self.tag)

    @property
    def repository_key(self) -> tuple[str, str, str]:
        return (self.account, self.region, self.repository)

    @property
    def image(self) -> str:
        suffix = ".cn" if self.region.startswith("cn-") else ""
        return f"{self.account}.dkr.ecr.{self.region}.amazonaws.com{suffix}/{self.repository}:{self.tag}"


@dataclass(frozen=True)
class ScanDone:
    """A completed ECR image scan of REPOSITORY@DIGEST, with the tags the image had then (none for an
    image index's platform image: ECR scans those, and keeps them untagged)."""
    account: str
    region: str
    repository: str
    digest: str
    tags: tuple[str, ...]
    time: str = ""
    event_id: str = field(default="", compare=False)
    trigger: str = "scan"  # or "signature": a signature of the digest was pushed (ECR Referrer Action)

    @property
    def repository_key(self) -> tuple[str, str, str]:
        return (self.account, self.region, self.repository)

    def pushes(self) -> list[Push]:
        """One push per tag: services following any of them may now pass their gates."""
        return [Push(self.account, self.region, self.repository, tag, self.digest, self.time, trigger=self.trigger,
                     event_id=self.event_id) for tag in self.tags]


@dataclass(frozen=True)
class Signed:
    """A signature pushed to REPOSITORY as an OCI referrer (its own digest): the image it signs may
    now pass signature gates. ECR's event names only the signature; its manifest names the image."""
    account: str
    region: str
    repository: str
    digest: str  # the signature's (the referrer's) own digest
    time: str = ""
    event_id: str = field(default="", compare=False)
    subject: str = ""  # the signed image's digest, when the event names it (a signature tag), else ECR says


# The tag cosign's legacy signatures are pushed under (sha256-HEX.sig), and the OCI referrers tag
# schema's (sha256-HEX, where a registry has no referrers API; notation writes it on ECR too by default).
SIGNATURE_TAG = re.compile(r"sha256-([0-9a-f]{64})(?:\.sig)?")


# Referrers whose push may let a gated service roll: Notation signatures, Sigstore (cosign 3) bundles.
SIGNATURE_ARTIFACTS = ("application/vnd.cncf.notary.signature", "application/vnd.dev.sigstore.bundle")


class Ignored(NamedTuple):
    """Why a message is not a deployable push; suspicious ones are logged as warnings."""
    reason: str
    suspicious: bool = False


def first_received(message: dict) -> float:
    """When SQS first handed this message to any deployer (its ApproximateFirstReceiveTimestamp, epoch
    ms), in epoch seconds; 0.0 when SQS did not say."""
    stamp = message.get("Attributes", {}).get("ApproximateFirstReceiveTimestamp", "")
    return int(stamp) / 1000 if isinstance(stamp, str) and stamp.isascii() and stamp.isdigit() and len(stamp) <= 15 else 0.0


def parse_message(body: object) -> Push | ScanDone | Signed | Ignored:
    """Any SQS message body -> a validated Push, ScanDone or Signed, or the reason to ignore it. Never raises."""
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


ECR_EVENTS = ("ECR Image Action", "ECR Image Scan", "ECR Referrer Action")


def parse_event(event: dict) -> Push | ScanDone | Signed | Ignored:
    if event.get("source") == "aws.inspector2":
        return parse_inspector_event(event)
    if event.get("source") != "aws.ecr":
        return Ignored(f"source is {shown(event.get('source'))}, not aws.ecr or aws.inspector2")
    if event.get("detail-type") not in ECR_EVENTS:
        return Ignored(f"detail-type is {shown(event.get('detail-type'))}, not {', '.join(ECR_EVENTS)}")
    detail = event.get("detail")
    if not isinstance(detail, dict):
        return Ignored("event has no detail object", suspicious=True)
    if event["detail-type"] == "ECR Image Scan":
        return parse_scan_event(event, detail)
    if event["detail-type"] == "ECR Referrer Action":
        return parse_referrer_event(event, detail)
    if detail.get("action-type") != "PUSH":
        return Ignored(f"action-type is {shown(detail.get('action-type'))}, not PUSH")
    if detail.get("result") != "SUCCESS":
        return Ignored(f"result is {shown(detail.get('result'))}, not SUCCESS")
    if detail.get("image-tag") in (None, ""):
        return Ignored("push of an untagged image")
    fields = {"account": event.get("account"), "region": event.get("region"),
              "repository": detail.get("repository-name"), "tag": detail.get("image-tag"),
              "digest": detail.get("image-digest")}
    invalid = invalid_field(fields)
    signs = SIGNATURE_TAG.fullmatch(fields["tag"]) if not invalid else None
    if signs:  # cosign's legacy signature tag, or the OCI referrers tag schema's: it names what it signs
        return Signed(*(fields[k] for k in ("account", "region", "repository", "digest")), time=event_time(event),
                      event_id=event_id(event), subject=f"sha256:{signs[1]}")
    return invalid or Push(**fields, time=event_time(event), event_id=event_id(event))


def parse_scan_event(event: dict, detail: dict) -> ScanDone | Ignored:
    if detail.get("scan-status") != "COMPLETE":
        return Ignored(f"scan-status is {shown(detail.get('scan-status'))}, not COMPLETE")
    tags = detail.get("image-tags")
    if not isinstance(tags, list) or not all(is_valid("tag", tag) for tag in tags):
        return Ignored(f"invalid image-tags {shown(tags)}", suspicious=True)
    fields = {"account": event.get("account"), "region": event.get("region"),
              "repository": detail.get("repository-name"), "digest": detail.get("image-digest")}
    return invalid_field(fields) or ScanDone(**fields, tags=tuple(dict.fromkeys(tags)), time=event_time(event),
                                             event_id=event_id(event))


def parse_referrer_event(event: dict, detail: dict) -> Signed | Ignored:
    """ECR's "ECR Referrer Action": an OCI referrer (a signature, an SBOM, an attestation) pushed."""
    if detail.get("action-type") != "PUSH" or detail.get("result") != "SUCCESS":
        return Ignored(f"referrer {shown(detail.get('action-type'))} {shown(detail.get('result'))}, not a PUSH "
                       f"SUCCESS")
    artifact = detail.get("artifact-media-type")
    if not isinstance(artifact, str) or not artifact.startswith(SIGNATURE_ARTIFACTS):
        return Ignored(f"referrer of type {shown(artifact)}, not a signature")
    fields = {"account": event.get("account"), "region": event.get("region"),
              "repository": detail.get("repository-name"), "digest": detail.get("image-digest")}
    return invalid_field(fields) or Signed(**fields, time=event_time(event), event_id=event_id(event))


INSPECTOR_REPOSITORY = re.compile(r"arn:aws(?:-cn|-us-gov)?:ecr:([^:]*):([^:]*):repository/(.*)")


def parse_inspector_event(event: dict) -> ScanDone | Ignored:
    """Amazon Inspector's "Inspector2 Scan" (enhanced scanning's first scan of an image): the same as
    ECR's scan event, except that repository-name is the repository's ARN."""
    if event.get("detail-type") != "Inspector2 Scan":
        return Ignored(f"detail-type is {shown(event.get('detail-type'))}, not Inspector2 Scan")
    detail = event.get("detail")
    if not isinstance(detail, dict):
        return Ignored("event has no detail object", suspicious=True)
    if detail.get("scan-status") != "INITIAL_SCAN_COMPLETE":
        return Ignored(f"scan-status is {shown(detail.get('scan-status'))}, not INITIAL_SCAN_COMPLETE")
    if "repository-name" not in detail:
        return Ignored("Inspector scan of something other than an ECR image")  # an EC2 instance, a Lambda
    arn = INSPECTOR_REPOSITORY.fullmatch(detail["repository-name"]) \
        if isinstance(detail["repository-name"], str) else None
    if not arn or (arn[1], arn[2]) != (event.get("region"), event.get("account")):
        return Ignored(f"invalid repository-name {shown(detail['repository-name'])}", suspicious=True)
    return parse_scan_event(event, {**detail, "scan-status": "COMPLETE", "repository-name": arn[3]})


def invalid_field(fields: dict) -> Ignored | None:
    for name, value in fields.items():
        if not is_valid(name, value):
            return Ignored(f"invalid {name} {shown(value)}", suspicious=True)
    return None


def event_time(event: dict) -> str:
    return event["time"] if isinstance(event.get("time"), str) else ""


def event_id(event: dict) -> str:
    """The event's id if it is a plain one ("" otherwise: it names the push on the service, nothing more)."""
    value = event.get("id")
    return value if isinstance(value, str) and EVENT_ID.fullmatch(value) else ""


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
RERUN_JOB_LABEL = "ecr-deploy.rerun-job"  # "true": a push may re-run this Swarm job

# Every spelling of an ECR registry host: standard, FIPS, dual-stack, China. HTTPS's default
# port written out (HOST:443) names the same registry; any other port is not ECR.
ECR_HOST = re.compile(r"([0-9]{12})\.(?:dkr\.ecr(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?"
                      r"|dkr-ecr(?:-fips)?\.([a-z0-9-]+)\.on\.aws)(?::443)?")

# The distribution/reference grammar (what Docker accepts as an image reference).
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
REFERENCE = re.compile(rf"({_DOMAIN})/({_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)(?::([\w][\w.-]{{0,127}}))?"
                       r"(?:@([A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?", re.ASCII)
HEX_IDENTIFIER = re.compile(r"[a-f0-9]{64}")  # an image ID, never a repository name
DIGEST_GRAMMAR = re.compile(r"sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}")  # go-digest's
MAX_NAME_LENGTH = 255
DOCKER_HUB = "docker.io"


class ImageRef(NamedTuple):
    name: str  # HOST/REPOSITORY exactly as written: the part kept when pinning
    host: str  # the registry, lower-cased; docker.io for Docker Hub
    repository: str  # path in the registry, normalised as Docker does (library/nginx)
    tag: str | None  # "latest" when neither tag nor digest is written; None when only a digest is
    digest: str | None


def parse_image_ref(ref: object) -> ImageRef | None:
    """A Docker image reference parsed as Docker parses it (ParseNormalizedNamed); None if invalid."""
    if not isinstance(ref, str) or not ref or HEX_IDENTIFIER.fullmatch(ref):
        return None
    first, slash, rest = ref.partition("/")
    if slash and (first == "localhost" or "." in first or ":" in first or first.lower() != first):
        host, remainder = (DOCKER_HUB if first == "index.docker.io" else first), rest
    else:
        host, remainder = DOCKER_HUB, ref
    if host == DOCKER_HUB and "/" not in remainder:
        remainder = "library/" + remainder  # official images: nginx is docker.io/library/nginx
    match = REFERENCE.fullmatch(f"{host}/{remainder}")
    if not match or len(match[1]) + 1 + len(match[2]) > MAX_NAME_LENGTH:
        return None
    _, repository, tag, digest = match.groups()
    if digest and not DIGEST_GRAMMAR.fullmatch(digest):  # the grammar admits any algorithm; Docker checks it
        return None
    suffix = len(f":{tag}" if tag else "") + len(f"@{digest}" if digest else "")
    return ImageRef(ref[:len(ref) - suffix], host.lower(), repository,
                    tag or (None if digest else "latest"), digest)


def ecr_registry(host: str) -> tuple[str, str] | None:
    """(account, region) of an ECR registry host, whatever its spelling; None if not ECR."""
    match = ECR_HOST.fullmatch(host.lower())
    return (match[1], match[2] or match[3]) if match else None


def running_image(service: dict) -> ImageRef | None:
    """The image in the service's spec (what its tasks run, pinned or not)."""
    spec = service.get("Spec") or {}
    return parse_image_ref(spec.get("TaskTemplate", {}).get("ContainerSpec", {}).get("Image"))


def following(service: dict) -> str | None:
    """The tag a service follows; None when it is pinned. The spec's own tag wins: `docker service
    update --image` changes the spec but never the stack label, which may be stale. Only a digest-only
    spec (how `docker stack deploy` may write it) follows the label's tag, if the label names one for
    the same repository; compose's `image: HOST/REPO@sha256:…` means pinned."""
    ref = running_image(service)
    if ref is None or ref.tag:
        return ref and ref.tag
    label = parse_image_ref(((service.get("Spec") or {}).get("Labels") or {}).get(STACK_IMAGE_LABEL))
    same_repository = label and (label.host, label.repository) == (ref.host, ref.repository)
    return label.tag if same_repository else None


def in_repository(ref: ImageRef | None, push: Push) -> bool:
    return bool(ref) and ecr_registry(ref.host) == (push.account, push.region) and ref.repository == push.repository


def runs_digest(service: dict, digest: str) -> bool:
    current = running_image(service)
    return current is not None and current.digest == digest


def uses_image(service: dict, push: Push) -> ImageRef | None:
    """The service's reference to the pushed REPOSITORY:TAG, or None if it runs something else. A service
    that follows versions uses every tag of its repository: decide() says whether its policy takes this one."""
    ref = running_image(service)
    return ref if in_repository(ref, push) and (following(service) == push.tag or follows_versions(service)) \
        else None


def pinned_digest(service: dict, push: Push) -> str | None:
    """The digest a service of the pushed repository is pinned to (it follows no tag nor versions), else None."""
    ref = running_image(service)
    return ref.digest if in_repository(ref, push) and following(service) is None and not follows_versions(service) \
        else None


def repository_of(service: dict) -> tuple[str, str, str] | None:
    """(account, region, repository) of the ECR image the service runs, pinned or not; None if not ECR.
    A push can only concern the services of its own repository: looked up by this key, a push does not
    parse every service's image (a swarm may hold a thousand)."""
    ref = running_image(service)
    registry = ecr_registry(ref.host) if ref else None
    return (*registry, ref.repository) if registry else None


def by_repository(services: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    grouped = defaultdict(list)
    for service in services:
        key = repository_of(service)
        if key:
            grouped[key].append(service)
    return grouped


def services_using(services: list[dict], push: Push, label_filter: LabelFilter | None) -> list[dict]:
    return [s for s in services
            if uses_image(s, push) and (label_filter is None or label_filter.admits(s["Spec"].get("Labels")))]


def followed_tag(service: dict, label_filter: LabelFilter | None) -> tuple[str, str, str, str] | None:
    """(account, region, repository, tag) of the ECR tag whose push would roll this service: the same
    rule as for pushes (not pinned, not a job that has not opted in, admitted by --filter-label). None for
    a service that follows versions (versions_followed): no one tag's push is its whole story."""
    ref, tag, spec = running_image(service), following(service), service.get("Spec") or {}
    registry = ecr_registry(ref.host) if ref else None
    if not registry or not tag or (is_job(spec) and not reruns_on_push(spec)) or follows_versions(service):
        return None
    if label_filter is not None and not label_filter.admits(spec.get("Labels")):
        return None
    return (*registry, ref.repository, tag)


def versions_followed(service: dict, label_filter: LabelFilter | None) -> tuple[str, str, str] | None:
    """(account, region, repository) whose tags this service follows by version (VERSIONS_LABEL), by the
    same rule as followed_tag; None if it follows a tag, is pinned by it, or is not an ECR image."""
    ref, spec = running_image(service), service.get("Spec") or {}
    registry = ecr_registry(ref.host) if ref else None
    if not registry or not follows_versions(service) or (is_job(spec) and not reruns_on_push(spec)):
        return None
    if label_filter is not None and not label_filter.admits(spec.get("Labels")):
        return None
    return (*registry, ref.repository)


def is_job(spec: dict) -> bool:
    """A Swarm job (ReplicatedJob, GlobalJob): every update of its spec runs it again."""
    return bool({"ReplicatedJob", "GlobalJob"} & set(spec.get("Mode") or {}))


def reruns_on_push(spec: dict) -> bool:
    return str((spec.get("Labels") or {}).get(RERUN_JOB_LABEL, "")).strip().lower() == "true"


# --------------------------------------------------------------------------- versions (pure)

# A repository whose tags never move (ECR tag immutability: Security Hub control ECR.2) is followed by
# version, not by tag: the service's VERSIONS_LABEL says which of the repository's tags it may run, and it
# should run the newest of them. Two forms, in the words of Flux's ImagePolicy (semver; filterTags'
# pattern and extract with numerical or alphabetical order):
#   semver:RANGE                        an npm range: ^1.4, ~1.4.2, >=1.4.0 <2.0.0, 1.x, 1.2 - 1.4 || ^2.
#                                       Tags are MAJOR.MINOR.PATCH[-PRE], a leading v allowed (a tag cannot
#                                       hold +BUILD); a pre-release only when the range names one of the same
#                                       MAJOR.MINOR.PATCH
#   regex:PATTERN numerical[:GROUP]     the tags PATTERN finds (Python's re, searched as Flux searches),
#   regex:PATTERN alphabetical[:GROUP]  newest = highest GROUP (a named group; the whole tag without one)
# npm's range rules are node-semver's (a port of npm's own implementation), imported only when a service
# follows a range, as Apprise is only when a target needs it.
VERSIONS_LABEL = "ecr-deploy.versions"
SEMVER_INSTALL = "/opt/ecr-deploy/venv/bin/pip install node-semver"
MAX_POLICY_TEXT = 400
POLICY_FORMS = "semver:RANGE, or regex:PATTERN numerical[:GROUP] or regex:PATTERN alphabetical[:GROUP]"
ORDER_CLAUSE = re.compile(r"(numerical|alphabetical)(?::([A-Za-z_][A-Za-z0-9_]*))?")
NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")  # what numerical order reads (Flux: a float; here exact)
LOOKS_LIKE_A_RANGE = re.compile(r"[v0-9^~<>=*xX]")


class VersionPolicy(NamedTuple):
    text: str  # as the operator wrote it: log lines and --status show it
    kind: str  # "semver", "numerical" or "alphabetical"
    range: object = None  # node-semver's Range (semver)
    pattern: re.Pattern | None = None  # (numerical, alphabetical)
    group: str | None = None  # the named group that orders; None: the whole tag


class VersionKey(NamedTuple):
    """Orders the tags a policy admits: by rank; equal ranks (1.5.0 and v1.5.0) by the tag's text, so that
    the newest of a listing is always the same tag."""
    rank: object  # a version's precedence (node-semver's), a Decimal, or a text
    tag: str


@functools.cache  # (a failed import is not cached: installing it mends the next policy read)
def semver_library():
    """node-semver, only when a service follows a range: without one, memory and start-up stay as they were."""
    try:
        import nodesemver
    except ImportError:
        raise Misconfigured(f"{VERSIONS_LABEL} semver:RANGE needs node-semver, which is not installed: "
                            f"{SEMVER_INSTALL}") from None
    logging.getLogger("nodesemver").setLevel(logging.WARNING)  # it logs every comparison at debug level
    return nodesemver


def parse_version_policy(text: object) -> VersionPolicy:
    """VERSIONS_LABEL's value -> the policy. ValueError with one line an operator can act on: a service
    whose policy is malformed is never rolled "anyway". Misconfigured if a range needs node-semver and it
    is not installed."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty version policy: write {POLICY_FORMS}")
    text = text.strip()
    if len(text) > MAX_POLICY_TEXT:
        raise ValueError(f"version policy longer than {MAX_POLICY_TEXT} characters")
    kind, colon, rest = text.partition(":")
    if colon and kind == "semver":
        return VersionPolicy(text, "semver", range=semver_range(rest.strip()))
    if colon and kind == "regex":
        pattern_text, _, order_text = rest.strip().rpartition(" ")  # the order comes last: a space before it
        order = ORDER_CLAUSE.fullmatch(order_text)
        if not pattern_text or not order:
            raise ValueError(f"{shown(text)}: write regex:PATTERN numerical[:GROUP] or regex:PATTERN "
                             f"alphabetical[:GROUP] (the order after a space)")
        try:
            pattern = re.compile(pattern_text)
        except re.error as e:
            raise ValueError(f"{shown(text)}: the pattern is not a regular expression: {e}") from None
        if repeats_a_repeat(pattern_text):
            raise ValueError(f"{shown(text)}: the pattern repeats a repeat or an alternation, as (a+)+ and (a|aa)+ "
                             f"do: on a tag it does not match, Python's re tries every way to split it, for hours, "
                             f"and no deploy goes on meanwhile; drop one repeat, or make the inner one possessive "
                             f"(a++) or atomic ((?>a+))")
        if order[2] and order[2] not in pattern.groupindex:
            raise ValueError(f"{shown(text)}: the pattern has no group named {order[2]} (name one with "
                             f"(?P<{order[2]}>...))")
        return VersionPolicy(text, order[1], pattern=pattern, group=order[2])
    hint = f" (a range? write semver:{text})" if LOOKS_LIKE_A_RANGE.match(text) else ""
    raise ValueError(f"{shown(text)} is not a version policy{hint}: write {POLICY_FORMS}")


REPEATS = {re._constants.MAX_REPEAT, re._constants.MIN_REPEAT}  # (a POSSESSIVE_REPEAT never backtracks)


def repeats_a_repeat(pattern_text: str) -> bool:
    """Does the pattern repeat (more than once) something that itself repeats or alternates, backtracking:
    (a+)+, (\\w*-?)*, (x{1,3})+, (a|aa)+? Such nesting is how a pattern takes exponential time on a tag it does
    not match (Python's re has no time bound, and runs with the GIL held: a pass would stop there), while a tag
    is at most 128 characters. Flux's patterns are Go's RE2, linear in time; here the ways to lose that are
    refused. (Single characters, (a|b)+, are a set to re, not alternatives: they pass.)"""
    def walk(items, inside: bool) -> bool:
        for op, arguments in items:
            if op == re._constants.ATOMIC_GROUP:
                continue  # (nothing in an atomic group is tried again)
            if op == re._constants.BRANCH and inside:
                return True  # (alternatives that overlap, (a|ab)+, split a tag as many ways as nested repeats)
            if op in REPEATS:
                low, high, body = arguments
                if inside and high > low or walk(body, inside or high > 1):  # (a{2} has no choice to undo)
                    return True
            elif any(walk(part, inside) for part in nested_patterns(arguments)):
                return True
        return False
    return walk(re._parser.parse(pattern_text), False)


def nested_patterns(arguments) -> list:
    """The sub-patterns inside one parsed item's arguments (a group's, an alternation's, a lookaround's)."""
    if isinstance(arguments, re._parser.SubPattern):
        return [arguments]
    if isinstance(arguments, (tuple, list)):
        return [found for argument in arguments for found in nested_patterns(argument)]
    return []


def semver_range(text: str):
    """An npm range as node-semver reads it (strict, as npm is by default), a little stricter where npm's
    reading surprises: an empty alternative (npm: every version) and commas (Flux's and, not npm's)."""
    nodesemver = semver_library()
    if not text:
        raise ValueError("semver: needs a range, e.g. semver:^1.4 (semver:* follows every release)")
    if "," in text:
        raise ValueError(f"semver:{text}: npm ranges have no commas; write >=1.4.0 <2.0.0 (a space means and)")
    text = " ".join(text.split())  # (node-semver's patterns take minutes over a run of spaces: npm's CVE-2022-25883)
    if any(not alternative.strip() for alternative in text.split("||")):
        raise ValueError(f"semver:{text}: an empty alternative around || (npm would read it as every version)")
    try:
        return nodesemver.make_range(text, False)
    except ValueError as e:
        raise ValueError(f"semver:{text} is not an npm range ({e}); e.g. ^1.4, ~1.4.2, >=1.4.0 <2.0.0, "
                         f"1.x") from None


def admitted(policy: VersionPolicy, tag: object) -> VersionKey | None:
    """The tag's place in the policy's order, or None if the policy does not admit it."""
    if not is_valid("tag", tag):
        return None
    if policy.kind == "semver":
        version = semantic_version(tag)
        return VersionKey(SEMVER_PRECEDENCE(version), tag) if version and policy.range.test(version) else None
    found = policy.pattern.search(tag)
    value = found and (found[policy.group] if policy.group else tag)
    if value is None:  # not found, or its group took no part in the match
        return None
    if policy.kind == "alphabetical":
        return VersionKey(value, tag)
    return VersionKey(decimal.Decimal(value), tag) if NUMBER.fullmatch(value) else None


@functools.lru_cache(maxsize=16384)  # a pass reads each tag of a listing once per service that follows it
def semantic_version(tag: str):
    """The tag as node-semver's version, None if it is not MAJOR.MINOR.PATCH[-PRE] (latest, main-3f9c2e1, 1.4)."""
    try:
        return semver_library().make_semver(tag, False)
    except ValueError:
        return None


# SemVer precedence, as node-semver compares (a pre-release ranks below its release)
SEMVER_PRECEDENCE = functools.cmp_to_key(lambda a, b: a.compare(b))


def newest_admitted(policy: VersionPolicy, tags) -> str | None:
    """The newest tag the policy admits among these (a listing of the repository), or None."""
    keys = [key for key in (admitted(policy, tag) for tag in tags) if key is not None]
    return max(keys).tag if keys else None


def is_newer(policy: VersionPolicy, tag: str, than_tag: str | None) -> bool:
    """Should a service running than_tag move to tag? Only to a tag the policy admits and ranks higher;
    from a tag it does not admit (or none: a digest only) to any it admits, since the policy says which
    tags the service runs. An equal rank (v1.5.0 beside 1.5.0) is not newer: no move between spellings
    of one version."""
    key = admitted(policy, tag)
    if key is None:
        return False
    current = admitted(policy, than_tag) if than_tag else None
    return current is None or key.rank > current.rank


def why_not_newer(policy: VersionPolicy, tag: str, running_tag: str | None) -> str | None:
    """Why a push of `tag` does not move a service that runs running_tag (its INFO line), None if it does."""
    if admitted(policy, tag) is None:
        return f":{tag} is not a version its policy {policy.text} admits"
    if not is_newer(policy, tag, running_tag):
        return f":{tag} is not newer than :{running_tag}, which it runs ({policy.text})"
    return None


def newest_to_run(policy: VersionPolicy, listing: dict[str, str], running_tag: str | None) -> tuple[str, str] | None:
    """(tag, digest) a service that runs running_tag should move to, from a listing of its repository
    ({tag: digest}, Ecr.list_tags), or None: it runs the newest admitted version, or the newest left is
    older than it (a newer tag was deleted: never a move backwards)."""
    newest = newest_admitted(policy, listing)
    return (newest, listing[newest]) if newest and is_newer(policy, newest, running_tag) else None


def newer_tag_deleted(policy: VersionPolicy, listing: dict[str, str], running_tag: str | None) -> bool:
    """Does the service run an admitted version its repository no longer holds, newer than any it does?
    (--status says so: it stays where it is.)"""
    if not running_tag or running_tag in listing or admitted(policy, running_tag) is None:
        return False
    newest = newest_admitted(policy, listing)
    return newest is None or is_newer(policy, running_tag, newest)


# --------------------------------------------------------------------------- a service's version (pure)

def service_version_policy(service: dict) -> VersionPolicy | None:
    """The service's version policy (VERSIONS_LABEL), None if it follows a tag. ValueError: malformed."""
    text = ((service.get("Spec") or {}).get("Labels") or {}).get(VERSIONS_LABEL)
    return None if text is None else cached_policy(text)


@functools.lru_cache(maxsize=1024)  # a pass reads the label of every service that follows versions
def cached_policy(text: object) -> VersionPolicy:
    return parse_version_policy(text)


def follows_versions(service: dict) -> bool:
    """Does the service follow versions (its VERSIONS_LABEL, well-formed or not) rather than a tag?"""
    return VERSIONS_LABEL in (((service.get("Spec") or {}).get("Labels")) or {})


def policy_or_why_not(service: dict) -> tuple[VersionPolicy | None, str | None]:
    """(the service's version policy, None), or (None, the one line saying why its label cannot be read)."""
    try:
        return service_version_policy(service), None
    except (ValueError, Misconfigured) as e:
        label = shown(str(labels_of(service).get(VERSIONS_LABEL)))
        return None, f"cannot follow versions: {VERSIONS_LABEL}={label}: {e}"


def labels_of(service: dict) -> dict:
    return ((service.get("Spec") or {}).get("Labels")) or {}


def why_not_to(policy: VersionPolicy, tag: str, running_tag: str | None) -> str | None:
    """Why a service that runs running_tag does not move to `tag` (a push's, a pass's newest), None if it
    does: to a newer admitted version, or to the very tag it runs when that tag moved (a mutable repository;
    the digests then tell whether there is anything to do)."""
    if tag == running_tag and admitted(policy, tag) is not None:
        return None
    return why_not_newer(policy, tag, running_tag)


def version_target(policy: VersionPolicy, listing: dict[str, str], running: ImageRef,
                   newest: str | None = "") -> tuple[str, str] | None:
    """(tag, digest) a service running `running` should move to after a listing of its repository, None
    when nothing is to do: it runs the newest admitted version (at the digest the tag points to now), none is
    admitted, or the newest left is older than what it runs (a newer tag was deleted: never backwards).
    `newest`: newest_admitted(policy, listing) if the caller has it (a pass: once per policy and repository)."""
    newest = newest_admitted(policy, listing) if newest == "" else newest
    if newest and running.tag in listing and admitted(policy, running.tag) \
            and not is_newer(policy, newest, running.tag):
        newest = running.tag  # (the version it runs, spelt as it runs it: 1.5.0 beside v1.5.0, each its own digest)
    if newest is None or why_not_to(policy, newest, running.tag) is not None:
        return None
    if newest == running.tag and running.digest is None:
        return None  # (no digest: which build it runs is unknown; the next push of the tag pins it)
    if listing[newest] == running.digest:
        return None  # (it runs that build: 1.5.1 pushed from 1.5.0's image rolls nothing, pass after pass)
    return newest, listing[newest]


def newest_versions(services: list[dict], repositories: dict[str, tuple], listings: dict[tuple, dict]) -> dict:
    """service ID -> the newest version its policy admits in its repository's listing (`repositories`: service
    ID -> repository), read once per policy and repository: a thousand services of one repository of a thousand
    tags would otherwise read a million tags."""
    by_policy, newest = {}, {}
    for service in services:
        policy, repository = policy_or_why_not(service)[0], repositories.get(service["ID"])
        if policy is not None and repository in listings:
            if (policy.text, repository) not in by_policy:
                by_policy[(policy.text, repository)] = newest_admitted(policy, listings[repository])
            newest[service["ID"]] = by_policy[(policy.text, repository)]
    return newest


class DeployersTags(NamedTuple):
    """The tags the deployer writes itself: services' promote tags (PROMOTE_LABEL) and the protection tags of
    its --protect-tag-prefix (PREFIX.SERVICE.running, PREFIX.SERVICE.rollback). `tag in` them: never a
    version. A `regex:` policy that admits them (`.*`, an unanchored `[0-9]+`) would move a service onto
    :prod, or onto its own rollback target's tag, and at the next pass back again: those tags move after it."""
    promoted: frozenset
    protect_prefix: str | None

    def __contains__(self, tag: object) -> bool:
        return tag in self.promoted or bool(self.protect_prefix) and is_protection_tag(self.protect_prefix, str(tag))


def deployers_tags(services: list[dict], protect_prefix: str | None) -> DeployersTags:
    return DeployersTags(frozenset(str(labels_of(s)[PROMOTE_LABEL]).strip() for s in services
                                   if PROMOTE_LABEL in labels_of(s)), protect_prefix)


def without_deployers_tags(listings: dict[tuple, dict], services: list[dict], protect_prefix: str | None) \
        -> dict[tuple, dict]:
    """Listings of repositories (Ecr.list_tags) without the tags the deployer writes in each (DeployersTags)."""
    promoting = defaultdict(list)
    for service in services:
        if PROMOTE_LABEL in labels_of(service):
            promoting[repository_of(service)].append(service)
    own = {key: deployers_tags(promoting[key], protect_prefix) for key in listings}
    return {key: {tag: digest for tag, digest in listing.items() if tag not in own[key]}
            for key, listing in listings.items()}


def older_spec_named(service: dict, policy: VersionPolicy, target_tag: str) -> str | None:
    """When someone else's spec (`docker stack deploy`, `docker service update --image`) put an older version
    than the policy admits back on the service: what to say once, as it is moved forward. None when the
    deployer moved it to what it runs (its DIGEST_LABEL names that digest) or it runs no admitted version."""
    ref, labels = running_image(service), labels_of(service)
    if ref is None or not ref.tag or admitted(policy, ref.tag) is None or labels.get(DIGEST_LABEL) == ref.digest:
        return None
    if not is_newer(policy, target_tag, ref.tag):
        return None
    return (f"its spec names :{ref.tag}, an older version than :{target_tag}, the newest its policy {policy.text} "
            f"admits (put back by `docker stack deploy` or `docker service update --image`?)")


# --------------------------------------------------------------------------- specs (pure)

def pinned_image(ref: ImageRef, tag: str, digest: str) -> str:
    """HOST/REPO spelled as the service spells them, the pushed tag, pinned to the digest."""
    return f"{ref.name}:{tag}@{digest}"


def updated_spec(spec: dict, image: str, labels: dict | None = None) -> dict:
    """The service's own spec with only the image, ForceUpdate and the deployer's own labels changed
    (`labels`: provenance; a failure record of another digest is dropped, the tag has moved on)."""
    new = copy.deepcopy(spec)
    task = new.setdefault("TaskTemplate", {})
    task.setdefault("ContainerSpec", {})["Image"] = image
    task["ForceUpdate"] = task.get("ForceUpdate", 0) + 1
    if labels:
        kept = {k: v for k, v in (new.get("Labels") or {}).items() if k != FAILED_LABEL}
        new["Labels"] = {**kept, **labels}
    return new


def rollback_spec(current: dict, replaced: dict, failure: str, force_update: int) -> dict:
    """What undoes our update and nothing else: the service's current spec (so an operator's
    `docker service scale` or `--env-add` made while our rollout ran stays), with what updated_spec
    changed taken back from the spec our update replaced (the image, our provenance labels), the
    failure record (FAILED_LABEL) added, and ForceUpdate moved past ours: a new spec, not ours."""
    new = copy.deepcopy(current)
    task = new.setdefault("TaskTemplate", {})
    task.setdefault("ContainerSpec", {})["Image"] = ((replaced.get("TaskTemplate") or {}).get("ContainerSpec")
                                                     or {}).get("Image")
    before = replaced.get("Labels") or {}
    labels = {k: v for k, v in (new.get("Labels") or {}).items() if k not in PROVENANCE_LABELS}
    new["Labels"] = {**labels, **{k: before[k] for k in PROVENANCE_LABELS if k in before}, FAILED_LABEL: failure}
    task["ForceUpdate"] = force_update + 1
    return new


def with_label(spec: dict, key: str, value: str) -> dict:
    new = copy.deepcopy(spec)
    new["Labels"] = {**(new.get("Labels") or {}), key: value}
    return new


def registry_auth_header(username: str, password: str, server: str) -> str:
    """Docker's X-Registry-Auth: base64url JSON credentials. Never log it."""
    document = {"username": username, "password": password, "serveraddress": server}
    return base64.urlsafe_b64encode(json.dumps(document).encode()).decode()


# --------------------------------------------------------------------------- service labels (pure)

# What the deployer writes on a service, in the service's own labels (Spec.Labels, not its containers'):
# a change of them replaces no task. Every manager reads them, they outlive any deployer process, and an
# operator sees them in `docker service inspect`.
DIGEST_LABEL = "ecr-deploy.digest"  # the digest the deployer last moved the service to
SOURCE_LABEL = "ecr-deploy.source"  # which push (event id and time) or reconcile pass asked for it
DEPLOYED_BY_LABEL = "ecr-deploy.deployed-by"  # which host, and when by its clock
FAILED_LABEL = "ecr-deploy.failed"  # "DIGEST <outcome> at TIME on HOST: why": never rolled here again
PROVENANCE_LABELS = (DIGEST_LABEL, SOURCE_LABEL, DEPLOYED_BY_LABEL)
MAX_LABEL_TEXT = 400


def utc_text(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def provenance_labels(push: Push, digest: str, node: str, now: float) -> dict[str, str]:
    """Who moved the service to this digest, and why: readable with `docker service inspect`."""
    if push.reconcile:
        source = f"reconcile pass (ECR: pushed {push.time or 'at an unknown time'})"
    else:
        kind = f"{push.trigger} event"
        source = f"{kind} {push.event_id or '(no id)'} of {push.time or 'an unknown time'}"
    return {DIGEST_LABEL: digest, SOURCE_LABEL: source, DEPLOYED_BY_LABEL: f"{node} at {utc_text(now)}"}


def failure_record(digest: str, outcome: str, node: str, now: float, message: str) -> str:
    """The FAILED_LABEL value: the digest first (what the rule reads), then words for the operator."""
    text = f"{digest} {OUTCOME_WORDS.get(outcome, outcome)} at {utc_text(now)} on {node}"
    text += f": {message}" if message else ""
    return text if len(text) <= MAX_LABEL_TEXT else text[:MAX_LABEL_TEXT - 3] + "..."


def failed_digest(service: dict) -> str | None:
    """The digest whose rollout failed on this service, as its FAILED_LABEL records it."""
    labels = (service.get("Spec") or {}).get("Labels") or {}
    first = str(labels.get(FAILED_LABEL, "")).split(" ", 1)[0]
    return first if DIGEST.fullmatch(first) else None


# Swarm rolls (or rolled) the service back: FailureAction=rollback, or `docker service rollback`.
SWARM_ROLLBACK = ("rollback_started", "rollback_completed", "rollback_paused")
# A task of a service that ended in one of these failed: Swarm's updater counts any state past RUNNING.
TASK_FAILURES = ("complete", "failed", "rejected", "orphaned")
# Of those, the ones the build itself ended in: "orphaned" is a node lost (swarmkit's dispatcher after 24 h
# unreachable, or `docker node rm`, which stamps it then), whatever that node ran.
BUILD_FAILURES = ("complete", "failed", "rejected")


def tried_and_failed(tasks: list[dict], digest: str) -> bool:
    """Did a task pinned to this digest fail here? (Swarm's task history, which it prunes.)"""
    return any((t.get("Spec", {}).get("ContainerSpec", {}).get("Image") or "").endswith("@" + digest)
               and t.get("Status", {}).get("State") in TASK_FAILURES for t in tasks)


def swarm_rolled_back(service: dict, tasks: list[dict]) -> str | None:
    """The digest Swarm rolled this service back from (its rollback completed), or None: the PreviousSpec
    `docker service rollback` keeps, else (Swarm's automatic rollback clears PreviousSpec) the newest
    failed task of another image than the service's own, in its task history."""
    if (service.get("UpdateStatus") or {}).get("State") != "rollback_completed":
        return None
    current = running_image(service)
    previous = running_image({"Spec": service.get("PreviousSpec") or {}})
    if previous and previous.digest and previous.digest != (current and current.digest):
        return previous.digest
    failed = [t for t in tasks if t.get("Status", {}).get("State") in BUILD_FAILURES
              and (ref := parse_image_ref(t.get("Spec", {}).get("ContainerSpec", {}).get("Image")))
              and ref.digest and ref.digest != (current and current.digest)]
    failed.sort(key=lambda t: t.get("Status", {}).get("Timestamp", ""))
    return parse_image_ref(failed[-1]["Spec"]["ContainerSpec"]["Image"]).digest if failed else None


def same_rollout_state(seen: dict, now: dict) -> bool:
    """Is the service, read again, still in the state a failure was seen in: the same image, the same
    UpdateStatus? (Else another update came since: a record written now would land on that one.)"""
    def image(service: dict) -> str | None:
        return ((service.get("Spec") or {}).get("TaskTemplate") or {}).get("ContainerSpec", {}).get("Image")
    return image(seen) == image(now) and (seen.get("UpdateStatus") or {}) == (now.get("UpdateStatus") or {})


def rolled_back_from(service: dict, digest: str) -> bool:
    """`docker service rollback` keeps the spec it left as PreviousSpec (Swarm's automatic one does not)."""
    previous = (service.get("PreviousSpec") or {}).get("TaskTemplate", {}).get("ContainerSpec", {}).get("Image") or ""
    return (service.get("UpdateStatus") or {}).get("State") in SWARM_ROLLBACK and previous.endswith("@" + digest)


# --------------------------------------------------------------------------- release policy (pure)

# When a service may take a new digest, on the operator's terms. A service that must wait is simply
# not rolled now; a later reconcile pass rolls it to whatever its tag points to then, so nothing waits
# in memory only, and a restart or a failover loses nothing.
WINDOW_LABEL = "ecr-deploy.window"  # "Mon-Fri 09:00-16:00 Europe/Berlin[; …]": when a rollout may start
MIN_AGE_LABEL = "ecr-deploy.min-age"  # roll only digests pushed at least this long ago (ECR's clock)
AFTER_LABEL = "ecr-deploy.after"  # "web,api": roll a digest only once these services run it, soaked
SOAK_LABEL = "ecr-deploy.soak"  # how long they (or, for promote, this service) must have run it
PROMOTE_LABEL = "ecr-deploy.promote"  # tag the digest as TAG once this service's rollout completed and soaked
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
WINDOW_CLAUSE = re.compile(r"(\S+)\s+(\S+)\s+(\S+)")
TIME_RANGE = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-4]):([0-5][0-9])")


class WindowClause(NamedTuple):
    days: frozenset[int]  # 0 = Monday
    ranges: tuple[tuple[int, int], ...]  # minutes after local midnight: [start, end); end <= start: past midnight
    zone: object  # a zoneinfo.ZoneInfo (zoneinfo is imported by deploy windows only)


def parse_days(text: str) -> frozenset[int]:
    if text.lower() in ("*", "daily"):
        return frozenset(range(7))
    days = set()
    for part in text.lower().split(","):
        first, _, last = part.partition("-")
        if first[:3] not in DAYS or (last and last[:3] not in DAYS) or len(first) < 3:
            raise ValueError(f"unknown day {part!r} (use Mon..Sun, ranges like Mon-Fri, lists like Mon,Wed)")
        start, end = DAYS.index(first[:3]), DAYS.index((last or first)[:3])
        days.update((start + i) % 7 for i in range((end - start) % 7 + 1))  # Fri-Mon wraps
    return frozenset(days)


def parse_window(text: str) -> tuple[WindowClause, ...]:
    """'Mon-Fri 09:00-12:00,13:00-16:00 Europe/Berlin; Sat 10:00-11:00 UTC' -> clauses. ValueError
    with a reason an operator can act on: a service with a bad window is never rolled "anyway"."""
    clauses = []
    for clause in filter(None, (c.strip() for c in str(text).split(";"))):
        match = WINDOW_CLAUSE.fullmatch(clause)
        if not match:
            raise ValueError(f"{clause!r} is not DAYS HH:MM-HH:MM ZONE (e.g. Mon-Fri 09:00-16:00 Europe/Berlin)")
        days, times, zone_name = match.groups()
        ranges = []
        for part in times.split(","):
            hours = TIME_RANGE.fullmatch(part)
            if not hours or hours[3] == "24" and hours[4] != "00":
                raise ValueError(f"{part!r} is not a time range HH:MM-HH:MM")
            ranges.append((int(hours[1]) * 60 + int(hours[2]), int(hours[3]) * 60 + int(hours[4])))
        import zoneinfo  # (here: only deploy windows need it, and it pulls in sysconfig)
        try:
            zone = zoneinfo.ZoneInfo(zone_name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {zone_name!r} (use an IANA name such as Europe/Berlin, or UTC)") \
                from None
        clauses.append(WindowClause(parse_days(days), tuple(ranges), zone))
    if not clauses:
        raise ValueError("empty window")
    return tuple(clauses)


def window_openings(clauses, now: datetime):
    """(start, end) of every opening from the day before `now` for 8 days, as aware datetimes."""
    for clause in clauses:
        today = now.astimezone(clause.zone).date()
        for offset in range(-1, 8):
            day = today + timedelta(days=offset)
            if day.weekday() not in clause.days:
                continue
            midnight = datetime(day.year, day.month, day.day, tzinfo=clause.zone)
            for start, end in clause.ranges:
                opens = (midnight + timedelta(minutes=start)).astimezone(timezone.utc)  # wall time, DST-aware
                closes = (midnight + timedelta(minutes=end + (1440 if end <= start else 0))).astimezone(timezone.utc)
                yield opens, closes


def window_state(clauses, now: datetime) -> tuple[bool, datetime | None]:
    """Is a window open now; if not, when the next one opens (None: never within a week)."""
    openings = list(window_openings(clauses, now))
    if any(opens <= now < closes for opens, closes in openings):
        return True, None
    return False, min((opens for opens, _ in openings if opens > now), default=None)


class Release(NamedTuple):
    """The release policy's answer for one service and digest."""
    decision: str  # deploy, wait (a later pass rolls it) or held (never this digest: the operator must act)
    reason: str = ""
    until: float | None = None  # epoch seconds (the deployer's clock) when waiting may end; None: unknown


class Leader(NamedTuple):
    """What the release policy needs to know of a service named in AFTER_LABEL."""
    name: str
    runs: bool  # its spec runs the digest
    pending: str | None  # why its rollout of the digest has not completed, as Swarm's tasks tell (None: completed)
    since: datetime | None  # when its soak began (see rollout_of)
    failed: str | None  # why the digest failed there (a failure record, Swarm's rollback), if it did
    settles_in: float | None = None  # pending only until its newest task has run Swarm's monitor period: in s
    exists: bool = True  # False: no service has that name (a typo in AFTER_LABEL, or not created yet)


def soaked_for(leader: Leader, swarm_now: datetime | None) -> float | None:
    """Seconds the leader has run the digest without a task failure (Swarm's clock); None: unknown."""
    if leader.since is None or swarm_now is None:
        return None
    return (swarm_now - leader.since).total_seconds()


def duration_text(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    return " ".join(f"{value}{unit}" for value, unit in
                    ((days, "d"), (rest // 3600, "h"), (rest % 3600 // 60, "m"), (rest % 60, "s")) if value) or "0s"


def release_policy(labels: dict, defaults: dict, now: float, age: float | None, leaders: list[Leader],
                   swarm_now: datetime | None) -> Release:
    """Whether a service may start rolling to a digest now. `age`: seconds since ECR's push of the digest,
    by ECR's clock (None: unknown); `leaders`: the services AFTER_LABEL names; `now`: the deployer's clock,
    which windows are read by. ValueError for a label (or default) that cannot be read."""
    setting = {key: labels.get(key, defaults.get(key)) for key in (WINDOW_LABEL, MIN_AGE_LABEL, AFTER_LABEL, SOAK_LABEL)}
    window, min_age = setting[WINDOW_LABEL], setting[MIN_AGE_LABEL]
    if window and str(window).strip().lower() != "always":
        is_open, opens = window_state(parse_window(window), datetime.fromtimestamp(now, timezone.utc))
        if not is_open:
            when = f"opens {utc_text(opens.timestamp())} (in {duration_text(opens.timestamp() - now)})" if opens \
                else "opens never within a week"
            return Release("wait", f"outside its deploy window {window!r}: {when}",
                           opens.timestamp() if opens else None)
    if min_age:
        needed = parse_duration(min_age)
        if age is None:
            return Release("wait", f"{MIN_AGE_LABEL} {min_age} needs ECR's push time, unknown here "
                                   "(--trust-events does not ask ECR)")
        if age < needed:
            return Release("wait", f"pushed {duration_text(age)} ago, {MIN_AGE_LABEL} {min_age}: rolls in "
                                   f"{duration_text(needed - age)}", now + needed - age)
    soak = parse_duration(setting[SOAK_LABEL] or "0")
    for leader in leaders:
        if leader.failed:
            return Release("held", f"{leader.name}'s rollout of this digest failed ({leader.failed}): it never rolls here")
        if not leader.exists:
            return Release("wait", f"waits for {leader.name}, which is no service of this swarm (a typo in "
                                   f"{AFTER_LABEL}, or not created yet)")
        if not leader.runs:
            return Release("wait", f"waits for {leader.name} to run this digest")
        if leader.pending and leader.pending.endswith(PAUSED_ROLLOUT):  # no end anyone can tell
            return Release("wait", f"waits for {leader.name}'s rollout, which is "
                                   f"{leader.pending.removeprefix('its rollout is ')}")
        if leader.pending:
            return Release("wait", f"waits for {leader.name}'s rollout to complete ({leader.pending})",
                           now + leader.settles_in if leader.settles_in else None)
        ran = soaked_for(leader, swarm_now)
        if soak and (ran is None or ran < soak):
            left = soak - (ran or 0)
            return Release("wait", f"{leader.name} soaks for {setting[SOAK_LABEL]}: rolls in {duration_text(left)}",
                           now + left)
    return Release("deploy")


def promotion(labels: dict, runs: bool, pending: str | None, since: datetime | None, failed: str | None,
              target: str | None, digest: str, swarm_now: datetime | None, now: float,
              settles_in: float | None = None) -> Release:
    """Whether to tag the digest this service runs as its PROMOTE_LABEL tag now (deploy), later (wait,
    until when) or never (held: its rollout failed, or it does not run the tag's digest: superseded,
    blocked, still rolling). `pending`, `since`: rollout_of's answer. `target`: the digest the promote
    tag points to now (None: no such tag)."""
    tag = str(labels.get(PROMOTE_LABEL, "")).strip()
    if not TAG.fullmatch(tag):
        return Release("held", f"label {PROMOTE_LABEL}={tag!r} is not a tag")
    if target == digest:
        return Release("held", f"promoted: :{tag} is at this digest")
    if failed:
        return Release("held", "its rollout of this digest failed: never promoted")
    if not runs:
        return Release("held", f"not promoted to :{tag}: it does not run the tag's digest")
    if pending:
        return Release("wait" if settles_in else "held", f"not promoted to :{tag}: its rollout of the tag's digest "
                       f"has not completed ({pending})", now + settles_in if settles_in else None)
    soak = parse_duration(labels.get(SOAK_LABEL) or "0")
    ran = soaked_for(Leader("", True, None, since, None), swarm_now)
    if soak and (ran is None or ran < soak):
        left = soak - (ran or 0)
        return Release("wait", f"promotes to :{tag} after soaking {labels[SOAK_LABEL]}: in {duration_text(left)}",
                       now + left)
    return Release("deploy", f"tag :{tag}")


def wildcard_matches(pattern: str, tag: str) -> bool:
    """An ECR tag-mutability exclusion filter (filterType WILDCARD): `*` matches any run of characters."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), tag) is not None


def tag_may_move(repository: dict, tag: str) -> bool:
    """Will ECR move an existing `tag` (PutImage) in this repository (as DescribeRepositories describes it)?
    IMMUTABLE: never; IMMUTABLE_WITH_EXCLUSION: only a tag one of its WILDCARD filters matches;
    MUTABLE_WITH_EXCLUSION: all but those; MUTABLE (or unsaid): always."""
    mutability = repository.get("imageTagMutability") or "MUTABLE"
    excluded = any(f.get("filterType") == "WILDCARD" and wildcard_matches(str(f.get("filter", "")), tag)
                   for f in repository.get("imageTagMutabilityExclusionFilters") or [])
    return {"IMMUTABLE": False, "IMMUTABLE_WITH_EXCLUSION": excluded, "MUTABLE_WITH_EXCLUSION": not excluded}.get(
        mutability, True)


def exclusion_filters_text(filters: list[dict]) -> str:
    """Exclusion filters in the AWS CLI's shorthand (a list: space-separated)."""
    return " ".join(f"filterType={f.get('filterType')},filter={f.get('filter')}" for f in filters)


def immutable_tag_fix(account: str, region: str, repository: str, tag: str, described: dict | None = None,
                      what: str = "the promote tag") -> str:
    """What lets the promote tag move, every other tag staying as the repository has it (`described`: its
    DescribeRepositories entry, None if unknown): under MUTABLE_WITH_EXCLUSION, the filters that match the
    tag dropped; else IMMUTABLE_WITH_EXCLUSION with the tag excluded besides the filters it has (a command
    that named the tag alone would make the tags those exclude, the one CI moves maybe, immutable)."""
    described = described or {}
    mutability = described.get("imageTagMutability")
    filters = [f for f in described.get("imageTagMutabilityExclusionFilters") or [] if isinstance(f, dict)]
    command = f"aws ecr put-image-tag-mutability --region {region} --registry-id {account} --repository-name {repository}"
    if mutability == "MUTABLE_WITH_EXCLUSION":
        kept = [f for f in filters if not wildcard_matches(str(f.get("filter", "")), tag)]
        setting = f"MUTABLE_WITH_EXCLUSION --image-tag-mutability-exclusion-filters {exclusion_filters_text(kept)}" \
            if kept else "MUTABLE"
        return (f"ECR refuses to move :{tag} in {repository}, whose exclusion filters make it immutable "
                f"(ImageTagAlreadyExistsException); drop the filters that match it and keep every other tag as it "
                f"is: `{command} --image-tag-mutability {setting}`")
    kept = filters if mutability == "IMMUTABLE_WITH_EXCLUSION" else []
    return (f"ECR refuses to move :{tag} in {repository}, whose tags are immutable (ImageTagAlreadyExistsException); "
            f"exclude {what} and keep every other tag immutable: `{command} --image-tag-mutability "
            f"IMMUTABLE_WITH_EXCLUSION --image-tag-mutability-exclusion-filters "
            f"{exclusion_filters_text([*kept, {'filterType': 'WILDCARD', 'filter': tag}])}`"
            + ("" if described else " (add any filters the repository has already; at most 5)"))


def promote_key(service: dict, followed: tuple | None) -> tuple | None:
    """(account, region, repository, TAG) of the tag a service promotes to, in its own repository."""
    tag = ((service.get("Spec") or {}).get("Labels") or {}).get(PROMOTE_LABEL)
    return followed[:3] + (str(tag).strip(),) if followed and tag is not None else None


SWARM_CLOCK_SLACK = 1.0  # s


def updated_before(service: dict, swarm_now: datetime | None, seconds: float) -> bool:
    """Was the service last updated more than `seconds` before swarm_now (Swarm's clock: the Date of
    the answer that read it)? False when either is unknown. SWARM_CLOCK_SLACK covers the managers'
    clocks (UpdatedAt is the leader's) and Date's whole seconds (which only make the age look shorter)."""
    updated = parse_swarm_time(service.get("UpdatedAt"))
    return updated is not None and swarm_now is not None and \
        (swarm_now - updated).total_seconds() > seconds + SWARM_CLOCK_SLACK


def parse_swarm_time(text: object) -> datetime | None:
    """Swarm's RFC 3339 times carry nanoseconds; Python reads microseconds."""
    if not isinstance(text, str) or not text:
        return None
    match = re.fullmatch(r"(.*?\.\d{1,6})\d*(Z|[+-].*)", text)
    try:
        return in_utc(datetime.fromisoformat(f"{match[1]}{match[2]}" if match else text))
    except ValueError:
        return None


def after_names(labels: dict, defaults: dict) -> list[str]:
    text = labels.get(AFTER_LABEL, defaults.get(AFTER_LABEL)) or ""
    return [name.strip() for name in text.split(",") if name.strip()]


# --------------------------------------------------------------------------- Swarm's tasks (pure)

# What a service ran, as Swarm's task history tells: whether its rollout of a digest completed, and since
# when it has soaked. UpdateStatus alone cannot tell: any update but a rollback resets it.

PAUSED_ROLLOUT = ": until someone resumes it or rolls it back"  # ends what rollout_of says of a paused one


class Ran(NamedTuple):
    """What Swarm's tasks say of a service and the digest its spec runs (rollout_of)."""
    pending: str | None  # why its rollout of the digest has not completed; None: completed
    since: datetime | None  # when its soak began: None until its tasks of the digest ran
    settles_in: float | None = None  # pending only until its newest task has run Swarm's monitor period: in s


def task_runs(task: dict, digest: str) -> bool:
    return ((task.get("Spec") or {}).get("ContainerSpec", {}).get("Image") or "").endswith("@" + digest)


def task_state(task: dict) -> str | None:
    return (task.get("Status") or {}).get("State")


def task_time(task: dict) -> datetime | None:
    """When the task reached its current state (the node's agent stamps every change of state)."""
    return parse_swarm_time((task.get("Status") or {}).get("Timestamp"))


def monitor_seconds(spec: dict) -> float:
    """How long Swarm's updater watches a new task before it counts as started well (UpdateConfig.Monitor)."""
    monitor = (spec.get("UpdateConfig") or {}).get("Monitor") or SWARM_DEFAULT_UPDATE_CONFIG["Monitor"]
    return monitor / 1e9


def rollout_of(service: dict, tasks: list[dict], digest: str, swarm_now: datetime | None) -> Ran:
    """Has the service's rollout of the digest its spec runs completed, and since when has it soaked?
    Decided from Swarm's tasks, not from UpdateStatus alone: every update that is not a rollback resets
    UpdateStatus (a scale, a label, the auth keeper's re-post; swarmkit controlapi UpdateService) and an
    update that replaces no task never starts another, while a service created at the digest has none.
    Completed: no rollout of Swarm's is under way or paused, and every task Swarm wants running (desired
    state up to running; tasks of a down node are shut down) runs the digest, is running, and has run for
    Swarm's monitor period; a replicated service has all its replicas so (none, when scaled to 0: nothing
    ran); a job, when its tasks of the digest completed. The soak runs from the first start of a task of
    the digest after the last task of another image ended (a service created at the digest: its first
    start), and starts again at each failed task of the digest; a scale, a label or a re-post changes none
    of these. `tasks`: the service's tasks, history included (Swarm keeps a few per slot)."""
    state = (service.get("UpdateStatus") or {}).get("State")
    if state in ("paused", "rollback_paused"):  # Swarm waits for a person
        return Ran(f"its rollout is {state.replace('_', ' ')}{PAUSED_ROLLOUT}", None)
    if state in ("updating", "rollback_started"):
        return Ran(f"its rollout is {state.replace('_', ' ')}", None)
    spec = service.get("Spec") or {}
    ours = [t for t in tasks if task_runs(t, digest)]
    job = is_job(spec)
    failures = [task_time(t) for t in ours if task_state(t) in (("failed", "rejected") if job else BUILD_FAILURES)]
    if job:  # it runs to completion: done when its tasks of this run of the job completed
        iteration = ((service.get("JobStatus") or {}).get("JobIteration") or {}).get("Index")
        current = [t for t in ours if iteration is None or (t.get("JobIteration") or {}).get("Index") == iteration]
        done = [task_time(t) for t in current if task_state(t) == "complete"]
        # (desired "ready": a failed task's replacement waiting out its restart delay, swarmkit's restart supervisor)
        if not done or any(TASK_STATES.index(task_state(t) or "new") <= TASK_STATES.index("running")
                           for t in current if t.get("DesiredState") in ("ready", "running", "complete")):
            return Ran("its job has not completed on this digest", None)
        return Ran(None, max(filter(None, done + failures), default=None))
    wanted = [t for t in tasks if t.get("DesiredState") in TASK_STATES[:TASK_STATES.index("running") + 1]]
    if not wanted:
        return Ran("it runs no task (scaled to 0?): nothing has run this digest", None)
    other = [t for t in wanted if not task_runs(t, digest)]
    if other:
        return Ran(f"{len(other)} of its {len(wanted)} task(s) run another image", None)
    idle = [t for t in wanted if task_state(t) != "running"]
    if idle:
        states = ", ".join(sorted({task_state(t) or "?" for t in idle}))
        return Ran(f"{len(idle)} of its {len(wanted)} task(s) of this digest not running ({states})", None)
    replicas = ((spec.get("Mode") or {}).get("Replicated") or {}).get("Replicas")
    if replicas is not None and len(wanted) < replicas:
        return Ran(f"{len(wanted)} of its {replicas} replicas run", None)
    starts = [task_time(t) for t in wanted]
    if None in starts:
        return Ran("Swarm gave no start time for its tasks", None)
    others_ended = max(filter(None, (task_time(t) for t in tasks if not task_runs(t, digest)
                                     and task_state(t) != "orphaned")), default=None)  # (a node lost: BUILD_FAILURES)
    first = min((s for s in starts if others_ended is None or s >= others_ended), default=others_ended)
    since = max(filter(None, [first, *failures]))
    # Swarm's updater watched every task it started for the monitor period before it said "completed" (a task
    # started since, say after a crash, it did not); else by Swarm's clock (Docker's Date: up to 1 s behind).
    status = service.get("UpdateStatus") or {}
    completed_at = parse_swarm_time(status.get("CompletedAt")) if state == "completed" else None
    settling = monitor_seconds(spec) - ((swarm_now - max(starts)).total_seconds() if swarm_now else 0)
    if not (completed_at and max(starts) <= completed_at) and (swarm_now is None or settling > 0):
        return Ran(f"its newest task of this digest has run for less than Swarm's monitor period "
                   f"({duration_text(monitor_seconds(spec))})", since, settling + 1 if swarm_now else None)
    return Ran(None, since)


# --------------------------------------------------------------------------- a job before the rollout (pure)

# A service labelled BEFORE_LABEL=JOB rolls to a new digest only once the Swarm job JOB (a replicated-job:
# the database migration, say) has run on it and completed. What a run is for lives on the job itself (its
# image pinned to the digest, BEFORE_RUN_LABEL) and in its tasks, never in a deployer's memory: a deployer
# restarted, or another manager, follows a run under way and never starts one that ran.
BEFORE_LABEL = "ecr-deploy.before"  # on a service: the Swarm job run on each new digest before it rolls
BEFORE_IMAGE_LABEL = "ecr-deploy.before-image"  # "service" (on the job or the service): run the service's image
BEFORE_TIMEOUT_LABEL = "ecr-deploy.before-timeout"  # how long the job may run before the rollout is blocked
BEFORE_RUN_LABEL = "ecr-deploy.before-run"  # on the job: the digest of the run the deployer started last
BEFORE_FOR_LABEL = "ecr-deploy.before-for"  # on the job: which service's rollout started that run
DEFAULT_BEFORE_TIMEOUT = 600.0  # s: a migration that runs longer than 10 min wants its own label
SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # Swarm's (and compose's) service names
JOB_GATE = "pre-rollout job"


def before_job(service: dict) -> str | None:
    """The name of the job a service runs before it rolls (BEFORE_LABEL), or None. ValueError: not a name."""
    value = str(((service.get("Spec") or {}).get("Labels") or {}).get(BEFORE_LABEL, "")).strip()
    if value and not SERVICE_NAME.fullmatch(value):
        raise ValueError(f"{BEFORE_LABEL}={value!r} is not a Swarm service name")
    return value or None


def before_timeout(service: dict) -> float:
    """How long the job may run (BEFORE_TIMEOUT_LABEL, else 10 min). ValueError: not a duration."""
    value = ((service.get("Spec") or {}).get("Labels") or {}).get(BEFORE_TIMEOUT_LABEL)
    return parse_duration(value) if value else DEFAULT_BEFORE_TIMEOUT


def job_image(job: dict, service: dict, service_image: str, tag: str, digest: str) -> str:
    """The image the job runs for the service's new digest: the service's new image where the operator
    says so (BEFORE_IMAGE_LABEL=service, on either), its own moved to the digest where it is the service's
    repository and tag (or no tag), else its own image as it is (a job of another repository, or of another
    tag of it, say a migration image pushed as :migrate-latest beside :latest, is only run again)."""
    said = [((s.get("Spec") or {}).get("Labels") or {}).get(BEFORE_IMAGE_LABEL, "") for s in (job, service)]
    if any(str(value).strip().lower() == "service" for value in said):
        return service_image
    own, new = running_image(job), parse_image_ref(service_image)
    if own and new and (own.host, own.repository) == (new.host, new.repository) and following(job) in (None, tag):
        return pinned_image(own, tag, digest)
    return job["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]


def job_run_spec(job: dict, image: str, digest: str, service_name: str) -> dict:
    """The job's own spec, run again (ForceUpdate moves on: a new iteration even where the image is the
    same) on `image`, labelled with the digest and the service the run is for."""
    spec = updated_spec(job["Spec"], image)
    spec["Labels"] = {**(spec.get("Labels") or {}), BEFORE_RUN_LABEL: digest, BEFORE_FOR_LABEL: service_name}
    return spec


class JobRun(NamedTuple):
    """What a service's pre-rollout job says of a digest (job_run): "start" (it has not run for it), "busy"
    (a run for another digest is under way: it is never cut short), "running", "completed", "failed" (a task
    failed and its restart policy starts no other), "timed out", "missing" (no such service), "not a job"."""
    state: str
    reason: str
    tasks: tuple = ()  # this run's tasks (a failed run's, for its errors and log)


def job_tasks(job: dict, tasks: list[dict]) -> list[dict]:
    """The tasks of the job's current run (JobIteration): Swarm keeps those of earlier runs too. (The Engine
    API leaves an Index of 0, the run at the job's creation, out.)"""
    iteration = ((job.get("JobStatus") or {}).get("JobIteration") or {}).get("Index") or 0
    return [t for t in tasks if ((t.get("JobIteration") or {}).get("Index") or 0) == iteration]


def live(task: dict) -> bool:
    """Still wanted (desired "ready": a failed task's replacement waiting out its restart delay; desired
    shutdown: stopped, or a failed task the restart supervisor has handled) and still to run, running, or
    failed but not yet handled by the orchestrator (its replacement, if its policy allows one, comes)."""
    wanted = TASK_STATES.index(task.get("DesiredState") or "new") <= TASK_STATES.index("complete")
    return wanted and task_state(task) != "complete"


def job_run(job: dict | None, tasks: list[dict], digest: str, swarm_now: datetime | None, timeout: float) -> JobRun:
    """Has the job run for the digest, and how did it end? From the job's labels and its current run's tasks
    (swarmkit's replicated job: TotalCompletions tasks must complete, MaxConcurrent at a time; a failed task
    is replaced per its RestartPolicy, in the same transaction that shuts it down, so a failed task with no
    live one beside it is final). The bound runs from the run's start by Swarm's clock (JobStatus.LastExecution)."""
    if job is None:
        return JobRun("missing", "no such service")
    spec = job.get("Spec") or {}
    name = spec.get("Name", "?")
    if not is_job(spec):
        return JobRun("not a job", f"{name} is not a Swarm job (deploy: mode: replicated-job)")
    current = job_tasks(job, tasks)
    running = [t for t in current if live(t)]
    started = parse_swarm_time((job.get("JobStatus") or {}).get("LastExecution")) or parse_swarm_time(job.get("UpdatedAt"))
    within = bool(started and swarm_now and (swarm_now - started).total_seconds() <= timeout)
    other = (spec.get("Labels") or {}).get(BEFORE_RUN_LABEL)
    if other != digest:
        # (a run just posted has no task until Swarm's orchestrator makes them: it is under way all the same)
        if running or (other and not current and within):
            return JobRun("busy", f"{name} still runs for another digest "
                                  f"({f'{len(running)} task(s)' if running else 'just started'})")
        return JobRun("start", f"{name} has not run for this digest")
    done = [t for t in current if task_state(t) == "complete"]
    failed = sorted((t for t in current if task_state(t) in ("failed", "rejected") and not live(t)),
                    key=lambda t: (t.get("Status") or {}).get("Timestamp", ""))
    mode = spec["Mode"].get("ReplicatedJob")
    if mode is not None:  # failed tasks its restart policy replaced do not count once the run completed
        wanted = mode.get("TotalCompletions") or mode.get("MaxConcurrent") or 1
        if len(done) >= wanted:
            return JobRun("completed", f"{name} completed ({len(done)} task(s))", tuple(current))
    else:  # a global job: one task per node; a node whose tasks only failed fails it
        wanted = len({t.get("NodeID") for t in done + failed + running})
        failed = [t for t in failed if t.get("NodeID") not in {d.get("NodeID") for d in done}]
        if done and not running and not failed:
            return JobRun("completed", f"{name} completed ({len(done)} task(s))", tuple(current))
    if failed and not running:
        error = ((failed[-1].get("Status") or {}).get("Err") or task_state(failed[-1])).strip()
        return JobRun("failed", f"{name} failed: {error}", tuple(current))
    if started and swarm_now and not within:
        return JobRun("timed out", f"{name} did not complete within {duration_text(timeout)} "
                                   f"({len(done)} of {wanted} task(s) completed)", tuple(current))
    return JobRun("running", f"{name} runs ({len(done)} of {wanted} task(s) completed)")


# --------------------------------------------------------------------------- status (pure)

# --status: each state, and what it tells cron or monitoring (the exit code is the worst row's).
STATUS_EXIT = {"current": 0, "pinned": 0, "job": 0, "rolling out": 0, "not pinned": 0,
               "behind": 4, "waiting": 4, "rolling back": 4,
               "held back": 5, "blocked": 5, "failed": 5, "tag gone": 5, "unknown": 1}


def short_digest(digest: str | None) -> str:
    return digest.removeprefix("sha256:")[:12] if digest else "-"


def last_rollout(service: dict) -> tuple[str, str]:
    """Swarm's word on the service's last update (state, and when it ended or started), if any."""
    status = service.get("UpdateStatus") or {}
    return status.get("State") or "-", (status.get("CompletedAt") or status.get("StartedAt") or "")[:19]


def current_state(service: dict, digest: str) -> tuple[str, str]:
    """The state of a service that runs the digest its tag points to."""
    status = service.get("UpdateStatus") or {}
    if status.get("State") in ("paused", "rollback_paused"):
        return "failed", f"its rollout {status['State'].replace('_', ' ')}: {status.get('Message', '')}".strip()
    if status.get("State") in ("updating", "rollback_started"):
        return "rolling out", status.get("Message", "")
    return "current", ""


def status_row(service: dict, followed: tuple | None, answer: TagAnswer | None, state: tuple[str, str],
               repository_error: str | None = None) -> dict:
    """One --status row; `state` was decided by the caller (it may need ECR's scan or Swarm's tasks)."""
    ref = running_image(service)
    outcome, at = last_rollout(service)
    labels = service["Spec"].get("Labels") or {}
    return {"service": service["Spec"].get("Name", "?"), "id": service["ID"],
            "repository": ref.repository if ref else "?", "tag": followed[3] if followed else following(service),
            "running": ref.digest if ref else None, "tag_now": answer.digest if answer else None,
            "pushed_at": answer.pushed_text if answer else None, "state": state[0], "reason": repository_error or state[1],
            "last_rollout": outcome, "last_rollout_at": at,
            "deployed_by": labels.get(DEPLOYED_BY_LABEL), "source": labels.get(SOURCE_LABEL)}


def status_table(rows: list[dict]) -> str:
    """As `docker service ls` lays it out: what an operator reads first when something looks wrong."""
    header = ("SERVICE", "TAG", "RUNNING", "TAG NOW", "STATE", "IMAGES", "LAST ROLLOUT", "DETAIL")
    lines = [header] + [(r["service"], f"{r['repository']}:{r['tag'] or '-'}", short_digest(r["running"]),
                         short_digest(r["tag_now"]), r["state"], images_text(r.get("images") or {}),
                         f"{r['last_rollout']} {r['last_rollout_at']}".strip(), r["reason"]) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "".join(("   ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "   " + line[-1]).rstrip()
                   + "\n" for line in lines)


# --------------------------------------------------------------------------- images kept (pure)

# ECR lifecycle rules delete images by count or age, and archive them by last pull time. A service that
# never restarts never pulls: the digest it runs and the one `docker service rollback` restores look unused,
# and the next reschedule (a node lost, a scale-up, a rollback) fails to pull. Each pass checks both.
IMAGE_STATES = {"ACTIVE": "ok", "ARCHIVED": "archived", "ACTIVATING": "restoring"}  # ECR's imageStatus; absent: gone
IMAGE_STATUS_EXIT = {"ok": 0, "restoring": 4, "archived": 5, "gone": 5}  # as STATUS_EXIT: 4 settles, 5 needs someone
IMAGE_ROLES = ("running", "rollback")


def kept_images(service: dict) -> dict[str, tuple[str, str, str, str]]:
    """role -> (account, region, repository, digest) of the ECR images the service must be able to pull
    again: the digest it runs, and its rollback target (PreviousSpec's digest, what `docker service
    rollback` restores). An image named by tag alone cannot be checked: no digest, no entry."""
    kept = {}
    for role, spec in zip(IMAGE_ROLES, (service.get("Spec"), service.get("PreviousSpec"))):
        ref = running_image({"Spec": spec or {}})
        registry = ref and ecr_registry(ref.host)
        if registry and ref.digest:
            kept[role] = (*registry, ref.repository, ref.digest)
    return kept


def image_state(status: str | None) -> str:
    """What --status says of an image, from ECR's imageStatus (None: ECR has no such image)."""
    return "gone" if status is None else IMAGE_STATES.get(status, "ok")


def images_text(states: dict[str, str]) -> str:
    """The --status column: RUNNING/ROLLBACK, `-` where there is nothing to check."""
    return "/".join(states.get(role, "-") for role in IMAGE_ROLES)


def images_row(service: dict, states: dict[str, str], errors: dict) -> tuple[dict[str, str], list[str]]:
    """--status: role -> state (unknown where ECR could not tell), and a line per image at risk."""
    kept = kept_images(service)
    states = {role: states.get(role) or ("unknown" if key[:3] in errors else "ok") for role, key in kept.items()}
    name = service["Spec"].get("Name", "?")
    problems = [image_problem(name, role, kept[role], state, False).partition(": ")[2]
                for role, state in states.items() if state in ("archived", "gone", "restoring")]
    problems += [f"ECR could not tell whether it still has these images ({errors[key]})"
                 for key in {kept[role][:3] for role, state in states.items() if state == "unknown"}]
    return states, problems


def image_problem(service_name: str, role: str, key: tuple, state: str, restoring: bool) -> str:
    """One line: which image, what ECR says of it, what that means at the service's next reschedule."""
    account, region, repository, digest = key
    what = "the digest it runs" if role == "running" else "its rollback target"
    where = f"{repository}@{short_digest(digest)} in ECR ({account}, {region})"
    if state == "gone":
        return (f"Service {service_name}: {what}, {where}, is gone: a task rescheduled (node lost, scale-up, "
                f"rollback) cannot pull it (manifest unknown); push it again, or pin a digest ECR still has")
    if state == "archived":
        fix = "restoring it to the standard storage class" if restoring else \
            "restore it (`aws ecr update-image-storage-class --target-storage-class STANDARD`, or --restore-archived)"
        return (f"Service {service_name}: {what}, {where}, is archived: a task rescheduled (node lost, scale-up, "
                f"rollback) cannot pull it until it is restored; {fix}")
    return f"Service {service_name}: {what}, {where}, is being restored to the standard storage class"


def archived_release(push: Push, digest: str, status: str | None) -> Release | None:
    """Why a service must not roll to the digest its tag points to, as ECR's imageStatus of it says, or None.
    ECR refuses to pull an archived image (404, "Archived images cannot be pulled": the Amazon ECR User Guide,
    Archiving an image), and one being restored until it is done: every task of a rollout would fail to pull."""
    where = f"{push.repository}:{push.tag} points at {short_digest(digest)}"
    if status == "ARCHIVED":
        return Release("held", f"{where}, an archived image in ECR, which no node can pull: restore it "
                               f"(--restore-archived, or `aws ecr update-image-storage-class --region {push.region} "
                               f"--registry-id {push.account} --repository-name {push.repository} --image-id "
                               f"imageDigest={digest} --target-storage-class STANDARD`) or push it again")
    if status == "ACTIVATING":
        return Release("wait", f"{where}, an image ECR is restoring from the archive: rolls once it is restored")
    return None


# Protection tags (opt-in, --protect-tag-prefix): one tag per service on the digest it runs,
# PREFIX.SERVICE.running, and one on its rollback target, PREFIX.SERVICE.rollback, that a lifecycle rule of the
# highest priority retains. '.' separates: a Swarm service name has none (a DNS label), nor has a prefix, so no
# service's tag is another's, and no prefix's tags begin with another prefix's (prod.web.running is never
# prod-eu's). The role word ends every one: a tag is ours by that exact form only, never by its prefix alone,
# so a release tag that starts with the prefix (main.4f2c1a9, v1.2 for the prefix main or v1) is never taken
# for one (and removed, its image deleted with its last tag).
PROTECT_PREFIX = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,39}")
TAG_MAX_LENGTH = 128  # Docker's tag grammar, [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}, which ECR's tags follow
ROLE_SUFFIXES = {"running": ".running", "rollback": ".rollback"}
NAME_HASH_LENGTH = 10


def protection_tag(prefix: str, service_name: str, role: str) -> str:
    """PREFIX.SERVICE.running or PREFIX.SERVICE.rollback. A name outside [A-Za-z0-9_-] or too long for 128
    characters (a 40-character prefix leaves 78, more than a Swarm name's 63) is mapped deterministically: its
    other characters turned to '-', cut short, and a short hash of the whole name appended, so two names never
    share a tag."""
    suffix, room = ROLE_SUFFIXES[role], TAG_MAX_LENGTH - len(prefix) - 1 - max(map(len, ROLE_SUFFIXES.values()))
    name = service_name
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or len(name) > room:
        mark = hashlib.sha256(service_name.encode()).hexdigest()[:NAME_HASH_LENGTH]
        name = re.sub(r"[^A-Za-z0-9_-]", "-", service_name)[:room - NAME_HASH_LENGTH - 1] + "-" + mark
    return f"{prefix}.{name}{suffix}"


def is_protection_tag(prefix: str, tag: str) -> bool:
    """A tag this prefix's deployer keeps: PREFIX.NAME.running or PREFIX.NAME.rollback, and nothing else (not
    another prefix's, not a tag someone else pushed that starts with the prefix: PREFIX.4f2c1a9, PREFIX.2)."""
    return re.fullmatch(re.escape(prefix) + r"\.[A-Za-z0-9_-]+\.(running|rollback)", tag) is not None


def protection_changes(prefix: str, wanted: dict[str, str], named: set[str], tags: dict[str, str],
                       in_use: set[str] = frozenset()) -> tuple[dict[str, str], list[str]]:
    """For one repository: the protection tags to move (tag -> digest: wanted where it points elsewhere or
    nowhere) and to remove once they have moved (protection_removals)."""
    moves = {tag: digest for tag, digest in wanted.items() if tags.get(tag) != digest}
    return moves, protection_removals(prefix, {**tags, **moves}, named, in_use)


def protection_removals(prefix: str, tags: dict[str, str], named: set[str], in_use: set[str]) -> list[str]:
    """The tags of the prefix (of one repository's, tag -> digest) that no service names any more. `named`:
    every protection tag of a service still there, also those left where they are (an image gone or archived
    cannot be tagged; its tag stays on the old digest rather than go). Never the last tag of a digest in
    `in_use` (one a service runs or rolls back to): ECR deletes an image with its last tag (BatchDeleteImage),
    so such a tag stays until the image holds another (its own protection tag, once it could be put)."""
    left, removals = dict(tags), []
    for tag in sorted(tag for tag in tags if is_protection_tag(prefix, tag) and tag not in named):
        digest = left.pop(tag)
        if digest in in_use and digest not in left.values():
            left[tag] = digest
            continue
        removals.append(tag)
    return removals


def protection_claims(prefix: str, services: list[dict]) -> tuple[dict[tuple, set[str]], dict[tuple, set[str]]]:
    """Per (account, region, repository): the protection tags these services name, and the digests they run
    or roll back to."""
    named: dict[tuple, set[str]] = defaultdict(set)
    in_use: dict[tuple, set[str]] = defaultdict(set)
    for service in services:
        for role, key in kept_images(service).items():
            named[key[:3]].add(protection_tag(prefix, service["Spec"].get("Name", "?"), role))
            in_use[key[:3]].add(key[3])
    return named, in_use


def rule_descriptions(policy_text: str) -> dict[int, str]:
    """rulePriority -> description, of a lifecycle policy (an unreadable one: none)."""
    try:
        rules = json.loads(policy_text).get("rules") or []
        return {int(r["rulePriority"]): " ".join(str(r.get("description") or "").split())[:200]  # (one log line)
                for r in rules if isinstance(r, dict)}
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}


def lifecycle_findings(policy_text: str, results: list[dict], in_use: dict[str, list[tuple[str, str]]],
                       where: str) -> list[tuple[str, str]]:
    """(service name, line), one per in-use image (digest -> [(service name, role)]) that ECR's preview of the repository's
    lifecycle policy says a rule would expire or archive, naming the rule's priority and description."""
    rules, lines = rule_descriptions(policy_text), []
    for result in results:
        digest = result.get("imageDigest")
        if digest not in in_use:
            continue
        action = str((result.get("action") or {}).get("type") or "EXPIRE").upper()
        priority = result.get("appliedRulePriority")
        priority = priority if isinstance(priority, int) else "?"
        rule = f"the lifecycle rule of priority {priority}" + (f' ("{rules[priority]}")' if rules.get(priority) else "")
        done = "archive it (a task rescheduled cannot pull it until it is restored)" if action == "TRANSITION" \
            else "expire it (a task rescheduled cannot pull it: manifest unknown)"
        for name, role in in_use[digest]:
            what = "the digest it runs" if role == "running" else "its rollback target"
            lines.append((name, f"Service {name}: {what}, {where}@{short_digest(digest)}: {rule} would {done}; "
                                f"retain it (--protect-tag-prefix and a rule of the highest priority for the prefix: "
                                f"see docs/keeping-images.md) or change the rule"))
    return lines


# --------------------------------------------------------------------------- rollouts (pure)

# Swarm's UpdateStatus.State values that end a rollout, and ours: another update replaced it.
FINAL_STATES = ("completed", "paused", "rollback_completed", "rollback_paused", "superseded")
NO_UPDATE_GRACE = 5.0  # s: Swarm starts an update within milliseconds; none by then means none needed
MIN_ROLLOUT_TIMEOUT = 300.0
PULL_ALLOWANCE = 120.0


def posted(spec: dict | None, image: str, force_update: int) -> bool:
    """Is this the spec we posted? Our image and our ForceUpdate identify it (we bump ForceUpdate)."""
    task = (spec or {}).get("TaskTemplate") or {}
    return (task.get("ContainerSpec") or {}).get("Image") == image and task.get("ForceUpdate", 0) == force_update


def rollout_state(service: dict, image: str, force_update: int) -> str | None:
    """State of the update that posted `image` with `force_update`, by spec identity, never by clocks
    (the leader stamps UpdateStatus.StartedAt; we may run on another manager): swarmkit resets
    UpdateStatus on every update, so while the spec is ours, so is its UpdateStatus. None: Swarm has
    not started it (or had nothing to roll); "superseded": another update replaced ours."""
    state = (service.get("UpdateStatus") or {}).get("State")
    if posted(service.get("Spec"), image, force_update):
        return state
    rolled_back = state and state.startswith("rollback_")
    previous = service.get("PreviousSpec")  # Swarm's own rollback clears it; `docker service rollback` keeps ours
    if rolled_back and (previous is None or posted(previous, image, force_update)):
        return state
    return "superseded"


def lost_sight_of_rollback(service: dict, image: str, replaced: dict, tasks) -> bool:
    """Was our rollout to `image` rolled back by Swarm before an update (the auth keeper's re-post with
    the failure record, an operator's scale) reset the UpdateStatus that said so? The service runs again
    the image our update replaced, and the digest failed there: a failure record names it, or one of its
    tasks failed (`tasks`: called only if needed)."""
    def image_of(spec: dict) -> str | None:
        return ((spec or {}).get("TaskTemplate") or {}).get("ContainerSpec", {}).get("Image")
    digest = image.rpartition("@")[2]
    if not DIGEST.fullmatch(digest) or image_of(service.get("Spec")) != image_of(replaced):
        return False
    return failed_digest(service) == digest or tried_and_failed(tasks(), digest)


# What swarmkit assumes for a service stored without an UpdateConfig (a compose file without
# `update_config`): api/defaults/service.go, one task at a time, each watched for 5 s.
SWARM_DEFAULT_UPDATE_CONFIG = {"Parallelism": 1, "Delay": 0, "Monitor": 5_000_000_000}


def default_rollout_timeout(spec: dict, global_tasks: int = 1) -> float:
    """Roughly batches x (delay + monitor), plus pull time; at least 5 min. The update config is
    read as swarmkit reads it: none stored means its defaults (one task per batch); a stored one
    whose Parallelism is 0 (or absent) updates all tasks at once, and whose Monitor is absent
    watches for swarmkit's 5 s. A global service has as many replicas as it has tasks."""
    mode = spec.get("Mode") or {}
    replicas = (mode.get("Replicated") or {}).get("Replicas", 1) if "Global" not in mode else global_tasks
    config = spec.get("UpdateConfig")
    config = SWARM_DEFAULT_UPDATE_CONFIG if config is None else config
    parallelism = config.get("Parallelism") or max(replicas, 1)  # 0 means all at once
    batches = -(-replicas // parallelism)
    per_batch = (config.get("Delay") or 0) + (config.get("Monitor") or SWARM_DEFAULT_UPDATE_CONFIG["Monitor"])
    return max(MIN_ROLLOUT_TIMEOUT, batches * per_batch / 1e9 + PULL_ALLOWANCE)


def failing_task_error(tasks: list[dict], image: str) -> str | None:
    """The newest error of a task that ran `image` and failed: why a rollout paused."""
    failed = [t for t in tasks if t.get("Spec", {}).get("ContainerSpec", {}).get("Image") == image
              and t.get("Status", {}).get("State") in ("failed", "rejected", "shutdown")
              and (t["Status"].get("Err") or "").strip()]
    failed.sort(key=lambda t: t["Status"].get("Timestamp", ""))
    return failed[-1]["Status"]["Err"].strip() if failed else None


UPDATE_REASONS = {"push": "pushed to ECR", "scan": "its ECR scan passed", "signature": "its signature verified"}
FAILED_TASKS_SHOWN = 3  # a failure's message names at most this many failed tasks, newest first
LOG_LINES_SHOWN = 20  # and the last lines of the newest one's log
LOG_LINE_MAX = 200  # characters per line


def failed_tasks(tasks: list[dict], image: str) -> list[dict]:
    """The tasks that ran `image` and failed, newest first, at most FAILED_TASKS_SHOWN."""
    failed = [t for t in tasks if t.get("Spec", {}).get("ContainerSpec", {}).get("Image") == image
              and (t.get("Status") or {}).get("State") in ("failed", "rejected")]
    failed.sort(key=lambda t: t["Status"].get("Timestamp", ""), reverse=True)
    return failed[:FAILED_TASKS_SHOWN]


def log_lines(raw: bytes) -> list[str]:
    """The Engine API's log stream as text lines: without a TTY, frames of an 8-byte header (stream, 0, 0, 0,
    big-endian size) and their payload; with one, the bytes as they are."""
    text, rest = [], raw
    while len(rest) >= 8 and rest[0] in (0, 1, 2) and rest[1:4] == b"\0\0\0":
        size = int.from_bytes(rest[4:8], "big")
        text.append(rest[8:8 + size])
        rest = rest[8 + size:]
    data = b"".join(text) + rest
    return [line[:LOG_LINE_MAX] for line in data.decode("utf-8", "replace").splitlines() if line.strip()]


def failure_details(tasks: list[dict], nodes: dict[str, str], logs: list[str] | str) -> str:
    """What an operator would open three terminals for: each failed task's error, exit code and node, and
    the last lines of the newest one's log (or why they cannot be read)."""
    lines = []
    for task in tasks:
        status = task.get("Status") or {}
        code = (status.get("ContainerStatus") or {}).get("ExitCode")
        lines.append(f"task {task.get('ID', '?')[:12]} on {nodes.get(task.get('NodeID'), task.get('NodeID') or 'no node')}: "
                     f"{(status.get('Err') or status.get('Message') or status.get('State', '?')).strip()}"
                     + (f" (exit code {code})" if code else ""))
    if isinstance(logs, str):
        lines.append(f"its log: {logs}")
    elif logs:
        lines += [f"last {len(logs)} log line(s) of task {tasks[0].get('ID', '?')[:12]}:"] + [f"| {line}" for line in logs]
    return "\n".join(lines)


OUTCOME_WORDS = {"completed": "completed", "promoted": "promoted", "paused": "paused", "timed_out": "timed out",
                 "rollback_completed": "rolled back", "rollback_paused": "rollback paused",
                 "removed": "ended: service removed", "blocked": "blocked",
                 "superseded": "superseded by another update", "rollback_failed": "impossible",
                 "stuck": "stuck", "check_failed": "failed its checks"}


def notification(outcome: str, service: str, service_id: str, image: str, duration: float,
                 node: str, message: str, rollback: bool = False, gate: str = "") -> dict:
    """One JSON document per outcome: `text` for Slack/Teams webhooks, the rest for machines. `gate`:
    which one blocked it."""
    words = OUTCOME_WORDS[outcome.removeprefix("rollback_") if rollback and outcome != "rollback_failed" else outcome]
    words = f"{words} by its {gate}" if gate else words
    after = "" if outcome in ("blocked", "promoted", "rollback_failed") else f" after {duration:.1f}s"  # none timed
    direction = "from" if outcome == "rollback_failed" else "to"  # (`image`: the build that failed)
    text = f"ecr-deploy on {node}: {'rollback' if rollback else 'rollout'} of {service} {direction} {image} {words}" \
           f"{after}" + (f": {message}" if message else "")
    return {"text": text, "service": service, "service_id": service_id, "image": image,
            "digest": image.rpartition("@")[2], "outcome": outcome, "duration_seconds": round(duration, 3),
            "node": node, "message": message}


def unrestorable_reason(restored: dict, failed_image: str) -> str:
    """Why a rollback to `restored` (a spec whose image names no digest) would not restore anything: the
    nodes would pull the tag, which now points at the build that failed."""
    image = ((restored.get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Image")
    ref, failed = parse_image_ref(image), failed_image.rpartition("@")[2]
    tag = ref.tag if ref else "?"
    return (f"the spec our update replaced names no digest ({image}: its nodes pull whatever :{tag} points to, "
            f"now the build that failed, {failed}), so no build known to have run can be restored; the service "
            f"stays on the failed build. Pin one that worked, with the failure record that keeps the deployer off "
            f"this one: `docker service update --image {ref.name if ref else '?'}:{tag}@DIGEST --label-add "
            f"{FAILED_LABEL}={failed} {restored.get('Name', '?')}`")


def metrics_text(totals: dict) -> str:
    """Prometheus text exposition of the process's totals."""
    lines = ["# HELP ecr_deploy_messages_total SQS messages received, by what became of them.",
             "# TYPE ecr_deploy_messages_total counter"]
    lines += [f'ecr_deploy_messages_total{{result="{key}"}} {totals["messages"][key]}'
              for key in ("deployed", "ignored", "failed")]
    lines += ["# HELP ecr_deploy_service_updates_total Service updates posted to Swarm.",
              "# TYPE ecr_deploy_service_updates_total counter",
              f"ecr_deploy_service_updates_total {totals['services_updated']}",
              "# HELP ecr_deploy_rollouts_total Rollouts followed to their end, by outcome.",
              "# TYPE ecr_deploy_rollouts_total counter"]
    lines += [f'ecr_deploy_rollouts_total{{outcome="{outcome}"}} {totals["rollouts"].get(outcome, 0)}'
              for outcome in OUTCOME_WORDS]
    lines += ["# HELP ecr_deploy_last_success_timestamp_seconds When a drain cycle last ended with nothing "
              "left for retry.", "# TYPE ecr_deploy_last_success_timestamp_seconds gauge",
              f"ecr_deploy_last_success_timestamp_seconds {totals['last_success'] or 0}",
              "# HELP ecr_deploy_images_at_risk Images services run or roll back to that ECR no longer holds in "
              "its standard storage class, as the last reconcile pass found them.",
              "# TYPE ecr_deploy_images_at_risk gauge"]
    lines += [f'ecr_deploy_images_at_risk{{state="{state}"}} {(totals.get("images_at_risk") or {}).get(state, 0)}'
              for state in IMAGE_STATUS_EXIT if state != "ok"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- checks after the rollout (pure)

# What proves a rollout good, beyond Swarm's "completed": the operator's CloudWatch alarms and an HTTP
# check, looked at from the rollout's completion through its soak; and what proves one stuck: no task of
# the new digest reached running within the progress deadline (Kubernetes' progressDeadlineSeconds).
# A failed check or a stuck rollout is a failed rollout: rolled back (--rollback-on-failure), recorded
# (FAILED_LABEL), never promoted, never followed by a wave.
ALARMS_LABEL = "ecr-deploy.alarms"  # "web-5xx,web-latency": any in ALARM fails the rollout
CHECK_LABEL = "ecr-deploy.check"  # "https://web.internal/health": must answer 2xx ...
CHECK_PASSES_LABEL = "ecr-deploy.check-passes"  # ... this many times in a row (default 3)
PROGRESS_DEADLINE_LABEL = "ecr-deploy.progress-deadline"  # no new task running by then: the rollout is stuck
DEFAULT_CHECK_PASSES = 3
MAX_CHECK_PASSES = 100
CHECK_EVERY = 5.0  # s between two looks at a service's checks
CHECK_TIMEOUT = (3.05, 5.0)  # s: connect, read; a check that hangs is a failed check, never a hung deployer
CHECK_REDIRECTS = 3  # followed on the same scheme, host and port only
DESCRIBE_ALARMS_MAX = 100  # AlarmNames per DescribeAlarms call (CloudWatch API reference)
# DescribeAlarms returns only metric alarms unless AlarmTypes asks for the others (its answer: "<type>s")
ALARM_TYPES = ("MetricAlarm", "CompositeAlarm", "LogAlarm")
ALARM_NAME = re.compile(r"[^\x00-\x1f,]{1,255}")  # CloudWatch: 1-255 characters; a comma separates them here
DEFAULT_PROGRESS_DEADLINE = 300.0  # s
CHECKS_UNANSWERED = 120.0  # s past a rollout's soak that CloudWatch may fail to answer before the checks fail


class Checks(NamedTuple):
    """A service's checks after the rollout, from its labels."""
    alarms: tuple[str, ...]
    url: str | None
    passes: int  # 2xx answers in a row the HTTP check needs

    @property
    def named(self) -> str:
        return ", ".join([*(f"alarm {a}" for a in self.alarms)] +
                         ([f"check {shown_url(self.url)} ({self.passes} passes in a row)"] if self.url else []))


def check_url(text: str) -> str:
    """A check's URL, strictly: http or https, a host, no credentials (a label is readable by anyone who may
    `docker service inspect`), no whitespace. ValueError names what is wrong, never the URL's query."""
    text = str(text).strip()
    if not text or re.search(r"[\s\x00-\x1f\x7f]", text):
        raise ValueError(f"{CHECK_LABEL} is empty or has spaces or control characters")
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{CHECK_LABEL} must be an http:// or https:// URL")
    try:
        parts.port  # (ValueError: not a port)
    except ValueError:
        raise ValueError(f"{CHECK_LABEL} has an invalid port") from None
    if not parts.hostname:
        raise ValueError(f"{CHECK_LABEL} names no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{CHECK_LABEL} must not carry credentials (user:password@): service labels are "
                         f"readable by anyone who may inspect the service")
    return urllib.parse.urlunsplit(parts._replace(fragment=""))


def shown_url(url: str) -> str:
    """A check's URL as logged: scheme, host, port and path; its query (which may carry a token) left out."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(query="", fragment="")) + ("?…" if parts.query else "")


def tls_failure(error: BaseException) -> str:
    """What TLS said of a failed HTTPS check (requests' SSLError wraps urllib3's, which wraps the ssl module's),
    e.g. "TLS: certificate verify failed: self-signed certificate": never requests' own text, which names the URL
    with its query."""
    for _ in range(6):
        if isinstance(error, ssl.SSLCertVerificationError):
            return f"TLS: certificate verify failed: {error.verify_message}"
        if isinstance(error, ssl.SSLError):
            return f"TLS: {error.reason or type(error).__name__}"
        inner = getattr(error, "reason", None)
        error = inner if isinstance(inner, BaseException) else next(
            (a for a in getattr(error, "args", ()) if isinstance(a, BaseException)), None)
        if error is None:
            break
    return "TLS: handshake failed"


def checks_of(labels: dict) -> Checks | None:
    """The checks a service's labels name (None: none). ValueError for a label that cannot be read."""
    alarms_text, url, passes = labels.get(ALARMS_LABEL), labels.get(CHECK_LABEL), labels.get(CHECK_PASSES_LABEL)
    alarms = tuple(dict.fromkeys(name.strip() for name in (alarms_text or "").split(",") if name.strip()))
    if not alarms and not (url or "").strip():
        return None
    bad = [name for name in alarms if not ALARM_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"{ALARMS_LABEL}: {bad[0][:40]!r} is not a CloudWatch alarm name (1-255 characters)")
    if passes is not None and not (str(passes).strip().isdigit() and 1 <= int(passes) <= MAX_CHECK_PASSES):
        raise ValueError(f"{CHECK_PASSES_LABEL}={str(passes)[:20]!r} is not a number from 1 to {MAX_CHECK_PASSES}")
    return Checks(alarms, check_url(url) if (url or "").strip() else None,
                  int(passes) if passes is not None else DEFAULT_CHECK_PASSES)


class Look(NamedTuple):
    """One look at a service's checks."""
    failed: str | None  # why the rollout failed: the alarm, or the check's answer
    said: str  # what each check said, for --status and the log ("alarm web-5xx OK, check 2/3 (HTTP 200)")
    passes: int  # 2xx answers of the HTTP check in a row, this look's included


def look_at(checks: Checks, alarm_states: dict[str, str], answer: int | str | None, passes: int) -> Look:
    """Judge one look: `alarm_states`: name -> CloudWatch's StateValue (a name missing: no such alarm);
    `answer`: the HTTP check's status code, or why it gave none (None: no HTTP check); `passes`: the
    2xx answers in a row before this look. An alarm in ALARM fails; INSUFFICIENT_DATA (a new alarm, or a
    metric nobody has sent yet) does not: it says nothing either way, and --status shows it. An alarm
    that does not exist fails: a typo would otherwise let every build through unchecked."""
    said, failed = [], []
    for name in checks.alarms:
        state = alarm_states.get(name)
        said.append(f"alarm {name} {state or 'missing'}" + (" (no data yet: not a failure)"
                                                              if state == "INSUFFICIENT_DATA" else ""))
        if state == "ALARM":
            failed.append(f"alarm {name} is in ALARM")
        elif state is None:
            failed.append(f"alarm {name} does not exist (a typo in {ALARMS_LABEL}, or another region?)")
    if checks.url:
        ok = isinstance(answer, int) and 200 <= answer < 300
        passes = passes + 1 if ok else 0
        what = f"HTTP {answer}" if isinstance(answer, int) else str(answer)
        said.append(f"check {min(passes, checks.passes)}/{checks.passes} ({what})")
        if not ok:
            failed.append(f"check {shown_url(checks.url)} answered {what}")
    return Look("; ".join(failed) or None, ", ".join(said), passes)


def checks_done(checks: Checks, look: Look | None, soak_over: bool) -> bool:
    """Have the checks proved the rollout good: its soak is over, the alarms were looked at, and the HTTP
    check answered 2xx its passes in a row?"""
    return soak_over and look is not None and look.failed is None and \
        (not checks.url or look.passes >= checks.passes)


def checks_window(checks: Checks, soak: float) -> float:
    """How long after its soak began (rollout_of's since, Swarm's clock) a rollout is checked: its soak, and at
    least the looks its HTTP check needs. A deployer (re)started within it takes the checks up again."""
    return max(soak, (checks.passes if checks.url else 1) * CHECK_EVERY)


def image_before(tasks: list[dict], digest: str) -> str | None:
    """The image the service ran before the digest, from Swarm's task history (kept per slot, 5 tasks by
    default: TaskHistoryRetentionLimit), which no later update of the spec rewrites: the newest task of
    another image."""
    others = [t for t in tasks if not task_runs(t, digest) and task_state(t) != "orphaned"
              and (t.get("Spec") or {}).get("ContainerSpec", {}).get("Image")]
    newest = max(others, key=lambda t: task_time(t) or datetime.min.replace(tzinfo=timezone.utc), default=None)
    return newest["Spec"]["ContainerSpec"]["Image"] if newest else None


def progress_deadline(labels: dict, default: float) -> float:
    """The service's progress deadline in s (0: none). ValueError for a label that cannot be read."""
    text = labels.get(PROGRESS_DEADLINE_LABEL)
    return parse_duration(text) if text is not None and str(text).strip() else default


def tasks_running(tasks: list[dict], image: str) -> set[str]:
    """The IDs of the tasks of `image` that run: a task not seen running before is progress (a count is not:
    a `docker service scale` down mid-rollout lowers it, and a later start would not count)."""
    return {t.get("ID", "?") for t in tasks if (t.get("Spec") or {}).get("ContainerSpec", {}).get("Image") == image
            and task_state(t) == "running"}


def tasks_waiting(tasks: list[dict], image: str) -> list[dict]:
    """The tasks of `image` Swarm wants running (or ready: a restart's delay) that do not run."""
    return [t for t in tasks if (t.get("Spec") or {}).get("ContainerSpec", {}).get("Image") == image
            and t.get("DesiredState") in TASK_STATES[:TASK_STATES.index("running") + 1] and task_state(t) != "running"]


def may_be_stuck(tasks: list[dict], image: str) -> bool:
    """Can a rollout that made no progress be stuck: a task of `image` waits to run, or none runs? Not when
    every task of it Swarm wants runs: Swarm then waits by design (its updater watches the last batch for
    UpdateConfig.Monitor, or Delay + 1 s, before it says completed: swarmkit update/updater.go Run)."""
    return bool(tasks_waiting(tasks, image)) or not tasks_running(tasks, image)


def stuck_reason(tasks: list[dict], image: str, deadline: float) -> str:
    """Why a rollout made no progress: what Swarm says of the tasks of `image` it wants running and that do
    not run (each distinct error once, with how many tasks), e.g. "no suitable node (scheduling constraints
    not satisfied on 3 nodes)", or the error of a task that was rejected (an image that cannot be pulled)."""
    ours = [t for t in tasks if (t.get("Spec") or {}).get("ContainerSpec", {}).get("Image") == image]
    waiting = tasks_waiting(ours, image)
    rejected = sorted((t for t in ours if task_state(t) in ("rejected", "failed")),
                      key=lambda t: (t.get("Status") or {}).get("Timestamp", ""), reverse=True)[:1]
    said: dict[str, int] = {}
    for task in waiting + rejected:
        status = task.get("Status") or {}
        text = f"{status.get('State', '?')}: {(status.get('Err') or status.get('Message') or '').strip() or '?'}"
        said[text] = said.get(text, 0) + 1
    what = "; ".join(f"{count} task(s) {text}" for text, count in said.items()) or "Swarm started no task of it"
    return f"no task of the new digest reached running within {duration_text(deadline)} " \
           f"({PROGRESS_DEADLINE_LABEL}): {what}"


# --------------------------------------------------------------------------- notifications (pure)

# What a notification target can ask for (a filter per target): a service updated for a push, or for
# drift a reconcile pass found; its rollout completed, failed (paused, timed out) or rolled back; a gate
# blocked it; a failure record held it back; a window, min-age or wave makes it wait; a digest promoted;
# the deployer unhealthy (Docker or the queue unreachable past a bound) and recovered; the image a service
# runs or rolls back to gone from ECR, or archived.
EVENT_CLASSES = ("updated", "drift", "completed", "failed", "rolled_back", "blocked", "held", "waiting",
                 "promoted", "unhealthy", "recovered", "image_at_risk")
OUTCOME_CLASSES = {"completed": "completed", "superseded": "completed", "removed": "completed",
                   "paused": "failed", "timed_out": "failed", "rollback_paused": "failed", "rollback_failed": "failed",
                   "stuck": "failed", "check_failed": "failed",
                   "rollback_completed": "rolled_back", "blocked": "blocked", "promoted": "promoted"}
BAD_CLASSES = ("failed", "rolled_back", "blocked", "unhealthy", "image_at_risk")  # said as failures (red, high priority)
NOTIFY_LABEL = "ecr-deploy.notify"  # a service's events go only to these named targets (comma separated)
TARGET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
HEADLINE_MAX = 150  # characters: a phone's lock screen shows one line
SUMMARY_LINES_MAX = 60  # one --once message lists at most this many events; the rest are counted


class Event(NamedTuple):
    """Something an operator may want to hear about. `image` is REPOSITORY:TAG@DIGEST (may be empty);
    `route`: the targets the service's NOTIFY_LABEL names (empty: every target)."""
    kind: str
    service: str
    image: str
    why: str
    details: str = ""
    route: tuple[str, ...] = ()
    lead_seconds: float | None = None  # a completed rollout: from ECR's push to the service converged

    @property
    def line(self) -> str:
        """Service, image, tag -> digest, why."""
        name, _, digest = self.image.rpartition("@")
        what = f"{name.rpartition('/')[2] if '/' in name else name} → {digest[:19]}" if digest else name
        return " ".join(filter(None, [f"{self.service}:" if self.service else "", what, self.why]))

    @property
    def headline(self) -> str:
        """The line, short: first in every message (phones show only that)."""
        line = self.line
        return line if len(line) <= HEADLINE_MAX else line[:HEADLINE_MAX - 1] + "…"


def event_of(document: dict, labels: dict | None) -> Event:
    """The Event of a rollout outcome's JSON document (see notification): why is what the log line says."""
    head, _, why = document["text"].partition(f" to {document['image']} ")
    rollback = head.endswith(f"rollback of {document['service']}")
    if document["message"]:  # the task's own error first: Swarm's "update paused due to failure ..." says less
        said = sorted(document["message"].split("; "), key=lambda part: not part.startswith("task error: "))
        why = why.removesuffix(document["message"]) + "; ".join(said)
    return Event(OUTCOME_CLASSES[document["outcome"]], document["service"], document["image"],
                 f"{'rollback ' if rollback else ''}{why or document['outcome']}", route=notify_route(labels))


def notify_route(labels: dict | None) -> tuple[str, ...]:
    value = (labels or {}).get(NOTIFY_LABEL, "")
    return tuple(sorted({name.strip() for name in value.split(",") if name.strip()}))


class TargetConfig(NamedTuple):
    name: str
    classes: frozenset[str]  # the event classes it wants
    url: str  # a secret: never logged, printed or put in argv

    @property
    def scheme(self) -> str:
        return self.url.partition("://")[0].lower()

    @property
    def uses_apprise(self) -> bool:
        return self.scheme not in ("http", "https")  # http(s): the JSON webhook, as --notify-url always was

    def wants(self, event: Event) -> bool:
        return event.kind in self.classes and (not event.route or self.name in event.route)


def parse_event_classes(text: str) -> frozenset[str]:
    words = {w.strip().replace("-", "_") for w in text.lower().split(",") if w.strip()}
    if words == {"all"}:
        return frozenset(EVENT_CLASSES)
    unknown = words - set(EVENT_CLASSES)
    if unknown or not words:
        raise ValueError(f"unknown event class {', '.join(sorted(unknown)) or '(none)'} (use all, or some of "
                         f"{', '.join(EVENT_CLASSES)})")
    return frozenset(words)


def parse_notify_file(text: str) -> list[TargetConfig]:
    """Lines 'NAME EVENTS URL' ('#' starts a comment). Errors name the line, never its URL."""
    targets: list[TargetConfig] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split() if not line.lstrip().startswith("#") else []
        if not fields:
            continue
        if len(fields) != 3:
            raise ValueError(f"line {number}: expected NAME EVENTS URL")
        name, classes, url = fields
        if not TARGET_NAME.fullmatch(name) or name in {t.name for t in targets}:
            raise ValueError(f"line {number}: target name must be unique, lower case letters, digits, - or _")
        if not re.fullmatch(r"[a-z][a-z0-9+.-]*://\S+", url, re.IGNORECASE):
            raise ValueError(f"line {number}: not a URL (SCHEME://...)")
        if not TargetConfig(name, frozenset(), url).uses_apprise:
            raise ValueError(f"line {number}: an http(s) URL is the JSON webhook: give it with --notify-url")
        try:
            targets.append(TargetConfig(name, parse_event_classes(classes), url))
        except ValueError as e:
            raise ValueError(f"line {number}: {e}") from None
    return targets


def url_secrets(url: str) -> list[str]:
    """Every piece of a target URL but its scheme that could be a credential (tokens sit in the host, the
    path, the user, the password or the query), longest first, for redact(): each as written and unquoted,
    split both before and after unquoting (a password p%40ss%2Fword is one secret, p@ss/word, not p, ss
    and word)."""
    rest = url.partition("://")[2]
    quoted = re.split(r"[/:@?&=#,;]+", rest)
    pieces = set(quoted) | {urllib.parse.unquote(p) for p in quoted} | set(re.split(r"[/:@?&=#,;]+", urllib.parse.unquote(rest)))
    return sorted({p for p in pieces if len(p) >= 4}, key=len, reverse=True)


# A message carries text containers wrote (a task's error, its last log lines), and chat services read some
# of it as a call to people: Discord parses @everyone, @here, <@USER> and <@&ROLE> in a webhook's content
# unless told otherwise (discord.com/developers/docs/resources/message#allowed-mentions-object: by default
# all mentions are parsed; Apprise says nothing otherwise for plain text), Mattermost and Rocket.Chat
# @channel, @all, @here and @USER, Matrix @room, Telegram @USER. A zero-width space after the @ shows the
# same text and calls no one. (An e-mail address, user@host, stays as it is: its @ follows a word.)
MENTION = re.compile(r"@(?=everyone|here)|(?<![\w.+-])@(?=\w)|(?<=<)@", re.IGNORECASE)


def defuse_mentions(text: str) -> str:
    return MENTION.sub("@\u200b", text)


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def message_of(events: list[Event], node: str) -> tuple[str, str, str]:
    """(title, body, severity) of one message: one event's headline, or a run's sum (counts by class),
    the events' headlines below. severity: failure, warning, success or info."""
    kinds = [e.kind for e in events]
    if len(events) == 1:
        event = events[0]
        title, body = event.headline, "\n".join(filter(None, [event.line, event.details, f"ecr-deploy on {node}"]))
    else:
        counts = ", ".join(f"{kinds.count(kind)} {kind.replace('_', ' ')}" for kind in EVENT_CLASSES if kind in kinds)
        title = f"ecr-deploy on {node}: {counts}"
        lines = [line for e in events[:SUMMARY_LINES_MAX]
                 for line in [e.headline, *(f"  {detail}" for detail in e.details.splitlines())]]
        more = len(events) - SUMMARY_LINES_MAX
        body = "\n".join(lines + ([f"… and {more} more"] if more > 0 else []))
    severity = "failure" if set(kinds) & set(BAD_CLASSES) else "warning" if set(kinds) & {"held", "waiting", "drift"} \
        else "success" if set(kinds) & {"completed", "promoted", "recovered"} else "info"
    return title, body, severity


# Per-service metrics. Label cardinality is bounded: per service one info series (its latest tag and digest
# only: the old one goes), one series per state of SERVICE_STATES, one gate-blocks counter per gate; and at
# most METRIC_SERVICES services (those not heard of longest go first).
SERVICE_STATES = ("deploying", "current", "waiting", "held", "blocked", "failed")
STATE_OF_EVENT = {"updated": "deploying", "drift": "deploying", "completed": "current", "promoted": "current",
                  "failed": "failed", "rolled_back": "failed", "blocked": "blocked", "held": "held", "waiting": "waiting"}
METRIC_SERVICES = 1000


class ServiceMetrics:
    """What each service runs and how it stands, from the events this process saw (see the Notifier)."""

    def __init__(self):
        self.services: dict[str, dict] = {}
        self.lock = threading.Lock()  # (the metrics endpoint reads from its own thread)

    def observe(self, event: Event) -> None:
        if not event.service or event.kind not in STATE_OF_EVENT:
            return
        with self.lock:
            entry = self.services.pop(event.service, None) or {"blocks": defaultdict(int)}
            self.services[event.service] = entry  # the most recently heard of last
            while len(self.services) > METRIC_SERVICES:
                del self.services[next(iter(self.services))]
            entry["state"] = STATE_OF_EVENT[event.kind]
            name, _, digest = event.image.rpartition("@")
            if event.kind == "completed" and digest:
                entry.update(tag=name.rpartition(":")[2], digest=digest, deployed_at=time.time())
                if event.lead_seconds is not None:
                    entry["lead"] = event.lead_seconds
            if event.kind == "blocked":
                gate = re.search(r"by its (\w+) gate", event.why)
                entry["blocks"][gate[1] if gate else "?"] += 1

    def text(self) -> str:
        def labels(**pairs) -> str:
            return ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                            for k, v in pairs.items())
        with self.lock:
            services = {name: dict(entry, blocks=dict(entry["blocks"])) for name, entry in self.services.items()}
        families = [
            ("ecr_deploy_service_info", "gauge", "What a service runs, as this deployer last saw its rollout complete.",
             [(labels(service=n, tag=e["tag"], digest=e["digest"]), 1) for n, e in services.items() if "digest" in e]),
            ("ecr_deploy_service_state", "gauge", "How a service stands, as this deployer last heard: one state is 1.",
             [(labels(service=n, state=state), int(e["state"] == state)) for n, e in services.items()
              for state in SERVICE_STATES]),
            ("ecr_deploy_service_last_deployed_timestamp_seconds", "gauge", "When a rollout to a service last completed.",
             [(labels(service=n), round(e["deployed_at"], 3)) for n, e in services.items() if "deployed_at" in e]),
            ("ecr_deploy_service_lead_time_seconds", "gauge", "From ECR's push to the service converged, its last rollout.",
             [(labels(service=n), round(e["lead"], 3)) for n, e in services.items() if "lead" in e]),
            ("ecr_deploy_service_gate_blocks_total", "counter", "Digests a gate blocked from a service.",
             [(labels(service=n, gate=gate), count) for n, e in services.items() for gate, count in e["blocks"].items()])]
        lines = []
        for name, kind, help_text, samples in families:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{{{pairs}}} {value}" for pairs, value in samples]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- scan gate (pure)

SCAN_THRESHOLD_LABEL = "ecr-deploy.scan-threshold"
# Worst first. UNDEFINED and UNTRIAGED (findings nobody rated yet) never block: no rank to compare.
SEVERITIES = ("CRITICAL", "HIGH", "MEDIUM", "LOW", "INFORMATIONAL")
SCAN_PENDING = ("PENDING", "IN_PROGRESS")
SCAN_FINISHED = ("COMPLETE", "ACTIVE")  # ACTIVE: enhanced scanning, findings kept current
OR_OFF = f"or label the service {SCAN_THRESHOLD_LABEL}=off"
SCAN_FIXES = {  # why a digest without usable findings is blocked, and what to do about it
    "NOT_FOUND": f"ECR has no scan of this image: turn on scan on push for the repository (or registry scanning), "
                 f"{OR_OFF}",
    "DENIED": "not allowed to read ECR scan findings: grant ecr:DescribeImageScanFindings (for another account's "
              "registry, its repository policy must allow it too)",
    "SCAN_ELIGIBILITY_EXPIRED": "ECR scan SCAN_ELIGIBILITY_EXPIRED: Amazon Inspector no longer scans this image, "
                                "older than its ECR re-scan duration; lengthen that duration in Amazon Inspector "
                                f"or push a fresh build, {OR_OFF}",
    "FINDINGS_UNAVAILABLE": "ECR scan FINDINGS_UNAVAILABLE: Amazon Inspector has no findings for this image; check "
                            f"its coverage in the Amazon Inspector console and push it again, {OR_OFF}",
    "LIMIT_EXCEEDED": "ECR scan LIMIT_EXCEEDED: ECR's scan quota is used up (basic scanning: one scan per image a "
                      f"day); scan it again later with aws ecr start-image-scan, {OR_OFF}",
    "IMAGE_ARCHIVED": "ECR scan IMAGE_ARCHIVED: the image is in ECR's archive storage class, where it is neither "
                      "scanned nor pulled; restore it with aws ecr update-image-storage-class "
                      f"--target-storage-class STANDARD, {OR_OFF}",
}


def severity(text: str) -> str | None:
    """A threshold as the flag or label writes it -> a severity, or None for `off`."""
    value = str(text).strip().upper()
    if value == "OFF":
        return None
    if value not in SEVERITIES:
        raise ValueError(f"scan threshold must be one of {', '.join(SEVERITIES)} or off, not {text!r}")
    return value


def scan_threshold(labels: dict | None, default: str | None) -> str | None:
    """The service's own label wins over --scan-threshold; raises ValueError for a bad label."""
    text = (labels or {}).get(SCAN_THRESHOLD_LABEL)
    return default if text is None else severity(text)


class Scan(NamedTuple):
    """What ECR says about one digest's scan."""
    status: str  # imageScanStatus.status, or NOT_FOUND / DENIED / GONE (no such image or repository)
    counts: dict  # findingSeverityCounts
    description: str = ""
    waited: float | None = None  # s from the push event to ECR's answer, both by AWS's clock
    completed_at: datetime | None = None  # imageScanFindings.imageScanCompletedAt: findings are in
    answered_at: datetime | None = None  # the Date of ECR's answer


def seconds_after(event_time: str, answered_at: datetime | None) -> float | None:
    """From an event's time to ECR's answer: both AWS's clocks (the deployer's own may be off).
    None when either is missing or unreadable."""
    try:
        since = datetime.fromisoformat(event_time)
        since = since if since.tzinfo else since.replace(tzinfo=timezone.utc)
        return (answered_at - since).total_seconds()
    except (ValueError, TypeError):
        return None


def scan_finished(scan: Scan) -> bool:
    """COMPLETE/ACTIVE count only with a completion time: enhanced scanning says COMPLETE (or ACTIVE)
    for a while before Amazon Inspector's findings, and their counts, are in."""
    return scan.status in SCAN_FINISHED and scan.completed_at is not None


class Verdict(NamedTuple):
    decision: str  # deploy, wait, blocked or gone
    reason: str


def counts_text(counts: dict) -> str:
    ranked = [s for s in SEVERITIES if counts.get(s)] + sorted(s for s in counts if s not in SEVERITIES and counts[s])
    return ", ".join(f"{s} {counts[s]}" for s in ranked) or "no findings"


def scan_verdict(scan: Scan, threshold: str, timeout: float) -> Verdict:
    """The gate's rule: deploy only a finished scan with nothing at or above the threshold."""
    if scan_finished(scan):
        too_severe = any(scan.counts.get(s, 0) > 0 for s in SEVERITIES[:SEVERITIES.index(threshold) + 1])
        return Verdict("blocked" if too_severe else "deploy",
                       f"ECR scan finds {counts_text(scan.counts)} (threshold {threshold})")
    if scan.status in SCAN_PENDING + SCAN_FINISHED:
        status = scan.status if scan.status in SCAN_PENDING else f"{scan.status} without findings yet"
        if scan.waited is None:  # fail closed: a wait that cannot be measured cannot be bounded
            return Verdict("blocked", f"ECR scan is {status}, and the push event has no time to measure "
                                      f"--scan-timeout from")
        if scan.waited > timeout:
            return Verdict("blocked", f"no finished ECR scan {scan.waited:.0f}s after the push "
                                      f"(--scan-timeout {timeout:.0f}s; ECR says {status})")
        return Verdict("wait", f"ECR scan is {status}, {scan.waited:.0f}s after the push")
    if scan.status == "GONE":
        return Verdict("gone", "the image is no longer in ECR; nothing to deploy")
    return Verdict("blocked", SCAN_FIXES.get(scan.status) or f"ECR scan {scan.status}: {scan.description} (scan it "
                   f"again with aws ecr start-image-scan, {OR_OFF})")


# An image index (what `docker buildx build --push` pushes: buildkit's provenance attestation is on by
# default) has no scan of its own: ECR's basic scanning refuses one ("An artifact with media type
# 'application/vnd.oci.image.index.v1+json' cannot be scanned", moby/buildkit#3499) and enhanced scanning
# scans the platform images inside it. The gate therefore judges an index by its platform images' scans.
INDEX_MEDIA_TYPES = ("application/vnd.oci.image.index.v1+json",
                     "application/vnd.docker.distribution.manifest.list.v2+json")
REFERENCE_TYPE = "vnd.docker.reference.type"  # buildkit marks attestation manifests (and anything not to run) so
PLATFORM_PART = re.compile(r"[A-Za-z0-9._-]{1,32}")


class PlatformImage(NamedTuple):
    """One runnable image of an image index, as its descriptor names it."""
    platform: str  # os/architecture[/variant], e.g. linux/arm64/v8
    digest: str


def platform_images(manifest: str, media_type: str | None = None) -> tuple[PlatformImage, ...] | None:
    """The platform images an image index (OCI index or Docker manifest list) holds, in its order: what ECR
    scans of it. Attestation manifests (buildkit's provenance and SBOMs: an annotation
    vnd.docker.reference.type, platform unknown/unknown) are no image to run and are left out. None for a
    manifest that is no index (`media_type`: ECR's imageManifestMediaType, for a manifest without its
    own). ValueError for an index that cannot be read."""
    try:
        document = json.loads(manifest)
    except (ValueError, TypeError, RecursionError):
        raise ValueError("its manifest is not JSON") from None
    if not isinstance(document, dict):
        raise ValueError("its manifest is not a JSON object")
    if document.get("mediaType", media_type) not in INDEX_MEDIA_TYPES:
        return None
    descriptors = document.get("manifests")
    if not isinstance(descriptors, list) or not all(isinstance(d, dict) for d in descriptors):
        raise ValueError("its image index has no list of manifests")
    found = []
    for entry in descriptors:
        annotations, platform = entry.get("annotations") or {}, entry.get("platform") or {}
        if not isinstance(annotations, dict) or not isinstance(platform, dict):
            raise ValueError("its image index has a malformed manifest descriptor")
        parts = [platform.get(key) for key in ("os", "architecture", "variant") if platform.get(key) is not None]
        if REFERENCE_TYPE in annotations or parts[:2] == ["unknown", "unknown"]:
            continue
        if not is_valid("digest", entry.get("digest")):
            raise ValueError(f"its image index names an invalid digest {shown(entry.get('digest'))}")
        readable = all(isinstance(part, str) and PLATFORM_PART.fullmatch(part) for part in parts) and len(parts) >= 2
        found.append(PlatformImage("/".join(parts) if readable else "unknown platform", entry["digest"]))
    return tuple(found)


DECISIONS = ("deploy", "wait", "blocked")  # of an index's platform images, the worst decides


def index_verdict(verdicts: list[tuple[PlatformImage, Verdict]]) -> Verdict:
    """An image index passes only when every platform image's scan passes; the worst verdict wins (one
    blocked: blocked; else one still scanning: wait), and says which image it is about."""
    if not verdicts:
        return Verdict("blocked", "the image index holds no platform image, only attestations: nothing ECR scans")
    ranked = [(image, verdict if verdict.decision != "gone" else
               Verdict("blocked", "ECR no longer has this image of the index")) for image, verdict in verdicts]
    worst = max(DECISIONS.index(verdict.decision) for _, verdict in ranked)
    about = [f"{image.platform} {image.digest}: {verdict.reason}" for image, verdict in ranked
             if DECISIONS.index(verdict.decision) == worst]
    return Verdict(DECISIONS[worst], "ECR scans of the index's platform images: " + "; ".join(about))


# --------------------------------------------------------------------------- signature gate (pure)

SIGNATURE_LABEL = "ecr-deploy.signature"
POLICY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Trust(NamedTuple):
    """Whose signature a gated service needs: the verifier, and the trust material it checks against."""
    verifier: str  # notation or cosign
    material: str  # notation: the trust policy's statement name ("" any); cosign: a public key's path

    def __str__(self) -> str:
        return f"{self.verifier}:{self.material}" if self.material else self.verifier


def parse_trust(text: str) -> Trust | None:
    """`notation`, `notation:STATEMENT`, `cosign:/path/to/key.pub` or `off` (None); ValueError otherwise."""
    value = str(text).strip()
    if value.lower() == "off":
        return None
    verifier, colon, material = value.partition(":")
    verifier, material = verifier.strip().lower(), material.strip()
    if verifier == "notation" and (not colon or POLICY_NAME.fullmatch(material)):
        return Trust("notation", material)
    if verifier == "cosign" and material.startswith("/") and ".." not in material.split("/") and \
            not any(c.isspace() or not c.isprintable() for c in material):
        return Trust("cosign", material)
    raise ValueError(f"signature trust must be notation, notation:STATEMENT (a trust policy statement's name), "
                     f"cosign:/absolute/path/to/key.pub or off, not {text!r}")


def signature_trust(labels: dict | None, default: Trust | None) -> Trust | None:
    """The service's own label wins over --signature; raises ValueError for a bad label."""
    text = (labels or {}).get(SIGNATURE_LABEL)
    return default if text is None else parse_trust(text)


# Notation reads its trust policy with Go's encoding/json, which takes an object's key for a field of its
# struct in any case ("Override" is override, "LEVEL" is level), and a field given twice is read twice (the
# last wins, and a second object merges into the first): {"level": "strict", "Level": "audit"} is audit to
# notation. The trust policy's field names, read here the same way; a field given twice is refused, not guessed.
NOTATION_POLICY_FIELDS = {name.casefold(): name for name in (
    "version", "trustPolicies", "name", "registryScopes", "signatureVerification", "level", "override",
    "verifyTimestamp", "trustStores", "trustedIdentities")}


def as_notation_reads(pairs: list[tuple[str, object]]) -> dict:
    """One object of a trust policy as notation's Go structs hold it (json's object_pairs_hook);
    ValueError for a field given twice."""
    read: dict = {}
    for key, value in pairs:
        field = NOTATION_POLICY_FIELDS.get(key.casefold(), key)
        if field in read:
            raise ValueError(f"{field!r} is given twice in one object (notation would read both, the last winning)")
        read[field] = value
    return read


def notation_statement(policy: dict, repository: str) -> dict | None:
    """The trust policy statement Notation applies to a repository (host/path): the one scoping it by
    name, else the one scoping "*" (Notation's own rule); None when none does."""
    statements = policy.get("trustPolicies") if isinstance(policy, dict) else None
    named = [s for s in statements if isinstance(s, dict)] if isinstance(statements, list) else []
    for scope in (repository, "*"):
        for statement in named:
            scopes = statement.get("registryScopes")
            if isinstance(scopes, list) and scope in scopes:
                return statement
    return None


# Notation's checks that must be enforced for "signed by an identity this manager trusts" to hold. Its
# levels other than strict only log some of them, and still exit 0: "skip" for an unsigned image,
# "audit" for a stranger's signature, "permissive" for an expired or revoked certificate. An override
# of authenticTimestamp does the same for a certificate that expired before the signature was checked
# (without a timestamp, notation checks the chain's validity at verification time under that name).
ENFORCED_CHECKS = ("integrity", "authenticity", "authenticTimestamp", "expiry", "revocation")


def notation_laxity(statement: dict) -> str | None:
    """Why Notation, under this statement, could say "verified" of a digest no trusted identity signed."""
    verification = statement.get("signatureVerification")
    level = verification.get("level") if isinstance(verification, dict) else None
    if level != "strict":
        return f"its signatureVerification level is {level!r}, not 'strict'"
    override = verification.get("override") or {}
    relaxed = sorted(check for check in ENFORCED_CHECKS if isinstance(override, dict)
                     and override.get(check, "enforce") != "enforce")
    return f"its override relaxes {', '.join(relaxed)}" if relaxed else None


# Why a verifier refused, in words an operator acts on: the first pattern found in what it said wins.
UNSIGNED = "no signature of this digest: sign it (a signature pushed later rolls the service on ECR's referrer event)"
SIGNATURE_REASONS = (
    (re.compile(r"artifact digest does not match|missing digest in claim|content descriptor mismatch"),
     "its signature was made for another digest"),
    (re.compile(r"expired|revoked|validity period|not yet valid"), "the signing certificate is expired or revoked"),
    (re.compile(r"does not contain any trusted certificate|not present in the trusted identities|trusted identit"),
     "signed, but by no identity this manager trusts"),
    (re.compile(r"signature is invalid|envelope.*(?:invalid|malformed)"), "the signature envelope is damaged"),
    (re.compile(r"do not match threshold|invalid signature when validating"),  # cosign cannot tell these apart
     "signed, but not with the trusted key, or the signature is damaged"),
    (re.compile(r"no signature is associated|no signatures found"), UNSIGNED),
)
COSIGN_UNSIGNED = 10  # cosign verify's exit code when the digest has no signature at all
COSIGN_LEGACY_ONLY = (10, 12)  # codes of its legacy path (.sig tag): it went there because there is no bundle

# What a verifier says when it could not reach a verdict, and may well reach one a little later: the
# registry (or a CRL/OCSP responder) unreachable, overloaded or throttling. Not a refusal: the gate
# waits and asks again, within a bound (UNANSWERED_FOR), before it calls that a block.
UNANSWERED = re.compile(
    r"connection refused|connection reset|i/o timeout|TLS handshake timeout|context deadline exceeded|no such host"
    r"|server misbehaving|unexpected EOF|status code (?:408|429|5\d\d)\b|revocation status is unknown", re.I)
UNANSWERED_FOR = 300.0  # s a verification may go unanswered (from its event, else from the first try) before it blocks
UNANSWERED_FORGOTTEN = 86400.0  # s after which a digest nobody asked about again is forgotten (bounded memory)

# cosign 3 verifies, with `verify --key`, every Sigstore bundle among the digest's referrers: signatures and
# attestations (SBOM, SLSA provenance) alike, both in-toto statements signed with the same key. Only the
# statement's predicate type, shown as the claim's critical.type, says which one it is. Its legacy format
# (a `sha256-HEX.sig` tag) holds simple-signing payloads, and only signatures; verify looks there only when
# the digest has no bundle at all, or with --new-bundle-format=false.
COSIGN_SIGNATURE_TYPES = ("https://sigstore.dev/cosign/sign/v1",  # cosign sign, Sigstore bundle
                          "cosign container image signature")  # cosign sign, legacy simple signing


class CosignClaim(NamedTuple):
    type: str  # the predicate type (bundles) or "cosign container image signature" (legacy)
    digest: str  # the image digest it is about


def cosign_claims(stdout: str) -> list[CosignClaim]:
    """The claims `cosign verify --output json` verified, as it prints them (a JSON list on one line)."""
    claims = []
    for line in stdout.splitlines():
        try:
            document = json.loads(line)
        except ValueError:
            continue
        for claim in document if isinstance(document, list) else ():
            critical = claim.get("critical") if isinstance(claim, dict) else None
            image = critical.get("image") if isinstance(critical, dict) else None
            if isinstance(image, dict):
                claims.append(CosignClaim(str(critical.get("type")), str(image.get("docker-manifest-digest"))))
    return claims


def cosign_signed(done, digest: str) -> bool:
    """Whether a cosign verify run verified a signature of exactly this digest (not only an attestation)."""
    return done.returncode == 0 and any(claim.type in COSIGN_SIGNATURE_TYPES and claim.digest == digest
                                        for claim in cosign_claims(done.stdout))


def signature_verdict(trust: Trust, digest: str, runs: list) -> Verdict:
    """What the verifier's runs (CompletedProcess; cosign: the bundle form, then maybe the legacy one)
    say: deploy, blocked, or wait when one could not reach a verdict and trying again may pass."""
    tool = trust.verifier
    if any((done.returncode == 0) if tool == "notation" else cosign_signed(done, digest) for done in runs):
        return Verdict("deploy", f"{tool} verified a signature of {short_digest(digest)} ({trust})")
    unanswered = [said for done in runs if done.returncode and UNANSWERED.search(said := verifier_said(done.stderr))]
    if unanswered:
        return Verdict("wait", f"{tool} could not reach a verdict: {unanswered[0]}")
    attested = sorted({claim.type for done in runs if done.returncode == 0 for claim in cosign_claims(done.stdout)})
    refusals = [signature_reason(tool, done.returncode, done.stderr) for n, done in enumerate(runs)
                if done.returncode and not (n and done.returncode == COSIGN_UNSIGNED)]  # (no .sig tag: nothing to say)
    if attested:
        refusals.insert(0, f"only attestations of this digest ({', '.join(attested)}) are made with the trusted key, "
                           f"no signature: an attestation says what a build is, not that it may run; sign it")
    return Verdict("blocked", "; the legacy .sig tag: ".join(refusals))


def unanswered_verdict(reason: str, waited: float, bound: float = UNANSWERED_FOR) -> Verdict:
    """A verifier without a verdict: wait and ask again while within the bound, then block."""
    if waited < bound:
        return Verdict("wait", f"{reason} (asked again for up to {duration_text(bound)}; "
                               f"{duration_text(waited)} so far)")
    return Verdict("blocked", f"no verdict within {duration_text(bound)}: {reason}")


def verifier_said(output: str) -> str:
    """What a verifier gave as its reason: notation's per-signature refusals (--verbose), else its
    last line without cosign's prefix; cut short, never more than a line."""
    refusals = re.findall(r"failed verification with error: (.*)", output)
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith("WARNING")]
    said = "; ".join(dict.fromkeys(refusals)) or (lines[-1] if lines else "no output")
    said = said.removeprefix("Error: ").removeprefix("error during command execution: ")
    return said if len(said) <= 300 else said[:297] + "..."


def signature_reason(tool: str, returncode: int, output: str) -> str:
    """A refusal's reason: the operator's words, then the verifier's own (cut short)."""
    said = verifier_said(output)
    if tool == "cosign" and returncode == COSIGN_UNSIGNED:
        words = UNSIGNED
    else:
        words = next((words for pattern, words in SIGNATURE_REASONS if pattern.search(said)), "not verified")
    return f"{words} ({tool}: {said})"



# --------------------------------------------------------------------------- deciding (pure)

class Hint(NamedTuple):
    """Service `service` (as listed) should run `digest` of the tag `push` names, because of `push`: an
    event (its id, time and trigger: push, scan, signature) or a reconcile pass (push.reconcile)."""
    service: dict
    push: Push
    digest: str

    @property
    def image(self) -> str:
        return pinned_image(uses_image(self.service, self.push), self.push.tag, self.digest)


class GateSaid(NamedTuple):
    gate: str  # the gate's name: "scan gate", "signature gate"
    verdict: Verdict | None  # None: the gate does not gate this service


class Facts(NamedTuple):
    """What the shell read about a hint, in the order decide() asks for it: a fact is read only when no
    earlier one decides (no task history read, no verifier run, for a hint already decided)."""
    failure_read: bool = False
    failure: str | None = None  # why the digest must not roll here (its failure record, Swarm's rollback)
    release: Release | None = None  # the release policy's answer; None: not read yet
    verdicts: tuple[GateSaid, ...] = ()  # the gates asked so far, in their order
    before: JobRun | None = None  # what its pre-rollout job (BEFORE_LABEL) says of the digest; None: not read
    image: str | None = None  # ECR's imageStatus of the digest, known with the tag's answer (given, never asked)


GATE_ACTIONS = {"wait": "wait for gate", "gone": "gone", "blocked": "block"}  # a gate's verdict -> what is done


class Decision(NamedTuple):
    """What to do about a hint. action: "deploy"; "nothing" (reason: why, as logged); "refused" (its version
    policy cannot be read: reason says why, once); "hold back" (its
    rollout failed here; record: write the failure record Swarm's own rollback left unwritten); "not
    released" (the release policy's wait or hold); "wait for gate", "gone", "block" (a gate's verdict, or
    its pre-rollout job's: record, a failure record too); "run job", "wait for job" (its pre-rollout job);
    "archived" (ECR holds the digest archived or is restoring it: no node could pull it; release: held or
    wait, said as the release policy's); or "ask" (reason names the fact to read next: "failure", "release", "gate" or "before job")."""
    action: str
    reason: str = ""
    release: Release | None = None
    gate: str = ""
    record: bool = False


def skip_reason(service: dict, push: Push, digest: str) -> str | None:
    """Why a service needs no update to the digest (a Swarm job, or it runs it already), or None."""
    if is_job(service["Spec"]) and not reruns_on_push(service["Spec"]) and \
            (owner := (service["Spec"].get("Labels") or {}).get(BEFORE_FOR_LABEL)):
        return f"is the pre-rollout job of {owner}: it runs before that service rolls, not on a push of its own"
    if is_job(service["Spec"]) and not reruns_on_push(service["Spec"]):
        return f"is a Swarm job, which an update would run again; skipped (label it {RERUN_JOB_LABEL}=true to " \
               f"re-run it on every push)"
    if runs_digest(service, digest):
        return f"already runs {pinned_image(uses_image(service, push), push.tag, digest)}; nothing to do"
    return None


def versions_say(service: dict, push: Push) -> Decision | None:
    """For a service that follows versions: whether its policy takes the hint's tag (None: go on deciding),
    refused if its label cannot be read, nothing (saying why) for an older or not admitted version."""
    if not follows_versions(service):
        return None
    policy, malformed = policy_or_why_not(service)
    if malformed:
        return Decision("refused", malformed)
    why = why_not_to(policy, push.tag, following(service))
    return Decision("nothing", f"is not moved: {why}") if why else None


def decide(hint: Hint, facts: Facts, gates: int) -> Decision:
    """What to do about a hint, from the service as listed, the facts read so far and the number of
    gates: the push path and the reconcile pass both come here."""
    service, push, digest = hint
    versions = versions_say(service, push)
    if versions:
        return versions
    skip = skip_reason(service, push, digest)
    if skip:
        return Decision("nothing", skip)
    status = service.get("UpdateStatus") or {}
    if status.get("State") == "rollback_started":  # a post would cancel it
        return Decision("nothing", "is being rolled back by Swarm; not rolled now")
    unpullable = archived_release(push, digest, facts.image)
    if unpullable:
        return Decision("archived", unpullable.reason, release=unpullable)
    if not facts.failure_read:
        return Decision("ask", "failure")
    if facts.failure:  # (not after rollback_paused: a re-post would resume that rollback)
        record = failed_digest(service) != digest and status.get("State") == "rollback_completed"
        return Decision("hold back", facts.failure, record=record)
    if facts.release is None:
        return Decision("ask", "release")
    if facts.release.decision != "deploy":
        return Decision("not released", facts.release.reason, release=facts.release)
    for said in facts.verdicts:
        if said.verdict is not None and said.verdict.decision in GATE_ACTIONS:
            return Decision(GATE_ACTIONS[said.verdict.decision], said.verdict.reason, gate=said.gate)
    if len(facts.verdicts) < gates:
        return Decision("ask", "gate")
    if push.trigger != "push" and not any(said.verdict for said in facts.verdicts):
        return Decision("nothing", f"has no scan or signature gate: a {push.trigger} event does not roll it")
    if BEFORE_LABEL in (service["Spec"].get("Labels") or {}):
        if facts.before is None:
            return Decision("ask", "before job")
        gate = f"{JOB_GATE} {str(service['Spec']['Labels'][BEFORE_LABEL]).strip()}"
        if facts.before.state in JOB_ACTIONS:
            return Decision(JOB_ACTIONS[facts.before.state], facts.before.reason, gate=gate,
                            record=facts.before.state in ("failed", "timed out"))
    return Decision("deploy")


# What a pre-rollout job's run (JobRun.state) has done about the hint; "completed": it rolls.
JOB_ACTIONS = {"start": "run job", "busy": "wait for job", "running": "wait for job", "failed": "block",
               "timed out": "block", "missing": "block", "not a job": "block", "invalid": "block"}


# --------------------------------------------------------------------------- AWS shell

# Every AWS call is bounded, so that no single step outlives the watchdog (Systemd.HEALTHY_FOR):
# each attempt heartbeats, and botocore's standard mode retries (with backoff) only a few times.
# SQS gets no botocore retry: each of its calls is retried anyway, a receive by the loop's Backoff
# (with a log line), an extension by the hold's next turn, a delete by redelivery. SQS's read timeout
# outlasts a 20 s long poll; ECR answers in milliseconds.
CONNECT_TIMEOUT = 5
SQS_READ_TIMEOUT = 25
SQS_CONFIG = botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 1},
                                    connect_timeout=CONNECT_TIMEOUT, read_timeout=SQS_READ_TIMEOUT)
ECR_CONFIG = botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 3},
                                    connect_timeout=CONNECT_TIMEOUT, read_timeout=10)
SQS_MAX_MESSAGES = 10
DEFAULT_VISIBILITY_TIMEOUT = 30  # s: SQS's default, assumed when the role may not read the queue's own
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


class Misconfigured(Exception):
    """A setting that waiting cannot fix, found at start: one line and exit 3 (systemd's restart
    policy and start limits take it from there)."""


class QueueNotFound(AwsError, Misconfigured):
    """Fatal at start: waiting will not make a wrong queue name right (later, a queue being
    recreated is an outage like any other)."""


class AccessDenied(AwsError, Misconfigured):
    """Fatal at start: the role lacks a permission (later, revoked credentials are an outage)."""

    @classmethod
    def wrap(cls, error: Exception, doing: str) -> AwsError:
        wrapped = AwsError.wrap(error, doing)
        return cls(str(wrapped)) if error_code(error) in ACCESS_DENIED else wrapped


class TagImmutable(AwsError):
    """ECR refuses to move a tag of a tag-immutable repository (ImageTagAlreadyExistsException): only the
    operator can change that; the message says how."""


QUEUE_MISSING = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")
ACCESS_DENIED = ("AccessDenied", "AccessDeniedException")
AWS_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)


def aws_client(session: botocore.session.Session, service: str, region: str | None,
               config: botocore.config.Config, on_request=None):
    """A botocore client whose every attempt (retries included) calls on_request(): a heartbeat."""
    try:
        client = session.create_client(service, region_name=region, config=config)
    except botocore.exceptions.NoRegionError:
        raise Misconfigured("no AWS region: set AWS_REGION, or give the queue's full URL") from None
    if on_request:
        client.meta.events.register("before-send", on_request)
    return client


def chunks(messages: list[dict]) -> list[list[dict]]:
    """SQS batch calls take ten entries at most."""
    return [messages[start:start + SQS_MAX_MESSAGES] for start in range(0, len(messages), SQS_MAX_MESSAGES)]


class Queue:
    def __init__(self, session: botocore.session.Session, name_or_url: str, on_request=None):
        url_region = SQS_URL_REGION.match(name_or_url)
        region = (url_region[1] or url_region[2]) if url_region else None
        self.name = name_or_url
        # A queue URL names its region; it wins over the default region if they differ.
        self._sqs = aws_client(session, "sqs", region or session.get_config_variable("region"), SQS_CONFIG,
                               on_request)
        self.url = name_or_url if name_or_url.startswith(("https://", "http://")) else None
        self.visibility_timeout, self.visibility_source = DEFAULT_VISIBILITY_TIMEOUT, "assumed"

    def _error(self, error: Exception, doing: str) -> AwsError:
        code = error_code(error)
        if code in QUEUE_MISSING:
            return QueueNotFound(f"SQS queue {self.url or repr(self.name)} does not exist"
                                 + ("" if self.url else f" in {self._sqs.meta.region_name}"))
        if code in ACCESS_DENIED:
            return AccessDenied.wrap(error, doing)
        return AwsError.wrap(error, doing)

    def resolve(self) -> None:
        """GetQueueUrl, once per process; an unknown queue is a fatal error."""
        if self.url:
            return
        try:
            self.url = self._sqs.get_queue_url(QueueName=self.name)["QueueUrl"]
        except AWS_ERRORS as e:
            raise self._error(e, f"cannot find SQS queue {self.name!r}") from None

    def read_visibility_timeout(self) -> None:
        """The queue's own VisibilityTimeout, once at start. sqs:GetQueueAttributes is optional:
        without it, SQS's default is assumed (and the start line says so)."""
        try:
            attributes = self._sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=["VisibilityTimeout"])
            self.visibility_timeout = int(attributes["Attributes"]["VisibilityTimeout"])
            self.visibility_source = "the queue's"
        except AWS_ERRORS as e:
            error = self._error(e, f"cannot read the attributes of {self.url}")
            if not isinstance(error, AccessDenied):
                raise error from None
            self.visibility_source = "SQS's default, assumed: no sqs:GetQueueAttributes"

    def receive(self, wait_seconds: int) -> list[dict]:
        try:
            reply = self._sqs.receive_message(
                QueueUrl=self.url, MaxNumberOfMessages=SQS_MAX_MESSAGES, WaitTimeSeconds=wait_seconds,
                MessageSystemAttributeNames=["ApproximateReceiveCount", "ApproximateFirstReceiveTimestamp"])
        except AWS_ERRORS as e:
            raise self._error(e, f"cannot receive from {self.url}") from None
        return reply.get("Messages", [])

    def extend(self, messages: list[dict], seconds: int) -> None:
        """ChangeMessageVisibilityBatch: the messages stay invisible for `seconds` more. A failure
        costs nothing yet (the hold tries again well before they would reappear), and a message
        deleted meanwhile is no failure at all: both are logged at debug level only."""
        for chunk in chunks(messages):
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": seconds}
                       for i, m in enumerate(chunk)]
            try:
                reply = self._sqs.change_message_visibility_batch(QueueUrl=self.url, Entries=entries)
            except AWS_ERRORS as e:
                log.debug("%s", AwsError.wrap(e, "cannot extend the visibility of held messages"))
                continue
            for failure in reply.get("Failed", []):
                log.debug("Cannot extend the visibility of message %s: %s", chunk[int(failure["Id"])]["MessageId"],
                          failure.get("Code"))

    def delete(self, messages: list[dict]) -> set[str]:
        """DeleteMessageBatch in chunks of ten; returns the ids of messages not deleted."""
        failed: set[str] = set()
        for chunk in chunks(messages):
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


# --------------------------------------------------------------------------- ECR shell

class TagAnswer(NamedTuple):
    """What ECR says a tag points to now."""
    digest: str
    pushed_at: datetime | None  # imagePushedAt: ECR's clock
    answered_at: datetime | None  # the Date of ECR's answer: ECR's clock too, so the age needs no other
    media_type: str | None = None  # imageManifestMediaType: an image index is gated on its platform images
    status: str | None = None  # imageStatus: ARCHIVED and ACTIVATING cannot be pulled; None: not said (ACTIVE)

    @property
    def age(self) -> float | None:
        return (self.answered_at - self.pushed_at).total_seconds() if self.pushed_at and self.answered_at else None

    @property
    def pushed_text(self) -> str:
        return utc_text(self.pushed_at.timestamp()) if self.pushed_at else ""


def answer_date(reply: dict) -> datetime | None:
    """The Date of an HTTP answer (AWS's or Docker's clock), in UTC."""
    try:
        return in_utc(email.utils.parsedate_to_datetime(reply["ResponseMetadata"]["HTTPHeaders"]["date"]))
    except (KeyError, TypeError, ValueError):
        return None


def in_utc(moment: datetime | None) -> datetime | None:
    """An aware datetime; a naive one (a Date header written with -0000, say) is taken as UTC."""
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


@dataclass
class Token:
    username: str
    password: str
    refresh_at: float  # half-way to expiry
    cycle: int  # drain cycle that fetched it: an already-expired token lives for that cycle only


class Manifest(NamedTuple):
    digest: str
    text: str  # the manifest's bytes as ECR keeps them
    media_type: str | None  # imageManifestMediaType


# BatchGetImage converts a manifest to the first accepted type it can (and answers Docker's by default):
# every type a push can leave, so that ECR hands back the bytes as they were pushed.
MANIFEST_MEDIA_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
                        "application/vnd.docker.distribution.manifest.list.v2+json",
                        "application/vnd.docker.distribution.manifest.v2+json")
DESCRIBE_IMAGES_MAX_IDS = 100  # ECR's limit of image ids per DescribeImages call
LIST_IMAGES_MAX_RESULTS = 1000  # ECR's largest page of ListImages (without maxResults it pages by 100)
SCAN_ERRORS = {"ScanNotFoundException": "NOT_FOUND", "AccessDeniedException": "DENIED",
               "ImageNotFoundException": "GONE", "RepositoryNotFoundException": "GONE"}


def next_page(reply: dict, tokens: set, doing: str) -> str | None:
    """The nextToken of one page of a paged ECR answer, None after the last; a token answered twice is an
    error (every call is bounded, so must the paging be)."""
    token = reply.get("nextToken")
    if token in tokens:
        raise AwsError(f"ECR answered the same nextToken twice {doing}")
    tokens.add(token)
    return token


class Ecr:
    def __init__(self, session: botocore.session.Session, on_request=None):
        self._session = session
        self._on_request = on_request
        self._clients: dict[str, object] = {}
        self._client_lock = threading.Lock()
        self._tokens: dict[tuple[str, str], Token] = {}
        self.media_types: dict[tuple, str] = {}  # (account, region, repository, digest) -> as DescribeImages said
        self.tag_listings: dict[tuple, dict[str, str]] = {}  # (account, region, repository) -> {tag: digest}
        self._listing_locks: dict[tuple, threading.Lock] = {}
        self.cycle = 0
        self.kept = EcrKeptImages(self)  # the calls that keep the images services run

    def new_cycle(self, fresh_tokens: bool = False) -> None:
        """A drain cycle (or refresh pass) begins: already-expired tokens are not reused past it."""
        self.cycle += 1
        self.media_types.clear()  # (a digest's never changes; this only bounds the memory)
        self.tag_listings.clear()  # (tags come and go: each cycle lists anew)
        self._listing_locks.clear()
        if fresh_tokens:
            self._tokens.clear()

    def _client(self, region: str):
        with self._client_lock:  # a client is thread-safe, botocore's session (which makes them) is not
            if region not in self._clients:
                self._clients[region] = aws_client(self._session, "ecr", region, ECR_CONFIG, self._on_request)
            return self._clients[region]

    def current_digest(self, push: Push) -> TagAnswer | None:
        """What REPOSITORY:TAG points to now (None if the tag or repository is gone)."""
        return self.tag_digests(push.account, push.region, push.repository, [push.tag]).get(push.tag)

    def tag_digests(self, account: str, region: str, repository: str, tags) -> dict[str, TagAnswer]:
        """tag -> what it points to now, for the tags that exist: one DescribeImages per 100 tags. ECR
        fails a whole call for one missing tag; that batch is then asked tag by tag (a tag deleted since:
        rare)."""
        tags, found = sorted(set(tags)), {}
        for start in range(0, len(tags), DESCRIBE_IMAGES_MAX_IDS):
            batch = tags[start:start + DESCRIBE_IMAGES_MAX_IDS]
            replies = [self._describe_images(account, region, repository, batch)]
            if replies[0] is None and len(batch) > 1:
                replies = [self._describe_images(account, region, repository, [tag]) for tag in batch]
            for reply in filter(None, replies):
                answered_at = answer_date(reply)
                for detail in reply.get("imageDetails", []):
                    digest, pushed_at = detail.get("imageDigest"), detail.get("imagePushedAt")
                    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
                        raise AwsError(f"ECR answered an invalid digest {shown(digest)} for {repository}")
                    media_type = detail.get("imageManifestMediaType")
                    media_type = media_type if isinstance(media_type, str) else None
                    if media_type:  # the scan gate needs no BatchGetImage to know a single image from an index
                        self.media_types[(account, region, repository, digest)] = media_type
                    status = detail.get("imageStatus")
                    answer = TagAnswer(digest, in_utc(pushed_at) if isinstance(pushed_at, datetime) else None,
                                       answered_at, media_type, status if isinstance(status, str) else None)
                    found.update((tag, answer) for tag in detail.get("imageTags") or [] if tag in batch)
        return found

    def list_tags(self, account: str, region: str, repository: str,
                  page_size: int = LIST_IMAGES_MAX_RESULTS) -> dict[str, str]:
        """tag -> digest, for every tag of the repository ({} if it is gone): one paged ListImages of the
        tagged images per repository and cycle, however many services follow versions in it."""
        key = (account, region, repository)
        with self._client_lock:
            lock = self._listing_locks.setdefault(key, threading.Lock())
        with lock:  # services of one repository looked up at once: the others wait for the one listing
            if key not in self.tag_listings:
                self.tag_listings[key] = self._list_tags(account, region, repository, page_size)
            return dict(self.tag_listings[key])

    def _list_tags(self, account: str, region: str, repository: str, page_size: int) -> dict[str, str]:
        tags, token, tokens = {}, None, set()
        while True:
            try:
                reply = self._client(region).list_images(
                    registryId=account, repositoryName=repository, filter={"tagStatus": "TAGGED"},
                    maxResults=page_size, **({"nextToken": token} if token else {}))
            except AWS_ERRORS as e:
                if error_code(e) == "RepositoryNotFoundException":
                    return {}
                raise AccessDenied.wrap(e, f"cannot list the tags of {repository} in ECR ({account}, {region})") \
                    from None
            for image in reply.get("imageIds") or []:  # one entry per tag: an image with two tags comes twice
                tag, digest = image.get("imageTag"), image.get("imageDigest")
                if not is_valid("digest", digest):
                    raise AwsError(f"ECR answered an invalid digest {shown(digest)} for {repository}")
                if is_valid("tag", tag):
                    tags[tag] = digest
            token = next_page(reply, tokens, f"listing the tags of {repository}")
            if not token:
                return tags

    def _describe_images(self, account: str, region: str, repository: str, tags: list[str]) -> dict | None:
        """DescribeImages of these tags; None if one of them (or the repository) does not exist. Of every
        storage class (filter imageStatus ANY): without it ECR describes ACTIVE images only, and a tag whose
        image a lifecycle rule archived would read as a tag gone."""
        try:
            return self._client(region).describe_images(
                registryId=account, repositoryName=repository, filter={"imageStatus": "ANY"},
                imageIds=[{"imageTag": tag} for tag in tags])
        except AWS_ERRORS as e:
            if error_code(e) == "RepositoryNotFoundException":
                return {}  # no repository, no tags: not worth asking tag by tag
            if error_code(e) == "ImageNotFoundException":
                return None
            where = f"{repository}:{tags[0]}" if len(tags) == 1 else f"{len(tags)} tags of {repository}"
            raise AccessDenied.wrap(e, f"cannot look up {where} in ECR ({account}, {region})") from None

    def manifest(self, account: str, region: str, repository: str, image_id: dict) -> Manifest | None:
        """The manifest ECR holds for {"imageDigest": …} or {"imageTag": …} (BatchGetImage), None if
        there is no such image (or repository)."""
        what = image_id.get("imageDigest") and f"@{image_id['imageDigest']}" or f":{image_id.get('imageTag')}"
        try:
            reply = self._client(region).batch_get_image(
                registryId=account, repositoryName=repository, imageIds=[image_id],
                acceptedMediaTypes=list(MANIFEST_MEDIA_TYPES))
        except AWS_ERRORS as e:
            if error_code(e) in ("RepositoryNotFoundException", "ImageNotFoundException"):
                return None
            raise AccessDenied.wrap(e, f"cannot read the manifest of {repository}{what} in ECR ({account}, "
                                       f"{region})") from None
        image = next(iter(reply.get("images") or []), None)
        if image is None:
            return None
        digest, text = (image.get("imageId") or {}).get("imageDigest"), image.get("imageManifest")
        if not is_valid("digest", digest) or not isinstance(text, str):
            raise AwsError(f"ECR answered an invalid manifest for {repository}{what}")
        media_type = image.get("imageManifestMediaType")
        return Manifest(digest, text, media_type if isinstance(media_type, str) else None)

    def signed_image(self, signed: Signed) -> tuple[str, list[str]] | None:
        """The image a signature names as its subject, and that image's tags now: the signature's manifest
        (unless the event named the subject), DescribeImages of the subject. None when either is gone (or
        there is no subject)."""
        subject = signed.subject
        if not subject:
            signature = self.manifest(signed.account, signed.region, signed.repository, {"imageDigest": signed.digest})
            try:
                subject = signature and (json.loads(signature.text).get("subject") or {}).get("digest")
            except (ValueError, AttributeError):  # not a manifest we can read: it names no image
                return None
        if not is_valid("digest", subject):
            return None
        try:
            details = self._client(signed.region).describe_images(
                registryId=signed.account, repositoryName=signed.repository,
                imageIds=[{"imageDigest": subject}]).get("imageDetails") or []
        except AWS_ERRORS as e:
            if error_code(e) in ("ImageNotFoundException", "RepositoryNotFoundException"):
                return None
            raise AccessDenied.wrap(e, f"cannot look up {signed.repository}@{subject} in ECR ({signed.account}, "
                                       f"{signed.region})") from None
        return subject, [tag for detail in details for tag in detail.get("imageTags") or [] if is_valid("tag", tag)]

    def promote(self, account: str, region: str, repository: str, digest: str, tag: str) -> bool:
        """Tag the digest as TAG with its own manifest bytes (an image index stays an index, the digest does
        not change). False if TAG was there already (another manager, a redelivery): nothing done twice.
        TagImmutable if ECR refuses to move TAG (a tag-immutable repository)."""
        manifest = self.manifest(account, region, repository, {"imageDigest": digest})
        if manifest is None:
            raise AwsError(f"ECR has no manifest of {repository}@{digest}")
        try:
            media_type = manifest.media_type or json.loads(manifest.text).get("mediaType")
            self._client(region).put_image(registryId=account, repositoryName=repository, imageManifest=manifest.text,
                                           imageManifestMediaType=media_type, imageTag=tag, imageDigest=digest)
        except AWS_ERRORS as e:
            if error_code(e) == "ImageAlreadyExistsException":
                return False
            if error_code(e) == "ImageTagAlreadyExistsException":  # (the ECR API Reference, PutImage)
                try:  # (its settings, so that the fix keeps every other tag as it is)
                    described = self.repository(account, region, repository)
                except AwsError:
                    described = None
                raise TagImmutable(immutable_tag_fix(account, region, repository, tag, described)) from None
            raise AccessDenied.wrap(e, f"cannot tag {repository}@{digest} as {tag} in ECR ({account}, {region})") \
                from None
        except (ValueError, AttributeError):
            raise AwsError(f"ECR holds a manifest of {repository}@{digest} that is not JSON") from None
        return True

    def scan(self, account: str, region: str, repository: str, digest: str) -> Scan:
        """ECR's scan of the digest (DescribeImageScanFindings), with the time of ECR's answer.
        The counts are totals: one finding per page is enough."""
        try:
            reply = self._client(region).describe_image_scan_findings(
                registryId=account, repositoryName=repository, imageId={"imageDigest": digest}, maxResults=1)
        except AWS_ERRORS as e:
            if error_code(e) in SCAN_ERRORS:
                return Scan(SCAN_ERRORS[error_code(e)], {})
            raise AwsError.wrap(e, f"cannot read the ECR scan of {repository}@{digest}") from None
        status, findings = reply.get("imageScanStatus") or {}, reply.get("imageScanFindings") or {}
        return Scan(status.get("status", "?"), findings.get("findingSeverityCounts") or {},
                    status.get("description") or "", completed_at=findings.get("imageScanCompletedAt"),
                    answered_at=answer_date(reply))

    def repository(self, account: str, region: str, repository: str) -> dict:
        """DescribeRepositories of one repository: its tag mutability, for --status."""
        try:
            return self._client(region).describe_repositories(
                registryId=account, repositoryNames=[repository])["repositories"][0]
        except (*AWS_ERRORS, KeyError, IndexError) as e:
            raise AwsError.wrap(e, f"cannot describe {repository} in ECR ({account}, {region})") from None

    def credentials(self, account: str, region: str) -> tuple[str, str]:
        """(username, password) for the registry, cached and refreshed at half its lifetime."""
        now = time.time()
        token = self._tokens.get((account, region))
        if token is None or (now >= token.refresh_at and token.cycle != self.cycle):
            try:
                data = self._client(region).get_authorization_token(registryIds=[account])["authorizationData"][0]
                username, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
                expires = data["expiresAt"].timestamp()
            except (*AWS_ERRORS, KeyError, IndexError, ValueError, AttributeError) as e:
                raise AwsError.wrap(e, f"cannot get an ECR token for {account} in {region}") from None
            token = Token(username, password, now + max(0.0, (expires - now) / 2), self.cycle)
            self._tokens[(account, region)] = token
        return token.username, token.password


# --------------------------------------------------------------------------- ECR shell: images kept

LIFECYCLE_PREVIEW_TIMEOUT = 120.0  # s: ECR evaluates a preview in seconds, a large repository in a minute or two
LIFECYCLE_PREVIEW_POLL = 1.0  # s
LIFECYCLE_PREVIEW_PAGE = 100  # GetLifecyclePolicyPreview's largest page: maxResults "between 1 and 100" (not 1000)


class EcrKeptImages:
    """The ECR calls that keep the images services run and roll back to: their storage class
    (DescribeImages, UpdateImageStorageClass), protection tags (PutImage as promotion does, BatchDeleteImage
    of a tag), and the repository's lifecycle policy with ECR's preview of it."""

    def __init__(self, ecr: Ecr):
        self.ecr = ecr

    def image_statuses(self, account: str, region: str, repository: str, digests) -> dict[str, str | None]:
        """digest -> ECR's imageStatus (ACTIVE, ARCHIVED, ACTIVATING), None for a digest ECR no longer has:
        one DescribeImages per 100 digests, of every storage class (filter imageStatus ANY: without it
        ECR describes ACTIVE images only). ECR fails a whole call for one missing image; that batch is
        then asked in halves, down to the missing ones (about 2·log2(100) calls more for one gone image).
        Not BatchGetImage: that is a pull, and what a lifecycle rule by last pull time must not be told."""
        digests, statuses = sorted(set(digests)), {}
        batches = [digests[start:start + DESCRIBE_IMAGES_MAX_IDS]
                   for start in range(0, len(digests), DESCRIBE_IMAGES_MAX_IDS)]
        while batches:
            batch = batches.pop()
            reply = self._describe_digests(account, region, repository, batch)
            if reply is None and len(batch) > 1:
                batches += [batch[:len(batch) // 2], batch[len(batch) // 2:]]
                continue
            statuses.update(dict.fromkeys(batch))
            for detail in (reply or {}).get("imageDetails", []):
                if detail.get("imageDigest") in statuses:
                    status = detail.get("imageStatus")
                    statuses[detail["imageDigest"]] = status if isinstance(status, str) else "ACTIVE"
        return statuses

    def _describe_digests(self, account: str, region: str, repository: str, digests: list[str]) -> dict | None:
        try:
            return self.ecr._client(region).describe_images(
                registryId=account, repositoryName=repository, filter={"imageStatus": "ANY"},
                imageIds=[{"imageDigest": digest} for digest in digests])
        except AWS_ERRORS as e:
            if error_code(e) == "RepositoryNotFoundException":
                return {}
            if error_code(e) == "ImageNotFoundException":
                return None
            raise AccessDenied.wrap(e, f"cannot look up {len(digests)} image(s) of {repository} in ECR "
                                       f"({account}, {region})") from None

    def restore_image(self, account: str, region: str, repository: str, digest: str) -> str | None:
        """UpdateImageStorageClass to STANDARD: ECR's imageStatus after the call (ACTIVATING while it restores)."""
        try:
            reply = self.ecr._client(region).update_image_storage_class(
                registryId=account, repositoryName=repository, imageId={"imageDigest": digest},
                targetStorageClass="STANDARD")
        except AWS_ERRORS as e:
            raise AccessDenied.wrap(e, f"cannot restore {repository}@{short_digest(digest)} in ECR "
                                       f"({account}, {region})") from None
        return reply.get("imageStatus")

    def untag(self, account: str, region: str, repository: str, tag: str) -> None:
        """BatchDeleteImage of one tag: ECR removes the tag only, and the image with it only when it was the
        image's last tag (the Amazon ECR API Reference, BatchDeleteImage). A tag already gone is no error."""
        try:
            reply = self.ecr._client(region).batch_delete_image(
                registryId=account, repositoryName=repository, imageIds=[{"imageTag": tag}])
        except AWS_ERRORS as e:
            if error_code(e) == "RepositoryNotFoundException":
                return
            raise AccessDenied.wrap(e, f"cannot remove the tag {repository}:{tag} in ECR ({account}, {region})") \
                from None
        failures = [f for f in reply.get("failures") or [] if f.get("failureCode") != "ImageNotFound"]
        if failures:
            raise AwsError(f"cannot remove the tag {repository}:{tag} in ECR ({account}, {region}): "
                           f"{shown(failures[0].get('failureReason') or failures[0].get('failureCode'))}")

    def lifecycle_policy(self, account: str, region: str, repository: str) -> str | None:
        """GetLifecyclePolicy: the policy's text, None if the repository has none."""
        try:
            return self.ecr._client(region).get_lifecycle_policy(
                registryId=account, repositoryName=repository).get("lifecyclePolicyText")
        except AWS_ERRORS as e:
            if error_code(e) in ("LifecyclePolicyNotFoundException", "RepositoryNotFoundException"):
                return None
            raise AccessDenied.wrap(e, f"cannot read the lifecycle policy of {repository} in ECR ({account}, "
                                       f"{region})") from None

    def start_lifecycle_preview(self, account: str, region: str, repository: str) -> bool:
        """StartLifecyclePolicyPreview of the repository's policy as it stands; False while another preview of
        the repository is in progress (ECR runs one at a time: ask again once it is done)."""
        try:
            self.ecr._client(region).start_lifecycle_policy_preview(registryId=account, repositoryName=repository)
        except AWS_ERRORS as e:
            if error_code(e) == "LifecyclePolicyPreviewInProgressException":
                return False
            raise AccessDenied.wrap(e, f"cannot preview the lifecycle policy of {repository} in ECR ({account}, "
                                       f"{region})") from None
        return True

    def lifecycle_preview(self, account: str, region: str, repository: str) -> list[dict] | None:
        """GetLifecyclePolicyPreview, paged: ECR's own evaluation of the policy, the images a rule would expire
        or archive now, each with its action and appliedRulePriority; None while ECR is still evaluating."""
        client, where = self.ecr._client(region), {"registryId": account, "repositoryName": repository}
        what = f"the lifecycle policy of {repository} in ECR ({account}, {region})"
        results, token, tokens = [], None, set()
        while True:
            try:
                reply = client.get_lifecycle_policy_preview(**where, maxResults=LIFECYCLE_PREVIEW_PAGE,
                                                            **({"nextToken": token} if token else {}))
            except AWS_ERRORS as e:
                raise AccessDenied.wrap(e, f"cannot preview {what}") from None
            if reply.get("status") == "IN_PROGRESS":
                return None
            if reply.get("status") != "COMPLETE":
                raise AwsError(f"ECR's preview of {what} ended {shown(reply.get('status'))}")
            results += reply.get("previewResults") or []
            token = next_page(reply, tokens, f"previewing {what}")
            if not token:
                return results


# --------------------------------------------------------------------------- Docker shell

# Requests go at the daemon's own API version, whatever it is: a daemon strips from a posted spec
# every field newer than the request's version (moby's adjustForAPIVersion: under 1.52 SwapBytes and
# MemorySwappiness, under 1.46 OomScoreAdj and tmpfs options, ...), so a spec read and posted back at
# any older version loses settings, and a resources change replaces every task. The oldest: Docker
# 20.10, where Swarm jobs and a service's capabilities, ulimits and pids limit arrived.
OLDEST_API = (1, 41)
DOCKER_TIMEOUT = (5, 30)  # s: connect, read
PING_TIMEOUT = (5, 5)
# A swarm manager holds API calls while the swarm has no leader (an election takes 10-20 s):
# say so while it happens, rather than sit silent until the answer or the timeout.
SLOW_DOCKER_CALL = 5.0
EVENTS_IDLE_TIMEOUT = 3600  # s: the service index relists after an hour without any service event
SETTLE_TIMEOUT = 2.0  # s: a lookup waits this long for the events read to be applied, else relists
EVENTS_QUIET = 0.05  # s: the index inspects what events named once the stream is this quiet (a push's updates
EVENTS_DEFER_MAX = 0.5  # s: come a few ms apart), or once they waited this long, or when a lookup asks
REMOVED_KEPT = 120.0  # s: a removal outweighs any listing made before it; a listing takes at most DOCKER_TIMEOUT
ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


class DockerError(Exception):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status

    @property
    def out_of_sequence(self) -> bool:
        # dockerd 20.10 answers 500 "update out of sequence"; newer ones 409.
        return self.status == 409 or "out of sequence" in str(self).lower()


class SlowCalls:
    """Warns about each Docker call still unanswered after SLOW_DOCKER_CALL, from one daemon thread for
    all of them (a Timer per call would start a thread on every call: CPU on each update of a fan-out)."""

    def __init__(self):
        self._changed = threading.Condition()  # guards all below
        self._calls: dict[object, tuple[float, str]] = {}  # in flight and not yet warned about: started, call
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, call: str):
        """Log a warning if the call takes longer than SLOW_DOCKER_CALL, and how long it took."""
        token, started = object(), time.monotonic()
        with self._changed:
            self._calls[token] = (started, call)
            if self._thread is None:
                self._thread = threading.Thread(target=self._warn, name="slow-docker-calls", daemon=True)
                self._thread.start()
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                self._calls.pop(token, None)
        if time.monotonic() - started >= SLOW_DOCKER_CALL:  # (a failed call's error is logged by its caller)
            log.info("Docker answered %s after %.1fs", call, time.monotonic() - started)

    def _warn(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                slow = [token for token, (started, _) in self._calls.items() if now - started >= SLOW_DOCKER_CALL]
                late = [self._calls.pop(token)[1] for token in slow]
                if not late:
                    first = min((started for started, _ in self._calls.values()), default=None)
                    self._changed.wait(None if first is None else first + SLOW_DOCKER_CALL - now)
            for call in late:
                log.warning("Docker has not answered %s for %.0fs; still waiting (a swarm manager holds calls "
                            "while the swarm elects a leader)", call, SLOW_DOCKER_CALL)


warning_if_slow = SlowCalls().watch


def api_version_to_use(daemon_version: object, socket: str) -> str:
    """The daemon's own API version ("1.51"), or Misconfigured for a daemon older than OLDEST_API."""
    match = re.fullmatch(r"(\d+)\.(\d+)", daemon_version) if isinstance(daemon_version, str) else None
    if match is None:
        raise DockerError(f"Docker at {socket} answered GET /version without an API version ({daemon_version!r})")
    if (int(match[1]), int(match[2])) < OLDEST_API:
        oldest = ".".join(map(str, OLDEST_API))
        raise Misconfigured(f"Docker at {socket} speaks API {daemon_version}; ecr-deploy needs {oldest} or newer "
                            "(Docker 20.10 or newer)")
    return f"{int(match[1])}.{int(match[2])}"


class ServiceRead(dict):
    """A service as Docker answered it, and the API version it answered at: what is posted back goes at
    that version (Docker.update_service), whichever client read it (the service index's thread has its own)."""
    __slots__ = ("api_version",)

    def __init__(self, service: dict, api_version: str | None):
        super().__init__(service)
        self.api_version = api_version


class Docker:
    """A thin Docker Engine API client over the unix socket."""

    def __init__(self, docker_host: str | None, on_request=None):
        docker_host = docker_host or "unix:///var/run/docker.sock"
        if not docker_host.startswith("unix://"):
            raise Misconfigured(f"DOCKER_HOST must be unix:///path, not {docker_host!r}")
        self.socket = docker_host[len("unix://"):]
        self._base = "http+unix://" + urllib.parse.quote(self.socket, safe="")
        self._session = requests_unixsocket.Session()
        self._prefix: str | None = None
        self._on_request = on_request or (lambda: None)  # a heartbeat: each call is bounded, and progress
        self.api_version: str | None = None
        self.date: datetime | None = None  # the Date of Docker's last answer: Swarm's clock, for soak times
        self.answering = True  # False once a call could not reach Docker, until a call (or ping) does

    def _send(self, method: str, path: str, timeout=DOCKER_TIMEOUT, **kwargs) -> requests.Response:
        try:
            reply = self._session.request(method, self._base + path, timeout=timeout, **kwargs)
        except requests.RequestException as e:
            self.answering = False
            self.forget_version()
            reason = ERRNO_TEXT.search(str(e))
            raise DockerError(f"cannot reach Docker at {self.socket}: "
                              f"{reason[1] if reason else type(e).__name__}") from None
        self.answering = True
        self.date = answer_date({"ResponseMetadata": {"HTTPHeaders": {"date": reply.headers.get("Date")}}})
        if reply.headers.get("Api-Version", self.api_version) != self.api_version:  # dockerd's own, on every answer
            self.forget_version()
        if reply.status_code >= 400:
            try:
                message = reply.json()["message"]
            except (ValueError, KeyError, TypeError):
                message = reply.text.strip()[:200]
            raise DockerError(f"{method} {path}: {reply.status_code} {message}", reply.status_code)
        return reply

    def _request(self, method: str, path: str, **kwargs) -> object:
        self._on_request()
        reply = self._send(method, path, **kwargs)
        try:
            return reply.json() if reply.content else None
        except ValueError:
            raise DockerError(f"{method} {path}: the answer is not JSON", reply.status_code) from None

    def api(self, method: str, path: str, at_version: str | None = None, **kwargs) -> object:
        """A call at the daemon's own API version, or at_version (a POST of what was read at it)."""
        prefix = f"/v{at_version}" if at_version else self._prefix or f"/v{self.negotiate()}"
        with warning_if_slow(f"{method} {path}"):
            answer = self._request(method, prefix + path, **kwargs)
        if self._prefix is None and method == "GET" and not at_version:
            # Answered by another release than the one negotiated with (dockerd was upgraded and restarted
            # while we were idle): what it sent is shaped for the old version, and a spec read so and
            # posted back would lose the new fields. Ask again at its own. (A POST follows the GET of
            # what it posts, which has noticed.)
            return self._request(method, f"/v{self.negotiate()}{path}", **kwargs)
        return answer

    def ping(self) -> bool:
        """GET /_ping: does the daemon answer at all? (A manager without a leader does: it is up.)"""
        self._on_request()
        try:
            self._session.get(self._base + "/_ping", timeout=PING_TIMEOUT).raise_for_status()
        except requests.RequestException:
            return False
        self.answering = True
        return True

    def negotiate(self) -> str:
        """Use the daemon's own API version (see OLDEST_API); asked again once another release may
        answer (forget_version)."""
        version = api_version_to_use((self._request("GET", "/version") or {}).get("ApiVersion"), self.socket)
        if self.api_version and version != self.api_version:
            log.info("Docker at %s speaks API %s now (it spoke %s)", self.socket, version, self.api_version)
        self.api_version, self._prefix = version, f"/v{version}"
        return version

    def forget_version(self) -> None:
        """Docker was out of reach, or answered as another release: the next call asks its version again."""
        self._prefix = None

    def check_manager(self) -> None:
        """A worker (or a daemon outside any swarm) fails every service call for ever: say so at
        start. A manager that is pending, locked or without a leader may recover: not checked here."""
        swarm = self.api("GET", "/info").get("Swarm") or {}
        state = swarm.get("LocalNodeState")
        if state == "inactive":
            raise Misconfigured(f"Docker at {self.socket} is not part of a swarm: run ecr-deploy on a swarm manager")
        if state == "active" and not swarm.get("ControlAvailable"):
            raise Misconfigured(f"Docker at {self.socket} is a swarm worker, not a manager: run ecr-deploy "
                                "on a manager node (or promote this one)")

    def services(self) -> list[dict]:
        answer = self.api("GET", "/services")
        return [ServiceRead(service, self.api_version) for service in answer]

    def service(self, service_id: str) -> dict:
        return ServiceRead(self.api("GET", f"/services/{urllib.parse.quote(service_id)}"), self.api_version)

    def update_service(self, service: dict, spec: dict, registry_auth: str | None) -> list[str]:
        """POST the spec at the API version the service was read at (whichever client, whichever
        thread read it): posted at a newer one, the fields that version has and the read did not are
        cleared. (Read before an upgrade, it is posted at the old version: the fields only the new one
        knows cannot be set on it yet, as setting them would move its Version and refuse this post.)
        Without registry_auth Docker keeps the service's own (the CLI's registryAuthFrom=spec), so pull
        options, and with them tasks not yet running, are untouched."""
        params = {"version": service["Version"]["Index"]}
        reply = self.api("POST", f"/services/{urllib.parse.quote(service['ID'])}/update",
                         at_version=getattr(service, "api_version", None), params=params,
                         json=spec, headers={"X-Registry-Auth": registry_auth} if registry_auth else {})
        return (reply or {}).get("Warnings") or []

    def tasks(self, service_id: str | None = None) -> list[dict]:
        """The tasks of one service, or of all services."""
        filters = {"filters": json.dumps({"service": [service_id]})} if service_id else {}
        return self.api("GET", "/tasks", params=filters)

    def node_name(self) -> str:
        return self.api("GET", "/info").get("Name", "?")

    def node_hostname(self, node_id: str) -> str:
        return ((self.api("GET", f"/nodes/{urllib.parse.quote(node_id)}") or {}).get("Description") or {}).get(
            "Hostname", node_id)

    def task_log(self, task_id: str, tail: int) -> bytes:
        """The last lines of a task's log, where its log driver lets them be read (json-file, local, journald)."""
        prefix = self._prefix or f"/v{self.negotiate()}"
        self._on_request()
        reply = self._send("GET", f"{prefix}/tasks/{urllib.parse.quote(task_id)}/logs",
                           params={"stdout": "1", "stderr": "1", "tail": str(tail)})
        return reply.content[-tail * LOG_LINE_MAX * 4:]  # (bounded: a "line" may be megabytes)

    def for_another_thread(self) -> Docker:
        """A client of the same daemon for another thread: a session of its own (a requests session
        is not thread-safe) and no heartbeat (only the main thread vouches for the loop)."""
        other = Docker(f"unix://{self.socket}")
        other._prefix, other.api_version = self._prefix, self.api_version
        return other

    def open_events(self, filters: dict) -> requests.Response:
        """GET /events, streaming: an open reply with one JSON event per line, as they happen. Its
        reads wait up to EVENTS_IDLE_TIMEOUT: a quiet swarm sends nothing for hours."""
        prefix = self._prefix or f"/v{self.negotiate()}"
        # One JSON object a line, asked for by name: API 1.52 negotiates the stream's format and may
        # also answer application/json-seq (each record after a 0x1E), which json.loads refuses.
        return self._send("GET", f"{prefix}/events", params={"filters": json.dumps(filters)}, stream=True,
                          headers={"Accept": "application/json"}, timeout=(DOCKER_TIMEOUT[0], EVENTS_IDLE_TIMEOUT))


# --------------------------------------------------------------------------- the service index (loop mode)

class ServiceIndex:
    """Loop mode: the swarm's services, kept current from Docker's event stream the way a Kubernetes
    informer keeps its cache, so a push neither lists nor parses every service (with a thousand, that
    tripled a push's latency). A daemon thread opens GET /events (services only), lists every service
    once, then notes the services each event names; a second thread re-inspects them (drops the removed)
    once the stream has been quiet for EVENTS_QUIET, or sooner when a lookup asks. So a push that updates
    twenty services is not slowed by twenty inspects racing its own updates, and a burst of events on one
    service costs one inspect. When the stream ends (dockerd restarted, an error, EVENTS_IDLE_TIMEOUT of
    silence: a resync period) the index is stale and the next lookup starts over; a cache known to be
    stale is never served.

    A cached Version may lag Swarm's: the update posted with it is refused ("update out of sequence") and
    post_update re-inspects, so staleness costs a retry, never a wrong update; nor a skipped one: dockerd
    drops events for a subscriber that falls 100 ms behind (moby's pubsub), and a service that looks
    moved is judged on the fresh read (Actor.pin). A service created just before a push arrives is
    found if its event was read: a lookup waits out the events read and not yet applied. An event
    dockerd has not yet written to the stream (within milliseconds on one host) is not waited for: that
    one push misses the service, the event stores it for the next, and a full listing (a reconcile pass,
    through replace) rolls it."""

    def __init__(self, docker: Docker):
        self.docker = docker
        self._changed = threading.Condition()  # guards all below
        self._cache = ServiceCache()
        self._generation: object | None = None  # the live stream's token; None: stale
        self._pending: dict[str, str] = {}  # service ID -> its last event's action, read and not yet applied
        self._pending_since = self._last_event = 0.0  # time.monotonic() of the oldest and newest of them
        self._applying = False  # a batch of them is being inspected
        self._asked = 0  # lookups waiting for them

    # ---- lookups (the main thread)

    def services(self) -> list[dict]:
        self._make_current()
        with self._changed:
            return list(self._cache.services.values())

    def services_in(self, repositories: set[tuple]) -> dict[tuple, list[dict]]:
        """The services running an image of each (account, region, repository)."""
        self._make_current()
        with self._changed:
            return {key: self._cache.in_repository(key) for key in repositories}

    def replace(self, services: list[dict], listed_at: float | None = None) -> None:
        """Correct the cache with a full listing (a reconcile pass's own); pass listed_at, the
        time.monotonic() before its GET, so that what events brought in (or removed) since is kept."""
        with self._changed:
            self._cache.replace(services, time.monotonic() if listed_at is None else listed_at)

    def _settled(self) -> bool:
        return self._generation is None or not (self._pending or self._applying)

    def _make_current(self) -> None:
        """Wait out the events read and not yet applied (bounded); if stale, list afresh and follow events again."""
        with self._changed:
            self._asked += 1
            self._changed.notify_all()
            try:
                settled = self._changed.wait_for(self._settled, SETTLE_TIMEOUT)
            finally:
                self._asked -= 1
            if self._generation is not None and settled:
                return
            generation = self._end_generation(object())  # a thread still applying events ends with its generation
        ready: queues.Queue = queues.Queue(maxsize=1)
        threading.Thread(target=self._follow, args=(generation, ready), name="service-events", daemon=True).start()
        try:
            failure = ready.get(timeout=sum(DOCKER_TIMEOUT))  # as long as one Docker call may take
        except queues.Empty:
            failure = DockerError(f"Docker at {self.docker.socket} did not list services within {sum(DOCKER_TIMEOUT)}s")
        if failure:
            with self._changed:
                if self._generation is generation:
                    self._end_generation(None)
            if failure.status is None:  # (the thread's own client failed to reach Docker: say so to the loop's)
                self.docker.answering = False
            raise failure

    def _end_generation(self, successor: object | None) -> object | None:
        """(Holding the lock.) The stream and what it brought are over: its unapplied events with it."""
        self._generation = successor
        self._pending.clear()
        self._changed.notify_all()
        return successor

    # ---- the event threads

    def _follow(self, generation: object, ready: queues.Queue) -> None:
        docker, listed = self.docker.for_another_thread(), False
        try:
            with docker.open_events({"type": ["service"]}) as stream:  # first: no change after the listing is missed
                listed_at = time.monotonic()
                services = docker.services()
                self.replace(services, listed_at)
                log.info("Listed %d service(s); following Docker's service events", len(services))
                listed = True
                threading.Thread(target=self._apply_events, args=(generation, docker.for_another_thread()),
                                 name="service-inspects", daemon=True).start()
                ready.put(None)
                for line in stream.iter_lines():
                    if self._generation is not generation:
                        return  # superseded: a newer stream and listing took over
                    if line:
                        self._note(generation, json.loads(line))
            failure = DockerError("dockerd closed the stream")
        except DockerError as e:
            failure = e
        except (requests.RequestException, ValueError) as e:  # dockerd stopped mid-line, or a read timed out
            failure = DockerError(type(e).__name__)
        except Exception as e:  # a bug must not leave the index trusted without a stream
            failure = DockerError(f"unexpected {type(e).__name__}: {e}")
        if not listed:
            ready.put(failure)
        self._ended(generation, failure, listed)

    def _ended(self, generation: object, failure: DockerError, listed: bool = True) -> None:
        with self._changed:
            if self._generation is generation:
                self._end_generation(None)
                if listed:
                    log.info("Docker's service events ended (%s); the next push lists every service afresh", failure)

    def _note(self, generation: object, event: dict) -> None:
        service_id = (event.get("Actor") or {}).get("ID")
        if not service_id:
            return
        with self._changed:
            if self._generation is not generation:
                return
            now = time.monotonic()
            if not self._pending:
                self._pending_since = now
            self._pending[service_id] = event.get("Action") or ""
            self._last_event = now
            self._changed.notify_all()

    def _next_batch(self, generation: object) -> dict[str, str] | None:
        """(Holding the lock.) The events to apply once the stream is quiet, waited too long, or a lookup
        asks; None once the generation is over."""
        while self._generation is generation:
            if self._pending:
                now = time.monotonic()
                due = min(self._last_event + EVENTS_QUIET, self._pending_since + EVENTS_DEFER_MAX)
                if self._asked or now >= due:
                    batch, self._pending, self._applying = self._pending, {}, True
                    return batch
                self._changed.wait(due - now)
            else:
                self._changed.wait()
        return None

    def _apply_events(self, generation: object, docker: Docker) -> None:
        try:
            while True:
                with self._changed:
                    batch = self._next_batch(generation)
                if batch is None:
                    return
                try:
                    for service_id, action in batch.items():
                        service = None if action == "remove" else self._inspect(docker, service_id)
                        with self._changed:
                            if self._generation is not generation:
                                return
                            if service:
                                self._cache.store(service, time.monotonic())
                            else:
                                self._cache.drop(service_id, time.monotonic())
                finally:
                    with self._changed:
                        self._applying = False
                        self._changed.notify_all()
        except Exception as e:  # a bug must not leave the index trusted without its events applied
            failure = e if isinstance(e, DockerError) else DockerError(f"unexpected {type(e).__name__}: {e}")
            self._ended(generation, failure)  # (the reading thread ends at its next event: superseded)

    @staticmethod
    def _inspect(docker: Docker, service_id: str) -> dict | None:
        """The service as it is now, None if it was removed since (anything else: start over)."""
        try:
            return docker.service(service_id)
        except DockerError as e:
            if e.status != 404:
                raise
            return None


class ServiceCache:
    """The swarm's services by ID and by ECR repository, as last seen (no I/O, no lock: ServiceIndex's)."""

    def __init__(self):
        self.services: dict[str, dict] = {}
        self._repository: dict[str, tuple] = {}  # service ID -> repository_of(service), parsed once per version
        self._by_repository: dict[tuple, dict[str, dict]] = defaultdict(dict)
        self._stored_at: dict[str, float] = {}  # time.monotonic() of each entry, for replace()
        self._removed_at: dict[str, float] = {}  # of services seen removed, for a listing made before that

    def in_repository(self, key: tuple) -> list[dict]:
        return list(self._by_repository.get(key, {}).values())

    def store(self, service: dict, at: float) -> None:
        service_id = service["ID"]
        known = self.services.get(service_id)
        if known and known["Version"]["Index"] > service["Version"]["Index"]:
            return  # an older answer that arrived late
        self._unlink(service_id)
        self.services[service_id], self._stored_at[service_id] = service, at
        key = self._repository[service_id] = repository_of(service)
        if key:
            self._by_repository[key][service_id] = service

    def drop(self, service_id: str, at: float) -> None:
        """The service was seen removed at `at` (time.monotonic()): a listing made before cannot bring it back."""
        self._unlink(service_id)
        self._removed_at[service_id] = at
        for gone in [i for i, removed in self._removed_at.items() if removed < at - REMOVED_KEPT]:
            del self._removed_at[gone]

    def _unlink(self, service_id: str) -> None:
        key = self._repository.pop(service_id, None)
        if key:
            del self._by_repository[key][service_id]
            if not self._by_repository[key]:
                del self._by_repository[key]
        self.services.pop(service_id, None)
        self._stored_at.pop(service_id, None)

    def replace(self, services: list[dict], listed_at: float) -> None:
        """A full listing made at listed_at (time.monotonic() before the GET) is the truth, except for
        what is newer: entries stored after it (from events), newer Versions of listed services, and
        removals seen after it."""
        listed = {service["ID"]: service for service in services}
        for service_id in [i for i in self.services if i not in listed and self._stored_at[i] < listed_at]:
            self._unlink(service_id)
        for service in listed.values():
            if self._removed_at.get(service["ID"], -math.inf) < listed_at:
                self.store(service, listed_at)


# --------------------------------------------------------------------------- the gates

class Gate:
    """What the scan and signature gates share: a service opts in with its label, else the fleet-wide
    flag; `off` exempts it; a label that cannot be read blocks it (a gate never fails open)."""
    name = "gate"
    label = ""

    def setting(self, labels: dict | None):
        """The service's setting (None: not gated); raises ValueError for a bad label."""
        raise NotImplementedError

    def gates(self, service: dict) -> bool:
        try:
            return self.setting(service["Spec"].get("Labels")) is not None
        except ValueError:
            return True  # blocked for its label: gated all the same

    def verdict(self, service: dict, push: Push, digest: str) -> Verdict | None:
        """None for an ungated service; raises AwsError when ECR cannot be asked (retry later)."""
        try:
            setting = self.setting(service["Spec"].get("Labels"))
        except ValueError as e:
            return Verdict("blocked", f"label {self.label}: {e}")
        return None if setting is None else self.judge(setting, push, digest)

    def judge(self, setting, push: Push, digest: str) -> Verdict:
        raise NotImplementedError


class ScanGate(Gate):
    """Lets a gated service (its label, else --scan-threshold) roll only to a digest whose ECR scan
    is clean enough; an image index, to one whose platform images' scans all are. ECR is asked once
    per digest and drain cycle, however many services wait on it."""
    name, label = "scan gate", SCAN_THRESHOLD_LABEL

    def __init__(self, ecr: Ecr, default_threshold: str | None, timeout: float):
        self.ecr, self.default_threshold, self.timeout = ecr, default_threshold, timeout
        self._scans: dict[tuple, Scan] = {}
        self._indexes: dict[tuple, tuple[PlatformImage, ...] | None] = {}

    def new_cycle(self) -> None:
        self._scans.clear()  # a pending scan may have finished since
        self._indexes.clear()  # (a digest's manifest never changes; this only bounds the memory)

    def setting(self, labels: dict | None) -> str | None:
        return scan_threshold(labels, self.default_threshold)

    def platform_images(self, account: str, region: str, repository: str, digest: str,
                        media_type: str | None = None, manifest: Manifest | None = None
                        ) -> tuple[PlatformImage, ...] | None:
        """The digest's platform images if it is an image index, else None (a single image, or gone).
        A media type known (ECR's DescribeImages names it) to be no index's spares reading the manifest;
        a manifest already read (BatchGetImage by tag) is used as is. Raises AwsError, and ValueError
        for an index that cannot be read."""
        if media_type is not None and media_type not in INDEX_MEDIA_TYPES:
            return None
        key = (account, region, repository, digest)
        if key not in self._indexes:
            manifest = manifest or self.ecr.manifest(account, region, repository, {"imageDigest": digest})
            self._indexes[key] = manifest and platform_images(manifest.text, manifest.media_type)
        return self._indexes[key]

    def scan(self, account: str, region: str, repository: str, digest: str) -> Scan:
        key = (account, region, repository, digest)
        if key not in self._scans:
            self._scans[key] = self.ecr.scan(*key)
        return self._scans[key]

    def judge(self, threshold: str, push: Push, digest: str) -> Verdict:
        where = (push.account, push.region, push.repository)
        try:
            images = self.platform_images(*where, digest, self.ecr.media_types.get((*where, digest)))
        except ValueError as e:
            return Verdict("blocked", f"ECR's image index {digest} cannot be read: {e}")

        def judged(image_digest: str) -> Verdict:  # the wait runs from the newest push of the tag
            scan = self.scan(*where, image_digest)
            return scan_verdict(scan._replace(waited=seconds_after(push.time, scan.answered_at)), threshold,
                                self.timeout)

        if images is None:
            return judged(digest)
        return index_verdict([(image, judged(image.digest)) for image in images])


# ---- the signature gate

VERIFY_TIMEOUT = 30  # seconds a verifier may take; well inside the watchdog (Systemd.HEALTHY_FOR)
# Cosign checks a key's signature offline: no transparency log (Rekor) or signing config is asked for.
# --output json: the verified claims, whose type tells a signature from an attestation.
COSIGN_VERIFY = ("verify", "--insecure-ignore-tlog=true", "--output", "json")
COSIGN_LEGACY = "--new-bundle-format=false"  # the .sig tag's signatures, which verify skips once any bundle exists


# What a verifier inherits from the deployer's environment: the system's locale, CA and proxies, and for
# notation (AWS Signer's plugin calls Signer) the AWS SDK's settings; not the deployer's other settings.
VERIFIER_ENVIRONMENT = re.compile(r"PATH|LANG|LC_[A-Z]+|TZ|SSL_CERT_(?:FILE|DIR)|(?:HTTPS?|NO|ALL)_PROXY", re.I)


def verifier_environment(environ, verifier: str) -> dict[str, str]:
    return {name: value for name, value in environ.items() if VERIFIER_ENVIRONMENT.fullmatch(name)
            or (verifier == "notation" and name.startswith("AWS_"))}


def run_bounded(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run a verifier in a process group of its own, so that a timeout kills what it started too
    (notation runs AWS Signer's plugin as a child), not just the verifier."""
    with subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, errors="replace", start_new_session=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


class SignatureGate(Gate):
    """Lets a gated service (its label, else --signature) roll only to a digest that carries a valid
    signature by an identity the operator trusts, as the reference verifiers decide (notation, cosign:
    bounded subprocesses, argument lists, the ECR token in their environment, never in argv). Each
    digest is verified once per drain cycle, however many services wait on it."""
    name, label = "signature gate", SIGNATURE_LABEL

    def __init__(self, ecr: Ecr, default: Trust | None, notation_dir: str, timeout: float = VERIFY_TIMEOUT,
                 heartbeat=lambda: None, unanswered_for: float = UNANSWERED_FOR):
        self.ecr, self.default, self.notation_dir, self.timeout = ecr, default, notation_dir, timeout
        self.heartbeat, self.unanswered_for = heartbeat, unanswered_for
        self._verdicts: dict[tuple, Verdict] = {}
        self._unanswered: dict[tuple, tuple[float, float]] = {}  # when a digest's verifier first, last gave no verdict

    def new_cycle(self) -> None:
        self._verdicts.clear()  # a signature may have been pushed since
        forgotten = time.time() - UNANSWERED_FORGOTTEN  # digests nobody asked about since (the tag moved on)
        self._unanswered = {key: times for key, times in self._unanswered.items() if times[1] > forgotten}

    def setting(self, labels: dict | None) -> Trust | None:
        return signature_trust(labels, self.default)

    def judge(self, trust: Trust, push: Push, digest: str) -> Verdict:
        key = (trust, push.account, push.region, push.repository, digest)
        if key not in self._verdicts:
            verdict = self.verify(trust, push, digest)
            if verdict.decision == "wait":  # (past the bound: blocked, and remembered so, while it stays unanswered)
                verdict = unanswered_verdict(verdict.reason, self.waited(key, push), self.unanswered_for)
            else:  # the verifier's own verdict: a later outage starts a wait of its own
                self._unanswered.pop(key, None)
            self._verdicts[key] = verdict
        return self._verdicts[key]

    def waited(self, key: tuple, push: Push) -> float:
        """How long this digest's verification has gone unanswered: since SQS first handed its message to
        any deployer (a time SQS keeps through restarts and for other managers; never the event's own
        time, or a message read after a weekend's outage would block at its first unanswered try), else
        since this process first tried (a reconcile pass's digest; a restart only lengthens the wait)."""
        now = time.time()
        first = self._unanswered.get(key, (now, now))[0]
        self._unanswered[key] = (first, now)
        return max(now - push.received if push.received else 0.0, now - first)

    def verify(self, trust: Trust, push: Push, digest: str) -> Verdict:
        reference = f"{push.image.rpartition(':')[0]}@{digest}"  # HOST/REPOSITORY@DIGEST: exactly this digest
        if trust.verifier == "notation":
            wrong = self.wrong_statement(trust.material, reference.partition("@")[0])
            if wrong:
                return Verdict("blocked", wrong)
        elif not os.path.isfile(trust.material):  # (a device or a FIFO would keep cosign reading)
            return Verdict("blocked", f"cosign's public key {trust.material} is not a file on this manager")
        username, password = self.ecr.credentials(push.account, push.region)
        try:  # (the temporary home and cosign's Docker config too: a full or read-only /tmp blocks, it does not stall the batch)
            with tempfile.TemporaryDirectory(prefix="ecr-deploy-verify-") as home:
                command, env = (self.notation if trust.verifier == "notation" else self.cosign)(
                    trust, reference, home, username, password)
                env = {**verifier_environment(os.environ, trust.verifier), "HOME": home, **env}
                runs = [self.run(command, env)]
                if trust.verifier == "cosign" and not cosign_signed(runs[0], digest) and \
                        runs[0].returncode not in COSIGN_LEGACY_ONLY and not UNANSWERED.search(runs[0].stderr):
                    # bundles, but no signature among them: the .sig tag may hold one
                    runs.append(self.run([*command[:-1], COSIGN_LEGACY, command[-1]], env))
        except subprocess.TimeoutExpired:
            return Verdict("wait", f"{trust.verifier} gave no answer within {self.timeout:.0f}s")
        except OSError as e:
            if isinstance(e, FileNotFoundError) and e.filename == trust.verifier:  # (not the temporary folder's)
                return Verdict("blocked", f"{trust.verifier} is not installed on this manager (or not on the "
                                          f"deployer's PATH): see docs/signature-gate.md")
            return Verdict("blocked", f"cannot run {trust.verifier}: {e}")
        return signature_verdict(trust, digest, runs)

    def run(self, command: list[str], env: dict) -> subprocess.CompletedProcess:
        self.heartbeat()
        try:
            return run_bounded(command, env, self.timeout)
        finally:
            self.heartbeat()

    def wrong_statement(self, name: str, repository: str) -> str | None:
        """Why the trust policy statement Notation applies to this repository cannot be relied on (none,
        one that does not enforce, not the one named), or None."""
        path = os.path.join(self.notation_dir, "trustpolicy.json")  # (notation 1.3 never reads trustpolicy.oci.json)
        if os.path.exists(os.path.join(self.notation_dir, "trustpolicy.oci.json")):
            return f"{self.notation_dir} holds trustpolicy.oci.json as well as trustpolicy.json: newer notation " \
                   f"releases read the first, 1.3 the second; keep trustpolicy.json alone"
        try:
            with open(path, encoding="utf-8") as file:
                applied = notation_statement(json.load(file, object_pairs_hook=as_notation_reads), repository)
        except (OSError, ValueError) as e:
            return f"cannot read Notation's trust policy {path}: {e}"
        applied_name = applied and str(applied.get("name"))
        if name and applied_name != name:
            return f"Notation's trust policy applies {'statement ' + repr(applied_name) if applied else 'no statement'} " \
                   f"to {repository}, not {name!r} ({SIGNATURE_LABEL}={Trust('notation', name)})"
        lax = applied and notation_laxity(applied)
        if lax:
            return f"Notation's trust policy statement {applied_name!r} for {repository} would pass a digest no " \
                   f"trusted identity signed: {lax} ({path})"
        return None

    def notation(self, trust: Trust, reference: str, home: str, username: str, password: str):
        """notation verify, with the operator's Notation directory (trust policy, trust store, plugins)
        as its configuration, and the ECR token in the variables Notation reads credentials from.
        --verbose: only then does it say why it refused each signature."""
        return (["notation", "verify", "--verbose", reference],
                {"NOTATION_CONFIG": self.notation_dir, "NOTATION_USERNAME": username, "NOTATION_PASSWORD": password})

    def cosign(self, trust: Trust, reference: str, home: str, username: str, password: str):
        """cosign verify against the public key, with the ECR token in a Docker config of its own."""
        docker_config = os.path.join(home, "docker")
        os.mkdir(docker_config, 0o700)
        auth = base64.b64encode(f"{username}:{password}".encode()).decode()
        with open(os.open(os.path.join(docker_config, "config.json"), os.O_WRONLY | os.O_CREAT, 0o600), "w") as file:
            json.dump({"auths": {reference.partition("/")[0]: {"auth": auth}}}, file)
        return ["cosign", *COSIGN_VERIFY, "--key", trust.material, reference], {"DOCKER_CONFIG": docker_config}


# --------------------------------------------------------------------------- the drain cycle

FIRST_WAIT_LOOP = 20  # seconds: SQS's longest long poll
FIRST_WAIT_ONCE = 1  # never 0: a short poll samples only some SQS servers
FIRST_WAIT_FOLLOWING = 2  # while rollouts are pending, poll the queue shorter to check them often
FOLLOW_UP_WAIT = 1
BATCH_CAP = 300  # messages per cycle: bounds memory and the time a message waits unacked
UPDATE_ATTEMPTS = 5
NOTIFY_TIMEOUT = 3.0


@dataclass
class CycleResult:
    received: int = 0
    ignored: int = 0  # not a deployable push, or the tag is gone from ECR
    deployed: int = 0  # messages whose push is fully handled
    kept: list[str] = field(default_factory=list)  # ids of messages left on the queue for retry
    updated: list[str] = field(default_factory=list)  # "name (id)" per service update
    waiting: list[str] = field(default_factory=list)  # the kept ones that only wait for an ECR scan

    @property
    def failed(self) -> list[str]:
        """Kept because something went wrong (worth a backoff), not because a scan is pending."""
        return [m for m in self.kept if m not in self.waiting]


class Deployer:
    """The drain cycle: messages in, hints (EventHints) to the one converge path (Converger: facts read,
    decide(), Actor), the messages whose hints are decided acknowledged. Holds the parts and what they share."""
    protect_prefix: str | None = None  # --protect-tag-prefix (also in a dry run): its tags are never versions

    def __init__(self, queue: Queue | None, ecr: Ecr, docker: Docker, label_filter: LabelFilter | None,
                 trust_events: bool = False, follow_rollouts: bool = False, rollout_timeout: float | None = None,
                 rollback_on_failure: bool = False, notify_urls: tuple[str, ...] = (), dry_run: bool = False,
                 systemd: Systemd | None = None, gates: tuple = (), auth_refresh: float = 0.0,
                 state_directory: str | None = None, reconcile_every: float = 0.0,
                 release_defaults: dict | None = None, service_index: ServiceIndex | None = None,
                 notifier: Notifier | None = None):
        self.queue, self.ecr, self.docker = queue, ecr, docker
        self.notifier = notifier or Notifier([])
        self.heartbeat = Heartbeat(None)  # start() sets the operator's
        self.service_index = service_index  # loop mode; without it every cycle lists the services
        self.gates = gates  # ScanGate, SignatureGate: each says deploy, wait or blocked for a gated service
        self.release_defaults = dict(release_defaults or {})  # fleet-wide defaults of the release labels
        self.new_cycle()
        self.label_filter = label_filter
        self.trust_events = trust_events
        self.dry_run = dry_run
        self.systemd = systemd or Systemd({})
        self.hints = EventHints(self)
        self.converger = Converger(self)
        self.actor = Actor(self)
        self.rollouts = Rollouts(self, follow_rollouts, rollout_timeout, rollback_on_failure, notify_urls)
        self.before_jobs = BeforeJobs(self)
        self.checker = Checker()  # start() gives it the process's AWS session
        self.keeper = AuthKeeper(self, auth_refresh, state_directory)
        self.reconciler = Reconciler(self, reconcile_every)
        self.totals = {"messages": {"received": 0, "deployed": 0, "ignored": 0, "failed": 0},
                       "services_updated": 0, "rollouts": self.rollouts.counts, "last_success": None}

    def handle(self, messages: list[dict]) -> CycleResult:
        """Turn the messages into hints, converge them, then delete exactly the messages whose hints are decided."""
        self.new_cycle()
        ignored: list[dict] = []
        pushes: dict[tuple, list[tuple[dict, Push]]] = defaultdict(list)
        keys_of: dict[str, set[tuple]] = {}  # message id -> the images it asks to deploy
        for message in messages:
            receive_count = int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
            if receive_count > 1:
                log.info("Retrying message %s (received %d times)", message["MessageId"], receive_count)
            what = parse_message(message.get("Body"))
            if isinstance(what, Ignored):
                log.log(logging.WARNING if what.suspicious else logging.INFO,
                        "Ignoring message %s: %s", message["MessageId"], what.reason)
                ignored.append(message)
            else:
                asked = self.hints.pushes_asked(what)
                if asked is None:
                    continue  # ECR could not be asked which image it names: kept for retry
                received = first_received(message)
                for push in asked:
                    pushes[push.image_key].append((message, replace(push, received=received)))
                keys_of[message["MessageId"]] = {push.image_key for push in asked}

        result = CycleResult(received=len(messages))
        targets, gone = self.hints.targets(pushes)
        deployed_keys, waiting_keys = self.converge_all(targets, pushes, result)
        finished = set(gone) | set(deployed_keys)
        handled = [m for m in messages if keys_of.get(m["MessageId"], {None}) <= finished]
        ignored += [m for m in handled if keys_of[m["MessageId"]] <= set(gone)]
        deployed = [m for m in handled if not keys_of[m["MessageId"]] <= set(gone)]
        result.waiting = [m for m, keys in keys_of.items() if keys & waiting_keys and keys <= finished | waiting_keys]

        done = ignored + deployed
        if self.dry_run:
            log.info("Dry run: %d message(s) left on the queue", len(messages))
            not_deleted: set[str] = set()
        else:
            not_deleted = self.queue.delete(done)
        done_ids = {m["MessageId"] for m in done} - not_deleted
        result.ignored = sum(m["MessageId"] in done_ids for m in ignored)
        result.deployed = sum(m["MessageId"] in done_ids for m in deployed)
        result.kept = [m["MessageId"] for m in messages if m["MessageId"] not in done_ids]
        self.count(result)
        return result

    def converge_all(self, targets: dict, pushes: dict, result: CycleResult) -> tuple[list[tuple], set[tuple]]:
        """Look up each pushed repository's services once (listed, or the index's in loop mode) and converge
        each image's hints; returns the images fully deployed, and those where nothing failed but some
        service waits for an ECR scan."""
        if not targets:
            return [], set()
        try:
            in_repository = self.services_in({push.repository_key for push, _ in targets.values()})
            self.listing = [service for group in in_repository.values() for service in group]
        except DockerError as e:
            log.error("%s; %d message(s) kept for retry", e, sum(len(pushes[key]) for key in targets))
            self.systemd.status("docker unreachable: retrying" if e.status is None else "docker error: retrying")
            return [], set()
        deployed, waiting = [], set()
        for key, (push, digest) in targets.items():
            done = [self.converger.converge(hint, result)
                    for hint in self.hints.of_target(push, digest, in_repository[push.repository_key])]
            if all(done):
                deployed.append(key)
            elif None in done and False not in done:
                waiting.add(key)
        return deployed, waiting

    def new_cycle(self) -> None:
        """A drain cycle or reconcile pass begins: what ECR and Swarm said before is stale."""
        self.cycle_started = time.monotonic()
        self.ecr.new_cycle()
        for gate in self.gates:
            gate.new_cycle()
        self.answers: dict[tuple, TagAnswer] = {}  # image key -> ECR's answer this cycle
        self.listing: list[dict] = []  # the services as listed this cycle (for AFTER_LABEL)
        self._listed: list[dict] | None = None  # GET /services, once a cycle however many events ask (no index)

    def count(self, result: CycleResult) -> None:
        messages = self.totals["messages"]
        messages["received"] += result.received
        messages["ignored"] += result.ignored
        messages["deployed"] += result.deployed
        messages["failed"] += len(result.failed)
        self.totals["services_updated"] += len(result.updated)
        if not result.failed:
            self.totals["last_success"] = round(time.time(), 3)

    @property
    def scan_gate(self) -> ScanGate | None:
        return next((gate for gate in self.gates if isinstance(gate, ScanGate)), None)

    @property
    def signature_gate(self) -> SignatureGate | None:
        return next((gate for gate in self.gates if isinstance(gate, SignatureGate)), None)

    def services(self) -> list[dict]:
        """Every service in the swarm, as a push cycle sees them: the index's in loop mode, else listed
        once per cycle (the events of a batch that name no tag ask too: scans of untagged images, signatures)."""
        if self.service_index:
            return self.service_index.services()
        if self._listed is None:
            self._listed = self.docker.services()
        return self._listed

    def services_in(self, repositories: set[tuple]) -> dict[tuple, list[dict]]:
        """The services running an image of each (account, region, repository), pinned or not."""
        if self.service_index:
            return self.service_index.services_in(repositories)
        grouped = by_repository(self.services())
        return {key: grouped.get(key, []) for key in repositories}


# --------------------------------------------------------------------------- hints from events

class EventHints:
    """Turns events into hints: which tags an event asks to deploy (a push's own; a scan's or a signature's,
    as ECR says), the digest each tag points to now (stale events lose), and the services that follow it."""

    def __init__(self, deployer: Deployer):
        self.deployer = deployer

    def pushes_asked(self, what: Push | ScanDone | Signed) -> list[Push] | None:
        """The tags an event asks to deploy: a push's own, a scan's, or those of the image a signature
        signs (ECR is asked; None if it could not answer)."""
        deployer = self.deployer
        if isinstance(what, Push):
            return [what]
        if isinstance(what, ScanDone):
            return self.scan_pushes(what)
        if deployer.trust_events:  # which image a signature signs is ECR's to say (BatchGetImage, DescribeImages)
            log.info("Signature %s@%s: not followed under --trust-events; the tag's next push rolls its gated "
                     "services", what.repository, what.digest)
            return []
        key, gate = (what.account, what.region, what.repository), deployer.signature_gate
        try:
            gated = gate is not None and any(gate.gates(service) for service in deployer.services_in({key})[key])
        except DockerError as e:
            log.error("%s; the signature event of %s@%s is kept for retry", e, what.repository, what.digest)
            return None
        if not gated:  # (nothing asked of ECR for a repository nobody gates: every signature pushed comes here)
            log.info("Signature %s@%s: no service of that repository has a signature gate; nothing to deploy",
                     what.repository, what.digest)
            return []
        try:
            signed = deployer.ecr.signed_image(what)
        except AwsError as e:
            log.error("%s; message kept for retry", e)
            return None
        if signed is None:
            log.info("Signature %s@%s names no image in ECR; nothing to deploy", what.repository, what.digest)
            return []
        subject, tags = signed
        log.info("Signature %s@%s signs %s (tags: %s)", what.repository, what.digest, subject, ", ".join(tags) or "none")
        return ScanDone(what.account, what.region, what.repository, subject, tuple(tags), what.time, what.event_id,
                        trigger="signature").pushes()

    def scan_pushes(self, scan: ScanDone) -> list[Push] | None:
        """The pushes a scan event stands for: one per tag the image had; for an untagged image, one per
        tag that a gated service follows and whose image index holds it (ECR scans an index's platform
        images, pushed untagged, never the index). None when ECR or Docker cannot tell now."""
        if scan.tags or scan.trigger != "scan":
            return scan.pushes()
        if self.deployer.scan_gate is None:
            return []
        key = scan.repository_key
        try:
            services = self.deployer.services_in({key})[key]
        except DockerError as e:
            log.error("%s; the scan event of %s@%s is kept for retry", e, scan.repository, scan.digest)
            return None
        tags = sorted({followed[3] for service in services if self.deployer.scan_gate.gates(service)
                       and (followed := followed_tag(service, self.deployer.label_filter)) and followed[:3] == key})
        try:
            holders = [Push(*key, tag, index, scan.time, trigger=scan.trigger, event_id=scan.event_id)
                       for tag, index in self.indexes_at(key, tags).items() if self.index_holds(key, index, {scan.digest})]
        except AwsError as e:
            log.error("%s; the scan event of %s@%s is kept for retry", e, scan.repository, scan.digest)
            return None
        for push in holders:
            log.info("ECR scanned %s@%s, a platform image of the image index :%s points to (%s)", push.repository,
                     scan.digest, push.tag, push.digest)
        if not holders:
            log.info("ECR scanned %s@%s, untagged, and no tag a gated service follows holds an image index with it; "
                     "nothing to deploy", scan.repository, scan.digest)
        return holders

    def indexes_at(self, key: tuple, tags: list[str]) -> dict[str, str]:
        """tag -> the digest it points to now, for those of the tags that point to an image index.
        --trust-events: read with BatchGetImage (granted for pulls), never DescribeImages."""
        if not tags:
            return {}
        if self.deployer.trust_events:
            manifests = {tag: self.deployer.ecr.manifest(*key, {"imageTag": tag}) for tag in tags}
            return {tag: m.digest for tag, m in manifests.items()
                    if m and self.deployer.scan_gate.platform_images(*key, m.digest, manifest=m) is not None}
        answers = self.deployer.ecr.tag_digests(*key, tags)
        self.deployer.answers.update(((*key, tag), answer) for tag, answer in answers.items())
        return {tag: answer.digest for tag, answer in answers.items() if answer.media_type in INDEX_MEDIA_TYPES
                or answer.media_type is None}

    def index_holds(self, key: tuple, digest: str, scanned: set[str], media_type: str | None = None) -> bool:
        """Is `digest` an image index holding one of the scanned digests among its platform images?"""
        try:
            gate = self.deployer.scan_gate
            images = gate.platform_images(*key, digest, media_type) if gate else None
        except ValueError:
            return False  # unreadable: a push of its tag is blocked by the gate, saying why
        return any(image.digest in scanned for image in images or ())

    def targets(self, pushes: dict) -> tuple[dict[tuple, tuple[Push, str]], list[tuple]]:
        """One ECR lookup per image: the digest its tag points to now (stale events lose).
        Returns the images to deploy, and those whose tag is gone (nothing to deploy)."""
        targets, gone, answers = {}, [], self.deployer.answers
        for key, group in pushes.items():
            self.deployer.systemd.heartbeat()
            real = [p for _, p in group if p.trigger == "push"]  # a scan event may name an older digest
            push = max(real or [p for _, p in group], key=lambda p: p.time)
            if self.deployer.trust_events:  # the event's digest as is, a scan event's too: DescribeImages may be denied
                targets[key] = (push, push.digest)
                continue
            try:
                answer = answers.get(key) or self.deployer.ecr.current_digest(push)  # (a scan event's may be in)
                digest = answer and answer.digest
                scanned = {p.digest for _, p in group}
                held = not real and digest and digest not in scanned and self.index_holds(
                    push.repository_key, digest, {p.digest for _, p in group if p.trigger == "scan"}, answer.media_type)
            except AwsError as e:
                log.error("%s; %d message(s) kept for retry", e, len(group))
                continue
            if answer:
                answers[key] = answer
            if digest is None:
                log.info("%s no longer exists in ECR; nothing to deploy", push.image)
                gone.append(key)
                continue
            if not real and digest not in scanned and not held:
                log.info("%s now points to %s, not the digest of the %s event; nothing to deploy", push.image, digest,
                         push.trigger)
                gone.append(key)
                continue
            if any(p.digest != digest for p in real):
                log.info("ECR says %s is now %s (an event named another digest); deploying that",
                         push.image, digest)
            targets[key] = (push, digest)
        return targets, gone


    def of_target(self, push: Push, digest: str, services: list[dict]) -> list[Hint]:
        """The hints of one pushed image: every service (of its repository) that follows its tag should run
        the digest; the pinned ones are only named."""
        label_filter = self.deployer.label_filter
        for service in services:
            pinned = pinned_digest(service, push)
            if pinned and (label_filter is None or label_filter.admits(service["Spec"].get("Labels"))):
                log.info("Service %s is pinned to %s; not following :%s", service_label(service), pinned, push.tag)
        users = services_using(services, push, label_filter)
        if push.tag in deployers_tags(services, self.deployer.protect_prefix):  # (a promotion's, a protection tag's)
            for service in [s for s in users if follows_versions(s)]:
                log.info("Service %s is not moved: :%s is a tag the deployer writes (promotion, protection), never a "
                         "version", service_label(service), push.tag)
                users.remove(service)
        if not users:
            log.info("No service uses %s", push.image)
        return [Hint(service, push, digest) for service in users]


# --------------------------------------------------------------------------- converging

class Converger:
    """The one converge path: for a hint (an event's or a reconcile pass's), read the facts decide() asks
    for (failure record, Swarm's tasks, the release policy's leaders, the gates' verdicts), then have the
    Actor do what it decided. Also promotion, whose rule (promotion()) is read from the same facts."""

    def __init__(self, deployer: Deployer):
        self.deployer = deployer

    def converge(self, hint: Hint, result: CycleResult) -> bool | None:
        """True done (or nothing to do, held, blocked), False failed (retried), None waits (for a gate)."""
        facts: Facts | None = Facts(image=self.image_status(hint))
        while (decision := decide(hint, facts, len(self.deployer.gates))).action == "ask":
            facts = self.read(decision.reason, hint, facts)
            if facts is None:
                return False
        return self.deployer.actor.act(hint, decision, result)

    def image_status(self, hint: Hint) -> str | None:
        """ECR's imageStatus of the hint's digest, as this cycle's answer for its tag said (None: not asked)."""
        answer = self.deployer.answers.get(hint.push.image_key)
        return answer.status if answer and answer.digest == hint.digest else None

    def read(self, fact: str, hint: Hint, facts: Facts) -> Facts | None:
        """The facts with the one decide() asked for added; None (said why) if Docker or ECR failed."""
        service, push, digest = hint
        if fact == "failure":
            try:
                return facts._replace(failure_read=True, failure=self.failure_of(service, digest))
            except DockerError as e:
                log.error("Cannot read the task history of service %s: %s", service_label(service), e)
                return None
        if fact == "release":
            try:
                return facts._replace(release=self.release(service, push, digest))
            except DockerError as e:  # (reading a leader's tasks): a retry, not a verdict
                log.error("Cannot apply the release policy of service %s: %s", service_label(service), e)
                return None
            except ValueError as e:
                return facts._replace(release=Release("held", f"cannot apply its release policy: {e}"))
        if fact == "before job":
            try:
                return facts._replace(before=self.job_of(service, digest)[1])
            except DockerError as e:
                log.error("Cannot read the pre-rollout job of service %s: %s", service_label(service), e)
                return None
        gate = self.deployer.gates[len(facts.verdicts)]
        try:
            verdict = gate.verdict(service, push, digest)
        except AwsError as e:
            log.error("Cannot check the %s of service %s: %s", gate.name, service_label(service), e)
            return None
        if verdict is not None and verdict.decision not in GATE_ACTIONS:
            log.info("Service %s passes its %s for %s: %s", service_label(service), gate.name, hint.image,
                     verdict.reason)
        return facts._replace(verdicts=(*facts.verdicts, GateSaid(gate.name, verdict)))

    def failure_of(self, service: dict, digest: str) -> str | None:
        """Why the digest must not be rolled onto the service (its rollout failed there), or None. Swarm's
        own rollback keeps no record but its UpdateStatus and task history (pruned in time)."""
        if failed_digest(service) == digest:
            return service["Spec"]["Labels"][FAILED_LABEL]
        status = service.get("UpdateStatus") or {}
        if status.get("State") in SWARM_ROLLBACK and (rolled_back_from(service, digest) or
                                                      tried_and_failed(self.deployer.docker.tasks(service["ID"]),
                                                                       digest)):
            return f"Swarm rolled back its rollout ({status['State']}): {status.get('Message', '')}"
        return None

    def release(self, service: dict, push: Push, digest: str) -> Release:
        """The operator's release policy (labels, else the fleet defaults) for this service and digest."""
        deployer, labels = self.deployer, service["Spec"].get("Labels") or {}
        names = after_names(labels, deployer.release_defaults)
        by_name = {s["Spec"].get("Name"): s for s in deployer.listing}
        leaders = []
        for name in names:
            leader = by_name.get(name) or self.service_named(name)
            if leader is None:
                leaders.append(Leader(name, False, None, None, None, exists=False))
                continue
            runs = runs_digest(leader, digest)
            ran = rollout_of(leader, deployer.docker.tasks(leader["ID"]), digest, deployer.docker.date) if runs \
                else Ran(None, None)
            pending = ran.pending or (deployer.rollouts.checks_pending(leader["ID"], digest) if runs else None)
            leaders.append(Leader(name, runs, pending, ran.since, self.failure_of(leader, digest), ran.settles_in))
        answer = deployer.answers.get(push.image_key)
        age = answer.age if answer and answer.digest == digest else None
        return release_policy(labels, deployer.release_defaults, time.time(), age, leaders,
                              deployer.docker.date if names else None)

    def job_of(self, service: dict, digest: str) -> tuple[dict | None, JobRun]:
        """The service's pre-rollout job (BEFORE_LABEL), and what its run for the digest says (job_run)."""
        try:
            name, timeout = before_job(service), before_timeout(service)
        except ValueError as e:
            return None, JobRun("invalid", f"cannot run it: {e}")
        job = self.service_named(name)
        tasks = self.deployer.docker.tasks(job["ID"]) if job else []
        return job, job_run(job, tasks, digest, self.deployer.docker.date, timeout)

    def service_named(self, name: str) -> dict | None:
        try:
            return self.deployer.docker.service(name)  # Docker takes a name as well as an ID
        except DockerError as e:
            if e.status == 404:
                return None
            raise

    def promotion_of(self, service: dict, key: tuple, answers: dict) -> Release:
        """The promotion rule for a service and the digest its tag points to (Swarm's task history is
        read only while a promotion may still be due)."""
        docker, digest = self.deployer.docker, answers[key].digest
        target = answers.get(promote_key(service, key))
        runs = runs_digest(service, digest)
        due = runs and (target is None or target.digest != digest)
        ran = rollout_of(service, docker.tasks(service["ID"]), digest, docker.date) if due else Ran(None, None)
        pending = ran.pending or (self.deployer.rollouts.checks_pending(service["ID"], digest) if due else None)
        return promotion(service["Spec"].get("Labels") or {}, runs, pending, ran.since,
                         self.failure_of(service, digest) if due else None, target and target.digest,
                         digest, docker.date, time.time(), ran.settles_in)

    def promote_if_due(self, service: dict, key: tuple, answer: TagAnswer, answers: dict) -> bool:
        """Tag the digest this service runs as its PROMOTE_LABEL tag once its rollout completed and soaked,
        for whatever follows that tag (another swarm, account or region, through ECR's push event).
        Idempotent: a tag already at the digest is left alone. False if ECR or Docker failed."""
        try:
            decision = self.promotion_of(service, key, answers)
        except (ValueError, DockerError) as e:
            log.error("Cannot promote from service %s: %s", service_label(service), e)
            return False
        return self.deployer.actor.promote(service, key, answer.digest, decision)


# --------------------------------------------------------------------------- acting

SAID_ONCE_KEPT = 1000  # (service, image) pairs each of a long-running process's "said once" memories keeps


class SaidOnce(dict):
    """What a long-running process has said once per service and image, bounded: beyond `kept` entries the
    longest unchanged goes first (so it is said again, at worst). A set's add() too, for those that need
    no value. Services and images come and go for months; without a bound this grows with every one."""

    def __init__(self, kept: int | None = None):
        super().__init__()
        self.kept = kept or SAID_ONCE_KEPT

    def __setitem__(self, key, value) -> None:
        self.pop(key, None)  # the newest last
        super().__setitem__(key, value)
        while len(self) > self.kept:
            del self[next(iter(self))]

    def add(self, key) -> None:
        self[key] = True


class Actor:
    """Does what was decided, and says it once: posts updates (with fresh registry auth, retried out of
    sequence), writes failure records, reports holds, waits and blocks, promotes, has rollouts followed
    and notifications sent."""

    def __init__(self, deployer: Deployer):
        self.deployer = deployer
        self.reported_blocked = SaidOnce()  # (service ID, image): one ERROR and webhook each
        self.reported_held = SaidOnce()  # (service ID, digest): one WARNING each
        self.reported_refused = SaidOnce()  # (service ID, why its version policy is unreadable): one WARNING each
        self.reported_older = SaidOnce()  # (service ID, the version of its spec that put an older version back)
        self.reported_waits = SaidOnce()  # (service ID, image) -> the wait last logged
        self.recheck_after = SaidOnce()  # (service ID, image) -> the next open wait's back-off

    def act(self, hint: Hint, decision: Decision, result: CycleResult) -> bool | None:
        """decide()'s answer done: True done, False failed, None waits for a gate (the message is kept)."""
        service, push, digest = hint
        if decision.action == "deploy":
            return self.pin(service, push, digest, result)
        if decision.action == "nothing":
            log.info("Service %s %s", service_label(service), decision.reason)
        elif decision.action == "refused":
            self.refused(service, decision.reason)
        elif decision.action == "hold back":
            self.hold_back(hint, decision)
        elif decision.action == "not released":
            self.not_released(service, hint.image, decision.release)
        elif decision.action == "archived":  # (--restore-archived: restored, then a wait)
            self.not_released(service, hint.image,
                              self.deployer.reconciler.images.restore_followed(hint, decision.release))
        elif decision.action == "wait for gate":
            log.info("Service %s waits for its %s before %s: %s%s", service_label(service), decision.gate,
                     hint.image, decision.reason, "" if push.reconcile else "; message kept")
            return None
        elif decision.action == "gone":
            log.info("Service %s not rolled to %s: %s", service_label(service), hint.image, decision.reason)
        elif decision.action in ("run job", "wait for job"):
            return self.deployer.before_jobs.act(hint, decision)
        elif decision.action == "block" and decision.gate.startswith(JOB_GATE):
            self.deployer.before_jobs.blocked(hint, decision)
        elif decision.action == "block":
            self.blocked(service, hint.image, decision.reason, decision.gate)
        return True

    def refused(self, service: dict, reason: str) -> None:
        """A version policy that cannot be read: one line per service and label text, not one per push or pass."""
        if (service["ID"], reason) not in self.reported_refused:
            self.reported_refused.add((service["ID"], reason))
            log.warning("Service %s is not rolled: %s", service_label(service), reason)

    def hold_back(self, hint: Hint, decision: Decision) -> None:
        """A digest whose rollout failed on a service is not rolled there again, by any manager, until
        the tag moves on or the operator removes the record (FAILED_LABEL). When Swarm rolled it back
        with nobody following, the record is written now."""
        service, push, digest = hint
        if decision.record:
            status = service["UpdateStatus"]
            self.record_failure(service, push.account, push.region, digest, status["State"], status.get("Message", ""))
        if (service["ID"], digest) not in self.reported_held:
            self.reported_held.add((service["ID"], digest))
            name = service["Spec"].get("Name", "?")
            log.warning("Service %s holds back %s: its rollout failed there; `docker service update --label-rm %s "
                        "%s` lets it roll again", service_label(service), digest, FAILED_LABEL, name)
            self.deployer.notifier.event(Event("held", name, f"{push.repository}:{push.tag}@{digest}",
                                               f"held back: its rollout failed here ({decision.reason})",
                                               route=notify_route(service["Spec"].get("Labels"))))

    def not_released(self, service: dict, image: str, release: Release, waits: str = "waits before") -> None:
        """Say once (per service, digest and reason) why a service is not rolled (or does not promote)
        now, and make sure a reconcile pass comes when the wait may end. A wait with no known end (a
        leader that is missing, paused or still rolling) is looked at again after WAVE_RECHECK, then
        ever less often (next_recheck), each look being a whole reconcile pass."""
        key = (service["ID"], image)
        reason = re.sub(r"\(?(?:in|rolls in) [0-9dhms ]+\)?", "", release.reason)  # the same wait, counting down
        open_ended = release.decision == "wait" and release.until is None
        cap = recheck_cap(self.deployer.reconciler.interval)
        if self.reported_waits.get(key) != reason:
            self.reported_waits[key] = reason
            self.recheck_after.pop(key, None)  # a new wait: looked at soon again
            then = f" (looked at again in {duration_text(WAVE_RECHECK)}, then ever less often, at least every " \
                   f"{duration_text(cap)})" if open_ended else ""
            log.log(logging.WARNING if release.decision == "held" else logging.INFO, "Service %s %s %s: %s%s",
                    service_label(service), "holds back" if release.decision == "held" else waits, image,
                    release.reason, then)
            held = release.decision == "held"
            self.deployer.notifier.event(Event("held" if held else "waiting", service["Spec"].get("Name", "?"), image,
                                      f"{'holds back' if held else waits}: {release.reason}",
                                      route=notify_route(service["Spec"].get("Labels"))))
        if open_ended:
            delay = self.recheck_after.get(key, WAVE_RECHECK)
            self.recheck_after[key] = next_recheck(delay, cap)
            self.deployer.reconciler.wake_at(time.time() + delay)
        elif release.decision == "wait":
            self.deployer.reconciler.wake_at(release.until)

    def record_failure(self, listed: dict, account: str, region: str, digest: str, outcome: str,
                       message: str) -> None:
        """Write FAILED_LABEL on a service that no longer runs the digest (a label-only update: no task
        is replaced, but it becomes Swarm's PreviousSpec and resets its UpdateStatus), only while it is
        as `listed` (read when the failure was seen) shows it: a service updated since (another manager
        posted a new digest, an operator scaled it) is left for the next pass, so a record never resumes
        a paused rollout of another digest, nor makes another digest the spec Swarm's rollback restores."""
        if self.deployer.dry_run:
            return
        record = failure_record(digest, outcome, self.deployer.rollouts.node_name(), time.time(), message)

        def plan(service: dict) -> tuple[dict, ImageRef] | None:
            if failed_digest(service) == digest or runs_digest(service, digest) or running_image(service) is None:
                return None
            if not same_rollout_state(listed, service):  # another manager's update, say: never write on it
                log.info("Service %s changed since the failure of %s was seen there; the record is left for the "
                         "next pass", service_label(service), digest)
                return None
            return with_label(service["Spec"], FAILED_LABEL, record), running_image(service)

        self.post_update(listed, account, region, plan, lambda service, *_: log.info(
            "Recorded on service %s: %s=%s", service_label(service), FAILED_LABEL, record), with_auth=False)

    def blocked(self, service: dict, image: str, reason: str, gate: str, details=lambda: "") -> bool:
        """A final outcome, reported like a rollout's; the message is done (retrying changes nothing).
        `details`: what the notification adds (read only when it is reported). False: reported before."""
        if self.deployer.dry_run:
            log.info("Would block service %s from %s: %s", service_label(service), image, reason)
            return False
        if (service["ID"], image) in self.reported_blocked:  # the push came back after its scan event, or vice versa
            log.info("Service %s stays blocked from %s (reported before)", service_label(service), image)
            return False
        self.reported_blocked.add((service["ID"], image))
        log.error("Blocked service %s from %s by its %s: %s", service_label(service), image, gate, reason)
        self.deployer.totals["rollouts"]["blocked"] += 1
        if self.deployer.rollouts.enabled:
            self.deployer.rollouts.outcomes.append("blocked")
        rollouts = self.deployer.rollouts
        rollouts.notify(notification("blocked", service["Spec"].get("Name", "?"), service["ID"], image, 0.0,
                                     rollouts.node_name(), reason, gate=gate), service["Spec"].get("Labels"), details())
        return True

    def pin(self, listed: dict, push: Push, digest: str, result: CycleResult) -> bool:
        before = listed  # what the service ran before this cycle touched it

        def plan(service: dict) -> tuple[dict, ImageRef] | None:
            nonlocal before
            ref = uses_image(service, push)
            if ref is None:
                log.info("Service %s no longer uses %s; skipped", service_label(service), push.image)
                return None
            if ref.digest != (running_image(before) or ref).digest and ref.digest != digest:
                if service is before or not updated_before(service, self.deployer.docker.date,
                                                           time.monotonic() - self.deployer.cycle_started):
                    # another deployer (or operator) moved it while this cycle ran, maybe to a newer push
                    # than the one this cycle knows of: never roll it back; the next push or pass decides
                    log.info("Service %s moved to %s meanwhile; skipped", service_label(service), ref.digest)
                    return None
                # The listing was stale, not the service moved meanwhile: the service index missed its
                # update (dockerd drops the events of a subscriber that falls behind). Judge on this read.
                log.info("Service %s runs %s since before this push was handled (listed at %s); rolling it",
                         service_label(service), ref.digest, (running_image(before) or ref).digest)
                before = service
            versions = versions_say(service, push)  # (another manager may have moved it on to a newer version)
            skip = versions.reason if versions else skip_reason(service, push, digest)  # (decide() said so of the
            if skip:  # listing; Swarm may differ now)
                log.info("Service %s %s", service_label(service), skip)
                return None
            image = pinned_image(ref, push.tag, digest)
            if self.deployer.dry_run:
                log.info("Would update service %s to %s", service_label(service), image)
                return None
            self.deployer.systemd.status(f"deploying {service['Spec'].get('Name', '?')}")
            labels = provenance_labels(push, digest, self.deployer.rollouts.node_name(), time.time())
            return updated_spec(service["Spec"], image, labels), ref

        def updated(service: dict, spec: dict, started: float) -> None:
            image = spec["TaskTemplate"]["ContainerSpec"]["Image"]
            log.info("Updated service %s to %s", service_label(service), image)
            result.updated.append(service_label(service))
            was = (running_image(service) or ImageRef("", "", "", None, None)).digest
            behind = f":{push.tag}" + (", the newest version its policy admits" if follows_versions(service) else "")
            why = f"drift: a reconcile pass found it behind {behind}" + (f" (ran {was[:19]})" if was else "") \
                if push.reconcile else f"updated: {UPDATE_REASONS.get(push.trigger, push.trigger)}"
            self.deployer.notifier.event(Event("drift" if push.reconcile else "updated", spec.get("Name", "?"), image,
                                               why, route=notify_route(spec.get("Labels"))))
            self.deployer.rollouts.follow(service, spec, push, started)

        return self.post_update(listed, push.account, push.region, plan, updated)

    def post_update(self, listed: dict, account: str, region: str, plan, on_success, with_auth: bool = True) -> bool:
        """Let `plan` decide the new spec (None: nothing to do) and post it with registry auth,
        naming the version it was read at. The first attempt uses the listing made this cycle,
        milliseconds old; if the service changed since, Swarm refuses ("update out of sequence")
        and we inspect it afresh and start over, with jitter so two deployers fall out of step."""
        label = service_label(listed)
        for attempt in range(1, UPDATE_ATTEMPTS + 1):
            self.deployer.systemd.heartbeat()
            try:
                service = listed if attempt == 1 else self.deployer.docker.service(listed["ID"])
            except DockerError as e:
                if e.status == 404:
                    log.info("Service %s was removed; skipped", label)
                    return True
                log.error("Cannot inspect service %s: %s", label, e)
                return False
            decision = plan(service)
            if decision is None:
                return True
            spec, ref = decision
            try:
                auth = registry_auth_header(*self.deployer.ecr.credentials(account, region),
                                            ref.name.partition("/")[0]) if with_auth else None
                started = time.monotonic()
                warnings = self.deployer.docker.update_service(service, spec, auth)
            except DockerError as e:
                if (e.out_of_sequence or e.status == 404) and attempt < UPDATE_ATTEMPTS:  # 404: removed?
                    log.info("Service %s changed while updating (attempt %d); retrying", label, attempt)
                    time.sleep(random.uniform(0.05, 0.25) * attempt)
                    continue
                log.error("Cannot update service %s: %s", label, e)
                return False
            except AwsError as e:  # (the ECR token)
                log.error("Cannot update service %s: %s", label, e)
                return False
            for warning in warnings:
                log.warning("Docker warns about service %s: %s", label, warning)
            on_success(service, spec, started)
            return True
        return False


    def promote(self, service: dict, key: tuple, digest: str, decision: Release) -> bool:
        """The promotion rule's answer done: tag the digest, say why not yet, or nothing. False if ECR failed."""
        labels, tag = service["Spec"].get("Labels") or {}, promote_key(service, key)[3]
        image = f"{running_image(service).name}:{tag}@{digest}"
        if decision.decision == "wait":
            self.not_released(service, image, decision, "will promote")
        if decision.decision != "deploy":
            return True
        if self.deployer.dry_run:
            log.info("Would promote %s (service %s)", image, service_label(service))
            return True
        try:
            promoted = self.deployer.ecr.promote(*key[:3], digest, tag)
        except TagImmutable as e:  # retrying changes nothing until the operator does: said once, not a failed pass
            if (service["ID"], image) not in self.reported_blocked:
                self.reported_blocked.add((service["ID"], image))
                log.error("Cannot promote %s (service %s): %s", image, service_label(service), e)
            return True
        except AwsError as e:
            log.error("Cannot promote %s: %s", image, e)
            return False
        if promoted:
            rollouts = self.deployer.rollouts
            log.info("Promoted %s: service %s runs it, rollout completed%s", image, service_label(service),
                     f", soaked {labels[SOAK_LABEL]}" if labels.get(SOAK_LABEL) else "")
            rollouts.counts["promoted"] += 1
            rollouts.notify(notification("promoted", service["Spec"].get("Name", "?"), service["ID"], image, 0.0,
                                         rollouts.node_name(), f"tagged as :{tag}"), labels)
        return True


# --------------------------------------------------------------------------- checks after the rollout

class Checker:
    """Looks at what proves a rollout good (checks_of): CloudWatch alarms (DescribeAlarms by name, 100 a
    call; the client is made when a service first names alarms, so a fleet without them needs neither the
    permission nor the client) and HTTP checks (GET, bounded in time, redirects followed only on the same
    scheme, host and port, no proxy or .netrc from the environment)."""

    def __init__(self, session: botocore.session.Session | None = None, on_request=None):
        self._session, self._on_request = session, on_request
        self._cloudwatch = None
        self._http: requests.Session | None = None

    def alarm_states(self, names: tuple[str, ...]) -> dict[str, str]:
        """Alarm name -> StateValue (OK, ALARM, INSUFFICIENT_DATA), metric, composite and log alarms, in the
        deployer's region; a name missing from the answer: no such alarm. AwsError if CloudWatch failed."""
        if self._cloudwatch is None:
            session = self._session or aws_session()
            self._cloudwatch = aws_client(session, "cloudwatch", session.get_config_variable("region"), ECR_CONFIG,
                                          self._on_request)
        states: dict[str, str] = {}
        for start in range(0, len(names), DESCRIBE_ALARMS_MAX):
            asked, token = {"AlarmNames": list(names[start:start + DESCRIBE_ALARMS_MAX]),
                            "AlarmTypes": list(ALARM_TYPES), "MaxRecords": DESCRIBE_ALARMS_MAX}, None
            while True:
                try:
                    reply = self._cloudwatch.describe_alarms(**asked, **({"NextToken": token} if token else {}))
                except AWS_ERRORS as e:
                    raise AccessDenied.wrap(e, "cannot describe CloudWatch alarms (cloudwatch:DescribeAlarms)") \
                        from None
                for alarm in (a for kind in ALARM_TYPES for a in reply.get(f"{kind}s", [])):
                    states[alarm["AlarmName"]] = alarm["StateValue"]
                token = reply.get("NextToken")
                if not token:
                    break
        return states

    def answer(self, url: str) -> int | str:
        """The check's HTTP status code, or why there is none (said without the URL's query)."""
        if self._http is None:
            self._http = requests.Session()
            self._http.trust_env = False  # no proxy, no .netrc credentials sent to a check
            self._http.verify = os.environ.get("REQUESTS_CA_BUNDLE") or True  # (a private CA, as requests reads it)
        for _ in range(CHECK_REDIRECTS + 1):
            try:
                with self._http.get(url, timeout=CHECK_TIMEOUT, allow_redirects=False, stream=True) as reply:
                    status, location = reply.status_code, reply.headers.get("Location")
            except requests.Timeout:
                return f"no answer within {CHECK_TIMEOUT[1]:.0f}s"
            except requests.exceptions.SSLError as e:  # (a ConnectionError too, but not "no connection")
                return tls_failure(e)
            except requests.ConnectionError:
                return "no connection"
            except requests.RequestException as e:
                return type(e).__name__
            if status not in (301, 302, 303, 307, 308) or not location:
                return status
            there = urllib.parse.urljoin(url, location)
            before, after = urllib.parse.urlsplit(url), urllib.parse.urlsplit(there)
            if (before.scheme, before.hostname, before.port) != (after.scheme, after.hostname, after.port):
                return f"HTTP {status}, a redirect to another host (not followed)"
            url = there
        return f"more than {CHECK_REDIRECTS} redirects"


class RolloutChecks:
    """The part of Rollouts that follows a rollout past Swarm's word: its checks once Swarm completed it
    (taken up again by a reconcile pass after a restart), and its progress while Swarm rolls it (stuck)."""

    def stuck(self, rollout: Rollout, now: float) -> str | None:
        """Why the rollout is stuck (no task of its image reached running within its progress deadline), or
        None. Swarm's tasks are read only once a deadline has passed since the last progress seen."""
        if not rollout.progress_deadline or now - rollout.progress_at < rollout.progress_deadline:
            return None
        try:
            tasks = self.docker.tasks(rollout.service_id)
        except DockerError as e:
            log.error("Cannot read the tasks of %s: %s", rollout.label, e)
            return None
        running = tasks_running(tasks, rollout.image)
        if running - rollout.running_seen:  # progress: the deadline starts again
            rollout.running_seen, rollout.progress_at = rollout.running_seen | running, now
            return None
        if not may_be_stuck(tasks, rollout.image):
            return None
        return stuck_reason(tasks, rollout.image, rollout.progress_deadline)

    def start_checks(self, rollout: Rollout, service: dict, now: float) -> None:
        """Swarm completed the rollout: its checks run from now through its soak (read from Swarm's tasks,
        as promotion and waves read it)."""
        rollout.checking, soak = True, 0.0
        try:
            soak = parse_duration((service["Spec"].get("Labels") or {}).get(SOAK_LABEL) or "0")
            ran = rollout_of(service, self.docker.tasks(rollout.service_id), rollout.digest, self.docker.date)
            soak -= soaked_for(Leader("", True, None, ran.since, None), self.docker.date) or 0
        except (ValueError, DockerError):
            pass  # (a soak that cannot be read holds promotion and waves anyway: the checks run their passes)
        rollout.soak_over_at = now + max(0.0, soak)
        log.info("Rollout of %s to %s: Swarm completed it after %.1fs; checking %s%s", rollout.label, rollout.image,
                 now - rollout.started, rollout.checks.named if rollout.checks else "(unreadable)",
                 f" through its soak (ends in {duration_text(soak)})" if soak > 0 else "")
        self.look_at_checks(rollout, now)

    def look_at_checks(self, rollout: Rollout, now: float) -> None:
        """One look at the rollout's checks, when due: the rollout ends completed once they proved it good,
        failed (check_failed) as soon as one fails."""
        if now < rollout.next_look:
            return
        rollout.next_look = now + CHECK_EVERY
        checks, checker = rollout.checks, self.deployer.checker
        if rollout.checks_error:
            look = Look(rollout.checks_error, "", 0)
        else:
            try:
                states = checker.alarm_states(checks.alarms) if checks.alarms else {}
            except AwsError as e:
                # CloudWatch unreachable is no verdict on the build: looked at again, but not for ever (--wait
                # would never end, waves and promotion would wait for ever); a permission missing never heals.
                if not isinstance(e, AccessDenied) and now < rollout.soak_over_at + CHECKS_UNANSWERED:
                    log.error("Cannot look at the alarms of %s: %s", rollout.label, e)
                    return
                look = Look(f"its alarms cannot be looked at: {e}", "", 0)
            else:
                answer = checker.answer(checks.url) if checks.url else None
                look = look_at(checks, states, answer, rollout.look.passes if rollout.look else 0)
        said_before, rollout.look = rollout.look and rollout.look.said, look
        if look.failed or checks_done(checks, look, now >= rollout.soak_over_at):
            try:
                service = self.docker.service(rollout.service_id)
            except DockerError as e:
                if e.status != 404:
                    log.error("Cannot follow the rollout of %s: %s", rollout.label, e)
                    return
                service = None
            self.pending.remove(rollout)
            if service is None:
                self.ended(rollout, "removed", None, now)
            elif failed_digest(service) == rollout.digest:  # another manager's deployer checked it too, and
                self.failed_elsewhere(rollout, service["Spec"]["Labels"][FAILED_LABEL])  # failed it first
            elif not posted(service.get("Spec"), rollout.image, rollout.force_update):
                self.ended(rollout, "superseded", service, now)
            elif look.failed:
                message = f"{look.failed} ({look.said})"
                # The record first, posted at the version read (Swarm refuses it if another manager's deployer,
                # checking too, posted its own since): whoever records it notifies and rolls back, once.
                theirs = self.record_on_running(rollout, service, "check_failed", message)
                if theirs is None:
                    self.ended(rollout, "check_failed", service, now, message)
                else:
                    self.failed_elsewhere(rollout, theirs)
            else:
                self.proved.add((rollout.service_id, rollout.digest))
                self.ended(rollout, "completed", service, now, f"checks passed: {look.said}")
        elif look.said != said_before:
            log.info("Rollout of %s to %s: checking: %s", rollout.label, rollout.image, look.said)

    def failed_elsewhere(self, rollout: Rollout, record: str) -> None:
        """A rollout whose failure record another deployer wrote while this one checked it too (every manager's
        deployer takes up the checks within their window): counted as failed, but not notified, recorded or
        rolled back twice."""
        log.error("Rollout of %s to %s failed its checks (judged by another deployer: %s=%s)", rollout.label,
                  rollout.image, FAILED_LABEL, record)
        self.outcomes.append("check_failed")
        self.counts["check_failed"] += 1

    def adopt(self, service: dict, key: tuple, digest: str) -> None:
        """A reconcile pass found the service running its tag's digest: if that rollout completed, is not
        failed and is still within its checks' window (checks_window, by Swarm's clock: a restart or another
        manager loses nothing), follow its checks, from zero passes. Never a job's (follow() follows none):
        every update of a job, a failure record's label-only one too, runs it again (swarmkit controlapi
        UpdateService bumps JobIteration). What our update replaced is unknown here:
        a rollback restores Swarm's PreviousSpec if that names another image, else the image Swarm's task
        history ran before (image_before)."""
        labels = service["Spec"].get("Labels") or {}
        if not self.enabled or not (labels.get(ALARMS_LABEL) or labels.get(CHECK_LABEL)) or is_job(service["Spec"]) \
                or service["ID"] in self.following() or failed_digest(service) == digest \
                or (service["ID"], digest) in self.proved:
            return
        try:
            checks = checks_of(labels)
            soak = parse_duration(labels.get(SOAK_LABEL) or "0")
        except ValueError:
            return  # (said when a rollout to it is followed)
        if checks is None:
            return
        try:
            tasks = self.docker.tasks(service["ID"])
            ran = rollout_of(service, tasks, digest, self.docker.date)
        except DockerError as e:  # (the next pass looks again)
            log.error("Cannot read the tasks of service %s: %s", service_label(service), e)
            return
        ran_for = soaked_for(Leader("", True, None, ran.since, None), self.docker.date)
        if ran.pending or ran_for is None or ran_for >= checks_window(checks, soak):
            return
        now, task = time.monotonic(), service["Spec"]["TaskTemplate"]
        previous = service.get("PreviousSpec") or {}
        if not running_image({"Spec": previous}) or runs_digest({"Spec": previous}, digest):
            # (any update since, the auth keeper's re-post at start included, made PreviousSpec this spec)
            before = image_before(tasks, digest)
            previous = {"TaskTemplate": {"ContainerSpec": {"Image": before}}} if before else {}
        replaced = previous
        log.info("Service %s runs %s, its soak began %s ago: checking %s", service_label(service),
                 task["ContainerSpec"]["Image"], duration_text(ran_for), checks.named)
        self.pending.append(Rollout(service["ID"], service["Spec"].get("Name", "?"), task["ContainerSpec"]["Image"],
                                    task.get("ForceUpdate", 0), Push(*key, digest, reconcile=True), now, math.inf,
                                    replaced=replaced, checks=checks, checking=True,
                                    soak_over_at=now + max(0.0, soak - ran_for)))

    def checks_pending(self, service_id: str, digest: str) -> str | None:
        """Why a service's rollout of the digest has not been proved good yet (its checks run), or None: what
        promotion and waves wait for besides Swarm's tasks."""
        rollout = next((r for r in self.pending if r.service_id == service_id and not r.rollback
                        and r.digest == digest and (r.checks or r.checks_error)), None)
        if rollout is None or not rollout.checking:
            return None
        return f"its checks run: {rollout.checks.named if rollout.checks else rollout.checks_error}"  # (steady text)

    def record_on_running(self, rollout: Rollout, service: dict, outcome: str, message: str) -> str | None:
        """The failure record on a service that still runs the failed digest: a label-only update, which
        replaces no task, while the spec is still ours. The record of the digest found there already, if any."""
        if self.deployer.dry_run:
            return None
        record, found = failure_record(rollout.digest, outcome, self.node_name(), time.time(), message), []

        def plan(fresh: dict) -> tuple[dict, ImageRef] | None:
            if failed_digest(fresh) == rollout.digest:
                found.append(fresh["Spec"]["Labels"][FAILED_LABEL])
                return None
            if not posted(fresh.get("Spec"), rollout.image, rollout.force_update):
                return None
            return with_label(fresh["Spec"], FAILED_LABEL, record), running_image(fresh)

        self.deployer.actor.post_update(service, rollout.push.account, rollout.push.region, plan, lambda *_: log.info(
            "Recorded on service %s: %s=%s", rollout.label, FAILED_LABEL, record), with_auth=False)
        return found[-1] if found else None


# --------------------------------------------------------------------------- rollouts

@dataclass
class Rollout:
    """A service update (or rollback) being followed until Swarm says how it ended."""
    service_id: str
    name: str
    image: str  # what the service is being moved to
    force_update: int  # the TaskTemplate.ForceUpdate we posted: with the image, our spec's identity
    push: Push  # whose registry credentials apply
    started: float  # time.monotonic() just before the update was posted
    deadline: float
    rollback: bool = False
    replaced: dict = field(default_factory=dict)  # the spec our update replaced: what a rollback restores
    checks: Checks | None = None  # what must prove it good once Swarm completed it (checks_of)
    checks_error: str | None = None  # its check labels cannot be read: it cannot be proved good
    progress_deadline: float = 0.0  # s without a task of the image reaching running: stuck (0: never)
    progress_at: float = 0.0  # time.monotonic() of the last progress seen (or the start)
    running_seen: set = field(default_factory=set)  # IDs of the tasks of the image seen running
    checking: bool = False  # Swarm completed it; its checks run (in memory: a restart starts them afresh)
    soak_over_at: float = 0.0  # time.monotonic() when its soak ends (by Swarm's clock when the checks began)
    look: Look | None = None  # the last look at its checks
    next_look: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.name} ({self.service_id[:12]})"

    @property
    def digest(self) -> str:
        return self.image.rpartition("@")[2]



class Rollouts(RolloutChecks):
    """Follows the rollouts this process started until Swarm says how each ended; reports them, and
    with --rollback-on-failure rolls back the ones that paused or timed out."""

    def __init__(self, deployer: Deployer, enabled: bool, timeout: float | None, rollback_on_failure: bool,
                 notify_urls: tuple[str, ...], progress_deadline: float = DEFAULT_PROGRESS_DEADLINE):
        self.deployer, self.enabled, self.timeout = deployer, enabled, timeout
        self.progress_deadline = progress_deadline  # the default of PROGRESS_DEADLINE_LABEL
        self.proved: set[tuple[str, str]] = set()  # (service ID, digest) whose checks passed here: not taken up again
        self.rollback_on_failure, self.notify_urls = rollback_on_failure, notify_urls
        self.pending: list[Rollout] = []
        self.outcomes: list[str] = []  # of the rollouts this process followed to their end
        self.counts: dict[str, int] = defaultdict(int)
        self._node_name: str | None = None

    @property
    def docker(self) -> Docker:
        return self.deployer.docker

    def following(self) -> set[str]:
        return {r.service_id for r in self.pending}

    def follow(self, service: dict, spec: dict, push: Push, started: float, rollback: bool = False) -> None:
        if not self.enabled or is_job(spec):  # a job runs to completion; there is no rolling update to follow
            return
        # A newer update of the same service supersedes the older one: Swarm reports only the newest.
        self.pending = [r for r in self.pending if r.service_id != service["ID"]]
        timeout = self.timeout or default_rollout_timeout(spec, self.global_tasks(service["ID"], spec))
        task, labels = spec["TaskTemplate"], spec.get("Labels") or {}
        rollout = Rollout(service["ID"], spec.get("Name", "?"), task["ContainerSpec"]["Image"],
                          task.get("ForceUpdate", 0), push, started, started + timeout, rollback,
                          replaced=service.get("Spec") or {}, progress_at=started)
        try:
            rollout.checks = None if rollback else checks_of(labels)
        except ValueError as e:  # never "unchecked": a build nothing can prove good is not one to promote
            rollout.checks_error = f"its checks cannot be read: {e}"
        try:
            rollout.progress_deadline = 0.0 if rollback else progress_deadline(labels, self.progress_deadline)
        except ValueError as e:
            log.warning("Service %s: label %s: %s; the default (%s) applies", rollout.label, PROGRESS_DEADLINE_LABEL,
                        e, duration_text(self.progress_deadline))
            rollout.progress_deadline = self.progress_deadline
        if rollout.progress_deadline:  # Swarm's own pause between batches is no lack of progress
            rollout.progress_deadline += ((spec.get("UpdateConfig") or {}).get("Delay") or 0) / 1e9
        self.pending.append(rollout)

    def global_tasks(self, service_id: str, spec: dict) -> int:
        if "Global" not in (spec.get("Mode") or {}):
            return 1
        try:
            return max(1, sum(t.get("DesiredState") == "running" for t in self.docker.tasks(service_id)))
        except DockerError:
            return 1

    def check(self) -> None:
        """Ask Swarm how each pending rollout is doing; report and act on the ones that ended. One that Swarm
        completed and that has checks is looked at until they prove it good (or fail it)."""
        for rollout in list(self.pending):
            now = time.monotonic()
            if rollout.checking:
                self.look_at_checks(rollout, now)
                continue
            try:
                service = self.docker.service(rollout.service_id)
                state = rollout_state(service, rollout.image, rollout.force_update)
                if state == "superseded" and not rollout.rollback and lost_sight_of_rollback(
                        service, rollout.image, rollout.replaced, lambda: self.docker.tasks(rollout.service_id)):
                    state = "rollback_completed"
            except DockerError as e:
                service, state = None, "removed" if e.status == 404 else None
                if state is None:
                    log.error("Cannot follow the rollout of %s: %s", rollout.label, e)
            if state is None and service and now - rollout.started > NO_UPDATE_GRACE:
                state = "completed"  # Swarm had nothing to roll (e.g. no replicas): nothing can hang
            if state == "completed" and service and (rollout.checks or rollout.checks_error):
                self.start_checks(rollout, service, now)
                continue
            stuck = self.stuck(rollout, now) if state in (None, "updating") and service else None
            if state not in (*FINAL_STATES, "removed") and now > rollout.deadline:
                state = "timed_out"  # also when Docker cannot be asked: --wait must end
            elif stuck:
                state = "stuck"
            if state in (*FINAL_STATES, "removed", "timed_out", "stuck"):
                self.pending.remove(rollout)
                # Our rollback is an ordinary update (see roll_back): its outcomes are a rollback's.
                if rollout.rollback and state in ("completed", "paused"):
                    state = f"rollback_{state}"
                self.ended(rollout, state, service, now, stuck or "")

    def ended(self, rollout: Rollout, outcome: str, service: dict | None, now: float, said: str = "") -> None:
        """`said`: why, when the deployer judged it (stuck, its checks), not Swarm."""
        duration = now - rollout.started
        message, details = said, ""
        failed = outcome in ("paused", "rollback_paused", "timed_out", "stuck", "check_failed") or \
            outcome == "rollback_completed" and not rollout.rollback
        if failed and service and outcome != "check_failed":  # (Swarm rolled back our rollout: say why)
            swarm_says = (service.get("UpdateStatus") or {}).get("Message", "")
            try:
                tasks = self.docker.tasks(rollout.service_id)
            except DockerError:
                tasks = []
            task_error = failing_task_error(tasks, rollout.image)
            message = said or "; ".join(filter(None, [swarm_says, task_error and f"task error: {task_error}"]))
            details = self.failure_details(tasks, rollout.image) if self.deployer.notifier.targets else ""
        words = OUTCOME_WORDS[outcome.removeprefix("rollback_") if rollout.rollback else outcome]
        log.log(logging.INFO if outcome in ("completed", "rollback_completed", "superseded") and not (failed and message)
                else logging.ERROR, "%s of %s to %s %s after %.1fs%s", "Rollback" if rollout.rollback else "Rollout",
                rollout.label, rollout.image, words, duration, f": {message}" if message else "")
        self.outcomes.append(outcome)
        self.counts[outcome] += 1
        if outcome == "completed":  # a wave may follow it, a promotion may be due: look again soon
            self.deployer.reconciler.wake_at(time.time())
        self.notify(notification(outcome, rollout.name, rollout.service_id, rollout.image, duration,
                                 self.node_name(), message, rollback=rollout.rollback),
                    (service or {}).get("Spec", rollout.replaced).get("Labels"), details,
                    # ECR's push time and Swarm's answer: both clocks not ours
                    None if rollout.rollback else seconds_after(rollout.push.time, self.docker.date))
        if rollout.rollback or not service:
            return
        # (a rollout taken up by a reconcile pass whose PreviousSpec names no other image: nothing to restore)
        restorable = outcome != "check_failed" or running_image({"Spec": rollout.replaced}) is not None
        if self.rollback_on_failure and restorable and (
                outcome in ("timed_out", "stuck", "check_failed")  # Swarm rolls back failures, never slowness
                or outcome == "paused" and (service["Spec"].get("UpdateConfig") or {}).get("FailureAction") != "rollback"):
            self.roll_back(rollout, outcome, message)
        elif outcome == "check_failed":  # Swarm says completed: only a record keeps waves and promotion off it
            if self.rollback_on_failure:
                log.warning("Service %s: no earlier spec is known to roll back to (Swarm's PreviousSpec runs this "
                            "digest, or there is none): its failure is recorded, the service left on it", rollout.label)
            self.record_on_running(rollout, service, outcome, message)
        elif outcome == "rollback_completed":  # Swarm's FailureAction=rollback: it keeps no record of what failed
            self.deployer.actor.record_failure(service, rollout.push.account, rollout.push.region,
                                         rollout.image.rpartition("@")[2], outcome, message)

    def roll_back(self, rollout: Rollout, outcome: str, message: str) -> None:
        """Undo our update, only if the current spec is still ours (our image and ForceUpdate), and
        only what our update changed (rollback_spec): an operator who scaled the service or added an
        env var meanwhile keeps that, where Swarm's PreviousSpec would be our own spec from before
        their change. Not with Swarm's rollback=previous either: that restores PreviousSpec with the
        registry auth it was posted with, dead after 12 h, so nodes that must pull fail. We post an
        ordinary update with a fresh token (ForceUpdate moves on, so it counts as a new spec), then
        follow it."""
        try:
            fresh = self.docker.service(rollout.service_id)
            if not posted(fresh.get("Spec"), rollout.image, rollout.force_update):
                log.info("Service %s changed since our update; not rolling back a spec we did not post", rollout.label)
                return
            record = failure_record(rollout.image.rpartition("@")[2], outcome, self.node_name(), time.time(), message)
            spec = rollback_spec(fresh["Spec"], rollout.replaced, record, rollout.force_update)
            ref = running_image({"Spec": spec})
            if ref is None:
                raise DockerError("the spec our update replaced names no valid image")
            if ref.digest is None:  # (--no-resolve-image, `stack deploy --resolve-image never`)
                self.cannot_roll_back(rollout, unrestorable_reason(spec, rollout.image))
                return
            account, region = ecr_registry(ref.host) or (rollout.push.account, rollout.push.region)
            username, password = self.deployer.ecr.credentials(account, region)
            log.info("Rolling back service %s to its previous spec (%s)", rollout.label,
                     spec["TaskTemplate"]["ContainerSpec"]["Image"])
            started = time.monotonic()
            self.docker.update_service(fresh, spec, registry_auth_header(username, password, ref.name.partition("/")[0]))
        except (DockerError, AwsError) as e:
            log.error("Cannot roll back service %s: %s", rollout.label, e)
            return
        self.follow(fresh, spec, rollout.push, started, rollback=True)

    def cannot_roll_back(self, rollout: Rollout, reason: str) -> None:
        """A rollback that would restore no known build is not posted: reported as a failed rollback, the
        service left as Swarm left it (paused, or still updating) for the operator."""
        log.error("Cannot roll back service %s: %s", rollout.label, reason)
        self.outcomes.append("rollback_failed")
        self.counts["rollback_failed"] += 1
        self.notify(notification("rollback_failed", rollout.name, rollout.service_id, rollout.image, 0.0,
                                 self.node_name(), reason, rollback=True))

    def failure_details(self, tasks: list[dict], image: str) -> str:
        """The failed tasks' errors, exit codes and nodes, and the newest one's last log lines (failure_details)."""
        return self.tasks_details(failed_tasks(tasks, image))

    def tasks_details(self, failed: list[dict]) -> str:
        """These tasks' errors, exit codes and nodes, and the first one's last log lines (failure_details)."""
        nodes: dict[str, str] = {}
        for node_id in {t["NodeID"] for t in failed if t.get("NodeID")}:
            try:
                nodes[node_id] = self.docker.node_hostname(node_id)
            except DockerError:
                pass
        logs: list[str] | str = []
        if failed:
            try:
                logs = log_lines(self.docker.task_log(failed[0]["ID"], LOG_LINES_SHOWN))[-LOG_LINES_SHOWN:]
            except DockerError as e:  # e.g. a log driver that cannot be read back (syslog, awslogs, ...)
                logs = str(e).rpartition(": ")[2][:LOG_LINE_MAX]
        return failure_details(failed, nodes, logs)

    def node_name(self) -> str:
        if self._node_name is None:
            try:
                self._node_name = self.docker.node_name()
            except DockerError:
                return "?"
        return self._node_name

    def notify(self, document: dict, labels: dict | None = None, details: str = "", lead: float | None = None) -> None:
        """Best effort: a dead webhook is logged, and never blocks a deployment for long. Apprise targets
        (the Notifier) never block it at all; `labels`: the service's, for its NOTIFY_LABEL route."""
        self.deployer.notifier.event(event_of(document, labels)._replace(details=details, lead_seconds=lead))
        for url in self.notify_urls:
            self.deployer.systemd.heartbeat()  # many webhooks that hang must not starve the watchdog
            parts = urllib.parse.urlsplit(url)
            where = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname  # the rest may be secret
            try:
                requests.post(url, json=document, timeout=NOTIFY_TIMEOUT).raise_for_status()
            except requests.RequestException as e:
                status = getattr(e.response, "status_code", None)
                log.warning("Cannot notify %s: %s", where, f"HTTP {status}" if status else type(e).__name__)


# --------------------------------------------------------------------------- the job before the rollout

class BeforeJobs:
    """Runs a service's pre-rollout job (BEFORE_LABEL) on the digest, and has the service's hint converged
    again once the run ended: the service rolls, or is blocked with a failure record. Neither the drain nor
    other services wait for it: the run's state lives on the job (its image, BEFORE_RUN_LABEL) and in its
    tasks, so the message is done once the run is started, and a reconcile pass (the first comes when a
    deployer starts) picks up any run this process does not follow: it was restarted, or another manager
    started it. This process follows the runs it started or met (`pending`) as it follows rollouts: each turn
    of the loop (and with --once --wait), a look at the job (two Docker calls), the hint converged when it ended."""

    def __init__(self, deployer: Deployer):
        self.deployer = deployer
        self.pending: dict[tuple[str, str], Hint] = {}  # (service ID, digest) -> the hint waiting for its job
        self.said: set[tuple[str, str]] = set()  # (service ID, digest): its wait logged once
        # (service ID, digest): its run was seen under way. Such a hint never starts another: once the job has
        # run another digest since, a newer hint of this process or another deployer's superseded it (run
        # again, the older migration would follow the newer, and the service be rolled back to it)
        self.ran: set[tuple[str, str]] = set()

    def act(self, hint: Hint, decision: Decision) -> bool:
        """decide()'s "run job" or "wait for job" done: True (the swarm holds the run), False to retry."""
        service, push, digest = hint
        key = (service["ID"], digest)
        if decision.action == "run job":
            if self.deployer.dry_run:
                log.info("Would run its %s on %s before service %s", decision.gate, hint.image, service_label(service))
                return True
            if not self.start(hint, decision.gate):
                return False
            self.ran.add(key)
        elif key not in self.said:
            log.info("Service %s waits for its %s before %s: %s", service_label(service), decision.gate, hint.image,
                     decision.reason)
        self.said.add(key)
        kept = self.pending.get(key)
        if self.deployer.rollouts.enabled and (kept is None or kept.push.reconcile and not push.reconcile):
            self.pending[key] = hint  # followed here (loop mode, --wait); the event's over a pass's: it says why
        return True

    def start(self, hint: Hint, gate: str) -> bool:
        """Post the job's spec with its image moved to the digest (job_image), labelled with the digest: only
        if no manager did so meanwhile (the version read is the one posted: Swarm refuses a stale one)."""
        service, push, digest = hint
        try:
            job, run = self.deployer.converger.job_of(service, digest)
        except DockerError as e:
            log.error("Cannot read the %s of service %s: %s", gate, service_label(service), e)
            return False
        if job is None or run.state != "start":  # removed, or another deployer started a run since decide() read it
            return True  # (the next look says so)
        image = job_image(job, service, hint.image, push.tag, digest)
        ref = parse_image_ref(image)
        registry = ecr_registry(ref.host) if ref else None

        read = (job["Spec"].get("Labels") or {}).get(BEFORE_RUN_LABEL)

        def plan(now: dict) -> tuple[dict, ImageRef] | None:
            label = (now["Spec"].get("Labels") or {}).get(BEFORE_RUN_LABEL)
            if label == digest:
                log.info("Service %s: its %s was started for %s meanwhile; following it", service_label(service),
                         gate, digest)
                return None
            if label != read:  # (another deployer's run: posted over, Swarm would remove its tasks at once)
                log.info("Service %s: its %s was started for another digest meanwhile (%s); never cut short, "
                         "looked at again once it ended", service_label(service), gate, label)
                return None
            return job_run_spec(now, image, digest, service["Spec"].get("Name", "?")), ref

        def started(now: dict, spec: dict, _: float) -> None:
            log.info("Started the %s (%s) on %s: service %s rolls once it completed", gate, now["ID"][:12], image,
                     service_label(service))

        account, region = registry or (push.account, push.region)
        return self.deployer.actor.post_update(job, account, region, plan, started, with_auth=registry is not None)

    def blocked(self, hint: Hint, decision: Decision) -> None:
        """The run failed or timed out (or the job is missing): the service is not rolled, the outcome reported
        with the run's task errors and log lines, and the digest recorded as failed here (FAILED_LABEL)."""
        service, push, digest = hint
        self.pending.pop((service["ID"], digest), None)
        shown: list[str] = []

        def details() -> str:
            try:
                job, run = self.deployer.converger.job_of(service, digest)
            except DockerError as e:
                return f"its tasks: {e}"
            ended = [t for t in run.tasks if task_state(t) in ("failed", "rejected")] or \
                [t for t in run.tasks if task_state(t) != "complete"]
            ended.sort(key=lambda t: (t.get("Status") or {}).get("Timestamp", ""), reverse=True)
            shown.append(self.deployer.rollouts.tasks_details(ended[:FAILED_TASKS_SHOWN]) if ended else "")
            return shown[-1]

        if self.deployer.actor.blocked(service, hint.image, decision.reason, decision.gate, details):
            for line in "\n".join(shown).splitlines():
                log.error("Service %s, its %s: %s", service_label(service), decision.gate, line)
        if decision.record:  # (again if reported before: a record the service's own update kept out is retried)
            self.deployer.actor.record_failure(service, push.account, push.region, digest,
                                               f"blocked by its {decision.gate}", decision.reason)

    def check(self) -> None:
        """Look at each run followed: once it ended (or is not under way), converge its hint again, on the
        service as it is now (the service rolls, is blocked, or waits again)."""
        docker, converger = self.deployer.docker, self.deployer.converger
        for key, hint in list(self.pending.items()):
            try:
                service = docker.service(key[0])
                job, run = converger.job_of(service, key[1]) if BEFORE_LABEL in (
                    service["Spec"].get("Labels") or {}) else (None, None)
                state = run and run.state
            except DockerError as e:
                if e.status == 404:
                    self.pending.pop(key)
                else:
                    log.error("Cannot follow the pre-rollout job of service %s: %s", service_label(hint.service), e)
                continue
            if state == "running":
                self.ran.add(key)
            if state in ("running", "busy"):
                continue
            self.pending.pop(key)
            # (a run for no digest, say `docker stack deploy` reset the job's labels, superseded nothing: run again)
            if state == "start" and key in self.ran and ((job or {}).get("Spec", {}).get("Labels") or {}).get(
                    BEFORE_RUN_LABEL):
                self.ran.discard(key)
                log.info("Service %s: its %s ran another digest after %s; not run again for that one (superseded)",
                         service_label(service), JOB_GATE, key[1])
                continue
            result = CycleResult()
            if converger.converge(hint._replace(service=service), result) is False:
                self.pending.setdefault(key, hint)  # tried again next turn (and by the next pass)
            self.deployer.totals["services_updated"] += len(result.updated)
        self.ran.intersection_update(self.pending)


# --------------------------------------------------------------------------- the auth keeper

# Swarm's task states in order (swarmkit api.TaskState).
TASK_STATES = ("new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting",
               "running", "complete", "shutdown", "failed", "rejected", "remove", "orphaned")
# A task on a node and getting ready to run there (pulling its image): a re-post replaces it.
ON_A_NODE_STARTING = ("assigned", "accepted", "preparing")
# Swarm update states in which re-posting the spec would disturb an update (see AuthKeeper).
BUSY_STATES = ("updating", "paused", "rollback_started", "rollback_paused")
AUTH_REFRESH_RETRY = 300.0  # s: services that failed a pass are retried this soon, not after a whole interval
KEEPER_STATE_FILE = "auth-keeper.json"


def services_with_starting_tasks(tasks: list[dict]) -> set[str]:
    """Services with a task meant to run that is on a node and starting there (ASSIGNED to
    PREPARING). swarmkit ignores a change of pull options only for tasks in READY..RUNNING
    (orchestrator.IsTaskDirty), so a re-post replaces such a task and its node starts over, a real
    rolling update. A task on no node yet (NEW..PENDING: say a constraint nobody meets, or max
    replicas per node reached) is replaced at no cost, and is exactly what needs fresh auth: when a
    node that fits appears, it pulls with whatever auth the service holds then."""
    return {t.get("ServiceID") for t in tasks
            if t.get("DesiredState") in TASK_STATES[:TASK_STATES.index("running") + 1]
            and (t.get("Status") or {}).get("State") in ON_A_NODE_STARTING}


def keeper_due(state: dict, now: float, interval: float, retry_after: float) -> str | None:
    """Which pass the keeper owes now: "full" (every service), "retry" (only those that failed) or None.
    Wall-clock times, kept across restarts, so a crash-looping unit does not re-post every service each
    time it starts; a clock that went back makes a pass due rather than never."""
    attempt_at, passed_at = state.get("attempt_at"), state.get("passed_at")
    if attempt_at is not None and attempt_at <= now < attempt_at + retry_after:
        return None
    if passed_at is None or not passed_at <= now < passed_at + interval:
        return "full"
    return "retry" if state.get("retry") else None


class AuthKeeper:
    """Keeps Swarm's registry auth of every ECR service alive (moby/moby#31063): Swarm keeps the auth of
    a service's last update and ECR tokens die after 12 h, so every `interval` it re-posts each ECR
    service's unchanged spec with a fresh token. A re-post is an update, with side effects (docs/rollouts.md):
    the spec becomes PreviousSpec and the UpdateStatus of the last real rollout is replaced, and tasks
    not yet READY are replaced; so it skips jobs, services mid-update or followed by us, and services
    with a task starting on a node (one on no node yet costs nothing to replace, and needs the auth).
    A service Swarm rolled back gets its failure record in the same re-post (recorded). At most one pass
    per interval, also across restarts ($STATE_DIRECTORY)."""

    def __init__(self, deployer: Deployer, interval: float, state_directory: str | None):
        self.deployer, self.interval = deployer, interval
        self.retry_after = min(interval, AUTH_REFRESH_RETRY) if interval else AUTH_REFRESH_RETRY
        # systemd's StateDirectory= sets STATE_DIRECTORY (several paths are colon separated).
        directory = (state_directory or "").split(":")[0]
        self.state_path = os.path.join(directory, KEEPER_STATE_FILE) if directory else None
        self.state = self.load()
        self.announced = False

    def load(self) -> dict:
        if not self.state_path:
            return {}
        try:
            with open(self.state_path) as file:
                state = json.load(file)
            return state if isinstance(state, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("Cannot read %s (%s); starting afresh", self.state_path, e)
            return {}

    def save(self) -> None:
        if self.state_path:
            try:
                write_atomically(self.state_path, json.dumps(self.state) + "\n")
            except OSError as e:
                log.error("Cannot write %s: %s", self.state_path, e)

    def run_if_due(self) -> None:
        """Loop mode, each turn: the pass the schedule owes, if any."""
        if not self.interval:
            return
        now = time.time()
        due = keeper_due(self.state, now, self.interval, self.retry_after)
        passed_at = self.state.get("passed_at")
        if not due and not self.announced and passed_at is not None:  # say once why a restart re-posts nothing
            log.info("Registry auth was refreshed %.0fs ago (%s); the next pass is due in %.0fs",
                     now - passed_at, self.state_path, passed_at + self.interval - now)
        self.announced = True
        if due:
            self.run_pass(only=set(self.state.get("retry", [])) if due == "retry" else None)

    def run_pass(self, only: set[str] | None = None) -> bool:
        """One pass over every ECR service (or `only` these ids); True if none failed."""
        deployer = self.deployer
        if deployer.dry_run:
            log.info("Dry run: registry auth refresh skipped")
            return True
        now = time.time()
        self.state["attempt_at"] = now
        self.save()  # before anything can fail: a Docker outage is retried after retry_after, not at once
        deployer.ecr.new_cycle(fresh_tokens=True)  # a full lifetime for every token handed to Swarm
        services, tasks = deployer.docker.services(), deployer.docker.tasks()
        starting, tasks_of = services_with_starting_tasks(tasks), defaultdict(list)
        for task in tasks:
            tasks_of[task.get("ServiceID")].append(task)
        if only is None:
            self.state["passed_at"] = now
        followed = deployer.rollouts.following()
        refreshed: list[str] = []
        skipped: list[str] = []

        def plan(service: dict) -> tuple[dict, ImageRef] | None:
            if service["ID"] in followed or (service.get("UpdateStatus") or {}).get("State") in BUSY_STATES:
                log.info("Service %s is mid-update; its registry auth is refreshed next time", service_label(service))
            elif service["ID"] in starting:
                log.info("Service %s has tasks starting on a node, which a re-post would replace; its "
                         "registry auth is refreshed next time", service_label(service))
            else:
                return self.recorded(service, tasks_of[service["ID"]]), running_image(service)
            skipped.append(service["ID"])
            return None

        failed = []
        for listed in services:
            ref = running_image(listed)
            registry = ecr_registry(ref.host) if ref else None
            if not registry or is_job(listed["Spec"]) or (only is not None and listed["ID"] not in only):
                continue  # a job re-runs on every update: never touched
            if deployer.label_filter and not deployer.label_filter.admits(listed["Spec"].get("Labels")):
                continue
            if not deployer.actor.post_update(listed, *registry, plan,
                                        lambda service, *_: refreshed.append(service_label(service))):
                failed.append(listed["ID"])
        self.state["retry"] = failed
        self.save()
        log.info("Refreshed registry auth of %d service(s)%s%s%s", len(refreshed),
                 " (retrying those that failed)" if only is not None else "",
                 f"; {len(skipped)} skipped" if skipped else "", f"; {len(failed)} failed" if failed else "")
        return not failed

    def recorded(self, service: dict, tasks: list[dict]) -> dict:
        """The spec to re-post: the service's own, with the failure record of a digest Swarm rolled it back
        from added if none is written yet. The re-post resets UpdateStatus, which with the task history
        (pruned in time) is all Swarm keeps of its rollback: without the record, the next pass would roll
        the failed digest again."""
        digest = swarm_rolled_back(service, tasks)
        if digest is None or failed_digest(service) == digest:
            return service["Spec"]
        status = service["UpdateStatus"]
        record = failure_record(digest, status["State"], self.deployer.rollouts.node_name(), time.time(),
                                status.get("Message", ""))
        log.info("Recording on service %s before refreshing its registry auth: %s=%s", service_label(service),
                 FAILED_LABEL, record)
        return with_label(service["Spec"], FAILED_LABEL, record)


# --------------------------------------------------------------------------- the reconcile pass

RECONCILE_RETRY = 60.0  # s: a pass that failed (Docker or ECR unreachable) is tried again this soon
WAVE_RECHECK = 15.0  # s: a wait with no known end (a wave's leader) is first looked at again this soon,
RECHECK_CAP = 3600.0  # s: then ever less often, up to the reconcile period (this, with the periodic pass off)
WAKE_SLACK = 0.5  # s: a pass for a wait that ends at T comes just after T (a window is surely open then)
ECR_CONCURRENCY = 8  # DescribeImages calls in flight at once (botocore clients are thread-safe)


def recheck_cap(reconcile_every: float) -> float:
    return max(WAVE_RECHECK, reconcile_every or RECHECK_CAP)


def next_recheck(delay: float, cap: float) -> float:
    """The back-off of a wait with no known end: each look costs a whole reconcile pass (every service
    listed, every repository described, gates asked), so a leader that never comes must not cost one
    every 15 s for ever."""
    return min(cap, delay * 2)


def tags_by_repository(keys) -> dict[tuple[str, str, str], set[str]]:
    by_repository: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for account, region, repository, tag in keys:
        by_repository[(account, region, repository)].add(tag)
    return by_repository


def per_repository(ask, asked: dict, heartbeat=lambda: None) -> tuple[dict[tuple, object], dict[tuple, AwsError]]:
    """ask(*repository, items) for each (account, region, repository) -> items, a few repositories at a time
    (a pass holds up the queue while it runs), the main thread heartbeating while it waits. Returns
    (repository + item) -> ECR's answer, and per repository why ECR could not tell."""
    found, errors = {}, {}
    if len(asked) <= ECR_CONCURRENCY:  # a small fleet: no threads (each costs the process a malloc arena)
        for key, items in asked.items():
            heartbeat()
            try:
                found.update(((*key, item), answer) for item, answer in ask(*key, items).items())
            except AwsError as e:
                errors[key] = e
        return found, errors
    import concurrent.futures  # (here: only a fleet with many repositories needs the pool)
    with concurrent.futures.ThreadPoolExecutor(ECR_CONCURRENCY) as pool:
        futures = {pool.submit(ask, *key, items): key for key, items in asked.items()}
        pending = set(futures)
        while pending:
            done, pending = concurrent.futures.wait(pending, timeout=CONNECT_TIMEOUT)
            heartbeat()  # every call is bounded: a slow or throttled ECR is progress, not a hang
            for future in done:
                try:
                    found.update(((*futures[future], item), answer) for item, answer in future.result().items())
                except AwsError as e:
                    errors[futures[future]] = e
    return found, errors


def tag_digests(ecr: Ecr, keys, heartbeat=lambda: None) -> tuple[dict[tuple, TagAnswer], dict[tuple, AwsError]]:
    """(account, region, repository, tag) -> what ECR says the tag points to now, for the keys whose tag
    exists, batched per repository; also, per (account, region, repository), why ECR could not tell."""
    return per_repository(ecr.tag_digests, tags_by_repository(keys), heartbeat)


def tag_listings(ecr: Ecr, repositories, heartbeat=lambda: None) -> tuple[dict[tuple, dict], dict[tuple, AwsError]]:
    """(account, region, repository) -> {tag: digest} of all its tags (one paged ListImages each, a few
    repositories at a time, as tag_digests); also, per repository, why ECR could not tell."""
    found, errors = per_repository(lambda *key_and_items: {"": ecr.list_tags(*key_and_items[:3])},
                                   {key: [""] for key in repositories}, heartbeat)
    return {key[:3]: listing for key, listing in found.items()}, errors


class Reconciler:
    """Events are the fast path, not the truth: ECR sends them best effort, and queues lose them (DLQ,
    retention, purges). A pass compares, for every service that follows an ECR tag, the digest it runs
    with the digest its tag points to now, and rolls those behind exactly as a push would (scan gate,
    failure records, rollouts, reports). A service that follows versions is compared with the newest
    version its policy admits, from one paged ListImages of its repository per pass. One service listing
    and one DescribeImages per repository and 100 tags per pass; no ECR call at all when no service
    follows a tag or versions."""

    def __init__(self, deployer: Deployer, interval: float):
        self.deployer, self.interval = deployer, interval
        self.due_at = 0.0 if interval else math.inf  # time.monotonic(): the first pass comes after the first poll
        self.denied: set[tuple[str, str, str]] = set()  # repositories ECR refused to describe: said once
        self.unpinned = SaidOnce()  # services whose spec names no digest: said once
        self.images = ImageKeeper(deployer)

    def wake_at(self, epoch: float) -> None:
        """Something waits until then (a window opens, a soak ends): a pass comes at that moment."""
        self.due_at = min(self.due_at, time.monotonic() + max(0.0, epoch - time.time()) + WAKE_SLACK)

    def seconds_until_due(self) -> int:
        """How long the loop's long poll may wait before the next pass is due (1 to 20 s)."""
        if self.due_at == math.inf:
            return FIRST_WAIT_LOOP
        return max(FIRST_WAIT_ONCE, min(FIRST_WAIT_LOOP, math.ceil(self.due_at - time.monotonic())))

    def run_if_due(self) -> None:
        """Loop mode, each turn: a pass every `interval`, and whenever a wait ends (a failed pass is
        retried sooner). Passes woken by waits run even with the periodic pass off."""
        if time.monotonic() < self.due_at:
            return
        self.due_at, retry = math.inf, time.monotonic() + RECONCILE_RETRY
        try:
            passed = self.run_pass()
        except (AwsError, DockerError):
            self.due_at = min(self.due_at, retry)
            raise
        self.due_at = min(self.due_at, time.monotonic() + self.interval if self.interval else math.inf,
                          math.inf if passed else retry)

    def run_pass(self) -> bool:
        """One pass; True if nothing failed. Raises DockerError when Docker cannot list services."""
        deployer = self.deployer
        deployer.new_cycle()
        listed_at = time.monotonic()
        services = deployer.listing = deployer.docker.services()
        if deployer.service_index:  # the pass checks the index, as an informer's resync does
            deployer.service_index.replace(services, listed_at)
        images_checked = self.images.check([s for s in services if deployer.label_filter is None
                                            or deployer.label_filter.admits(s["Spec"].get("Labels"))])
        followed = {s["ID"]: key for s in services if (key := followed_tag(s, deployer.label_filter))}
        versioned = {s["ID"]: key for s in services if (key := versions_followed(s, deployer.label_filter))}
        if not followed and not versioned:
            log.debug("Reconcile pass: no service follows an ECR tag or versions")
            return images_checked
        listings, errors = tag_listings(deployer.ecr, set(versioned.values()), deployer.systemd.heartbeat)
        listings = without_deployers_tags(listings, services, deployer.protect_prefix)
        moves = self.version_moves([s for s in services if versioned.get(s["ID"]) in listings], listings)
        runs = {s["ID"]: (*versioned[s["ID"]], running_image(s).tag) for s in services  # (what promotion and
                if versioned.get(s["ID"]) in listings and running_image(s).tag  # the checks after a rollout read)
                and {PROMOTE_LABEL, ALARMS_LABEL, CHECK_LABEL} & set(labels_of(s))}
        followed_or_runs = {**runs, **followed}
        promotes = {key for s in services if (key := promote_key(s, followed_or_runs.get(s["ID"])))}
        now_at, described_errors = tag_digests(deployer.ecr, set(followed_or_runs.values()) | promotes |
                                               set(moves.values()), deployer.systemd.heartbeat)
        errors.update(described_errors)
        deployer.answers.update(now_at)
        for service in services:  # a rollout within its checks' window that this process does not follow
            key = followed_or_runs.get(service["ID"])
            if key in now_at and runs_digest(service, now_at[key].digest):
                deployer.rollouts.adopt(service, key, now_at[key].digest)
        for repository_key, error in errors.items():
            if not isinstance(error, AccessDenied):
                log.error("Reconcile pass: %s", error)
            elif repository_key not in self.denied:  # (a pull-only cross-account policy): waiting will not help
                self.denied.add(repository_key)
                listed = ", ecr:ListImages (its services follow versions)" \
                    if repository_key in versioned.values() else ""
                log.error("Reconcile pass: %s; its services are not reconciled (grant ecr:DescribeImages%s, and for "
                          "another account's repository its repository policy too)", error, listed)
        errors = {key: e for key, e in errors.items() if not isinstance(e, AccessDenied)}
        result, done = CycleResult(), []
        for service in services:
            key = followed.get(service["ID"])
            if key in now_at and running_image(service).digest is None:
                if service["ID"] not in self.unpinned:
                    self.unpinned.add(service["ID"])
                    log.info("Service %s names no digest, so which build it runs is unknown: the reconcile pass "
                             "leaves it (the next push of :%s pins it)", service_label(service), key[3])
                continue
            if key in now_at and not runs_digest(service, now_at[key].digest):
                answer = now_at[key]
                push = Push(*key, answer.digest, time=answer.pushed_text, reconcile=True)
                done.append(deployer.converger.converge(Hint(service, push, answer.digest), result))
        for service in services:
            key = moves.get(service["ID"])
            if key in now_at:  # (not: the tag was deleted since the listing; the next pass sees what is left)
                answer = now_at[key]
                self.moving_forward(service, key[3])
                push = Push(*key, answer.digest, time=answer.pushed_text, reconcile=True)
                done.append(deployer.converger.converge(Hint(service, push, answer.digest), result))
        promoted = [deployer.converger.promote_if_due(service, followed_or_runs[service["ID"]],
                                                      now_at[followed_or_runs[service["ID"]]], now_at)
                    for service in services if followed_or_runs.get(service["ID"]) in now_at
                    and PROMOTE_LABEL in (service["Spec"].get("Labels") or {})]
        deployer.totals["services_updated"] += len(result.updated)
        following = " and ".join(filter(None, (followed and f"{len(set(followed.values()))} ECR tag(s)", versioned and
                                               f"versions in {len(set(versioned.values()))} repository(ies)")))
        summary = (f"Reconcile pass: {len(done)} of {len(followed) + len(versioned)} service(s) following {following} "
                   f"behind; {len(result.updated)} updated, "
                   f"{done.count(None)} waiting for a scan, "
                   f"{done.count(True) - len(result.updated)} not rolled now (the lines above say why), "
                   f"{done.count(False)} failed")
        log.log(logging.INFO if done or errors else logging.DEBUG, "%s", summary)
        return images_checked and not errors and False not in done + promoted

    def version_moves(self, services: list[dict], listings: dict[tuple, dict]) -> dict[str, tuple]:
        """service ID -> (account, region, repository, tag) of the newest version its policy admits, for each
        service that should move there; a policy that cannot be read is said once (the Actor's refused)."""
        moves, newest = {}, newest_versions(services, {s["ID"]: repository_of(s) for s in services}, listings)
        for service in services:
            policy, malformed = policy_or_why_not(service)
            if malformed:
                self.deployer.actor.refused(service, malformed)
                continue
            repository = repository_of(service)
            target = version_target(policy, listings[repository], running_image(service), newest[service["ID"]])
            if target:
                moves[service["ID"]] = (*repository, target[0])
        return moves

    def moving_forward(self, service: dict, tag: str) -> None:
        """Say once (per service and the image its spec names) that an operator's spec put an older version
        back, as the pass moves it forward: a compose file that names an old version does this on each deploy."""
        note = older_spec_named(service, service_version_policy(service), tag)
        key = (service["ID"], str((service.get("Version") or {}).get("Index")))  # (each put-back is a new version)
        if note and key not in self.deployer.actor.reported_older:
            self.deployer.actor.reported_older.add(key)
            log.info("Service %s: %s; the reconcile pass moves it to :%s", service_label(service), note, tag)


def service_label(service: dict) -> str:
    return f"{service.get('Spec', {}).get('Name', '?')} ({service.get('ID', '?')[:12]})"


# --------------------------------------------------------------------------- images kept

def image_statuses(ecr: Ecr, keys, heartbeat=lambda: None) -> tuple[dict[tuple, str | None], dict[tuple, AwsError]]:
    """(account, region, repository, digest) -> ECR's imageStatus (None: gone), batched per repository as
    tag_digests is; also, per repository, why ECR could not tell."""
    by_repository: dict[tuple, set[str]] = defaultdict(set)
    for *repository, digest in keys:
        by_repository[tuple(repository)].add(digest)
    return per_repository(ecr.kept.image_statuses, by_repository, heartbeat)


class ImageKeeper:
    """Checks, for each service running an ECR image, that ECR still has the digest it runs and its
    rollback target in the standard storage class. A problem is said once (one WARNING, one notification)
    when it appears, again only if it changes; with `restore`, an archived one is restored
    (UpdateImageStorageClass), once. One DescribeImages per repository and 100 digests per pass."""

    def __init__(self, deployer: Deployer, restore: bool = False, protect_prefix: str | None = None):
        self.deployer, self.restore, self.protect_prefix = deployer, restore, protect_prefix
        self.said: dict[tuple, str] = {}  # (service id, role, digest) -> the state last said
        self.restored: set[tuple] = set()  # images this process asked ECR to restore
        self.tagged: set[tuple] = set()  # repositories holding protection tags of ours: listed until they hold none
        self.immutable: set[tuple] = set()  # repositories whose tags ECR refused to move: said once
        self.denied: set[tuple] = set()  # repositories where the role may not keep protection tags: said once

    def states(self, services: list[dict]) -> tuple[dict[str, dict[str, str]], dict[tuple, AwsError]]:
        """service id -> role -> ok, archived, restoring or gone; and per repository why ECR could not tell."""
        kept = {s["ID"]: kept_images(s) for s in services}
        statuses, errors = image_statuses(self.deployer.ecr, {key for roles in kept.values() for key in roles.values()},
                                          self.deployer.systemd.heartbeat)
        return {sid: {role: image_state(statuses[key]) for role, key in roles.items() if key in statuses}
                for sid, roles in kept.items()}, errors

    def check(self, services: list[dict]) -> bool:
        """The reconcile pass's check; False if ECR could not tell for some repository."""
        states, errors = self.states(services)
        for error in errors.values():
            log.error("Checking the images services run: %s", error)
        counts = dict.fromkeys(IMAGE_STATUS_EXIT, 0)
        listed = {s["ID"] for s in services}
        self.said = {key: state for key, state in self.said.items() if key[0] in listed}  # (services removed)
        for service in services:
            name = service["Spec"].get("Name", "?")
            for role, state in states.get(service["ID"], {}).items():
                key = kept_images(service)[role]
                counts[state] += 1
                said_key = (service["ID"], role, key[3])
                if state == "ok":
                    self.said.pop(said_key, None)  # (a problem that comes back is said again, and repaired)
                    self.restored.discard(key)
                    continue
                restoring = state == "archived" and self.restore and key not in self.restored \
                    and self.restore_one(name, key)
                if self.said.get(said_key) == ("restoring" if restoring else state):
                    continue
                self.said[said_key] = "restoring" if restoring else state
                line = image_problem(name, role, key, state, bool(restoring))
                log.warning("%s", line)
                self.deployer.notifier.event(Event("image_at_risk", name, f"{key[2]}@{key[3]}",
                                                   line.partition(": ")[2],  # (the event names the service)
                                                   route=notify_route(service["Spec"].get("Labels"))))
        self.deployer.totals["images_at_risk"] = {state: n for state, n in counts.items() if state != "ok"}
        protected = self.protect(services, states) if self.protect_prefix else True
        return not errors and protected

    def protect(self, services: list[dict], states: dict[str, dict[str, str]]) -> bool:
        """Moves the protection tags to the digests services run and roll back to (images ECR holds in the
        standard storage class), and removes those of services gone. One ListImages per repository (shared
        with the pass's version lookups); a PutImage (and the BatchGetImage of its bytes) per tag moved, a
        BatchDeleteImage per tag removed. False if ECR (or Docker, asked again before a removal) failed."""
        prefix = self.protect_prefix
        wanted: dict[tuple, dict[str, str]] = defaultdict(dict)  # repository -> tag -> digest
        for service in services:
            for role, key in kept_images(service).items():
                if states.get(service["ID"], {}).get(role) == "ok":
                    wanted[key[:3]][protection_tag(prefix, service["Spec"].get("Name", "?"), role)] = key[3]
        named, in_use = protection_claims(prefix, services)
        heartbeat = self.deployer.systemd.heartbeat
        moved, errors = per_repository(  # a few repositories at a time: a first pass tags every digest in use
            lambda account, region, repository, _: {"tags": self.move_tags(
                (account, region, repository), wanted.get((account, region, repository), {}))},
            dict.fromkeys(sorted(set(named) | self.tagged), ()), heartbeat)
        left = {key[:3]: tags for key, tags in moved.items()}  # None: a move failed, nothing removed there now
        done = all(tags is not None for tags in left.values())
        if any(tags and protection_removals(prefix, tags, named.get(repository, set()), in_use.get(repository, set()))
               for repository, tags in left.items()):
            # Asked again, now, and all of the swarm: the pass's listing is seconds old (another manager's
            # deployer may have tagged a service created since) and admits only --filter-label's services
            # (another deployer of this swarm keeps the others'); a tag goes only if no service names it now.
            try:
                swarm = self.deployer.docker.services()
            except DockerError as e:
                log.error("Protection tags: none removed this pass: %s", e)
                swarm, done = None, False
            if swarm is not None:
                now_named, now_in_use = protection_claims(prefix, swarm)
                removals = {repository: tuple(protection_removals(
                    prefix, tags, named.get(repository, set()) | now_named.get(repository, set()),
                    in_use.get(repository, set()) | now_in_use.get(repository, set())))
                    for repository, tags in left.items() if tags}
                removed, failed = per_repository(
                    lambda account, region, repository, gone: {"done": self.remove_tags(
                        (account, region, repository), gone, left[(account, region, repository)])},
                    {repository: gone for repository, gone in removals.items() if gone}, heartbeat)
                errors.update(failed)
                done = done and all(removed.values())
        for repository, tags in left.items():
            if tags is None or any(is_protection_tag(prefix, tag) for tag in tags):
                self.tagged.add(repository)  # (listed again next pass, also once no service uses it)
            else:
                self.tagged.discard(repository)
        for repository, error in errors.items():
            if not isinstance(error, AccessDenied):
                log.error("Protection tags: %s", error)
            elif repository not in self.denied:  # (another account's pull-only repository): waiting will not help
                self.denied.add(repository)
                log.error("Protection tags: %s; none are kept in %s (grant ecr:ListImages, ecr:PutImage and "
                          "ecr:BatchDeleteImage, and for another account's repository its repository policy too)",
                          error, repository[2])
        return done and not any(not isinstance(error, AccessDenied) for error in errors.values())

    def move_tags(self, repository: tuple, wanted: dict[str, str]) -> dict[str, str] | None:
        """One repository's protection tags moved: its tags then (tag -> digest), None if ECR refused a move
        (but for its immutability: said once, the operator must act). AwsError if ECR cannot list its tags."""
        ecr = self.deployer.ecr
        tags = ecr.list_tags(*repository)
        for tag, digest in protection_changes(self.protect_prefix, wanted, set(), tags)[0].items():
            try:
                ecr.promote(*repository, digest, tag)
            except TagImmutable:  # retrying changes nothing until the operator does: said once, not a failed pass
                self.say_immutable(repository)
                continue
            except AccessDenied:
                raise  # (said once for the repository, as a listing refused)
            except AwsError as e:  # (one line per repository and pass: the rest would fail alike)
                log.error("Protection tags: %s", e)
                return None
            tags[tag] = ecr.tag_listings.setdefault(repository, {})[tag] = digest
            log.info("Protection tag %s:%s now on %s", repository[2], tag, short_digest(digest))
        return tags

    def remove_tags(self, repository: tuple, removals: tuple[str, ...], tags: dict[str, str]) -> bool:
        """BatchDeleteImage of each tag alone; False if ECR refused one. `tags` (the repository's) kept current."""
        ecr = self.deployer.ecr
        for tag in removals:
            try:
                ecr.kept.untag(*repository, tag)
            except AccessDenied:
                raise  # (said once for the repository)
            except AwsError as e:
                log.error("Protection tags: %s", e)
                return False
            tags.pop(tag, None)
            ecr.tag_listings.get(repository, {}).pop(tag, None)
            log.info("Protection tag %s:%s removed: no service of the swarm names it now", repository[2], tag)
        return True

    def say_immutable(self, repository: tuple) -> None:
        """Protection tags move: a tag-immutable repository must exclude them (once per process)."""
        if repository in self.immutable:
            return
        self.immutable.add(repository)
        try:
            described = self.deployer.ecr.repository(*repository)
        except AwsError:
            described = None
        log.error("Protection tags: %s", immutable_tag_fix(*repository, f"{self.protect_prefix}.*", described,
                                                           what="the protection tags"))

    def restore_followed(self, hint: Hint, release: Release) -> Release:
        """A service's tag points at an archived image (archived_release): with `restore`, ECR is asked to
        restore it (once), and the service waits for it; else the release as it was (held)."""
        service, push, digest = hint
        key = (push.account, push.region, push.repository, digest)
        if not self.restore or release.decision != "held" or key in self.restored or \
                not self.restore_one(service["Spec"].get("Name", "?"), key):
            return release
        log.info("Service %s: asked ECR to restore %s@%s, which its tag points at, to the standard storage class",
                 service_label(service), push.repository, short_digest(digest))
        return archived_release(push, digest, "ACTIVATING")

    def restore_one(self, name: str, key: tuple) -> bool:
        """Asks ECR to restore an archived image (once per process: ECR restores it within minutes)."""
        try:
            self.deployer.ecr.kept.restore_image(*key)
        except AwsError as e:
            log.error("Service %s: %s", name, e)
            if isinstance(e, AccessDenied):  # (waiting will not help: said once, the WARNING says how by hand)
                self.restored.add(key)
            return False
        self.restored.add(key)
        return True


def lifecycle_lint(deployer: Deployer, services: list[dict], sleep=time.sleep) \
        -> tuple[dict[str, list[str]], list[AwsError]]:
    """Service name -> one line per image it runs or rolls back to that a rule of its repository's lifecycle
    policy would expire or archive now, as ECR's preview of the policy says; and why ECR could not tell, per
    repository. GetLifecyclePolicy per repository (one call where there is none), every preview started
    before any is waited for (ECR evaluates them side by side), then asked for in rounds a second apart, a
    few repositories at a time. Changes nothing."""
    in_use: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for service in services:
        for role, key in kept_images(service).items():
            in_use[key[:3]][key[3]].append((service["Spec"].get("Name", "?"), role))
    kept, heartbeat = deployer.ecr.kept, deployer.systemd.heartbeat
    policies, errors = per_repository(lambda *key: {"policy": kept.lifecycle_policy(*key[:3])}, in_use, heartbeat)
    pending = {key[:3]: {"policy": text, "started": False} for key, text in policies.items() if text}
    lines: dict[str, list[str]] = defaultdict(list)
    deadline = time.monotonic() + LIFECYCLE_PREVIEW_TIMEOUT

    def step(account: str, region: str, repository: str, _) -> dict:
        state = pending[(account, region, repository)]
        if not state["started"]:
            state["started"] = kept.start_lifecycle_preview(account, region, repository)
            return {"results": None}
        return {"results": kept.lifecycle_preview(account, region, repository)}

    rounds = 0
    while pending:
        if rounds > 1:  # (the first round starts the previews, the second asks at once: a small one is done)
            sleep(LIFECYCLE_PREVIEW_POLL)
        rounds += 1
        answers, failed = per_repository(step, dict.fromkeys(pending, ()), heartbeat)
        errors.update(failed)
        for repository in failed:
            del pending[repository]
        for (*repository, _), results in answers.items():
            if results is None:
                continue
            where = f"{repository[2]} in ECR ({repository[0]}, {repository[1]})"
            for name, line in lifecycle_findings(pending.pop(tuple(repository))["policy"], results,
                                                 in_use[tuple(repository)], where):
                lines[name].append(line)
        if pending and time.monotonic() > deadline:
            errors.update({key: AwsError(f"ECR's preview of the lifecycle policy of {key[2]} ({key[0]}, {key[1]}) "
                                         f"did not complete in {LIFECYCLE_PREVIEW_TIMEOUT:.0f} s") for key in pending})
            break
    return {name: sorted(found) for name, found in lines.items()}, list(errors.values())


def lint_lifecycle(deployer: Deployer) -> int:
    """--lint-lifecycle: a line per image in use a lifecycle rule would expire or archive; exit 0 none,
    5 some (the operator must act), 1 ECR could not be asked for some repository."""
    services = [s for s in deployer.docker.services() if deployer.label_filter is None
                or deployer.label_filter.admits(s["Spec"].get("Labels"))]
    lines, errors = lifecycle_lint(deployer, services)
    for error in errors:
        log.error("Linting the lifecycle policies: %s", error)
    found = [line for name in sorted(lines) for line in lines[name]]
    none = "No lifecycle rule would expire or archive an image a service runs or rolls back to" + (
        f" in the repositories ECR answered for; {len(errors)} could not be asked (the ERROR lines say why)"
        if errors else "")  # (not a plain "none" when some were never asked)
    sys.stdout.write("".join(line + "\n" for line in found) or none + "\n")  # the result, not a log line
    return 5 if found else 1 if errors else 0


# --------------------------------------------------------------------------- receiving

GATHER_SHARE = 0.5  # gathering one batch takes at most this share of the visibility timeout
HOLD_SHARE = 1 / 3  # messages in hand are extended this often (a share of the visibility timeout)


class Receiver:
    """Gathers batches from the queue, and keeps every message in hand invisible to other
    consumers (ChangeMessageVisibilityBatch, from a thread) until it is released: its receipt
    handle is then still valid when it is deleted, however long the work on it took, and it is
    never redelivered mid-cycle.

    once=True (--once): each message is handed out at most once per run. One seen before that
    comes back (it failed, or a dry run left it) is held until the run ends, so that the
    following receives reach the messages not seen yet instead of stopping early."""

    def __init__(self, queue: Queue, once: bool = False):
        self.queue = queue
        self.visibility_timeout = max(1, queue.visibility_timeout)
        self.seen: set[str] | None = set() if once else None
        self._held: dict[str, dict] = {}  # MessageId -> the message, with its newest receipt handle
        self._lock = threading.Lock()
        self._holder: threading.Thread | None = None

    def gather(self, first_wait: int, interruptible=nullcontext) -> list[dict]:
        """The first receive long-polls; follow-ups take what a burst left on the queue, until a
        receive adds nothing new (or fewer than ten: drained for now), the batch is full, or its
        share of the visibility timeout is up: a slow queue cannot make a cycle endless."""
        batch: dict[str, dict] = {}
        with interruptible():
            received = self.queue.receive(first_wait)
        deadline = time.monotonic() + self.visibility_timeout * GATHER_SHARE
        while self._take(received, batch) and len(batch) < BATCH_CAP and time.monotonic() < deadline \
                and not (batch and len(received) < SQS_MAX_MESSAGES):
            try:
                received = self.queue.receive(FOLLOW_UP_WAIT)
            except AwsError as e:  # what is in hand is handled (and released) all the same
                log.warning("%s; going on with the %d message(s) received", e, len(batch))
                break
        return list(batch.values())

    def _take(self, received: list[dict], batch: dict[str, dict]) -> bool:
        """Hold what was received and add it to the batch (unless seen this run); True if any was new."""
        with self._lock:
            new = {m["MessageId"] for m in received} - self._held.keys()
            # SQS deletes a message received twice only with the newest of its receipt handles.
            self._held.update((m["MessageId"], m) for m in received)
        seen = self.seen or set()
        for message in received:
            if message["MessageId"] in batch or (message["MessageId"] in new and message["MessageId"] not in seen):
                batch[message["MessageId"]] = message
        if new and self._holder is None:
            self._holder = threading.Thread(target=self._hold, name="visibility-hold", daemon=True)
            self._holder.start()
        return bool(new)

    def release(self, messages: list[dict]) -> None:
        """Handled (deleted, or left to come back for a retry): no longer held."""
        with self._lock:
            for message in messages:
                self._held.pop(message["MessageId"], None)
        if self.seen is not None:
            self.seen.update(m["MessageId"] for m in messages)

    def hand_back(self, messages: list[dict]) -> None:
        """Make messages visible again at once (ChangeMessageVisibility 0), for another deployer to take
        now rather than after the visibility timeout. Best effort: they come back then anyway."""
        self.release(messages)
        self.queue.extend(messages, 0)

    def _hold(self) -> None:
        while True:
            time.sleep(self.visibility_timeout * HOLD_SHARE)
            with self._lock:
                held = list(self._held.values())
            if held:
                try:
                    self.queue.extend(held, self.visibility_timeout)
                except Exception:  # a bug must not end the hold for good: held messages would reappear
                    log.exception("Cannot extend the visibility of held messages")


# --------------------------------------------------------------------------- reports

def write_atomically(path: str, text: str) -> None:
    """Readers (cron wrappers, node_exporter) never see a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".ecr-deploy-")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def all_metrics(deployer: Deployer) -> str:
    return metrics_text(deployer.totals) + deployer.notifier.service_metrics.text()


def serve_metrics(deployer: Deployer, address: str) -> None:
    """Loop mode, opt-in: GET /metrics for Prometheus to scrape (the textfile's text), from a daemon thread."""
    import http.server  # only when asked for: a deployer without it keeps its start-up
    host, _, port = address.rpartition(":")

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = all_metrics(deployer).encode() if self.path.split("?")[0] == "/metrics" else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    try:
        server = http.server.ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Handler)
    except (OSError, ValueError) as e:
        raise Misconfigured(f"Cannot serve metrics on {address}: {e}") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("Serving metrics on http://%s:%d/metrics", *server.server_address[:2])


def write_reports(deployer: Deployer, args: argparse.Namespace) -> None:
    try:
        if args.summary_file:
            summary = {"time": round(time.time(), 3), "messages": deployer.totals["messages"],
                       "services_updated": deployer.totals["services_updated"],
                       "rollouts": dict(deployer.totals["rollouts"]),
                       "rollouts_pending": len(deployer.rollouts.pending),
                       "last_success": deployer.totals["last_success"]}
            write_atomically(args.summary_file, json.dumps(summary, indent=2) + "\n")
        if args.metrics_file:
            write_atomically(args.metrics_file, all_metrics(deployer))
    except OSError as e:
        log.error("Cannot write reports: %s", e)


# --------------------------------------------------------------------------- notifications

NOTIFY_BACKLOG = 500  # events a target keeps while it cannot be reached; past that the oldest go (counted)
NOTIFY_RETRY_CAP = 60.0  # s: the longest wait between attempts to a target that failed
NOTIFY_FLUSH = 15.0  # s: the most a run waits at its end for its targets (a deploy never waits for them)
APPRISE_INSTALL = "/opt/ecr-deploy/venv/bin/pip install apprise"


def import_apprise(targets: list[TargetConfig]):
    """Apprise only when a target needs it: without one, memory and start-up stay as they were."""
    try:
        import apprise
    except ImportError:
        raise Misconfigured(f"Notification target {targets[0].name} ({targets[0].scheme}) needs Apprise, which "
                            f"is not installed: {APPRISE_INSTALL}") from None
    quiet = logging.getLogger("apprise")  # its debug lines carry whole URLs: never printed, warnings kept per thread
    quiet.propagate, quiet.handlers = False, [AppriseReasons()]
    quiet.setLevel(logging.WARNING)
    return apprise


class AppriseReasons(logging.Handler):
    """Apprise's warning says why a send failed; the thread that sent reads it (and redacts it)."""
    last = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        AppriseReasons.last.text = record.getMessage()


class Target:
    """One Apprise URL and its own thread: events wait in a bounded backlog, never on the deploy path; what
    piled up while the target was slow or down goes out as one message when it answers again. `held`
    (a one-shot run): nothing is sent before flush(), which sends one message that sums up the run."""

    def __init__(self, config: TargetConfig, apprise, node_name, held: bool):
        self.config, self.node_name, self.secrets = config, node_name, url_secrets(config.url)
        try:  # Apprise >= 2.3 would send from its own pool, whose threads exit waits for: this thread is ours
            asset = apprise.AppriseAsset(plugin_paths=[], service_timeout=0)
        except TypeError:
            asset = apprise.AppriseAsset(plugin_paths=[])
        self.apprise = apprise.Apprise(asset=asset)
        if not self.apprise.add(config.url):
            raise Misconfigured(f"Notification target {self}: not a URL Apprise understands")
        self.types = {"failure": apprise.NotifyType.FAILURE, "warning": apprise.NotifyType.WARNING,
                      "success": apprise.NotifyType.SUCCESS, "info": apprise.NotifyType.INFO}
        self.backlog: list[Event] = []
        self.dropped = 0
        self.busy = False
        self.changed = threading.Condition()
        self.thread = None if held else self.start()

    def __str__(self) -> str:
        return f"{self.config.name} ({self.config.scheme})"  # the rest of a URL may be a credential

    def start(self) -> threading.Thread:
        self.thread = threading.Thread(target=self._run, name=f"notify-{self.config.name}", daemon=True)
        self.thread.start()
        return self.thread

    def put(self, event: Event) -> None:
        with self.changed:
            self.backlog.append(event)
            if len(self.backlog) > NOTIFY_BACKLOG:
                del self.backlog[0]
                self.dropped += 1
            self.changed.notify_all()

    def flush(self, deadline: float) -> int:
        """Send what is left, waiting until `deadline` (time.monotonic()) at most; how many events were not sent."""
        if self.thread is None:
            self.start()
        with self.changed:
            while (self.backlog or self.busy) and time.monotonic() < deadline:
                self.changed.wait(max(0.0, deadline - time.monotonic()))
            return len(self.backlog)

    def _run(self) -> None:
        retry = Backoff(cap=NOTIFY_RETRY_CAP)
        while True:
            with self.changed:
                while not self.backlog:
                    self.changed.wait()
                events, dropped, self.busy = list(self.backlog), self.dropped, True
            sent = self._send(events, dropped)
            with self.changed:
                if sent:  # what was dropped meanwhile stays counted, but for the events this message carried
                    taken = {id(e) for e in events}
                    kept = [e for e in self.backlog if id(e) not in taken]
                    carried_anyway = len(taken) - (len(self.backlog) - len(kept))
                    self.backlog, self.dropped = kept, self.dropped - dropped - carried_anyway
                self.busy = False
                self.changed.notify_all()
            if sent:
                retry.reset()
            else:
                time.sleep(retry.next())

    def _send(self, events: list[Event], dropped: int) -> bool:
        title, body, severity = message_of(events, self.node_name())
        if dropped:
            body += f"\n({dropped} older event(s) dropped: more than {NOTIFY_BACKLOG} waited for this target)"
        title, body = defuse_mentions(title), defuse_mentions(body)  # what containers wrote calls no one
        AppriseReasons.last.text = ""
        try:
            sent = self.apprise.notify(body=body, title=title, notify_type=self.types[severity], body_format="text")
        except Exception as e:  # a plugin's bug must not end this thread
            AppriseReasons.last.text, sent = f"{type(e).__name__}: {e}", False
        if sent:
            log.info("Notified %s: %s", self, title)
        else:
            log.warning("Cannot notify %s: %s; %d event(s) kept for the next attempt", self,
                        redact(AppriseReasons.last.text or "not sent", self.secrets), len(events))
        return bool(sent)


class Notifier:
    """Each event to the targets that want it: their filter of event classes, and the service's
    NOTIFY_LABEL route. Never blocks: each target sends from its own thread."""

    def __init__(self, configs: list[TargetConfig], held: bool = False, node_name=lambda: "?"):
        apprise = import_apprise(configs) if configs else None
        self.targets = [Target(config, apprise, node_name, held) for config in configs]
        self.service_metrics = ServiceMetrics()
        self.misrouted: set[tuple[str, tuple[str, ...]]] = set()  # (service, route) said once each

    def event(self, event: Event) -> None:
        self.service_metrics.observe(event)
        for target in self.targets:
            if target.config.wants(event):
                target.put(event)
        self._say_misroute(event)

    def _say_misroute(self, event: Event) -> None:
        """A label that names no target (a typo, a target renamed) would silence the service's events: say
        so once per service and label value (at most METRIC_SERVICES remembered)."""
        names = {target.config.name for target in self.targets}
        unknown = sorted(set(event.route) - names)
        if not self.targets or not unknown or (event.service, event.route) in self.misrouted:
            return
        if len(self.misrouted) >= METRIC_SERVICES:  # services come and go: said again, at worst
            self.misrouted.clear()
        self.misrouted.add((event.service, event.route))
        known = [name for name in event.route if name in names]
        log.warning("Service %s: its label %s names %s, which no notification target is called (targets: %s); "
                    "its events go %s", event.service, NOTIFY_LABEL, ", ".join(unknown), ", ".join(sorted(names)),
                    f"only to {', '.join(known)}" if known else "to no target")

    def finish(self, timeout: float = NOTIFY_FLUSH) -> None:
        deadline = time.monotonic() + timeout
        for target in self.targets:
            target.start() if target.thread is None else None
        for target in self.targets:
            if left := target.flush(deadline):
                log.error("Could not notify %s: %d event(s) not sent within %.0fs", target, left, timeout)


HEARTBEAT_EVERY = 60.0  # s: loop mode pings at most this often (never per cycle)
HEARTBEAT_TIMEOUT = 5.0


class Heartbeat:
    """A dead deployer noticed by someone: pings a healthchecks.io-style URL (URL/start, URL, URL/fail) from a
    thread of its own, never on the deploy path. Loop mode: success at most once per HEARTBEAT_EVERY while
    healthy, fail when unhealthy; a one-shot run: start, then success or fail."""

    def __init__(self, url: str | None):
        self.url, self.last = (url or "").rstrip("/"), -math.inf
        self.pending: list[threading.Thread] = []

    def ping(self, status: str) -> None:
        if not self.url:
            return
        url = self.url + {"success": "", "start": "/start", "fail": "/fail"}[status]
        thread = threading.Thread(target=self._get, args=(url, status), name="heartbeat", daemon=True)
        thread.start()
        self.pending = [t for t in self.pending if t.is_alive()] + [thread]

    def healthy(self) -> None:
        if time.monotonic() - self.last >= HEARTBEAT_EVERY:
            self.last = time.monotonic()
            self.ping("success")

    def finish(self) -> None:
        for thread in self.pending:
            thread.join(HEARTBEAT_TIMEOUT)

    def _get(self, url: str, status: str) -> None:
        try:
            requests.get(url, timeout=HEARTBEAT_TIMEOUT).raise_for_status()
        except requests.RequestException as e:
            code = getattr(e.response, "status_code", None)
            log.warning("Cannot ping the heartbeat URL (%s): %s", status, f"HTTP {code}" if code else type(e).__name__)


class Health:
    """The deployer itself, said once each way: unhealthy when Docker or the queue stayed unreachable
    for `after`, recovered when it works again."""

    def __init__(self, notifier: Notifier, after: float, heartbeat: Heartbeat | None = None):
        self.notifier, self.after, self.heartbeat = notifier, after, heartbeat or Heartbeat(None)
        self.since: float | None = None
        self.reported = False

    def trouble(self, what: str) -> None:
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        if not self.reported and now - self.since >= self.after:
            self.reported = True
            self.notifier.event(Event("unhealthy", "", "", f"ecr-deploy unhealthy for {now - self.since:.0f}s: {what}"))
            self.heartbeat.ping("fail")

    def fine(self) -> None:
        self.heartbeat.healthy()
        if self.reported:
            self.notifier.event(Event("recovered", "", "",
                                      f"ecr-deploy recovered after {time.monotonic() - self.since:.0f}s"))
        self.since, self.reported = None, False


# --------------------------------------------------------------------------- logging and systemd

# syslog priorities: journald reads a "<N>" prefix, so `journalctl -p warning` works.
SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class OneLineFormatter(logging.Formatter):
    """Formats records as `style` says; a message never spans lines (nor can forge one)."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace("\r", " ").replace("\n", " ")
        if self.style == "journal":  # journald adds the time itself
            return f"<{SYSLOG_PRIORITY.get(record.levelno, 6)}>{message}"
        stamp = datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")
        if self.style == "json":
            return json.dumps({"time": stamp, "level": record.levelname, "message": message})
        return f"{stamp} {record.levelname} {message}"


def log_style(choice: str, environ: dict, stderr_fd: int = 2) -> str:
    """auto: journal style when stderr really is the journal stream systemd names, else text."""
    if choice != "auto":
        return choice
    try:
        stat = os.fstat(stderr_fd)
    except OSError:
        return "text"
    return "journal" if environ.get("JOURNAL_STREAM") == f"{stat.st_dev}:{stat.st_ino}" else "text"


def setup_logging(level: str, style: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter(style))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])  # botocore/urllib3 stay quiet:
    log.setLevel(level)  # their debug output would carry ECR tokens


class Systemd:
    """sd_notify(3) over $NOTIFY_SOCKET with the standard library; a no-op outside systemd."""

    # s: the longest the main loop goes between heartbeats: one call (Docker's bound, 5 s connect
    # + 30 s read, is the longest; SQS's long poll is 5 + 25), a backoff (30), and slack.
    HEALTHY_FOR = 35 + 30 + 25

    def __init__(self, environ: dict):
        address = environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address  # abstract namespace
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if address else None
        usec = environ.get("WATCHDOG_USEC", "")
        for_us = environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
        self.watchdog_every = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and for_us else None
        self.alive_at = time.monotonic()
        self.is_ready = False
        self._status = None

    def notify(self, *assignments: str) -> None:
        if self._socket:
            try:
                self._socket.sendto("\n".join(assignments).encode(), self._address)
            except OSError as e:
                log.debug("sd_notify failed: %s", e)

    def ready(self) -> None:
        if not self.is_ready:
            self.is_ready = True
            self.notify("READY=1", "STATUS=idle")

    def status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            self.notify(f"STATUS={text}")

    def heartbeat(self, **_) -> None:
        """The main loop is making progress: called each turn, and before every AWS attempt
        (botocore's before-send event) and Docker call. Only the main thread's count: the
        visibility hold's calls must not vouch for a loop that hangs."""
        if threading.current_thread() is threading.main_thread():
            self.alive_at = time.monotonic()

    def start_watchdog(self) -> None:
        """Ping from a thread, so a 20 s long poll does not starve the watchdog, but only while
        the main loop keeps turning: a hung deployer is restarted by systemd."""
        if not (self._socket and self.watchdog_every):
            return

        def ping() -> None:
            while True:
                if self.is_ready and time.monotonic() - self.alive_at < self.HEALTHY_FOR:
                    self.notify("WATCHDOG=1")
                time.sleep(self.watchdog_every)

        threading.Thread(target=ping, name="watchdog", daemon=True).start()

    def stopping(self) -> None:
        self.notify("STOPPING=1")


# --------------------------------------------------------------------------- status (read-only)

def status_rows(deployer: Deployer) -> list[dict]:
    """One row per service that runs an ECR image (admitted by --filter-label), by name. Reads
    Docker and ECR (DescribeImages per repository, scans of gated digests); changes nothing."""
    services = deployer.listing = sorted(deployer.docker.services(), key=lambda s: s["Spec"].get("Name", ""))
    listed = [s for s in services if (ref := running_image(s)) and ecr_registry(ref.host)
              and (deployer.label_filter is None or deployer.label_filter.admits(s["Spec"].get("Labels")))]
    followed = {s["ID"]: followed_tag(s, None) for s in listed}
    versioned = {s["ID"]: key for s in listed if (key := versions_followed(s, None))}
    listings, errors = tag_listings(deployer.ecr, set(versioned.values()), deployer.systemd.heartbeat)
    listings = without_deployers_tags(listings, services, deployer.protect_prefix)
    newest = newest_versions(listed, versioned, listings)
    for service in listed:  # a service that follows versions: its row is about the version it should run
        tag = version_in_view(service, listings.get(versioned.get(service["ID"])), newest.get(service["ID"]))
        followed[service["ID"]] = (*versioned[service["ID"]], tag) if tag else followed[service["ID"]]
    keys = {key for key in followed.values() if key}
    keys |= {key for s in listed if (key := promote_key(s, followed[s["ID"]]))}
    now_at, described_errors = tag_digests(deployer.ecr, keys, deployer.systemd.heartbeat)
    errors.update(described_errors)
    deployer.answers.update(now_at)
    images, image_errors = deployer.reconciler.images.states(listed)
    rows = []
    for service in listed:
        key, repository = followed[service["ID"]], versioned.get(service["ID"])
        error = errors.get(key[:3] if key else repository)
        newest_there = newest.get(service["ID"])
        try:
            state = ("unknown", str(error)) if error else \
                repository and versions_state(service, listings[repository], newest_there) or \
                status_of(deployer, service, key, now_at.get(key))
        except (AwsError, DockerError) as e:  # one row unknown, not the whole table
            state = ("unknown", str(e))
        row = status_row(service, key, now_at.get(key), state)
        if repository:
            version_row(row, service, listings.get(repository), now_at.get(key), newest_there)
        if key and key in now_at and PROMOTE_LABEL in (service["Spec"].get("Labels") or {}):
            row["promotion"] = promotion_text(deployer, service, key, now_at)
            row["reason"] = "; ".join(filter(None, (row["reason"], row["promotion"])))
            if row["promotion"].startswith("cannot promote") and row["state"] == "current":
                row["state"] = "held back"  # the operator must act
        row["images"], problems = images_row(service, images.get(service["ID"], {}), image_errors)
        row["reason"] = "; ".join(filter(None, (row["reason"], *problems)))
        rows.append(row)
    return rows


def promotion_text(deployer: Deployer, service: dict, key: tuple, answers: dict) -> str:
    try:
        decision = deployer.converger.promotion_of(service, key, answers)
    except ValueError as e:
        return f"cannot promote: {e}"
    target = promote_key(service, key)
    if decision.decision != "deploy":
        return decision.reason
    if target in answers:  # the tag exists (at another digest): will ECR move it?
        try:
            described = deployer.ecr.repository(*target[:3])
            if not tag_may_move(described, target[3]):
                return f"cannot promote: {immutable_tag_fix(*target, described)}"
        except AwsError as e:
            return f"promotes to :{target[3]} now, unless its repository's tags are immutable ({e})"
    return f"promotes to :{target[3]} now"


def status_of(deployer: Deployer, service: dict, key: tuple | None, answer: tuple[str, str] | None) -> tuple[str, str]:
    spec = service["Spec"]
    if key is None and is_job(spec) and following(service):
        return "job", f"a Swarm job: a push does not re-run it (label {RERUN_JOB_LABEL}=true to opt in)"
    if key is None:
        return "pinned", "pinned by digest: follows no tag"
    if answer is None:
        return "tag gone", f"ECR has no {key[2]}:{key[3]}"
    digest, pushed_at = answer.digest, answer.pushed_text
    if running_image(service).digest is None:
        return "not pinned", "its spec names no digest, so which build it runs is unknown: the next push pins it"
    hint = Hint(service, Push(*key, digest, time=pushed_at, reconcile=True), digest)
    facts = Facts(image=answer.status)
    while (decision := decide(hint, facts, len(deployer.gates))).action == "ask":
        facts = status_fact(deployer, decision.reason, hint, facts)
    if decision.action == "nothing":
        if runs_digest(service, digest):
            state = current_state(service, digest)
            return (state[0] == "current" and checking_state(deployer, service, digest)) or state
        return "rolling back", (service.get("UpdateStatus") or {}).get("Message", "")
    if decision.action == "hold back":
        return "blocked" if f" by its {JOB_GATE} " in decision.reason else "held back", \
            f"{decision.reason} (`docker service update --label-rm {FAILED_LABEL} {spec.get('Name')}` lets it roll)"
    if decision.action == "wait for job":
        return "waiting", f"running its {decision.gate}: {decision.reason}"
    if decision.action == "run job":
        return "behind", f"the tag points to {short_digest(digest)} (pushed {pushed_at or '?'}): the next push or " \
                         f"reconcile pass runs its {decision.gate}, then rolls it"
    if decision.action == "block" and decision.gate.startswith(JOB_GATE):
        return "blocked", f"blocked by its {decision.gate}: {decision.reason}"
    if decision.action in ("not released", "archived"):
        return ("waiting" if decision.release.decision == "wait" else "held back"), decision.reason
    if decision.action in ("block", "wait for gate"):
        return ("blocked" if decision.action == "block" else "waiting"), f"{decision.gate}: {decision.reason}"
    return "behind", f"the tag points to {short_digest(digest)} (pushed {pushed_at or '?'}): the next push or " \
                     f"reconcile pass rolls it"


def checking_state(deployer: Deployer, service: dict, digest: str) -> tuple[str, str] | None:
    """("rolling out", "checking: " what one look at its checks says now) for a service whose rollout of the
    digest is within its checks' window (checks_window): not done until they pass; else None. The passes in a
    row the deployer counted are in its log."""
    labels = service["Spec"].get("Labels") or {}
    if not (labels.get(ALARMS_LABEL) or labels.get(CHECK_LABEL)) or failed_digest(service) == digest \
            or is_job(service["Spec"]):
        return None
    try:
        checks, soak = checks_of(labels), parse_duration(labels.get(SOAK_LABEL) or "0")
    except ValueError as e:
        return "rolling out", f"checking: its checks cannot be read: {e} (the deployer fails its next rollout)"
    if checks is None:
        return None
    docker = deployer.docker
    ran = rollout_of(service, docker.tasks(service["ID"]), digest, docker.date)
    ran_for = soaked_for(Leader("", True, None, ran.since, None), docker.date)
    if ran.pending or ran_for is None or ran_for >= checks_window(checks, soak):
        return None
    look = look_at(checks, deployer.checker.alarm_states(checks.alarms) if checks.alarms else {},
                   deployer.checker.answer(checks.url) if checks.url else None, 0)
    return "rolling out", f"checking: {look.said}; its checks' window ends in " \
                       f"{duration_text(checks_window(checks, soak) - ran_for)}" + \
        (f" ({look.failed}: the deployer fails the rollout)" if look.failed else "")


def version_in_view(service: dict, listing: dict | None, newest: str | None = "") -> str | None:
    """The tag a --status row of a version-following service is about: the version it should move to, else
    the one it runs (None: its policy cannot be read, or it has no listing). `newest`: as version_target's."""
    policy, _ = policy_or_why_not(service)
    if policy is None or listing is None:
        return None
    target = version_target(policy, listing, running_image(service), newest)
    return target[0] if target else running_image(service).tag


def versions_state(service: dict, listing: dict, newest: str | None = "") -> tuple[str, str] | None:
    """The state of a version-following service that decide() is not asked about: its policy cannot be read,
    its repository holds no version the policy admits, or the newer version it runs was deleted (it stays:
    never backwards). None: the row is decided as any other, about the version in view."""
    policy, malformed = policy_or_why_not(service)
    if malformed:
        return "held back", malformed
    running = running_image(service).tag
    newest = newest_admitted(policy, listing) if newest == "" else newest
    if newer_tag_deleted(policy, listing, running):
        return "tag gone", (f":{running}, which it runs, is no longer in ECR and no version {policy.text} admits is "
                            f"newer (the newest left: {':' + newest if newest else 'none'}): it stays on it, never "
                            f"moved backwards")
    if newest is None:
        return "tag gone", f"ECR has no tag {policy.text} admits"
    return None


def version_row(row: dict, service: dict, listing: dict | None, answer: TagAnswer | None,
                newest: str | None = "") -> None:
    """A --status row of a version-following service: its policy, the newest version it admits, and the detail
    worded for versions (which version, not which tag, it is behind; a spec an operator put back)."""
    policy, _ = policy_or_why_not(service)
    if newest == "":
        newest = newest_admitted(policy, listing) if policy and listing is not None else None
    in_view, row["tag"] = row["tag"], running_image(service).tag
    row["versions"], row["newest"] = labels_of(service).get(VERSIONS_LABEL), newest
    detail = row["reason"]
    if row["state"] == "behind" and answer:
        detail = f"the newest version its policy admits is :{in_view} ({short_digest(answer.digest)}, pushed " \
                 f"{answer.pushed_text or '?'}): the next push or reconcile pass rolls it"
        detail = "; ".join(filter(None, (older_spec_named(service, policy, in_view), detail)))
    elif row["state"] in ("waiting", "held back", "blocked") and in_view != row["tag"] and policy:
        detail = f"moving to :{in_view}: {detail}"
    row["reason"] = "; ".join(filter(None, (f"versions {row['versions']}" + (f", newest :{newest}" if newest else ""),
                                            detail)))


def status_fact(deployer: Deployer, fact: str, hint: Hint, facts: Facts) -> Facts:
    """The fact decide() asks for, read as --status reads it: nothing logged, Docker's and ECR's errors
    raised (the row says unknown), a gate's "gone" no verdict (a later gate may still say)."""
    service, push, digest = hint
    if fact == "failure":
        return facts._replace(failure_read=True, failure=deployer.converger.failure_of(service, digest))
    if fact == "release":
        try:
            return facts._replace(release=deployer.converger.release(service, push, digest))
        except ValueError as e:
            return facts._replace(release=Release("held", f"cannot apply its release policy: {e}"))
    if fact == "before job":
        return facts._replace(before=deployer.converger.job_of(service, digest)[1])
    gate = deployer.gates[len(facts.verdicts)]
    verdict = gate.verdict(service, push, digest)
    return facts._replace(verdicts=(*facts.verdicts, GateSaid(gate.name, verdict if verdict and
                                                              verdict.decision != "gone" else None)))


def show_status(deployer: Deployer, as_json: bool, lint: bool = False) -> int:
    rows = status_rows(deployer)
    codes = set()
    if lint:  # (on request: a preview per repository takes ECR seconds)
        lines, errors = lifecycle_lint(deployer, [s for s in deployer.listing if deployer.label_filter is None
                                                  or deployer.label_filter.admits(s["Spec"].get("Labels"))])
        for error in errors:
            log.error("Linting the lifecycle policies: %s", error)
        codes |= {1} if errors else set()
        for row in rows:
            row["lifecycle"] = [line.partition(": ")[2] for line in lines.get(row["service"], [])]
            row["reason"] = "; ".join(filter(None, (row["reason"], *row["lifecycle"])))
            codes |= {5} if row["lifecycle"] else set()
    sys.stdout.write(json.dumps(rows, indent=2) + "\n" if as_json else status_table(rows))  # the result, not a log line
    codes |= {STATUS_EXIT[row["state"]] for row in rows} | {IMAGE_STATUS_EXIT.get(state, 1) for row in rows
                                                            for state in row["images"].values()}
    return next((code for code in (5, 1, 4) if code in codes), 0)  # what needs someone first, what settles last


# --------------------------------------------------------------------------- running once or in a loop

EXIT_MISCONFIGURED = 3


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
        self._interruptible = True  # first, so a signal arriving now cannot be missed
        try:
            if self.requested:
                raise Shutdown
            yield
        finally:
            self._interruptible = False

    def sleep(self, seconds: float) -> None:
        with self.interruptible():
            time.sleep(seconds)


class Backoff:
    """Exponential, jittered, capped: for outages that outlast botocore's own retries."""

    MAX_EXPONENT = 16  # 2 ** 16 s is past any cap; 2.0 ** 1024 would overflow after days of failures

    def __init__(self, cap: float = 30.0):
        self.cap, self.failures = cap, 0

    def next(self) -> float:
        self.failures += 1
        return min(self.cap, 2.0 ** min(self.failures, self.MAX_EXPONENT)) * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.failures = 0


def drain_once(deployer: Deployer, receiver: Receiver, signals: Signals, args: argparse.Namespace) -> int:
    """Receive until no message this run has not seen is left. Each is handled at most once
    (Receiver(once=True)): a failed one stays for a later run, and a dry run makes one pass."""
    failed = waiting = False
    while not signals.requested:
        batch = receiver.gather(FIRST_WAIT_ONCE)
        if not batch:
            break
        try:
            result = deployer.handle(batch)
        finally:
            receiver.release(batch)
        failed = failed or bool(result.failed and not deployer.dry_run)
        waiting = waiting or bool(result.waiting and not deployer.dry_run)
    if failed:
        log.error("Some messages were left on the queue for retry")
    if deployer.reconciler.interval and not signals.requested:  # what a lost event missed: cron gets it too
        failed = not reconcile_once(deployer) or failed
    return finish_once(deployer, signals, args, failed or waiting)


def reconcile_once(deployer: Deployer) -> bool:
    try:
        return deployer.reconciler.run_pass()
    except (AwsError, DockerError) as e:
        log.error("Reconcile pass: %s", e)
        return False


def finish_once(deployer: Deployer, signals: Signals, args: argparse.Namespace, failed: bool) -> int:
    """The end of a one-shot run: with --wait, follow its rollouts to their end; write the reports; exit
    1 if anything failed or was left, or a rollout did not complete."""
    while (deployer.rollouts.pending or deployer.before_jobs.pending) and not signals.requested:  # --wait
        try:
            signals.sleep(1)
        except Shutdown:
            break
        deployer.rollouts.check()
        deployer.before_jobs.check()  # (a run that ended: its service rolls, a rollout to follow)
    write_reports(deployer, args)
    deployer.notifier.finish()  # one message per target that sums up the run
    rollouts = deployer.rollouts
    incomplete = [o for o in rollouts.outcomes if o != "completed"] + [r.label for r in rollouts.pending] + \
        list(deployer.before_jobs.pending)
    deployer.heartbeat.ping("fail" if failed or incomplete else "success")
    deployer.heartbeat.finish()
    return 1 if failed or incomplete else 0  # (a message waiting for its scan: left on the queue, for a later run)


class LocalDocker:
    """Loop mode takes messages only while its own Docker answers. A manager whose Docker is down could
    only fail each message it takes, and each would then wait out the queue's visibility timeout
    (counting towards the dead-letter queue) before a deployer on a healthy manager could take it.
    So after a call could not reach Docker, the loop pings it before each receive (GET /_ping, with
    backoff), says so once, and receives again when it answers; idle, it costs no Docker call."""

    def __init__(self, docker: Docker):
        self.docker = docker
        self.down_since: float | None = None
        self.backoff = Backoff(cap=5.0)  # a ping is cheap: notice the return within seconds

    def answers(self) -> bool:
        if self.docker.answering or self.docker.ping():
            if self.down_since is not None:
                log.info("Docker at %s answers again after %.0fs; receiving from the queue again",
                         self.docker.socket, time.monotonic() - self.down_since)
                self.down_since = None
                self.backoff.reset()
            return True
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("Docker at %s does not answer; receiving no messages until it does (deployers on "
                        "other managers take them meanwhile)", self.docker.socket)
        return False


def poll_forever(deployer: Deployer, receiver: Receiver, signals: Signals, args: argparse.Namespace) -> int:
    systemd, backoff, local_docker = deployer.systemd, Backoff(), LocalDocker(deployer.docker)
    health = Health(deployer.notifier, args.unhealthy_after, deployer.heartbeat)
    while not signals.requested:
        systemd.heartbeat()
        if not local_docker.answers():
            health.trouble(f"Docker at {deployer.docker.socket} does not answer")
            systemd.status("docker unreachable: not receiving")
            try:
                signals.sleep(local_docker.backoff.next())
            except Shutdown:
                break
            continue
        try:
            if not systemd.is_ready:
                wait = FIRST_WAIT_ONCE  # a quick first poll proves the queue works: READY=1 without delay
            elif deployer.rollouts.pending or deployer.before_jobs.pending:
                wait = FIRST_WAIT_FOLLOWING
            else:
                wait = min(FIRST_WAIT_LOOP, deployer.reconciler.seconds_until_due())
            messages = receiver.gather(wait, signals.interruptible)
            systemd.ready()  # the first poll worked (Docker answered at start)
            try:
                result = deployer.handle(messages) if messages else CycleResult()
                failed = len(result.failed)  # not those waiting for a scan
                if failed and not deployer.docker.answering:  # Docker went down: let a healthy manager have them
                    receiver.hand_back([m for m in messages if m["MessageId"] in result.failed])
            finally:
                receiver.release(messages)
            ended = len(deployer.rollouts.outcomes)
            deployer.rollouts.check()
            deployer.before_jobs.check()  # pre-rollout jobs that ended: their services roll (or are blocked)
            if messages or len(deployer.rollouts.outcomes) != ended:
                write_reports(deployer, args)
            updated = deployer.totals["services_updated"]
            deployer.reconciler.run_if_due()  # after the first poll, like the keeper
            if deployer.totals["services_updated"] != updated:
                write_reports(deployer, args)
            deployer.keeper.run_if_due()  # after the first poll: a deployer that cannot read its queue touches no service
        except (AwsError, DockerError) as e:
            if isinstance(e, Misconfigured) and not systemd.is_ready:
                raise  # the queue was never read: waiting cannot fix this (exit 3)
            log.error("%s", e)
            systemd.status(f"{'docker' if isinstance(e, DockerError) else 'AWS'} unreachable: retrying")
            health.trouble(str(e))
            failed = 1
        except Shutdown:
            break
        except Exception as e:  # a bug must not stop deployments; the messages come back anyway
            log.error("Unexpected error, retrying: %s: %s", type(e).__name__, e)
            failed = 1
        if not failed:
            backoff.reset()
            health.fine()
            pending = deployer.rollouts.pending
            systemd.status(f"following {len(pending)} rollout(s)" if pending else "idle")
            continue
        try:
            signals.sleep(backoff.next())
        except Shutdown:
            break
    log.info("Stopping")
    deployer.notifier.finish()
    deployer.heartbeat.finish()
    return 0


# --------------------------------------------------------------------------- starting

def aws_session() -> botocore.session.Session:
    """boto3's credential and config chain, from botocore itself: boto3's own import (s3transfer,
    resources) would cost 3 MB of memory and 40 ms of start-up for nothing we use."""
    session = botocore.session.get_session()
    # botocore reads only AWS_DEFAULT_REGION; AWS_REGION is what every other AWS SDK reads.
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        session.set_config_variable("region", region)
    return session


def start(args: argparse.Namespace, signals: Signals, systemd: Systemd) -> Deployer:
    """Resolve the queue, read its visibility timeout, reach Docker and check that it is a swarm
    manager. Misconfigured: raised at once. Outages: in loop mode, waited out instead of failing."""
    # First: a target that needs Apprise while it is missing fails before any AWS or Docker call (exit 3).
    notifier = Notifier([] if args.status or args.lint_lifecycle or args.dry_run else args.notify_targets,
                        held=bool(args.once or args.reconcile or args.refresh_auth),  # one message per run
                        node_name=lambda: deployer.rollouts.node_name())
    docker = Docker(os.environ.get("DOCKER_HOST"), on_request=systemd.heartbeat)
    session = aws_session()
    # One-shot modes need no queue, nor its region (ECR's come from each service's image host).
    one_shot = args.refresh_auth or args.reconcile or args.status or args.lint_lifecycle
    queue = Queue(session, args.queue, on_request=systemd.heartbeat) if args.queue and not one_shot else None
    ecr = Ecr(session, on_request=systemd.heartbeat)
    deployer = Deployer(queue, ecr, docker, args.filter_label,
                        trust_events=args.trust_events, follow_rollouts=(args.wait or not (
                            args.once or one_shot)) and not args.dry_run,
                        rollout_timeout=args.rollout_timeout, rollback_on_failure=args.rollback_on_failure,
                        notify_urls=tuple(args.notify_url), dry_run=args.dry_run, systemd=systemd,
                        gates=(ScanGate(ecr, args.scan_threshold, args.scan_timeout),
                               SignatureGate(ecr, args.signature, args.notation_dir, heartbeat=systemd.heartbeat)),
                        auth_refresh=0.0 if args.once else args.auth_refresh,
                        state_directory=os.environ.get("STATE_DIRECTORY"),
                        # --trust-events deploys what events name, and may not call DescribeImages: no pass
                        reconcile_every=0.0 if args.trust_events else args.reconcile_every,
                        release_defaults={k: v for k, v in ((WINDOW_LABEL, args.window), (MIN_AGE_LABEL, args.min_age))
                                          if v},
                        # a one-shot process must list anyway: following events pays only in a loop
                        service_index=None if args.once or one_shot
                        else ServiceIndex(docker), notifier=notifier)
    deployer.reconciler.images.restore = args.restore_archived and not args.dry_run
    deployer.reconciler.images.protect_prefix = None if args.dry_run else args.protect_tag_prefix
    deployer.protect_prefix = args.protect_tag_prefix
    deployer.rollouts.progress_deadline = args.progress_deadline
    deployer.checker = Checker(session, on_request=systemd.heartbeat)
    if not (args.status or args.lint_lifecycle or args.dry_run):
        deployer.heartbeat = Heartbeat(os.environ.get("DEPLOYER_HEARTBEAT_URL"))
        if args.once or args.reconcile:
            deployer.heartbeat.ping("start")
    backoff = Backoff()
    while True:
        try:
            if queue:
                queue.resolve()
                queue.read_visibility_timeout()
            deployer.docker.negotiate()
            deployer.docker.check_manager()
            return deployer
        except (AwsError, DockerError) as e:
            if args.once or one_shot or isinstance(e, Misconfigured):
                raise
            log.error("%s; retrying", e)
            systemd.status(f"{'docker' if isinstance(e, DockerError) else 'AWS'} unreachable: retrying")
            systemd.heartbeat()
            signals.sleep(backoff.next())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, log_style(args.log_format, os.environ))
    signals, systemd = Signals(), Systemd(os.environ)
    systemd.start_watchdog()
    deployer = None
    try:
        deployer = start(args, signals, systemd)
        if args.refresh_auth:
            return 0 if deployer.keeper.run_pass() else 1
        if args.reconcile:
            return finish_once(deployer, signals, args, not reconcile_once(deployer))
        if args.status:
            return show_status(deployer, args.json, args.lint_lifecycle)
        if args.lint_lifecycle:
            return lint_lifecycle(deployer)
        queue, receiver = deployer.queue, Receiver(deployer.queue, once=args.once)
        if args.metrics_address and not args.once:
            serve_metrics(deployer, args.metrics_address)
        log.info("ecr-deploy %s watching %s (visibility timeout %d s, %s; Docker at %s, API %s)", __version__,
                 queue.url, queue.visibility_timeout, queue.visibility_source, deployer.docker.socket,
                 deployer.docker.api_version)
        return (drain_once if args.once else poll_forever)(deployer, receiver, signals, args)
    except Misconfigured as e:
        log.error("%s", e)
        cut_short(deployer, args)
        return EXIT_MISCONFIGURED
    except (AwsError, DockerError) as e:
        log.error("%s", e)
        cut_short(deployer, args)
        return 1
    except Shutdown:
        return 0
    finally:
        systemd.stopping()


def cut_short(deployer: Deployer | None, args: argparse.Namespace) -> None:
    """A one-shot run that an error ended early still says what it did (services it updated before the
    queue or Docker failed it: one message per target) and pings its heartbeat 'fail', not nothing."""
    if deployer is None or not (args.once or args.reconcile):
        return
    deployer.notifier.finish()
    deployer.heartbeat.ping("fail")
    deployer.heartbeat.finish()


if __name__ == "__main__":
    sys.exit(main())
