"""Imports stay light: each check runs in a fresh interpreter, where sys.modules
shows what an import really pulled in."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("harkd.client", "harkd.testing", "websockets", "numpy")


def loaded_after(statement: str, watched: tuple[str, ...]) -> list[str]:
    """Which of `watched` are in sys.modules after running `statement` fresh."""
    code = (
        f"import json, sys\n{statement}\n"
        f"print(json.dumps([m for m in {list(watched)!r} if m in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded: list[str] = json.loads(result.stdout)
    return loaded


@pytest.mark.parametrize("module", ["harkd.events", "harkd.messages"])
def test_the_vocabulary_does_not_load_the_client_stack(module: str) -> None:
    assert loaded_after(f"import {module}", (*HEAVY, "pydantic")) == []


def test_the_package_names_load_on_first_use() -> None:
    assert loaded_after("import harkd", HEAVY) == []
    assert "harkd.client" in loaded_after("from harkd import RealtimeClient", HEAVY)


def test_the_command_line_starts_without_the_client_or_the_fakes() -> None:
    """What `harkd --help` (and check-config) imports: not the realtime stack."""
    statement = "import harkd.cli, harkd.config, harkd.adapters.registry"
    assert loaded_after(statement, HEAVY) == []


def test_harkd_help_does_not_pay_for_config_validation() -> None:
    """`harkd --help` parses the command line only: no pydantic, yaml or jsonschema."""
    statement = (
        "import contextlib, harkd.cli\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(None):\n"
        "    harkd.cli.main(['--help'])"
    )
    assert loaded_after(statement, (*HEAVY, "pydantic", "yaml", "jsonschema")) == []


def test_the_default_audio_path_runs_without_numpy() -> None:
    """A daemon on the default config (16 kHz capture resampled to the provider's
    24 kHz, server VAD, no wake word or echo cancellation, a stereo speaker) never loads
    numpy or python-soxr's numpy layer: about 18 MB of a Pi's memory."""
    statement = (
        "import harkd.service\n"
        "from harkd.audio.base import AudioFrame\n"
        "from harkd.audio.pcm import pick_channel, spread_channels\n"
        "from harkd.audio.pipeline import capture_pipeline\n"
        "pipeline = capture_pipeline(16000, 24000, is_shut=lambda: False)\n"
        "frames = [pick_channel(bytes(1280), 0, 2) for _ in range(10)]\n"
        "sent = [pipeline.push(AudioFrame(f, 16000, 0.0)) for f in frames]\n"
        "assert sum(len(p) for out in sent for p in out) >= 9 * 960, sent\n"
        "assert len(spread_channels(bytes(960), 2)) == 1920\n"
    )
    assert loaded_after(statement, ("numpy", "soxr")) == []


def test_production_code_imports_the_fakes_only_for_demo_and_fake_server() -> None:
    allowed = {ROOT / "daemon/harkd/demo.py", ROOT / "daemon/harkd/cli.py"}
    testing = ROOT / "daemon/harkd/testing"
    sources = [
        path
        for folder in (ROOT / "daemon/harkd", ROOT / "plugins/harkd_plugins")
        for path in folder.rglob("*.py")
        if testing not in path.parents
    ]
    importers = set()
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [_absolute(path, node.module or "", node.level)]
            else:
                continue
            if any(name == "harkd.testing" or name.startswith("harkd.testing.") for name in names):
                importers.add(path)
    assert importers <= allowed, sorted(str(p.relative_to(ROOT)) for p in importers - allowed)


def _absolute(path: Path, module: str, level: int) -> str:
    """`from .testing import x` in daemon/harkd/demo.py -> harkd.testing."""
    if level == 0:
        return module
    root = ROOT / ("daemon" if ROOT / "daemon" in path.parents else "plugins")
    package = path.relative_to(root).parent.parts
    package = package[: len(package) - (level - 1)]
    return ".".join([*package, module] if module else package)
