"""Plugin discovery through entry points, with a real third-party distribution.

The distribution `acme-harkd` is built as a wheel in a temporary directory and
installed with pip (offline) into its own target directory on `sys.path`: discovery
goes through `importlib.metadata` exactly as for a package in the venv, without
leaking plugins into other test runs sharing the venv.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import logging
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harkd.config import ConfigError
from harkd.plugins import (
    BackgroundTask,
    PluginError,
    PluginHost,
    describe_plugins,
    load_plugins,
)
from harkd.tools import ToolCall, ToolRunner

DIST = "acme_harkd"

MODULES = {
    "acme_harkd/__init__.py": '"""A third-party harkd plugin distribution (test fixture)."""\n',
    "acme_harkd/hello.py": """
        from harkd.plugins import PluginConfigError, reject_unknown_options
        from harkd.tools import Tool

        def plugin(options, ctx):
            reject_unknown_options(options, {"greeting"})
            greeting = options.get("greeting", "Hello")
            if not isinstance(greeting, str):
                raise PluginConfigError(f"expected text, got {greeting!r}", "greeting")

            async def say_hello(args, call):
                ctx.logger.info("greeting %s", args["name"])
                return {"text": f"{greeting}, {args['name']}!", "device": ctx.device_id}

            async def announce():
                ctx.say(f"{greeting} from the background")

            ctx.background(announce)
            return [
                Tool(
                    name="say_hello",
                    description="Greet someone by name.",
                    parameters={
                        "type": "object",
                        "properties": {"name": {"type": "string"}},
                        "required": ["name"],
                    },
                    handler=say_hello,
                )
            ]
    """,
    "acme_harkd/broken.py": "import acme_missing_dependency  # noqa: F401\n",
    "acme_harkd/strict.py": """
        from harkd.plugins import PluginConfigError

        def plugin(options, ctx):
            if not isinstance(options.get("limits", {}).get("max", 0), int):
                raise PluginConfigError("expected an integer", path="limits.max")
            return []
    """,
    "acme_harkd/crash.py": """
        def plugin(options, ctx):
            raise RuntimeError("boom")
    """,
    "acme_harkd/badtool.py": """
        from harkd.tools import Tool

        async def handler(args, call):
            return None

        def plugin(options, ctx):
            return [Tool("bad name!", "d", {"type": "object"}, handler)]
    """,
    "acme_harkd/dupe.py": """
        from harkd.tools import Tool

        async def handler(args, call):
            return "other hello"

        def plugin(options, ctx):
            return [Tool("say_hello", "Another greeter.", {"type": "object"}, handler)]
    """,
}
ENTRY_POINTS = """\
[harkd.plugins]
hello = acme_harkd.hello:plugin
broken = acme_harkd.broken:plugin
strict = acme_harkd.strict:plugin
crash = acme_harkd.crash:plugin
badtool = acme_harkd.badtool:plugin
dupe = acme_harkd.dupe:plugin
"""


def build_wheel(directory: Path) -> Path:
    """A pure-Python wheel (PEP 427) of `acme-harkd` 1.0 with its entry points.

    Written directly: the venv's setuptools cannot build wheels without the `wheel`
    package, and the test must not need the network.
    """
    info = f"{DIST}-1.0.dist-info"
    files = {name: textwrap.dedent(text).lstrip() for name, text in MODULES.items()}
    files[f"{info}/METADATA"] = "Metadata-Version: 2.1\nName: acme-harkd\nVersion: 1.0\n"
    files[f"{info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: harkd-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{info}/entry_points.txt"] = ENTRY_POINTS
    record = []
    for name, text in files.items():
        digest = hashlib.sha256(text.encode()).digest()
        b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record.append(f"{name},sha256={b64},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    wheel = directory / f"{DIST}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


@pytest.fixture(scope="module")
def acme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`pip install` the acme-harkd wheel and put it on sys.path for this module's tests."""
    root = tmp_path_factory.mktemp("acme")
    wheel = build_wheel(root)
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
        + ["--disable-pip-version-check", "--target", str(target), str(wheel)],
        check=True,
        timeout=120,
    )
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
    for name in [m for m in sys.modules if m == DIST or m.startswith(f"{DIST}.")]:
        del sys.modules[name]


class Host:
    """A PluginHost whose callables record what plugins do."""

    def __init__(self, state_dir: Path, mqtt: bool = True) -> None:
        self.said: list[str] = []
        self.published: list[tuple[str, str | bytes, int, bool]] = []
        self.subscribed: list[str] = []
        self.host = PluginHost(
            "kitchen",
            state_dir,
            base_topic="harkd/kitchen",
            say=self.said.append,
            publish=(lambda *a: self.published.append(a)) if mqtt else None,
            subscribe=(lambda f, cb: self.subscribed.append(f)) if mqtt else None,
        )


async def test_enabled_third_party_plugin_loads_and_its_tools_run(
    acme: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = Host(tmp_path)
    loaded = load_plugins({"hello": {"greeting": "Hi"}, "clock": {}}, h.host)
    assert loaded.plugins == ("hello", "clock")
    assert loaded.problems == ()
    assert [t.name for t in loaded.tools] == ["say_hello", "get_time"]

    runner = ToolRunner(loaded.tools)
    with caplog.at_level(logging.INFO, logger="harkd.plugin.hello"):
        [outcome] = await runner.run_all([ToolCall("c1", "say_hello", '{"name": "Ada"}')])
    assert outcome.output == {"text": "Hi, Ada!", "device": "kitchen"}
    assert [r.name for r in caplog.records] == ["harkd.plugin.hello"]

    [task] = loaded.background
    assert task.name == "plugin:hello:announce"
    await task.run()
    assert h.said == ["Hi from the background"]


def test_plugin_not_in_config_does_not_load(acme: Path, tmp_path: Path) -> None:
    loaded = load_plugins({"clock": {}}, Host(tmp_path).host)
    assert loaded.plugins == ("clock",)
    assert "say_hello" not in [t.name for t in loaded.tools]
    assert loaded.background == ()


def test_broken_plugins_are_reported_and_the_others_load(
    acme: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config: dict[str, dict[str, Any]] = {
        "broken": {},
        "hello": {},
        "strict": {"limits": {"max": "lots"}},
        "crash": {},
        "badtool": {},
        "nosuch": {},
        "clock": {"timezone": "Mars/Olympus"},
        "timers": {},
    }
    with caplog.at_level(logging.ERROR, logger="harkd.plugins"):
        loaded = load_plugins(config, Host(tmp_path).host)
    assert loaded.plugins == ("hello", "timers")
    problems = {p.name: p for p in loaded.problems}
    assert list(problems) == ["broken", "strict", "crash", "badtool", "nosuch", "clock"]
    assert str(problems["broken"]) == (
        "plugins.broken: cannot import acme_harkd.broken:plugin: "
        "ModuleNotFoundError: No module named 'acme_missing_dependency'"
    )
    assert str(problems["strict"]) == "plugins.strict.limits.max: expected an integer"
    assert str(problems["crash"]) == "plugins.crash: failed to configure: RuntimeError: boom"
    assert problems["badtool"].path == "plugins.badtool"
    assert problems["badtool"].reason.startswith("invalid tool: tool 'bad name!': name must match")
    assert problems["nosuch"].reason.startswith("not installed (installed plugins: ")
    assert problems["clock"].path == "plugins.clock.timezone"
    assert "unknown time zone 'Mars/Olympus'" in problems["clock"].reason
    # Each is in the log too, by name.
    logged = " ".join(r.getMessage() for r in caplog.records)
    for name in problems:
        assert f"plugin {name} left out" in logged


def test_unknown_option_is_reported_with_its_path(acme: Path, tmp_path: Path) -> None:
    loaded = load_plugins({"hello": {"greting": "Hi"}}, Host(tmp_path).host)
    [problem] = loaded.problems
    assert str(problem) == "plugins.hello.greting: unknown key (expected: greeting)"


def test_duplicate_tool_names_are_a_config_error_naming_both_plugins(
    acme: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_plugins({"hello": {}, "dupe": {}}, Host(tmp_path).host, source="/etc/harkd/x.yaml")
    assert str(caught.value) == (
        "/etc/harkd/x.yaml: plugins.dupe: tool 'say_hello' is also provided by plugin "
        "'hello'; enable only one of hello and dupe"
    )


def test_mqtt_plugin_without_mqtt_is_reported(tmp_path: Path) -> None:
    loaded = load_plugins({"mqtt": {"allow": ["a/#"]}}, Host(tmp_path, mqtt=False).host)
    [problem] = loaded.problems
    assert str(problem) == "plugins.mqtt: MQTT is not enabled (mqtt.enabled is false)"


def test_context_without_mqtt_refuses_publish_and_subscribe(tmp_path: Path) -> None:
    ctx = Host(tmp_path, mqtt=False).host.context("x")
    assert not ctx.mqtt_enabled
    with pytest.raises(PluginError, match="MQTT is not enabled"):
        ctx.publish("a/b", "x")
    with pytest.raises(PluginError, match="MQTT is not enabled"):
        ctx.subscribe("a/#", lambda topic, payload, retained: None)


def test_context_passes_calls_through(tmp_path: Path) -> None:
    h = Host(tmp_path / "state")
    ctx = h.host.context("lights")
    assert ctx.logger.name == "harkd.plugin.lights"
    assert (ctx.device_id, ctx.base_topic) == ("kitchen", "harkd/kitchen")
    assert not (tmp_path / "state").exists()  # created on demand only
    assert ctx.state_dir == tmp_path / "state" / "plugins" / "lights"
    assert ctx.state_dir.is_dir()
    ctx.publish("harkd/kitchen/x", b"1", retain=True)
    ctx.subscribe("z2m/#", lambda topic, payload, retained: None)
    ctx.say("hi")
    assert h.published == [("harkd/kitchen/x", b"1", 1, True)]
    assert h.subscribed == ["z2m/#"]
    assert h.said == ["hi"]


async def test_background_task_failure_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fail() -> None:
        raise RuntimeError("disk on fire")

    task = BackgroundTask("plugin:x:fail", fail, logging.getLogger("harkd.plugin.x"))
    with caplog.at_level(logging.ERROR):
        await task.run()
    [record] = caplog.records
    assert record.name == "harkd.plugin.x"
    assert record.exc_info is not None


def test_describe_plugins(acme: Path) -> None:
    text = describe_plugins({"hello": {}, "broken": {}, "nosuch": {}, "timers": {}})
    blocks = {block.split(" ", 1)[0]: block for block in text.split("\n\n")}
    assert {"hello", "broken", "nosuch", "clock", "timers", "mqtt", "crash"} <= blocks.keys()

    hello = blocks["hello"]
    assert hello.startswith("hello (enabled)\n  entry point: acme_harkd.hello:plugin\n")
    assert "  distribution: acme-harkd 1.0\n" in hello
    assert "  tool say_hello (timeout 10 s)\n    Greet someone by name.\n" in hello
    schema = hello.split("Greet someone by name.\n", 1)[1]
    assert json.loads(schema) == {
        "type": "object",
        "properties": {"name": {"type": "string"}},
        "required": ["name"],
    }
    assert blocks["clock"].startswith(
        "clock (not enabled)\n  entry point: harkd_plugins.clock:plugin"
    )
    assert "  tool get_time" in blocks["clock"]
    assert "tool set_timer" in blocks["timers"] and "tool cancel_timer" in blocks["timers"]
    assert "  problem: plugins.broken: cannot import" in blocks["broken"]
    assert blocks["nosuch"] == "nosuch (enabled, NOT INSTALLED)"
    assert "tools unknown without options: plugins.mqtt.allow: required" in blocks["mqtt"]
