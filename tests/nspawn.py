"""A Debian 12 (bookworm) tree booted with systemd-nspawn, driven from the host.

This host has no systemd as PID 1, so the container is started with
``--register=no --keep-unit`` (nothing to register with) and entered with nsenter
instead of machinectl. The tree is built once with debootstrap and cached; every boot
runs it with ``--volatile=overlay``, so what a test installs lives in a tmpfs layer
and the cached tree stays pristine. The container shares the host's network.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "CACHE_DIR",
    "Container",
    "ensure_tree",
]

CACHE_DIR = Path(os.environ.get("HARKD_TEST_CACHE", "/var/cache/harkd-test"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What a fresh Debian 12 / Raspberry Pi OS install has that minbase lacks (systemd as
# init, dbus, sudo, procps for /bin/kill), plus the README's apt-get line
# preinstalled, so following it in the container needs no download.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "sudo",
    "procps",
    "ca-certificates",
    "python3",
    "python3-venv",
    "python3-dev",
    "gcc",
    "libc6-dev",
    "libasound2-dev",
    "alsa-utils",
)
# The environment of every command run inside, like a root login shell's.
_INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}


def tree_path() -> Path:
    """Where the cached tree for the current package list lives."""
    key = hashlib.sha256("\n".join((SUITE, MIRROR, *PACKAGES)).encode()).hexdigest()[:12]
    return CACHE_DIR / f"{SUITE}-{key}"


def ensure_tree(log: IO[str] | None = None) -> Path:
    """Return the cached bookworm tree, building it with debootstrap first if needed.

    A tree counts only once the build finished (a stamp file inside), so an
    interrupted build is started over; a lock keeps two runs from building at once.
    """
    tree = tree_path()
    stamp = tree / ".harkd-test-complete"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists():
            return tree
        partial = tree.with_name(tree.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(tree, ignore_errors=True)
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(partial),
                MIRROR,
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
        )
        # Downloaded .debs are not needed to boot; keep the cache small.
        for deb in (partial / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        partial.rename(tree)
        stamp.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return tree


class Container:
    """A booted container: systemd 252 as its PID 1 (``leader`` on the host).

    Use :meth:`boot` as a context manager; it powers the container off on exit.
    """

    def __init__(self, nspawn: subprocess.Popen[bytes], leader: int) -> None:
        self._nspawn = nspawn
        self.leader = leader

    @property
    def root(self) -> Path:
        """The container's file system as seen from the host."""
        return Path(f"/proc/{self.leader}/root")

    @classmethod
    @contextlib.contextmanager
    def boot(
        cls,
        tree: Path,
        console_log: Path,
        *,
        binds: Iterable[tuple[Path, str]] = (),
        timeout_s: float = 120.0,
    ) -> Iterator[Container]:
        """Boot ``tree`` and wait until its systemd finished starting up.

        ``binds`` are (host directory, container path) pairs mounted read-write.
        The console goes to ``console_log``.
        """
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        args = [
            "systemd-nspawn",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--volatile=overlay",
            f"--directory={tree}",
            "--machine=harkd-test",
            "--console=read-only",
            *(f"--bind={host}:{inside}" for host, inside in binds),
        ]
        with console_log.open("wb") as console:
            nspawn = subprocess.Popen(
                args, env=env, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT
            )
        container: Container | None = None
        try:
            deadline = time.monotonic() + timeout_s
            leader = _wait_for_leader(nspawn, deadline, console_log)
            container = cls(nspawn, leader)
            container._wait_booted(deadline)
            container._join_network()
            yield container
        finally:
            if container is not None:
                container.poweroff()
            else:
                _stop(nspawn)

    def run(
        self,
        script: str,
        *,
        check: bool = True,
        timeout_s: float = 600.0,
        cwd: str = "/root",
    ) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with bash as root inside the container; output is captured.

        Raises ``AssertionError`` showing the output when ``check`` and it fails.
        """
        proc = subprocess.run(
            [
                "nsenter",
                f"--target={self.leader}",
                "--all",
                "--root",
                "--wd",
                "/usr/bin/env",
                "-i",
                *(f"{k}={v}" for k, v in _INSIDE_ENV.items()),
                "/bin/bash",
                "-c",
                # A multi-line script (a README block) fails at its first failing line.
                f"set -e -o pipefail; cd {cwd}\n{script}",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"inside the container, exit {proc.returncode}: {script}\n"
                f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc

    def poll(self, script: str, until: str, timeout_s: float) -> str:
        """Run ``script`` until its stdout contains ``until``; return that output."""
        deadline = time.monotonic() + timeout_s
        while True:
            out = self.run(script, check=False).stdout
            if until in out:
                return out
            if time.monotonic() > deadline:
                raise AssertionError(f"{script!r} never printed {until!r}; last:\n{out}")
            time.sleep(0.2)

    def poweroff(self, timeout_s: float = 60.0) -> None:
        """Shut the container down cleanly, then reap systemd-nspawn."""
        if self._nspawn.poll() is None:
            # systemd-nspawn turns SIGTERM into an orderly halt of the container's systemd.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._nspawn.pid, signal.SIGTERM)
            try:
                self._nspawn.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _stop(self._nspawn)

    def _wait_booted(self, deadline: float) -> None:
        # is-system-running needs PID 1's private bus socket; it appears early in boot.
        socket = self.root / "run/systemd/private"
        while not socket.exists():
            if self._nspawn.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the container's systemd never came up")
            time.sleep(0.1)
        left = max(1.0, deadline - time.monotonic())
        state = self.run(
            f"timeout {left:.0f} systemctl is-system-running --wait", check=False
        ).stdout.strip()
        if state not in ("running", "degraded"):
            raise RuntimeError(f"the container did not finish booting: {state!r}")

    def _join_network(self) -> None:
        """What an installed Debian on this host's network would have.

        The installer writes the host name into /etc/hosts (sudo looks it up); the
        local CAs the host trusts (for example a proxy's) let pip reach PyPI.
        """
        hostname = self.run("hostname").stdout.strip()
        (self.root / "etc/hosts").write_text(
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost\n"
        )
        local_cas = Path("/usr/local/share/ca-certificates")
        if any(local_cas.glob("**/*.crt")):
            shutil.copytree(
                local_cas, self.root / "usr/local/share/ca-certificates", dirs_exist_ok=True
            )
            self.run("update-ca-certificates >/dev/null")


def _wait_for_leader(nspawn: subprocess.Popen[bytes], deadline: float, log: Path) -> int:
    """The container's init: nspawn's descendant that is PID 1 in its own namespace."""
    while time.monotonic() < deadline:
        if nspawn.poll() is not None:
            console = log.read_text(errors="replace")
            raise RuntimeError(f"systemd-nspawn exited with {nspawn.returncode}:\n{console}")
        for pid in _descendants(nspawn.pid):
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                nspid = next(ln for ln in status.splitlines() if ln.startswith("NSpid:"))
                if nspid.split()[-1] == "1" and len(nspid.split()) > 2:
                    return pid
        time.sleep(0.05)
    raise RuntimeError("the container's init did not appear")


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
