"""The session core with plain data: every flow of PROTOCOL.md, no I/O."""

from __future__ import annotations

import tracemalloc
from dataclasses import replace

import pytest

from harkd import events as ev
from harkd.adapters.base import AudioFormat
from harkd.messages import (
    AudioPart,
    ImagePart,
    MessageFinalized,
    PartialTranscript,
    RealtimeMode,
    TextPart,
    ToolCallFinished,
    ToolCallPart,
    ToolResultPart,
    UsageReported,
)
from harkd.session import (
    DEFAULT_TRAITS,
    CancelTools,
    Effect,
    Emit,
    PlayAudio,
    RunTools,
    Send,
    Session,
    StopPlayback,
)
from harkd.tools import ToolCall, ToolOutcome

MS = 48  # bytes of 24 kHz PCM16 per millisecond


def sent(effects: list[Effect]) -> list[ev.Command]:
    return [e.command for e in effects if isinstance(e, Send)]


def emitted(effects: list[Effect]) -> list[object]:
    return [e.event for e in effects if isinstance(e, Emit)]


def connected(mode: str = "server", **kwargs: bool) -> Session:
    session = Session(mode, **kwargs)  # type: ignore[arg-type]
    session.connected()
    return session


def answer(
    session: Session, response_id: str, item_id: str, audio_ms: int, text: str
) -> list[Effect]:
    """A complete spoken answer, as the server sends it."""
    effects = session.handle(ev.ResponseCreated(response_id))
    effects += session.handle(ev.OutputItemAdded(response_id, item_id, "message"))
    half = text[: len(text) // 2], text[len(text) // 2 :]
    for piece in half:
        effects += session.handle(ev.AssistantTranscriptDelta(response_id, item_id, piece))
        effects += session.handle(
            ev.AudioDelta(response_id, item_id, b"\x01" * (audio_ms // 2 * MS))
        )
    effects += session.handle(ev.AudioDone(response_id, item_id))
    effects += session.handle(ev.AssistantTranscriptDone(response_id, item_id, text))
    effects += session.handle(ev.ResponseDone(response_id, "completed", usage={"total_tokens": 42}))
    return effects


def test_server_vad_turn_produces_ordered_messages_and_modes() -> None:
    session = connected()
    assert session.mode is RealtimeMode.LISTENING
    session.handle(ev.SpeechStarted("item_u1", 1000))
    assert session.mode is RealtimeMode.LISTENING
    session.handle(ev.SpeechStopped("item_u1", 2500))
    assert session.mode is RealtimeMode.THINKING
    session.handle(ev.InputCommitted("item_u1", None))
    session.handle(ev.ItemAdded("item_u1", "message", "user", has_audio=True))
    session.handle(ev.UserTranscriptDelta("item_u1", "turn on "))
    effects = session.handle(ev.UserTranscriptDelta("item_u1", "the lights"))
    assert session.pending_user_transcript == "turn on the lights"
    assert PartialTranscript("user", "item_u1", "turn on the lights") in emitted(effects)
    effects = session.handle(ev.UserTranscriptDone("item_u1", "turn on the lights"))
    assert session.pending_user_transcript is None
    user = session.messages[0]
    assert user.role == "user" and user.parts == (AudioPart("turn on the lights", 1500),)
    assert MessageFinalized(user) in emitted(effects)

    effects = answer(session, "resp_1", "item_a1", 1000, "Done, lights on.")
    plays = [e for e in effects if isinstance(e, PlayAudio)]
    assert sum(len(p.pcm) for p in plays) == 1000 * MS
    assert session.mode is RealtimeMode.SPEAKING
    usage = [e for e in emitted(effects) if isinstance(e, UsageReported)]
    assert usage[0].usage == {"total_tokens": 42}
    # The answer is final only once it has been heard.
    assert not any(
        isinstance(e, MessageFinalized) and e.message.role == "assistant" for e in emitted(effects)
    )
    effects = session.playback_drained()
    final = [e.message for e in emitted(effects) if isinstance(e, MessageFinalized)]
    assert final[0].parts == (AudioPart("Done, lights on.", 1000),)
    assert not final[0].interrupted
    assert session.mode is RealtimeMode.LISTENING
    assert [m.role for m in session.messages] == ["user", "assistant"]


def test_partial_assistant_transcript_accumulates() -> None:
    session = connected()
    session.handle(ev.ResponseCreated("r"))
    session.handle(ev.OutputItemAdded("r", "a", "message"))
    for piece in ("It ", "is ", "noon."):
        effects = session.handle(ev.AssistantTranscriptDelta("r", "a", piece))
    assert session.pending_assistant_transcript == "It is noon."
    assert emitted(effects) == [PartialTranscript("assistant", "a", "It is noon.")]


def test_late_user_transcript_is_matched_by_item_and_keeps_order() -> None:
    session = connected()
    session.handle(ev.SpeechStarted("item_u1", 0))
    session.handle(ev.SpeechStopped("item_u1", 800))
    session.handle(ev.InputCommitted("item_u1", None))
    session.handle(ev.ItemAdded("item_u1", "message", "user", has_audio=True))
    answer(session, "resp_1", "item_a1", 200, "Hello!")
    session.playback_drained()
    # The transcript arrives after the whole answer.
    session.handle(ev.UserTranscriptDone("item_u1", "hi there"))
    assert [m.id for m in session.messages] == ["item_u1", "item_a1"]
    assert session.messages[0].text == "hi there"


def test_transcript_before_its_item_is_not_lost() -> None:
    session = connected()
    session.handle(ev.UserTranscriptDone("item_u9", "early words"))
    session.handle(ev.ItemAdded("item_u9", "message", "user", has_audio=True))
    assert [m.text for m in session.messages] == ["early words"]


def test_manual_turn_commits_then_asks_for_one_response() -> None:
    session = connected("manual")
    assert session.mode is RealtimeMode.IDLE
    assert not session.append_audio(b"\0" * 20 * MS)  # nothing leaves between turns
    assert sent(session.start_listening()) == [ev.StartTurn()]
    assert session.mode is RealtimeMode.LISTENING
    for _ in range(10):
        assert session.append_audio(b"\0" * 20 * MS)
    assert sent(session.stop_listening()) == [ev.EndTurn(), ev.RequestResponse()]
    assert session.mode is RealtimeMode.THINKING
    session.handle(ev.InputCommitted("item_m1", None))
    assert session.messages[0].duration_ms == 200


def test_manual_turn_under_100_ms_is_cleared_never_committed() -> None:
    session = connected("manual")
    session.start_listening()
    session.append_audio(b"\0" * 80 * MS)
    assert sent(session.stop_listening()) == [ev.DiscardTurn()]
    assert session.mode is RealtimeMode.IDLE


def test_text_turn_is_final_at_once_and_answered() -> None:
    session = connected()
    effects = session.send_text("what time is it?")
    commands = sent(effects)
    assert isinstance(commands[0], ev.CreateMessage) and commands[0].text == "what time is it?"
    assert commands[1:] == [ev.RequestResponse()]
    message = session.messages[0]
    assert message.parts == (TextPart("what time is it?"),)
    assert MessageFinalized(message) in emitted(effects)
    # The server echoes our item: no duplicate.
    session.handle(ev.ItemAdded(message.id, "message", "user", text="what time is it?"))
    assert len(session.messages) == 1


def test_image_is_sent_as_data_url() -> None:
    session = connected()
    commands = sent(session.send_image("aGVsbG8=", "image/png"))
    create = commands[0]
    assert isinstance(create, ev.CreateMessage)
    assert create.image_url == "data:image/png;base64,aGVsbG8="
    assert session.messages[0].parts == (ImagePart("aGVsbG8=", "image/png"),)
    url = sent(session.send_image("https://cam.local/snap.jpg", "image/jpeg"))[0]
    assert isinstance(url, ev.CreateMessage) and url.image_url == "https://cam.local/snap.jpg"


def function_call_response(
    session: Session, response_id: str, calls: list[tuple[str, str]]
) -> list[Effect]:
    effects = session.handle(ev.ResponseCreated(response_id))
    for i, (name, args) in enumerate(calls):
        item = f"item_fc{i}"
        effects += session.handle(
            ev.OutputItemAdded(response_id, item, "function_call", call_id=f"call_{i}", name=name)
        )
        effects += session.handle(ev.FunctionCallDone(response_id, item, f"call_{i}", name, args))
    done_calls = tuple(
        ev.FunctionCallDone(response_id, f"item_fc{i}", f"call_{i}", name, args)
        for i, (name, args) in enumerate(calls)
    )
    effects += session.handle(ev.ResponseDone(response_id, "completed", function_calls=done_calls))
    return effects


def test_parallel_calls_run_once_then_all_outputs_then_one_response() -> None:
    session = connected()
    effects = function_call_response(
        session, "resp_t", [("get_time", "{}"), ("get_weather", '{"city":"Oslo"}')]
    )
    runs = [e for e in effects if isinstance(e, RunTools)]
    assert len(runs) == 1  # arguments.done and response.done name the same calls: once
    assert [c.name for c in runs[0].calls] == ["get_time", "get_weather"]
    assert session.mode is RealtimeMode.THINKING
    outcomes = [
        ToolOutcome(runs[0].calls[0], output={"time": "12:00"}, duration_ms=3),
        ToolOutcome(runs[0].calls[1], error="boom: weather service down", duration_ms=5),
    ]
    effects = session.tool_outputs("resp_t", outcomes)
    commands = sent(effects)
    assert commands == [
        ev.ToolResult("call_0", "get_time", '{"time": "12:00"}'),
        ev.ToolResult("call_1", "get_weather", '{"error": "boom: weather service down"}'),
        ev.RequestResponse(),
    ]
    finished = [e for e in emitted(effects) if isinstance(e, ToolCallFinished)]
    assert finished[1].error == "boom: weather service down"
    call_message = session.messages[0]
    assert call_message.parts == (
        ToolCallPart("call_0", "get_time", "{}", '{"time": "12:00"}'),
        ToolResultPart("call_0", '{"time": "12:00"}'),
    )


def test_tool_outputs_skip_response_create_when_user_spoke_meanwhile() -> None:
    session = connected()
    effects = function_call_response(session, "resp_t", [("slow", "{}")])
    run = next(e for e in effects if isinstance(e, RunTools))
    session.handle(ev.SpeechStarted("item_u2", 100))
    commands = sent(session.tool_outputs("resp_t", [ToolOutcome(run.calls[0], output=1)]))
    assert commands == [ev.ToolResult("call_0", "slow", "1")]


def test_response_create_waits_for_the_active_response() -> None:
    session = connected()
    session.handle(ev.ResponseCreated("resp_1"))
    assert sent(session.say("your tea is ready"))[1:] == []  # deferred
    effects = session.handle(ev.ResponseDone("resp_1", "completed"))
    assert sent(effects) == [ev.RequestResponse()]


def test_already_active_error_retries_after_that_response() -> None:
    session = connected()
    session.send_text("hello")
    session.handle(ev.ServerError("conversation_already_has_active_response", "busy", "busy"))
    assert session.error is None
    session.handle(ev.ResponseCreated("resp_other"))
    assert sent(session.handle(ev.ResponseDone("resp_other", "completed"))) == [
        ev.RequestResponse()
    ]


def test_local_barge_in_truncates_at_played_ms_and_cancels() -> None:
    session = connected()
    session.handle(ev.ResponseCreated("resp_1"))
    session.handle(ev.OutputItemAdded("resp_1", "item_a1", "message"))
    session.handle(ev.AssistantTranscriptDelta("resp_1", "item_a1", "Once upon a time"))
    session.handle(ev.AudioDelta("resp_1", "item_a1", b"\0" * 3000 * MS))
    effects = session.interrupt()
    assert isinstance(effects[0], StopPlayback)  # silence first
    assert CancelTools() in effects
    assert ev.CancelResponse() in sent(effects)
    effects = session.playback_stopped({"item_a1": 1234})
    assert sent(effects) == [ev.TruncateItem("item_a1", 1234)]
    message = next(e.message for e in emitted(effects) if isinstance(e, MessageFinalized))
    assert message.interrupted and message.duration_ms == 1234
    assert message.parts == (AudioPart("Once upon a time", 1234),)
    # Late deltas of the cancelled response are dropped.
    assert session.handle(ev.AudioDelta("resp_1", "item_a1", b"\0" * 100 * MS)) == []
    assert session.handle(ev.AssistantTranscriptDelta("resp_1", "item_a1", " more")) == []
    assert session.mode is RealtimeMode.LISTENING


def test_truncation_never_exceeds_received_and_skips_nothing_played() -> None:
    session = connected()
    session.handle(ev.ResponseCreated("r"))
    session.handle(ev.AudioDelta("r", "a", b"\0" * 500 * MS))
    session.interrupt()
    assert sent(session.playback_stopped({"a": 0})) == []  # 0 ms: nothing to cut
    session2 = connected()
    session2.handle(ev.ResponseCreated("r"))
    session2.handle(ev.AudioDelta("r", "a", b"\0" * 500 * MS))
    session2.handle(ev.ResponseDone("r", "completed"))
    session2.interrupt()
    # Reported more than was received (device bookkeeping overshoot): clamp.
    assert sent(session2.playback_stopped({"a": 900})) == []
    session3 = connected()
    session3.handle(ev.ResponseCreated("r"))
    session3.handle(ev.AudioDelta("r", "a", b"\0" * 500 * MS))
    session3.handle(ev.ResponseDone("r", "completed"))
    effects = session3.interrupt()
    assert ev.CancelResponse() not in sent(effects)  # nothing active: no cancel
    assert sent(session3.playback_stopped({"a": 499})) == [ev.TruncateItem("a", 499)]


def test_server_vad_barge_in_truncates_but_lets_the_server_cancel() -> None:
    session = connected(voice_interrupts=True)
    session.handle(ev.ResponseCreated("r"))
    session.handle(ev.OutputItemAdded("r", "a", "message"))
    session.handle(ev.AudioDelta("r", "a", b"\0" * 2000 * MS))
    effects = session.handle(ev.SpeechStarted("item_u2", 5000))
    assert isinstance(effects[0], StopPlayback)
    assert ev.CancelResponse() not in sent(effects)
    assert sent(session.playback_stopped({"a": 700})) == [ev.TruncateItem("a", 700)]
    effects = session.handle(ev.ResponseDone("r", "cancelled"))
    assert not any(isinstance(e, RunTools) for e in effects)


def test_half_duplex_speech_does_not_interrupt() -> None:
    session = connected(voice_interrupts=False)
    session.handle(ev.ResponseCreated("r"))
    session.handle(ev.AudioDelta("r", "a", b"\0" * 100 * MS))
    assert session.handle(ev.SpeechStarted("u", 0)) == []


def test_cancelled_response_with_calls_runs_no_tools() -> None:
    session = connected()
    session.handle(ev.ResponseCreated("r"))
    session.handle(ev.OutputItemAdded("r", "fc", "function_call", call_id="c1", name="x"))
    session.handle(ev.FunctionCallDone("r", "fc", "c1", "x", "{}"))
    effects = session.handle(ev.ResponseDone("r", "cancelled"))
    assert not any(isinstance(e, RunTools) for e in effects)
    finals = [e.message for e in emitted(effects) if isinstance(e, MessageFinalized)]
    assert finals and finals[0].interrupted


def test_errors_are_surfaced_with_codes_and_harmless_ones_ignored() -> None:
    session = connected()
    session.handle(ev.ServerError("response_cancel_not_active", "nothing to cancel", "harmless"))
    assert session.error is None
    session.handle(ev.ServerError("input_audio_buffer_commit_empty", "too small", "empty_turn"))
    assert session.error is not None
    assert (session.error.code, session.error.message) == (
        "input_audio_buffer_commit_empty",
        "too small",
    )
    session.handle(ev.ResponseCreated("r"))
    session.handle(ev.ResponseDone("r", "failed", error_code="server_error"))
    assert session.error is not None and session.error.code == "server_error"
    session.handle(ev.ResponseCreated("r3"))
    session.handle(ev.ResponseDone("r3", "failed"))
    assert session.error is not None and session.error.code == "response_failed"
    answer(session, "r2", "a2", 100, "fine")
    assert session.error is None


def test_disconnect_mid_answer_ends_it_interrupted_and_replays_context() -> None:
    session = connected()
    session.send_text("tell me a story")
    session.handle(ev.ResponseCreated("r"))
    session.handle(ev.OutputItemAdded("r", "a", "message"))
    session.handle(ev.AssistantTranscriptDelta("r", "a", "Once"))
    effects = session.disconnected()
    final = [e.message for e in emitted(effects) if isinstance(e, MessageFinalized)]
    assert final[0].interrupted and final[0].text == "Once"
    assert session.mode is RealtimeMode.IDLE
    session.connected()
    replay = sent(session.replay(12))
    assert [(c.role, c.text) for c in replay if isinstance(c, ev.CreateMessage)] == [
        ("user", "tell me a story"),
        ("assistant", "Once"),
    ]


def test_text_only_answer_becomes_a_text_part() -> None:
    session = connected(has_audio_output=False)
    session.handle(ev.ResponseCreated("r"))
    session.handle(ev.OutputItemAdded("r", "a", "message"))
    session.handle(ev.AssistantTranscriptDelta("r", "a", "Hi", spoken=False))
    assert session.mode is RealtimeMode.SPEAKING
    effects = session.handle(ev.ResponseDone("r", "completed"))
    final = [e.message for e in emitted(effects) if isinstance(e, MessageFinalized)]
    assert final[0].parts == (TextPart("Hi"),)


def test_tool_call_identity_is_kept() -> None:
    call = ToolCall("c", "n", "{}")
    assert ToolOutcome(call, output={"a": 1}).output_text() == '{"a": 1}'


def tool_turn(session: Session, n: int) -> None:
    """Typed question n, a tool call, its output, then a spoken answer that is heard."""
    session.send_text(f"what time is it? ({n})")
    response, item = f"resp_c{n}", f"item_c{n}"
    session.handle(ev.ResponseCreated(response))
    session.handle(
        ev.OutputItemAdded(response, item, "function_call", call_id=f"call_{n}", name="get_time")
    )
    call = ev.FunctionCallDone(response, item, f"call_{n}", "get_time", "{}")
    session.handle(call)
    effects = session.handle(ev.ResponseDone(response, "completed", function_calls=(call,)))
    run = next(e for e in effects if isinstance(e, RunTools))
    session.tool_outputs(response, [ToolOutcome(run.calls[0], output={"time": "12:00"})])
    answer(session, f"resp_a{n}", f"item_a{n}", 200, f"It is noon ({n}).")
    session.playback_drained()


def test_a_window_of_the_newest_messages_is_kept_and_replayed() -> None:
    session = Session(max_messages=7)
    session.connected()
    for n in range(10):
        tool_turn(session, n)
    messages = session.messages
    assert len(messages) == 7
    assert [m.text for m in messages if m.role == "assistant" and m.text] == [
        "It is noon (7).",
        "It is noon (8).",
        "It is noon (9).",
    ]
    assert messages[-1].id == "item_a9" and not messages[-1].interrupted
    session.disconnected()
    session.connected()
    replay = [c for c in sent(session.replay(3)) if isinstance(c, ev.CreateMessage)]
    assert [(c.role, c.text) for c in replay] == [
        ("assistant", "It is noon (8)."),
        ("user", "what time is it? (9)"),
        ("assistant", "It is noon (9)."),
    ]


def test_audio_deltas_leave_the_messages_snapshot_alone() -> None:
    # State is read after every event: it must not copy the conversation each time.
    session = connected()
    tool_turn(session, 0)
    session.handle(ev.ResponseCreated("r"))
    session.handle(ev.OutputItemAdded("r", "a", "message"))
    before = session.messages
    for _ in range(5):
        session.handle(ev.AudioDelta("r", "a", b"\0" * 20 * MS))
    assert session.messages is before
    session.handle(ev.ResponseDone("r", "completed"))
    session.playback_drained()
    assert session.messages is not before and session.messages[-1].duration_ms == 100


def test_memory_does_not_grow_with_the_conversation() -> None:
    session = connected()
    tracemalloc.start()
    try:
        for n in range(300):  # more messages than the window holds
            tool_turn(session, n)
        start, _ = tracemalloc.get_traced_memory()
        for n in range(300, 700):
            tool_turn(session, n)
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 400 turns would hold over a megabyte if anything per turn were kept.
    assert end - start < 50_000


def finalized(effects: list[Effect]) -> list[object]:
    return [e.message for e in emitted(effects) if isinstance(e, MessageFinalized)]


def test_an_answer_still_playing_across_a_reconnect_is_finalized_when_heard() -> None:
    session = connected()
    assert not finalized(answer(session, "resp_1", "item_a1", 1000, "It is noon."))
    session.disconnected()  # the answer has all arrived; the speaker still plays it
    session.connected()
    [message] = finalized(session.playback_drained())
    assert message.text == "It is noon." and not message.interrupted
    assert message.parts == (AudioPart("It is noon.", 1000),)


def test_an_answer_cut_after_a_reconnect_is_finalized_interrupted_without_a_truncate() -> None:
    session = connected()
    answer(session, "resp_1", "item_a1", 1000, "It is noon.")
    session.disconnected()
    session.connected()
    effects = session.playback_stopped({"item_a1": 400})
    [message] = finalized(effects)
    assert message.interrupted and message.duration_ms == 400
    assert sent(effects) == []  # the new session never had that item


# --- what differs between providers comes in as their traits ----------------------


def with_traits(mode: str = "server", **changes: object) -> Session:
    """A connected session whose provider differs from the default in `changes`."""
    session = Session(mode, traits=replace(DEFAULT_TRAITS, **changes))  # type: ignore[arg-type]
    session.connected()
    return session


def test_a_provider_that_cannot_truncate_still_gets_the_answer_marked_interrupted() -> None:
    session = with_traits(can_truncate=False)
    session.handle(ev.ResponseCreated("r"))
    session.handle(ev.OutputItemAdded("r", "a", "message"))
    session.handle(ev.AssistantTranscriptDelta("r", "a", "Once upon a time"))
    session.handle(ev.AudioDelta("r", "a", b"\0" * 3000 * MS))
    assert ev.CancelResponse() in sent(session.interrupt())
    effects = session.playback_stopped({"a": 1234})
    assert not any(isinstance(c, ev.TruncateItem) for c in sent(effects))
    [message] = finalized(effects)
    assert message.interrupted and message.duration_ms == 1234
    assert message.parts == (AudioPart("Once upon a time", 1234),)


def test_a_provider_that_answers_by_itself_is_not_asked_after_a_turn() -> None:
    session = with_traits("manual", answers_by_itself=True)
    session.start_listening()
    session.append_audio(b"\0" * 200 * MS)
    assert sent(session.stop_listening()) == [ev.EndTurn()]
    assert session.mode is RealtimeMode.THINKING


def test_milliseconds_follow_the_provider_formats() -> None:
    # 16 kHz in (32 bytes a millisecond), 24 kHz out (48).
    session = with_traits("manual", input_format=AudioFormat(16_000))
    session.start_listening()
    session.append_audio(b"\0" * 99 * 32)
    assert sent(session.stop_listening()) == [ev.DiscardTurn()]  # 99 ms: too short
    session.start_listening()
    session.append_audio(b"\0" * 100 * 32)
    assert sent(session.stop_listening())[0] == ev.EndTurn()
    session.handle(ev.InputCommitted("u", None))
    assert session.messages[0].duration_ms == 100
    answer(session, "r", "a", 300, "Hi.")
    [message] = finalized(session.playback_drained())
    assert message.duration_ms == 300


def test_a_provider_without_the_asked_turn_taking_is_refused() -> None:
    with pytest.raises(ValueError, match="'manual'"):
        Session("manual", traits=replace(DEFAULT_TRAITS, manual_turns=False))
    with pytest.raises(ValueError, match="'semantic'"):
        Session("semantic", traits=replace(DEFAULT_TRAITS, server_turns=False))


def test_going_away_and_resume_handles_are_not_the_sessions_business() -> None:
    session = connected()
    assert session.handle(ev.GoingAway(5000)) == []
    assert session.handle(ev.ResumeHandle("h1")) == []
    assert session.mode is RealtimeMode.LISTENING
