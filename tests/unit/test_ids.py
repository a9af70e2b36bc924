"""Request ids sort by creation time; cursors round-trip and refuse anything else."""

from __future__ import annotations

import base64
import threading

import pytest

from inferd.errors import BadRequest
from inferd.jobs.ids import (
    decode_cursor,
    encode_cursor,
    is_request_id,
    new_request_id,
    request_id_millis,
)

NOW_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z


def test_a_request_id_is_req_and_a_ulid() -> None:
    request_id = new_request_id(NOW_MS)
    assert request_id.startswith("req_") and len(request_id) == 30
    assert is_request_id(request_id)
    assert request_id_millis(request_id) == NOW_MS


def test_ids_of_later_milliseconds_sort_later() -> None:
    ids = [new_request_id(NOW_MS + step) for step in (0, 1, 2, 1000, 86_400_000)]
    assert ids == sorted(ids)
    assert [request_id_millis(i) for i in ids] == [NOW_MS + s for s in (0, 1, 2, 1000, 86_400_000)]


def test_ids_of_one_millisecond_increase_monotonically() -> None:
    ids = [new_request_id(NOW_MS + 5) for _ in range(1000)]
    assert ids == sorted(ids) and len(set(ids)) == 1000


def test_ids_made_by_threads_are_unique() -> None:
    made: list[str] = []

    def make() -> None:
        made.extend(new_request_id(NOW_MS + 7) for _ in range(500))

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 2000


def test_default_time_is_now() -> None:
    import time

    before = int(time.time() * 1000)
    millis = request_id_millis(new_request_id())
    assert before <= millis <= int(time.time() * 1000)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "req_",
        "01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "req_01ARZ3NDEKTSV4RRFFQ69G5FA",
        "req_01arz3ndektsv4rrffq69g5fav",
        "req_81ARZ3NDEKTSV4RRFFQ69G5FAV",  # past the 48-bit time range
        "req_01ARZ3NDEKTSV4RRFFQ69G5FAU",  # U is not in Crockford's alphabet
    ],
)
def test_is_request_id_refuses_other_shapes(value: str) -> None:
    assert not is_request_id(value)
    with pytest.raises(ValueError, match="not a request id"):
        request_id_millis(value)


def test_out_of_range_times_are_refused() -> None:
    with pytest.raises(ValueError, match="out of the ULID range"):
        new_request_id(-1)
    with pytest.raises(ValueError, match="out of the ULID range"):
        new_request_id(1 << 48)


def test_cursor_round_trips_and_is_url_safe() -> None:
    request_id = new_request_id(NOW_MS)
    cursor = encode_cursor(NOW_MS * 1000 + 123, request_id)
    assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert decode_cursor(cursor) == (NOW_MS * 1000 + 123, request_id)
    assert request_id not in cursor  # opaque: not the id in clear


def _forge(payload: bytes) -> str:
    return base64.urlsafe_b64encode(b"\0" * 8 + payload).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        " ",
        "=",
        "abc$",
        "é" * 10,
        "A" * 201,
        "AAAA====",
        _forge(b"1:123:req_01ARZ3NDEKTSV4RRFFQ69G5FAV"),  # a made-up checksum
    ],
)
def test_malformed_cursors_are_bad_requests(cursor: str) -> None:
    with pytest.raises(BadRequest, match="invalid cursor") as info:
        decode_cursor(cursor)
    assert info.value.status_code == 400


def test_every_single_character_edit_is_refused() -> None:
    cursor = encode_cursor(NOW_MS * 1000, new_request_id(NOW_MS))
    for index in range(len(cursor)):
        replacement = "B" if cursor[index] != "B" else "C"
        edited = cursor[:index] + replacement + cursor[index + 1 :]
        with pytest.raises(BadRequest):
            decode_cursor(edited)
    for edited in (cursor[:-1], cursor + "A", cursor[1:]):
        with pytest.raises(BadRequest):
            decode_cursor(edited)
