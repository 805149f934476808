"""Runs inside the arm64 tree (tests/test_arm64.py copies it in): the wake word engine.

Builds a WakeDetector for the built-in okay_nabu model, as the daemon does, and feeds
it two recordings in 20 ms frames: ``argv[1]`` (no wake word: silence, noise, hum)
and the bundled demo recording that says "okay nabu". Prints one JSON object: the
machine, the ELF machine of the tflite runtime library the model loaded, the
detections of each recording and the CPU time per frame.
"""

from __future__ import annotations

import json
import platform
import sys
import time
import wave
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

from harkd.audio.base import VAD_RATE, AudioFrame
from harkd.audio.wakeword import WakeDetector, models_dir
from harkd.config import WakeConfig

FRAME_BYTES = VAD_RATE // 50 * 2
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}


def read_pcm(path: Path) -> bytes:
    """The PCM16 mono 16 kHz samples of a WAV file."""
    with wave.open(str(path), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels()) == (VAD_RATE, 1), path
        return wav.readframes(wav.getnframes())


def listen(pcm: bytes) -> dict[str, Any]:
    """Feed ``pcm`` to a fresh detector; its detections and CPU ms per 20 ms frame."""
    detector = WakeDetector(WakeConfig(enabled=True))
    frames = [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]
    began = time.process_time()
    found = []
    for index, chunk in enumerate(frames):
        detector.process(AudioFrame(chunk, VAD_RATE, index * 0.02))
        found += [(d.word, d.score) for d in detector.take()]
    cpu_ms = (time.process_time() - began) * 1000 / max(1, len(frames))
    return {"seconds": len(pcm) / 2 / VAD_RATE, "detections": found, "cpu_ms_per_frame": cpu_ms}


def elf_machine(path: Path) -> str:
    """The architecture an ELF shared library was built for (e_machine)."""
    header = path.read_bytes()[:20]
    code = int.from_bytes(header[18:20], "little")
    return ELF_MACHINES.get(code, str(code))


def main() -> None:
    """Print the JSON report described in the module docstring."""
    library = next((models_dir().parent / "lib").glob("libtensorflowlite_c*"))
    with as_file(files("harkd") / "data" / "demo_wake.wav") as wake_wav:
        wake = listen(read_pcm(wake_wav))
    report = {
        "machine": platform.machine(),
        "tflite_library": library.name,
        "tflite_elf_machine": elf_machine(library),
        "no_wake_word": listen(read_pcm(Path(sys.argv[1]))),
        "okay_nabu": wake,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
