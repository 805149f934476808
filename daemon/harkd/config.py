"""config.yaml -> frozen, validated config objects with errors that name the key.

Parsing happens once, at start (and on SIGHUP); every part of the daemon is handed
only its own frozen section. `${NAME}` in any string is replaced from the
environment; `api_key_file` / `password_file` are read here so that a missing
credential is a configuration error, not a runtime surprise.

Outside the systemd unit `${CREDENTIALS_DIRECTORY}` is unset; it then stands for
/etc/harkd/credentials, the directory the unit's `LoadCredential=` lines copy from, so
an administrator's `harkd check-config` reads the same secrets the service will.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from harkd.adapters.registry import ProviderUnavailable, find_provider

SEARCH_PATHS = (Path("config.yaml"), Path("/etc/harkd/config.yaml"))
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Where harkd.service's LoadCredential= lines read from; what ${CREDENTIALS_DIRECTORY}
# means when systemd did not set it (only that variable has a fallback).
CREDENTIALS_FALLBACK = Path("/etc/harkd/credentials")

log = logging.getLogger(__name__)


class ConfigError(Exception):
    """A configuration that cannot be used; every problem names file and YAML path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DeviceConfig(_Section):
    """Who this device is: used in MQTT topics and Home Assistant unique ids."""

    id: Annotated[str, Field(pattern=r"^[a-z0-9_-]+$", max_length=64)] = "kitchen"
    name: str = "Kitchen voice"


class ReconnectConfig(_Section):
    """Jittered exponential backoff for the realtime connection."""

    initial_delay_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    max_delay_s: Annotated[float, Field(gt=0, le=3600)] = 30.0


class RealtimeConfig(_Section):
    """The realtime voice session.

    `url`, `model` and `voice` left out (or null) are the provider's defaults, filled
    in here so that `check-config` shows what will be used.
    """

    provider: str = "openai"
    url: str | None = None
    model: str | None = None
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    voice: str | None = None
    agent_id: str | None = None
    """ElevenLabs: the agent to talk to (other providers take none)."""
    instructions: str = "You are a helpful voice assistant in a home."
    turn_detection: Literal["server_vad", "semantic_vad", "manual"] = "server_vad"
    transcription_model: str | None = "gpt-4o-mini-transcribe"
    reconnect: ReconnectConfig = ReconnectConfig()
    # Beyond DESIGN.md: the provider ends a session after 60 minutes; harkd opens a
    # fresh one before that and replays the last messages as context.
    rollover_s: Annotated[float, Field(gt=60, le=3600)] = 3300.0
    replay_messages: Annotated[int, Field(ge=0, le=100)] = 12
    ping_interval_s: Annotated[float, Field(gt=0, le=300)] = 20.0
    ping_timeout_s: Annotated[float, Field(gt=0, le=300)] = 20.0
    # Beyond DESIGN.md: connect with short-lived client secrets minted from the key
    # (true: at the REST API of `url`'s host; or the http(s):// base URL to mint at).
    ephemeral_tokens: bool | Annotated[str, Field(pattern=r"^https?://")] = False
    connect: Literal["always", "on_demand"] = "always"
    """on_demand: no session while idle; a wake word, cmd/listen, cmd/text or a
    plugin's say opens one, and `idle_disconnect_s` of nothing closes it."""
    idle_disconnect_s: Annotated[float, Field(gt=0, le=86400)] = 60.0

    @model_validator(mode="before")
    @classmethod
    def _provider_defaults(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        try:
            provider = find_provider(data.get("provider", "openai"))
        except (ProviderUnavailable, TypeError):
            return data  # the `provider` field's own check names the problem
        defaults = {"url": provider.url, "model": provider.model, "voice": provider.voice}
        filled = {key: value for key, value in defaults.items() if data.get(key) is None}
        return {**data, **filled}

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, name: str) -> str:
        try:
            find_provider(name)
        except ProviderUnavailable as exc:
            raise ValueError(str(exc)) from None
        return name

    @field_validator("url")
    @classmethod
    def _websocket_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("ws://", "wss://")):
            raise ValueError(f"expected a ws:// or wss:// URL, got {url!r}")
        return url


class AudioInputConfig(_Section):
    """Microphone: an ALSA PCM or `file:PATH.wav`."""

    device: str = "default"
    rate: Annotated[int, Field(ge=8000, le=192000)] = 16000
    period_ms: Annotated[int, Field(ge=10, le=100)] = 20
    channel: Annotated[int, Field(ge=0, le=31)] = 0
    # Beyond DESIGN.md: a WAV source starts over at its end instead of going silent.
    loop: bool = False


class AudioOutputConfig(_Section):
    """Speaker: an ALSA PCM, `file:PATH.wav`, or null for no audio output."""

    device: str | None = "default"
    rate: Annotated[int, Field(ge=8000, le=192000)] = 24000
    volume: Annotated[int, Field(ge=0, le=100)] = 100


class ProcessingConfig(_Section):
    """Microphone conditioning by WebRTC's audio processing module (harkd.audio.echo)."""

    echo_cancellation: bool = False
    """AEC3 against what the speaker really played (needs an ALSA output)."""
    noise_suppression: Literal[False, "low", "moderate", "high", "very_high"] = False
    auto_gain: bool = False
    delay_ms: Annotated[int, Field(ge=0, le=500)] | None = None
    """Speaker-to-microphone delay hint for the canceller; None: estimated."""

    @property
    def active(self) -> bool:
        """Whether any conditioning stage is asked for."""
        return bool(self.echo_cancellation or self.noise_suppression or self.auto_gain)


class AudioConfig(_Section):
    """Audio edge: devices, barge-in policy."""

    input: AudioInputConfig = AudioInputConfig()
    output: AudioOutputConfig = AudioOutputConfig()
    barge_in: bool = False
    echo_tail_ms: Annotated[int, Field(ge=0, le=5000)] = 300
    processing: ProcessingConfig = ProcessingConfig()


class VadConfig(_Section):
    """Local voice activity detection, used in manual turn mode."""

    aggressiveness: Annotated[int, Field(ge=0, le=3)] = 2
    start_ms: Annotated[int, Field(ge=10, le=2000)] = 90
    end_silence_ms: Annotated[int, Field(ge=100, le=10000)] = 700
    preroll_ms: Annotated[int, Field(ge=0, le=2000)] = 300
    max_turn_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    min_level: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


BUILTIN_WAKE_WORDS = ("okay_nabu", "hey_jarvis", "alexa", "hey_mycroft")
"""The microWakeWord models that ship inside pymicro-wakeword."""


class WakeWordConfig(_Section):
    """One wake word: a built-in model's name or a model `.json` path, with its own
    threshold and refractory time (null: the `wake:` section's)."""

    model: str
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    refractory_s: Annotated[float, Field(ge=0.0, le=60.0)] | None = None

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str) -> str:
        if model in BUILTIN_WAKE_WORDS or model.endswith(".json"):
            return model
        raise ValueError(
            f"unknown wake word {model!r} (built in: {', '.join(BUILTIN_WAKE_WORDS)}; "
            "or the path of a microWakeWord model .json)"
        )


class WakeConfig(_Section):
    """On-device wake word: audio leaves the device only after one (or cmd/listen)."""

    enabled: bool = False
    words: Annotated[list[WakeWordConfig], Field(min_length=1)] = [
        WakeWordConfig(model="okay_nabu")
    ]
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    refractory_s: Annotated[float, Field(ge=0.0, le=60.0)] = 2.0
    timeout_s: Annotated[float, Field(gt=0.0, le=60.0)] = 5.0
    follow_up_s: Annotated[float, Field(ge=0.0, le=60.0)] = 0.0
    interrupt: bool = True
    sound: Annotated[str, Field(pattern=r"^(chime|file:.+)$")] | None = "chime"
    arbitration: bool = True
    level_offset_db: Annotated[float, Field(ge=-40.0, le=40.0)] = 0.0
    """Beyond DESIGN.md: evens out microphones of different sensitivity, so that
    arbitration compares nearness, not hardware (added to the measured level)."""

    @field_validator("words", mode="before")
    @classmethod
    def _word_names(cls, value: Any) -> Any:
        # `words: [okay_nabu]` is the short form of `words: [{model: okay_nabu}]`.
        if isinstance(value, list):
            return [{"model": v} if isinstance(v, str) else v for v in value]
        return value


class TlsFiles(_Section):
    """TLS with explicit CA and client certificate files."""

    ca_certs: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None


class MqttConfig(_Section):
    """MQTT bridge and Home Assistant discovery."""

    enabled: bool = True
    host: str = "localhost"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    tls: bool | TlsFiles = False
    base_topic: Annotated[str, Field(min_length=1, pattern=r"^[^#+]+$")] = "harkd"
    discovery_prefix: str | None = "homeassistant"
    publish_levels: bool = False


class JournalConfig(_Section):
    """Transcript journal rotation."""

    max_bytes: Annotated[int, Field(ge=1000)] = 10_000_000
    keep: Annotated[int, Field(ge=0, le=100)] = 5


def _default_plugins() -> dict[str, dict[str, Any]]:
    return {"clock": {}, "timers": {}}


class Config(_Section):
    """The whole daemon configuration."""

    device: DeviceConfig = DeviceConfig()
    realtime: RealtimeConfig = RealtimeConfig()
    audio: AudioConfig = AudioConfig()
    vad: VadConfig = VadConfig()
    wake: WakeConfig = WakeConfig()
    mqtt: MqttConfig = MqttConfig()
    plugins: dict[str, dict[str, Any]] = Field(default_factory=_default_plugins)
    state_dir: Path = Path("/var/lib/harkd")
    journal: JournalConfig = JournalConfig()
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("plugins", mode="before")
    @classmethod
    def _plugin_options(cls, value: Any) -> Any:
        # `clock:` with nothing after it means "enabled, no options".
        if isinstance(value, Mapping):
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        r = self.realtime
        if r.api_key is not None and r.api_key_file is not None:
            raise ValueError("realtime: give api_key or api_key_file, not both")
        if self.mqtt.password is not None and self.mqtt.password_file is not None:
            raise ValueError("mqtt: give password or password_file, not both")
        if r.reconnect.initial_delay_s > r.reconnect.max_delay_s:
            raise ValueError("realtime.reconnect.initial_delay_s: must not exceed max_delay_s")
        provider = find_provider(r.provider)
        if r.voice is None:
            raise ValueError(f"realtime.voice: required for provider {r.provider} (no default)")
        if r.ephemeral_tokens is not False and provider.mint_tokens is None:
            raise ValueError(
                f"realtime.ephemeral_tokens: provider {r.provider} has no ephemeral tokens"
            )
        if r.turn_detection not in provider.turn_detection:
            supported = ", ".join(sorted(provider.turn_detection))
            raise ValueError(
                f"realtime.turn_detection: {r.turn_detection} is not supported by provider "
                f"{r.provider} (supported: {supported})"
            )
        limit_s = provider.session_limit_s
        if limit_s is not None and r.rollover_s >= limit_s:
            raise ValueError(
                f"realtime.rollover_s: must be below the {limit_s:g} s session limit of "
                f"provider {r.provider}"
            )
        if provider.check is not None:
            provider.check(r)
        _check_echo_reference(self.audio)
        return self

    def api_key(self) -> str | None:
        """The provider key, from `api_key` or the file `api_key_file` names."""
        return _secret(self.realtime.api_key, self.realtime.api_key_file)

    def mqtt_password(self) -> str | None:
        """The MQTT password, from `password` or the file `password_file` names."""
        return _secret(self.mqtt.password, self.mqtt.password_file)

    def redacted(self) -> dict[str, Any]:
        """The resolved configuration as plain data, secrets replaced by `***`."""
        data = self.model_dump(mode="json")
        for section, key in (("realtime", "api_key"), ("mqtt", "password")):
            if data[section][key] is not None:
                data[section][key] = "***"
        data["plugins"] = _redact_options(data["plugins"])
        return data


def _check_echo_reference(audio: AudioConfig) -> None:
    """The canceller needs a speaker that reports what it played: an ALSA device."""
    device = audio.output.device
    if audio.processing.echo_cancellation and (device is None or device.startswith("file:")):
        what = "null (no speaker)" if device is None else f"{device!r} (a file, not a speaker)"
        raise ValueError(
            "audio.processing.echo_cancellation: needs an ALSA output device, which reports "
            f"what it really played; audio.output.device is {what}"
        )


PLUGIN_SECRET_KEYS = frozenset({"token", "password", "api_key"})
"""Plugin option keys whose values `Config.redacted` hides, at any depth (e.g. the `mcp`
plugin's `servers.NAME.token`)."""


def _redact_options(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: "***" if k in PLUGIN_SECRET_KEYS and v is not None else _redact_options(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact_options(v) for v in value]
    return value


def _secret(value: SecretStr | None, path: Path | None) -> str | None:
    if value is not None:
        return value.get_secret_value()
    if path is not None:
        return path.read_text(encoding="utf-8").strip()
    return None


def find_config(explicit: str | os.PathLike[str] | None) -> Path | None:
    """`-c` wins, then `$HARKD_CONFIG`, then ./config.yaml, then /etc/harkd/config.yaml."""
    if explicit:
        return Path(explicit)
    if env := os.environ.get("HARKD_CONFIG"):
        return Path(env)
    return next((p for p in SEARCH_PATHS if p.exists()), None)


def load_config(
    path: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None = None,
    *,
    sections: Collection[str] | None = None,
) -> Config:
    """Read, interpolate and validate a config file; `None` gives the defaults.

    `sections` limits the work to those top-level keys (the rest keep their defaults
    and are not checked): `harkd monitor` needs `mqtt`, not the provider's key.
    """
    environ = os.environ if env is None else env
    if path is None:
        return parse_config({}, "<defaults>", environ, sections=sections)
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror or exc}"]) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from exc
    return parse_config({} if raw is None else raw, source, environ, sections=sections)


def parse_config(
    raw: Any,
    source: str,
    env: Mapping[str, str] | None = None,
    *,
    sections: Collection[str] | None = None,
) -> Config:
    """Validate already-parsed YAML data (a mapping), or only its `sections`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(source, [f"expected a mapping at the top level, got {_kind(raw)}"])
    if sections is not None:
        raw = {key: value for key, value in raw.items() if key in sections}
    problems: list[str] = []
    fallbacks: set[str] = set()
    data = _interpolate(raw, (), os.environ if env is None else env, problems, fallbacks)
    if problems:
        raise ConfigError(source, problems)
    if fallbacks:
        log.warning(
            "CREDENTIALS_DIRECTORY is not set (not running under systemd): "
            "reading credentials from %s, as harkd.service does",
            CREDENTIALS_FALLBACK,
        )
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _describe_all(exc)) from None
    problems = _check_state(config, sections)
    if problems:
        raise ConfigError(source, problems)
    return _with_state_dir(config, os.environ if env is None else env)


def _interpolate(
    value: Any,
    path: tuple[str, ...],
    env: Mapping[str, str],
    problems: list[str],
    fallbacks: set[str],
) -> Any:
    """Replace `${NAME}` in every string; unset names go to `problems`.

    An unset CREDENTIALS_DIRECTORY becomes CREDENTIALS_FALLBACK and is added to
    `fallbacks`, so the caller can say so once.
    """
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in env:
                return env[name]
            if name == "CREDENTIALS_DIRECTORY":
                fallbacks.add(name)
                return str(CREDENTIALS_FALLBACK)
            problems.append(f"{_dotted(path)}: environment variable {name} is not set")
            return ""

        return _ENV_REF.sub(sub, value)
    if isinstance(value, Mapping):
        return {
            k: _interpolate(v, (*path, str(k)), env, problems, fallbacks) for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            _interpolate(v, (*path, str(i)), env, problems, fallbacks) for i, v in enumerate(value)
        ]
    return value


def _check_state(config: Config, sections: Collection[str] | None = None) -> list[str]:
    """Checks that need the file system: credentials exist and are readable.

    Sections left out of `sections` hold defaults: only the key requirement differs.
    """
    problems: list[str] = []
    files = (
        ("realtime.api_key_file", config.realtime.api_key_file),
        ("mqtt.password_file", config.mqtt.password_file),
    )
    for key, path in files:
        if path is not None:
            try:
                if not path.read_text(encoding="utf-8").strip():
                    problems.append(f"{key}: file {path} is empty")
            except OSError as exc:
                problems.append(f"{key}: cannot read {path}: {exc.strerror or exc}")
    for index, word in enumerate(config.wake.words):
        problem = _wake_model_problem(word.model) if config.wake.enabled else None
        if problem:
            problems.append(f"wake.words.{index}.model: {problem}")
    sound = config.wake.sound
    if config.wake.enabled and sound is not None and sound.startswith("file:"):
        path = Path(sound.removeprefix("file:"))
        if not os.access(path, os.R_OK):
            problems.append(f"wake.sound: cannot read {path}")
    tls = config.mqtt.tls
    if isinstance(tls, TlsFiles):
        # ssl reads these when the bridge connects; a bad path found then would be a
        # restart loop with a traceback instead of a config error naming the key.
        for name in ("ca_certs", "certfile", "keyfile"):
            path = getattr(tls, name)
            if path is not None and not os.access(path, os.R_OK):
                problems.append(f"mqtt.tls.{name}: cannot read {path}")
    realtime = config.realtime
    missing_key = realtime.api_key is None and realtime.api_key_file is None
    wants_key = sections is None or "realtime" in sections
    provider = find_provider(realtime.provider)
    if wants_key and missing_key and provider.needs_api_key:
        variable = provider.key_variable or f"{realtime.provider.upper()}_API_KEY"
        problems.append(
            f"realtime.api_key: required for provider {realtime.provider} "
            f"(set api_key, e.g. ${{{variable}}}, or api_key_file)"
        )
    return problems


def _wake_model_problem(model: str) -> str | None:
    """Why a custom wake word model cannot load (its .json or the .tflite it names)."""
    if model in BUILTIN_WAKE_WORDS:
        return None
    path = Path(model)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    except ValueError as exc:
        return f"{path} is not JSON: {exc}"
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), str):
        return f'{path} is not a microWakeWord model description (no "model" file name)'
    micro = spec.get("micro")
    if not isinstance(micro, dict) or "probability_cutoff" not in micro:
        return f'{path} is not a microWakeWord model description (no "micro" settings)'
    tflite = path.parent / spec["model"]
    if not os.access(tflite, os.R_OK):
        return f"cannot read the model {tflite} that {path.name} names"
    return None


def _with_state_dir(config: Config, env: Mapping[str, str]) -> Config:
    # Under systemd, StateDirectory= is the truth.
    state = env.get("STATE_DIRECTORY")
    if state:
        return config.model_copy(update={"state_dir": Path(state.split(":")[0])})
    return config


def _dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path) or "<top>"


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{value!r}".lower()
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "path_type": "a file path",
}


def _describe_all(exc: ValidationError) -> list[str]:
    """Every error once; for a union (`tls: bool | {...}`) only the deepest complaint."""
    errors = exc.errors()
    locs = [tuple(p for p in e["loc"] if not _is_union_tag(p)) for e in errors]
    kept = [
        _describe(e)
        for e, loc in zip(errors, locs, strict=True)
        if not any(len(other) > len(loc) and other[: len(loc)] == loc for other in locs)
    ]
    return list(dict.fromkeys(kept))


def _describe(error: Mapping[str, Any]) -> str:
    """One pydantic error as `a.b.c: expected X, got Y`."""
    loc = tuple(p for p in error["loc"] if not _is_union_tag(p))
    where = _dotted(loc)
    kind = error["type"]
    got = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        return f"{where}: unknown key"
    if kind == "missing":
        return f"{where}: required"
    if kind in _EXPECTED:
        return f"{where}: expected {_EXPECTED[kind]}, got {_kind(got)}"
    if kind == "literal_error":
        return f"{where}: expected one of {ctx.get('expected')}, got {_kind(got)}"
    bounds = {
        "greater_than": ("greater than", "gt"),
        "greater_than_equal": ("at least", "ge"),
        "less_than": ("less than", "lt"),
        "less_than_equal": ("at most", "le"),
    }
    if kind in bounds:
        word, key = bounds[kind]
        return f"{where}: must be {word} {ctx.get(key)}, got {_kind(got)}"
    if kind == "string_pattern_mismatch":
        return f"{where}: must match {ctx.get('pattern')}, got {_kind(got)}"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if message.startswith(("realtime", "mqtt", "audio")) and where == "<top>":
        return message
    return f"{where}: {message}"


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the union member's name in the location (`tls.bool`, `tls.TlsFiles`).
    tags = {"bool", "TlsFiles", "str", "constrained-str", "none"}
    return isinstance(part, str) and (part in tags or "[" in part)
