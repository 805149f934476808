"""Streaming PCM16 mono resampling that keeps its filter state across chunks.

Audio arrives in small chunks (20 ms capture periods, provider deltas). Resampling
each chunk on its own restarts the filter at every join and clicks; `StreamResampler`
keeps one libsoxr stream per audio stream, so that chunked output equals one-shot
output. soxr holds back a little audio (its filter's look-ahead), which `flush`
returns at the end of a stream. That look-ahead is latency on a live path, hence
the default "LQ": 1-8 ms of look-ahead against 20-33 ms for "HQ", still -57 dB of
aliasing and 16-bit precision (ample for speech; see benchmarks/bench_resample.py).
"QQ" (cubic) has no look-ahead but no anti-alias filter: not for downsampling.

libsoxr is called through ctypes, int16 in and int16 out, on the chunk's own bytes.
The library is the one python-soxr's wheel carries (its extension exports soxr's C
API), or the system's libsoxr.so.0. python-soxr's Python layer is not imported: it
needs numpy for its array type only, and numpy is ~18 MB of resident memory that
the default path (capture at 16 kHz, provider at 24 kHz, nothing else) never needs.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
from functools import cache
from pathlib import Path
from typing import Literal

Quality = Literal["QQ", "LQ", "MQ", "HQ", "VHQ"]

_RECIPES: dict[str, int] = {"QQ": 0, "LQ": 1, "MQ": 2, "HQ": 4, "VHQ": 6}
"""soxr.h's quality recipes (SOXR_QQ ... SOXR_VHQ)."""
_INT16_I = 3
"""soxr.h's SOXR_INT16_I: interleaved 16-bit integers."""
_NO_DITHER = 8
"""soxr.h's SOXR_NO_DITHER: int16 output is rounded, not dithered (deterministic)."""
_SLACK = 64
"""Output samples allowed beyond the rate ratio, for soxr's rounding of a chunk."""


class _IoSpec(ctypes.Structure):
    _fields_ = [
        ("itype", ctypes.c_int),
        ("otype", ctypes.c_int),
        ("scale", ctypes.c_double),
        ("e", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
    ]


class _QualitySpec(ctypes.Structure):
    _fields_ = [
        ("precision", ctypes.c_double),
        ("phase_response", ctypes.c_double),
        ("passband_end", ctypes.c_double),
        ("stopband_begin", ctypes.c_double),
        ("e", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
    ]


_SIZE_P = ctypes.POINTER(ctypes.c_size_t)


def _candidates() -> list[str]:
    """Where libsoxr may be: python-soxr's extension (found without importing it),
    then the system library."""
    paths: list[str] = []
    spec = importlib.util.find_spec("soxr")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            paths += [str(p) for p in sorted(Path(folder).glob(f"soxr_ext{suffix}"))]
    return [*paths, "libsoxr.so.0"]


@cache
def _soxr() -> ctypes.CDLL:
    """libsoxr, with the signatures of the functions used here."""
    tried: list[str] = []
    for candidate in _candidates():
        try:
            lib = ctypes.CDLL(candidate)
        except OSError as exc:
            tried.append(f"{candidate}: {exc}")
            continue
        if hasattr(lib, "soxr_create") and hasattr(lib, "soxr_process"):
            break
        tried.append(f"{candidate}: no soxr_create")
    else:
        raise RuntimeError("libsoxr not found (install python-soxr): " + "; ".join(tried))
    lib.soxr_io_spec.restype = _IoSpec
    lib.soxr_io_spec.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.soxr_quality_spec.restype = _QualitySpec
    lib.soxr_quality_spec.argtypes = [ctypes.c_ulong, ctypes.c_ulong]
    lib.soxr_create.restype = ctypes.c_void_p
    lib.soxr_create.argtypes = [
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_uint,
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.POINTER(_IoSpec),
        ctypes.POINTER(_QualitySpec),
        ctypes.c_void_p,
    ]
    lib.soxr_process.restype = ctypes.c_char_p
    lib.soxr_process.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
        _SIZE_P,
        ctypes.c_void_p,
        ctypes.c_size_t,
        _SIZE_P,
    ]
    lib.soxr_delete.restype = None
    lib.soxr_delete.argtypes = [ctypes.c_void_p]
    return lib


class _SoxrStream:
    """One libsoxr resampler: int16 mono in, int16 mono out."""

    def __init__(self, in_rate: int, out_rate: int, quality: Quality) -> None:
        self._lib = _soxr()
        self._ratio = out_rate / in_rate
        io = self._lib.soxr_io_spec(_INT16_I, _INT16_I)
        io.flags |= _NO_DITHER
        q = self._lib.soxr_quality_spec(_RECIPES[quality], 0)
        error = ctypes.c_char_p()
        handle = self._lib.soxr_create(
            float(in_rate), float(out_rate), 1, ctypes.byref(error), io, q, None
        )
        if not handle or error.value:
            reason = (error.value or b"unknown error").decode(errors="replace")
            raise RuntimeError(f"soxr cannot resample {in_rate} -> {out_rate} Hz: {reason}")
        self._handle: int | None = handle
        self._done_in = ctypes.c_size_t()
        self._done_out = ctypes.c_size_t()

    def process(self, pcm: bytes) -> bytes:
        """Resample whole samples; soxr keeps its look-ahead for the next call."""
        count = len(pcm) // 2
        return self._run(pcm, count, int(count * self._ratio) + _SLACK)

    def finish(self) -> bytes:
        """Signal the end of input and return everything soxr still holds."""
        parts: list[bytes] = []
        while part := self._run(None, 0, 4096):
            parts.append(part)
        return b"".join(parts)

    def close(self) -> None:
        if self._handle is not None:
            self._lib.soxr_delete(self._handle)
            self._handle = None

    def __del__(self) -> None:
        self.close()

    def _run(self, pcm: bytes | None, count: int, room: int) -> bytes:
        out = ctypes.create_string_buffer(room * 2)
        error = self._lib.soxr_process(
            self._handle,
            pcm,
            count,
            ctypes.byref(self._done_in),
            out,
            room,
            ctypes.byref(self._done_out),
        )
        if error:
            raise RuntimeError(f"soxr failed: {error.decode(errors='replace')}")
        if pcm is not None and self._done_in.value != count:
            # The output room is sized for the whole chunk; soxr taking less is a bug here.
            raise RuntimeError(f"soxr consumed {self._done_in.value} of {count} samples")
        return out.raw[: self._done_out.value * 2]


class StreamResampler:
    """Resample a stream of PCM16 little-endian mono chunks from `in_rate` to `out_rate`.

    Not thread-safe: one stream, one owner. Equal rates pass audio through untouched.
    """

    def __init__(self, in_rate: int, out_rate: int, quality: Quality = "LQ") -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.quality: Quality = quality
        self._stream: _SoxrStream | None = None
        # An odd trailing byte waits for its partner (chunks need not be sample aligned).
        self._odd = b""

    @property
    def passthrough(self) -> bool:
        """True when input and output rates are equal (no resampling at all)."""
        return self.in_rate == self.out_rate

    def process(self, pcm: bytes) -> bytes:
        """Resample one chunk; the output may lag the input by the filter's look-ahead."""
        if self._odd:
            pcm = self._odd + pcm
            self._odd = b""
        if len(pcm) % 2:
            self._odd = pcm[-1:]
            pcm = pcm[:-1]
        if self.passthrough or not pcm:
            return pcm
        if self._stream is None:
            self._stream = _SoxrStream(self.in_rate, self.out_rate, self.quality)
        return self._stream.process(pcm)

    def flush(self) -> bytes:
        """End the stream: return the audio still held by the filter, then start afresh."""
        self._odd = b""
        stream, self._stream = self._stream, None
        if stream is None:
            return b""
        tail = stream.finish()
        stream.close()
        return tail

    def reset(self) -> None:
        """Forget the stream (held audio included), e.g. after a barge-in."""
        self._odd = b""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
