"""Image signatures made by the real tools, in the rig's registries, and the bad ones a gate must refuse.

Signing identities are made by the tools themselves (`notation cert generate-test`, `cosign
generate-key-pair`), each tool's configuration in its own folder under the session's workdir (never
the machine's ~/.config or ~/.docker). Registry credentials reach the tools through their environment
or a config file (NOTATION_USERNAME/NOTATION_PASSWORD; DOCKER_CONFIG/config.json for cosign), the
registry's CA through SSL_CERT_FILE: never through argv, never --insecure-registry.

Where signatures land on the rig's docker-registry 2.8, which has no OCI referrers API
(GET /v2/<name>/referrers/<digest> answers 404): both tools use the OCI 1.1 "referrers tag schema"
fallback, an OCI index tagged sha256-<hex of the subject> listing the signature manifests, each of
which names the image in its `subject`. notation does so by default (--force-referrers-tag defaults
to true); cosign 3 finds out by itself and adds its Sigstore bundle to the same index. ECR has the
referrers API: there cosign writes no tag, and notation writes one only by that default.
cosign's legacy format (a `sha256-<hex>.sig` tag) is available with legacy=True.

The verify invocations a deployer runs are `notation_verify_command` and `cosign_verify_command`
with the environments built beside them: offline (no Rekor, Fulcio or TUF; the rig has no network),
non-interactive, bounded by the caller's timeout.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import hashlib
import json
import pathlib
import re
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from rig import unstable
from rig.common import wait_for
from rig.registry import put_blob, registry_up

NOTATION_SIGNATURE = "application/vnd.cncf.notary.signature"  # artifactType of notation's signature manifests
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MANIFEST_TYPES = ", ".join([OCI_INDEX, OCI_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json",
                            "application/vnd.docker.distribution.manifest.list.v2+json"])
IDENTITIES = ("trusted", "other")  # the deployer trusts the first; the second is a stranger's key
TRUST_POLICY = "ecr-deploy-rig"  # the name of the rig's Notation trust policy
TOOL_TIMEOUT = 60  # seconds; a tool that hangs fails the test instead of stalling it


def tool(name: str) -> str:
    path = unstable.program(name)
    if not path:
        raise FileNotFoundError(f"{name} is not unpacked in .rig/ (python3 -m rig test fetches it)")
    return str(path)


def tools_missing() -> list[str]:
    return [name for name in ("notation", "cosign") if not unstable.program(name)]


def notation_refusals(stderr: str) -> list[str]:
    """The reasons `notation verify --verbose` gives for the signatures it refused."""
    return re.findall(r"msg=Signature \S+ failed verification with error: (.*)", stderr)


def reference(registry, repository: str, digest: str) -> str:
    return f"{registry.host}/{repository}@{digest}"


# ---- the signing identities and the trust a deployer is given

@dataclasses.dataclass
class Signers:
    """The rig's signing identities (trusted and other), for both tools, under `root`.

    notation_keys     NOTATION_CONFIG for signing: both identities' keys and certificates
    notation_trust    NOTATION_CONFIG for verifying, what an operator installs on a manager:
                      trustpolicy.json and truststore/x509/ca/<store>/<cert>, the trusted identity only
    cosign_key(id)    cosign's key pair per identity (private key encrypted with cosign_password(id));
                      cosign_public(TRUSTED) is what a deployer verifies with
    """
    root: pathlib.Path

    @property
    def notation_keys(self) -> pathlib.Path:
        return self.root / "notation-keys"

    @property
    def notation_trust(self) -> pathlib.Path:
        return self.root / "notation-trust"

    def cosign_key(self, identity: str) -> pathlib.Path:
        return self.root / "cosign" / f"{identity}.key"

    def cosign_public(self, identity: str = "trusted") -> pathlib.Path:
        return self.root / "cosign" / f"{identity}.pub"

    @staticmethod
    def cosign_password(identity: str) -> str:
        return f"rig-{identity}-key-password"

    def home(self, purpose: str) -> pathlib.Path:
        """A private HOME/XDG folder per tool run purpose, so no tool reads or writes the machine's."""
        path = self.root / "home" / purpose
        path.mkdir(parents=True, exist_ok=True)
        return path


def make_signers(root: pathlib.Path) -> Signers:
    """Make both identities for both tools with the tools themselves, and the trusted one's trust."""
    signers = Signers(root)
    (root / "cosign").mkdir(parents=True)
    for identity in IDENTITIES:
        run([tool("notation"), "cert", "generate-test", identity],
            env=base_env(signers, "notation-sign", NOTATION_CONFIG=str(signers.notation_keys)))
        run([tool("cosign"), "generate-key-pair", "--output-key-prefix", str(root / "cosign" / identity)],
            env=base_env(signers, "cosign-sign", COSIGN_PASSWORD=signers.cosign_password(identity)))
    # generate-test also trusts what it makes (truststore/x509/ca/<name>): the verifier's folder is a
    # separate one holding the trusted identity's certificate only.
    store = signers.notation_trust / "truststore" / "x509" / "ca" / "deploy-trusted"
    store.mkdir(parents=True)
    (store / "trusted.crt").write_bytes((signers.notation_keys / "localkeys" / "trusted.crt").read_bytes())
    # A CA the deployer trusts too, for signing certificates that expire (made per test by
    # expiring_notation_key: notation's generate-test certificates live a day).
    store = signers.notation_trust / "truststore" / "x509" / "ca" / "deploy-ca"
    store.mkdir(parents=True)
    (store / "ca.crt").write_bytes(make_ca(root / "notation-ca"))
    # notation 1.3.2 reads $NOTATION_CONFIG/trustpolicy.json (it never looks at trustpolicy.oci.json).
    (signers.notation_trust / "trustpolicy.json").write_text(
        json.dumps(trust_policy("ca:deploy-trusted", "ca:deploy-ca"), indent=1))
    # cosign 3 signs through a "signing config" naming its Rekor, Fulcio and TSA; by default it fetches
    # Sigstore's from TUF (network). An empty one signs with the key alone and uploads nowhere.
    run([tool("cosign"), "signing-config", "create", "--out", str(root / "cosign" / "signing-config.json")],
        env=base_env(signers, "cosign-sign"))
    return signers


def make_ca(folder: pathlib.Path) -> bytes:
    """A CA for notation signing certificates, its key and certificate in `folder`; returns the certificate (PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    folder.mkdir(parents=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ecr-deploy rig signing CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = certificate(name, key.public_key(), name, key, now - datetime.timedelta(hours=1),
                       now + datetime.timedelta(days=2), [
                           (x509.BasicConstraints(ca=True, path_length=0), True),
                           (x509.KeyUsage(False, False, False, False, False, True, True, False, False), True)])
    (folder / "ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    (folder / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return (folder / "ca.crt").read_bytes()


def certificate(subject, public_key, issuer, issuer_key, not_before, not_after, extensions):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder.sign(issuer_key, hashes.SHA256())


def expiring_notation_key(signers: Signers, name: str, lifetime: datetime.timedelta,
                          crl_url: str | None = None) -> datetime.datetime:
    """A notation signing key `name` whose certificate, issued by the trusted rig CA, expires after
    `lifetime`; returns when it expires. A signature it makes verifies until then and not after
    (notation's strict level checks the chain at verification time when there is no timestamp).
    With `crl_url` the certificate names that CRL distribution point, which notation's revocation
    check then asks."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    ca_folder = signers.root / "notation-ca"
    ca_key = serialization.load_pem_private_key((ca_folder / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((ca_folder / "ca.crt").read_bytes())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.timezone.utc)
    expires = now + lifetime
    leaf = certificate(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]), key.public_key(),
                       ca_cert.subject, ca_key, now - datetime.timedelta(minutes=5), expires, [
                           (x509.KeyUsage(True, False, False, False, False, False, False, False, False), True),
                           (x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CODE_SIGNING]), False)] + ([
                           (x509.CRLDistributionPoints([x509.DistributionPoint(
                               [x509.UniformResourceIdentifier(crl_url)], None, None, None)]), False)]
                           if crl_url else []))
    keys = signers.notation_keys / "localkeys"
    (keys / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (keys / f"{name}.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(
        serialization.Encoding.PEM))  # the chain, leaf first
    listing = signers.notation_keys / "signingkeys.json"
    known = json.loads(listing.read_text())
    known["keys"].append({"name": name, "keyPath": str(keys / f"{name}.key"), "certPath": str(keys / f"{name}.crt")})
    listing.write_text(json.dumps(known, indent=1))
    return expires


def trust_policy(*stores: str, identities=("*",)) -> dict:
    """A Notation trust policy for every registry: strict verification against the given trust stores."""
    return {"version": "1.0", "trustPolicies": [{
        "name": TRUST_POLICY, "registryScopes": ["*"], "signatureVerification": {"level": "strict"},
        "trustStores": list(stores), "trustedIdentities": list(identities)}]}


def base_env(signers: Signers, purpose: str, **extra: str) -> dict[str, str]:
    """A tool's whole environment: nothing from ours (no AWS keys, no user's docker config), a private
    HOME, config and cache folder (notation keeps its CRL cache under XDG_CACHE_HOME, cosign its TUF
    cache under TUF_ROOT)."""
    home = signers.home(purpose)
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
            "XDG_CACHE_HOME": str(home / "cache"), "TUF_ROOT": str(home / "tuf"), **extra}


def notation_env(signers: Signers, registry, config: pathlib.Path, purpose: str) -> dict[str, str]:
    """notation's environment: its config folder, the registry's credentials and CA."""
    return base_env(signers, purpose, NOTATION_CONFIG=str(config), NOTATION_USERNAME="AWS",
                    NOTATION_PASSWORD=registry.password, SSL_CERT_FILE=registry.ca)


def cosign_env(signers: Signers, registry, purpose: str, **extra: str) -> dict[str, str]:
    """cosign's environment: a DOCKER_CONFIG folder whose config.json holds the registry's credentials
    (cosign's --registry-password would put them in argv), and the registry's CA."""
    docker_config = signers.home(purpose) / "docker"
    docker_config.mkdir(exist_ok=True)
    auth = base64.b64encode(f"AWS:{registry.password}".encode()).decode()
    (docker_config / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": auth}}}))
    (docker_config / "config.json").chmod(0o600)
    return base_env(signers, purpose, DOCKER_CONFIG=str(docker_config), SSL_CERT_FILE=registry.ca, **extra)


def run(command: list[str], env: dict[str, str], check=True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise RuntimeError(f"{command[0]} {command[1]} failed ({done.returncode}): {done.stderr.strip()}")
    return done


# ---- signing

def sign_notation(signers: Signers, registry, repository: str, digest: str, identity: str = "trusted") -> str:
    """Sign repository@digest with notation (JWS envelope, referrers tag schema); returns the digest
    of the signature manifest it pushed."""
    before = referrer_digests(registry, repository, digest)
    run([tool("notation"), "sign", "--key", identity, reference(registry, repository, digest)],
        env=notation_env(signers, registry, signers.notation_keys, "notation-sign"))
    return one_new(referrer_digests(registry, repository, digest), before)


def sign_cosign(signers: Signers, registry, repository: str, digest: str, identity: str = "trusted",
                legacy: bool = False) -> str:
    """Sign repository@digest with cosign's key pair, uploading to no transparency log; returns the
    digest of the signature manifest: a Sigstore bundle listed in the referrers tag (cosign 3's
    default), or with legacy=True the `sha256-<hex>.sig` tag's manifest."""
    env = cosign_env(signers, registry, "cosign-sign", COSIGN_PASSWORD=signers.cosign_password(identity))
    command = [tool("cosign"), "sign", "--yes", "--key", str(signers.cosign_key(identity))]
    if legacy:  # what cosign 2 wrote; cosign 3 has deprecated these flags, and refuses a signing config with them
        command += ["--new-bundle-format=false", "--use-signing-config=false", "--tlog-upload=false"]
    else:
        command += ["--signing-config", str(signers.root / "cosign" / "signing-config.json")]
    before = referrer_digests(registry, repository, digest)
    run([*command, reference(registry, repository, digest)], env=env)
    if legacy:
        return Repository(registry, repository).manifest(legacy_signature_tag(digest)).digest
    return one_new(referrer_digests(registry, repository, digest), before)


# What CI attaches beside a signature, made with the same key: an in-toto statement about the image
# (SLSA provenance, an SPDX SBOM), not an approval of it. cosign 3 stores it as a Sigstore bundle in the
# referrers index, exactly like its signatures; only the statement's predicate type tells them apart.
PREDICATES = {
    "slsaprovenance": {"builder": {"id": "https://ci.example/builder"}, "buildType": "https://ci.example/build",
                       "invocation": {}, "materials": []},
    "spdxjson": {"spdxVersion": "SPDX-2.3", "SPDXID": "SPDXRef-DOCUMENT", "name": "image", "packages": []},
}


def attest_cosign(signers: Signers, registry, repository: str, digest: str, predicate: str = "slsaprovenance",
                  identity: str = "trusted") -> str:
    """Attest repository@digest with cosign's key pair (`cosign attest --type PREDICATE`), as a CI
    pipeline does after a build; returns the digest of the bundle manifest it pushed."""
    statement = signers.home("cosign-sign") / f"{predicate}.json"
    statement.write_text(json.dumps(PREDICATES[predicate]))
    env = cosign_env(signers, registry, "cosign-sign", COSIGN_PASSWORD=signers.cosign_password(identity))
    before = referrer_digests(registry, repository, digest)
    run([tool("cosign"), "attest", "--yes", "--key", str(signers.cosign_key(identity)), "--type", predicate,
         "--predicate", str(statement), "--signing-config", str(signers.root / "cosign" / "signing-config.json"),
         reference(registry, repository, digest)], env=env)
    return one_new(referrer_digests(registry, repository, digest), before)


def one_new(after: list[str], before: list[str]) -> str:
    new = [d for d in after if d not in before]
    assert len(new) == 1, f"expected one new signature manifest, found {new}"
    return new[0]


# ---- verifying: the invocations a deployer runs

def notation_verify_command(ref: str) -> list[str]:
    """`notation verify` of one reference by digest: trust from NOTATION_CONFIG's trustpolicy.json and
    truststore, credentials from NOTATION_USERNAME/NOTATION_PASSWORD. Exit 0 verified, 1 not (whatever
    the cause). Without --verbose a refused signature only says "signature verification failed for
    all the signatures associated with <ref>"; with it, stderr names each signature's reason in a line
    `level=warning msg=Signature <digest> failed verification with error: <reason>`."""
    return [tool("notation"), "verify", "--verbose", ref]


def cosign_verify_command(public_key: pathlib.Path, ref: str) -> list[str]:
    """`cosign verify` with a public key, offline: --insecure-ignore-tlog=true because the rig signs
    without Rekor (without it cosign 3 fetches Sigstore's trusted root from TUF, and fails offline).
    Finds both the Sigstore bundle (referrers) and the legacy .sig tag. Exit 0 verified (stdout: the
    verified claims as JSON); 10 no signature at all (also when the image does not exist); 12 legacy
    signatures, none valid; 1 anything else (bundles none valid, TLS, credentials). The reason is
    stderr's last line, "error during command execution: <reason>"."""
    return [tool("cosign"), "verify", "--key", str(public_key), "--insecure-ignore-tlog=true", ref]


def verify_notation(signers: Signers, registry, repository: str, digest: str) -> subprocess.CompletedProcess:
    return run(notation_verify_command(reference(registry, repository, digest)), check=False,
               env=notation_env(signers, registry, signers.notation_trust, "notation-verify"))


def verify_cosign(signers: Signers, registry, repository: str, digest: str) -> subprocess.CompletedProcess:
    return run(cosign_verify_command(signers.cosign_public("trusted"), reference(registry, repository, digest)),
               env=cosign_env(signers, registry, "cosign-verify"), check=False)


# ---- the registry, over its API: what the tools pushed, and the forgeries

def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def referrers_tag(digest: str) -> str:
    """The OCI 1.1 referrers tag schema's tag for a subject: sha256:<hex> → sha256-<hex>."""
    return digest.replace(":", "-")


def legacy_signature_tag(digest: str) -> str:
    return referrers_tag(digest) + ".sig"


@dataclasses.dataclass
class Stored:
    """A manifest as the registry stores it."""
    manifest: dict
    digest: str
    media_type: str
    size: int

    @property
    def descriptor(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


class Repository:
    """One repository of a rig registry, over the registry API with the ECR token."""

    def __init__(self, registry, name: str):
        self.base = f"https://{registry.host}/v2/{name}"
        self.session = requests.Session()
        self.session.auth, self.session.verify = ("AWS", registry.password), registry.ca
        self.session.trust_env = False  # else REQUESTS_CA_BUNDLE overrides session.verify

    def manifest(self, reference: str) -> Stored | None:
        """The manifest a tag or digest names, or None when there is none."""
        reply = self.session.get(f"{self.base}/manifests/{reference}", headers={"Accept": MANIFEST_TYPES})
        if reply.status_code == 404:
            return None
        reply.raise_for_status()
        return Stored(reply.json(), sha256(reply.content), reply.headers["Content-Type"], len(reply.content))

    def put_manifest(self, manifest: dict, media_type: str, tag: str | None = None) -> Stored:
        """Push a manifest under `tag`, or by its digest."""
        body = json.dumps(manifest).encode()
        reply = self.session.put(f"{self.base}/manifests/{tag or sha256(body)}", data=body,
                                 headers={"Content-Type": media_type})
        assert reply.status_code == 201, reply.text
        return Stored(manifest, sha256(body), media_type, len(body))

    def blob(self, digest: str) -> bytes:
        reply = self.session.get(f"{self.base}/blobs/{digest}")
        reply.raise_for_status()
        return reply.content

    def put_blob(self, data: bytes) -> str:
        return put_blob(self.session, self.base, data)

    def referrers_api(self, digest: str) -> int:
        """The status of GET /v2/<name>/referrers/<digest>: 404 on docker-registry 2.8 (ECR has the API)."""
        return self.session.get(f"{self.base}/referrers/{digest}").status_code

    def referrers(self, digest: str) -> list[dict]:
        """The descriptors in digest's referrers tag (the fallback index), [] when there is none."""
        found = self.manifest(referrers_tag(digest))
        return found.manifest["manifests"] if found else []

    def set_referrers(self, digest: str, descriptors: list[dict]) -> None:
        self.put_manifest({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}, OCI_INDEX,
                          tag=referrers_tag(digest))


def referrer_digests(registry, repository: str, digest: str) -> list[str]:
    return [d["digest"] for d in Repository(registry, repository).referrers(digest)]


def copy_signatures(registry, repository: str, source: str, target: str) -> list[str]:
    """Attach source's signatures to target, as a forger would: each signature manifest in source's
    referrers tag re-pushed with `subject` = target and listed in target's referrers tag, and source's
    legacy .sig manifest tagged as target's. The envelopes inside still sign source. Returns the
    digests of the manifests now claiming target."""
    repo = Repository(registry, repository)
    subject = repo.manifest(target).descriptor
    copied = []
    for entry in repo.referrers(source):
        signature = repo.manifest(entry["digest"])
        forged = repo.put_manifest({**signature.manifest, "subject": subject}, signature.media_type)
        copied.append({**entry, **forged.descriptor})
    if copied:
        repo.set_referrers(target, repo.referrers(target) + copied)
    legacy = repo.manifest(legacy_signature_tag(source))
    if legacy:
        repo.put_manifest(legacy.manifest, legacy.media_type, tag=legacy_signature_tag(target))
    return [entry["digest"] for entry in copied] + ([legacy.digest] if legacy else [])


def tamper_signatures(registry, repository: str, digest: str) -> list[str]:
    """Change one byte of the signature in every envelope attached to digest (notation's JWS, cosign's
    Sigstore bundle, cosign's legacy .sig annotation), re-push, and point the referrers tag and .sig
    tag at the tampered manifests only. Returns their digests."""
    repo = Repository(registry, repository)
    tampered = []
    for entry in repo.referrers(digest):
        signature = repo.manifest(entry["digest"])
        layer = signature.manifest["layers"][0]
        envelope = flip_signature_byte(repo.blob(layer["digest"]))
        layers = [{**layer, "digest": repo.put_blob(envelope), "size": len(envelope)}]
        forged = repo.put_manifest({**signature.manifest, "layers": layers}, signature.media_type)
        tampered.append({**entry, **forged.descriptor})
    if tampered:
        repo.set_referrers(digest, tampered)
    legacy = repo.manifest(legacy_signature_tag(digest))
    if legacy:
        layer = legacy.manifest["layers"][0]
        annotation = "dev.cosignproject.cosign/signature"
        flipped = flip_signature_byte(json.dumps({"signature": layer["annotations"][annotation]}, separators=(",", ":")).encode())
        layer = {**layer, "annotations": {**layer["annotations"], annotation: json.loads(flipped)["signature"]}}
        tampered.append(repo.put_manifest({**legacy.manifest, "layers": [layer]}, legacy.media_type,
                                          tag=legacy_signature_tag(digest)).descriptor)
    return [entry["digest"] for entry in tampered]


def flip_signature_byte(envelope: bytes) -> bytes:
    """The envelope with one character of its signature value changed: JWS (notation) names it
    "signature", DSSE (cosign's bundle) "sig". The change is mid-value, where every base64
    character carries signature bits."""
    for key in (b'"signature":"', b'"sig":"'):
        at = envelope.rfind(key)
        if at >= 0:
            i = at + len(key) + 16
            return envelope[:i] + (b"B" if envelope[i:i + 1] == b"A" else b"A") + envelope[i + 1:]
    raise ValueError("no signature value in the envelope")


def push_index(registry, repository: str, tag: str, digests: list[str]) -> str:
    """Push a minimal OCI image index over images already in the repository (as buildx pushes a
    multi-platform tag); returns its digest. Each image stands for the platform linux/amd64 variant N."""
    repo = Repository(registry, repository)
    manifests = [{**repo.manifest(d).descriptor, "platform": {"architecture": "amd64", "os": "linux",
                                                             "variant": f"v{n + 1}"}}
                 for n, d in enumerate(digests)]
    return repo.put_manifest({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests},
                             OCI_INDEX, tag=tag).digest


# ---- a registry that cannot answer for a while

@contextlib.contextmanager
def registry_outage(registry, status: int | None = None):
    """Stop `registry`'s server for the duration: its address refuses connections (status None), or a
    server with the registry's own TLS certificate answers every request with `status` (a 5xx, as a
    registry behind a load balancer does while its backend is down). Started again afterwards, on the
    same storage, so every image and signature is there again."""
    command = registry.proc.args
    config = json.loads(pathlib.Path(command[-1]).read_text())["http"]
    registry.proc.terminate()
    registry.proc.wait(10)
    server = None
    try:
        if status is not None:
            class Failing(BaseHTTPRequestHandler):
                def log_message(self, *args):
                    pass

                def answer(self):
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

                do_GET = do_HEAD = do_POST = do_PUT = answer

            server = ThreadingHTTPServer((registry.ip, 443), Failing)
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(config["tls"]["certificate"], config["tls"]["key"])
            server.socket = tls.wrap_socket(server.socket, server_side=True)
            threading.Thread(target=server.serve_forever, daemon=True).start()
        yield
    finally:
        if server:
            server.shutdown()
            server.server_close()
        log = pathlib.Path(command[-1]).parent / "log"
        registry.proc = subprocess.Popen(command, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_for(lambda: registry_up(registry), 30, what=f"registry {registry.host} again")
