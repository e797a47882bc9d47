"""Programs newer than the host's, from Debian's own unstable archive: fetched with apt-get
download (a sources list of their own, for that command only), unpacked with dpkg-deb -x under
the checkout's .rig/ folder, and run from there. Nothing is installed over the host's packages.

  docker.io, containerd, docker-cli   the current Docker engine (28.x, API 1.51; containerd 2.x),
                                      run with the host's runc (unstable's needs a newer glibc)
  notation, cosign                    the signature verifiers, and the rig's own signing tools

Which archive: the Debian archive the machine's own apt sources already use (deb822 `URIs:` in
/etc/apt/sources.list.d/*.sources, or one-line `deb` entries in /etc/apt/sources.list and
sources.list.d/*.list), so the rig fetches from the mirror the host was set up with; or the one
ECR_DEPLOY_DEBIAN_ARCHIVE names (for hosts whose sources are not Debian's, e.g. Ubuntu). No
mirror host is written here.

Standard library only: `python3 -m rig` fetches them before the venv exists. The tests never
fetch (their namespaces may have no network); they find what is here, or say how to get it.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import tempfile
from typing import Iterable, NamedTuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = ROOT / ".rig" / "unstable"
UNPACKED = CACHE / "root"  # usr/bin/dockerd, usr/bin/containerd, usr/bin/notation, …
STAMP = CACHE / "packages.json"  # {package: version} of what is unpacked
PACKAGES = ("docker.io", "containerd", "docker-cli", "notation", "cosign")
ARCHIVE_VARIABLE = "ECR_DEPLOY_DEBIAN_ARCHIVE"
APT_SOURCES = pathlib.Path("/etc/apt")
# Suites of Debian's main archive. Entries for -security, -updates, -backports (other archives or
# partial ones) and other distributions' suites (Ubuntu's noble, jammy, …) are not Debian's full archive.
DEBIAN_SUITES = frozenset({"unstable", "sid", "testing", "stable", "oldstable", "oldoldstable", "experimental",
                           "buster", "bullseye", "bookworm", "trixie", "forky", "duke"})


class AptSource(NamedTuple):
    """One archive of an apt sources file: a `deb` line, or one URI of a deb822 stanza."""
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def one_line_sources(text: str) -> list[AptSource]:
    """The `deb` entries of a sources.list-format file (`deb [options] URI SUITE COMPONENT…`)."""
    found = []
    for line in text.splitlines():
        fields = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()  # drop [signed-by=… arch=…]
        if len(fields) >= 4 and fields[0] == "deb":
            found.append(AptSource(fields[1], (fields[2],), tuple(fields[3:])))
    return found


def deb822_sources(text: str) -> list[AptSource]:
    """The `Types: deb` stanzas of a deb822 .sources file (not those with `Enabled: no`)."""
    found = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:  # a continuation line (a multi-line Signed-By key)
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            found.append(AptSource(uri, tuple(fields.get("suites", "").split()),
                                   tuple(fields.get("components", "").split())))
    return found


def debian_archive_from(sources: Iterable[AptSource]) -> str | None:
    """The URI of the first entry that serves Debian's main archive (a Debian suite, component main)."""
    for source in sources:
        if (re.fullmatch(r"https?://\S+", source.uri) and "main" in source.components
                and DEBIAN_SUITES.intersection(source.suites)):
            return source.uri.rstrip("/")
    return None


def apt_sources_of(folder: pathlib.Path) -> list[AptSource]:
    """Every archive in the machine's apt sources: sources.list, then sources.list.d/ in name order."""
    found = []
    files = [folder / "sources.list", *sorted((folder / "sources.list.d").glob("*"))]
    for path in files:
        if path.suffix not in (".list", ".sources") or not path.is_file():
            continue
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        found += deb822_sources(text) if path.suffix == ".sources" else one_line_sources(text)
    return found


def debian_archive(environ=os.environ, apt_folder: pathlib.Path = APT_SOURCES) -> str:
    """The Debian archive to fetch from: $ECR_DEPLOY_DEBIAN_ARCHIVE, else the one the machine's apt uses."""
    named = environ.get(ARCHIVE_VARIABLE, "").strip()
    if named:
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", named):
            raise RuntimeError(f"{ARCHIVE_VARIABLE} must be an http:// or https:// URL of a Debian archive "
                               f"(like the URIs: of a Debian host's apt sources), not {named!r}")
        return named.rstrip("/")
    found = debian_archive_from(apt_sources_of(apt_folder))
    if not found:
        raise RuntimeError(f"no Debian archive in this machine's apt sources ({apt_folder}/sources.list, "
                           f"{apt_folder}/sources.list.d/): name one with {ARCHIVE_VARIABLE}=URL (a Debian "
                           "mirror's /debian, as in a Debian host's sources)")
    return found


def unstable_sources(archive: str) -> str:
    """A deb822 sources list of Debian unstable's main component in that archive, for apt-get download only."""
    return (f"Types: deb\nURIs: {archive}\nSuites: unstable\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")


def versions() -> dict[str, str]:
    """{package: version} of the unstable packages unpacked here ({} before the first fetch)."""
    try:
        return json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return {}


def program(name: str) -> pathlib.Path | None:
    """The unpacked program, or None when it has not been fetched."""
    for folder in ("usr/bin", "usr/sbin", "bin", "sbin"):
        path = UNPACKED / folder / name
        if path.is_file():
            return path
    return None


def fetch(packages=PACKAGES, say=print) -> dict[str, str]:
    """Download and unpack the packages unless they are here already; returns their versions."""
    if set(packages) <= set(versions()):
        return versions()
    archive = debian_archive()
    sources = unstable_sources(archive)
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="unstable-", dir=CACHE) as scratch:
        scratch = pathlib.Path(scratch)
        (scratch / "lists" / "partial").mkdir(parents=True)
        (scratch / "debs").mkdir()
        (scratch / "unstable.sources").write_text(sources)
        options = [f"-oDir::Etc::SourceList={scratch / 'unstable.sources'}", "-oDir::Etc::SourceParts=/dev/null",
                   f"-oDir::State::Lists={scratch / 'lists'}", f"-oDir::Cache={scratch / 'cache'}",
                   "-oDebug::NoLocking=1", "-oAPT::Sandbox::User=root", "-qq"]
        subprocess.run(["apt-get", *options, "update"], check=True)
        subprocess.run(["apt-get", *options, "download", *packages], check=True, cwd=scratch / "debs")
        found = {}
        for deb in sorted((scratch / "debs").glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(UNPACKED)], check=True)
            package, version = (subprocess.run(["dpkg-deb", "-f", str(deb), field], check=True, capture_output=True,
                                               text=True).stdout.strip() for field in ("Package", "Version"))
            found[package] = version
    missing = set(packages) - set(found)
    if missing:
        raise RuntimeError(f"Debian's unstable archive ({archive}) did not give {', '.join(sorted(missing))}")
    fetched = {**versions(), **found}
    STAMP.write_text(json.dumps(fetched, indent=1, sort_keys=True))
    say("Unpacked from Debian unstable into .rig/unstable: " + ", ".join(f"{p} {v}" for p, v in sorted(found.items())))
    return fetched
