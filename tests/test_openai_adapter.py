"""The OpenAI adapter's hand-written append message is the encoded command, exactly."""

from __future__ import annotations

import json
import os

import pytest
from openai.types.realtime import InputAudioBufferAppendEvent

from harkd import events as ev
from harkd.adapters.openai import append_message, encode


@pytest.mark.parametrize("pcm", [b"", b"\x00\x01", os.urandom(960), os.urandom(4801)])
def test_append_message_is_the_encoded_command_and_a_valid_ga_event(pcm: bytes) -> None:
    text = append_message(pcm)
    assert json.loads(text) == encode(ev.AppendAudio(pcm))
    InputAudioBufferAppendEvent.model_validate_json(text, strict=True)
