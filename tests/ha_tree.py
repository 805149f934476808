"""A Debian 13 (trixie) tree with Home Assistant in a venv, built once and cached.

Home Assistant 2026.2 needs Python 3.13, which Debian 12 does not have; trixie does.
The tree is made with debootstrap under /var/cache/harkd-test (like tests/nspawn.py's
bookworm tree) and every command runs in it with systemd-nspawn, without booting: the
container shares the host's network, and its mounts vanish with it however a test ends.

Building takes several steps, each marked done by a stamp file in the tree, so an
interrupted build resumes at the step it was in. The last step starts Home Assistant
once with network, which installs the requirements of the integrations the tests use;
every later start passes ``--skip-pip``. Run as a script to build (``make test-ha``
does): ``python tests/ha_tree.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

from ha_config import write_config
from mosquitto import free_port
from nspawn import CACHE_DIR

__all__ = [
    "HA_VERSION",
    "VENV",
    "ensure_ha_tree",
    "nspawn_command",
    "run_inside",
    "start_ha",
    "tree_path",
    "wait_ha_up",
]

SUITE = "trixie"
MIRROR = "http://deb.debian.org/debian"
# python3 is 3.13 in trixie; gcc and python3-dev because lru-dict builds from source;
# the camera integration (the demo has cameras) looks for libturbojpeg at start.
PACKAGES = (
    "python3",
    "python3-venv",
    "python3-dev",
    "gcc",
    "libc6-dev",
    "ca-certificates",
    "tzdata",
    "libturbojpeg0",
)
HA_VERSION = "2026.2.3"
VENV = "/opt/homeassistant"
# What every first start must have installed: the integrations the tests configure.
FIRST_START_MODULES = ("paho.mqtt", "mcp", "av", "numpy")
_INSIDE_ENV = {
    "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    # Home Assistant installs requirements with uv, which trusts only its built-in CAs
    # unless told to use the system's (where the host's local CAs were added).
    "UV_NATIVE_TLS": "1",
}
Log = IO[str]


def tree_path() -> Path:
    """Where the cached tree for the current package lists lives."""
    key = "\n".join((SUITE, MIRROR, *PACKAGES, HA_VERSION))
    return CACHE_DIR / f"ha-{SUITE}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def nspawn_command(
    tree: Path,
    argv: Sequence[str],
    *,
    binds: Iterable[tuple[Path, str]] = (),
    volatile: bool = False,
) -> list[str]:
    """The systemd-nspawn command line that runs ``argv`` as root in ``tree``.

    ``--register=no --keep-unit``: this host has no systemd as PID 1 to register with.
    ``argv`` runs as the container's PID 1 and gets the SIGTERM nspawn gets
    (``--kill-signal``), so Home Assistant shuts down cleanly (nspawn's stub init of
    ``--as-pid2`` would not pass it on). ``volatile`` keeps the cached tree pristine:
    writes go to a tmpfs layer that vanishes with the container.
    """
    return [
        "systemd-nspawn",
        "--quiet",
        "--register=no",
        "--keep-unit",
        "--kill-signal=SIGTERM",
        "--resolv-conf=copy-host",
        "--timezone=off",
        f"--directory={tree}",
        f"--machine=harkd-ha-{os.getpid()}",
        *(["--volatile=overlay"] if volatile else []),
        *(f"--bind={host}:{inside}" for host, inside in binds),
        *(f"--setenv={k}={v}" for k, v in _INSIDE_ENV.items()),
        *argv,
    ]


def run_inside(
    tree: Path,
    script: str,
    log: Log | None,
    *,
    binds: Iterable[tuple[Path, str]] = (),
    timeout_s: float = 1800.0,
) -> None:
    """Run a bash ``script`` as root in ``tree`` (output to ``log``); raise if it fails."""
    argv = ["/bin/bash", "-c", f"set -e -o pipefail\n{script}"]
    proc = subprocess.run(
        nspawn_command(tree, argv, binds=binds),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"inside {tree.name}, exit {proc.returncode}: {script}")


def ensure_ha_tree(log: Log | None = None, progress: Callable[[str], None] = print) -> Path:
    """Return the cached trixie tree with Home Assistant, building what is missing.

    Each step is skipped once its stamp exists; a lock keeps two runs from building at
    once. ``log`` gets the tools' output, ``progress`` one line per step.
    """
    tree = tree_path()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / ".lock-ha").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name, step in _STEPS:
            stamp = tree / f".harkd-ha-{name}"
            if stamp.exists():
                continue
            progress(f"ha tree {tree}: {name} ...")
            began = time.monotonic()
            step(tree, log)
            stamp.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
            progress(f"ha tree: {name} done in {time.monotonic() - began:.0f} s")
    return tree


def _debootstrap(tree: Path, log: Log | None) -> None:
    # debootstrap cannot resume a half-made tree: an interrupted one starts over.
    shutil.rmtree(tree, ignore_errors=True)
    partial = tree.with_name(tree.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
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
    for deb in (partial / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    partial.rename(tree)


def _certificates(tree: Path, log: Log | None) -> None:
    # The local CAs the host trusts (for example an egress proxy's) let pip reach PyPI.
    local_cas = Path("/usr/local/share/ca-certificates")
    if any(local_cas.glob("**/*.crt")):
        shutil.copytree(local_cas, tree / "usr/local/share/ca-certificates", dirs_exist_ok=True)
    run_inside(tree, "update-ca-certificates", log)


def _pip_binds() -> list[tuple[Path, str]]:
    """pip's and uv's download caches, shared by rebuilds (a new HA version, say)."""
    binds = []
    for tool in ("pip", "uv"):
        cache = CACHE_DIR / tool
        cache.mkdir(parents=True, exist_ok=True)
        binds.append((cache, f"/root/.cache/{tool}"))
    return binds


def _homeassistant(tree: Path, log: Log | None) -> None:
    run_inside(
        tree,
        f"rm -rf {VENV}\npython3 -m venv {VENV}\n"
        f"{VENV}/bin/pip install homeassistant=={HA_VERSION}",
        log,
        binds=_pip_binds(),
    )


def _stream_requirements(tree: Path, log: Log | None) -> None:
    # The demo integration imports stream without declaring it, so Home Assistant never
    # installs stream's requirements (av, numpy) by itself: install its pinned ones.
    # (Importing stream to find it would need them already: find it through the package.)
    script = f"""
package=$({VENV}/bin/python -c \\
    'import homeassistant, os; print(os.path.dirname(homeassistant.__file__))')
{VENV}/bin/python -c 'import json, sys
print("\\n".join(json.load(open(sys.argv[1]))["requirements"]))' \\
    "$package/components/stream/manifest.json" > /tmp/stream.txt
{VENV}/bin/pip install -r /tmp/stream.txt -c "$package/package_constraints.txt"
"""
    run_inside(tree, script, log, binds=_pip_binds())


def _first_start(tree: Path, log: Log | None) -> None:
    # Home Assistant installs an integration's requirements when it first sets it up:
    # start it once, with network, configured like the tests configure it. The config
    # folder stays beside the tree: its log shows what that start did.
    config = tree.with_name(tree.name + ".first-start")
    shutil.rmtree(config, ignore_errors=True)
    port = free_port()
    write_config(config, http_port=port, mqtt_port=free_port())
    with start_ha(tree, config, log, skip_pip=False, binds=_pip_binds()) as ha:
        wait_ha_up(config, port, timeout_s=1800, ha=ha)
    run_inside(
        tree,
        f"{VENV}/bin/python -c 'import {', '.join(FIRST_START_MODULES)}'",
        log,
    )


_STEPS: tuple[tuple[str, Callable[[Path, Log | None], None]], ...] = (
    ("debootstrap", _debootstrap),
    ("certificates", _certificates),
    ("homeassistant", _homeassistant),
    ("stream-requirements", _stream_requirements),
    ("first-start", _first_start),
)


@contextlib.contextmanager
def start_ha(
    tree: Path,
    config: Path,
    log: Log | None,
    *,
    skip_pip: bool = True,
    binds: Iterable[tuple[Path, str]] = (),
) -> Iterator[subprocess.Popen[bytes]]:
    """Run Home Assistant in ``tree`` with ``config`` (a host folder) as its config.

    Stops it with SIGTERM (a clean shutdown) on exit, SIGKILL if that takes too long.
    """
    argv = [f"{VENV}/bin/hass", "--config", "/config", *(["--skip-pip"] if skip_pip else [])]
    ha = subprocess.Popen(
        nspawn_command(tree, argv, binds=[(config, "/config"), *binds], volatile=skip_pip),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
    )
    try:
        yield ha
    finally:
        if ha.poll() is None:
            ha.send_signal(signal.SIGTERM)
            try:
                ha.wait(120)
            except subprocess.TimeoutExpired:
                ha.kill()
                ha.wait()


def wait_ha_up(
    config: Path, port: int, timeout_s: float, ha: subprocess.Popen[bytes] | None = None
) -> float:
    """Wait until Home Assistant finished starting; return how long that took.

    Finished means: bootstrap logged "Home Assistant initialized" (every configured
    integration was set up, its requirements installed) and the API answers.
    """
    began = time.monotonic()
    log = config / "home-assistant.log"
    url = f"http://127.0.0.1:{port}/api/onboarding"
    while True:
        with contextlib.suppress(OSError, ValueError):
            if "Home Assistant initialized in" in log.read_text(errors="replace"):
                with urllib.request.urlopen(url, timeout=5) as answer:
                    json.load(answer)
                    return time.monotonic() - began
        if ha is not None and ha.poll() is not None:
            raise RuntimeError(f"Home Assistant exited with {ha.returncode}")
        if time.monotonic() - began > timeout_s:
            raise RuntimeError(f"Home Assistant did not finish starting in {timeout_s:.0f} s")
        time.sleep(0.5)


def main() -> None:
    """Build the tree (``make test-ha``), printing a line per step; the log to stderr."""
    began = time.monotonic()
    tree = ensure_ha_tree(sys.stderr)
    print(f"ha tree ready: {tree} ({time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
