"""The client's event-stream parser and its resume state, fed the server's own frames."""

from __future__ import annotations

import pytest

from inferd.client import DoneEvent, ErrorEvent, ResponseEvent, RetryPolicy, StatusEvent
from inferd.client._sse import Follow, Resume, ServerSentEvent, SSEDecoder
from inferd.client.errors import (
    ConnectionFailed,
    NotFound,
    Overloaded,
    StreamInterrupted,
    Unauthorized,
)
from inferd.http.sse import format_comment, format_event

STREAM = (
    format_event(1, "status", {"status": "queued", "attempt": 0}, retry_ms=250)
    + format_comment("keep-alive")
    + format_event(2, "response", {"response": "line one\nline two", "sent_at": None})
    + format_event(3, "response", b'{"response": {"a": [1, 2]}}')
    + format_event(4, "done", {"status": "succeeded", "result": {"text": "x"}})
)


def _all(decoder: SSEDecoder, pieces: list[bytes]) -> list[ServerSentEvent]:
    return [event for piece in pieces for event in decoder.feed(piece)]


def test_whole_stream_at_once() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(STREAM)
    assert [(e.id, e.event) for e in events] == [
        ("1", "status"),
        ("2", "response"),
        ("3", "response"),
        ("4", "done"),
    ]
    assert events[0].retry == 250 and decoder.retry == 250
    assert events[1].data == '{"response":"line one\\nline two","sent_at":null}'


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_any_split_gives_the_same_events(size: int) -> None:
    whole = SSEDecoder().feed(STREAM)
    pieces = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert _all(SSEDecoder(), pieces) == whole


@pytest.mark.parametrize("newline", [b"\r\n", b"\r", b"\n"])
def test_every_line_ending_and_a_crlf_cut_in_two(newline: bytes) -> None:
    text = newline.join([b"id: 7", b"event: response", b"data: a", b"data: b", b"", b""])
    for cut in range(len(text) + 1):
        events = _all(SSEDecoder(), [text[:cut], text[cut:]])
        assert events == [ServerSentEvent("response", "a\nb", "7")], (newline, cut)


def test_standard_field_rules() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(
        b"\xef\xbb\xbf"  # a BOM opens the stream and is dropped
        b": a comment\n"
        b"event: status\nid: 5\n\n"  # no data line: nothing dispatched, but the id stays
        b"data:no space\n\n"  # unnamed event: "message", with the last id
        b"retry: soon\nunknown: field\ndata\n\n"  # a bad retry and an unknown field are ignored
        b"id: 6\x00\ndata: nul id ignored\n\n"
    )
    assert events == [
        ServerSentEvent("message", "no space", "5"),
        ServerSentEvent("message", "", "5"),
        ServerSentEvent("message", "nul id ignored", "5"),
    ]
    assert decoder.retry is None


def test_an_unfinished_frame_is_not_dispatched() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 1\nevent: response\ndata: {}") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\n") == [ServerSentEvent("response", "{}", "1")]


def test_resume_drops_replayed_ids_and_sends_the_last_one() -> None:
    resume = Resume()
    assert resume.header() == {}
    assert resume.accept(ServerSentEvent("response", "{}", "1"))
    assert resume.accept(ServerSentEvent("response", "{}", "2"))
    assert not resume.accept(ServerSentEvent("response", "{}", "2"))
    assert not resume.accept(ServerSentEvent("response", "{}", "1"))
    assert resume.accept(ServerSentEvent("message", "no id", None))
    assert resume.header() == {"last-event-id": "2"}
    assert Resume(9).header() == {"last-event-id": "9"}


def test_follow_types_events_once_across_connections() -> None:
    follow = Follow(None, max_reconnects=2, policy=RetryPolicy())
    assert follow.open() == {"accept": "text/event-stream"}
    cut = STREAM.index(b"id: 3")
    first = follow.feed(STREAM[: cut + 10])  # the connection drops inside frame 3
    assert [type(e) for e in first] == [StatusEvent, ResponseEvent]
    assert first[1].id == 2 and isinstance(first[1], ResponseEvent)
    assert first[1].response == "line one\nline two"
    assert follow.next_delay(ConnectionFailed("reset")) == 0.25  # the server's retry: 250 ms
    assert follow.open()["last-event-id"] == "2"
    # A server that replays from the start: events 1 and 2 are not seen again.
    second = follow.feed(STREAM)
    assert [(e.name, e.id) for e in second] == [("response", 3), ("done", 4)]
    assert isinstance(second[0], ResponseEvent) and second[0].response == {"a": [1, 2]}
    assert isinstance(second[1], DoneEvent) and second[1].result == {"text": "x"}
    assert second[1].terminal and not second[0].terminal


def test_follow_gives_up_after_failures_without_progress() -> None:
    follow = Follow(3, max_reconnects=2, policy=RetryPolicy(backoff=0.1))
    assert follow.next_delay(ConnectionFailed("reset")) == pytest.approx(0.1)
    busy = Overloaded("busy", status=503, retry_after=2.0)
    assert follow.next_delay(busy) == 2.0  # Retry-After wins over the backoff
    with pytest.raises(StreamInterrupted, match="resume later from event 3") as info:
        follow.next_delay(ConnectionFailed("reset"))
    assert isinstance(info.value.__cause__, ConnectionFailed)


def test_progress_resets_the_reconnect_budget() -> None:
    follow = Follow(None, max_reconnects=1, policy=RetryPolicy())
    for seq in range(1, 5):  # a stream that breaks after every event keeps going
        follow.next_delay(ConnectionFailed("reset"))
        follow.open()
        assert [e.id for e in follow.feed(format_event(seq, "status", {"status": "running"}))] == [
            seq
        ]
    assert follow.reconnects == 4


@pytest.mark.parametrize(
    "error", [NotFound("no request", status=404), Unauthorized("no key", status=401)]
)
def test_errors_that_reconnecting_cannot_fix_are_raised(error: Exception) -> None:
    follow = Follow(None, max_reconnects=5, policy=RetryPolicy())
    with pytest.raises(type(error)):
        follow.next_delay(error)  # type: ignore[arg-type]


def test_error_event_and_unknown_event() -> None:
    follow = Follow(None, max_reconnects=0, policy=RetryPolicy())
    events = follow.feed(
        format_event(1, "error", {"status": "cancelled", "error": "cancelled by the user"})
        + format_event(2, "progress", {"percent": 50})
        + b"id: 3\nevent: response\ndata: not json\n\n"
    )
    error = events[0]
    assert isinstance(error, ErrorEvent) and error.terminal
    assert (error.status, error.error) == ("cancelled", "cancelled by the user")
    assert events[1].name == "progress" and events[1].data == {"percent": 50}
    assert isinstance(events[2], ResponseEvent) and events[2].response is None
    assert events[2].data == {"value": "not json"}
