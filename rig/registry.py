"""TLS docker-registry servers posing as ECR hosts, and the images pushed to them.

Each registry answers as the real ECR hostname of one account and region (named in /etc/hosts,
its CA trusted in /etc/docker/certs.d) and demands user AWS with the password moto's ECR token
carries, so a Swarm node pulls only when the deployer forwarded the right registry auth.
Images are built in Python and pushed over the registry API, never through a local daemon,
so the swarm must pull them to run them; each push is mirrored into moto's ECR.
"""
from __future__ import annotations

import contextlib
import datetime
import gzip
import hashlib
import io
import json
import pathlib
import shutil
import subprocess
import tarfile
import urllib.parse
import uuid
import warnings

import requests

from rig.common import wait_for


class Registry:
    """A docker-registry answering as the ECR hosts of one account and region."""

    def __init__(self, account: str, region: str, ip: str, aliases=()):
        self.account, self.region, self.ip = account, region, ip
        self.host = f"{account}.dkr.ecr.{region}.amazonaws.com"
        self.hosts = [self.host, *aliases]
        self.password = f"{account}-auth-token"  # what moto's GetAuthorizationToken decodes to
        self.proc = None


REGISTRIES = [
    Registry("123456789012", "us-east-1", "127.0.0.2",
             aliases=["123456789012.dkr.ecr-fips.us-east-1.amazonaws.com", "123456789012.dkr-ecr.us-east-1.on.aws"]),
    Registry("222222222222", "eu-west-1", "127.0.0.3"),
]
HOSTS_MARK = "# ecr-deploy rig"  # + the instance: the demo and the tests can run side by side


def make_tls(workdir: pathlib.Path, hosts: list[str]) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject, key, issuer, issuer_key, extensions):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=2)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ecr-deploy test CA")])
    ca = certificate(ca_name, ca_key, ca_name, ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    server = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), key, ca_name, ca_key,
                         [(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), False)])
    pem = serialization.Encoding.PEM
    paths = workdir / "ca.crt", workdir / "server.crt", workdir / "server.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(server.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return paths


def bcrypt_hash(password: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    # bcrypt's lowest cost (2^4 rounds): the registry checks it on every request, and the default (2^12)
    # costs ~0.3 s of CPU each, seconds per docker pull, notation or cosign run on a busy machine.
    return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))


def write_hosts(mark: str, ours: str) -> None:
    """Replace the /etc/hosts lines carrying `mark` (also those of a run killed before cleanup)."""
    hosts = pathlib.Path("/etc/hosts")
    kept = "".join(line for line in hosts.read_text().splitlines(keepends=True) if not line.endswith(f"{mark}\n"))
    hosts.write_text(kept + ours)


@contextlib.contextmanager
def serving_registries(workdir: pathlib.Path, registries: list[Registry] = REGISTRIES, instance: str = "tests"):
    """Start the registries, name them in /etc/hosts and trust their CA in Docker; undo all at exit."""
    mark = f"{HOSTS_MARK} {instance}"
    all_hosts = [h for r in registries for h in r.hosts]
    ca, cert, key = make_tls(workdir, all_hosts)
    ours = "".join(f"{r.ip} {h} {mark}\n" for r in registries for h in r.hosts)
    certs_d = pathlib.Path("/etc/docker/certs.d")
    made = [d for d in (certs_d.parent, certs_d) if not d.exists()]  # removed again at exit if empty
    try:
        write_hosts(mark, ours)
        for host in all_hosts:
            certs = certs_d / host
            certs.mkdir(parents=True, exist_ok=True)
            shutil.copy(ca, certs / "ca.crt")
        for registry in registries:
            root = workdir / f"registry-{registry.account}"
            root.mkdir()
            (root / "htpasswd").write_text(f"AWS:{bcrypt_hash(registry.password)}\n")
            (root / "config.yml").write_text(json.dumps({  # JSON is YAML
                "version": 0.1, "log": {"level": "warn"},
                "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
                "http": {"addr": f"{registry.ip}:443", "tls": {"certificate": str(cert), "key": str(key)}},
                "auth": {"htpasswd": {"realm": "ecr", "path": str(root / "htpasswd")}}}))
            registry.proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")],
                                             stdout=open(root / "log", "ab"), stderr=subprocess.STDOUT,
                                             start_new_session=True)
            registry.ca = str(ca)
            wait_for(lambda: registry_up(registry), 30, what=f"registry {registry.host}")
        yield registries
    finally:
        for registry in registries:
            if registry.proc:
                registry.proc.terminate()
                registry.proc.wait(10)
        write_hosts(mark, "")
        for host in all_hosts:
            shutil.rmtree(certs_d / host, ignore_errors=True)
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()


def registry_up(registry: Registry) -> bool:
    try:
        reply = requests.get(f"https://{registry.host}/v2/", verify=registry.ca, timeout=1)
    except requests.RequestException:
        return False
    return reply.status_code == 401  # up, and demanding credentials


# ---- images: built in Python and pushed over the registry API, never via the local daemon,
# so the swarm node must pull them (with the right credentials) to run them.

def tar_layer(files: dict[str, tuple[bytes, int]]) -> tuple[bytes, str]:
    """(gzipped layer, diff id) holding the given files."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, (content, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), mode, 0
            tar.addfile(info, io.BytesIO(content))
    data = raw.getvalue()
    return gzip.compress(data, mtime=0), "sha256:" + hashlib.sha256(data).hexdigest()


BUSYBOX_LAYER: list = []


def busybox_layer():
    if not BUSYBOX_LAYER:
        BUSYBOX_LAYER.append(tar_layer({"bin/busybox": (pathlib.Path("/bin/busybox").read_bytes(), 0o755)}))
    return BUSYBOX_LAYER[0]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Images:
    """Pushes images to the registries and mirrors them into moto's ECR."""

    def __init__(self, aws, registries: list[Registry]):
        self.aws, self.registries = aws, registries

    def registry(self, account: str) -> Registry:
        return next(r for r in self.registries if r.account == account)

    def new_repository(self, account="123456789012", prefix="team", name: str | None = None) -> str:
        registry = self.registry(account)
        name = name or f"{prefix}/app-{uuid.uuid4().hex[:10]}"
        self.aws.client("ecr", registry.region).create_repository(repositoryName=name, registryId=account)
        return name

    def push(self, repository: str, tag: str, content: str, account="123456789012", cmd=None) -> str:
        registry = self.registry(account)
        session = requests.Session()
        session.auth, session.verify = ("AWS", registry.password), registry.ca
        session.trust_env = False  # else REQUESTS_CA_BUNDLE overrides session.verify
        base = f"https://{registry.host}/v2/{repository}"
        bb_blob, bb_diff = busybox_layer()
        v_blob, v_diff = tar_layer({"version": (content.encode(), 0o644)})
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "config": {"Cmd": cmd or ["/bin/busybox", "sleep", "3600"]},
                             "rootfs": {"type": "layers", "diff_ids": [bb_diff, v_diff]}}).encode()
        for blob in (bb_blob, v_blob, config):
            start = session.post(f"{base}/blobs/uploads/")
            assert start.status_code == 202, start.text
            location = urllib.parse.urljoin(base, start.headers["Location"])
            done = session.put(location, params={"digest": sha256(blob)}, data=blob,
                               headers={"Content-Type": "application/octet-stream"})
            assert done.status_code == 201, done.text
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "size": len(config), "digest": sha256(config)},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "size": len(blob), "digest": sha256(blob)} for blob in (bb_blob, v_blob)]})
        reply = session.put(f"{base}/manifests/{tag}", data=manifest,
                            headers={"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"})
        assert reply.status_code == 201, reply.text
        digest = reply.headers["Docker-Content-Digest"]
        assert digest == sha256(manifest.encode())
        ecr = self.aws.client("ecr", registry.region)
        ecr.put_image(registryId=account, repositoryName=repository, imageManifest=manifest,
                      imageTag=tag, imageDigest=digest)
        return digest


def service_on_new_repo(images, swarm, name, contents=("v1", "v2"), replicas=0, registry=None):
    """A fresh repository with one push of :latest per content (ECR ends at the last), and a
    service pinned to the first. Returns (repository, digests, service id)."""
    registry = registry or REGISTRIES[0]
    repo = images.new_repository(account=registry.account)
    digests = [images.push(repo, "latest", content, account=registry.account) for content in contents]
    sid = swarm.create_service(name, f"{registry.host}/{repo}:latest@{digests[0]}", registry=registry,
                               replicas=replicas)
    return repo, digests, sid
