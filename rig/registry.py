"""TLS docker-registry servers posing as ECR hosts, and the images pushed to them.

Each registry answers as the real ECR hostname of one account and region (named in /etc/hosts,
its CA trusted in /etc/docker/certs.d) and demands user AWS with the password moto's ECR token
carries, so a Swarm node pulls only when the deployer forwarded the right registry auth.
Images are built in Python and pushed over the registry API, never through a local daemon,
so the swarm must pull them to run them; each push is mirrored into moto's ECR. A push is either a
single Docker manifest (`docker push` of a classic build) or what `docker buildx build --push` sends:
an OCI image index with its platform image and a provenance attestation (Images.push_buildx).
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
import time
import urllib.parse
import uuid
import warnings
from typing import NamedTuple

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


DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
IN_TOTO = "application/vnd.in-toto+json"
SLSA_PROVENANCE = "https://slsa.dev/provenance/v0.2"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def go_indent(document: dict) -> bytes:
    """As Go's json.MarshalIndent(v, "", "  ") writes it (buildkit's manifests and indexes): keys in the
    order given, two-space indent, no newline at the end."""
    return json.dumps(document, indent=2).encode()


def go_compact(document: dict) -> bytes:
    """As Go's json.Marshal writes it (buildkit's image configs and in-toto statements)."""
    return json.dumps(document, separators=(",", ":")).encode()


def descriptor(media_type: str, blob: bytes, **more) -> dict:
    """An OCI descriptor, its fields in the order of Go's ocispec.Descriptor."""
    return {"mediaType": media_type, "digest": sha256(blob), "size": len(blob), **more}


def buildkit_time(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class BuildxPush(NamedTuple):
    """What one `docker buildx build --push` put in the registry (and ECR)."""
    index: str  # the OCI image index: what the tag points to
    platform: str  # its linux/amd64 image manifest (untagged in ECR)
    attestation: str  # its provenance attestation manifest (untagged in ECR)


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
        """A single-platform Docker image (what `docker push` of a classic build sends). Returns its digest."""
        upload = Upload(self, repository, account)
        bb_blob, bb_diff = busybox_layer()
        v_blob, v_diff = tar_layer({"version": (content.encode(), 0o644)})
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "config": {"Cmd": cmd or ["/bin/busybox", "sleep", "3600"]},
                             "rootfs": {"type": "layers", "diff_ids": [bb_diff, v_diff]}}).encode()
        upload.blobs(bb_blob, v_blob, config)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "size": len(config), "digest": sha256(config)},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "size": len(blob), "digest": sha256(blob)} for blob in (bb_blob, v_blob)]}).encode()
        return upload.manifest(manifest, DOCKER_MANIFEST, tag)

    def push_buildx(self, repository: str, tag: str, content: str, account="123456789012", cmd=None) -> BuildxPush:
        """What `docker buildx build --push` sends by default (see buildx_image): the image index under the
        tag, its two manifests by digest before it (untagged in ECR, as ECR keeps an index's manifests)."""
        image = buildx_image(self.registry(account).host, repository, tag, content, cmd)
        upload = Upload(self, repository, account)
        upload.blobs(*image.blobs)
        return BuildxPush(upload.manifest(image.index, OCI_INDEX, tag, children=(image.platform, image.attestation)),
                          sha256(image.platform), sha256(image.attestation))


class BuildxImage(NamedTuple):
    blobs: tuple[bytes, ...]  # layers, configs and the in-toto statement
    platform: bytes  # the linux/amd64 image manifest
    attestation: bytes  # its attestation manifest
    index: bytes


def buildx_image(host: str, repository: str, tag: str, content: str, cmd=None) -> BuildxImage:
    """What `docker buildx build --push` makes of `FROM scratch`, `COPY busybox`, `COPY version`, `CMD`,
    buildkit's provenance attestation on (its default): an OCI image index holding the linux/amd64 image
    and an attestation manifest for it (platform unknown/unknown, one in-toto layer with an SLSA provenance
    statement), laid out byte for byte as buildkit writes them (exporter/containerimage/writer.go)."""
    started, cmd = time.time(), cmd or ["/bin/busybox", "sleep", "3600"]
    bb_blob, bb_diff = busybox_layer()
    v_blob, v_diff = tar_layer({"version": (content.encode(), 0o644)})
    created = buildkit_time(started)
    history = [{"created": created, "created_by": f"COPY {path} {path} # buildkit",
                "comment": "buildkit.dockerfile.v0"} for path in ("/bin/busybox", "/version")]
    history.append({"created": created, "created_by": f"CMD {json.dumps(cmd, separators=(',', ':'))}", "comment": "buildkit.dockerfile.v0",
                    "empty_layer": True})
    config = go_compact({  # a map in Go: keys sorted; "config" as the Dockerfile frontend wrote it
        "architecture": "amd64", "config": {"Env": [PATH_ENV], "Cmd": cmd, "WorkingDir": "/"},
        "created": created, "history": history, "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [bb_diff, v_diff]}})
    platform = go_indent({"mediaType": OCI_MANIFEST, "schemaVersion": 2,
                          "config": descriptor(OCI_CONFIG, config),
                          "layers": [descriptor(OCI_LAYER, blob) for blob in (bb_blob, v_blob)]})
    statement = go_compact({
        "_type": "https://in-toto.io/Statement/v0.1", "predicateType": SLSA_PROVENANCE,
        "subject": [{"name": f"pkg:docker/{host}/{repository}@{tag}?platform=linux%2Famd64",
                     "digest": {"sha256": sha256(platform).removeprefix("sha256:")}}],
        "predicate": {
            "builder": {"id": ""}, "buildType": "https://mobyproject.org/buildkit@v1",
            "invocation": {"configSource": {"entryPoint": "Dockerfile"},
                           "parameters": {"frontend": "dockerfile.v0",
                                          "locals": [{"name": "context"}, {"name": "dockerfile"}]},
                           "environment": {"platform": "linux/amd64"}},
            "metadata": {"buildInvocationID": uuid.uuid4().hex, "buildStartedOn": buildkit_time(started),
                         "buildFinishedOn": buildkit_time(time.time()),
                         "completeness": {"parameters": True, "environment": True, "materials": False},
                         "reproducible": False, "https://mobyproject.org/buildkit@v1#metadata": {}}}})
    attestation_config = go_compact({"architecture": "unknown", "os": "unknown", "config": {},
                                     "rootfs": {"type": "layers", "diff_ids": [sha256(statement)]}})
    attestation = go_indent({
        "mediaType": OCI_MANIFEST, "schemaVersion": 2,
        "config": descriptor(OCI_CONFIG, attestation_config),
        "layers": [descriptor(IN_TOTO, statement, annotations={"in-toto.io/predicate-type": SLSA_PROVENANCE})]})
    index = go_indent({"mediaType": OCI_INDEX, "schemaVersion": 2, "manifests": [
        descriptor(OCI_MANIFEST, platform, platform={"architecture": "amd64", "os": "linux"}),
        descriptor(OCI_MANIFEST, attestation,
                   annotations={"vnd.docker.reference.digest": sha256(platform),
                                "vnd.docker.reference.type": "attestation-manifest"},
                   platform={"architecture": "unknown", "os": "unknown"})]})
    return BuildxImage((bb_blob, v_blob, config, statement, attestation_config), platform, attestation, index)


def put_blob(session: requests.Session, base: str, blob: bytes) -> str:
    """Upload a blob to the repository at `base` (https://HOST/v2/NAME) in one request; its digest."""
    start = session.post(f"{base}/blobs/uploads/")
    assert start.status_code == 202, start.text
    location = urllib.parse.urljoin(base, start.headers["Location"])
    done = session.put(location, params={"digest": sha256(blob)}, data=blob,
                       headers={"Content-Type": "application/octet-stream"})
    assert done.status_code == 201, done.text
    return sha256(blob)


class Upload:
    """One push to a registry over its HTTP API, mirrored into moto's ECR as ECR stores it."""

    def __init__(self, images: Images, repository: str, account: str):
        self.registry = images.registry(account)
        self.ecr = images.aws.client("ecr", self.registry.region)
        self.repository, self.account = repository, account
        self.session = requests.Session()
        self.session.auth, self.session.verify = ("AWS", self.registry.password), self.registry.ca
        self.session.trust_env = False  # else REQUESTS_CA_BUNDLE overrides session.verify
        self.base = f"https://{self.registry.host}/v2/{repository}"

    def blobs(self, *blobs: bytes) -> None:
        for blob in blobs:
            put_blob(self.session, self.base, blob)

    def manifest(self, manifest: bytes, media_type: str, tag: str, children=()) -> str:
        """PUT the index's own manifests by digest, then the manifest under the tag; into ECR likewise:
        each child an untagged image, the manifest the tagged one. Returns the manifest's digest."""
        for child in children:
            self._put(child, OCI_MANIFEST, sha256(child))
        self._put(manifest, media_type, tag)
        return sha256(manifest)

    def _put(self, manifest: bytes, media_type: str, reference: str) -> None:
        reply = self.session.put(f"{self.base}/manifests/{reference}", data=manifest,
                                 headers={"Content-Type": media_type})
        assert reply.status_code == 201, reply.text
        assert reply.headers["Docker-Content-Digest"] == sha256(manifest)
        tag = {} if reference.startswith("sha256:") else {"imageTag": reference}
        self.ecr.put_image(registryId=self.account, repositoryName=self.repository, imageManifest=manifest.decode(),
                           imageManifestMediaType=media_type, imageDigest=sha256(manifest), **tag)


def service_on_new_repo(images, swarm, name, contents=("v1", "v2"), replicas=0, registry=None, **service):
    """A fresh repository with one push of :latest per content (ECR ends at the last), and a
    service pinned to the first (`service`: more of Swarm.create_service's arguments, e.g. update_config).
    Returns (repository, digests, service id)."""
    registry = registry or REGISTRIES[0]
    repo = images.new_repository(account=registry.account)
    digests = [images.push(repo, "latest", content, account=registry.account) for content in contents]
    sid = swarm.create_service(name, f"{registry.host}/{repo}:latest@{digests[0]}", registry=registry,
                               replicas=replicas, **service)
    return repo, digests, sid
