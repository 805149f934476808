"""Plugins: entry points of group `harkd.plugins`, bound to the `plugins:` section of config.

A plugin is a callable `plugin(options: dict, ctx: PluginContext) -> Iterable[Tool]`
registered under an entry-point name; that name is its key in config.yaml. Only the
plugins named in config load. One that is not installed, fails to import, rejects its
options or returns bad tools is reported (`LoadedPlugins.problems`) and left out; the
others load and the daemon runs. Two plugins offering the same tool name is a
configuration error: the model could not tell them apart.

A plugin whose tools change while the daemon runs (the `mcp` plugin: servers come and
go, their tool lists change) calls `ctx.set_tools(tools, instructions)`; `LiveTools`
merges every plugin's current share and hands the result to the daemon, which applies
it to the live session in one settings update.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from .config import ConfigError
from .tools import Tool, check_tool

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "harkd.plugins"

PublishFn = Callable[[str, str | bytes, int, bool], object]
"""`publish(topic, payload, qos, retain)` on the daemon's MQTT connection."""
MessageCallback = Callable[[str, bytes, bool], None]
"""`callback(topic, payload, retained)`, called on the event loop."""
SubscribeFn = Callable[[str, MessageCallback], object]
"""`subscribe(topic_filter, callback)`; the daemon keeps it across reconnects (any
return value, such as an unsubscribe function, is ignored)."""
SayFn = Callable[[str], object]
"""`say(text)`: the daemon injects the text and asks the model for a spoken response."""
OfferFn = Callable[[str, Sequence[Tool], str], None]
"""`offer(plugin, tools, instructions)`: a plugin's tools and instructions, as of now."""
BackgroundFactory = Callable[[], Coroutine[Any, Any, None]]


class PluginError(Exception):
    """A plugin cannot do what it was asked (e.g. publish while MQTT is disabled)."""


class PluginConfigError(PluginError):
    """Raised by a plugin for bad options; `path` is relative to the plugin's options.

    Reported as `plugins.NAME.PATH: message`.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        self.message = message
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


def reject_unknown_options(options: Mapping[str, Any], known: Iterable[str]) -> None:
    """Raise `PluginConfigError` for an option key not in `known` (a typo must not pass)."""
    allowed = set(known)
    for key in options:
        if key not in allowed:
            expected = f"expected: {', '.join(sorted(allowed))}" if allowed else "no options taken"
            raise PluginConfigError(f"unknown key ({expected})", path=str(key))


class PluginContext:
    """What the daemon offers one plugin.

    `publish`, `subscribe` and `say` must be called from the event loop (tool handlers
    and background tasks run there). `publish`/`subscribe` raise `PluginError` when
    MQTT is disabled; check `mqtt_enabled` first when MQTT is optional to the plugin.
    """

    def __init__(
        self,
        name: str,
        *,
        device_id: str,
        base_topic: str,
        state_root: Path,
        say: SayFn,
        publish: PublishFn | None,
        subscribe: SubscribeFn | None,
        offer: OfferFn | None = None,
        announce: SayFn | None = None,
    ) -> None:
        self.name = name
        self.device_id = device_id
        self.base_topic = base_topic
        """`<mqtt.base_topic>/<device.id>`, e.g. `harkd/kitchen`: prefix of the daemon's topics."""
        self.logger = logging.getLogger(f"harkd.plugin.{name}")
        self._state_dir = state_root / "plugins" / name
        self._say = say
        self._announce = announce or say
        self._publish = publish
        self._subscribe = subscribe
        self._offer = offer
        self._background: list[BackgroundTask] = []

    @property
    def mqtt_enabled(self) -> bool:
        """Whether `publish` and `subscribe` work."""
        return self._publish is not None and self._subscribe is not None

    @property
    def state_dir(self) -> Path:
        """This plugin's own directory, `<state_dir>/plugins/<name>` (created on first use)."""
        self._state_dir.mkdir(parents=True, exist_ok=True)
        return self._state_dir

    def publish(self, topic: str, payload: str | bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish on the daemon's MQTT connection; `topic` is absolute (see `base_topic`)."""
        if self._publish is None:
            raise PluginError("MQTT is not enabled (mqtt.enabled is false)")
        self._publish(topic, payload, qos, retain)

    def subscribe(self, topic_filter: str, callback: MessageCallback) -> None:
        """Get `callback(topic, payload, retained)` for messages matching `topic_filter`."""
        if self._subscribe is None:
            raise PluginError("MQTT is not enabled (mqtt.enabled is false)")
        self._subscribe(topic_filter, callback)

    def say(self, text: str) -> None:
        """Make the assistant speak about `text` (it becomes a message the model answers)."""
        self._say(text)

    def announce(self, text: str) -> None:
        """Have the assistant read `text` out as it is, after any answer playing (the
        same path as `B/cmd/announce`; a session opens for it if need be)."""
        self._announce(text)

    def set_tools(self, tools: Iterable[Tool], instructions: str = "") -> None:
        """Replace, while the daemon runs, the tools this plugin offers (those its callable
        returned included) and its addition to the session instructions.

        Call it from a background task or a tool handler, not from the plugin callable
        (return the first tools from there). The open session gets the change at once.
        A tool that is invalid, or whose name another plugin already offers, is logged
        as an error and left out; the rest are offered. Without a live daemon (`harkd
        plugins`) it does nothing.
        """
        if self._offer is not None:
            self._offer(self.name, tuple(tools), instructions)

    def background(self, factory: BackgroundFactory, name: str | None = None) -> None:
        """Run `await factory()` for the daemon's lifetime, in its supervisor.

        Register from the plugin callable. The coroutine is cancelled on shutdown; if it
        raises, the error is logged and the rest of the daemon keeps running.
        """
        task_name = f"plugin:{self.name}:{name or getattr(factory, '__name__', 'task')}"
        self._background.append(BackgroundTask(task_name, factory, self.logger))


Plugin = Callable[[dict[str, Any], PluginContext], Iterable[Tool]]
"""The type of the object an entry point of group `harkd.plugins` names."""


class PluginHost:
    """The daemon's side of every `PluginContext`: the callables behind them.

    `publish`/`subscribe` are None when MQTT is disabled.
    """

    def __init__(
        self,
        device_id: str,
        state_dir: Path,
        *,
        base_topic: str,
        say: SayFn,
        publish: PublishFn | None = None,
        subscribe: SubscribeFn | None = None,
        offer: OfferFn | None = None,
        announce: SayFn | None = None,
    ) -> None:
        self.device_id = device_id
        self.state_dir = state_dir
        self.base_topic = base_topic
        self.say = say
        self.announce = announce
        self.publish = publish
        self.subscribe = subscribe
        self.offer = offer

    def context(self, name: str) -> PluginContext:
        """A fresh context for plugin `name`."""
        return PluginContext(
            name,
            device_id=self.device_id,
            base_topic=self.base_topic,
            state_root=self.state_dir,
            say=self.say,
            publish=self.publish,
            subscribe=self.subscribe,
            offer=self.offer,
            announce=self.announce,
        )


@dataclass(frozen=True)
class BackgroundTask:
    """A plugin's long-running coroutine; `tg.create_task(task.run(), name=task.name)`."""

    name: str
    factory: BackgroundFactory = field(repr=False)
    logger: logging.Logger = field(repr=False)

    async def run(self) -> None:
        """Run the coroutine; an exception is logged, not raised (one plugin must not
        bring the daemon down). Cancellation propagates."""
        try:
            await self.factory()
        except Exception:
            self.logger.exception("background task %s failed", self.name)


@dataclass(frozen=True)
class PluginProblem:
    """Why a configured plugin was left out."""

    name: str
    reason: str
    path: str
    """The config path the problem is about, e.g. `plugins.mqtt.allow.0`."""

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class LoadedPlugins:
    """The outcome of `load_plugins`."""

    tools: tuple[Tool, ...] = ()
    plugins: tuple[str, ...] = ()
    """Names of the plugins that loaded, in config order."""
    problems: tuple[PluginProblem, ...] = ()
    background: tuple[BackgroundTask, ...] = ()
    tools_of: Mapping[str, tuple[Tool, ...]] = field(default_factory=dict)
    """Each loaded plugin's tools, by plugin name."""


class LiveTools:
    """Every loaded plugin's tools and instructions as they are now, merged.

    Starts from what `load_plugins` returned; `offer` (a `PluginHost`'s) replaces one
    plugin's share at runtime and calls `changed()` when the merged result differs.
    One instance serves one set of loaded plugins: after a reload, `close()` the old
    one, so offers from plugin instances on their way out are ignored.
    """

    def __init__(self, changed: Callable[[], None]) -> None:
        self._changed = changed
        self._tools: dict[str, tuple[Tool, ...]] = {}
        self._notes: dict[str, str] = {}
        self._reported: set[tuple[str, str, str]] = set()
        self._open = True

    def start(self, loaded: LoadedPlugins) -> None:
        """Take the loaded plugins' tools (`load_plugins` checked them for clashes)."""
        self._tools = dict(loaded.tools_of)

    def close(self) -> None:
        """Ignore every later offer."""
        self._open = False

    @property
    def tools(self) -> tuple[Tool, ...]:
        """Every plugin's tools, in plugin order."""
        return tuple(t for tools in self._tools.values() for t in tools)

    def instructions(self, base: str) -> str:
        """`base` (the configured instructions) followed by each plugin's addition."""
        return "\n\n".join(part for part in (base, *self._notes.values()) if part)

    def offer(self, plugin: str, tools: Sequence[Tool], instructions: str) -> None:
        """Replace `plugin`'s tools and instructions (see `PluginContext.set_tools`)."""
        if not self._open:
            return
        if plugin not in self._tools:
            logger.warning("plugin %s offered tools but is not loaded; ignored", plugin)
            return
        owner = {t.name: name for name, ts in self._tools.items() if name != plugin for t in ts}
        accepted: list[Tool] = []
        for tool in tools:
            try:
                check_tool(tool)
            except ValueError as exc:
                self._report(plugin, f"invalid tool left out: {exc}", ("invalid", plugin, str(exc)))
                continue
            other = owner.get(tool.name)
            if other is None and any(t.name == tool.name for t in accepted):
                other = plugin
            if other is not None:
                self._report(
                    plugin,
                    f"tool {tool.name!r} is also provided by plugin {other!r}; "
                    f"left out (enable only one of {other} and {plugin})",
                    (tool.name, plugin, other),
                )
                continue
            accepted.append(tool)
        new_tools = tuple(accepted)
        if new_tools == self._tools[plugin] and instructions == self._notes.get(plugin, ""):
            return
        self._tools[plugin] = new_tools
        self._notes[plugin] = instructions
        names = ", ".join(t.name for t in new_tools) or "none"
        logger.info("plugin %s: tools now %s", plugin, names)
        self._changed()

    def _report(self, plugin: str, message: str, key: tuple[str, str, str]) -> None:
        # Once per problem: a plugin offers its whole set again at every change.
        if key not in self._reported:
            self._reported.add(key)
            logger.error("plugins.%s: %s", plugin, message)


@dataclass(frozen=True)
class _Loaded:
    name: str
    tools: tuple[Tool, ...]
    background: tuple[BackgroundTask, ...]


def installed_plugins() -> dict[str, EntryPoint]:
    """Every entry point of group `harkd.plugins`, by name."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            logger.warning(
                "plugin %s is installed twice (%s and %s); using %s",
                ep.name,
                found[ep.name].value,
                ep.value,
                found[ep.name].value,
            )
            continue
        found[ep.name] = ep
    return found


def load_plugins(
    config_plugins: Mapping[str, Mapping[str, Any]],
    host: PluginHost,
    *,
    source: str = "config",
) -> LoadedPlugins:
    """Load the plugins named in config (name -> options) and collect their tools.

    Broken plugins are reported in `problems` (and logged) and left out. Raises
    `ConfigError` (with `source`, the config file) when two plugins offer a tool of the
    same name, naming both plugins.
    """
    installed = installed_plugins()
    loaded: list[_Loaded] = []
    problems: list[PluginProblem] = []
    for name, options in config_plugins.items():
        result = _load_one(name, options, installed.get(name), host, installed)
        if isinstance(result, PluginProblem):
            logger.error("plugin %s left out: %s", name, result)
            problems.append(result)
        else:
            names = ", ".join(t.name for t in result.tools) or "none"
            logger.info("plugin %s: tools %s", name, names)
            loaded.append(result)

    owner: dict[str, str] = {}
    clashes: list[str] = []
    for plugin in loaded:
        for tool in plugin.tools:
            if tool.name in owner:
                clashes.append(
                    f"plugins.{plugin.name}: tool {tool.name!r} is also provided by plugin "
                    f"{owner[tool.name]!r}; enable only one of {owner[tool.name]} and {plugin.name}"
                )
            else:
                owner[tool.name] = plugin.name
    if clashes:
        raise ConfigError(source, clashes)

    return LoadedPlugins(
        tools=tuple(t for p in loaded for t in p.tools),
        plugins=tuple(p.name for p in loaded),
        problems=tuple(problems),
        background=tuple(b for p in loaded for b in p.background),
        tools_of={p.name: p.tools for p in loaded},
    )


def _load_one(
    name: str,
    options: Mapping[str, Any],
    ep: EntryPoint | None,
    host: PluginHost,
    installed: Mapping[str, EntryPoint],
) -> _Loaded | PluginProblem:
    path = f"plugins.{name}"
    if ep is None:
        available = ", ".join(sorted(installed)) or "none"
        return PluginProblem(name, f"not installed (installed plugins: {available})", path)
    try:
        factory = ep.load()
    except Exception as exc:
        logger.debug("plugin %s: import of %s failed", name, ep.value, exc_info=True)
        return PluginProblem(name, f"cannot import {ep.value}: {type(exc).__name__}: {exc}", path)
    if not callable(factory):
        return PluginProblem(name, f"{ep.value} is not callable", path)

    ctx = host.context(name)
    try:
        # A deep copy: the plugin may keep or change its options; config stays frozen.
        tools = tuple(factory(copy.deepcopy(dict(options)), ctx))
    except PluginConfigError as exc:
        where = f"{path}.{exc.path}" if exc.path else path
        return PluginProblem(name, exc.message, where)
    except PluginError as exc:
        return PluginProblem(name, str(exc), path)
    except Exception as exc:
        logger.exception("plugin %s raised while configuring", name)
        return PluginProblem(name, f"failed to configure: {type(exc).__name__}: {exc}", path)

    seen: set[str] = set()
    for tool in tools:
        try:
            check_tool(tool)
        except ValueError as exc:
            return PluginProblem(name, f"invalid tool: {exc}", path)
        if tool.name in seen:
            return PluginProblem(name, f"invalid tool: {tool.name!r} returned twice", path)
        seen.add(tool.name)
    return _Loaded(name, tools, tuple(ctx._background))


def describe_plugins(config_plugins: Mapping[str, Mapping[str, Any]]) -> str:
    """`harkd plugins`: every installed plugin, whether config enables it, and its tools.

    Tools are built with a dry-run context: nothing is published or said, state goes
    to a temporary directory and background tasks do not run. A plugin config does not
    enable is built with empty options (which some plugins reject: that is shown).
    """
    installed = installed_plugins()
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="harkd-plugins-") as tmp:
        host = PluginHost(
            "dry-run",
            Path(tmp),
            base_topic="harkd/dry-run",
            say=lambda text: logger.info("dry run: would say %r", text),
            publish=lambda topic, payload, qos, retain: logger.info(
                "dry run: would publish to %s", topic
            ),
            subscribe=lambda topic_filter, callback: None,
        )
        for name in sorted(installed.keys() | config_plugins.keys()):
            if lines:
                lines.append("")
            ep = installed.get(name)
            enabled = name in config_plugins
            state = "enabled" if enabled else "not enabled"
            if ep is None:
                lines.append(f"{name} ({state}, NOT INSTALLED)")
                continue
            lines.append(f"{name} ({state})")
            lines.append(f"  entry point: {ep.value}")
            if ep.dist is not None:
                lines.append(f"  distribution: {ep.dist.name} {ep.dist.version}")
            result = _load_one(name, config_plugins.get(name, {}), ep, host, installed)
            if isinstance(result, PluginProblem):
                label = "problem" if enabled else "tools unknown without options"
                lines.append(f"  {label}: {result}")
                continue
            if not result.tools and result.background:
                lines.append("  tools: none at start (it may offer some while the daemon runs)")
            elif not result.tools:
                lines.append("  tools: none")
            for tool in result.tools:
                lines.extend(_describe_tool(tool))
    return "\n".join(lines)


def _describe_tool(tool: Tool) -> list[str]:
    flags = f"timeout {tool.timeout_s:g} s"
    if tool.cancel_on_interrupt:
        flags += ", cancelled on interrupt"
    schema = json.dumps(tool.parameters, indent=2, ensure_ascii=False)
    return [
        f"  tool {tool.name} ({flags})",
        f"    {tool.description}",
        *("    " + line for line in schema.splitlines()),
    ]
