"""A Debian 12 (bookworm) arm64 tree, run on this x86_64 host under qemu-user.

A Raspberry Pi runs Debian 12's arm64 userland with Python 3.11.2; this tree has the
same, executed instruction by instruction by ``qemu-aarch64-static`` through the
kernel's binfmt_misc (registered with the F flag, so the interpreter is found from
inside a chroot or container without being copied into it). It holds what the
README's apt-get line gives a Pi that matters for installing harkd: python3,
python3-venv, python3-dev, gcc and the ALSA headers.

It is built with ``debootstrap --foreign`` (the host cannot run the target's maintainer
scripts natively) and the second stage inside the tree, then cached in
/var/cache/harkd-test like tests/nspawn.py's tree. Each step is marked done by a stamp
in the tree, so a finished step is never repeated; debootstrap cannot resume, so an
interrupted bootstrap starts over (its packages are cached, only the unpacking
repeats). Run as a script to build (``make check-arm64`` does):
``python tests/arm64_tree.py``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO

from nspawn import CACHE_DIR

__all__ = ["ensure_arm64_tree", "ensure_binfmt", "nspawn_command", "tree_path"]

SUITE = "bookworm"
ARCH = "arm64"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "python3",
    "python3-venv",
    "python3-dev",
    "gcc",
    "libc6-dev",
    "libasound2-dev",
    "ca-certificates",
)
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# The environment of every command run inside, like a root login shell's.
INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}
Log = IO[str]


def tree_path() -> Path:
    """Where the cached tree for the current package list lives."""
    key = hashlib.sha256("\n".join((SUITE, ARCH, MIRROR, *PACKAGES)).encode()).hexdigest()[:12]
    return CACHE_DIR / f"{SUITE}-{ARCH}-{key}"


def ensure_binfmt() -> None:
    """Make the kernel hand aarch64 executables to qemu-aarch64-static.

    binfmt_misc is not mounted on every host (nor inside every container); the
    qemu-user-static package registers its handler only where it is. Raises with what
    to do when emulation cannot be set up here.
    """
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True)
    handler = BINFMT / "qemu-aarch64"
    if not handler.exists():
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=True)
    text = handler.read_text() if handler.exists() else ""
    if "enabled" not in text.splitlines()[:1] or "flags: " not in text:
        raise RuntimeError(f"qemu-aarch64 is not an enabled binfmt_misc handler:\n{text}")
    flags = next(line for line in text.splitlines() if line.startswith("flags:"))
    if "F" not in flags:
        # Without F the kernel looks the interpreter up inside the tree, where it is not.
        raise RuntimeError(f"the qemu-aarch64 handler lacks the F flag ({flags})")


def nspawn_command(
    tree: Path,
    argv: Sequence[str],
    *,
    binds: Iterable[tuple[Path, str]] = (),
    network: bool = True,
) -> list[str]:
    """The systemd-nspawn command line that runs ``argv`` as root in ``tree``.

    Every run is ``--volatile=overlay``: what it writes outside ``binds`` lands in a
    tmpfs layer and vanishes, so the cached tree stays pristine. ``network=False``
    gives the container only its own loopback. ``--register=no --keep-unit``: this
    host has no systemd as PID 1 to register with.
    """
    return [
        "systemd-nspawn",
        "--quiet",
        "--register=no",
        "--keep-unit",
        "--volatile=overlay",
        "--resolv-conf=copy-host",
        "--timezone=off",
        f"--directory={tree}",
        f"--machine=harkd-arm64-{os.getpid()}",
        *([] if network else ["--private-network"]),
        *(f"--bind={host}:{inside}" for host, inside in binds),
        *(f"--setenv={k}={v}" for k, v in INSIDE_ENV.items()),
        *argv,
    ]


def ensure_arm64_tree(log: Log | None = None, progress: Callable[[str], None] = print) -> Path:
    """Return the cached arm64 tree, building what is missing.

    A lock keeps two runs from building at once. ``log`` gets the tools' output,
    ``progress`` one line per step with its duration.
    """
    ensure_binfmt()
    tree = tree_path()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / ".lock-arm64").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name, step in _STEPS:
            stamp = tree / f".harkd-arm64-{name}"
            if stamp.exists():
                continue
            progress(f"arm64 tree {tree}: {name} ...")
            began = time.monotonic()
            step(tree, log, progress)
            stamp.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
            progress(f"arm64 tree: {name} done in {time.monotonic() - began:.0f} s")
    return tree


def _debootstrap(tree: Path, log: Log | None, progress: Callable[[str], None]) -> None:
    partial = tree.with_name(tree.name + ".partial")
    for old in (tree, partial):
        _unmount_under(old)
        shutil.rmtree(old, ignore_errors=True)
    began = time.monotonic()
    _run(
        [
            "debootstrap",
            f"--arch={ARCH}",
            "--foreign",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            # Downloaded once: a rebuild (an interrupted one, a new package list) unpacks
            # from here.
            f"--cache-dir={_deb_cache()}",
            SUITE,
            str(partial),
            MIRROR,
        ],
        log,
    )
    progress(f"arm64 tree: first stage (download, unpack) {time.monotonic() - began:.0f} s")
    # The second stage runs the packages' own maintainer scripts: arm64 code, emulated.
    # A plain chroot (debootstrap mounts /proc and /sys itself and unmounts them).
    began = time.monotonic()
    try:
        _run(["chroot", str(partial), "/debootstrap/debootstrap", "--second-stage"], log)
    finally:
        _unmount_under(partial)
    progress(f"arm64 tree: second stage (configure, emulated) {time.monotonic() - began:.0f} s")
    for deb in (partial / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    partial.rename(tree)


def _certificates(tree: Path, log: Log | None, progress: Callable[[str], None]) -> None:
    # The local CAs the host trusts (for example an egress proxy's) let pip reach PyPI.
    local_cas = Path("/usr/local/share/ca-certificates")
    if any(local_cas.glob("**/*.crt")):
        shutil.copytree(local_cas, tree / "usr/local/share/ca-certificates", dirs_exist_ok=True)
    _run(["chroot", str(tree), "/usr/sbin/update-ca-certificates"], log)


_STEPS: tuple[tuple[str, Callable[[Path, Log | None, Callable[[str], None]], None]], ...] = (
    ("debootstrap", _debootstrap),
    ("certificates", _certificates),
)


def _deb_cache() -> Path:
    cache = CACHE_DIR / f"debs-{SUITE}-{ARCH}"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def _run(argv: Sequence[str], log: Log | None) -> None:
    subprocess.run(
        argv,
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
    )


def _unmount_under(path: Path) -> None:
    """Unmount whatever an interrupted second stage left mounted in ``path`` (/proc,
    /sys), deepest first, so that removing the tree never reaches into them."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as mounts:
        points = [line.split()[4] for line in mounts]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False)


def main() -> None:
    """Build the tree (``make check-arm64``), printing a line per step; the log to stderr."""
    began = time.monotonic()
    tree = ensure_arm64_tree(sys.stderr)
    print(f"arm64 tree ready: {tree} ({time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
