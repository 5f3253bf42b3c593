"""The container test bed: a Debian bookworm base image bootstrapped with mmdebstrap, and podman.

No registry of base images is reachable from the test machines, so the base is built from Debian
packages (the host's apt sources, and the host's apt cache where it already holds a package) and
imported into podman's image store. It is cached twice: as a tarball under /var/tmp and as the
imported image, both named by a hash of the recipe; reruns find the image and take no time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

CACHE = Path(os.environ.get("AUTH_EMAIL_CONTAINER_CACHE", "/var/tmp/auth-email-container"))
SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
# What the image needs from Debian: python3 with venv (ensurepip), useradd, and the CA bundle the
# mail proxy's TLS to upstream servers trusts. The "essential" variant leaves out apt.
PACKAGES = ("python3", "python3-venv", "passwd", "ca-certificates")
MMDEBSTRAP = [
    "mmdebstrap",
    "--variant=essential",
    "--include=" + ",".join(PACKAGES),
    # Documentation, manuals and translations are not needed in a server image.
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=force-unsafe-io",
    # Packages the host's apt cache already holds are not downloaded again (hard links).
    '--setup-hook=mkdir -p "$1"/var/cache/apt/archives && '
    "find /var/cache/apt/archives -maxdepth 1 -name '*.deb' "
    '-exec ln -t "$1"/var/cache/apt/archives {} + 2>/dev/null || true',
    "--skip=cleanup/reproducible",
    "--format=tar",
]
# Podman on these machines: host networking, explicit limits (the default rlimits are refused).
RUN_OPTIONS = ["--network", "host", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


def why_cannot_run() -> str | None:
    for tool in ("podman", "runc", "mmdebstrap"):
        if not shutil.which(tool):
            return f"{tool} is not installed (apt-get install podman runc mmdebstrap)"
    if os.geteuid() != 0:
        return "the container test bootstraps a base image and runs podman as root"
    if not SOURCES.exists():
        return f"no Debian apt sources at {SOURCES}"
    return None


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """One bootstrap at a time on the machine (parallel test runs share the cache)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def base_image() -> str:
    """The name of the bookworm + python3 base image, bootstrapping and importing it if needed."""
    recipe = "\n".join([*MMDEBSTRAP, SOURCES.read_text()])
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    image = f"localhost/auth-email-base:bookworm-{key}"
    with _locked("base"):
        if podman("image", "exists", image, check=False).returncode == 0:
            return image
        tarball = CACHE / f"bookworm-{key}.tar"
        if not tarball.exists():
            partial = tarball.with_suffix(".partial")
            log = CACHE / f"bookworm-{key}.log"
            with open(log, "w") as out:
                done = subprocess.run(
                    [*MMDEBSTRAP, "bookworm", str(partial), str(SOURCES)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=900,
                )
            if done.returncode != 0:
                raise RuntimeError(f"mmdebstrap failed ({done.returncode}), see {log}")
            partial.rename(tarball)
        podman("import", "--change", 'CMD ["/bin/sh"]', str(tarball), image, timeout=300)
    return image


def build_image(context: Path, base: str, tag: str, ca_bundle: Path | None) -> None:
    """``podman build`` of the Containerfile; the host's CA bundle reaches pip as a build secret."""
    args = ["build", "--format", "docker", *RUN_OPTIONS, "--build-arg", f"BASE={base}"]
    if ca_bundle is not None:
        args += ["--secret", f"id=ca,src={ca_bundle}"]
    args += ["-t", tag, "-f", str(context / "Containerfile"), str(context)]
    before = podman("image", "inspect", "--format", "{{.Id}}", tag, check=False).stdout.strip()
    done = podman(*args, check=False, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"podman build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    after = podman("image", "inspect", "--format", "{{.Id}}", tag, check=False).stdout.strip()
    if before and before != after:  # the previous build, now untagged: its own layers only
        podman("rmi", before, check=False)


def host_ca_bundle() -> Path | None:
    """The CA bundle the host's pip trusts (PIP_CERT, pip's config, then the system bundle)."""
    candidates = [os.environ.get("PIP_CERT", ""), os.environ.get("SSL_CERT_FILE", "")]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found = subprocess.run(
            ["python3", "-m", "pip", "config", "get", "global.cert"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        candidates.append(found.stdout.strip())
    candidates.append("/etc/ssl/certs/ca-certificates.crt")
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None
