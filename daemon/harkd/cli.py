"""The `harkd` command line. Exit codes: 0 success, 1 runtime failure, 2 bad usage
or bad configuration."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING

from harkd.logsetup import configure_logging, register_secret

if TYPE_CHECKING:
    from harkd.config import Config

# Only what parsing the command line needs is imported up here: `harkd --help` must
# not pay for pydantic, yaml or the client stack (each command imports its own).

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `harkd` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fake-server"]:
        # The fake servers own their options (--provider, --port, --api-key, ...).
        from harkd.testing.fakes import main as fake_main

        return fake_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    command: Callable[[argparse.Namespace], int] = args.run
    from harkd.config import ConfigError

    try:
        return command(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harkd", description="Headless realtime voice daemon for edge hardware."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(
        name: str, run: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        sub.set_defaults(run=run)
        return sub

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "-c",
            "--config",
            help="config file (default: $HARKD_CONFIG, ./config.yaml, /etc/harkd/config.yaml)",
        )
        return sub

    with_config(command("run", _run, "run the daemon in the foreground"))
    with_config(command("check-config", _check_config, "validate and print the resolved config"))
    command("devices", _devices, "list ALSA capture and playback devices")
    with_config(command("plugins", _plugins, "list plugins and the tools they register"))
    monitor = with_config(command("monitor", _monitor, "live view of harkd devices over MQTT"))
    monitor.add_argument("--device", help="one device id (default: every device on the broker)")
    history = with_config(command("history", _history, "print the last conversations"))
    history.add_argument("-n", type=int, default=3, help="how many conversations (default 3)")
    fake = command("fake-server", _fake_server, "run a provider's local fake server")
    fake.add_argument("--provider", default="openai", help="whose protocol (default: openai)")
    demo = command("demo", _demo, "the main job on embedded defaults, no key or hardware needed")
    demo.add_argument("--speaker", help="ALSA PCM or file:PATH.wav for the answer audio")
    demo.add_argument("--state-dir", help="where the demo keeps its journal (default: a temp dir)")
    demo.add_argument("--provider", default="openai", help="whose fake server (default: openai)")
    demo.add_argument(
        "--wake", action="store_true", help="wait for the wake word first (okay nabu)"
    )
    return parser


def _load(
    args: argparse.Namespace, sections: Collection[str] | None = None
) -> tuple[Config, Path | None]:
    from harkd.config import find_config, load_config

    path = find_config(getattr(args, "config", None))
    config = load_config(path, sections=sections)
    for secret in (config.api_key(), config.mqtt_password()):
        if secret:
            register_secret(secret)
    return config, path


def _check_config(args: argparse.Namespace) -> int:
    configure_logging("warning")
    config, path = _load(args)
    print(f"# {path or 'built-in defaults'}: valid")
    import yaml

    print(yaml.safe_dump(config.redacted(), sort_keys=False, allow_unicode=True), end="")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from harkd.service import run_daemon

    faulthandler.enable()  # a watchdog SIGABRT then shows where the loop hung
    configure_logging("info")
    config, path = _load(args)
    configure_logging(config.log_level)
    return asyncio.run(run_daemon(config, path))


def _devices(args: argparse.Namespace) -> int:
    from harkd.audio.alsa import list_devices

    print(list_devices())
    return EXIT_OK


def _plugins(args: argparse.Namespace) -> int:
    from harkd.plugins import describe_plugins

    configure_logging("warning")
    config, _ = _load(args)
    print(describe_plugins(config.plugins))
    return EXIT_OK


def _monitor(args: argparse.Namespace) -> int:
    from harkd.monitor import run_monitor

    configure_logging("warning")
    config, _ = _load(args, sections=("device", "mqtt"))  # it only reads MQTT
    asyncio.run(run_monitor(config.mqtt, config.mqtt_password(), args.device))
    return EXIT_OK


def _history(args: argparse.Namespace) -> int:
    from harkd.journal import TranscriptJournal, format_history

    configure_logging("warning")
    # Only what history reads: it must work without the provider's credentials.
    config, _ = _load(args, sections=("state_dir", "journal"))
    path = config.state_dir / "transcripts.jsonl"
    journal = config.journal
    records = TranscriptJournal(path, journal.max_bytes, journal.keep).read_last(
        max(1, args.n) * 500
    )
    print(format_history(records, args.n) or f"no conversations in {path}")
    return EXIT_OK


def _fake_server(args: argparse.Namespace) -> int:
    raise AssertionError("main() hands fake-server to harkd.testing before parsing")


def _demo(args: argparse.Namespace) -> int:
    from harkd.demo import run_demo

    configure_logging("warning")
    from harkd.adapters.registry import ProviderUnavailable

    try:
        return asyncio.run(
            run_demo(
                speaker=args.speaker,
                state_dir=args.state_dir,
                provider=args.provider,
                wake=args.wake,
            )
        )
    except ProviderUnavailable as exc:
        print(f"harkd demo: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
