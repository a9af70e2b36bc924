"""The client's retry budget: which answers it retries, how long it waits, when it stops.

The server is scripted with httpx's in-process transport so that each answer (503 with
Retry-After, 429, a refused connection) comes exactly when wanted; sleeps are recorded, not
slept. Everything else about the client is tested against a real server in tests/e2e.
"""

from __future__ import annotations

import random

import httpx
import pytest

from inferd.client import (
    AsyncClient,
    Client,
    Conflict,
    ConnectionFailed,
    DeadlineExceeded,
    Forbidden,
    NotFound,
    Overloaded,
    QuotaExceeded,
    RateLimited,
    RetryPolicy,
    ServerError,
    Unauthorized,
    ValidationError,
)
from inferd.client._retry import Attempts
from inferd.client.errors import InferdClientError, ModelNotReady, error_from_response

OK = {"prediction": 0, "confidence": 0.9, "model_version": "1", "request_id": "r"}
ACCEPTED = {"id": "req_1", "status": "queued", "created_at": None, "events_url": "/e"}


def _error(status: int, code: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    body = {"error": {"code": code, "message": f"{code}!", "retryable": status in (429, 503)}}
    return httpx.Response(status, json=body, headers=headers)


class Script:
    """Answers requests in turn from a list; records what was sent."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _client(script: Script, sleeps: list[float], **kwargs: object) -> Client:
    client = Client("http://inferd.test", transport=httpx.MockTransport(script), **kwargs)  # type: ignore[arg-type]
    client._sleep = sleeps.append  # type: ignore[method-assign,assignment]
    return client


def test_503_is_retried_after_retry_after() -> None:
    script = Script(
        _error(503, "overloaded", "2"),
        _error(503, "model_not_ready", "1"),
        httpx.Response(200, json=OK),
    )
    sleeps: list[float] = []
    with _client(script, sleeps) as client:
        assert client.predict([1.0, 2.0]).prediction == 0
    assert len(script.requests) == 3
    assert 2.0 <= sleeps[0] <= 2.2 and 1.0 <= sleeps[1] <= 1.1  # Retry-After plus <= 10 %


def test_attempts_are_bounded() -> None:
    script = Script(*[_error(503, "overloaded", "0") for _ in range(3)])
    sleeps: list[float] = []
    with (
        _client(script, sleeps, retry=RetryPolicy(max_attempts=3)) as client,
        pytest.raises(Overloaded) as info,
    ):
        client.predict([1.0])
    assert len(script.requests) == 3 and len(sleeps) == 2
    assert (info.value.status, info.value.code, info.value.retryable) == (503, "overloaded", True)


def test_total_wait_is_bounded() -> None:
    # A second 3 s wait would pass the 5 s budget (6 s in all): raised, not slept.
    script = Script(_error(429, "rate_limited", "3"), _error(429, "rate_limited", "3"))
    sleeps: list[float] = []
    with (
        _client(script, sleeps, retry=RetryPolicy(max_wait=5.0, jitter=0)) as client,
        pytest.raises(RateLimited) as info,
    ):
        client.predict([1.0])
    assert sleeps == [3.0] and len(script.requests) == 2
    assert info.value.retry_after == 3.0


def test_a_wait_past_the_budget_is_not_started() -> None:
    script = Script(_error(429, "quota_exceeded", "40000"))  # the day's budget is spent
    sleeps: list[float] = []
    with _client(script, sleeps) as client, pytest.raises(QuotaExceeded):
        client.predict([1.0])
    assert sleeps == []


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (_error(422, "validation_failed"), ValidationError),
        (_error(500, "model_error"), ServerError),
    ],
)
def test_other_errors_are_not_retried(answer: httpx.Response, error: type[Exception]) -> None:
    script = Script(answer)
    sleeps: list[float] = []
    with _client(script, sleeps) as client, pytest.raises(error):
        client.predict([1.0])
    assert sleeps == [] and len(script.requests) == 1


def test_connection_errors_are_retried_with_backoff() -> None:
    refused = httpx.ConnectError("connection refused")
    script = Script(refused, refused, httpx.Response(200, json=OK))
    sleeps: list[float] = []
    policy = RetryPolicy(backoff=0.5, max_backoff=0.8)
    with _client(script, sleeps, retry=policy) as client:
        assert client.predict([1.0]).request_id == "r"
    assert 0.25 <= sleeps[0] <= 0.5 and 0.4 <= sleeps[1] <= 0.8


def test_submit_carries_one_idempotency_key_across_retries() -> None:
    script = Script(_error(503, "store_unavailable", "0"), httpx.Response(202, json=ACCEPTED))
    sleeps: list[float] = []
    with _client(script, sleeps) as client:
        job = client.submit("m", "input")
    keys = [r.headers.get("idempotency-key") for r in script.requests]
    assert len(keys) == 2 and keys[0] == keys[1] == job.idempotency_key
    assert job.idempotency_key is not None and job.idempotency_key.startswith("inferd-client-")


def test_submit_without_a_key_is_never_retried() -> None:
    for answer in (_error(503, "store_unavailable", "0"), httpx.ReadError("connection reset")):
        script = Script(answer, httpx.Response(202, json=ACCEPTED))
        sleeps: list[float] = []
        with (
            _client(script, sleeps, auto_idempotency_keys=False) as client,
            pytest.raises(InferdClientError),
        ):
            client.submit("m", "input")
        assert len(script.requests) == 1 and sleeps == []
        assert "idempotency-key" not in script.requests[0].headers


def test_a_given_key_is_sent_and_makes_submit_retryable() -> None:
    script = Script(httpx.ReadError("connection reset"), httpx.Response(202, json=ACCEPTED))
    sleeps: list[float] = []
    with _client(script, sleeps, auto_idempotency_keys=False) as client:
        job = client.submit("m", "input", idempotency_key="k-1")
    assert [r.headers["idempotency-key"] for r in script.requests] == ["k-1", "k-1"]
    assert job.idempotency_key == "k-1" and len(sleeps) == 1


async def test_async_client_retries_the_same_way() -> None:
    script = Script(_error(503, "overloaded", "1"), httpx.Response(200, json=OK))
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    client = AsyncClient("http://inferd.test", transport=httpx.MockTransport(script))
    client._sleep = record  # type: ignore[method-assign]
    async with client:
        assert (await client.predict([1.0])).confidence == 0.9
    assert len(script.requests) == 2 and 1.0 <= sleeps[0] <= 1.1


def test_attempts_alone() -> None:
    rng = random.Random(7)
    attempts = Attempts(RetryPolicy(max_attempts=3, jitter=0), idempotent=True, rng=rng)
    busy = ModelNotReady("loading", status=503, retry_after=1.0)
    assert attempts.next_delay(busy) == 1.0
    assert attempts.next_delay(ConnectionFailed("reset")) is not None
    assert attempts.next_delay(busy) is None  # third try was the last
    assert Attempts(RetryPolicy(), idempotent=False).next_delay(busy) is None
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (404, "model_not_found", NotFound),
        (401, "unauthorized", Unauthorized),
        (403, "forbidden", Forbidden),
        (409, "idempotency_conflict", Conflict),
        (503, "model_not_ready", ModelNotReady),
        (504, "deadline_exceeded", DeadlineExceeded),
        (418, "brand_new_code", InferdClientError),  # unknown code and status: the root
        (502, "brand_new_code", ServerError),  # unknown code, a 5xx: a server error
        (422, "brand_new_code", ValidationError),  # unknown code: by status
    ],
)
def test_error_codes_map_to_exceptions(
    status: int, code: str, expected: type[InferdClientError]
) -> None:
    error = error_from_response(_error(status, code, "7"))
    assert type(error) is expected
    assert (error.status, error.code, error.message, error.retry_after) == (
        status,
        code,
        f"{code}!",
        7.0,
    )


def test_a_body_that_is_not_an_inferd_error() -> None:
    error = error_from_response(httpx.Response(502, text="<html>bad gateway</html>"))
    assert isinstance(error, ServerError) and error.status == 502
    assert "bad gateway" in error.message
