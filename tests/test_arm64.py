"""harkd installs and runs on aarch64 (a Raspberry Pi's architecture), under emulation.

In a Debian 12 arm64 tree run by qemu-user (tests/arm64_tree.py) with what the README's
apt-get line gives a Pi, the distribution's python3 makes a venv and pip installs a
wheel built from this working tree: the default install, as the README's system-service
steps do it. pip's installation report says, for every distribution, whether it came
as an aarch64 binary wheel, a pure-Python wheel or was built from source; only
pyalsaaudio (no wheels, compiled against the ALSA headers) may be built. The dependency
list is read from the built wheel's metadata, so a dependency added to pyproject.toml
is checked without a change here.

Then, emulated: ``harkd --help``, ``harkd check-config`` on the shipped config.yaml,
the wake word engine (its tflite runtime) on okay_nabu, and ``harkd demo --wake``.
Emulated timings are not a Pi's: qemu translates every instruction.

Slow (a debootstrap, a pip install under emulation): run with HARKD_TEST_ARM64=1
(`make check-arm64`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from arm64_tree import ensure_arm64_tree, nspawn_command
from speech_fixtures import noise, silence, write_wav

pytestmark = [
    pytest.mark.arm64,
    pytest.mark.skipif(
        os.environ.get("HARKD_TEST_ARM64") != "1",
        reason="installs harkd in an emulated arm64 Debian; set HARKD_TEST_ARM64=1 "
        "(make check-arm64)",
    ),
    # The first run debootstraps the tree (minutes); pip then runs emulated.
    pytest.mark.timeout(3600),
]

REPO = Path(__file__).resolve().parents[1]
# The one dependency without wheels: it compiles against libasound2-dev.
MAY_COMPILE = {"pyalsaaudio"}
DUMMY_KEY = "sk-arm64-dummy-0123456789"
VENV = "/opt/harkd/venv"


@dataclass
class Inside:
    """The arm64 tree with harkd installed in a venv on the host (bound in)."""

    tree: Path
    venv: Path
    out: Path
    wheel: Path

    def run(
        self, script: str, timeout_s: float = 900.0
    ) -> tuple[subprocess.CompletedProcess[str], float]:
        """Run a bash ``script`` in the tree without network; its result and the
        seconds it took inside (container start excluded)."""
        stamp = self.out / ".elapsed"
        stamp.unlink(missing_ok=True)
        wrapped = (
            f"began=$EPOCHREALTIME\n( set -e -o pipefail\n{script}\n)\nrc=$?\n"
            f'echo "$began $EPOCHREALTIME" > /out/{stamp.name}\nexit $rc'
        )
        proc = subprocess.run(
            nspawn_command(
                self.tree, ["/bin/bash", "-c", wrapped], binds=self._binds(), network=False
            ),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        assert stamp.exists(), f"the container did not run:\n{proc.stderr}"
        began, ended = map(float, stamp.read_text().split())
        return proc, ended - began

    def _binds(self) -> list[tuple[Path, str]]:
        return [(self.venv, "/opt/harkd"), (self.out, "/out")]


def build_wheel(dest: Path) -> Path:
    """A wheel of this working tree as it is (uncommitted edits included), built from a
    copy so that the tree gets no build/ or egg-info."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    source = dest / "src"
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(source)],
        check=True,
    )
    return next(dest.glob("harkd-*.whl"))


def default_requirements(wheel: Path) -> set[str]:
    """The names the default install requires (no extras), from the wheel's metadata."""
    with zipfile.ZipFile(wheel) as archive:
        meta_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(meta_name).decode())
    names: set[str] = set()
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is None or "extra" not in str(requirement.marker):
            names.add(canonicalize_name(requirement.name))
    return names


def classify(item: dict[str, Any]) -> str:
    """How pip got one distribution of its report: "aarch64 wheel", "pure wheel" or
    "built from source" (an sdist). A wheel for another platform is an error."""
    filename = item["download_info"]["url"].rsplit("/", 1)[-1]
    if not filename.endswith(".whl"):
        return "built from source"
    tags = parse_wheel_filename(filename)[3]
    platforms = {tag.platform for tag in tags}
    if platforms == {"any"}:
        return "pure wheel"
    if all("aarch64" in platform for platform in platforms):
        return "aarch64 wheel"
    raise AssertionError(f"pip installed a wheel for another platform: {filename}")


@pytest.fixture(scope="module")
def inside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inside]:
    """The tree (built if missing) with this working tree's wheel pip-installed."""
    began = time.monotonic()
    tree = ensure_arm64_tree(sys.stderr)
    print(f"measured: arm64 tree ready in {time.monotonic() - began:.0f} s")
    root = tmp_path_factory.mktemp("arm64")
    wheel = build_wheel(root / "dist")
    venv, out = root / "venv", root / "out"
    venv.mkdir()
    out.mkdir()
    shutil.copy2(wheel, out / wheel.name)
    shutil.copy2(REPO / "config.yaml", out / "config.yaml")
    shutil.copy2(Path(__file__).with_name("arm64_wake_check.py"), out / "wake_check.py")
    pcm = (
        silence(2000)
        + noise(2000, 0.02, kind="pink")
        + noise(2000, 0.05, kind="hum")
        + silence(1000)
    )
    write_wav(out / "no_wake_word.wav", pcm)
    script = (
        f"/usr/bin/python3 -m venv {VENV}\n"
        f"{VENV}/bin/pip install --report /out/report.json /out/{wheel.name} "
        "2>&1 | tee /out/pip.log\n"
    )
    began = time.monotonic()
    proc = subprocess.run(
        nspawn_command(
            tree,
            ["/bin/bash", "-c", f"set -e -o pipefail\n{script}"],
            # No pip cache survives a run (it lives in the volatile layer): every run
            # downloads and compiles like a fresh Pi.
            binds=[(venv, "/opt/harkd"), (out, "/out")],
        ),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    took = time.monotonic() - began
    print(f"measured: venv + pip install (downloads included) {took:.0f} s, emulated")
    yield Inside(tree, venv, out, wheel)


def test_every_dependency_is_a_wheel_except_pyalsaaudio(inside: Inside) -> None:
    report = json.loads((inside.out / "report.json").read_text())
    log = (inside.out / "pip.log").read_text()
    got = {
        canonicalize_name(item["metadata"]["name"]): (item["metadata"]["version"], classify(item))
        for item in report["install"]
        if not item["download_info"]["url"].endswith(inside.wheel.name)
    }
    print("measured: how pip installed each distribution on aarch64:")
    for name, (version, how) in sorted(got.items()):
        print(f"  {name} {version}: {how}")
    kinds = [how for _, how in got.values()]
    print(
        f"measured: {len(got)} distributions: {kinds.count('aarch64 wheel')} aarch64 wheels, "
        f"{kinds.count('pure wheel')} pure-Python wheels, "
        f"{kinds.count('built from source')} built from source"
    )
    assert default_requirements(inside.wheel) <= set(got), "a dependency was not installed"
    compiled = {name for name, (_, how) in got.items() if how == "built from source"}
    assert compiled == MAY_COMPILE, f"built from source: {sorted(compiled)}"
    # pip's own log agrees: it compiled exactly those (as a wheel, or with Debian 12's
    # pip and no `wheel` package, through setup.py install).
    built = re.findall(
        r"(?:Building wheel for|Running setup.py install for) ([A-Za-z0-9._-]+)", log
    )
    assert {canonicalize_name(name) for name in built} == compiled


def test_compiled_pyalsaaudio_loads(inside: Inside) -> None:
    # Built against the tree's libasound2-dev: the extension is aarch64 and links.
    proc, _ = inside.run(f"{VENV}/bin/python -c 'import alsaaudio; print(alsaaudio.__file__)'")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("-aarch64-linux-gnu.so")


def test_help_runs(inside: Inside) -> None:
    proc, seconds = inside.run(f"{VENV}/bin/harkd --help")
    print(f"measured: harkd --help {seconds:.2f} s, emulated")
    assert proc.returncode == 0, proc.stderr
    assert "check-config" in proc.stdout
    assert "demo" in proc.stdout


def test_check_config_accepts_the_shipped_config(inside: Inside) -> None:
    proc, seconds = inside.run(
        f"OPENAI_API_KEY={DUMMY_KEY} {VENV}/bin/harkd check-config -c /out/config.yaml"
    )
    print(f"measured: harkd check-config {seconds:.2f} s, emulated")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "config.yaml: valid" in proc.stdout
    assert "api_key: '***'" in proc.stdout
    assert DUMMY_KEY not in proc.stdout + proc.stderr


def test_wake_word_engine_runs_on_aarch64(inside: Inside) -> None:
    proc, seconds = inside.run(f"{VENV}/bin/python /out/wake_check.py /out/no_wake_word.wav")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    print(f"measured: wake word check {seconds:.2f} s, emulated: {report}")
    assert report["machine"] == "aarch64"
    # The tflite runtime really is the aarch64 build, and it loaded and ran the model.
    assert report["tflite_elf_machine"] == "aarch64"
    assert report["no_wake_word"]["detections"] == []
    assert [word for word, _ in report["okay_nabu"]["detections"]] == ["okay_nabu"]


def test_demo_hears_the_wake_word_and_answers(inside: Inside) -> None:
    proc, seconds = inside.run(f"{VENV}/bin/harkd demo --wake")
    print(f"measured: harkd demo --wake {seconds:.1f} s, emulated")
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "wake word: okay_nabu" in proc.stdout
    assert "privacy: 0 ms of audio reached the provider before the wake word" in proc.stdout
