"""Programs newer than the host's, from Debian's own unstable archive: fetched with apt-get
download (a sources list of their own, for that command only), unpacked with dpkg-deb -x under
the checkout's .rig/ folder, and run from there. Nothing is installed over the host's packages.

  docker.io, containerd, docker-cli   the current Docker engine (28.x, API 1.51; containerd 2.x),
                                      run with the host's runc (unstable's needs a newer glibc)
  notation, cosign                    the signature verifiers, and the rig's own signing tools

Standard library only: `python3 -m rig` fetches them before the venv exists. The tests never
fetch (their namespaces may have no network); they find what is here, or say how to get it.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = ROOT / ".rig" / "unstable"
UNPACKED = CACHE / "root"  # usr/bin/dockerd, usr/bin/containerd, usr/bin/notation, …
STAMP = CACHE / "packages.json"  # {package: version} of what is unpacked
PACKAGES = ("docker.io", "containerd", "docker-cli", "notation", "cosign")
SOURCES = """Types: deb
URIs: http://deb.debian.org/debian
Suites: unstable
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


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
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="unstable-", dir=CACHE) as scratch:
        scratch = pathlib.Path(scratch)
        (scratch / "lists" / "partial").mkdir(parents=True)
        (scratch / "debs").mkdir()
        (scratch / "unstable.sources").write_text(SOURCES)
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
        raise RuntimeError(f"Debian's unstable archive did not give {', '.join(sorted(missing))}")
    fetched = {**versions(), **found}
    STAMP.write_text(json.dumps(fetched, indent=1, sort_keys=True))
    say("Unpacked from Debian unstable into .rig/unstable: " + ", ".join(f"{p} {v}" for p, v in sorted(found.items())))
    return fetched
