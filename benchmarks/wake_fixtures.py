"""Generated audio for the wake word benchmark (benchmarks/bench_wake.py).

* `detection_clips`: "okay nabu" (alone, and run into a question) said by several
  espeak-ng voices at several speeds, in a silent room and over pink noise at two
  signal-to-noise ratios;
* `newsreader`: continuous speech without the wake word;
* `tv_programme`: at least `minutes` of audio without the wake word, like a television
  or a radio in the room: newsreaders, dialogues full of "okay", adverts read fast over
  music, chatter over a crowd, and music alone (tones with a melody, chords and drums).

Everything is PCM16 mono at 16 kHz, generated here (espeak-ng through
tests/speech_fixtures.py, numpy for music and noise) and seeded, hence the same on
every run; speech is cached in a temporary directory for the process.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from speech_fixtures import len_ms, level, mix, noise, scale, silence, speech_pcm

RATE = 16_000
WAKE_PHRASES = ("okay nabu", "okay nabu, what time is it")
VOICES = ("en-us", "en-gb", "en-gb-x-rp", "en-029", "en-us+m3", "en-us+f2", "en-gb+f3")
"""Two accents, two more, a deeper male variant and two female variants (espeak-ng)."""
SPEEDS = (130, 160, 190)
"""Words per minute: slow, normal and hurried."""
SNRS_DB: tuple[float | None, ...] = (None, 20.0, 10.0)
"""A silent room, then pink noise 20 dB and 10 dB below the speech."""

TV_VOICES = (*VOICES, "en-gb-scotland", "en-us+m1", "en-us+f3", "en-gb-x-gbclan", "en-us-nyc")


@dataclass(frozen=True)
class Clip:
    """One detection fixture: the wake word between `start_s` and `end_s` of `pcm`."""

    name: str
    voice: str
    speed: int
    snr_db: float | None
    phrase: str
    pcm: bytes
    start_s: float
    end_s: float


def detection_clips(lead_ms: int = 500, tail_ms: int = 1500) -> list[Clip]:
    """Every voice x speed x noise level x phrase, each clip with silence around it."""
    clips = []
    for p, phrase in enumerate(WAKE_PHRASES):
        for v, voice in enumerate(VOICES):
            for s, speed in enumerate(SPEEDS):
                said = speech_pcm(phrase, voice=voice, speed=speed)
                clip = silence(lead_ms) + said + silence(tail_ms)
                for n, snr in enumerate(SNRS_DB):
                    pcm = clip
                    if snr is not None:
                        seed = ((p * 10 + v) * 10 + s) * 10 + n
                        rms = level(said) / 10 ** (snr / 20)
                        pcm = mix(clip, noise(len_ms(clip), rms, kind="pink", seed=seed))
                    quiet = "quiet" if snr is None else f"snr{snr:g}"
                    clips.append(
                        Clip(
                            f"{p}-{voice}-{speed}-{quiet}",
                            voice,
                            speed,
                            snr,
                            phrase,
                            pcm,
                            lead_ms / 1000,
                            (lead_ms + len_ms(said)) / 1000,
                        )
                    )
    return clips


# --------------------------------------------------------------------------- television

_SUBJECTS = (
    "the prime minister",
    "a spokesman for the council",
    "our reporter",
    "the home team",
    "the chef",
    "my neighbour",
    "the weather service",
    "the company",
    "the old captain",
    "a local farmer",
    "the committee",
    "nobody on the panel",
    "the navy",
    "the new manager",
    "the orchestra",
    "a man from Nairobi",
    "the children",
    "the museum",
    "your bank",
)
_VERBS = (
    "announced",
    "said that",
    "will decide whether",
    "cannot confirm that",
    "believes",
    "warned that",
    "has promised",
    "is asking whether",
    "reported that",
    "explained why",
)
_CLAUSES = (
    "the bridge will reopen on Monday",
    "prices rose again in the spring",
    "the match ended in a draw after extra time",
    "heavy rain is expected in the north",
    "the recipe needs two cups of flour and a pinch of salt",
    "the train was late again",
    "a new library opens next to the station",
    "the budget is about nine million",
    "the parade will go ahead as planned",
    "the old mill is finally for sale",
    "tickets are available from nine o'clock",
    "the storm moved out to sea overnight",
    "the river is higher than it has been in years",
    "the results come out on Thursday",
    "you can save up to forty percent today only",
    "the novel was written by Nabokov",
    "the band plays in the park this weekend",
    "the new bus route starts in April",
    "the garden needs water every other day",
    "nobody knows about the plan yet",
)
_DIALOGUE = (
    "Okay, so where were we?",
    "Okay. Now about that car.",
    "Are you okay?",
    "Okay, okay, I hear you.",
    "No, but you said the neighbour would call.",
    "Okay everyone, settle down please.",
    "It is not about the money, okay?",
    "Okay, let me ask you something.",
    "Can you pass the bread?",
    "Oh, come on.",
    "I told you a hundred times.",
    "Okay then, go ahead.",
    "What about tomorrow?",
    "That sounds okay to me.",
    "Okay, now what?",
    "Is everybody ready?",
    "Right, what time is it?",
    "Turn it down a bit, would you?",
    "Okay, nah, never mind.",
)
_ADVERTS = (
    "Hurry in now, everything must go, prices slashed across the store!",
    "Call now and get a second one absolutely free, terms and conditions apply.",
    "New and improved, now with twice the cleaning power.",
    "Visit us online or in store today, open seven days a week.",
    "Okay, you heard it here first: the biggest sale of the year!",
)


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_CLAUSES)}."


def newsreader(seconds: float, voice: str = "en-gb", seed: int = 19) -> bytes:
    """One voice reading news without pause for breath, at least `seconds` long."""
    rng = random.Random(seed)
    parts, total_ms = [], 0.0
    while total_ms < seconds * 1000:
        parts += [speech_pcm(_sentence(rng), voice=voice), silence(250)]
        total_ms += len_ms(parts[-2]) + 250
    return b"".join(parts)


def music(ms: float, rms: float, rng: random.Random) -> bytes:
    """Music-like audio: a melody of decaying harmonic notes over chords and drums."""
    n = round(ms * RATE / 1000)
    out = np.zeros(n)
    beat = 60 / rng.uniform(80, 140)
    root = rng.choice((196.0, 220.0, 246.9, 261.6, 293.7))
    steps = (0, 2, 4, 5, 7, 9, 11, 12)
    at = 0.0
    while at < n / RATE:
        first = round(at * RATE)
        length = round(beat * rng.choice((0.5, 1, 1, 2)) * RATE)
        t = np.arange(min(length, n - first)) / RATE
        note = root * 2 ** (rng.choice(steps) / 12) * rng.choice((1, 2))
        tone = sum(np.sin(2 * np.pi * note * k * t) / k**1.5 for k in range(1, 5))
        chord = sum(np.sin(2 * np.pi * root * 2 ** (i / 12) / 2 * t) for i in (0, 4, 7))
        thump = np.sin(2 * np.pi * 60 * t) * np.exp(-t / 0.05)
        hat = np.random.default_rng(first).uniform(-1, 1, t.size) * np.exp(-t / 0.01)
        out[first : first + t.size] += tone * np.exp(-t / 0.35) + 0.3 * chord + thump + 0.3 * hat
        at += length / RATE
    out *= rms / max(float(np.sqrt(np.mean(out**2))), 1e-9)
    return np.clip(np.round(out * 32768), -32768, 32767).astype("<i2").tobytes()


def _speech(rng: random.Random, text: str, fast: bool = False) -> bytes:
    speed = rng.randint(190, 220) if fast else rng.randint(120, 200)
    return speech_pcm(text, voice=rng.choice(TV_VOICES), speed=speed)


def _segments(rng: random.Random) -> Iterator[tuple[bytes, str]]:
    """(audio, what it is) of programme segments, endlessly, in a seeded shuffle."""
    while True:
        kind = rng.choice(("news", "dialogue", "advert", "chatter", "music"))
        if kind == "news":
            text = " ".join(_sentence(rng) for _ in range(rng.randint(3, 6)))
            yield _speech(rng, text), f"news: {text}"
        elif kind == "dialogue":
            a, b = rng.sample(TV_VOICES, 2)
            for turn in range(rng.randint(4, 8)):
                line = rng.choice(_DIALOGUE)
                voice = a if turn % 2 else b
                yield (
                    speech_pcm(line, voice=voice, speed=rng.randint(140, 200)),
                    f"dialogue: {line}",
                )
                yield silence(rng.randint(150, 600)), "pause"
        elif kind == "advert":
            text = " ".join(rng.sample(_ADVERTS, 2))
            said = _speech(rng, text, fast=True)
            bed = music(len_ms(said) + 1500, level(said) / 4, rng)
            yield mix(silence(700) + said, bed), f"advert over music: {text}"
        elif kind == "chatter":
            lines = [_sentence(rng) + " " + _sentence(rng) for _ in range(2)]
            first = _speech(rng, lines[0])
            second = scale(_speech(rng, lines[1]), 0.6)
            both = mix(first, silence(rng.randint(300, 1500)) + second)
            crowd = noise(len_ms(both), level(first) / 6, kind="pink", seed=rng.randint(0, 9999))
            yield mix(both, crowd), f"chatter over a crowd: {' / '.join(lines)}"
        else:
            yield music(rng.uniform(8000, 20000), rng.uniform(0.03, 0.12), rng), "music"
        yield silence(rng.randint(200, 900)), "pause"


@dataclass(frozen=True)
class Programme:
    """Television-like audio and what is said when."""

    pcm: bytes
    script: list[tuple[float, float, str]]
    """(start s, end s, what) of every segment."""

    def at(self, seconds: float) -> str:
        """What was on at `seconds` (in a pause: what was said just before)."""
        found = "start"
        for start, _, what in self.script:
            if start > seconds:
                break
            if what != "pause":
                found = what
        return found


def tv_programme(minutes: float, seed: int = 14) -> Programme:
    """At least `minutes` of television-like audio without the wake word."""
    rng = random.Random(seed)
    parts, script, total_ms = [], [], 0.0
    for part, what in _segments(rng):
        parts.append(part)
        script.append((total_ms / 1000, (total_ms + len_ms(part)) / 1000, what))
        total_ms += len_ms(part)
        if total_ms >= minutes * 60_000:
            return Programme(b"".join(parts), script)
    raise AssertionError("unreachable: the segments never end")
