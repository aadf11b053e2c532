"""The `machine` backend's image: a Debian root filesystem made by `debootstrap` from Debian's packages, with
what a GPU cloud image has (systemd, sshd, sudo, cloud-init, python3) and stand-ins for what this machine lacks
(`nvidia-smi`, `docker` and the vLLM image; see `standins/`).

Built once per recipe and cached: the directory's name is the recipe's digest, so a changed recipe builds a new
image and an unchanged one is reused by every later run (CI included). Builds are serialised by a lock file and
land by an atomic rename, so a killed build leaves only a temporary directory that the next build removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from infra.vm import BackendError

log = logging.getLogger(__name__)

STANDINS = Path(__file__).parent / "standins"
ENGINE_HOME = "/opt/engine-standin"
"""Inside the image: the engine simulator's source (`src`) and packages (`site`) are mounted here at boot."""
BUILD_TIMEOUT_S = 900.0

PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "sudo",
    "cloud-init",
    "python3",
    "python3-cffi-backend",  # debootstrap does not resolve the virtual package cloud-init's cryptography needs
    "iproute2",
    "procps",
    "curl",
    "nftables",  # a GPU server registered as a host enforces each replica's rules itself (`infra/hosts`)
)

# Files the image holds beyond its packages: path -> (content, mode).
_CONFIG: dict[str, tuple[str, int]] = {
    # Only the NoCloud seed the backend writes into each VM; the hosts entry sudo needs to resolve its own name;
    # The default user of a GPU cloud's Ubuntu image, whom the cloud's keypair goes to.
    "/etc/cloud/cloud.cfg.d/90-machine-sandbox.cfg": (
        "datasource_list: [NoCloud, None]\nmanage_etc_hosts: true\nlocale: C.UTF-8\n"
        "system_info:\n  default_user:\n    name: ubuntu\n    lock_passwd: true\n    gecos: Ubuntu\n"
        "    groups: [adm, sudo]\n    sudo: ['ALL=(ALL) NOPASSWD:ALL']\n    shell: /bin/bash\n",
        0o644,
    ),
    # The veth has no IPv6 router: without this, networkd waits ~12 s for router advertisements at every boot.
    "/etc/systemd/network/10-cloud-init-host0.network.d/no-router-advertisements.conf": (
        "[Network]\nIPv6AcceptRA=no\n",
        0o644,
    ),
    f"{ENGINE_HOME}/src/orchestrator/__init__.py": (
        '"""Only the engine simulator is here (mounted at boot)."""\n',
        0o644,
    ),
}
_STANDINS = {"/usr/local/bin/docker": "docker.py", "/usr/local/bin/nvidia-smi": "nvidia-smi"}
_MOUNT_POINTS = (f"{ENGINE_HOME}/site", f"{ENGINE_HOME}/src/orchestrator/enginesim")


@dataclass(frozen=True)
class ImageRecipe:
    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    packages: tuple[str, ...] = PACKAGES

    def files(self) -> dict[str, tuple[bytes, int]]:
        files = {path: (content.encode(), mode) for path, (content, mode) in _CONFIG.items()}
        for path, name in _STANDINS.items():
            files[path] = ((STANDINS / name).read_bytes(), 0o755)
        return files

    def digest(self) -> str:
        """Changes whenever anything the image is made of changes."""
        h = hashlib.sha256(json.dumps([self.suite, self.mirror, sorted(self.packages)]).encode())
        for path, (content, mode) in sorted(self.files().items()):
            h.update(f"\0{path}\0{mode:o}\0".encode())
            h.update(content)
        h.update(json.dumps(_MOUNT_POINTS).encode())
        return h.hexdigest()[:16]


def ensure_image(cache_dir: Path, recipe: ImageRecipe) -> Path:
    """The root filesystem for `recipe`, built now if the cache does not hold it (about a minute here)."""
    final = cache_dir / f"image-{recipe.digest()}"
    if (final / "rootfs").is_dir():
        return final / "rootfs"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / "build.lock"):
        if (final / "rootfs").is_dir():  # another process built it while this one waited
            return final / "rootfs"
        partial = cache_dir / f"building-{recipe.digest()}"
        shutil.rmtree(partial, ignore_errors=True)  # what a killed build left
        partial.mkdir()
        started = time.monotonic()
        log.info("machine image %s: building with debootstrap into %s", recipe.digest(), partial)
        _debootstrap(recipe, partial / "rootfs", partial / "build.log")
        _customise(recipe, partial / "rootfs")
        partial.rename(final)
        log.info("machine image %s: built in %.0f s", recipe.digest(), time.monotonic() - started)
    return final / "rootfs"


def _debootstrap(recipe: ImageRecipe, rootfs: Path, build_log: Path) -> None:
    if shutil.which("debootstrap") is None:
        raise BackendError("the machine backend needs `debootstrap` (Debian package debootstrap) to build its image")
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(recipe.packages)}",
        recipe.suite,
        str(rootfs),
        recipe.mirror,
    ]
    with build_log.open("wb") as out:
        try:
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S, check=False)  # noqa: S603
        except subprocess.TimeoutExpired:
            raise BackendError(
                f"debootstrap did not finish within {BUILD_TIMEOUT_S:.0f} s (log: {build_log})"
            ) from None
    if done.returncode != 0:
        tail = build_log.read_text(errors="replace").strip().splitlines()[-5:]
        raise BackendError(f"debootstrap failed (exit {done.returncode}; log: {build_log}): {' | '.join(tail)}")


def _customise(recipe: ImageRecipe, rootfs: Path) -> None:
    for path, (content, mode) in recipe.files().items():
        target = rootfs / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)
    for path in _MOUNT_POINTS:
        (rootfs / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    # cloud-init renders the network for systemd-networkd, which Debian installs disabled.
    done = subprocess.run(  # noqa: S603
        ["chroot", str(rootfs), "systemctl", "enable", "systemd-networkd"],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BackendError(f"enabling systemd-networkd in the image failed: {done.stderr.strip()[:300]}")
    (rootfs / "etc/machine-id").write_text("")  # each VM makes its own at first boot
    for host_key in (rootfs / "etc/ssh").glob("ssh_host_*"):  # made by openssh-server's install: shared by all
        host_key.unlink()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
