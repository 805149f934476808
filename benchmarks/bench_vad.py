"""CPU cost and closing latency of the local VAD endpointer (harkd.audio.vad).

Feeds 60 s of 16 kHz audio (espeak-ng speech between silences, over faint pink
noise) frame by frame through `Endpointer.process` and reports, as JSON on stdout:

- cpu_percent_of_core: process CPU time / audio time * 100, median over repeats,
  for the default config (min_level 0) and with an energy floor (min_level 0.005);
- the end-of-speech -> TurnClosed latency in frames (and ms), per utterance, which
  is end_silence_ms (webrtcvad's hangover inside a turn counts as silence).

Run: .venv/bin/python benchmarks/bench_vad.py [--seconds 60] [--repeats 7]
Needs espeak-ng and sox (the Makefile installs them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harkd.audio.vad import Endpointer, TurnClosed, TurnOpened  # noqa: E402
from harkd.config import VadConfig  # noqa: E402
from speech_fixtures import frames, len_ms, mix, noise, silence, speech_pcm  # noqa: E402

RATE = 16000
FRAME_MS = 20
PHRASES = (
    "what time is it now",
    "turn on the kitchen lights",
    "set a timer for ten minutes",
    "how is the weather tomorrow morning",
)
GAPS_MS = (1500, 2200, 1800, 2600)
ROOM_LEVEL = 0.001
"""Pink noise under everything, -60 dBFS: a quiet room, not digital silence."""


def build_audio(seconds: float) -> tuple[bytes, list[tuple[float, float]]]:
    """Speech and silence alternating for `seconds`; returns the PCM and speech spans (ms)."""
    pcm, spans, i = silence(1000), [], 0
    while len_ms(pcm) < seconds * 1000 - 5000:
        speech = speech_pcm(PHRASES[i % len(PHRASES)])
        start = len_ms(pcm)
        spans.append((start, start + len_ms(speech)))
        pcm += speech + silence(GAPS_MS[i % len(GAPS_MS)])
        i += 1
    pcm += silence(round(seconds * 1000 - len_ms(pcm)))
    return mix(pcm, noise(round(len_ms(pcm)), ROOM_LEVEL, RATE, kind="pink")), spans


def cpu_percent(config: VadConfig, chunks: list[bytes], audio_s: float, repeats: int) -> float:
    """Median CPU time of one pass of `process` over all frames, as % of `audio_s`."""
    samples = []
    for _ in range(repeats):
        endpointer = Endpointer(config, FRAME_MS)
        process = endpointer.process
        started = time.process_time()
        for chunk in chunks:
            process(chunk, chunk)
        samples.append(time.process_time() - started)
    return statistics.median(samples) / audio_s * 100


def latencies(
    config: VadConfig, chunks: list[bytes], spans: list[tuple[float, float]]
) -> dict[str, Any]:
    """Frames from the end of each utterance to its TurnClosed (and start to TurnOpened)."""
    endpointer = Endpointer(config, FRAME_MS)
    opened: list[int] = []
    closed: list[int] = []
    for index, chunk in enumerate(chunks):
        for event in endpointer.process(chunk, chunk):
            if isinstance(event, TurnOpened):
                opened.append(index)
            elif isinstance(event, TurnClosed):
                closed.append(index)
    if len(opened) != len(spans) or len(closed) != len(spans):
        raise RuntimeError(
            f"{len(spans)} utterances but {len(opened)} opened, {len(closed)} closed"
        )
    # Frame i covers [i * FRAME_MS, (i + 1) * FRAME_MS): count from the frame holding the end.
    close = [c - int(end // FRAME_MS) for c, (_, end) in zip(closed, spans, strict=True)]
    open_ = [o - int(start // FRAME_MS) for o, (start, _) in zip(opened, spans, strict=True)]
    return {
        "close_latency_frames": {
            "median": statistics.median(close),
            "min": min(close),
            "max": max(close),
        },
        "close_latency_ms_median": statistics.median(close) * FRAME_MS,
        "open_latency_frames_median": statistics.median(open_),
    }


def run(seconds: float = 60.0, repeats: int = 7) -> dict[str, Any]:
    """All measurements, as a JSON-able dict."""
    pcm, spans = build_audio(seconds)
    chunks = frames(pcm, RATE, FRAME_MS)
    audio_s = len(chunks) * FRAME_MS / 1000
    configs = {"default": VadConfig(), "min_level_0.005": VadConfig(min_level=0.005)}
    result: dict[str, Any] = {
        "benchmark": "vad_endpointer",
        "audio_s": audio_s,
        "frame_ms": FRAME_MS,
        "utterances": len(spans),
        "repeats": repeats,
        "end_silence_ms": VadConfig().end_silence_ms,
        "start_ms": VadConfig().start_ms,
    }
    for name, config in configs.items():
        percent = cpu_percent(config, chunks, audio_s, repeats)
        result[name] = {
            "cpu_percent_of_core": round(percent, 4),
            "us_per_frame": round(percent / 100 * FRAME_MS * 1000, 2),
            **latencies(config, chunks, spans),
        }
    result["cpu_percent_of_core"] = max(result[name]["cpu_percent_of_core"] for name in configs)
    result["budget_percent_of_core"] = 0.5
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(json.dumps(run(args.seconds, args.repeats), indent=2))


if __name__ == "__main__":
    main()
